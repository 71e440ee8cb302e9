//! What differs between PostgreSQL majors, tested on whichever major the test cluster
//! runs: 15 in `make test`, each of 13, 14, 16, 17 and 18 in `make test-majors` (and 12,
//! for `/readyz`'s refusal). Every test here uses pgoutput, the one plugin every major
//! has, and asks the server which major it is before it says what must happen
//! (`../shared/reference/postgres-versions.md` has the facts).

use testkit::pg as common;
use testkit::support;

use pgdeltastream::session::{Plugin, PluginChoice};
use serde_json::{Value, json};
use support::*;

/// A server whose v1 sessions use pgoutput (the default, `auto`, prefers wal2json).
async fn pgoutput_server(db: &common::TestDb) -> TestServer {
    let mut settings = fast_settings(db);
    settings.session.plugin = PluginChoice::Fixed(Plugin::Pgoutput);
    TestServer::start_with(settings).await
}

async fn setup() -> (common::TestDb, tokio_postgres::Client, u32) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text);
         CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE TABLE other (id int PRIMARY KEY);
         CREATE SCHEMA audit; CREATE TABLE audit.log (id int PRIMARY KEY);
         INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 5) g;",
    )
    .await
    .unwrap();
    let major = server_major(&pg).await;
    (db, pg, major)
}

async fn create(server: &TestServer, body: Value) -> (u16, Value) {
    server.post("/v2/sessions", &body.to_string()).await
}

async fn open(server: &TestServer, name: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream?format=changes", server.addr);
    tokio_tungstenite::connect_async(url).await.expect("upgrade").0
}

/// The next transaction of a `format=changes` stream, its records between B and C
/// (`action table id`), and its `nextlsn`.
async fn next_transaction(ws: &mut Ws) -> (Vec<String>, String) {
    let begin = next_json(ws).await;
    assert_eq!(begin["action"], "B", "a transaction begins: {begin}");
    let mut records = Vec::new();
    loop {
        let r = next_json(ws).await;
        match r["action"].as_str() {
            Some("C") => return (records, r["nextlsn"].as_str().unwrap().to_owned()),
            Some("M") => records.push(format!("M {}", r["prefix"].as_str().unwrap_or(""))),
            Some(action) => {
                let id = r["columns"].as_array().and_then(|c| c.iter().find(|c| c["name"] == "id"));
                let id = id.or_else(|| r["identity"].as_array().and_then(|c| c.first()));
                records.push(format!(
                    "{action} {} {}",
                    r["table"].as_str().unwrap_or(""),
                    id.map_or(json!(null), |c| c["value"].clone())
                ));
            }
            None => panic!("not a record: {r}"),
        }
    }
}

#[tokio::test]
async fn readyz_names_the_major_and_refuses_one_older_than_13() {
    let db = common::fresh_db().await;
    let major = server_major(&db.client().await).await;
    let server = TestServer::start(&db).await;
    let (status, body) = server.get("/readyz").await;
    assert_eq!(body["postgres"]["major"], json!(major), "{body}");
    if major >= 13 {
        assert_eq!(status, 200, "{body}");
    } else {
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["check"], "server_version", "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("older than 13, the oldest major pgdeltastream supports"), "{body}");
    }
    server.stop().await;
}

