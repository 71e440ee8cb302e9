//! What the process knows about itself, for `/metrics` and `/readyz`: the sessions'
//! totals (no Postgres needed), their slots' positions (one query), and whether
//! Postgres can serve us at all. Numbers only: the HTTP layer formats them.

use std::time::{Duration, SystemTime};

use super::Registry;
use super::retention::check_thresholds;
use super::slot_rows::DecodingStats;
use super::snapshots::SnapshotStatus;
use crate::error::{Error, ErrorKind};
use crate::pg::pool::{PoolError, PoolStats};
use crate::pg::replication::ReplicationConnection;
use crate::pg::version::OLDEST_SUPPORTED;
use crate::stream::progress::Stats;

/// One session this process knows, and what its streams did since the process started.
#[derive(Debug, Clone)]
pub(crate) struct SessionStats {
    pub name: String,
    pub slot: String,
    pub stats: Stats,
    pub last_ack_at: Option<SystemTime>,
}

/// The process's sessions and its connections to Postgres.
#[derive(Debug, Clone)]
pub(crate) struct ProcessStats {
    pub sessions: Vec<SessionStats>,
    pub pool: PoolStats,
    /// Replication connections of running streams.
    pub streams: usize,
    /// Replication connections that hold a snapshot.
    pub snapshots: usize,
}

/// Where a slot stands, as Postgres says, and what that means for its session.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotPosition {
    pub slot: String,
    /// From the slot's confirmed_flush_lsn to the current WAL position.
    pub lag_bytes: Option<u64>,
    /// From the slot's restart_lsn to the current WAL position.
    pub retained_bytes: Option<u64>,
    /// The slot can never stream again (Postgres invalidated it, or we dropped it
    /// past its budget).
    pub invalidated: bool,
    /// Past `--retention-warn-bytes` or the warning fraction of its budget.
    pub retention_warning: bool,
    /// The session's WAL budget, if it has one.
    pub max_retained_bytes: Option<u64>,
    /// 14+: `pg_stat_replication_slots`.
    pub decoding: Option<DecodingStats>,
    /// The session's live backfill, if it has had one.
    pub backfill: Option<super::backfill::BackfillState>,
}

/// The checks `/readyz` runs, in order; the first that fails names the reason.
pub(crate) const CHECKS: [&str; 5] =
    ["connection", "server_version", "wal_level", "replication_role", "replication_connection"];

/// What `/readyz` says of a server that can serve, or of one that could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub checks: &'static [&'static str],
    /// The Postgres server, when one answered.
    pub postgres: Option<ServerVersion>,
    /// Whether that server is a standby (in recovery): its sessions' slots are its own,
    /// and it can neither store definitions nor create publications.
    pub standby: Option<bool>,
}

/// `server_version` and its major, as the server reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerVersion {
    pub version: String,
    pub major: u32,
}

/// A failed readiness check: which, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub check: &'static str,
    pub reason: String,
    pub postgres: Option<ServerVersion>,
}

impl NotReady {
    pub(crate) fn new(check: &'static str, reason: impl Into<String>) -> NotReady {
        NotReady { check, reason: reason.into(), postgres: None }
    }

    fn on(mut self, server: &ServerVersion) -> NotReady {
        self.postgres = Some(server.clone());
        self
    }
}

const ROLE_SQL: &str = "\
    SELECT pg_catalog.current_setting('wal_level'), \
           coalesce((SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user), false), \
           pg_catalog.current_setting('server_version'), pg_catalog.pg_is_in_recovery()";

impl Registry {
    /// The totals of every session this process knows; takes no connection.
    pub(crate) fn stats(&self) -> ProcessStats {
        let (sessions, streams, snapshots) = self.with(|s| {
            let mut sessions: Vec<SessionStats> = s
                .sessions
                .values()
                .map(|e| SessionStats {
                    name: e.def.name.clone(),
                    slot: e.def.slot_name.clone(),
                    stats: e.progress.stats(),
                    last_ack_at: e.progress.last_ack().map(|(_, at)| at),
                })
                .collect();
            sessions.sort_by(|a, b| a.name.cmp(&b.name));
            let streams = s.sessions.values().filter(|e| e.stream.running.is_some()).count();
            let snapshots = s.sessions.values().filter(|e| e.snapshot.status().0 == SnapshotStatus::Held).count();
            (sessions, streams, snapshots)
        });
        ProcessStats { sessions, pool: self.pool.stats(), streams, snapshots }
    }

