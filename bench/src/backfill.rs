//! `backfill_1m`: a live backfill of the 1M-row `items` table through a session's stream,
//! against the same session's NDJSON export of the same table (the fastest way the
//! server has to send a table's rows); then the backfill again while a writer updates
//! random rows at 1,000 tx/s, the client keeping a copy of the table that is checked
//! against the table at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::Cluster;
use crate::drain::{spawn_acker, ws_config};
use crate::server::Server;
use crate::workload::{self, thousands};
use crate::{Result, ndjson};

pub const NAME: &str = "backfill_1m";
const DB: &str = "bench_backfill_1m";
const SESSION: &str = "backfill";
const EXPORT_PATH: &str = "/v2/sessions/backfill/snapshot/items";
/// The writer's rate while the second backfill runs.
pub const WRITE_RATE: u64 = 1_000;

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub rows: u64,
    pub chunks: u64,
    pub secs: f64,
    pub rows_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackfillResult {
    pub name: &'static str,
    pub rows: u64,
    /// The session's snapshot as NDJSON, read to the end (best of the runs).
    pub export: Option<Run>,
    /// The backfill with nothing else writing (best of the runs).
    pub backfill: Option<Run>,
    /// backfill rows/s ÷ export rows/s.
    pub ratio: Option<f64>,
    /// The backfill while the writer runs at [`WRITE_RATE`].
    pub under_writes: Option<Run>,
    /// Updates the writer committed during it, and the rate it achieved.
    pub writes: u64,
    pub write_rate: f64,
    /// Rows of the client's copy that differ from the table once the writes are in (0:
    /// equal), and the table's rows.
    pub differing_rows: Option<u64>,
    /// VmHWM of the server process, which served only this case.
    pub server_peak_rss_mib: Option<f64>,
    pub error: Option<String>,
}

impl BackfillResult {
    fn new(rows: u64) -> BackfillResult {
        BackfillResult {
            name: NAME,
            rows,
            export: None,
            backfill: None,
            ratio: None,
            under_writes: None,
            writes: 0,
            write_rate: 0.0,
            differing_rows: None,
            server_peak_rss_mib: None,
            error: None,
        }
    }

    pub fn failed(scale: u64, error: String) -> BackfillResult {
        BackfillResult { error: Some(error), ..BackfillResult::new(rows(scale)) }
    }
}

fn rows(scale: u64) -> u64 {
    (1_000_000 / scale).max(1)
}

pub async fn run(
    cluster: &Cluster,
    binary: &std::path::Path,
    scale: u64,
    runs: usize,
    limit: Duration,
) -> Result<BackfillResult> {
    let mut result = BackfillResult::new(rows(scale));
    let (client, _) = workload::items_at_rest(cluster, DB, NAME, result.rows).await?;
    let server = Server::start(binary, cluster, DB, &cluster.tmpdir).await?;
    let outcome = measure(cluster, &server, runs, limit, &mut result).await;
    result.server_peak_rss_mib = server.peak_rss_kib().map(|k| k as f64 / 1024.0);
    let stopped = server.stop().await;
    drop(client);
    crate::cleanup_db(cluster, DB).await?;
    outcome?;
    stopped?;
    result.ratio = match (&result.backfill, &result.export) {
        (Some(b), Some(e)) if e.rows_per_sec > 0.0 => Some(b.rows_per_sec / e.rows_per_sec),
        _ => None,
    };
    Ok(result)
}

