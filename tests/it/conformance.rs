//! Differential conformance: the same random workload decoded by a wal2json slot and by a
//! pgoutput slot (rendered by the server into wal2json's JSON) must stream byte-identical
//! messages, in order, in both formats. The generator is in `testkit/src/conform/`.
//!
//! `cargo test --test it conformance::` runs one fixed seed. `make conformance SEED=.. N=..`
//! runs N workloads from SEED on (`CONFORMANCE_SEED`, default random; `CONFORMANCE_N`,
//! default 20; `CONFORMANCE_SIZE` transactions each, default 150). `CONFORMANCE_AGAINST=
//! wal2json` compares two wal2json slots instead, which checks the harness itself.

use testkit::conform;
use testkit::pg as common;
use testkit::support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conform::compare::{self, Streamed};
use conform::workload::{self, END_PREFIX, Step};
use futures_util::{SinkExt, StreamExt};
use pgdeltastream::types::Lsn;
use pgdeltastream::types::wal2json::{Change, Record, Transaction};
use support::{TestServer, Ws, await_slot};
use tokio_tungstenite::tungstenite::Message;

/// A seed whose workload has one of everything the generator makes (the rare steps
/// included), at [`FIXED_SIZE`] transactions: about 10 s.
const FIXED_SEED: u64 = 24;
const FIXED_SIZE: usize = 1000;
/// Transactions per workload of `make conformance`.
const DEFAULT_SIZE: usize = 150;
/// How long a stream may stay silent before the test gives up on it (generous: the
/// machine is shared).
const SILENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seed_streams_the_same_from_both_plugins() {
    let size = env_u64("CONFORMANCE_SIZE").map_or(FIXED_SIZE, |n| n as usize);
    if let Err(report) = run(FIXED_SEED, size).await {
        panic!("{report}");
    }
}

/// The workload whose stream, rendered by wal2json on 15, is stored in
/// `tests/reference/`: every major's pgoutput must stream it byte for byte (LSNs
/// masked), 13 without its logical messages.
const REFERENCE_SEED: u64 = FIXED_SEED;
const REFERENCE_SIZE: usize = 300;
const REFERENCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference");

/// On 15 (wal2json installed): wal2json's stream of the reference workload is the one
/// stored (`CONFORMANCE_WRITE_REFERENCE=1` stores it anew). On any other major: the
/// server's pgoutput stream of it is the stored one (`make test-majors`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_workload_streams_as_wal2json_rendered_it_on_15() {
    if let Err(report) = against_reference(REFERENCE_SEED, REFERENCE_SIZE).await {
        panic!("{report}");
    }
}

