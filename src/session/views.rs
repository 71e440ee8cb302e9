//! What `GET /v2/sessions` says about a session: its definition, and its state as this
//! process and Postgres see it.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::Registry;
use super::definition::Definition;
use super::retention::{LastClose, check_thresholds, rfc3339};
use super::safety::{Budget, Invalidation};
use super::slot_rows::{DecodingStats, SlotRow};
use super::snapshots::SnapshotStatus;
use crate::error::Error;
use crate::types::Lsn;

/// A session just created: its definition, and its snapshot, held.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Created {
    #[serde(flatten)]
    pub definition: Definition,
    /// The publication of a pgoutput session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    pub consistent_point: Lsn,
    pub snapshot: SnapshotStatus,
}

impl Created {
    pub fn new(definition: Definition, consistent_point: Lsn) -> Created {
        Created { publication: definition.publication(), definition, consistent_point, snapshot: SnapshotStatus::Held }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    #[serde(flatten)]
    pub definition: Definition,
    /// The publication of a pgoutput session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    /// Known to the process that created the session, until it restarts.
    pub consistent_point: Option<Lsn>,
    pub snapshot: SnapshotStatus,
    /// Why the snapshot is not held, when it is not.
    pub snapshot_reason: Option<&'static str>,
    /// A client streams the session, through this process or another.
    pub streaming: bool,
    /// The walsender of that stream.
    pub active_pid: Option<i32>,
    /// False when the slot is gone (dropped by hand): the session cannot stream.
    pub slot_exists: bool,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// WAL the slot keeps: from its restart_lsn to the current WAL position.
    pub retained_bytes: Option<u64>,
    /// `retainedBytes` is past the warning threshold (`--retention-warn-bytes`), or
    /// past the warning fraction of the session's budget.
    pub retention_warning: bool,
    /// The session's WAL budget as it applies (its own or the server's), if any.
    pub budget: Option<Budget>,
    /// pg_replication_slots.wal_status: reserved, extended, unreserved (at risk) or lost.
    pub wal_status: Option<String>,
    /// The slot can never stream again: why, by whom, and after which position the
    /// changes are lost. Streams answer 410 (or the session is made again).
    pub invalidated: Option<Invalidation>,
    /// The slot was made again after this invalidation, and no client has acked since:
    /// each stream starts with `must-refetch`.
    pub recreated: Option<Invalidation>,
    /// 16+: Postgres invalidated the slot for a conflict with recovery (a standby's).
    pub conflicting: Option<bool>,
    /// 17+: since when no walsender streamed the slot.
    pub inactive_since: Option<String>,
    /// 17+: the slot is synchronized to standbys (`FAILOVER`).
    pub failover: Option<bool>,
    /// 17+: this server is a standby and the slot a copy of the primary's.
    pub synced: Option<bool>,
    /// 14+: what decoding the slot cost (`pg_stat_replication_slots`).
    pub decoding: Option<DecodingStats>,
    /// Viewers watching the session through this process (`/v2/sessions/{name}/watch`).
    pub watchers: usize,
    /// WAL not yet confirmed: from the slot's confirmed_flush_lsn to the current WAL
    /// position.
    pub lag_bytes: Option<u64>,
    /// The last ack a client sent through this process since it started.
    pub last_ack_lsn: Option<Lsn>,
    pub last_ack_at: Option<String>,
    pub seconds_since_last_ack: Option<u64>,
    pub last_close: Option<LastClose>,
}

impl Registry {
    /// `GET /v2/sessions`: every stored session (stored by any process) and every
    /// session only this process knows, by name.
    pub async fn list(&self) -> Result<Vec<SessionView>, Error> {
        let stored = self.store.load().await?;
        self.with(|s| {
            for def in &stored {
                s.adopt(def.clone(), true);
                s.follow(def);
            }
            // Sessions stored by this process that another process ended are gone.
            s.sessions.retain(|name, e| !e.stored || stored.iter().any(|d| &d.name == name));
        });
        let rows = self.slots.rows().await?;
        let mut defs: Vec<Definition> = self.with(|s| s.sessions.values().map(|e| e.def.clone()).collect());
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(defs.into_iter().map(|d| self.view(d, &rows)).collect())
    }

    /// `GET /v2/sessions/{name}`.
    pub(crate) async fn view_one(&self, name: &str) -> Result<SessionView, Error> {
        self.follow_stored_change(name).await;
        let def = self.known(name).await?;
        let rows = self.slots.rows().await?;
        Ok(self.view(def, &rows))
    }

    fn view(&self, mut definition: Definition, rows: &[SlotRow]) -> SessionView {
        // Shown as the view's own `invalidated` and `recreated`, with what Postgres says.
        let fate = std::mem::take(&mut definition.fate);
        let (status, reason, progress, consistent_point) = self.with(|s| match s.sessions.get(&definition.name) {
            Some(e) => {
                let (status, reason) = e.snapshot.status();
                (status, reason, Some(e.progress.clone()), e.consistent_point)
            }
            None => (SnapshotStatus::None, None, None, None),
        });
        let row = rows.iter().find(|r| r.slot_name == definition.slot_name);
        let last_ack = progress.as_ref().and_then(|p| p.last_ack());
        let now = SystemTime::now();
        let retained_bytes = row.and_then(|r| r.retained_bytes);
        let warn_bytes = self.retention.lock().unwrap_or_else(|e| e.into_inner()).warn_bytes;
        let budget = self.budget(&definition);
        let catalog = row.and_then(|r| r.invalidated().map(|reason| (reason, r.confirmed_flush_lsn)));
        let invalidated = fate
            .invalidated
            .clone()
            .or_else(|| catalog.map(|(reason, confirmed)| Invalidation::by_postgres(reason, confirmed)));
        SessionView {
            publication: definition.publication(),
            consistent_point,
            snapshot: status,
            snapshot_reason: reason,
            streaming: row.is_some_and(|r| r.active),
            active_pid: row.and_then(|r| r.active_pid),
            slot_exists: row.is_some(),
            confirmed_flush_lsn: row.and_then(|r| r.confirmed_flush_lsn),
            retained_bytes,
            retention_warning: check_thresholds(retained_bytes, None, warn_bytes, Duration::ZERO).retained
                || budget.is_some_and(|b| b.warns(retained_bytes)),
            budget,
            wal_status: row.and_then(|r| r.wal_status.clone()),
            invalidated,
            recreated: fate.recreated,
            conflicting: row.and_then(|r| r.conflicting),
            inactive_since: row.and_then(|r| r.inactive_since).map(rfc3339),
            failover: row.and_then(|r| r.failover),
            synced: row.and_then(|r| r.synced),
            decoding: row.and_then(|r| r.decoding),
            watchers: self.watchers.count_of(&definition.name),
            lag_bytes: row.and_then(|r| r.lag_bytes),
            last_ack_lsn: last_ack.map(|(lsn, _)| lsn),
            last_ack_at: last_ack.map(|(_, at)| rfc3339(at)),
            seconds_since_last_ack: last_ack.map(|(_, at)| now.duration_since(at).unwrap_or_default().as_secs()),
            last_close: progress.and_then(|p| p.last_close()).map(LastClose::from),
            definition,
        }
    }
}
