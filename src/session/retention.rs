//! WAL retention. A slot keeps every byte of WAL from its `restart_lsn` on, and only
//! acks move that forward: a slot nobody reads or acks keeps WAL forever. This module
//! reports, per slot of ours, what it retains and how long since its last ack
//! (`GET /v1/sessions`), warns in the logs past configurable thresholds, and lets an
//! operator drop a session's slot (`DELETE /v1/sessions/{slotName}`). Nothing here
//! drops a slot on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Registry;
use super::definition::DEFAULT_NAME;
use super::lifecycle::grants;
use super::safety::{Invalidation, OnMaxRetained};
use super::slot_rows::DecodingStats;
pub(crate) use super::snapshots::SnapshotStatus;
use crate::error::Error;
use crate::stream::plugin::Plugin;
use crate::stream::progress::{Close, Closer};
use crate::types::Lsn;

/// When to warn about a slot's WAL retention, and how often to look.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// How often retention is checked (and the summary logged).
    pub check_interval: Duration,
    /// Warn when a slot retains more than this many bytes of WAL; 0 never warns.
    pub warn_bytes: u64,
    /// Warn when a slot has had no ack for longer than this; zero never warns.
    pub warn_idle: Duration,
    /// The WAL budget of a session that sets none (`maxRetainedBytes`); 0: none.
    pub max_retained_bytes: u64,
    /// Warn past this fraction of a session's budget.
    pub warn_fraction: f64,
    /// What happens past the budget to a session that does not say (`onMaxRetained`).
    pub on_max_retained: OnMaxRetained,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            check_interval: Duration::from_secs(60),
            warn_bytes: 1 << 30,
            warn_idle: Duration::from_secs(3600),
            max_retained_bytes: 0,
            warn_fraction: 0.8,
            on_max_retained: OnMaxRetained::Keep,
        }
    }
}

/// What `GET /v1/sessions` says about one slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotReport {
    pub slot_name: String,
    pub plugin: Plugin,
    /// The publication a pgoutput slot reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    /// A walsender is streaming the slot (ours or another process's).
    pub active: bool,
    pub active_pid: Option<i32>,
    /// The default session, the one `/v1/init` manages.
    pub default: bool,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// WAL kept for this slot: from its restart_lsn to the current WAL position.
    pub retained_bytes: Option<u64>,
    /// WAL not yet confirmed: from its confirmed_flush_lsn to the current WAL position.
    pub lag_bytes: Option<u64>,
    /// pg_replication_slots.wal_status: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// Postgres invalidated the slot: it can never stream again.
    pub invalidated: Option<Invalidation>,
    /// 17+: since when no walsender streamed the slot (RFC 3339).
    pub inactive_since: Option<String>,
    /// 17+: the slot is synchronized to standbys.
    pub failover: Option<bool>,
    /// 17+: a standby's copy of a primary's failover slot.
    pub synced: Option<bool>,
    /// 14+: spill, stream and total counters (`pg_stat_replication_slots`).
    pub decoding: Option<DecodingStats>,
    /// The last ack any client sent on this slot since this process started.
    pub last_ack_lsn: Option<Lsn>,
    /// Its time, RFC 3339 in UTC.
    pub last_ack_at: Option<String>,
    pub seconds_since_last_ack: Option<u64>,
    pub snapshot: SnapshotStatus,
    /// How the last stream of the slot ended, since this process started.
    pub last_close: Option<LastClose>,
    /// The names a consumer's token may give for the slot: its session's, and its own
    /// unless that is the name of another session (see [`Registry::slot_grants`]).
    #[serde(skip)]
    pub grants: Vec<String>,
}

/// `{"by":"client","code":1009,"reason":"...","at":"2024-02-29T12:34:56.789Z"}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastClose {
    pub by: Closer,
    pub code: u16,
    pub reason: String,
    pub at: String,
}

impl From<Close> for LastClose {
    fn from(c: Close) -> LastClose {
        LastClose { by: c.by, code: c.code, reason: c.reason, at: rfc3339(c.at) }
    }
}

/// Which thresholds a slot is past.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Breach {
    pub retained: bool,
    pub idle: bool,
}

impl Breach {
    pub fn any(self) -> bool {
        self.retained || self.idle
    }
}

/// The warning decision. `retained_bytes` is None when Postgres does not know it (the
/// slot lost its WAL); `idle` is the time since the last ack. A zero threshold is off.
pub(crate) fn check_thresholds(
    retained_bytes: Option<u64>,
    idle: Option<Duration>,
    warn_bytes: u64,
    warn_idle: Duration,
) -> Breach {
    Breach {
        retained: warn_bytes > 0 && retained_bytes.is_some_and(|b| b > warn_bytes),
        idle: !warn_idle.is_zero() && idle.is_some_and(|i| i > warn_idle),
    }
}

