//! `fanout`: one session's changes to many websocket clients through NATS JetStream
//! (`pgdeltastream publish` and `pgdeltastream gateway`): delivered changes per second,
//! summed over the clients, and commit-to-client latency, with the clients over two
//! gateways against all of them on one gateway.
//!
//! The baseline is one gateway serving every client alone, not the plain server: a
//! plain server streams each slot to one client, so 1,000 clients would need 1,000
//! slots (and walsenders), which no Postgres set up for one session provides.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::Result;
use crate::cluster::{Cluster, die_with_parent_tokio, free_port};
use crate::drain::{format_lsn, message_nextlsn, ws_config};
use crate::latency::{Percentiles, TABLE_SQL, now_ns};
use crate::server::Server;

pub const NAME: &str = "fanout";
const DB: &str = "bench_fanout";
/// A client acks at most this often (every ack is a KV write).
const ACK_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize)]
pub struct FanoutCase {
    pub gateways: usize,
    pub clients: usize,
    pub rows: u64,
    pub delivered: u64,
    pub secs: f64,
    pub changes_per_sec: f64,
    pub commit_to_client: Option<Percentiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutResult {
    pub clients: usize,
    pub rate: u64,
    pub write_secs: u64,
    pub baseline: &'static str,
    pub cases: Vec<FanoutCase>,
    pub error: Option<String>,
}

impl FanoutResult {
    pub fn failed(clients: usize, rate: u64, write_secs: u64, error: String) -> FanoutResult {
        FanoutResult { clients, rate, write_secs, baseline: BASELINE, cases: Vec::new(), error: Some(error) }
    }
}

const BASELINE: &str = "one gateway serving every client (a plain server streams a slot to one client only)";

pub async fn run(cluster: &Cluster, binary: &Path, clients: usize, rate: u64, secs: u64) -> Result<FanoutResult> {
    raise_open_files();
    let scratch = crate::cluster::scratch_dir().join("nats");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let (nats_url, _nats) = start_nats(&scratch).await?;
    let pg = crate::fresh_db(cluster, DB).await?;
    pg.batch_execute(TABLE_SQL).await?;
    let server = Server::start(binary, cluster, DB, &cluster.tmpdir).await?;
    let mut result = FanoutResult::failed(clients, rate, secs, String::new());
    result.error = None;
    let mut next_id = 0u64;
    for (k, gateways) in [2usize, 1].into_iter().enumerate() {
        // A session per case, created now: its stream holds only this case's rows.
        let session = format!("fanout_{k}");
        server.create_session(&session, &["pings"]).await?;
        let _publisher = spawn(binary, cluster, &["publish", "--nats", &nats_url, "--session", &session], &scratch)?;
        let mut ports = Vec::new();
        let mut procs = Vec::new();
        for _ in 0..gateways {
            let port = free_port()?;
            procs.push(spawn_gateway(binary, cluster, &nats_url, port, &scratch).await?);
            ports.push(port);
        }
        let rows = rate * secs;
        let case = measure(&pg, &session, &ports, clients, rate, rows, next_id).await?;
        next_id += rows;
        eprintln!(
            "bench:   {} clients over {gateways} gateway(s): {} of {} changes, {:.0} changes/s; commit to client p50 {:.1} ms, p99 {:.1} ms",
            clients,
            case.delivered,
            case.rows * clients as u64,
            case.changes_per_sec,
            case.commit_to_client.as_ref().map_or(0.0, |p| p.p50_ms),
            case.commit_to_client.as_ref().map_or(0.0, |p| p.p99_ms),
        );
        result.cases.push(case);
    }
    server.stop().await?;
    drop(pg);
    crate::cleanup_db(cluster, DB).await?;
    Ok(result)
}

/// Clients connect, a writer commits `rows` one-row transactions at `rate`, and every
/// client reads until it has them all (or a deadline).
async fn measure(
    pg: &tokio_postgres::Client,
    session: &str,
    ports: &[u16],
    clients: usize,
    rate: u64,
    rows: u64,
    first_id: u64,
) -> Result<FanoutCase> {
    let committed: Arc<Vec<AtomicU64>> = Arc::new((0..rows).map(|_| AtomicU64::new(0)).collect());
    let urls: Vec<String> = (0..clients)
        .map(|i| format!("ws://127.0.0.1:{}/v2/sessions/{session}/stream?client=c{i}", ports[i % ports.len()]))
        .collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let readers = {
        let committed = committed.clone();
        std::thread::spawn(move || -> Result<Vec<(u64, Vec<i64>, u64)>> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(read_all(urls, committed, rows, first_id, ready_tx))
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(120)).map_err(|_| "the clients did not connect within 120 s")??;
    let started = now_ns();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let t0 = tokio::time::Instant::now();
    for i in 0..rows {
        tokio::time::sleep_until(t0 + interval * i as u32).await;
        let id = (first_id + i) as i64;
        pg.execute("INSERT INTO pings VALUES ($1, $2, 'fanout')", &[&id, &((now_ns() / 1000) as i64)]).await?;
        committed[i as usize].store(now_ns(), Ordering::Relaxed);
    }
    let per_client = readers.join().map_err(|_| "a client thread panicked")??;
    let delivered: u64 = per_client.iter().map(|(n, _, _)| n).sum();
    let last = per_client.iter().map(|(_, _, at)| *at).max().unwrap_or(started);
    let secs = (last.saturating_sub(started)) as f64 / 1e9;
    let samples: Vec<i64> = per_client.into_iter().flat_map(|(_, s, _)| s).collect();
    Ok(FanoutCase {
        gateways: ports.len(),
        clients,
        rows,
        delivered,
        secs,
        changes_per_sec: if secs > 0.0 { delivered as f64 / secs } else { 0.0 },
        commit_to_client: Percentiles::of(samples),
    })
}

/// Every client at once: (rows received, latency samples in ns, when the last came).
async fn read_all(
    urls: Vec<String>,
    committed: Arc<Vec<AtomicU64>>,
    rows: u64,
    first_id: u64,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<Vec<(u64, Vec<i64>, u64)>> {
    let mut sockets = Vec::with_capacity(urls.len());
    for url in &urls {
        // A gateway knows a session once its publisher has made the session's stream in
        // JetStream: until then it answers 404, so the first clients try again a while.
        let mut tries = 0;
        loop {
            match tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), false).await {
                Ok((ws, _)) => {
                    sockets.push(ws);
                    break;
                }
                Err(_) if tries < 100 && sockets.is_empty() => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(format!("{url}: {e}").into()));
                    return Err(format!("{url}: {e}").into());
                }
            }
        }
    }
    let _ = ready.send(Ok(()));
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            let committed = committed.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(rows as usize);
                let (mut got, mut last_at, mut last_ack) = (0u64, 0u64, Instant::now());
                let deadline = tokio::time::Instant::now() + Duration::from_secs(rows / 10 + 120);
                while got < rows {
                    let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, ws.next()).await else { break };
                    let Message::Text(text) = message else { continue };
                    let at = now_ns();
                    let Some(id) = first_row_id(text.as_bytes()) else { continue };
                    let Some(i) = id.checked_sub(first_id).filter(|i| *i < rows) else { continue };
                    let c = committed[i as usize].load(Ordering::Relaxed);
                    if c > 0 {
                        samples.push(at as i64 - c as i64);
                    }
                    got += 1;
                    last_at = at;
                    if last_ack.elapsed() >= ACK_EVERY || got == rows {
                        if let Some(lsn) = message_nextlsn(text.as_bytes()) {
                            let ack = format!(r#"{{"lsn":"{}"}}"#, format_lsn(lsn));
                            let _ = ws.send(Message::Text(ack.into())).await;
                        }
                        last_ack = Instant::now();
                    }
                }
                let _ = ws.close(None).await;
                (got, samples, last_at)
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await?);
    }
    Ok(out)
}

