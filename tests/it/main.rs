//! The integration tests, one binary with a module per area (as tokio-postgres and
//! supabase/etl do): the harness (`testkit`) and the tree are compiled and linked once.
//!
//! Every test gets a fresh database on the cluster this process shares (`testkit::pg`).
//! That cluster has 1,024 replication slots, as the tests leave theirs behind. The
//! modules whose tests change a cluster itself (restart it, change a setting with ALTER
//! SYSTEM, take every replication slot or most of them, need TLS-only settings) or count
//! on what only their own tests do to it (its 64 slots, exact positions that WAL of other
//! databases would move) get a cluster of their own, declared at the top of the module. `tests/pgoutput.rs` is
//! a binary of its own: it measures the peak memory of its whole process.

mod auth;
mod backfill;
mod browser;
mod cli;
mod clients;
mod conformance;
mod ddl;
mod errors;
mod failover;
mod faults;
mod faults_pg_restart;
mod harness;
mod harness_restart;
mod hostile;
mod http_limits;
mod keyset;
mod lifecycle;
mod majors;
mod metrics;
mod nats;
mod oversized;
mod patch;
mod pg_tls;
mod plugins;
mod quiet;
mod retention;
mod slot_safety;
mod snapshot;
mod snapshot_limits;
mod standby;
mod stream;
mod tls;
mod v2;
mod value_settings;
mod wal2json_shapes;
mod watch;
