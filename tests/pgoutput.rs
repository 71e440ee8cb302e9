//! pgoutput rendered as wal2json: the same changes through a pgoutput slot and a
//! wal2json slot, created at the same point and streamed by our server, must reach the
//! client as the same bytes, in both formats. wal2json 2.5 itself is the judge.
//!
//! The one accepted difference: Postgres 15's pgoutput sends nothing for a transaction
//! with no published change, where wal2json sends an empty one; empty transactions are
//! compared apart.
//!
//! A binary of its own, not a module of tests/it/: a test here measures the peak memory
//! of its whole process.

use testkit::pg as common;
use testkit::support;

use std::time::Duration;

use futures_util::StreamExt;
use pgdeltastream::stream::pgoutput::DEFAULT_HOLD_MEMORY;
use support::{TestServer, Ws, next_message};
use tokio_tungstenite::tungstenite::Message;

/// Slots are the cluster's, shared by the tests of this binary: each test has its own
/// pair, named like ours (`delta_<letters><digits>`), so the server adopts them.
fn slots(n: u32) -> (String, String) {
    (format!("delta_pgo{n}"), format!("delta_wjs{n}"))
}

const SCHEMA: &str = r#"
    CREATE TYPE mood AS ENUM ('happy', 'sad');
    CREATE SCHEMA other;
    CREATE TYPE other.color AS ENUM ('red', 'green');
    CREATE TYPE "Weird" AS ENUM ('x');
    CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
    CREATE TABLE types (
        id serial PRIMARY KEY, i2 smallint, i4 int, i8 bigint, o oid, f4 real, f8 double precision,
        n numeric, n2 numeric(30,10), b bool, by bytea, t text, vc varchar(20), c char(3), j json,
        jb jsonb, ai int[], at text[], ts timestamp, tstz timestamptz, d date, iv interval, u uuid,
        m mood, col other.color, w "Weird", wa "Weird"[], dom posint, pt point, bits bit varying(8),
        "Quoted Col" text, mo money);
    CREATE TABLE kv (id int PRIMARY KEY, v text, big text);
    CREATE TABLE full_t (id int, v text, big text);
    ALTER TABLE full_t REPLICA IDENTITY FULL;
    CREATE TABLE idx_t (a int NOT NULL, b int NOT NULL, v text);
    CREATE UNIQUE INDEX idx_t_ab ON idx_t (a, b);
    ALTER TABLE idx_t REPLICA IDENTITY USING INDEX idx_t_ab;
    CREATE TABLE nokey (a int, b text);
    CREATE TABLE dropped (id int PRIMARY KEY, gone text, kept text);
    CREATE TABLE parent (id int PRIMARY KEY);
    CREATE TABLE child (id int PRIMARY KEY, p int REFERENCES parent);
    CREATE TABLE part (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
    CREATE TABLE part_1 PARTITION OF part FOR VALUES FROM (0) TO (100);
    CREATE TABLE "Odd ""Name""" (id int PRIMARY KEY, "x y" text);
    CREATE TYPE pair AS (x int, label text);
    CREATE TABLE misc (id int PRIMARY KEY, p pair, ch "char", r int4range, tr tstzrange, x xml,
        tt timetz, nm name, vb varbit, ts tsvector, js jsonb[], mood_arr mood[], big numeric(30,10)[],
        vc varchar(5)[]);
    CREATE TABLE nocols ();
    CREATE TABLE done (id int PRIMARY KEY);
    CREATE SCHEMA IF NOT EXISTS pgdeltastream;
    CREATE TABLE pgdeltastream.probe (id int PRIMARY KEY);
"#;

/// Each string is one transaction (or one non-transactional statement).
const WORKLOAD: &[&str] = &[
    r#"INSERT INTO types (i2, i4, i8, o, f4, f8, n, n2, b, by, t, vc, c, j, jb, ai, at, ts, tstz, d, iv, u,
        m, col, w, wa, dom, pt, bits, "Quoted Col", mo) VALUES
        (-32768, 2147483647, 9223372036854775807, 4294967295, 3.14, 2.718281828459045, 3.540,
         12345678901234567890.0123456789, true, '\x00ff10', E'tab\there "q" back\\slash \x01 é 日本\n',
         'varchar', 'ab', '{"a": [1, 2]}', '{"b": null}', '{1,2,3}', '{"x,y", NULL, "z"}',
         '2026-01-02 03:04:05.678', '2026-01-02 03:04:05+02', '2026-01-02', '1 day 02:03:04',
         'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 'green', 'x', '{x,x}', 7, '(1,2)', B'101',
         'quoted', 12.34),
        (0, 0, 0, 0, 'NaN', 'Infinity', 'NaN', 0, false, '', '', '', '', 'null', '[]', '{}', '{}',
         'infinity', '-infinity', 'epoch', '0', NULL, 'sad', 'red', 'x', '{}', 1, '(0,0)', B'',
         '', 0),
        (NULL, NULL, NULL, NULL, '-Infinity', '-Infinity', 'Infinity', 'NaN', NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL),
        (1, 1, 1, 1, 1e-30, 1e300, 1e-20, 0.5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, -1.5)"#,
    "INSERT INTO kv VALUES (1, 'one', NULL), (2, 'two', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 3000) i))",
    // A TOASTed value the update does not rewrite is left out.
    "UPDATE kv SET v = 'deux' WHERE id = 2",
    "UPDATE kv SET id = 3 WHERE id = 2",
    "BEGIN; UPDATE kv SET v = NULL WHERE id = 1; DELETE FROM kv WHERE id = 3; COMMIT",
    "INSERT INTO full_t VALUES (1, NULL, 'x'), (2, 'b', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 3000) i))",
    "UPDATE full_t SET v = 'a' WHERE id = 1",
    "UPDATE full_t SET v = 'bb' WHERE id = 2",
    "DELETE FROM full_t",
    "INSERT INTO idx_t VALUES (1, 2, 'x'), (3, 4, NULL)",
    "UPDATE idx_t SET v = 'y' WHERE a = 1",
    "UPDATE idx_t SET b = 5 WHERE a = 3",
    "DELETE FROM idx_t WHERE a = 1",
    "INSERT INTO nokey VALUES (1, 'n'), (NULL, NULL)",
    // Over the 4 MiB held in memory: the rest of the transaction goes through a file.
    "INSERT INTO nokey SELECT i, 'row ' || i FROM generate_series(1, 40000) i",
    "ALTER TABLE dropped DROP COLUMN gone",
    "INSERT INTO dropped VALUES (1, 'k')",
    "ALTER TABLE kv ADD COLUMN extra int DEFAULT 5",
    "INSERT INTO kv VALUES (10, 'ten', NULL)",
    "INSERT INTO parent VALUES (1), (2); INSERT INTO child VALUES (1, 1)",
    "INSERT INTO part VALUES (1, 50)",
    r#"INSERT INTO "Odd ""Name""" VALUES (1, 'odd')"#,
    "TRUNCATE nokey",
    "TRUNCATE parent CASCADE",
    "TRUNCATE kv, idx_t RESTART IDENTITY",
    "BEGIN; INSERT INTO kv VALUES (20, 'a'); SELECT pg_logical_emit_message(true, 'tx', E'in \"a\"\\ntransaction'); INSERT INTO kv VALUES (21, 'b'); COMMIT",
    "SELECT pg_logical_emit_message(true, 'alone', 'only a message')",
    // After a transaction of several changes: wal2json 2.5 prints this one broken, and
    // the stream repairs it.
    "SELECT pg_logical_emit_message(false, 'nontx', 'on its own')",
    "SELECT pg_logical_emit_message(false, 'bin', '\\xff41'::bytea)",
    "SELECT pg_logical_emit_message(false, 'nul', '\\x610062'::bytea)",
    "BEGIN; INSERT INTO kv VALUES (30, 's'); SAVEPOINT p; INSERT INTO kv VALUES (31, 'rolled back'); ROLLBACK TO p; INSERT INTO kv VALUES (32, 't'); COMMIT",
    "INSERT INTO pgdeltastream.probe VALUES (1)",
    "BEGIN; INSERT INTO pgdeltastream.probe VALUES (2); INSERT INTO kv VALUES (40, 'beside a hidden change'); COMMIT",
    r#"INSERT INTO misc VALUES (1, '(1,"a b")', 'c', '[1,5)', '[2026-01-01,2026-02-01)', '<a>x</a>',
        '12:00+02', 'nm', B'1', 'a fat cat', '{"{\"a\":1}"}', '{happy,sad}', '{1.5,NaN}', '{ab,"c d"}')"#,
    "INSERT INTO nocols DEFAULT VALUES",
    "INSERT INTO kv VALUES (60, 'conflict') ON CONFLICT (id) DO UPDATE SET v = 'x'",
    "INSERT INTO kv VALUES (60, 'conflict') ON CONFLICT (id) DO UPDATE SET v = 'updated'",
    "ALTER TABLE kv RENAME COLUMN v TO value",
    "ALTER TABLE kv ALTER COLUMN extra TYPE bigint",
    "UPDATE kv SET value = 'renamed', extra = 9 WHERE id = 60",
    // The relation changes inside the transaction: pgoutput describes it again.
    "BEGIN; INSERT INTO dropped VALUES (2, 'before'); ALTER TABLE dropped ADD COLUMN added text; \
     INSERT INTO dropped VALUES (3, 'after', 'new'); ALTER TABLE dropped DROP COLUMN kept; \
     INSERT INTO dropped VALUES (4, 'last'); COMMIT",
    "BEGIN; CREATE TABLE born (id int PRIMARY KEY, m mood); INSERT INTO born VALUES (1, 'sad'); COMMIT",
    "INSERT INTO done VALUES (1)",
];