async fn against_reference(seed: u64, size: usize) -> Result<(), String> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let num: String = pg.query_one("SHOW server_version_num", &[]).await.map_err(|e| e.to_string())?.get(0);
    let major = num.parse::<u32>().map_err(|e| e.to_string())? / 10_000;
    // The reference is wal2json's, which only 15 has here.
    let plugin = if major == 15 { "wal2json" } else { "pgoutput" };
    let slots = Slots { v1: format!("delta_reftx{n}"), v2: format!("delta_refch{n}") };
    let peek = format!("delta_refpeek{n}");
    let publish = if plugin == "pgoutput" { vec![slots.v1.as_str(), &slots.v2] } else { vec![peek.as_str()] };
    // From 18 a publication without the generated columns makes Postgres refuse the
    // workload's UPDATEs of its REPLICA IDENTITY FULL tables that have one; the stream's
    // generated columns are then dropped, as the reference's are.
    let generated = if major >= 18 { " WITH (publish_generated_columns = stored)" } else { "" };
    for slot in publish {
        let sql = format!("CREATE PUBLICATION {slot} FOR ALL TABLES{generated}");
        pg.batch_execute(&sql).await.map_err(|e| e.to_string())?;
    }
    let mut made = vec![(slots.v1.as_str(), plugin), (&slots.v2, plugin)];
    if plugin == "wal2json" {
        made.push((&peek, "pgoutput"));
    }
    for (slot, plugin) in &made {
        pg.execute("SELECT pg_create_logical_replication_slot($1, $2)", &[slot, plugin])
            .await
            .map_err(|e| format!("creating slot {slot}: {e}"))?;
    }
    let steps = workload::generate(seed, size, true);
    let sql_file = save_workload(seed, &steps);
    let fail = |what: String| {
        format!("reference seed {seed} on PostgreSQL {major} ({plugin}; workload in {sql_file}):\n{what}")
    };
    let other = db.client().await;
    for (i, step) in steps.iter().enumerate() {
        run_step([&pg, &other], step).await.map_err(|e| fail(format!("step {i}: {e}\n{}", step.sql())))?;
    }
    pg.batch_execute(&format!("CREATE TABLE {END_TABLE} (id int PRIMARY KEY); INSERT INTO {END_TABLE} VALUES (1)"))
        .await
        .map_err(|e| e.to_string())?;
    let server = TestServer::start(&db).await;
    let mut read = Vec::new();
    for (slot, query) in [(&slots.v1, ""), (&slots.v2, "&format=changes")] {
        let url = format!("{}{query}", server.stream_url(slot));
        read.push(stream_until(&url, &pg, slot, !query.is_empty(), End::Table).await.map_err(fail)?);
    }
    server.stop().await;
    let mut read = read.into_iter();
    let mut streamed = Streamed { v1: read.next().unwrap_or_default(), v2: read.next().unwrap_or_default() };
    if plugin == "wal2json" {
        let sent = pgoutput_sent(&pg, &peek).await.map_err(fail)?;
        streamed = normalise(&pg, streamed, &sent).await;
    } else if !generated.is_empty() {
        streamed = compare::drop_generated_columns(&streamed, |_, _, column| column == workload::GENERATED_COLUMN);
    }
    for (slot, _) in &made {
        pg.execute("SELECT pg_drop_replication_slot($1)", &[slot]).await.map_err(|e| e.to_string())?;
    }
    // Masked last, as the normalisations parse LSNs; each transaction's changes in a
    // canonical order (`compare::canonical_v1`: another cluster may order them otherwise).
    let masked = |s: &Streamed| {
        let mask = |m: &[String]| m.iter().map(|m| compare::mask_lsns(m)).collect::<Vec<_>>();
        Streamed { v1: mask(&compare::canonical_v1(&s.v1)), v2: compare::canonical_v2(&mask(&s.v2)) }
    };
    save_streams(seed, &format!("reference-{major}"), &masked(&streamed));
    let variants = [("", masked(&streamed)), ("-no-messages", masked(&compare::drop_messages(&streamed)))];
    let write = plugin == "wal2json" && env_u64("CONFORMANCE_WRITE_REFERENCE").is_some_and(|v| v != 0);
    for (suffix, s) in variants {
        // 13's pgoutput sends no messages; every other major's stream has them.
        if plugin == "pgoutput" && (suffix.is_empty() != (major >= 14)) {
            continue;
        }
        for (format, messages) in [("v1", &s.v1), ("v2", &s.v2)] {
            let path = format!("{REFERENCE_DIR}/seed-{seed}-{size}{suffix}.{format}.txt");
            if write {
                let mut text = compare::reference_lines(messages).join("\n");
                text.push('\n');
                std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))?;
                continue;
            }
            let stored = std::fs::read_to_string(&path).map_err(|e| fail(format!("{path}: {e}")))?;
            let expected: Vec<String> = stored.lines().map(str::to_owned).collect();
            if let Some(diff) = compare::first_reference_difference(&format!("{format}{suffix}"), &expected, messages) {
                let regenerate = "a change of the workload generator or of wal2json's output on 15 needs the \
                    reference stored anew: CONFORMANCE_WRITE_REFERENCE=1 cargo test --test it conformance::the_reference";
                return Err(fail(format!("{path}: {diff}\n({regenerate})")));
            }
        }
    }
    Ok(())
}

/// `make conformance`: many seeds; every failing seed is reported, then the test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by `make conformance`"]
async fn random_seeds_stream_the_same_from_both_plugins() {
    let first = env_u64("CONFORMANCE_SEED").unwrap_or_else(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        now.as_nanos() as u64 % 1_000_000_000
    });
    let n = env_u64("CONFORMANCE_N").unwrap_or(20);
    let mut failed = Vec::new();
    for seed in first..first + n {
        eprintln!("conformance: seed {seed} ({} transactions, against {})", size(), against());
        if let Err(report) = run(seed, size()).await {
            eprintln!("{report}");
            failed.push(seed);
        }
    }
    assert!(failed.is_empty(), "conformance failed for seeds {failed:?} (of {first}..{})", first + n);
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().filter(|v| !v.is_empty()).map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
}

fn size() -> usize {
    env_u64("CONFORMANCE_SIZE").map_or(DEFAULT_SIZE, |n| n as usize)
}

/// The plugin of the slot under test: pgoutput, unless `CONFORMANCE_AGAINST=wal2json`.
fn against() -> String {
    std::env::var("CONFORMANCE_AGAINST").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "pgoutput".into())
}

