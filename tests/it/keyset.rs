//! Keyset pages and the NDJSON export (`pgdeltastream::pg::keyset`) against a real
//! Postgres, on a snapshot held as the session registry holds it: every row exactly
//! once, in key order, as of the snapshot; the export equal to the pages; bad cursors
//! refused; and pages found through an index or a TID range, wherever they are.

use testkit::pg as common;

use std::time::Duration;

use futures_util::StreamExt;
use pgdeltastream::pg::PgConfig;
use pgdeltastream::pg::ident::TableRef;
use pgdeltastream::pg::keyset::{Cursor, KeysetRequest, explain_keyset_page, open_export, open_keyset_page};
use pgdeltastream::pg::pool::{Pool, PoolSettings};
use pgdeltastream::pg::snapshot::{PageBody, Scope, SnapshotError, hold_snapshot};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A database, a client on it, and a pool reading from a held snapshot.
struct Snap {
    pg: tokio_postgres::Client,
    pool: Pool,
    id: String,
    _holder: tokio_postgres::Client,
    db: common::TestDb,
}

fn pool_for(db: &common::TestDb, size: usize) -> Pool {
    let config = PgConfig {
        host: db.host.clone(),
        port: db.port,
        user: db.user.clone(),
        password: db.password.clone(),
        dbname: db.dbname.clone(),
        application_name: "keyset-test".into(),
        connect_timeout: Duration::from_secs(10),
        tls: pgdeltastream::pg::tls::PgTls::disabled(),
    };
    // Generous: a busy machine must not make a test fail for want of a connection.
    Pool::new(config, PoolSettings { size, acquire_timeout: Duration::from_secs(60), ..PoolSettings::default() })
}

/// Runs `setup`, then takes the snapshot.
async fn snap(setup: &str) -> Snap {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute(setup).await.unwrap();
    let exporter = db.client().await;
    exporter.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").await.unwrap();
    let exported: String = exporter.query_one("SELECT pg_export_snapshot()", &[]).await.unwrap().get(0);
    let holder = db.client().await;
    let id = hold_snapshot(&holder, &exported).await.unwrap();
    exporter.batch_execute("COMMIT").await.unwrap();
    Snap { pool: pool_for(&db, 2), pg, id, _holder: holder, db }
}

async fn collect(body: PageBody) -> Result<String, SnapshotError> {
    let mut out = Vec::new();
    let mut body = body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8(out).unwrap())
}

impl Snap {
    async fn page(
        &self,
        table: &str,
        after: Option<String>,
        limit: u64,
    ) -> Result<(Vec<Value>, Option<String>), SnapshotError> {
        let req = KeysetRequest { table: TableRef::parse(table).unwrap(), after, limit };
        let body = open_keyset_page(self.pool.get().await.unwrap(), &self.id, &req, &Scope::default(), TIMEOUT).await?;
        let text = collect(body).await?;
        let page: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let rows = page["rows"].as_array().unwrap_or_else(|| panic!("no rows in {text}")).clone();
        let next = match &page["next"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => panic!("next is {other}"),
        };
        assert!(rows.len() as u64 <= limit, "{} rows, limit {limit}", rows.len());
        Ok((rows, next))
    }

    /// Every page, following the cursors; asserts that only the last page is short.
    async fn all_pages(&self, table: &str, limit: u64) -> Vec<Value> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (rows, next) = self.page(table, after, limit).await.unwrap();
            all.extend(rows.iter().cloned());
            match next {
                Some(c) => {
                    assert_eq!(rows.len() as u64, limit, "a page before the last is full");
                    after = Some(c);
                }
                None => return all,
            }
        }
    }

    async fn export(&self, table: &str) -> Result<String, SnapshotError> {
        let table = TableRef::parse(table).unwrap();
        let body = open_export(self.pool.get().await.unwrap(), &self.id, &table, &Scope::default(), TIMEOUT).await?;
        collect(body).await
    }

    async fn export_rows(&self, table: &str) -> Vec<Value> {
        let text = self.export(table).await.unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "every line ends with \\n");
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }

    async fn oid(&self, table: &str) -> u32 {
        self.pg.query_one(&format!("SELECT '{table}'::regclass::oid"), &[]).await.unwrap().get(0)
    }
}

fn ints(rows: &[Value], col: &str) -> Vec<i64> {
    rows.iter().map(|r| r[col].as_i64().unwrap_or_else(|| panic!("{col} in {r}"))).collect()
}

