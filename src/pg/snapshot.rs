//! Reading table pages from an exported snapshot.
//!
//! Every read runs on a pooled connection in its own transaction that imports the
//! session's snapshot (`SET TRANSACTION SNAPSHOT`), so reads are independent of each
//! other and of the stream: a failed read rolls back its own transaction and nothing
//! else. The table is resolved through the catalog *as of the snapshot*, with the
//! user's text passed only as query parameters; the SELECT names the catalog's own
//! identifiers, quoted.
//!
//! Rows come back through the simple-query protocol, which returns each value as its
//! type's text output, the very text wal2json starts from; [`crate::types::value`]
//! then encodes it the way wal2json does, so a snapshot row equals the stream's
//! `columnvalues` of the same row.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::ident::{TableRef, quote_ident, quote_literal};
use crate::types::value::{write_json_string, write_value};

/// Schemas that are never served: they hold the catalog and its secrets.
const SYSTEM_SCHEMAS: &[&str] = &["pg_catalog", "information_schema"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A table (or view, materialized view, foreign or partitioned table) as the snapshot sees it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub relkind: char,
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Asc,
    Desc,
}

/// What to read: the page, in which order.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub table: TableRef,
    pub offset: u64,
    pub limit: u64,
    pub order_by: Option<(String, Direction)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("table {0} does not exist in the snapshot")]
    NoSuchTable(String),
    #[error("table {0} is in a system schema; only user tables are served")]
    SystemTable(String),
    #[error("column {column:?} does not exist in table {table}")]
    NoSuchColumn { table: String, column: String },
    #[error("the snapshot is no longer valid: {0}")]
    SnapshotGone(String),
    #[error("{}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// The server's message with its detail and hint, or the client error's text.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" Hint: {h}"));
            }
            s
        }
        // "error connecting to server" alone says little: add the cause.
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Reads one page of `req.table` as a JSON array of objects, keys in column order.
pub async fn read_page(client: &Client, snapshot_id: &str, req: &PageRequest) -> Result<String, SnapshotError> {
    if !super::ident::is_valid_snapshot_id(snapshot_id) {
        return Err(SnapshotError::SnapshotGone(format!("malformed snapshot id {snapshot_id:?}")));
    }
    // The snapshot id cannot be a bind parameter; it is checked above and quoted.
    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(snapshot_id)
    );
    if let Err(e) = client.batch_execute(&begin).await {
        let _ = client.batch_execute("ROLLBACK").await;
        // 22023 invalid_parameter_value: "invalid snapshot identifier" — the exporting
        // transaction is gone.
        return Err(match e.code().map(|c| c.code()) {
            Some("22023") => SnapshotError::SnapshotGone(describe(&e)),
            _ => SnapshotError::Db(e),
        });
    }
    let result = read_in_transaction(client, req).await;
    // Read-only: ROLLBACK and COMMIT are the same; ROLLBACK also ends an aborted one.
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => result,
        Err(e) => result.and(Err(SnapshotError::Db(e))),
    }
}

async fn read_in_transaction(client: &Client, req: &PageRequest) -> Result<String, SnapshotError> {
    let table = resolve_table(client, &req.table).await?;
    let sql = select_sql(&table, req)?;
    let messages = client.simple_query(&sql).await?;
    let mut out = String::with_capacity(256);
    out.push('[');
    let mut first = true;
    for m in &messages {
        let SimpleQueryMessage::Row(row) = m else { continue };
        if !first {
            out.push(',');
        }
        first = false;
        out.push('{');
        for (i, col) in table.columns.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_json_string(&mut out, &col.name);
            out.push(':');
            write_value(&mut out, col.type_oid, row.get(i));
        }
        out.push('}');
    }
    out.push(']');
    Ok(out)
}

