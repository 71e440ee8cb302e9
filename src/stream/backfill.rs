//! Live backfills in the stream, by DBLog's watermarks.
//!
//! A backfill reads a table in keyset chunks while the stream runs. Each chunk is
//! bracketed by two logical messages the runner writes into the WAL, a low and a high
//! watermark, each in a transaction of its own:
//!
//! ```text
//!   WAL:     ... L(n) ... changes ... H(n) ...
//!   runner:  open window n, write L(n), SELECT the chunk, hand it over, write H(n)
//!   stream:  at L(n) note every key of the table that changes, until H(n); at H(n)
//!            drop those rows from the chunk and send the rest, in place of H(n)
//! ```
//!
//! A row whose key changed between the watermarks may be older in the chunk than in
//! the stream, so it is left to the stream, which carries its change; every other row
//! of the chunk is the table's current row at H(n). A client that applies the stream
//! in order (the chunk's rows as upserts) ends with exactly the table's rows, and no
//! transaction is held open longer than one chunk's SELECT.
//!
//! This module is what the runner (the session layer) and the stage in the stream
//! ([`super::marks`]) share: the open windows and the chunks, each chunk's rows
//! rendered in the stream's format, and what was delivered, for the runner to learn
//! when its client has acked it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use super::frame::Format;
use crate::types::Lsn;
use crate::types::value::{Mode, write_string, write_value};

/// The prefix of the watermarks' logical messages.
pub(crate) const PREFIX: &str = "pgdeltastream.backfill";

/// A watermark's content: which run of which backfill, which chunk, low or high.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Watermark {
    pub run: String,
    pub chunk: u64,
    pub high: bool,
}

/// What a client is told of a chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChunkInfo {
    /// The backfill's id.
    pub id: String,
    /// `schema.table`.
    pub table: String,
    /// The chunk's number in its table, from 1.
    pub chunk: u64,
    /// Format 1: which message of the chunk this is, from 1, and whether more follow
    /// (only the last has a `nextlsn` to ack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub more: Option<bool>,
    /// The rows the chunk carries (those whose key changed while it was read are left
    /// to the stream).
    pub rows: u64,
    /// The last chunk of the table.
    pub last: bool,
}

/// Where something is in a chunk's buffer: from, to.
pub(crate) type Span = (u32, u32);

/// A chunk, read and rendered, waiting for its high watermark.
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub info: ChunkInfo,
    /// [`RowShape::names`] of its table.
    pub names: Bytes,
    /// The rows, each the JSON array of its values, back to back with a comma between
    /// each two: a run of rows goes out as one slice of it.
    pub buffer: Bytes,
    /// Each row's span in `buffer`, in key order.
    pub rows: Vec<Span>,
    /// Each row's key values' spans, `key_width` per row: compared only when a change
    /// in the chunk's window may have made a row stale.
    pub keys: Vec<Span>,
    pub key_width: usize,
}

impl Chunk {
    /// [`key_of`] row `i`.
    fn key(&self, i: usize) -> String {
        let spans = &self.keys[i * self.key_width..(i + 1) * self.key_width];
        let raw: Vec<&[u8]> = spans.iter().map(|&(a, b)| &self.buffer[a as usize..b as usize]).collect();
        key_of_raw(&raw)
    }
}

/// A chunk that went out to the client, in place of its high watermark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// The ack that covers it.
    pub nextlsn: Lsn,
    pub info: ChunkInfo,
}

/// A window between the watermarks of one chunk.
#[derive(Debug)]
struct Window {
    schema: String,
    table: String,
    key_names: Vec<String>,
    /// The low watermark has come by: changes are noted.
    open: bool,
    changed: HashSet<String>,
    /// The table was truncated inside the window: no row of the chunk holds.
    truncated: bool,
    chunk: Option<Chunk>,
}

/// The runs of a session's stream: shared by the runner that writes the watermarks
/// and the stage that meets them in the stream.
#[derive(Clone, Default)]
pub(crate) struct Backfills {
    inner: Arc<Mutex<Windows>>,
    /// Windows between their watermarks: while none is, no change needs a look (read
    /// for every change the stream passes, so without the lock).
    open: Arc<AtomicUsize>,
    /// Woken when a chunk is delivered.
    pub delivered: Arc<Notify>,
}

#[derive(Default)]
struct Windows {
    /// The run whose watermarks count; any other's are dropped.
    run: Option<String>,
    windows: HashMap<u64, Window>,
    delivered: Vec<Delivered>,
}

