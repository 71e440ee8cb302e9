//! The choice of output plugin, and the publication of each pgoutput session: created
//! before its slot, dropped after it, refused when it would break the application's
//! updates and deletes, and never left behind. Checked through Postgres's catalogs.

/// A cluster of its own: a test here fills every replication slot of it.
mod common {
    pub use testkit::pg::*;
    pub fn cluster() -> &'static Cluster {
        own_cluster("plugins")
    }
    pub async fn fresh_db() -> TestDb {
        fresh_db_on(cluster()).await
    }
}
use testkit::support;

use std::path::PathBuf;

use pgdeltastream::session::{Plugin, PluginChoice};
use serde_json::{Value, json};
use support::*;
use tokio::sync::RwLock;

/// The test that fills every replication slot of the cluster runs alone; the others
/// share it.
static SLOTS: RwLock<()> = RwLock::const_new(());

async fn server_with(db: &common::TestDb, plugin: PluginChoice) -> TestServer {
    let mut settings = fast_settings(db);
    settings.session.plugin = plugin;
    TestServer::start_with(settings).await
}

async fn setup(plugin: PluginChoice) -> (common::TestDb, tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE orders (id serial PRIMARY KEY, amount int, note text);
         INSERT INTO orders (amount) VALUES (50), (150);
         CREATE TABLE items (id serial PRIMARY KEY, name text);
         CREATE SCHEMA audit; CREATE TABLE audit.log (id serial PRIMARY KEY, what text);",
    )
    .await
    .unwrap();
    let server = server_with(&db, plugin).await;
    (db, pg, server)
}

async fn create(server: &TestServer, body: Value) -> (u16, Value) {
    server.post("/v2/sessions", &body.to_string()).await
}

async fn delete(server: &TestServer, path: &str) -> (u16, Value) {
    request(server.addr, "DELETE", path, None).await
}

