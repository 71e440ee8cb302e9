//! Fault tests of the delivery guarantee: every committed change reaches the client at
//! least once, and a change the client has acked never comes back. The server is killed,
//! shut down, and left by clients at awkward moments; clients ack wrongly, never, or read
//! slowly.
//!
//! Tests that need the real binary (signals) run `pgdeltastream` as a child process
//! configured by environment variables, as `cli.rs` does. Set `FAULTS_SERVER_LOG=1`
//! to see its log.

/// A cluster of its own: a test here shortens wal_sender_timeout for the whole cluster.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("faults")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The real binary on 127.0.0.1:`port`, against `db`. Killed (SIGKILL) when dropped.
struct ServerProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ServerProcess {
    /// Starts the binary and waits (bounded) until it listens. Status updates go out every
    /// second, so the walsender timeout of the slow-client test is never approached.
    async fn start(db: &common::TestDb, port: u16) -> ServerProcess {
        let mut cmd = server_command(db, port);
        cmd.env("PGDELTASTREAM_STATUS_INTERVAL", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("FAULTS_SERVER_LOG").is_some() { Stdio::inherit() } else { Stdio::null() });
        if let Some(pw) = &db.password {
            cmd.env("PGPASSWORD", pw);
        }
        let child = cmd.spawn().expect("spawn pgdeltastream");
        let mut server = ServerProcess { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(server.addr).await.is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("pgdeltastream exited before listening on {}: {status}", server.addr);
            }
            assert!(Instant::now() < deadline, "pgdeltastream never listened on {}", server.addr);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    async fn init(&self) -> String {
        let (status, body) = request(self.addr, "GET", "/v1/init", None).await;
        assert_eq!(status, 200, "init failed: {body}");
        body["slotName"].as_str().expect("slotName").to_owned()
    }

    fn stream_url(&self, slot: &str) -> String {
        format!("ws://{}/v1/lr/stream?slotName={slot}", self.addr)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}): {}", self.child.id(), std::io::Error::last_os_error());
    }

    /// Waits (bounded by `limit`) for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "pgdeltastream did not exit within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a websocket, retrying (bounded) while the server is not listening yet or still
