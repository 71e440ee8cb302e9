//! Sessions against a hot standby (PostgreSQL 16+, which decodes there): `/readyz` says
//! it is one, a session that names a publication made on the primary is created with
//! its snapshot and streams what the primary writes, and what a standby cannot do (make
//! a publication) is a 409 that says what to do instead; a recovery conflict that
//! invalidates a session's slot there shows as `invalidated` and a 410. Run by `make test-majors` on
//! 16 and later; on 15 (`make test`) `/readyz` refuses a standby.
//!
//! The cluster is its own: it gets a standby (`testkit::pg::start_standby`).

use std::time::{Duration, Instant};

use pgdeltastream::session::{Plugin, PluginChoice};
use serde_json::json;
use testkit::pg::{self as common, StandbySetup, TestDb};
use testkit::support::*;

#[tokio::test]
async fn a_session_on_a_standby_reads_a_publication_of_the_primary() {
    let primary = common::own_cluster("standby");
    if primary.is_docker() {
        // The standby is a copy of the primary's data directory, which is not this machine's.
        eprintln!("SKIPPED under TEST_PG=docker: a standby needs a local primary");
        return;
    }
    let db = common::fresh_db_on(primary).await;
    let pg = db.client().await;
    let major = server_major(&pg).await;
    if major < 15 {
        eprintln!("standby: SKIPPED on PostgreSQL {major}: the test's standby needs pg_backup_start (15+)");
        return;
    }
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 3) g;
         CREATE PUBLICATION orders_pub FOR TABLE orders;",
    )
    .await
    .unwrap();
    let standby = common::start_standby(
        primary,
        &StandbySetup { slot: "standby_of_standby_test".into(), dbname: db.dbname.clone(), settings: Vec::new() },
    )
    .await;
    let on_standby = TestDb {
        host: standby.host.clone(),
        port: standby.port,
        user: standby.user.clone(),
        password: None,
        dbname: db.dbname.clone(),
    };
    let standby_pg = on_standby.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while standby_pg
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = 'orders_pub'", &[])
        .await
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "the standby never replayed the publication");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut settings = fast_settings(&on_standby);
    settings.session.plugin = PluginChoice::Fixed(Plugin::Pgoutput);
    let server = TestServer::start_with(settings).await;
    let (status, ready) = server.get("/readyz").await;
    if major < 16 {
        assert_eq!((status, &ready["check"]), (503, &json!("server_version")), "{ready}");
        assert!(ready["error"].as_str().unwrap().contains("cannot decode on a standby"), "{ready}");
        eprintln!("standby: on PostgreSQL {major} only /readyz's refusal: decoding on a standby needs 16 or later");
        server.stop().await;
        return;
    }
    assert_eq!((status, &ready["standby"]), (200, &json!(true)), "{ready}");

    // What a standby cannot do, said before anything is made.
    let (status, refused) =
        server.post("/v2/sessions", &json!({"name": "own", "tables": ["orders"]}).to_string()).await;
    assert_eq!(status, 409, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("standby") && error.contains("\"publication\""), "{error}");
    let (status, refused) = server.get("/v1/init").await;
    assert_eq!(status, 409, "v1's pgoutput session needs a publication too: {refused}");
    let body = json!({"name": "missing", "publication": "nope"}).to_string();
    assert_eq!(server.post("/v2/sessions", &body).await.0, 404);
    let body = json!({"name": "both", "publication": "orders_pub", "tables": ["orders"]}).to_string();
    assert_eq!(server.post("/v2/sessions", &body).await.0, 400);

    // A slot on a standby becomes consistent at a running-xacts record of the primary's:
    // Postgres writes one every 15 s while the primary is busy, pg_log_standby_snapshot()
    // at once.
    let started = Instant::now();
    let created = create_on_standby(&server, &db, json!({"name": "orders_feed", "publication": "orders_pub"})).await;
    eprintln!("standby: the session's slot was made on the standby in {:?}", started.elapsed());
    assert_eq!(created["publication"], "orders_pub", "{created}");
    assert_eq!(created["snapshot"], "held", "a standby exports the slot's snapshot: {created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();

    let (status, page) = server.get("/v2/sessions/orders_feed/snapshot/public.orders").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["rows"].as_array().map(Vec::len), Some(3), "{page}");

    let url = format!("ws://{}/v2/sessions/orders_feed/stream", server.addr);
    let mut ws = tokio_tungstenite::connect_async(&url).await.expect("upgrade").0;
    pg.batch_execute("INSERT INTO orders VALUES (4, 'four'); UPDATE orders SET item = 'one' WHERE id = 1")
        .await
        .unwrap();
    let m = next_changes(&mut ws).await;
    let change = &m["change"];
    assert_eq!(change[0]["kind"], "insert", "{m}");
    assert_eq!(change[0]["columnvalues"], json!([4, "four"]), "{m}");
    assert_eq!(change[1]["kind"], "update", "{m}");
    let lsn = m["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&standby_pg, &slot, &lsn).await;
    drop(ws);

    // Its tables are the primary's publication's: a PATCH is refused (409), as on any standby.
    let body = json!({"actions": ["insert"]}).to_string();
    let (status, refused) = request(server.addr, "PATCH", "/v2/sessions/orders_feed", Some(&body)).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("orders_pub"), "{refused}");

    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/orders_feed", None).await;
    assert!(status < 300, "{status} {body}");
    assert_eq!(confirmed_flush(&standby_pg, &slot).await, None, "its slot is dropped");
    let kept = pg.query_opt("SELECT 1 FROM pg_publication WHERE pubname = 'orders_pub'", &[]).await.unwrap();
    assert!(kept.is_some(), "the operator's publication stays");

    // A recovery conflict: without hot_standby_feedback the primary removes catalog rows
    // the standby's slot still needs, and the standby invalidates the slot.
    let body = json!({"name": "conflicted", "publication": "orders_pub"});
    let slot = create_on_standby(&server, &db, body).await["slotName"].as_str().unwrap().to_owned();
    // Its held snapshot would hold up replay for max_standby_streaming_delay (30 s)
    // before the conflict is resolved: let it go.
    let (status, _) = request(server.addr, "DELETE", "/v2/sessions/conflicted/snapshot", None).await;
    assert_eq!(status, 200);
    standby_pg.batch_execute("ALTER SYSTEM SET hot_standby_feedback = off").await.unwrap();
    standby_pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let physical = "SELECT xmin IS NULL AND catalog_xmin IS NULL FROM pg_replication_slots WHERE slot_name = $1";
    while !pg.query_one(physical, &[&"standby_of_standby_test"]).await.unwrap().get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "the primary still keeps rows for the standby");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Two transactions: rows a transaction both made and removed conflict with nothing.
    pg.batch_execute("CREATE TABLE conflict_test (x int)").await.unwrap();
    pg.batch_execute("DROP TABLE conflict_test").await.unwrap();
    pg.batch_execute("VACUUM pg_class").await.unwrap();
    // Sent to the standby once flushed (the test clusters commit asynchronously).
    pg.batch_execute("CREATE TABLE flush_wal (); SELECT pg_switch_wal()").await.unwrap();
    let condition = if major >= 17 { "invalidation_reason IS NOT NULL" } else { "conflicting" };
    await_slot(&standby_pg, &slot, "invalidated by a recovery conflict", condition).await;
    let (_, view) = server.get("/v2/sessions/conflicted").await;
    let reason = if major >= 17 { "rows_removed" } else { "conflict" };
    assert_eq!(view["invalidated"]["reason"], reason, "{view}");
    assert_eq!(view["conflicting"], true, "{view}");
    let (status, body) = ws_refused(server.addr, "/v2/sessions/conflicted/stream").await;
    assert_eq!((status, &body["reason"]), (410, &json!(reason)), "{body}");
    server.stop().await;
}

/// Creates a session on the standby `server` reads, nudging `primary` for the
/// running-xacts record the slot waits for.
async fn create_on_standby(server: &TestServer, primary: &TestDb, body: serde_json::Value) -> serde_json::Value {
    let nudge = {
        let primary_pg = primary.client().await;
        tokio::spawn(async move {
            loop {
                let _ = primary_pg.batch_execute("SELECT pg_log_standby_snapshot()").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
    nudge.abort();
    assert_eq!(status, 201, "{created}");
    created
}