impl Backfills {
    fn with<R>(&self, f: impl FnOnce(&mut Windows) -> R) -> R {
        let mut windows = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let r = f(&mut windows);
        self.open.store(windows.windows.values().filter(|w| w.open).count(), Ordering::Release);
        r
    }

    /// Whether a window is open: a change of its table may make a chunk's row stale.
    pub(crate) fn any_open(&self) -> bool {
        self.open.load(Ordering::Acquire) > 0
    }

    /// Whether both are the same stream's.
    pub fn same(&self, other: &Backfills) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Starts run `run`: whatever an earlier one left is forgotten.
    pub fn begin_run(&self, run: &str) {
        self.with(|w| *w = Windows { run: Some(run.to_owned()), ..Windows::default() });
    }

    /// Ends run `run`, if it is the current one: its watermarks still in the WAL count
    /// for nothing.
    pub fn end_run(&self, run: &str) {
        self.with(|w| {
            if w.run.as_deref() == Some(run) {
                *w = Windows::default();
            }
        });
    }

    /// Opens the window of chunk `chunk` of `schema.table`, keyed by `key_names`: call
    /// it before the low watermark is written.
    pub fn open_window(&self, chunk: u64, schema: &str, table: &str, key_names: Vec<String>) {
        let window = Window {
            schema: schema.to_owned(),
            table: table.to_owned(),
            key_names,
            open: false,
            changed: HashSet::new(),
            truncated: false,
            chunk: None,
        };
        self.with(|w| w.windows.insert(chunk, window));
    }

    /// Hands over chunk `chunk`'s rows: call it before the high watermark is written.
    pub fn fill(&self, chunk: u64, rows: Chunk) {
        self.with(|w| w.windows.get_mut(&chunk).map(|window| window.chunk = Some(rows)));
    }

    /// Forgets chunk `chunk` (its read failed): its watermarks count for nothing.
    pub fn abandon(&self, chunk: u64) {
        self.with(|w| w.windows.remove(&chunk));
    }

    /// The chunks delivered since the last call.
    pub fn take_delivered(&self) -> Vec<Delivered> {
        self.with(|w| std::mem::take(&mut w.delivered))
    }

    /// Whether `mark` is of the current run.
    pub(crate) fn is_current(&self, mark: &Watermark) -> bool {
        self.with(|w| w.run.as_deref() == Some(mark.run.as_str()))
    }

    /// The low watermark of `chunk` came by.
    pub(crate) fn low(&self, chunk: u64) {
        self.with(|w| w.windows.get_mut(&chunk).map(|window| window.open = true));
    }

    /// The key names of `schema.table` if an open window watches it.
    pub(crate) fn watched(&self, schema: &str, table: &str) -> Option<Vec<String>> {
        self.with(|w| {
            w.windows.values().find(|x| x.open && x.schema == schema && x.table == table).map(|x| x.key_names.clone())
        })
    }

    /// A change of `schema.table` inside the open windows: `key` changed (None: every
    /// key, a truncate).
    pub(crate) fn changed(&self, schema: &str, table: &str, key: Option<String>) {
        self.with(|w| {
            for window in w.windows.values_mut().filter(|x| x.open && x.schema == schema && x.table == table) {
                match &key {
                    Some(key) => {
                        window.changed.insert(key.clone());
                    }
                    None => window.truncated = true,
                }
            }
        });
    }

    /// The high watermark of `chunk` came by, ending a transaction at `nextlsn`: the
    /// chunk's rows whose key did not change in its window, to send in its place.
    pub(crate) fn high(&self, chunk: u64, nextlsn: Lsn) -> Option<Chunk> {
        self.with(|w| {
            let window = w.windows.remove(&chunk)?;
            let mut rows = window.chunk?;
            if window.truncated {
                rows.rows.clear();
            } else if !window.changed.is_empty() {
                let kept = (0..rows.rows.len()).filter(|&i| !window.changed.contains(&rows.key(i)));
                rows.rows = kept.map(|i| rows.rows[i]).collect();
            }
            rows.keys = Vec::new();
            rows.info.rows = rows.rows.len() as u64;
            w.delivered.push(Delivered { nextlsn, info: rows.info.clone() });
            Some(rows)
        })
    }
}

/// The one form of a key both sides compare: its values' JSON as serde_json writes it
/// (numbers keep their text), in key order.
pub(crate) fn key_of(values: &[Value]) -> String {
    Value::Array(values.to_vec()).to_string()
}

