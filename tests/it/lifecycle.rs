//! A session's lifecycle against clients that give up, stop reading, or race each
//! other: no slot is ever left behind or held by a client that is gone.
//!
//! Some of these tests fill every replication slot of the cluster, so the tests of this
//! module run one at a time, on a cluster of their own.

/// A cluster of its own: a test here fills every replication slot of it.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("lifecycle")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn setup() -> (common::TestDb, tokio_postgres::Client) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE test_table (id serial PRIMARY KEY, name text); INSERT INTO test_table (name) VALUES ('abc');",
    )
    .await
    .unwrap();
    (db, pg)
}

fn default_entry(sessions: &Value) -> Option<&Value> {
    sessions.as_array()?.iter().find(|s| s["default"] == true)
}

/// A client that gives up on `/v1/init` at any moment (the connection closed after
/// 1 to 40 ms) leaves no slot behind: each init runs to completion or not at all, and
/// the default session is the last one's.
#[tokio::test]
async fn abandoned_inits_leave_no_slot_behind() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (_db, pg) = setup().await;
    let server = TestServer::start(&_db).await;
    server.init().await;
    for i in 0..30u64 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!("GET /v1/init HTTP/1.1\r\nhost: {}\r\n\r\n", server.addr);
        tcp.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1 + i * 13 % 40)).await;
        drop(tcp);
    }
    // Inits run one at a time, in order: this one runs after all of the above.
    let last = server.init().await;
    assert_eq!(database_slots(&pg).await, vec![last.clone()], "one slot: the last init's");
    let (_, sessions) = server.get("/v1/sessions").await;
    assert_eq!(default_entry(&sessions).unwrap()["slotName"], last.as_str(), "{sessions}");
    server.stop().await;
}

/// An init that fails (here: every replication slot is taken) leaves the previous
/// session whole: its slot, its snapshot, and its place as the default.
#[tokio::test]
async fn a_failed_init_keeps_the_previous_session() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let server = TestServer::start(&db).await;
    let slot = server.init().await;
    let free: i64 = pg
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for i in 0..free {
        pg.execute("SELECT pg_create_physical_replication_slot($1)", &[&format!("filler_{i}")]).await.unwrap();
    }
    let (status, body) = server.get("/v1/init").await;
    for i in 0..free {
        pg.execute("SELECT pg_drop_replication_slot($1)", &[&format!("filler_{i}")]).await.unwrap();
    }
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("replication slots"), "{body}");
    assert_eq!(database_slots(&pg).await, vec![slot.clone()]);
    let (_, sessions) = server.get("/v1/sessions").await;
    let default = default_entry(&sessions).unwrap();
    assert_eq!((&default["slotName"], &default["snapshot"]), (&Value::from(slot.as_str()), &Value::from("held")));
    let (status, rows) = server.snapshot(serde_json::json!({"table": "test_table"})).await;
    assert_eq!(status, 200, "{rows}");
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('still streaming')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "still streaming");
    server.stop().await;
}

/// `/v1/init` while a client is opening the stream of the default session: the
/// stream is ended too (or refused), and init answers at once instead of waiting 20 s
/// for the slot and failing with "slot is active".
#[tokio::test]
async fn init_racing_a_stream_that_opens_ends_it() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let server = TestServer::start(&db).await;
    let mut slot = server.init().await;
    for round in 0..12u64 {
        let url = server.stream_url(&slot);
        let opening = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await });
        tokio::time::sleep(Duration::from_millis(round * 3 % 20)).await;
        let started = Instant::now();
        let (status, body) = server.get("/v1/init").await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(started.elapsed() < Duration::from_secs(8), "round {round}: init took {:?}", started.elapsed());
        match opening.await.unwrap() {
            // Upgraded before the reset: closed by it.
            Ok((mut ws, _)) => {
                let (code, reason) = await_close(&mut ws).await;
                assert_eq!(code, 1000, "round {round}: {reason}");
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert!(matches!(r.status().as_u16(), 404 | 409), "round {round}: {}", r.status());
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        slot = body["slotName"].as_str().unwrap().to_owned();
        assert_eq!(database_slots(&pg).await, [slot.clone()], "round {round}");
    }
    server.stop().await;
}

/// A client that stops reading in the middle of a large transaction: the server sees
/// no sign of life for `dead_after`, gives up on the socket even though its writes are
/// stuck, and frees the slot; a new client gets the transaction.
#[tokio::test]
async fn a_client_that_stops_reading_frees_the_slot_within_dead_after() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let mut settings = fast_settings(&db);
    settings.session.socket.dead_after = Duration::from_secs(2);
    let server = TestServer::start_with(settings).await;
    let slot = server.init().await;
    // Connected, and then never read from again.
    let stalled = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) SELECT repeat('x', 1000) FROM generate_series(1, 40000)", &[])
        .await
        .unwrap();
    let stalled_at = Instant::now();
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let freed_after = stalled_at.elapsed();
    assert!(freed_after < Duration::from_secs(15), "the slot was held {freed_after:?}");
    // The close frame may take a little longer to give up on than the slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let (_, sessions) = server.get("/v1/sessions").await;
        if !default_entry(&sessions).unwrap()["lastClose"].is_null() || Instant::now() > deadline {
            break sessions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let close = &default_entry(&sessions).unwrap()["lastClose"];
    assert_eq!((&close["by"], &close["code"]), (&Value::from("server"), &Value::from(1001)), "{sessions}");
    assert!(close["reason"].as_str().unwrap().contains("no sign of life"), "{sessions}");
    let mut ws = server.connect(&slot).await;
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"].as_array().unwrap().len(), 40000);
    drop(ws);
    drop(stalled);
    // The session can be ended at once: nothing waits on the dead client.
    let started = Instant::now();
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let (status, body) = server.get("/v1/init").await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5), "init took {:?}", started.elapsed());
    server.stop().await;
}
