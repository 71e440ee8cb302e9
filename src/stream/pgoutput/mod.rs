//! pgoutput's messages rendered as the pieces wal2json would have sent for the same
//! changes, byte for byte, in both stream formats, so that everything after the plugin
//! (assembler, framer, acks) is the same for both plugins.
//!
//! wal2json's transaction head carries the transaction's end LSN (`nextlsn`), which
//! pgoutput only sends in its Commit. So a transaction's changes are rendered as they
//! arrive and held ([`spool`]) until its Commit; then the transaction is handed out as
//! a message ([`super::message`]) a part at a time ([`Converter::next_part`]), so that
//! the consumer takes them in bursts of its own size. The converter knows each
//! message's end LSN, kind and change count, and says so in its start and finish: no
//! stage after it reads them back from the text.
//!
//! - [`json`]: how wal2json quotes a type name; values are encoded by [`crate::types::value`] (wal2json mode).
//! - [`render`]: one row change in each format.
//! - [`spool`]: the held pieces, in memory up to a bound, then in a temporary file.
//! - [`types`]: the `format_type` names of column types, looked up once per stream.

pub mod json;
pub mod render;
pub mod spool;
pub mod types;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use bytes::Bytes;

use self::render::{Change, Rel};
use self::spool::{Spool, SpoolReader};
use self::types::TypeNames;
use super::frame::Format;
use super::message::{Finish, MessageKind, Part, Start};
use crate::pg::pgoutput::{Begin, Commit, LogicalMessage, Message, ParseError, Relation};
use crate::types::Lsn;

