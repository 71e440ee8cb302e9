//! The figures: what goes into the JSON file, the markdown table and the chart.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::cluster::{Cluster, SETTINGS};
use crate::drain::{Drain, PLUGIN_OPTIONS, Tool, format_lsn};
use crate::export::ExportResult;
use crate::fanout::FanoutResult;
use crate::latency::Percentiles;
use crate::sessions::SessionsResult;
use crate::workload::{Workload, thousands};

/// Issue 10: the server's changes/s ÷ the fastest pg_recvlogical baseline's, on wal2json
/// and on pgoutput.
pub const TARGET_RATIO: f64 = 0.8;
pub const TARGET_RATIO_PGOUTPUT: f64 = 0.9;
/// Issue 9: the server on pgoutput against pg_recvlogical with wal2json and the server's
/// options, and against pg_recvlogical draining pgoutput.
pub const TARGET_PGOUTPUT_VS_CHUNKS: f64 = 1.3;
pub const TARGET_PGOUTPUT_VS_RECV_PGOUTPUT: f64 = 0.9;
pub const TARGET_P99_MS: f64 = 5.0;
/// Issue 10: at 10,000 one-row transactions/s the server keeps up with p99 at most this.
pub const TARGET_P99_MS_10K: f64 = 15.0;
pub const TARGET_RSS_MIB: f64 = 64.0;
/// Issue 10: 50 sessions at once reach this share of one session's changes/s.
pub const TARGET_SESSIONS_RATIO: f64 = 0.8;
/// Issue 10: a snapshot export as NDJSON, rows per second.
pub const TARGET_EXPORT_ROWS_PER_SEC: f64 = 150_000.0;
/// "Keeping up": every row arrived, the writer held the rate, and p99 stayed below this
/// (a backlog that grows during the run shows up in the top percentile).
pub const KEEP_UP_P99_MS: f64 = 100.0;

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub os: String,
    pub kernel: String,
    pub postgres: String,
    pub wal2json: String,
    /// 1-minute load average when the bench started and ended: other work on the
    /// machine shows here.
    pub loadavg_start: String,
    pub loadavg_end: String,
}

