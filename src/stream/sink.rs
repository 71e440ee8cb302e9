//! The far end of a stream, and the contract between it and the source (the pump, or a
//! gateway's feed).
//!
//! The source hands [`Outgoing`] items, in order, to a [`Sink`]: batches of message
//! parts ([`super::message`]), then perhaps how the stream ends. The sink cuts the
//! messages as its medium needs (a websocket by `--frame-size`, JetStream by
//! `max_payload`) and tells the source which positions its consumer has taken for good:
//! only those are confirmed to Postgres. Each position it reports must be the ack point
//! of a message it delivered ([`super::message::Finish::ack_point`]), at or after
//! [`Link::start`]. A websocket client is one sink ([`super::socket::WebSocket`]); a
//! message bus, which acks once a message is stored, is another; an observer
//! ([`super::observer`]) confirms what it is handed.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::message::Part;
use super::progress::Progress;
use super::stop::Stop;
use crate::types::Lsn;

/// What the source hands to the sink.
#[derive(Debug)]
pub enum Outgoing {
    /// Parts of messages in stream order. A batch may end inside a message; the next
    /// batch goes on with it.
    Parts(Vec<Part>),
    /// Postgres ended the stream with this message; the client gets it as an error
    /// message and a close (1011).
    Fatal(String),
    /// The source ended the stream for a reason of its own (e.g. a JetStream stream
    /// that no longer holds what comes next): an error message, then a close with `code`.
    End { code: u16, message: String },
}

impl Outgoing {
    /// The last position in this item that a consumer could ack.
    pub(crate) fn last_ack_point(&self) -> Option<Lsn> {
        match self {
            Outgoing::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Finish(f) => f.ack_point(),
                    _ => None,
                })
                .max(),
            Outgoing::Fatal(_) | Outgoing::End { .. } => None,
        }
    }
}

/// What a sink gets to work with.
pub struct Link {
    pub slot: String,
    /// The slot's confirmed position when the stream started: no ack may go below it.
    pub start: Lsn,
    pub messages: mpsc::Receiver<Outgoing>,
    /// Positions the consumer has taken; each must be a `nextlsn` the sink delivered.
    pub acks: mpsc::Sender<Lsn>,
    /// The session's record of acks and of how streams end.
    pub progress: Arc<Progress>,
    /// Stops every stage; the first reason given is the one the consumer is told.
    pub stop: Stop,
}

pub trait Sink: Send + 'static {
    /// Delivers messages until the stream stops (or stops it, when the consumer goes).
    fn run(self, link: Link) -> impl Future<Output = ()> + Send;
}
