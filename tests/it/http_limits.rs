//! The HTTP server's limits, seen from raw TCP clients: what a request that is too large
//! gets, and that slow, idle or too many connections cannot take the server offline.

use testkit::pg as common;
use testkit::support;

use std::time::{Duration, Instant};

use pgdeltastream::server::HttpSettings;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn server() -> TestServer {
    TestServer::start(&common::fresh_db().await).await
}

async fn server_with(db: &common::TestDb, http: HttpSettings) -> TestServer {
    // The clients of these tests need descriptors too.
    pgdeltastream::server::limits::raise_open_files_limit();
    let mut settings = fast_settings(db);
    settings.http = http;
    TestServer::start_with(settings).await
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Waits (at most `within`) for the server to close `tcp`, skipping whatever it sends;
/// a reset counts as a close.
async fn assert_closed(tcp: &mut TcpStream, within: Duration, what: &str) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: still open after {within:?}");
}

/// Reads one whole response with a content-length from a kept-alive connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(secs(20), tcp.read(&mut buf)).await.expect("a response within 20 s").unwrap();
        assert!(n > 0, "closed before a whole response: {:?}", String::from_utf8_lossy(&reply));
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = header(head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
    }
}

fn assert_json_error(reply: &str, status: &str) {
    assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply:?}");
    assert_eq!(header(reply, "content-type"), Some("application/json"), "{reply:?}");
    let json = json_body(reply);
    assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{reply:?}");
}

/// A declared body over the cap is refused before it is sent: no `100 Continue` first.
#[tokio::test]
async fn a_declared_body_over_the_cap_is_refused_at_once() {
    let server = server().await;
    let head = "POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 10000000\r\nexpect: 100-continue\r\n\r\n";
    let started = std::time::Instant::now();
    let reply = exchange(server.addr, head.as_bytes()).await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_json_error(&reply, "413");
    assert!(!reply.contains("100 Continue"), "{reply:?}");
    assert_eq!(header(&reply, "connection"), Some("close"), "{reply:?}");
    assert!(json_body(&reply)["error"].as_str().unwrap().contains("10000000"), "{reply:?}");
    // Without Expect too, and a body within the cap is still read.
    let head = "POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: 65537\r\n\r\n{";
    assert_json_error(&exchange(server.addr, head.as_bytes()).await, "413");
    let (status, body) = server.post("/v1/snapshot/data", &format!("{{\"table\":\"{}\"}}", "x".repeat(60_000))).await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}

/// A chunked body declares no length: it is cut at the cap as it is read, with the same
/// 413 on every route that reads a body.
#[tokio::test]
async fn a_chunked_body_over_the_cap_is_413_on_every_route() {
    let server = server().await;
    let chunk = format!("{:x}\r\n{}\r\n", 70_000, "x".repeat(70_000));
    for path in ["/v1/snapshot/data", "/v2/sessions"] {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        tcp.write_all(format!("{head}{chunk}0\r\n\r\n").as_bytes()).await.unwrap();
        let reply = read_response(&mut tcp).await;
        assert_json_error(&reply, "413");
        assert!(json_body(&reply)["error"].as_str().unwrap().contains("length limit"), "{path}: {reply:?}");
    }
    server.stop().await;
}

/// hyper answers what it cannot parse itself; the answers carry our JSON body.
#[tokio::test]
async fn unparseable_requests_get_json_errors() {
    let server = server().await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), "400"),
        (b"GET /v1/sessions HTTP/1.1\r\nbad header\r\n\r\n".to_vec(), "400"),
        (format!("GET /{} HTTP/1.1\r\nhost: localhost\r\n\r\n", "a".repeat(70_000)).into_bytes(), "414"),
        (format!("GET / HTTP/1.1\r\nhost: localhost\r\nx-big: {}\r\n\r\n", "a".repeat(100_000)).into_bytes(), "431"),
        (
            format!("GET / HTTP/1.1\r\n{}\r\n", (0..120).map(|i| format!("x-{i}: y\r\n")).collect::<String>())
                .into_bytes(),
            "431",
        ),
    ];
    for (request, status) in cases {
        let reply = exchange(server.addr, &request).await;
        assert_json_error(&reply, status);
        assert_eq!(header(&reply, "connection"), Some("close"), "{reply:?}");
    }
    let (status, body) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// Half a request head is not a way to hold a connection: the header timeout ends
/// each, and the server answers others meanwhile.
#[tokio::test]
async fn half_request_heads_are_closed_within_the_header_timeout() {
    let db = common::fresh_db().await;
    let server = server_with(&db, HttpSettings { header_timeout: secs(2), ..HttpSettings::default() }).await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\nx-slow: ").await.unwrap();
        slow.push(tcp);
    }
    let (status, body) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{body}");
    for (i, tcp) in slow.iter_mut().enumerate() {
        assert_closed(tcp, secs(10), &format!("half head {i}")).await;
    }
    server.stop().await;
}

