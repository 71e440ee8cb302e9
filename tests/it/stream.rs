//! The v1 stream against a real Postgres: the seed README's flow, the original's
//! tests, acks and resume, and the stream defects of the original (see
//! shared/reference/original.md) that must never come back.

/// A cluster of its own: a test here shortens wal_sender_timeout for the whole cluster.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("stream")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

async fn setup() -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE test_table (id serial PRIMARY KEY, name text); INSERT INTO test_table (name) VALUES ('abc'), ('abc1');")
        .await
        .unwrap();
    let server = TestServer::start(&db).await;
    (db, client, server)
}

/// The original's third test, and the seed README's example record: insert, update,
/// delete arrive as wal2json v1 frames, and acks move confirmed_flush_lsn.
#[tokio::test]
async fn streams_insert_update_delete_and_acks_move_the_slot() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;

    pg.execute("INSERT INTO test_table (name) VALUES ('newval1')", &[]).await.unwrap();
    let insert = next_changes(&mut ws).await;
    let lsn = insert["nextlsn"].as_str().expect("nextlsn").to_owned();
    let mut redacted = insert.clone();
    redacted["nextlsn"] = json!("[lsn]");
    assert_eq!(
        redacted,
        json!({"nextlsn": "[lsn]", "change": [{
            "kind": "insert", "schema": "public", "table": "test_table",
            "columnnames": ["id", "name"], "columntypes": ["integer", "text"], "columnvalues": [3, "newval1"]
        }]})
    );
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;

    pg.execute("UPDATE test_table SET name = 'changed' WHERE id = 3", &[]).await.unwrap();
    let update = next_changes(&mut ws).await;
    assert_eq!(update["change"][0]["kind"], "update");
    assert_eq!(update["change"][0]["columnvalues"], json!([3, "changed"]));
    assert_eq!(update["change"][0]["oldkeys"], json!({"keynames": ["id"], "keytypes": ["integer"], "keyvalues": [3]}));

    pg.execute("DELETE FROM test_table WHERE id = 3", &[]).await.unwrap();
    let delete = next_changes(&mut ws).await;
    assert_eq!(
        delete["change"][0],
        json!({"kind": "delete", "schema": "public", "table": "test_table",
               "oldkeys": {"keynames": ["id"], "keytypes": ["integer"], "keyvalues": [3]}})
    );
    let last = delete["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &last).await;
    await_confirmed(&pg, &slot, &last).await;
    server.stop().await;
}

/// The original's first test: init creates a wal2json logical slot named delta_<word><n>.
#[tokio::test]
async fn init_creates_a_wal2json_slot() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    assert!(slot.starts_with("delta_"), "{slot}");
    let rest = &slot["delta_".len()..];
    let digits = rest.trim_start_matches(|c: char| c.is_ascii_lowercase());
    assert!(!digits.is_empty() && digits.len() < rest.len() && digits.chars().all(|c| c.is_ascii_digit()), "{slot}");
    let row = pg
        .query_one(
            "SELECT plugin::text, slot_type, database::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "wal2json");
    assert_eq!(row.get::<_, String>(1), "logical");
    server.stop().await;
}

/// Un-acked transactions come again on reconnect; acked ones never do.
#[tokio::test]
async fn reconnect_resumes_after_the_last_ack() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('one')", &[]).await.unwrap();
    pg.execute("INSERT INTO test_table (name) VALUES ('two')", &[]).await.unwrap();
    let one = next_changes(&mut ws).await;
    let two = next_changes(&mut ws).await;
    assert_eq!(one["change"][0]["columnvalues"][1], "one");
    assert_eq!(two["change"][0]["columnvalues"][1], "two");
    ack(&mut ws, one["nextlsn"].as_str().unwrap()).await;
    await_confirmed(&pg, &slot, one["nextlsn"].as_str().unwrap()).await;
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;

    let mut ws = server.connect(&slot).await;
    let again = next_changes(&mut ws).await;
    assert_eq!(again, two, "the un-acked transaction comes again, the acked one does not");
    server.stop().await;
}