/// The publications of the database.
async fn publications(pg: &tokio_postgres::Client) -> Vec<String> {
    let rows = pg.query("SELECT pubname::text FROM pg_publication ORDER BY 1", &[]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// The plugins of the database's slots.
async fn slots(pg: &tokio_postgres::Client) -> Vec<(String, String)> {
    let rows = pg
        .query(
            "SELECT slot_name::text, plugin::text FROM pg_replication_slots \
             WHERE database = current_database() ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// puballtables, pubinsert, pubupdate, pubdelete, pubtruncate.
async fn publication_flags(pg: &tokio_postgres::Client, name: &str) -> [bool; 5] {
    let r = pg
        .query_one(
            "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .unwrap();
    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)]
}

/// `schema.table` of every table the publication covers, as Postgres counts them.
async fn published(pg: &tokio_postgres::Client, name: &str) -> Vec<String> {
    let rows = pg
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&name],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn slot_of(v: &Value) -> String {
    v["slotName"].as_str().unwrap_or_else(|| panic!("no slotName in {v}")).to_owned()
}

#[tokio::test]
async fn a_pgoutput_session_has_its_publication_of_its_tables_and_actions_until_it_is_deleted() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    let (status, created) = create(
        &server,
        json!({"name": "orders", "plugin": "pgoutput", "tables": ["orders", "audit.*", "pgdeltastream.*"],
               "actions": ["insert", "delete", "message"]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let slot = slot_of(&created);
    assert_eq!(created["plugin"], "pgoutput");
    assert_eq!(created["publication"], slot.as_str(), "{created}");
    assert_eq!(slots(&pg).await, [(slot.clone(), "pgoutput".to_owned())]);
    assert_eq!(publications(&pg).await, [slot.as_str()]);
    // insert and delete; the store's schema is never listed.
    assert_eq!(publication_flags(&pg, &slot).await, [false, true, false, true, false]);
    assert_eq!(published(&pg, &slot).await, ["audit.log", "public.orders"]);

    let (status, one) = server.get("/v2/sessions/orders").await;
    assert_eq!(status, 200, "{one}");
    assert_eq!((one["plugin"].as_str(), one["publication"].as_str()), (Some("pgoutput"), Some(slot.as_str())));
    let (status, v1) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{v1}");
    assert_eq!(v1[0]["plugin"], "pgoutput", "{v1}");
    assert_eq!(v1[0]["publication"], slot.as_str(), "{v1}");

    shape("pgoutput_created", created);
    shape("pgoutput_view", one);

    let (status, body) = delete(&server, "/v2/sessions/orders").await;
    assert_eq!(status, 200, "{body}");
    assert!(slots(&pg).await.is_empty());
    assert!(publications(&pg).await.is_empty());
}

/// The answer's shape, without what changes from run to run.
fn shape(name: &str, mut v: Value) {
    for key in ["slotName", "publication"] {
        v[key] = json!(format!("[{key}]"));
    }
    for key in
        ["consistentPoint", "confirmedFlushLsn", "retainedBytes", "lagBytes", "watchers", "decoding", "inactiveSince"]
    {
        if !v[key].is_null() {
            v[key] = json!("[varies]");
        }
    }
    insta::with_settings!({ snapshot_path => "../../snapshots" }, {
        insta::assert_json_snapshot!(name, v);
    });
}

#[tokio::test]
async fn every_table_is_for_all_tables_and_v1_drop_takes_the_publication_too() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Fixed(Plugin::Pgoutput)).await;
    let (status, created) = create(&server, json!({"name": "all", "actions": ["insert", "truncate"]})).await;
    assert_eq!(status, 201, "{created}");
    let slot = slot_of(&created);
    assert_eq!(created["plugin"], "pgoutput", "the server's --plugin is the default");
    assert_eq!(publication_flags(&pg, &slot).await, [true, true, false, false, true]);
    let (status, body) = delete(&server, &format!("/v1/sessions/{slot}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(slots(&pg).await.is_empty());
    assert!(publications(&pg).await.is_empty());

    // No row action at all: a publication that publishes nothing.
    let (status, created) = create(&server, json!({"name": "messages", "actions": ["message"]})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(publication_flags(&pg, &slot_of(&created)).await, [true, false, false, false, false]);
}

#[tokio::test]
async fn v1_init_replaces_the_slot_and_the_publication_of_the_session_before() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Fixed(Plugin::Pgoutput)).await;
    let first = server.init().await;
    assert_eq!(publications(&pg).await, [first.as_str()]);
    let second = server.init().await;
    assert_eq!(slots(&pg).await, [(second.clone(), "pgoutput".to_owned())]);
    assert_eq!(publications(&pg).await, [second.as_str()]);
    let (status, view) = server.get("/v2/sessions/default").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!((view["plugin"].as_str(), view["publication"].as_str()), (Some("pgoutput"), Some(second.as_str())));
}

#[tokio::test]
async fn auto_takes_wal2json_where_the_database_loads_it() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    let slot = server.init().await;
    assert_eq!(slots(&pg).await, [(slot, "wal2json".to_owned())]);
    assert!(publications(&pg).await.is_empty());
}

/// A directory that holds only pgoutput: a database whose dynamic_library_path is this
/// directory cannot load wal2json, as if it were not installed.
fn pgoutput_only_dir() -> PathBuf {
    let bindir = common::cluster().bindir.clone();
    let pkglibdir = std::process::Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| bindir.join("../lib"));
    let so = pkglibdir.join("pgoutput.so");
    assert!(so.is_file(), "{} not found", so.display());
    let dir = std::env::temp_dir().join(format!("pgdeltastream-no-wal2json-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.join("pgoutput.so");
    if !link.exists() {
        std::os::unix::fs::symlink(&so, &link).unwrap();
    }
    dir
}

#[tokio::test]
async fn auto_takes_pgoutput_where_the_database_cannot_load_wal2json() {
    let _shared = SLOTS.read().await;
    if common::cluster().is_docker() {
        // The server's files are not this machine's: no directory of ours to point it at.
        eprintln!(
            "SKIPPED under TEST_PG=docker: auto_takes_pgoutput_where_the_database_cannot_load_wal2json \
             needs the local cluster (a library directory without wal2json)"
        );
        return;
    }
    let db = common::fresh_db().await;
    let dir = pgoutput_only_dir();
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET dynamic_library_path = '{}';
             CREATE TABLE orders (id serial PRIMARY KEY, amount int);
             INSERT INTO orders (amount) VALUES (1), (2), (3);",
            db.dbname,
            dir.display()
        ))
        .await
        .unwrap();
    // A new connection takes the database's settings.
    let pg = db.client().await;
    let refused = pg.query_one("SELECT pg_create_logical_replication_slot('probe_wal2json', 'wal2json')", &[]).await;
    let e = refused.expect_err("wal2json loads: the test database does not stand for a Postgres without it");
    assert!(format!("{e:?}").contains("wal2json"), "{e:?}");

    let server = server_with(&db, PluginChoice::Auto).await;
    let first = server.init().await;
    assert_eq!(slots(&pg).await, [(first.clone(), "pgoutput".to_owned())]);
    assert_eq!(publications(&pg).await, [first.as_str()]);
    // A snapshot read works as with wal2json.
    let (status, rows) = server.snapshot(json!({"table": "orders", "offset": 0, "limit": 10})).await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows.as_array().map(Vec::len), Some(3), "{rows}");
    // Nothing is remembered: the next init tries wal2json again, and falls back again.
    let second = server.init().await;
    assert_eq!(slots(&pg).await, [(second.clone(), "pgoutput".to_owned())]);
    assert_eq!(publications(&pg).await, [second.as_str()]);
    let (_, v1) = server.get("/v1/sessions").await;
    assert_eq!(v1[0]["plugin"], "pgoutput", "{v1}");
    // A v1 client streams as it would from wal2json: the same message, the same ack.
    let mut ws = server.connect(&second).await;
    pg.batch_execute("INSERT INTO orders (amount) VALUES (4)").await.unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(
        tx["change"],
        json!([{"kind": "insert", "schema": "public", "table": "orders", "columnnames": ["id", "amount"],
                "columntypes": ["integer", "integer"], "columnvalues": [4, 4]}]),
        "{tx}"
    );
    let nextlsn = tx["nextlsn"].as_str().expect("nextlsn").to_owned();
    ack(&mut ws, &nextlsn).await;
    await_confirmed(&pg, &second, &nextlsn).await;
    drop(ws);
    // v2 with auto: also pgoutput; the stored definition says so.
    let (status, created) = create(&server, json!({"name": "v2auto", "tables": ["orders"]})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["plugin"], "pgoutput");
    let stored: Value =
        pg.query_one("SELECT definition FROM pgdeltastream.sessions WHERE name = 'v2auto'", &[]).await.unwrap().get(0);
    assert_eq!(stored["plugin"], "pgoutput", "{stored}");
    // Asking for wal2json there is Postgres's error, with nothing left behind.
    let (status, body) = create(&server, json!({"name": "w", "plugin": "wal2json"})).await;
    assert_eq!(status, 500, "{body}");
    assert!(body["error"].as_str().unwrap().contains("wal2json"), "{body}");
    assert_eq!(slots(&pg).await.len(), 2);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_publication_that_would_break_updates_is_refused_with_the_tables_and_the_fixes() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Fixed(Plugin::Pgoutput)).await;
    pg.batch_execute(
        "CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x');
         CREATE TABLE nothing (id int PRIMARY KEY); ALTER TABLE nothing REPLICA IDENTITY NOTHING;",
    )
    .await
    .unwrap();
    let (status, body) = create(&server, json!({"name": "all"})).await;
    assert_eq!(status, 409, "{body}");
    let msg = body["error"].as_str().unwrap();
    for needle in ["public.nokey", "public.nothing", "REPLICA IDENTITY FULL", "wal2json"] {
        assert!(msg.contains(needle), "no {needle:?} in {msg}");
    }
    assert!(!msg.contains("public.orders"), "{msg}");
    let (status, body) = server.get("/v1/init").await;
    assert_eq!(status, 409, "{body}");
    assert!(publications(&pg).await.is_empty());
    assert!(slots(&pg).await.is_empty());
    let (status, _) = server.get("/v2/sessions/all").await;
    assert_eq!(status, 404, "the refused session is not stored");
    pg.execute("UPDATE nokey SET b = 'y'", &[]).await.expect("the application's UPDATE still works");

    // Inserts only, or tables that have an identity: no refusal.
    let (status, body) = create(&server, json!({"name": "inserts", "actions": ["insert", "truncate"]})).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = create(&server, json!({"name": "orders", "tables": ["orders", "items"]})).await;
    assert_eq!(status, 201, "{body}");
    pg.execute("UPDATE nokey SET b = 'z'", &[]).await.expect("the application's UPDATE still works");
    // FULL is an identity.
    pg.batch_execute("ALTER TABLE nokey REPLICA IDENTITY FULL; DROP TABLE nothing").await.unwrap();
    let (status, body) = create(&server, json!({"name": "all"})).await;
    assert_eq!(status, 201, "{body}");
    pg.execute("UPDATE nokey SET b = 'w'", &[]).await.expect("the application's UPDATE still works");
}

