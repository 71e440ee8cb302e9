//! The v2 API: named sessions with their own tables and actions, stored in Postgres so
//! that they outlive the process and are shared by every process on the database.

/// A cluster of its own: a test here takes 50 of its 64 replication slots.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("v2")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// The test that takes 50 of the cluster's 64 slots runs without the tests that take
/// several more.
static SLOTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn setup() -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id serial PRIMARY KEY, item text);
         CREATE TABLE items (id serial PRIMARY KEY, name text);
         CREATE SCHEMA audit; CREATE TABLE audit.log (id serial PRIMARY KEY, what text);
         CREATE TABLE other (id serial PRIMARY KEY);",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    (db, pg, server)
}

async fn create(server: &TestServer, body: Value) -> (u16, Value) {
    server.post("/v2/sessions", &body.to_string()).await
}

fn stream_url(server: &TestServer, name: &str, query: &str) -> String {
    format!("ws://{}/v2/sessions/{name}/stream{query}", server.addr)
}

async fn connect(server: &TestServer, name: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(stream_url(server, name, "")).await.expect("upgrade");
    ws
}

/// LSNs, slot names and times change from run to run.
fn redact(mut v: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    match k.as_str() {
                        "slotName" => *v = json!("[slot]"),
                        "consistentPoint" | "confirmedFlushLsn" | "lastAckLsn" | "nextlsn" | "lsn" if !v.is_null() => {
                            *v = json!("[lsn]")
                        }
                        "lastAckAt"
                        | "at"
                        | "secondsSinceLastAck"
                        | "retainedBytes"
                        | "lagBytes"
                        | "activePid"
                        | "watchers"
                        | "decoding"
                        | "inactiveSince"
                            if !v.is_null() =>
                        {
                            *v = json!("[varies]")
                        }
                        _ => walk(v),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

fn snapshot(name: &str, v: Value) {
    insta::with_settings!({ snapshot_path => "../../snapshots" }, {
        insta::assert_json_snapshot!(name, redact(v));
    });
}

/// Every change the client gets, until `count` transactions with changes arrived; acks each.
async fn changes(ws: &mut Ws, count: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut got = 0;
    while got < count {
        let tx = next_json(ws).await;
        let changes = tx["change"].as_array().cloned().unwrap_or_default();
        if changes.is_empty() {
            continue;
        }
        got += 1;
        out.extend(changes);
        if let Some(lsn) = tx["nextlsn"].as_str() {
            ack(ws, lsn).await;
        }
    }
    out
}

fn describe(change: &Value) -> String {
    match change["kind"].as_str() {
        Some("message") => format!("message {}", change["prefix"].as_str().unwrap_or("")),
        Some(kind) => {
            format!("{kind} {}.{}", change["schema"].as_str().unwrap_or(""), change["table"].as_str().unwrap_or(""))
        }
        None => change.to_string(),
    }
}

#[tokio::test]
async fn create_list_get_delete_and_their_shapes() {
    let (_db, pg, server) = setup().await;
    let (status, created) = create(
        &server,
        json!({"name": "orders", "tables": ["public.orders", "items", "audit.*"], "actions": ["insert", "update"]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    snapshot("v2_created", created.clone());
    let slot = created["slotName"].as_str().unwrap().to_owned();
    assert!(slot.starts_with("delta_"), "{slot}");

    let (status, all) = server.get("/v2/sessions").await;
    assert_eq!(status, 200, "{all}");
    snapshot("v2_list", all.clone());
    let (status, one) = server.get("/v2/sessions/orders").await;
    assert_eq!(status, 200, "{one}");
    // retainedBytes and lagBytes follow the WAL, which the other tests of this module
    // move meanwhile.
    let without_retained = |mut v: Value| {
        v.as_object_mut().map(|o| (o.remove("retainedBytes"), o.remove("lagBytes")));
        v
    };
    assert_eq!(without_retained(one), without_retained(all[0].clone()));

    // v1 sees the slot too, as one of ours.
    let (_, v1) = server.get("/v1/sessions").await;
    assert_eq!(v1[0]["slotName"], slot.as_str());

    let (status, released) = raw_delete(&server, "/v2/sessions/orders/snapshot").await;
    assert_eq!((status, released), (200, json!({"name": "orders", "released": true, "wasHeld": true})));
    let (_, one) = server.get("/v2/sessions/orders").await;
    assert_eq!((&one["snapshot"], &one["snapshotReason"]), (&json!("released"), &json!("released on request")));

    let mut ws = connect(&server, "orders").await;
    let (status, refused) = server.post("/v2/sessions", &json!({"name": "orders"}).to_string()).await;
    assert_eq!(status, 409, "{refused}");
    let (status, dropped) = raw_delete(&server, "/v2/sessions/orders").await;
    assert_eq!(status, 200, "{dropped}");
    assert_eq!(dropped, json!({"name": "orders", "dropped": true}));
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, "session dropped"));
    let n: i64 =
        pg.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.unwrap().get(0);
    assert_eq!(n, 0, "the slot is gone");
    let (status, _) = server.get("/v2/sessions/orders").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn refusals() {
    let (_db, _pg, server) = setup().await;
    for (body, status, needle) in [
        (json!({"name": "Bad Name"}), 400, "invalid session name"),
        (json!({"name": ""}), 400, "invalid session name"),
        (json!({"name": "x", "tables": ["nosuch"]}), 404, "does not exist"),
        (json!({"name": "x", "tables": ["nosuchschema.*"]}), 404, "does not exist"),
        (json!({"name": "x", "tables": ["a;b"]}), 400, "invalid table"),
        (json!({"name": "x", "tables": []}), 400, "tables is empty"),
        (json!({"name": "x", "actions": ["upsert"]}), 400, "unknown variant"),
        (json!({"name": "x", "actions": []}), 400, "actions is empty"),
        (json!({"name": "x", "plugin": "decoderbufs"}), 400, "unknown variant"),
        (json!({"name": "x", "tabels": ["orders"]}), 400, "unknown field"),
    ] {
        let (got, reply) = create(&server, body.clone()).await;
        assert_eq!(got, status, "{body}: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains(needle)), "{body}: {reply}");
    }
    for path in ["/v2/sessions/nosuch", "/v2/sessions/nosuch/stream"] {
        let (status, reply) = server.get(path).await;
        assert!(matches!(status, 404 | 400), "{path}: {status} {reply}");
    }
    let (status, _) = server.get("/v2/sessions/Not_Valid").await;
    assert_eq!(status, 400);
    let (status, all) = server.get("/v2/sessions").await;
    assert_eq!((status, all), (200, json!([])), "no refusal left a session behind");
    server.stop().await;
}

/// Three sessions with different tables and actions, written to at once: each client
/// gets exactly its changes, filtered inside Postgres.
/// A session may read a publication the operator made (what a standby needs), which it
/// never drops.
#[tokio::test]
async fn a_session_reads_the_publication_it_names_and_leaves_it_behind() {
    let _slots = SLOTS.read().await;
    let (_db, pg, server) = setup().await;
    pg.batch_execute("CREATE PUBLICATION theirs FOR TABLE items WITH (publish = 'insert')").await.unwrap();
    for (body, status) in [
        (json!({"name": "x", "publication": "theirs", "plugin": "wal2json"}), 400),
        (json!({"name": "x", "publication": "theirs", "tables": ["orders"]}), 400),
        (json!({"name": "x", "publication": ""}), 400),
        (json!({"name": "x", "publication": "p\0"}), 400),
        (json!({"name": "x", "publication": "absent"}), 404),
    ] {
        let (got, answer) = create(&server, body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, created) = create(&server, json!({"name": "feed", "publication": "theirs"})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!((&created["plugin"], &created["publication"]), (&json!("pgoutput"), &json!("theirs")), "{created}");
    assert_eq!(created["externalPublication"], "theirs", "{created}");
    let (_, view) = server.get("/v2/sessions/feed").await;
    assert_eq!(view["publication"], "theirs", "{view}");

    let mut ws = connect(&server, "feed").await;
    pg.batch_execute(
        "INSERT INTO orders (item) VALUES ('not published'); INSERT INTO items (name) VALUES ('one');
         UPDATE items SET name = 'not published either'; INSERT INTO items (name) VALUES ('two');",
    )
    .await
    .unwrap();
    let got: Vec<Value> = changes(&mut ws, 1).await;
    let rows: Vec<String> = got.iter().map(|c| format!("{} {}", describe(c), c["columnvalues"][1])).collect();
    assert_eq!(rows, ["insert public.items \"one\"", "insert public.items \"two\""], "the publication's, as it is");
    drop(ws);
    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/feed", None).await;
    assert!(status < 300, "{status} {body}");
    let kept = pg.query_opt("SELECT 1 FROM pg_publication WHERE pubname = 'theirs'", &[]).await.unwrap();
    assert!(kept.is_some(), "the operator's publication stays");
    server.stop().await;
}

#[tokio::test]
async fn each_session_gets_exactly_its_tables_and_actions() {
    let (_db, pg, server) = setup().await;
    for body in [
        json!({"name": "orders_only", "tables": ["orders"]}),
        json!({"name": "inserts", "actions": ["insert"]}),
        json!({"name": "audit", "tables": ["audit.*", "items"], "actions": ["insert", "delete", "message"]}),
    ] {
        let (status, reply) = create(&server, body).await;
        assert_eq!(status, 201, "{reply}");
    }
    let mut clients = Vec::new();
    for name in ["orders_only", "inserts", "audit"] {
        clients.push(connect(&server, name).await);
    }
    pg.batch_execute(
        "BEGIN;
         INSERT INTO orders (item) VALUES ('a'); INSERT INTO items (name) VALUES ('b');
         INSERT INTO audit.log (what) VALUES ('c'); INSERT INTO other DEFAULT VALUES;
         UPDATE orders SET item = 'a2'; DELETE FROM items; DELETE FROM audit.log;
         SELECT pg_logical_emit_message(true, 'note', 'hello');
         COMMIT;",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for ws in &mut clients {
        got.push(changes(ws, 1).await.iter().map(describe).collect::<Vec<_>>());
    }
    // Messages belong to no table: a session gets them while its actions include them.
    assert_eq!(got[0], ["insert public.orders", "update public.orders", "message note"]);
    assert_eq!(got[1], ["insert public.orders", "insert public.items", "insert audit.log", "insert public.other"]);
    assert_eq!(
        got[2],
        ["insert public.items", "insert audit.log", "delete public.items", "delete audit.log", "message note"]
    );
    server.stop().await;
}

/// A v2 session is not sent the transactions its filter empties (every other
/// transaction of the database), in either format; the first message is its change.
#[tokio::test]
async fn transactions_with_nothing_for_the_session_are_not_sent() {
    let (_db, pg, server) = setup().await;
    create(&server, json!({"name": "narrow", "tables": ["orders"]})).await;
    let mut ws = connect(&server, "narrow").await;
    for _ in 0..3 {
        pg.execute("INSERT INTO other DEFAULT VALUES", &[]).await.unwrap();
    }
    pg.execute("CREATE TABLE ddl_only (x int)", &[]).await.unwrap();
    pg.execute("INSERT INTO orders (item) VALUES ('wanted')", &[]).await.unwrap();
    let first = next_json(&mut ws).await;
    assert_eq!(first["change"][0]["columnvalues"][1], "wanted", "{first}");
    ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    ws.close(None).await.unwrap();
    drop(ws);

    let (mut ws, _) = loop {
        match tokio_tungstenite::connect_async(stream_url(&server, "narrow", "?format=changes")).await {
            Ok(ok) => break ok,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    pg.execute("INSERT INTO other DEFAULT VALUES", &[]).await.unwrap();
    pg.execute("INSERT INTO orders (item) VALUES ('again')", &[]).await.unwrap();
    let mut actions = Vec::new();
    while actions.last().is_none_or(|a| a != "C") {
        actions.push(next_json(&mut ws).await["action"].as_str().unwrap().to_owned());
    }
    assert_eq!(actions, ["B", "I", "C"]);
    server.stop().await;
}

/// A session whose tables see no change for a long time still moves its slot: the
/// WAL of other tables is not retained for it.
#[tokio::test]
async fn the_slot_advances_when_nothing_matches() {
    let (_db, pg, server) = setup().await;
    let (_, created) = create(&server, json!({"name": "quiet", "tables": ["items"]})).await;
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let _ws = connect(&server, "quiet").await;
    let before = confirmed_flush(&pg, &slot).await.unwrap();
    pg.execute("INSERT INTO orders (item) SELECT 'x' FROM generate_series(1, 1000)", &[]).await.unwrap();
    // The insert position: with synchronous_commit off (the test cluster's), the write
    // position may not yet include the commit.
    let now: String = pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    await_confirmed(&pg, &slot, &now).await;
    assert_ne!(confirmed_flush(&pg, &slot).await.unwrap(), before);
    server.stop().await;
}

/// After a non-transactional message only a later transaction's `nextlsn` can be
/// acked past it: the next transaction is sent even when it has nothing for the
/// session, so that the slot does not wait on a change that may never come.
#[tokio::test]
async fn a_lone_message_is_followed_by_a_transaction_to_ack() {
    let (_db, pg, server) = setup().await;
    let (_, created) = create(&server, json!({"name": "notes", "tables": ["items"]})).await;
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let mut ws = connect(&server, "notes").await;
    pg.execute("SELECT pg_logical_emit_message(false, 'note', 'hello')", &[]).await.unwrap();
    pg.execute("INSERT INTO orders (item) VALUES ('not for notes')", &[]).await.unwrap();
    let message = next_json(&mut ws).await;
    assert_eq!(message["change"][0]["prefix"], "note", "{message}");
    let cover = next_json(&mut ws).await;
    assert_eq!(cover["change"], json!([]), "{cover}");
    ack(&mut ws, cover["nextlsn"].as_str().unwrap()).await;
    pg.execute("INSERT INTO orders (item) SELECT 'x' FROM generate_series(1, 100)", &[]).await.unwrap();
    // The insert position: with synchronous_commit off (the test cluster's), the write
    // position may not yet include the commit.
    let now: String = pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    await_confirmed(&pg, &slot, &now).await;
    server.stop().await;
}

/// Sessions outlive the process: after a restart they are listed, their streams resume
/// after the last ack, and their snapshots are gone with a 409 that says so.
#[tokio::test]
async fn sessions_survive_a_restart_and_resume_after_their_acks() {
    let (db, pg, server) = setup().await;
    create(&server, json!({"name": "kept", "tables": ["orders"]})).await;
    let mut ws = connect(&server, "kept").await;
    pg.execute("INSERT INTO orders (item) VALUES ('one')", &[]).await.unwrap();
    let first = next_changes(&mut ws).await;
    ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    let (_, before) = server.get("/v2/sessions/kept").await;
    await_confirmed(&pg, before["slotName"].as_str().unwrap(), first["nextlsn"].as_str().unwrap()).await;
    pg.execute("INSERT INTO orders (item) VALUES ('two')", &[]).await.unwrap();
    drop(ws);
    server.stop().await;

    let server = TestServer::start(&db).await;
    let (status, all) = server.get("/v2/sessions").await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["name"], "kept");
    assert_eq!(all[0]["tables"], json!(["public.orders"]));
    assert_eq!(all[0]["snapshot"], "none");
    let mut ws = connect(&server, "kept").await;
    let next = next_changes(&mut ws).await;
    assert_eq!(next["change"][0]["columnvalues"][1], "two", "resumed after the ack: {next}");
    server.stop().await;
}

/// Two processes on one database see the same sessions; one streams a session at a time.
#[tokio::test]
async fn two_processes_share_sessions() {
    let (db, pg, a) = setup().await;
    let b = TestServer::start(&db).await;
    let (status, created) = create(&a, json!({"name": "shared", "tables": ["orders"]})).await;
    assert_eq!(status, 201, "{created}");
    let (status, one) = b.get("/v2/sessions/shared").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["tables"], json!(["public.orders"]));
    let (status, _) = create(&b, json!({"name": "shared"})).await;
    assert_eq!(status, 409, "the name is taken in the other process too");
    let mut ws = connect(&b, "shared").await;
    let refused = tokio_tungstenite::connect_async(stream_url(&a, "shared", "")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 409),
        other => panic!("a second stream of the session was not refused: {:?}", other.map(|_| ())),
    }
    pg.execute("INSERT INTO orders (item) VALUES ('via b')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "via b");
    drop(ws);
    a.stop().await;
    b.stop().await;
}

/// 50 sessions streaming at once from one process, each complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_stream_at_once() {
    let _alone = SLOTS.write().await;
    let (_db, pg, server) = setup().await;
    let mut clients = Vec::new();
    for i in 0..50 {
        let name = format!("s{i}");
        let (status, reply) = create(&server, json!({"name": name, "tables": ["orders"], "actions": ["insert"]})).await;
        assert_eq!(status, 201, "{reply}");
        clients.push(connect(&server, &name).await);
    }
    for chunk in 0..10 {
        pg.execute(
            "INSERT INTO orders (item) SELECT $1::text FROM generate_series(1, 100)",
            &[&format!("batch {chunk}")],
        )
        .await
        .unwrap();
    }
    let tasks: Vec<_> =
        clients.into_iter().map(|mut ws| tokio::spawn(async move { changes(&mut ws, 10).await.len() })).collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let n = tokio::time::timeout(Duration::from_secs(120), t).await.expect("in time").unwrap();
        assert_eq!(n, 1000, "session s{i}");
    }
    server.stop().await;
}

/// Keyset pages over 100,000 rows yield every row exactly once, in key order, as of the
/// snapshot; the NDJSON export of the same table equals the pages.
#[tokio::test]
async fn keyset_pages_and_the_ndjson_export_agree() {
    let (_db, pg, server) = setup().await;
    pg.execute("INSERT INTO orders (item) SELECT 'item ' || g FROM generate_series(1, 100000) g", &[]).await.unwrap();
    let (status, reply) = create(&server, json!({"name": "reader"})).await;
    assert_eq!(status, 201, "{reply}");
    pg.execute("DELETE FROM orders WHERE id % 2 = 0", &[]).await.unwrap();
    pg.execute("INSERT INTO orders (item) VALUES ('after the snapshot')", &[]).await.unwrap();

    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(c) => format!("/v2/sessions/reader/snapshot/orders?limit=1000&after={c}"),
            None => "/v2/sessions/reader/snapshot/orders?limit=1000".to_owned(),
        };
        let (status, page) = server.get(&path).await;
        assert_eq!(status, 200, "{page}");
        rows.extend(page["rows"].as_array().unwrap().iter().cloned());
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 100);
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=100_000).collect::<Vec<_>>(), "every row once, in key order, as of the snapshot");
    assert_eq!(rows[41], json!({"id": 42, "item": "item 42"}));

    let (status, body) = raw_request(
        server.addr,
        "GET",
        "/v2/sessions/reader/snapshot/orders",
        &[("accept", "application/x-ndjson")],
        vec![],
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(text.ends_with('\n'));
    let exported: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(exported, rows, "the export is the pages, joined");

    // Refusals: a cursor that is not ours, a limit out of range, an unknown table.
    for (path, status) in [
        ("/v2/sessions/reader/snapshot/orders?after=bogus", 400),
        ("/v2/sessions/reader/snapshot/orders?limit=0", 400),
        ("/v2/sessions/reader/snapshot/orders?limit=1000000", 400),
        ("/v2/sessions/reader/snapshot/orders?offset=5", 400),
        ("/v2/sessions/reader/snapshot/nosuch", 404),
        ("/v2/sessions/reader/snapshot/a;b", 400),
        ("/v2/sessions/nobody/snapshot/orders", 404),
    ] {
        let (got, reply) = server.get(path).await;
        assert_eq!(got, status, "{path}: {reply}");
        assert!(reply["error"].is_string(), "{path}: {reply}");
    }
    server.stop().await;
}

/// A snapshot does not survive a restart: reading it says so.
#[tokio::test]
async fn the_snapshot_does_not_survive_a_restart() {
    let (db, _pg, server) = setup().await;
    create(&server, json!({"name": "brief"})).await;
    let (status, _) = server.get("/v2/sessions/brief/snapshot/orders").await;
    assert_eq!(status, 200);
    server.stop().await;
    let server = TestServer::start(&db).await;
    let (status, reply) = server.get("/v2/sessions/brief/snapshot/orders").await;
    assert_eq!(status, 409, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("does not survive a restart"), "{reply}");
    server.stop().await;
}

async fn raw_delete(server: &TestServer, path: &str) -> (u16, Value) {
    let (status, body) = raw_request(server.addr, "DELETE", path, &[], vec![]).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Issue 18: a session's snapshot serves its tables only (every table for a session
/// without `tables`), never the store or another schema's; anything else is answered
/// exactly as a table that does not exist, pages and exports alike.
#[tokio::test]
async fn a_sessions_snapshot_serves_only_its_tables() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup().await;
    pg.batch_execute(
        "CREATE TABLE secret (id int PRIMARY KEY, pw text); INSERT INTO secret VALUES (1, 'hunter2');
         INSERT INTO orders (item) VALUES ('pen'); INSERT INTO audit.log (what) VALUES ('x');",
    )
    .await
    .unwrap();
    for body in [
        json!({"name": "orders", "tables": ["public.orders"]}),
        json!({"name": "audit", "tables": ["audit.*"]}),
        json!({"name": "everything"}),
    ] {
        let (status, reply) = create(&server, body).await;
        assert_eq!(status, 201, "{reply}");
    }
    let read = |session: &str, table: &str, ndjson: bool| {
        let path = format!("/v2/sessions/{session}/snapshot/{table}");
        let addr = server.addr;
        async move {
            let headers: &[(&str, &str)] = if ndjson { &[("accept", "application/x-ndjson")] } else { &[] };
            let (status, body) = raw_request(addr, "GET", &path, headers, vec![]).await;
            (status, String::from_utf8(body).unwrap())
        }
    };
    for ndjson in [false, true] {
        for (session, table) in [("orders", "orders"), ("audit", "audit.log"), ("everything", "secret")] {
            let (status, body) = read(session, table, ndjson).await;
            assert_eq!(status, 200, "{session} {table}: {body}");
        }
        let (_, unknown) = read("orders", "nosuch", ndjson).await;
        let unknown: Value = serde_json::from_str(&unknown).unwrap();
        for (session, table) in [
            ("orders", "secret"),
            ("orders", "items"),
            ("orders", "audit.log"),
            ("orders", "pgdeltastream.sessions"),
            ("orders", "pg_catalog.pg_authid"),
            ("audit", "public.orders"),
            ("everything", "pgdeltastream.sessions"),
            ("everything", "%22pgdeltastream%22.%22sessions%22"),
            ("everything", "information_schema.tables"),
        ] {
            let (status, body) = read(session, table, ndjson).await;
            assert_eq!(status, 404, "{session} {table} (ndjson {ndjson}): {body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            let shown = |v: &Value, name: &str| v["error"].as_str().unwrap().replace(name, "T");
            let name = quoted(table);
            assert_eq!(shown(&body, &name), shown(&unknown, "\"nosuch\""), "{session} {table}: {body}");
            assert!(!body.to_string().contains("hunter2"), "{body}");
        }
    }
    server.stop().await;
}

/// A table of a path as a refusal names it: each part quoted.
fn quoted(table: &str) -> String {
    let table = table.replace("%22", "\"");
    table.split('.').map(|p| format!("\"{}\"", p.trim_matches('"'))).collect::<Vec<_>>().join(".")
}

/// Issue 18: session names and slot names never meet. A session may not be named like
/// a slot (an existing one, or one of the form pgdeltastream gives its slots), so that
/// a token naming a session never grants another session's slot through v1.
#[tokio::test]
async fn a_session_may_not_be_named_like_a_slot() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup().await;
    let (status, created) = create(&server, json!({"name": "orders", "tables": ["orders"]})).await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();
    pg.batch_execute("SELECT pg_create_logical_replication_slot('someones_slot', 'wal2json')").await.unwrap();
    for name in [slot.as_str(), "delta_easy272", "someones_slot"] {
        let (status, reply) = create(&server, json!({"name": name})).await;
        assert_eq!(status, 409, "{name}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("slot"), "{name}: {reply}");
    }
    pg.batch_execute("SELECT pg_drop_replication_slot('someones_slot')").await.unwrap();
    let (status, all) = server.get("/v2/sessions").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["orders"], "no refusal left a session behind");
    server.stop().await;
}