#[tokio::test]
async fn primary_key_pages_hold_every_row_once_in_order_as_of_the_snapshot() {
    let s = snap(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 100000) g;",
    )
    .await;
    s.pg.batch_execute(
        "INSERT INTO big VALUES (0, 'new'), (100001, 'new'), (-5, 'new');
         DELETE FROM big WHERE id IN (1, 500, 50000, 100000);
         UPDATE big SET v = 'changed' WHERE id BETWEEN 10 AND 20;",
    )
    .await
    .unwrap();
    let rows = s.all_pages("big", 1000).await;
    assert_eq!(ints(&rows, "id"), (1..=100000).collect::<Vec<i64>>());
    assert!(rows.iter().all(|r| r["v"] == Value::String(format!("row {}", r["id"]))));
    // An odd limit that does not divide the table.
    let rows7 = s.all_pages("big", 7777).await;
    assert_eq!(rows7, rows);
    assert_eq!(s.export_rows("big").await, rows);
}

/// A composite key of types whose text output must read back exactly: text that sorts
/// by collation, floats, timestamps.
#[tokio::test]
async fn composite_primary_key() {
    let s = snap(
        r#"CREATE TABLE comp (a text, b float8, c timestamptz, "Payload" jsonb, PRIMARY KEY (a, b, c));
         INSERT INTO comp SELECT k, f, t, jsonb_build_object('n', k || f)
           FROM unnest(ARRAY['x', 'X', 'a b', 'a,b', '(', ')', 'é', '"q"', '', ' ', 'Zz', 'z']) k,
                unnest(ARRAY[0.1::float8, 1e-300, -0.0, 3.141592653589793, 'Infinity', '-Infinity', 'NaN']) f,
                unnest(ARRAY['2020-01-01 00:00:00.123456+00'::timestamptz, '1999-12-31 23:59:59+05', 'infinity']) t;"#,
    )
    .await;
    let want: Vec<String> =
        s.pg.query("SELECT a FROM comp ORDER BY a, b, c", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(want.len(), 12 * 7 * 3);
    for limit in [1, 5, 100, 1000] {
        let rows = s.all_pages("comp", limit).await;
        // A key value that did not read back exactly would skip or repeat rows.
        let distinct: std::collections::HashSet<String> = rows.iter().map(|r| r.to_string()).collect();
        assert_eq!(distinct.len(), want.len(), "limit {limit}");
        let got: Vec<&str> = rows.iter().map(|r| r["a"].as_str().unwrap()).collect();
        assert_eq!(got, want, "limit {limit}");
    }
    assert_eq!(s.export_rows("comp").await, s.all_pages("comp", 10).await);
    // Byte for byte, keys in column order: a page's rows are the export's lines.
    let req = KeysetRequest { table: TableRef::parse("comp").unwrap(), after: None, limit: 1000 };
    let page =
        collect(open_keyset_page(s.pool.get().await.unwrap(), &s.id, &req, &Scope::default(), TIMEOUT).await.unwrap())
            .await
            .unwrap();
    let export = s.export("comp").await.unwrap();
    assert_eq!(page, format!("{{\"rows\":[{}],\"next\":null}}", export.lines().collect::<Vec<_>>().join(",")));
    assert!(export.starts_with("{\"a\":\"\",\"b\":"), "{export}");
}

#[tokio::test]
async fn without_a_primary_key_pages_follow_the_row_position() {
    let s = snap(
        "CREATE TABLE nokey (v int, pad text);
         INSERT INTO nokey SELECT g, repeat('x', g % 300) FROM generate_series(1, 20000) g;
         DELETE FROM nokey WHERE v % 11 = 0;
         UPDATE nokey SET v = v WHERE v % 7 = 0;
         CREATE TABLE empty_nokey (v int);
         CREATE MATERIALIZED VIEW mv AS SELECT v FROM nokey WHERE v < 1000;",
    )
    .await;
    s.pg.batch_execute("INSERT INTO nokey SELECT -g FROM generate_series(1, 1000) g; DELETE FROM nokey WHERE v < 100;")
        .await
        .unwrap();
    let want: Vec<i64> = (1..=20000).filter(|v| v % 11 != 0).collect();
    for limit in [97, 5000] {
        let rows = s.all_pages("nokey", limit).await;
        let mut got = ints(&rows, "v");
        got.sort();
        assert_eq!(got, want, "limit {limit}");
        assert_eq!(s.export_rows("nokey").await, rows);
    }
    let rows = s.all_pages("mv", 100).await;
    assert_eq!(rows.len(), want.iter().filter(|v| **v < 1000).count());
    assert_eq!(s.export_rows("mv").await, rows);
    assert_eq!(s.page("empty_nokey", None, 10).await.unwrap(), (vec![], None));
    assert_eq!(s.export("empty_nokey").await.unwrap(), "");
}

/// Partitions (one of them with rows moved between partitions since), inheritance
/// trees whose tables share row positions and key values, and a partitioned table with
/// a key.
#[tokio::test]
async fn partitioned_and_inherited_tables() {
    let s = snap(
        "CREATE TABLE parts (v int, note text) PARTITION BY RANGE (v);
         CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (MINVALUE) TO (1000);
         CREATE TABLE parts_empty PARTITION OF parts FOR VALUES FROM (1000) TO (2000);
         CREATE TABLE parts_high PARTITION OF parts FOR VALUES FROM (2000) TO (MAXVALUE);
         INSERT INTO parts SELECT g, 'n' || g FROM generate_series(1, 999) g;
         INSERT INTO parts SELECT g, 'n' || g FROM generate_series(2000, 6000) g;
         UPDATE parts SET v = v + 5000 WHERE v < 100;
         CREATE TABLE parent (v int);
         CREATE TABLE child () INHERITS (parent);
         INSERT INTO parent SELECT g FROM generate_series(1, 300) g;
         INSERT INTO child SELECT g FROM generate_series(301, 600) g;
         CREATE TABLE kparent (id int PRIMARY KEY);
         CREATE TABLE kchild () INHERITS (kparent);
         INSERT INTO kparent SELECT g FROM generate_series(1, 100) g;
         INSERT INTO kchild SELECT g FROM generate_series(1, 100) g;
         CREATE TABLE kparts (id int PRIMARY KEY, v text) PARTITION BY HASH (id);
         CREATE TABLE kparts_0 PARTITION OF kparts FOR VALUES WITH (MODULUS 3, REMAINDER 0);
         CREATE TABLE kparts_1 PARTITION OF kparts FOR VALUES WITH (MODULUS 3, REMAINDER 1);
         CREATE TABLE kparts_2 PARTITION OF kparts FOR VALUES WITH (MODULUS 3, REMAINDER 2);
         INSERT INTO kparts SELECT g, 'k' FROM generate_series(1, 3000) g;",
    )
    .await;
    s.pg.batch_execute("INSERT INTO parts VALUES (5, 'late'), (2500, 'late'); DELETE FROM child WHERE v > 500;")
        .await
        .unwrap();
    let mut want: Vec<i64> = (100..=999).chain(2000..=6000).chain(5001..=5099).collect();
    want.sort();
    for limit in [13, 1000, 10000] {
        let rows = s.all_pages("parts", limit).await;
        let mut got = ints(&rows, "v");
        got.sort();
        assert_eq!(got, want, "parts, limit {limit}");
        assert_eq!(s.export_rows("parts").await, rows);

        let rows = s.all_pages("parent", limit).await;
        let mut got = ints(&rows, "v");
        got.sort();
        assert_eq!(got, (1..=600).collect::<Vec<i64>>(), "parent, limit {limit}");
        assert_eq!(s.export_rows("parent").await, rows);

        // Children repeat the parent's key values: read by position, not lost.
        let rows = s.all_pages("kparent", limit).await;
        let mut got = ints(&rows, "id");
        got.sort();
        assert_eq!(got, (1..=100).flat_map(|i| [i, i]).collect::<Vec<i64>>(), "kparent, limit {limit}");
        assert_eq!(s.export_rows("kparent").await, rows);

        let rows = s.all_pages("kparts", limit).await;
        assert_eq!(ints(&rows, "id"), (1..=3000).collect::<Vec<i64>>(), "kparts, limit {limit}");
        assert_eq!(s.export_rows("kparts").await, rows);
    }
}

#[track_caller]
fn assert_bad_cursor(r: Result<(Vec<Value>, Option<String>), SnapshotError>, words: &[&str]) {
    match r {
        Err(SnapshotError::BadCursor(msg)) => {
            for w in words {
                assert!(msg.contains(w), "{w:?} not in {msg:?}");
            }
        }
        other => panic!("expected a bad cursor, got {other:?}"),
    }
}

/// Cursors that are not ours, of another table, or of another key shape are refused
/// before anything is read, and the connection serves the next page (pool of 1).
#[tokio::test]
async fn bad_cursors_are_refused_and_views_only_export() {
    let mut s = snap(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g;
         CREATE TABLE u (a int, b int, PRIMARY KEY (a, b)); INSERT INTO u VALUES (1, 1), (1, 2);
         CREATE TABLE n (v int); INSERT INTO n VALUES (1), (2), (3);
         CREATE VIEW tv AS SELECT id, v FROM t WHERE id > 8;",
    )
    .await;
    s.pool = pool_for(&s.db, 1);
    let t = s.oid("t").await;
    let u = s.oid("u").await;
    let n = s.oid("n").await;
    let (_, next) = s.page("t", None, 3).await.unwrap();
    let next = next.unwrap();
    let (_, next_u) = s.page("u", None, 1).await.unwrap();
    let c = |oid: u32, key: &[&str]| Some(Cursor::new(oid, key.iter().map(|s| s.to_string()).collect()).encode());
    let cases: Vec<(&str, Option<String>, &[&str])> = vec![
        ("t", Some("".into()), &["not one"]),
        ("t", Some("!!!".into()), &["base64"]),
        ("t", Some("eyJ0IjoxfQ".into()), &["not one"]), // {"t":1}
        ("t", Some(next.clone() + "A"), &["not one"]),
        ("t", Some("bnVsbA".into()), &["not one"]), // null
        ("t", c(t, &[]), &["0 key values", "has 1"]),
        ("t", c(t, &["1", "2"]), &["2 key values"]),
        ("t", c(t, &["abc"]), &["does not fit", "integer"]),
        ("t", c(t, &["99999999999"]), &["does not fit"]),
        ("t", c(t, &["1\0"]), &[]),
        ("t", c(u, &["1"]), &["another table"]),
        ("u", Some(next.clone()), &["another table"]),
        ("t", next_u.clone(), &["another table"]),
        ("n", c(n, &["1"]), &["1 key values", "has 2"]),
        ("n", c(n, &[&t.to_string(), "(0,1)"]), &["not in"]),
        ("n", c(n, &[&n.to_string(), "(0,1"]), &["does not fit", "tid"]),
        ("n", c(n, &["x", "(0,1)"]), &["not in"]),
    ];
    for (table, cursor, words) in cases {
        assert_bad_cursor(s.page(table, cursor.clone(), 3).await, words);
    }
    let (rows, next) = s.page("t", Some(next), 3).await.unwrap();
    assert_eq!(ints(&rows, "id"), [4, 5, 6]);
    assert!(next.is_some());
    let (rows, next) = s.page("n", c(n, &[&n.to_string(), "(0,1)"]), 3).await.unwrap();
    assert_eq!(ints(&rows, "v"), [2, 3]);
    assert_eq!(next, None);

    match s.page("tv", None, 3).await {
        Err(e @ SnapshotError::NoKey { .. }) => assert!(e.to_string().contains("NDJSON export"), "{e}"),
        other => panic!("a view has no key: {other:?}"),
    }
    assert_eq!(s.export("tv").await.unwrap(), "{\"id\":9,\"v\":\"x\"}\n{\"id\":10,\"v\":\"x\"}\n");
    assert!(matches!(s.export("nope").await, Err(SnapshotError::NoSuchTable(_))));
    assert!(matches!(s.page("nope", None, 3).await, Err(SnapshotError::NoSuchTable(_))));
}

/// The plan of the keyset read of `table` after `after`.
async fn plan_of(s: &Snap, table: &str, after: Option<String>) -> String {
    let req = KeysetRequest { table: TableRef::parse(table).unwrap(), after, limit: 100 };
    explain_keyset_page(&s.pg, &s.id, &req, &Scope::default()).await.unwrap()
}

/// The last page of a million rows is found as the first is: through the primary key's
/// index, or a TID range, never a scan of all the rows before it.
#[tokio::test]
async fn the_last_page_of_a_million_rows_is_found_through_the_key() {
    let s = snap(
        "CREATE TABLE m (id int PRIMARY KEY, v int);
         INSERT INTO m SELECT g, g FROM generate_series(1, 1000000) g;
         CREATE TABLE mn (v int);
         INSERT INTO mn SELECT g FROM generate_series(1, 1000000) g;
         ANALYZE m, mn;",
    )
    .await;
    let (m, mn) = (s.oid("m").await, s.oid("mn").await);
    let last_ctid: String = s.pg.query_one("SELECT max(ctid)::text FROM mn", &[]).await.unwrap().get(0);
    let before_last: String = s.pg.query_one("SELECT ctid::text FROM mn WHERE v = 999950", &[]).await.unwrap().get(0);

    let plans = plan_of(&s, "m", Some(Cursor::new(m, vec!["999950".into()]).encode())).await;
    assert!(
        plans.contains("Index Scan using m_pkey on public.m") || plans.contains("Index Scan using m_pkey on m"),
        "{plans}"
    );
    assert!(plans.contains("Index Cond"), "{plans}");
    assert!(!plans.contains("Seq Scan") && !plans.contains("Sort"), "{plans}");

    let plans = plan_of(&s, "mn", Some(Cursor::new(mn, vec![mn.to_string(), before_last]).encode())).await;
    assert!(plans.contains("Tid Range Scan"), "{plans}");
    assert!(!plans.contains("Seq Scan"), "{plans}");
    let (rows, next) = s.page("mn", Some(Cursor::new(mn, vec![mn.to_string(), last_ctid]).encode()), 10).await.unwrap();
    assert_eq!((rows.len(), next), (0, None));

    let plans = plan_of(&s, "m", None).await;
    assert!(plans.contains("Index Scan using m_pkey on m") && !plans.contains("Sort"), "{plans}");
    let plans = plan_of(&s, "mn", None).await;
    assert!(plans.contains("Tid Range Scan") && !plans.contains("Seq Scan"), "{plans}");
}

/// An export reads the whole table as it is sent; a client that goes away cancels it.
#[tokio::test]
async fn a_dropped_export_cancels_its_query() {
    let s = snap(
        "CREATE TABLE e (v int, pad text); INSERT INTO e SELECT g, repeat('p', 100) FROM generate_series(1, 300000) g;",
    )
    .await;
    let s = Snap { pool: pool_for(&s.db, 1), ..s };
    let table = TableRef::parse("e").unwrap();
    let timeout = Duration::from_millis(500);
    // The statement timeout does not end a long export: read it slowly, past it.
    let mut body = open_export(s.pool.get().await.unwrap(), &s.id, &table, &Scope::default(), timeout).await.unwrap();
    let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    text.push_str(&collect(body).await.unwrap());
    assert_eq!(text.lines().count(), 300000);
    assert_eq!(text.lines().last(), Some(format!("{{\"v\":300000,\"pad\":\"{}\"}}", "p".repeat(100)).as_str()));

    let mut body = open_export(s.pool.get().await.unwrap(), &s.id, &table, &Scope::default(), timeout).await.unwrap();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"{\"v\":1,"), "{first:?}");
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let active: i64 = s
            .pg
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keyset-test' AND datname = current_database()", &[])
            .await
            .unwrap()
            .get(0);
        if active == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the export's backend is still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its permit came back: the pool of one serves the next read.
    let rows = s.export_rows("e").await;
    assert_eq!(rows.len(), 300000);
}

