//! Schema changes in a session's stream (`"ddl": true`): the server's event trigger
//! writes each DDL command as a logical message, which reaches the client in its
//! transaction's place as a DDL change of the session's tables, on both plugins and in
//! both formats. Sessions without ddl, and sessions of other tables, get none.

use testkit::pg as common;
use testkit::support;

use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// The tables at the start: `app.gone` is dropped by the workload, `app.fresh` created.
const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text);
     CREATE TABLE other (id int PRIMARY KEY);
     CREATE TABLE marker (id int PRIMARY KEY);
     CREATE SCHEMA app; CREATE TABLE app.gone (id int PRIMARY KEY);";

/// Each DDL command between two inserts, the last one inside their transaction; the
/// marker row ends it.
const WORKLOAD: &[&str] = &[
    "INSERT INTO t VALUES (1, 'a')",
    "ALTER TABLE t ADD COLUMN extra int",
    "INSERT INTO t VALUES (2, 'b', 2)",
    "ALTER TABLE t RENAME COLUMN extra TO more",
    "INSERT INTO t VALUES (3, 'c', 3)",
    "ALTER TABLE t ALTER COLUMN more TYPE bigint",
    "INSERT INTO t VALUES (4, 'd', 4)",
    "ALTER TABLE t DROP COLUMN more",
    "INSERT INTO t VALUES (5, 'e')",
    "CREATE TABLE app.fresh (id int PRIMARY KEY, name varchar(20))",
    "INSERT INTO t VALUES (6, 'f')",
    "DROP TABLE app.gone",
    "INSERT INTO t VALUES (7, 'g')",
    "BEGIN; INSERT INTO t VALUES (8, 'h'); ALTER TABLE t ADD COLUMN w text; INSERT INTO t VALUES (9, 'i', 'w'); COMMIT",
    // In a savepoint, kept; in one rolled back, gone with it.
    "BEGIN; SAVEPOINT s; ALTER TABLE t DROP COLUMN w; RELEASE s; INSERT INTO t VALUES (10, 'j'); COMMIT",
    "BEGIN; SAVEPOINT s; ALTER TABLE t ADD COLUMN never int; ROLLBACK TO s; INSERT INTO t VALUES (11, 'k'); COMMIT",
    "INSERT INTO marker VALUES (1)",
];

fn insert(table: &str, id: i64) -> Value {
    json!({"insert": table, "id": id})
}

fn ddl(command: &str, object_type: &str, identity: &str, table: &str, columns: &[(&str, &str)]) -> Value {
    let (schema, table) = table.split_once('.').unwrap();
    json!({
        "command": command, "objectType": object_type, "objectIdentity": identity, "schema": schema, "table": table,
        "columnnames": columns.iter().map(|c| c.0).collect::<Vec<_>>(),
        "columntypes": columns.iter().map(|c| c.1).collect::<Vec<_>>(),
    })
}

/// What a session of `t`, `app.*` and `marker` with ddl reads, in order.
fn expected() -> Vec<Value> {
    let (id, v) = (("id", "integer"), ("v", "text"));
    vec![
        insert("t", 1),
        ddl("ALTER TABLE", "table", "public.t", "public.t", &[id, v, ("extra", "integer")]),
        insert("t", 2),
        ddl("ALTER TABLE", "table column", "public.t.more", "public.t", &[id, v, ("more", "integer")]),
        insert("t", 3),
        ddl("ALTER TABLE", "table", "public.t", "public.t", &[id, v, ("more", "bigint")]),
        insert("t", 4),
        ddl("ALTER TABLE", "table", "public.t", "public.t", &[id, v]),
        insert("t", 5),
        ddl("CREATE TABLE", "table", "app.fresh", "app.fresh", &[id, ("name", "character varying(20)")]),
        insert("t", 6),
        ddl("DROP TABLE", "table", "app.gone", "app.gone", &[]),
        insert("t", 7),
        insert("t", 8),
        ddl("ALTER TABLE", "table", "public.t", "public.t", &[id, v, ("w", "text")]),
        insert("t", 9),
        ddl("ALTER TABLE", "table", "public.t", "public.t", &[id, v]),
        insert("t", 10),
        insert("t", 11),
        insert("marker", 1),
    ]
}

