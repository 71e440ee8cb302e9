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
//! `columnvalues` of the same row. They are encoded and sent as they arrive: a page is
//! never whole in memory, and Postgres only sends as fast as the client reads.
//!
//! The same reads serve [`super::keyset`]'s pages and exports, framed differently
//! (see `Framing`).
//!
//! Before reading, the table is locked and checked against the snapshot (see
//! `check_unchanged`): a table rewritten, renamed or dropped since would otherwise
//! read as empty, or fail with a confusing error.

use std::pin::Pin;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow, SimpleQueryStream};

use super::ident::{TableRef, quote_ident, quote_literal};
use super::pool::PooledClient;
use crate::types::value::{Mode, write_string, write_value};

/// Schemas that are never served: they hold the catalog and its secrets.
const SYSTEM_SCHEMAS: &[&str] = &["pg_catalog", "information_schema"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A table (or view, materialized view, foreign or partitioned table) as the snapshot sees it.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub relkind: char,
    /// The columns served: all of them, or those of the reader's column list.
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    /// The rows served: those of the reader's row filter, as Postgres prints it.
    pub row_filter: Option<String>,
}

/// What of a snapshot one reader may see: a session's tables, and of each the rows and
/// columns its publication streams. The default is every table.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// (schema, table), the table None for every relation of the schema; None: every one.
    pub tables: Option<Vec<(String, Option<String>)>>,
    /// Schemas never served, whatever `tables` says: pgdeltastream's own.
    pub hidden_schemas: Vec<String>,
    /// The publication whose row filters and column lists apply, and the (schema,
    /// table) pairs that have one: only they are looked up (Postgres 15 and later).
    pub narrowed: Option<(String, Vec<(String, String)>)>,
    /// A table in a system schema is answered as one that does not exist, like every
    /// other table outside the scope (v1 refuses it with 403 instead).
    pub system_unknown: bool,
    /// The tables the snapshot serves when fewer than `tables` (a session's tables
    /// changed since it was exported, None inside: every table): one admitted by
    /// `tables` but not by these is [`SnapshotError::AddedSince`].
    pub exported: Option<Tables>,
}

/// (schema, table) pairs, the table None for every relation of the schema; None: every one.
pub type Tables = Option<Vec<(String, Option<String>)>>;

impl Scope {
    fn admits(&self, schema: &str, name: &str) -> bool {
        !self.hidden_schemas.iter().any(|h| h == schema) && lists(self.tables.as_ref(), schema, name)
    }

    /// Admitted, and in the snapshot's tables.
    fn exported(&self, schema: &str, name: &str) -> bool {
        self.exported.as_ref().is_none_or(|tables| lists(tables.as_ref(), schema, name))
    }
}

/// Whether `tables` (None: every table) has `schema.name`.
fn lists(tables: Option<&Vec<(String, Option<String>)>>, schema: &str, name: &str) -> bool {
    tables.is_none_or(|tables| tables.iter().any(|(s, t)| s == schema && t.as_deref().is_none_or(|t| t == name)))
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
    /// The table's name no longer leads to it (a step before [`SnapshotError::Renamed`]
    /// or [`SnapshotError::Dropped`]).
    #[error("table {table} was renamed or dropped after the snapshot")]
    Moved { oid: u32, table: String },
    #[error("table {table} was renamed to {now} after the snapshot")]
    Renamed { table: String, now: String },
    #[error("table {0} was dropped after the snapshot")]
    Dropped(String),
    #[error(
        "table {table} was rewritten after the snapshot (by TRUNCATE, VACUUM FULL, CLUSTER, REFRESH MATERIALIZED VIEW \
         or an ALTER TABLE that rewrites it; changed: {relations}), so its rows as of the snapshot can no longer be read"
    )]
    Rewritten { table: String, relations: String },
    #[error("the partitions of table {0} were attached, detached or dropped after the snapshot")]
    Repartitioned(String),
    #[error("the columns of table {table} changed after the snapshot ({message})")]
    ColumnsChanged { table: String, message: String },
    /// A keyset cursor that is not one of ours, or not for this table as the snapshot
    /// has it (see [`super::keyset`]).
    #[error(
        "table {0} was added to the session after its snapshot was exported: the snapshot lacks its changes from \
         then until the change, so it is not read from it; backfill it (PATCH with \"backfill\": true) instead"
    )]
    AddedSince(String),
    #[error("bad cursor: {0}; pass back the \"next\" value of the previous page unchanged")]
    BadCursor(String),
    /// Keyset paging needs a key or a row position, which views and foreign tables lack.
    #[error(
        "{relation} {table} has neither a primary key nor a row position to page by; \
         read it whole with the NDJSON export instead"
    )]
    NoKey { table: String, relation: &'static str },
    /// A live backfill reads by primary key, which the table lacks (or the reader's
    /// column list leaves out, or inheritance children may repeat).
    #[error(
        "table {0} has no primary key a backfill can page by (none, one the session's column list leaves out, \
         or one its inheritance children may repeat); add a primary key, or read it from the session's snapshot"
    )]
    NoPrimaryKey(String),
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

