//! Live backfills: a session's tables read again into its stream while it runs and
//! while writers change them, bracketed by watermarks (DBLog's method). A client that
//! applies the stream in order ends with exactly the table's rows.

use testkit::pg as common;
use testkit::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Rows of the table a backfill reads while it changes.
const ROWS: i64 = 50_000;

/// Chunks of this size while writers run: many windows, each with changes in it.
const SMALL_CHUNKS: usize = 32 * 1024;

async fn setup(rows: i64) -> (common::TestDb, tokio_postgres::Client, TestServer) {
    setup_with(rows, pgdeltastream::session::DEFAULT_BACKFILL_CHUNK_BYTES).await
}

async fn setup_with(rows: i64, chunk_bytes: usize) -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(&format!(
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL, pad text);
         INSERT INTO t SELECT i, 0, repeat('x', i % 50) FROM generate_series(1, {rows}) i;
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE TABLE nokey (a int);
         ANALYZE t;"
    ))
    .await
    .unwrap();
    let mut settings = fast_settings(&db);
    settings.session.backfill_chunk_bytes = chunk_bytes;
    let server = TestServer::start_with(settings).await;
    (db, pg, server)
}

async fn create(server: &TestServer, name: &str, plugin: &str, tables: Value) -> Value {
    let body = json!({"name": name, "plugin": plugin, "tables": tables});
    let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn connect(server: &TestServer, name: &str, format: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream?format={format}", server.addr);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    ws
}

async fn backfill(server: &TestServer, name: &str, tables: Value) -> (u16, Value) {
    server.post(&format!("/v2/sessions/{name}/backfill"), &json!({ "tables": tables }).to_string()).await
}

/// What a client keeps: the table's rows by id, as the stream says they are.
#[derive(Default)]
struct Replica {
    rows: BTreeMap<i64, (i64, Option<String>)>,
    /// Backfill rows applied, and the chunks they came in.
    backfilled: u64,
    chunks: Vec<Value>,
    /// The highest nextlsn acked.
    acked: Option<String>,
    /// Changes that came after the first chunk and before the last.
    live_during: u64,
}

impl Replica {
    /// Applies one message; answers the position to ack, if it ends a transaction.
    fn apply(&mut self, m: &Value) -> Option<String> {
        if let Some(rows) = m["rows"].as_array() {
            self.backfill_rows(&m["columnnames"], rows);
        }
        if !m["backfill"].is_null() && (m["backfill"]["more"] == false || m["action"] == "C") {
            self.chunks.push(m["backfill"].clone());
        }
        if let Some(changes) = m["change"].as_array() {
            for c in changes {
                self.change(c["kind"].as_str().unwrap_or(""), c);
            }
        }
        match m["action"].as_str() {
            None => m["nextlsn"].as_str().map(str::to_owned),
            Some("I" | "U") => {
                self.live();
                let row = record(&m["columns"]);
                self.rows.insert(row.0, (row.1, row.2));
                None
            }
            Some("D") => {
                self.live();
                self.rows.remove(&record(&m["identity"]).0);
                None
            }
            Some("C") => m["nextlsn"].as_str().map(str::to_owned),
            _ => None,
        }
    }

    /// A chunk's rows: each the array of its values, in `names`' order.
    fn backfill_rows(&mut self, names: &Value, rows: &[Value]) {
        let at = |name: &str| names.as_array().and_then(|n| n.iter().position(|x| x == name));
        let (id, v, pad) = (at("id").expect("id"), at("v"), at("pad"));
        for row in rows {
            self.backfilled += 1;
            let value =
                (v.and_then(|i| row[i].as_i64()).unwrap_or(0), pad.and_then(|i| row[i].as_str().map(str::to_owned)));
            self.rows.insert(row[id].as_i64().expect("id"), value);
        }
    }

    fn change(&mut self, kind: &str, c: &Value) {
        let column = |name: &str| {
            let names = c["columnnames"].as_array()?;
            let at = names.iter().position(|n| n == name)?;
            Some(c["columnvalues"][at].clone())
        };
        match kind {
            "insert" | "update" => {
                let id = column("id").and_then(|v| v.as_i64()).expect("id");
                let v = column("v").and_then(|v| v.as_i64()).expect("v");
                let pad = column("pad").and_then(|v| v.as_str().map(str::to_owned));
                self.live();
                self.rows.insert(id, (v, pad));
            }
            "delete" => {
                self.live();
                let names = c["oldkeys"]["keynames"].as_array().expect("keynames");
                let at = names.iter().position(|n| n == "id").expect("id key");
                self.rows.remove(&c["oldkeys"]["keyvalues"][at].as_i64().expect("id"));
            }
            _ => {}
        }
    }

    fn live(&mut self) {
        if self.chunks.last().is_some_and(|c| c["last"] != true) {
            self.live_during += 1;
        }
    }

    /// Reads, applies and acks until `until` holds or the time is up.
    async fn follow(&mut self, ws: &mut Ws, limit: Duration, until: impl Fn(&Replica) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !until(self) {
            assert!(tokio::time::Instant::now() < deadline, "not there within {limit:?}: {} rows", self.rows.len());
            let m = next_json(ws).await;
            if let Some(lsn) = self.apply(&m) {
                ack(ws, &lsn).await;
                self.acked = Some(lsn);
            }
        }
    }
}

/// A format 2 record's (id, v, pad).
fn record(columns: &Value) -> (i64, i64, Option<String>) {
    let get = |name: &str| columns.as_array().and_then(|c| c.iter().find(|c| c["name"] == name)).map(|c| &c["value"]);
    let id = get("id").and_then(Value::as_i64).expect("id");
    (id, get("v").and_then(Value::as_i64).unwrap_or(0), get("pad").and_then(|p| p.as_str().map(str::to_owned)))
}

/// The table as it is.
async fn table(pg: &tokio_postgres::Client) -> BTreeMap<i64, (i64, Option<String>)> {
    let rows = pg.query("SELECT id, v, pad FROM t", &[]).await.unwrap();
    rows.iter().map(|r| (r.get::<_, i32>(0) as i64, (r.get::<_, i32>(1) as i64, r.get(2)))).collect()
}

/// Commits one-row updates, deletes and inserts into `t` until stopped; answers how many.
fn writer(db: &common::TestDb, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let db = db.clone();
    tokio::spawn(async move {
        let pg = db.client().await;
        let (mut x, mut n, mut next_id) = (0x9e37_79b9_u64, 0_u64, ROWS as i32 + 1);
        while !stop.load(Ordering::Relaxed) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % ROWS as u64) as i32 + 1;
            match x % 10 {
                0 => pg.execute("DELETE FROM t WHERE id = $1", &[&id]).await.unwrap(),
                1 => {
                    next_id += 1;
                    pg.execute("INSERT INTO t VALUES ($1, 1, 'new')", &[&next_id]).await.unwrap()
                }
                2 => pg.execute("INSERT INTO t VALUES ($1, 2, 'again') ON CONFLICT DO NOTHING", &[&id]).await.unwrap(),
                _ => pg.execute("UPDATE t SET v = v + 1, pad = 'u' || v WHERE id = $1", &[&id]).await.unwrap(),
            };
            n += 1;
        }
        n
    })
}

