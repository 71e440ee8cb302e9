//! The stage between the decoder and the sink that meets pgdeltastream's own logical
//! messages in the stream: a backfill's watermarks ([`super::backfill`]). No client
//! ever sees one: a watermark's transaction is left out, a high watermark of the
//! stream's own backfill is replaced by its chunk, and while a window is open the
//! changes of the table it watches are noted by key.
//!
//! Watermarks of other sessions' backfills are in every slot's WAL (logical messages
//! belong to no table), so every stream runs this stage. It also drops application
//! messages the session does not want: pgoutput is asked for every message so that
//! watermarks come. The event trigger's DDL messages become DDL changes of the
//! session's tables for a session that wants them ([`super::ddl`]), else are dropped.
//!
//! What the stage holds is at most a transaction's head (format 1) or its begin record
//! (format 2), until its first change says whether it is a watermark's.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::backfill::{self, Backfills, Watermark, key_of};
use super::ddl::{self, Ddl};
use super::frame::Format;
use super::message::{Finish, MessageKind, Part, Start};

/// Every prefix of ours starts so.
const OURS: &str = "pgdeltastream.";

pub(crate) struct Marks {
    format: Format,
    backfills: Option<Backfills>,
    /// Application messages reach the client.
    app_messages: bool,
    /// The session wants schema changes: the event trigger's messages become changes.
    ddl: Option<Ddl>,
    /// Format 1: the start and head of the message under way, until its first change;
    /// format 2: the parts of the record under way.
    held: Vec<Part>,
    /// Format 2: the begin record of the transaction under way, until its first record
    /// that goes on.
    begin: Vec<Part>,
    state: State,
    /// Changes passed on in the message (format 1) or transaction (format 2) under way.
    passed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Between messages (format 1) or transactions (format 2).
    Between,
    /// Format 1: a message's start and head are held.
    Head,
    /// The message or transaction goes on as it comes.
    Passing,
    /// A watermark's transaction: left out; `Some` when it is the stream's own backfill's.
    Swallowing(Option<Watermark>),
}

/// What a change body is, as far as this stage cares.
enum Kind {
    Ours(Option<Watermark>),
    /// An application message the client does not want.
    Unwanted,
    Change,
    /// A schema change of the session's tables: this body goes on in the message's place.
    Ddl(Bytes),
}

impl Marks {
    pub fn new(format: Format, backfills: Option<Backfills>, app_messages: bool, ddl: Option<Ddl>) -> Marks {
        let (held, begin) = (Vec::new(), Vec::new());
        Marks { format, backfills, app_messages, ddl, held, begin, state: State::Between, passed: 0 }
    }

    /// The session's tables or actions changed (PATCH): from the next transaction on.
    pub fn refilter(&mut self, app_messages: bool, ddl: Option<Ddl>) {
        (self.app_messages, self.ddl) = (app_messages, ddl);
    }

    /// Whether it holds part of a transaction that has not gone on yet.
    pub fn holds(&self) -> bool {
        !self.held.is_empty() || !self.begin.is_empty() || matches!(self.state, State::Swallowing(_))
    }

    /// Takes one part of the decoder's output; what goes on is appended to `out`.
    pub fn push(&mut self, part: Part, out: &mut Vec<Part>) {
        match self.format {
            Format::Transactions => self.push_v1(part, out),
            Format::Changes => self.push_v2(part, out),
        }
    }

    /// Lets go of what is held (the stream failed inside a transaction).
    pub fn flush(&mut self, out: &mut Vec<Part>) {
        if !matches!(self.state, State::Swallowing(_)) {
            out.append(&mut self.begin);
            out.append(&mut self.held);
        }
        self.begin.clear();
        self.held.clear();
        self.state = State::Between;
    }

    fn push_v1(&mut self, part: Part, out: &mut Vec<Part>) {
        match (part, &self.state) {
            (Part::Start(start), _) => {
                out.append(&mut self.held);
                self.held.push(Part::Start(start));
                self.state = State::Head;
                self.passed = 0;
            }
            (Part::Body(body), State::Head) if self.held.len() < 2 => self.held.push(Part::Body(body)),
            (Part::Body(body), State::Head) => {
                if is_tail(&body) {
                    out.append(&mut self.held);
                    out.push(Part::Body(body));
                    self.state = State::Passing;
                    return;
                }
                match self.classify(&body) {
                    Kind::Ours(mark) => {
                        self.held.clear();
                        self.state = State::Swallowing(mark);
                    }
                    Kind::Unwanted => {
                        out.append(&mut self.held);
                        self.state = State::Passing;
                    }
                    Kind::Change => {
                        out.append(&mut self.held);
                        self.state = State::Passing;
                        self.pass_change(body, out);
                    }
                    Kind::Ddl(change) => {
                        out.append(&mut self.held);
                        self.state = State::Passing;
                        self.pass_change(change, out);
                    }
                }
            }
            (Part::Body(_), State::Swallowing(_)) => {}
            (Part::Body(body), _) if is_tail(&body) => out.push(Part::Body(body)),
            (Part::Body(body), _) => match self.classify(&body) {
                Kind::Ours(_) | Kind::Unwanted => {}
                Kind::Change => self.pass_change(body, out),
                Kind::Ddl(change) => self.pass_change(change, out),
            },
            (Part::Finish(finish), State::Swallowing(mark)) => {
                let mark = mark.clone();
                self.state = State::Between;
                self.watermark(mark, finish, out);
            }
            (Part::Finish(finish), State::Head) => {
                // A whole message: a non-transactional logical message.
                self.state = State::Between;
                let lone = self.held.get(1).and_then(Part::body).map(|b| self.lone_message_goes_on(b));
                let held = std::mem::take(&mut self.held);
                if lone.unwrap_or(true) {
                    out.extend(held);
                    out.push(Part::Finish(finish));
                }
            }
            (Part::Finish(finish), _) => {
                self.state = State::Between;
                out.push(Part::Finish(self.recount(finish)));
            }
        }
    }

