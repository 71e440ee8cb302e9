//! What a session's streams have achieved, kept beyond any one connection: the last
//! ack and when it came. Read by the WAL-retention report; written by the socket reader.

use std::sync::Mutex;
use std::time::SystemTime;

use crate::types::Lsn;

#[derive(Debug, Default)]
pub struct Progress {
    last_ack: Mutex<Option<(Lsn, SystemTime)>>,
}

impl Progress {
    pub fn record_ack(&self, lsn: Lsn) {
        let mut last = self.last_ack.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((lsn, SystemTime::now()));
    }

    /// The last accepted ack and its time, if any client acked since this process started.
    pub fn last_ack(&self) -> Option<(Lsn, SystemTime)> {
        *self.last_ack.lock().unwrap_or_else(|e| e.into_inner())
    }
}
