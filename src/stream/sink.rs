//! The far end of a stream. The pump hands frames, in order, to a [`Sink`], and the sink
//! tells the pump which positions its consumer has taken for good: only those are
//! confirmed to Postgres. A websocket client is one sink ([`super::socket::WebSocket`]);
//! a message bus, which acks once a message is stored, is another.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::progress::Progress;
use super::pump::Outgoing;
use super::stop::Stop;
use crate::types::Lsn;

/// What a sink gets to work with.
pub struct Link {
    pub slot: String,
    /// The slot's confirmed position when the stream started: no ack may go below it.
    pub start: Lsn,
    pub frames: mpsc::Receiver<Outgoing>,
    /// Positions the consumer has taken; each must be a `nextlsn` the sink delivered.
    pub acks: mpsc::Sender<Lsn>,
    /// The session's record of acks and of how streams end.
    pub progress: Arc<Progress>,
    /// Stops every stage; the first reason given is the one the consumer is told.
    pub stop: Stop,
}

pub trait Sink: Send + 'static {
    /// Delivers frames until the stream stops (or stops it, when the consumer goes).
    fn run(self, link: Link) -> impl Future<Output = ()> + Send;
}
