//! Creating and ending sessions. Each runs to completion in a task of its own, whatever
//! the client does: a client that hangs up half way must not leave behind a slot that
//! nobody owns, which would retain WAL forever. They run one at a time.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::definition::{Action, DEFAULT_NAME, Definition, TableEntry, TablePattern, check_name, display_pattern};
use super::names;
use super::safety::{InvalidatedBy, SlotPolicy};
use super::slots::{NewSlot, OurSlot, plugin_cannot_load};
use super::snapshots::SnapshotState;
use super::{Entry, PluginChoice, Registry};
use crate::error::{Error, ErrorKind};
use crate::pg::ident::TableRef;
use crate::stream::plugin::Plugin;
use crate::stream::stop::code;
use crate::types::Lsn;

/// What `POST /v2/sessions` asks for.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub name: String,
    /// None: every table.
    pub tables: Option<Vec<TableEntry>>,
    /// None: every action.
    pub actions: Option<Vec<Action>>,
    pub plugin: Option<Plugin>,
    /// pgoutput on 18+: publish generated columns.
    pub publish_generated_columns: bool,
    /// The WAL budget and what to do when the slot is invalidated.
    pub policy: SlotPolicy,
    /// pgoutput: read this publication, made by the operator, rather than one of the
    /// session's own (on a standby, the only way).
    pub publication: Option<String>,
    /// Schema changes of its tables in its stream (the server's event trigger).
    pub ddl: bool,
}

impl Registry {
    /// `/v1/init`: a new slot and snapshot for the session named `default`, which then
    /// replaces the previous one (its stream is closed, its snapshot released, its slot
    /// dropped). On failure the previous session stays as it was.
    pub async fn init(self: &Arc<Self>) -> Result<Definition, Error> {
        let registry = Arc::clone(self);
        run_to_completion(async move { registry.replace_default().await }).await
    }

    /// `POST /v2/sessions`: the definition, and the slot's consistent point.
    pub async fn create(self: &Arc<Self>, mut req: CreateRequest) -> Result<(Definition, Lsn), Error> {
        check_name(&req.name)?;
        if req.policy.max_retained_bytes == Some(0) {
            return Err(Error::bad_request(
                "maxRetainedBytes must be at least 1: leave it out for the server's default (--max-retained-bytes)",
            ));
        }
        if let Some(publication) = &req.publication {
            check_external_publication(publication, &req)?;
            req.plugin = Some(Plugin::Pgoutput);
        }
        check_entries(req.tables.as_ref())?;
        let registry = Arc::clone(self);
        run_to_completion(async move { registry.create_new(req).await }).await
    }