/// lets go of the slot's previous stream.
async fn connect_retry(url: &str) -> Ws {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url)).await {
            Ok(Ok((ws, _))) => return ws,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => format!(
                "HTTP {}: {}",
                resp.status(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
            ),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        assert!(Instant::now() < deadline, "could not open {url}: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The frame's `nextlsn`; fails on error frames and frames without one.
fn nextlsn(frame: &Value) -> u64 {
    assert!(frame.get("error").is_none(), "unexpected error frame: {frame}");
    parse_lsn(frame["nextlsn"].as_str().unwrap_or_else(|| panic!("no nextlsn in {frame}")))
}

async fn confirmed(pg: &tokio_postgres::Client, slot: &str) -> u64 {
    parse_lsn(&confirmed_flush(pg, slot).await.expect("the slot exists"))
}

async fn drop_slot(pg: &tokio_postgres::Client, slot: &str) {
    await_slot(pg, slot, "inactive", "NOT active").await;
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}

/// A database with `t (n int PRIMARY KEY, pad text)` and our server in this process.
async fn setup() -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (n int PRIMARY KEY, pad text)").await.unwrap();
    let server = TestServer::start(&db).await;
    (db, pg, server)
}

async fn insert(pg: &tokio_postgres::Client, n: i32) {
    pg.execute("INSERT INTO t (n) VALUES ($1)", &[&n]).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// a. SIGKILL loop
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillAt {
    /// Right after a frame arrived, before acking it.
    BeforeAck,
    /// Right after sending the ack: the server may or may not have passed it on.
    RightAfterAck,
    /// Once the slot's confirmed_flush_lsn shows the ack.
    AfterConfirmed,
}

/// A frame the client received, on the connection after kill number `epoch`.
struct Received {
    epoch: usize,
    lsn: u64,
    rows: Vec<i64>,
}

/// The real binary is SIGKILLed five times while a writer commits one-row transactions
/// and the client acks every frame; it is restarted on the same port each time and the
/// client reconnects. Every committed row arrives, and none that was acked (and reached
/// the slot) before a kill comes again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_nothing_and_never_resends_an_acked_change() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (n bigint PRIMARY KEY)").await.unwrap();
    let port = free_port();
    let mut server = ServerProcess::start(&db, port).await;
    let slot = server.init().await;
    let url = server.stream_url(&slot);

    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (db.clone(), stop_writing.clone());
        tokio::spawn(async move {
            let c = db.client().await;
            let mut committed: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                c.execute("INSERT INTO t VALUES ($1)", &[&(committed + 1)]).await.unwrap();
                committed += 1;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            committed
        })
    };

    let plan = [
        (5, KillAt::BeforeAck),
        (60, KillAt::RightAfterAck),
        (25, KillAt::AfterConfirmed),
        (120, KillAt::BeforeAck),
        (1, KillAt::RightAfterAck),
    ];
    let mut received: Vec<Received> = Vec::new();
    let mut seen: HashSet<i64> = HashSet::new();
    // The slot's confirmed_flush_lsn once each killed server's walsender was gone: every
    // transaction at or below it was acked and reached Postgres before the kill.
    let mut floors: Vec<u64> = Vec::new();
    let mut last_ack = 0u64;
    let mut ws = connect_retry(&url).await;
    for (epoch, &(frames, kill_at)) in plan.iter().enumerate() {
        let mut data_frames = 0;
        loop {
            let frame = next_json(&mut ws).await;
            let lsn = nextlsn(&frame);
            let rows = row_numbers(&frame);
            if !rows.is_empty() {
                data_frames += 1;
            }
            seen.extend(&rows);
            received.push(Received { epoch, lsn, rows });
            if data_frames == frames && kill_at == KillAt::BeforeAck {
                break;
            }
            ack(&mut ws, &fmt_lsn(lsn)).await;
            last_ack = lsn;
            if data_frames == frames {
                if kill_at == KillAt::AfterConfirmed {
                    await_confirmed(&pg, &slot, &fmt_lsn(lsn)).await;
                }
                break;
            }
        }

        let before = confirmed(&pg, &slot).await;
        server.signal(libc::SIGKILL);
        let status = server.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        drop(ws);
        await_slot(&pg, &slot, "released after the kill", "NOT active").await;
        let after = confirmed(&pg, &slot).await;
        assert!(after >= before, "kill {epoch}: the slot went back from {} to {}", fmt_lsn(before), fmt_lsn(after));
        if kill_at == KillAt::AfterConfirmed {
            assert!(after >= last_ack, "kill {epoch}: a confirmed ack was lost");
        }
        // The slot never passes a transaction with changes that the client did not ack.
        for r in received.iter().filter(|r| !r.rows.is_empty() && r.lsn <= after) {
            assert!(
                r.lsn <= last_ack,
                "kill {epoch}: the slot ({}) passed rows {:?} (nextlsn {}) that were never acked (last ack {})",
                fmt_lsn(after),
                r.rows,
                fmt_lsn(r.lsn),
                fmt_lsn(last_ack)
            );
        }
        floors.push(after);

        server = ServerProcess::start(&db, port).await;
        ws = connect_retry(&url).await;
    }

    // Stop writing, then drain until every committed row is here.
    stop_writing.store(true, Ordering::Relaxed);
    let committed = tokio::time::timeout(Duration::from_secs(20), writer).await.expect("writer stops").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < committed as usize {
        assert!(Instant::now() < deadline, "drained only {} of {committed} rows", seen.len());
        let frame = next_json(&mut ws).await;
        let lsn = nextlsn(&frame);
        let rows = row_numbers(&frame);
        seen.extend(&rows);
        received.push(Received { epoch: plan.len(), lsn, rows });
        ack(&mut ws, &fmt_lsn(lsn)).await;
        last_ack = lsn;
    }

    // At least once.
    let missing: Vec<i64> = (1..=committed).filter(|n| !seen.contains(n)).collect();
    assert!(missing.is_empty(), "committed rows never received: {missing:?}");
    assert_eq!(seen.len(), committed as usize, "rows that were never committed arrived");
    // Acked changes never come back.
    for (kill, floor) in floors.iter().enumerate() {
        let again: Vec<(&Vec<i64>, String)> = received
            .iter()
            .filter(|r| r.epoch > kill && !r.rows.is_empty() && r.lsn <= *floor)
            .map(|r| (&r.rows, fmt_lsn(r.lsn)))
            .collect();
        assert!(
            again.is_empty(),
            "rows acked before kill {kill} (slot at {}) came again after it: {again:?}",
            fmt_lsn(*floor)
        );
    }
    // Each connection streams in commit order.
    for epoch in 0..=plan.len() {
        let rows: Vec<i64> = received.iter().filter(|r| r.epoch == epoch).flat_map(|r| r.rows.clone()).collect();
        assert!(rows.windows(2).all(|w| w[0] < w[1]), "connection {epoch} is out of order: {rows:?}");
    }
    let total: usize = received.iter().map(|r| r.rows.len()).sum();
    eprintln!("{committed} rows committed, {total} received ({} again after a kill)", total - committed as usize);

    await_confirmed(&pg, &slot, &fmt_lsn(last_ack)).await;
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).await.success());
    drop_slot(&pg, &slot).await;
}