/// One workload through both slots; the report of what went wrong.
async fn run(seed: u64, size: usize) -> Result<(), String> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let against = against();
    // One slot per plugin and format: the server confirms a slot's leading empty
    // transactions on its own, so a second stream of the same slot would start later.
    let reference = Slots { v1: format!("delta_wjstx{n}"), v2: format!("delta_wjsch{n}") };
    let (candidate, plugin) = match against.as_str() {
        "pgoutput" => (Slots { v1: format!("delta_pgotx{n}"), v2: format!("delta_pgoch{n}") }, "pgoutput"),
        "wal2json" => (Slots { v1: format!("delta_selftx{n}"), v2: format!("delta_selfch{n}") }, "wal2json"),
        other => panic!("CONFORMANCE_AGAINST={other:?}: pgoutput or wal2json"),
    };
    let db = common::fresh_db().await;
    let pg = db.client().await;
    // Read by SQL at the end: which transactions pgoutput sends at all.
    let peek = format!("delta_peek{n}");
    create_slots(&pg, &candidate, plugin, &reference, &peek).await?;

    let steps = workload::generate(seed, size, accepted().iter().any(|a| a == compare::HISTORIC_TYPE_NAMES));
    let sql_file = save_workload(seed, &steps);
    let fail = |what: String| format!("conformance seed {seed} (against {against}; workload in {sql_file}):\n{what}");
    let mut settings = support::fast_settings(&db);
    // The least memory `--pgoutput-memory` allows: most transactions of the workload
    // then go through the renderer's temporary file.
    settings.session.pgoutput_memory = 65536;
    let server = TestServer::start_with(settings).await;
    let live = env_u64("CONFORMANCE_LIVE").is_some_and(|v| v != 0);
    let mut streams = if live { Some(open_streams(&db, &server, &reference, &candidate)) } else { None };
    if live {
        // Streaming for real before the first step: what each walsender sees of the
        // database's settings is then that of before the workload.
        for slot in [&reference.v1, &reference.v2, &candidate.v1, &candidate.v2] {
            await_slot(&pg, slot, "active", "active").await;
        }
    }
    let other = db.client().await;
    for (i, step) in steps.iter().enumerate() {
        run_step([&pg, &other], step)
            .await
            .map_err(|e| fail(format!("step {i} of the workload: {e}\n{}", step.sql())))?;
    }
    let streams = match streams.take() {
        Some(streams) => streams,
        None => open_streams(&db, &server, &reference, &candidate),
    };
    let mut read = Vec::new();
    for task in streams {
        read.push(task.await.map_err(|e| fail(format!("a stream's task failed: {e}")))?.map_err(fail)?);
    }
    server.stop().await;
    let mut read = read.into_iter();
    let mut next = || read.next().unwrap_or_default();
    let theirs = Streamed { v1: next(), v2: next() };
    let ours = Streamed { v1: next(), v2: next() };
    let sent = pgoutput_sent(&pg, &peek).await.map_err(fail)?;
    for slot in [&reference.v1, &reference.v2, &candidate.v1, &candidate.v2, &peek] {
        pg.execute("SELECT pg_drop_replication_slot($1)", &[slot]).await.map_err(|e| e.to_string())?;
    }

    save_streams(seed, "wal2json", &theirs);
    save_streams(seed, if against == "wal2json" { "wal2json-self" } else { &against }, &ours);
    compare::check_parse("wal2json", &theirs).map_err(fail)?;
    compare::check_parse(&against, &ours).map_err(fail)?;
    let theirs = normalise(&pg, theirs, &sent).await;
    let ours = if against == "wal2json" { normalise(&pg, ours, &sent).await } else { ours };
    for (what, expected, actual) in
        [("format=transactions", &theirs.v1, &ours.v1), ("format=changes", &theirs.v2, &ours.v2)]
    {
        if let Some(diff) = compare::first_difference(what, expected, actual) {
            return Err(fail(format!("wal2json (expected) and {against} (actual) differ in {diff}")));
        }
    }
    Ok(())
}

