//! WAL retention against a real Postgres: `GET /v1/sessions` reports what each slot of
//! ours retains and its last ack; `DELETE /v1/sessions/{slotName}` ends a session and
//! drops its slot, and only on request.

/// A cluster of its own: tests here compare exact positions that WAL of other tests' databases would move.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("retention")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use serde_json::{Value, json};
use support::*;

async fn setup() -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let client = db.client().await;
    client.batch_execute("CREATE TABLE test_table (id serial PRIMARY KEY, name text)").await.unwrap();
    let server = TestServer::start(&db).await;
    (db, client, server)
}

async fn sessions(server: &TestServer) -> Vec<Value> {
    let (status, body) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap_or_else(|| panic!("not an array: {body}")).clone()
}

/// The report's entry for `slot`.
async fn entry(server: &TestServer, slot: &str) -> Value {
    let all = sessions(server).await;
    all.into_iter().find(|e| e["slotName"] == slot).unwrap_or_else(|| panic!("{slot} is not reported"))
}

async fn delete(server: &TestServer, slot: &str) -> (u16, Value) {
    request(server.addr, "DELETE", &format!("/v1/sessions/{slot}"), None).await
}

async fn slot_exists(pg: &tokio_postgres::Client, slot: &str) -> bool {
    pg.query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.unwrap().is_some()
}

fn lsn_shaped(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.split_once('/').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty()))
}

/// A fresh session: held snapshot, the default, no ack yet; WAL written after it and
/// never acked counts as retained.
#[tokio::test]
async fn reports_a_fresh_session_and_its_growing_retention() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let all = sessions(&server).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let e = &all[0];
    assert_eq!(e["slotName"], slot.as_str());
    assert_eq!(e["snapshot"], "held");
    assert_eq!(e["default"], true);
    assert_eq!(e["active"], false);
    assert_eq!(e["activePid"], Value::Null);
    assert_eq!(e["lastAckAt"], Value::Null);
    assert_eq!(e["lastAckLsn"], Value::Null);
    assert_eq!(e["secondsSinceLastAck"], Value::Null);
    assert_eq!(e["lastClose"], Value::Null, "never streamed");
    assert_eq!(e["walStatus"], "reserved");
    assert!(lsn_shaped(&e["confirmedFlushLsn"]) && lsn_shaped(&e["restartLsn"]), "{e}");
    let before = e["retainedBytes"].as_u64().unwrap_or_else(|| panic!("retainedBytes is not a number: {e}"));
    assert_eq!(e["plugin"], "wal2json");
    let keys: Vec<&String> = e.as_object().unwrap().keys().collect();
    // A wal2json slot has no publication to show.
    assert_eq!(keys.len(), 20, "{keys:?}");
    assert!(e["lagBytes"].as_u64().is_some(), "lagBytes is not a number: {e}");

    pg.execute("INSERT INTO test_table (name) SELECT repeat('x', 100) FROM generate_series(1, 2000)", &[])
        .await
        .unwrap();
    let after = entry(&server, &slot).await;
    let grown = after["retainedBytes"].as_u64().unwrap();
    assert!(grown >= before + 200_000, "retainedBytes went from {before} to {grown}");
    assert_eq!(after["restartLsn"], e["restartLsn"], "nothing acked, so nothing released");
    server.stop().await;
}

/// A client's ack shows up as the last ack, with its time; the stream shows as active.
#[tokio::test]
async fn reports_the_last_ack() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('acked')", &[]).await.unwrap();
    let lsn = next_changes(&mut ws).await["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;

    let e = entry(&server, &slot).await;
    assert_eq!(e["lastAckLsn"], lsn.as_str(), "{e}");
    let seconds = e["secondsSinceLastAck"].as_u64().unwrap_or_else(|| panic!("{e}"));
    assert!(seconds <= 5, "{e}");
    let at = e["lastAckAt"].as_str().unwrap_or_else(|| panic!("{e}"));
    // 2024-02-29T12:34:56.789Z
    assert_eq!(at.len(), 24, "{at}");
    assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T' && at.starts_with("20"), "{at}");
    assert_eq!(e["active"], true, "{e}");
    assert!(e["activePid"].as_i64().is_some(), "{e}");
    assert_eq!(e["confirmedFlushLsn"], lsn.as_str(), "{e}");
    drop(ws);
    server.stop().await;
}