/// [`key_of`] the values written as `raw` JSON: as they are where serde_json would
/// write them the same (no escape in them), else parsed and written again.
pub(crate) fn key_of_raw(raw: &[&[u8]]) -> String {
    if raw.iter().all(|v| !v.contains(&b'\\')) {
        let mut key = String::with_capacity(2 + raw.iter().map(|v| v.len() + 1).sum::<usize>());
        key.push('[');
        for (i, v) in raw.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(&String::from_utf8_lossy(v));
        }
        key.push(']');
        return key;
    }
    let values: Vec<Value> = raw.iter().map(|v| serde_json::from_slice(v).unwrap_or(Value::Null)).collect();
    key_of(&values)
}

/// What a backfill row is rendered from: its columns' types, and where its key is.
#[derive(Debug, Clone)]
pub(crate) struct RowShape {
    pub type_oids: Vec<u32>,
    /// Where the key's columns are among the columns.
    pub key_at: Vec<usize>,
    /// What every message of the table's chunks names once, rather than every row:
    /// `"schema":..,"table":..,"columnnames":[..],"columntypes":[..]`.
    names: Bytes,
}

impl RowShape {
    pub fn new(schema: &str, table: &str, names: &[String], types: (Vec<String>, Vec<u32>)) -> Self {
        let mut head = Vec::new();
        head.extend_from_slice(b"\"schema\":");
        write_string(&mut head, Mode::AlwaysValid, schema.as_bytes());
        head.extend_from_slice(b",\"table\":");
        write_string(&mut head, Mode::AlwaysValid, table.as_bytes());
        head.extend_from_slice(b",\"columnnames\":");
        string_array(&mut head, names);
        head.extend_from_slice(b",\"columntypes\":");
        string_array(&mut head, &types.0);
        RowShape { type_oids: types.1, key_at: Vec::new(), names: Bytes::from(head) }
    }

    /// Renders one row (every column's text, None for NULL) into `out`: the JSON array
    /// of its values, in column order. Appends the spans of its key values to `keys`.
    pub fn render<'a>(&self, row: impl Iterator<Item = Option<&'a str>>, out: &mut Vec<u8>, keys: &mut Vec<Span>) {
        out.push(b'[');
        let first = keys.len();
        keys.resize(first + self.key_at.len(), (0, 0));
        for (i, text) in row.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let at = out.len();
            // The mode without errors: a value Postgres printed that is no JSON number
            // goes out as a string, as the snapshot sends it.
            let oid = self.type_oids.get(i).copied().unwrap_or(0);
            let _ = write_value(out, Mode::AlwaysValid, oid, text.map(str::as_bytes));
            if let Some(k) = self.key_at.iter().position(|&k| k == i) {
                keys[first + k] = (at as u32, out.len() as u32);
            }
        }
        out.push(b']');
    }

    pub fn names(&self) -> Bytes {
        self.names.clone()
    }
}

fn string_array(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(out, Mode::AlwaysValid, s.as_bytes());
    }
    out.push(b']');
}

/// A message of a chunk holds rows up to about this size: a chunk larger than that
/// goes out as several, so that no client meets a message larger than its default
/// limit (1 MiB for Python's websockets).
const PART_BYTES: usize = 256 * 1024;

