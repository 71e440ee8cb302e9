//! Replication slots, the [`Slots`] service: created with an exported snapshot (the
//! plugin's publication before, see [`super::publications`]), checked before a stream
//! or a drop, started, and dropped (the publication after). It owns this SQL; the
//! registry decides when.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::definition::Definition;
use super::names;
use super::publications::ForSession;
use super::slot_rows::{read_state, state_columns};
use super::snapshots::{SnapshotHolder, SnapshotState};
use super::store::Store;
use crate::error::{Error, ErrorKind};
use crate::pg::PgConfig;
use crate::pg::PgError;
use crate::pg::ident::is_valid_slot_name;
use crate::pg::pool::{Pool, PoolError};
use crate::pg::replication::{ReplicationConnection, ReplicationStream};
use crate::pg::version::Major;
use crate::stream::plugin::Plugin;
use crate::types::Lsn;

/// A slot just made, and the snapshot it exported, held.
pub(super) struct NewSlot {
    pub consistent_point: Lsn,
    pub holder: SnapshotHolder,
}

/// A slot of ours, as Postgres sees it now.
pub(crate) struct OurSlot {
    pub plugin: Plugin,
    /// The walsender streaming it, ours or another process's.
    pub active_pid: Option<i32>,
    pub confirmed_flush: Lsn,
    /// The server's major, which decides the plugin's start options.
    pub major: Major,
    /// Why Postgres invalidated the slot, when it did: it can never stream again.
    pub invalidated: Option<String>,
}

struct SlotInfo {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    confirmed_flush: Lsn,
    major: Major,
    invalidated: Option<String>,
}

/// The replication slots of sessions (and their publications).
pub(super) struct Slots {
    pub(super) pg: PgConfig,
    pub(super) pool: Pool,
    pub(super) store: Store,
    /// The store's schema, which no publication covers.
    pub(super) hidden_schema: String,
    /// Create failover slots where Postgres has them ([`Slots::failover_for`]).
    pub(super) failover: bool,
    /// `failover` was found not to apply, and the log said so once.
    pub(super) failover_skipped: std::sync::Once,
}

impl Slots {
    /// A slot name no slot of the cluster has (`delta_<word><number>`), nor any
    /// session, stored or `here` (a v1 token names either: see
    /// `refuse_as_session_name`).
    pub(super) async fn fresh_name(&self, here: Vec<String>) -> Result<String, Error> {
        let client = self.pool.get().await?;
        // A publication is named as its slot: neither may be taken.
        let rows = client
            .query(
                "SELECT slot_name::text FROM pg_catalog.pg_replication_slots \
                 UNION SELECT pubname::text FROM pg_catalog.pg_publication",
                &[],
            )
            .await;
        client.release();
        // Sessions stored before their names were kept apart from slot names.
        let stored = self.store.names().await;
        let mut taken: Vec<String> = rows?.iter().filter_map(|r| r.try_get(0).ok()).collect();
        match stored {
            Ok(names) => taken.extend(names),
            // v1 works without the store; today's names never take a slot's form anyway.
            Err(e) => tracing::warn!(error = %e, "cannot read the stored session names"),
        }
        taken.extend(here);
        (0..100)
            .map(|_| names::random_name())
            .find(|n| !taken.contains(n))
            .ok_or_else(|| Error::internal("no free slot name found"))
    }

    /// Creates the slot of `def` with what its plugin needs before it (a pgoutput
    /// session's publication), and holds the snapshot it exports. Leaves nothing
    /// behind when it fails.
    pub(super) async fn create(&self, def: &Definition) -> Result<NewSlot, Error> {
        if let Some(publication) = &def.external_publication {
            self.check_external(publication).await?;
            return self.create_slot(&def.slot_name, def.plugin).await;
        }
        if def.plugin.publication(&def.slot_name).is_some() && self.in_recovery().await? {
            return Err(Error::conflict(
                "the server is a standby (in recovery), where no publication can be created: create one on the \
                 primary (CREATE PUBLICATION name FOR TABLE ...) and name it in the session's \"publication\" \
                 (POST /v2/sessions); /v1/init on a standby needs wal2json",
            ));
        }
        let publications = ForSession { slots: self, def };
        def.plugin.before_slot(&def.slot_name, &publications).await?;
        let made = self.create_slot(&def.slot_name, def.plugin).await;
        if made.is_err() {
            def.plugin.after_drop(&def.slot_name, &publications).await;
        }
        made
    }

