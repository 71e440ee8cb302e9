//! Everything that speaks to Postgres.
//!
//! - [`replication`]: our own replication-protocol client (the walsender side of
//!   logical decoding), built on `postgres-protocol` frames and a tokio socket.
//! - [`frames`]: the pure encoding and decoding of the CopyData payloads that travel
//!   inside a replication stream (XLogData, keepalives, standby status updates).
//! - [`ident`]: SQL identifiers as users type them, parsed, checked and quoted.
//! - [`expr`]: SQL expressions a client writes (row filters), checked to be one.
//! - [`snapshot`]: reading table pages from an exported snapshot, encoded exactly as
//!   wal2json encodes the same values in the stream.
//! - [`keyset`]: keyset pages (by primary key, else row position) and the NDJSON
//!   export of a table, from the same snapshot reads.
//! - [`pool`]: a bounded pool of ordinary (tokio-postgres) connections.
//! - [`pgoutput`]: the messages of Postgres's built-in output plugin, parsed.
//! - [`tls`]: TLS to Postgres (libpq's sslmode), for both kinds of connection.
//! - [`version`]: the server's major and what it can do for logical decoding.
//!
//! Nothing in here knows about HTTP or sessions.

pub mod config;
pub mod error;
pub mod expr;
pub mod frames;
pub mod ident;
pub mod keyset;
pub mod pgoutput;
pub mod pool;
pub(crate) mod replication;
pub mod snapshot;
pub mod tls;
pub mod version;

pub use config::PgConfig;
pub(crate) use error::PgError;