/// Only our slots of this database are listed: not another plugin's, not another name,
/// not a physical slot, not another database's. A slot an earlier process created is
/// listed, without a snapshot.
#[tokio::test]
async fn lists_only_our_slots_in_this_database() {
    let (_db, pg, server) = setup().await;
    let other_db = common::fresh_db().await;
    let other_pg = other_db.client().await;
    pg.batch_execute(
        "SELECT pg_create_logical_replication_slot('delta_decoding3', 'test_decoding');
         SELECT pg_create_logical_replication_slot('someone_else', 'wal2json');
         SELECT pg_create_logical_replication_slot('delta_earlier7', 'wal2json');
         SELECT pg_create_physical_replication_slot('delta_physical5', true);",
    )
    .await
    .unwrap();
    other_pg.execute("SELECT pg_create_logical_replication_slot('delta_elsewhere4', 'wal2json')", &[]).await.unwrap();
    let slot = server.init().await;

    let all = sessions(&server).await;
    let names: Vec<&str> = all.iter().map(|e| e["slotName"].as_str().unwrap()).collect();
    let mut expected = vec!["delta_earlier7", slot.as_str()];
    expected.sort();
    assert_eq!(names, expected);
    let earlier = entry(&server, "delta_earlier7").await;
    assert_eq!((&earlier["snapshot"], &earlier["default"]), (&json!("none"), &json!(false)), "{earlier}");
    assert!(earlier["retainedBytes"].as_u64().is_some(), "{earlier}");

    // None of them can be dropped through the API either.
    let (status, body) = delete(&server, "delta_decoding3").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("test_decoding"), "{body}");
    let (status, body) = delete(&server, "delta_elsewhere4").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = delete(&server, "delta_physical5").await;
    assert_eq!(status, 404, "{body}");
    for s in ["delta_decoding3", "someone_else", "delta_physical5"] {
        assert!(slot_exists(&pg, s).await, "{s} was touched");
    }
    assert!(slot_exists(&other_pg, "delta_elsewhere4").await);

    // A slot an earlier process left behind can be dropped.
    let (status, body) = delete(&server, "delta_earlier7").await;
    assert_eq!((status, body), (200, json!({"slotName": "delta_earlier7", "dropped": true})));
    assert!(!slot_exists(&pg, "delta_earlier7").await);

    pg.batch_execute(
        "SELECT pg_drop_replication_slot('delta_decoding3');
         SELECT pg_drop_replication_slot('someone_else');
         SELECT pg_drop_replication_slot('delta_physical5');",
    )
    .await
    .unwrap();
    other_pg.execute("SELECT pg_drop_replication_slot('delta_elsewhere4')", &[]).await.unwrap();
    server.stop().await;
}

/// DELETE ends the stream with a reason, drops the slot, and leaves no default session.
#[tokio::test]
async fn delete_drops_the_slot_and_closes_its_stream() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('before')", &[]).await.unwrap();
    next_changes(&mut ws).await;

    let (status, body) = delete(&server, &slot).await;
    assert_eq!((status, body), (200, json!({"slotName": slot, "dropped": true})));
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, "slot dropped by operator"));
    assert!(!slot_exists(&pg, &slot).await, "the slot is still there");
    assert_eq!(sessions(&server).await, Vec::<Value>::new());

    let (status, body) = delete(&server, &slot).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.snapshot(json!({"table": "test_table"})).await;
    assert_eq!(status, 409, "{body}");

    // A new session works as before.
    let next = server.init().await;
    let e = entry(&server, &next).await;
    assert_eq!((&e["default"], &e["snapshot"]), (&json!(true), &json!("held")), "{e}");
    server.stop().await;
}

/// A slot that is not one of ours by name is refused before anything is looked up.
#[tokio::test]
async fn delete_refuses_names_that_are_not_ours() {
    let (_db, pg, server) = setup().await;
    pg.execute("SELECT pg_create_logical_replication_slot('not_ours', 'wal2json')", &[]).await.unwrap();
    for name in ["not_ours", "delta_", "delta_Face1", "pg_catalog%3Bdrop", "%22delta_x1%22"] {
        let (status, body) = delete(&server, name).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body["error"].is_string(), "{name}: {body}");
    }
    assert!(slot_exists(&pg, "not_ours").await);
    let (status, body) = delete(&server, "delta_nosuch1").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = request(server.addr, "DELETE", "/v1/sessions", None).await;
    assert_eq!(status, 405, "{body}");
    pg.execute("SELECT pg_drop_replication_slot('not_ours')", &[]).await.unwrap();
    server.stop().await;
}

/// A slot that another process streams is not dropped from under it: 409, and the
/// other stream goes on.
#[tokio::test]
async fn delete_refuses_a_slot_streamed_elsewhere() {
    let (db, pg, server) = setup().await;
    let other = TestServer::start(&db).await;
    let slot = other.init().await;
    let mut ws = other.connect(&slot).await;
    await_slot(&pg, &slot, "active", "active").await;

    let (status, body) = delete(&server, &slot).await;
    assert_eq!(status, 409, "{body}");
    assert!(slot_exists(&pg, &slot).await);
    pg.execute("INSERT INTO test_table (name) VALUES ('still streaming')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "still streaming");

    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let (status, body) = delete(&server, &slot).await;
    assert_eq!(status, 200, "{body}");
    other.stop().await;
    server.stop().await;
}
