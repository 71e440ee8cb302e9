//! `sessions_50`: fifty v2 sessions streaming one workload at once, against one session
//! draining the same workload alone, in one server process.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::Cluster;
use crate::cpu::{Snapshot, process_secs};
use crate::drain::{self, Received, Until};
use crate::server::Server;
use crate::workload::{self, Shape, Workload, thousands};
use crate::{Result, describe};

pub const NAME: &str = "sessions_50";
const SESSIONS: usize = 50;
const DB: &str = "bench_sessions_50";

/// 1,000 transactions of 100 `items` rows (divided by `scale`).
pub fn workload(scale: u64) -> Workload {
    Workload { name: NAME, shape: Shape::Narrow, transactions: (1_000 / scale).max(1), rows_per_transaction: 100 }
}

/// Sessions drained at once, and what they received together.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    pub sessions: usize,
    /// Changes and wal2json bytes delivered, summed over the sessions.
    pub changes: u64,
    pub bytes: u64,
    /// From the first websocket request to the moment the last session had its last
    /// transaction.
    pub secs: f64,
    /// Aggregate: `changes / secs`.
    pub changes_per_sec: f64,
    pub mb_per_sec: f64,
    /// When the first session had all its changes, from the same start.
    pub first_done_secs: f64,
    /// CPU seconds: every walsender of the group (each whole life: it started with its
    /// stream), the server and the bench (the clients) during the drain.
    pub walsenders_cpu_secs: f64,
    pub server_cpu_secs: f64,
    pub bench_cpu_secs: f64,
    /// The server's VmHWM right after this group (the solo group runs first).
    pub server_peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionsResult {
    pub name: String,
    pub description: String,
    pub sessions: usize,
    pub transactions: u64,
    pub rows_per_session: u64,
    pub write_secs: f64,
    /// One session alone, then all the others at once, on the same workload.
    pub solo: Option<Group>,
    pub concurrent: Option<Group>,
    /// Aggregate changes/s of the concurrent sessions ÷ the solo session's changes/s.
    pub ratio: Option<f64>,
    /// VmHWM at the end (both groups; the concurrent one is the larger).
    pub server_peak_rss_mib: Option<f64>,
    /// Highest VmRSS seen by a 20 ms sampler.
    pub server_max_sampled_rss_mib: f64,
    pub error: Option<String>,
}

impl SessionsResult {
    fn new(w: &Workload) -> SessionsResult {
        SessionsResult {
            name: NAME.into(),
            description: describe_workload(w),
            sessions: SESSIONS,
            transactions: w.transactions,
            rows_per_session: w.rows(),
            write_secs: 0.0,
            solo: None,
            concurrent: None,
            ratio: None,
            server_peak_rss_mib: None,
            server_max_sampled_rss_mib: 0.0,
            error: None,
        }
    }

    pub fn failed(scale: u64, error: String) -> SessionsResult {
        SessionsResult { error: Some(error), ..SessionsResult::new(&workload(scale)) }
    }
}

fn describe_workload(w: &Workload) -> String {
    format!("{SESSIONS} sessions × {}", w.describe())
}

/// Creates the sessions (each: the workload's table, every action) and one more for the
/// solo drain, writes the workload, drains the solo session, then the fifty at once.
pub async fn run(cluster: &Cluster, binary: &std::path::Path, scale: u64, limit: Duration) -> Result<SessionsResult> {
    let w = workload(scale);
    let client = crate::fresh_db(cluster, DB).await?;
    workload::create_tables(&client).await?;
    let server = Server::start(binary, cluster, DB, &cluster.tmpdir).await?;
    let mut result = SessionsResult::new(&w);
    let outcome = measure(&server, &client, &w, limit, &mut result).await;
    result.server_max_sampled_rss_mib = server.max_sampled_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;
    let stopped = server.stop().await;
    drop(client);
    crate::cleanup_db(cluster, DB).await?;
    outcome?;
    stopped?;
    Ok(result)
}

async fn measure(
    server: &Server,
    client: &tokio_postgres::Client,
    w: &Workload,
    limit: Duration,
    result: &mut SessionsResult,
) -> Result<()> {
    let mut sessions = Vec::new();
    for name in (0..SESSIONS).map(|i| format!("s{i}")).chain(["solo".to_string()]) {
        let slot = server.create_session(&name, &["items"]).await?;
        sessions.push((name, slot));
    }
    let solo = sessions.split_off(SESSIONS);
    let t = Instant::now();
    workload::write(client, w).await?;
    result.write_secs = t.elapsed().as_secs_f64();
    eprintln!("bench:   wrote {} rows in {:.1} s", w.rows(), result.write_secs);

    let solo = drain_group(server, client, &solo, w.rows(), limit).await?;
    report_group("1 session", &solo);
    result.solo = Some(solo);
    let concurrent = drain_group(server, client, &sessions, w.rows(), limit).await?;
    report_group(&format!("{SESSIONS} sessions"), &concurrent);
    result.ratio = result.solo.as_ref().map(|s| concurrent.changes_per_sec / s.changes_per_sec);
    result.concurrent = Some(concurrent);
    result.server_peak_rss_mib = server.peak_rss_kib().map(|k| k as f64 / 1024.0);
    Ok(())
}

