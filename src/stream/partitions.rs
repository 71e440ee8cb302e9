//! A session that lists a partitioned table streams its rows under the table's name.
//!
//! wal2json names a change by the leaf partition that holds the row, and its
//! `add-tables` matches those names: a session on a partitioned table got none of its
//! rows. Listing the partitions in `add-tables` would miss a partition attached while
//! the stream runs (the options are fixed when it starts, and what wal2json leaves out
//! never reaches us). So for such a session wal2json filters no table, and this stage
//! does: each change's table is looked up once per stream (itself and its ancestors,
//! `pg_partition_ancestors`), and the change is kept under the topmost of them that the
//! session lists (a table, or a table of a listed schema), as pgoutput's
//! `publish_via_partition_root` names it, or dropped when none is listed. A partition
//! attached or created later is a table the stage has not met yet: it is looked up
//! when its first change comes.
//!
//! The lookup sees today's catalog, not the one of the change: a partition detached
//! and then reached by the stream (a lagging one) counts as detached, and one already
//! looked up keeps its answer until the stream restarts.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::error::StreamError;
use super::frame::Format;
use super::pgoutput::json;
use crate::pg::pool::Pool;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// What becomes of the changes of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Keep,
    Drop,
    /// Under this `"schema":..,"table":..` instead.
    Rename(Vec<u8>),
}

pub(crate) struct Relabel {
    format: Format,
    /// The session's tables: (schema, table), the table None for a whole schema.
    tables: Vec<(String, Option<String>)>,
    pool: Pool,
    /// By the table's names as wal2json prints them (JSON strings).
    verdicts: HashMap<(Vec<u8>, Vec<u8>), Verdict>,
    /// Format 1: a piece of the current transaction went out, so the next one starts
    /// with a comma.
    kept: bool,
}

/// Where a change's `"schema":"..","table":".."` sits in its piece, and the names.
struct Names {
    start: usize,
    end: usize,
    schema: Vec<u8>,
    table: Vec<u8>,
}

impl Relabel {
    pub fn new(format: Format, tables: Vec<(String, Option<String>)>, pool: Pool) -> Relabel {
        Relabel { format, tables, pool, verdicts: HashMap::new(), kept: false }
    }

    /// One piece of wal2json output: the piece to hand on, or None when it is dropped.
    pub async fn piece(&mut self, data: Bytes) -> Result<Option<Bytes>, StreamError> {
        match self.format {
            Format::Transactions => self.v1(data).await,
            Format::Changes => {
                let Some(names) = names(&data, b"{\"action\":\"", b"IUDT") else { return Ok(Some(data)) };
                // A partition's TRUNCATE empties the partition, not its table: it keeps
                // the partition's name (a TRUNCATE of the table has a record of its own).
                let truncate = data.get(b"{\"action\":\"".len()) == Some(&b'T');
                self.apply(&data, names, truncate).await
            }
        }
    }

    async fn v1(&mut self, data: Bytes) -> Result<Option<Bytes>, StreamError> {
        if data.starts_with(b"{") && data.ends_with(b"\"change\":[") {
            self.kept = false; // a transaction's head
            return Ok(Some(data));
        }
        if data[..] == *b"]}" || data.starts_with(b"{\"change\":[") {
            return Ok(Some(data)); // its tail, or a message of its own
        }
        // A change (a row's, or a transactional message), with a comma unless first.
        let comma = data.starts_with(b",");
        let body = if comma { data.slice(1..) } else { data.clone() };
        let out = match names(&body, b"{\"kind\":\"", b"iud") {
            Some(names) => self.apply(&body, names, false).await?,
            None => Some(body),
        };
        Ok(out.map(|piece| {
            let first = !std::mem::replace(&mut self.kept, true);
            if first {
                piece
            } else {
                let mut with = Vec::with_capacity(piece.len() + 1);
                with.push(b',');
                with.extend_from_slice(&piece);
                Bytes::from(with)
            }
        }))
    }

    async fn apply(&mut self, data: &Bytes, names: Names, keep_name: bool) -> Result<Option<Bytes>, StreamError> {
        let key = (names.schema.clone(), names.table.clone());
        if !self.verdicts.contains_key(&key) {
            let verdict = self.verdict(&names).await?;
            self.verdicts.insert(key.clone(), verdict);
        }
        Ok(match self.verdicts.get(&key) {
            Some(Verdict::Keep) => Some(data.clone()),
            Some(Verdict::Rename(_)) if keep_name => Some(data.clone()),
            Some(Verdict::Rename(replacement)) => {
                let mut out = Vec::with_capacity(data.len() + replacement.len());
                out.extend_from_slice(&data[..names.start]);
                out.extend_from_slice(replacement);
                out.extend_from_slice(&data[names.end..]);
                Some(Bytes::from(out))
            }
            Some(Verdict::Drop) | None => None,
        })
    }

