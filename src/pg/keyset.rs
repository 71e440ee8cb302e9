//! Keyset paging and NDJSON export from an exported snapshot.
//!
//! A keyset page starts after the last row of the previous one, named by an opaque
//! cursor, instead of at an offset: Postgres finds where to start through an index (or
//! a TID range), so a page costs the same at row 10 and at row 10,000,000.
//!
//! The order is the primary key. A table without one is read by row position: per
//! relation of its tree (itself, or its partitions or inheritance children), in oid
//! order, then `ctid`, which cannot change under a snapshot (a table rewritten since is
//! refused, see `check_unchanged`). Views and foreign tables have neither: they can only
//! be exported, in whatever order they produce their rows.
//!
//! The read is the same as a v1 page's (see [`super::snapshot`]): its own transaction
//! on the snapshot, the catalog as of the snapshot, rows as text through the
//! simple-query protocol, encoded as the stream encodes them and streamed. The cursor's
//! values reach SQL only as bind parameters: the SELECT is opened as a cursor
//! (`DECLARE`, extended protocol, parameters bound) and its rows fetched with a simple
//! query (`FETCH ALL`), which returns them as text.

use std::time::Duration;

pub(crate) mod live;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryStream};

use super::ident::{TableRef, is_valid_snapshot_id, quote_ident};
use super::pool::PooledClient;
pub use super::snapshot::Cursor;
use super::snapshot::{
    Framing, KeysetFraming, PageBody, Scope, SnapshotError, TableInfo, abandon, begin_read, check_unchanged, describe,
    first_rows, resolve_in_scope,
};

/// What to read: the page of `table` after the cursor `after` (from the start without
/// one), at most `limit` rows (0 is read as 1; the HTTP layer sets the real bound).
#[derive(Debug, Clone)]
pub struct KeysetRequest {
    pub table: TableRef,
    pub after: Option<String>,
    pub limit: u64,
}

