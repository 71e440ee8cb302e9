//! Ending a stream: one token that every stage watches, and the first reason given.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Websocket close codes we use (RFC 6455 section 7.4.1).
pub mod code {
    /// Normal closure: the session was reset, or the client closed.
    pub(crate) const NORMAL: u16 = 1000;
    /// Going away: the server shuts down, or the peer stopped answering.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// The client broke the websocket protocol.
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8.
    pub(crate) const INVALID_DATA: u16 = 1007;
    /// Policy violation: the token the stream was opened with has expired.
    pub(crate) const POLICY: u16 = 1008;
    /// A message too big for us.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// Internal error: Postgres ended the stream.
    pub(crate) const INTERNAL: u16 = 1011;
}

/// Cheap to clone; all clones stop together.
#[derive(Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<(u16, String)>>,
    /// Stopping the parent stops this one too, with the parent's reason.
    parent: Option<Arc<Stop>>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    /// A stop of its own that stopping `self` also stops (with `self`'s reason): a
    /// stream's stop is a child of the server's, so that no stream outlives shutdown.
    /// Stopping the child leaves the parent running.
    pub fn child(&self) -> Stop {
        Stop { token: self.token.child_token(), reason: Arc::default(), parent: Some(Arc::new(self.clone())) }
    }

    /// Stops every stage. The first reason wins (a parent's, when it stopped first);
    /// later calls only make sure it is stopped.
    pub fn stop(&self, code: u16, reason: impl Into<String>) {
        if let Some(first) = self.token.is_cancelled().then(|| self.given()).flatten() {
            let _ = self.reason.set(first);
        }
        let _ = self.reason.set((code, reason.into()));
        self.token.cancel();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once stopped. Cancel-safe.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// The close code and reason, once stopped.
    pub fn reason(&self) -> (u16, String) {
        self.given().unwrap_or((code::NORMAL, String::new()))
    }

    /// Its own reason, else its parent's (set before the parent's token is cancelled,
    /// so a child stopped by its parent always finds it).
    fn given(&self) -> Option<(u16, String)> {
        self.reason.get().cloned().or_else(|| self.parent.as_ref()?.given())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_stops_with_its_parent_and_its_reason_but_not_the_other_way() {
        let server = Stop::new();
        let (a, b) = (server.child(), server.child());
        a.stop(code::NORMAL, "session dropped");
        assert!(a.is_stopped() && !server.is_stopped() && !b.is_stopped());
        server.stop(code::GOING_AWAY, "server shutting down");
        assert!(b.is_stopped());
        assert_eq!(b.reason(), (code::GOING_AWAY, "server shutting down".into()));
        b.stop(code::INTERNAL, "later");
        assert_eq!(b.reason().0, code::GOING_AWAY, "the first reason wins");
        assert_eq!(a.reason().0, code::NORMAL);
        let late = server.child();
        assert!(late.is_stopped(), "a child of a stopped parent starts stopped");
    }
}
