//! What the registry does on a slot's bad days ([`super::safety`] has the choices):
//! drops a slot past its session's WAL budget (`onMaxRetained: drop`), and makes a new
//! slot and snapshot for a session whose slot was invalidated (`onInvalidated:
//! recreate`). Both run under the admin lock, as creating and ending sessions do.

use std::sync::Arc;

use bytes::Bytes;

use super::Registry;
use super::definition::Definition;
use super::safety::{Budget, InvalidatedBy, Invalidation, OnInvalidated, SlotFate, must_refetch};
use super::snapshots::SnapshotState;
use crate::error::Error;
use crate::stream::pump::ExplainFatal;
use crate::stream::stop::code;
use crate::types::Lsn;

/// How a stream of a session ended by its budget closes.
const OVER_BUDGET: &str = "the slot retained more WAL than the session's maxRetainedBytes and was dropped";

impl Registry {
    /// The budget of session `def`, as it applies now.
    pub(super) fn budget(&self, def: &Definition) -> Option<Budget> {
        let r = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        Budget::of(&def.policy, r.max_retained_bytes, r.warn_fraction, r.on_max_retained)
    }

    /// Applies each session's WAL budget: past it, a warning (`keep`) or the slot
    /// dropped and the session marked invalidated (`drop`).
    pub(super) async fn apply_budgets(&self) {
        match self.store.load().await {
            Ok(stored) => self.with(|s| stored.into_iter().for_each(|d| s.adopt(d, true))),
            Err(e) => tracing::warn!(error = %e, "cannot read the stored sessions: budgets apply to this process's"),
        }
        let defs: Vec<Definition> = self.with(|s| s.sessions.values().map(|e| e.def.clone()).collect());
        let budgeted: Vec<(Definition, Budget)> =
            defs.into_iter().filter_map(|d| self.budget(&d).map(|b| (d, b))).collect();
        if budgeted.is_empty() {
            return;
        }
        let rows = match self.slots.rows().await {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!(error = %e, "cannot read the slots' retention: budgets not applied"),
        };
        for (def, budget) in budgeted {
            let Some(row) = rows.iter().find(|r| r.slot_name == def.slot_name) else { continue };
            if !budget.exceeded(row.retained_bytes) {
                continue;
            }
            let retained = row.retained_bytes.unwrap_or_default();
            if budget.on_max_retained == super::safety::OnMaxRetained::Keep {
                tracing::warn!(
                    session = %def.name, slot = %def.slot_name, retained_bytes = retained,
                    max_retained_bytes = budget.max_retained_bytes,
                    "slot retains more WAL than its budget (onMaxRetained: keep): its client must catch up, \
                     or the session be deleted"
                );
                continue;
            }
            let streamed_here = self.with(|s| s.sessions.get(&def.name).is_some_and(|e| e.stream.running.is_some()));
            if row.active && !streamed_here {
                // Another process streams it: that one drops it (dropping an active slot
                // here would only wait for it).
                continue;
            }
            if let Err(e) = self.drop_over_budget(&def, row.confirmed_flush_lsn).await {
                tracing::error!(session = %def.name, slot = %def.slot_name, error = %e, "cannot drop a slot past its budget");
            } else {
                tracing::error!(
                    session = %def.name, slot = %def.slot_name, retained_bytes = retained,
                    max_retained_bytes = budget.max_retained_bytes,
                    "slot dropped: it retained more WAL than its budget (onMaxRetained: drop); the session is invalidated"
                );
            }
        }
    }

    /// Marks the session invalidated (stored first: a crash after leaves a session
    /// that says so), ends its stream (1011) and drops its slot.
    async fn drop_over_budget(&self, def: &Definition, lost_after: Option<Lsn>) -> Result<(), Error> {
        let _one_at_a_time = self.admin.lock().await;
        let current =
            self.with(|s| s.sessions.get(&def.name).filter(|e| e.stream.closing.is_none()).map(|e| e.def.clone()));
        // Ended or made again since it was looked at: nothing to do. Marked by us
        // already: a drop that failed, tried again.
        let ours = |c: &Definition| c.fate.invalidated.as_ref().is_none_or(|i| i.by == InvalidatedBy::Pgdeltastream);
        let Some(current) = current.filter(|c| c.slot_name == def.slot_name && ours(c)) else {
            return Ok(());
        };
        let mut marked = current.clone();
        marked.fate.invalidated.get_or_insert_with(|| Invalidation::over_budget(lost_after));
        self.remember(&marked).await;
        self.with(|s| s.sessions.get_mut(&def.name).map(|e| e.def = marked.clone()));
        self.stop_stream_and_wait(&def.name, code::INTERNAL, OVER_BUDGET).await;
        self.slots.drop_slot_of(&current).await?;
        self.with(|s| s.sessions.get_mut(&def.name).map(|e| e.snapshot.release(&def.name, "the slot was dropped")));
        Ok(())
    }