#[tokio::test]
async fn row_filters_and_column_lists_are_the_publications_and_shown_as_given() {
    let _shared = SLOTS.read().await;
    let (db, pg, server) = setup(PluginChoice::Auto).await;
    let tables = json!([{"table": "orders", "where": "amount > 100", "columns": ["id", "amount"]}, "items"]);
    let (status, created) = create(&server, json!({"name": "big", "tables": tables, "actions": ["insert"]})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["plugin"], "pgoutput", "auto takes pgoutput for a row filter: {created}");
    let shown =
        json!([{"table": "public.orders", "where": "amount > 100", "columns": ["id", "amount"]}, "public.items"]);
    assert_eq!(created["tables"], shown);
    let slot = slot_of(&created);
    let row = pg
        .query_one(
            "SELECT attnames::text[], rowfilter FROM pg_publication_tables WHERE pubname = $1 AND tablename = 'orders'",
            &[&slot],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<String>>(0), ["id", "amount"]);
    assert_eq!(row.get::<_, String>(1), "(amount > 100)");
    // Another process reads the stored definition back as it was given.
    let other = TestServer::start(&db).await;
    let (status, view) = other.get("/v2/sessions/big").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["tables"], shown);
    assert_eq!(view["publication"], slot.as_str());
    // The stream carries what the filter and the column list let through, nothing else.
    let url = format!("ws://{}/v2/sessions/big/stream", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket upgrade");
    pg.batch_execute(
        "INSERT INTO orders (amount, note) VALUES (7, 'small');
         INSERT INTO orders (amount, note) VALUES (700, 'big');
         UPDATE orders SET amount = amount + 1;
         INSERT INTO items (name) VALUES ('pen');",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let tx = next_changes(&mut ws).await;
        got.extend(
            tx["change"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["table"].clone(), c["columnnames"].clone(), c["columnvalues"].clone())),
        );
    }
    assert_eq!(
        got,
        [
            (json!("orders"), json!(["id", "amount"]), json!([4, 700])),
            (json!("items"), json!(["id", "name"]), json!([1, "pen"])),
        ]
    );
}

