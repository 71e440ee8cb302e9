//! Errors on the streaming path, by what to do about them.
//!
//! A stream that ends makes its client reconnect and the slot retain WAL meanwhile, so
//! it should end only for what waiting cannot mend. A pool that is busy for a moment, a
//! lookup that timed out, a connection that broke: those are [`StreamError::Transient`],
//! and the pump tries again (for a bounded time) while it keeps serving acks and
//! status updates. What the stream holds or what Postgres refuses comes back however
//! often it is tried: [`StreamError::Fatal`] ends the stream at once.

use crate::pg::pool::PoolError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StreamError {
    /// A passing state of the server or the network: trying again may succeed.
    #[error("{0}")]
    Transient(String),
    /// Trying again would fail the same way.
    #[error("{0}")]
    Fatal(String),
}

impl StreamError {
    /// The same kind of error, its message prefixed with what was being done.
    pub fn context(self, what: &str) -> StreamError {
        match self {
            StreamError::Transient(e) => StreamError::Transient(format!("{what}: {e}")),
            StreamError::Fatal(e) => StreamError::Fatal(format!("{what}: {e}")),
        }
    }

    pub fn fatal(e: impl std::fmt::Display) -> StreamError {
        StreamError::Fatal(e.to_string())
    }
}

impl From<PoolError> for StreamError {
    fn from(e: PoolError) -> StreamError {
        match e {
            // Every connection is taken, or Postgres could not be reached: both pass.
            PoolError::Busy { .. } | PoolError::ReadsBusy { .. } | PoolError::Connect(_) => {
                StreamError::Transient(e.to_string())
            }
            // A certificate that does not verify will not verify on the next try.
            PoolError::Tls(_) | PoolError::NoVersion => StreamError::Fatal(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for StreamError {
    /// What Postgres answered is its verdict on the query; anything else (a closed
    /// connection, a timeout) is the way there.
    fn from(e: tokio_postgres::Error) -> StreamError {
        match e.as_db_error() {
            Some(_) => StreamError::Fatal(e.to_string()),
            None => StreamError::Transient(e.to_string()),
        }
    }
}
