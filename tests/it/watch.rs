//! Watching a session (`GET /v2/sessions/{name}/watch`): a viewer's copy of its changes
//! from a temporary slot of its own, which never moves or takes the session's slot.

/// A cluster of its own: a test here counts on its 64 replication slots.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("watch")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

async fn setup_with(max_watchers: usize) -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text); CREATE TABLE other (id int PRIMARY KEY);")
        .await
        .unwrap();
    let mut settings = fast_settings(&db);
    settings.session.max_watchers = max_watchers;
    let server = TestServer::start_with(settings).await;
    (db, pg, server)
}

/// Creates session `orders` (table orders) with `plugin`; returns its slot.
async fn create(server: &TestServer, plugin: &str) -> String {
    let body = json!({"name": "orders", "tables": ["orders"], "plugin": plugin}).to_string();
    let (status, created) = server.post("/v2/sessions", &body).await;
    assert_eq!(status, 201, "{created}");
    created["slotName"].as_str().unwrap().to_owned()
}

fn watch_url(server: &TestServer, name: &str) -> String {
    format!("ws://{}/v2/sessions/{name}/watch", server.addr)
}

async fn watch(server: &TestServer, name: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(watch_url(server, name)).await.expect("watch upgrade");
    ws
}

async fn watch_refused(server: &TestServer, name: &str) -> (u16, Value) {
    match tokio_tungstenite::connect_async(watch_url(server, name)).await {
        Ok(_) => panic!("watch upgrade succeeded; expected a refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null))
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

/// The ids of the next `n` inserts the watcher sees (records of the `changes` format).
async fn watched_inserts(ws: &mut Ws, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let rec = next_json(ws).await;
        if rec["action"] == "I" {
            assert_eq!(rec["table"], "orders", "{rec}");
            if rec.get("pk").is_some() {
                assert_eq!(rec["pk"][0]["name"], "id", "{rec}");
            }
            let id = rec["columns"].as_array().unwrap().iter().find(|c| c["name"] == "id").unwrap()["value"].clone();
            ids.push(id.as_i64().unwrap());
        }
    }
    ids
}

/// The ids of the next `n` inserts the session's consumer gets; acks each transaction.
async fn consumed_inserts(ws: &mut Ws, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let tx = next_changes(ws).await;
        ids.extend(row_numbers(&tx));
        ack(ws, tx["nextlsn"].as_str().unwrap()).await;
    }
    ids
}

async fn session(server: &TestServer) -> Value {
    let (status, view) = server.get("/v2/sessions/orders").await;
    assert_eq!(status, 200, "{view}");
    view
}

#[tokio::test]
async fn watching_leaves_the_session_slot_alone_and_its_consumer_gets_the_same_changes() {
    for plugin in ["wal2json", "pgoutput"] {
        let (_db, pg, server) = setup_with(8).await;
        let slot = create(&server, plugin).await;
        let before = confirmed_flush(&pg, &slot).await.unwrap();
        let mut watcher = watch(&server, "orders").await;
        assert_eq!(session(&server).await["watchers"], 1, "{plugin}");

        pg.batch_execute(
            "INSERT INTO orders VALUES (1, 'a'); INSERT INTO other VALUES (1); INSERT INTO orders VALUES (2, 'b');",
        )
        .await
        .unwrap();
        assert_eq!(watched_inserts(&mut watcher, 2).await, vec![1, 2], "{plugin}");
        // The watcher confirms its own slot within a status interval (500 ms): give it
        // several, then the session's slot must not have moved, nor be taken.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(confirmed_flush(&pg, &slot).await.unwrap(), before, "{plugin}: watching moved the session's slot");
        let view = session(&server).await;
        assert_eq!(view["streaming"], false, "{plugin}: {view}");
        assert_eq!(view["lastAckLsn"], Value::Null, "{plugin}: {view}");

        // The consumer streams the session while it is watched, and gets the same rows.
        let (mut consumer, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/v2/sessions/orders/stream", server.addr))
                .await
                .expect("the consumer streams while the session is watched");
        assert_eq!(consumed_inserts(&mut consumer, 2).await, vec![1, 2], "{plugin}");
        pg.batch_execute("INSERT INTO orders VALUES (3, 'c')").await.unwrap();
        assert_eq!(consumed_inserts(&mut consumer, 1).await, vec![3], "{plugin}");
        assert_eq!(watched_inserts(&mut watcher, 1).await, vec![3], "{plugin}");
        server.stop().await;
    }
}

#[tokio::test]
async fn the_temporary_slot_goes_with_its_watcher() {
    let (_db, pg, server) = setup_with(8).await;
    create(&server, "wal2json").await;
    let watch_slots = "SELECT count(*) FROM pg_replication_slots WHERE temporary AND slot_name LIKE 'pgdeltastream_watch_%' AND database = current_database()";
    let mut watcher = watch(&server, "orders").await;
    let n: i64 = pg.query_one(watch_slots, &[]).await.unwrap().get(0);
    assert_eq!(n, 1, "a watcher streams from a temporary slot");
    // The v1 list shows the slots of sessions, not those of watchers.
    let (_, v1) = server.get("/v1/sessions").await;
    assert_eq!(v1.as_array().unwrap().len(), 1, "{v1}");

    // The watcher confirms its slot as it sends, without any ack: it retains no WAL.
    pg.batch_execute("INSERT INTO orders VALUES (1, 'a')").await.unwrap();
    assert_eq!(watched_inserts(&mut watcher, 1).await, vec![1]);
    let commit = next_json(&mut watcher).await;
    assert_eq!(commit["action"], "C", "{commit}");
    let end = commit["nextlsn"].as_str().unwrap().to_owned();
    let temp: String = pg
        .query_one("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'pgdeltastream_watch_%' AND database = current_database()", &[])
        .await
        .unwrap()
        .get(0);
    await_confirmed(&pg, &temp, &end).await;

    watcher.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = pg.query_one(watch_slots, &[]).await.unwrap().get(0);
        if n == 0 && session(&server).await["watchers"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the watcher's slot outlived it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn watchers_beyond_the_cap_are_refused_with_503() {
    let (_db, _pg, server) = setup_with(1).await;
    create(&server, "wal2json").await;
    let mut first = watch(&server, "orders").await;
    let (status, body) = watch_refused(&server, "orders").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("watching"), "{body}");

    first.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while session(&server).await["watchers"] != 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first watcher never left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _second = watch(&server, "orders").await;
    server.stop().await;
}

#[tokio::test]
async fn unknown_sessions_are_refused_before_the_upgrade() {
    let (_db, _pg, server) = setup_with(8).await;
    let (status, body) = watch_refused(&server, "nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.get("/v2/sessions/nope/watch").await;
    assert_eq!(status, 400, "not a websocket request: {body}");
    server.stop().await;
}

#[tokio::test]
async fn dropping_a_session_ends_its_watchers() {
    let (_db, _pg, server) = setup_with(8).await;
    create(&server, "pgoutput").await;
    let mut watcher = watch(&server, "orders").await;
    let (status, body) = support::request(server.addr, "DELETE", "/v2/sessions/orders", None).await;
    assert_eq!(status, 200, "{body}");
    let (code, reason) = await_close(&mut watcher).await;
    assert_eq!((code, reason.as_str()), (1000, "session dropped"));
    server.stop().await;
}

#[tokio::test]
async fn with_auth_watching_needs_the_sessions_scope() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use pgdeltastream::server::{KeySource, Verifier};
    const SECRET: &[u8] = b"a watch test secret that is long enough";
    let token = |claims: Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.http.auth = Some(std::sync::Arc::new(Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let bearer = format!("Bearer {}", token(json!({"role": "admin", "exp": exp})));
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let body = json!({"name": "orders", "tables": ["orders"]}).to_string().into_bytes();
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &headers, body).await.0, 201);

    let (status, body) = watch_refused(&server, "orders").await;
    assert_eq!(status, 401, "no token: {body}");
    let other = token(json!({"role": "consumer", "sessions": ["other"], "exp": exp}));
    let url = format!("{}?access_token={other}", watch_url(&server, "orders"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    let mine = token(json!({"role": "consumer", "sessions": ["orders"], "exp": exp}));
    let url = format!("{}?access_token={mine}", watch_url(&server, "orders"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("a consumer of the session may watch it");
    pg.batch_execute("INSERT INTO orders VALUES (7)").await.unwrap();
    assert_eq!(watched_inserts(&mut ws, 1).await, vec![7]);
    server.stop().await;
}

/// One consumer cannot take every watcher place: a token's watchers are capped (429),
/// another consumer and an admin still watch.
#[tokio::test]
async fn one_tokens_watchers_are_capped_with_429() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use pgdeltastream::server::{KeySource, Verifier};
    const SECRET: &[u8] = b"a watch test secret that is long enough";
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = |claims: Value| {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    };
    let db = common::fresh_db().await;
    db.client().await.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    let mut settings = fast_settings(&db);
    settings.session.max_watchers_per_caller = 2;
    settings.http.auth = Some(std::sync::Arc::new(Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let admin = token(json!({"role": "admin", "exp": exp}));
    let bearer = format!("Bearer {admin}");
    let headers = [("content-type", "application/json"), ("authorization", bearer.as_str())];
    let body = json!({"name": "orders", "tables": ["orders"]}).to_string().into_bytes();
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &headers, body).await.0, 201);

    let as_token = |t: &str| format!("{}?access_token={t}", watch_url(&server, "orders"));
    let alice = token(json!({"sub": "alice", "role": "consumer", "sessions": ["orders"], "exp": exp}));
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(
            tokio_tungstenite::connect_async(as_token(&alice)).await.expect("alice's watchers within her share").0,
        );
    }
    // The same sub in another token is the same consumer.
    let alice_again = token(json!({"sub": "alice", "role": "consumer", "sessions": ["orders"], "exp": exp + 1}));
    match tokio_tungstenite::connect_async(as_token(&alice_again)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            let body: Value = serde_json::from_slice(&resp.body().clone().unwrap_or_default()).unwrap();
            assert!(body["error"].as_str().unwrap().contains("as many as one token may"), "{body}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    let bob = token(json!({"sub": "bob", "role": "consumer", "sessions": ["orders"], "exp": exp}));
    open.push(tokio_tungstenite::connect_async(as_token(&bob)).await.expect("bob has a share of his own").0);
    open.push(tokio_tungstenite::connect_async(as_token(&admin)).await.expect("an admin is not capped per token").0);
    server.stop().await;
}

/// Watchers never take the replication slots (and walsenders) that sessions need: with
/// no more free than the reserve a watch is refused, while a session can still be made.
#[tokio::test]
async fn watchers_leave_the_reserved_slots_to_sessions() {
    let db = common::fresh_db().await;
    db.client().await.batch_execute("CREATE TABLE orders (id int PRIMARY KEY)").await.unwrap();
    // The cluster has 64 slots in all: a reserve of 64 leaves none to watchers.
    let mut settings = fast_settings(&db);
    settings.session.watch_reserve_slots = 64;
    let server = TestServer::start_with(settings).await;
    create(&server, "wal2json").await;
    let (status, body) = watch_refused(&server, "orders").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--watch-reserve-slots"), "{body}");
    let (status, body) = server.post("/v2/sessions", r#"{"name":"more","tables":["orders"]}"#).await;
    assert_eq!(status, 201, "a session is made from the reserve: {body}");
    assert_eq!(session(&server).await["watchers"], 0);
    server.stop().await;

    let mut settings = fast_settings(&db);
    settings.session.watch_reserve_slots = 0;
    let server = TestServer::start_with(settings).await;
    let _watching = watch(&server, "orders").await;
    server.stop().await;
}
