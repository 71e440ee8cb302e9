//! Failover slots (PostgreSQL 17+): a session's slot is created with FAILOVER, a
//! physical standby with `sync_replication_slots` keeps a copy of it, and after the
//! primary is gone and the standby promoted, the session's client resumes there right
//! after its last ack. Run by `make test-majors` on 17 and 18; on older majors (15 in
//! `make test`) it says so and returns.
//!
//! The cluster is its own: the test stops it, and it gets a standby of its own
//! (`testkit::pg::start_standby`).

use std::time::{Duration, Instant};

use pgdeltastream::session::{Plugin, PluginChoice};
use serde_json::{Value, json};
use testkit::pg::{self as common, StandbySetup, TestDb};
use testkit::support::*;

fn cluster() -> &'static common::Cluster {
    common::own_cluster("failover")
}

/// The physical slot on the primary that the standby streams from.
const STANDBY_SLOT: &str = "failover_standby";

/// The id of the one inserted row a `transactions`-format message carries.
fn inserted_id(message: &Value) -> i64 {
    let change = &message["change"];
    assert_eq!(change.as_array().map(Vec::len), Some(1), "one change: {message}");
    change[0]["columnvalues"][0].as_i64().unwrap_or_else(|| panic!("an id: {message}"))
}

async fn insert(pg: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        pg.execute("INSERT INTO orders VALUES ($1, 'item')", &[&id]).await.unwrap();
    }
}

