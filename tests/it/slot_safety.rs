//! A slot's whole life (issue 21): every slot the server makes stays owned and visible
//! until it is dropped; a slot Postgres invalidated says so and its stream answers 410;
//! a session may ask to be recreated instead; a WAL budget per session keeps or drops.
//!
//! The cluster invalidates a slot that falls 32 MB behind (`max_slot_wal_keep_size`),
//! and a test here writes that much WAL on purpose: the tests run one at a time, on a
//! cluster of their own.

mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        static CONFIGURED: std::sync::Once = std::sync::Once::new();
        CONFIGURED.call_once(|| {
            let settings = vec!["max_slot_wal_keep_size=32MB".into()];
            configure_own_cluster("slot_safety", ClusterSetup { settings, ..ClusterSetup::default() });
        });
        own_cluster("slot_safety")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn setup() -> (common::TestDb, tokio_postgres::Client) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text); INSERT INTO orders VALUES (1, 'one'), (2, 'two');",
    )
    .await
    .unwrap();
    (db, pg)
}

async fn stored_default_slot(pg: &tokio_postgres::Client) -> Option<String> {
    let row = pg
        .query_opt("SELECT definition->>'slotName' FROM pgdeltastream.sessions WHERE name = 'default'", &[])
        .await
        .unwrap();
    row.map(|r| r.get(0))
}

async fn v1_entry(server: &TestServer, slot: &str) -> Value {
    let (status, all) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{all}");
    all.as_array().unwrap().iter().find(|e| e["slotName"] == slot).cloned().unwrap_or_else(|| panic!("{slot}: {all}"))
}

async fn view(server: &TestServer, name: &str) -> Value {
    let (status, v) = server.get(&format!("/v2/sessions/{name}")).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Moves the WAL on by more than `max_slot_wal_keep_size` and checkpoints: a slot that
/// confirmed nothing since is invalidated.
async fn invalidate(pg: &tokio_postgres::Client, slot: &str) {
    pg.batch_execute("CREATE TABLE IF NOT EXISTS filler (a int)").await.unwrap();
    for _ in 0..4 {
        pg.batch_execute("INSERT INTO filler VALUES (1); SELECT pg_switch_wal();").await.unwrap();
    }
    pg.batch_execute("CHECKPOINT").await.unwrap();
    await_slot(pg, slot, "invalidated", "wal_status = 'lost'").await;
}

/// Pins a wire format, without what changes from run to run (slot names, positions).
fn pin(name: &str, mut v: Value) {
    for key in ["slotName", "lostAfter", "consistentPoint", "at"] {
        if v.get(key).is_some_and(|x| !x.is_null()) {
            v[key] = json!(format!("[{key}]"));
        }
    }
    if let Some(error) = v["error"].as_str() {
        let varies =
            |w: &str| w.starts_with("delta_") || (w.contains('/') && w.starts_with(|c: char| c.is_ascii_hexdigit()));
        let words: Vec<&str> = error.split(' ').map(|w| if varies(w) { "[varies]" } else { w }).collect();
        v["error"] = json!(words.join(" "));
    }
    insta::with_settings!({ snapshot_path => "../../snapshots" }, {
        insta::assert_json_snapshot!(name, v);
    });
}

async fn create(server: &TestServer, body: Value) -> Value {
    let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn refused(server: &TestServer, path: &str) -> (u16, Value) {
    ws_refused(server.addr, path).await
}

/// Found fault 1: the second `/v1/init` of a process deleted the stored `default` row
/// (ending the first session deleted the row by name, after the second was stored), so
/// after a restart the live default slot was nobody's, and the next init left it.
#[tokio::test]
async fn every_default_slot_stays_owned_across_inits_and_restarts() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let server = TestServer::start(&db).await;
    let first = server.init().await;
    let second = server.init().await;
    assert_eq!(database_slots(&pg).await, vec![second.clone()]);
    assert_eq!(stored_default_slot(&pg).await.as_deref(), Some(second.as_str()), "the stored default is the live one");
    server.stop().await;

    // A fresh process knows the default from the store: listed as the default, and
    // replaced (its slot dropped) by the next init.
    let server = TestServer::start(&db).await;
    assert_eq!(v1_entry(&server, &second).await["default"], true);
    assert_eq!(view(&server, "default").await["slotName"], second.as_str());
    let third = server.init().await;
    assert_ne!(third, first);
    assert_eq!(database_slots(&pg).await, vec![third.clone()], "the earlier default's slot is dropped");
    assert_eq!(stored_default_slot(&pg).await.as_deref(), Some(third.as_str()));
    server.stop().await;
}

/// Found fault 2: an invalidated slot said `retainedBytes: 0` and its stream answered a
/// generic 500. Now: null, `walStatus: lost`, `invalidated` with the reason and the
/// position after which changes are lost, and 410 on both stream routes.
#[tokio::test]
async fn an_invalidated_slot_says_so_and_its_stream_is_gone() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let server = TestServer::start(&db).await;
    let created = create(&server, json!({"name": "orders", "tables": ["orders"]})).await;
    let slot = created["slotName"].as_str().unwrap().to_owned();
    // A client that is connected but behind (it never acks) is cut off by Postgres
    // as the slot is invalidated: the close says why.
    let mut ws = open(&server, "orders").await;
    insert(&pg, 3).await;
    assert_eq!(inserted(&next_json(&mut ws).await).0, vec![3]);
    invalidate(&pg, &slot).await;
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains("invalidated"), "{reason}");

    let v = view(&server, "orders").await;
    let major = server_major(&pg).await;
    if major >= 17 {
        assert!(v["inactiveSince"].is_string(), "{v}");
        assert_eq!(v["failover"].as_bool(), Some(v["failover"] == true), "{v}");
        assert_eq!(v["synced"], false, "{v}");
    }
    if major >= 14 {
        assert!(v["decoding"]["totalTxns"].is_u64(), "{v}");
    } else {
        assert_eq!(v["decoding"], Value::Null, "{v}");
    }
    assert_eq!(v["retainedBytes"], Value::Null, "{v}");
    assert_eq!(v["walStatus"], "lost", "{v}");
    assert_eq!(v["invalidated"]["reason"], "wal_removed", "{v}");
    assert_eq!(v["invalidated"]["by"], "postgres", "{v}");
    assert!(v["invalidated"]["lostAfter"].is_string(), "{v}");
    let e = v1_entry(&server, &slot).await;
    assert_eq!(e["retainedBytes"], Value::Null, "{e}");
    assert_eq!(e["invalidated"]["reason"], "wal_removed", "{e}");

    let (status, body) = refused(&server, "/v2/sessions/orders/stream").await;
    assert_eq!(status, 410, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("invalidated") && message.contains("onInvalidated"), "{message}");
    assert_eq!(body["reason"], "wal_removed", "{body}");
    assert_eq!(body["lostAfter"], v["invalidated"]["lostAfter"], "{body}");
    pin("slot_invalidated_410", body.clone());
    let (status, body) = refused(&server, &format!("/v1/lr/stream?slotName={slot}")).await;
    assert_eq!(status, 410, "{body}");

    // The way back: delete and create again.
    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/orders", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(database_slots(&pg).await.is_empty());
    server.stop().await;
}

