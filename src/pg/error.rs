//! Errors from Postgres, kept close to what the server said.

use std::fmt;

/// An ErrorResponse (or NoticeResponse) from the server, with the fields people read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DbError {
    pub severity: String,
    /// The SQLSTATE, e.g. `42704`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl DbError {
    /// Reads the fields of an ErrorResponse or NoticeResponse body.
    /// Malformed fields are skipped: a server message must never make us panic.
    pub(crate) fn from_fields(mut fields: postgres_protocol::message::backend::ErrorFields<'_>) -> DbError {
        use fallible_iterator::FallibleIterator;
        let mut e = DbError::default();
        while let Ok(Some(field)) = fields.next() {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => e.severity = value,
                b'S' if e.severity.is_empty() => e.severity = value,
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
        }
        e
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " Hint: {h}")?;
        }
        Ok(())
    }
}

/// Anything that can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach Postgres at {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("connection to Postgres lost: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("{0}")]
    Db(DbError),
    /// The server said something we did not expect at this point.
    #[error("unexpected reply from Postgres: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    /// TLS was refused, failed, or the server's certificate did not verify.
    #[error("{0}")]
    Tls(String),
}

impl PgError {
    /// The SQLSTATE when the server reported one.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgError::Db(e) => Some(&e.code),
            _ => None,
        }
    }

    /// True when the problem is reaching the server rather than something it said:
    /// worth a 503 and a retry.
    pub(crate) fn is_unavailable(&self) -> bool {
        match self {
            PgError::Connect { .. } | PgError::Io(_) => true,
            PgError::Db(e) => {
                use tokio_postgres::error::SqlState;
                let code = SqlState::from_code(&e.code);
                [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW].contains(&code)
            }
            _ => false,
        }
    }
}