/// What `open_page` refuses, keyset pages and exports refuse too, before the first byte.
#[tokio::test]
async fn tables_changed_since_the_snapshot_are_refused() {
    let s = snap(
        "CREATE TABLE trunc (id int PRIMARY KEY); INSERT INTO trunc VALUES (1), (2);
         CREATE TABLE dropcol (id int PRIMARY KEY, gone text); INSERT INTO dropcol VALUES (1, 'a');
         CREATE TABLE renamed (v int); INSERT INTO renamed VALUES (1);
         CREATE DOMAIN small AS int CHECK (VALUE < 10);
         CREATE TABLE dom (id small PRIMARY KEY); INSERT INTO dom VALUES (1), (2), (3);",
    )
    .await;
    s.pg.batch_execute("TRUNCATE trunc; ALTER TABLE dropcol DROP COLUMN gone; ALTER TABLE renamed RENAME TO renamed2;")
        .await
        .unwrap();
    assert!(matches!(s.page("trunc", None, 10).await, Err(SnapshotError::Rewritten { .. })));
    assert!(matches!(s.export("trunc").await, Err(SnapshotError::Rewritten { .. })));
    assert!(matches!(s.page("dropcol", None, 10).await, Err(SnapshotError::ColumnsChanged { .. })));
    assert!(matches!(s.export("dropcol").await, Err(SnapshotError::ColumnsChanged { .. })));
    assert!(matches!(s.page("renamed", None, 10).await, Err(SnapshotError::Renamed { .. })));
    assert!(matches!(s.export("renamed").await, Err(SnapshotError::Renamed { .. })));
    // A value the key's domain refuses is a bad cursor too.
    let dom = s.oid("dom").await;
    assert_bad_cursor(s.page("dom", Some(Cursor::new(dom, vec!["11".into()]).encode()), 10).await, &["small"]);
    let (rows, next) = s.page("dom", Some(Cursor::new(dom, vec!["1".into()]).encode()), 10).await.unwrap();
    // A domain is encoded as a string, as wal2json encodes it.
    assert_eq!((rows, next), (vec![serde_json::json!({"id": "2"}), serde_json::json!({"id": "3"})], None));
}
