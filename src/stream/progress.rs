//! What a session's streams have achieved, kept beyond any one connection: the last
//! ack and when it came, and how the last stream ended. Read by `GET /v1/sessions`;
//! written by the socket.

use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::types::Lsn;

/// How a stream ended: the close code and reason, and which side closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// `client` when the client sent the close frame (its code and reason), `server`
    /// when we ended the stream (the code and reason we sent).
    pub by: Closer,
    pub code: u16,
    pub reason: String,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Closer {
    Client,
    Server,
}

#[derive(Debug, Default)]
pub struct Progress {
    last_ack: Mutex<Option<(Lsn, SystemTime)>>,
    last_close: Mutex<Option<Close>>,
}

impl Progress {
    pub fn record_ack(&self, lsn: Lsn) {
        *lock(&self.last_ack) = Some((lsn, SystemTime::now()));
    }

    /// The last accepted ack and its time, if any client acked since this process started.
    pub fn last_ack(&self) -> Option<(Lsn, SystemTime)> {
        *lock(&self.last_ack)
    }

    pub fn record_close(&self, by: Closer, code: u16, reason: &str) {
        *lock(&self.last_close) = Some(Close { by, code, reason: reason.to_owned(), at: SystemTime::now() });
    }

    /// How the last stream of this session ended, since this process started.
    pub fn last_close(&self) -> Option<Close> {
        lock(&self.last_close).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
