//! The one error type the server's layers share. Each error has a kind, which the
//! HTTP layer turns into a status code, and a message written for the person reading it.

use std::fmt;
use std::sync::Arc;

use tokio_postgres::error::SqlState;

use crate::pg::PgError;
use crate::pg::pool::PoolError;
use crate::pg::version::Major;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed (400).
    BadRequest,
    /// The request names something that is off limits (403).
    Forbidden,
    /// The request names something that does not exist (404).
    NotFound,
    /// The request conflicts with the state of the server (409), e.g. no session yet.
    Conflict,
    /// The request body is too large (413).
    PayloadTooLarge,
    /// The request body is not declared as JSON (415).
    UnsupportedMediaType,
    /// The request names a host that is not this server (421): DNS rebinding.
    MisdirectedRequest,
    /// What the request asks for existed but is no longer kept (410), e.g. a resume
    /// from before what a JetStream stream retains.
    Gone,
    /// The caller has as many of something running as it may have (429): its own
    /// share, not the server's, is used up.
    TooMany,
    /// Postgres cannot be reached or is out of a resource; try again later (503).
    Unavailable,
    /// A query ran past its statement timeout (504).
    Timeout,
    /// Anything else, with the database's message (500).
    Internal,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// What went wrong underneath, for logs and `Error::source`.
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// Fields a client can act on, beside the message (an object).
    pub details: Option<serde_json::Value>,
}

/// Two errors are the same when they say the same: the source is detail.
impl PartialEq for Error {
    fn eq(&self, other: &Error) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), source: None, details: None }
    }

    /// The same error with fields of its own in the JSON a client gets (`details` is
    /// an object: its fields go beside `error`).
    pub(crate) fn with_details(mut self, details: serde_json::Value) -> Error {
        self.details = Some(details);
        self
    }

    pub(crate) fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Arc::new(source));
        self
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::BadRequest, message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// An error from a replication connection, with advice for the usual
    /// misconfigurations.
    pub(crate) fn from_pg(e: &PgError) -> Error {
        Error::from_pg_on(e, None)
    }

    /// [`Error::from_pg`], from a server of `major` when known: the advice names its
    /// packages.
    pub(crate) fn from_pg_on(e: &PgError, major: Option<Major>) -> Error {
        // A TLS failure is a matter of configuration (here or on the server): retrying
        // does not help, so it is not a 503.
        if let PgError::Tls(m) = e {
            return Error::internal(format!("cannot connect to Postgres: {m}"));
        }
        if e.is_unavailable() {
            return Error::new(ErrorKind::Unavailable, format!("Postgres is unavailable: {e}"));
        }
        let said = e.to_string();
        let Some(code) = e.code().map(SqlState::from_code) else {
            return Error::internal(format!("Postgres error: {e}"));
        };
        let wal2json_missing;
        let (kind, advice) = if code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE && said.contains("wal_level") {
            (
                ErrorKind::Internal,
                "logical decoding is off on the Postgres server: set wal_level = logical in postgresql.conf and restart Postgres",
            )
        } else if code == SqlState::UNDEFINED_FILE {
            let major = major.map_or_else(|| "<major>".to_owned(), |m| m.to_string());
            wal2json_missing = format!(
                "the wal2json output plugin is not installed on the Postgres server (e.g. apt-get install \
                 postgresql-{major}-wal2json), or use \"plugin\": \"pgoutput\""
            );
            (ErrorKind::Internal, wal2json_missing.as_str())
        } else if code == SqlState::INSUFFICIENT_PRIVILEGE && said.contains("may not be used as an output plugin") {
            (
                ErrorKind::Internal,
                "Postgres does not trust wal2json as an output plugin: add it to output_plugin_libraries in postgresql.conf \
                 (e.g. output_plugin_libraries = 'pgoutput, test_decoding, wal2json') and reload",
            )
        } else if code == SqlState::INSUFFICIENT_PRIVILEGE {
            (
                ErrorKind::Internal,
                "the configured user may not replicate: it needs the REPLICATION attribute (ALTER ROLE ... REPLICATION) or superuser",
            )
        } else if code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION && said.contains("no encryption") {
            (ErrorKind::Internal, TLS_ONLY)
        } else if code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            (
                ErrorKind::Internal,
                "Postgres refused the replication connection: pg_hba.conf needs a 'replication' line for this user and host",
            )
        } else if code == SqlState::CONFIGURATION_LIMIT_EXCEEDED {
            (
                ErrorKind::Unavailable,
                "all replication slots are in use: drop unused slots or raise max_replication_slots",
            )
        } else if code == SqlState::TOO_MANY_CONNECTIONS {
            (
                ErrorKind::Unavailable,
                "Postgres has no free connection or WAL sender: raise max_connections / max_wal_senders",
            )
        } else if code == SqlState::INVALID_CATALOG_NAME {
            (ErrorKind::Internal, "the configured database does not exist (DBNAME)")
        } else if code == SqlState::INVALID_PASSWORD {
            (ErrorKind::Internal, "password authentication failed (PGUSER / PGPASSWORD)")
        } else {
            return Error::internal(format!("Postgres error: {e}"));
        };
        Error::new(kind, format!("{advice} (server said: {e})"))
    }

    /// An error from an ordinary tokio-postgres connection.
    pub(crate) fn from_tokio_pg(e: &tokio_postgres::Error) -> Error {
        let msg = crate::pg::snapshot::describe(e);
        let Some(code) = e.code() else {
            // No SQLSTATE: the connection itself failed.
            return Error::new(ErrorKind::Unavailable, format!("Postgres is unavailable: {msg}"));
        };
        let unavailable = [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW];
        if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            Error::new(ErrorKind::Forbidden, format!("permission denied: {msg}"))
        } else if unavailable.contains(code) {
            Error::new(ErrorKind::Unavailable, format!("Postgres is unavailable: {msg}"))
        } else if *code == SqlState::TOO_MANY_CONNECTIONS {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Postgres has no free connection: raise max_connections, or lower --pg-pool-size (server said: {msg})"
                ),
            )
        } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION && msg.contains("no encryption") {
            Error::internal(format!("{TLS_ONLY} (server said: {msg})"))
        } else {
            Error::internal(format!("Postgres error: {msg}"))
        }
    }

    /// No connection from the pool: all busy (503, retry), or a new one failed.
    pub(crate) fn from_pool(e: &PoolError) -> Error {
        match e {
            PoolError::Busy { .. } | PoolError::ReadsBusy { .. } => Error::new(ErrorKind::Unavailable, e.to_string()),
            PoolError::Connect(e) => Error::from_tokio_pg(e),
            // Configuration, here or on the server: a retry would not help (not a 503).
            PoolError::Tls(m) => Error::internal(format!("cannot connect to Postgres: {m}")),
            PoolError::NoVersion => Error::internal(e.to_string()),
        }
    }
}

