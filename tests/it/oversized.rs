//! A value whose text form passes Postgres's 1 GB limit: the walsender fails on its
//! transaction at every start of the stream. The client gets an error record for it,
//! acks it like a transaction, and the stream goes on after it; until the client acks
//! it, it comes again. Against a real Postgres, for each plugin.
//!
//! Each test inserts a 540 MB bytea (TOAST compresses it to a few MB of WAL); decoding
//! it makes `byteaout` ask for 1.08 GB. The tests run one at a time, to bound memory.

use testkit::pg as common;
use testkit::support;

use serde_json::{Value, json};
use support::*;
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const BIG_INSERT: &str = "INSERT INTO big VALUES (1, convert_to(repeat('a', 540000000), 'SQL_ASCII'))";

async fn open(server: &TestServer, query: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/s/stream{query}", server.addr);
    tokio_tungstenite::connect_async(url).await.expect("websocket upgrade").0
}

fn lsn(v: &Value) -> String {
    v["nextlsn"].as_str().unwrap_or_else(|| panic!("no nextlsn: {v}")).to_owned()
}

fn row_ids(changes: &Value) -> Vec<i64> {
    changes.as_array().unwrap().iter().map(|c| c["columnvalues"][0].as_i64().unwrap()).collect()
}

/// The next format 2 records up to and including a commit.
async fn next_transaction(ws: &mut Ws) -> Vec<Value> {
    let mut records = Vec::new();
    loop {
        let r = next_json(ws).await;
        let done = r["action"] == "C";
        records.push(r);
        if done {
            return records;
        }
    }
}

async fn skips_the_transaction(plugin: &str) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let started = std::time::Instant::now();
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE big (id int PRIMARY KEY, b bytea);",
    )
    .await
    .unwrap();
    let mut settings = fast_settings(&db);
    // Small frames: the first changes of the failing transaction go out before it fails.
    settings.session.frame_bytes = 64;
    // The client reads nothing while it inserts the value (seconds on a busy machine).
    settings.session.socket.dead_after = std::time::Duration::from_secs(120);
    let server = TestServer::start_with(settings).await;
    let (status, created) =
        server.post("/v2/sessions", &json!({"name": "s", "plugin": plugin, "tables": ["t", "big"]}).to_string()).await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();

    let mut ws = open(&server, "").await;
    pg.batch_execute("INSERT INTO t VALUES (1, 'before')").await.unwrap();
    let before = next_changes(&mut ws).await;
    assert_eq!(row_ids(&before["change"]), [1]);
    ack(&mut ws, &lsn(&before)).await;
    await_confirmed(&pg, &slot, &lsn(&before)).await;

    let insert = std::time::Instant::now();
    pg.batch_execute(&format!(
        "BEGIN; INSERT INTO t VALUES (2, repeat('x', 200)); {BIG_INSERT}; INSERT INTO t VALUES (3, 'same'); COMMIT;"
    ))
    .await
    .unwrap();
    eprintln!("{plugin}: the 540 MB insert took {:?}", insert.elapsed());
    pg.batch_execute("INSERT INTO t VALUES (4, 'after')").await.unwrap();

    // The failing transaction's record, then the stream goes on.
    let record = next_json(&mut ws).await;
    let error = record["error"].as_str().unwrap_or_else(|| panic!("an error record: {record}"));
    assert!(error.contains("invalid memory alloc request size"), "{record}");
    let skipped = lsn(&record);
    match plugin {
        // wal2json sends each change as it is decoded: the first went out, and the
        // record says the transaction is not whole.
        "wal2json" => {
            assert_eq!(row_ids(&record["change"]), [2], "{record}");
            assert!(record.get("xid").is_none(), "{record}");
        }
        // pgoutput's transaction was held until its commit: nothing of it went out.
        _ => {
            assert_eq!(record["change"], json!([]), "{record}");
            assert!(record["xid"].as_u64().is_some(), "{record}");
        }
    }
    let after = next_changes(&mut ws).await;
    assert_eq!(row_ids(&after["change"]), [4]);
    assert!(skipped.parse::<pgdeltastream::types::Lsn>().unwrap() < lsn(&after).parse().unwrap(), "{skipped} {after}");
    eprintln!(
        "{plugin}: error record ({skipped}) and the next transaction ({}) after {:?}",
        lsn(&after),
        insert.elapsed()
    );

    // Not acked: the slot stays before the record, and the next stream sends it again
    // (here in format 2).
    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    // (It may have moved into the transaction's WAL, which is no loss: a stream
    // started there still decodes the transaction, which commits after it.)
    let confirmed: pgdeltastream::types::Lsn = confirmed_flush(&pg, &slot).await.unwrap().parse().unwrap();
    assert!(confirmed < skipped.parse().unwrap(), "the slot moved past the unacked record: {confirmed} {skipped}");
    let mut ws = open(&server, "?format=changes").await;
    let failed = next_transaction(&mut ws).await;
    let commit = failed.last().unwrap();
    assert_eq!(commit["nextlsn"], skipped.as_str(), "{failed:?}");
    assert!(commit["error"].as_str().is_some_and(|e| e.contains("invalid memory alloc request size")), "{commit}");
    assert_eq!(failed[0]["action"], "B", "{failed:?}");
    let inserted: Vec<&Value> = failed.iter().filter(|r| r["action"] == "I").collect();
    match plugin {
        "wal2json" => assert_eq!(inserted.len(), 1, "the change sent before Postgres failed: {failed:?}"),
        _ => {
            assert!(inserted.is_empty(), "{failed:?}");
            assert_eq!(failed[0]["xid"], commit["xid"], "{failed:?}");
        }
    }
    let next = next_transaction(&mut ws).await;
    assert_eq!(next[1]["columns"][0]["value"], 4, "{next:?}");
    let last = lsn(next.last().unwrap());
    ack(&mut ws, &last).await;
    await_confirmed(&pg, &slot, &last).await;

    let metrics = exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    let counted = format!("pgdeltastream_skipped_transactions_total{{session=\"s\",slot=\"{slot}\"}} 2");
    assert!(metrics.contains(&counted), "{counted} in {metrics}");
    drop(ws);
    server.stop().await;
    eprintln!("{plugin}: the whole test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal2json_skips_a_transaction_it_cannot_decode() {
    skips_the_transaction("wal2json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_skips_a_transaction_it_cannot_decode() {
    skips_the_transaction("pgoutput").await;
}
