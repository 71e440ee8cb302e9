//! The websocket clients people use, at their default settings (message size raised, as
//! docs/api.md says), receive a 1,000,000-row transaction whole: Python `websockets`
//! refuses messages of more than 4,096 frames and Node `ws` of more than 16,384, so the
//! server must cut messages by bytes, not by change. `make clients` installs both into
//! `.tools/` (`make test` does it first).

use testkit::pg as common;
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const ROWS: i64 = 1_000_000;

fn tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// Runs a client script to its end; returns what it printed, parsed.
async fn run_client(what: &str, mut command: tokio::process::Command) -> Value {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = command.spawn().unwrap_or_else(|e| panic!("{what}: cannot start ({e}); run `make clients`"));
    let out = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: no transaction within 600 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{what} failed ({}): {stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{what}: bad summary ({e}): {stdout}"))
}

fn python(url: &str) -> tokio::process::Command {
    let venv_python = tools().join("venv/bin/python");
    assert!(venv_python.exists(), "{} is missing: run `make clients`", venv_python.display());
    let mut c = tokio::process::Command::new(venv_python);
    c.arg(script("receive_one.py")).arg(url);
    c
}

fn node(url: &str) -> tokio::process::Command {
    let modules = tools().join("node/node_modules");
    assert!(modules.join("ws").exists(), "{} is missing: run `make clients`", modules.display());
    let mut c = tokio::process::Command::new("node");
    c.env("NODE_PATH", modules).arg(script("receive_one.js")).arg(url);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_and_node_ws_receive_a_million_row_transaction() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE big (id bigint PRIMARY KEY)").await.unwrap();
    let server = TestServer::start(&db).await;
    // One slot per client, both of ours: the default session's, and one made as an
    // earlier process would have.
    let python_slot = server.init().await;
    let node_slot = "delta_nodeclient1";
    pg.execute("SELECT pg_create_logical_replication_slot($1, 'wal2json')", &[&node_slot]).await.unwrap();
    pg.execute("INSERT INTO big SELECT g FROM generate_series(1, $1::bigint) g", &[&ROWS]).await.unwrap();

    let (from_python, from_node) = tokio::join!(
        run_client("python websockets", python(&server.stream_url(&python_slot))),
        run_client("node ws", node(&server.stream_url(node_slot))),
    );
    for (what, summary, slot) in [("python", &from_python, python_slot.as_str()), ("node", &from_node, node_slot)] {
        assert_eq!(summary["changes"], ROWS, "{what}: {summary}");
        assert_eq!(summary["first"], json!([1]), "{what}");
        assert_eq!(summary["last"], json!([ROWS]), "{what}");
        // The ack went through: the transaction will not come back.
        await_confirmed(&pg, slot, summary["nextlsn"].as_str().unwrap()).await;
    }

    // How each client left is on record.
    let (status, sessions) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    for slot in [python_slot.as_str(), node_slot] {
        let entry = sessions.as_array().unwrap().iter().find(|s| s["slotName"] == slot).unwrap();
        let close = &entry["lastClose"];
        assert_eq!(close["by"], "client", "{slot}: {entry}");
        assert_eq!(close["code"], 1000, "{slot}: {entry}");
        assert!(close["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{entry}");
    }
    let node_entry = sessions.as_array().unwrap().iter().find(|s| s["slotName"] == node_slot).unwrap();
    assert_eq!(node_entry["lastClose"]["reason"], "done");
    server.stop().await;
}
