//! What Postgres says about the slots of ours: one query over `pg_replication_slots`
//! (and `pg_stat_replication_slots` from 14), its columns as the server's major has
//! them. Everything the views, the metrics and the WAL budget know of a slot comes
//! from here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::names;
use super::safety::catalog_reason;
use super::slots::Slots;
use crate::error::Error;
use crate::pg::version::Major;
use crate::stream::plugin::Plugin;
use crate::types::Lsn;

/// One row of `pg_replication_slots`, for a slot of ours. The columns a major lacks
/// are None.
pub(super) struct SlotRow {
    pub slot_name: String,
    pub plugin: Plugin,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// None once the slot lost its WAL (restart_lsn is NULL then).
    pub retained_bytes: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub wal_status: Option<String>,
    /// 16+.
    pub conflicting: Option<bool>,
    /// 17+: since when no walsender streamed it.
    pub inactive_since: Option<SystemTime>,
    /// 17+: synchronized to standbys (`FAILOVER`).
    pub failover: Option<bool>,
    /// 17+: a standby's copy of a primary's failover slot.
    pub synced: Option<bool>,
    /// 14+: from `pg_stat_replication_slots`.
    pub decoding: Option<DecodingStats>,
    /// Why Postgres invalidated it, if it did ([`catalog_reason`]).
    invalidated: Option<String>,
}

impl SlotRow {
    /// Why the slot can no longer stream, if it cannot.
    pub fn invalidated(&self) -> Option<String> {
        self.invalidated.clone()
    }
}

/// What decoding the slot cost: transactions spilled to disk for want of
/// `logical_decoding_work_mem`, streamed in progress, and decoded in all (counters
/// since the slot's creation or the last `pg_stat_reset_replication_slot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecodingStats {
    pub spill_txns: u64,
    pub spill_count: u64,
    pub spill_bytes: u64,
    pub stream_txns: u64,
    pub stream_count: u64,
    pub stream_bytes: u64,
    pub total_txns: u64,
    pub total_bytes: u64,
}

/// The catalog's columns of a slot's state that not every major has, in the order
/// [`read_state`] reads them; NULLs where the major has none.
pub(super) fn state_columns(major: Major) -> &'static str {
    if major.has_failover_slots() {
        "s.wal_status::text, s.conflicting, s.invalidation_reason::text, \
         extract(epoch FROM s.inactive_since)::float8, s.failover, s.synced, s.restart_lsn IS NULL"
    } else if major.has_conflicting_slots() {
        "s.wal_status::text, s.conflicting, NULL::text, NULL::float8, NULL::bool, NULL::bool, s.restart_lsn IS NULL"
    } else {
        "s.wal_status::text, NULL::bool, NULL::text, NULL::float8, NULL::bool, NULL::bool, s.restart_lsn IS NULL"
    }
}

/// The columns of [`state_columns`], from `at` on.
pub(super) struct SlotStateColumns {
    pub wal_status: Option<String>,
    pub conflicting: Option<bool>,
    pub invalidation_reason: Option<String>,
    pub inactive_since: Option<SystemTime>,
    pub failover: Option<bool>,
    pub synced: Option<bool>,
    pub restart_lsn_cleared: bool,
}

impl SlotStateColumns {
    /// Why the slot can no longer stream, if it cannot.
    pub fn invalidated(&self) -> Option<String> {
        catalog_reason(
            self.wal_status.as_deref(),
            self.conflicting,
            self.invalidation_reason.as_deref(),
            self.restart_lsn_cleared,
        )
    }
}

pub(super) fn read_state(row: &tokio_postgres::Row, at: usize) -> Result<SlotStateColumns, tokio_postgres::Error> {
    let since: Option<f64> = row.try_get(at + 3)?;
    Ok(SlotStateColumns {
        wal_status: row.try_get(at)?,
        conflicting: row.try_get(at + 1)?,
        invalidation_reason: row.try_get(at + 2)?,
        inactive_since: since.filter(|s| s.is_finite() && *s >= 0.0).map(|s| UNIX_EPOCH + Duration::from_secs_f64(s)),
        failover: row.try_get(at + 4)?,
        synced: row.try_get(at + 5)?,
        restart_lsn_cleared: row.try_get(at + 6)?,
    })
}

