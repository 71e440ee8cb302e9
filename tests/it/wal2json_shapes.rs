//! Pins the shapes of real wal2json output, captured from Postgres, through our typed
//! models (types::wal2json). If a plugin upgrade changes a shape, these snapshots say
//! exactly how. LSNs and xids vary from run to run and are redacted.

use testkit::pg as common;

use pgdeltastream::types::wal2json::{Record, Transaction};

const WORKLOAD: &str = "
    CREATE TABLE shapes (id int PRIMARY KEY, name text, score numeric);
    CREATE TABLE nokey (a int);
    CREATE TABLE full_identity (id int, v text);
    ALTER TABLE full_identity REPLICA IDENTITY FULL;
    INSERT INTO full_identity VALUES (1, 'old');
";

async fn capture(db: &common::TestDb, slot: &str, options: &[&str]) -> Vec<String> {
    let pg = db.client().await;
    // get_changes reads only flushed WAL; the test cluster runs synchronous_commit=off.
    pg.batch_execute("SET synchronous_commit = on").await.unwrap();
    pg.batch_execute(WORKLOAD).await.unwrap();
    pg.execute("SELECT pg_create_logical_replication_slot($1, 'wal2json')", &[&slot]).await.unwrap();
    pg.batch_execute(
        "BEGIN;
         INSERT INTO shapes VALUES (1, 'one', 1.50), (2, NULL, 'NaN');
         UPDATE shapes SET name = 'uno' WHERE id = 1;
         DELETE FROM shapes WHERE id = 2;
         COMMIT;",
    )
    .await
    .unwrap();
    pg.batch_execute("UPDATE full_identity SET v = 'new'").await.unwrap();
    pg.batch_execute("INSERT INTO nokey VALUES (1)").await.unwrap();
    pg.batch_execute("TRUNCATE shapes").await.unwrap();
    pg.batch_execute("SELECT pg_logical_emit_message(true, 'tx', 'in a transaction')").await.unwrap();
    pg.batch_execute("SELECT pg_logical_emit_message(false, 'nontx', 'on its own')").await.unwrap();
    // A last commit flushes the WAL of the non-transactional message too.
    pg.batch_execute("INSERT INTO nokey VALUES (2)").await.unwrap();
    let sql = format!(
        "SELECT data FROM pg_logical_slot_get_changes('{slot}', NULL, NULL{})",
        options.iter().map(|o| format!(", '{o}'")).collect::<String>()
    );
    let rows = pg.query(&sql, &[]).await.unwrap();
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

#[tokio::test]
async fn format_version_1() {
    let db = common::fresh_db().await;
    let raw = capture(&db, "shapes_v1", &["include-lsn", "1"]).await;
    let parsed: Vec<Transaction> = raw
        .iter()
        .map(|m| {
            // wal2json 2.5 prints a non-transactional message as invalid JSON; the
            // stream repairs it (stream::frame), and so do we here.
            let fixed = m.replacen("{\"change\":[,", "{\"change\":[", 1);
            Transaction::parse(fixed.as_bytes()).unwrap_or_else(|e| panic!("{e}: {m}"))
        })
        .collect();
    // Re-serialising gives back the plugin's bytes: the models hold everything.
    for (m, t) in raw.iter().zip(&parsed) {
        assert_eq!(serde_json::to_string(t).unwrap(), m.replacen("{\"change\":[,", "{\"change\":[", 1));
    }
    insta::with_settings!({ snapshot_path => "../../snapshots" }, {
        insta::assert_snapshot!("wal2json_v1", redact(&raw));
    });
}

#[tokio::test]
async fn format_version_2() {
    let db = common::fresh_db().await;
    let raw = capture(&db, "shapes_v2", &["format-version", "2", "include-lsn", "1"]).await;
    let parsed: Vec<Record> =
        raw.iter().map(|m| Record::parse(m.as_bytes()).unwrap_or_else(|e| panic!("{e}: {m}"))).collect();
    for (m, r) in raw.iter().zip(&parsed) {
        assert_eq!(&serde_json::to_string(r).unwrap(), m);
    }
    insta::with_settings!({ snapshot_path => "../../snapshots" }, {
        insta::assert_snapshot!("wal2json_v2", redact(&raw));
    });
}

/// The plugin's messages, one per line, exactly as printed but for the values that
/// vary between runs: every `"lsn"`/`"nextlsn"` (X/Y) and `"xid"` (a number).
fn redact(raw: &[String]) -> String {
    raw.iter().map(|m| redact_one(m)).collect::<Vec<_>>().join("\n")
}

fn redact_one(m: &str) -> String {
    let mut out = String::with_capacity(m.len());
    let mut rest = m;
    while let Some(at) =
        ["\"lsn\":\"", "\"nextlsn\":\"", "\"xid\":"].iter().filter_map(|k| rest.find(k).map(|i| (i, *k))).min()
    {
        let (i, key) = at;
        out.push_str(&rest[..i + key.len()]);
        rest = &rest[i + key.len()..];
        let end = rest.find(['"', ',', '}']).unwrap_or(rest.len());
        out.push_str(if key.ends_with('"') { "[lsn]" } else { "[xid]" });
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}