/// Rows are sent in chunks of about this many bytes (more when a single row is larger).
const CHUNK: usize = 64 * 1024;

/// A page's body: the JSON array, in chunks, as Postgres sends the rows. An error after
/// the first chunk ends the body early, so the client never takes a truncated page for
/// a whole one.
pub type PageBody = BoxStream<'static, Result<Bytes, SnapshotError>>;

/// Starts reading one page of `req.table` (in `scope`) as a JSON array of objects, keys
/// in column order. Everything that can be refused is found out before this returns: the table,
/// its columns, whether it changed since the snapshot, and the query's first row. The
/// body then streams the rest, holding `conn` until it ends.
pub async fn open_page(
    conn: PooledClient,
    snapshot_id: &str,
    req: &PageRequest,
    scope: &Scope,
    statement_timeout: Duration,
) -> Result<PageBody, SnapshotError> {
    if !super::ident::is_valid_snapshot_id(snapshot_id) {
        conn.release();
        return Err(SnapshotError::SnapshotGone(format!("malformed snapshot id {snapshot_id:?}")));
    }
    match start_page(&conn, snapshot_id, req, scope, statement_timeout).await {
        Ok((table, rows)) => first_rows(conn, &table, rows, Framing::Array).await,
        Err(e) => Err(abandon(conn, e).await),
    }
}

/// Opens the transaction, checks the table and starts the SELECT.
async fn start_page(
    client: &Client,
    snapshot_id: &str,
    req: &PageRequest,
    scope: &Scope,
    statement_timeout: Duration,
) -> Result<(TableInfo, SimpleQueryStream), SnapshotError> {
    begin_read(client, snapshot_id, statement_timeout).await?;
    let table = resolve_in_scope(client, &req.table, scope).await?;
    check_unchanged(client, &table).await?;
    let sql = select_sql(&table, req)?;
    let rows = client.simple_query_raw(&sql).await?;
    Ok((table, rows))
}

/// Opens the read's transaction on the snapshot, `snapshot_id` checked by the caller.
pub(super) async fn begin_read(
    client: &Client,
    snapshot_id: &str,
    statement_timeout: Duration,
) -> Result<(), SnapshotError> {
    // The snapshot id cannot be a bind parameter; it is checked by the caller and
    // quoted. The timeout covers every statement from here on, sending the rows
    // included, so a client that stops reading cannot hold a connection for longer
    // either.
    let begin = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}; \
         SET LOCAL statement_timeout = {}",
        quote_literal(snapshot_id),
        statement_timeout.as_millis().min(i32::MAX as u128)
    );
    if let Err(e) = client.batch_execute(&begin).await {
        // "invalid snapshot identifier": the exporting transaction is gone.
        return Err(match e.code() {
            Some(c) if *c == SqlState::INVALID_PARAMETER_VALUE => SnapshotError::SnapshotGone(describe(&e)),
            _ => SnapshotError::Db(e),
        });
    }
    Ok(())
}

/// Where a keyset page ([`super::keyset`]) ended, as its `next` names it: the table
/// (its oid, so that a cursor of another table is refused) and the key of the last row
/// sent, each value as its type's text output. The pinned settings make that text read
/// back as the same value. Here rather than in `keyset`, beside the framing that writes
/// it, so that the reads depend on nothing above them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    #[serde(rename = "t")]
    pub oid: u32,
    #[serde(rename = "k")]
    pub key: Vec<String>,
}