async fn measure(
    cluster: &Cluster,
    server: &Server,
    runs: usize,
    limit: Duration,
    result: &mut BackfillResult,
) -> Result<()> {
    server.create_session(SESSION, &["items"]).await?;
    let url = format!("ws://127.0.0.1:{}/v2/sessions/{SESSION}/stream", server.port);
    for r in 0..runs {
        let deadline = tokio::time::Instant::now() + limit;
        // Alternating which goes first.
        let first = if r % 2 == 0 { None } else { Some(read_export(server.port, deadline).await?) };
        let quiet = backfill(server, &url, deadline, None).await?;
        let export = match first {
            Some(e) => e,
            None => read_export(server.port, deadline).await?,
        };
        eprintln!(
            "bench:   export {} rows in {:.2} s = {:.0} rows/s; backfill {} rows in {} chunks in {:.2} s = {:.0} rows/s",
            thousands(export.rows),
            export.secs,
            export.rows_per_sec,
            thousands(quiet.rows),
            quiet.chunks,
            quiet.secs,
            quiet.rows_per_sec
        );
        if quiet.rows != result.rows {
            return Err(format!("the backfill sent {} rows, expected {}", quiet.rows, result.rows).into());
        }
        keep_best(&mut result.export, export);
        keep_best(&mut result.backfill, quiet);
    }
    let writer = Writer::start(cluster, result.rows).await?;
    let deadline = tokio::time::Instant::now() + limit;
    let mut copy = HashMap::with_capacity(result.rows as usize);
    let run = backfill(server, &url, deadline, Some(&mut copy));
    let under = run.await;
    let (writes, secs) = writer.stop().await?;
    let under = under?;
    result.writes = writes;
    result.write_rate = writes as f64 / secs;
    let differing = check_copy(cluster, server, &url, deadline, &mut copy).await?;
    eprintln!(
        "bench:   under {:.0} tx/s of updates: backfill {} rows in {:.2} s = {:.0} rows/s; {} rows of the copy differ",
        result.write_rate,
        thousands(under.rows),
        under.secs,
        under.rows_per_sec,
        differing
    );
    result.under_writes = Some(under);
    result.differing_rows = Some(differing);
    Ok(())
}

fn keep_best(best: &mut Option<Run>, run: Run) {
    if best.as_ref().is_none_or(|b| run.rows_per_sec > b.rows_per_sec) {
        *best = Some(run);
    }
}

async fn read_export(port: u16, deadline: tokio::time::Instant) -> Result<Run> {
    let t0 = Instant::now();
    let body = ndjson::get(port, EXPORT_PATH, "application/x-ndjson", deadline).await?;
    if body.status != 200 {
        return Err(format!("GET {EXPORT_PATH} answered {}", body.status).into());
    }
    let secs = body.end_at.duration_since(t0).as_secs_f64();
    Ok(Run { rows: body.lines, chunks: 0, secs, rows_per_sec: body.lines as f64 / secs })
}

/// A copy of the table by id: (account, label) as the stream last said.
type Copy = HashMap<i64, Value>;

