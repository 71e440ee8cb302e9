//! TLS to Postgres (PGSSLMODE, PGSSLROOTCERT) on a cluster of its own that takes TLS
//! only: `ssl = on` with a server certificate for `localhost` (not for 127.0.0.1) from a
//! CA the test makes with the `openssl` CLI, `hostssl` lines and `hostnossl ... reject`.
//! Each mode is checked on both kinds of connection: the replication client (init, the
//! stream) and the pool (snapshot pages). `openssl` comes with Debian's Postgres packages
//! (postgresql-common depends on ssl-cert, which depends on openssl).

/// A cluster of its own, configured for TLS only (`configure_cluster`).
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("pg_tls")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
    pub fn configure_cluster(setup: ClusterSetup) {
        configure_own_cluster("pg_tls", setup)
    }
}
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pgdeltastream::pg::PgConfig;
use pgdeltastream::pg::tls::{PgTls, SslMode, TlsSettings};
use serde_json::{Value, json};
use support::*;

/// The certificates of the test: `ca.crt` signed `server.crt` (SAN `DNS:localhost`
/// only) and `renamed.crt` (`DNS:otherhost`); `other-ca.crt` signed nothing of the
/// server's.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

/// Runs `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl").current_dir(dir).args(args.split(' ')).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

fn make_ca(dir: &Path, name: &str) {
    let usage = "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign";
    openssl(
        dir,
        &format!("req -x509 -new {EC_KEY} -keyout {name}.key -out {name}.crt -days 2 -subj /CN=test-{name} {usage}"),
    );
}

/// A server certificate `name.crt` (and key) for `dns`, signed by `ca.crt`.
fn make_server_cert(dir: &Path, name: &str, dns: &str) {
    openssl(dir, &format!("req -new {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={dns}"));
    let ext = format!(
        "subjectAltName=DNS:{dns}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 2 -extfile {name}.ext"
        ),
    );
}

fn make_certs() -> Certs {
    let dir = std::env::temp_dir().join(format!("pgdeltastream-test-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir, "ca");
    make_ca(&dir, "other-ca");
    make_server_cert(&dir, "server", "localhost");
    make_server_cert(&dir, "renamed", "otherhost");
    // SAFETY: registering a plain extern "C" fn.
    unsafe { libc::atexit(remove_certs) };
    Certs { dir }
}

extern "C" fn remove_certs() {
    let dir = std::env::temp_dir().join(format!("pgdeltastream-test-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(dir);
}

/// The certificates, and the cluster configured to use them (before it starts).
fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let certs = make_certs();
        let read = |name: &str| std::fs::read(certs.dir.join(name)).unwrap();
        common::configure_cluster(common::ClusterSetup {
            settings: vec!["ssl=on".into(), "ssl_cert_file=server.crt".into(), "ssl_key_file=server.key".into()],
            hba: vec![
                "hostssl all all 127.0.0.1/32 trust".into(),
                "hostssl replication all 127.0.0.1/32 trust".into(),
                "hostnossl all all 0.0.0.0/0 reject".into(),
                "hostnossl replication all 0.0.0.0/0 reject".into(),
            ],
            files: ["server.crt", "server.key", "renamed.crt", "renamed.key"]
                .into_iter()
                .map(|name| (name.to_owned(), read(name)))
                .collect(),
        });
        certs
    })
}

/// A fresh database with a table of two rows; the harness itself reaches it through
/// the Unix socket.
async fn setup() -> (common::TestDb, tokio_postgres::Client) {
    certs();
    let db = common::fresh_db().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text); INSERT INTO t VALUES (1, 'a'), (2, 'b');")
        .await
        .unwrap();
    (db, client)
}

/// Our connection settings for `db` over TCP to `host`, in `mode` with `root`.
fn tls_config(db: &common::TestDb, host: &str, mode: SslMode, root: Option<&str>) -> PgConfig {
    let tls = PgTls::new(&TlsSettings { mode, root_cert: root.map(str::to_owned), ..TlsSettings::default() })
        .unwrap_or_else(|e| panic!("TLS settings {mode}: {e}"));
    PgConfig { host: host.into(), tls, ..pg_config(db) }
}

async fn server_for(db: &common::TestDb, pg: PgConfig) -> TestServer {
    TestServer::start_with(pgdeltastream::server::Settings { pg, ..fast_settings(db) }).await
}

/// The `{"error": ...}` message of a failed request, asserting the status.
#[track_caller]
fn error_message(what: &str, status: u16, body: &Value, expected: u16) -> String {
    assert_eq!(status, expected, "{what}: {body}");
    body["error"].as_str().unwrap_or_else(|| panic!("{what}: no error message: {body}")).to_owned()
}