/// Sets the database up, creates both slots at the same point, runs the workload.
async fn prepare(db: &common::TestDb, pgo: &str, wjs: &str) {
    let pg = db.client().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    pg.batch_execute(&format!("CREATE PUBLICATION {pgo} FOR ALL TABLES")).await.unwrap();
    pg.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&pgo]).await.unwrap();
    pg.execute("SELECT pg_create_logical_replication_slot($1, 'wal2json')", &[&wjs]).await.unwrap();
    let (done, workload) = WORKLOAD.split_last().unwrap();
    for statement in workload {
        pg.batch_execute(statement).await.unwrap_or_else(|e| panic!("{statement}: {e:?}"));
    }
    // Interleaved transactions come in commit order.
    let other = db.client().await;
    pg.batch_execute("BEGIN; INSERT INTO kv VALUES (50, 'first to begin')").await.unwrap();
    other.batch_execute("BEGIN; INSERT INTO kv VALUES (51, 'first to commit'); COMMIT").await.unwrap();
    pg.batch_execute("INSERT INTO kv VALUES (52, 'last'); COMMIT").await.unwrap();
    pg.batch_execute(done).await.unwrap();
}

/// The messages of a stream up to the transaction of the `done` table.
async fn collect(ws: &mut Ws, v2: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen_done = false;
    loop {
        let text = match next_message(ws).await {
            Message::Text(t) => t.as_str().to_owned(),
            other => panic!("expected text, got {other:?}"),
        };
        let is_done = text.contains(r#""table":"done""#);
        let commit = text.starts_with(r#"{"action":"C""#);
        out.push(text);
        if (is_done && !v2) || (seen_done && commit) {
            return out;
        }
        seen_done |= is_done;
    }
}

/// Splits out empty transactions (pgoutput sends none of its own).
fn without_empty(messages: Vec<String>, v2: bool) -> (Vec<String>, Vec<String>) {
    if !v2 {
        return messages.into_iter().partition(|m| !m.ends_with(r#""change":[]}"#));
    }
    let (mut kept, mut empty) = (Vec::new(), Vec::new());
    for m in messages {
        let begin = kept.last().is_some_and(|b: &String| b.starts_with(r#"{"action":"B""#));
        if begin && m.starts_with(r#"{"action":"C""#) {
            let b = kept.pop().unwrap_or_default();
            empty.push(format!("{b}{m}"));
        } else {
            kept.push(m);
        }
    }
    (kept, empty)
}

/// `hold_memory`: what a pgoutput stream holds in memory. `search_path`: set for the database's new sessions (the walsenders and our pool's
/// connections), which changes how a type outside it is named.
async fn differential(n: u32, format: &str, search_path: Option<&str>, hold_memory: usize) {
    let v2 = !format.is_empty();
    let (pgo, wjs) = slots(n);
    let db = common::fresh_db().await;
    prepare(&db, &pgo, &wjs).await;
    if let Some(path) = search_path {
        let pg = db.client().await;
        pg.batch_execute(&format!("ALTER DATABASE \"{}\" SET search_path = {path}", db.dbname)).await.unwrap();
    }
    let mut settings = support::fast_settings(&db);
    // With little memory, more transactions go through the temporary file.
    settings.session.pgoutput_memory = hold_memory;
    let server = TestServer::start_with(settings).await;
    let url = |slot: &str| format!("{}{format}", server.stream_url(slot));
    let (mut pgo, _) = tokio_tungstenite::connect_async(url(&pgo)).await.expect("pgoutput stream");
    let (mut wjs, _) = tokio_tungstenite::connect_async(url(&wjs)).await.expect("wal2json stream");
    let (ours, ours_empty) = without_empty(collect(&mut pgo, v2).await, v2);
    let (theirs, theirs_empty) = without_empty(collect(&mut wjs, v2).await, v2);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "message {i} differs: pgoutput first, wal2json second");
    }
    assert_eq!(ours.len(), theirs.len(), "pgoutput: {ours:#?}\nwal2json: {theirs:#?}");
    for e in &ours_empty {
        assert!(theirs_empty.contains(e), "{e} is not among wal2json's empty transactions {theirs_empty:#?}");
    }
    assert!(ours.len() > 20, "the workload came through: {ours:#?}");
    let color = if search_path.is_some() { r#""type":"color""# } else { r#""type":"other.color""# };
    assert!(ours.iter().any(|m| m.contains(color) || m.contains(&color.replace("\"type\":", ""))), "{color}");
    assert!(!ours_empty.is_empty(), "truncates (v1) and hidden changes make empty transactions");
    drop((pgo, wjs));
    server.stop().await;
}

#[tokio::test]
async fn transactions_match_wal2json() {
    differential(1, "", None, 65536).await;
}

#[tokio::test]
async fn changes_match_wal2json() {
    differential(2, "&format=changes", None, DEFAULT_HOLD_MEMORY).await;
}

/// wal2json names `other.color` as `color` when `other` is on the walsender's
/// search_path: the pool's connections see the same search_path.
#[tokio::test]
async fn type_names_follow_the_search_path() {
    differential(4, "&format=changes", Some("other, public"), DEFAULT_HOLD_MEMORY).await;
}

/// Resident set size and its peak, in kB (Linux).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A transaction of 1,000,000 rows through pgoutput arrives whole, and the process
/// (our server, and this client counting records) does not grow by anything like its
/// size: the transaction is held in a file until its commit, and handed out in bursts.
#[tokio::test]
async fn a_million_row_transaction_streams_in_bounded_memory() {
    const ROWS: u64 = 1_000_000;
    let (pgo, _) = slots(3);
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(&format!("CREATE TABLE big (id int PRIMARY KEY, v text); CREATE PUBLICATION {pgo} FOR TABLE big"))
        .await
        .unwrap();
    pg.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&pgo]).await.unwrap();
    pg.batch_execute(&format!("INSERT INTO big SELECT i, 'row ' || i FROM generate_series(1, {ROWS}) i"))
        .await
        .unwrap();
    let after: String = pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await.unwrap().get(0);

    let server = TestServer::start(&db).await;
    // The peak is reset to what is resident now (Linux 4.0+), so the peak below is
    // what streaming took.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (base, _) = rss();
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}&format=changes", server.stream_url(&pgo))).await.expect("stream");
    let mut next = async || -> String {
        loop {
            // Postgres decodes the whole transaction before its first message.
            let m = tokio::time::timeout(Duration::from_secs(300), ws.next()).await.expect("a record in time");
            match m.expect("open").expect("a message") {
                Message::Text(t) => return t.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected text, got {other:?}"),
            }
        }
    };
    let begin: serde_json::Value = serde_json::from_str(&next().await).unwrap();
    assert_eq!(begin["action"], "B");
    let mut inserts = 0u64;
    let commit: serde_json::Value = loop {
        let text = next().await;
        if text.starts_with(r#"{"action":"I""#) {
            inserts += 1;
            if inserts == ROWS {
                assert!(text.contains(&format!(r#""value":{ROWS}}}"#)), "{text}");
            }
        } else {
            break serde_json::from_str(&text).unwrap();
        }
    };
    assert_eq!(inserts, ROWS);
    assert_eq!(commit["action"], "C");
    assert_eq!(commit["nextlsn"], begin["nextlsn"]);
    let nextlsn = commit["nextlsn"].as_str().unwrap().to_owned();
    let in_order: bool =
        pg.query_one("SELECT $1::text::pg_lsn <= $2::text::pg_lsn", &[&nextlsn, &after]).await.unwrap().get(0);
    assert!(in_order, "nextlsn {nextlsn} is the transaction's end, at most {after}");
    let (_, peak) = rss();
    let grew_mb = peak.saturating_sub(base) / 1024;
    eprintln!("peak RSS grew by {grew_mb} MB while streaming {ROWS} rows");
    assert!(grew_mb < 64, "peak RSS grew by {grew_mb} MB");
    drop(ws);
    server.stop().await;
}

/// A pool that is busy for a moment while a pgoutput stream looks up the names of a
/// table's column types (here an enum's) is waited out: the stream delivers the change
/// once a connection is free, and goes on, rather than ending with close 1011.
#[tokio::test]
async fn a_briefly_busy_pool_during_a_type_lookup_does_not_end_the_stream() {
    use pgdeltastream::session::{Plugin, PluginChoice};
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TYPE feeling AS ENUM ('happy', 'sad');
         CREATE TABLE moods (id int PRIMARY KEY, f feeling);
         CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(3);",
    )
    .await
    .unwrap();
    let app = "pgdeltastream-busy-pool";
    let mut settings = support::fast_settings(&db);
    settings.pg.application_name = app.into();
    settings.session.plugin = PluginChoice::Fixed(Plugin::Pgoutput);
    // One connection, and a short wait for it: the slow read below takes it.
    settings.pool.size = 1;
    settings.pool.acquire_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(settings).await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;

    let addr = server.addr;
    let read = tokio::spawn(async move {
        support::request(addr, "POST", "/v1/snapshot/data", Some(r#"{"table":"sleepy"}"#)).await
    });
    let reading = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' AND state = 'active' \
         AND query LIKE '%sleepy%'"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pg.query_one(&reading, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "the slow read never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stream meets the table (and its types) for the first time while the read
    // holds the pool's only connection.
    pg.batch_execute("INSERT INTO moods VALUES (1, 'sad')").await.unwrap();
    let first = support::next_changes(&mut ws).await;
    assert_eq!(first["change"][0]["columntypes"], serde_json::json!(["integer", "feeling"]), "{first}");
    assert_eq!(first["change"][0]["columnvalues"], serde_json::json!([1, "sad"]), "{first}");
    let (status, body) = read.await.unwrap();
    assert_eq!(status, 200, "{body}");
    // The stream is still open.
    pg.batch_execute("INSERT INTO moods VALUES (2, 'happy')").await.unwrap();
    let second = support::next_changes(&mut ws).await;
    assert_eq!(second["change"][0]["columnvalues"], serde_json::json!([2, "happy"]), "{second}");
    drop(ws);
    server.stop().await;
}