/// A chunk as the client gets it, ending where its high watermark's transaction ends.
///
/// Format 1: one message per part of the chunk, `{"backfill":{..,"part":n,"more":true},
/// "schema":..,"table":..,"columnnames":[..],"columntypes":[..],"rows":[[..],..]}`; the
/// last part has `"nextlsn"` to ack and `"more":false`, the others nothing to ack (as a
/// non-transactional message). Format 2: a begin record with `"backfill"`, a record
/// `{"action":"R",...,"rows":[..]}` per part, and a commit record with `"nextlsn"`.
pub(crate) fn chunk_parts(format: Format, chunk: Chunk, nextlsn: Lsn, out: &mut Vec<super::message::Part>) {
    use super::message::{Finish, MessageKind, Part, Start};
    let changes = u32::try_from(chunk.rows.len()).unwrap_or(u32::MAX);
    let end = Finish { nextlsn: Some(nextlsn), kind: MessageKind::Data, changes };
    let info_json = |part: usize, more: bool| {
        let parted = format == Format::Transactions;
        let info = ChunkInfo { part: parted.then_some(part), more: parted.then_some(more), ..chunk.info.clone() };
        serde_json::to_string(&info).unwrap_or_default()
    };
    let parts = split(&chunk.rows);
    let count = parts.len();
    if format == Format::Changes {
        let begin = format!("{{\"action\":\"B\",\"nextlsn\":\"{nextlsn}\",\"backfill\":{}}}", info_json(0, false));
        let kind = Finish { nextlsn: None, kind: MessageKind::Begin, changes: 0 };
        out.extend(Part::whole(Start::default(), Bytes::from(begin), kind));
    }
    for (i, rows) in parts.into_iter().enumerate() {
        let last = i + 1 == count;
        let head = match format {
            Format::Transactions if last => {
                format!("{{\"nextlsn\":\"{nextlsn}\",\"backfill\":{},", info_json(i + 1, false))
            }
            Format::Transactions => format!("{{\"backfill\":{},", info_json(i + 1, true)),
            Format::Changes => "{\"action\":\"R\",".to_owned(),
        };
        let (start, finish) = match (format, last) {
            (Format::Transactions, true) => (Start { nextlsn: Some(nextlsn) }, end),
            (Format::Transactions, false) => {
                (Start::default(), Finish { nextlsn: None, kind: MessageKind::Unackable, changes: 0 })
            }
            (Format::Changes, _) => (Start::default(), Finish { nextlsn: None, kind: MessageKind::Inside, changes: 0 }),
        };
        out.push(Part::Start(start));
        out.push(Part::Body(Bytes::from(head)));
        out.push(Part::Body(chunk.names.clone()));
        out.push(Part::Body(Bytes::from_static(b",\"rows\":[")));
        if let Some(body) = rows_body(&chunk.buffer, rows) {
            out.push(Part::Body(body));
        }
        out.push(Part::Body(Bytes::from_static(b"]}")));
        out.push(Part::Finish(finish));
    }
    if format == Format::Changes {
        let commit = format!("{{\"action\":\"C\",\"nextlsn\":\"{nextlsn}\",\"backfill\":{}}}", info_json(0, false));
        out.extend(Part::whole(Start { nextlsn: Some(nextlsn) }, Bytes::from(commit), end));
    }
}

/// The rows of one message, comma-separated: a slice of the buffer when they are a run
/// of it (no row between them was left out), else copied together.
fn rows_body(buffer: &Bytes, rows: &[Span]) -> Option<Bytes> {
    let (first, last) = (rows.first()?, rows.last()?);
    let run = rows.windows(2).all(|w| w[1].0 == w[0].1 + 1);
    if run {
        return Some(buffer.slice(first.0 as usize..last.1 as usize));
    }
    let mut body = Vec::with_capacity(rows.iter().map(|&(a, b)| (b - a) as usize + 1).sum());
    for (i, &(a, b)) in rows.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&buffer[a as usize..b as usize]);
    }
    Some(Bytes::from(body))
}