/// How rows are ordered and pages found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// The primary key's columns.
    Columns(Vec<KeyColumn>),
    /// No primary key: the relations that hold the rows, in oid order, then `ctid`.
    Position(Vec<Relation>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyColumn {
    /// The column's position in the table's (and the SELECT's) columns.
    index: usize,
    /// Quoted.
    name: String,
    /// The column type's name, schema-qualified and quoted, to cast the cursor to.
    type_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Relation {
    oid: u32,
    /// Schema-qualified and quoted.
    name: String,
}

/// The cursor both queries declare; one per transaction, and each read has its own.
const CURSOR: &str = "pgdeltastream_read";

/// Starts reading one keyset page of `req.table`:
/// `{"rows":[{...},...],"next":"CURSOR"}`, `"next":null` after the last page. Refuses
/// what `open_page` refuses, before the first byte, and a cursor that is not one of
/// ours or not for this table ([`SnapshotError::BadCursor`]), and views and foreign
/// tables ([`SnapshotError::NoKey`]). `statement_timeout` covers the whole read.
pub async fn open_keyset_page(
    conn: PooledClient,
    snapshot_id: &str,
    req: &KeysetRequest,
    scope: &Scope,
    statement_timeout: Duration,
) -> Result<PageBody, SnapshotError> {
    let after = match req.after.as_deref().map(Cursor::decode).transpose() {
        Ok(after) => after,
        Err(e) => {
            conn.release();
            return Err(e);
        }
    };
    if !is_valid_snapshot_id(snapshot_id) {
        conn.release();
        return Err(SnapshotError::SnapshotGone(format!("malformed snapshot id {snapshot_id:?}")));
    }
    let limit = page_limit(req.limit);
    match start_keyset(&conn, snapshot_id, &req.table, scope, after.as_ref(), limit, statement_timeout).await {
        Ok((table, key, rows)) => {
            let framing =
                KeysetFraming { limit, oid: table.oid, key_at: key_at(&table, &key), last: vec![], more: false };
            first_rows(conn, &table, rows, Framing::Keyset(framing)).await
        }
        Err(e) => Err(abandon(conn, e).await),
    }
}

async fn start_keyset(
    client: &Client,
    snapshot_id: &str,
    table: &TableRef,
    scope: &Scope,
    after: Option<&Cursor>,
    limit: u64,
    statement_timeout: Duration,
) -> Result<(TableInfo, Key, SimpleQueryStream), SnapshotError> {
    let (table, key, sql, values) =
        prepare_keyset(client, snapshot_id, table, scope, after, limit, statement_timeout).await?;
    let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    declare(client, &table, &sql, &params).await?;
    let rows = client.simple_query_raw(&format!("FETCH ALL FROM {CURSOR}")).await?;
    Ok((table, key, rows))
}

/// Opens the transaction, checks the table and the cursor; answers the page's SELECT
/// and its parameters.
async fn prepare_keyset(
    client: &Client,
    snapshot_id: &str,
    table: &TableRef,
    scope: &Scope,
    after: Option<&Cursor>,
    limit: u64,
    statement_timeout: Duration,
) -> Result<(TableInfo, Key, String, Vec<String>), SnapshotError> {
    begin_read(client, snapshot_id, statement_timeout).await?;
    let table = resolve_in_scope(client, table, scope).await?;
    check_unchanged(client, &table).await?;
    let key = find_key(client, &table).await?;
    if let Some(c) = after {
        check_cursor(client, &table, &key, c).await?;
    }
    let (sql, values) = page_sql(&table, &key, after, limit);
    Ok((table, key, sql, values))
}

/// The plan Postgres makes for the page `req` asks for (`EXPLAIN` of its query, with
/// the same parameters), for an operator wondering why a page is slow, and for tests.
/// Takes a connection outside any transaction and leaves it so.
pub async fn explain_keyset_page(
    client: &Client,
    snapshot_id: &str,
    req: &KeysetRequest,
    scope: &Scope,
) -> Result<String, SnapshotError> {
    let after = req.after.as_deref().map(Cursor::decode).transpose()?;
    if !is_valid_snapshot_id(snapshot_id) {
        return Err(SnapshotError::SnapshotGone(format!("malformed snapshot id {snapshot_id:?}")));
    }
    let plan = async {
        let (_, _, sql, values) = prepare_keyset(
            client,
            snapshot_id,
            &req.table,
            scope,
            after.as_ref(),
            page_limit(req.limit),
            Duration::ZERO,
        )
        .await?;
        let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = client.query(&format!("EXPLAIN DECLARE {CURSOR} NO SCROLL CURSOR FOR {sql}"), &params).await?;
        let lines = rows.iter().map(|r| r.try_get::<_, String>(0)).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, SnapshotError>(lines.join("\n"))
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    plan
}

/// Starts reading all of `table` as NDJSON: one JSON object per row, each followed by
/// `\n`, in the order of the keyset pages (their concatenation), or as they come for
/// views and foreign tables. Refuses what `open_page` refuses, before the first byte.
///
/// `statement_timeout` covers waiting for the table's lock and the checks, not the
/// read: a whole table can take long to send. A client that goes away still ends it,
/// since dropping the body cancels the query; one that stays but stops reading holds
/// the connection until the HTTP layer gives up on it.
pub async fn open_export(
    conn: PooledClient,
    snapshot_id: &str,
    table: &TableRef,
    scope: &Scope,
    statement_timeout: Duration,
) -> Result<PageBody, SnapshotError> {
    if !is_valid_snapshot_id(snapshot_id) {
        conn.release();
        return Err(SnapshotError::SnapshotGone(format!("malformed snapshot id {snapshot_id:?}")));
    }
    match start_export(&conn, snapshot_id, table, scope, statement_timeout).await {
        Ok((table, rows)) => first_rows(conn, &table, rows, Framing::Ndjson).await,
        Err(e) => Err(abandon(conn, e).await),
    }
}

async fn start_export(
    client: &Client,
    snapshot_id: &str,
    table: &TableRef,
    scope: &Scope,
    statement_timeout: Duration,
) -> Result<(TableInfo, SimpleQueryStream), SnapshotError> {
    begin_read(client, snapshot_id, statement_timeout).await?;
    let table = resolve_in_scope(client, table, scope).await?;
    check_unchanged(client, &table).await?;
    let key = match find_key(client, &table).await {
        Ok(key) => Some(key),
        Err(SnapshotError::NoKey { .. }) => None,
        Err(e) => return Err(e),
    };
    declare(client, &table, &export_sql(&table, key.as_ref()), &[]).await?;
    client.batch_execute("SET LOCAL statement_timeout = 0").await?;
    let rows = client.simple_query_raw(&format!("FETCH ALL FROM {CURSOR}")).await?;
    Ok((table, rows))
}

/// Opens the read's cursor. Planning it is where a column dropped or renamed since the
/// snapshot shows.
async fn declare(
    client: &Client,
    table: &TableInfo,
    select: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<(), SnapshotError> {
    let sql = format!("DECLARE {CURSOR} NO SCROLL CURSOR FOR {select}");
    match client.execute(&sql, params).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) => {
            Err(SnapshotError::ColumnsChanged { table: display(table), message: describe(&e) })
        }
        Err(e) => Err(e.into()),
    }
}

fn display(table: &TableInfo) -> String {
    format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name))
}

