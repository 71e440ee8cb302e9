//! Live latency: a writer commits one-row transactions at a steady rate while a client
//! streams them through the server; each row carries its send time.
//!
//! Times are nanoseconds on one monotonic clock ([`now_ns`]) shared by the writer and
//! the client (same process, each on its own thread and runtime so they do not delay
//! each other). Latency is the client's receipt minus the writer's commit completion
//! (the moment `INSERT` returned, synchronous_commit=on); send-to-receipt is kept too.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::Result;
use crate::drain::{message_nextlsn, spawn_acker, ws_config};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench started; never 0 (0 means "not yet").
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

pub const TABLE_SQL: &str = "CREATE TABLE pings (id bigint PRIMARY KEY, sent_us bigint NOT NULL, note text NOT NULL)";

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of nanosecond samples.
    pub fn of(mut ns: Vec<i64>) -> Option<Percentiles> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let at = |p: f64| {
            let rank = ((p / 100.0) * ns.len() as f64).ceil() as usize;
            ns[rank.clamp(1, ns.len()) - 1] as f64 / 1e6
        };
        Some(Percentiles { p50_ms: at(50.0), p99_ms: at(99.0), max_ms: at(100.0) })
    }
}

/// Per-row clocks, indexed by row id.
pub struct Clocks {
    pub sent: Vec<AtomicU64>,
    pub committed: Vec<AtomicU64>,
    pub received: Vec<AtomicU64>,
    /// sent_us as the client read it from the row.
    pub sent_in_row_us: Vec<AtomicU64>,
    pub received_count: AtomicU64,
}

impl Clocks {
    pub fn new(n: usize) -> Clocks {
        let v = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Clocks { sent: v(), committed: v(), received: v(), sent_in_row_us: v(), received_count: AtomicU64::new(0) }
    }
}

/// The client: streams the slot, records the receipt time of every `pings` row, acks
/// every transaction. Runs on its own thread until `stop` is set.
pub fn spawn_client(
    port: u16,
    slot: String,
    clocks: Arc<Clocks>,
    stop: Arc<AtomicBool>,
    connected: std::sync::mpsc::Sender<Result<()>>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::Builder::new()
        .name("latency-client".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let url = format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName={slot}");
                let ws = match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true).await
                {
                    Ok((ws, _)) => {
                        let _ = connected.send(Ok(()));
                        ws
                    }
                    Err(e) => {
                        let msg = format!("websocket {url}: {e}");
                        let _ = connected.send(Err(msg.clone().into()));
                        return Err(msg.into());
                    }
                };
                let (sink, mut stream) = ws.split();
                let (ack_tx, acker) = spawn_acker(sink);
                let mut check = tokio::time::interval(Duration::from_millis(20));
                loop {
                    let msg = tokio::select! {
                        m = stream.next() => m,
                        _ = check.tick() => {
                            if stop.load(Ordering::Relaxed) { break; }
                            continue;
                        }
                    };
                    let at = now_ns();
                    let msg = match msg {
                        None => return Err("latency client: the socket ended".into()),
                        Some(Err(e)) => return Err(format!("latency client: {e}").into()),
                        Some(Ok(m)) => m,
                    };
                    let data: &[u8] = match &msg {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        Message::Close(c) => return Err(format!("latency client: closed by the server: {c:?}").into()),
                        _ => continue,
                    };
                    if data.starts_with(b"{\"error\"") {
                        return Err(format!("latency client: {}", String::from_utf8_lossy(data)).into());
                    }
                    if let Some(lsn) = message_nextlsn(data) {
                        let _ = ack_tx.send(lsn);
                    }
                    let v: serde_json::Value = serde_json::from_slice(data)?;
                    for change in v["change"].as_array().into_iter().flatten() {
                        if change["table"] != "pings" {
                            continue;
                        }
                        let values = &change["columnvalues"];
                        let (Some(id), Some(sent_us)) = (values[0].as_u64(), values[1].as_u64()) else {
                            return Err(format!("latency client: unexpected row {change}").into());
                        };
                        let id = id as usize;
                        if id < clocks.received.len() && clocks.received[id].load(Ordering::Relaxed) == 0 {
                            clocks.received[id].store(at, Ordering::Relaxed);
                            clocks.sent_in_row_us[id].store(sent_us, Ordering::Relaxed);
                            clocks.received_count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                drop(ack_tx);
                let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
                Ok(())
            })
        })
        .expect("spawn the latency client thread")
}

/// The writer: `workers` connections; row `id` is due at `id / rate` seconds after the
/// start and sent then (or at once when its connection is behind). Rows `first..last`.
pub fn spawn_writer(
    configs: Vec<tokio_postgres::Config>,
    rate: u64,
    first: usize,
    last: usize,
    clocks: Arc<Clocks>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::Builder::new()
        .name("latency-writer".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let workers = configs.len();
                let mut clients = Vec::new();
                for cfg in configs {
                    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(conn);
                    let stmt = client.prepare("INSERT INTO pings VALUES ($1, $2, 'ping')").await?;
                    clients.push((client, stmt));
                }
                let t0 = tokio::time::Instant::now();
                let mut tasks = Vec::new();
                for (w, (client, stmt)) in clients.into_iter().enumerate() {
                    let clocks = clocks.clone();
                    tasks.push(tokio::spawn(async move {
                        for id in (first + w..last).step_by(workers) {
                            let due = t0 + Duration::from_nanos(((id - first) as u64) * 1_000_000_000 / rate);
                            tokio::time::sleep_until(due).await;
                            let sent = now_ns();
                            clocks.sent[id].store(sent, Ordering::Relaxed);
                            client.execute(&stmt, &[&(id as i64), &((sent / 1000) as i64)]).await?;
                            clocks.committed[id].store(now_ns(), Ordering::Relaxed);
                        }
                        Ok::<_, tokio_postgres::Error>(())
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                Ok(())
            })
        })
        .expect("spawn the latency writer thread")
}

/// The baseline client: pg_recvlogical's output (one plugin record per line; a change
/// is `{"kind":...}` or `,{"kind":...}` on its own line with write-in-chunks), read as it
/// comes. Ends at EOF, when pg_recvlogical is stopped.
pub fn spawn_line_client(
    stdout: std::process::ChildStdout,
    clocks: Arc<Clocks>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::Builder::new()
        .name("latency-recvlogical".into())
        .spawn(move || {
            use std::io::BufRead;
            let mut input = std::io::BufReader::with_capacity(64 * 1024, stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                if input.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                let at = now_ns();
                let text = line.strip_prefix(b",").unwrap_or(&line);
                if !text.starts_with(b"{\"kind\"") {
                    continue;
                }
                let change: serde_json::Value = serde_json::from_slice(text)?;
                if change["table"] != "pings" {
                    continue;
                }
                let values = &change["columnvalues"];
                let (Some(id), Some(sent_us)) = (values[0].as_u64(), values[1].as_u64()) else {
                    return Err(format!("pg_recvlogical client: unexpected row {change}").into());
                };
                let id = id as usize;
                if id < clocks.received.len() && clocks.received[id].load(Ordering::Relaxed) == 0 {
                    clocks.received[id].store(at, Ordering::Relaxed);
                    clocks.sent_in_row_us[id].store(sent_us, Ordering::Relaxed);
                    clocks.received_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .expect("spawn the pg_recvlogical reader thread")
}
