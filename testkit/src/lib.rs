//! pgdeltastream's test kit: a dev-dependency of the server crate, for its integration
//! tests (`tests/it/`, one binary with a module per area, and `tests/pgoutput.rs`), and
//! a dependency of the bench (`bench/`).
//!
//! - [`local`]: the pieces of a throwaway local Postgres cluster (initdb, the `postgres`
//!   user when root, free ports, leftovers of dead runs), shared by the harness and the
//!   bench. Always built; it needs libc alone.
//! - With feature `harness` (what `tests/` uses): `pg`, the test Postgres (one shared
//!   cluster per test process, and clusters of their own for modules that need one);
//!   `support`, our server against a test database and a client's view of it;
//!   `jetstream`, NATS for the scale-out tests; `conform`, the conformance workload.

pub mod local;
#[cfg(feature = "harness")]
pub mod raw;

#[cfg(feature = "harness")]
pub mod conform;
#[cfg(feature = "harness")]
pub mod jetstream;
#[cfg(feature = "harness")]
pub mod pg;
#[cfg(feature = "harness")]
pub mod support;