impl Cursor {
    pub fn new(oid: u32, key: Vec<String>) -> Cursor {
        Cursor { oid, key }
    }

    /// base64url (no padding) of a small JSON value: safe in a query string as is.
    pub fn encode(&self) -> String {
        // Serializing a struct of a number and strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(s: &str) -> Result<Cursor, SnapshotError> {
        let bad = |why: &str| SnapshotError::BadCursor(why.to_owned());
        let json = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad("not one this server made (not base64url)"))?;
        serde_json::from_slice(&json).map_err(|_| bad("not one this server made"))
    }
}

/// How a body frames its rows.
pub(super) enum Framing {
    /// `[row,row]`: a v1 page.
    Array,
    /// `{"rows":[row,row],"next":cursor}`: the query returns one row more than `limit`
    /// when there is a next page, which is not sent but tells that there is one.
    Keyset(KeysetFraming),
    /// `row\n` for each row: an export.
    Ndjson,
}

pub(super) struct KeysetFraming {
    pub limit: u64,
    pub oid: u32,
    /// Where the key values are in each row (the key's columns, or the trailing
    /// `tableoid`, `ctid` the query adds).
    pub key_at: Vec<usize>,
    /// The key of the last row sent.
    pub last: Vec<String>,
    pub more: bool,
}

impl Framing {
    fn opening(&self) -> &'static str {
        match self {
            Framing::Array => "[",
            Framing::Keyset(_) => "{\"rows\":[",
            Framing::Ndjson => "",
        }
    }

    fn closing(&self, out: &mut Vec<u8>) {
        match self {
            Framing::Array => out.push(b']'),
            Framing::Keyset(k) => {
                out.extend_from_slice(b"],\"next\":");
                match k.more {
                    true => {
                        let cursor = Cursor::new(k.oid, k.last.clone()).encode();
                        write_string(out, Mode::AlwaysValid, cursor.as_bytes());
                    }
                    false => out.extend_from_slice(b"null"),
                }
                out.push(b'}');
            }
            Framing::Ndjson => {}
        }
    }
}

/// Waits for the first row (or the end) before the body starts: an error before it,
/// even one Postgres reports after describing the columns, is still an HTTP error.
pub(super) async fn first_rows(
    conn: PooledClient,
    table: &TableInfo,
    rows: SimpleQueryStream,
    framing: Framing,
) -> Result<PageBody, SnapshotError> {
    let name = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name));
    let mut page = Page {
        conn: Some(conn),
        rows: Box::pin(rows),
        columns: table.columns.clone(),
        buf: Vec::from(framing.opening()),
        framing,
        rows_out: 0,
    };
    loop {
        match page.rows.next().await {
            Some(Ok(SimpleQueryMessage::Row(row))) => {
                page.push(&row);
                break;
            }
            Some(Ok(SimpleQueryMessage::RowDescription(_))) => continue,
            Some(Ok(_)) | None => {
                // An empty page: answer it whole, the connection goes back first.
                let chunk = page.finish().await?;
                return Ok(futures_util::stream::once(async { Ok(chunk) }).boxed());
            }
            Some(Err(e)) => {
                if let Some(conn) = page.conn.take() {
                    end(conn).await;
                }
                // The SELECT names the columns the snapshot has: one that is missing now
                // was dropped or renamed since.
                if e.code() == Some(&SqlState::UNDEFINED_COLUMN) {
                    return Err(SnapshotError::ColumnsChanged { table: name, message: describe(&e) });
                }
                return Err(SnapshotError::Db(e));
            }
        }
    }
    Ok(futures_util::stream::unfold(Some(page), |page| async move {
        let mut page = page?;
        match page.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(page))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed())
}

/// A page being sent: the rows still to come, and the connection they come on.
struct Page {
    /// Taken when the page ends; dropped with the body otherwise, which cancels the query.
    conn: Option<PooledClient>,
    rows: Pin<Box<SimpleQueryStream>>,
    columns: Vec<Column>,
    buf: Vec<u8>,
    framing: Framing,
    rows_out: u64,
}

