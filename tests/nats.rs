//! Scale-out through NATS JetStream: `pgdeltastream publish` and `pgdeltastream gateway`
//! as processes of our binary, against a real nats-server (`make nats` installs it) with
//! JetStream in a temp dir, and a real Postgres.

mod common;
mod support;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use common::TestDb;
use support::{TestServer, Ws, row_numbers, server_command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (SIGKILL) when dropped, and when the test process dies
/// (PR_SET_PDEATHSIG: the test's main thread spawns it and outlives it).
struct Proc(Child);

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log = std::env::var_os("TEST_NATS_LOG").is_some();
        cmd.stdout(Stdio::null()).stderr(if log { Stdio::inherit() } else { Stdio::null() });
        Proc(cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")))
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// nats-server with JetStream in a temp dir on a free port.
struct Nats {
    url: String,
    dir: std::path::PathBuf,
    _proc: Proc,
}

impl Nats {
    async fn start(max_payload: Option<usize>) -> Nats {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgdeltastream-nats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let mut cmd = Command::new(bin);
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"]).arg(dir.join("js"));
        if let Some(max) = max_payload {
            let conf = dir.join("nats.conf");
            std::fs::write(&conf, format!("max_payload: {max}\n")).unwrap();
            cmd.arg("-c").arg(conf);
        }
        let proc = Proc::spawn(cmd);
        wait_listening(port, "nats-server").await;
        Nats { url: format!("nats://127.0.0.1:{port}"), dir, _proc: proc }
    }

    async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(&self.url).await.unwrap())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database with a table `items (id, note)` and a v2 session `orders` of it.
async fn session_db() -> TestDb {
    let db = common::fresh_db().await;
    db.client().await.batch_execute("CREATE TABLE items (id int PRIMARY KEY, note text)").await.unwrap();
    let server = TestServer::start(&db).await;
    let (status, body) = server.post("/v2/sessions", r#"{"name":"orders","tables":["public.items"]}"#).await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
    db
}

fn publisher(db: &TestDb, nats: &Nats, extra: &[&str]) -> Proc {
    let mut cmd = server_command(db, free_port());
    cmd.env("PGDELTASTREAM_STATUS_INTERVAL", "1")
        .args(["publish", "--nats", &nats.url, "--session", "orders"])
        .args(extra);
    Proc::spawn(cmd)
}

async fn gateway(db: &TestDb, nats: &Nats, port: u16) -> Proc {
    let mut cmd = server_command(db, port);
    cmd.env("PGDELTASTREAM_PING_INTERVAL", "1").args(["gateway", "--nats", &nats.url]);
    let proc = Proc::spawn(cmd);
    wait_listening(port, "the gateway").await;
    proc
}

fn url(port: u16, client: &str) -> String {
    format!("ws://127.0.0.1:{port}/v2/sessions/orders/stream?client={client}")
}

/// Inserts rows `from..=to`, `per_tx` rows a transaction.
async fn write_rows(db: &TestDb, from: i32, to: i32, per_tx: i32, pause: Duration) {
    let pg = db.client().await;
    let mut next = from;
    while next <= to {
        let last = (next + per_tx - 1).min(to);
        pg.execute("INSERT INTO items SELECT g, 'row ' || g FROM generate_series($1::int, $2::int) g", &[&next, &last])
            .await
            .unwrap();
        next = last + 1;
        tokio::time::sleep(pause).await;
    }
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Waits (bounded) for the stream's last sequence to reach `seq`.
async fn await_stream_seq(nats: &Nats, seq: u64) -> u64 {
    let js = nats.jetstream().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut stream) = js.get_stream("PGDELTASTREAM_ORDERS").await {
            let state = stream.info().await.unwrap().state.clone();
            if state.last_sequence >= seq {
                return state.first_sequence;
            }
        }
        assert!(Instant::now() < deadline, "the stream never reached sequence {seq}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a websocket expecting a refusal: the HTTP status and JSON body.
async fn refused(url: String) -> (u16, Value) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("websocket upgrade succeeded; expected a refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

async fn next_transaction(ws: &mut Ws) -> Value {
    support::next_changes(ws).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_max_payload_arrives_whole() {
    let db = session_db().await;
    let nats = Nats::start(Some(4096)).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    // 40 rows of 300 bytes each: about 14 KB, four pieces or more of 4 KB.
    let note = "é".repeat(150);
    let pg = db.client().await;
    pg.execute("INSERT INTO items SELECT g, $1 FROM generate_series(1, 40) g", &[&note]).await.unwrap();
    pg.execute("INSERT INTO items VALUES (41, 'small')", &[]).await.unwrap();

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "big")).await.unwrap();
    let big = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&big), (1..=40).collect::<Vec<_>>());
    assert!(big["change"].as_array().unwrap().iter().all(|c| c["columnvalues"][1] == note.as_str()));
    let small = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&small), vec![41]);
    // Stored as pieces: more messages than transactions.
    let js = nats.jetstream().await;
    let mut stream = js.get_stream("PGDELTASTREAM_ORDERS").await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    assert!(messages >= 5, "{messages} messages for 2 transactions, one of 14 KB with max_payload 4096");
}

/// What one client of the kill test saw: per connection, each transaction's nextlsn
/// and row numbers; and its acks with when they were sent.
#[derive(Default)]
struct ClientLog {
    segments: Vec<Vec<(u64, Vec<i64>)>>,
    acks: Vec<(Instant, u64)>,
    errors: Vec<String>,
}

/// Reads and acks every transaction until it has row `total`; when its connection
/// drops, reconnects, trying the other gateway first.
async fn kill_test_client(name: String, mut gw: usize, ports: [u16; 2], total: i64, log: Arc<Mutex<ClientLog>>) {
    loop {
        let mut ws = loop {
            match tokio_tungstenite::connect_async(url(ports[gw], &name)).await {
                Ok((ws, _)) => break ws,
                Err(_) => {
                    gw = 1 - gw;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        log.lock().unwrap().segments.push(Vec::new());
        loop {
            let message = tokio::time::timeout(Duration::from_secs(120), ws.next()).await;
            let text = match message.unwrap_or_else(|_| panic!("{name}: nothing for 120 s")) {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            let Some(nextlsn) = v["nextlsn"].as_str() else {
                log.lock().unwrap().errors.push(text.to_string());
                continue;
            };
            let rows = row_numbers(&v);
            let done = rows.last() == Some(&total);
            {
                let mut log = log.lock().unwrap();
                log.segments.last_mut().unwrap().push((lsn(nextlsn), rows));
                log.acks.push((Instant::now(), lsn(nextlsn)));
            }
            if ws.send(Message::Text(format!(r#"{{"lsn":"{nextlsn}"}}"#).into())).await.is_err() {
                break;
            }
            if done {
                let _ = ws.close(None).await;
                return;
            }
        }
        gw = 1 - gw;
    }
}

/// Rows come in commit order and none is missing: within a connection each row is
/// the one after the last; a new connection may start again below what was seen.
fn check_rows(name: &str, log: &ClientLog, total: i64) {
    let mut seen = 0;
    for (k, segment) in log.segments.iter().enumerate() {
        let mut prev: Option<i64> = None;
        for (_, rows) in segment {
            for &row in rows {
                match prev {
                    Some(p) => assert_eq!(row, p + 1, "{name}: row {row} after {p} in connection {k}"),
                    None => assert!(
                        row <= seen + 1,
                        "{name}: connection {k} starts at row {row}, but only {seen} were seen"
                    ),
                }
                prev = Some(row);
                seen = seen.max(row);
            }
        }
    }
    assert_eq!(seen, total, "{name}: rows missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_every_change_across_kill_9_of_a_gateway_and_the_publisher() {
    const CLIENTS: usize = 20;
    const TOTAL: i64 = 2000;
    const PER_TX: i32 = 5;
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let mut publisher_proc = publisher(&db, &nats, &[]);
    let ports = [free_port(), free_port()];
    let mut doomed = gateway(&db, &nats, ports[0]).await;
    let _survivor = gateway(&db, &nats, ports[1]).await;

    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| tokio::spawn(kill_test_client(format!("c{i}"), i % 2, ports, TOTAL, log.clone())))
        .collect();
    let writer = {
        let db = db.clone();
        tokio::spawn(async move { write_rows(&db, 1, TOTAL as i32, PER_TX, Duration::from_millis(10)).await })
    };

    // Mid-load: kill -9 the first gateway and the publisher, then start both again.
    let pg = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = pg.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
        if n >= TOTAL / 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer is stuck at {n} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    doomed.kill9();
    publisher_proc.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _publisher_again = publisher(&db, &nats, &[]);
    let _doomed_again = gateway(&db, &nats, ports[0]).await;
    drop(publisher_proc);

    writer.await.unwrap();
    for client in clients {
        tokio::time::timeout(Duration::from_secs(300), client).await.expect("every client gets every row").unwrap();
    }
    for (i, log) in logs.iter().enumerate() {
        let name = format!("c{i}");
        let log = log.lock().unwrap();
        assert!(log.errors.is_empty(), "{name}: {:?}", log.errors);
        check_rows(&name, &log, TOTAL);
        if i % 2 == 1 {
            // The surviving gateway's clients stayed connected: the publisher's restart
            // published some transactions again, and the gateway dropped them.
            assert_eq!(log.segments.len(), 1, "{name} reconnected");
            let lsns: Vec<u64> = log.segments[0].iter().map(|(l, _)| *l).collect();
            assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{name}: a transaction came twice");
        } else {
            assert!(log.segments.len() >= 2, "{name} was connected to the killed gateway and never reconnected");
            // Acks sent well before the kill were stored (one KV write takes a few ms):
            // nothing at or below them comes again.
            let acked = log
                .acks
                .iter()
                .filter(|(at, _)| *at + Duration::from_secs(2) < killed_at)
                .map(|(_, l)| *l)
                .max()
                .unwrap_or(0);
            for (k, segment) in log.segments.iter().enumerate().skip(1) {
                if let Some((first, _)) = segment.first() {
                    assert!(
                        *first > acked,
                        "{name}: connection {k} starts at {first:X}, acked {acked:X} before the kill"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_what_the_stream_retains_is_refused() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &["--nats-max-msgs", "3"]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 1, 1, Duration::ZERO).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "early")).await.unwrap();
    let first = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&first), vec![1]);
    support::ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    // The ack is stored in the KV bucket, where any gateway finds it.
    let kv = nats.jetstream().await.get_key_value("pgdeltastream_acks").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while kv.get("orders.early").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the ack was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ws.close(None).await.unwrap();

    // Ten more transactions; the stream keeps the last three.
    write_rows(&db, 2, 11, 1, Duration::ZERO).await;
    let first_kept = await_stream_seq(&nats, 11).await;
    assert_eq!(first_kept, 9);
    let (status, body) = refused(url(port, "early")).await;
    assert_eq!(status, 410, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("client early") && error.contains("no longer retained"), "{error}");
    assert!(error.contains("sequences 2 to 8"), "{error}");
    // A client that acked nothing would start at the stream's beginning, gone too.
    let (status, body) = refused(url(port, "late")).await;
    assert_eq!(status, 410, "{body}");
    assert!(body["error"].as_str().unwrap().contains("acked nothing"), "{body}");
    // Unknown sessions and bad client ids are refused as such.
    let (status, body) = refused(format!("ws://127.0.0.1:{port}/v2/sessions/nosuch/stream")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not published"), "{body}");
    let (status, body) = refused(url(port, "a.b")).await;
    assert_eq!(status, 400, "{body}");
}