/// Publications for the pgoutput slots (the server reads a pgoutput slot's publication
/// by the slot's name), then the four slots. The publications come first, so that every
/// change the slots decode sees them.
async fn create_slots(
    pg: &tokio_postgres::Client,
    candidate: &Slots,
    plugin: &str,
    reference: &Slots,
    peek: &str,
) -> Result<(), String> {
    for slot in [candidate.v1.as_str(), &candidate.v2, peek] {
        pg.batch_execute(&format!("CREATE PUBLICATION {slot} FOR ALL TABLES")).await.map_err(|e| e.to_string())?;
    }
    for (slot, plugin) in [
        (candidate.v1.as_str(), plugin),
        (&candidate.v2, plugin),
        (&reference.v1, "wal2json"),
        (&reference.v2, "wal2json"),
        (peek, "pgoutput"),
    ] {
        pg.execute("SELECT pg_create_logical_replication_slot($1, $2)", &[&slot, &plugin])
            .await
            .map_err(|e| format!("creating slot {slot}: {e}"))?;
    }
    Ok(())
}

/// What wal2json streamed, with the accepted differences taken out: always
/// `empty-transactions`, and the optional ones `CONFORMANCE_ACCEPT` names.
async fn normalise(pg: &tokio_postgres::Client, theirs: Streamed, sent: &HashSet<Lsn>) -> Streamed {
    let accepted = accepted();
    let accepts = |name: &str| accepted.iter().any(|a| a == name);
    let mut theirs = theirs;
    if accepts(compare::MATERIALIZED_VIEWS) {
        // Before `empty-transactions`: a transaction that only filled a view is empty.
        theirs = compare::drop_changes_of(&theirs, &relations_of_kind(pg, 'm').await);
    }
    theirs = compare::drop_empty_transactions(&theirs, sent);
    if accepts(compare::PARTITIONED_TRUNCATE) {
        theirs = compare::drop_partitioned_truncates(&theirs, &relations_of_kind(pg, 'p').await);
    }
    if accepts(compare::GENERATED_COLUMNS) {
        theirs = compare::drop_generated_columns(&theirs, |_, _, column| column == workload::GENERATED_COLUMN);
    }
    theirs
}

/// The end LSNs of the transactions pgoutput sends for the workload: the whole output of
/// the `peek` slot (created with the others, never streamed), in binary.
async fn pgoutput_sent(pg: &tokio_postgres::Client, peek: &str) -> Result<HashSet<Lsn>, String> {
    let sql = "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, NULL, NULL, \
               'proto_version', '1', 'publication_names', $1::text, 'messages', 'true')";
    let rows =
        pg.query(sql, &[&peek]).await.map_err(|e| format!("reading pgoutput's output of {peek}: {}", describe(&e)))?;
    let data: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    Ok(compare::pgoutput_commits(data.iter().map(Vec::as_slice)))
}

/// The optional normalisations a run applies: those `CONFORMANCE_ACCEPT` names and
/// those accepted for good (see [`compare::OPTIONAL`]).
fn accepted() -> Vec<String> {
    let from_env = std::env::var("CONFORMANCE_ACCEPT").unwrap_or_default();
    let names: Vec<String> = from_env
        .split(',')
        .chain(compare::ACCEPTED.iter().copied())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for name in &names {
        assert!(
            compare::OPTIONAL.contains(&name.as_str()),
            "CONFORMANCE_ACCEPT: {name:?} is none of {:?}",
            compare::OPTIONAL
        );
    }
    names
}

/// (schema, name) of every relation of `relkind` (`p` partitioned table, `m`
/// materialized view).
async fn relations_of_kind(pg: &tokio_postgres::Client, relkind: char) -> Vec<(String, String)> {
    let sql = "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind::text = $1";
    let rows = pg.query(sql, &[&relkind.to_string()]).await.unwrap_or_default();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Writes the workload's SQL where a failing seed can be read and replayed.
fn save_workload(seed: u64, steps: &[Step]) -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    let path = dir.join(format!("seed-{seed}.sql"));
    let mut text = String::new();
    for step in steps {
        match step {
            Step::Sql(sql) => text.push_str(sql),
            Step::Fails(sql, _) => text.push_str(&format!("-- fails:\n{sql}")),
            Step::Interleaved(_) => text.push_str(&format!("-- two connections:\n{}", step.sql())),
        }
        text.push_str(if text.ends_with('\n') { "\n" } else { ";\n\n" });
    }
    let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text));
    path.display().to_string()
}

/// Writes what a slot streamed next to the workload, one message a line.
fn save_streams(seed: u64, plugin: &str, s: &Streamed) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance");
    for (format, messages) in [("v1", &s.v1), ("v2", &s.v2)] {
        let path = dir.join(format!("seed-{seed}.{plugin}.{format}.jsonl"));
        let _ = std::fs::write(path, messages.join("\n"));
    }
}

