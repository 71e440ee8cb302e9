//! Pure data types shared by the rest of the crate: LSNs, the JSON encoding
//! of Postgres values, and typed models of wal2json's output. Nothing in here
//! does I/O, so all of it can be unit- and property-tested in isolation.

pub mod lsn;
pub mod value;
pub mod wal2json;

pub use lsn::Lsn;