// ---------------------------------------------------------------------------------------
// b. Disconnect mid-stream, c. never ack, d. acks out of order
// ---------------------------------------------------------------------------------------

/// A client that drops its socket (no close frame) right after receiving a transaction,
/// without acking it, gets that transaction again on reconnect, and what followed it.
#[tokio::test]
async fn a_client_that_drops_mid_stream_gets_the_unacked_transaction_again() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    insert(&pg, 1).await;
    insert(&pg, 2).await;
    pg.execute("INSERT INTO t (n, pad) SELECT i, repeat('x', 100) FROM generate_series(3, 1002) i", &[]).await.unwrap();
    insert(&pg, 1003).await;
    insert(&pg, 1004).await;

    let first = next_changes(&mut ws).await;
    assert_eq!(row_numbers(&first), [1]);
    ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    let second = next_changes(&mut ws).await;
    assert_eq!(row_numbers(&second), [2]);
    let acked = second["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &acked).await;
    await_confirmed(&pg, &slot, &acked).await;
    let big = next_changes(&mut ws).await;
    assert_eq!(row_numbers(&big), (3..=1002).collect::<Vec<_>>());
    drop(ws); // gone, mid-stream: the big transaction unacked, two more queued behind it

    await_slot(&pg, &slot, "released", "NOT active").await;
    // The slot may follow the walsender into the big transaction's WAL while it is being
    // sent (its commit, which decides whether it is sent again, lies beyond), but never
    // past its end, and never back.
    let at = confirmed(&pg, &slot).await;
    assert!(
        parse_lsn(&acked) <= at && at < nextlsn(&big),
        "the slot ({}) is not between the last ack ({acked}) and the unacked transaction's end ({})",
        fmt_lsn(at),
        big["nextlsn"]
    );
    let mut ws = server.connect(&slot).await;
    assert_eq!(next_changes(&mut ws).await, big, "the unacked transaction comes again, unchanged");
    assert_eq!(row_numbers(&next_changes(&mut ws).await), [1003]);
    assert_eq!(row_numbers(&next_changes(&mut ws).await), [1004]);
    server.stop().await;
    drop_slot(&pg, &slot).await;
}