/// Issue 21: a client that closes its stream and reconnects at once is served, every
/// time, while its previous stream is still letting go of the slot; and it resumes
/// right after its ack, with no change lost or sent twice. For v1 and v2 alike.
#[tokio::test]
async fn a_quick_reconnect_is_served_and_resumes_after_the_ack() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    quick_reconnects(&pg, &server.stream_url(&slot), "v1").await;
    let (status, def) = server.post("/v2/sessions", r#"{"name":"again","tables":["test_table"]}"#).await;
    assert_eq!(status, 201, "{def}");
    quick_reconnects(&pg, &format!("ws://{}/v2/sessions/again/stream", server.addr), "v2").await;
    server.stop().await;
}

/// 20 rounds of: a change, received and acked, a polite close, and a reconnect at once.
async fn quick_reconnects(pg: &tokio_postgres::Client, url: &str, what: &str) {
    let connect = |round: usize| async move {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => ws,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned();
                panic!("{what}: reconnect {round} refused with {}: {body}", r.status())
            }
            Err(e) => panic!("{what}: reconnect {round}: {e}"),
        }
    };
    let mut ws = connect(0).await;
    let mut slowest = Duration::ZERO;
    for round in 1..=20 {
        let name = format!("{what} round {round}");
        pg.execute("INSERT INTO test_table (name) VALUES ($1)", &[&name]).await.unwrap();
        // A change lost would leave this one out; one sent twice would come first.
        let tx = next_changes(&mut ws).await;
        assert_eq!(tx["change"].as_array().map(Vec::len), Some(1), "{tx}");
        assert_eq!(tx["change"][0]["columnvalues"][1], name, "{tx}");
        ack(&mut ws, tx["nextlsn"].as_str().unwrap()).await;
        ws.close(None).await.unwrap();
        // The server's close frame, then the end of the connection.
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
        });
        drained.await.expect("the server closes within 20 s");
        let started = std::time::Instant::now();
        ws = connect(round).await;
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("{what}: the slowest of 20 quick reconnects took {slowest:?}");
    ws.close(None).await.unwrap();
}

/// Sends `signal` (`STOP`, `CONT`) to a process of the local cluster.
fn signal(pid: i32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
}

/// Lets a stopped process run again however the test ends: a walsender left stopped
/// would hold its slot, and its cluster's shutdown, forever.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

async fn active_pid(pg: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    pg.query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await.unwrap().get(0)
}

/// A stream that has ended in the server while its walsender still holds the slot (it
/// cannot run, so the stream's goodbye times out and the connection is dropped): a
/// reconnect waits for that walsender, this session's own, to let go, and is served.
#[tokio::test]
async fn a_reconnect_waits_for_its_previous_walsender_to_let_go() {
    if common::cluster().is_docker() {
        eprintln!("SKIPPED under TEST_PG=docker: the test stops a walsender with a signal");
        return;
    }
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('acked')", &[]).await.unwrap();
    let tx = next_changes(&mut ws).await;
    let lsn = tx["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;
    let walsender = active_pid(&pg, &slot).await.expect("the slot is streamed");

    signal(walsender, "STOP");
    let resume = Resume(walsender);
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_secs(20), futures_util::StreamExt::next(&mut ws)).await
    {}
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = server.get("/metrics").await;
        if metrics.as_str().is_some_and(|m| m.contains("pgdeltastream_postgres_connections{kind=\"stream\"} 0")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stream never ended: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(active_pid(&pg, &slot).await, Some(walsender), "the stopped walsender still holds the slot");

    let url = server.stream_url(&slot);
    let reconnect = tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.map(|(ws, _)| ws) });
    // Long enough for the reconnect to find the slot held; were it refused, it would
    // be refused now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(active_pid(&pg, &slot).await, Some(walsender));
    let started = std::time::Instant::now();
    drop(resume);
    let mut ws = match reconnect.await.unwrap() {
        Ok(ws) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            panic!("refused with {}: {}", r.status(), String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()))
        }
        Err(e) => panic!("reconnect: {e}"),
    };
    eprintln!("served {:?} after the old walsender could run again", started.elapsed());
    pg.execute("INSERT INTO test_table (name) VALUES ('after')", &[]).await.unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "after", "the acked change does not come again: {tx}");
    ws.close(None).await.unwrap();
    server.stop().await;
}

