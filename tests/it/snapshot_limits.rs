//! `/v1/snapshot/data` under change and load: tables rewritten, renamed or dropped
//! after init; a bounded pool under a flood; the statement timeout; cancelling the
//! query of a client that left; and pages streamed rather than held in memory.

use testkit::pg as common;
use testkit::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

async fn setup() -> (common::TestDb, tokio_postgres::Client) {
    let db = common::fresh_db().await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE test_table (id serial PRIMARY KEY, name text);
             INSERT INTO test_table (name) VALUES ('abc'), ('abc1'), ('abc2'), ('val1'), ('val2');",
        )
        .await
        .unwrap();
    (db, client)
}

/// Settings whose connections we can tell apart in pg_stat_activity.
fn settings_named(db: &common::TestDb, app: &str) -> pgdeltastream::server::Settings {
    let mut s = fast_settings(db);
    s.pg.application_name = app.into();
    s
}

#[track_caller]
fn assert_error(status: u16, body: &Value, want: u16, words: &[&str]) {
    assert_eq!(status, want, "{body}");
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"));
    for w in words {
        assert!(msg.contains(w), "{w:?} not in {msg:?}");
    }
}

/// Each table-rewriting command after init makes the snapshot's rows unreadable from
/// the table's new files: 409, never `200 []`. A table left alone still reads.
#[tokio::test]
async fn rewrites_after_init_are_refused_and_untouched_tables_still_read() {
    let (db, pg) = setup().await;
    let rewrites = [
        ("alter_type", "ALTER TABLE alter_type ALTER COLUMN v TYPE bigint"),
        ("add_volatile", "ALTER TABLE add_volatile ADD COLUMN r float8 DEFAULT random()"),
        ("truncated", "TRUNCATE truncated"),
        ("vacuumed", "VACUUM FULL vacuumed"),
        ("clustered", "CLUSTER clustered USING clustered_pkey"),
    ];
    for (t, _) in &rewrites {
        pg.batch_execute(&format!(
            "CREATE TABLE {t} (id int PRIMARY KEY, v int); INSERT INTO {t} SELECT g, g FROM generate_series(1, 3) g"
        ))
        .await
        .unwrap();
    }
    pg.batch_execute("CREATE MATERIALIZED VIEW mv AS SELECT g AS v FROM generate_series(1, 3) g").await.unwrap();
    let server = TestServer::start(&db).await;
    server.init().await;
    for (t, _) in &rewrites {
        let (status, rows) = server.snapshot(json!({"table": t})).await;
        assert_eq!((status, rows.as_array().map(Vec::len)), (200, Some(3)), "{t} before: {rows}");
    }
    for (t, sql) in &rewrites {
        pg.batch_execute(sql).await.unwrap();
        let (status, body) = server.snapshot(json!({"table": t})).await;
        assert_error(status, &body, 409, &["rewritten after the snapshot", t, "/v1/init"]);
    }
    assert_eq!(server.snapshot(json!({"table": "mv"})).await.0, 200);
    pg.batch_execute("REFRESH MATERIALIZED VIEW mv").await.unwrap();
    let (status, body) = server.snapshot(json!({"table": "mv"})).await;
    assert_error(status, &body, 409, &["rewritten after the snapshot", "mv"]);

    // Changes that keep the files are fine, and the untouched table reads as before.
    pg.batch_execute("ALTER TABLE test_table ADD COLUMN extra int; INSERT INTO test_table (name) VALUES ('new')")
        .await
        .unwrap();
    let (status, rows) = server.snapshot(json!({"table": "test_table", "limit": 10})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows.as_array().unwrap().len(), 5, "{rows}");
    assert_eq!(rows[0], json!({"id": 1, "name": "abc"}));

    // A new snapshot reads the rewritten tables again.
    server.init().await;
    let (status, rows) = server.snapshot(json!({"table": "alter_type"})).await;
    assert_eq!((status, rows.as_array().map(Vec::len)), (200, Some(3)), "{rows}");
    let (status, rows) = server.snapshot(json!({"table": "truncated"})).await;
    assert_eq!((status, rows), (200, json!([])));
    server.stop().await;
}