    /// `DELETE /v2/sessions/{name}`: closes its stream (1000), releases its snapshot,
    /// drops its slot and forgets its definition.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<(), Error> {
        let registry = Arc::clone(self);
        let name = name.to_owned();
        run_to_completion(async move {
            let _one_at_a_time = registry.admin.lock().await;
            registry.refuse_when_stopping()?;
            let def = registry.known(&name).await?;
            registry.refuse_if_streamed_elsewhere(&def).await?;
            registry.end(&def, "session dropped").await
        })
        .await
    }

    /// `DELETE /v1/sessions/{slotName}`: the same, for the session that reads the slot.
    pub(crate) async fn drop_session(self: &Arc<Self>, slot: &str) -> Result<(), Error> {
        let registry = Arc::clone(self);
        let slot = slot.to_owned();
        run_to_completion(async move {
            let _one_at_a_time = registry.admin.lock().await;
            registry.refuse_when_stopping()?;
            let def = registry.session_of_slot(&slot).await?;
            registry.refuse_if_streamed_elsewhere(&def).await?;
            registry.end(&def, "slot dropped by operator").await?;
            tracing::info!(slot, "session dropped by operator");
            Ok(())
        })
        .await
    }

    async fn replace_default(&self) -> Result<Definition, Error> {
        let _one_at_a_time = self.admin.lock().await;
        self.refuse_when_stopping()?;
        let (mut def, auto) = self.define(DEFAULT_NAME, None, None, None, false, SlotPolicy::default()).await?;
        let previous = self.previous_default().await;
        // Stored before the slot exists, so that the write is not in the slot's stream.
        // v1 works without the store: a role that may not create it still streams.
        let stored = match self.store.put(&def).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the default session is not stored: it will not be listed after a restart");
                false
            }
        };
        // The new slot first: if anything fails, the previous session is still whole.
        let made = async {
            let new = self.create_session_slot(&mut def, auto, stored).await?;
            if let Some(previous) = &previous {
                if let Err(e) = self.end(previous, "session reset by /v1/init").await {
                    self.slots.discard(&def, new.holder).await;
                    return Err(e);
                }
            }
            Ok(new)
        }
        .await;
        let new = match made {
            Ok(new) => new,
            Err(e) => {
                if stored {
                    self.store.restore_default(previous.as_ref()).await;
                }
                return Err(e);
            }
        };
        let entry = Entry::new(def.clone(), SnapshotState::Held(new.holder), Some(new.consistent_point), stored);
        self.with(|s| s.sessions.insert(def.name.clone(), entry));
        tracing::info!(session = DEFAULT_NAME, slot = %def.slot_name, plugin = %def.plugin, "session created");
        Ok(def)
    }

    /// The default session an init replaces: this process's, or the one an earlier
    /// process stored (whose slot would otherwise be nobody's). A store that cannot be
    /// read leaves only this process's.
    async fn previous_default(&self) -> Option<Definition> {
        if let Some(def) = self.with(|s| s.sessions.get(DEFAULT_NAME).map(|e| e.def.clone())) {
            return Some(def);
        }
        match self.store.get(DEFAULT_NAME).await {
            Ok(def) => def,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored default session: its slot, if any, is kept");
                None
            }
        }
    }

    async fn create_new(&self, req: CreateRequest) -> Result<(Definition, Lsn), Error> {
        let _one_at_a_time = self.admin.lock().await;
        self.refuse_when_stopping()?;
        if self.with(|s| s.sessions.contains_key(&req.name)) {
            return Err(taken(&req.name));
        }
        self.slots.refuse_as_session_name(&req.name).await?;
        // A standby cannot write the store: its sessions are this process's alone.
        let standby = self.slots.in_recovery().await?;
        // The store first: its schema is one a session may name (and never gets).
        if !standby {
            self.store.create().await?;
        }
        let client = self.pool.get().await?;
        let tables = match &req.tables {
            Some(patterns) => Some(resolve_tables(&client, patterns).await?),
            None => None,
        };
        client.release();
        let (mut def, auto) = self
            .define(
                &req.name,
                tables,
                req.actions.clone(),
                req.plugin,
                req.publish_generated_columns,
                req.policy.clone(),
            )
            .await?;
        def.external_publication = req.publication.clone();
        // Before anything is stored: a role that may not make the trigger gets the SQL.
        if req.ddl {
            super::ddl::prepare(&self.pool, &self.settings.schema, def.plugin, standby).await?;
            def.ddl = true;
        }
        // Stored first: that reserves the name across processes, and keeps the write
        // out of the new slot's stream.
        if !standby && !self.store.insert(&def).await? {
            return Err(taken(&req.name));
        }
        let new = match self.create_session_slot(&mut def, auto, !standby).await {
            Ok(new) => new,
            Err(e) => {
                if !standby {
                    if let Err(e) = self.store.delete(&def.name).await {
                        tracing::warn!(session = %def.name, error = %e, "cannot remove the definition of a failed create");
                    }
                }
                return Err(e);
            }
        };
        if standby {
            tracing::warn!(
                session = %def.name,
                slot = %def.slot_name,
                "the server is a standby: the session is not stored, and is gone when this process ends (its slot \
                 stays: drop it with DELETE /v2/sessions/{{name}} before, or pg_drop_replication_slot on the standby)"
            );
        }
        let entry = Entry::new(def.clone(), SnapshotState::Held(new.holder), Some(new.consistent_point), !standby);
        self.with(|s| s.sessions.insert(def.name.clone(), entry));
        tracing::info!(session = %def.name, slot = %def.slot_name, plugin = %def.plugin, "session created");
        Ok((def, new.consistent_point))
    }

    /// A definition with a slot name nobody uses yet; true when its plugin is only a
    /// first try (`auto`: wal2json, pgoutput if the database cannot load it).
    async fn define(
        &self,
        name: &str,
        tables: Option<Vec<TableEntry>>,
        actions: Option<Vec<Action>>,
        plugin: Option<Plugin>,
        publish_generated_columns: bool,
        policy: SlotPolicy,
    ) -> Result<(Definition, bool), Error> {
        let actions = normalize_actions(actions.unwrap_or_else(|| Action::ALL.to_vec()));
        let narrows = tables.iter().flatten().any(TableEntry::narrows);
        let (plugin, auto) = match (plugin, self.settings.plugin) {
            (Some(p), _) | (None, PluginChoice::Fixed(p)) => (p, false),
            (None, PluginChoice::Auto) if narrows => (Plugin::narrowing(), false),
            (None, PluginChoice::Auto) => (Plugin::PREFERRED, true),
        };
        check_narrowing(plugin, tables.as_ref())?;
        let here = self.with(|s| s.sessions.keys().cloned().collect());
        let slot_name = self.slots.fresh_name(here).await?;
        let def = Definition {
            name: name.to_owned(),
            slot_name,
            plugin,
            tables,
            actions,
            publish_generated_columns,
            policy,
            fate: Default::default(),
            external_publication: None,
            backfill: None,
            ddl: false,
        };
        Ok((def, auto))
    }

    /// Creates the session's slot (with what its plugin needs before it), leaving
    /// nothing behind when it fails. With `auto`, a database that cannot load the
    /// plugin gets its fallback instead (wal2json's: pgoutput); the definition then
    /// says so, in the store too when `stored` (before the slot exists, so that the
    /// write is not in its stream).
    async fn create_session_slot(&self, def: &mut Definition, auto: bool, stored: bool) -> Result<NewSlot, Error> {
        let e = match self.slots.create(def).await {
            Err(e) if auto && plugin_cannot_load(&e, def.plugin) => e,
            made => return made,
        };
        let Some(fallback) = def.plugin.fallback() else { return Err(e) };
        tracing::info!(slot = %def.slot_name, error = %e, "the database cannot load {}: using {fallback}", def.plugin);
        def.plugin = fallback;
        if def.ddl {
            let client = self.pool.get().await?;
            let major = client.major().ok_or(crate::pg::pool::PoolError::NoVersion)?;
            client.release();
            super::ddl::check_plugin(def.plugin, major)?;
        }
        if stored {
            self.store.put(def).await?;
        }
        self.slots.create(def).await
    }

    /// Stops the session's stream (running or opening), drops its slot, releases its
    /// snapshot, and forgets it. If the slot cannot be dropped the session stays whole.
    pub(super) async fn end(&self, def: &Definition, why: &'static str) -> Result<(), Error> {
        let name = def.name.as_str();
        self.with(|s| s.sessions.get_mut(name).map(|e| e.stream.closing = Some(why)));
        self.stop_stream_and_wait(name, code::NORMAL, why).await;
        if let Err(e) = self.slots.drop_slot_of(def).await {
            self.with(|s| s.sessions.get_mut(name).map(|e| e.stream.closing = None));
            return Err(e);
        }
        if let Err(e) = self.store.delete_exactly(def).await {
            tracing::warn!(session = name, error = %e, "cannot remove the stored definition");
        }
        self.with(|s| {
            if let Some(mut e) = s.sessions.remove(name) {
                e.snapshot.release(name, why);
            }
        });
        Ok(())
    }

    /// Stops the session's stream (running or opening) and its watchers with `code`,
    /// and waits a bounded time for the stream to end.
    pub(super) async fn stop_stream_and_wait(&self, name: &str, code: u16, why: &'static str) {
        self.watchers.stop(name, code, why);
        self.with(|s| s.sessions.get(name).and_then(|e| e.stream.running.as_ref()).map(|stop| stop.stop(code, why)));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        if !self.wait_streams(deadline, |s| s.sessions.get(name).is_none_or(|e| e.stream.running.is_none())).await {
            tracing::warn!(session = name, "stream did not end in time");
        }
    }

    /// Another process streams the session: ending (or changing) it here would cut off
    /// its client.
    pub(super) async fn refuse_if_streamed_elsewhere(&self, def: &Definition) -> Result<(), Error> {
        let Ok(info) = self.our_slot(&def.slot_name).await else { return Ok(()) };
        // Ours while it runs here, and while the walsender of our last stream lets go.
        let (running, ours_pid) = self.with(|s| {
            s.sessions.get(&def.name).map_or((false, None), |e| (e.stream.running.is_some(), e.stream.walsender))
        });
        match info.active_pid {
            Some(pid) if !running && Some(pid) != ours_pid => Err(Error::conflict(format!(
                "slot {} is in use by another process (pid {pid}); stop that first, or retry if a client just left",
                def.slot_name
            ))),
            _ => Ok(()),
        }
    }

    /// The definition of session `name`: known here, or stored by another process
    /// (then known here from now on).
    pub(super) async fn known(&self, name: &str) -> Result<Definition, Error> {
        check_name(name)?;
        if let Some(def) = self.with(|s| s.sessions.get(name).map(|e| e.def.clone())) {
            return Ok(def);
        }
        match self.store.get(name).await? {
            Some(def) => {
                self.with(|s| s.adopt(def.clone(), true));
                Ok(def)
            }
            None => Err(Error::not_found(format!("no session named {name}"))),
        }
    }

    /// Whether `slot` is ours, its plugin and who streams it ([`Slots::ours`]).
    ///
    /// [`Slots::ours`]: super::slots::Slots::ours
    pub(crate) async fn our_slot(&self, slot: &str) -> Result<OurSlot, Error> {
        let named_here = self.with(|s| s.by_slot(slot).is_some());
        self.slots.ours(slot, named_here).await
    }

    /// The one answer to "which session is this slot": a slot of ours ([`our_slot`]'s
    /// refusals) belongs to the session of this process or the stored definition that
    /// reads it, or else (a slot of an earlier version) to a session of its own, named
    /// after it and not stored. The session is known here from now on.
    ///
    /// [`our_slot`]: Registry::our_slot
    pub(crate) async fn session_of_slot(&self, slot: &str) -> Result<Definition, Error> {
        // A slot we dropped past its budget is gone, and its session says so (410).
        if let Some(def) = self.dropped_slot_session(slot).await {
            return Ok(def);
        }
        let info = self.our_slot(slot).await?;
        if let Some(def) = self.with(|s| s.by_slot(slot).map(|e| e.def.clone())) {
            return Ok(def);
        }
        // A store that cannot be read leaves the slot a session of its own.
        let def = match self.store.by_slot(slot).await.ok().flatten() {
            Some(def) => {
                self.with(|s| s.adopt(def.clone(), true));
                def
            }
            None => {
                let def = Definition {
                    name: slot.to_owned(),
                    slot_name: slot.to_owned(),
                    plugin: info.plugin,
                    tables: None,
                    actions: Action::ALL.to_vec(),
                    publish_generated_columns: false,
                    policy: Default::default(),
                    fate: Default::default(),
                    external_publication: None,
                    backfill: None,
                    ddl: false,
                };
                self.with(|s| s.adopt(def.clone(), false));
                def
            }
        };
        // Another entry of the same name may have been adopted first: it is the one.
        Ok(self.with(|s| s.sessions.get(&def.name).map(|e| e.def.clone())).unwrap_or(def))
    }

    /// The session whose slot `slot` we dropped past its budget, if it is one.
    async fn dropped_slot_session(&self, slot: &str) -> Option<Definition> {
        let here = self.with(|s| s.by_slot(slot).map(|e| e.def.clone()));
        let def = match here {
            Some(def) => def,
            None if names::is_ours(slot) => self.store.by_slot(slot).await.ok().flatten()?,
            None => return None,
        };
        let dropped = def.fate.invalidated.as_ref().is_some_and(|i| i.by == InvalidatedBy::Pgdeltastream);
        dropped.then(|| {
            self.with(|s| s.adopt(def.clone(), true));
            def
        })
    }

    /// The names a v1 consumer's token may give to use slot `slot` (stream, ack,
    /// release its snapshot): the name of the session the slot belongs to, and the
    /// slot's own, unless that is the name of another session (one stored before names
    /// were kept apart from slot names: its token must not reach this slot).
    pub(crate) async fn slot_grants(&self, slot: &str) -> Result<Vec<String>, Error> {
        let def = self.session_of_slot(slot).await?;
        let other = def.name != slot
            && match self.known(slot).await {
                Ok(_) => true,
                Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::BadRequest) => false,
                Err(e) => return Err(e),
            };
        Ok(grants(slot, Some(def.name), other))
    }
}