/// Looks the table up in the catalog (as of the snapshot), honouring search_path for
/// unqualified names.
pub async fn resolve_table(client: &Client, t: &TableRef) -> Result<TableInfo, SnapshotError> {
    let display = t.to_string();
    if let Some(s) = &t.schema {
        if SYSTEM_SCHEMAS.contains(&s.as_str()) || s.starts_with("pg_toast") {
            return Err(SnapshotError::SystemTable(display));
        }
    }
    const FROM: &str = "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relname = $1";
    let row = match &t.schema {
        Some(schema) => {
            let sql =
                format!("SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text {FROM} AND n.nspname = $2");
            client.query_opt(&sql, &[&t.name, schema]).await?
        }
        None => {
            let sql = format!(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text {FROM} \
                 AND n.nspname = ANY (pg_catalog.current_schemas(false)) \
                 ORDER BY pg_catalog.array_position(pg_catalog.current_schemas(false), n.nspname) LIMIT 1"
            );
            client.query_opt(&sql, &[&t.name]).await?
        }
    };
    let Some(row) = row else {
        return Err(SnapshotError::NoSuchTable(display));
    };
    let oid: u32 = row.try_get(0)?;
    let schema: String = row.try_get(1)?;
    let name: String = row.try_get(2)?;
    let relkind: String = row.try_get(3)?;
    if SYSTEM_SCHEMAS.contains(&schema.as_str()) || schema.starts_with("pg_toast") {
        return Err(SnapshotError::SystemTable(display));
    }
    let columns = client
        .query(
            "SELECT a.attname::text, a.atttypid FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| Ok(Column { name: r.try_get(0)?, type_oid: r.try_get(1)? }))
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let primary_key = client
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary \
             ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()?;
    Ok(TableInfo { schema, name, relkind: relkind.chars().next().unwrap_or('r'), columns, primary_key })
}

/// The page's SELECT. Only catalog names (quoted) and integers we produced go in.
pub fn select_sql(table: &TableInfo, req: &PageRequest) -> Result<String, SnapshotError> {
    let columns: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let mut order: Vec<String> = Vec::new();
    if let Some((wanted, dir)) = &req.order_by {
        let col = table
            .columns
            .iter()
            .find(|c| &c.name == wanted)
            .or_else(|| table.columns.iter().find(|c| c.name == wanted.to_lowercase()))
            .ok_or_else(|| SnapshotError::NoSuchColumn {
                table: format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name)),
                column: wanted.clone(),
            })?;
        let dir = match dir {
            Direction::Asc => "ASC",
            Direction::Desc => "DESC",
        };
        order.push(format!("{} {dir}", quote_ident(&col.name)));
    }
    // The default order, and the tie-breaker after a user's column, so that pages
    // never overlap or skip rows: the primary key, else the physical row position,
    // which cannot change under a snapshot.
    if !table.primary_key.is_empty() {
        order.extend(table.primary_key.iter().map(|c| quote_ident(c)));
    } else {
        match table.relkind {
            'r' | 'm' => order.push("ctid".into()),
            'p' => order.extend(["tableoid".to_owned(), "ctid".to_owned()]),
            // Views and foreign tables have no row position: order by every column.
            _ => order.extend((1..=table.columns.len()).map(|i| i.to_string())),
        }
    }
    let mut sql = format!(
        "SELECT {} FROM {}.{}",
        if columns.is_empty() { "".to_owned() } else { columns.join(", ") },
        quote_ident(&table.schema),
        quote_ident(&table.name)
    );
    if !order.is_empty() {
        sql.push_str(" ORDER BY ");
        sql.push_str(&order.join(", "));
    }
    sql.push_str(&format!(" OFFSET {} LIMIT {}", req.offset, req.limit));
    Ok(sql)
}

/// Imports an exported snapshot into a new REPEATABLE READ, READ ONLY transaction on
/// `client` and re-exports it. While that transaction stays open the snapshot stays
/// importable, whatever happens to the replication connection that first exported it.
pub async fn hold_snapshot(client: &Client, exported: &str) -> Result<String, tokio_postgres::Error> {
    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote_literal(exported)
    );
    client.batch_execute(&begin).await?;
    let row = client.query_one("SELECT pg_catalog.pg_export_snapshot()", &[]).await?;
    row.try_get(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pk: &[&str], relkind: char) -> TableInfo {
        TableInfo {
            schema: "public".into(),
            name: "t".into(),
            relkind,
            columns: vec![Column { name: "id".into(), type_oid: 23 }, Column { name: "Name".into(), type_oid: 25 }],
            primary_key: pk.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn req(order_by: Option<(&str, Direction)>) -> PageRequest {
        PageRequest {
            table: TableRef::parse("t").unwrap(),
            offset: 10,
            limit: 5,
            order_by: order_by.map(|(c, d)| (c.to_owned(), d)),
        }
    }

    #[test]
    fn default_order_is_the_primary_key() {
        assert_eq!(
            select_sql(&table(&["id"], 'r'), &req(None)).unwrap(),
            r#"SELECT "id", "Name" FROM "public"."t" ORDER BY "id" OFFSET 10 LIMIT 5"#
        );
    }

    #[test]
    fn without_primary_key_the_order_is_physical() {
        assert!(select_sql(&table(&[], 'r'), &req(None)).unwrap().contains("ORDER BY ctid"));
        assert!(select_sql(&table(&[], 'p'), &req(None)).unwrap().contains("ORDER BY tableoid, ctid"));
        assert!(select_sql(&table(&[], 'v'), &req(None)).unwrap().contains("ORDER BY 1, 2"));
    }

    #[test]
    fn order_by_column_then_key() {
        assert_eq!(
            select_sql(&table(&["id"], 'r'), &req(Some(("Name", Direction::Desc)))).unwrap(),
            r#"SELECT "id", "Name" FROM "public"."t" ORDER BY "Name" DESC, "id" OFFSET 10 LIMIT 5"#
        );
        // Unquoted folding: ID finds id.
        assert!(
            select_sql(&table(&["id"], 'r'), &req(Some(("ID", Direction::Asc))))
                .unwrap()
                .contains("ORDER BY \"id\" ASC")
        );
        assert!(matches!(
            select_sql(&table(&["id"], 'r'), &req(Some(("id; drop table t", Direction::Asc)))),
            Err(SnapshotError::NoSuchColumn { .. })
        ));
    }
}