impl Page {
    fn push(&mut self, row: &SimpleQueryRow) {
        if let Framing::Keyset(k) = &mut self.framing {
            if self.rows_out >= k.limit {
                k.more = true;
                return;
            }
            if self.rows_out + 1 == k.limit {
                // Key columns are NOT NULL, tableoid and ctid never are.
                k.last = k.key_at.iter().map(|&i| row.get(i).unwrap_or_default().to_owned()).collect();
            }
        }
        if self.rows_out > 0 && !matches!(self.framing, Framing::Ndjson) {
            self.buf.push(b',');
        }
        self.rows_out += 1;
        self.buf.push(b'{');
        for (i, col) in self.columns.iter().enumerate() {
            if i > 0 {
                self.buf.push(b',');
            }
            write_string(&mut self.buf, Mode::AlwaysValid, col.name.as_bytes());
            self.buf.push(b':');
            // A page cannot end in an error halfway, so the mode that has none: text
            // Postgres prints comes out as the stream writes it, any other as a string.
            let _ = write_value(&mut self.buf, Mode::AlwaysValid, col.type_oid, row.get(i).map(str::as_bytes));
        }
        self.buf.push(b'}');
        if matches!(self.framing, Framing::Ndjson) {
            self.buf.push(b'\n');
        }
    }

    /// The rows that have arrived, at least one unless the page is over; None after the
    /// last chunk.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, SnapshotError> {
        if self.conn.is_none() {
            return Ok(None);
        }
        while self.buf.len() < CHUNK {
            // Wait only when there is nothing to send; otherwise take what has arrived.
            let next = if self.buf.is_empty() {
                self.rows.next().await
            } else {
                match self.rows.next().now_or_never() {
                    Some(next) => next,
                    None => break,
                }
            };
            match next {
                Some(Ok(SimpleQueryMessage::Row(row))) => self.push(&row),
                Some(Ok(SimpleQueryMessage::RowDescription(_))) => {}
                Some(Ok(_)) | None => return self.finish().await.map(Some),
                Some(Err(e)) => {
                    if let Some(conn) = self.conn.take() {
                        end(conn).await;
                    }
                    return Err(SnapshotError::Db(e));
                }
            }
        }
        Ok(Some(Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 1024)))))
    }

    /// Closes the array once the transaction has ended well: the last byte is only sent
    /// when the page is known to be whole.
    async fn finish(&mut self) -> Result<Bytes, SnapshotError> {
        // Take the SELECT's last reply (ReadyForQuery) before the next command.
        while let Some(message) = self.rows.next().await {
            if let Err(e) = message {
                if let Some(conn) = self.conn.take() {
                    end(conn).await;
                }
                return Err(e.into());
            }
        }
        if let Some(conn) = self.conn.take() {
            rollback(conn).await?;
        }
        self.framing.closing(&mut self.buf);
        Ok(Bytes::from(std::mem::take(&mut self.buf)))
    }
}

/// Ends the transaction (read-only: ROLLBACK and COMMIT are the same; ROLLBACK also ends
/// an aborted one) and gives the connection back, or closes it if that failed.
async fn rollback(conn: PooledClient) -> Result<(), tokio_postgres::Error> {
    match conn.batch_execute("ROLLBACK").await {
        Ok(()) => {
            conn.release();
            Ok(())
        }
        Err(e) => {
            conn.discard();
            Err(e)
        }
    }
}

/// After a failure: ends the transaction, whatever state it is in.
async fn end(conn: PooledClient) {
    if let Err(e) = rollback(conn).await {
        tracing::debug!(error = %e, "cannot end a failed snapshot read");
    }
}