/// How much of a transaction is held in memory before the rest goes to a file, unless
/// set otherwise (`--pgoutput-memory`).
pub const DEFAULT_HOLD_MEMORY: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("pgoutput sent a change of relation {0} before describing it")]
    UnknownRelation(u32),
    #[error("pgoutput sent a row of {tuple} columns for a relation of {relation}")]
    ColumnCount { relation: usize, tuple: usize },
    #[error("pgoutput sent a binary value; the stream asked for text")]
    Binary,
    #[error("no name for type {0} (typmod {1})")]
    UnknownType(u32, i32),
    #[error("pgoutput sent {0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("pgoutput began a transaction inside another")]
    NestedBegin,
    #[error(transparent)]
    NotANumber(#[from] json::NotANumber),
    #[error("cannot hold a large transaction in a temporary file: {0}")]
    Spool(#[from] std::io::Error),
}

/// A transaction being received.
struct Txn {
    begin: Begin,
    /// Changes held so far (format 1 separates all but the first with a comma).
    changes: u64,
    /// pgoutput sent something between Begin and Commit, hidden changes included.
    /// Before 15 it sends Begin and Commit for transactions that published nothing;
    /// from 15 it sends nothing for them, and so do we on every major.
    sent_any: bool,
    spool: Spool,
}

/// A committed transaction being handed out.
struct Drain {
    pieces: SpoolReader,
    /// Format 2: each piece is a record, a message of its own.
    records: bool,
    /// The last record (format 2) or the tail of the message (format 1), and its finish.
    tail: Bytes,
    finish: Finish,
}

pub struct Converter {
    format: Format,
    hidden_schemas: Vec<Vec<u8>>,
    hold_memory: usize,
    spool_dir: PathBuf,
    relations: HashMap<u32, Rel>,
    types: TypeNames,
    txn: Option<Txn>,
    ready: VecDeque<Part>,
    drain: Option<Drain>,
}

impl Converter {
    /// `hidden_schemas`: schemas whose changes are dropped (pgdeltastream's own).
    pub fn new(format: Format, hidden_schemas: &[String], hold_memory: usize) -> Converter {
        Converter {
            format,
            hidden_schemas: hidden_schemas.iter().map(|s| s.as_bytes().to_vec()).collect(),
            hold_memory,
            spool_dir: std::env::temp_dir(),
            relations: HashMap::new(),
            types: TypeNames::default(),
            txn: None,
            ready: VecDeque::new(),
            drain: None,
        }
    }

    /// The (type oid, typmod) pairs `message` needs named before [`Converter::push`]
    /// can take it.
    pub fn missing_types(&self, message: &Message) -> Vec<(u32, i32)> {
        match message {
            Message::Relation(r) => self.types.missing(r.columns.iter().map(|c| (c.type_oid, c.typmod))),
            _ => Vec::new(),
        }
    }

    /// Names a type as `format_type(oid, typmod)` does.
    pub fn add_type(&mut self, oid: u32, typmod: i32, name: &str) {
        self.types.insert(oid, typmod, name);
    }

    /// A transaction has begun and is held until its commit: nothing of it has been
    /// handed out yet.
    pub(crate) fn holds_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Drops the transaction held (Postgres failed to send all of it), and says where
    /// it ends: just past its commit record, an LSN that makes a stream started there
    /// skip it, and its xid.
    pub(crate) fn abandon_transaction(&mut self) -> Option<(Lsn, u32)> {
        let txn = self.txn.take()?;
        Some((Lsn(txn.begin.final_lsn.0.saturating_add(1)), txn.begin.xid))
    }

    /// Whether parts are waiting for [`Converter::next_part`]. Nothing more should be
    /// pushed until they are all taken.
    pub(crate) fn has_output(&self) -> bool {
        !self.ready.is_empty() || self.drain.is_some()
    }

    /// The format the converter renders.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The next part of the messages wal2json would have sent, in order.
    pub fn next_part(&mut self) -> Result<Option<Part>, ConvertError> {
        if let Some(part) = self.ready.pop_front() {
            return Ok(Some(part));
        }
        let Some(drain) = &mut self.drain else { return Ok(None) };
        match drain.pieces.next_piece()? {
            Some(piece) if drain.records => {
                let inside = Finish { nextlsn: None, kind: MessageKind::Inside, changes: 0 };
                let [start, body, finish] = Part::whole(Start::default(), piece, inside);
                self.ready.extend([body, finish]);
                Ok(Some(start))
            }
            Some(piece) => Ok(Some(Part::Body(piece))),
            None => {
                let Some(drain) = self.drain.take() else { return Ok(None) };
                let finish = Part::Finish(drain.finish);
                if drain.records {
                    // The commit record is a message of its own.
                    let start = Part::Start(Start { nextlsn: drain.finish.nextlsn });
                    self.ready.extend([Part::Body(drain.tail), finish]);
                    return Ok(Some(start));
                }
                self.ready.push_back(finish);
                Ok(Some(Part::Body(drain.tail)))
            }
        }
    }

    /// Takes one message; `wal_start` is its XLogData's start (the change's LSN).
    pub fn push(&mut self, wal_start: Lsn, message: Message) -> Result<(), ConvertError> {
        match message {
            Message::Begin(begin) => self.begin(begin),
            Message::Commit(commit) => self.commit(commit),
            Message::Relation(r) => self.relation(&r),
            Message::Insert { relation, new } => self.change(wal_start, relation, Change::Insert(&new)),
            Message::Update { relation, old, new } => {
                self.change(wal_start, relation, Change::Update { old: old.as_ref(), new: &new })
            }
            Message::Delete { relation, old } => self.change(wal_start, relation, Change::Delete(&old)),
            Message::Truncate { relations, .. } => self.truncate(wal_start, &relations),
            Message::Message(m) => self.message(m),
            // Origins are not printed (include-origin is off); type names come from
            // `format_type` instead.
            Message::Origin { .. } | Message::Type { .. } => Ok(()),
        }
    }

    fn begin(&mut self, begin: Begin) -> Result<(), ConvertError> {
        if self.txn.is_some() {
            return Err(ConvertError::NestedBegin);
        }
        let spool = Spool::new(self.hold_memory, self.spool_dir.clone());
        self.txn = Some(Txn { begin, changes: 0, sent_any: false, spool });
        Ok(())
    }

    fn commit(&mut self, commit: Commit) -> Result<(), ConvertError> {
        let txn = self.txn.take().ok_or(ConvertError::OutsideTransaction("a commit"))?;
        if !txn.sent_any {
            return Ok(());
        }
        let end = commit.end_lsn;
        let kind = if txn.changes > 0 { MessageKind::Data } else { MessageKind::Empty };
        let changes = u32::try_from(txn.changes).unwrap_or(u32::MAX);
        let finish = Finish { nextlsn: Some(end), kind, changes };
        let records = self.format == Format::Changes;
        let tail = match self.format {
            Format::Transactions => {
                let head = format!("{{\"nextlsn\":\"{end}\",\"change\":[");
                self.ready.extend([Part::Start(Start { nextlsn: Some(end) }), Part::Body(Bytes::from(head))]);
                "]}".to_owned()
            }
            Format::Changes => {
                let begin = format!("{{\"action\":\"B\",\"lsn\":\"{}\",\"nextlsn\":\"{end}\"}}", txn.begin.final_lsn);
                let kind = Finish { nextlsn: None, kind: MessageKind::Begin, changes: 0 };
                self.ready.extend(Part::whole(Start::default(), Bytes::from(begin), kind));
                format!("{{\"action\":\"C\",\"lsn\":\"{}\",\"nextlsn\":\"{end}\"}}", commit.commit_lsn)
            }
        };
        if txn.spool.spilled() {
            tracing::debug!(changes = txn.changes, nextlsn = %end, "a transaction larger than memory was held in a file");
        }
        let pieces = txn.spool.into_reader()?;
        self.drain = Some(Drain { pieces, records, tail: Bytes::from(tail), finish });
        Ok(())
    }

    fn relation(&mut self, r: &Relation) -> Result<(), ConvertError> {
        let schema: &[u8] = &r.namespace;
        let hidden = self.hidden_schemas.iter().any(|h| h[..] == *schema);
        let rel = Rel::new(r, hidden, |oid, typmod| self.types.get(oid, typmod))?;
        self.relations.insert(r.oid, rel);
        Ok(())
    }

    fn txn(&mut self, what: &'static str) -> Result<&mut Txn, ConvertError> {
        self.txn.as_mut().ok_or(ConvertError::OutsideTransaction(what))
    }

    fn change(&mut self, lsn: Lsn, relation: u32, change: Change<'_>) -> Result<(), ConvertError> {
        let rel = self.relations.get(&relation).ok_or(ConvertError::UnknownRelation(relation))?;
        let format = self.format;
        let txn = self.txn.as_mut().ok_or(ConvertError::OutsideTransaction("a change"))?;
        txn.sent_any = true;
        if rel.hidden {
            return Ok(());
        }
        let mut piece = Vec::with_capacity(256);
        if format == Format::Transactions && txn.changes > 0 {
            piece.push(b',');
        }
        let written = match format {
            Format::Transactions => rel.v1(&mut piece, change)?,
            Format::Changes => rel.v2(&mut piece, lsn, change)?,
        };
        if written {
            txn.changes += 1;
            txn.spool.push(&piece)?;
        }
        Ok(())
    }

    /// Format 1 prints nothing for a TRUNCATE (wal2json 2.5 compiles that code out);
    /// format 2 prints a record per table.
    fn truncate(&mut self, lsn: Lsn, relations: &[u32]) -> Result<(), ConvertError> {
        let format = self.format;
        let mut pieces = Vec::new();
        for oid in relations {
            let rel = self.relations.get(oid).ok_or(ConvertError::UnknownRelation(*oid))?;
            if format == Format::Changes && !rel.hidden {
                let mut piece = Vec::with_capacity(96);
                rel.v2_truncate(&mut piece, lsn);
                pieces.push(piece);
            }
        }
        let txn = self.txn("a truncate")?;
        txn.sent_any = true;
        for piece in pieces {
            txn.changes += 1;
            txn.spool.push(&piece)?;
        }
        Ok(())
    }

    fn message(&mut self, m: LogicalMessage) -> Result<(), ConvertError> {
        let mut piece = Vec::with_capacity(64 + m.prefix.len() + m.content.len());
        let txn = match (m.transactional, &mut self.txn) {
            (true, Some(txn)) => Some(txn),
            (true, None) => return Err(ConvertError::OutsideTransaction("a transactional message")),
            (false, _) => None,
        };
        let transactional: &[u8] = if m.transactional { b"true" } else { b"false" };
        match self.format {
            Format::Transactions => {
                match &txn {
                    Some(txn) if txn.changes > 0 => piece.push(b','),
                    Some(_) => {}
                    None => piece.extend_from_slice(b"{\"change\":["),
                }
                piece.extend_from_slice(b"{\"kind\":\"message\",\"transactional\":");
            }
            Format::Changes => {
                piece.extend_from_slice(
                    format!("{{\"action\":\"M\",\"lsn\":\"{}\",\"transactional\":", m.lsn).as_bytes(),
                );
            }
        }
        piece.extend_from_slice(transactional);
        piece.extend_from_slice(b",\"prefix\":");
        json::escape(&mut piece, &m.prefix);
        piece.extend_from_slice(b",\"content\":");
        json::escape(&mut piece, &m.content);
        piece.push(b'}');
        match txn {
            Some(txn) => {
                txn.sent_any = true;
                txn.changes += 1;
                txn.spool.push(&piece)?;
            }
            None => {
                if self.format == Format::Transactions {
                    piece.extend_from_slice(b"]}");
                }
                let lone = Finish { nextlsn: None, kind: MessageKind::Unackable, changes: 0 };
                self.ready.extend(Part::whole(Start::default(), Bytes::from(piece), lone));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