#[tokio::test]
async fn a_row_filter_postgres_refuses_is_a_400_with_its_reason_and_nothing_left() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    let cases = [
        (json!({"table": "orders", "where": "amount >"}), "syntax error"),
        (json!({"table": "orders", "where": "nosuch > 1"}), "nosuch"),
        (json!({"table": "orders", "where": "random() > 0.5"}), "WHERE"),
        (json!({"table": "orders", "columns": ["id", "nosuch"]}), "nosuch"),
        // A filter that reads as more of the statement.
        (json!({"table": "orders", "where": "amount > 1), TABLE items WHERE (true"}), "one SQL expression"),
        (json!({"table": "orders", "where": "true), TABLES IN SCHEMA pgdeltastream, TABLE items WHERE (true"}), ""),
        (json!({"table": "audit.*", "where": "true"}), "one table"),
        (json!({"table": "orders", "columns": []}), "empty"),
        (json!({"table": "orders", "colums": ["id"]}), "colums"),
        (json!(42), "expected a string"),
    ];
    for (i, (entry, needle)) in cases.into_iter().enumerate() {
        let (status, body) = create(&server, json!({"name": format!("f{i}"), "tables": [entry]})).await;
        assert_eq!(status, 400, "{entry}: {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{entry}: no {needle:?} in {msg}");
        let (status, _) = server.get(&format!("/v2/sessions/f{i}")).await;
        assert_eq!(status, 404, "{entry}: the refused session is not stored");
    }
    let (status, body) = create(
        &server,
        json!({"name": "w", "plugin": "wal2json", "tables": [{"table": "orders", "where": "amount > 1"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("pgoutput"), "{body}");
    assert!(publications(&pg).await.is_empty());
    assert!(slots(&pg).await.is_empty());
}

#[tokio::test]
async fn a_column_list_without_the_key_is_refused_while_it_would_break_updates() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    let tables = json!([{"table": "orders", "columns": ["amount"]}]);
    let (status, body) = create(&server, json!({"name": "cols", "tables": tables})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("orders"), "{body}");
    let filtered = json!([{"table": "orders", "where": "amount > 100"}]);
    let (status, body) = create(&server, json!({"name": "rows", "tables": filtered, "actions": ["delete"]})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("replica identity"), "{body}");
    let (status, body) =
        create(&server, json!({"name": "keyed", "tables": [{"table": "orders", "where": "id > 1"}]})).await;
    assert_eq!(status, 201, "a filter of the key breaks nothing: {body}");
    let (status, body) = delete(&server, "/v2/sessions/keyed").await;
    assert_eq!(status, 200, "{body}");
    assert!(publications(&pg).await.is_empty());
    pg.execute("UPDATE orders SET amount = amount + 1", &[]).await.expect("the application's UPDATE still works");
    let (status, body) = create(&server, json!({"name": "cols", "tables": tables, "actions": ["insert"]})).await;
    assert_eq!(status, 201, "inserts only break nothing: {body}");
}

#[tokio::test]
async fn a_pgoutput_slot_no_session_names_is_not_ours() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    pg.batch_execute("CREATE PUBLICATION subscriber FOR TABLE orders").await.unwrap();
    pg.batch_execute("SELECT pg_create_logical_replication_slot('delta_amber17', 'pgoutput')").await.unwrap();
    let (status, body) = server.connect_refused("?slotName=delta_amber17").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("pgoutput"), "{body}");
    let (status, body) = delete(&server, "/v1/sessions/delta_amber17").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(slots(&pg).await.len(), 1, "the subscriber's slot stays");
    let (status, list) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list, json!([]), "a subscriber's slot is not listed");
}

