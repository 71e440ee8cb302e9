//! What a session chooses for the bad days of its slot, and what it is told: the slot
//! invalidated (by Postgres: `max_slot_wal_keep_size`, a standby conflict, an idle
//! timeout; or by us: its WAL budget), and what happens then.
//!
//! An invalidated slot never recovers: Postgres removed the WAL (or the rows) it needed,
//! so the changes after its last confirmed position are gone. The session either fails
//! its streams with 410 until an operator deletes it (`fail`, the default), or gets a
//! new slot and snapshot under the same names (`recreate`), and its client is told to
//! start over with a control message ([`must_refetch`]).

use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::definition::Definition;
use super::retention::rfc3339;
use crate::error::{Error, ErrorKind};
use crate::types::Lsn;

/// `"onInvalidated"`: what a session does once its slot is invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalidated {
    /// Streams answer 410 until the session is deleted (and made again).
    #[default]
    Fail,
    /// A new slot and snapshot under the same names; the client gets `must-refetch`.
    Recreate,
}

/// `"onMaxRetained"`: what happens to a slot that retains more than its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMaxRetained {
    /// Warn (log, metrics, views) and keep every byte: the disk is the operator's.
    #[default]
    Keep,
    /// Drop the slot, so that the database's disk never fills, and mark the session
    /// invalidated (`max_retained_bytes`).
    Drop,
}

/// What a session chose for its slot's bad days (part of its definition).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotPolicy {
    /// WAL the slot may retain before `on_max_retained` applies; None: the server's
    /// `--max-retained-bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retained_bytes: Option<u64>,
    /// None: the server's `--on-max-retained`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_max_retained: Option<OnMaxRetained>,
    #[serde(default, skip_serializing_if = "is_fail")]
    pub on_invalidated: OnInvalidated,
}

fn is_fail(o: &OnInvalidated) -> bool {
    *o == OnInvalidated::Fail
}

/// What befell the session's slot, stored with its definition so that every process,
/// and the next one, knows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotFate {
    /// The slot was invalidated and not (yet) made again: streams answer 410.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidated: Option<Invalidation>,
    /// The slot was made again after this invalidation: each stream starts with
    /// `must-refetch` until a client acks after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreated: Option<Invalidation>,
}

/// A session's WAL budget as it applies: its own, or the server's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub max_retained_bytes: u64,
    /// Past this the views, metrics and logs warn.
    pub warn_at_bytes: u64,
    pub on_max_retained: OnMaxRetained,
}

impl Budget {
    /// None when neither the session nor the server sets one.
    pub fn of(policy: &SlotPolicy, server_max: u64, warn_fraction: f64, server_on: OnMaxRetained) -> Option<Budget> {
        let max = policy.max_retained_bytes.or((server_max > 0).then_some(server_max))?;
        let fraction = if warn_fraction.is_finite() { warn_fraction.clamp(0.0, 1.0) } else { 1.0 };
        // u64 to f64 and back loses only bytes below the budget's 53 significant bits.
        let warn_at_bytes = (max as f64 * fraction) as u64;
        Some(Budget {
            max_retained_bytes: max,
            warn_at_bytes,
            on_max_retained: policy.on_max_retained.unwrap_or(server_on),
        })
    }

    pub fn warns(&self, retained: Option<u64>) -> bool {
        retained.is_some_and(|r| r > self.warn_at_bytes)
    }

    pub fn exceeded(&self, retained: Option<u64>) -> bool {
        retained.is_some_and(|r| r > self.max_retained_bytes)
    }
}

/// Who invalidated a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidatedBy {
    Postgres,
    Pgdeltastream,
}

/// Why a session's slot can no longer stream, and what is lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Invalidation {
    /// Postgres's `invalidation_reason` (17+: `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, `idle_timeout`); before 17 `wal_removed` or `conflict`
    /// as far as the catalog tells; ours: `max_retained_bytes`.
    pub reason: String,
    pub by: InvalidatedBy,
    /// The slot's last confirmed position: the changes committed after it were not
    /// delivered and cannot be.
    pub lost_after: Option<Lsn>,
    /// When, as far as we know (RFC 3339): when we dropped the slot, or saw Postgres's
    /// invalidation as the session was made again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// The reason the columns of `pg_replication_slots` give for an invalidated slot (those
/// a major lacks are None); None for a slot that is fine. Matched on the catalog, never
/// on the text of an error, which differs per major. Before 17 there is no reason
/// column: 16 says `lost` and `conflicting` for every invalidation, and only removing
/// WAL clears `restart_lsn`, which tells the two apart.
pub(crate) fn catalog_reason(
    wal_status: Option<&str>,
    conflicting: Option<bool>,
    invalidation_reason: Option<&str>,
    restart_lsn_cleared: bool,
) -> Option<String> {
    if let Some(reason) = invalidation_reason {
        return Some(reason.to_owned());
    }
    if wal_status != Some("lost") && conflicting != Some(true) {
        return None;
    }
    Some(if restart_lsn_cleared { "wal_removed" } else { "conflict" }.to_owned())
}

