//! Pure data types shared by the rest of the crate: LSNs, the JSON encoding
//! of Postgres values, and typed models of wal2json's output. Nothing in here
//! does I/O, so all of it can be unit- and property-tested in isolation.
//!
//! The server streams wal2json's bytes as they come and never parses them into the
//! models: those are for the tests and the fuzz targets (feature `testing`).

pub mod lsn;
pub mod value;
#[cfg(any(test, feature = "testing"))]
pub mod wal2json;

pub use lsn::Lsn;