#[tokio::test]
async fn renamed_dropped_and_repartitioned_tables_are_named() {
    let (db, pg) = setup().await;
    pg.batch_execute(
        "CREATE TABLE renamed (id int PRIMARY KEY); INSERT INTO renamed VALUES (1);
         CREATE TABLE replaced (id int PRIMARY KEY); INSERT INTO replaced VALUES (1);
         CREATE TABLE dropped (id int PRIMARY KEY); INSERT INTO dropped VALUES (1);
         CREATE TABLE narrowed (id int PRIMARY KEY, gone text); INSERT INTO narrowed VALUES (1, 'x');
         CREATE SCHEMA s1; CREATE TABLE s1.moved (id int PRIMARY KEY); INSERT INTO s1.moved VALUES (1);
         CREATE TABLE parts (id int) PARTITION BY RANGE (id);
         CREATE TABLE parts_1 PARTITION OF parts FOR VALUES FROM (0) TO (10);
         CREATE TABLE parts_2 PARTITION OF parts FOR VALUES FROM (10) TO (20);
         INSERT INTO parts VALUES (1), (11);",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    server.init().await;
    pg.batch_execute(
        "ALTER TABLE renamed RENAME TO \"Renamed Now\";
         ALTER TABLE replaced RENAME TO replaced_old; CREATE TABLE replaced (id int PRIMARY KEY);
         DROP TABLE dropped;
         ALTER TABLE narrowed DROP COLUMN gone;
         ALTER TABLE parts DETACH PARTITION parts_2;
         ALTER SCHEMA s1 RENAME TO s2;",
    )
    .await
    .unwrap();
    let (status, body) = server.snapshot(json!({"table": "renamed"})).await;
    assert_error(status, &body, 409, &["renamed to \"Renamed Now\"", "/v1/init"]);
    let (status, body) = server.snapshot(json!({"table": "replaced"})).await;
    assert_error(status, &body, 409, &["renamed to replaced_old"]);
    let (status, body) = server.snapshot(json!({"table": "s1.moved"})).await;
    assert_error(status, &body, 409, &["renamed to s2.moved"]);
    let (status, body) = server.snapshot(json!({"table": "dropped"})).await;
    assert_error(status, &body, 404, &["dropped after the snapshot", "/v1/init"]);
    let (status, body) = server.snapshot(json!({"table": "narrowed"})).await;
    assert_error(status, &body, 409, &["columns of table", "gone"]);
    let (status, body) = server.snapshot(json!({"table": "parts"})).await;
    assert_error(status, &body, 409, &["partitions of table", "parts"]);
    // The partition that stayed still reads.
    let (status, rows) = server.snapshot(json!({"table": "parts_1"})).await;
    assert_eq!((status, rows), (200, json!([{"id": 1}])));
    server.stop().await;
}

/// How many connections the server has in pg_stat_activity (pooled ones and the holder).
async fn server_backends(pg: &tokio_postgres::Client, app: &str) -> i64 {
    pg.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", &[&app]).await.unwrap().get(0)
}

/// A request on a fresh connection; the status, the Retry-After header and the body.
async fn request_with_headers(addr: SocketAddr, body: &str) -> (u16, Option<String>, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/snapshot/data")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, retry, bytes.to_vec())
}

/// 300 concurrent pages on a pool of 3: every answer is 200 or 503 with Retry-After and
/// a JSON error, never 500; the server never has more than 3 pooled connections plus
/// the snapshot holder; and Postgres still takes other clients meanwhile.
#[tokio::test]
async fn a_flood_of_pages_stays_within_the_pool() {
    let (db, pg) = setup().await;
    // Each page takes about 20 ms in Postgres, so the pool cannot serve them all in time.
    pg.batch_execute("CREATE VIEW slowish AS SELECT t.id, t.name FROM test_table t, pg_sleep(0.02)").await.unwrap();
    let app = "pgdeltastream-flood";
    let mut settings = settings_named(&db, app);
    settings.pool.size = 3;
    settings.pool.acquire_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(settings).await;
    server.init().await;
    // Init's replication connection goes; the holder and pooled connections stay.
    let walsenders = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND backend_type = 'walsender'"
    );
    await_count(&pg, &walsenders, 0, "replication connections of the server after init").await;

    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (done, most) = (done.clone(), most.clone());
        let db_client = db.client().await;
        tokio::spawn(async move {
            let mut outside_checks = 0;
            while !done.load(Ordering::Relaxed) {
                most.fetch_max(server_backends(&db_client, app).await, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                outside_checks += 1;
            }
            outside_checks
        })
    };
    let addr = server.addr;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                let table = if i % 2 == 0 { "slowish" } else { "test_table" };
                request_with_headers(addr, &json!({"table": table, "limit": 2}).to_string()).await
            })
        })
        .collect();
    // Another application connects and queries during the flood.
    let outside = db.client().await;
    let one: i32 = outside.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
        match status {
            200 => {
                assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
                ok += 1;
            }
            503 => {
                assert_eq!(retry.as_deref(), Some("1"), "503 without Retry-After: {body}");
                // The pool's connections, or (pages are snapshot reads) the reads' share of them.
                assert!(body["error"].as_str().unwrap().contains("are in use"), "{body}");
                busy += 1;
            }
            other => panic!("status {other}: {body}"),
        }
    }
    done.store(true, Ordering::Relaxed);
    let checks = watcher.await.unwrap();
    assert!(checks > 0);
    assert!(ok > 0 && busy > 0, "{ok} answered, {busy} refused: the flood should do both");
    let most = most.load(Ordering::Relaxed);
    eprintln!("{ok} pages answered, {busy} refused; at most {most} connections of the server");
    assert!(most <= 4, "{most} connections of the server at once: more than the pool (3) and the holder");
    // The pool serves again once the flood is over.
    assert_eq!(server.snapshot(json!({"table": "test_table", "limit": 1})).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn the_statement_timeout_ends_a_slow_page_and_the_next_one_works() {
    let (db, pg) = setup().await;
    pg.batch_execute("CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(5)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.pool.statement_timeout = Duration::from_millis(500);
    settings.pool.size = 1;
    let server = TestServer::start_with(settings).await;
    server.init().await;
    let started = Instant::now();
    let (status, body) = server.snapshot(json!({"table": "sleepy"})).await;
    assert_error(status, &body, 504, &["statement timeout", "smaller limit"]);
    assert!(started.elapsed() < Duration::from_secs(4), "the timeout did not cut the query short");
    // The only connection of the pool is fine.
    let (status, rows) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!((status, rows), (200, json!([{"id": 1, "name": "abc"}])));
    server.stop().await;
}

/// Waits (bounded) until `sql` counts `want`.
async fn await_count(pg: &tokio_postgres::Client, sql: &str, want: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = pg.query_one(sql, &[]).await.unwrap().get(0);
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {n}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that hangs up while its page is being computed: the query is cancelled
/// (not left to run to its end), and the pool's permit comes back.
#[tokio::test]
async fn a_client_that_leaves_cancels_its_query() {
    let (db, pg) = setup().await;
    pg.batch_execute("CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(60)").await.unwrap();
    let app = "pgdeltastream-cancel";
    let mut settings = settings_named(&db, app);
    settings.pool.size = 1;
    let server = TestServer::start_with(settings).await;
    server.init().await;
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active' \
         AND query LIKE '%sleepy%'"
    );
    let body = json!({"table": "sleepy"}).to_string();
    let mut client = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request =
        format!("POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    client.write_all(request.as_bytes()).await.unwrap();
    await_count(&pg, &running, 1, "the page's query never started").await;
    drop(client);
    await_count(&pg, &running, 0, "the query still runs after its client left").await;
    // With a pool of one, the next page proves the permit came back.
    let (status, _) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// The same once the body has started: rows are coming, then the client hangs up.
#[tokio::test]
async fn a_client_that_leaves_mid_body_cancels_its_query() {
    let (db, pg) = setup().await;
    // An index scan in id order (the view's ORDER BY) that stalls after the first few
    // hundred wide rows, which are enough to fill Postgres's send buffer.
    pg.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY);
         INSERT INTO big SELECT generate_series(1, 100000);
         ANALYZE big;
         CREATE FUNCTION stall(i int) RETURNS bool LANGUAGE plpgsql AS
           $$ BEGIN IF i > 300 THEN PERFORM pg_sleep(60); END IF; RETURN true; END $$;
         CREATE VIEW trickle AS SELECT id FROM big WHERE stall(id);
         CREATE VIEW wide AS SELECT id, repeat('x', 1000) AS pad FROM trickle;",
    )
    .await
    .unwrap();
    let app = "pgdeltastream-cancel-mid";
    let mut settings = settings_named(&db, app);
    settings.pool.size = 1;
    let server = TestServer::start_with(settings).await;
    server.init().await;
    let running = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active' \
         AND query LIKE '%wide%'"
    );
    let body = json!({"table": "wide", "limit": 1000, "order_by": {"column": "id"}}).to_string();
    let mut client = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request =
        format!("POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    client.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut head)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    await_count(&pg, &running, 1, "the page's query is not running").await;
    drop(client);
    await_count(&pg, &running, 0, "the query still runs after its client left").await;
    let (status, _) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// The real binary, so that its memory is its own. Killed when dropped.
struct ServerProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServerProcess {
    async fn start(db: &common::TestDb, env: &[(&str, &str)]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = server_command(db, port);
        cmd.envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(pw) = &db.password {
            cmd.env("PGPASSWORD", pw);
        }
        let server = ServerProcess { child: cmd.spawn().unwrap(), addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(server.addr).await.is_err() {
            assert!(Instant::now() < deadline, "pgdeltastream never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// Peak resident memory so far, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a page as it arrives, keeping only its size and its last byte.
async fn page_size(addr: SocketAddr, body: String) -> (u16, usize, Option<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/snapshot/data")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let (mut size, mut last) = (0, None);
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            size += data.len();
            last = data.last().copied().or(last);
        }
    }
    (status, size, last)
}

/// 20 concurrent pages of ~40 MB each: held whole they would take 800 MB (and twice
/// that while being built); streamed, the server's peak memory barely moves.
#[tokio::test]
async fn big_pages_are_streamed_not_held() {
    let (db, pg) = setup().await;
    pg.batch_execute(
        "CREATE TABLE wide_rows (id int PRIMARY KEY, pad text);
         INSERT INTO wide_rows SELECT g, repeat('x', 1000) FROM generate_series(1, 40000) g;",
    )
    .await
    .unwrap();
    let server = ServerProcess::start(
        &db,
        &[
            ("PGDELTASTREAM_MAX_LIMIT", "40000"),
            ("PGDELTASTREAM_PG_POOL_SIZE", "20"),
            ("PGDELTASTREAM_PG_POOL_TIMEOUT", "120"),
            ("PGDELTASTREAM_SNAPSHOT_STATEMENT_TIMEOUT", "300"),
        ],
    )
    .await;
    let (status, body) = request(server.addr, "GET", "/v1/init", None).await;
    assert_eq!(status, 200, "{body}");
    let page = json!({"table": "wide_rows"}).to_string();
    // One small page first, so that the baseline includes a warmed-up server.
    let (status, _, _) = page_size(server.addr, json!({"table": "wide_rows", "limit": 10}).to_string()).await;
    assert_eq!(status, 200);
    let before = server.peak_rss();
    let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(page_size(server.addr, page.clone()))).collect();
    for t in tasks {
        let (status, size, last) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(size > 40_000_000, "a page of {size} bytes");
        assert_eq!(last, Some(b']'), "the page is not whole");
    }
    let growth = server.peak_rss().saturating_sub(before);
    assert!(growth < 100 << 20, "peak RSS grew by {} MiB for 20 pages of 40 MB", growth >> 20);
    eprintln!("peak RSS grew by {} KiB", growth >> 10);
}

/// A read that fails once the page has started cannot become a JSON error any more:
/// the body is cut short, without its closing bracket, and the client sees an error.
#[tokio::test]
async fn an_error_after_the_first_rows_breaks_the_body() {
    let (db, pg) = setup().await;
    // An index scan in id order that fails after some 500 wide rows (half a megabyte,
    // well past the first chunk).
    pg.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY);
         INSERT INTO big SELECT generate_series(1, 100000);
         ANALYZE big;
         CREATE VIEW failing AS SELECT id, repeat('x', 1000) AS pad, 1 / (id - 500) AS boom FROM big;",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    server.init().await;
    let body = json!({"table": "failing", "limit": 1000, "order_by": {"column": "id"}}).to_string();
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/snapshot/data")
        .header("host", server.addr.to_string())
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut received = Vec::new();
    let failed = loop {
        match resp.body_mut().frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(e)) => break e.to_string(),
            None => panic!("the body ended as if whole after {} bytes", received.len()),
        }
    };
    assert!(received.len() > 100_000, "only {} bytes before the error ({failed})", received.len());
    assert!(received.starts_with(b"[{\"id\":1,"), "{}", String::from_utf8_lossy(&received[..50]));
    assert_ne!(received.last(), Some(&b']'));
    // The connection it failed on is fine for the next page.
    let (status, rows) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!((status, rows), (200, json!([{"id": 1, "name": "abc"}])));
    server.stop().await;
}

/// Postgres refusing a connection for lack of slots (53300) is a 503 to retry, not a 500.
#[tokio::test]
async fn postgres_out_of_connections_is_503() {
    let (db, pg) = setup().await;
    let role = format!("limited_{}", db.dbname);
    pg.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION CONNECTION LIMIT 2;
         GRANT SELECT ON test_table TO {role};
         CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(3);
         GRANT SELECT ON sleepy TO {role};"
    ))
    .await
    .unwrap();
    let mut settings = fast_settings(&db);
    settings.pg.user = role.clone();
    let server = Arc::new(TestServer::start_with(settings).await);
    // The snapshot holder is one connection of the role, a page in progress the second.
    server.init().await;
    let slow = {
        let server = server.clone();
        tokio::spawn(async move { server.snapshot(json!({"table": "sleepy"})).await })
    };
    let running = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND query LIKE '%sleepy%'");
    await_count(&pg, &running, 1, "the slow page never started").await;
    let (status, retry, body) = request_with_headers(server.addr, &json!({"table": "test_table"}).to_string()).await;
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_error(status, &body, 503, &["no free connection", "too many connections"]);
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(slow.await.unwrap().0, 200);
    if let Ok(server) = Arc::try_unwrap(server) {
        server.stop().await;
    }
}

