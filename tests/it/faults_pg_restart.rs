//! A Postgres crash while a client streams (a cluster of its own: stopping a cluster
//! disconnects every client of it, so the tests here also take turns).

/// A cluster of its own: the tests here stop and restart it.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("faults_pg_restart")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::time::Instant;

/// Held by each test for its whole run: they all stop the cluster.
static CLUSTER_STOPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh database with `t (n int PRIMARY KEY)`, a client whose commits survive a crash
/// (the cluster runs with synchronous_commit=off), our server, and a stream of a new
/// slot that has received rows 1..=6 (one transaction each) and acked rows 1..=3.
/// Returns the six frames too.
async fn streaming_with_three_acked() -> (common::TestDb, tokio_postgres::Client, TestServer, String, Ws, Vec<Value>) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("SET synchronous_commit = on; CREATE TABLE t (n int PRIMARY KEY)").await.unwrap();
    let server = TestServer::start(&db).await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    for n in 1..=6 {
        pg.execute("INSERT INTO t VALUES ($1)", &[&n]).await.unwrap();
    }
    let mut frames = Vec::new();
    for n in 1..=6 {
        let f = next_changes(&mut ws).await;
        assert_eq!(row_numbers(&f), [n]);
        frames.push(f);
    }
    for f in &frames[..3] {
        ack(&mut ws, f["nextlsn"].as_str().unwrap()).await;
    }
    await_confirmed(&pg, &slot, frames[2]["nextlsn"].as_str().unwrap()).await;
    (db, pg, server, slot, ws, frames)
}

/// A new client of `db` with synchronous commits.
async fn durable_client(db: &common::TestDb) -> tokio_postgres::Client {
    let pg = db.client().await;
    pg.batch_execute("SET synchronous_commit = on").await.unwrap();
    pg
}

/// Reads data frames (acking each) until every row of `want` has arrived; returns the
/// rows in arrival order and the first frame's nextlsn.
async fn read_until(ws: &mut Ws, want: std::ops::RangeInclusive<i64>) -> (Vec<i64>, String) {
    let mut rows: Vec<i64> = Vec::new();
    let mut first_lsn = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !want.clone().all(|n| rows.contains(&n)) {
        assert!(Instant::now() < deadline, "only rows {rows:?} arrived");
        let f = next_changes(ws).await;
        let lsn = f["nextlsn"].as_str().unwrap().to_owned();
        first_lsn.get_or_insert_with(|| lsn.clone());
        rows.extend(row_numbers(&f));
        ack(ws, &lsn).await;
    }
    (rows, first_lsn.unwrap_or_default())
}

/// An immediate stop of Postgres while a client streams: the client is told (an error
/// message, then close 1011 with a reason); while Postgres is down the API answers with
/// JSON errors (503 for init and the stream; the snapshot died with Postgres, so the
/// snapshot endpoint says it was released, 409); once Postgres is back the old slot
/// streams again and every committed row arrives, and `/v1/init` works. The server never
/// stops on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_is_reported_and_the_server_recovers() {
    let _turn = CLUSTER_STOPS.lock().await;
    let (db, _pg, server, slot, mut ws, _frames) = streaming_with_three_acked().await;

    let cluster = common::cluster();
    tokio::task::spawn_blocking(move || cluster.stop_immediate()).await.unwrap();
    let error = next_json(&mut ws).await;
    assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "expected an error message, got {error}");
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(!reason.is_empty(), "the close frame says why");

    // While Postgres is down.
    let (status, body) = server.snapshot(json!({"table": "t"})).await;
    assert_eq!(status, 409, "/v1/snapshot/data while Postgres is down: {body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("released")), "{body}");
    let (status, body) = server.get("/v1/init").await;
    assert_eq!(status, 503, "/v1/init while Postgres is down: {body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    let (status, body) = server.connect_refused(&format!("?slotName={slot}")).await;
    assert_eq!(status, 503, "the stream while Postgres is down: {body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    let (status, body) = server.snapshot(json!({"table": "t"})).await;
    assert_eq!(status, 409, "/v1/snapshot/data after a failed init: {body}");
    assert!(server.is_running(), "the server keeps running while Postgres is down");

    tokio::task::spawn_blocking(move || cluster.start()).await.unwrap();
    let pg = durable_client(&db).await;
    for n in 7..=9 {
        pg.execute("INSERT INTO t VALUES ($1)", &[&n]).await.unwrap();
    }

    // The old slot streams again; every committed row that was not acked arrives, in
    // commit order. (That acked ones do not: the test below.)
    let mut ws = server.connect(&slot).await;
    let (rows, _) = read_until(&mut ws, 4..=9).await;
    assert!(rows.windows(2).all(|w| w[0] < w[1]), "out of order: {rows:?}");
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "released", "NOT active").await;

    // /v1/init works again (and replaces the default session, dropping its slot).
    let new_slot = server.init().await;
    assert_ne!(new_slot, slot);
    let slots: Vec<String> = database_slots(&pg).await;
    assert_eq!(slots, std::slice::from_ref(&new_slot));
    let (status, body) = server.snapshot(json!({"table": "t"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(server.is_running(), "the server never stops on its own");
    server.stop().await;
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&new_slot]).await.unwrap();
}

/// After a Postgres crash, reconnecting resumes right after the last ack: nothing acked
/// is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_changes_are_not_sent_again_after_a_postgres_crash() {
    let _turn = CLUSTER_STOPS.lock().await;
    let (db, _pg, server, slot, ws, frames) = streaming_with_three_acked().await;
    let acked = frames[2]["nextlsn"].as_str().unwrap().to_owned();

    let cluster = common::cluster();
    tokio::task::spawn_blocking(move || cluster.restart_immediate()).await.unwrap();
    drop(ws);
    let pg = durable_client(&db).await;
    let slot_after = confirmed_flush(&pg, &slot).await.unwrap();
    for n in 7..=9 {
        pg.execute("INSERT INTO t VALUES ($1)", &[&n]).await.unwrap();
    }

    await_slot(&pg, &slot, "released", "NOT active").await;
    let mut ws = server.connect(&slot).await;
    let (rows, first_lsn) = read_until(&mut ws, 4..=9).await;
    assert_eq!(
        rows,
        [4, 5, 6, 7, 8, 9],
        "the last ack was {acked}; after the crash the slot was at {slot_after} and the stream began at {first_lsn}"
    );
    assert_eq!(first_lsn, frames[3]["nextlsn"].as_str().unwrap(), "resumes with the first unacked transaction");
    ws.close(None).await.unwrap();
    drop(ws);
    server.stop().await;
    await_slot(&pg, &slot, "released", "NOT active").await;
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}
