//! Replication slots: created with an exported snapshot, checked before a stream or a
//! drop, and dropped.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::snapshots::SnapshotHolder;
use super::{Registry, names};
use crate::error::{Error, ErrorKind};
use crate::pg::PgConfig;
use crate::pg::PgError;
use crate::pg::ident::is_valid_slot_name;
use crate::pg::pool;
use crate::pg::replication::ReplicationConnection;
use crate::pg::snapshot;
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
}

struct SlotInfo {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    confirmed_flush: Lsn,
}

impl Registry {
    /// A slot name no slot of the cluster has (`delta_<word><number>`), nor any
    /// session (a v1 token names either: see `refuse_slot_names`).
    pub(super) async fn fresh_slot_name(&self) -> Result<String, Error> {
        let client = self.pool.get().await?;
        // A publication is named as its slot: neither may be taken.
        let rows = client
            .query(
                "SELECT slot_name::text FROM pg_catalog.pg_replication_slots \
                 UNION SELECT pubname::text FROM pg_catalog.pg_publication",
                &[],
            )
            .await;
        // Sessions stored before their names were kept apart from slot names.
        let stored = self.store.names(&client).await;
        client.release();
        let mut taken: Vec<String> = rows?.iter().filter_map(|r| r.try_get(0).ok()).collect();
        match stored {
            Ok(names) => taken.extend(names),
            // v1 works without the store; today's names never take a slot's form anyway.
            Err(e) => tracing::warn!(error = %e, "cannot read the stored session names"),
        }
        taken.extend(self.with(|s| s.sessions.keys().cloned().collect::<Vec<_>>()));
        (0..100)
            .map(|_| names::random_name())
            .find(|n| !taken.contains(n))
            .ok_or_else(|| Error::internal("no free slot name found"))
    }

    /// Creates slot `name` and holds the snapshot it exports. Leaves nothing behind
    /// when it fails.
    pub(super) async fn create_slot(&self, name: &str, plugin: Plugin) -> Result<NewSlot, Error> {
        let mut conn = ReplicationConnection::connect(&self.pg).await?;
        let created = match conn.create_logical_slot(name, plugin.name()).await {
            Ok(c) => c,
            Err(e) => {
                conn.close().await;
                return Err(e.into());
            }
        };
        // Import the snapshot before anything else runs on `conn`: the next command
        // there would end it.
        let held = hold(&self.pg, created.snapshot_name.as_deref()).await;
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

    /// Drops a slot if it exists, waiting a little for a walsender that is still
    /// letting go of it.
    pub(super) async fn drop_slot(&self, slot: &str) -> Result<(), Error> {
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
    /// names, in the configured database, decoded by a plugin we read. Refusals are the
    /// client's errors (400, 404).
    pub(crate) async fn our_slot(&self, slot: &str) -> Result<OurSlot, Error> {
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
        if plugin == Plugin::Pgoutput && !self.names_slot(slot).await? {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!(
                    "replication slot {slot} is a pgoutput slot that no session of pgdeltastream names (a subscriber's?): \
                     it is not streamed here"
                ),
            ));
        }
        Ok(OurSlot { plugin, active_pid: info.active_pid, confirmed_flush: info.confirmed_flush })
    }

    /// A session of this process or a stored definition reads `slot`, or it reads a
    /// publication named as itself, the way pgdeltastream makes them (so that a slot
    /// made by hand for a tool or a test streams as v1 slots always have). A
    /// subscriber's slot has neither.
    pub(super) async fn names_slot(&self, slot: &str) -> Result<bool, Error> {
        if self.with(|s| s.by_slot(slot).is_some()) {
            return Ok(true);
        }
        let client = self.pool.get().await?;
        let def = self.store.by_slot(&client, slot).await;
        let publication = client
            .query_opt("SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1", &[&Plugin::publication_name(slot)])
            .await;
        client.release();
        Ok(def?.is_some() || publication?.is_some())
    }

    async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT plugin::text, database::text, active_pid, coalesce(confirmed_flush_lsn, '0/0')::text \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        client.release();
        let Some(row) = row else { return Ok(None) };
        let confirmed: String = row.try_get(3)?;
        Ok(Some(SlotInfo {
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

/// Holds an exported snapshot on a connection of its own.
async fn hold(pg: &PgConfig, exported: Option<&str>) -> Result<SnapshotHolder, Error> {
    let exported = exported.ok_or_else(|| Error::internal("Postgres exported no snapshot"))?;
    let client = pool::connect(pg).await?;
    let id = snapshot::hold_snapshot(&client, exported).await?;
    Ok(SnapshotHolder { client, id, last_used: Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::DbError;

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