/// The table's key as the snapshot has it. The primary key of a table with inheritance
/// children only holds in the table itself (children may repeat its values), so such
/// a tree is read by position.
async fn find_key(client: &Client, table: &TableInfo) -> Result<Key, SnapshotError> {
    let inherited = table.relkind == 'r'
        && client
            .query_one("SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits WHERE inhparent = $1)", &[&table.oid])
            .await?
            .try_get::<_, bool>(0)?;
    // A key the reader's column list leaves out cannot be the order: the cursor would
    // carry its values. The row position serves instead, and reveals no value.
    let served = table.primary_key.iter().all(|k| table.columns.iter().any(|c| &c.name == k));
    if !table.primary_key.is_empty() && !inherited && served {
        let mut columns = Vec::with_capacity(table.primary_key.len());
        for name in &table.primary_key {
            let index = table.columns.iter().position(|c| &c.name == name).ok_or_else(|| {
                SnapshotError::ColumnsChanged { table: display(table), message: format!("key column {name:?} is gone") }
            })?;
            let row = client
                .query_one(
                    "SELECT n.nspname::text, t.typname::text FROM pg_catalog.pg_type t \
                     JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = $1",
                    &[&table.columns[index].type_oid],
                )
                .await?;
            let type_name = format!(
                "{}.{}",
                quote_ident(&row.try_get::<_, String>(0)?),
                quote_ident(&row.try_get::<_, String>(1)?)
            );
            columns.push(KeyColumn { index, name: quote_ident(name), type_name });
        }
        return Ok(Key::Columns(columns));
    }
    let relation = match table.relkind {
        'v' => "view",
        'f' => "foreign table",
        _ => return position_key(client, table).await,
    };
    Err(SnapshotError::NoKey { table: display(table), relation })
}

