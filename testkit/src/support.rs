//! Running our server against a test database, and talking to it as a client would:
//! plain HTTP requests and a websocket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use pgdeltastream::pg::PgConfig;
use pgdeltastream::pg::pool::PoolSettings;
use pgdeltastream::server::{self, HttpSettings, Settings};
use pgdeltastream::session::{RetentionSettings, SessionSettings};
use pgdeltastream::stream::socket::SocketSettings;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::pg::TestDb;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Settings that make the timers of a test run fast.
pub fn fast_settings(db: &TestDb) -> Settings {
    Settings {
        pg: pg_config(db),
        session: SessionSettings {
            snapshot_idle_timeout: Duration::from_secs(600),
            status_interval: Duration::from_millis(500),
            stream_buffer: 16,
            frame_bytes: pgdeltastream::stream::frame::DEFAULT_FRAME_BYTES,
            pgoutput_memory: pgdeltastream::stream::pgoutput::DEFAULT_HOLD_MEMORY,
            schema: pgdeltastream::session::store::DEFAULT_SCHEMA.into(),
            plugin: pgdeltastream::session::PluginChoice::Auto,
            socket: SocketSettings { ping_interval: Duration::from_secs(1), dead_after: Duration::from_secs(10) },
            max_watchers: 8,
            max_watchers_per_caller: 2,
            watch_reserve_slots: 2,
            failover_slots: true,
            backfill_chunk_bytes: pgdeltastream::session::DEFAULT_BACKFILL_CHUNK_BYTES,
        },
        max_limit: 1000,
        reads_per_token: 2,
        retention: RetentionSettings::default(),
        pool: PoolSettings::default(),
        http: HttpSettings::default(),
    }
}

pub fn pg_config(db: &TestDb) -> PgConfig {
    PgConfig {
        host: db.host.clone(),
        port: db.port,
        user: db.user.clone(),
        password: db.password.clone(),
        dbname: db.dbname.clone(),
        application_name: "pgdeltastream-test".into(),
        connect_timeout: Duration::from_secs(10),
        tls: pgdeltastream::pg::tls::PgTls::disabled(),
    }
}

/// Our server, in this process, on a free port of 127.0.0.1.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(db: &TestDb) -> TestServer {
        Self::start_with(fast_settings(db)).await
    }

    pub async fn start_with(settings: Settings) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, settings, async move {
            let _ = rx.await;
        }));
        TestServer { addr, shutdown: Some(tx), task }
    }

    /// Graceful shutdown, as on SIGTERM; waits until the server has stopped.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("server stops within 20 s")
            .expect("server task")
            .expect("server result");
    }

    /// True while the server task has not ended (it only ends through [`TestServer::stop`]).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        request(self.addr, "GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        request(self.addr, "POST", path, Some(body)).await
    }

    /// `GET /v1/init`, expecting success; returns the slot name.
    pub async fn init(&self) -> String {
        let (status, body) = self.get("/v1/init").await;
        assert_eq!(status, 200, "init failed: {body}");
        body["slotName"].as_str().expect("slotName").to_owned()
    }

    pub async fn snapshot(&self, body: Value) -> (u16, Value) {
        self.post("/v1/snapshot/data", &body.to_string()).await
    }

    pub fn stream_url(&self, slot: &str) -> String {
        format!("ws://{}/v1/lr/stream?slotName={slot}", self.addr)
    }

    /// Opens the websocket of `slot`, expecting the upgrade to succeed.
    pub async fn connect(&self, slot: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.stream_url(slot)).await.expect("websocket upgrade");
        ws
    }

    /// Opens the websocket expecting a refusal; returns the HTTP status and JSON body.
    pub async fn connect_refused(&self, slot_query: &str) -> (u16, Value) {
        ws_refused(self.addr, &format!("/v1/lr/stream{slot_query}")).await
    }
}

/// The major of the server `pg` is connected to, from `server_version_num`.
pub async fn server_major(pg: &tokio_postgres::Client) -> u32 {
    let num: String = pg.query_one("SHOW server_version_num", &[]).await.expect("server_version_num").get(0);
    num.parse::<u32>().expect("server_version_num is a number") / 10_000
}