/// The names a v1 consumer's token may give for `slot`: its session's, and the slot's
/// own unless `another_named_so` (another session has the slot's name). The one rule
/// of [`Registry::slot_grants`] and of the listing's grants.
pub(super) fn grants(slot: &str, session: Option<String>, another_named_so: bool) -> Vec<String> {
    let own = (!another_named_so && session.as_deref() != Some(slot)).then(|| slot.to_owned());
    session.into_iter().chain(own).collect()
}

/// What can be told of a request's table entries before the catalog is asked.
pub(super) fn check_entries(tables: Option<&Vec<TableEntry>>) -> Result<(), Error> {
    for entry in tables.into_iter().flatten() {
        if let TableEntry::Table(spec) = entry {
            spec.check()?;
        }
    }
    Ok(())
}

/// Actions in their canonical order, each once.
pub(super) fn normalize_actions(mut actions: Vec<Action>) -> Vec<Action> {
    actions.sort_by_key(|a| Action::ALL.iter().position(|b| b == a));
    actions.dedup();
    actions
}

/// Row filters and column lists only where the plugin applies them.
pub(super) fn check_narrowing(plugin: Plugin, tables: Option<&Vec<TableEntry>>) -> Result<(), Error> {
    if tables.into_iter().flatten().any(TableEntry::narrows) && !plugin.narrows() {
        return Err(Error::bad_request(format!(
            "a row filter (where) or a column list (columns) needs the pgoutput plugin: {plugin} cannot apply them"
        )));
    }
    Ok(())
}