impl Registry {
    /// One entry per slot of ours in the configured database, including slots an earlier
    /// process created. A pgoutput slot is ours only when a session names it: a
    /// subscriber's is none of our business.
    pub async fn report(&self) -> Result<Vec<SlotReport>, Error> {
        let now = SystemTime::now();
        let mut reports = Vec::new();
        let stored = self.store.slots().await;
        let here: Vec<(String, String)> =
            self.with(|s| s.sessions.values().map(|e| (e.def.slot_name.clone(), e.def.name.clone())).collect());
        for row in self.slots.rows().await? {
            // For every slot at once, in the order of `session_of_slot`: this process's
            // sessions first, then the stored ones.
            let session = here.iter().chain(&stored).find(|(slot, _)| *slot == row.slot_name).map(|(_, n)| n.clone());
            let named = session.is_some();
            let default = session.as_deref() == Some(DEFAULT_NAME);
            let other_named_so =
                here.iter().chain(&stored).any(|(slot, name)| *name == row.slot_name && *slot != row.slot_name);
            let grants = grants(&row.slot_name, session, other_named_so);
            if row.plugin.shared() && !named {
                continue;
            }
            let here = self.with(|s| s.by_slot(&row.slot_name).map(|e| (e.progress.clone(), e.snapshot.status().0)));
            let progress = here.as_ref().map(|(p, _)| p.clone());
            let last_ack = progress.as_ref().and_then(|p| p.last_ack());
            reports.push(SlotReport {
                default,
                active: row.active,
                active_pid: row.active_pid,
                confirmed_flush_lsn: row.confirmed_flush_lsn,
                restart_lsn: row.restart_lsn,
                retained_bytes: row.retained_bytes,
                lag_bytes: row.lag_bytes,
                invalidated: row.invalidated().map(|reason| Invalidation::by_postgres(reason, row.confirmed_flush_lsn)),
                inactive_since: row.inactive_since.map(rfc3339),
                failover: row.failover,
                synced: row.synced,
                decoding: row.decoding,
                wal_status: row.wal_status,
                last_ack_lsn: last_ack.map(|(lsn, _)| lsn),
                last_ack_at: last_ack.map(|(_, at)| rfc3339(at)),
                seconds_since_last_ack: last_ack.map(|(_, at)| now.duration_since(at).unwrap_or_default().as_secs()),
                snapshot: here.as_ref().map_or(SnapshotStatus::None, |(_, status)| *status),
                last_close: progress.as_ref().and_then(|p| p.last_close()).map(LastClose::from),
                plugin: row.plugin,
                publication: row.plugin.publication(&row.slot_name).map(str::to_owned),
                slot_name: row.slot_name,
                grants,
            });
        }
        Ok(reports)
    }