/// Ends the transaction after `e`; for a table that is gone from its name, finds out
/// (now that the snapshot no longer applies) whether it was renamed or dropped.
pub(super) async fn abandon(conn: PooledClient, e: SnapshotError) -> SnapshotError {
    let SnapshotError::Moved { oid, table } = e else {
        end(conn).await;
        return e;
    };
    if let Err(e) = conn.batch_execute("ROLLBACK").await {
        conn.discard();
        return SnapshotError::Db(e);
    }
    // Outside a transaction, regclass names the relation as it is now; a dropped one
    // prints as its bare number (a relation named like a number prints quoted).
    let now = conn.query_one("SELECT $1::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text", &[&oid]).await;
    let e = match now {
        Ok(row) => match row.try_get::<_, String>(0) {
            Ok(name) if name == oid.to_string() => SnapshotError::Dropped(table),
            Ok(name) => SnapshotError::Renamed { table, now: name },
            Err(e) => SnapshotError::Db(e),
        },
        Err(e) => SnapshotError::Db(e),
    };
    end(conn).await;
    e
}

/// The table's rows as of the snapshot are only readable from the files it had then:
/// TRUNCATE and the rewriting ALTER TABLEs give it new files whose rows are all newer
/// than the snapshot (so it would read as empty), and VACUUM FULL, CLUSTER and REFRESH
/// MATERIALIZED VIEW move its rows (so pages in physical order would overlap or skip).
/// Partitions attached or detached since then would add or hide rows.
///
/// Inside the snapshot's transaction, catalog rows read by SQL are as of the snapshot,
/// while `pg_relation_filenode`, `pg_partition_tree` and `to_regclass` see the catalog as
/// it is now. The lock is taken first (the SELECT would take it anyway): once it is
/// held, nothing can rewrite, rename or drop the table until the page has been read, so
/// what is checked here is what the SELECT reads.
pub(super) async fn check_unchanged(client: &Client, table: &TableInfo) -> Result<(), SnapshotError> {
    let name = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name));
    // LOCK refuses materialized views and foreign tables; EXPLAIN takes the same lock
    // without running anything.
    let lock = match table.relkind {
        'm' | 'f' => format!("EXPLAIN SELECT FROM {name}"),
        _ => format!("LOCK TABLE {name} IN ACCESS SHARE MODE"),
    };
    let moved = || SnapshotError::Moved { oid: table.oid, table: name.clone() };
    match client.batch_execute(&lock).await {
        Ok(()) => {}
        // No such table or schema (any more): renamed or dropped.
        Err(e) if [&SqlState::UNDEFINED_TABLE, &SqlState::INVALID_SCHEMA_NAME].iter().any(|c| e.code() == Some(c)) => {
            return Err(moved());
        }
        Err(e) => return Err(e.into()),
    }
    let row = client.query_one(CHANGED_SQL, &[&table.oid, &name]).await?;
    if row.try_get::<_, Option<u32>>(0)? != Some(table.oid) {
        // Renamed or dropped, and another table has its old name.
        return Err(moved());
    }
    let rewritten: Vec<String> = row.try_get(1)?;
    let repartitioned: bool = row.try_get(2)?;
    if !rewritten.is_empty() {
        return Err(SnapshotError::Rewritten { table: name, relations: rewritten.join(", ") });
    }
    if repartitioned {
        return Err(SnapshotError::Repartitioned(name));
    }
    Ok(())
}

/// $1: the table's oid as of the snapshot, $2: its quoted name. Answers the oid that
/// name has now; the relations of the table's tree (itself, its partitions or
/// inheritance children as of the snapshot) whose file changed or that are gone; and
/// whether its partitions are not those of the snapshot. Relations without storage
/// have no file on either side (relfilenode 0, pg_relation_filenode NULL).
const CHANGED_SQL: &str = "\
    WITH RECURSIVE snap(relid) AS ( \
        SELECT $1::pg_catalog.oid \
        UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN snap s ON i.inhparent = s.relid), \
    now AS (SELECT relid::pg_catalog.oid FROM pg_catalog.pg_partition_tree($1::pg_catalog.oid::pg_catalog.regclass)) \
    SELECT pg_catalog.to_regclass($2)::pg_catalog.oid, \
        ARRAY(SELECT s.relid::pg_catalog.regclass::pg_catalog.text FROM snap s \
              JOIN pg_catalog.pg_class c ON c.oid = s.relid \
              WHERE NULLIF(c.relfilenode, 0) IS DISTINCT FROM pg_catalog.pg_relation_filenode(s.relid) \
              ORDER BY s.relid), \
        EXISTS (SELECT FROM now) AND EXISTS ( \
            (SELECT relid FROM snap EXCEPT SELECT relid FROM now) \
            UNION ALL (SELECT relid FROM now EXCEPT SELECT relid FROM snap))";