#[tokio::test]
async fn a_role_that_may_not_publish_every_table_gets_a_403_with_the_reason() {
    let _shared = SLOTS.read().await;
    let db = common::fresh_db().await;
    let admin = db.client().await;
    let role = format!("pubs_{}", db.dbname);
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN REPLICATION; GRANT CREATE ON DATABASE \"{0}\" TO \"{role}\";
             GRANT CREATE ON SCHEMA public TO \"{role}\";",
            db.dbname
        ))
        .await
        .unwrap();
    let as_role = common::TestDb { user: role.clone(), ..db.clone() };
    let pg = as_role.client().await;
    pg.batch_execute("CREATE TABLE mine (id int PRIMARY KEY)").await.unwrap();
    let server = server_with(&as_role, PluginChoice::Fixed(Plugin::Pgoutput)).await;
    let (status, body) = create(&server, json!({"name": "all"})).await;
    assert_eq!(status, 403, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("superuser") && msg.contains("FOR ALL TABLES"), "{msg}");
    let (status, body) = create(&server, json!({"name": "schema", "tables": ["public.*"]})).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("FOR TABLES IN SCHEMA"), "{body}");
    let (status, body) = create(&server, json!({"name": "mine", "tables": ["mine"]})).await;
    assert_eq!(status, 201, "the owner of a table may publish it: {body}");
    assert_eq!(publications(&pg).await, [slot_of(&body)]);
    let (status, body) = delete(&server, "/v2/sessions/mine").await;
    assert_eq!(status, 200, "{body}");
    assert!(publications(&pg).await.is_empty());
}

#[tokio::test]
async fn no_publication_is_left_when_the_slot_cannot_be_made() {
    let _alone = SLOTS.write().await;
    let (_db, pg, server) = setup(PluginChoice::Fixed(Plugin::Pgoutput)).await;
    let previous = server.init().await;
    // Take every free replication slot of the cluster.
    let free: i64 = pg
        .query_one("SELECT current_setting('max_replication_slots')::int - count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    for i in 0..free {
        pg.execute("SELECT pg_create_physical_replication_slot($1)", &[&format!("filler_{i}")]).await.unwrap();
    }
    let (status, body) = create(&server, json!({"name": "late", "tables": ["orders"]})).await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = server.get("/v1/init").await;
    assert_eq!(status, 503, "{body}");
    // The failed creates left nothing; the session before the failed init is whole.
    assert_eq!(publications(&pg).await, [previous.as_str()]);
    let (status, _) = server.get("/v2/sessions/late").await;
    assert_eq!(status, 404);
    let (status, view) = server.get("/v2/sessions/default").await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["slotName"], previous.as_str());
    pg.batch_execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'filler\\_%'",
    )
    .await
    .unwrap();
    let (status, body) = create(&server, json!({"name": "late", "tables": ["orders"]})).await;
    assert_eq!(status, 201, "{body}");
}