    /// Drops the slot of `def`, then what its plugin made for it. If the slot cannot
    /// be dropped nothing else is.
    pub(super) async fn drop_slot_of(&self, def: &Definition) -> Result<(), Error> {
        self.drop_slot(&def.slot_name).await?;
        // A publication the operator made is theirs.
        if def.external_publication.is_none() {
            def.plugin.after_drop(&def.slot_name, &ForSession { slots: self, def }).await;
        }
        Ok(())
    }

    /// Whether the server is a standby, which can neither store definitions nor create
    /// publications.
    pub(super) async fn in_recovery(&self) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let row = client.query_one("SELECT pg_catalog.pg_is_in_recovery()", &[]).await?;
        client.release();
        Ok(row.try_get(0)?)
    }

    /// A publication a session names exists (a standby has the primary's).
    async fn check_external(&self, publication: &str) -> Result<(), Error> {
        let client = self.pool.get().await?;
        let found =
            client.query_opt("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1", &[&publication]).await;
        client.release();
        if found?.is_none() {
            return Err(Error::not_found(format!(
                "publication {} does not exist: create it (on the primary, when this server is a standby)",
                crate::pg::ident::quote_ident(publication)
            )));
        }
        Ok(())
    }

    /// Undoes a slot (and publication) made for a session that was never registered.
    pub(super) async fn discard(&self, def: &Definition, holder: SnapshotHolder) {
        let slot = def.slot_name.as_str();
        SnapshotState::Held(holder).release(slot, "the session was not created");
        if let Err(e) = self.drop_slot_of(def).await {
            tracing::error!(slot, error = %e, "cannot drop the slot of a failed create; drop it with DELETE /v1/sessions/{{slotName}}");
        }
    }

    /// A session name is never a slot's: a v1 token names either, and a stream of the
    /// slot must not be granted by the name of another session. Names of the form of
    /// ours (`delta_face56`) are kept for slots, so that no slot made later, by any
    /// process, takes a session's name; and no existing slot's name is taken.
    pub(super) async fn refuse_as_session_name(&self, name: &str) -> Result<(), Error> {
        if names::is_ours(name) {
            return Err(Error::conflict(format!(
                "the name {name} is of the form of pgdeltastream's slot names (delta_<word><number>), which are kept \
                 for slots: choose another"
            )));
        }
        let client = self.pool.get().await?;
        let row =
            client.query_opt("SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", &[&name]).await;
        client.release();
        if row?.is_some() {
            return Err(Error::conflict(format!("the name {name} is taken by a replication slot: choose another")));
        }
        Ok(())
    }

    /// Starts streaming `slot` from `start` on a replication connection of its own.
    pub(super) async fn start_replication(
        &self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, Error> {
        let conn = ReplicationConnection::connect(&self.pg).await?;
        if let Some(encoding) = conn.parameter("server_encoding").filter(|e| *e != "UTF8") {
            let encoding = encoding.to_owned();
            conn.close().await;
            return Err(Error::internal(format!(
                "database {} is encoded in {encoding}: pgdeltastream streams only UTF8 databases",
                self.pg.dbname
            )));
        }
        conn.start_replication(slot, start, options).await.map_err(|e| match e.code() {
            Some(c) if c == SqlState::OBJECT_IN_USE.code() => {
                Error::conflict(format!("slot {slot} is in use by another process: {e}"))
            }
            Some(c) if c == SqlState::UNDEFINED_OBJECT.code() => {
                Error::not_found(format!("replication slot {slot} does not exist"))
            }
            _ => Error::from_pg(&e),
        })
    }

    /// Creates TEMPORARY slot `slot` of `plugin` and starts streaming it with
    /// `options`: Postgres drops it when the stream's connection ends. Answers where
    /// it starts.
    pub(super) async fn open_temporary(
        &self,
        slot: &str,
        plugin: Plugin,
        options: &[(&str, String)],
    ) -> Result<(Lsn, ReplicationStream), Error> {
        let mut conn = ReplicationConnection::connect(&self.pg).await?;
        let start = match conn.create_temporary_slot(slot, plugin.name()).await {
            Ok(start) => start,
            Err(e) => {
                conn.close().await;
                return Err(e.into());
            }
        };
        Ok((start, conn.start_replication(slot, start, options).await?))
    }

    /// Creates slot `name` and holds the snapshot it exports. Leaves no slot behind
    /// when it fails.
    async fn create_slot(&self, name: &str, plugin: Plugin) -> Result<NewSlot, Error> {
        let mut conn = ReplicationConnection::connect(&self.pg).await?;
        let failover = self.failover_for(&conn);
        let created = match conn.create_logical_slot(name, plugin.name(), failover).await {
            Ok(c) => c,
            Err(e) => {
                let major = conn.parameter("server_version").and_then(Major::from_server_version);
                conn.close().await;
                return Err(Error::from_pg_on(&e, major).with_source(e));
            }
        };
        // Import the snapshot before anything else runs on `conn`: the next command
        // there would end it.
        let held = SnapshotHolder::hold(&self.pg, created.snapshot_name.as_deref()).await;
        conn.close().await;
        match held {
            Ok(holder) => {
                tracing::info!(slot = %created.slot_name, consistent_point = %created.consistent_point, "slot created");
                Ok(NewSlot { consistent_point: created.consistent_point, holder })
            }
            Err(e) => {
                let _ = self.drop_slot(&created.slot_name).await;
                Err(e)
            }
        }
    }

    /// Whether a slot made on `conn` is a failover slot: when asked for, and where
    /// Postgres can (17+, and not on a standby, which refuses failover for its own
    /// slots). Where it cannot, the log says so once.
    fn failover_for(&self, conn: &ReplicationConnection) -> bool {
        if !self.failover {
            return false;
        }
        let major = conn.parameter("server_version").and_then(Major::from_server_version);
        let why_not = match major {
            Some(m) if !m.has_failover_slots() => format!("PostgreSQL {m} has none (17+ has)"),
            None => "the server did not report its version".to_owned(),
            Some(_) if conn.parameter("in_hot_standby") == Some("on") => {
                "the server is a standby, whose slots cannot be failover slots".to_owned()
            }
            Some(_) => return true,
        };
        self.failover_skipped.call_once(|| {
            tracing::info!("--failover-slots is on, but slots are created without FAILOVER: {why_not}");
        });
        false
    }

    /// Drops a slot if it exists, waiting a little for a walsender that is still
    /// letting go of it.
    async fn drop_slot(&self, slot: &str) -> Result<(), Error> {
        let client = self.pool.get().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = client
                .execute(
                    "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            match result {
                Ok(_) => {
                    tracing::info!(slot, "slot dropped");
                    client.release();
                    return Ok(());
                }
                // The walsender has not exited yet.
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The one answer to "is this slot ours, which plugin, who streams it": one of our
    /// names, in the configured database, decoded by a plugin we read, and for a plugin
    /// others use too, named by a session (of this process when `named_here`).
    /// Refusals are the client's errors (400, 403, 404).
    pub(super) async fn ours(&self, slot: &str, named_here: bool) -> Result<OurSlot, Error> {
        if !is_valid_slot_name(slot) || !names::is_ours(slot) {
            return Err(Error::bad_request(format!(
                "invalid slotName {slot:?}: expected a slot created by /v1/init, like delta_face56"
            )));
        }
        let info = self.slot_info(slot).await?;
        let info = info.ok_or_else(|| Error::not_found(format!("replication slot {slot} does not exist")))?;
        if info.database.as_deref() != Some(self.pg.dbname.as_str()) {
            return Err(Error::not_found(format!(
                "replication slot {slot} does not belong to database {}",
                self.pg.dbname
            )));
        }
        let plugin = info.plugin.as_deref().and_then(Plugin::from_name).ok_or_else(|| {
            Error::bad_request(format!(
                "replication slot {slot} uses plugin {}, which pgdeltastream does not read",
                info.plugin.as_deref().unwrap_or("(none)")
            ))
        })?;
        if plugin.shared() && !named_here && !self.named(slot, plugin).await? {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!(
                    "replication slot {slot} is a {plugin} slot that no session of pgdeltastream names (a subscriber's?): \
                     it is not streamed here"
                ),
            ));
        }
        Ok(OurSlot {
            plugin,
            active_pid: info.active_pid,
            confirmed_flush: info.confirmed_flush,
            major: info.major,
            invalidated: info.invalidated,
        })
    }

    /// A stored definition reads `slot`, or it reads the publication its plugin names,
    /// the way pgdeltastream makes them (so that a slot made by hand for a tool or a
    /// test streams as v1 slots always have). A subscriber's slot has neither.
    async fn named(&self, slot: &str, plugin: Plugin) -> Result<bool, Error> {
        let def = self.store.by_slot(slot).await;
        let Some(publication) = plugin.publication(slot) else { return Ok(def?.is_some()) };
        let client = self.pool.get().await?;
        let found =
            client.query_opt("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1", &[&publication]).await;
        client.release();
        Ok(def?.is_some() || found?.is_some())
    }

    async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, Error> {
        let client = self.pool.get().await?;
        let major = client.major().ok_or(PoolError::NoVersion)?;
        let sql = format!(
            "SELECT s.plugin::text, s.database::text, s.active_pid, coalesce(s.confirmed_flush_lsn, '0/0')::text, {} \
             FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = $1",
            state_columns(major)
        );
        let row = client.query_opt(&sql, &[&slot]).await?;
        client.release();
        let Some(row) = row else { return Ok(None) };
        let confirmed: String = row.try_get(3)?;
        let state = read_state(&row, 4)?;
        Ok(Some(SlotInfo {
            major,
            invalidated: state.invalidated(),
            plugin: row.try_get(0)?,
            database: row.try_get(1)?,
            active_pid: row.try_get(2)?,
            confirmed_flush: confirmed
                .parse()
                .map_err(|_| Error::internal(format!("bad LSN {confirmed:?} from Postgres")))?,
        }))
    }
}

