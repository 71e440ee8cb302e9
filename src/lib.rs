//! pgdeltastream: PostgreSQL table changes over websockets, via logical decoding.
//!
//! Layers, from the bottom:
//! 1. [`types`]: pure data (LSNs, wal2json records, the JSON encoding of values).
//! 2. [`pg`]: Postgres — our replication client, snapshot reads.
//! 3. [`session`] and [`stream`]: slots, snapshots and the streaming pipeline;
//!    [`bus`] above them: the JetStream publisher and gateway (scale-out).
//! 4. [`http`]: the routes.
//! 5. [`server`] and [`config`]: wiring, our accept loop and its limits, settings;
//!    `main.rs` is the CLI.

// Input must never be able to panic the server: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod bus;
pub mod commands;
pub mod config;
pub mod error;
pub(crate) mod http;
pub mod pg;
pub mod server;
pub mod session;
pub mod stream;
pub mod types;