/// A client that never acks gets everything again on every reconnect, and the slot's
/// confirmed position never reaches the first transaction with changes, however much
/// empty WAL follows it and however many status updates go out.
#[tokio::test]
async fn a_client_that_never_acks_gets_everything_again_and_holds_the_slot() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    await_slot(&pg, &slot, "active", "active").await;
    for n in 1..=3 {
        insert(&pg, n).await;
    }
    for i in 0..3 {
        // Empty transactions for the client.
        pg.batch_execute(&format!("CREATE TABLE e{i} (a int); DROP TABLE e{i};")).await.unwrap();
    }
    for n in 4..=5 {
        insert(&pg, n).await;
    }

    async fn five_data_frames(ws: &mut Ws) -> Vec<Value> {
        let mut frames = Vec::new();
        while frames.len() < 5 {
            frames.push(next_changes(ws).await);
        }
        frames
    }
    let frames = five_data_frames(&mut ws).await;
    let rows: Vec<i64> = frames.iter().flat_map(row_numbers).collect();
    assert_eq!(rows, [1, 2, 3, 4, 5]);
    let first = nextlsn(&frames[0]);
    let holds = |c: u64, when: &str| {
        assert!(
            c < first,
            "{when}: confirmed_flush_lsn {} passed the first unacked transaction (nextlsn {})",
            fmt_lsn(c),
            fmt_lsn(first)
        )
    };
    // Several status updates (every 500 ms) and keepalives go by.
    for _ in 0..10 {
        holds(confirmed(&pg, &slot).await, "while streaming");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "released", "NOT active").await;
    holds(confirmed(&pg, &slot).await, "after the client left");

    let mut ws = server.connect(&slot).await;
    assert_eq!(five_data_frames(&mut ws).await, frames, "everything comes again, from the start");
    holds(confirmed(&pg, &slot).await, "after reconnecting");
    server.stop().await;
    await_slot(&pg, &slot, "released", "NOT active").await;
    holds(confirmed(&pg, &slot).await, "after the server stopped");
    drop_slot(&pg, &slot).await;
}