fn taken(name: &str) -> Error {
    Error::conflict(format!("a session named {name} exists already"))
}

/// Runs `work` in a task of its own and waits for it: if the caller goes away, the work
/// still finishes.
pub(super) async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(work).await.map_err(|e| Error::internal(format!("the request failed: {e}")))?
}

/// Resolves a session's table patterns against the catalog: unqualified names through
/// the search_path, every table and schema checked. 404 for what does not exist.
pub(super) async fn resolve_tables(client: &Client, entries: &[TableEntry]) -> Result<Vec<TableEntry>, Error> {
    let mut resolved = Vec::with_capacity(entries.len());
    for entry in entries {
        let shown = match TablePattern::parse(entry.pattern())? {
            TablePattern::Schema(schema) => {
                let found =
                    client.query_opt("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1", &[&schema]).await?;
                if found.is_none() {
                    return Err(Error::not_found(format!("schema {schema:?} does not exist")));
                }
                display_pattern(&schema, None)
            }
            TablePattern::Table(t) => {
                let (schema, table) = resolve_table(client, &t).await?;
                display_pattern(&schema, Some(&table))
            }
        };
        let shown = entry.with_pattern(shown);
        if !resolved.contains(&shown) {
            resolved.push(shown);
        }
    }
    Ok(resolved)
}