/// The header timeout also runs while a kept-alive connection waits for its next request.
#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let db = common::fresh_db().await;
    let server = server_with(&db, HttpSettings { header_timeout: secs(1), ..HttpSettings::default() }).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
        let reply = read_response(&mut tcp).await;
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
    }
    assert_closed(&mut tcp, secs(5), "idle kept-alive connection").await;
    server.stop().await;
}

/// A request whose body never comes: the idle timeout ends it.
#[tokio::test]
async fn a_silent_request_body_is_closed_after_the_idle_timeout() {
    let db = common::fresh_db().await;
    let http = HttpSettings { header_timeout: secs(60), idle_timeout: secs(1), ..HttpSettings::default() };
    let server = server_with(&db, http).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n{\"table\"")
        .await
        .unwrap();
    assert_closed(&mut tcp, secs(10), "a request whose body stopped").await;
    server.stop().await;
}

/// A handler that takes long is not idleness: `/v1/init` waits for a transaction
/// that holds an xid before its slot is created, and still answers.
#[tokio::test]
async fn a_slow_handler_outlasts_the_idle_timeout() {
    let db = common::fresh_db().await;
    let http = HttpSettings { idle_timeout: secs(1), ..HttpSettings::default() };
    let server = server_with(&db, http).await;
    let mut pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (id int)").await.unwrap();
    let tx = pg.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
    let init = tokio::spawn(request(server.addr, "GET", "/v1/init", None));
    tokio::time::sleep(secs(4)).await;
    assert!(!init.is_finished(), "init did not wait for the transaction");
    tx.commit().await.unwrap();
    let (status, body) = tokio::time::timeout(secs(20), init).await.expect("init answers").unwrap();
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// Past the cap (websockets count) a client gets 503 JSON with Retry-After at once, and
/// once connections close the server serves again.
#[tokio::test]
async fn past_the_connection_cap_clients_get_503_until_places_free_up() {
    let db = common::fresh_db().await;
    let http = HttpSettings { max_connections: 5, ..HttpSettings::default() };
    let server = server_with(&db, http).await;
    let slot = server.init().await;
    let ws = server.connect(&slot).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = Instant::now();
    let reply = exchange(server.addr, b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    assert!(started.elapsed() < secs(5), "took {:?}", started.elapsed());
    assert_json_error(&reply, "503");
    assert_eq!(header(&reply, "retry-after"), Some("1"), "{reply:?}");
    assert_eq!(header(&reply, "connection"), Some("close"), "{reply:?}");

    drop(ws);
    drop(idle);
    let deadline = Instant::now() + secs(20);
    loop {
        let reply =
            exchange(server.addr, b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
        if reply.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The binary at 256 open files, against 300 idle connections (more than it could
/// hold): it refuses or times them out, serves again, and logs no accept-error storm.
#[tokio::test]
async fn the_binary_with_few_open_files_outlives_a_flood_of_idle_connections() {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;

    pgdeltastream::server::limits::raise_open_files_limit();
    let db = common::fresh_db().await;
    let port = free_port();
    let log_path = std::env::temp_dir().join(format!("pgdeltastream-flood-{}-{port}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = server_command(&db, port);
    command.env("PGDELTASTREAM_HEADER_TIMEOUT", "2").stdout(Stdio::null()).stderr(log);
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = Child(command.spawn().unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the server never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let deadline = Instant::now() + secs(30);
    loop {
        let reply = exchange(addr, b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
        if reply.starts_with("HTTP/1.1 200 ") {
            break;
        }
        assert!(Instant::now() < deadline, "not serving again: {reply:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut refused = 0;
    for tcp in &mut idle {
        let mut buf = [0u8; 512];
        if let Ok(n) = tcp.try_read(&mut buf) {
            refused += usize::from(buf[..n].starts_with(b"HTTP/1.1 503 "));
        }
    }
    assert!(refused > 0, "no idle connection got the 503 answer");
    drop(idle);

    // SAFETY: a plain kill(2) on our child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(log.contains("pgdeltastream serving"), "the log is not on stderr: {log}");
    assert!(!log.contains('\u{1b}'), "ANSI escapes in a log that is not a terminal: {log}");
    let storms = log.lines().filter(|l| l.contains("Too many open files")).count();
    assert!(storms <= 5, "{storms} lines of accept errors: {log}");
    let cap_lines = log.lines().filter(|l| l.contains("connection cap")).count();
    assert!((1..=10).contains(&cap_lines), "{cap_lines} lines about the cap: {log}");
}

/// Shutdown ends idle connections at once, without waiting for any timeout.
#[tokio::test]
async fn shutdown_closes_idle_connections_at_once() {
    let db = common::fresh_db().await;
    let http = HttpSettings { header_timeout: secs(60), idle_timeout: secs(60), ..HttpSettings::default() };
    let server = server_with(&db, http).await;
    let mut fresh = TcpStream::connect(server.addr).await.unwrap();
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /v1/sessions HTTP/1.1\r\nhost: localhost\r\n\r\n").await.unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200 "));
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < secs(10), "shutdown took {:?}", started.elapsed());
    assert_closed(&mut fresh, secs(5), "a connection that sent nothing").await;
    assert_closed(&mut kept, secs(5), "a kept-alive connection").await;
}
