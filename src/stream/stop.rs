//! Ending a stream: one token that every stage watches, and the first reason given.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Websocket close codes we use (RFC 6455 section 7.4.1).
pub mod code {
    /// Normal closure: the session was reset, or the client closed.
    pub const NORMAL: u16 = 1000;
    /// Going away: the server shuts down, or the peer stopped answering.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the websocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation: the token the stream was opened with has expired.
    pub const POLICY: u16 = 1008;
    /// A message too big for us.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error: Postgres ended the stream.
    pub const INTERNAL: u16 = 1011;
}

/// Cheap to clone; all clones stop together.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<(u16, String)>>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// Stops every stage. The first reason wins; later calls only make sure it is stopped.
    pub fn stop(&self, code: u16, reason: impl Into<String>) {
        let _ = self.reason.set((code, reason.into()));
        self.token.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once stopped. Cancel-safe.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// The close code and reason, once stopped.
    pub fn reason(&self) -> (u16, String) {
        self.reason.get().cloned().unwrap_or((code::NORMAL, String::new()))
    }
}
