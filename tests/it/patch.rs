//! `PATCH /v2/sessions/{name}`: a session's tables and actions changed while a client
//! streams and acks, on both plugins, without a change lost or repeated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use testkit::pg::{TestDb, fresh_db};
use testkit::support::*;

async fn setup() -> (TestDb, tokio_postgres::Client, TestServer) {
    let db = fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE a (n int PRIMARY KEY); CREATE TABLE b (n int PRIMARY KEY);
         CREATE TABLE c (n int PRIMARY KEY, note text);",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    (db, pg, server)
}

async fn patch(server: &TestServer, name: &str, body: Value) -> (u16, Value) {
    request(server.addr, "PATCH", &format!("/v2/sessions/{name}"), Some(&body.to_string())).await
}

async fn create(server: &TestServer, body: Value) -> Value {
    let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn connect(server: &TestServer, name: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream", server.addr);
    tokio_tungstenite::connect_async(url).await.expect("upgrade").0
}

/// Commits one numbered row per transaction, into a then b, until told to stop; the
/// last number committed in each is readable as it goes.
struct Writer {
    last: Arc<[AtomicI64; 2]>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<i64>,
}

impl Writer {
    async fn start(db: &TestDb) -> Writer {
        let pg = db.client().await;
        let last = Arc::new([AtomicI64::new(0), AtomicI64::new(0)]);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (last.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                n += 1;
                for (i, table) in ["a", "b"].iter().enumerate() {
                    pg.execute(&format!("INSERT INTO {table} VALUES ($1)"), &[&(n as i32)]).await.unwrap();
                    l[i].store(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        });
        Writer { last, stop, task }
    }

    fn last(&self, table: usize) -> i64 {
        self.last[table].load(Ordering::SeqCst)
    }

    async fn stop(self) -> i64 {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// What the client received: each table's row numbers in the order they came, and the
/// nextlsn of every transaction.
#[derive(Default, Debug)]
struct Received {
    rows: BTreeMap<String, Vec<i64>>,
    lsns: Vec<String>,
}

/// Reads and acks every transaction until `until` says the client has what it waits for.
fn client(mut ws: Ws, until: impl Fn(&Received) -> bool + Send + 'static) -> tokio::task::JoinHandle<Received> {
    tokio::spawn(async move {
        let mut got = Received::default();
        while !until(&got) {
            let tx = next_json(&mut ws).await;
            let Some(lsn) = tx["nextlsn"].as_str() else { continue };
            for c in tx["change"].as_array().into_iter().flatten() {
                let n = c["columnvalues"][0].as_i64().unwrap_or_else(|| panic!("no row number in {c}"));
                got.rows.entry(c["table"].as_str().unwrap().to_owned()).or_default().push(n);
            }
            got.lsns.push(lsn.to_owned());
            ack(&mut ws, lsn).await;
        }
        got
    })
}

/// Every number from the first seen on, each once, in order.
fn contiguous(table: &str, rows: &[i64]) -> (i64, i64) {
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    assert_eq!(rows, (first..=last).collect::<Vec<_>>(), "{table}: not every row once, in order");
    (first, last)
}

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The session streams `start` (None: every table); mid-stream it becomes [a, b], then
/// [b]. The client sees every row of a kept table once, in order; a's rows stop at the
/// second change; b's come from the first change on (from the start with every table).
async fn a_then_b(plugin: &str, start: Option<Value>) {
    let (db, pg, server) = setup().await;
    let mut body = json!({"name": "feed", "plugin": plugin, "actions": ["insert"]});
    if let Some(tables) = &start {
        body["tables"] = tables.clone();
    }
    let created = create(&server, body).await;
    let ws = connect(&server, "feed").await;
    let writer = Writer::start(&db).await;
    let done = Arc::new(AtomicI64::new(i64::MAX));
    let d = done.clone();
    let reader =
        client(ws, move |got| got.rows.get("b").and_then(|b| b.last()).is_some_and(|n| *n >= d.load(Ordering::SeqCst)));
    tokio::time::sleep(Duration::from_millis(700)).await;

    let (status, both) = patch(&server, "feed", json!({"tables": ["a", "b"]})).await;
    assert_eq!(status, 200, "{both}");
    let b_at_first = writer.last(1);
    assert_eq!(both["tables"], json!(["public.a", "public.b"]));
    let added = if start.is_some() { json!(["public.b"]) } else { json!([]) };
    assert_eq!(both["added"], added, "{both}");
    tokio::time::sleep(Duration::from_millis(700)).await;

    let (status, only_b) = patch(&server, "feed", json!({"tables": ["b"]})).await;
    assert_eq!(status, 200, "{only_b}");
    let a_at_second = writer.last(0);
    assert_eq!(only_b["tables"], json!(["public.b"]));
    assert_eq!(only_b["added"], json!([]));
    tokio::time::sleep(Duration::from_millis(700)).await;

    let last = writer.stop().await;
    done.store(last, Ordering::SeqCst);
    let got =
        tokio::time::timeout(Duration::from_secs(30), reader).await.expect("the client gets b's last row").unwrap();
    let lsns: Vec<u64> = got.lsns.iter().map(|l| lsn(l)).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "a transaction came twice or out of order: {:?}", got.lsns);
    let (a_first, a_last) = contiguous("a", &got.rows["a"]);
    let (b_first, b_last) = contiguous("b", &got.rows["b"]);
    assert_eq!(a_first, 1, "a from the start");
    assert!(a_last <= a_at_second, "a's rows committed after the second PATCH came ({a_last} > {a_at_second})");
    assert!(a_last < last, "a was never removed: {a_last} of {last}");
    assert_eq!(b_last, last);
    match start {
        Some(_) => assert!(b_first > 1 && b_first <= b_at_first + 1, "b from the first PATCH: {b_first}, {b_at_first}"),
        None => assert_eq!(b_first, 1, "b from the start (every table)"),
    }
    assert!(!got.rows.contains_key("c"));

    // A restart keeps the new tables.
    server.stop().await;
    let server = TestServer::start(&db).await;
    let (status, view) = server.get("/v2/sessions/feed").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["tables"], json!(["public.b"]));
    assert_eq!(view["slotName"], created["slotName"]);
    let ws = connect(&server, "feed").await;
    pg.batch_execute(&format!("INSERT INTO a VALUES ({0}); INSERT INTO b VALUES ({0})", last + 1)).await.unwrap();
    let reader = client(ws, move |got| got.rows.get("b").is_some_and(|b| b.contains(&(last + 1))));
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.expect("b after the restart").unwrap();
    assert_eq!(got.rows.get("a"), None, "a after the restart: {got:?}");
    assert_eq!(got.rows["b"], [last + 1], "nothing of b twice after the restart");
    server.stop().await;
}

#[tokio::test]
async fn wal2json_switches_tables_mid_stream() {
    a_then_b("wal2json", Some(json!(["a"]))).await;
}

#[tokio::test]
async fn pgoutput_switches_tables_mid_stream() {
    a_then_b("pgoutput", Some(json!(["a"]))).await;
}

#[tokio::test]
async fn pgoutput_publication_for_all_tables_becomes_a_list_mid_stream() {
    a_then_b("pgoutput", None).await;
}

#[tokio::test]
async fn wal2json_every_table_becomes_a_list_mid_stream() {
    a_then_b("wal2json", None).await;
}

/// Actions switch too, logical messages included (a pgoutput start option).
#[tokio::test]
async fn actions_and_messages_switch_mid_stream() {
    for plugin in ["wal2json", "pgoutput"] {
        let (_db, pg, server) = setup().await;
        create(&server, json!({"name": "acts", "plugin": plugin, "tables": ["a"], "actions": ["insert"]})).await;
        let mut ws = connect(&server, "acts").await;
        pg.batch_execute("INSERT INTO a VALUES (1); SELECT pg_logical_emit_message(true, 'p', 'before')")
            .await
            .unwrap();
        let tx = next_changes(&mut ws).await;
        assert_eq!(tx["change"].as_array().unwrap().len(), 1, "{plugin}: the message is not an action yet: {tx}");
        ack(&mut ws, tx["nextlsn"].as_str().unwrap()).await;
        let (status, view) = patch(&server, "acts", json!({"actions": ["delete", "message", "delete"]})).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["actions"], json!(["delete", "message"]));
        pg.batch_execute(
            "BEGIN; INSERT INTO a VALUES (2); DELETE FROM a WHERE n = 1;
             SELECT pg_logical_emit_message(true, 'p', 'after'); COMMIT;",
        )
        .await
        .unwrap();
        let tx = next_changes(&mut ws).await;
        let kinds: Vec<&str> = tx["change"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["delete", "message"], "{plugin}: {tx}");
        server.stop().await;
    }
}

#[tokio::test]
async fn refusals_are_json_errors() {
    let (_db, pg, server) = setup().await;
    create(&server, json!({"name": "w", "plugin": "wal2json", "tables": ["a"]})).await;
    create(&server, json!({"name": "p", "plugin": "pgoutput", "tables": ["a"]})).await;
    pg.batch_execute("CREATE PUBLICATION theirs FOR TABLE a").await.unwrap();
    create(&server, json!({"name": "ext", "publication": "theirs"})).await;
    server.init().await;
    let filtered = json!({"tables": [{"table": "a", "where": "n > 1"}]});
    let cases = [
        ("nobody", json!({"tables": ["a"]}), 404, "no session named nobody"),
        ("w", json!({}), 400, "nothing to change"),
        ("w", json!({"tables": []}), 400, "tables is empty"),
        ("w", json!({"actions": []}), 400, "actions is empty"),
        ("w", json!({"actions": ["upsert"]}), 400, "upsert"),
        ("w", json!({"tables": ["a"], "plugin": "pgoutput"}), 400, "plugin"),
        ("w", json!({"tables": ["a;b"]}), 400, "invalid table"),
        ("w", json!({"tables": ["nosuch"]}), 404, "does not exist"),
        ("w", filtered.clone(), 400, "needs the pgoutput plugin"),
        ("p", json!({"tables": [{"table": "a", "where": "n > 1) OR (true"}]}), 400, "one SQL expression"),
        ("p", json!({"tables": [{"table": "a", "columns": ["nosuch"]}]}), 400, "nosuch"),
        ("ext", json!({"actions": ["insert"]}), 409, "theirs"),
        ("default", json!({"actions": ["insert"]}), 409, "/v1/init"),
        ("Bad-Name", json!({"actions": ["insert"]}), 400, "invalid session name"),
    ];
    for (name, body, want, says) in cases {
        let (status, answer) = patch(&server, name, body.clone()).await;
        assert_eq!(status, want, "{name} {body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{name} {body}: not a JSON error: {answer}"));
        assert!(error.contains(says), "{name} {body}: {error}");
    }
    // A refusal changed nothing.
    let (_, view) = server.get("/v2/sessions/p").await;
    assert_eq!(view["tables"], json!(["public.a"]));
    let (status, view) = patch(&server, "p", filtered).await;
    assert_eq!(status, 200, "pgoutput takes a row filter: {view}");
    assert_eq!(view["tables"], json!([{"table": "public.a", "where": "n > 1"}]));
    assert_eq!(view["added"], json!([{"table": "public.a", "where": "n > 1"}]));
    server.stop().await;
}