    /// Format 2: every record is a message of its own (start, body, finish).
    fn push_v2(&mut self, part: Part, out: &mut Vec<Part>) {
        let Part::Finish(finish) = part else {
            self.held.push(part);
            return;
        };
        let mut record = std::mem::take(&mut self.held);
        let body = record.iter().find_map(Part::body).cloned().unwrap_or_default();
        match (finish.kind, &self.state) {
            (MessageKind::Begin, _) => {
                out.append(&mut self.begin);
                record.push(Part::Finish(finish));
                self.begin = record;
                self.state = State::Head;
                self.passed = 0;
            }
            (MessageKind::Inside, State::Swallowing(_)) => {}
            (MessageKind::Inside, _) => match self.classify(&body) {
                Kind::Ours(mark) if self.state == State::Head => {
                    self.begin.clear();
                    self.state = State::Swallowing(mark);
                }
                Kind::Ours(_) | Kind::Unwanted => {}
                Kind::Change => {
                    out.append(&mut self.begin);
                    self.state = State::Passing;
                    self.note(&body);
                    self.passed += 1;
                    out.extend(record);
                    out.push(Part::Finish(finish));
                }
                Kind::Ddl(change) => {
                    out.append(&mut self.begin);
                    self.state = State::Passing;
                    // As in format 1: a window open on the table trusts none of its chunk.
                    self.note(&change);
                    self.passed += 1;
                    out.extend(Part::whole(Start::default(), change, finish));
                }
            },
            (MessageKind::Unackable, _) => {
                if self.lone_message_goes_on(&body) {
                    out.extend(record);
                    out.push(Part::Finish(finish));
                }
            }
            (_, State::Swallowing(mark)) => {
                let mark = mark.clone();
                self.state = State::Between;
                self.watermark(mark, finish, out);
            }
            _ => {
                out.append(&mut self.begin);
                self.state = State::Between;
                out.extend(record);
                out.push(Part::Finish(self.recount(finish)));
            }
        }
    }

    /// A format 1 change that goes on: the first one of a message has no comma before it.
    fn pass_change(&mut self, body: Bytes, out: &mut Vec<Part>) {
        let body = if self.passed == 0 && body.first() == Some(&b',') { body.slice(1..) } else { body };
        self.note(&body);
        self.passed += 1;
        out.push(Part::Body(body));
    }

    /// A message or transaction ends: it carries the changes that went on.
    fn recount(&self, mut finish: Finish) -> Finish {
        if matches!(finish.kind, MessageKind::Data | MessageKind::Empty) {
            finish.changes = self.passed;
            finish.kind = if self.passed > 0 { MessageKind::Data } else { MessageKind::Empty };
        }
        finish
    }

    /// A watermark's transaction ended: the high watermark of the stream's own backfill
    /// becomes its chunk; anything else of ours leaves nothing.
    fn watermark(&mut self, mark: Option<Watermark>, finish: Finish, out: &mut Vec<Part>) {
        let (Some(mark), Some(backfills), Some(nextlsn)) = (mark, &self.backfills, finish.nextlsn) else { return };
        if !mark.high {
            backfills.low(mark.chunk);
            return;
        }
        if let Some(chunk) = backfills.high(mark.chunk, nextlsn) {
            backfill::chunk_parts(self.format, chunk, nextlsn, out);
            backfills.delivered.notify_waiters();
        }
    }

    /// Whether a non-transactional message goes on: never one of ours, an application's
    /// when the client wants them.
    fn lone_message_goes_on(&self, body: &[u8]) -> bool {
        match message_of(body) {
            Some(m) => !m.prefix.starts_with(OURS) && self.app_messages,
            None => true,
        }
    }

