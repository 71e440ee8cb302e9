//! Scale-out through NATS JetStream: `pgdeltastream publish` and `pgdeltastream gateway`
//! as processes of our binary, against a real nats-server (`make nats` installs it) with
//! JetStream in a temp dir, and a real Postgres.

use testkit::jetstream;
use testkit::pg as common;
use testkit::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use jetstream::*;
use support::row_numbers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_max_payload_arrives_whole() {
    let db = session_db().await;
    let nats = Nats::start(Some(4096)).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    // 40 rows of 300 bytes each: about 14 KB, four pieces or more of 4 KB.
    let note = "é".repeat(150);
    let pg = db.client().await;
    pg.execute("INSERT INTO items SELECT g, $1 FROM generate_series(1, 40) g", &[&note]).await.unwrap();
    pg.execute("INSERT INTO items VALUES (41, 'small')", &[]).await.unwrap();

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "big")).await.unwrap();
    let big = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&big), (1..=40).collect::<Vec<_>>());
    assert!(big["change"].as_array().unwrap().iter().all(|c| c["columnvalues"][1] == note.as_str()));
    let small = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&small), vec![41]);
    // The v1 route finds the session by its slot (the publisher records which it reads).
    let slot = slot_of(&db).await;
    let v1 = format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName={slot}&client=v1");
    let (mut ws, _) = tokio_tungstenite::connect_async(v1).await.unwrap();
    assert_eq!(row_numbers(&next_transaction(&mut ws).await), (1..=40).collect::<Vec<_>>());
    let (status, body) = refused(format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName=delta_nosuch1")).await;
    assert_eq!(status, 404, "{body}");
    // Stored as pieces: more messages than transactions.
    let js = nats.jetstream().await;
    let mut stream = js.get_stream("PGDELTASTREAM_ORDERS").await.unwrap();
    let messages = stream.info().await.unwrap().state.messages;
    assert!(messages >= 5, "{messages} messages for 2 transactions, one of 14 KB with max_payload 4096");
}

/// What one client of the kill test saw: per connection, each transaction's nextlsn
/// and row numbers; and its acks with when they were sent.
#[derive(Default)]
struct ClientLog {
    segments: Vec<Vec<(u64, Vec<i64>)>>,
    acks: Vec<(Instant, u64)>,
    errors: Vec<String>,
}

