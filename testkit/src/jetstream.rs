//! NATS for the tests: nats-server with JetStream in a temp dir, our publisher and
//! gateways as processes, a session to publish, and a writer.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pg::{self as common, TestDb};
use crate::support::{self, TestServer, Ws, server_command};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (SIGKILL) when dropped, and when the test process dies
/// (PR_SET_PDEATHSIG: the test's main thread spawns it and outlives it).
pub struct Proc(Child);

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
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

    /// SIGTERM, then the exit status (bounded wait).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }

    pub fn kill9(&mut self) {
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
pub struct Nats {
    pub url: String,
    dir: std::path::PathBuf,
    _proc: Proc,
}

impl Nats {
    pub async fn start(max_payload: Option<usize>) -> Nats {
        Nats::start_on(free_port(), max_payload).await
    }

    /// On a port chosen beforehand (a client may be told it before NATS runs).
    pub async fn start_on(port: u16, max_payload: Option<usize>) -> Nats {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgdeltastream-nats-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
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

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(async_nats::connect(&self.url).await.unwrap())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database with a table `items (id, note)` and a v2 session `orders` of it.
pub async fn session_db() -> TestDb {
    let db = common::fresh_db().await;
    db.client().await.batch_execute("CREATE TABLE items (id int PRIMARY KEY, note text)").await.unwrap();
    let server = TestServer::start(&db).await;
    let (status, body) = server.post("/v2/sessions", r#"{"name":"orders","tables":["public.items"]}"#).await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
    db
}

pub fn publisher(db: &TestDb, nats: &Nats, extra: &[&str]) -> Proc {
    let mut cmd = server_command(db, free_port());
    cmd.env("PGDELTASTREAM_STATUS_INTERVAL", "1")
        .args(["publish", "--nats", &nats.url, "--session", "orders"])
        .args(extra);
    Proc::spawn(cmd)
}

pub async fn gateway(db: &TestDb, nats: &Nats, port: u16) -> Proc {
    let mut cmd = server_command(db, port);
    cmd.env("PGDELTASTREAM_PING_INTERVAL", "1").args(["gateway", "--nats", &nats.url]);
    let proc = Proc::spawn(cmd);
    wait_listening(port, "the gateway").await;
    proc
}

pub fn url(port: u16, client: &str) -> String {
    format!("ws://127.0.0.1:{port}/v2/sessions/orders/stream?client={client}")
}

/// Inserts rows `from..=to`, `per_tx` rows a transaction.
pub async fn write_rows(db: &TestDb, from: i32, to: i32, per_tx: i32, pause: Duration) {
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

pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Waits (bounded) for the stream's last sequence to reach `seq`.
pub async fn await_stream_seq(nats: &Nats, seq: u64) -> u64 {
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

/// Waits (bounded) until the acks' KV bucket holds `key`: a client's ack is stored,
/// where any gateway finds it.
pub async fn await_ack_stored(nats: &Nats, key: &str) {
    let kv = nats.jetstream().await.get_key_value("pgdeltastream_acks").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while kv.get(key).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the ack {key} was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens a websocket expecting a refusal: the HTTP status and JSON body.
pub async fn refused(url: String) -> (u16, Value) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("websocket upgrade succeeded; expected a refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

pub async fn next_transaction(ws: &mut Ws) -> Value {
    support::next_changes(ws).await
}