/// The relations of the table's tree that hold rows, as of the snapshot.
async fn position_key(client: &Client, table: &TableInfo) -> Result<Key, SnapshotError> {
    let rows = client
        .query(
            "WITH RECURSIVE tree(relid) AS ( \
                 SELECT $1::pg_catalog.oid \
                 UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.relid) \
             SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text FROM tree \
             JOIN pg_catalog.pg_class c ON c.oid = tree.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind <> 'p' ORDER BY c.oid",
            &[&table.oid],
        )
        .await?;
    let mut relations = Vec::with_capacity(rows.len());
    for row in rows {
        let (schema, name, relkind): (String, String, String) = (row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        let name = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        if relkind == "f" {
            // Its rows have no position either, and leaving them out would lose them.
            return Err(SnapshotError::NoKey {
                table: format!("{} (through {name})", display(table)),
                relation: "foreign table",
            });
        }
        relations.push(Relation { oid: row.try_get(0)?, name });
    }
    Ok(Key::Position(relations))
}

/// The cursor's values, checked against the key: the right table, as many values as
/// the key has columns, each a valid value of its column's type.
async fn check_cursor(client: &Client, table: &TableInfo, key: &Key, c: &Cursor) -> Result<(), SnapshotError> {
    let bad = |why: String| SnapshotError::BadCursor(why);
    if c.oid != table.oid {
        return Err(bad(format!("it is for another table than {}", display(table))));
    }
    let types: Vec<&str> = match key {
        Key::Columns(columns) => columns.iter().map(|k| k.type_name.as_str()).collect(),
        Key::Position(relations) => {
            let of_table =
                c.key.first().and_then(|o| o.parse::<u32>().ok()).is_some_and(|o| relations.iter().any(|r| r.oid == o));
            if c.key.len() == 2 && !of_table {
                return Err(bad(format!("its row is not in {}", display(table))));
            }
            vec!["pg_catalog.oid", "pg_catalog.tid"]
        }
    };
    if c.key.len() != types.len() {
        return Err(bad(format!("it has {} key values, {} has {}", c.key.len(), display(table), types.len())));
    }
    let casts: Vec<String> =
        types.iter().enumerate().map(|(i, t)| format!("${}::pg_catalog.text::{t}", i + 1)).collect();
    let params: Vec<&(dyn ToSql + Sync)> = c.key.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    match client.execute(&format!("SELECT {}", casts.join(", ")), &params).await {
        Ok(_) => Ok(()),
        // Class 22, data exception: a value its type does not take; class 23: one its
        // domain's constraints refuse.
        Err(e) if e.code().is_some_and(|s| ["22", "23"].iter().any(|c| s.code().starts_with(c))) => {
            Err(bad(format!("a key value does not fit {}: {}", display(table), describe(&e))))
        }
        Err(e) => Err(e.into()),
    }
}

/// At least one row (a page of none would have no row to continue after), and one row
/// more must still fit Postgres's LIMIT, a bigint.
fn page_limit(limit: u64) -> u64 {
    limit.clamp(1, i64::MAX as u64 - 1)
}

/// Where the page's SELECT puts each key value.
fn key_at(table: &TableInfo, key: &Key) -> Vec<usize> {
    match key {
        Key::Columns(columns) => columns.iter().map(|k| k.index).collect(),
        Key::Position(_) => vec![table.columns.len(), table.columns.len() + 1],
    }
}

fn column_list(table: &TableInfo, extra: &[&str]) -> String {
    let mut columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    columns.extend(extra.iter().map(|s| s.to_string()));
    columns.join(", ")
}

/// The page's SELECT: `limit + 1` rows after the cursor, or from the start, and its
/// parameters (the cursor's values, as text). Only catalog names (quoted) and integers
/// go in the SQL; the cursor is checked by `check_cursor`.
fn page_sql(table: &TableInfo, key: &Key, after: Option<&Cursor>, limit: u64) -> (String, Vec<String>) {
    let take = limit.saturating_add(1);
    match key {
        Key::Columns(columns) => {
            let names: Vec<&str> = columns.iter().map(|k| k.name.as_str()).collect();
            let mut sql = format!("SELECT {} FROM {}", column_list(table, &[]), display(table));
            let mut conditions: Vec<String> = table.row_filter.iter().map(|f| format!("({f})")).collect();
            if after.is_some() {
                let values: Vec<String> = columns
                    .iter()
                    .enumerate()
                    .map(|(i, k)| format!("${}::pg_catalog.text::{}", i + 1, k.type_name))
                    .collect();
                // A row comparison, which a btree index takes as a start position.
                conditions.push(format!("({}) > ({})", names.join(", "), values.join(", ")));
            }
            if !conditions.is_empty() {
                sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
            }
            sql.push_str(&format!(" ORDER BY {} LIMIT {take}", names.join(", ")));
            (sql, after.map(|c| c.key.clone()).unwrap_or_default())
        }
        Key::Position(relations) => {
            let oid = after.and_then(|c| c.key.first()).and_then(|o| o.parse::<u32>().ok());
            let ctid = after.and_then(|c| c.key.get(1)).cloned();
            (position_page_sql(table, relations, oid, take), ctid.into_iter().collect())
        }
    }
}

/// For each relation from the cursor's on, its next `take` rows (in the cursor's
/// relation, those after its `ctid`, bound as `$1`): a TID range scan finds the first
/// `take` rows after the start in the relation's physical order, and the page is the
/// rows up to the last of them, sorted. No scan goes further than `take` rows, and the
/// result does not depend on the order the first scan happens to return rows in.
/// Relations after the cursor's are only read while the page is not full.
fn position_page_sql(table: &TableInfo, relations: &[Relation], after: Option<u32>, take: u64) -> String {
    let columns = column_list(table, &["tableoid", "ctid"]);
    // The filter counts in the bound too: `take` rows it keeps, not `take` rows.
    let filter = table.row_filter.as_ref().map(|f| format!(" AND ({f})")).unwrap_or_default();
    let branches: Vec<String> = relations
        .iter()
        .filter(|r| after.is_none_or(|oid| r.oid >= oid))
        .map(|r| {
            // Offsets start at 1: (0,0) is before every row.
            let start = match after == Some(r.oid) {
                true => "$1::pg_catalog.text::pg_catalog.tid",
                false => "'(0,0)'::pg_catalog.tid",
            };
            format!(
                "(SELECT {columns} FROM ONLY {name} WHERE ctid > {start}{filter} AND ctid <= \
                 (SELECT pg_catalog.max(ctid) FROM (SELECT ctid FROM ONLY {name} WHERE ctid > {start}{filter} \
                 LIMIT {take}) p) ORDER BY ctid LIMIT {take})",
                name = r.name
            )
        })
        .collect();
    if branches.is_empty() {
        return format!("SELECT {columns} FROM {} WHERE false", display(table));
    }
    if branches.len() == 1 && after.is_some() {
        return branches.concat();
    }
    let n = table.columns.len();
    format!("SELECT * FROM ({}) page ORDER BY {}, {} LIMIT {take}", branches.join(" UNION ALL "), n + 1, n + 2)
}

/// The export's SELECT: every row, in the pages' order.
fn export_sql(table: &TableInfo, key: Option<&Key>) -> String {
    let mut sql = format!("SELECT {} FROM {}", column_list(table, &[]), display(table));
    if let Some(filter) = &table.row_filter {
        sql.push_str(&format!(" WHERE ({filter})"));
    }
    match key {
        Some(Key::Columns(columns)) => {
            let names: Vec<&str> = columns.iter().map(|k| k.name.as_str()).collect();
            sql.push_str(&format!(" ORDER BY {}", names.join(", ")));
        }
        Some(Key::Position(_)) => sql.push_str(" ORDER BY tableoid, ctid"),
        None => {}
    }
    sql
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;

    use super::*;
    use crate::pg::snapshot::Column;

    fn table(columns: &[&str], pk: &[&str], relkind: char) -> TableInfo {
        TableInfo {
            oid: 42,
            schema: "public".into(),
            name: "T t".into(),
            relkind,
            columns: columns.iter().map(|c| Column { name: c.to_string(), type_oid: 23 }).collect(),
            primary_key: pk.iter().map(|s| s.to_string()).collect(),
            row_filter: None,
        }
    }

    fn key_columns(names: &[(&str, usize)]) -> Key {
        Key::Columns(
            names
                .iter()
                .map(|(n, i)| KeyColumn {
                    index: *i,
                    name: quote_ident(n),
                    type_name: "\"pg_catalog\".\"int4\"".into(),
                })
                .collect(),
        )
    }

    proptest! {
        #[test]
        fn cursors_round_trip(oid in any::<u32>(), key in proptest::collection::vec(any::<String>(), 0..4)) {
            let c = Cursor::new(oid, key);
            let s = c.encode();
            prop_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{s}");
            prop_assert_eq!(Cursor::decode(&s).unwrap(), c);
        }

        #[test]
        fn garbage_is_a_bad_cursor(s in any::<String>()) {
            match Cursor::decode(&s) {
                Ok(c) => prop_assert_eq!(c.encode(), s),
                Err(e) => prop_assert!(matches!(e, SnapshotError::BadCursor(_))),
            }
        }

        #[test]
        fn garbage_json_is_a_bad_cursor(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = URL_SAFE_NO_PAD.encode(&bytes);
            if let Err(e) = Cursor::decode(&s) {
                prop_assert!(matches!(e, SnapshotError::BadCursor(_)));
            }
        }
    }

    #[test]
    fn cursors_of_another_shape_are_refused() {
        for json in [r#"{"t":1}"#, r#"{"t":-1,"k":[]}"#, r#"{"t":1,"k":[1]}"#, r#"{"t":1,"k":[],"x":0}"#, "null", ""] {
            assert!(
                matches!(Cursor::decode(&URL_SAFE_NO_PAD.encode(json)), Err(SnapshotError::BadCursor(_))),
                "{json}"
            );
        }
        assert_eq!(Cursor::decode("eyJ0IjoxLCJrIjpbImEiXX0").unwrap(), Cursor::new(1, vec!["a".into()]));
    }

    #[test]
    fn primary_key_pages_compare_rows_and_bind_the_cursor() {
        let t = table(&["a", "B", "v"], &["a", "B"], 'r');
        let key = key_columns(&[("a", 0), ("B", 1)]);
        let (sql, params) = page_sql(&t, &key, None, 10);
        assert_eq!(sql, r#"SELECT "a", "B", "v" FROM "public"."T t" ORDER BY "a", "B" LIMIT 11"#);
        assert!(params.is_empty());
        let after = Cursor::new(42, vec!["1'; DROP TABLE x --".into(), "2".into()]);
        let (sql, params) = page_sql(&t, &key, Some(&after), 10);
        assert_eq!(
            sql,
            r#"SELECT "a", "B", "v" FROM "public"."T t" WHERE ("a", "B") > ($1::pg_catalog.text::"pg_catalog"."int4", $2::pg_catalog.text::"pg_catalog"."int4") ORDER BY "a", "B" LIMIT 11"#
        );
        assert_eq!(params, after.key);
        assert_eq!(key_at(&t, &key), [0, 1]);
        assert_eq!((page_limit(0), page_limit(7)), (1, 7));
        assert!(page_sql(&t, &key, None, page_limit(u64::MAX)).0.ends_with(&format!("LIMIT {}", i64::MAX)));
    }

    #[test]
    fn position_pages_start_at_the_cursors_relation() {
        let t = table(&["v"], &[], 'p');
        let key = Key::Position(vec![
            Relation { oid: 10, name: "\"public\".\"p1\"".into() },
            Relation { oid: 20, name: "\"public\".\"p2\"".into() },
            Relation { oid: 30, name: "\"public\".\"p3\"".into() },
        ]);
        assert_eq!(key_at(&t, &key), [1, 2]);
        let (sql, params) = page_sql(&t, &key, None, 4);
        assert!(params.is_empty());
        assert_eq!(sql.matches("UNION ALL").count(), 2, "{sql}");
        assert!(!sql.contains('$'), "{sql}");
        assert!(sql.starts_with("SELECT * FROM ((SELECT \"v\", tableoid, ctid FROM ONLY \"public\".\"p1\" WHERE ctid > '(0,0)'::pg_catalog.tid AND ctid <= (SELECT pg_catalog.max(ctid) FROM (SELECT ctid FROM ONLY \"public\".\"p1\" WHERE ctid > '(0,0)'::pg_catalog.tid LIMIT 5) p) ORDER BY ctid LIMIT 5)"), "{sql}");
        assert!(sql.ends_with(") page ORDER BY 2, 3 LIMIT 5"), "{sql}");

        let (sql, params) = page_sql(&t, &key, Some(&Cursor::new(42, vec!["20".into(), "(3,4)".into()])), 4);
        assert_eq!(params, ["(3,4)"]);
        assert!(!sql.contains("p1"), "{sql}");
        assert_eq!(sql.matches("$1::pg_catalog.text::pg_catalog.tid").count(), 2, "{sql}");
        assert_eq!(sql.matches("FROM ONLY \"public\".\"p3\" WHERE ctid > '(0,0)'").count(), 2, "{sql}");

        // The last relation alone needs no union.
        let (sql, _) = page_sql(&t, &key, Some(&Cursor::new(42, vec!["30".into(), "(3,4)".into()])), 4);
        assert!(sql.starts_with("(SELECT \"v\", tableoid, ctid FROM ONLY \"public\".\"p3\" WHERE ctid > $1"), "{sql}");
        assert!(page_sql(&t, &Key::Position(vec![]), None, 4).0.ends_with("WHERE false"));
    }

    #[test]
    fn a_row_filter_narrows_pages_bounds_and_exports() {
        let mut t = table(&["a", "v"], &["a"], 'r');
        t.row_filter = Some("(v > 1)".into());
        let key = key_columns(&[("a", 0)]);
        let (sql, _) = page_sql(&t, &key, None, 10);
        assert_eq!(sql, r#"SELECT "a", "v" FROM "public"."T t" WHERE ((v > 1)) ORDER BY "a" LIMIT 11"#);
        let (sql, _) = page_sql(&t, &key, Some(&Cursor::new(42, vec!["3".into()])), 10);
        assert!(sql.contains(r#"WHERE ((v > 1)) AND ("a") > ($1::pg_catalog.text::"pg_catalog"."int4")"#), "{sql}");
        let relations = Key::Position(vec![Relation { oid: 10, name: "\"public\".\"p1\"".into() }]);
        let (sql, _) = page_sql(&t, &relations, None, 4);
        // The bound counts only rows the filter keeps, or a page could end short of
        // `limit` and look like the last.
        assert_eq!(sql.matches("AND ((v > 1))").count(), 2, "{sql}");
        assert_eq!(export_sql(&t, Some(&key)), r#"SELECT "a", "v" FROM "public"."T t" WHERE ((v > 1)) ORDER BY "a""#);
    }

    #[test]
    fn exports_follow_the_pages_order() {
        let t = table(&["a", "v"], &["a"], 'r');
        assert_eq!(
            export_sql(&t, Some(&key_columns(&[("a", 0)]))),
            r#"SELECT "a", "v" FROM "public"."T t" ORDER BY "a""#
        );
        assert!(export_sql(&t, Some(&Key::Position(vec![]))).ends_with("ORDER BY tableoid, ctid"));
        assert_eq!(export_sql(&t, None), r#"SELECT "a", "v" FROM "public"."T t""#);
        assert_eq!(export_sql(&table(&[], &[], 'r'), None), r#"SELECT  FROM "public"."T t""#);
    }
}
