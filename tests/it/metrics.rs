//! `/metrics`, `/healthz` and `/readyz`: scrapes before and after a workload see the
//! figures move, and readiness names what keeps Postgres from serving us.

use testkit::pg as common;
use testkit::support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use support::*;

/// One sample of a scrape: its metric name, labels and value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an OpenMetrics text exposition (comments left out).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("labels end with }"))),
                None => (series, BTreeMap::new()),
            };
            Sample { name: name.to_owned(), labels, value }
        })
        .collect()
}

/// `a="x",b="y"`, with `\"`, `\\` and `\n` escapes in values.
fn parse_labels(mut rest: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels {rest:?}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => panic!("bad escape in {rest:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label in {rest:?}"),
            }
        };
        out.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    /// The value of the one sample named `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} matches {} samples:\n{}", found.len(), self.text);
        found.first().map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.text))
    }

    fn session(&self, name: &str, session: &str) -> f64 {
        self.value(name, &[("session", session)])
    }
}

async fn scrape(server: &TestServer) -> Scrape {
    let (status, body) = raw_request(server.addr, "GET", "/metrics", &[], Vec::new()).await;
    let text = String::from_utf8(body).expect("UTF-8 metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("# EOF\n"), "an OpenMetrics exposition ends with # EOF:\n{text}");
    Scrape { samples: parse(&text), text }
}

/// Scrapes until `ok` holds (bounded); returns that scrape.
async fn scrape_until(server: &TestServer, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = scrape(server).await;
        if ok(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "never saw {what} in:\n{}", s.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const STREAM_ROUTE: &str = "/v2/sessions/{name}/stream";
const ONE_ROUTE: &str = "/v2/sessions/{name}";

fn requests(s: &Scrape, method: &str, route: &str, status: &str) -> f64 {
    s.get("pgdeltastream_http_requests_total", &[("method", method), ("route", route), ("status", status)])
        .unwrap_or(0.0)
}

#[tokio::test]
async fn scrapes_see_a_workload_move_the_figures() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (id serial PRIMARY KEY, v text)").await.unwrap();
    let server = TestServer::start(&db).await;
    let (status, created) = server.post("/v2/sessions", &json!({"name": "m", "tables": ["t"]}).to_string()).await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let (status, _) = server.get("/v2/sessions/m").await;
    assert_eq!(status, 200);

    let before = scrape(&server).await;
    for name in ["changes", "transactions", "sent_bytes", "acks"] {
        assert_eq!(before.session(&format!("pgdeltastream_{name}_total"), "m"), 0.0, "{name}");
    }
    assert_eq!(before.value("pgdeltastream_changes_total", &[("session", "m"), ("slot", &slot)]), 0.0);
    assert_eq!(before.session("pgdeltastream_connected_clients", "m"), 0.0);
    assert_eq!(before.get("pgdeltastream_seconds_since_last_ack", &[("session", "m")]), None, "no ack yet");
    assert_eq!(before.value("pgdeltastream_postgres_up", &[]), 1.0);
    assert!(before.session("pgdeltastream_retained_bytes", "m") > 0.0, "{}", before.text);
    assert_eq!(before.value("pgdeltastream_postgres_pool_size", &[]), 10.0);
    assert_eq!(before.value("pgdeltastream_postgres_connections", &[("kind", "snapshot")]), 1.0, "the held snapshot");
    assert_eq!(before.value("pgdeltastream_postgres_connections", &[("kind", "stream")]), 0.0);
    assert_eq!(before.value("pgdeltastream_sessions", &[]), 1.0);
    let gets_before = requests(&before, "GET", ONE_ROUTE, "200");
    assert!(gets_before >= 1.0, "{}", before.text);

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v2/sessions/m/stream", server.addr)).await.expect("upgrade");
    let streaming = scrape_until(&server, "a connected client", |s| {
        s.get("pgdeltastream_connected_clients", &[("session", "m")]) == Some(1.0)
    })
    .await;
    assert_eq!(streaming.value("pgdeltastream_postgres_connections", &[("kind", "stream")]), 1.0);

    // 3 transactions, 5 changes; each acked.
    pg.batch_execute("INSERT INTO t (v) VALUES ('a'), ('b'), ('c')").await.unwrap();
    pg.batch_execute("INSERT INTO t (v) VALUES ('d')").await.unwrap();
    pg.batch_execute("UPDATE t SET v = 'e' WHERE v = 'a'").await.unwrap();
    let mut bytes = 0;
    let mut last = String::new();
    for expected in [3, 1, 1] {
        let tx = next_changes(&mut ws).await;
        assert_eq!(tx["change"].as_array().map(Vec::len), Some(expected), "{tx}");
        bytes += tx.to_string().len();
        last = tx["nextlsn"].as_str().expect("nextlsn").to_owned();
        ack(&mut ws, &last).await;
    }
    await_confirmed(&pg, &slot, &last).await;
    let (status, _) = server.get("/v2/sessions/m").await;
    assert_eq!(status, 200);
    let (status, _) = server.get("/no/such/path/42").await;
    assert_eq!(status, 404);
    let (status, _) = raw_request(server.addr, "BREW", "/healthz", &[], Vec::new()).await;
    assert_eq!(status, 405);

    let after =
        scrape_until(&server, "three acks", |s| s.get("pgdeltastream_acks_total", &[("session", "m")]) == Some(3.0))
            .await;
    assert_eq!(after.session("pgdeltastream_changes_total", "m"), 5.0);
    assert_eq!(after.session("pgdeltastream_transactions_total", "m"), 3.0);
    // The frames are wal2json's text as it came; the client's re-serialisation is close.
    let sent = after.session("pgdeltastream_sent_bytes_total", "m");
    assert!(sent >= bytes as f64 * 0.5 && sent <= bytes as f64 * 2.0, "sent {sent}, received about {bytes}");
    let since_ack = after.session("pgdeltastream_seconds_since_last_ack", "m");
    assert!((0.0..60.0).contains(&since_ack), "{since_ack}");
    assert!(after.session("pgdeltastream_retained_bytes", "m") >= 0.0);

    assert_eq!(requests(&after, "GET", ONE_ROUTE, "200"), gets_before + 1.0, "{}", after.text);
    assert_eq!(requests(&after, "GET", STREAM_ROUTE, "101"), 1.0, "{}", after.text);
    assert_eq!(requests(&after, "GET", "unmatched", "404"), 1.0, "{}", after.text);
    assert!(!after.text.contains("/no/such/path"), "a raw path became a label:\n{}", after.text);
    assert_eq!(requests(&after, "other", "/healthz", "405"), 1.0, "{}", after.text);
    assert!(!after.text.contains("BREW"), "a made-up method became a label:\n{}", after.text);
    assert!(requests(&after, "GET", "/metrics", "200") >= 2.0, "{}", after.text);
    let duration = |suffix: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("method", "GET"), ("route", ONE_ROUTE)];
        labels.extend_from_slice(extra);
        after.value(&format!("pgdeltastream_http_request_duration_seconds_{suffix}"), &labels)
    };
    assert_eq!(duration("count", &[]), gets_before + 1.0);
    assert_eq!(duration("bucket", &[("le", "+Inf")]), gets_before + 1.0);
    assert!(duration("sum", &[]) > 0.0);

    // Everything is acked: once the walsender reports its position, nothing is behind.
    scrape_until(&server, "lag 0", |s| s.get("pgdeltastream_lag_bytes", &[("session", "m")]) == Some(0.0)).await;
    let (status, view) = server.get("/v2/sessions/m").await;
    assert_eq!(status, 200);
    assert!(view["lagBytes"].as_u64().is_some(), "{view}");
    assert!(view["retainedBytes"].as_u64().is_some(), "{view}");

    ws.close(None).await.unwrap();
    let gone = scrape_until(&server, "no client", |s| {
        s.get("pgdeltastream_connected_clients", &[("session", "m")]) == Some(0.0)
    })
    .await;
    assert_eq!(gone.session("pgdeltastream_changes_total", "m"), 5.0, "totals outlive the stream");
    scrape_until(&server, "no stream connection", |s| {
        s.get("pgdeltastream_postgres_connections", &[("kind", "stream")]) == Some(0.0)
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn healthz_and_readyz_answer_on_a_working_cluster() {
    let db = common::fresh_db().await;
    let server = TestServer::start(&db).await;
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(
        body["checks"],
        json!(["connection", "server_version", "wal_level", "replication_role", "replication_connection"])
    );
    let num: String = db.client().await.query_one("SHOW server_version_num", &[]).await.unwrap().get(0);
    let major = num.parse::<u64>().unwrap() / 10_000;
    assert_eq!(body["postgres"]["major"], json!(major), "{body}");
    assert_eq!(body["standby"], json!(false), "{body}");
    let version = body["postgres"]["version"].as_str().unwrap_or_default();
    assert!(version.starts_with(&major.to_string()), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn readyz_is_503_when_postgres_is_unreachable_and_metrics_still_answer() {
    let db = common::fresh_db().await;
    let mut settings = fast_settings(&db);
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    settings.pg.host = "127.0.0.1".into();
    settings.pg.port = closed.local_addr().unwrap().port();
    drop(closed);
    let server = TestServer::start_with(settings).await;

    let reply = exchange(server.addr, b"GET /readyz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert_eq!(header(&reply, "retry-after"), Some("1"), "every 503 says when to retry");
    let body = json_body(&reply);
    assert_eq!((&body["status"], &body["check"]), (&json!("unavailable"), &json!("connection")), "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("connection: cannot connect to Postgres"), "{error}");
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));

    let s = scrape(&server).await;
    assert_eq!(s.value("pgdeltastream_postgres_up", &[]), 0.0);
    assert_eq!(s.value("pgdeltastream_postgres_connections", &[("kind", "pool")]), 0.0);
    assert!(requests(&s, "GET", "/readyz", "503") >= 1.0, "{}", s.text);
    server.stop().await;
}

#[tokio::test]
async fn readyz_is_503_for_a_role_without_replication() {
    let db = common::fresh_db().await;
    // Roles are cluster-wide: a name of this database's own keeps reruns apart.
    let role = format!("norepl_{}", db.dbname);
    let admin = db.client().await;
    admin.batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN NOREPLICATION NOSUPERUSER")).await.unwrap();
    let mut settings = fast_settings(&db);
    settings.pg.user = role.clone();
    let server = TestServer::start_with(settings).await;

    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["check"], "replication_role", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains(&role) && error.contains("REPLICATION"), "{error}");
    // Answered from the cache within the second, and the same.
    assert_eq!(server.get("/readyz").await, (status, body));
    server.stop().await;
}

/// A pool whose one connection is taken: /readyz says so at once, /metrics answers with
/// what the process knows, /healthz does not care.
#[tokio::test]
async fn an_exhausted_pool_is_reported_quickly() {
    use tokio::io::AsyncWriteExt;
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE VIEW sleepy AS SELECT 1 AS x FROM pg_sleep(60)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.pool.size = 1;
    let server = TestServer::start_with(settings).await;
    server.init().await;
    let body = json!({"table": "sleepy"}).to_string();
    let mut page = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request =
        format!("POST /v1/snapshot/data HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    page.write_all(request.as_bytes()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = pg
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%sleepy%' AND pid <> pg_backend_pid() AND datname = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the page's query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = tokio::time::Instant::now();
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["check"], "connection", "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("all 1 pool connections"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "readyz took {:?}", started.elapsed());
    assert_eq!(server.get("/healthz").await, (200, json!({"status": "ok"})));
    let s = scrape(&server).await;
    assert!(started.elapsed() < Duration::from_secs(10), "the scrape took {:?}", started.elapsed());
    assert_eq!(s.value("pgdeltastream_postgres_connections", &[("kind", "pool")]), 1.0);
    assert_eq!(s.value("pgdeltastream_postgres_pool_size", &[]), 1.0);
    assert_eq!(s.value("pgdeltastream_postgres_up", &[]), 0.0, "no connection was free for the query");
    drop(page);
    server.stop().await;
}

#[test]
fn the_test_parser_reads_labels_with_escapes() {
    let s = parse("# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"{x}\\\\\"} 3\ny 4.5\n# EOF\n");
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].name, "x_total");
    assert_eq!(s[0].labels.get("b").map(String::as_str), Some("q\"{x}\\"));
    assert_eq!((s[1].name.as_str(), s[1].value), ("y", 4.5));
}