async fn open(server: &TestServer, name: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream", server.addr);
    tokio_tungstenite::connect_async(url).await.expect("upgrade").0
}

/// The ids a transaction (format 1) inserted, and its nextlsn.
fn inserted(tx: &Value) -> (Vec<i64>, String) {
    let ids = tx["change"].as_array().unwrap().iter().map(|c| c["columnvalues"][0].as_i64().unwrap()).collect();
    (ids, tx["nextlsn"].as_str().unwrap().to_owned())
}

async fn insert(pg: &tokio_postgres::Client, id: i64) {
    pg.execute("INSERT INTO orders VALUES ($1, 'x')", &[&(id as i32)]).await.unwrap();
}

/// Reads the next message of `ws`, a transaction of `id`, and acks it.
async fn expect_and_ack(ws: &mut Ws, id: i64) {
    let (ids, nextlsn) = inserted(&next_json(ws).await);
    assert_eq!(ids, vec![id]);
    ack(ws, &nextlsn).await;
}

async fn snapshot_ids(server: &TestServer, name: &str) -> Vec<i64> {
    let (status, page) = server.get(&format!("/v2/sessions/{name}/snapshot/orders?limit=100")).await;
    assert_eq!(status, 200, "{page}");
    page["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect()
}

async fn await_view(server: &TestServer, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = view(server, name).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `onInvalidated: recreate`: the reconnecting client is told `must-refetch` first,
/// reads the new snapshot (which has what the lost WAL held), then streams on; once it
/// acked, later streams start without the message.
#[tokio::test]
async fn a_recreated_session_tells_its_client_to_refetch_then_streams_on() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let server = TestServer::start(&db).await;
    let created = create(&server, json!({"name": "orders", "tables": ["orders"], "onInvalidated": "recreate"})).await;
    assert_eq!(created["onInvalidated"], "recreate", "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let mut ws = open(&server, "orders").await;
    insert(&pg, 3).await;
    expect_and_ack(&mut ws, 3).await;
    ws.close(None).await.unwrap();
    await_slot(&pg, &slot, "released", "NOT active").await;

    insert(&pg, 4).await; // never streamed: lost with the WAL
    invalidate(&pg, &slot).await;
    let mut ws = open(&server, "orders").await;
    let control = next_json(&mut ws).await;
    assert_eq!(control["control"], "must-refetch", "{control}");
    assert_eq!(control["session"], "orders");
    assert_eq!(control["slotName"], slot.as_str(), "the same slot name: v1 clients reconnect by it");
    assert_eq!(control["reason"], "wal_removed");
    assert!(control["lostAfter"].is_string() && control["consistentPoint"].is_string(), "{control}");
    pin("slot_must_refetch", control.clone());
    let v = view(&server, "orders").await;
    assert_eq!(v["invalidated"], Value::Null, "{v}");
    assert_eq!(v["recreated"]["reason"], "wal_removed", "{v}");
    assert_eq!(v["snapshot"], "held", "{v}");
    assert_eq!(snapshot_ids(&server, "orders").await, vec![1, 2, 3, 4], "the new snapshot has the lost change");

    insert(&pg, 5).await;
    expect_and_ack(&mut ws, 5).await;
    ws.close(None).await.unwrap();
    await_view(&server, "orders", "the client started over", |v| {
        v["recreated"].is_null() && !v["streaming"].as_bool().unwrap()
    })
    .await;

    let mut ws = open(&server, "orders").await;
    insert(&pg, 6).await;
    expect_and_ack(&mut ws, 6).await;
    ws.close(None).await.unwrap();
    let stored: Value =
        pg.query_one("SELECT definition FROM pgdeltastream.sessions WHERE name = 'orders'", &[]).await.unwrap().get(0);
    assert_eq!(stored.get("recreated"), None, "{stored}");
    assert_eq!(stored.get("invalidated"), None, "{stored}");
    server.stop().await;
}

/// A WAL budget: past `maxRetainedBytes` a `keep` session warns and keeps its slot; a
/// `drop` session loses its slot and is invalidated (410, reason max_retained_bytes).
#[tokio::test]
async fn a_session_past_its_budget_warns_or_is_dropped() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (db, pg) = setup().await;
    let mut settings = fast_settings(&db);
    settings.retention.check_interval = Duration::from_millis(200);
    let server = TestServer::start_with(settings).await;
    const MIB: u64 = 1 << 20;
    for bad in [json!(0), json!(-1), json!("1MB")] {
        let (status, body) =
            server.post("/v2/sessions", &json!({"name": "bad", "maxRetainedBytes": bad}).to_string()).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, body) =
        server.post("/v2/sessions", &json!({"name": "bad", "onMaxRetained": "delete"}).to_string()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        server.post("/v2/sessions", &json!({"name": "bad", "onInvalidated": "retry"}).to_string()).await;
    assert_eq!(status, 400, "{body}");
    let kept = create(&server, json!({"name": "kept", "tables": ["orders"], "maxRetainedBytes": MIB})).await;
    let dropped = create(
        &server,
        json!({"name": "dropped", "tables": ["orders"], "maxRetainedBytes": MIB, "onMaxRetained": "drop"}),
    )
    .await;
    let v = view(&server, "kept").await;
    assert_eq!(v["budget"], json!({"maxRetainedBytes": MIB, "warnAtBytes": MIB * 8 / 10, "onMaxRetained": "keep"}));
    assert_eq!(v["retentionWarning"], false, "{v}");

    pg.batch_execute("CREATE TABLE filler (a int); INSERT INTO filler SELECT g FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    let v = await_view(&server, "dropped", "dropped past its budget", |v| !v["invalidated"].is_null()).await;
    assert_eq!(v["invalidated"]["reason"], "max_retained_bytes", "{v}");
    assert_eq!(v["invalidated"]["by"], "pgdeltastream", "{v}");
    assert!(v["invalidated"]["at"].is_string(), "{v}");
    assert_eq!(v["slotExists"], false, "{v}");
    let (status, body) = refused(&server, "/v2/sessions/dropped/stream").await;
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["reason"], "max_retained_bytes", "{body}");
    assert_eq!(body["lostAfter"], dropped["consistentPoint"], "nothing was confirmed: all after creation is lost");
    let dropped_slot = dropped["slotName"].as_str().unwrap();
    let (status, body) = refused(&server, &format!("/v1/lr/stream?slotName={dropped_slot}")).await;
    assert_eq!(status, 410, "v1 names the slot, which is gone: {body}");

    let v = view(&server, "kept").await;
    assert_eq!(v["retentionWarning"], true, "{v}");
    assert_eq!(v["invalidated"], Value::Null, "{v}");
    assert!(database_slots(&pg).await.contains(&kept["slotName"].as_str().unwrap().to_owned()));

    let (status, body) = raw_request(server.addr, "GET", "/metrics", &[], Vec::new()).await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    let kept_slot = kept["slotName"].as_str().unwrap();
    for line in [
        format!("pgdeltastream_slot_invalidated{{session=\"dropped\",slot=\"{dropped_slot}\"}} 1"),
        format!("pgdeltastream_slot_invalidated{{session=\"kept\",slot=\"{kept_slot}\"}} 0"),
        format!("pgdeltastream_retention_warning{{session=\"kept\",slot=\"{kept_slot}\"}} 1"),
        format!("pgdeltastream_max_retained_bytes{{session=\"kept\",slot=\"{kept_slot}\"}} {MIB}"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    if server_major(&pg).await >= 14 {
        assert!(metrics.contains("pgdeltastream_slot_decoded_transactions_total{session=\"kept\""), "{metrics}");
    }

    // Restart-proof: the mark is stored.
    server.stop().await;
    let server = TestServer::start(&db).await;
    let (status, _) = refused(&server, "/v2/sessions/dropped/stream").await;
    assert_eq!(status, 410);
    server.stop().await;
}
