//! What `GET /v2/sessions` says about a session: its definition, and its state as this
//! process and Postgres see it.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::Registry;
use super::definition::Definition;
use super::retention::{LastClose, SlotRow, check_thresholds, rfc3339};
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
    /// `retainedBytes` is past the warning threshold (`--retention-warn-bytes`).
    pub retention_warning: bool,
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
        let def = self.known(name).await?;
        let rows = self.slots.rows().await?;
        Ok(self.view(def, &rows))
    }

    fn view(&self, definition: Definition, rows: &[SlotRow]) -> SessionView {
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
        let warn_bytes = self.retention_warn_bytes.load(std::sync::atomic::Ordering::Relaxed);
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
            retention_warning: check_thresholds(retained_bytes, None, warn_bytes, Duration::ZERO).retained,
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