/// Advice for a pg_hba.conf that rejects a connection with "no encryption".
const TLS_ONLY: &str =
    "Postgres takes only TLS connections from here: set PGSSLMODE to prefer, require, verify-ca or verify-full";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<PgError> for Error {
    fn from(e: PgError) -> Error {
        Error::from_pg(&e).with_source(e)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::from_tokio_pg(&e).with_source(e)
    }
}

impl From<PoolError> for Error {
    fn from(e: PoolError) -> Error {
        Error::from_pool(&e).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::error::DbError;

    fn db(code: &str, message: &str) -> PgError {
        PgError::Db(DbError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            ..DbError::default()
        })
    }

    /// Maps the error, checks its kind, and that the message carries both the advice
    /// and what the server said.
    #[track_caller]
    fn check(e: PgError, kind: ErrorKind, advice: &str) -> Error {
        let said = e.to_string();
        let mapped = Error::from_pg(&e);
        assert_eq!(mapped.kind, kind, "{mapped}");
        assert!(mapped.message.contains(advice), "no {advice:?} in {:?}", mapped.message);
        assert!(mapped.message.contains(&said), "the server's words {said:?} are lost in {:?}", mapped.message);
        assert_eq!(mapped.to_string(), mapped.message);
        mapped
    }

    #[test]
    fn wal_level_off() {
        check(
            db("55000", "logical decoding requires wal_level >= logical"),
            ErrorKind::Internal,
            "set wal_level = logical",
        );
    }

    #[test]
    fn other_object_not_in_prerequisite_state_is_a_plain_postgres_error() {
        let e = Error::from_pg(&db("55000", "replication slot \"x\" was not created in this database"));
        assert_eq!(e.kind, ErrorKind::Internal);
        assert_eq!(e.message, "Postgres error: replication slot \"x\" was not created in this database");
    }

    #[test]
    fn plugin_not_installed() {
        check(
            db("58P01", "could not access file \"wal2json\": No such file or directory"),
            ErrorKind::Internal,
            "wal2json output plugin is not installed",
        );
    }

    #[test]
    fn plugin_not_trusted() {
        let e = check(
            db("42501", "permission denied: \"wal2json\" may not be used as an output plugin"),
            ErrorKind::Internal,
            "output_plugin_libraries",
        );
        assert!(!e.message.contains("REPLICATION attribute"), "{e}");
    }

    #[test]
    fn role_may_not_replicate() {
        // PostgreSQL 15 and earlier.
        let e = check(
            db("42501", "must be superuser or replication role to start walsender"),
            ErrorKind::Internal,
            "REPLICATION attribute",
        );
        assert!(!e.message.contains("output_plugin_libraries"), "{e}");
        // PostgreSQL 16 and later.
        check(
            PgError::Db(DbError {
                severity: "FATAL".into(),
                code: "42501".into(),
                message: "permission denied to start WAL sender".into(),
                detail: Some("Only roles with the REPLICATION attribute may start a WAL sender process.".into()),
                hint: None,
            }),
            ErrorKind::Internal,
            "ALTER ROLE ... REPLICATION",
        );
    }

    #[test]
    fn out_of_replication_slots_is_unavailable() {
        check(db("53400", "all replication slots are in use"), ErrorKind::Unavailable, "raise max_replication_slots");
    }

    #[test]
    fn unreachable_server_is_unavailable() {
        let e = PgError::Connect {
            address: "127.0.0.1:1".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused"),
        };
        let mapped = Error::from_pg(&e);
        assert_eq!(mapped.kind, ErrorKind::Unavailable);
        assert!(mapped.message.starts_with("Postgres is unavailable: "), "{mapped}");
        assert!(mapped.message.contains("127.0.0.1:1"), "{mapped}");
        assert!(mapped.message.contains("Connection refused"), "{mapped}");
    }

    #[test]
    fn lost_connection_and_shutdown_are_unavailable() {
        let io = PgError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof"));
        assert_eq!(Error::from_pg(&io).kind, ErrorKind::Unavailable);
        for code in ["57P01", "57P02", "57P03"] {
            let e = Error::from_pg(&db(code, "terminating connection"));
            assert_eq!(e.kind, ErrorKind::Unavailable, "{code}");
            assert!(e.message.starts_with("Postgres is unavailable: "), "{code}: {e}");
        }
    }
}
