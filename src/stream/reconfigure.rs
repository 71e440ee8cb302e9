//! A running stream told to stream with another filter (`PATCH /v2/sessions/{name}`):
//! the pump takes the command at the next transaction boundary, restarts the stream in
//! place from the switch point with the new options and goes on with the new decoder.
//!
//! The switch point is the furthest the stream has got: the last transaction or
//! logical message read, or the walsender's last keepalive if later. Postgres skips
//! what was decoded before the position a stream starts at, so the client is sent
//! nothing twice (every transaction and message it was sent lies before it) and misses
//! nothing (everything after it comes again, through the new filter). The slot's
//! confirmed position stays the client's acks, so after a crash the usual at-least-once
//! replay from the last ack applies.

use tokio::sync::{mpsc, oneshot};

use super::decode::PluginDecoder;
use crate::pg::replication::ReplicationConnection;
use crate::types::Lsn;

/// Stream with `options` from the next transaction boundary on, on `connection` (a
/// walsender streams a slot once per connection), decoding with `decoder`.
pub(crate) struct Reconfigure {
    pub options: Vec<(&'static str, String)>,
    pub decoder: PluginDecoder,
    /// Whether application messages now reach the client, and which DDL events
    /// ([`super::marks`]).
    pub app_messages: bool,
    pub ddl: Option<super::ddl::Ddl>,
    pub connection: ReplicationConnection,
    /// Where the new stream starts and its walsender, or why the switch failed (the
    /// stream then ends).
    pub done: oneshot::Sender<Result<Switched, String>>,
}

/// A stream switched to a new filter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Switched {
    pub at: Lsn,
    pub walsender: Option<i32>,
}

/// How a running stream is sent [`Reconfigure`] commands.
pub(crate) type Reconfigurer = mpsc::Sender<Reconfigure>;

/// The pump's end: a stream that is never reconfigured has none.
pub(crate) type Commands = Option<mpsc::Receiver<Reconfigure>>;

/// The next command, when there is a channel; never otherwise.
pub(crate) async fn next(commands: &mut Commands) -> Option<Reconfigure> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
