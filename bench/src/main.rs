//! `pgdeltastream-bench`: how close the server comes to the speed at which Postgres
//! decodes (pg_recvlogical on a twin slot), how much memory it needs, and the live
//! latency from commit to a client. See bench/README.md.

mod backfill;
mod chart;
mod cluster;
mod cpu;
mod drain;
mod export;
mod fanout;
mod latency;
mod ndjson;
mod readme;
mod report;
mod server;
mod sessions;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use cluster::Cluster;
use drain::{Drain, Tool};
use latency::{Clocks, Percentiles};
use report::{LatencyResult, Results, WorkloadResult};
use server::Server;
use workload::Workload;

pub type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// An error with its causes (tokio-postgres says only "db error" on its own).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// Throughput and latency of pgdeltastream against pg_recvlogical, on a throwaway
/// Postgres the bench starts itself.
#[derive(Parser, Debug)]
#[command(name = "pgdeltastream-bench")]
struct Args {
    /// The server binary to measure (build it first: `cargo build --release`).
    #[arg(long, default_value = "target/release/pgdeltastream")]
    server: PathBuf,
    /// Smoke run: every workload 100x smaller, 1 s of latency per rate, one drain each.
    #[arg(long)]
    quick: bool,
    /// Drains per tool and workload (alternating which tool goes first); the best counts.
    /// Default 2 (1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds of live latency per rate (default 5, 1 with --quick).
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Latency rates in transactions per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<u64>,
    /// Writer connections of the latency runs (default: 2 below 5,000 tx/s, else 8).
    #[arg(long)]
    writers: Option<usize>,
    /// Only these (one_big_tx, tx_of_100, tx_of_1, wide_rows, sessions_50, export_1m,
    /// backfill_1m, fanout, latency; `none` for none).
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// Where latest.json and latest.png go (quick.json / quick.png with --quick).
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// PostgreSQL binaries (default: the highest /usr/lib/postgresql/*/bin with wal2json).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
    /// TTF font for the chart's text.
    #[arg(long, default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")]
    font: PathBuf,
    /// Only these drains of the throughput workloads (server, server_pgoutput,
    /// pg_recvlogical, pg_recvlogical_whole, pg_recvlogical_pgoutput), e.g. to measure
    /// a server built without pgoutput.
    #[arg(long, value_delimiter = ',')]
    drains: Option<Vec<String>>,
    /// Websocket clients of the fanout case (default 1,000; 100 with --quick).
    #[arg(long)]
    fanout_clients: Option<usize>,
    /// Transactions per second written during the fanout case.
    #[arg(long, default_value_t = 100)]
    fanout_rate: u64,
    /// Seconds of writing in the fanout case (default 5; 2 with --quick).
    #[arg(long)]
    fanout_secs: Option<u64>,
    /// Keep the cluster's directory (data, postgres.log, server logs) at exit.
    #[arg(long)]
    keep: bool,
    /// Write the tables into this README between its figure markers, when the run is a
    /// full one (every workload and drain, not --quick, no failure, the default --out-dir).
    #[arg(long)]
    readme: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    latency::now_ns();
    if !args.server.is_file() {
        eprintln!("bench: server binary {} not found: run `cargo build --release` first", args.server.display());
        return ExitCode::FAILURE;
    }
    let Some(bindir) = cluster::find_bindir(args.pg_bindir.clone()) else {
        eprintln!("bench: no PostgreSQL with wal2json found (apt-get install postgresql-15 postgresql-15-wal2json)");
        return ExitCode::FAILURE;
    };
    // Long-lived children (postgres, the servers, pg_recvlogical) are spawned from this
    // thread, which lives until the end: they die with it (PR_SET_PDEATHSIG).
    let cluster = match Cluster::start(&bindir, args.keep) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("bench: {} on port {} ({})", cluster.version, cluster.port, cluster.tmpdir.display());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(&args, &cluster));
    drop(rt);
    let _ = std::fs::remove_dir_all(cluster::scratch_dir());
    match result {
        Ok(failed) => {
            eprintln!("bench: done in {:.0} s", started.elapsed().as_secs_f64());
            if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
        }
        Err(e) => {
            eprintln!("bench: {}\n--- postgres log (tail) ---\n{}", describe(&*e), cluster.log_tail());
            ExitCode::FAILURE
        }
    }
}