/// Opens the websocket at `path` expecting a refusal: its HTTP status and JSON body.
pub async fn ws_refused(addr: SocketAddr, path: &str) -> (u16, Value) {
    match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
        Ok(_) => panic!("{path}: the websocket upgrade succeeded; expected a refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("{path}: unexpected websocket error: {e}"),
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, bytes) = raw_request(
        addr,
        method,
        path,
        &[("content-type", "application/json")],
        body.unwrap_or("").as_bytes().to_vec(),
    )
    .await;
    let json =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, json)
}

pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

/// Writes `request` on a fresh connection and reads until the server closes it (at
/// most 20 s); returns what came back. A reset after the answer ends it like a close.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything (that is the point
    // of some tests), so a failed write is not an error here.
    let _ = stream.write_all(request).await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server did not close within 20 s; it sent {:?}", String::from_utf8_lossy(&reply));
    String::from_utf8_lossy(&reply).into_owned()
}

/// The JSON body of a whole HTTP/1.1 response as [`exchange`] returns it.
pub fn json_body(reply: &str) -> Value {
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {reply:?}"))
}

/// The value of the response header `name` (case-insensitive).
pub fn header<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let head = reply.split_once("\r\n\r\n").map(|(h, _)| h).unwrap_or(reply);
    head.split("\r\n").skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// What the client gets next, skipping pings and pongs (bounded wait).
pub async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a message within 20 s")
            .expect("the websocket is open")
            .expect("a websocket message");
        match m {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// The next text frame, parsed.
pub async fn next_json(ws: &mut Ws) -> Value {
    match next_message(ws).await {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}")),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// The next frame that carries changes, skipping empty transactions.
pub async fn next_changes(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["change"].as_array().is_some_and(|c| !c.is_empty()) {
            return v;
        }
    }
}

pub async fn ack(ws: &mut Ws, lsn: &str) {
    ws.send(Message::Text(format!(r#"{{"lsn":"{lsn}"}}"#).into())).await.unwrap();
}

/// The replication slots of the test's database, by name.
pub async fn database_slots(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query("SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database() ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits (bounded) for the slot's confirmed_flush_lsn to reach `lsn`.
pub async fn await_confirmed(client: &tokio_postgres::Client, slot: &str, lsn: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &lsn],
            )
            .await
            .unwrap();
        if row.get::<_, bool>(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "confirmed_flush_lsn {} never reached {lsn}",
            row.get::<_, String>(1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<String> {
    client
        .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// Waits (bounded) until `cond` holds for the slot's row in pg_replication_slots.
pub async fn await_slot(client: &tokio_postgres::Client, slot: &str, what: &str, sql_condition: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let sql = format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND ({sql_condition})");
    loop {
        let n: i64 = client.query_one(&sql, &[&slot]).await.unwrap().get(0);
        if n > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot {slot} never became {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the close frame (skipping data), returning its code and reason.
pub async fn await_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("close within 20 s") {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error before close: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

/// The first column of every insert of the frame (the tests' row numbers).
pub fn row_numbers(frame: &Value) -> Vec<i64> {
    frame["change"]
        .as_array()
        .unwrap_or_else(|| panic!("no change array in {frame}"))
        .iter()
        .filter(|c| c["kind"] == "insert")
        .map(|c| c["columnvalues"][0].as_i64().unwrap_or_else(|| panic!("no row number in {c}")))
        .collect()
}

/// The server binary that cargo builds for the integration tests, beside the running
/// test binary: `target/<profile>/deps/<test>-<hash>` runs `target/<profile>/pgdeltastream`.
pub fn server_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the test binary");
        let bin = exe.parent().and_then(Path::parent).map(|dir| dir.join("pgdeltastream"));
        match bin {
            Some(bin) if bin.is_file() => bin,
            _ => panic!("no pgdeltastream binary beside {} (cargo test builds it)", exe.display()),
        }
    })
}

/// The server binary, set up to serve `db` on 127.0.0.1:`port`, with nothing else from
/// the environment: the tests that need a real process (signals, memory, file limits).
pub fn server_command(db: &TestDb, port: u16) -> std::process::Command {
    let mut cmd = std::process::Command::new(server_binary());
    cmd.env_clear()
        .env("DBNAME", &db.dbname)
        .env("PGUSER", &db.user)
        .env("PGHOST", &db.host)
        .env("PGPORT", db.port.to_string())
        .env("SERVERHOST", "127.0.0.1")
        .env("SERVERPORT", port.to_string());
    cmd
}