/// A slot that another process streams (another pgdeltastream, pg_recvlogical) is
/// refused at once, also to a session this process streamed before: only its own
/// previous walsender is waited for.
#[tokio::test]
async fn a_slot_held_by_another_process_is_refused_at_once() {
    let (db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;

    let other = TestServer::start(&db).await;
    let mut theirs = other.connect(&slot).await;
    let pid = active_pid(&pg, &slot).await.expect("the other process streams the slot");
    let started = std::time::Instant::now();
    let (status, body) = server.connect_refused(&format!("?slotName={slot}")).await;
    eprintln!("refused in {:?} while another pgdeltastream streams the slot", started.elapsed());
    assert_eq!(status, 409, "{body}");
    // Not the refusal that follows a wait for a walsender of ours.
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&format!("in use by another process (pid {pid})")), "{body}");
    theirs.close(None).await.unwrap();
    drop(theirs);
    other.stop().await;
    await_slot(&pg, &slot, "inactive", "NOT active").await;

    let recvlogical = common::cluster().bin("pg_recvlogical");
    if !recvlogical.is_file() {
        eprintln!("no pg_recvlogical here: the rest is skipped");
        server.stop().await;
        return;
    }
    let mut child = tokio::process::Command::new(recvlogical)
        .args(["-d", &db.conn_string(), "-S", &slot, "--start", "-f", "/dev/null", "--no-loop"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    await_slot(&pg, &slot, "streamed by pg_recvlogical", "active").await;
    let pid = active_pid(&pg, &slot).await.expect("pg_recvlogical streams the slot");
    let started = std::time::Instant::now();
    let (status, body) = server.connect_refused(&format!("?slotName={slot}")).await;
    eprintln!("refused in {:?} while pg_recvlogical streams the slot", started.elapsed());
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&format!("in use by another process (pid {pid})")), "{body}");
    child.kill().await.unwrap();
    server.stop().await;
}

/// After our server restarts, the slot it created earlier streams from the last ack.
#[tokio::test]
async fn resumes_after_a_server_restart() {
    let (db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('before')", &[]).await.unwrap();
    let before = next_changes(&mut ws).await;
    ack(&mut ws, before["nextlsn"].as_str().unwrap()).await;
    await_confirmed(&pg, &slot, before["nextlsn"].as_str().unwrap()).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('unacked')", &[]).await.unwrap();
    let _ = next_changes(&mut ws).await;

    server.stop().await;
    // The client is told why, with a close frame.
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1001, "{reason}");
    pg.execute("INSERT INTO test_table (name) VALUES ('while down')", &[]).await.unwrap();

    let server = TestServer::start(&db).await;
    let mut ws = server.connect(&slot).await;
    let first = next_changes(&mut ws).await;
    assert_eq!(first["change"][0]["columnvalues"][1], "unacked");
    let second = next_changes(&mut ws).await;
    assert_eq!(second["change"][0]["columnvalues"][1], "while down");
    server.stop().await;
}

/// Defect 1: a wal2json WARNING (UPDATE on a table without replica identity) is a
/// NoticeResponse inside the copy stream; it must not break anything.
#[tokio::test]
async fn a_wal2json_warning_does_not_break_the_stream() {
    let (_db, pg, server) = setup().await;
    pg.batch_execute("CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x')").await.unwrap();
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("UPDATE nokey SET b = 'y'", &[]).await.unwrap();
    pg.execute("INSERT INTO test_table (name) VALUES ('after warning')", &[]).await.unwrap();
    let frame = next_changes(&mut ws).await;
    assert_eq!(frame["change"][0]["table"], "test_table");
    assert_eq!(frame["change"][0]["columnvalues"][1], "after warning");
    server.stop().await;
}

/// Defect 12: a non-transactional logical message arrives as valid JSON.
#[tokio::test]
async fn non_transactional_messages_are_valid_json() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("SELECT pg_logical_emit_message(false, 'prefix', 'content')", &[]).await.unwrap();
    let frame = next_json(&mut ws).await;
    assert_eq!(
        frame,
        json!({"change": [{"kind": "message", "transactional": false, "prefix": "prefix", "content": "content"}]})
    );
    server.stop().await;
}