/// Reads and acks every transaction until it has row `total`; when its connection
/// drops, reconnects, trying the other gateway first.
async fn kill_test_client(name: String, mut gw: usize, ports: [u16; 2], total: i64, log: Arc<Mutex<ClientLog>>) {
    loop {
        let mut ws = loop {
            match tokio_tungstenite::connect_async(url(ports[gw], &name)).await {
                Ok((ws, _)) => break ws,
                Err(_) => {
                    gw = 1 - gw;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        log.lock().unwrap().segments.push(Vec::new());
        loop {
            let message = tokio::time::timeout(Duration::from_secs(120), ws.next()).await;
            let text = match message.unwrap_or_else(|_| panic!("{name}: nothing for 120 s")) {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            let Some(nextlsn) = v["nextlsn"].as_str() else {
                log.lock().unwrap().errors.push(text.to_string());
                continue;
            };
            let rows = row_numbers(&v);
            let done = rows.last() == Some(&total);
            {
                let mut log = log.lock().unwrap();
                log.segments.last_mut().unwrap().push((lsn(nextlsn), rows));
                log.acks.push((Instant::now(), lsn(nextlsn)));
            }
            if ws.send(Message::Text(format!(r#"{{"lsn":"{nextlsn}"}}"#).into())).await.is_err() {
                break;
            }
            if done {
                let _ = ws.close(None).await;
                return;
            }
        }
        gw = 1 - gw;
    }
}

/// Rows come in commit order and none is missing: within a connection each row is
/// the one after the last; a new connection may start again below what was seen.
fn check_rows(name: &str, log: &ClientLog, total: i64) {
    let mut seen = 0;
    for (k, segment) in log.segments.iter().enumerate() {
        let mut prev: Option<i64> = None;
        for (_, rows) in segment {
            for &row in rows {
                match prev {
                    Some(p) => assert_eq!(row, p + 1, "{name}: row {row} after {p} in connection {k}"),
                    None => assert!(
                        row <= seen + 1,
                        "{name}: connection {k} starts at row {row}, but only {seen} were seen"
                    ),
                }
                prev = Some(row);
                seen = seen.max(row);
            }
        }
    }
    assert_eq!(seen, total, "{name}: rows missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_every_change_across_kill_9_of_a_gateway_and_the_publisher() {
    const CLIENTS: usize = 20;
    const TOTAL: i64 = 2000;
    const PER_TX: i32 = 5;
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let mut publisher_proc = publisher(&db, &nats, &[]);
    let ports = [free_port(), free_port()];
    let mut doomed = gateway(&db, &nats, ports[0]).await;
    let _survivor = gateway(&db, &nats, ports[1]).await;

    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let clients: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| tokio::spawn(kill_test_client(format!("c{i}"), i % 2, ports, TOTAL, log.clone())))
        .collect();
    let writer = {
        let db = db.clone();
        tokio::spawn(async move { write_rows(&db, 1, TOTAL as i32, PER_TX, Duration::from_millis(10)).await })
    };

    // Mid-load: kill -9 the first gateway and the publisher, then start both again.
    let pg = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = pg.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
        if n >= TOTAL / 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the writer is stuck at {n} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_at = Instant::now();
    doomed.kill9();
    publisher_proc.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _publisher_again = publisher(&db, &nats, &[]);
    let _doomed_again = gateway(&db, &nats, ports[0]).await;
    drop(publisher_proc);

    writer.await.unwrap();
    for client in clients {
        tokio::time::timeout(Duration::from_secs(300), client).await.expect("every client gets every row").unwrap();
    }
    for (i, log) in logs.iter().enumerate() {
        let name = format!("c{i}");
        let log = log.lock().unwrap();
        assert!(log.errors.is_empty(), "{name}: {:?}", log.errors);
        check_rows(&name, &log, TOTAL);
        if i % 2 == 1 {
            // The surviving gateway's clients stayed connected: the publisher's restart
            // published some transactions again, and the gateway dropped them.
            assert_eq!(log.segments.len(), 1, "{name} reconnected");
            let lsns: Vec<u64> = log.segments[0].iter().map(|(l, _)| *l).collect();
            assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{name}: a transaction came twice");
        } else {
            assert!(log.segments.len() >= 2, "{name} was connected to the killed gateway and never reconnected");
            // Acks sent well before the kill were stored (one KV write takes a few ms):
            // nothing at or below them comes again.
            let acked = log
                .acks
                .iter()
                .filter(|(at, _)| *at + Duration::from_secs(2) < killed_at)
                .map(|(_, l)| *l)
                .max()
                .unwrap_or(0);
            for (k, segment) in log.segments.iter().enumerate().skip(1) {
                if let Some((first, _)) = segment.first() {
                    assert!(
                        *first > acked,
                        "{name}: connection {k} starts at {first:X}, acked {acked:X} before the kill"
                    );
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_what_the_stream_retains_is_refused() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &["--nats-max-msgs", "3"]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 1, 1, Duration::ZERO).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "early")).await.unwrap();
    let first = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&first), vec![1]);
    support::ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    // The ack is stored in the KV bucket, where any gateway finds it.
    await_ack_stored(&nats, "orders.early").await;
    ws.close(None).await.unwrap();

    // Ten more transactions; the stream keeps the last three.
    write_rows(&db, 2, 11, 1, Duration::ZERO).await;
    let first_kept = await_stream_seq(&nats, 11).await;
    assert_eq!(first_kept, 9);
    let (status, body) = refused(url(port, "early")).await;
    assert_eq!(status, 410, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("client early") && error.contains("no longer holds"), "{error}");
    assert!(error.contains("sequences 2 to 8"), "{error}");
    // A client that acked nothing would start at the stream's beginning, gone too.
    let (status, body) = refused(url(port, "late")).await;
    assert_eq!(status, 410, "{body}");
    assert!(body["error"].as_str().unwrap().contains("acked nothing"), "{body}");
    assert!(body["error"].as_str().unwrap().contains("sequences 1 to 8"), "{body}");
    // Unknown sessions and bad client ids are refused as such.
    let (status, body) = refused(format!("ws://127.0.0.1:{port}/v2/sessions/nosuch/stream")).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not published"), "{body}");
    let (status, body) = refused(url(port, "a.b")).await;
    assert_eq!(status, 400, "{body}");
}

/// The slot of the test database's one session.
async fn slot_of(db: &common::TestDb) -> String {
    let pg = db.client().await;
    let row = pg
        .query_one("SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()", &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_resuming_behind_the_stream_stores_nothing_twice() {
    let db = session_db().await;
    let pg = db.client().await;
    let slot = slot_of(&db).await;
    // A copy of the slot at its start: put back later, the slot is behind the stream as
    // after a Postgres crash (the slot's position on disk lags what it confirmed).
    pg.execute("SELECT pg_copy_logical_replication_slot($1, 'nats_test_copy')", &[&slot]).await.unwrap();
    let nats = Nats::start(None).await;
    // A duplicate window shorter than the restart: only the publisher's own check of
    // the stream's last message keeps the re-read transactions out.
    let mut first = publisher(&db, &nats, &["--nats-duplicate-window", "1"]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 20, 1, Duration::ZERO).await;
    await_stream_seq(&nats, 20).await;
    first.kill9();

    support::await_slot(&pg, &slot, "inactive", "NOT active").await;
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
    pg.execute("SELECT pg_copy_logical_replication_slot('nats_test_copy', $1)", &[&slot]).await.unwrap();
    pg.execute("SELECT pg_drop_replication_slot('nats_test_copy')", &[]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _again = publisher(&db, &nats, &["--nats-duplicate-window", "1"]);
    write_rows(&db, 21, 25, 1, Duration::ZERO).await;
    await_stream_seq(&nats, 25).await;
    // Time for anything published twice to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let js = nats.jetstream().await;
    let mut stream = js.get_stream("PGDELTASTREAM_ORDERS").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.last_sequence), (25, 25), "transactions stored twice");

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "after")).await.unwrap();
    for row in 1..=25 {
        assert_eq!(row_numbers(&next_transaction(&mut ws).await), vec![row]);
    }
}

/// A transaction is published a piece at a time as it is decoded. A publisher killed
/// between two pieces resumes after the last piece the stream holds (with a duplicate
/// window too short to help): every piece is stored once, and the transaction arrives
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_killed_between_pieces_resumes_after_the_last_stored_piece() {
    const ROWS: i32 = 50_000;
    let db = session_db().await;
    let nats = Nats::start(Some(4096)).await;
    let window = ["--nats-duplicate-window", "1"];
    let mut first = publisher(&db, &nats, &window);
    let note = "n".repeat(300);
    let pg = db.client().await;
    pg.execute("INSERT INTO items SELECT g, $1 FROM generate_series(1, $2) g", &[&note, &ROWS]).await.unwrap();
    // About 16 MB in pieces of under 4 KB: the kill comes long before the last.
    let js = nats.jetstream().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stream = loop {
        if let Ok(mut stream) = js.get_stream("PGDELTASTREAM_ORDERS").await {
            if stream.info().await.unwrap().state.messages > 0 {
                break stream;
            }
        }
        assert!(Instant::now() < deadline, "nothing was published");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    first.kill9();
    let last_piece = |stream: &async_nats::jetstream::stream::Stream| {
        let stream = stream.clone();
        async move {
            let last = stream.get_last_raw_message_by_subject("pgdeltastream.orders").await.unwrap();
            last.headers.get(pgdeltastream::bus::message::PIECE).unwrap().as_str().to_owned()
        }
    };
    let at_kill = last_piece(&stream).await;
    assert!(at_kill.ends_with("/+"), "the transaction was stored whole before the kill ({at_kill})");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let _again = publisher(&db, &nats, &window);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "whole")).await.unwrap();
    let rows = row_numbers(&next_transaction(&mut ws).await);
    assert_eq!(rows, (1..=i64::from(ROWS)).collect::<Vec<_>>());
    let end = last_piece(&stream).await;
    let (piece, of) = end.split_once('/').unwrap();
    assert_eq!(piece, of, "the last message ends the transaction");
    let messages = stream.info().await.unwrap().state.messages;
    assert_eq!(messages, piece.parse::<u64>().unwrap(), "pieces stored twice (killed at {at_kill})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_shutting_down_closes_with_1001_and_its_clients_resume_elsewhere() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let ports = [free_port(), free_port()];
    let mut first = gateway(&db, &nats, ports[0]).await;
    let _second = gateway(&db, &nats, ports[1]).await;
    write_rows(&db, 1, 3, 1, Duration::ZERO).await;

    let (mut ws, _) = tokio_tungstenite::connect_async(url(ports[0], "sd")).await.unwrap();
    let mut last = Value::Null;
    for row in 1..=2 {
        last = next_transaction(&mut ws).await;
        assert_eq!(row_numbers(&last), vec![row]);
    }
    support::ack(&mut ws, last["nextlsn"].as_str().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || first.terminate()).await.unwrap();
    assert!(status.success(), "{status}");
    let (code, reason) = support::await_close(&mut ws).await;
    assert_eq!(code, 1001, "{reason}");

    // The other gateway resumes after the ack.
    let (mut ws, _) = tokio_tungstenite::connect_async(url(ports[1], "sd")).await.unwrap();
    assert_eq!(row_numbers(&next_transaction(&mut ws).await), vec![3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_next_message_is_gone_gets_an_error_and_close_4410() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 5, 1, Duration::ZERO).await;
    await_stream_seq(&nats, 5).await;
    // A hole in the middle of the stream, as retention would leave ahead of a slow client.
    let js = nats.jetstream().await;
    let stream = js.get_stream("PGDELTASTREAM_ORDERS").await.unwrap();
    assert!(stream.delete_message(3).await.unwrap());

    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "holey")).await.unwrap();
    for row in 1..=2 {
        assert_eq!(row_numbers(&next_transaction(&mut ws).await), vec![row]);
    }
    let error = support::next_json(&mut ws).await;
    let error = error["error"].as_str().unwrap_or_else(|| panic!("not an error: {error}"));
    assert!(error.contains("needs stream sequence 3 next") && error.contains("sequences 3 to 3"), "{error}");
    let (code, _) = support::await_close(&mut ws).await;
    assert_eq!(code, 4410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_shared_subscription_catch_up_on_their_own_and_join_it() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 5, 1, Duration::ZERO).await;
    await_stream_seq(&nats, 5).await;
    // The first client starts the gateway's subscription at the stream's end (6), and
    // reads 1 to 5 from a consumer of its own first.
    let (mut a, _) = tokio_tungstenite::connect_async(url(port, "a")).await.unwrap();
    for row in 1..=5 {
        assert_eq!(row_numbers(&next_transaction(&mut a).await), vec![row]);
    }
    write_rows(&db, 6, 10, 1, Duration::ZERO).await;
    for row in 6..=10 {
        assert_eq!(row_numbers(&next_transaction(&mut a).await), vec![row]);
    }
    let (mut b, _) = tokio_tungstenite::connect_async(url(port, "b")).await.unwrap();
    write_rows(&db, 11, 12, 1, Duration::ZERO).await;
    for row in 1..=12 {
        assert_eq!(row_numbers(&next_transaction(&mut b).await), vec![row]);
    }
    for row in 11..=12 {
        assert_eq!(row_numbers(&next_transaction(&mut a).await), vec![row]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_of_an_unknown_session_exits_with_an_error() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let mut cmd = support::server_command(&db, free_port());
    cmd.args(["publish", "--nats", &nats.url, "--session", "nosuch"]).env("NO_COLOR", "1");
    // SAFETY: prctl is async-signal-safe; the child dies with the test if it hangs.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(move || cmd.output().unwrap()))
        .await
        .expect("the publisher exits within 60 s")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no session named nosuch"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_connection_of_a_client_cannot_move_its_stored_ack_back() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let ports = [free_port(), free_port()];
    let _g0 = gateway(&db, &nats, ports[0]).await;
    let _g1 = gateway(&db, &nats, ports[1]).await;
    write_rows(&db, 1, 3, 1, Duration::ZERO).await;
    // Two connections of one client, one on each gateway, both from the start.
    let (mut old, _) = tokio_tungstenite::connect_async(url(ports[0], "twin")).await.unwrap();
    let (mut new, _) = tokio_tungstenite::connect_async(url(ports[1], "twin")).await.unwrap();
    let mut lsns = Vec::new();
    for row in 1..=3 {
        let tx = next_transaction(&mut new).await;
        assert_eq!(row_numbers(&tx), vec![row]);
        lsns.push(tx["nextlsn"].as_str().unwrap().to_owned());
        assert_eq!(row_numbers(&next_transaction(&mut old).await), vec![row]);
    }
    let kv = nats.jetstream().await.get_key_value("pgdeltastream_acks").await.unwrap();
    let stored = || async {
        let v = kv.get("orders.twin").await.unwrap()?;
        Some(serde_json::from_slice::<Value>(&v).unwrap()["lsn"].as_str().unwrap().to_owned())
    };
    support::ack(&mut new, &lsns[2]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored().await.as_deref() != Some(lsns[2].as_str()) {
        assert!(Instant::now() < deadline, "the ack was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    support::ack(&mut old, &lsns[0]).await;
    old.close(None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stored().await.as_deref(), Some(lsns[2].as_str()));
}

/// A gateway with a JWT secret asks for a token as the server does: 401 without one,
/// 403 for a consumer of another session, and a consumer of `orders` streams (the
/// token may come as `?access_token=`, as from a browser). Two consumers naming the
/// same client keep positions of their own (their tokens' `sub`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_auth_checks_tokens_and_scopes() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    const SECRET: &[u8] = b"a-gateway-test-secret-of-32-bytes-or-more";
    let token_of = |sub: &str, sessions: &[&str]| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        let claims = serde_json::json!({"sub": sub, "role": "consumer", "sessions": sessions, "exp": exp});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let token = |sessions: &[&str]| token_of("alice", sessions);
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let mut cmd = support::server_command(&db, port);
    cmd.env("PGDELTASTREAM_JWT_SECRET", std::str::from_utf8(SECRET).unwrap()).args(["gateway", "--nats", &nats.url]);
    let _gateway = Proc::spawn(cmd);
    wait_listening(port, "the gateway").await;
    write_rows(&db, 1, 1, 1, Duration::ZERO).await;
    // The gateway knows a session once its publisher has published into it.
    await_stream_seq(&nats, 1).await;

    let (status, body) = refused(url(port, "a")).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = refused(format!("{}&access_token={}", url(port, "a"), token(&["other"]))).await;
    assert_eq!(status, 403, "{body}");
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{}&access_token={}", url(port, "a"), token(&["orders"])))
            .await
            .unwrap();
    let first = next_transaction(&mut ws).await;
    assert_eq!(row_numbers(&first), vec![1]);

    // alice acks row 1 as client `a`; bob's client `a` still starts at row 1.
    write_rows(&db, 2, 2, 1, Duration::ZERO).await;
    support::ack(&mut ws, first["nextlsn"].as_str().unwrap()).await;
    ws.close(None).await.unwrap();
    let alices = pgdeltastream::bus::acks::key("orders", "a", Some("alice"));
    await_ack_stored(&nats, &alices).await;
    let as_bob = format!("{}&access_token={}", url(port, "a"), token_of("bob", &["orders"]));
    let (mut bob, _) = tokio_tungstenite::connect_async(as_bob).await.unwrap();
    assert_eq!(row_numbers(&next_transaction(&mut bob).await), vec![1], "bob resumed after alice's ack");
    let as_alice = format!("{}&access_token={}", url(port, "a"), token(&["orders"]));
    let (mut alice, _) = tokio_tungstenite::connect_async(as_alice).await.unwrap();
    assert_eq!(row_numbers(&next_transaction(&mut alice).await), vec![2], "alice did not resume after her ack");

    // A page of another origin cannot use a token it holds: its handshake is refused
    // before the token is looked at.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut from_page =
        format!("{}&access_token={}", url(port, "e"), token(&["orders"])).into_client_request().unwrap();
    from_page.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(from_page).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("a foreign origin's handshake: {:?}", other.map(|_| ())),
    }

    // A validly signed token whose exp is past any clock (2^63 s, u64::MAX) is served,
    // not answered with a dropped connection.
    for (exp, client) in [(1u64 << 63, "c"), (u64::MAX, "d")] {
        let claims = serde_json::json!({"sub": "carol", "role": "consumer", "sessions": ["orders"], "exp": exp});
        let huge =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}&access_token={huge}", url(port, client)))
            .await
            .unwrap_or_else(|e| panic!("exp {exp}: {e}"));
        assert_eq!(row_numbers(&next_transaction(&mut ws).await), vec![1], "exp {exp}");
    }
}

/// A session deleted and made again under its name is a new incarnation: its publisher
/// starts a new stream (none of the old history, which may be of tables the new one
/// does not list, reaches its clients), and a client's position in the old one is
/// refused with 410 rather than resumed across the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_again_under_its_name_starts_a_new_stream() {
    let db = session_db().await;
    db.client().await.batch_execute("CREATE TABLE others (id int PRIMARY KEY, note text)").await.unwrap();
    let nats = Nats::start(None).await;
    let mut first = publisher(&db, &nats, &[]);
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    write_rows(&db, 1, 3, 1, Duration::ZERO).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "old")).await.unwrap();
    let mut last = Value::Null;
    for row in 1..=3 {
        last = next_transaction(&mut ws).await;
        assert_eq!(row_numbers(&last), vec![row]);
    }
    support::ack(&mut ws, last["nextlsn"].as_str().unwrap()).await;
    await_ack_stored(&nats, "orders.old").await;
    first.terminate();

    // Made again: another table.
    let server = support::TestServer::start(&db).await;
    let (status, body) = support::request(server.addr, "DELETE", "/v2/sessions/orders", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post("/v2/sessions", r#"{"name":"orders","tables":["public.others"]}"#).await;
    assert_eq!(status, 201, "{body}");
    server.stop().await;
    let _again = publisher(&db, &nats, &[]);
    write_rows(&db, 4, 4, 1, Duration::ZERO).await;
    db.client().await.execute("INSERT INTO others VALUES (100, 'new')", &[]).await.unwrap();

    // The old stream's three transactions are gone: the new one holds the one insert.
    let deadline = Instant::now() + Duration::from_secs(60);
    let js = nats.jetstream().await;
    loop {
        // The old stream may be deleted between the two calls.
        if let Ok(mut stream) = js.get_stream("PGDELTASTREAM_ORDERS").await {
            if let Ok(info) = stream.info().await {
                let state = &info.state;
                if state.messages >= 1 && state.first_sequence == 1 && state.last_sequence == 1 {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "the new session's stream never held its first transaction alone");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut fresh, _) = tokio_tungstenite::connect_async(url(port, "fresh")).await.unwrap();
    let tx = next_transaction(&mut fresh).await;
    assert_eq!(tx["change"][0]["table"], "others", "{tx}");
    assert_eq!(row_numbers(&tx), vec![100]);

    let (status, body) = refused(url(port, "old")).await;
    assert_eq!(status, 410, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("deleted and made again") && error.contains("client old"), "{error}");
    // The old connection gets nothing of the new session: once the new stream reaches
    // the sequence it waits for, it ends as a client whose next message is gone.
    for id in 101..=104 {
        db.client().await.execute("INSERT INTO others VALUES ($1, 'new')", &[&id]).await.unwrap();
    }
    let (code, reason) = support::await_close(&mut ws).await;
    assert_eq!(code, 4410, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_started_before_nats_waits_for_it() {
    let db = session_db().await;
    let nats_port = free_port();
    let mut cmd = support::server_command(&db, free_port());
    cmd.env("PGDELTASTREAM_STATUS_INTERVAL", "1").args([
        "publish",
        "--nats",
        &format!("nats://127.0.0.1:{nats_port}"),
        "--session",
        "orders",
    ]);
    let mut publisher = Proc::spawn(cmd);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(publisher.is_running(), "the publisher exited while NATS was down");
    let nats = Nats::start_on(nats_port, None).await;
    write_rows(&db, 1, 1, 1, Duration::ZERO).await;
    await_stream_seq(&nats, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_refuses_an_invalid_slot_name_with_400() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let port = free_port();
    let _gateway = gateway(&db, &nats, port).await;
    for bad in ["a.b", "Delta_x1", "a%20b", "%2A"] {
        let (status, body) = refused(format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName={bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().unwrap().contains("invalid slot name"), "{body}");
    }
}

/// A gateway has the server's edge: liveness, readiness (JetStream's), metrics, the
/// body limit and the JSON 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_answers_probes_and_metrics_and_refuses_large_bodies() {
    let db = session_db().await;
    let nats = Nats::start(None).await;
    let _publisher = publisher(&db, &nats, &[]);
    let port = free_port();
    let mut gw = gateway(&db, &nats, port).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let get = |path: &'static str| support::request(addr, "GET", path, None);

    let (status, body) = get("/healthz").await;
    assert_eq!((status, &body["status"]), (200, &Value::from("ok")), "{body}");
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"], serde_json::json!(["jetstream"]), "{body}");

    write_rows(&db, 1, 1, 1, Duration::ZERO).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url(port, "m")).await.unwrap();
    assert_eq!(row_numbers(&next_transaction(&mut ws).await), vec![1]);
    let metrics = || async {
        let (status, body) = support::raw_request(addr, "GET", "/metrics", &[], Vec::new()).await;
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    };
    let text = metrics().await;
    for line in [
        r#"pgdeltastream_http_requests_total{method="GET",route="/healthz",status="200"} 1"#,
        r#"pgdeltastream_http_requests_total{method="GET",route="/v2/sessions/{name}/stream",status="101"} 1"#,
        r#"pgdeltastream_connected_clients{session="orders"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
    }
    ws.close(None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics().await.lines().any(|l| l == r#"pgdeltastream_connected_clients{session="orders"} 0"#) {
        assert!(Instant::now() < deadline, "the client is still counted after it closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let head = "POST /v2/sessions/orders/stream HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                content-length: 70000\r\n\r\n";
    let reply = support::exchange(addr, head.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
    assert!(support::json_body(&reply)["error"].as_str().unwrap().contains("70000"), "{reply}");
    let (status, body) = get("/nope").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");

    // NATS gone: still alive, not ready (once the last answer, 1 s old at most, is stale).
    drop(nats);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = support::exchange(addr, b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
    assert_eq!(support::header(&reply, "retry-after"), Some("1"), "{reply}");
    assert_eq!(support::json_body(&reply)["check"], "jetstream", "{reply}");
    assert_eq!(get("/healthz").await.0, 200);
    assert!(gw.is_running(), "the gateway exited when NATS went");
}

/// With auth, a gateway's probes stay public and its metrics need an admin token, as
/// on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_auth_keeps_probes_public_and_metrics_for_admins() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    const SECRET: &[u8] = b"a-gateway-test-secret-of-32-bytes-or-more";
    let token = |role: &str| {
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        let claims = serde_json::json!({"sub": "ops", "role": role, "sessions": ["orders"], "exp": exp});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let db = common::fresh_db().await;
    let nats = Nats::start(None).await;
    let port = free_port();
    let mut cmd = support::server_command(&db, port);
    cmd.env("PGDELTASTREAM_JWT_SECRET", std::str::from_utf8(SECRET).unwrap()).args(["gateway", "--nats", &nats.url]);
    let _gateway = Proc::spawn(cmd);
    wait_listening(port, "the gateway").await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));

    for path in ["/healthz", "/readyz"] {
        let (status, body) = support::request(addr, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let scrape = |token: Option<String>| async move {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
        support::raw_request(addr, "GET", "/metrics", &headers, Vec::new()).await
    };
    assert_eq!(scrape(None).await.0, 401);
    assert_eq!(scrape(Some(token("consumer"))).await.0, 403);
    let (status, body) = scrape(Some(token("admin"))).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains(r#"pgdeltastream_http_requests_total{method="GET",route="/metrics",status="403"} 1"#),
        "{text}"
    );
}

/// A gateway's clients get frames of the gateway's `--frame-size`, as the server's
/// clients get frames of the server's, whatever size of pieces NATS stored: the same
/// frames, byte for byte, as a client of the server received for the same transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_client_gets_frames_of_the_frame_size() {
    const FRAME: usize = 1024;
    let db = session_db().await;
    let note = "é".repeat(150);
    let pg = db.client().await;
    pg.execute("INSERT INTO items SELECT g, $1 FROM generate_series(1, 40) g", &[&note]).await.unwrap();

    // The server's client first; it does not ack, so the publisher reads it all again.
    let mut settings = support::fast_settings(&db);
    settings.session.frame_bytes = FRAME;
    let server = support::TestServer::start_with(settings).await;
    let mut tcp = raw_websocket(server.addr.port(), "/v2/sessions/orders/stream").await;
    let from_server = message_frames(&mut tcp).await;
    drop(tcp);
    server.stop().await;
    let text: Vec<u8> = from_server.concat();
    let big: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(row_numbers(&big), (1..=40).collect::<Vec<_>>());
    assert!(from_server.len() > 4, "{} frames for 14 KB", from_server.len());

    // Stored in pieces of under 4 KB; served in frames of 1 KB.
    let nats = Nats::start(Some(4096)).await;
    let _publisher = publisher(&db, &nats, &[]);
    await_stream_seq(&nats, 1).await;
    let port = free_port();
    let mut cmd = support::server_command(&db, port);
    cmd.env("PGDELTASTREAM_FRAME_SIZE", FRAME.to_string()).args(["gateway", "--nats", &nats.url]);
    let _gateway = Proc::spawn(cmd);
    wait_listening(port, "the gateway").await;
    let mut tcp = raw_websocket(port, "/v2/sessions/orders/stream?client=frames").await;
    let from_gateway = message_frames(&mut tcp).await;
    let sizes: Vec<usize> = from_gateway.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&n| n <= FRAME), "frames larger than --frame-size: {sizes:?}");
    assert!(from_gateway == from_server, "the gateway's frames {sizes:?} are not the server's");
}

/// A websocket opened by hand, so that each frame is seen as it was sent.
async fn raw_websocket(port: u16, path: &str) -> tokio::net::TcpStream {
    testkit::raw::websocket(([127, 0, 0, 1], port).into(), path).await
}

/// The payloads of the frames of the next text message (pings are passed over).
async fn message_frames(tcp: &mut tokio::net::TcpStream) -> Vec<Vec<u8>> {
    let read = async {
        let mut frames = Vec::new();
        loop {
            let (head, payload) = testkit::raw::frame(tcp).await;
            match head & 0x0f {
                0x1 | 0x0 => frames.push(payload),
                0x8 => panic!("closed: {}", String::from_utf8_lossy(&payload)),
                _ => continue, // ping, pong
            }
            if head & 0x80 != 0 {
                return frames;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("a message within 60 s")
}