async fn run_step(clients: [&tokio_postgres::Client; 2], step: &Step) -> Result<(), String> {
    let pg = clients[0];
    match step {
        Step::Interleaved(parts) => {
            for (connection, sql) in parts {
                clients[*connection].batch_execute(sql).await.map_err(|e| describe(&e))?;
            }
            Ok(())
        }
        Step::Sql(sql) => pg.batch_execute(sql).await.map_err(|e| describe(&e)),
        Step::Fails(sql, expected) => match pg.batch_execute(sql).await {
            Ok(()) => Err(format!("succeeded; expected an error with {expected:?}")),
            Err(e) if describe(&e).contains(expected) => Ok(()),
            Err(e) => Err(format!("failed with {}; expected {expected:?}", describe(&e))),
        },
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |db| format!("{}: {}", db.code().code(), db.message()))
}

/// The two slots of one plugin: one streamed in each format.
struct Slots {
    v1: String,
    v2: String,
}

type StreamTask = tokio::task::JoinHandle<Result<Vec<String>, String>>;

/// The four streams, each read by a task of its own: wal2json's format 1 and 2, then the
/// candidate's. With `CONFORMANCE_LIVE=1` they are opened before the workload runs, so
/// that the server renders changes as they are made (type names are looked up then);
/// otherwise after it.
fn open_streams(db: &common::TestDb, server: &TestServer, reference: &Slots, candidate: &Slots) -> Vec<StreamTask> {
    let mut tasks = Vec::new();
    for slots in [reference, candidate] {
        for (slot, query) in [(&slots.v1, ""), (&slots.v2, "&format=changes")] {
            let (db, url, slot) = (db.clone(), format!("{}{query}", server.stream_url(slot)), slot.clone());
            tasks.push(tokio::spawn(async move {
                let pg = db.client().await;
                stream(&url, &pg, &slot, !query.is_empty()).await
            }));
        }
    }
    tasks
}

/// Every message of the stream up to the workload's end marker (its transaction in
/// format 1, up to its commit in format 2); then the stream is closed and the slot free.
async fn stream(url: &str, pg: &tokio_postgres::Client, slot: &str, changes: bool) -> Result<Vec<String>, String> {
    stream_until(url, pg, slot, changes, End::Marker).await
}

/// Where a stream's workload ends: at its end marker (a logical message), or at the
/// first change of table [`END_TABLE`] (PostgreSQL 13's pgoutput sends no messages).
#[derive(Clone, Copy)]
enum End {
    Marker,
    Table,
}

/// The table whose first row ends a workload streamed to [`End::Table`].
const END_TABLE: &str = "conformance_end";

async fn stream_until(
    url: &str,
    pg: &tokio_postgres::Client,
    slot: &str,
    changes: bool,
    end: End,
) -> Result<Vec<String>, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| format!("{url}: {e}"))?;
    let mut messages = Vec::new();
    let mut marker_seen = false;
    loop {
        let text = next_text(&mut ws).await.map_err(|e| {
            format!(
                "{url}: {e} after {} messages, the last: {}",
                messages.len(),
                messages.last().map_or("-", String::as_str)
            )
        })?;
        let is_end = |c: &Change| match end {
            End::Marker => is_end_marker(c),
            End::Table => matches!(c, Change::Insert(r) if r.table == END_TABLE),
        };
        let done = if !changes {
            Transaction::parse(text.as_bytes()).is_ok_and(|t| t.change.iter().any(is_end))
        } else {
            match Record::parse(text.as_bytes()) {
                Ok(Record::M(m)) if matches!(end, End::Marker) && m.prefix == END_PREFIX => {
                    marker_seen = true;
                    false
                }
                Ok(Record::I(r)) if matches!(end, End::Table) && r.table == END_TABLE => {
                    marker_seen = true;
                    false
                }
                Ok(Record::C(_)) => marker_seen,
                _ => false,
            }
        };
        messages.push(text);
        if done {
            break;
        }
    }
    let _ = ws.close(None).await;
    await_slot(pg, slot, "free", "NOT active").await;
    Ok(messages)
}

fn is_end_marker(change: &Change) -> bool {
    matches!(change, Change::Message(m) if m.prefix == END_PREFIX)
}

async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        let next = tokio::time::timeout(SILENCE, ws.next()).await.map_err(|_| format!("silent for {SILENCE:?}"))?;
        match next {
            None => return Err("the stream ended".into()),
            Some(Err(e)) => return Err(format!("websocket error {e}")),
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
            Some(Ok(Message::Ping(p))) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Some(Ok(Message::Pong(_))) => {}
            Some(Ok(other)) => return Err(format!("unexpected {other:?}")),
        }
    }
}
