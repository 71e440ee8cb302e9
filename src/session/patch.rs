//! Changing a session's tables and actions (`PATCH /v2/sessions/{name}`) while it
//! streams, without losing or repeating a change. The request is checked as a create
//! is; then pgoutput's publication is altered and the definition stored in one
//! transaction (decoding follows the publication from that commit on), or wal2json's
//! definition is stored; a running stream whose start options change (wal2json's
//! filter, pgoutput's `messages`) switches to them at its next transaction boundary
//! ([`crate::stream::reconfigure`]).

use std::sync::Arc;
use std::time::Duration;

use super::definition::{Action, DEFAULT_NAME, Definition, TableEntry, check_name};
use super::lifecycle::{check_entries, check_narrowing, normalize_actions, resolve_tables, run_to_completion};
use super::publications::alter_publication;
use super::streams::StreamControl;
use super::{Registry, State};
use crate::error::Error;
use crate::pg::replication::ReplicationConnection;
use crate::stream::Stop as StreamStop;
use crate::stream::reconfigure::{Reconfigure, Switched};
use crate::stream::stop::code;

/// How long a PATCH waits for the running stream to reach a transaction boundary and
/// switch; past it the stream is ended, and its client streams the new filter when it
/// reconnects (from its last ack, so what it was sent and did not ack comes again).
const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// What `PATCH /v2/sessions/{name}` asks for: None leaves it as it is.
#[derive(Debug, Clone, Default)]
pub struct PatchRequest {
    pub tables: Option<Vec<TableEntry>>,
    pub actions: Option<Vec<Action>>,
    /// Backfill the tables added ([`Registry::backfill_added`]).
    pub backfill: bool,
}

impl Registry {
    /// `PATCH /v2/sessions/{name}`: the table entries added (those not in the session's
    /// tables before, exactly as given; none for a session of every table).
    pub async fn patch(self: &Arc<Self>, name: &str, req: PatchRequest) -> Result<Vec<TableEntry>, Error> {
        check_name(name)?;
        if name == DEFAULT_NAME {
            return Err(Error::conflict(
                "the v1 session default streams every table and action: /v1/init manages it, PATCH does not",
            ));
        }
        check_entries(req.tables.as_ref())?;
        let registry = Arc::clone(self);
        let name = name.to_owned();
        let added = run_to_completion(async move {
            let _one_at_a_time = registry.admin.lock().await;
            registry.refuse_when_stopping()?;
            registry.patch_now(&name, &req).await.map(|added| (name, req, added))
        })
        .await;
        let (name, req, added) = added?;
        if req.backfill {
            self.backfill_added(&name, &added).await?;
        }
        Ok(added)
    }

    async fn patch_now(&self, name: &str, req: &PatchRequest) -> Result<Vec<TableEntry>, Error> {
        let old = self.known(name).await?;
        self.refuse_unpatchable(&old).await?;
        let new = self.patched(&old, req).await?;
        if new == old {
            return Ok(Vec::new());
        }
        self.refuse_if_streamed_elsewhere(&old).await?;
        match new.publication() {
            Some(_) => alter_publication(&self.slots, &old, &new).await?,
            None => self.store.put(&new).await?,
        }
        self.with(|s| {
            if let Some(e) = s.sessions.get_mut(name) {
                e.snapshot_tables.get_or_insert_with(|| old.tables.clone());
                e.def = new.clone();
            }
        });
        // A watcher streams the filter it started with: it watches again for the new one.
        self.watchers.stop(name, code::NORMAL, "the session changed: watch again");
        self.switch_stream(&old, &new).await;
        tracing::info!(session = name, tables = ?new.tables, actions = ?new.actions, "session changed");
        Ok(added(&old, &new))
    }

    /// Takes the tables and actions another process gave session `name` (PATCH) since
    /// this one knew it: before a stream starts (it must follow them), a snapshot read
    /// (a table removed is out of scope) and a view. A store that cannot be read leaves
    /// them as they are.
    pub(super) async fn follow_stored_change(&self, name: &str) {
        if !self.with(|s| s.sessions.get(name).is_some_and(|e| e.stored)) {
            return;
        }
        let stored = match self.store.get(name).await {
            Ok(stored) => stored,
            Err(e) => return tracing::warn!(session = name, error = %e, "cannot read the stored session"),
        };
        if let Some(stored) = stored {
            self.with(|s| s.follow(&stored));
        }
    }

    /// 409 for a session whose definition this process cannot change for good.
    async fn refuse_unpatchable(&self, def: &Definition) -> Result<(), Error> {
        if let Some(publication) = &def.external_publication {
            return Err(Error::conflict(format!(
                "session {} streams publication {publication:?}, made by the operator: change that publication \
                 (ALTER PUBLICATION) instead",
                def.name
            )));
        }
        if self.slots.in_recovery().await? {
            return Err(Error::conflict(
                "the server is a standby: a session's tables and actions cannot be changed here",
            ));
        }
        if !self.with(|s| s.sessions.get(&def.name).is_some_and(|e| e.stored)) {
            return Err(Error::conflict(format!(
                "session {} is not stored (a slot of an earlier version): its definition cannot be changed",
                def.name
            )));
        }
        Ok(())
    }