    fn classify(&self, body: &[u8]) -> Kind {
        let Some(m) = message_of(body) else { return Kind::Change };
        if m.prefix == backfill::PREFIX {
            let mark = serde_json::from_str::<Watermark>(&m.content).ok();
            let own = mark.filter(|mark| self.backfills.as_ref().is_some_and(|b| b.is_current(mark)));
            return Kind::Ours(own);
        }
        if m.prefix == ddl::PREFIX {
            // A schema change goes on only as a change of one of the session's tables.
            let change = self.ddl.as_ref().and_then(|d| d.render(self.format, &m.content));
            return change.map_or(Kind::Unwanted, Kind::Ddl);
        }
        if m.prefix.starts_with(OURS) || !self.app_messages {
            return Kind::Unwanted;
        }
        Kind::Change
    }

    /// Notes the keys a change touches, when a window watches its table.
    fn note(&self, body: &[u8]) {
        let Some(backfills) = self.backfills.as_ref().filter(|b| b.any_open()) else { return };
        let Some((schema, table)) = table_of(body) else { return };
        let Some(key_names) = backfills.watched(&schema, &table) else { return };
        match keys_of(self.format, body, &key_names) {
            Some(keys) => {
                for key in keys {
                    backfills.changed(&schema, &table, Some(key));
                }
            }
            // A truncate, or a change whose key cannot be read: no row of the chunk
            // can be trusted.
            None => backfills.changed(&schema, &table, None),
        }
    }
}

/// The tail of a format 1 message (`]}`, or an error record's `],"error":..}`).
fn is_tail(body: &[u8]) -> bool {
    body.first() == Some(&b']')
}

/// A logical message's prefix and content, if the body is one.
#[derive(Deserialize)]
struct Message {
    prefix: String,
    content: String,
}

const MESSAGE_V1: &[u8] = b"{\"kind\":\"message\"";
const MESSAGE_V2: &[u8] = b"{\"action\":\"M\"";
/// A non-transactional message in format 1 comes whole: `{"change":[{...}]}`.
const LONE_V1: &[u8] = b"{\"change\":[";

fn message_of(body: &[u8]) -> Option<Message> {
    let body = body.strip_prefix(b",").unwrap_or(body);
    if let Some(inner) = body.strip_prefix(LONE_V1) {
        return message_of(inner.strip_suffix(b"]}")?);
    }
    if !body.starts_with(MESSAGE_V1) && !body.starts_with(MESSAGE_V2) {
        return None;
    }
    serde_json::from_slice(body).ok()
}

#[derive(Deserialize)]
struct Named {
    schema: Option<String>,
    table: Option<String>,
}

fn table_of(body: &[u8]) -> Option<(String, String)> {
    let body = body.strip_prefix(b",").unwrap_or(body);
    let named: Named = serde_json::from_slice(body).ok()?;
    Some((named.schema?, named.table?))
}

/// A change as both formats name its row: format 1's column arrays and old keys,
/// format 2's columns and identity.
#[derive(Deserialize)]
struct Change {
    kind: Option<String>,
    action: Option<String>,
    #[serde(default)]
    columnnames: Vec<String>,
    #[serde(default)]
    columnvalues: Vec<Value>,
    oldkeys: Option<OldKeys>,
    #[serde(default)]
    columns: Vec<Column>,
    #[serde(default)]
    identity: Vec<Column>,
}

#[derive(Deserialize)]
struct OldKeys {
    keynames: Vec<String>,
    keyvalues: Vec<Value>,
}

#[derive(Deserialize)]
struct Column {
    name: String,
    value: Value,
}

/// The keys (as [`key_of`] writes them) of the rows a change touches: the new row's,
/// and the old one's where it has one. None for a truncate or a change that does not
/// name every key column.
fn keys_of(format: Format, body: &[u8], key_names: &[String]) -> Option<Vec<String>> {
    let body = body.strip_prefix(b",").unwrap_or(body);
    let change: Change = serde_json::from_slice(body).ok()?;
    if change.kind.as_deref() == Some("truncate") || change.action.as_deref() == Some("T") {
        return None;
    }
    let pick = |names: &[String], values: &[Value]| -> Option<String> {
        let values: Option<Vec<Value>> =
            key_names.iter().map(|k| names.iter().position(|n| n == k).and_then(|i| values.get(i)).cloned()).collect();
        values.map(|v| key_of(&v))
    };
    let mut keys = Vec::new();
    match format {
        Format::Transactions => {
            if !change.columnnames.is_empty() {
                keys.push(pick(&change.columnnames, &change.columnvalues)?);
            }
            if let Some(old) = &change.oldkeys {
                keys.push(pick(&old.keynames, &old.keyvalues)?);
            }
        }
        Format::Changes => {
            for columns in [&change.columns, &change.identity] {
                if columns.is_empty() {
                    continue;
                }
                let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
                let values: Vec<Value> = columns.iter().map(|c| c.value.clone()).collect();
                keys.push(pick(&names, &values)?);
            }
        }
    }
    (!keys.is_empty()).then_some(keys)
}