/// The snapshot serves the tables it was exported for: an added one is a 409 that says
/// to backfill it, a removed one is out of the session's scope.
#[tokio::test]
async fn the_snapshot_serves_only_the_tables_it_was_exported_for() {
    for plugin in ["wal2json", "pgoutput"] {
        let (_db, pg, server) = setup().await;
        pg.batch_execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)").await.unwrap();
        create(&server, json!({"name": "snap", "plugin": plugin, "tables": ["a"]})).await;
        assert_eq!(read(&server, "a").await.0, 200);
        let (status, answer) = patch(&server, "snap", json!({"tables": ["a", "b"], "backfill": true})).await;
        assert_eq!(status, 200, "{plugin}: {answer}");
        assert_eq!(answer["backfill"]["state"], "running", "the added table is backfilled: {answer}");
        assert_eq!(answer["backfill"]["tables"][0]["table"], "public.b", "{answer}");
        let (status, view) = server.get("/v2/sessions/snap").await;
        assert_eq!((status, &view["tables"]), (200, &json!(["public.a", "public.b"])), "the change is in effect");
        let (status, page) = read(&server, "a").await;
        assert_eq!((status, &page["rows"]), (200, &json!([{"n": 1}])), "{plugin}: {page}");
        let (status, answer) = read(&server, "b").await;
        assert_eq!(status, 409, "{plugin}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("backfill"), "{answer}");
        let (status, _) = patch(&server, "snap", json!({"tables": ["b"]})).await;
        assert_eq!(status, 200);
        let (status, answer) = read(&server, "a").await;
        assert_eq!(status, 404, "{plugin}: a removed table is out of scope: {answer}");
        assert_eq!(read(&server, "b").await.0, 409);
        server.stop().await;
    }
}

