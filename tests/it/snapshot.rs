//! `/v1/snapshot/data` against a real Postgres: what the snapshot shows, paging and
//! order, every refusal, and values encoded exactly as the stream encodes them.

use testkit::pg as common;
use testkit::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

async fn setup() -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE test_table (id serial PRIMARY KEY, name text);
             INSERT INTO test_table (name) VALUES ('abc'), ('abc1'), ('abc2'), ('val1'), ('val2');",
        )
        .await
        .unwrap();
    let server = TestServer::start(&db).await;
    (db, client, server)
}

/// The seed README's example, and the original's second test: only rows committed
/// before init are in the snapshot.
#[tokio::test]
async fn snapshot_shows_only_rows_from_before_init() {
    let (_db, pg, server) = setup().await;
    server.init().await;
    pg.execute("INSERT INTO test_table (name) VALUES ('after init')", &[]).await.unwrap();
    pg.execute("DELETE FROM test_table WHERE id = 1", &[]).await.unwrap();
    let (status, rows) = server.snapshot(json!({"table": "test_table", "offset": 0, "limit": 5})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(
        rows,
        json!([{"id": 1, "name": "abc"}, {"id": 2, "name": "abc1"}, {"id": 3, "name": "abc2"},
               {"id": 4, "name": "val1"}, {"id": 5, "name": "val2"}])
    );
    let (_, rows) = server.snapshot(json!({"table": "test_table", "offset": 5, "limit": 5})).await;
    assert_eq!(rows, json!([]));
    server.stop().await;
}

#[tokio::test]
async fn keys_keep_column_order_and_order_by_works() {
    let (_db, pg, server) = setup().await;
    pg.batch_execute("CREATE SCHEMA s; CREATE TABLE s.x (zeta int PRIMARY KEY, alpha text, \"Mixed Case\" int); INSERT INTO s.x VALUES (2, 'b', 20), (1, 'a', 10), (3, 'c', 30);")
        .await
        .unwrap();
    server.init().await;
    // The raw body: a parsed serde_json map would sort the keys.
    let (status, body) =
        raw_request(server.addr, "POST", "/v1/snapshot/data", &[], br#"{"table":"s.x"}"#.to_vec()).await;
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    assert_eq!(
        body,
        r#"[{"zeta":1,"alpha":"a","Mixed Case":10},{"zeta":2,"alpha":"b","Mixed Case":20},{"zeta":3,"alpha":"c","Mixed Case":30}]"#
    );
    let (_, rows) = server
        .snapshot(
            json!({"table": "s.x", "offset": 1, "limit": 1, "order_by": {"column": "Mixed Case", "order": "DESC"}}),
        )
        .await;
    assert_eq!(rows, json!([{"zeta": 2, "alpha": "b", "Mixed Case": 20}]));
    let (_, rows) = server
        .snapshot(json!({"table": "test_table", "limit": 2, "order_by": {"column": "name", "order": "desc"}}))
        .await;
    assert_eq!(rows, json!([{"id": 5, "name": "val2"}, {"id": 4, "name": "val1"}]));
    server.stop().await;
}

/// A table without a primary key still pages in a stable order.
#[tokio::test]
async fn pages_without_a_primary_key_neither_overlap_nor_skip() {
    let (_db, pg, server) = setup().await;
    pg.batch_execute("CREATE TABLE nokey (v int); INSERT INTO nokey SELECT g FROM generate_series(1, 100) g; UPDATE nokey SET v = v WHERE v % 7 = 0;")
        .await
        .unwrap();
    server.init().await;
    let mut seen = Vec::new();
    for page in 0..10 {
        let (status, rows) = server.snapshot(json!({"table": "nokey", "offset": page * 10, "limit": 10})).await;
        assert_eq!(status, 200, "{rows}");
        seen.extend(rows.as_array().unwrap().iter().map(|r| r["v"].as_i64().unwrap()));
    }
    seen.sort();
    assert_eq!(seen, (1..=100).collect::<Vec<i64>>());
    server.stop().await;
}

/// Every refusal is `{"error": ...}` with the right status, and none of them affects
/// the next call (defects 2, 4, 5, 6).
#[tokio::test]
async fn refusals_and_injection_attempts() {
    let (_db, pg, server) = setup().await;
    let (status, body) = server.snapshot(json!({"table": "test_table", "offset": 0, "limit": 5})).await;
    assert_eq!(status, 409, "before init: {body}");
    assert!(body["error"].as_str().unwrap().contains("/v1/init"));
    server.init().await;

    let cases: Vec<(&str, u16)> = vec![
        ("", 400),
        ("{", 400),
        ("[]", 400),
        ("{\"table\": 1}", 400),
        ("{\"offset\": 0, \"limit\": 1}", 400),
        ("{\"table\": \"test_table\", \"offset\": -1, \"limit\": 1}", 400),
        ("{\"table\": \"test_table\", \"offset\": 0, \"limit\": -5}", 400),
        ("{\"table\": \"test_table\", \"offset\": 0.5, \"limit\": 1}", 400),
        ("{\"table\": \"test_table\", \"offset\": \"0\", \"limit\": 1}", 400),
        ("{\"table\": \"test_table\", \"limit\": 99999999999999999999999}", 400),
        ("{\"table\": \"test_table\", \"limit\": 1001}", 400),
        ("{\"table\": \"test_table\", \"ofset\": 1}", 400),
        ("{\"table\": \"(select usename, passwd from pg_shadow) x\", \"offset\": 0, \"limit\": 5}", 400),
        ("{\"table\": \"test_table; DROP TABLE test_table\"}", 400),
        ("{\"table\": \"test_table--\"}", 400),
        ("{\"table\": \"a.b.c\"}", 400),
        ("{\"table\": \"pg_catalog.pg_authid\"}", 403),
        ("{\"table\": \"information_schema.tables\"}", 403),
        ("{\"table\": \"pg_shadow\"}", 404),
        ("{\"table\": \"nosuch\"}", 404),
        ("{\"table\": \"nosuch.test_table\"}", 404),
        ("{\"table\": \"test_table\", \"order_by\": {\"column\": \"nosuch\"}}", 404),
        ("{\"table\": \"test_table\", \"order_by\": {\"column\": \"id; DROP TABLE test_table\"}}", 404),
        ("{\"table\": \"test_table\", \"order_by\": {\"column\": \"id\", \"order\": \"DESC; DROP TABLE x\"}}", 400),
        ("{\"table\": \"test_table\", \"order_by\": {\"column\": \"(SELECT 1)\"}}", 404),
    ];
    for (body, want) in &cases {
        let (status, reply) = server.post("/v1/snapshot/data", body).await;
        assert_eq!(status, *want, "{body} -> {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()), "{body} -> {reply}");
        // The next call is unaffected.
        let (status, rows) = server.snapshot(json!({"table": "test_table", "offset": 0, "limit": 1})).await;
        assert_eq!((status, rows), (200, json!([{"id": 1, "name": "abc"}])), "after {body}");
    }
    let n: i64 = pg.query_one("SELECT count(*) FROM test_table", &[]).await.unwrap().get(0);
    assert_eq!(n, 5, "no table changed");

    // A query error inside Postgres (a column whose output fails) is a 500 with the
    // database's message, and still does not affect the next call.
    pg.batch_execute("CREATE VIEW boom AS SELECT 1 / (id - id) AS x FROM test_table").await.unwrap_or(());
    server.init().await;
    let (status, reply) = server.snapshot(json!({"table": "boom"})).await;
    assert_eq!(status, 500, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("division by zero"), "{reply}");
    let (status, _) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A body without a content-type (the original did not require one) works, and
/// oversized bodies get 413.
#[tokio::test]
async fn content_type_is_optional_and_bodies_are_capped() {
    let (_db, _pg, server) = setup().await;
    server.init().await;
    let (status, body) =
        raw_request(server.addr, "POST", "/v1/snapshot/data", &[], br#"{"table":"test_table","limit":1}"#.to_vec())
            .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let huge = format!(r#"{{"table":"{}"}}"#, "a".repeat(100_000));
    let (status, body) = server.post("/v1/snapshot/data", &huge).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn concurrent_calls_work() {
    let (_db, _pg, server) = setup().await;
    server.init().await;
    let server = std::sync::Arc::new(server);
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let s = server.clone();
        tasks.push(tokio::spawn(async move {
            let (status, rows) = if i % 3 == 0 {
                s.snapshot(json!({"table": "nosuch"})).await
            } else {
                s.snapshot(json!({"table": "test_table", "offset": i % 5, "limit": 1})).await
            };
            (i, status, rows)
        }));
    }
    for t in tasks {
        let (i, status, rows) = t.await.unwrap();
        if i % 3 == 0 {
            assert_eq!(status, 404);
        } else {
            assert_eq!(status, 200, "{rows}");
            assert_eq!(rows[0]["id"], json!(i % 5 + 1));
        }
    }
    if let Ok(s) = std::sync::Arc::try_unwrap(server) {
        s.stop().await;
    }
}

/// The snapshot is released on request and after the idle timeout; then the API says so.
#[tokio::test]
async fn snapshot_is_released_on_request_and_when_idle() {
    let (db, _pg, server) = setup().await;
    server.init().await;
    let (status, body) = request(server.addr, "DELETE", "/v1/snapshot", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.snapshot(json!({"table": "test_table"})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("released"), "{body}");
    server.stop().await;

    let mut settings = fast_settings(&db);
    settings.session.snapshot_idle_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(settings).await;
    server.init().await;
    assert_eq!(server.snapshot(json!({"table": "test_table"})).await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = server.snapshot(json!({"table": "test_table"})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("idle"), "{body}");
    server.stop().await;
}

/// Defect 5: a snapshot row equals the stream's `columnvalues` of the same row, for
/// every common type. Session one streams the insert; session two's snapshot reads it.
#[tokio::test]
async fn snapshot_values_equal_stream_values_for_every_common_type() {
    let (_db, pg, server) = setup().await;
    pg.batch_execute(include_str!("../../fixtures/all_types.sql")).await.unwrap();
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.batch_execute(include_str!("../../fixtures/all_types_rows.sql")).await.unwrap();
    let mut streamed: Vec<Value> = Vec::new();
    while streamed.len() < 3 {
        let frame = next_changes(&mut ws).await;
        for change in frame["change"].as_array().unwrap() {
            assert_eq!(change["table"], "all_types");
            let names = change["columnnames"].as_array().unwrap();
            let values = change["columnvalues"].as_array().unwrap();
            let row: serde_json::Map<String, Value> =
                names.iter().zip(values).map(|(n, v)| (n.as_str().unwrap().to_owned(), v.clone())).collect();
            streamed.push(Value::Object(row));
        }
    }
    drop(ws);
    server.init().await;
    let (status, rows) = server.snapshot(json!({"table": "all_types", "limit": 10})).await;
    assert_eq!(status, 200, "{rows}");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (snap, stream) in rows.iter().zip(&streamed) {
        for (k, v) in stream.as_object().unwrap() {
            assert_eq!(&snap[k], v, "column {k}: snapshot {} vs stream {}", snap[k], v);
        }
        assert_eq!(snap.as_object().unwrap().len(), stream.as_object().unwrap().len());
    }
    // Numbers keep every digit (arbitrary precision on both sides).
    assert_eq!(rows[0]["c_numeric"].to_string(), "12345678901234567890.123456789");
    assert_eq!(rows[0]["c_int8"].to_string(), "9223372036854775807");
    assert_eq!(rows[1]["c_float8"], Value::Null, "NaN is null");
    server.stop().await;
}