/// v1 on pgoutput: init, the snapshot, the stream, acks and resume, as the original's
/// clients use them; logical messages where pgoutput carries them (14+); transactions
/// with nothing for the slot left out on every major (14 and 13 send them).
#[tokio::test]
async fn v1_init_snapshot_stream_ack_and_resume() {
    let (db, pg, major) = setup().await;
    let server = pgoutput_server(&db).await;
    let slot = server.init().await;
    let (status, rows) = server.snapshot(json!({"table": "orders", "offset": 0, "limit": 10})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows.as_array().map(Vec::len), Some(5), "{rows}");

    // Nothing published: pgoutput before 15 sends its BEGIN and COMMIT.
    pg.batch_execute("CREATE TABLE later (id int); SELECT pg_logical_emit_message(true, 'm', 'hello')").await.unwrap();
    pg.batch_execute("INSERT INTO orders VALUES (6, 'six')").await.unwrap();
    pg.batch_execute("INSERT INTO orders VALUES (7, 'seven')").await.unwrap();
    let mut ws = server.connect(&slot).await;
    let first = next_json(&mut ws).await;
    let kinds = |tx: &Value| -> Vec<String> {
        tx["change"].as_array().unwrap().iter().map(|c| c["kind"].as_str().unwrap_or("").to_owned()).collect()
    };
    let six = if major >= 14 {
        assert_eq!(kinds(&first), ["message"], "{first}");
        assert_eq!(first["change"][0]["content"], "hello");
        next_json(&mut ws).await
    } else {
        first
    };
    assert_eq!(kinds(&six), ["insert"], "the first transaction with changes: {six}");
    assert_eq!(six["change"][0]["columnvalues"], json!([6, "six"]));
    ack(&mut ws, six["nextlsn"].as_str().unwrap()).await;
    await_confirmed(&pg, &slot, six["nextlsn"].as_str().unwrap()).await;
    drop(ws);
    await_slot(&pg, &slot, "free", "NOT active").await;

    let mut ws = server.connect(&slot).await;
    let seven = next_changes(&mut ws).await;
    assert_eq!(seven["change"][0]["columnvalues"], json!([7, "seven"]), "resumes after the ack: {seven}");
    drop(ws);
    server.stop().await;
}

/// v2 sessions on pgoutput: several tables (13 and 14 spell that `FOR TABLE a, b`),
/// schemas, row filters and column lists where the major has them and a 400 naming
/// the major where it does not, keyset and NDJSON reads, stream, ack, resume, the views
/// and the metrics, delete.
#[tokio::test]
async fn v2_sessions_tables_filters_snapshot_stream_resume_and_delete() {
    let (db, pg, major) = setup().await;
    let server = TestServer::start(&db).await;
    let (status, created) =
        create(&server, json!({"name": "two", "plugin": "pgoutput", "tables": ["public.orders", "items"]})).await;
    assert_eq!(status, 201, "{created}");
    let slot = created["slotName"].as_str().unwrap().to_owned();

    let schema = json!({"name": "audit", "plugin": "pgoutput", "tables": ["audit.*"]});
    let filtered = json!({"name": "big", "plugin": "pgoutput",
        "tables": [{"table": "public.orders", "where": "id > 6", "columns": ["id"]}]});
    for (body, what) in [(schema, "audit.* (every table of a schema"), (filtered, "row filter (where) or column list")]
    {
        let (status, answer) = create(&server, body).await;
        if major >= 15 {
            assert_eq!(status, 201, "{answer}");
        } else {
            assert_eq!(status, 400, "{answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(what), "{answer}");
            assert!(
                error.contains(&format!("needs PostgreSQL 15 or later; this server is PostgreSQL {major}")),
                "{answer}"
            );
        }
    }

    let (status, page) = server.get("/v2/sessions/two/snapshot/public.orders?limit=3").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["rows"].as_array().map(Vec::len), Some(3), "{page}");
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, page) = server.get(&format!("/v2/sessions/two/snapshot/public.orders?limit=3&after={next}")).await;
    assert_eq!(page["rows"], json!([{"id": 4, "item": "item 4"}, {"id": 5, "item": "item 5"}]), "{page}");
    assert_eq!(page["next"], Value::Null);
    let accept = [("accept", "application/x-ndjson")];
    let (status, body) = raw_request(server.addr, "GET", "/v2/sessions/two/snapshot/orders", &accept, Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body).unwrap().lines().count(), 5);

    pg.batch_execute("INSERT INTO other VALUES (1)").await.unwrap();
    pg.batch_execute("INSERT INTO orders VALUES (6, 'six')").await.unwrap();
    pg.batch_execute("INSERT INTO items VALUES (1, 'one'); INSERT INTO other VALUES (2)").await.unwrap();
    pg.batch_execute("UPDATE orders SET item = 'SIX' WHERE id = 6; DELETE FROM items").await.unwrap();
    let mut ws = open(&server, "two").await;
    // The transaction of `other` alone is not sent (14 and 13 send its BEGIN and COMMIT).
    let (records, _) = next_transaction(&mut ws).await;
    assert_eq!(records, ["I orders 6"]);
    let (records, lsn) = next_transaction(&mut ws).await;
    assert_eq!(records, ["I items 1"]);
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;
    drop(ws);
    await_slot(&pg, &slot, "free", "NOT active").await;
    let mut ws = open(&server, "two").await;
    let (records, _) = next_transaction(&mut ws).await;
    assert_eq!(records, ["U orders 6", "D items 1"], "resumes after the ack");
    drop(ws);
    await_slot(&pg, &slot, "free", "NOT active").await;

    let (status, view) = server.get("/v2/sessions/two").await;
    assert_eq!(status, 200, "{view}");
    assert!(view["retainedBytes"].as_u64().is_some() && view["lagBytes"].as_u64().is_some(), "{view}");
    assert_eq!(view["lastAckLsn"], json!(lsn), "{view}");
    let (status, metrics) = raw_request(server.addr, "GET", "/metrics", &[], Vec::new()).await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    let retained = metrics.lines().find(|l| l.starts_with("pgdeltastream_retained_bytes{") && l.contains("\"two\""));
    assert!(retained.is_some(), "{metrics}");

    let (status, body) = request(server.addr, "DELETE", "/v2/sessions/two", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(!database_slots(&pg).await.contains(&slot));
    let publications = pg.query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&slot]).await.unwrap();
    assert!(publications.is_empty(), "the publication goes with the session");
    server.stop().await;
}