/// The row id: the first value of the first change's `columnvalues`.
fn first_row_id(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"columnvalues\":[";
    let at = memchr::memmem::find(text, KEY)? + KEY.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits]).ok()?.parse().ok()
}

fn nats_binary() -> Option<PathBuf> {
    ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

async fn start_nats(dir: &Path) -> Result<(String, tokio::process::Child)> {
    let bin = nats_binary().ok_or("nats-server not found (make nats, or apt-get install nats-server)")?;
    let port = free_port()?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("js"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nats-server.log"))?)
        .kill_on_drop(true);
    die_with_parent_tokio(&mut cmd);
    let child = cmd.spawn()?;
    wait_listening(port).await?;
    Ok((format!("nats://127.0.0.1:{port}"), child))
}

fn spawn(binary: &Path, cluster: &Cluster, args: &[&str], logdir: &Path) -> Result<tokio::process::Child> {
    let log = std::fs::File::create(logdir.join(format!("{}.log", args.join("_").replace(['/', ':'], "_"))))?;
    let mut cmd = crate::server::command(binary, cluster, DB, log)?;
    cmd.args(args);
    Ok(cmd.spawn()?)
}

async fn spawn_gateway(
    binary: &Path,
    cluster: &Cluster,
    nats: &str,
    port: u16,
    logdir: &Path,
) -> Result<tokio::process::Child> {
    let port_arg = port.to_string();
    let args = [
        "--serverhost",
        "127.0.0.1",
        "--serverport",
        &port_arg,
        "--max-connections",
        "4096",
        "gateway",
        "--nats",
        nats,
    ];
    let child = spawn(binary, cluster, &args, logdir)?;
    wait_listening(port).await?;
    Ok(child)
}

async fn wait_listening(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!("nothing listens on port {port} after 20 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// 1,000 client sockets need more than the usual 1,024 open files.
fn raise_open_files() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