/// `pg_logical_emit_message` takes any bytes and any role may call it: a message whose
/// content is not UTF-8 is delivered with its exact bytes in `content_base64` (and
/// `content` decoded lossily), in both formats, and the stream goes on. It used to
/// close every stream of the database with 1011, on every reconnect.
#[tokio::test]
async fn binary_logical_messages_are_delivered_with_their_exact_bytes() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.batch_execute(
        "BEGIN; INSERT INTO test_table (name) VALUES ('with a message');
         SELECT pg_logical_emit_message(true, 'bin', '\\xff41fe0a22'::bytea); COMMIT;
         SELECT pg_logical_emit_message(false, 'bin', '\\xff'::bytea);",
    )
    .await
    .unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "with a message");
    assert_eq!(
        tx["change"][1],
        json!({"kind": "message", "transactional": true, "prefix": "bin",
               "content": "\u{FFFD}A\u{FFFD}\n\"", "content_base64": "/0H+CiI="})
    );
    let lone = next_json(&mut ws).await;
    assert_eq!(
        lone,
        json!({"change": [{"kind": "message", "transactional": false, "prefix": "bin",
                           "content": "\u{FFFD}", "content_base64": "/w=="}]})
    );
    let lsn = tx["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('after')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "after");
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;

    // Format 2: the same fields on the M record. The non-transactional message after
    // the last ack comes again, then the new one.
    let url = format!("{}&format=changes", server.stream_url(&slot));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    pg.execute("SELECT pg_logical_emit_message(false, 'bin', '\\xfe'::bytea)", &[]).await.unwrap();
    let mut records = Vec::new();
    while records.len() < 2 {
        let v = next_json(&mut ws).await;
        if v["action"] == "M" {
            records.push((v["content"].clone(), v["content_base64"].clone()));
        }
    }
    assert_eq!(records, [(json!("\u{FFFD}"), json!("/w==")), (json!("\u{FFFD}"), json!("/g=="))]);
    server.stop().await;
}