/// Runs everything and writes the results; true when a run failed.
async fn run(args: &Args, cluster: &Cluster) -> Result<bool> {
    let started = Instant::now();
    let quick = args.quick;
    let runs = args.runs.unwrap_or(if quick { 1 } else { 2 }).max(1);
    let latency_secs = args.latency_secs.unwrap_or(if quick { 1 } else { 5 });
    let scale = if quick { 100 } else { 1 };
    let scratch = cluster::scratch_dir();
    std::fs::create_dir_all(&scratch)?;
    let mut results = Results::new(cluster, quick, runs, latency_secs, &args.server);

    let workloads: Vec<Workload> = workload::all(scale)
        .into_iter()
        .filter(|w| args.only.as_ref().is_none_or(|only| only.iter().any(|o| o == w.name)))
        .collect();
    let mut failed = false;
    for (i, w) in workloads.iter().enumerate() {
        eprintln!("bench: {} ({})", w.name, w.describe());
        let r = match run_workload(args, cluster, w, i, runs, &scratch).await {
            Ok(r) => r,
            Err(e) => {
                let e = describe(&*e);
                eprintln!("bench: {} failed: {e}", w.name);
                WorkloadResult::failed(w, e)
            }
        };
        failed |= r.error.is_some();
        results.workloads.push(r);
    }
    let wanted = |name: &str| args.only.as_ref().is_none_or(|only| only.iter().any(|o| o == name));
    let limit = Duration::from_secs(if quick { 120 } else { 600 });
    if wanted(sessions::NAME) {
        let w = sessions::workload(scale);
        eprintln!("bench: {} (50 v2 sessions, then 1 alone, of {})", w.name, w.describe());
        let r = sessions::run(cluster, &args.server, scale, limit).await.unwrap_or_else(|e| {
            let e = describe(&*e);
            eprintln!("bench: {} failed: {e}", sessions::NAME);
            sessions::SessionsResult::failed(scale, e)
        });
        failed |= r.error.is_some();
        results.sessions = Some(r);
    }
    if wanted(export::NAME) {
        eprintln!("bench: {} (a v2 session's snapshot of items as NDJSON, against COPY of row_to_json)", export::NAME);
        let r = export::run(cluster, &args.server, scale, runs, limit).await.unwrap_or_else(|e| {
            let e = describe(&*e);
            eprintln!("bench: {} failed: {e}", export::NAME);
            export::ExportResult::failed(scale, e)
        });
        failed |= r.error.is_some();
        results.export = Some(r);
    }
    if wanted(backfill::NAME) {
        eprintln!(
            "bench: {} (a live backfill of items through a session's stream, against its NDJSON export; then under \
             {} tx/s of updates)",
            backfill::NAME,
            backfill::WRITE_RATE
        );
        let r = backfill::run(cluster, &args.server, scale, runs, limit).await.unwrap_or_else(|e| {
            let e = describe(&*e);
            eprintln!("bench: {} failed: {e}", backfill::NAME);
            backfill::BackfillResult::failed(scale, e)
        });
        failed |= r.error.is_some() || r.differing_rows.is_some_and(|d| d > 0);
        results.backfill = Some(r);
    }
    if wanted(fanout::NAME) {
        let clients = args.fanout_clients.unwrap_or(if quick { 100 } else { 1000 });
        let secs = args.fanout_secs.unwrap_or(if quick { 2 } else { 5 });
        eprintln!(
            "bench: {} ({clients} clients of one session through NATS JetStream, {} tx/s for {secs} s)",
            fanout::NAME,
            args.fanout_rate
        );
        let r = fanout::run(cluster, &args.server, clients, args.fanout_rate, secs).await.unwrap_or_else(|e| {
            let e = describe(&*e);
            eprintln!("bench: {} failed: {e}", fanout::NAME);
            fanout::FanoutResult::failed(clients, args.fanout_rate, secs, e)
        });
        failed |= r.error.is_some();
        results.fanout = Some(r);
    }
    if wanted("latency") {
        for &rate in &args.rates {
            for via in [Tool::Server, Tool::ServerPgoutput, Tool::PgRecvlogical] {
                eprintln!("bench: live latency at {rate} tx/s for {latency_secs} s through {via:?}");
                let r = match latency_case(cluster, args, rate, latency_secs, via).await {
                    Ok(r) => r,
                    Err(e) => {
                        let e = describe(&*e);
                        eprintln!("bench: latency at {rate} tx/s through {via:?} failed: {e}");
                        LatencyResult::failed(rate, latency_secs, via, e)
                    }
                };
                if let Some(p) = &r.commit_to_receipt {
                    eprintln!(
                        "bench:   {} of {} rows, writer {:.0} tx/s; p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
                        r.received, r.rows, r.achieved_rate, p.p50_ms, p.p99_ms, p.max_ms
                    );
                }
                failed |= r.error.is_some();
                results.latency.push(r);
            }
        }
    }
    results.finish(started.elapsed());

    std::fs::create_dir_all(&args.out_dir)?;
    let stem = if quick { "quick" } else { "latest" };
    let json_path = args.out_dir.join(format!("{stem}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    let png_path = args.out_dir.join(format!("{stem}.png"));
    let chart = match std::fs::read(&args.font) {
        Ok(font) => chart::draw(&results, font, &png_path).map(|()| png_path.display().to_string()),
        Err(e) => Err(format!(
            "no chart: font {}: {e} (apt-get install fonts-dejavu-core, or pass --font)",
            args.font.display()
        )
        .into()),
    };
    let tables = report::markdown(&results);
    println!("{tables}");
    eprintln!("bench: wrote {}", json_path.display());
    if let Some(readme) = &args.readme {
        write_readme(args, readme, &tables, failed);
    }
    match chart {
        Ok(p) => eprintln!("bench: wrote {p}"),
        Err(e) => eprintln!("bench: {e}"),
    }
    Ok(failed)
}

/// A partial or failed run's figures would replace a full run's: only a full one is written.
fn write_readme(args: &Args, readme: &std::path::Path, tables: &str, failed: bool) {
    let partial = args.quick || args.only.is_some() || args.drains.is_some() || failed;
    if partial || args.out_dir != std::path::Path::new("bench/results") {
        eprintln!("bench: {} left as it was (only a full run into bench/results updates it)", readme.display());
        return;
    }
    let figures = format!(
        "{tables}\n![server and server on pgoutput ÷ the fastest baseline per workload, and live latency](results/latest.png)\n"
    );
    match readme::update(readme, &figures) {
        Ok(()) => eprintln!("bench: wrote the figures into {}", readme.display()),
        Err(e) => eprintln!("bench: {e}"),
    }
}

async fn admin(cluster: &Cluster) -> Result<tokio_postgres::Client> {
    cluster.client("postgres").await
}

async fn fresh_db(cluster: &Cluster, db: &str) -> Result<tokio_postgres::Client> {
    let admin = admin(cluster).await?;
    // One statement per query: a multi-statement query is one transaction, which DROP
    // and CREATE DATABASE refuse.
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    cluster.client(db).await
}

/// Drops the database's slots and the database, and checkpoints so that the next
/// workload starts without dirty buffers to write.
async fn cleanup_db(cluster: &Cluster, db: &str) -> Result<()> {
    let admin = admin(cluster).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1", &[&db])
            .await;
        match r {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(e.into()),
        }
    }
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    admin.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// The current WAL write position: with synchronous_commit=on, past every commit so far.
async fn wal_lsn(client: &tokio_postgres::Client) -> Result<u64> {
    let row = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?;
    let s: String = row.get(0);
    drain::parse_lsn(&s).ok_or_else(|| format!("bad LSN {s}").into())
}

async fn run_workload(
    args: &Args,
    cluster: &Cluster,
    w: &Workload,
    index: usize,
    runs: usize,
    scratch: &std::path::Path,
) -> Result<WorkloadResult> {
    let db = format!("bench_{}", w.name);
    let client = fresh_db(cluster, &db).await?;
    workload::create_tables(&client).await?;
    client.batch_execute("CREATE TABLE marker (id int)").await?;
    let server = Server::start(&args.server, cluster, &db, &cluster.tmpdir).await?;
    let outcome = async {
        // Every slot exists before the first write: the server's first one from /v1/init,
        // more as SQL-created slots with names the server accepts, and the twins. The
        // publications come first: created after a slot, each would be an empty
        // transaction in its stream that the later slots do not see.
        create_publications(&client, runs).await?;
        let first = server.init().await?;
        let (status, body) = server.delete("/v1/snapshot").await?;
        if status != 200 {
            return Err(format!("DELETE /v1/snapshot answered {status}: {body}").into());
        }
        let slots = create_slots(&client, first, runs).await?;

        let t = Instant::now();
        workload::write(&client, w).await?;
        let write_secs = t.elapsed().as_secs_f64();
        let end = wal_lsn(&client).await?;
        // A transaction past `end`, so pg_recvlogical --endpos stops as soon as it reads
        // past the workload rather than at the next keepalive.
        client.batch_execute("INSERT INTO marker VALUES (1)").await?;
        eprintln!("bench:   wrote {} rows in {write_secs:.1} s, end {}", w.rows(), drain::format_lsn(end));

        let limit = Duration::from_secs(if args.quick { 120 } else { 600 });
        // Its own connection: it polls while the drains run.
        let watcher = Arc::new(cluster.client(&db).await?);
        let mut drains: Vec<Drain> = Vec::new();
        let expected = (w.rows(), w.transactions);
        for r in 0..runs {
            // Alternate which tool goes first, so none always drains a cold or warm cache.
            let mut order = Tool::THROUGHPUT;
            order.rotate_left((r + index) % Tool::THROUGHPUT.len());
            for tool in
                order.into_iter().filter(|t| args.drains.as_ref().is_none_or(|d| d.iter().any(|n| *n == t.name())))
            {
                let slot = slots.of(tool, r);
                let walsender = cpu::WalsenderWatch::start(watcher.clone(), slot.clone());
                let mut d = if tool == Tool::ServerPython {
                    drain::with_python(server.port, server.pid, &slot, end, limit).await?
                } else if tool.is_server() {
                    drain::through_server(tool, server.port, server.pid, &slot, end, limit).await?
                } else {
                    drain::with_pg_recvlogical(tool, expected, cluster, &db, &slot, end, scratch, limit).await?
                };
                if let (Some(c), Some(w)) = (d.cpu.as_mut(), walsender.finish()) {
                    c.walsender_secs = w;
                }
                d.order = drains.len() + 1;
                let c = d.cpu.unwrap_or(cpu::CpuUse { walsender_secs: 0.0, tool_secs: 0.0, client_secs: 0.0 });
                eprintln!(
                    "bench:   {} {}: {} changes, {:.1} MB in {:.2} s = {:.0} changes/s, {:.1} MB/s; \
                     CPU s: walsender {:.2}, {} {:.2}, bench {:.2}",
                    d.tool.label(),
                    d.slot,
                    d.changes,
                    d.bytes as f64 / 1e6,
                    d.secs,
                    d.changes_per_sec(),
                    d.mb_per_sec(),
                    c.walsender_secs,
                    d.tool.label(),
                    c.tool_secs,
                    c.client_secs
                );
                drains.push(d);
            }
        }
        let peak = server.peak_rss_kib();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((write_secs, end, drains, peak))
    }
    .await;
    let sampled = server.max_sampled_rss_kib.load(Ordering::Relaxed);
    let stopped = server.stop().await;
    cleanup_db(cluster, &db).await?;
    let (write_secs, end, drains, peak) = outcome?;
    stopped?;
    Ok(WorkloadResult::new(w, write_secs, end, drains, peak, sampled))
}

/// The slots of a workload's drains: one per tool and run.
struct Slots {
    names: Vec<(Tool, usize, String)>,
}

impl Slots {
    fn of(&self, tool: Tool, run: usize) -> String {
        let found = self.names.iter().find(|(t, r, _)| *t == tool && *r == run);
        found.map(|(_, _, name)| name.clone()).unwrap_or_default()
    }
}

/// The publications of the pgoutput slots, which must exist for every change their slots
/// decode: pg_recvlogical's, and one per server slot, named as the slot (as the server
/// makes them).
async fn create_publications(client: &tokio_postgres::Client, runs: usize) -> Result<()> {
    client.batch_execute(&format!("CREATE PUBLICATION {} FOR ALL TABLES", drain::PUBLICATION)).await?;
    for r in 0..runs {
        client.batch_execute(&format!("CREATE PUBLICATION delta_benchpgo{r} FOR ALL TABLES")).await?;
    }
    Ok(())
}

/// Every slot of a workload: the server's first one from /v1/init, more as SQL-created
/// slots with names the server accepts, and pg_recvlogical's twins.
async fn create_slots(client: &tokio_postgres::Client, first: String, runs: usize) -> Result<Slots> {
    let mut planned = Vec::new();
    for r in 0..runs {
        for tool in Tool::THROUGHPUT {
            let name = match tool {
                Tool::Server if r == 0 => {
                    planned.push((tool, r, first.clone()));
                    continue;
                }
                Tool::Server => format!("delta_benchrun{r}"),
                Tool::ServerPgoutput => format!("delta_benchpgo{r}"),
                Tool::ServerPython => format!("delta_benchpy{r}"),
                other => format!("twin_{}_{r}", format!("{other:?}").to_lowercase()),
            };
            planned.push((tool, r, name));
        }
    }
    for (tool, _, name) in &planned {
        if name != &first {
            client.execute("SELECT pg_create_logical_replication_slot($1, $2)", &[name, &tool.plugin()]).await?;
        }
    }
    Ok(Slots { names: planned })
}

/// What the live-latency client is: the server's websocket, or pg_recvlogical's output
/// (the baseline: the same walsender work without the server).
struct Consumer {
    reader: std::thread::JoinHandle<Result<()>>,
    /// pg_recvlogical, killed at the end (the reader then sees EOF).
    child: Option<std::process::Child>,
    slot: String,
    /// The process whose CPU counts as the tool's.
    pid: u32,
}

async fn latency_run(
    cluster: &Cluster,
    args: &Args,
    rate: u64,
    secs: u64,
    via: Tool,
    server: Option<&Server>,
) -> Result<LatencyResult> {
    let db = latency_db(rate, via);
    let n = (rate * secs) as usize;
    let warmup = 20usize;
    let clocks = Arc::new(Clocks::new(n + warmup));
    let stop = Arc::new(AtomicBool::new(false));
    let client = cluster.client(&db).await?;
    let mut consumer = match (via, server) {
        (Tool::Server | Tool::ServerPgoutput, Some(server)) => {
            let slot = if via == Tool::Server {
                let slot = server.init().await?;
                server.delete("/v1/snapshot").await?;
                slot
            } else {
                let slot = "delta_livepgo1".to_string();
                client.batch_execute(&format!("CREATE PUBLICATION {slot} FOR ALL TABLES")).await?;
                client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await?;
                slot
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = latency::spawn_client(server.port, slot.clone(), clocks.clone(), stop.clone(), tx);
            tokio::task::spawn_blocking(move || rx.recv()).await?.map_err(|_| "latency client died")??;
            Consumer { reader, child: None, slot, pid: server.pid }
        }
        (Tool::Server | Tool::ServerPgoutput, None) => return Err("no server".into()),
        (_, _) => {
            let slot = "twin_live".to_string();
            client.execute("SELECT pg_create_logical_replication_slot($1, 'wal2json')", &[&slot]).await?;
            let mut cmd = std::process::Command::new(cluster.bin("pg_recvlogical"));
            cmd.args(["-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "-d", &db])
                .args(["-S", &slot, "--start", "--no-loop", "-F", "0", "-f", "-"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            for o in drain::PLUGIN_OPTIONS {
                cmd.args(["-o", o]);
            }
            cluster::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|e| format!("pg_recvlogical: {e}"))?;
            let stdout = child.stdout.take().ok_or("pg_recvlogical: no stdout")?;
            let reader = latency::spawn_line_client(stdout, clocks.clone());
            let pid = child.id();
            Consumer { reader, child: Some(child), slot, pid }
        }
    };
    let body = async {
        // Warm-up rows (ids n..n+warmup), one at a time, until the client has them all:
        // the stream is live from end to end before the clock starts.
        for id in n..n + warmup {
            client.execute("INSERT INTO pings VALUES ($1, 0, 'warm-up')", &[&(id as i64)]).await?;
        }
        wait_received(&clocks, warmup as u64, Duration::from_secs(20)).await?;
        let walsender: Option<i32> = client
            .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&consumer.slot])
            .await?
            .get(0);
        let walsender = walsender.map(|p| p as u32);
        let cpu_of = |pid: Option<u32>| pid.and_then(cpu::process_secs).unwrap_or(0.0);
        let before = (cpu_of(walsender), cpu_of(Some(consumer.pid)), cpu::own_secs());

        let workers = args.writers.unwrap_or(if rate >= 5_000 { 8 } else { 2 }).max(1);
        let configs = (0..workers).map(|_| cluster.config(&db)).collect();
        let writer = latency::spawn_writer(configs, rate, 0, n, clocks.clone());
        let started = latency::now_ns();
        tokio::task::spawn_blocking(move || writer.join()).await?.map_err(|_| "writer panicked")??;
        // Missing rows show in the result (received < rows), not as an error.
        let _ = wait_received(&clocks, (n + warmup) as u64, Duration::from_secs(30)).await;
        let cpu = report::LatencyCpu {
            wall_secs: (latency::now_ns() - started) as f64 / 1e9,
            walsender_secs: cpu_of(walsender) - before.0,
            tool_secs: cpu_of(Some(consumer.pid)) - before.1,
            bench_secs: cpu::own_secs() - before.2,
        };
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((started, cpu))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    if let Some(child) = consumer.child.as_mut() {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = child.wait();
    }
    let reader = consumer.reader;
    let read = tokio::task::spawn_blocking(move || reader.join()).await?.map_err(|_| "client panicked")?;
    let (started, cpu) = body?;
    read?;
    let peak = server.and_then(Server::peak_rss_kib);
    let mut r = latency_result(rate, secs, n, &clocks, started, peak);
    r.via = via;
    r.cpu = Some(cpu);
    Ok(r)
}

/// One live-latency run in a fresh database: a fresh server process for the server's
/// run; pg_recvlogical needs none.
async fn latency_case(cluster: &Cluster, args: &Args, rate: u64, secs: u64, via: Tool) -> Result<LatencyResult> {
    let db = latency_db(rate, via);
    let client = fresh_db(cluster, &db).await?;
    client.batch_execute(latency::TABLE_SQL).await?;
    drop(client);
    let server = match via.is_server() {
        true => Some(Server::start(&args.server, cluster, &db, &cluster.tmpdir).await?),
        false => None,
    };
    let outcome = latency_run(cluster, args, rate, secs, via, server.as_ref()).await;
    let sampled = server.as_ref().map(|s| s.max_sampled_rss_kib.load(Ordering::Relaxed));
    let stopped = match server {
        Some(s) => s.stop().await,
        None => Ok(()),
    };
    cleanup_db(cluster, &db).await?;
    let mut r = outcome?;
    stopped?;
    r.server_max_sampled_rss_mib = sampled.unwrap_or(0) as f64 / 1024.0;
    Ok(r)
}

fn latency_db(rate: u64, via: Tool) -> String {
    match via {
        Tool::Server => format!("bench_latency_{rate}"),
        Tool::ServerPgoutput => format!("bench_latency_{rate}_pgoutput"),
        _ => format!("bench_latency_{rate}_recv"),
    }
}

async fn wait_received(clocks: &Clocks, count: u64, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while clocks.received_count.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            return Err(format!(
                "the client received {} of {count} rows within {limit:?}",
                clocks.received_count.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn latency_result(
    rate: u64,
    secs: u64,
    n: usize,
    clocks: &Clocks,
    started: u64,
    peak_kib: Option<u64>,
) -> LatencyResult {
    let load = |v: &[std::sync::atomic::AtomicU64], i: usize| v[i].load(Ordering::Relaxed);
    let mut from_commit = Vec::with_capacity(n);
    let mut from_send = Vec::with_capacity(n);
    // Latencies by commit time, in 100 ms buckets: stalls and a growing backlog show here.
    let mut buckets: Vec<Vec<i64>> = Vec::new();
    let (mut committed, mut received, mut last_commit) = (0u64, 0u64, 0u64);
    for id in 0..n {
        let (c, r) = (load(&clocks.committed, id), load(&clocks.received, id));
        if c > 0 {
            committed += 1;
            last_commit = last_commit.max(c);
        }
        if r > 0 {
            received += 1;
        }
        if c > 0 && r > 0 {
            from_commit.push(r as i64 - c as i64);
            let b = (c.saturating_sub(started) / 100_000_000) as usize;
            if buckets.len() <= b {
                buckets.resize_with(b + 1, Vec::new);
            }
            buckets[b].push((r as i64 - c as i64).max(0));
            let sent_ns = load(&clocks.sent_in_row_us, id) as i64 * 1000;
            from_send.push(r as i64 - sent_ns);
        }
    }
    // The client may see a row before the writer's task has noticed its COMMIT return.
    let early = from_commit.iter().filter(|&&d| d < 0).count() as u64;
    let span = (last_commit.max(started) - started) as f64 / 1e9;
    let achieved = if span > 0.0 { committed as f64 / span } else { 0.0 };
    let commit_to_receipt = Percentiles::of(from_commit.iter().map(|&d| d.max(0)).collect());
    let timeline = buckets
        .into_iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let rows = b.len() as u64;
            Percentiles::of(b).map(|p| report::Bucket {
                at_ms: i as u64 * 100,
                rows,
                p50_ms: p.p50_ms,
                max_ms: p.max_ms,
            })
        })
        .collect();
    let send_to_receipt = Percentiles::of(from_send);
    let kept_up = received == n as u64
        && achieved >= 0.95 * rate as f64
        && commit_to_receipt.as_ref().is_some_and(|p| p.p99_ms <= report::KEEP_UP_P99_MS);
    LatencyResult {
        rate,
        secs,
        rows: n as u64,
        committed,
        received,
        achieved_rate: achieved,
        commit_to_receipt,
        send_to_receipt,
        received_before_commit_returned: early,
        kept_up,
        server_peak_rss_mib: peak_kib.map(|k| k as f64 / 1024.0),
        server_max_sampled_rss_mib: 0.0,
        via: Tool::Server,
        cpu: None,
        timeline,
        error: None,
    }
}