    /// Checks WAL retention every `check_interval` until shutdown: applies the sessions'
    /// budgets ([`Registry::apply_budgets`]), then one warning per slot past a
    /// threshold, and a summary.
    ///
    /// A slot with no ack since this process started counts as idle from when this task
    /// first saw it.
    pub(crate) async fn watch_retention(self: Arc<Self>, settings: RetentionSettings) {
        let (every, warn_bytes, warn_idle) = (settings.check_interval, settings.warn_bytes, settings.warn_idle);
        *self.retention.lock().unwrap_or_else(|e| e.into_inner()) = settings;
        let every = every.max(Duration::from_millis(100));
        let mut first_seen: HashMap<String, Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = self.shutdown.stopped() => return,
                _ = tokio::time::sleep(every) => {}
            }
            self.apply_budgets().await;
            let reports = match self.report().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL retention check failed");
                    continue;
                }
            };
            let now = Instant::now();
            first_seen.retain(|slot, _| reports.iter().any(|r| &r.slot_name == slot));
            let mut over = 0usize;
            for r in &reports {
                let seen = *first_seen.entry(r.slot_name.clone()).or_insert(now);
                let idle = match r.seconds_since_last_ack {
                    Some(s) => Duration::from_secs(s),
                    None => now.duration_since(seen),
                };
                let breach = check_thresholds(r.retained_bytes, Some(idle), warn_bytes, warn_idle);
                if !breach.any() {
                    continue;
                }
                over += 1;
                let since_ack = match r.seconds_since_last_ack {
                    Some(s) => s.to_string(),
                    None => format!("none since start (watched for {} s)", idle.as_secs()),
                };
                let retained = r.retained_bytes.map_or_else(|| "unknown".to_owned(), |b| b.to_string());
                tracing::warn!(
                    slot = %r.slot_name,
                    retained_bytes = %retained,
                    seconds_since_last_ack = %since_ack,
                    over_bytes = breach.retained,
                    over_idle = breach.idle,
                    "slot retains WAL past the warning threshold; if no client will read it again, \
                     drop it with DELETE /v1/sessions/{{slotName}}"
                );
            }
            let total: u64 = reports.iter().filter_map(|r| r.retained_bytes).sum();
            tracing::info!(slots = reports.len(), retained_bytes = total, over_threshold = over, "WAL retention");
        }
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2024-02-29T12:34:56.789Z`. Times before
/// 1970 print as the epoch.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days`, for non-negative day numbers.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of the 400-year era
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year starting March 1st
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn warns_past_the_byte_threshold_only() {
        assert_eq!(check_thresholds(Some(GIB), None, GIB, HOUR), Breach::default());
        assert_eq!(check_thresholds(Some(GIB + 1), None, GIB, HOUR), Breach { retained: true, idle: false });
        assert_eq!(check_thresholds(None, None, GIB, HOUR), Breach::default(), "unknown is not past");
        assert!(!check_thresholds(Some(u64::MAX), None, 0, HOUR).any(), "0 turns it off");
    }

    #[test]
    fn warns_past_the_idle_threshold_only() {
        assert!(!check_thresholds(Some(0), Some(HOUR), GIB, HOUR).any());
        assert_eq!(
            check_thresholds(Some(0), Some(HOUR + Duration::from_millis(1)), GIB, HOUR),
            Breach { retained: false, idle: true }
        );
        assert!(!check_thresholds(Some(0), None, GIB, HOUR).any());
        assert!(!check_thresholds(Some(0), Some(Duration::MAX), GIB, Duration::ZERO).any(), "zero turns it off");
    }

    #[test]
    fn warns_for_both_at_once() {
        let b = check_thresholds(Some(2 * GIB), Some(2 * HOUR), GIB, HOUR);
        assert_eq!(b, Breach { retained: true, idle: true });
        assert!(b.any());
    }

    #[test]
    fn formats_rfc3339_utc() {
        let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis);
        // Expected values from `date -u -d @SECS`.
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339(at(1_234_567_890, 120)), "2009-02-13T23:31:30.120Z");
        assert_eq!(rfc3339(at(1_709_210_096, 789)), "2024-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(at(4_107_542_399, 999)), "2100-02-28T23:59:59.999Z");
        assert_eq!(rfc3339(at(253_402_300_799, 0)), "9999-12-31T23:59:59.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(1)), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn civil_dates_agree_with_a_day_by_day_count() {
        let mut expected = (1970, 1, 1);
        let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        for days in 0..150_000 {
            assert_eq!(civil_from_days(days), expected, "day {days}");
            let (y, m, d) = expected;
            let len = match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            expected = if d < len {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }

    #[test]
    fn report_serializes_with_camel_case_keys() {
        let r = SlotReport {
            slot_name: "delta_face56".into(),
            plugin: Plugin::Pgoutput,
            publication: Some("delta_face56".into()),
            active: false,
            active_pid: None,
            default: true,
            confirmed_flush_lsn: Some(Lsn(0x1_6B37_4D48)),
            restart_lsn: Some(Lsn(0x1_6B37_4D00)),
            retained_bytes: Some(72),
            lag_bytes: Some(0),
            wal_status: Some("reserved".into()),
            invalidated: None,
            inactive_since: None,
            failover: None,
            synced: None,
            decoding: None,
            last_ack_lsn: None,
            last_ack_at: None,
            seconds_since_last_ack: None,
            snapshot: SnapshotStatus::Held,
            last_close: Some(LastClose {
                by: Closer::Client,
                code: 1009,
                reason: "message too big".into(),
                at: "2024-02-29T12:34:56.789Z".into(),
            }),
            grants: vec!["default".into(), "delta_face56".into()],
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "slotName": "delta_face56", "plugin": "pgoutput", "publication": "delta_face56", "active": false, "activePid": null, "default": true,
                "confirmedFlushLsn": "1/6B374D48", "restartLsn": "1/6B374D00", "retainedBytes": 72, "lagBytes": 0,
                "walStatus": "reserved", "invalidated": null, "inactiveSince": null, "failover": null, "synced": null,
                "decoding": null, "lastAckLsn": null, "lastAckAt": null,
                "secondsSinceLastAck": null, "snapshot": "held",
                "lastClose": {"by": "client", "code": 1009, "reason": "message too big", "at": "2024-02-29T12:34:56.789Z"}
            })
        );
    }
}