/// PostgreSQL 18 publishes generated columns when asked (`publishGeneratedColumns`), as
/// wal2json prints them; before 18 asking is a 400 naming 18, and without asking no
/// major sends them.
#[tokio::test]
async fn generated_columns_reach_a_session_that_asks_on_18() {
    let (db, pg, major) = setup().await;
    pg.batch_execute("CREATE TABLE g (id int PRIMARY KEY, twice int GENERATED ALWAYS AS (id * 2) STORED)")
        .await
        .unwrap();
    let server = TestServer::start(&db).await;
    let plain = json!({"name": "plain", "plugin": "pgoutput", "tables": ["g"]});
    assert_eq!(create(&server, plain).await.0, 201);
    let asks = json!({"name": "gen", "plugin": "pgoutput", "tables": ["g"], "publishGeneratedColumns": true});
    let (status, answer) = create(&server, asks).await;
    if major < 18 {
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains(&format!("needs PostgreSQL 18 or later; this server is PostgreSQL {major}")),
            "{answer}"
        );
    } else {
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["publishGeneratedColumns"], true, "{answer}");
    }
    pg.batch_execute("INSERT INTO g VALUES (21)").await.unwrap();
    let names = |record: &Value| -> Vec<String> {
        record["columns"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect()
    };
    let mut sessions = vec![("plain", vec!["id"])];
    if major >= 18 {
        sessions.push(("gen", vec!["id", "twice"]));
    }
    for (name, columns) in sessions {
        let mut ws = open(&server, name).await;
        assert_eq!(next_json(&mut ws).await["action"], "B");
        let insert = next_json(&mut ws).await;
        assert_eq!(names(&insert), columns, "{name}: {insert}");
        if name == "gen" {
            assert_eq!(insert["columns"][1]["value"], 42, "{insert}");
        }
    }
    server.stop().await;
}

/// From 18 Postgres refuses UPDATE and DELETE of a table whose replica identity has a
/// generated column its publication leaves out: the session is refused (409) rather
/// than the application's writes, unless it publishes generated columns.
#[tokio::test]
async fn a_publication_never_breaks_updates_of_a_full_identity_table_with_a_generated_column() {
    let (db, pg, major) = setup().await;
    pg.batch_execute(
        "CREATE TABLE f (id int, twice int GENERATED ALWAYS AS (id * 2) STORED);
         ALTER TABLE f REPLICA IDENTITY FULL; INSERT INTO f VALUES (1)",
    )
    .await
    .unwrap();
    let server = TestServer::start(&db).await;
    let (status, answer) = create(&server, json!({"name": "f", "plugin": "pgoutput", "tables": ["f"]})).await;
    if major >= 18 {
        assert_eq!(status, 409, "{answer}");
        assert!(answer["error"].as_str().unwrap().contains("\"publishGeneratedColumns\": true"), "{answer}");
        assert!(pg.query("SELECT 1 FROM pg_publication", &[]).await.unwrap().is_empty(), "nothing is left");
        let asks = json!({"name": "f", "plugin": "pgoutput", "tables": ["f"], "publishGeneratedColumns": true});
        let (status, answer) = create(&server, asks).await;
        assert_eq!(status, 201, "{answer}");
    } else {
        assert_eq!(status, 201, "{answer}");
    }
    pg.batch_execute("UPDATE f SET id = 2").await.expect("the application's update works");
    server.stop().await;
}