/// What a client of the stream read: each message's text, and its changes (format
/// 1's change arrays, format 2's records but begin and commit) in order.
#[derive(Default)]
struct Read {
    texts: Vec<String>,
    changes: Vec<Value>,
}

impl Read {
    /// Reads and acks until the transaction of the marker row ends.
    async fn until_marker(ws: &mut Ws) -> Read {
        let mut read = Read::default();
        let mut marked = false;
        loop {
            let Message::Text(text) = next_message(ws).await else { panic!("a text message") };
            let m: Value = serde_json::from_str(text.as_str()).unwrap();
            read.texts.push(text.as_str().to_owned());
            let items = match m["change"].as_array() {
                Some(changes) => changes.clone(),
                None if m["action"] == "B" || m["action"] == "C" => Vec::new(),
                None => vec![m.clone()],
            };
            for item in items {
                let change = summary(&item);
                marked |= change["insert"] == "marker";
                read.changes.push(change);
            }
            let ends = m["change"].is_array() || m["action"] == "C";
            if let Some(lsn) = m["nextlsn"].as_str().filter(|_| ends) {
                ack(ws, lsn).await;
                if marked {
                    return read;
                }
            }
        }
    }
}

/// An insert as its table and id; a DDL change as it is, without its tag; anything
/// else as it is.
fn summary(change: &Value) -> Value {
    let kind = change["kind"].as_str().or(change["action"].as_str()).unwrap_or("");
    match kind {
        "insert" => insert(change["table"].as_str().unwrap(), change["columnvalues"][0].as_i64().unwrap()),
        "I" => insert(change["table"].as_str().unwrap(), change["columns"][0]["value"].as_i64().unwrap()),
        "ddl" | "DDL" => {
            let mut c = change.clone();
            let object = c.as_object_mut().unwrap();
            object.remove("kind");
            object.remove("action");
            c
        }
        _ => change.clone(),
    }
}

async fn create(server: &TestServer, body: Value) -> Value {
    let (status, created) = server.post("/v2/sessions", &body.to_string()).await;
    assert_eq!(status, 201, "{created}");
    created
}

async fn connect(server: &TestServer, name: &str, format: &str) -> Ws {
    let url = format!("ws://{}/v2/sessions/{name}/stream?format={format}", server.addr);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    ws
}

/// LSNs change from run to run.
fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    for key in ["\"nextlsn\":\"", "\"lsn\":\""] {
        let mut from = 0;
        while let Some(at) = out[from..].find(key) {
            let start = from + at + key.len();
            let Some(len) = out[start..].find('"') else { break };
            out.replace_range(start..start + len, "[lsn]");
            from = start + "[lsn]".len();
        }
    }
    out
}

/// The messages that carry the first DDL change (format 2: its record between its
/// begin and commit).
fn first_ddl_event(read: &Read, format: &str) -> String {
    let at = read.texts.iter().position(|t| t.contains("\"kind\":\"ddl\"") || t.contains("\"action\":\"DDL\""));
    let at = at.expect("a DDL event");
    let texts = match format {
        "transactions" => &read.texts[at..=at],
        _ => &read.texts[at - 1..=at + 1],
    };
    texts.iter().map(|t| redact(t)).collect::<Vec<_>>().join("\n")
}

