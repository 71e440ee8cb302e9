//! The plugin's output as wal2json pieces, whatever the plugin: the one place the pump
//! meets the difference. wal2json's payloads are pieces already; pgoutput's messages
//! go through the [`Converter`], which may hold a transaction until its commit and
//! then hand out many pieces for one message.

use std::collections::VecDeque;

use bytes::Bytes;

use super::partitions::Relabel;
use super::pgoutput::{Converter, types};
use crate::pg::pgoutput;
use crate::pg::pool::Pool;
use crate::types::Lsn;

pub enum PluginDecoder {
    /// wal2json's pieces, and the stage that names partitions' changes by their listed
    /// table, when the session lists a partitioned one.
    Wal2json(VecDeque<Bytes>, Option<Box<Relabel>>),
    Pgoutput(Box<PgoutputDecoder>),
}

pub struct PgoutputDecoder {
    pub converter: Converter,
    /// For the names of column types.
    pub pool: Pool,
}

impl PluginDecoder {
    pub fn wal2json(relabel: Option<Relabel>) -> PluginDecoder {
        PluginDecoder::Wal2json(VecDeque::new(), relabel.map(Box::new))
    }

    pub fn pgoutput(converter: Converter, pool: Pool) -> PluginDecoder {
        PluginDecoder::Pgoutput(Box::new(PgoutputDecoder { converter, pool }))
    }

    /// Takes one XLogData payload; `wal_start` is the XLogData's start position.
    pub async fn feed(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), String> {
        match self {
            PluginDecoder::Wal2json(pieces, None) => {
                pieces.push_back(data);
                Ok(())
            }
            PluginDecoder::Wal2json(pieces, Some(relabel)) => {
                pieces.extend(relabel.piece(data).await?);
                Ok(())
            }
            PluginDecoder::Pgoutput(p) => p.feed(wal_start, data).await.map_err(|e| format!("pgoutput: {e}")),
        }
    }

    /// Pieces are waiting: take them before feeding more.
    pub fn has_output(&self) -> bool {
        match self {
            PluginDecoder::Wal2json(pieces, _) => !pieces.is_empty(),
            PluginDecoder::Pgoutput(p) => p.converter.has_output(),
        }
    }

    /// Part of a transaction was read and is held here, none of it handed out.
    pub fn holds_transaction(&self) -> bool {
        match self {
            PluginDecoder::Wal2json(..) => false,
            PluginDecoder::Pgoutput(p) => p.converter.holds_transaction(),
        }
    }

    /// Postgres failed in the middle of a transaction: drops what is held of it and,
    /// when this decoder held it (pgoutput holds a transaction until its commit), says
    /// where it ends (an LSN from which a stream skips it) and its xid. wal2json hands
    /// its pieces on as they come: the assembler knows where its transaction ends.
    pub fn abandon_transaction(&mut self) -> Option<(Lsn, Option<u32>)> {
        match self {
            PluginDecoder::Wal2json(..) => None,
            PluginDecoder::Pgoutput(p) => p.converter.abandon_transaction().map(|(lsn, xid)| (lsn, Some(xid))),
        }
    }

    pub fn next_piece(&mut self) -> Result<Option<Bytes>, String> {
        match self {
            PluginDecoder::Wal2json(pieces, _) => Ok(pieces.pop_front()),
            PluginDecoder::Pgoutput(p) => p.converter.next_piece().map_err(|e| format!("pgoutput: {e}")),
        }
    }
}

impl PgoutputDecoder {
    async fn feed(&mut self, wal_start: Lsn, data: Bytes) -> Result<(), String> {
        let message = pgoutput::parse(data).map_err(|e| e.to_string())?;
        let missing = self.converter.missing_types(&message);
        if !missing.is_empty() {
            let names = types::lookup(&self.pool, &missing).await?;
            for ((oid, typmod), name) in missing.into_iter().zip(names) {
                self.converter.add_type(oid, typmod, &name);
            }
        }
        self.converter.push(wal_start, message).map_err(|e| e.to_string())
    }
}