/// The chunk's rows cut into messages of about [`PART_BYTES`]; one (empty) when it
/// has none, so that the client still gets the chunk and its ack.
fn split(rows: &[Span]) -> Vec<&[Span]> {
    let mut parts = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, &(a, b)) in rows.iter().enumerate() {
        let len = (b - a) as usize + 1;
        if bytes + len > PART_BYTES && bytes > 0 {
            parts.push(&rows[from..i]);
            (from, bytes) = (i, 0);
        }
        bytes += len;
    }
    parts.push(&rows[from..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::message::{MessageKind, Part};

    fn shape() -> RowShape {
        let names = ["id".to_string(), "v".to_string()];
        let mut s = RowShape::new("public", "t", &names, (vec!["integer".into(), "numeric".into()], vec![23, 1700]));
        s.key_at = vec![0];
        s
    }

    /// A chunk of `rows`, rendered as the runner renders them.
    fn chunk(s: &RowShape, rows: &[[Option<&str>; 2]], info: ChunkInfo) -> Chunk {
        let (mut buffer, mut spans, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for row in rows {
            if !buffer.is_empty() {
                buffer.push(b',');
            }
            let from = buffer.len() as u32;
            s.render(row.iter().copied(), &mut buffer, &mut keys);
            spans.push((from, buffer.len() as u32));
        }
        Chunk { info, names: s.names(), buffer: Bytes::from(buffer), rows: spans, keys, key_width: 1 }
    }

    fn info(chunk: u64, rows: u64, last: bool) -> ChunkInfo {
        ChunkInfo { id: "b".into(), table: "public.t".into(), chunk, part: None, more: None, rows, last }
    }

    fn text(parts: &[Part]) -> Vec<String> {
        let mut messages = Vec::new();
        let mut current = Vec::new();
        for p in parts {
            match p {
                Part::Start(_) => current.clear(),
                Part::Body(b) => current.extend_from_slice(b),
                Part::Finish(_) => messages.push(String::from_utf8(current.clone()).unwrap()),
            }
        }
        messages
    }

    #[test]
    fn rows_are_their_values_as_the_stream_writes_them() {
        let c = chunk(&shape(), &[[Some("7"), Some("1.50")], [Some("8"), None]], info(1, 2, true));
        assert_eq!(std::str::from_utf8(&c.buffer).unwrap(), "[7,1.50],[8,null]");
        assert_eq!((c.key(0), c.key(1)), ("[7]".to_string(), "[8]".to_string()));
    }

    #[test]
    fn raw_keys_are_written_as_serde_writes_them() {
        let accented = "\"\u{e9}t\u{e9}\"";
        for raw in [&br#""a\"b""#[..], br#""\u00e9""#, b"1.50", br#""plain""#, accented.as_bytes()] {
            let parsed: Value = serde_json::from_slice(raw).unwrap();
            assert_eq!(
                key_of_raw(&[raw, b"2"]),
                key_of(&[parsed, serde_json::json!(2)]),
                "{:?}",
                std::str::from_utf8(raw)
            );
        }
    }

    #[test]
    fn a_large_chunk_goes_out_in_parts_and_only_the_last_is_acked() {
        let pad = "x".repeat(1000);
        let ids: Vec<String> = (1..=600).map(|i| i.to_string()).collect();
        let rows: Vec<[Option<&str>; 2]> = ids.iter().map(|i| [Some(i.as_str()), Some(pad.as_str())]).collect();
        let mut out = Vec::new();
        chunk_parts(Format::Transactions, chunk(&shape(), &rows, info(1, 600, true)), Lsn(0x10), &mut out);
        let messages = text(&out);
        assert_eq!(messages.len(), 3, "600 rows of 1 KB in parts of 256 KiB");
        let values: Vec<serde_json::Value> = messages.iter().map(|m| serde_json::from_str(m).unwrap()).collect();
        let ids: Vec<i64> =
            values.iter().flat_map(|v| v["rows"].as_array().unwrap().iter().map(|r| r[0].as_i64().unwrap())).collect();
        assert_eq!(ids, (1..=600).collect::<Vec<_>>());
        assert!(values[..2].iter().all(|v| v["nextlsn"].is_null() && v["backfill"]["more"] == true));
        assert_eq!(values[2]["nextlsn"], "0/10");
        assert_eq!(values[2]["backfill"]["more"], false);
        let kinds: Vec<MessageKind> =
            out.iter().filter_map(|p| if let Part::Finish(f) = p { Some(f.kind) } else { None }).collect();
        assert_eq!(kinds, [MessageKind::Unackable, MessageKind::Unackable, MessageKind::Data]);
    }

    #[test]
    fn an_empty_chunk_still_comes_with_its_ack() {
        let mut out = Vec::new();
        chunk_parts(Format::Changes, chunk(&shape(), &[], info(2, 0, true)), Lsn(0x10), &mut out);
        let messages = text(&out);
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[1].ends_with(r#""rows":[]}"#), "{}", messages[1]);
        assert!(messages[2].starts_with(r#"{"action":"C","nextlsn":"0/10""#), "{}", messages[2]);
    }

    #[test]
    fn a_chunk_leaves_out_the_rows_changed_in_its_window() {
        let b = Backfills::default();
        b.begin_run("r1");
        b.open_window(1, "public", "t", vec!["id".into()]);
        let c = chunk(&shape(), &[[Some("1"), None], [Some("2"), None], [Some("3"), None]], info(1, 3, false));
        assert!(b.watched("public", "t").is_none(), "not open before the low watermark");
        assert!(!b.any_open());
        b.low(1);
        assert!(b.any_open());
        b.fill(1, c);
        assert_eq!(b.watched("public", "t"), Some(vec!["id".to_string()]));
        b.changed("public", "t", Some(key_of(&[serde_json::json!(2)])));
        let chunk = b.high(1, Lsn(0x100)).unwrap();
        assert_eq!(chunk.info.rows, 2);
        assert!(!b.any_open(), "closed at the high watermark");
        let mut out = Vec::new();
        chunk_parts(Format::Changes, chunk, Lsn(0x100), &mut out);
        assert!(text(&out)[1].ends_with(r#""rows":[[1,null],[3,null]]}"#), "{:?}", text(&out));
        assert_eq!(b.take_delivered().len(), 1);
        assert!(b.high(1, Lsn(0x100)).is_none(), "a chunk goes out once");
    }
}