/// Marks the end of the writes: a row the client will see last.
async fn fence(pg: &tokio_postgres::Client) {
    pg.execute("INSERT INTO t VALUES (-1, -1, 'fence')", &[]).await.unwrap();
}

async fn raw_metrics(server: &TestServer) -> (u16, String) {
    let reply = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    (if reply.starts_with("HTTP/1.1 200") { 200 } else { 0 }, reply)
}

async fn session_backfill(server: &TestServer, name: &str) -> Value {
    let (status, view) = server.get(&format!("/v2/sessions/{name}")).await;
    assert_eq!(status, 200, "{view}");
    view["backfill"].clone()
}

async fn converges(plugin: &str, format: &str) {
    let (db, pg, server) = setup_with(ROWS, SMALL_CHUNKS).await;
    create(&server, "bf", plugin, json!(["public.t"])).await;
    let mut ws = connect(&server, "bf", format).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(&db, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, started) = backfill(&server, "bf", json!(["t"])).await;
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["backfill"]["state"], "running");
    let mut replica = Replica::default();
    let began = std::time::Instant::now();
    replica.follow(&mut ws, Duration::from_secs(120), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
    let took = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    let writes = writes.await.unwrap();
    fence(&pg).await;
    replica.follow(&mut ws, Duration::from_secs(30), |r| r.rows.contains_key(&-1)).await;
    let expected = table(&pg).await;
    assert_eq!(replica.rows.len(), expected.len(), "{plugin}/{format}: as many rows as the table");
    let differ: Vec<_> = expected.iter().filter(|(k, v)| replica.rows.get(k) != Some(v)).take(5).collect();
    assert!(differ.is_empty(), "{plugin}/{format}: rows differ from the table: {differ:?}");
    assert!(
        replica.live_during > 100,
        "{plugin}/{format}: {} changes came between chunks ({writes} written)",
        replica.live_during
    );
    let sent: u64 = replica.chunks.iter().map(|c| c["rows"].as_u64().unwrap()).sum();
    assert_eq!(sent, replica.backfilled, "each chunk says how many rows it carries");
    assert!(sent > ROWS as u64 / 2, "most rows came from the backfill: {sent}");
    eprintln!(
        "{plugin}/{format}: {sent} rows in {} chunks in {took:?}, {} changes between them ({writes} written in all)",
        replica.chunks.len(),
        replica.live_during
    );
    let numbers: Vec<u64> = replica.chunks.iter().map(|c| c["chunk"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>(), "chunks in order");
    // The progress is stored once the last chunk's ack is in.
    let state = await_done(&server, "bf").await;
    assert_eq!(state["tables"][0]["rows"].as_u64(), Some(sent), "{state}");
    assert_eq!(state["tables"][0]["done"], true);
    assert_eq!(state["estimatedRemainingRows"], 0);
    let (_, metrics) = raw_metrics(&server).await;
    assert!(metrics.contains("backfill_rows{session=\"bf\""), "{metrics}");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_wal2json_backfill_under_writes_ends_with_the_tables_rows() {
    converges("wal2json", "transactions").await;
    converges("wal2json", "changes").await;
}

#[tokio::test]
async fn a_pgoutput_backfill_under_writes_ends_with_the_tables_rows() {
    converges("pgoutput", "changes").await;
    converges("pgoutput", "transactions").await;
}

/// A client that leaves mid-backfill and comes back continues it: rows it acked are not
/// sent again, and it ends with the table's rows.
#[tokio::test]
async fn a_reconnect_mid_backfill_continues_it() {
    let (db, pg, server) = setup_with(ROWS, SMALL_CHUNKS).await;
    create(&server, "again", "wal2json", json!(["public.t"])).await;
    let mut ws = connect(&server, "again", "transactions").await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(&db, stop.clone());
    let (status, _) = backfill(&server, "again", json!(["public.t"])).await;
    assert_eq!(status, 202);
    let mut replica = Replica::default();
    replica.follow(&mut ws, Duration::from_secs(60), |r| r.chunks.len() >= 3).await;
    // One more chunk arrives and is not acked: it comes again.
    let unacked = loop {
        let m = next_json(&mut ws).await;
        if !m["backfill"].is_null() {
            break m;
        }
        if let Some(lsn) = replica.apply(&m) {
            ack(&mut ws, &lsn).await;
        }
    };
    ws.close(None).await.unwrap();
    drop(ws);
    let acked_rows: u64 = replica.chunks.iter().map(|c| c["rows"].as_u64().unwrap()).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = session_backfill(&server, "again").await;
        if state["tables"][0]["chunks"].as_u64() == Some(3) {
            assert_eq!(state["tables"][0]["rows"].as_u64(), Some(acked_rows), "{state}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the acked chunks were not stored: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ws = connect_retry(&server, "again").await;
    let before = replica.chunks.len();
    replica.follow(&mut ws, Duration::from_secs(120), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
    let first_again = &replica.chunks[before];
    assert_eq!(first_again["chunk"], 4, "the unacked chunk is read again: {first_again}");
    assert_eq!(unacked["backfill"]["chunk"], 4);
    stop.store(true, Ordering::Relaxed);
    writes.await.unwrap();
    fence(&pg).await;
    replica.follow(&mut ws, Duration::from_secs(30), |r| r.rows.contains_key(&-1)).await;
    assert!(replica.rows == table(&pg).await, "the replica is the table");
}

async fn connect_retry(server: &TestServer, name: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream", server.addr);
    for _ in 0..100 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            return ws;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not reconnect to {name}");
}

/// The chunk's form in both formats, as the client gets its bytes, for a table of two
/// rows.
#[tokio::test]
async fn a_chunk_is_marked_as_a_backfill_in_both_formats() {
    let (_db, _pg, server) = setup(2).await;
    for format in ["transactions", "changes"] {
        let name = format!("shape_{}", &format[..1]);
        create(&server, &name, "wal2json", json!(["public.t"])).await;
        let mut ws = connect(&server, &name, format).await;
        let (status, _) = backfill(&server, &name, json!(["t"])).await;
        assert_eq!(status, 202);
        let mut got = Vec::new();
        loop {
            let Message::Text(text) = next_message(&mut ws).await else { panic!("a text message") };
            let m: Value = serde_json::from_str(text.as_str()).unwrap();
            got.push(redact(text.as_str()));
            if let Some(lsn) = m["nextlsn"].as_str().filter(|_| m["backfill"]["more"] == false || m["action"] == "C") {
                ack(&mut ws, lsn).await;
                break;
            }
        }
        insta::with_settings!({ snapshot_path => "../../snapshots" }, {
            insta::assert_snapshot!(format!("backfill_chunk_{format}"), got.join("\n"));
        });
    }
}

/// LSNs and ids change from run to run.
fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    for (key, with) in [("\"nextlsn\":\"", "[lsn]"), ("\"id\":\"", "[id]")] {
        let mut from = 0;
        while let Some(at) = out[from..].find(key) {
            let start = from + at + key.len();
            let Some(len) = out[start..].find('"') else { break };
            out.replace_range(start..start + len, with);
            from = start + with.len();
        }
    }
    out
}

fn lines(values: &[Value]) -> String {
    values.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
}

#[tokio::test]
async fn refusals_say_why() {
    let (_db, pg, server) = setup(10).await;
    create(&server, "picky", "wal2json", json!(["public.t", "public.nokey"])).await;
    let (status, body) = backfill(&server, "picky", json!(["public.other"])).await;
    assert_eq!(status, 404, "a table outside the session: {body}");
    let (status, body) = backfill(&server, "picky", json!(["public.nokey"])).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no primary key"), "{body}");
    let (status, body) = backfill(&server, "picky", json!([])).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = backfill(&server, "picky", json!(["public.*"])).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.post("/v2/sessions/picky/backfill", r#"{"tables":["t"],"extra":1}"#).await;
    assert_eq!(status, 400, "unknown fields: {body}");
    let (status, body) = backfill(&server, "nobody", json!(["t"])).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = backfill(&server, "picky", json!(["t; DROP TABLE t"])).await;
    assert!(status == 400 || status == 404, "{status} {body}");
    // No stream runs: the backfill waits for one, and a second one is refused.
    let (status, body) = backfill(&server, "picky", json!(["t"])).await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = backfill(&server, "picky", json!(["t"])).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/picky/backfill", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["backfill"]["state"], "cancelled");
    // Cancelled: a stream now gets no chunk, only changes.
    let mut ws = connect(&server, "picky", "transactions").await;
    pg.execute("UPDATE t SET v = 7 WHERE id = 1", &[]).await.unwrap();
    let m = next_changes(&mut ws).await;
    assert!(m["backfill"].is_null() && m["change"][0]["kind"] == "update", "{m}");
    assert_eq!(pg.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get::<_, i64>(0), 10);
}

/// Watermarks are no client's business: a v1 stream and a session that takes messages
/// see none of another session's backfill.
#[tokio::test]
async fn watermarks_reach_no_client() {
    let (_db, pg, server) = setup(100).await;
    create(&server, "filler", "wal2json", json!(["public.t"])).await;
    create(&server, "bystander", "pgoutput", json!(["public.other"])).await;
    let mut filler = connect(&server, "filler", "transactions").await;
    let mut bystander = connect(&server, "bystander", "changes").await;
    let (status, _) = backfill(&server, "filler", json!(["t"])).await;
    assert_eq!(status, 202);
    let mut replica = Replica::default();
    replica.follow(&mut filler, Duration::from_secs(30), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
    pg.execute("SELECT pg_logical_emit_message(true, 'app', 'hello')", &[]).await.unwrap();
    pg.execute("INSERT INTO other VALUES (1)", &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let m = next_json(&mut bystander).await;
        let done = m["action"] == "I";
        seen.push(m);
        if done {
            break;
        }
    }
    let text = lines(&seen);
    assert!(!text.contains("pgdeltastream"), "a watermark reached a client: {text}");
    assert!(text.contains("\"prefix\":\"app\""), "the application's message did: {text}");
    let _ = bystander.send(Message::Close(None)).await;
}

/// A backfill reads only what the session may see: a pgoutput session's row filter and
/// column list apply to its chunks as to its changes.
#[tokio::test]
async fn a_backfill_reads_only_the_sessions_rows_and_columns() {
    let (_db, _pg, server) = setup(1000).await;
    let table = json!([{"table": "public.t", "where": "id % 2 = 0", "columns": ["id", "v"]}]);
    create(&server, "narrow", "pgoutput", table).await;
    let mut ws = connect(&server, "narrow", "changes").await;
    let (status, body) = backfill(&server, "narrow", json!(["public.t"])).await;
    assert_eq!(status, 202, "{body}");
    let mut ids = Vec::new();
    loop {
        let m = next_json(&mut ws).await;
        if m["action"] == "R" {
            assert_eq!(m["columnnames"], json!(["id", "v"]), "only the column list: {m}");
            ids.extend(m["rows"].as_array().unwrap().iter().map(|r| r[0].as_i64().unwrap()));
        }
        if m["action"] == "C" && m["backfill"]["last"] == true {
            break;
        }
    }
    assert_eq!(ids, (1..=500).map(|i| i * 2).collect::<Vec<i64>>(), "only the rows of the row filter, in key order");
}

/// The progress is stored: a server that restarts mid-backfill goes on from the last
/// acked chunk, and the client ends with the table's rows.
#[tokio::test]
async fn a_backfill_outlives_a_server_restart() {
    let (db, pg, server) = setup_with(ROWS, SMALL_CHUNKS).await;
    create(&server, "durable", "wal2json", json!(["public.t"])).await;
    let mut ws = connect(&server, "durable", "transactions").await;
    let (status, _) = backfill(&server, "durable", json!(["t"])).await;
    assert_eq!(status, 202);
    let mut replica = Replica::default();
    replica.follow(&mut ws, Duration::from_secs(60), |r| r.chunks.len() >= 3).await;
    let acked_chunks = replica.chunks.len() as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while session_backfill(&server, "durable").await["tables"][0]["chunks"].as_u64() != Some(acked_chunks) {
        assert!(tokio::time::Instant::now() < deadline, "the acked chunks were not stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    drop(ws);
    pg.execute("UPDATE t SET v = 99 WHERE id = 1", &[]).await.unwrap();
    let server = TestServer::start(&db).await;
    let mut ws = connect_retry(&server, "durable").await;
    replica.follow(&mut ws, Duration::from_secs(120), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
    let numbers: Vec<u64> = replica.chunks.iter().map(|c| c["chunk"].as_u64().unwrap()).collect();
    assert_eq!(numbers[acked_chunks as usize], acked_chunks + 1, "goes on after the last acked chunk: {numbers:?}");
    fence(&pg).await;
    replica.follow(&mut ws, Duration::from_secs(30), |r| r.rows.contains_key(&-1)).await;
    assert!(replica.rows == table(&pg).await, "the replica is the table");
    await_done(&server, "durable").await;
}

/// The backfill's state once it is done (its last chunk's ack stored).
async fn await_done(server: &TestServer, name: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = session_backfill(server, name).await;
        if state["state"] == "done" {
            return state;
        }
        assert!(tokio::time::Instant::now() < deadline, "never done: {state}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A table added mid-stream with `"backfill": true` arrives whole: its rows by the
/// backfill, its changes from the switch on, and the client ends with the table.
#[tokio::test]
async fn a_table_added_by_patch_is_backfilled_in_the_stream() {
    for plugin in ["wal2json", "pgoutput"] {
        let (db, pg, server) = setup_with(5_000, SMALL_CHUNKS).await;
        create(&server, "grow", plugin, json!(["public.other"])).await;
        let mut ws = connect(&server, "grow", "transactions").await;
        let stop = Arc::new(AtomicBool::new(false));
        let writes = writer(&db, stop.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = json!({"tables": ["public.other", "public.t"], "backfill": true}).to_string();
        let (status, answer) = request(server.addr, "PATCH", "/v2/sessions/grow", Some(&body)).await;
        assert_eq!(status, 200, "{plugin}: {answer}");
        assert_eq!(answer["backfill"]["tables"][0]["table"], "public.t", "{answer}");
        let mut replica = Replica::default();
        replica.follow(&mut ws, Duration::from_secs(60), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
        stop.store(true, Ordering::Relaxed);
        writes.await.unwrap();
        fence(&pg).await;
        replica.follow(&mut ws, Duration::from_secs(30), |r| r.rows.contains_key(&-1)).await;
        assert!(replica.rows == table(&pg).await, "{plugin}: the replica is the table");
        await_done(&server, "grow").await;
    }
}

/// On every major (`make test-majors`): a pgoutput session backfills from 14, where
/// pgoutput sends logical messages; 13 refuses it and says why.
#[tokio::test]
async fn on_every_major_pgoutput_backfills_from_14() {
    let (_db, pg, server) = setup(3_000).await;
    let major = server_major(&pg).await;
    create(&server, "majors", "pgoutput", json!(["public.t"])).await;
    let (status, body) = backfill(&server, "majors", json!(["t"])).await;
    if major < 14 {
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("PostgreSQL 14"), "{body}");
        return;
    }
    assert_eq!(status, 202, "PostgreSQL {major}: {body}");
    let mut ws = connect(&server, "majors", "changes").await;
    let mut replica = Replica::default();
    replica.follow(&mut ws, Duration::from_secs(60), |r| r.chunks.last().is_some_and(|c| c["last"] == true)).await;
    assert!(replica.rows == table(&pg).await, "PostgreSQL {major}: the replica is the table");
    await_done(&server, "majors").await;
}