/// Issue 18: a row filter is one expression, or a 400; it cannot rewrite the rest of
/// the publication (`true) --` once turned `publish = 'insert'` into every action and
/// skipped the replica identity check, breaking the application's own UPDATE).
#[tokio::test]
async fn a_row_filter_is_one_expression_and_nothing_more() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    pg.batch_execute("CREATE TABLE noident (id int, amount int, note text); INSERT INTO noident VALUES (1, 5, 'a');")
        .await
        .unwrap();
    let nasty = [
        "true) --",
        "true) -- ",
        "true); DROP TABLE orders; --",
        "true); DROP TABLE orders",
        "true; SELECT 1",
        "true) /*",
        "true /* a comment */",
        "amount > 1) WITH (publish = 'insert, update, delete'",
        "amount > 1) OR (true",
        "true), TABLE orders WHERE (true",
        "note = 'unbalanced",
        "\"unbalanced = 1",
        "note = $$unterminated",
        "note = $a$ x $b$",
        "$1 > 0",
        "id IN (SELECT 1)",
        "EXISTS (SELECT FROM pgdeltastream.sessions)",
        "(SELECT true)",
        "true\u{0}",
        "",
    ];
    for (i, filter) in nasty.iter().enumerate() {
        let tables = json!([{"table": "noident", "where": filter}]);
        let (status, body) =
            create(&server, json!({"name": format!("n{i}"), "tables": tables, "actions": ["insert"]})).await;
        assert_eq!(status, 400, "{filter:?}: {body}");
        assert!(body["error"].is_string(), "{filter:?}: {body}");
        assert!(publications(&pg).await.is_empty(), "{filter:?}: a publication was left");
        pg.execute("UPDATE noident SET amount = amount + 1", &[])
            .await
            .unwrap_or_else(|e| panic!("{filter:?}: the application's UPDATE broke: {e}"));
    }
    assert!(slots(&pg).await.is_empty());
    let n: i64 = pg.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "orders is still there");

    // Quotes, dollar quotes and comment-like text inside literals are one expression.
    for (i, filter) in [
        "note = 'a) --'",
        "note <> $$); DROP TABLE orders; --$$",
        "\"note\" IS DISTINCT FROM E'\\''",
        "note = E'\\' ) --'",
    ]
    .iter()
    .enumerate()
    {
        let tables = json!([{"table": "noident", "where": filter}]);
        let (status, body) =
            create(&server, json!({"name": format!("ok{i}"), "tables": tables, "actions": ["insert"]})).await;
        assert_eq!(status, 201, "{filter:?}: {body}");
        let publication = body["publication"].as_str().unwrap().to_owned();
        assert_eq!(publication_flags(&pg, &publication).await, [false, true, false, false, false], "{filter:?}");
        pg.execute("UPDATE noident SET amount = amount + 1", &[]).await.expect("the application's UPDATE works");
        let (status, body) = delete(&server, &format!("/v2/sessions/ok{i}")).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Issue 18: a NUL byte in a column, a row filter or a table name is the client's
/// mistake (400 JSON), never a 500.
#[tokio::test]
async fn a_nul_byte_anywhere_in_a_definition_is_a_400() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    for entry in [
        json!({"table": "orders", "columns": ["id\u{0}"]}),
        json!({"table": "orders", "columns": ["id", "\u{0}"]}),
        json!({"table": "orders", "where": "amount > 1\u{0}"}),
        json!({"table": "orders", "where": "note = '\u{0}'"}),
        json!({"table": "orders\u{0}"}),
        json!({"table": "\"orders\u{0}\""}),
        json!("orders\u{0}"),
        json!("\"a\u{0}\".*"),
    ] {
        let (status, body) = create(&server, json!({"name": "nul", "tables": [entry]})).await;
        assert_eq!(status, 400, "{entry}: {body}");
        assert!(body["error"].is_string(), "{entry}: {body}");
    }
    let (status, _) = create(&server, json!({"name": "orders", "tables": ["orders"]})).await;
    assert_eq!(status, 201);
    for table in ["or%00ders", "%22or%00ders%22", "public.%00"] {
        let (status, body) = server.get(&format!("/v2/sessions/orders/snapshot/{table}")).await;
        assert_eq!(status, 400, "{table}: {body}");
    }
    assert_eq!(slots(&pg).await.len(), 1, "only the valid session was made");
}