/// Sessions of both formats with ddl, one without, one of other tables; the workload;
/// what each reads.
async fn every_ddl_event_arrives_in_order(plugin: &str) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let server = TestServer::start(&db).await;
    let tables = json!(["public.t", "app.*", "public.marker"]);
    for format in ["transactions", "changes"] {
        create(&server, json!({"name": format, "plugin": plugin, "tables": tables, "ddl": true})).await;
    }
    let plain = create(&server, json!({"name": "plain", "plugin": plugin, "tables": tables})).await;
    assert!(plain.get("ddl").is_none(), "{plain}");
    let theirs = json!({"name": "theirs", "plugin": plugin, "tables": ["public.other", "public.marker"], "ddl": true});
    create(&server, theirs).await;
    let (status, view) = server.get("/v2/sessions/changes").await;
    assert_eq!((status, &view["ddl"]), (200, &json!(true)), "{view}");
    for statement in WORKLOAD {
        pg.batch_execute(statement).await.unwrap();
    }
    for format in ["transactions", "changes"] {
        let mut ws = connect(&server, format, format).await;
        let read = Read::until_marker(&mut ws).await;
        assert_eq!(read.changes, expected(), "{plugin}, {format}:\n{}", read.texts.join("\n"));
        insta::with_settings!({ snapshot_path => "../../snapshots" }, {
            insta::assert_snapshot!(format!("ddl_event_{format}"), first_ddl_event(&read, format));
        });
    }
    let mut ws = connect(&server, "plain", "changes").await;
    let read = Read::until_marker(&mut ws).await;
    let inserts: Vec<Value> = expected().into_iter().filter(|c| c.get("insert").is_some()).collect();
    assert_eq!(read.changes, inserts, "no DDL without ddl ({plugin}):\n{}", read.texts.join("\n"));
    let mut ws = connect(&server, "theirs", "transactions").await;
    let read = Read::until_marker(&mut ws).await;
    assert_eq!(read.changes, [insert("marker", 1)], "none of t's DDL ({plugin}):\n{}", read.texts.join("\n"));
}

#[tokio::test]
async fn every_ddl_event_arrives_in_order_between_the_changes_with_wal2json() {
    every_ddl_event_arrives_in_order("wal2json").await;
}

#[tokio::test]
async fn every_ddl_event_arrives_in_order_between_the_changes_with_pgoutput() {
    every_ddl_event_arrives_in_order("pgoutput").await;
}

/// Only actions a session lists: wal2json is asked for the DDL prefix among the
/// messages it may pass.
#[tokio::test]
async fn a_session_without_messages_still_gets_its_ddl() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let server = TestServer::start(&db).await;
    let body =
        json!({"name": "inserts", "plugin": "wal2json", "tables": ["t", "marker"], "actions": ["insert"], "ddl": true});
    create(&server, body).await;
    pg.batch_execute("INSERT INTO t VALUES (1, 'a'); ALTER TABLE t ADD COLUMN x int; INSERT INTO marker VALUES (1)")
        .await
        .unwrap();
    let mut ws = connect(&server, "inserts", "transactions").await;
    let read = Read::until_marker(&mut ws).await;
    let columns = [("id", "integer"), ("v", "text"), ("x", "integer")];
    let want = [insert("t", 1), ddl("ALTER TABLE", "table", "public.t", "public.t", &columns), insert("marker", 1)];
    assert_eq!(read.changes, want, "{}", read.texts.join("\n"));
}