async fn read(server: &TestServer, table: &str) -> (u16, Value) {
    server.get(&format!("/v2/sessions/snap/snapshot/{table}")).await
}

/// Other sites' pages may not change a session, as they may not create one.
#[tokio::test]
async fn cross_origin_pages_may_not_patch() {
    let (_db, _pg, server) = setup().await;
    create(&server, json!({"name": "feed", "plugin": "wal2json", "tables": ["a"]})).await;
    let body = br#"{"tables": ["b"]}"#.to_vec();
    let headers = [("content-type", "application/json"), ("origin", "http://evil.example")];
    let (status, _) = raw_request(server.addr, "PATCH", "/v2/sessions/feed", &headers, body.clone()).await;
    assert_eq!(status, 403);
    let plain = [("content-type", "text/plain")];
    let (status, _) = raw_request(server.addr, "PATCH", "/v2/sessions/feed", &plain, body).await;
    assert_eq!(status, 415);
    let (_, view) = server.get("/v2/sessions/feed").await;
    assert_eq!(view["tables"], json!(["public.a"]));
    server.stop().await;
}

/// A consumer token may not change a session, its own included: that is an admin's, as
/// create and delete are.
#[tokio::test]
async fn only_an_admin_patches() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use pgdeltastream::server::{KeySource, Verifier};
    const SECRET: &[u8] = b"a test secret that is long enough";
    let token = |claims: Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let db = fresh_db().await;
    db.client().await.batch_execute("CREATE TABLE a (n int PRIMARY KEY); CREATE TABLE b (n int)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.http.auth = Some(Arc::new(Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let admin = format!("Bearer {}", token(json!({"role": "admin", "exp": exp})));
    let body = |b: &str| b.as_bytes().to_vec();
    let call = |auth: String, b: &'static str| {
        let addr = server.addr;
        async move {
            let mut headers = vec![("content-type", "application/json")];
            if !auth.is_empty() {
                headers.push(("authorization", auth.as_str()));
            }
            let (status, bytes) =
                raw_request(addr, "PATCH", "/v2/sessions/feed", &headers, b.as_bytes().to_vec()).await;
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };
    let headers = [("content-type", "application/json"), ("authorization", admin.as_str())];
    let create = body(r#"{"name": "feed", "plugin": "wal2json", "tables": ["a"]}"#);
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &headers, create).await.0, 201);
    for sessions in [json!(["feed"]), json!(["other"])] {
        let consumer = format!("Bearer {}", token(json!({"role": "consumer", "sessions": sessions, "exp": exp})));
        let (status, answer) = call(consumer, r#"{"tables": ["b"]}"#).await;
        assert_eq!(status, 403, "{sessions}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, answer) = call(String::new(), r#"{"tables": ["b"]}"#).await;
    assert_eq!(status, 401, "{answer}");
    let (status, answer) = call(admin.clone(), r#"{"tables": ["b"]}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tables"], json!(["public.b"]));
    server.stop().await;
}

/// Another process that knew the session before the change shows and streams the new
/// tables; the one holding the snapshot serves it only for what the change kept.
#[tokio::test]
async fn another_process_follows_the_change() {
    let (db, pg, here) = setup().await;
    let there = TestServer::start(&db).await;
    create(&here, json!({"name": "feed", "plugin": "wal2json", "tables": ["a"]})).await;
    assert_eq!(there.get("/v2/sessions/feed").await.0, 200, "known there too");
    let (status, view) = patch(&here, "feed", json!({"tables": ["b"]})).await;
    assert_eq!(status, 200, "{view}");
    let (status, answer) = patch(&there, "snap", json!({"tables": ["a"]})).await;
    assert_eq!(status, 404, "{answer}");
    create(&here, json!({"name": "snap", "plugin": "wal2json", "tables": ["a"]})).await;
    assert_eq!(read(&here, "a").await.0, 200, "the snapshot is here");
    let (status, answer) = patch(&there, "snap", json!({"tables": ["b"]})).await;
    assert_eq!(status, 200, "changed there: {answer}");
    assert_eq!(here.get("/v2/sessions/snap").await.1["tables"], json!(["public.b"]));
    assert_eq!(read(&here, "a").await.0, 404, "removed there: out of scope here");
    assert_eq!(read(&here, "b").await.0, 409, "added there: not in the snapshot");
    assert_eq!(there.get("/v2/sessions/feed").await.1["tables"], json!(["public.b"]));
    let ws = connect(&there, "feed").await;
    pg.batch_execute("INSERT INTO a VALUES (1); INSERT INTO b VALUES (1)").await.unwrap();
    let reader = client(ws, |got| got.rows.contains_key("b"));
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.expect("b's row").unwrap();
    assert_eq!(got.rows.get("a"), None, "{got:?}");
    there.stop().await;
    here.stop().await;
}