/// Starts a backfill of `items` and reads the session's stream until its last chunk,
/// acking every message's `nextlsn`. With `copy`, every row and change is applied to it.
async fn backfill(
    server: &Server,
    url: &str,
    deadline: tokio::time::Instant,
    mut copy: Option<&mut Copy>,
) -> Result<Run> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true).await?;
    let (sink, mut stream) = ws.split();
    let (acks, acker) = spawn_acker(sink);
    let t0 = Instant::now();
    let (status, body) = server.post(&format!("/v2/sessions/{SESSION}/backfill"), r#"{"tables":["items"]}"#).await?;
    if status != 202 {
        return Err(format!("POST backfill answered {status}: {body}").into());
    }
    let (mut rows, mut chunks) = (0u64, 0u64);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.next()).await.map_err(|_| "backfill: timed out")?;
        let Some(Ok(Message::Text(text))) = msg else {
            return Err(format!("backfill: the stream ended: {msg:?}").into());
        };
        let head = Head::of(text.as_str());
        if let Some(copy) = copy.as_deref_mut() {
            apply(copy, text.as_str())?;
        }
        if let Some(lsn) = head.nextlsn {
            let _ = acks.send(lsn);
        }
        if let Some((n, last)) = head.chunk {
            rows += n;
            chunks += 1;
            if last {
                break;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(acks);
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    drop(stream);
    done(server, deadline).await?;
    Ok(Run { rows, chunks, secs, rows_per_sec: rows as f64 / secs })
}

/// Waits until the session says its backfill is done (its last ack stored).
async fn done(server: &Server, deadline: tokio::time::Instant) -> Result<()> {
    loop {
        let (_, body) = server.get(&format!("/v2/sessions/{SESSION}")).await?;
        let view: Value = serde_json::from_str(&body)?;
        if view["backfill"]["state"] == "done" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the backfill never said done: {}", view["backfill"]).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a format 1 message's head says, read without parsing the rows.
struct Head {
    nextlsn: Option<u64>,
    /// A backfill chunk: its rows and whether it is the last.
    chunk: Option<(u64, bool)>,
}

impl Head {
    fn of(text: &str) -> Head {
        let end = text.find("\"change\":[").or_else(|| text.find("\"columnnames\":")).unwrap_or(text.len().min(512));
        let head = &text[..end];
        let nextlsn = head
            .find("\"nextlsn\":\"")
            .and_then(|at| head[at + 11..].split('"').next())
            .and_then(crate::drain::parse_lsn);
        let chunk = head.find("\"backfill\":").and_then(|at| {
            let rest = &head[at + 11..];
            let info: Value = serde_json::from_str(&rest[..rest.find('}')? + 1]).ok()?;
            (info["more"] == false).then_some((info["rows"].as_u64()?, info["last"].as_bool()?))
        });
        Head { nextlsn, chunk }
    }
}

/// Applies a format 1 message's rows and changes to the copy.
fn apply(copy: &mut Copy, text: &str) -> Result<()> {
    let m: Value = serde_json::from_str(text)?;
    let at = |names: &Value, name: &str| names.as_array()?.iter().position(|n| n == name);
    if let Some(rows) = m["rows"].as_array() {
        let (id, account) = (at(&m["columnnames"], "id").ok_or("no id")?, at(&m["columnnames"], "account"));
        for row in rows {
            let value = account.map(|i| row[i].clone()).unwrap_or(Value::Null);
            copy.insert(row[id].as_i64().ok_or("no id")?, value);
        }
    }
    for c in m["change"].as_array().into_iter().flatten() {
        match c["kind"].as_str() {
            Some("insert" | "update") => {
                let id = at(&c["columnnames"], "id").and_then(|i| c["columnvalues"][i].as_i64()).ok_or("no id")?;
                let account = at(&c["columnnames"], "account").map(|i| c["columnvalues"][i].clone());
                copy.insert(id, account.unwrap_or(Value::Null));
            }
            Some("delete") => {
                let id = at(&c["oldkeys"]["keynames"], "id").and_then(|i| c["oldkeys"]["keyvalues"][i].as_i64());
                copy.remove(&id.ok_or("no id")?);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Once the writes are in (a last update the copy must see), the rows of the copy that
/// differ from the table.
async fn check_copy(
    cluster: &Cluster,
    server: &Server,
    url: &str,
    deadline: tokio::time::Instant,
    copy: &mut Copy,
) -> Result<u64> {
    let client = cluster.client(DB).await?;
    client.execute("UPDATE items SET account = -1 WHERE id = 1", &[]).await?;
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true).await?;
    let (sink, mut stream) = ws.split();
    let (acks, acker) = spawn_acker(sink);
    while copy.get(&1) != Some(&Value::from(-1)) {
        let msg = tokio::time::timeout_at(deadline, stream.next()).await.map_err(|_| "the fence never came")?;
        let Some(Ok(Message::Text(text))) = msg else { return Err("the stream ended before the fence".into()) };
        apply(copy, text.as_str())?;
        if let Some(lsn) = Head::of(text.as_str()).nextlsn {
            let _ = acks.send(lsn);
        }
    }
    drop(acks);
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    let _ = server;
    let rows = client.query("SELECT id, account FROM items", &[]).await?;
    let mut differing = copy.len().abs_diff(rows.len()) as u64;
    for r in rows {
        let id: i64 = r.get(0);
        let account: i32 = r.get(1);
        if copy.get(&id) != Some(&Value::from(account)) {
            differing += 1;
        }
    }
    Ok(differing)
}

/// Updates one random row per transaction, at [`WRITE_RATE`] (two connections).
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    started: Instant,
}

impl Writer {
    async fn start(cluster: &Cluster, rows: u64) -> Result<Writer> {
        let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for w in 0..2u64 {
            let client = cluster.client(DB).await?;
            let (stop, count) = (stop.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(2 * 1_000_000 / WRITE_RATE));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ w;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let id = (x % rows) as i64 + 2;
                    client.execute("UPDATE items SET account = account + 1 WHERE id = $1", &[&id]).await?;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }));
        }
        Ok(Writer { stop, count, tasks, started: Instant::now() })
    }

    /// Stops the writers: the updates they committed, and over how long.
    async fn stop(self) -> Result<(u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.map_err(|e| e.to_string())??;
        }
        Ok((self.count.load(Ordering::Relaxed), self.started.elapsed().as_secs_f64()))
    }
}