/// Slow snapshot exports cannot starve the server: they hold only the pool's read share
/// (half of it by default), one consumer token only a few of them at once (429), and a
/// reader that stops reading is dropped after the idle timeout, giving its connection
/// back. Meanwhile lists, creation and /readyz are served from the rest of the pool.
#[tokio::test]
async fn slow_exports_hold_only_their_share_of_the_pool() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use pgdeltastream::server::{KeySource, Verifier};
    const SECRET: &[u8] = b"a snapshot share test secret, long enough";
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = |claims: Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let (db, pg) = setup().await;
    // Far more than the socket buffers hold: an export that is not read stalls.
    pg.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         INSERT INTO big SELECT g, repeat('x', 1000) FROM generate_series(1, 50000) g;",
    )
    .await
    .unwrap();
    let app = "pgdeltastream-read-share";
    let mut settings = settings_named(&db, app);
    settings.pool.size = 4;
    settings.pool.acquire_timeout = Duration::from_millis(500);
    settings.reads_per_token = 2;
    settings.http.idle_timeout = Duration::from_secs(2);
    settings.http.auth = Some(Arc::new(Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let admin = format!("Bearer {}", token(json!({"role": "admin", "exp": exp})));
    let as_admin = [("content-type", "application/json"), ("authorization", admin.as_str())];
    let create = |name: &str| json!({"name": name, "tables": ["big"]}).to_string().into_bytes();
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &as_admin, create("orders")).await.0, 201);

    let alice = token(json!({"sub": "alice", "role": "consumer", "sessions": ["orders"], "exp": exp}));
    let bob = token(json!({"sub": "bob", "role": "consumer", "sessions": ["orders"], "exp": exp}));
    let export = |who: &str| {
        format!(
            "GET /v2/sessions/orders/snapshot/big HTTP/1.1\r\nhost: x\r\naccept: application/x-ndjson\r\n\
             authorization: Bearer {who}\r\n\r\n"
        )
    };
    // Two exports of alice's that read the head and a little, then nothing.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut client = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        client.write_all(export(&alice).as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut head)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
        stalled.push(client);
    }
    let exporting =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND query LIKE 'FETCH ALL%'");
    await_count(&pg, &exporting, 2, "alice's two exports are not both running").await;

    // A third of alice's: her share is taken.
    let (status, retry, body) = get_with(server.addr, &export(&alice)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body["error"].as_str().unwrap().contains("as many as one token may"), "{body}");
    // Bob has a share of his own, but the pool's read share (2 of 4) is in use.
    let (status, _, body) = get_with(server.addr, &export(&bob)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("snapshot reads may hold"), "{body}");
    // Everything else is served from the rest of the pool.
    let (status, _) = raw_request(server.addr, "GET", "/v2/sessions", &as_admin, Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &as_admin, create("second")).await.0, 201);
    assert_eq!(server.get("/readyz").await.0, 200);

    // Readers that do not read are dropped after the idle timeout (2 s, and as long
    // again), which gives their connections back: bob's export then runs.
    await_count(&pg, &exporting, 0, "the stalled exports still hold their connections").await;
    drop(stalled);
    let (status, _, _) = get_with(server.addr, &export(&bob)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// Writes a request on a fresh connection and reads the whole answer (bounded); the
/// status, Retry-After and the body as JSON (or as a string when it is none).
async fn get_with(addr: SocketAddr, request: &str) -> (u16, Option<String>, Value) {
    let reply =
        exchange(addr, format!("{}\r\nconnection: close\r\n\r\n", request.trim_end_matches("\r\n")).as_bytes()).await;
    let status = reply.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let retry = header(&reply, "retry-after").map(str::to_owned);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.chars().take(200).collect()));
    (status, retry, json)
}