/// Whether `pg_stat_ssl` shows TLS for every connection of `db` of the given backend
/// type (there must be at least one).
async fn all_ssl(admin: &tokio_postgres::Client, db: &common::TestDb, backend_type: &str) -> bool {
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND a.backend_type = $2 AND a.application_name = 'pgdeltastream-test'",
            &[&db.dbname, &backend_type],
        )
        .await
        .unwrap();
    assert!(!rows.is_empty(), "no {backend_type} of ours on {}", db.dbname);
    rows.iter().all(|r| r.get::<_, bool>(0))
}

/// Init, a snapshot page, a change and then a burst of changes streamed, all over TLS.
async fn full_round(mode: SslMode, host: &str, root: Option<&str>) {
    let (db, pg) = setup().await;
    let server = server_for(&db, tls_config(&db, host, mode, root)).await;
    let slot = server.init().await;
    let (status, rows) = server.snapshot(json!({"table": "t", "offset": 0, "limit": 5})).await;
    assert_eq!(status, 200, "{mode}: snapshot {rows}");
    assert_eq!(rows, json!([{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]), "{mode}");

    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO t VALUES (3, 'c')", &[]).await.unwrap();
    let change = next_changes(&mut ws).await;
    assert_eq!(change["change"][0]["columnvalues"], json!([3, "c"]), "{mode}");
    assert!(all_ssl(&pg, &db, "walsender").await, "{mode}: the walsender is not on TLS");
    assert!(all_ssl(&pg, &db, "client backend").await, "{mode}: a pool connection is not on TLS");

    // Many small transactions at once: the stream reads in bursts, through rustls.
    const BURST: i64 = 2000;
    pg.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 4..{} LOOP INSERT INTO t VALUES (i, 'x'); COMMIT; END LOOP; END $$",
        BURST + 3
    ))
    .await
    .unwrap();
    let mut next = 4;
    while next <= BURST + 3 {
        let frame = next_changes(&mut ws).await;
        for id in row_numbers(&frame) {
            assert_eq!(id, next, "{mode}: changes out of order");
            next += 1;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn prefer_streams_over_tls() {
    full_round(SslMode::Prefer, "127.0.0.1", None).await;
}

#[tokio::test]
async fn require_streams_over_tls() {
    full_round(SslMode::Require, "127.0.0.1", None).await;
}

/// verify-ca checks the chain only: 127.0.0.1 is not in the certificate, yet it is fine.
#[tokio::test]
async fn verify_ca_with_the_right_ca_streams() {
    full_round(SslMode::VerifyCa, "127.0.0.1", Some(&certs().path("ca.crt"))).await;
}

/// Serializes the tests that need the server certificate for `localhost`: one of them
/// swaps it for a while.
static CERT_NAME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn verify_full_with_the_name_in_the_certificate_streams() {
    let _name = CERT_NAME.lock().await;
    full_round(SslMode::VerifyFull, "localhost", Some(&certs().path("ca.crt"))).await;
}

/// A root file makes require check the chain, as in libpq.
#[tokio::test]
async fn require_with_a_root_file_checks_the_chain() {
    let (db, _pg) = setup().await;
    let server =
        server_for(&db, tls_config(&db, "127.0.0.1", SslMode::Require, Some(&certs().path("other-ca.crt")))).await;
    let (status, body) = server.get("/v1/init").await;
    let message = error_message("init", status, &body, 500);
    assert!(message.contains("PGSSLMODE=require") && message.contains("UnknownIssuer"), "{message}");
    server.stop().await;
}

#[tokio::test]
async fn verify_ca_with_another_ca_is_refused_on_both_connections() {
    let (db, _pg) = setup().await;
    let config = tls_config(&db, "127.0.0.1", SslMode::VerifyCa, Some(&certs().path("other-ca.crt")));
    let server = server_for(&db, config.clone()).await;
    let (status, body) = server.get("/v1/init").await;
    let message = error_message("init", status, &body, 500);
    eprintln!("verify-ca, another CA: {message}");
    assert!(message.contains("PGSSLMODE=verify-ca") && message.contains("UnknownIssuer"), "{message}");
    server.stop().await;

    // The pool and the snapshot holders connect through tokio-postgres.
    let err = pgdeltastream::pg::pool::connect(&config).await.expect_err("the pool connection is refused");
    let api = pgdeltastream::error::Error::from(err);
    assert_eq!(api.kind, pgdeltastream::error::ErrorKind::Internal, "{api}");
    assert!(api.to_string().contains("PGSSLMODE=verify-ca"), "{api}");
}

#[tokio::test]
async fn verify_full_with_a_name_not_in_the_certificate_is_refused() {
    let (db, _pg) = setup().await;
    let server =
        server_for(&db, tls_config(&db, "127.0.0.1", SslMode::VerifyFull, Some(&certs().path("ca.crt")))).await;
    let (status, body) = server.get("/v1/init").await;
    let message = error_message("init", status, &body, 500);
    eprintln!("verify-full, 127.0.0.1: {message}");
    assert!(message.contains("PGSSLMODE=verify-full") && message.contains("not valid for name"), "{message}");
    server.stop().await;
}

/// The server takes TLS only: a plain connection is refused, and the message says what
/// to set.
#[tokio::test]
async fn disable_is_refused_with_advice() {
    let (db, _pg) = setup().await;
    let server = server_for(&db, tls_config(&db, "127.0.0.1", SslMode::Disable, None)).await;
    let (status, body) = server.get("/v1/init").await;
    let message = error_message("init", status, &body, 500);
    eprintln!("disable: {message}");
    assert!(message.contains("no encryption") && message.contains("PGSSLMODE"), "{message}");
    server.stop().await;
}

/// Reloads the server with certificate `name` and waits until a new connection of
/// `config` gets through (`expect_ok`) or is refused for the name.
async fn swap_certificate(pg: &tokio_postgres::Client, name: &str, config: &PgConfig, expect_ok: bool) {
    for (setting, ext) in [("ssl_cert_file", "crt"), ("ssl_key_file", "key")] {
        pg.batch_execute(&format!("ALTER SYSTEM SET {setting} = '{name}.{ext}'")).await.unwrap();
    }
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let refused = match pgdeltastream::pg::pool::connect(config).await {
            Ok(_) => false,
            Err(e) => {
                let message = pgdeltastream::error::Error::from(e).to_string();
                assert!(message.contains("not valid for name"), "{message}");
                true
            }
        };
        if refused != expect_ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the server did not take certificate {name} within 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The replication client's own handshake, not the pool's: the pool keeps the connection
/// it made before the server changed its certificate, so the next init gets past its
/// queries to the replication connection, whose handshake meets the new certificate.
#[tokio::test]
async fn replication_client_refuses_a_certificate_for_another_name() {
    let _name = CERT_NAME.lock().await;
    let (db, pg) = setup().await;
    let config = tls_config(&db, "localhost", SslMode::VerifyFull, Some(&certs().path("ca.crt")));
    let server = server_for(&db, config.clone()).await;
    server.init().await;

    swap_certificate(&pg, "renamed", &config, false).await;
    let (status, body) = server.get("/v1/init").await;
    let message = error_message("init", status, &body, 500);
    eprintln!("verify-full, replication connection, certificate for otherhost: {message}");
    assert!(message.contains("PGSSLMODE=verify-full") && message.contains("not valid for name"), "{message}");
    swap_certificate(&pg, "server", &config, true).await;

    server.init().await;
    server.stop().await;
}

/// A client that hangs up while its page is computed: the pool cancels the query, and
/// the cancel request negotiates TLS as the connection did (plain is rejected here).
#[tokio::test]
async fn a_client_that_leaves_cancels_its_query_over_tls() {
    use tokio::io::AsyncWriteExt;
    let (db, pg) = setup().await;
    pg.batch_execute("CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(60)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.pg = tls_config(&db, "127.0.0.1", SslMode::Require, None);
    settings.pool.size = 1;
    let server = TestServer::start_with(settings).await;
    server.init().await;
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND state = 'active' \
         AND query LIKE '%sleepy%' AND pid <> pg_backend_pid()",
        db.dbname
    );
    let body = json!({"table": "sleepy"}).to_string();
    let mut client = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request =
        format!("POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    client.write_all(request.as_bytes()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while count(&pg, &running).await != 1 {
        assert!(std::time::Instant::now() < deadline, "the page's query never started");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(client);
    while count(&pg, &running).await != 0 {
        assert!(std::time::Instant::now() < deadline, "the query still runs after its client left");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // With a pool of one, the next page proves the permit came back.
    assert_eq!(server.snapshot(json!({"table": "t", "limit": 1})).await.0, 200);
    server.stop().await;
}

async fn count(pg: &tokio_postgres::Client, sql: &str) -> i64 {
    pg.query_one(sql, &[]).await.unwrap().get(0)
}
