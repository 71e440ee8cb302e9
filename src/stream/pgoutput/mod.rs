//! pgoutput's messages rendered as the pieces wal2json would have sent for the same
//! changes, byte for byte, in both stream formats, so that everything after the plugin
//! (assembler, framer, acks) is the same for both plugins.
//!
//! wal2json's transaction head carries the transaction's end LSN (`nextlsn`), which
//! pgoutput only sends in its Commit. So a transaction's changes are rendered as they
//! arrive and held ([`spool`]) until its Commit; then the head, the changes and the
//! tail are handed out a piece at a time ([`Converter::next_piece`]), so that the
//! consumer takes them in bursts of its own size.
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
    spool: Spool,
}

/// A committed transaction being handed out.
struct Drain {
    pieces: SpoolReader,
    tail: Bytes,
}

pub struct Converter {
    format: Format,
    hidden_schemas: Vec<Vec<u8>>,
    hold_memory: usize,
    spool_dir: PathBuf,
    relations: HashMap<u32, Rel>,
    types: TypeNames,
    txn: Option<Txn>,
    ready: VecDeque<Bytes>,
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
    pub fn holds_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Drops the transaction held (Postgres failed to send all of it), and says where
    /// it ends: just past its commit record, an LSN that makes a stream started there
    /// skip it, and its xid.
    pub fn abandon_transaction(&mut self) -> Option<(Lsn, u32)> {
        let txn = self.txn.take()?;
        Some((Lsn(txn.begin.final_lsn.0.saturating_add(1)), txn.begin.xid))
    }

    /// Whether pieces are waiting for [`Converter::next_piece`]. Nothing more should be
    /// pushed until they are all taken.
    pub fn has_output(&self) -> bool {
        !self.ready.is_empty() || self.drain.is_some()
    }

    /// The next piece of wal2json output, in order.
    pub fn next_piece(&mut self) -> Result<Option<Bytes>, ConvertError> {
        if let Some(piece) = self.ready.pop_front() {
            return Ok(Some(piece));
        }
        let Some(drain) = &mut self.drain else { return Ok(None) };
        match drain.pieces.next_piece()? {
            Some(piece) => Ok(Some(piece)),
            None => Ok(self.drain.take().map(|d| d.tail)),
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
        self.txn = Some(Txn { begin, changes: 0, spool });
        Ok(())
    }

    fn commit(&mut self, commit: Commit) -> Result<(), ConvertError> {
        let txn = self.txn.take().ok_or(ConvertError::OutsideTransaction("a commit"))?;
        let end = commit.end_lsn;
        let (head, tail) = match self.format {
            Format::Transactions => (format!("{{\"nextlsn\":\"{end}\",\"change\":["), "]}".to_owned()),
            Format::Changes => (
                format!("{{\"action\":\"B\",\"lsn\":\"{}\",\"nextlsn\":\"{end}\"}}", txn.begin.final_lsn),
                format!("{{\"action\":\"C\",\"lsn\":\"{}\",\"nextlsn\":\"{end}\"}}", commit.commit_lsn),
            ),
        };
        if txn.spool.spilled() {
            tracing::debug!(changes = txn.changes, nextlsn = %end, "a transaction larger than memory was held in a file");
        }
        self.ready.push_back(Bytes::from(head));
        self.drain = Some(Drain { pieces: txn.spool.into_reader()?, tail: Bytes::from(tail) });
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
                txn.changes += 1;
                txn.spool.push(&piece)?;
            }
            None => {
                if self.format == Format::Transactions {
                    piece.extend_from_slice(b"]}");
                }
                self.ready.push_back(Bytes::from(piece));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