    /// The positions of the slots of the sessions this process knows: one query, given
    /// up after `limit` (waiting for a pool connection included).
    pub(crate) async fn slot_positions(&self, limit: Duration) -> Result<Vec<SlotPosition>, Error> {
        let rows = tokio::time::timeout(limit, self.slots.rows()).await.map_err(|_| {
            Error::new(ErrorKind::Unavailable, format!("Postgres did not answer within {} ms", limit.as_millis()))
        })??;
        let defs = self.with(|s| s.sessions.values().map(|e| e.def.clone()).collect::<Vec<_>>());
        let warn_bytes = self.retention.lock().unwrap_or_else(|e| e.into_inner()).warn_bytes;
        Ok(defs
            .into_iter()
            .map(|def| {
                let row = rows.iter().find(|r| r.slot_name == def.slot_name);
                let retained_bytes = row.and_then(|r| r.retained_bytes);
                let budget = self.budget(&def);
                SlotPosition {
                    lag_bytes: row.and_then(|r| r.lag_bytes),
                    retained_bytes,
                    invalidated: def.fate.invalidated.is_some() || row.is_some_and(|r| r.invalidated().is_some()),
                    retention_warning: check_thresholds(retained_bytes, None, warn_bytes, Duration::ZERO).retained
                        || budget.is_some_and(|b| b.warns(retained_bytes)),
                    max_retained_bytes: budget.map(|b| b.max_retained_bytes),
                    decoding: row.and_then(|r| r.decoding),
                    backfill: def.backfill,
                    slot: def.slot_name,
                }
            })
            .collect())
    }

    /// Whether this process can serve: a pool connection answers (waiting at most
    /// `wait` for one), the server is a major we support, the WAL is logical, the role
    /// may replicate, and a replication connection opens.
    pub async fn readiness(&self, wait: Duration) -> Result<Ready, NotReady> {
        let client = self.pool.get_within(wait).await.map_err(|e| match e {
            PoolError::Busy { size, .. } => {
                NotReady::new(CHECKS[0], format!("all {size} pool connections to Postgres are in use"))
            }
            PoolError::Connect(e) => NotReady::new(CHECKS[0], format!("cannot connect to Postgres: {e}")),
            PoolError::Tls(e) => NotReady::new(CHECKS[0], format!("cannot connect to Postgres: {e}")),
            // A plain `get` never waits for the reads' share.
            PoolError::ReadsBusy { .. } | PoolError::NoVersion => NotReady::new(CHECKS[0], e.to_string()),
        })?;
        // The major the connection reported at startup; the query adds its full version.
        let major = client.major().ok_or_else(|| NotReady::new(CHECKS[1], PoolError::NoVersion.to_string()))?;
        let row = client.query_one(ROLE_SQL, &[]).await;
        let read = row.and_then(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)));
        let (wal_level, can_replicate, version, standby): (String, bool, String, bool) = match read {
            Ok(v) => {
                client.release();
                v
            }
            Err(e) => return Err(NotReady::new(CHECKS[0], format!("query failed: {e}"))),
        };
        let server = ServerVersion { version, major: major.0 };
        if !major.is_supported() {
            return Err(NotReady::new(
                CHECKS[1],
                format!(
                    "PostgreSQL {} is older than {OLDEST_SUPPORTED}, the oldest major pgdeltastream supports",
                    server.version
                ),
            )
            .on(&server));
        }
        if standby && !major.has_logical_decoding_on_standby() {
            let reason = format!(
                "the server is a standby, and PostgreSQL {} cannot decode on a standby (16 and later can): \
                 connect to the primary",
                server.version
            );
            return Err(NotReady::new(CHECKS[1], reason).on(&server));
        }
        if wal_level != "logical" {
            let reason = format!("wal_level is {wal_level}, logical decoding needs logical");
            return Err(NotReady::new(CHECKS[2], reason).on(&server));
        }
        if !can_replicate {
            let reason = format!("role {} has neither REPLICATION nor SUPERUSER", self.pool.config().user);
            return Err(NotReady::new(CHECKS[3], reason).on(&server));
        }
        let mut conn = ReplicationConnection::connect(self.pool.config())
            .await
            .map_err(|e| NotReady::new(CHECKS[4], format!("cannot open a replication connection: {e}")).on(&server))?;
        let identified = conn.simple_query("IDENTIFY_SYSTEM").await;
        conn.close().await;
        identified.map_err(|e| NotReady::new(CHECKS[4], format!("IDENTIFY_SYSTEM failed: {e}")).on(&server))?;
        Ok(Ready { checks: &CHECKS, postgres: Some(server), standby: Some(standby) })
    }
}