/// Issue 18: a session's snapshot applies its row filter and column list, as the stream
/// does: no row the filter leaves out, no column the list leaves out. Without its key
/// in the list, the pages follow the rows' positions, and no cursor carries a value.
#[tokio::test]
async fn a_snapshot_serves_the_rows_and_columns_of_the_sessions_publication() {
    let _shared = SLOTS.read().await;
    let (_db, pg, server) = setup(PluginChoice::Auto).await;
    pg.execute("INSERT INTO orders (amount, note) SELECT 100 + g, 'n' || g FROM generate_series(1, 10) g", &[])
        .await
        .unwrap();
    let page_all = |name: &'static str| {
        let addr = server.addr;
        async move {
            let mut rows = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let path = match &after {
                    Some(c) => format!("/v2/sessions/{name}/snapshot/orders?limit=3&after={c}"),
                    None => format!("/v2/sessions/{name}/snapshot/orders?limit=3"),
                };
                let (status, page) = request(addr, "GET", &path, None).await;
                assert_eq!(status, 200, "{path}: {page}");
                rows.extend(page["rows"].as_array().unwrap().iter().cloned());
                match page["next"].as_str() {
                    Some(next) => {
                        let cursor: Value = serde_json::from_slice(
                            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, next).unwrap(),
                        )
                        .unwrap();
                        if name == "unkeyed" {
                            // The table and a row position: no value of a column.
                            assert_eq!(cursor["k"][0], cursor["t"].to_string(), "{cursor}");
                            assert!(cursor["k"][1].as_str().unwrap().starts_with('('), "{cursor}");
                        }
                        after = Some(next.to_owned());
                    }
                    None => break,
                }
            }
            let (status, body) = raw_request(
                addr,
                "GET",
                &format!("/v2/sessions/{name}/snapshot/orders"),
                &[("accept", "application/x-ndjson")],
                vec![],
            )
            .await;
            assert_eq!(status, 200);
            let exported: Vec<Value> =
                String::from_utf8(body).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(exported, rows, "{name}: the export is the pages");
            rows
        }
    };
    for (name, entry) in [
        ("keyed", json!({"table": "orders", "where": "amount > 105", "columns": ["id", "amount"]})),
        ("unkeyed", json!({"table": "orders", "where": "amount > 105", "columns": ["amount"]})),
    ] {
        let body = json!({"name": name, "tables": [entry], "actions": ["insert"]});
        let (status, created) = create(&server, body).await;
        assert_eq!(status, 201, "{created}");
    }
    let expected: Vec<i64> = vec![150, 106, 107, 108, 109, 110];
    let keyed = page_all("keyed").await;
    assert_eq!(keyed.iter().map(|r| r["amount"].as_i64().unwrap()).collect::<Vec<_>>(), expected);
    let ids = [2, 8, 9, 10, 11, 12];
    assert_eq!(keyed, ids.iter().zip(&expected).map(|(id, a)| json!({"id": id, "amount": a})).collect::<Vec<_>>());
    let unkeyed = page_all("unkeyed").await;
    assert_eq!(unkeyed, expected.iter().map(|a| json!({"amount": a})).collect::<Vec<_>>());
}