/// Where the server's major has no wal2json, asking for it says which package to install.
#[tokio::test]
async fn a_missing_wal2json_is_named_for_the_servers_major() {
    let (db, _pg, major) = setup().await;
    let server = TestServer::start(&db).await;
    let (status, answer) = create(&server, json!({"name": "w", "plugin": "wal2json"})).await;
    if status != 201 {
        assert_eq!(status, 500, "{answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(&format!("apt-get install postgresql-{major}-wal2json")), "{answer}");
    }
    server.stop().await;
}

/// `PATCH /v2/sessions/{name}` on pgoutput: what a major cannot do is refused as at
/// create; a session streaming every table becomes a list mid-stream (its publication
/// FOR ALL TABLES made again), and a list another one; logical messages where pgoutput
/// carries them (14+).
#[tokio::test]
async fn patch_changes_a_publication_as_the_major_can() {
    let (db, pg, major) = setup().await;
    if major < 13 {
        return;
    }
    let server = TestServer::start(&db).await;
    let (status, created) = create(&server, json!({"name": "p", "plugin": "pgoutput", "actions": ["insert"]})).await;
    assert_eq!(status, 201, "{created}");
    let addr = server.addr;
    let patch = |body: Value| async move { request(addr, "PATCH", "/v2/sessions/p", Some(&body.to_string())).await };
    let schema = json!({"tables": ["audit.*"]});
    let filtered = json!({"tables": [{"table": "public.orders", "where": "id > 6", "columns": ["id"]}]});
    for (body, what) in [(schema, "audit.* (every table of a schema"), (filtered, "row filter (where) or column list")]
    {
        let (status, answer) = patch(body.clone()).await;
        if major >= 15 {
            assert_eq!(status, 200, "{answer}");
        } else {
            assert_eq!(status, 400, "{answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains(what), "{answer}");
            assert!(
                error.contains(&format!("needs PostgreSQL 15 or later; this server is PostgreSQL {major}")),
                "{answer}"
            );
        }
    }
    if major >= 15 {
        // Back to every table is not a PATCH: make the session anew to test the switch.
        assert_eq!(request(server.addr, "DELETE", "/v2/sessions/p", None).await.0, 200);
        let (status, created) =
            create(&server, json!({"name": "p", "plugin": "pgoutput", "actions": ["insert"]})).await;
        assert_eq!(status, 201, "{created}");
    }
    let mut ws = open(&server, "p").await;
    pg.batch_execute("INSERT INTO other VALUES (1)").await.unwrap();
    assert_eq!(next_transaction(&mut ws).await.0, ["I other 1"], "every table");
    let (status, answer) = patch(json!({"tables": ["items"]})).await;
    assert_eq!(status, 200, "FOR ALL TABLES becomes a list: {answer}");
    pg.batch_execute("INSERT INTO other VALUES (2); INSERT INTO items VALUES (1, 'one')").await.unwrap();
    assert_eq!(next_transaction(&mut ws).await.0, ["I items 1"]);
    let (status, answer) = patch(json!({"tables": ["orders"], "actions": ["insert", "message"]})).await;
    assert_eq!(status, 200, "{answer}");
    pg.batch_execute(
        "INSERT INTO items VALUES (2, 'two'); INSERT INTO orders VALUES (7, 'seven');
         SELECT pg_logical_emit_message(true, 'm', 'x')",
    )
    .await
    .unwrap();
    // One transaction (a simple query's statements are one).
    let (records, _) = next_transaction(&mut ws).await;
    let expected: &[&str] = if major >= 14 { &["I orders 7", "M m"] } else { &["I orders 7"] };
    assert_eq!(records, expected, "orders only; the message where pgoutput carries one");
    server.stop().await;
}