/// One slot's row of `pg_replication_slots`, as the test looks at it.
async fn slot_row(pg: &tokio_postgres::Client, slot: &str) -> Option<(bool, bool, bool, String)> {
    pg.query_opt(
        "SELECT failover, synced, temporary, coalesce(confirmed_flush_lsn::text, '') \
         FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

#[tokio::test]
async fn a_session_resumes_on_the_promoted_standby_right_after_its_last_ack() {
    let primary = cluster();
    if primary.is_docker() {
        // The standby is a copy of the primary's data directory, which is not this machine's.
        eprintln!("SKIPPED under TEST_PG=docker: a standby needs a local primary");
        return;
    }
    let db = common::fresh_db_on(primary).await;
    let pg = db.client().await;
    let major = server_major(&pg).await;
    if major < 17 {
        eprintln!("failover: SKIPPED on PostgreSQL {major}: failover slots need 17 or later (make test-majors)");
        return;
    }
    pg.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, item text)").await.unwrap();
    let standby = common::start_standby(
        primary,
        &StandbySetup {
            slot: STANDBY_SLOT.into(),
            dbname: db.dbname.clone(),
            // What the primary is told below must not follow the standby into its
            // promotion: there is no such slot there.
            settings: vec!["sync_replication_slots=on".into(), "synchronized_standby_slots=".into()],
        },
    )
    .await;
    // A logical walsender sends nothing the standby has not got: what a client has
    // seen survives the failover.
    pg.batch_execute(&format!("ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'")).await.unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").await.unwrap();

    let mut settings = fast_settings(&db);
    settings.session.plugin = PluginChoice::Fixed(Plugin::Pgoutput);
    let mut without = settings.clone();
    without.session.failover_slots = false;
    let server = TestServer::start_with(without).await;
    let (status, created) = server.post("/v2/sessions", &json!({"name": "plain"}).to_string()).await;
    assert_eq!(status, 201, "{created}");
    let plain = created["slotName"].as_str().unwrap().to_owned();
    assert!(!slot_row(&pg, &plain).await.expect("its slot").0, "--failover-slots=false: no failover slot");
    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/plain", None).await;
    assert!(status < 300, "{status} {body}");
    server.stop().await;

    let server = TestServer::start_with(settings.clone()).await;
    let (status, created) = server
        .post("/v2/sessions", &json!({"name": "orders_feed", "tables": ["orders"], "plugin": "pgoutput"}).to_string())
        .await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();
    let (failover, synced, _, _) = slot_row(&pg, &slot).await.expect("the session's slot");
    assert!(failover && !synced, "the primary's slot is a failover slot");
    let (_, view) = server.get("/v2/sessions/orders_feed").await;
    assert_eq!((&view["failover"], &view["synced"]), (&json!(true), &json!(false)), "the view says so: {view}");

    let url = format!("ws://{}/v2/sessions/orders_feed/stream", server.addr);
    let mut ws = tokio_tungstenite::connect_async(&url).await.expect("upgrade").0;
    let standby_pg = standby.client(&db.dbname).await;
    let mut next_id = 1;
    // One transaction, received and acked; answers its nextlsn.
    let acked_one = async |ws: &mut Ws, next_id: &mut i32| {
        insert(&pg, *next_id..=*next_id).await;
        let m = next_changes(ws).await;
        assert_eq!(inserted_id(&m), *next_id as i64, "{m}");
        *next_id += 1;
        let lsn = m["nextlsn"].as_str().unwrap().to_owned();
        ack(ws, &lsn).await;
        await_confirmed(&pg, &slot, &lsn).await;
        lsn
    };

    // The standby makes its copy of a new slot for good (not temporary) only once the
    // primary's needs no catalog rows older than the standby kept when it first saw the
    // slot: the slot's catalog_xmin moves at a running-xacts record that the stream has
    // decoded and the client acked past. Postgres writes one every 15 s while the
    // database is busy; an operator with a quiet database calls pg_log_standby_snapshot().
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut acked;
    loop {
        pg.batch_execute("SELECT pg_log_standby_snapshot()").await.unwrap();
        acked = acked_one(&mut ws, &mut next_id).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if slot_row(&standby_pg, &slot).await.is_some_and(|(f, synced, temporary, _)| f && synced && !temporary) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby never made its copy of {slot} for good: {:?}\n--- standby log ---\n{}",
            slot_row(&standby_pg, &slot).await,
            standby.log()
        );
    }
    eprintln!("failover: the standby's copy of {slot} was made for good after {:?}", started.elapsed());
    for _ in 0..3 {
        acked = acked_one(&mut ws, &mut next_id).await;
    }

    // What an operator checks before promoting: the standby's copy is synced and has
    // the last ack (the slot sync worker naps up to 30 s while nothing moves).
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    loop {
        let caught_up = standby_pg
            .query_one(
                "SELECT coalesce(bool_and(synced AND failover AND NOT temporary \
                 AND confirmed_flush_lsn >= $2::text::pg_lsn), false) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &acked],
            )
            .await
            .unwrap()
            .get::<_, bool>(0);
        if caught_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby's copy of {slot} never reached {acked}: {:?}\n--- standby log ---\n{}",
            slot_row(&standby_pg, &slot).await,
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("failover: the standby's synced slot had the last ack {acked} after {:?}", started.elapsed());

    // Sent but not acked: these must come again from the promoted standby.
    let unacked = next_id;
    insert(&pg, unacked..=unacked + 2).await;
    for id in unacked..=unacked + 2 {
        assert_eq!(inserted_id(&next_changes(&mut ws).await), id as i64);
    }
    drop(ws);
    server.stop().await;
    drop(pg);
    primary.stop_immediate();
    standby.promote();
    let promoted = TestDb {
        host: standby.host.clone(),
        port: standby.port,
        user: standby.user.clone(),
        password: None,
        dbname: db.dbname.clone(),
    };
    let new_pg = promoted.client().await;
    let (failover, synced, temporary, confirmed) = slot_row(&new_pg, &slot).await.expect("the slot survived");
    assert!(failover && synced && !temporary, "a synced failover slot, now the new primary's");
    eprintln!("failover: the promoted standby's slot is at {confirmed}");
    let after_promotion = unacked + 3;
    insert(&new_pg, after_promotion..=after_promotion).await;

    let mut settings = settings;
    settings.pg = pg_config(&promoted);
    let server = TestServer::start_with(settings).await;
    let (_, view) = server.get("/v2/sessions/orders_feed").await;
    assert_eq!((&view["failover"], &view["synced"]), (&json!(true), &json!(true)), "on the new primary: {view}");
    let url = format!("ws://{}/v2/sessions/orders_feed/stream", server.addr);
    let mut ws = tokio_tungstenite::connect_async(&url).await.expect("upgrade on the new primary").0;
    let mut got = Vec::new();
    let mut last = String::new();
    for _ in unacked..=after_promotion {
        let m = next_changes(&mut ws).await;
        got.push(inserted_id(&m));
        last = m["nextlsn"].as_str().unwrap().to_owned();
    }
    let expected: Vec<i64> = (unacked..=after_promotion).map(i64::from).collect();
    assert_eq!(got, expected, "exactly what came after the last ack, and what the new primary wrote");
    insert(&new_pg, after_promotion + 1..=after_promotion + 1).await;
    assert_eq!(inserted_id(&next_changes(&mut ws).await), (after_promotion + 1) as i64, "nothing in between");
    ack(&mut ws, &last).await;
    await_confirmed(&new_pg, &slot, &last).await;
    drop(ws);
    server.stop().await;
}