/// Acking frame 3 and then frame 2: the backwards ack gets an error message and is not
/// applied, the stream goes on, and the slot stays at frame 3's nextlsn.
#[tokio::test]
async fn a_backwards_ack_is_refused_and_the_slot_stays_at_the_last_good_ack() {
    let (_db, pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    for n in 1..=4 {
        insert(&pg, n).await;
    }
    let mut frames = Vec::new();
    for n in 1..=4 {
        let f = next_changes(&mut ws).await;
        assert_eq!(row_numbers(&f), [n]);
        frames.push(f);
    }
    let third = frames[2]["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &third).await;
    await_confirmed(&pg, &slot, &third).await;
    ack(&mut ws, frames[1]["nextlsn"].as_str().unwrap()).await;
    let reply = next_json(&mut ws).await;
    let error = reply["error"].as_str().unwrap_or_else(|| panic!("expected an error message, got {reply}"));
    assert!(error.contains("ack"), "{error}");

    // The stream goes on.
    insert(&pg, 5).await;
    assert_eq!(row_numbers(&next_changes(&mut ws).await), [5]);
    // A few status updates later the slot is still exactly at frame 3: not moved back by
    // the refused ack, not moved on past the unacked frame 4.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fmt_lsn(confirmed(&pg, &slot).await), third);
    ws.close(None).await.unwrap();
    drop(ws);
    await_slot(&pg, &slot, "released", "NOT active").await;
    assert_eq!(fmt_lsn(confirmed(&pg, &slot).await), third);
    let mut ws = server.connect(&slot).await;
    assert_eq!(next_changes(&mut ws).await, frames[3], "streaming resumes after frame 3");
    server.stop().await;
    drop_slot(&pg, &slot).await;
}

// ---------------------------------------------------------------------------------------
// e. Graceful shutdown of the binary
// ---------------------------------------------------------------------------------------

/// `sig` while a client streams and has acked frame A but not frame B: the client gets
/// close code 1001 with a reason, the process exits 0 within 10 s, the slot is free and
/// sits exactly at A, and the next server streams B first.
async fn graceful_shutdown_on(sig: libc::c_int) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (n int PRIMARY KEY, pad text)").await.unwrap();
    let mut server = ServerProcess::start(&db, free_port()).await;
    let slot = server.init().await;
    let mut ws = connect_retry(&server.stream_url(&slot)).await;
    insert(&pg, 1).await;
    insert(&pg, 2).await;
    let a = next_changes(&mut ws).await;
    let b = next_changes(&mut ws).await;
    assert_eq!((row_numbers(&a), row_numbers(&b)), (vec![1], vec![2]));
    let acked = a["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &acked).await;
    await_confirmed(&pg, &slot, &acked).await;

    server.signal(sig);
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1001, "{reason}");
    assert!(!reason.is_empty(), "the close frame says why");
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    await_slot(&pg, &slot, "released", "NOT active").await;
    assert_eq!(confirmed_flush(&pg, &slot).await.as_deref(), Some(acked.as_str()));

    let again = TestServer::start(&db).await;
    let mut ws = again.connect(&slot).await;
    assert_eq!(next_changes(&mut ws).await, b, "the unacked frame comes first");
    again.stop().await;
    drop_slot(&pg, &slot).await;
}

#[tokio::test]
async fn sigterm_closes_streams_with_1001_and_keeps_the_last_ack() {
    graceful_shutdown_on(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_closes_streams_with_1001_and_keeps_the_last_ack() {
    graceful_shutdown_on(libc::SIGINT).await;
}

/// SIGTERM while a v2 session streams and a viewer watches it: both get 1001 at once
/// (every stream's stop is a child of the server's), the process exits 0 within the
/// shutdown deadline (5 s, one for all), the watcher's temporary slot goes with its
/// connection, and the session's slot keeps the last ack.
#[tokio::test]
async fn sigterm_ends_a_stream_and_a_watch_together_within_the_deadline() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (n int PRIMARY KEY, pad text)").await.unwrap();
    let mut server = ServerProcess::start(&db, free_port()).await;
    let (status, created) =
        request(server.addr, "POST", "/v2/sessions", Some(r#"{"name": "orders", "tables": ["t"]}"#)).await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let mut stream = connect_retry(&format!("ws://{}/v2/sessions/orders/stream", server.addr)).await;
    let mut watch = connect_retry(&format!("ws://{}/v2/sessions/orders/watch", server.addr)).await;
    insert(&pg, 1).await;
    let a = next_changes(&mut stream).await;
    assert_eq!(row_numbers(&a), [1]);
    while next_json(&mut watch).await["action"] != "I" {}
    let acked = a["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut stream, &acked).await;
    await_confirmed(&pg, &slot, &acked).await;

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let ((stream_code, why), (watch_code, watch_why)) = tokio::join!(await_close(&mut stream), await_close(&mut watch));
    assert_eq!((stream_code, watch_code), (1001, 1001), "{why} / {watch_why}");
    assert!(signalled.elapsed() < Duration::from_secs(3), "closed after {:?}", signalled.elapsed());
    let status = server.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "exit status {status}");
    await_slot(&pg, &slot, "released", "NOT active").await;
    await_confirmed(&pg, &slot, &acked).await;
    // Postgres drops the temporary slot as the watcher's walsender exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while database_slots(&pg).await.iter().any(|s| s.starts_with("pgdeltastream_watch_")) {
        assert!(Instant::now() < deadline, "the watcher's temporary slot outlived the server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop_slot(&pg, &slot).await;
}

// ---------------------------------------------------------------------------------------
// f. A slow client
// ---------------------------------------------------------------------------------------

const SLOW_ROWS: i64 = 20_000;

/// 20,000 one-row transactions (2 kB rows: far more than socket buffers hold, so the
/// walsender is held back) while the client reads one message every 50 ms for ~8 s
/// without acking, then fast. With wal_sender_timeout at 3 s only the server's status
/// updates (every second) keep the walsender alive: the stream is never cut, and every
/// row arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_never_cut_and_gets_every_row_in_order() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (n int PRIMARY KEY, pad text)").await.unwrap();
    // Cluster-wide: every stream of this module's cluster gets status updates at least every
    // second (TestServer: 500 ms), well within 3 s.
    pg.batch_execute("ALTER SYSTEM SET wal_sender_timeout = '3s'").await.unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let outcome = tokio::spawn(slow_client(db.clone())).await;
    pg.batch_execute("ALTER SYSTEM RESET wal_sender_timeout").await.unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.try_into_panic().expect("the test body panicked"));
    }
}

async fn slow_client(db: common::TestDb) {
    let pg = db.client().await;
    // The reload reaches new backends (and so new walsenders) once the postmaster has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = db.client().await;
        let timeout: String = fresh.query_one("SHOW wal_sender_timeout", &[]).await.unwrap().get(0);
        if timeout == "3s" {
            break;
        }
        assert!(Instant::now() < deadline, "wal_sender_timeout is still {timeout}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut server = ServerProcess::start(&db, free_port()).await;
    let slot = server.init().await;
    let mut ws = connect_retry(&server.stream_url(&slot)).await;
    await_slot(&pg, &slot, "active", "active").await;
    let walsender: i32 = pg
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);

    let writer = {
        let c = db.client().await;
        tokio::spawn(async move {
            c.batch_execute(&format!(
                "DO $$ BEGIN FOR i IN 1..{SLOW_ROWS} LOOP INSERT INTO t VALUES (i, repeat(chr(97 + i % 26), 1900)); COMMIT; END LOOP; END $$"
            ))
            .await
        })
    };

    let mut rows: Vec<i64> = Vec::with_capacity(SLOW_ROWS as usize);
    let mut last_lsn = String::new();
    // One frame, checked: a close or an error message means the stream was cut.
    async fn take(ws: &mut Ws, rows: &mut Vec<i64>, last_lsn: &mut String) {
        match next_message(ws).await {
            Message::Text(t) => {
                let frame: Value = serde_json::from_str(t.as_str()).unwrap();
                assert!(frame.get("error").is_none(), "the stream was cut after {} rows: {frame}", rows.len());
                rows.extend(row_numbers(&frame));
                *last_lsn = frame["nextlsn"].as_str().expect("nextlsn").to_owned();
            }
            other => panic!("the stream was cut after {} rows: {other:?}", rows.len()),
        }
    }
    for _ in 0..160 {
        take(&mut ws, &mut rows, &mut last_lsn).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((rows.len() as i64) < SLOW_ROWS, "the slow phase read everything");
    // The walsender is still there (the client would notice a cut only after draining
    // what is buffered), and, unless the writer is slow, held back by the client.
    let st = pg
        .query_opt("SELECT sent_lsn < pg_current_wal_lsn() FROM pg_stat_replication WHERE pid = $1", &[&walsender])
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("the walsender (pid {walsender}) went away while the client was slow"));
    eprintln!("after the slow phase: {} rows read, walsender held back: {}", rows.len(), st.get::<_, bool>(0));
    while (rows.len() as i64) < SLOW_ROWS {
        take(&mut ws, &mut rows, &mut last_lsn).await;
        if rows.len() % 1000 == 0 {
            ack(&mut ws, &last_lsn).await;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer finishes")
        .unwrap()
        .expect("20,000 transactions committed");
    assert!(rows.iter().copied().eq(1..=SLOW_ROWS), "rows out of order, missing or repeated");

    // Still the same, live stream.
    ack(&mut ws, &last_lsn).await;
    await_confirmed(&pg, &slot, &last_lsn).await;
    let now: Option<i32> = pg
        .query_one("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .unwrap()
        .get(0);
    assert_eq!(now, Some(walsender), "the replication connection was never replaced");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).await.success());
    drop_slot(&pg, &slot).await;
}