    fn listed(&self, schema: &str, table: &str) -> bool {
        self.tables.iter().any(|(s, t)| s == schema && t.as_deref().is_none_or(|t| t == table))
    }

    async fn verdict(&self, names: &Names) -> Result<Verdict, StreamError> {
        let decode = |s: &[u8]| {
            serde_json::from_slice::<String>(s)
                .map_err(|e| StreamError::Fatal(format!("a table name wal2json printed: {e}")))
        };
        let (schema, table) = (decode(&names.schema)?, decode(&names.table)?);
        let mut line = ancestors(&self.pool, &schema, &table).await?;
        if line.is_empty() {
            line.push((schema.clone(), table.clone())); // dropped since: its own name
        }
        let Some(top) = line.iter().rposition(|(s, t)| self.listed(s, t)) else { return Ok(Verdict::Drop) };
        if top == 0 {
            return Ok(Verdict::Keep);
        }
        let (s, t) = &line[top];
        let mut replacement = b"\"schema\":".to_vec();
        json::escape(&mut replacement, s.as_bytes());
        replacement.extend_from_slice(b",\"table\":");
        json::escape(&mut replacement, t.as_bytes());
        tracing::debug!(partition = %format!("{schema}.{table}"), table = %format!("{s}.{t}"), "changes of a partition are streamed as its table's");
        Ok(Verdict::Rename(replacement))
    }
}

/// The table and its ancestors, leaf first; empty when no table has these names now.
async fn ancestors(pool: &Pool, schema: &str, table: &str) -> Result<Vec<(String, String)>, StreamError> {
    let query = async {
        let client = pool.get().await?;
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text \
                 FROM pg_catalog.pg_class r JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace, \
                 LATERAL pg_catalog.pg_partition_ancestors(r.oid) WITH ORDINALITY AS a(relid, depth) \
                 JOIN pg_catalog.pg_class c ON c.oid = a.relid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE rn.nspname = $1 AND r.relname = $2 ORDER BY a.depth",
                &[&schema, &table],
            )
            .await?;
        client.release();
        rows.iter()
            .map(|row| Ok((row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?)))
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
            .map_err(StreamError::fatal)
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, query).await {
        Ok(Ok(line)) => Ok(line),
        Ok(Err(e)) => Err(e.context(&format!("cannot look up the partitions of table {schema}.{table}"))),
        Err(_) => Err(StreamError::Transient(format!("looking up the partitions of table {schema}.{table} timed out"))),
    }
}

/// The names of a row change that starts with `head` and one of `kinds` (its action or
/// kind's first letter), as wal2json prints them right after: `{"kind":"insert",
/// "schema":..,"table":..` (format 1), `{"action":"I","lsn":..,"schema":..,"table":..`
/// (format 2).
fn names(data: &[u8], head: &[u8], kinds: &[u8]) -> Option<Names> {
    let kind = *data.strip_prefix(head)?.first()?;
    if !kinds.contains(&kind) {
        return None;
    }
    // The first `,"schema":` at the top level: only the kind (and lsn) come before it.
    let at = find(data, b",\"schema\":")? + 1;
    let schema_start = at + b"\"schema\":".len();
    let schema_end = string_end(data, schema_start)?;
    let rest = data.get(schema_end..)?.strip_prefix(b",\"table\":")?;
    let table_start = data.len() - rest.len();
    let table_end = string_end(data, table_start)?;
    Some(Names {
        start: at,
        end: table_end,
        schema: data[schema_start..schema_end].to_vec(),
        table: data[table_start..table_end].to_vec(),
    })
}

/// The end (exclusive) of the JSON string that starts at `start`.
fn string_end(data: &[u8], start: usize) -> Option<usize> {
    if data.get(start) != Some(&b'"') {
        return None;
    }
    let mut i = start + 1;
    while i < data.len() {
        match data[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_names_of_a_change() {
        let v1 = br#"{"kind":"insert","schema":"pub\"lic","table":"m_2024","columnnames":["a"]}"#;
        let n = names(v1, b"{\"kind\":\"", b"iud").unwrap();
        assert_eq!((&n.schema[..], &n.table[..]), (&br#""pub\"lic""#[..], &br#""m_2024""#[..]));
        assert_eq!(&v1[n.start..n.end], br#""schema":"pub\"lic","table":"m_2024""#);
        let v2 = br#"{"action":"U","lsn":"0/1","schema":"s","table":"t","columns":[]}"#;
        let n = names(v2, b"{\"action\":\"", b"IUDT").unwrap();
        assert_eq!(&v2[n.start..n.end], br#""schema":"s","table":"t""#);
        assert!(names(br#"{"kind":"message","transactional":true}"#, b"{\"kind\":\"", b"iud").is_none());
        assert!(names(br#"{"action":"B","lsn":"0/1"}"#, b"{\"action\":\"", b"IUDT").is_none());
        assert!(names(br#"{"kind":"insert","schema":"unterminated"#, b"{\"kind\":\"", b"iud").is_none());
    }
}