impl Invalidation {
    /// Seen now.
    pub fn stamped(mut self) -> Invalidation {
        self.at.get_or_insert_with(|| rfc3339(SystemTime::now()));
        self
    }

    pub fn by_postgres(reason: String, lost_after: Option<Lsn>) -> Invalidation {
        Invalidation { reason, by: InvalidatedBy::Postgres, lost_after, at: None }
    }

    pub fn over_budget(lost_after: Option<Lsn>) -> Invalidation {
        Invalidation {
            reason: "max_retained_bytes".to_owned(),
            by: InvalidatedBy::Pgdeltastream,
            lost_after,
            at: Some(rfc3339(SystemTime::now())),
        }
    }

    /// The 410 a stream of the session answers, with the reason and the position as
    /// fields of their own.
    pub fn gone(&self, def: &Definition) -> Error {
        let after = self.lost_after.map_or_else(|| "its last confirmed position".to_owned(), |l| l.to_string());
        let by = match self.by {
            InvalidatedBy::Postgres => "Postgres",
            InvalidatedBy::Pgdeltastream => "pgdeltastream (the session's maxRetainedBytes)",
        };
        let message = format!(
            "the slot {} of session {} was invalidated by {by} ({}): the changes committed after {after} are lost. \
             Delete the session and create it again (and read its new snapshot), or create it with \
             \"onInvalidated\": \"recreate\" to have that done for you",
            def.slot_name, def.name, self.reason
        );
        Error::new(ErrorKind::Gone, message).with_details(serde_json::json!({
            "session": def.name,
            "slotName": def.slot_name,
            "reason": self.reason,
            "lostAfter": self.lost_after,
        }))
    }
}

/// The control message a client of a recreated session gets first: drop what you
/// built from this session and read its snapshot again, then apply the stream. Its
/// form is documented in docs/api.md; it is no transaction, so nothing acks it.
pub(crate) fn must_refetch(def: &Definition, lost: &Invalidation, consistent_point: Option<Lsn>) -> Bytes {
    let message = serde_json::json!({
        "control": "must-refetch",
        "session": def.name,
        "slotName": def.slot_name,
        "reason": lost.reason,
        "lostAfter": lost.lost_after,
        "consistentPoint": consistent_point,
    });
    Bytes::from(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_says_why_as_far_as_each_major_tells() {
        assert_eq!(catalog_reason(Some("reserved"), None, None, false), None);
        assert_eq!(catalog_reason(Some("lost"), None, None, true).as_deref(), Some("wal_removed"), "15");
        assert_eq!(catalog_reason(Some("lost"), Some(true), None, true).as_deref(), Some("wal_removed"), "16");
        assert_eq!(catalog_reason(Some("lost"), Some(true), None, false).as_deref(), Some("conflict"), "16");
        let on_18 = catalog_reason(Some("lost"), Some(false), Some("idle_timeout"), false);
        assert_eq!(on_18.as_deref(), Some("idle_timeout"));
        assert_eq!(catalog_reason(Some("unreserved"), Some(false), None, false), None, "at risk is not lost");
    }

    #[test]
    fn a_budget_is_the_sessions_or_the_servers() {
        let own = SlotPolicy { max_retained_bytes: Some(1000), ..SlotPolicy::default() };
        let b = Budget::of(&own, 0, 0.8, OnMaxRetained::Drop).unwrap();
        assert_eq!((b.max_retained_bytes, b.warn_at_bytes, b.on_max_retained), (1000, 800, OnMaxRetained::Drop));
        assert!(!b.warns(Some(800)) && b.warns(Some(801)) && !b.exceeded(Some(1000)) && b.exceeded(Some(1001)));
        assert!(!b.warns(None) && !b.exceeded(None), "a slot that lost its WAL retains none");
        assert_eq!(Budget::of(&SlotPolicy::default(), 0, 0.8, OnMaxRetained::Keep), None);
        let server = Budget::of(&SlotPolicy::default(), 5000, f64::NAN, OnMaxRetained::Keep).unwrap();
        assert_eq!((server.max_retained_bytes, server.warn_at_bytes), (5000, 5000));
        let keep = SlotPolicy { on_max_retained: Some(OnMaxRetained::Keep), ..SlotPolicy::default() };
        assert_eq!(Budget::of(&keep, 5000, 2.0, OnMaxRetained::Drop).unwrap().on_max_retained, OnMaxRetained::Keep);
    }

    #[test]
    fn policies_read_as_documented() {
        assert_eq!(serde_json::from_str::<OnInvalidated>("\"recreate\"").unwrap(), OnInvalidated::Recreate);
        assert_eq!(serde_json::from_str::<OnMaxRetained>("\"drop\"").unwrap(), OnMaxRetained::Drop);
        assert!(serde_json::from_str::<OnMaxRetained>("\"Drop\"").is_err());
    }
}
