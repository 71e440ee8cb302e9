//! Every error the API answers is `{"error":"..."}` with the right status and a message
//! that names the cause: Postgres down, a missing database, a role that may not
//! replicate, unknown paths and wrong methods. After each, the server keeps serving.

use testkit::pg as common;
use testkit::support;

use serde_json::{Value, json};
use support::*;

/// Asserts the exact status and that the body is `{"error": "<non-empty message>"}`
/// whose message mentions every one of `needles` (case-insensitively). Returns the message.
#[track_caller]
fn assert_error(what: &str, status: u16, body: &Value, expected: u16, needles: &[&str]) -> String {
    assert_eq!(status, expected, "{what}: status (body {body})");
    let obj = body.as_object().unwrap_or_else(|| panic!("{what}: body is not a JSON object: {body}"));
    assert_eq!(obj.len(), 1, "{what}: body has other fields than \"error\": {body}");
    let message = obj
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what}: \"error\" is not a string: {body}"))
        .to_owned();
    assert!(!message.trim().is_empty(), "{what}: empty error message");
    let lower = message.to_lowercase();
    for needle in needles {
        assert!(lower.contains(&needle.to_lowercase()), "{what}: message does not mention {needle:?}: {message}");
    }
    message
}

/// A server that is configured correctly still creates a session.
async fn assert_healthy(db: &common::TestDb) {
    let server = TestServer::start(db).await;
    let slot = server.init().await;
    assert!(slot.starts_with("delta_"), "{slot}");
    server.stop().await;
}

/// A port of 127.0.0.1 nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn postgres_unreachable_is_503_and_no_session_is_409() {
    let db = common::fresh_db().await;
    let mut settings = fast_settings(&db);
    settings.pg.host = "127.0.0.1".into();
    settings.pg.port = closed_port();
    let server = TestServer::start_with(settings).await;

    let (status, body) = server.get("/v1/init").await;
    let message = assert_error("init", status, &body, 503, &["Postgres is unavailable"]);
    eprintln!("init with Postgres down: {message}");

    let (status, body) = server.connect_refused("?slotName=delta_x1").await;
    let message = assert_error("stream", status, &body, 503, &["Postgres is unavailable"]);
    eprintln!("stream with Postgres down: {message}");

    let (status, body) = server.snapshot(json!({"table": "t", "offset": 0, "limit": 1})).await;
    assert_error("snapshot before init", status, &body, 409, &["/v1/init"]);

    // The broken server still answers, the same way.
    let (status, body) = server.get("/v1/init").await;
    assert_error("init again", status, &body, 503, &["Postgres is unavailable"]);
    server.stop().await;

    assert_healthy(&db).await;
}

#[tokio::test]
async fn missing_database_is_500_naming_the_database() {
    let db = common::fresh_db().await;
    let mut settings = fast_settings(&db);
    settings.pg.dbname = "nosuchdb".into();
    let server = TestServer::start_with(settings).await;

    let (status, body) = server.get("/v1/init").await;
    let message = assert_error("init", status, &body, 500, &["database", "does not exist", "nosuchdb"]);
    eprintln!("init on a missing database: {message}");

    let (status, body) = server.get("/v1/init").await;
    assert_error("init again", status, &body, 500, &["nosuchdb"]);
    server.stop().await;

    assert_healthy(&db).await;
}

#[tokio::test]
async fn role_without_replication_is_500_explaining_the_privilege() {
    let db = common::fresh_db().await;
    // Roles are cluster-wide: a name of this database's own keeps reruns apart.
    let role = format!("norepl_{}", db.dbname);
    let admin = db.client().await;
    admin.batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN NOREPLICATION NOSUPERUSER")).await.unwrap();

    let mut settings = fast_settings(&db);
    settings.pg.user = role.clone();
    let server = TestServer::start_with(settings).await;

    let (status, body) = server.get("/v1/init").await;
    let message = assert_error("init", status, &body, 500, &["REPLICATION attribute", "superuser", "server said:"]);
    eprintln!("init as a role without REPLICATION: {message}");

    let (status, body) = server.get("/v1/init").await;
    assert_error("init again", status, &body, 500, &["REPLICATION"]);
    server.stop().await;

    assert_healthy(&db).await;
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405() {
    let db = common::fresh_db().await;
    let server = TestServer::start(&db).await;

    let (status, body) = server.get("/nope").await;
    assert_error("GET /nope", status, &body, 404, &["/nope"]);

    for (method, path) in [("POST", "/v1/init"), ("GET", "/v1/snapshot/data"), ("PUT", "/v1/lr/stream")] {
        let (status, body) = request(server.addr, method, path, None).await;
        assert_error(&format!("{method} {path}"), status, &body, 405, &[method, path]);
        // Still serving, on this same server.
        server.init().await;
    }
    let (status, body) = server.get("/nope").await;
    assert_error("GET /nope again", status, &body, 404, &["/nope"]);
    server.init().await;
    server.stop().await;
}

/// The shared cluster runs without TLS: require is refused and says why; prefer, the
/// default, falls back to plain on both kinds of connection.
#[tokio::test]
async fn tls_against_a_server_without_it() {
    use pgdeltastream::pg::tls::{PgTls, SslMode, TlsSettings};
    let db = common::fresh_db().await;
    let with_mode = |mode| {
        let mut settings = fast_settings(&db);
        settings.pg.tls = PgTls::new(&TlsSettings { mode, ..TlsSettings::default() }).unwrap();
        settings
    };

    let server = TestServer::start_with(with_mode(SslMode::Require)).await;
    let (status, body) = server.get("/v1/init").await;
    let message = assert_error("init, require", status, &body, 500, &["PGSSLMODE=require", "does not support TLS"]);
    eprintln!("require, server without TLS: {message}");
    server.stop().await;

    let server = TestServer::start_with(with_mode(SslMode::Prefer)).await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    db.client().await.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"], json!([1]));
    server.stop().await;
}