/// A role that is not a superuser may not create an event trigger: 403 with the SQL,
/// and nothing made. Once an admin has run that SQL, the same request succeeds, and the
/// role's own DDL (not a superuser's) is streamed.
#[tokio::test]
async fn a_role_that_may_not_create_the_trigger_gets_a_403_with_the_sql() {
    let db = common::fresh_db().await;
    let admin = db.client().await;
    let role = format!("ddl_{}", db.dbname);
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
    pg.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE marker (id int PRIMARY KEY)")
        .await
        .unwrap();
    let server = TestServer::start(&as_role).await;
    let body = json!({"name": "mine", "plugin": "wal2json", "tables": ["t", "marker"], "ddl": true});
    let (status, refused) = server.post("/v2/sessions", &body.to_string()).await;
    assert_eq!(status, 403, "{refused}");
    let msg = refused["error"].as_str().unwrap();
    assert!(msg.contains("superuser") && msg.contains("CREATE EVENT TRIGGER"), "{msg}");
    let made =
        "SELECT (SELECT count(*) FROM pg_event_trigger) + (SELECT count(*) FROM pg_proc WHERE proname = 'ddl_event')";
    assert_eq!(admin.query_one(made, &[]).await.unwrap().get::<_, i64>(0), 0, "nothing is created");
    assert_eq!(server.get("/v2/sessions/mine").await.0, 404);
    assert!(database_slots(&admin).await.is_empty());
    let sql = &msg[msg.find("BEGIN;").expect("the SQL")..];
    admin.batch_execute(sql).await.unwrap();
    create(&server, body).await;
    pg.batch_execute("ALTER TABLE t ADD COLUMN x int; INSERT INTO t VALUES (1, 'a', 1); INSERT INTO marker VALUES (1)")
        .await
        .unwrap();
    let mut ws = connect(&server, "mine", "changes").await;
    let read = Read::until_marker(&mut ws).await;
    let columns = [("id", "integer"), ("v", "text"), ("x", "integer")];
    let want = [ddl("ALTER TABLE", "table", "public.t", "public.t", &columns), insert("t", 1), insert("marker", 1)];
    assert_eq!(read.changes, want, "{}", read.texts.join("\n"));
}

/// The trigger is made once: a second session with ddl finds it, and leaves it be.
#[tokio::test]
async fn the_trigger_is_installed_once() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(SCHEMA).await.unwrap();
    let server = TestServer::start(&db).await;
    let count = "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgdeltastream%'";
    create(&server, json!({"name": "plain", "tables": ["t"]})).await;
    assert_eq!(pg.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 0, "no ddl, no trigger");
    for name in ["one", "two"] {
        create(&server, json!({"name": name, "tables": ["t"], "ddl": true})).await;
        assert_eq!(pg.query_one(count, &[]).await.unwrap().get::<_, i64>(0), 2);
    }
    // DDL of objects no session streams (a temporary table) runs as ever under the trigger.
    pg.batch_execute("CREATE TEMP TABLE scratch (id int); DROP TABLE scratch").await.unwrap();
}

/// On every major (`make test-majors`): pgoutput carries DDL from 14, where it sends
/// logical messages; on 13 a session asking for it is a 400, and nothing is created.
#[tokio::test]
async fn on_every_major_pgoutput_carries_ddl_from_14() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE marker (id int PRIMARY KEY)")
        .await
        .unwrap();
    let major = server_major(&pg).await;
    let server = TestServer::start(&db).await;
    let body = json!({"name": "m", "plugin": "pgoutput", "tables": ["t", "marker"], "ddl": true});
    if major < 14 {
        let (status, refused) = server.post("/v2/sessions", &body.to_string()).await;
        assert_eq!(status, 400, "{refused}");
        assert!(refused["error"].as_str().unwrap().contains("PostgreSQL 14"), "{refused}");
        let triggers = pg.query_one("SELECT count(*) FROM pg_event_trigger", &[]).await.unwrap();
        assert_eq!(triggers.get::<_, i64>(0), 0);
        return;
    }
    create(&server, body).await;
    pg.batch_execute("ALTER TABLE t ADD COLUMN x int; INSERT INTO t VALUES (1, 'a', 1); INSERT INTO marker VALUES (1)")
        .await
        .unwrap();
    let mut ws = connect(&server, "m", "changes").await;
    let read = Read::until_marker(&mut ws).await;
    let columns = [("id", "integer"), ("v", "text"), ("x", "integer")];
    let want = [ddl("ALTER TABLE", "table", "public.t", "public.t", &columns), insert("t", 1), insert("marker", 1)];
    assert_eq!(read.changes, want, "PostgreSQL {major}:\n{}", read.texts.join("\n"));
}