#[derive(Debug, Serialize)]
pub struct Setup {
    pub quick: bool,
    pub runs_per_tool: usize,
    pub latency_secs: u64,
    pub postgres_settings: Vec<String>,
    pub wal2json_options: Vec<String>,
    pub server_binary: String,
    /// The commit the bench ran at (the repository root under make), `-dirty` when the
    /// server's sources (src/, Cargo.toml, Cargo.lock) differ from it.
    pub server_commit: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Results {
    /// UTC, when the bench started.
    pub date: String,
    pub duration_secs: f64,
    pub machine: Machine,
    pub setup: Setup,
    pub workloads: Vec<WorkloadResult>,
    /// `sessions_50`: 50 v2 sessions streaming at once against one alone.
    pub sessions: Option<SessionsResult>,
    /// `export_1m`: a session's snapshot as NDJSON against COPY of row_to_json.
    pub export: Option<ExportResult>,
    /// `backfill_1m`: a live backfill against the NDJSON export, then under writes.
    pub backfill: Option<crate::backfill::BackfillResult>,
    /// `fanout`: many clients of one session through NATS JetStream gateways.
    pub fanout: Option<FanoutResult>,
    pub latency: Vec<LatencyResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Best {
    pub changes: u64,
    pub bytes: u64,
    pub secs: f64,
    pub changes_per_sec: f64,
    pub mb_per_sec: f64,
    /// changes/s of the slowest drain of the same tool (equal with one run).
    pub slowest_changes_per_sec: f64,
}

impl Best {
    fn of(drains: &[Drain], tool: Tool) -> Option<Best> {
        let d = drains.iter().filter(|d| d.tool == tool).min_by(|a, b| a.secs.total_cmp(&b.secs))?;
        let slowest = drains.iter().filter(|d| d.tool == tool).max_by(|a, b| a.secs.total_cmp(&b.secs))?;
        Some(Best {
            changes: d.changes,
            bytes: d.bytes,
            secs: d.secs,
            changes_per_sec: d.changes_per_sec(),
            mb_per_sec: d.mb_per_sec(),
            slowest_changes_per_sec: slowest.changes_per_sec(),
        })
    }

    /// `best (slowest)` when the runs differ by more than 10%.
    fn rate_cell(&self) -> String {
        if self.slowest_changes_per_sec < 0.9 * self.changes_per_sec {
            format!("{} ({})", fmt_rate(self.changes_per_sec), fmt_rate(self.slowest_changes_per_sec))
        } else {
            fmt_rate(self.changes_per_sec)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub name: String,
    pub description: String,
    pub transactions: u64,
    pub rows: u64,
    pub write_secs: f64,
    pub end_lsn: String,
    /// Every drain, in the order they ran.
    pub drains: Vec<Drain>,
    /// The fastest drain of each tool.
    pub server: Option<Best>,
    pub server_pgoutput: Option<Best>,
    /// The server on wal2json, read by Python `websockets`.
    pub server_python: Option<Best>,
    /// pg_recvlogical with wal2json and the server's options (write-in-chunks).
    pub pg_recvlogical: Option<Best>,
    /// pg_recvlogical with wal2json's default output, one message per transaction.
    pub pg_recvlogical_whole: Option<Best>,
    /// pg_recvlogical draining pgoutput (binary, no JSON).
    pub pg_recvlogical_pgoutput: Option<Best>,
    /// The pg_recvlogical drain with the most changes/s.
    pub fastest_baseline: Option<Tool>,
    /// server (wal2json) changes/s ÷ pg_recvlogical with the server's options.
    pub ratio: Option<f64>,
    /// server (wal2json) ÷ the fastest baseline.
    pub ratio_to_fastest: Option<f64>,
    /// server on pgoutput ÷ the fastest baseline.
    pub pgoutput_ratio_to_fastest: Option<f64>,
    /// server on pgoutput ÷ pg_recvlogical with wal2json and the server's options.
    pub pgoutput_ratio_to_chunks: Option<f64>,
    /// server on pgoutput ÷ pg_recvlogical draining pgoutput.
    pub pgoutput_ratio_to_recv_pgoutput: Option<f64>,
    /// VmHWM of the server process, which served this workload only.
    pub server_peak_rss_mib: Option<f64>,
    /// Highest VmRSS seen by a 20 ms sampler.
    pub server_max_sampled_rss_mib: f64,
    pub error: Option<String>,
}

impl WorkloadResult {
    pub fn new(
        w: &Workload,
        write_secs: f64,
        end: u64,
        drains: Vec<Drain>,
        peak_kib: Option<u64>,
        sampled_kib: u64,
    ) -> WorkloadResult {
        let server = Best::of(&drains, Tool::Server);
        let server_pgoutput = Best::of(&drains, Tool::ServerPgoutput);
        let server_python = Best::of(&drains, Tool::ServerPython);
        let recv = Best::of(&drains, Tool::PgRecvlogical);
        let whole = Best::of(&drains, Tool::PgRecvlogicalWhole);
        let recv_pgoutput = Best::of(&drains, Tool::PgRecvlogicalPgoutput);
        let ratio_of = |a: &Option<Best>, b: &Option<Best>| match (a, b) {
            (Some(a), Some(b)) if b.changes_per_sec > 0.0 => Some(a.changes_per_sec / b.changes_per_sec),
            _ => None,
        };
        let baselines = [
            (Tool::PgRecvlogical, &recv),
            (Tool::PgRecvlogicalWhole, &whole),
            (Tool::PgRecvlogicalPgoutput, &recv_pgoutput),
        ];
        let fastest = baselines
            .iter()
            .filter_map(|(t, b)| b.as_ref().map(|b| (*t, b)))
            .max_by(|a, b| a.1.changes_per_sec.total_cmp(&b.1.changes_per_sec));
        let fastest_best = fastest.map(|(_, b)| b.clone());
        let mut error = None;
        for d in &drains {
            if d.changes != w.rows() {
                error =
                    Some(format!("{} on {} saw {} changes, expected {}", d.tool.label(), d.slot, d.changes, w.rows()));
            }
        }
        // Every JSON drain must deliver the same bytes: the server's on either plugin and
        // pg_recvlogical's wal2json ones.
        for (tool, b) in
            [(Tool::Server, &server), (Tool::ServerPgoutput, &server_pgoutput), (Tool::PgRecvlogicalWhole, &whole)]
        {
            if let (Some(b), Some(r)) = (b, &recv)
                && b.bytes != r.bytes
            {
                error.get_or_insert(format!(
                    "{} delivered {} bytes, pg_recvlogical {}",
                    tool.label(),
                    b.bytes,
                    r.bytes
                ));
            }
        }
        WorkloadResult {
            name: w.name.into(),
            description: w.describe(),
            transactions: w.transactions,
            rows: w.rows(),
            write_secs,
            end_lsn: format_lsn(end),
            ratio: ratio_of(&server, &recv),
            ratio_to_fastest: ratio_of(&server, &fastest_best),
            pgoutput_ratio_to_fastest: ratio_of(&server_pgoutput, &fastest_best),
            pgoutput_ratio_to_chunks: ratio_of(&server_pgoutput, &recv),
            pgoutput_ratio_to_recv_pgoutput: ratio_of(&server_pgoutput, &recv_pgoutput),
            fastest_baseline: fastest.map(|(t, _)| t),
            drains,
            server,
            server_pgoutput,
            server_python,
            pg_recvlogical: recv,
            pg_recvlogical_whole: whole,
            pg_recvlogical_pgoutput: recv_pgoutput,
            server_peak_rss_mib: peak_kib.map(|k| k as f64 / 1024.0),
            server_max_sampled_rss_mib: sampled_kib as f64 / 1024.0,
            error,
        }
    }

    pub fn failed(w: &Workload, error: String) -> WorkloadResult {
        WorkloadResult {
            name: w.name.into(),
            description: w.describe(),
            transactions: w.transactions,
            rows: w.rows(),
            write_secs: 0.0,
            end_lsn: String::new(),
            drains: Vec::new(),
            server: None,
            server_pgoutput: None,
            server_python: None,
            pg_recvlogical: None,
            pg_recvlogical_whole: None,
            pg_recvlogical_pgoutput: None,
            fastest_baseline: None,
            ratio: None,
            ratio_to_fastest: None,
            pgoutput_ratio_to_fastest: None,
            pgoutput_ratio_to_chunks: None,
            pgoutput_ratio_to_recv_pgoutput: None,
            server_peak_rss_mib: None,
            server_max_sampled_rss_mib: 0.0,
            error: Some(error),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// Target rate, one-row transactions per second.
    pub rate: u64,
    /// Who received the rows: the server's websocket client, or pg_recvlogical (baseline).
    pub via: Tool,
    pub secs: u64,
    pub rows: u64,
    pub committed: u64,
    pub received: u64,
    /// Commits per second the writer achieved.
    pub achieved_rate: f64,
    /// Client receipt minus the writer's commit completion (negative clamped to 0).
    pub commit_to_receipt: Option<Percentiles>,
    /// Client receipt minus the send time carried in the row.
    pub send_to_receipt: Option<Percentiles>,
    /// Rows the client had before the writer saw their INSERT return.
    pub received_before_commit_returned: u64,
    pub kept_up: bool,
    pub server_peak_rss_mib: Option<f64>,
    pub server_max_sampled_rss_mib: f64,
    /// CPU seconds from the writer's start until the client had every row.
    pub cpu: Option<LatencyCpu>,
    /// By commit time, 100 ms per bucket: rows committed then, their p50 and max latency.
    pub timeline: Vec<Bucket>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub at_ms: u64,
    pub rows: u64,
    pub p50_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyCpu {
    pub wall_secs: f64,
    pub walsender_secs: f64,
    /// The server process, or pg_recvlogical.
    pub tool_secs: f64,
    /// The bench process: the writer's client side and the websocket client.
    pub bench_secs: f64,
}

impl LatencyResult {
    pub fn failed(rate: u64, secs: u64, via: Tool, error: String) -> LatencyResult {
        LatencyResult {
            rate,
            via,
            secs,
            rows: rate * secs,
            committed: 0,
            received: 0,
            achieved_rate: 0.0,
            commit_to_receipt: None,
            send_to_receipt: None,
            received_before_commit_returned: 0,
            kept_up: false,
            server_peak_rss_mib: None,
            server_max_sampled_rss_mib: 0.0,
            cpu: None,
            timeline: Vec::new(),
            error: Some(error),
        }
    }
}

impl Results {
    pub fn new(cluster: &Cluster, quick: bool, runs: usize, latency_secs: u64, server: &Path) -> Results {
        Results {
            date: utc_now(),
            duration_secs: 0.0,
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
                cpu: proc_field("/proc/cpuinfo", "model name").unwrap_or_default(),
                memory_gib: proc_field("/proc/meminfo", "MemTotal")
                    .and_then(|v| v.trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map_or(0.0, |kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0),
                os: std::fs::read_to_string("/etc/os-release")
                    .ok()
                    .and_then(|s| {
                        s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
                    })
                    .unwrap_or_default(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().into(),
                postgres: cluster.version.clone(),
                wal2json: output("dpkg-query", &["-W", "-f", "${Version}", "postgresql-15-wal2json"], None)
                    .unwrap_or_else(|| "unknown".into()),
                loadavg_start: loadavg(),
                loadavg_end: String::new(),
            },
            setup: Setup {
                quick,
                runs_per_tool: runs,
                latency_secs,
                postgres_settings: SETTINGS.iter().map(|s| s.to_string()).collect(),
                wal2json_options: PLUGIN_OPTIONS.iter().map(|s| s.to_string()).collect(),
                server_binary: server.display().to_string(),
                server_commit: server_commit(),
                notes: vec![
                    "changes/s and MB/s: wall clock from opening the stream (websocket request; spawning \
                     pg_recvlogical) to the last transaction of the workload; the fastest of the runs of each \
                     tool counts, the tools alternate which goes first"
                        .into(),
                    "MB = 10^6 bytes of wal2json output (the same bytes both ways; pg_recvlogical's newlines \
                     are not counted); RSS in MiB (VmHWM of a server process that served only that workload)"
                        .into(),
                    "the websocket client acks every transaction's nextlsn; pg_recvlogical writes to tmpfs".into(),
                    "latency: client receipt minus commit completion as the writer saw it (INSERT returned, \
                     synchronous_commit=on), one monotonic clock; p50/p99/max over every row of the run"
                        .into(),
                ],
            },
            workloads: Vec::new(),
            sessions: None,
            export: None,
            backfill: None,
            fanout: None,
            latency: Vec::new(),
        }
    }

    pub fn finish(&mut self, took: Duration) {
        self.duration_secs = (took.as_secs_f64() * 10.0).round() / 10.0;
        self.machine.loadavg_end = loadavg();
    }

    /// One line about the machine and the run, for under the table and the chart.
    pub fn machine_line(&self) -> String {
        let m = &self.machine;
        format!(
            "{} cores ({}), {} GiB, {}; {}, wal2json {}; server {}; {} UTC; load avg {} → {}",
            m.cores,
            m.cpu,
            m.memory_gib,
            m.os,
            m.postgres.replace("postgres (PostgreSQL) ", "PostgreSQL "),
            m.wal2json,
            self.setup.server_commit,
            self.date.replace('T', " ").trim_end_matches('Z'),
            m.loadavg_start,
            m.loadavg_end
        )
    }
}

pub fn fmt_rate(x: f64) -> String {
    thousands(x.round() as u64)
}

pub fn mark(ok: bool) -> &'static str {
    if ok { "" } else { " ✗" }
}

/// The markdown report (stdout, bench/README.md).
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&throughput_tables(&r.workloads));
    if let Some(x) = &r.sessions {
        s.push_str(&sessions_table(x));
    }
    if let Some(x) = &r.export {
        s.push_str(&export_table(x));
    }
    if let Some(x) = &r.backfill {
        s.push_str(&backfill_table(x));
    }
    if let Some(x) = &r.fanout {
        s.push_str(&fanout_table(x));
    }
    if !r.latency.is_empty() {
        s.push('\n');
        s.push_str(&format!(
            "| live latency, commit → client | received by | achieved tx/s | received | p50 ms | p99 ms (≤ {TARGET_P99_MS:.0} at 1,000/s, ≤ {TARGET_P99_MS_10K:.0} at 10,000/s) | max ms | send → client p99 ms | kept up | server peak RSS MiB |\n"
        ));
        s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n");
        for l in &r.latency {
            let rss = l.server_peak_rss_mib.map_or("–".into(), |m| format!("{m:.1}{}", mark(m <= TARGET_RSS_MIB)));
            let kept = if l.kept_up {
                "yes"
            } else if l.via.is_server() {
                "no ✗"
            } else {
                "no"
            };
            match &l.commit_to_receipt {
                Some(p) => s.push_str(&format!(
                    "| {} one-row tx/s for {} s | {} | {} | {} of {} | {:.2} | {:.2}{} | {:.1} | {} | {} | {rss} |\n",
                    thousands(l.rate),
                    l.secs,
                    l.via.label(),
                    fmt_rate(l.achieved_rate),
                    thousands(l.received),
                    thousands(l.rows),
                    p.p50_ms,
                    p.p99_ms,
                    match (l.via.is_server(), l.rate) {
                        (true, ..=1000) => mark(p.p99_ms <= TARGET_P99_MS),
                        (true, 10_000..) => mark(p.p99_ms <= TARGET_P99_MS_10K),
                        _ => "",
                    },
                    p.max_ms,
                    l.send_to_receipt.as_ref().map_or("–".into(), |p| format!("{:.2}", p.p99_ms)),
                    kept,
                )),
                None => s.push_str(&format!(
                    "| {} one-row tx/s | {} | – | – | – | – | – | – | no ✗ | {rss} |\n",
                    thousands(l.rate),
                    l.via.label()
                )),
            }
        }
    }
    s.push_str(&cpu_table(r));
    let errors: Vec<String> = r
        .workloads
        .iter()
        .filter_map(|w| w.error.as_ref().map(|e| format!("{}: {e}", w.name)))
        .chain(r.sessions.iter().filter_map(|x| x.error.as_ref().map(|e| format!("{}: {e}", x.name))))
        .chain(r.export.iter().filter_map(|x| x.error.as_ref().map(|e| format!("{}: {e}", x.name))))
        .chain(r.backfill.iter().filter_map(|x| x.error.as_ref().map(|e| format!("{}: {e}", x.name))))
        .chain(
            r.latency
                .iter()
                .filter_map(|l| l.error.as_ref().map(|e| format!("latency {} via {}: {e}", l.rate, l.via.label()))),
        )
        .collect();
    if !errors.is_empty() {
        s.push_str("\nErrors:\n");
        for e in errors {
            s.push_str(&format!("- {e}\n"));
        }
    }
    s.push_str(&format!(
        "\n{}{}. Best of {} drain(s) per tool (in parentheses: the slowest, when more than 10% slower); \
         ✗ = misses the target.\n",
        if r.setup.quick { "QUICK RUN (workloads 100x smaller): " } else { "" },
        r.machine_line(),
        r.setup.runs_per_tool
    ));
    s
}

/// Changes/s of every tool per workload, then the ratios the issues set targets for.
fn throughput_tables(workloads: &[WorkloadResult]) -> String {
    if workloads.is_empty() {
        return String::new();
    }
    let mut s = String::from("| workload | changes |");
    for tool in Tool::THROUGHPUT {
        s.push_str(&format!(" {} changes/s |", tool.label()));
    }
    s.push_str(&format!(" server peak RSS MiB (≤ {TARGET_RSS_MIB:.0}) |\n| --- | ---: |"));
    s.push_str(&" ---: |".repeat(Tool::THROUGHPUT.len() + 1));
    s.push('\n');
    for w in workloads {
        s.push_str(&format!("| {} | {} |", w.description, thousands(w.rows)));
        for best in [
            &w.server,
            &w.server_pgoutput,
            &w.server_python,
            &w.pg_recvlogical,
            &w.pg_recvlogical_whole,
            &w.pg_recvlogical_pgoutput,
        ] {
            s.push_str(&format!(" {} |", best.as_ref().map_or("–".into(), Best::rate_cell)));
        }
        s.push_str(&format!(" {} |\n", rss_cell(w.server_peak_rss_mib)));
    }
    s.push_str(&format!(
        "\n| workload | fastest baseline | server ÷ fastest (≥ {TARGET_RATIO}) | server on pgoutput ÷ fastest (≥ {TARGET_RATIO_PGOUTPUT}) \
         | server on pgoutput ÷ pg_recvlogical with the server's options (≥ {TARGET_PGOUTPUT_VS_CHUNKS}) \
         | server on pgoutput ÷ pg_recvlogical pgoutput (≥ {TARGET_PGOUTPUT_VS_RECV_PGOUTPUT}) | server ÷ pg_recvlogical with the server's options |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
    ));
    let cell = |v: Option<f64>, target: Option<f64>| {
        v.map_or("–".into(), |v| format!("{v:.3}{}", target.map_or("", |t| mark(v >= t))))
    };
    for w in workloads {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            w.description,
            w.fastest_baseline.map_or("–", Tool::label),
            cell(w.ratio_to_fastest, Some(TARGET_RATIO)),
            cell(w.pgoutput_ratio_to_fastest, Some(TARGET_RATIO_PGOUTPUT)),
            cell(w.pgoutput_ratio_to_chunks, Some(TARGET_PGOUTPUT_VS_CHUNKS)),
            cell(w.pgoutput_ratio_to_recv_pgoutput, Some(TARGET_PGOUTPUT_VS_RECV_PGOUTPUT)),
            cell(w.ratio, None),
        ));
    }
    s
}

fn rss_cell(mib: Option<f64>) -> String {
    mib.map_or("–".into(), |m| format!("{m:.1}{}", mark(m <= TARGET_RSS_MIB)))
}

/// One session alone, then fifty at once, on the same workload, in one server process.
fn sessions_table(x: &SessionsResult) -> String {
    let mut s = format!(
        "\n| {} | sessions | changes | wall s | aggregate changes/s | MB/s | first session done s | walsenders CPU s | server CPU s | bench CPU s | ratio to 1 session (≥ {TARGET_SESSIONS_RATIO}) | server peak RSS MiB (≤ {TARGET_RSS_MIB:.0}) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        x.description
    );
    let groups = [("1 session alone", &x.solo), ("all at once", &x.concurrent)];
    for (i, (what, g)) in groups.into_iter().enumerate() {
        let Some(g) = g else {
            s.push_str(&format!("| {what} | – | – | – | – | – | – | – | – | – | – | – |\n"));
            continue;
        };
        let ratio = match (i, x.ratio) {
            (1, Some(v)) => format!("{v:.3}{}", mark(v >= TARGET_SESSIONS_RATIO)),
            _ => "–".into(),
        };
        s.push_str(&format!(
            "| {what} | {} | {} | {:.2} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {ratio} | {} |\n",
            g.sessions,
            thousands(g.changes),
            g.secs,
            fmt_rate(g.changes_per_sec),
            g.mb_per_sec,
            g.first_done_secs,
            g.walsenders_cpu_secs,
            g.server_cpu_secs,
            g.bench_cpu_secs,
            rss_cell(g.server_peak_rss_mib)
        ));
    }
    s
}

/// The snapshot export through the server, and Postgres's own JSON rows.
fn export_table(x: &ExportResult) -> String {
    let mut s = format!(
        "\n| {} | rows/s (≥ {}) | MB/s | wall s | first byte s | Postgres CPU s | server CPU s | bench CPU s | server peak RSS MiB (≤ {TARGET_RSS_MIB:.0}) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        x.description,
        fmt_rate(TARGET_EXPORT_ROWS_PER_SEC)
    );
    for (best, via) in [(&x.server, crate::export::Via::Server), (&x.copy, crate::export::Via::CopyRowToJson)] {
        let Some(b) = best else {
            s.push_str(&format!("| {} | – | – | – | – | – | – | – | – |\n", via.label()));
            continue;
        };
        let (target, rss) = match via {
            crate::export::Via::Server => {
                (mark(b.rows_per_sec >= TARGET_EXPORT_ROWS_PER_SEC), rss_cell(x.server_peak_rss_mib))
            }
            crate::export::Via::CopyRowToJson => ("", "–".into()),
        };
        s.push_str(&format!(
            "| {} | {}{target} | {:.1} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {rss} |\n",
            via.label(),
            fmt_rate(b.rows_per_sec),
            b.mb_per_sec,
            b.secs,
            b.first_byte_secs,
            b.postgres_cpu_secs,
            b.server_cpu_secs,
            b.bench_cpu_secs
        ));
    }
    if let Some(r) = x.ratio {
        s.push_str(&format!("\nExport: server rows/s ÷ COPY rows/s = {r:.3} (best of each).\n"));
    }
    s
}

/// The live backfill against the session's NDJSON export of the same table, and the
/// backfill under writes with the check of the client's copy.
fn backfill_table(x: &crate::backfill::BackfillResult) -> String {
    let mut s = format!(
        "\n| live backfill of {} rows | rows/s | chunks | wall s |\n| --- | ---: | ---: | ---: |\n",
        crate::workload::thousands(x.rows)
    );
    let line = |label: &str, run: &Option<crate::backfill::Run>| match run {
        Some(r) if r.chunks == 0 => format!("| {label} | {} | – | {:.2} |\n", fmt_rate(r.rows_per_sec), r.secs),
        Some(r) => format!("| {label} | {} | {} | {:.2} |\n", fmt_rate(r.rows_per_sec), r.chunks, r.secs),
        None => format!("| {label} | – | – | – |\n"),
    };
    s.push_str(&line("server: GET …/snapshot/items (NDJSON export, the baseline)", &x.export));
    s.push_str(&line("server: POST …/backfill, rows in the stream, nothing else writing", &x.backfill));
    s.push_str(&line(&format!("the same under {:.0} tx/s of updates", x.write_rate), &x.under_writes));
    if let Some(r) = x.ratio {
        s.push_str(&format!(
            "\nBackfill: rows/s ÷ NDJSON export rows/s = {r:.3} (best of each; target ≥ 0.8){}.\n",
            mark(r >= 0.8)
        ));
    }
    if let Some(d) = x.differing_rows {
        s.push_str(&format!(
            "Under writes ({} updates): the client's copy {} the table ({d} rows differ); server peak RSS {}.\n",
            crate::workload::thousands(x.writes),
            if d == 0 { "equals" } else { "DIFFERS FROM" },
            rss_cell(x.server_peak_rss_mib)
        ));
    }
    s
}

/// CPU seconds of the fastest drain of each tool: which process was busy, and how much
/// of the wall time the walsender could decode.
fn cpu_table(r: &Results) -> String {
    let mut rows = String::new();
    for w in &r.workloads {
        for tool in Tool::THROUGHPUT {
            let best = w.drains.iter().filter(|d| d.tool == tool).min_by(|a, b| a.secs.total_cmp(&b.secs));
            let Some(d) = best else { continue };
            let Some(c) = d.cpu else { continue };
            let name = tool.label();
            let client = if tool.is_server() { format!("{:.2}", c.client_secs) } else { "–".to_string() };
            rows.push_str(&format!(
                "| {} | {name} | {:.2} | {:.2} ({:.0}%) | {:.2} | {client} |\n",
                w.description,
                d.secs,
                c.walsender_secs,
                100.0 * c.walsender_secs / d.secs,
                c.tool_secs
            ));
        }
    }
    for l in &r.latency {
        let Some(c) = &l.cpu else { continue };
        rows.push_str(&format!(
            "| live, {} one-row tx/s | {} | {:.2} | {:.2} ({:.0}%) | {:.2} | {:.2} (with the writer) |\n",
            thousands(l.rate),
            l.via.label(),
            c.wall_secs,
            c.walsender_secs,
            100.0 * c.walsender_secs / c.wall_secs,
            c.tool_secs,
            c.bench_secs
        ));
    }
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "\nCPU seconds during the fastest drain of each tool (walsender % = its CPU ÷ wall time):\n\n\
         | workload | drained by | wall s | walsender CPU s | server or pg_recvlogical CPU s | bench client CPU s |\n\
         | --- | --- | ---: | ---: | ---: | ---: |\n{rows}"
    )
}

fn proc_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_default()
}

fn server_commit() -> String {
    let Some(head) = output("git", &["rev-parse", "--short", "HEAD"], None) else { return "unknown".into() };
    let changed = output("git", &["status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"], None);
    if changed.is_some() { format!("{head}-dirty") } else { head }
}

fn output(cmd: &str, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// Now in UTC as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, no date crate).
fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn fanout_table(x: &FanoutResult) -> String {
    let mut s = format!(
        "\n| fanout: {} clients, {} tx/s for {} s | gateways | delivered changes | changes/s (sum over clients) | commit → client p50 ms | p99 ms |\n| --- | --- | --- | --- | --- | --- |\n",
        x.clients, x.rate, x.write_secs
    );
    if let Some(e) = &x.error {
        s.push_str(&format!("| failed: {e} | | | | | |\n"));
    }
    for c in &x.cases {
        let what = if c.gateways == 1 { "baseline: one gateway alone" } else { "over gateways" };
        let (p50, p99) = c.commit_to_client.as_ref().map_or((0.0, 0.0), |p| (p.p50_ms, p.p99_ms));
        s.push_str(&format!(
            "| {what} | {} | {} of {} | {} | {p50:.1} | {p99:.1} |\n",
            c.gateways,
            c.delivered,
            c.rows * c.clients as u64,
            fmt_rate(c.changes_per_sec)
        ));
    }
    s.push_str(&format!("\nBaseline: {}.\n", x.baseline));
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn date_format() {
        let d = super::utc_now();
        assert_eq!(d.len(), 20);
        assert!(d.starts_with("20"));
    }
}