/// Defects 11 and 8: refusals are HTTP errors before the upgrade, never a silent
/// socket, and a second client cannot steal a stream.
#[tokio::test]
async fn stream_refusals_are_json_errors() {
    let (_db, pg, server) = setup().await;
    let (status, body) = server.connect_refused("").await;
    assert_eq!((status, body["error"].as_str().unwrap()), (400, "no slotName provided"));
    let (status, body) = server.connect_refused("?slotName=delta_nosuch1").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.connect_refused("?slotName=pg_catalog;drop").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server.connect_refused("?slotName=%22delta_x1%22").await;
    assert_eq!(status, 400, "{body}");
    pg.execute("SELECT pg_create_logical_replication_slot('delta_testdecoding1', 'test_decoding')", &[]).await.unwrap();
    let (status, body) = server.connect_refused("?slotName=delta_testdecoding1").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("test_decoding"), "{body}");

    let slot = server.init().await;
    let mut first = server.connect(&slot).await;
    let (status, body) = server.connect_refused(&format!("?slotName={slot}")).await;
    assert_eq!(status, 409, "{body}");
    // The first client is unaffected.
    pg.execute("INSERT INTO test_table (name) VALUES ('still mine')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut first).await["change"][0]["columnvalues"][1], "still mine");

    // A plain GET without upgrade headers.
    let (status, body) = server.get(&format!("/v1/lr/stream?slotName={slot}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().is_some());
    pg.execute("SELECT pg_drop_replication_slot('delta_testdecoding1')", &[]).await.unwrap();
    server.stop().await;
}

/// Defect 13: bad acks get an error frame and are not applied; the stream goes on.
#[tokio::test]
async fn bad_acks_get_error_frames_and_the_stream_goes_on() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('a')", &[]).await.unwrap();
    let a = next_changes(&mut ws).await;
    let lsn_a = a["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn_a).await;
    await_confirmed(&pg, &slot, &lsn_a).await;

    let bad = [
        "not json".to_owned(),
        r#"{"lsn":12}"#.to_owned(),
        r#"{"lsn":"zz/1"}"#.to_owned(),
        r#"{"lsn":"0/1"}"#.to_owned(),        // backwards
        r#"{"lsn":"FFFFFFFF/0"}"#.to_owned(), // beyond what was delivered
    ];
    for text in &bad {
        ws.send(Message::Text(text.clone().into())).await.unwrap();
        let reply = next_json(&mut ws).await;
        let err = reply["error"].as_str().unwrap_or_else(|| panic!("no error for {text}: {reply}"));
        assert!(err.contains("ack"), "{text}: {err}");
    }
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert!(next_json(&mut ws).await["error"].as_str().unwrap().contains("binary"));
    // The slot may move past the last ack on its own once the client is settled
    // (it follows the walsender then), but never to the bogus ack.
    let confirmed: bool = pg
        .query_one(
            "SELECT confirmed_flush_lsn < 'FFFFFFFF/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(confirmed, "no bad ack was applied");

    pg.execute("INSERT INTO test_table (name) VALUES ('b')", &[]).await.unwrap();
    let b = next_changes(&mut ws).await;
    assert_eq!(b["change"][0]["columnvalues"][1], "b");
    ack(&mut ws, b["nextlsn"].as_str().unwrap()).await;
    await_confirmed(&pg, &slot, b["nextlsn"].as_str().unwrap()).await;
    server.stop().await;
}

/// Defect 10: an idle client, or one that only sees empty transactions, must not
/// make the slot retain WAL without bound.
#[tokio::test]
async fn an_idle_slot_keeps_up_with_the_wal() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let _ws = server.connect(&slot).await;
    let start = confirmed_flush(&pg, &slot).await.unwrap();
    // DDL only: empty transactions for the client, WAL for the server.
    for i in 0..5 {
        pg.batch_execute(&format!("CREATE TABLE t{i} (a int); DROP TABLE t{i};")).await.unwrap();
    }
    let now: String = pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);
    await_slot(
        &pg,
        &slot,
        "caught up",
        &format!("confirmed_flush_lsn > '{start}'::pg_lsn AND confirmed_flush_lsn >= '{now}'::pg_lsn - 1024"),
    )
    .await;
    server.stop().await;
}

/// Defect 7: the snapshot stays readable while the stream runs.
#[tokio::test]
async fn snapshot_stays_readable_while_streaming() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('later')", &[]).await.unwrap();
    let _ = next_changes(&mut ws).await;
    let (status, rows) = server.snapshot(json!({"table": "test_table", "offset": 0, "limit": 10})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows, json!([{"id": 1, "name": "abc"}, {"id": 2, "name": "abc1"}]));
    server.stop().await;
}

/// Init resets the default session: its stream ends with a reason, its slot is
/// dropped, and no other slot is touched (defect 9).
#[tokio::test]
async fn init_resets_only_the_default_session() {
    let (_db, pg, server) = setup().await;
    pg.execute("SELECT pg_create_logical_replication_slot('delta_other7', 'wal2json')", &[]).await.unwrap();
    pg.execute("SELECT pg_create_logical_replication_slot('not_ours', 'wal2json')", &[]).await.unwrap();
    let first = server.init().await;
    let mut ws = server.connect(&first).await;
    let second = server.init().await;
    assert_ne!(first, second);
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1000);
    assert!(reason.contains("reset"), "{reason}");
    let slots: Vec<String> = database_slots(&pg).await;
    let mut expected = vec!["delta_other7".to_owned(), "not_ours".to_owned(), second.clone()];
    expected.sort();
    assert_eq!(slots, expected);
    // The new session works.
    let mut ws = server.connect(&second).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('new session')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "new session");
    drop(ws);
    await_slot(&pg, &second, "inactive", "NOT active").await;
    pg.batch_execute("SELECT pg_drop_replication_slot('delta_other7'); SELECT pg_drop_replication_slot('not_ours');")
        .await
        .unwrap();
    server.stop().await;
}

/// When Postgres ends the stream (here: the walsender is terminated), the client gets
/// an error frame and a close with a reason, and the server keeps serving.
#[tokio::test]
async fn postgres_ending_the_stream_is_reported_and_the_server_stays_up() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    await_slot(&pg, &slot, "active", "active").await;
    pg.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap();
    let frame = next_json(&mut ws).await;
    assert!(frame["error"].as_str().is_some(), "{frame}");
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1011);
    assert!(!reason.is_empty());

    // Reconnecting works, and so does everything else.
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('back')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "back");
    assert_eq!(server.get("/v1/init").await.0, 200);
    server.stop().await;
}