/// Looks the table up as [`resolve_table`] does, and narrows it to what `scope` serves.
/// A table outside the scope is [`SnapshotError::NoSuchTable`], exactly as one that does
/// not exist: the answer tells nothing of the tables a reader may not see.
pub(crate) async fn resolve_in_scope(client: &Client, t: &TableRef, scope: &Scope) -> Result<TableInfo, SnapshotError> {
    let unknown = || SnapshotError::NoSuchTable(t.to_string());
    let mut table = match resolve_table(client, t).await {
        Err(SnapshotError::SystemTable(_)) if scope.system_unknown => return Err(unknown()),
        other => other?,
    };
    if !scope.admits(&table.schema, &table.name) {
        return Err(unknown());
    }
    if !scope.exported(&table.schema, &table.name) {
        return Err(SnapshotError::AddedSince(t.to_string()));
    }
    let Some((publication, narrowed)) = &scope.narrowed else { return Ok(table) };
    if !narrowed.iter().any(|(s, n)| *s == table.schema && *n == table.name) {
        return Ok(table);
    }
    // The publication as of the snapshot (created before the slot, so in it): its row
    // filter and column list are what the stream applies, in Postgres's own text.
    let row = client
        .query_opt(
            "SELECT pg_catalog.pg_get_expr(r.prqual, r.prrelid), \
                 (SELECT pg_catalog.array_agg(a.attname::text) FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid = r.prrelid AND a.attnum = ANY (r.prattrs)) \
             FROM pg_catalog.pg_publication_rel r JOIN pg_catalog.pg_publication p ON p.oid = r.prpubid \
             WHERE p.pubname = $1 AND r.prrelid = $2",
            &[publication, &table.oid],
        )
        .await?;
    // Its filter or columns are not in the publication: serving the table whole would
    // show what the session may not see.
    let Some(row) = row else { return Err(unknown()) };
    table.row_filter = row.try_get(0)?;
    if let Some(columns) = row.try_get::<_, Option<Vec<String>>>(1)? {
        table.columns.retain(|c| columns.contains(&c.name));
    }
    Ok(table)
}

/// Looks the table up in the catalog (as of the snapshot), honouring search_path for
/// unqualified names.
pub(crate) async fn resolve_table(client: &Client, t: &TableRef) -> Result<TableInfo, SnapshotError> {
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
    Ok(TableInfo {
        oid,
        schema,
        name,
        relkind: relkind.chars().next().unwrap_or('r'),
        columns,
        primary_key,
        row_filter: None,
    })
}

/// The page's SELECT. Only catalog names (quoted) and integers we produced go in.
pub(crate) fn select_sql(table: &TableInfo, req: &PageRequest) -> Result<String, SnapshotError> {
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
    if let Some(filter) = &table.row_filter {
        sql.push_str(&format!(" WHERE ({filter})"));
    }
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
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            relkind,
            columns: vec![Column { name: "id".into(), type_oid: 23 }, Column { name: "Name".into(), type_oid: 25 }],
            primary_key: pk.iter().map(|s| s.to_string()).collect(),
            row_filter: None,
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
    fn a_scope_admits_its_tables_and_schemas_never_the_hidden_ones() {
        let every = Scope { hidden_schemas: vec!["pgdeltastream".into()], ..Scope::default() };
        assert!(every.admits("public", "t") && every.admits("audit", "x"));
        assert!(!every.admits("pgdeltastream", "sessions"));
        let some = Scope {
            tables: Some(vec![("public".into(), Some("t".into())), ("audit".into(), None)]),
            hidden_schemas: vec!["audit".into()],
            ..Scope::default()
        };
        assert!(some.admits("public", "t"));
        assert!(!some.admits("public", "u") && !some.admits("Public", "t") && !some.admits("audit", "x"));
        assert!(Scope::default().admits("pgdeltastream", "sessions"), "the default is every table");
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