/// A session on a partitioned table streams the rows of every partition (two levels
/// deep, one attached after the stream started, a row moved between partitions) under
/// the table's own name, as its snapshot names it, on both plugins.
async fn partitioned_table_streams_under_its_name(plugin: &str) {
    let _shared = SLOTS.read().await;
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us') PARTITION BY RANGE (id);
         CREATE TABLE m_us_low PARTITION OF m_us FOR VALUES FROM (0) TO (1000);
         CREATE TABLE other (id int PRIMARY KEY);
         INSERT INTO m VALUES (1, 'eu', 'a'), (2, 'us', 'b');",
    )
    .await
    .unwrap();
    let server = server_with(&db, PluginChoice::Auto).await;
    let (status, created) = create(&server, json!({"name": "parts", "plugin": plugin, "tables": ["m"]})).await;
    assert_eq!(status, 201, "{created}");

    // The snapshot names the table as the session lists it, with every partition's rows.
    let (status, page) = server.get("/v2/sessions/parts/snapshot/m").await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<i64> = page["rows"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2], "{page}");

    let url = format!("ws://{}/v2/sessions/parts/stream", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket upgrade");
    pg.batch_execute(
        "INSERT INTO m VALUES (3, 'eu', 'c');
         INSERT INTO m_us_low VALUES (4, 'us', 'd');
         CREATE TABLE m_asia (LIKE m INCLUDING ALL);
         ALTER TABLE m ATTACH PARTITION m_asia FOR VALUES IN ('asia');
         INSERT INTO m VALUES (5, 'asia', 'e');
         UPDATE m SET region = 'eu' WHERE id = 2;
         BEGIN; INSERT INTO other VALUES (1); INSERT INTO m VALUES (8, 'eu', 'h');
           INSERT INTO other VALUES (2); INSERT INTO m VALUES (9, 'us', 'i'); COMMIT;
         INSERT INTO m VALUES (6, 'eu', 'f');",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !got.iter().any(|(_, _, _, id): &(String, String, String, i64)| *id == 6) {
        let tx = tokio::time::timeout_at(deadline, next_changes(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("every row within 30 s; got {got:?}"));
        for c in tx["change"].as_array().unwrap() {
            let id = match c["kind"].as_str() {
                Some("delete") => &c["oldkeys"]["keyvalues"][0],
                _ => &c["columnvalues"][0],
            };
            let name = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            got.push((name("kind"), name("schema"), name("table"), id.as_i64().unwrap_or(-1)));
        }
    }
    let m = |kind: &str, id| (kind.to_owned(), "public".to_owned(), "m".to_owned(), id);
    assert_eq!(
        got,
        [
            m("insert", 3),
            m("insert", 4),
            m("insert", 5),
            m("delete", 2),
            m("insert", 2),
            m("insert", 8),
            m("insert", 9),
            m("insert", 6)
        ]
    );

    // Nothing was acked: the same changes again, in format 2.
    drop(ws);
    let slot = slot_of(&created);
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let url = format!("ws://{}/v2/sessions/parts/stream?format=changes", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket upgrade");
    let mut got = Vec::new();
    while got.len() < 8 {
        let r = tokio::time::timeout_at(deadline + std::time::Duration::from_secs(30), next_json(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("every row within 30 s; got {got:?}"));
        let action = r["action"].as_str().unwrap_or_default().to_owned();
        if ["I", "U", "D"].contains(&action.as_str()) {
            got.push((action, r["schema"].as_str().unwrap().to_owned(), r["table"].as_str().unwrap().to_owned()));
        }
    }
    let m = |action: &str| (action.to_owned(), "public".to_owned(), "m".to_owned());
    assert_eq!(got, [m("I"), m("I"), m("I"), m("D"), m("I"), m("I"), m("I"), m("I")]);

    // A partition's TRUNCATE empties the partition only: it is not the table's.
    pg.batch_execute("TRUNCATE m_eu; TRUNCATE m; INSERT INTO m VALUES (7, 'eu', 'g')").await.unwrap();
    let mut truncated = Vec::new();
    loop {
        let r = tokio::time::timeout(std::time::Duration::from_secs(30), next_json(&mut ws)).await.expect("records");
        match r["action"].as_str() {
            Some("T") => truncated.push(r["table"].as_str().unwrap().to_owned()),
            Some("I") => break,
            _ => {}
        }
    }
    truncated.sort();
    match plugin {
        "wal2json" => assert_eq!(truncated, ["m", "m_asia", "m_eu", "m_eu", "m_us", "m_us_low"]),
        _ => assert_eq!(truncated, ["m"]),
    }
    drop(ws);
}

#[tokio::test]
async fn a_wal2json_session_on_a_partitioned_table_streams_its_rows_under_its_name() {
    partitioned_table_streams_under_its_name("wal2json").await;
}

#[tokio::test]
async fn a_pgoutput_session_on_a_partitioned_table_streams_its_rows_under_its_name() {
    partitioned_table_streams_under_its_name("pgoutput").await;
}