fn report_group(what: &str, g: &Group) {
    eprintln!(
        "bench:   {what}: {} changes, {:.1} MB in {:.2} s (first done at {:.2} s) = {:.0} changes/s, {:.1} MB/s; \
         CPU s: walsenders {:.2}, server {:.2}, bench {:.2}; server peak RSS {:.1} MiB",
        thousands(g.changes),
        g.bytes as f64 / 1e6,
        g.secs,
        g.first_done_secs,
        g.changes_per_sec,
        g.mb_per_sec,
        g.walsenders_cpu_secs,
        g.server_cpu_secs,
        g.bench_cpu_secs,
        g.server_peak_rss_mib.unwrap_or(0.0)
    );
}

/// Streams every session of `sessions` (name, slot) at once, one client task each,
/// until each has `per_session` changes. The sockets stay open until every session is
/// done, so that the walsenders can still be measured.
async fn drain_group(
    server: &Server,
    client: &tokio_postgres::Client,
    sessions: &[(String, String)],
    per_session: u64,
    limit: Duration,
) -> Result<Group> {
    let cpu0 = Snapshot::take(Some(server.pid));
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let tasks: Vec<_> = sessions
        .iter()
        .map(|(name, _)| {
            let url = format!("ws://127.0.0.1:{}/v2/sessions/{name}/stream", server.port);
            let name = name.clone();
            tokio::spawn(async move { drain::receive(&url, &name, Until::Changes(per_session), deadline).await })
        })
        .collect();
    let (mut received, mut open, mut error) = (Vec::new(), Vec::new(), None);
    for t in tasks {
        match t.await {
            Ok(Ok((r, o))) => {
                received.push(r);
                open.push(o);
            }
            Ok(Err(e)) => {
                error.get_or_insert(describe(&*e));
            }
            Err(e) => {
                error.get_or_insert(format!("a client task failed: {e}"));
            }
        }
    }
    let (bench_cpu_secs, server_cpu_secs) = Snapshot::take(Some(server.pid)).since(&cpu0);
    let slots: Vec<String> = sessions.iter().map(|(_, slot)| slot.clone()).collect();
    let walsenders = walsenders_secs(client, &slots).await;
    for o in open {
        o.close().await;
    }
    if let Some(e) = error {
        return Err(e.into());
    }
    check_counts(sessions, &received, per_session)?;
    let last = received.iter().map(|r| r.finished).max().ok_or("no session drained")?;
    let first = received.iter().map(|r| r.finished).min().ok_or("no session drained")?;
    let secs = last.duration_since(t0).as_secs_f64();
    let changes: u64 = received.iter().map(|r| r.changes).sum();
    let bytes: u64 = received.iter().map(|r| r.bytes).sum();
    Ok(Group {
        sessions: sessions.len(),
        changes,
        bytes,
        secs,
        changes_per_sec: changes as f64 / secs,
        mb_per_sec: bytes as f64 / 1e6 / secs,
        first_done_secs: first.duration_since(t0).as_secs_f64(),
        walsenders_cpu_secs: walsenders?,
        server_cpu_secs,
        bench_cpu_secs,
        server_peak_rss_mib: server.peak_rss_kib().map(|k| k as f64 / 1024.0),
    })
}

/// Every session saw exactly the workload, in the same bytes.
fn check_counts(sessions: &[(String, String)], received: &[Received], per_session: u64) -> Result<()> {
    for ((name, _), r) in sessions.iter().zip(received) {
        if r.changes != per_session {
            return Err(format!("session {name} saw {} changes, expected {per_session}", r.changes).into());
        }
        if r.bytes != received[0].bytes {
            return Err(format!(
                "session {name} received {} bytes in {} transactions, {} {} in {}",
                r.bytes, r.transactions, sessions[0].0, received[0].bytes, received[0].transactions
            )
            .into());
        }
    }
    Ok(())
}

/// CPU seconds of the walsenders streaming `slots` now.
async fn walsenders_secs(client: &tokio_postgres::Client, slots: &[String]) -> Result<f64> {
    let rows = client
        .query(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = ANY($1) AND active_pid IS NOT NULL",
            &[&slots],
        )
        .await?;
    if rows.len() != slots.len() {
        return Err(format!("{} of {} slots have a walsender", rows.len(), slots.len()).into());
    }
    let pids = rows.iter().map(|r| r.try_get::<_, i32>(0)).collect::<Result<Vec<_>, _>>()?;
    Ok(pids.into_iter().filter_map(|pid| process_secs(pid as u32)).sum())
}