/// Status updates keep the walsender from timing the connection out while the
/// client is idle (wal_sender_timeout here is short).
#[tokio::test]
async fn a_quiet_stream_is_not_timed_out() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    pg.batch_execute("ALTER SYSTEM SET wal_sender_timeout = '2s'").await.unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let mut ws = server.connect(&slot).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('still here')", &[]).await.unwrap();
    let frame = next_changes(&mut ws).await;
    assert_eq!(frame["change"][0]["columnvalues"][1], "still here");
    pg.batch_execute("ALTER SYSTEM RESET wal_sender_timeout").await.unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    server.stop().await;
}

/// Frames are text, one per transaction, every one valid JSON.
#[tokio::test]
async fn one_frame_per_transaction() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.batch_execute("BEGIN; INSERT INTO test_table (name) VALUES ('x'), ('y'); UPDATE test_table SET name = 'z' WHERE name = 'x'; COMMIT;")
        .await
        .unwrap();
    let frame = next_changes(&mut ws).await;
    let kinds: Vec<&str> = frame["change"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["insert", "insert", "update"]);
    let _: Value = frame;
    server.stop().await;
}

/// A client that stops reading (so it never answers pings) and takes no data is
/// dropped after `dead_after`, and the slot is free again.
#[tokio::test]
async fn a_dead_client_is_dropped() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let mut settings = fast_settings(&db);
    settings.session.socket.ping_interval = Duration::from_millis(300);
    settings.session.socket.dead_after = Duration::from_secs(2);
    let server = TestServer::start_with(settings).await;
    let slot = server.init().await;
    let ws = server.connect(&slot).await;
    await_slot(&pg, &slot, "active", "active").await;
    // Hold the socket without ever reading it.
    await_slot(&pg, &slot, "released by the server", "NOT active").await;
    drop(ws);
    let mut ws = server.connect(&slot).await;
    pg.execute("SELECT 1", &[]).await.unwrap();
    let (status, _) = server.connect_refused(&format!("?slotName={slot}")).await;
    assert_eq!(status, 409, "the new client owns the slot");
    ws.close(None).await.unwrap();
    server.stop().await;
}

/// A large transaction is still one websocket message (sent in frames of at most 256
/// KiB, so that no one holds the whole transaction).
#[tokio::test]
async fn a_large_transaction_is_one_message() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) SELECT 'row ' || g FROM generate_series(1, 20000) g", &[]).await.unwrap();
    let frame = next_changes(&mut ws).await;
    let changes = frame["change"].as_array().unwrap();
    assert_eq!(changes.len(), 20000);
    assert_eq!(changes[19999]["columnvalues"][1], "row 20000");
    let lsn = frame["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;
    server.stop().await;
}

/// The opt-in per-change mode: wal2json format-version 2 records, one message each;
/// the commit's nextlsn is what the client acks.
#[tokio::test]
async fn per_change_mode_streams_v2_records() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let url = format!("{}&format=changes", server.stream_url(&slot));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    pg.batch_execute(
        "BEGIN; INSERT INTO test_table (name) VALUES ('p'); UPDATE test_table SET name = 'q' WHERE name = 'p'; COMMIT;",
    )
    .await
    .unwrap();
    let begin = next_json(&mut ws).await;
    assert_eq!(begin["action"], "B");
    let end = begin["nextlsn"].as_str().unwrap().to_owned();
    // (That B's nextlsn does not count as delivered before the C is a unit test of
    // stream::frame: here the records arrive in one burst.)
    let mut actions = Vec::new();
    let commit = loop {
        let v = next_json(&mut ws).await;
        actions.push(v["action"].as_str().unwrap().to_owned());
        if v["action"] == "C" {
            break v;
        }
    };
    assert_eq!(actions, ["I", "U", "C"]);
    assert_eq!(commit["nextlsn"], json!(end));
    ack(&mut ws, &end).await;
    await_confirmed(&pg, &slot, &end).await;

    let (status, body) = server.connect_refused(&format!("?slotName={slot}&format=v3")).await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}
