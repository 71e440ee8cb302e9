//! The plugin's output as messages ([`Part`]s), whatever the plugin: the one place the
//! pump meets the difference. wal2json's payloads are text that the [`Assembler`]
//! classifies; pgoutput's messages go through the [`Converter`], which knows what each
//! message is, may hold a transaction until its commit and then hand out many parts
//! for one payload.

use std::collections::VecDeque;

use bytes::Bytes;

use super::error::StreamError;
use super::frame::{self, Assembler, Failure, Format};
use super::message::Part;
use super::partitions::Relabel;
use super::pgoutput::{Converter, types};
use crate::pg::pgoutput;
use crate::pg::pool::Pool;
use crate::types::Lsn;

pub(crate) enum PluginDecoder {
    Wal2json(Box<Wal2jsonDecoder>),
    Pgoutput(Box<PgoutputDecoder>),
}

pub(crate) struct Wal2jsonDecoder {
    assembler: Assembler,
    /// Payloads not classified yet.
    pieces: VecDeque<Bytes>,
    /// Parts classified and not taken yet.
    parts: VecDeque<Part>,
    /// Names partitions' changes by their listed table, when the session lists a
    /// partitioned one.
    relabel: Option<Relabel>,
}

pub(crate) struct PgoutputDecoder {
    pub converter: Converter,
    /// For the names of column types.
    pub pool: Pool,
}

/// Where a transaction that Postgres failed to decode ends, and the error record that
/// tells the client.
pub(crate) struct Abandoned {
    pub nextlsn: Lsn,
    pub xid: Option<u32>,
    pub record: Vec<Part>,
}

impl PluginDecoder {
    pub fn wal2json(format: Format, relabel: Option<Relabel>) -> PluginDecoder {
        PluginDecoder::Wal2json(Box::new(Wal2jsonDecoder {
            assembler: Assembler::new(format),
            pieces: VecDeque::new(),
            parts: VecDeque::new(),
            relabel,
        }))
    }

    pub fn pgoutput(converter: Converter, pool: Pool) -> PluginDecoder {
        PluginDecoder::Pgoutput(Box::new(PgoutputDecoder { converter, pool }))
    }

    /// Takes one XLogData payload; `wal_start` is the XLogData's start position. On an
    /// error nothing of it was taken: a [`StreamError::Transient`] one may be fed again.
    pub async fn feed(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), StreamError> {
        match self {
            PluginDecoder::Wal2json(w) => match &mut w.relabel {
                None => {
                    w.pieces.push_back(data);
                    Ok(())
                }
                Some(relabel) => {
                    w.pieces.extend(relabel.piece(data).await?);
                    Ok(())
                }
            },
            PluginDecoder::Pgoutput(p) => p.feed(wal_start, data).await.map_err(|e| e.context("pgoutput")),
        }
    }

    /// Parts are waiting: take them before feeding more.
    pub(crate) fn has_output(&self) -> bool {
        match self {
            PluginDecoder::Wal2json(w) => !w.parts.is_empty() || !w.pieces.is_empty(),
            PluginDecoder::Pgoutput(p) => p.converter.has_output(),
        }
    }

    /// Part of a transaction was read and is held here, none of it handed out.
    pub(crate) fn holds_transaction(&self) -> bool {
        match self {
            PluginDecoder::Wal2json(..) => false,
            PluginDecoder::Pgoutput(p) => p.converter.holds_transaction(),
        }
    }

    /// Postgres failed in the middle of a transaction: drops what is held of it and
    /// says where it ends (an LSN from which a stream skips it), with the error record
    /// that ends its message. pgoutput holds a transaction until its commit, so none of
    /// it went out; wal2json hands its pieces on as they come, and the assembler knows
    /// where its transaction ends. None when no transaction is under way, or where it
    /// ends is not known.
    pub(crate) fn abandon_transaction(&mut self, error: &str) -> Option<Abandoned> {
        match self {
            PluginDecoder::Wal2json(w) => {
                let nextlsn = w.assembler.open_transaction()?;
                let record = w.assembler.error_record(nextlsn, None, error);
                Some(Abandoned { nextlsn, xid: None, record })
            }
            PluginDecoder::Pgoutput(p) => {
                let (nextlsn, xid) = p.converter.abandon_transaction()?;
                let failure = Failure { open: false, changes: 0, nextlsn, xid: Some(xid), error };
                let record = frame::error_record(p.converter.format(), failure);
                Some(Abandoned { nextlsn, xid: Some(xid), record })
            }
        }
    }

    /// The next part of the stream's messages. Every body is UTF-8 ([`frame::utf8`]).
    pub fn next_part(&mut self) -> Result<Option<Part>, StreamError> {
        match self {
            PluginDecoder::Wal2json(w) => loop {
                if let Some(part) = w.parts.pop_front() {
                    return Ok(Some(part));
                }
                let Some(piece) = w.pieces.pop_front() else { return Ok(None) };
                w.assembler.push(piece, &mut w.parts).map_err(StreamError::fatal)?;
            },
            PluginDecoder::Pgoutput(p) => match p.converter.next_part() {
                Ok(Some(Part::Body(body))) => Ok(Some(Part::Body(frame::utf8(body).map_err(StreamError::fatal)?))),
                Ok(part) => Ok(part),
                Err(e) => Err(StreamError::Fatal(format!("pgoutput: {e}"))),
            },
        }
    }
}

impl PgoutputDecoder {
    async fn feed(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), StreamError> {
        // PostgreSQL 13's walsender sends some empty XLogData (seen in the conformance
        // workload's transactions): nothing is in them to decode.
        if data.is_empty() {
            return Ok(());
        }
        let message = pgoutput::parse(data).map_err(StreamError::fatal)?;
        let missing = self.converter.missing_types(&message);
        if !missing.is_empty() {
            let names = types::lookup(&self.pool, &missing).await?;
            for ((oid, typmod), name) in missing.into_iter().zip(names) {
                self.converter.add_type(oid, typmod, &name);
            }
        }
        self.converter.push(wal_start, message).map_err(StreamError::fatal)
    }
}