/// Our slots in the configured database. The WAL position is the replay position on a
/// standby (where pg_current_wal_lsn() fails). Filtered by name in Rust
/// ([`names::is_ours`]).
fn report_sql(major: Major) -> String {
    let stats = if major.has_slot_stats() {
        "st.spill_txns, st.spill_count, st.spill_bytes, st.stream_txns, st.stream_count, st.stream_bytes, \
         st.total_txns, st.total_bytes"
    } else {
        "NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint"
    };
    let join = if major.has_slot_stats() {
        "LEFT JOIN pg_catalog.pg_stat_replication_slots st ON st.slot_name = s.slot_name"
    } else {
        ""
    };
    format!(
        "WITH wal AS (SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn() \
                                  ELSE pg_catalog.pg_current_wal_lsn() END AS lsn) \
         SELECT s.slot_name::text, s.plugin::text, s.active, s.active_pid, s.confirmed_flush_lsn::text, \
                s.restart_lsn::text, \
                CASE WHEN s.restart_lsn IS NOT NULL \
                     THEN greatest(pg_catalog.pg_wal_lsn_diff(wal.lsn, s.restart_lsn), 0)::bigint END, \
                CASE WHEN s.confirmed_flush_lsn IS NOT NULL \
                     THEN greatest(pg_catalog.pg_wal_lsn_diff(wal.lsn, s.confirmed_flush_lsn), 0)::bigint END, \
                {}, {stats} \
         FROM pg_catalog.pg_replication_slots s {join}, wal \
         WHERE s.database = pg_catalog.current_database() AND s.slot_type = 'logical' AND s.plugin = ANY ($1) \
         ORDER BY s.slot_name",
        state_columns(major)
    )
}

/// Where the statistics columns of [`report_sql`] start.
const STATS_AT: usize = 15;

impl Slots {
    /// What Postgres says about every slot of ours in the configured database.
    pub(super) async fn rows(&self) -> Result<Vec<SlotRow>, Error> {
        let client = self.pool.get().await?;
        let Some(major) = client.major() else {
            return Err(crate::pg::pool::PoolError::NoVersion.into());
        };
        let plugins: Vec<&str> = Plugin::ALL.iter().map(|p| p.name()).collect();
        let rows = client.query(&report_sql(major), &[&plugins]).await?;
        client.release();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let slot_name: String = row.try_get(0)?;
            let plugin: String = row.try_get(1)?;
            let Some(plugin) = Plugin::from_name(&plugin).filter(|_| names::is_ours(&slot_name)) else { continue };
            let state = read_state(&row, 8)?;
            let invalidated = state.invalidated();
            out.push(SlotRow {
                plugin,
                slot_name,
                active: row.try_get(2)?,
                active_pid: row.try_get(3)?,
                confirmed_flush_lsn: parse_lsn(row.try_get(4)?)?,
                restart_lsn: parse_lsn(row.try_get(5)?)?,
                retained_bytes: bytes(row.try_get(6)?),
                lag_bytes: bytes(row.try_get(7)?),
                wal_status: state.wal_status,
                conflicting: state.conflicting,
                inactive_since: state.inactive_since,
                failover: state.failover,
                synced: state.synced,
                decoding: decoding_stats(&row)?,
                invalidated,
            });
        }
        Ok(out)
    }
}

fn bytes(n: Option<i64>) -> Option<u64> {
    n.map(|b| u64::try_from(b).unwrap_or(0))
}

/// None below 14, and for a slot the statistics collector has no entry for yet.
fn decoding_stats(row: &tokio_postgres::Row) -> Result<Option<DecodingStats>, tokio_postgres::Error> {
    let mut n = [0u64; 8];
    for (i, slot) in n.iter_mut().enumerate() {
        let Some(v) = row.try_get::<_, Option<i64>>(STATS_AT + i)? else { return Ok(None) };
        *slot = u64::try_from(v).unwrap_or(0);
    }
    let [spill_txns, spill_count, spill_bytes, stream_txns, stream_count, stream_bytes, total_txns, total_bytes] = n;
    Ok(Some(DecodingStats {
        spill_txns,
        spill_count,
        spill_bytes,
        stream_txns,
        stream_count,
        stream_bytes,
        total_txns,
        total_bytes,
    }))
}

pub(super) fn parse_lsn(text: Option<String>) -> Result<Option<Lsn>, Error> {
    text.map(|t| t.parse().map_err(|_| Error::internal(format!("bad LSN {t:?} from Postgres")))).transpose()
}