/// Postgres could not load `plugin` (not installed, not on the database's
/// dynamic_library_path, not a trusted output plugin): another plugin may do.
pub(super) fn plugin_cannot_load(e: &Error, plugin: Plugin) -> bool {
    let source = std::error::Error::source(e).and_then(|s| s.downcast_ref::<PgError>());
    let Some(PgError::Db(db)) = source else { return false };
    db.code == tokio_postgres::error::SqlState::UNDEFINED_FILE.code() || db.message.contains(plugin.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::error::DbError;

    fn failed(code: &str, message: &str) -> Error {
        let e = PgError::Db(DbError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            ..DbError::default()
        });
        e.into()
    }

    #[test]
    fn a_plugin_postgres_cannot_load_is_told_from_other_failures() {
        let missing = failed("58P01", "could not access file \"wal2json\": No such file or directory");
        assert!(plugin_cannot_load(&missing, Plugin::Wal2json));
        let untrusted = failed("42501", "permission denied: \"wal2json\" may not be used as an output plugin");
        assert!(plugin_cannot_load(&untrusted, Plugin::Wal2json));
        assert!(!plugin_cannot_load(&failed("53400", "all replication slots are in use"), Plugin::Wal2json));
        assert!(!plugin_cannot_load(&Error::internal("wal2json"), Plugin::Wal2json), "only Postgres's word counts");
    }
}