/// A session that names its publication streams what that publishes: nothing else may
/// say which tables, and only pgoutput reads publications.
fn check_external_publication(publication: &str, req: &CreateRequest) -> Result<(), Error> {
    if publication.is_empty() || publication.len() > crate::pg::ident::MAX_IDENT_BYTES || publication.contains('\0') {
        return Err(Error::bad_request(format!(
            "invalid publication {publication:?}: a publication name is 1 to {} bytes, without NUL",
            crate::pg::ident::MAX_IDENT_BYTES
        )));
    }
    if req.plugin.is_some_and(|p| p != Plugin::Pgoutput) {
        return Err(Error::bad_request("a publication is read by the pgoutput plugin only: leave plugin out"));
    }
    if req.tables.is_some() || req.publish_generated_columns {
        return Err(Error::bad_request(format!(
            "publication {publication:?} says which tables and columns are streamed: leave tables and \
             publishGeneratedColumns out"
        )));
    }
    Ok(())
}

async fn resolve_table(client: &Client, t: &TableRef) -> Result<(String, String), Error> {
    const FROM: &str = "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                        WHERE c.relkind IN ('r', 'p') AND c.relname = $1";
    let row = match &t.schema {
        Some(schema) => {
            let sql = format!("SELECT n.nspname::text, c.relname::text {FROM} AND n.nspname = $2");
            client.query_opt(&sql, &[&t.name, schema]).await
        }
        None => {
            let sql = format!(
                "SELECT n.nspname::text, c.relname::text {FROM} \
                 AND n.nspname = ANY (pg_catalog.current_schemas(false)) \
                 ORDER BY pg_catalog.array_position(pg_catalog.current_schemas(false), n.nspname) LIMIT 1"
            );
            client.query_opt(&sql, &[&t.name]).await
        }
    }?;
    let row = row.ok_or_else(|| Error::not_found(format!("table {t} does not exist")))?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

#[cfg(test)]
mod tests {
    use super::grants;

    #[test]
    fn a_token_may_name_the_session_or_the_slot_unless_another_session_has_the_slots_name() {
        assert_eq!(grants("delta_a1", Some("orders".into()), false), ["orders", "delta_a1"]);
        assert_eq!(grants("delta_a1", Some("orders".into()), true), ["orders"]);
        assert_eq!(grants("delta_a1", Some("delta_a1".into()), false), ["delta_a1"]);
        assert_eq!(grants("delta_a1", None, false), ["delta_a1"]);
        assert!(grants("delta_a1", None, true).is_empty());
    }
}
