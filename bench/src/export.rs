//! `export_1m`: a v2 session's snapshot of a 1M-row table as NDJSON, read to the end,
//! against Postgres writing the same rows as JSON itself (`COPY (SELECT row_to_json(t)
//! ...) TO STDOUT`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::cpu::{Snapshot, process_secs};
use crate::server::Server;
use crate::workload::{self, thousands};
use crate::{Result, ndjson};

pub const NAME: &str = "export_1m";
const DB: &str = "bench_export_1m";
const SESSION: &str = "export";
pub const SNAPSHOT_PATH: &str = "/v2/sessions/export/snapshot/items";
pub const COPY_SQL: &str = "COPY (SELECT row_to_json(t) FROM items t) TO STDOUT";
const NDJSON: &str = "application/x-ndjson";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `GET /v2/sessions/export/snapshot/items`, `Accept: application/x-ndjson`.
    Server,
    /// `COPY (SELECT row_to_json(t) FROM items t) TO STDOUT` through tokio-postgres.
    CopyRowToJson,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Server => "server: GET …/snapshot/items (NDJSON)",
            Via::CopyRowToJson => "Postgres: COPY (SELECT row_to_json(t) …) TO STDOUT",
        }
    }
}

/// One read of the whole table.
#[derive(Debug, Clone, Serialize)]
pub struct ExportRun {
    pub via: Via,
    /// 1-based position among the runs.
    pub order: usize,
    pub rows: u64,
    /// Bytes of JSON lines, newlines included (COPY: as it sends them).
    pub bytes: u64,
    /// From sending the request to the last byte.
    pub secs: f64,
    /// From sending the request to the response head (server) or the first row (COPY).
    pub first_byte_secs: f64,
    pub rows_per_sec: f64,
    pub mb_per_sec: f64,
    /// CPU seconds during the run: the database's backends, the server, the bench.
    pub postgres_cpu_secs: f64,
    pub server_cpu_secs: f64,
    pub bench_cpu_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportResult {
    pub name: String,
    pub description: String,
    pub rows: u64,
    pub write_secs: f64,
    /// Every run, in order (the two ways alternate which goes first).
    pub runs: Vec<ExportRun>,
    /// The fastest run of each way.
    pub server: Option<ExportRun>,
    pub copy: Option<ExportRun>,
    /// Server rows/s ÷ COPY rows/s (best of each).
    pub ratio: Option<f64>,
    /// VmHWM of the server process, which served only this export.
    pub server_peak_rss_mib: Option<f64>,
    pub server_max_sampled_rss_mib: f64,
    pub error: Option<String>,
}

impl ExportResult {
    fn new(rows: u64) -> ExportResult {
        ExportResult {
            name: NAME.into(),
            description: format!("export of {} rows as NDJSON", thousands(rows)),
            rows,
            write_secs: 0.0,
            runs: Vec::new(),
            server: None,
            copy: None,
            ratio: None,
            server_peak_rss_mib: None,
            server_max_sampled_rss_mib: 0.0,
            error: None,
        }
    }

    pub fn failed(scale: u64, error: String) -> ExportResult {
        ExportResult { error: Some(error), ..ExportResult::new(rows(scale)) }
    }

