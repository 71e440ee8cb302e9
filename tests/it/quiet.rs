//! Quiet databases (issue 21): a session of a database that never changes, on a cluster
//! whose other databases write a lot, must not retain their WAL while its client is
//! connected and caught up. Other CDC tools write heartbeats into the quiet database for
//! this; we confirm the walsender's keepalive position instead.

/// A cluster of its own: a gigabyte of WAL would slow every other test's cluster, and a
/// small max_wal_size makes checkpoints remove (not recycle) what no slot retains, so
/// that pg_wal's size says what the slots hold.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        static CONFIGURED: std::sync::Once = std::sync::Once::new();
        CONFIGURED.call_once(|| {
            let settings = ["max_wal_size=96MB", "min_wal_size=32MB"].map(str::to_owned).to_vec();
            configure_own_cluster("quiet", ClusterSetup { settings, ..ClusterSetup::default() });
        });
        own_cluster("quiet")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const MIB: i64 = 1024 * 1024;
/// What a caught-up slot may still retain: the WAL since the last running-xacts record
/// its walsender decoded, which is where Postgres lets restart_lsn move to.
const SMALL: i64 = 64 * MIB;

/// A client that reads its stream and acks every message at once, as a caught-up
/// client does. Answers the messages that carried changes when it is closed.
fn keep_reading(
    mut ws: Ws,
    name: &'static str,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<Value>>) {
    let (close_tx, mut close_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut changes = Vec::new();
        loop {
            let message = tokio::select! {
                _ = &mut close_rx => break,
                m = ws.next() => m,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    let v: Value =
                        serde_json::from_str(text.as_str()).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
                    if let Some(lsn) = v["nextlsn"].as_str() {
                        ack(&mut ws, lsn).await;
                    }
                    if v["change"].as_array().is_some_and(|c| !c.is_empty()) {
                        changes.push(v);
                    }
                }
                Some(Ok(Message::Close(frame))) => panic!("{name}: the server closed the stream: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{name}: {e}"),
                None => panic!("{name}: the stream ended"),
            }
        }
        let _ = ws.close(None).await;
        changes
    });
    (close_tx, task)
}

/// WAL the slot retains, by Postgres's count and by the server's (`GET /v1/sessions`).
async fn retained(pg: &tokio_postgres::Client, server: &TestServer, slot: &str) -> (i64, i64) {
    let row = pg
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    let (status, sessions) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    let ours = sessions.as_array().unwrap().iter().find(|s| s["slotName"] == slot);
    let reported = ours.and_then(|s| s["retainedBytes"].as_i64()).unwrap_or_else(|| panic!("{slot}: {sessions}"));
    (row.get(0), reported)
}

async fn wal_lsn(pg: &tokio_postgres::Client) -> String {
    pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0)
}

async fn pg_wal_bytes(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one("SELECT sum(size)::bigint FROM pg_ls_waldir()", &[]).await.unwrap().get(0)
}

