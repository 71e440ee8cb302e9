//! Messages: what the decoders hand to the sinks.
//!
//! A message is what a websocket client receives as one text message: a transaction in
//! format 1, a record in format 2, a non-transactional logical message, an error
//! record. The decoders (the wal2json [`super::frame::Assembler`], the pgoutput
//! [`super::pgoutput::Converter`]) know where each starts and ends, and what it means
//! for acks, so they say it once, as [`Part`]s:
//!
//! ```text
//!   Start { nextlsn }  Body(bytes)  Body(bytes) ...  Finish { nextlsn, kind, changes }
//! ```
//!
//! The bodies are the plugin's bytes as they came (zero-copy `Bytes`), valid UTF-8,
//! and their concatenation is the message. How a message is cut for the wire is each
//! sink's business: the websocket sink frames it by `--frame-size`
//! ([`super::framer`]), the JetStream publisher by NATS's `max_payload`. Nobody after
//! the decoder reads the text again to learn what it means.

use bytes::Bytes;

use crate::types::Lsn;

/// One part of a message, in stream order: a start, bodies, a finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Start(Start),
    /// The next bytes of the message's text.
    Body(Bytes),
    Finish(Finish),
}

impl Part {
    /// A message that is one body.
    pub fn whole(start: Start, body: Bytes, finish: Finish) -> [Part; 3] {
        [Part::Start(start), Part::Body(body), Part::Finish(finish)]
    }

    pub fn body(&self) -> Option<&Bytes> {
        match self {
            Part::Body(bytes) => Some(bytes),
            _ => None,
        }
    }
}

/// What is known when a message starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Start {
    /// The `nextlsn` its [`Finish`] will carry as an ack point, when the message's head
    /// names it (a format 1 transaction's head does): a sink that sends the message in
    /// pieces before its end has been decoded can say which transaction each piece is of.
    pub nextlsn: Option<Lsn>,
}

/// What is known when a message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// The transaction's end LSN, on a message that ends a transaction (an ack point).
    pub nextlsn: Option<Lsn>,
    pub kind: MessageKind,
    /// How many changes the transaction carried (counted for `/metrics`); 0 on a
    /// message that ends none.
    pub changes: u32,
}

impl Finish {
    /// The position a consumer may ack once it has this message.
    pub(crate) fn ack_point(&self) -> Option<Lsn> {
        self.nextlsn.filter(|_| self.kind.is_ack_point())
    }
}

/// What a message means for acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// The end of a transaction with changes: the client must ack its `nextlsn`.
    Data,
    /// The end of a transaction with no changes (DDL only, TRUNCATE in v1, filtered):
    /// nothing to lose.
    Empty,
    /// A non-transactional logical message: no `nextlsn`, so no ack can cover it by
    /// itself; a later transaction's ack does.
    Unackable,
    /// A record inside a transaction (format 2): nothing to ack yet.
    Inside,
    /// The begin record of a transaction (format 2): like [`MessageKind::Inside`].
    Begin,
    /// An error record: a transaction Postgres could not decode, skipped
    /// ([`super::frame::error_record`]). The client must ack its `nextlsn` like a
    /// transaction's.
    Failed,
}

impl MessageKind {
    /// Whether the message ends something the client can ack (its `nextlsn` counts as
    /// delivered once it is sent).
    pub fn is_ack_point(self) -> bool {
        matches!(self, MessageKind::Data | MessageKind::Empty | MessageKind::Failed)
    }

    /// Whether the client must ack the message's `nextlsn` before the slot moves past it.
    pub(crate) fn must_ack(self) -> bool {
        matches!(self, MessageKind::Data | MessageKind::Failed)
    }
}
