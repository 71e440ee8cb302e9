//! What a session's streams have achieved, kept beyond any one connection: the last
//! ack and when it came, how the last stream ended, and running totals of what was
//! sent. Read by `GET /v1/sessions` and `/metrics`; written by the socket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::message::{Finish, MessageKind};
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
    /// Counted per frame by the sink: atomics, so that counting costs no lock.
    changes: AtomicU64,
    transactions: AtomicU64,
    skipped: AtomicU64,
    bytes_sent: AtomicU64,
    acks: AtomicU64,
    clients: AtomicU64,
}

/// The totals of a session since this process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Changes (rows inserted, updated, deleted, truncated) sent to clients.
    pub changes: u64,
    /// Transactions sent: each frame that ends one.
    pub transactions: u64,
    /// Error records sent: transactions Postgres could not decode, skipped.
    pub skipped: u64,
    /// Payload bytes of the frames sent.
    pub bytes_sent: u64,
    /// Acks accepted.
    pub acks: u64,
    /// Clients streaming the session through this process now (0 or 1).
    pub clients: u64,
}

impl Progress {
    pub(crate) fn record_ack(&self, lsn: Lsn) {
        *lock(&self.last_ack) = Some((lsn, SystemTime::now()));
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame of `bytes` the client has been sent; `end`: how the message it
    /// completes finished.
    pub(crate) fn record_sent(&self, bytes: usize, end: Option<&Finish>) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        let Some(end) = end else { return };
        if end.kind.is_ack_point() {
            self.transactions.fetch_add(1, Ordering::Relaxed);
            self.changes.fetch_add(u64::from(end.changes), Ordering::Relaxed);
        }
        if end.kind == MessageKind::Failed {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a client from now until the guard is dropped.
    pub fn connected(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(Arc::clone(self))
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            changes: self.changes.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            clients: self.clients.load(Ordering::Relaxed),
        }
    }

    /// The last accepted ack and its time, if any client acked since this process started.
    pub fn last_ack(&self) -> Option<(Lsn, SystemTime)> {
        *lock(&self.last_ack)
    }

    pub(crate) fn record_close(&self, by: Closer, code: u16, reason: &str) {
        *lock(&self.last_close) = Some(Close { by, code, reason: reason.to_owned(), at: SystemTime::now() });
    }

    /// How the last stream of this session ended, since this process started.
    pub(crate) fn last_close(&self) -> Option<Close> {
        lock(&self.last_close).clone()
    }
}

/// A connected client, counted while it lives.
pub struct ClientGuard(Arc<Progress>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