/// A v1 slot (wal2json), a v2 wal2json session and a v2 pgoutput session (logical
/// messages on) of a database nobody writes to, each with a client that is connected
/// and caught up, while another database of the cluster writes a gigabyte of WAL:
/// every slot ends up retaining little of it, by Postgres's count and by the server's,
/// and pg_wal does not keep it.
#[tokio::test]
async fn a_quiet_database_retains_none_of_the_wal_of_a_busy_one() {
    let quiet = common::fresh_db().await;
    let busy = common::fresh_db().await;
    let pg = quiet.client().await;
    pg.batch_execute("CREATE TABLE quiet_t (id serial PRIMARY KEY, v text)").await.unwrap();
    // The production status interval (the tests' 500 ms is not what moves the slot): a
    // keepalive's position is confirmed when it comes, not on the timer.
    let mut settings = fast_settings(&quiet);
    settings.session.status_interval = Duration::from_secs(10);
    let server = TestServer::start_with(settings).await;

    let v1 = server.init().await;
    let mut slots = vec![("v1", v1.clone())];
    let mut sockets = vec![("v1", server.connect(&v1).await)];
    for (name, plugin) in [("quiet_w", "wal2json"), ("quiet_p", "pgoutput")] {
        let body = json!({"name": name, "tables": ["quiet_t"], "plugin": plugin});
        let (status, def) = server.post("/v2/sessions", &body.to_string()).await;
        assert_eq!(status, 201, "{def}");
        slots.push((name, def["slotName"].as_str().unwrap().to_owned()));
        let url = format!("ws://{}/v2/sessions/{name}/stream", server.addr);
        sockets.push((name, tokio_tungstenite::connect_async(url).await.expect("upgrade").0));
    }
    // One change, received and acked by every client: each stream runs and is caught up.
    pg.execute("INSERT INTO quiet_t (v) VALUES ('before')", &[]).await.unwrap();
    for ((name, ws), (_, slot)) in sockets.iter_mut().zip(&slots) {
        let tx = next_changes(ws).await;
        assert_eq!(tx["change"][0]["columnvalues"][1], "before", "{name}: {tx}");
        let lsn = tx["nextlsn"].as_str().unwrap().to_owned();
        ack(ws, &lsn).await;
        await_confirmed(&pg, slot, &lsn).await;
    }
    let readers: Vec<_> = sockets.into_iter().map(|(name, ws)| keep_reading(ws, name)).collect();

    // A gigabyte of WAL in the other database: 1 MB values stored out of line and
    // uncompressed, 100 MB a statement.
    let writer = busy.client().await;
    writer
        .batch_execute("CREATE TABLE big (id int, pad text); ALTER TABLE big ALTER pad SET STORAGE EXTERNAL")
        .await
        .unwrap();
    let from = wal_lsn(&pg).await;
    let started = Instant::now();
    let moved = loop {
        writer
            .execute("INSERT INTO big SELECT g, repeat('x', 1048576) FROM generate_series(1, 100) g", &[])
            .await
            .unwrap();
        let moved: i64 = pg
            .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", &[&from])
            .await
            .unwrap()
            .get(0);
        if moved >= 1024 * MIB {
            break moved;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "only {} MB of WAL in 10 minutes", moved / MIB);
    };
    eprintln!("{} MB of WAL written elsewhere in {:?}", moved / MIB, started.elapsed());

    // restart_lsn moves only to a running-xacts record the walsender decoded and the
    // client's confirmation passed. The bgwriter logs one every 15 s while there is
    // WAL; each CHECKPOINT logs one at once, which makes the wait short.
    let settled = Instant::now();
    let mut last = Vec::new();
    loop {
        pg.batch_execute("CHECKPOINT").await.unwrap();
        last.clear();
        for (name, slot) in &slots {
            last.push((*name, retained(&pg, &server, slot).await));
        }
        if last.iter().all(|(_, (by_pg, by_server))| *by_pg < SMALL && *by_server < SMALL) {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(60),
            "still retained after 60 s (Postgres's, the server's): {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("retained WAL under {} MB {:?} after the writes: {last:?}", SMALL / MIB, settled.elapsed());
    // The checkpoint after restart_lsn moved removes the segments before it. What it
    // keeps (segments recycled for later, up to max_wal_size, and those since its redo
    // point) varies from run to run; a slot that held the writes would keep them all.
    pg.batch_execute("CHECKPOINT").await.unwrap();
    let pg_wal = pg_wal_bytes(&pg).await;
    eprintln!("pg_wal holds {} MB", pg_wal / MIB);
    assert!(
        pg_wal < 512 * MIB,
        "pg_wal holds {} MB of the {} MB written after the slots moved",
        pg_wal / MIB,
        moved / MIB
    );

    for (close, task) in readers {
        let _ = close.send(());
        assert_eq!(task.await.unwrap(), Vec::<Value>::new(), "the quiet database sent changes");
    }
    server.stop().await;
}
