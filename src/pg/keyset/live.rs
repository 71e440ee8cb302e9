//! A table read as it is now, one keyset chunk at a time, for a live backfill: no
//! snapshot, no long transaction. Each chunk is one short read-only transaction, ordered
//! by the primary key and started after the last key of the chunk before, so a chunk
//! costs the same anywhere in the table. Rows come as text (the cursor is fetched with
//! the simple-query protocol), which the stream's value encoding takes as it takes
//! wal2json's.

use futures_util::StreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::{Key, KeyColumn, declare, display, find_key, page_sql};
use crate::pg::ident::TableRef;
use crate::pg::snapshot::{Cursor, Scope, SnapshotError, TableInfo, resolve_in_scope};

/// A table a backfill reads: what the reader's scope serves of it, its key, and the
/// names of its columns' types as wal2json prints them.
#[derive(Debug, Clone)]
pub(crate) struct LiveTable {
    pub info: TableInfo,
    key: Vec<KeyColumn>,
    /// `format_type` of each served column, in order.
    pub type_names: Vec<String>,
    /// Postgres's estimate of the table's rows (`reltuples`; -1 when never analyzed).
    pub estimate: i64,
}

impl LiveTable {
    /// Where each key column is among the served columns.
    pub fn key_at(&self) -> Vec<usize> {
        self.key.iter().map(|k| k.index).collect()
    }
}

/// Looks `t` up as `scope` serves it, and refuses what cannot be read by key: a view,
/// a foreign table, a table without a primary key (or whose key the column list leaves
/// out, or with inheritance children that may repeat its keys).
pub(crate) async fn live_table(client: &Client, t: &TableRef, scope: &Scope) -> Result<LiveTable, SnapshotError> {
    let info = resolve_in_scope(client, t, scope).await?;
    let key = match info.relkind {
        'r' | 'p' => find_key(client, &info).await?,
        'v' => return Err(SnapshotError::NoKey { table: display(&info), relation: "view" }),
        'f' => return Err(SnapshotError::NoKey { table: display(&info), relation: "foreign table" }),
        _ => return Err(SnapshotError::NoKey { table: display(&info), relation: "materialized view" }),
    };
    let Key::Columns(key) = key else {
        return Err(SnapshotError::NoPrimaryKey(display(&info)));
    };
    let names: Vec<&str> = info.columns.iter().map(|c| c.name.as_str()).collect();
    let row = client
        .query_one(
            "SELECT ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod) \
                 FROM pg_catalog.unnest($2::text[]) WITH ORDINALITY AS n(name, i) \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attname = n.name ORDER BY n.i), \
                 (SELECT c.reltuples::int8 FROM pg_catalog.pg_class c WHERE c.oid = $1)",
            &[&info.oid, &names],
        )
        .await?;
    let type_names: Vec<String> = row.try_get(0)?;
    if type_names.len() != info.columns.len() {
        return Err(SnapshotError::ColumnsChanged {
            table: display(&info),
            message: "a column was dropped or renamed while it was looked up".into(),
        });
    }
    Ok(LiveTable { info, key, type_names, estimate: row.try_get::<_, Option<i64>>(1)?.unwrap_or(-1) })
}

/// Reads the next at most `limit` rows of the table after the key `after` (from the
/// start without one), in key order, in a read-only transaction of its own, handing
/// each to `on_row` as it arrives (every served column's text, None for NULL); answers
/// how many there were.
pub(crate) async fn read_chunk(
    client: &Client,
    table: &LiveTable,
    after: Option<&[String]>,
    limit: u64,
    mut on_row: impl FnMut(&SimpleQueryRow),
) -> Result<u64, SnapshotError> {
    let cursor = after.map(|key| Cursor::new(table.info.oid, key.to_vec()));
    // page_sql asks for one more row than the limit (to tell a last page): a chunk
    // takes them all, the next chunk starts after the last.
    let (sql, values) = page_sql(&table.info, &Key::Columns(table.key.clone()), cursor.as_ref(), limit.max(1) - 1);
    let params: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    client.batch_execute("BEGIN READ ONLY").await?;
    let read = async {
        declare(client, &table.info, &sql, &params).await?;
        let rows = client.simple_query_raw(&format!("FETCH ALL FROM {}", super::CURSOR)).await?;
        let mut rows = std::pin::pin!(rows);
        let mut n = 0;
        while let Some(message) = rows.next().await {
            if let SimpleQueryMessage::Row(row) = message? {
                on_row(&row);
                n += 1;
            }
        }
        Ok::<_, SnapshotError>(n)
    }
    .await;
    client.batch_execute("ROLLBACK").await?;
    read
}