    fn best(&self, via: Via) -> Option<ExportRun> {
        self.runs.iter().filter(|r| r.via == via).min_by(|a, b| a.secs.total_cmp(&b.secs)).cloned()
    }
}

fn rows(scale: u64) -> u64 {
    (1_000_000 / scale).max(1)
}

/// Writes the table, creates the session after it, and reads the table `runs` times
/// each way, alternating which goes first.
pub async fn run(
    cluster: &Cluster,
    binary: &std::path::Path,
    scale: u64,
    runs: usize,
    limit: Duration,
) -> Result<ExportResult> {
    let mut result = ExportResult::new(rows(scale));
    let (client, write_secs) = workload::items_at_rest(cluster, DB, NAME, result.rows).await?;
    result.write_secs = write_secs;
    eprintln!("bench:   wrote {} rows in {:.1} s", thousands(result.rows), result.write_secs);
    let server = Server::start(binary, cluster, DB, &cluster.tmpdir).await?;
    let outcome = measure(cluster, &server, &client, runs, limit, &mut result).await;
    result.server_peak_rss_mib = server.peak_rss_kib().map(|k| k as f64 / 1024.0);
    result.server_max_sampled_rss_mib = server.max_sampled_rss_kib.load(Ordering::Relaxed) as f64 / 1024.0;
    let stopped = server.stop().await;
    drop(client);
    crate::cleanup_db(cluster, DB).await?;
    outcome?;
    stopped?;
    result.server = result.best(Via::Server);
    result.copy = result.best(Via::CopyRowToJson);
    result.ratio = match (&result.server, &result.copy) {
        (Some(s), Some(c)) if c.rows_per_sec > 0.0 => Some(s.rows_per_sec / c.rows_per_sec),
        _ => None,
    };
    Ok(result)
}

async fn measure(
    cluster: &Cluster,
    server: &Server,
    client: &tokio_postgres::Client,
    runs: usize,
    limit: Duration,
    result: &mut ExportResult,
) -> Result<()> {
    server.create_session(SESSION, &["items"]).await?;
    // Its own connection, left out of the backends it measures.
    let watcher = cluster.client(DB).await?;
    for r in 0..runs {
        let order = if r % 2 == 0 { [Via::Server, Via::CopyRowToJson] } else { [Via::CopyRowToJson, Via::Server] };
        for via in order {
            let before = backends_cpu(&watcher).await?;
            let cpu0 = Snapshot::take(Some(server.pid));
            let deadline = tokio::time::Instant::now() + limit;
            let (rows, bytes, secs, first_byte_secs) = match via {
                Via::Server => through_server(server.port, deadline).await?,
                Via::CopyRowToJson => with_copy(client, deadline).await?,
            };
            let (bench_cpu_secs, server_cpu_secs) = Snapshot::take(Some(server.pid)).since(&cpu0);
            let after = backends_cpu(&watcher).await?;
            let postgres_cpu_secs = after.iter().map(|(pid, now)| now - before.get(pid).unwrap_or(&0.0)).sum();
            if rows != result.rows {
                return Err(format!("{} gave {rows} rows, expected {}", via.label(), result.rows).into());
            }
            let run = ExportRun {
                via,
                order: result.runs.len() + 1,
                rows,
                bytes,
                secs,
                first_byte_secs,
                rows_per_sec: rows as f64 / secs,
                mb_per_sec: bytes as f64 / 1e6 / secs,
                postgres_cpu_secs,
                server_cpu_secs,
                bench_cpu_secs,
            };
            eprintln!(
                "bench:   {}: {} rows, {:.1} MB in {:.2} s (first byte {:.3} s) = {:.0} rows/s, {:.1} MB/s; \
                 CPU s: postgres {:.2}, server {:.2}, bench {:.2}",
                via.label(),
                thousands(rows),
                bytes as f64 / 1e6,
                secs,
                first_byte_secs,
                run.rows_per_sec,
                run.mb_per_sec,
                postgres_cpu_secs,
                server_cpu_secs,
                bench_cpu_secs
            );
            result.runs.push(run);
        }
    }
    Ok(())
}

/// The snapshot as NDJSON through the server: rows, bytes, seconds, seconds to the head.
async fn through_server(port: u16, deadline: tokio::time::Instant) -> Result<(u64, u64, f64, f64)> {
    let t0 = Instant::now();
    let body = ndjson::get(port, SNAPSHOT_PATH, NDJSON, deadline).await?;
    let tail = String::from_utf8_lossy(&body.tail);
    if body.status != 200 {
        return Err(format!("GET {SNAPSHOT_PATH} answered {}: {tail}", body.status).into());
    }
    if !body.content_type.starts_with(NDJSON) {
        return Err(format!("GET {SNAPSHOT_PATH} answered content-type {:?}", body.content_type).into());
    }
    if body.bytes > 0 && !body.tail.ends_with(b"\n") {
        return Err(format!("GET {SNAPSHOT_PATH}: the body does not end with a newline: …{tail}").into());
    }
    if body.lines > 0 {
        let first: serde_json::Value = serde_json::from_slice(&body.first_line)
            .map_err(|e| format!("GET {SNAPSHOT_PATH}: the first line is not JSON ({e})"))?;
        if first.get("id").is_none() {
            return Err(format!("GET {SNAPSHOT_PATH}: the first line has no id: {first}").into());
        }
    }
    let secs = body.end_at.duration_since(t0).as_secs_f64();
    Ok((body.lines, body.bytes, secs, body.head_at.duration_since(t0).as_secs_f64()))
}

/// Postgres writing each row as JSON itself: rows, bytes, seconds, seconds to the first row.
async fn with_copy(client: &tokio_postgres::Client, deadline: tokio::time::Instant) -> Result<(u64, u64, f64, f64)> {
    let read = async {
        let t0 = Instant::now();
        let mut stream = std::pin::pin!(client.copy_out(COPY_SQL).await?);
        let (mut lines, mut bytes, mut first) = (0u64, 0u64, None);
        while let Some(data) = stream.next().await {
            let data = data?;
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            bytes += data.len() as u64;
            lines += memchr::memchr_iter(b'\n', &data).count() as u64;
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
            lines,
            bytes,
            t0.elapsed().as_secs_f64(),
            first.unwrap_or(0.0),
        ))
    };
    tokio::time::timeout_at(deadline, read).await.map_err(|_| "COPY: timed out")?
}

/// CPU seconds of every other backend of the database, by pid.
async fn backends_cpu(watcher: &tokio_postgres::Client) -> Result<HashMap<i32, f64>> {
    let rows = watcher
        .query("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()", &[])
        .await?;
    let mut cpu = HashMap::new();
    for row in rows {
        let pid: i32 = row.try_get(0)?;
        if let Some(secs) = process_secs(pid as u32) {
            cpu.insert(pid, secs);
        }
    }
    Ok(cpu)
}