    /// A new slot (and publication) and snapshot for session `def`, whose slot was
    /// invalidated, under the same names. Until that succeeds the session stays marked
    /// invalidated, so the next stream tries again.
    pub(super) async fn recreate(&self, def: &Definition, lost: Invalidation) -> Result<Definition, Error> {
        let _one_at_a_time = self.admin.lock().await;
        self.refuse_when_stopping()?;
        let current =
            self.with(|s| s.sessions.get(&def.name).filter(|e| e.stream.closing.is_none()).map(|e| e.def.clone()));
        let Some(current) = current.filter(|c| c.slot_name == def.slot_name) else {
            return Err(Error::conflict(format!("session {} was ended as its slot was being made again", def.name)));
        };
        let lost = lost.stamped();
        let mut marked = current.clone();
        marked.fate = SlotFate { invalidated: Some(lost.clone()), recreated: None };
        self.remember(&marked).await;
        self.with(|s| s.sessions.get_mut(&def.name).map(|e| e.def = marked.clone()));
        self.slots.drop_slot_of(&current).await?;
        let mut fresh = current.clone();
        fresh.fate = SlotFate { invalidated: None, recreated: Some(lost.clone()) };
        let new = self.slots.create(&fresh).await?;
        // Stored once the slot exists, so that a failed create leaves the mark above.
        // The write is in the new slot's stream, in the store's schema, which no
        // client is sent.
        self.remember(&fresh).await;
        let name = def.name.clone();
        let leftover = self.with(|s| match s.sessions.get_mut(&name) {
            Some(e) => {
                e.def = fresh.clone();
                e.snapshot.release(&name, "the slot was made again");
                e.snapshot = SnapshotState::Held(new.holder);
                e.snapshot_tables = None;
                e.consistent_point = Some(new.consistent_point);
                None
            }
            None => Some(SnapshotState::Held(new.holder)),
        });
        if let Some(mut snapshot) = leftover {
            snapshot.release(&name, "the session was ended");
        }
        tracing::warn!(
            session = %def.name, slot = %def.slot_name, reason = %lost.reason, lost_after = ?lost.lost_after,
            consistent_point = %new.consistent_point,
            "slot invalidated, made again with a new snapshot (onInvalidated: recreate): clients are told must-refetch"
        );
        Ok(fresh)
    }

    /// The `must-refetch` message a stream of `def` starts with, if its slot was made
    /// again and no client has acked since.
    pub(super) fn refetch_message(&self, def: &Definition) -> Option<Bytes> {
        let lost = def.fate.recreated.as_ref()?;
        let consistent_point = self.with(|s| s.sessions.get(&def.name).and_then(|e| e.consistent_point));
        Some(must_refetch(def, lost, consistent_point))
    }

    /// A client acked on the recreated slot: it has started over, and later streams
    /// need not tell it again.
    pub(super) fn refetched(&self, name: &str) {
        let cleared = self.with(|s| {
            let e = s.sessions.get_mut(name)?;
            e.def.fate.recreated.take()?;
            Some((e.def.clone(), e.stored))
        });
        let Some((def, true)) = cleared else { return };
        let store = self.store.clone();
        self.tasks.spawn(async move {
            if let Err(e) = store.put(&def).await {
                tracing::warn!(session = %def.name, error = %e, "cannot store that the session's client started over");
            }
        });
    }

    /// Asked when a stream of `def` fails: Postgres ends the walsender of a slot it
    /// invalidates with a message that does not say so ("terminating connection due to
    /// administrator command"); the catalog does.
    pub(super) fn explain_failure(self: &Arc<Self>, def: &Definition) -> ExplainFatal {
        let registry = Arc::downgrade(self);
        let def = def.clone();
        Arc::new(move || {
            let (registry, def) = (registry.clone(), def.clone());
            Box::pin(async move {
                // Postgres ends the walsender before it marks the slot: look a few times.
                let mut info = None;
                for _ in 0..10 {
                    let found = registry.upgrade()?.our_slot(&def.slot_name).await.ok()?;
                    if found.invalidated.is_some() {
                        info = Some(found);
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let info = info?;
                let lost = Invalidation::by_postgres(info.invalidated?, Some(info.confirmed_flush));
                let next = match def.policy.on_invalidated {
                    OnInvalidated::Fail => "reconnecting answers 410",
                    OnInvalidated::Recreate => "reconnect: the session is made again and starts with must-refetch",
                };
                Some(format!(
                    "the slot was invalidated by Postgres ({}): the changes after {} are lost; {next}",
                    lost.reason, info.confirmed_flush
                ))
            })
        })
    }

    /// Stores `def` if its session is stored; a failure is logged (the state holds it).
    pub(super) async fn remember(&self, def: &Definition) {
        let stored = self.with(|s| s.sessions.get(&def.name).is_some_and(|e| e.stored));
        if !stored {
            return;
        }
        if let Err(e) = self.store.put(def).await {
            tracing::warn!(session = %def.name, error = %e, "cannot store the session's slot state");
        }
    }
}

impl Invalidation {
    /// The invalidation a stream of `def` meets: ours (stored with the session), or
    /// Postgres's (`reason` from the catalog) after the slot's last confirmed position.
    pub(super) fn met(def: &Definition, catalog: Option<(String, Lsn)>) -> Option<Invalidation> {
        def.fate
            .invalidated
            .clone()
            .or_else(|| catalog.map(|(reason, confirmed)| Invalidation::by_postgres(reason, Some(confirmed))))
    }
}