    /// The definition `old` with the request's tables (resolved as at create) and
    /// actions, checked as at create.
    async fn patched(&self, old: &Definition, req: &PatchRequest) -> Result<Definition, Error> {
        let mut new = old.clone();
        if let Some(entries) = &req.tables {
            let client = self.pool.get().await?;
            let resolved = resolve_tables(&client, entries).await;
            client.release();
            new.tables = Some(resolved?);
        }
        if let Some(actions) = &req.actions {
            new.actions = normalize_actions(actions.clone());
        }
        check_narrowing(new.plugin, new.tables.as_ref())?;
        Ok(new)
    }

    /// Gives the running stream of the session (if any) the new definition's filter:
    /// when its start options change it switches to them at a transaction boundary
    /// (Postgres, not the stream, applies a publication's tables and actions). A stream
    /// still opening, or one that does not switch in time, is ended instead.
    async fn switch_stream(&self, old: &Definition, new: &Definition) {
        let name = new.name.as_str();
        let (control, running) = self.with(|s| match s.sessions.get(name) {
            Some(e) => (e.stream.control.clone(), e.stream.running.clone()),
            None => (None, None),
        });
        let Some(running) = running else { return };
        let Some(control) = control else {
            return end(&running, name, "the session changed as its stream opened: reconnect");
        };
        match self.switch(&control, old, new).await {
            Ok(Some(at)) => tracing::info!(session = name, %at, "stream switched to the new filter"),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(session = name, error = %e, "the stream did not switch to the new filter");
                end(&running, name, "the session changed: reconnect");
            }
        }
    }

    /// Sends the stream its new options and decoder, if they change; where it switched.
    async fn switch(
        &self,
        control: &StreamControl,
        old: &Definition,
        new: &Definition,
    ) -> Result<Option<crate::types::Lsn>, String> {
        let options = |def: &Definition| {
            control.plugin.start_options(control.format, &def.filter(), &def.slot_name, control.major)
        };
        // pgoutput is asked for every message (a backfill's watermarks and DDL events
        // are messages): which reach the client is the stream's stage's, told by a
        // switch too.
        let marks = |def: &Definition| {
            let filter = def.filter();
            let ddl = crate::stream::ddl::Ddl::of(&filter).is_some();
            (filter.wants(crate::stream::filter::Action::Message), ddl.then_some(filter.tables))
        };
        // pgoutput on 13 sends no messages at all: nothing for the stage to change.
        let messages_come =
            control.plugin != crate::stream::plugin::Plugin::Pgoutput || control.major.pgoutput_has_messages();
        if options(old) == options(new) && (!messages_come || marks(old) == marks(new)) {
            return Ok(None);
        }
        let (filter, options) =
            self.stream_filter(new, control.plugin, control.format, control.major).await.map_err(|e| e.to_string())?;
        let decoder = control.plugin.decoder(control.format, &filter, &self.pool, self.settings.pgoutput_memory);
        let connection = ReplicationConnection::connect(&self.slots.pg).await.map_err(|e| e.to_string())?;
        let (done, switched) = tokio::sync::oneshot::channel();
        let sent = async {
            let app_messages = filter.wants(crate::stream::filter::Action::Message);
            let ddl = crate::stream::ddl::Ddl::of(&filter);
            control.tx.send(Reconfigure { options, decoder, app_messages, ddl, connection, done }).await.ok()?;
            switched.await.ok()
        };
        match tokio::time::timeout(SWITCH_WAIT, sent).await {
            Ok(Some(Ok(Switched { at, walsender }))) => {
                self.with(|s| s.sessions.get_mut(&new.name).map(|e| e.stream.walsender = walsender));
                Ok(Some(at))
            }
            Ok(Some(Err(e))) => Err(format!("the switch failed: {e}")),
            // Ended before it switched: its next stream reads the stored definition.
            Ok(None) => Ok(None),
            Err(_) => Err(format!("no transaction boundary within {} s", SWITCH_WAIT.as_secs())),
        }
    }
}

impl State {
    /// Takes the tables and actions of `stored` for the session of its name, if that
    /// still reads the same slot (a definition made anew under the name is not a change).
    pub(super) fn follow(&mut self, stored: &Definition) {
        let Some(e) = self.sessions.get_mut(&stored.name).filter(|e| e.def.slot_name == stored.slot_name) else {
            return;
        };
        if (&e.def.tables, &e.def.actions) != (&stored.tables, &stored.actions) {
            e.snapshot_tables.get_or_insert_with(|| e.def.tables.clone());
            (e.def.tables, e.def.actions) = (stored.tables.clone(), stored.actions.clone());
        }
    }
}

fn end(running: &StreamStop, name: &str, why: &'static str) {
    tracing::info!(session = name, why, "stream ended");
    running.stop(code::NORMAL, why);
}

/// The entries of `new` that `old` did not have exactly (a changed row filter or
/// column list counts as added); none when `old` streamed every table.
fn added(old: &Definition, new: &Definition) -> Vec<TableEntry> {
    let Some(before) = &old.tables else { return Vec::new() };
    new.tables.iter().flatten().filter(|e| !before.contains(e)).cloned().collect()
}
