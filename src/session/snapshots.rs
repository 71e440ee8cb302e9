//! A session's snapshot: the transaction that keeps it importable ([`SnapshotState`],
//! part of the registry's one state), and the reads from it ([`Snapshots`], which owns
//! their SQL). It is held from the session's creation until it is released: on
//! request, after the idle timeout, when the session ends, or when its connection
//! dies. It never outlives the process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::definition::{DEFAULT_NAME, Definition, TableEntry, TablePattern, exported_tables};
use super::{Registry, State};
use crate::error::{Error, ErrorKind};
use crate::pg::PgConfig;
use crate::pg::ident::TableRef;
use crate::pg::keyset::{self, KeysetRequest};
use crate::pg::pool::{self, Pool};
use crate::pg::snapshot::{self, PageBody, PageRequest, Scope, SnapshotError};

/// Why a session this process did not create has no snapshot here.
const NOT_HERE: &str =
    "a snapshot does not survive a restart of pgdeltastream, and only the process that created the session holds it";

/// The transaction that keeps an exported snapshot alive.
pub(super) struct SnapshotHolder {
    /// Dropping the client ends the connection, and with it the transaction.
    pub client: Client,
    /// The id readers import (re-exported by the holder's transaction).
    pub id: String,
    pub last_used: Instant,
}

impl SnapshotHolder {
    /// Holds the snapshot `exported` on a connection of its own.
    pub async fn hold(pg: &PgConfig, exported: Option<&str>) -> Result<SnapshotHolder, Error> {
        let exported = exported.ok_or_else(|| Error::internal("Postgres exported no snapshot"))?;
        let client = pool::connect(pg).await?;
        let id = snapshot::hold_snapshot(&client, exported).await?;
        Ok(SnapshotHolder { client, id, last_used: Instant::now() })
    }
}

pub(super) enum SnapshotState {
    Held(SnapshotHolder),
    /// This process held it and let go of it, for this reason.
    Released(&'static str),
    /// This process never held it: another process created the session, or one before
    /// a restart did.
    NotHere,
}

/// What the API says about a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    /// Readable.
    Held,
    /// This process held it and let go of it.
    Released,
    /// This process never held it (another process, or one before a restart, did).
    None,
}

impl SnapshotState {
    /// The snapshot id to import, marking the snapshot as used.
    pub(crate) fn touch(&mut self, name: &str) -> Result<String, Error> {
        if matches!(self, SnapshotState::Held(h) if h.client.is_closed()) {
            tracing::warn!(session = name, "the snapshot's connection to Postgres was lost");
            *self = SnapshotState::Released("its connection to Postgres was lost; did Postgres restart?");
        }
        match self {
            SnapshotState::Held(h) => {
                h.last_used = Instant::now();
                Ok(h.id.clone())
            }
            SnapshotState::Released(why) => Err(released(name, why)),
            SnapshotState::NotHere => Err(released(name, NOT_HERE)),
        }
    }

    pub fn release(&mut self, name: &str, why: &'static str) -> bool {
        let was_held = matches!(self, SnapshotState::Held(_));
        if was_held {
            tracing::info!(session = name, reason = why, "snapshot released");
            *self = SnapshotState::Released(why);
        }
        was_held
    }

    pub fn status(&self) -> (SnapshotStatus, Option<&'static str>) {
        match self {
            SnapshotState::Held(h) if !h.client.is_closed() => (SnapshotStatus::Held, None),
            SnapshotState::Held(_) => (SnapshotStatus::Released, Some("its connection to Postgres was lost")),
            SnapshotState::Released(why) => (SnapshotStatus::Released, Some(why)),
            SnapshotState::NotHere => (SnapshotStatus::None, Some(NOT_HERE)),
        }
    }

    fn idle_for(&self, timeout: Duration) -> bool {
        matches!(self, SnapshotState::Held(h) if h.last_used.elapsed() >= timeout)
    }
}

/// A snapshot that cannot be read (any more): 409, and what to do instead.
fn released(name: &str, why: &str) -> Error {
    let again = if name == DEFAULT_NAME { "call /v1/init for a new session" } else { "create a new session" };
    Error::conflict(format!("the snapshot of session {name} was released ({why}); {again}"))
}

/// Reads from a session's snapshot, each on a pooled connection of its own.
pub(super) struct Snapshots {
    pub(super) pool: Pool,
}

impl Snapshots {
    /// One v1 page from snapshot `id`. Refusals come here; the body streams the rows on
    /// a pooled connection that it holds until it ends (or is dropped, which cancels
    /// the query).
    async fn page(&self, id: &str, scope: &Scope, req: &PageRequest) -> Result<PageBody, Error> {
        let conn = self.pool.get_for_read().await?;
        let timeout = self.pool.settings().statement_timeout;
        snapshot::open_page(conn, id, req, scope, timeout).await.map_err(|e| snapshot_error(e, timeout, DEFAULT_NAME))
    }

    /// One keyset page of session `name`'s snapshot `id`, streamed as `page` is.
    async fn keyset(&self, name: &str, id: &str, scope: &Scope, req: &KeysetRequest) -> Result<PageBody, Error> {
        let conn = self.pool.get_for_read().await?;
        let timeout = self.pool.settings().statement_timeout;
        keyset::open_keyset_page(conn, id, req, scope, timeout).await.map_err(|e| snapshot_error(e, timeout, name))
    }

    /// The whole of `table`, a row per line.
    async fn export(&self, name: &str, id: &str, scope: &Scope, table: &TableRef) -> Result<PageBody, Error> {
        let conn = self.pool.get_for_read().await?;
        let timeout = self.pool.settings().statement_timeout;
        keyset::open_export(conn, id, table, scope, timeout).await.map_err(|e| snapshot_error(e, timeout, name))
    }
}

impl State {
    /// The id to import the snapshot of session `name`, and what of it the session sees
    /// (never the store's schema `hidden`).
    fn snapshot_id(&mut self, name: &str, hidden: &str) -> Result<(String, Scope), Error> {
        match self.sessions.get_mut(name) {
            Some(e) => Ok((e.snapshot.touch(name)?, scope_of(&e.def, e.snapshot_tables.as_ref(), hidden))),
            None if name == DEFAULT_NAME => {
                Err(Error::conflict("no session: call /v1/init first to create a slot and its snapshot"))
            }
            None => Err(Error::not_found(format!("no session named {name}"))),
        }
    }
}

impl Registry {
    /// `/v1/snapshot/data`: one page from the default session's snapshot.
    pub(crate) async fn snapshot_page(&self, req: &PageRequest) -> Result<PageBody, Error> {
        let (id, scope) = self.with(|s| s.snapshot_id(DEFAULT_NAME, &self.settings.schema))?;
        // v1 as the original: a system schema is refused (403), not unknown.
        let scope = Scope { system_unknown: false, ..scope };
        self.snapshots.page(&id, &scope, req).await
    }

    /// `GET /v2/sessions/{name}/snapshot/{table}`: one keyset page of the session's
    /// snapshot, `{"rows":[...],"next":...}`.
    pub(crate) async fn keyset_page(&self, name: &str, req: &KeysetRequest) -> Result<PageBody, Error> {
        self.known(name).await?;
        self.follow_stored_change(name).await;
        let (id, scope) = self.with(|s| s.snapshot_id(name, &self.settings.schema))?;
        self.snapshots.keyset(name, &id, &scope, req).await
    }

    /// The same with `Accept: application/x-ndjson`: the whole table, a row per line.
    pub async fn export(&self, name: &str, table: &TableRef) -> Result<PageBody, Error> {
        self.known(name).await?;
        self.follow_stored_change(name).await;
        let (id, scope) = self.with(|s| s.snapshot_id(name, &self.settings.schema))?;
        self.snapshots.export(name, &id, &scope, table).await
    }

    /// `DELETE /v2/sessions/{name}/snapshot`: lets go of the snapshot early (it holds
    /// back vacuum while held). True when it was held.
    pub(crate) async fn release_named_snapshot(&self, name: &str) -> Result<bool, Error> {
        self.known(name).await?;
        Ok(self.with(|s| s.sessions.get_mut(name).is_some_and(|e| e.snapshot.release(name, "released on request"))))
    }

    /// Releases a session's snapshot: by slot name, or the default session's. Only this
    /// process holds snapshots, so only its sessions are looked at.
    pub(crate) fn release_snapshot(&self, slot: Option<&str>) -> Result<String, Error> {
        self.with(|s| {
            let entry = match slot {
                Some(slot) => {
                    s.by_slot_mut(slot).ok_or_else(|| Error::not_found(format!("no session for slot {slot}")))?
                }
                None => s
                    .sessions
                    .get_mut(DEFAULT_NAME)
                    .ok_or_else(|| Error::conflict("no session: call /v1/init first"))?,
            };
            entry.snapshot.release(&entry.def.name, "released on request");
            Ok(entry.def.slot_name.clone())
        })
    }

    /// Releases snapshots nobody has read for the idle timeout. Runs until shutdown.
    pub(crate) async fn sweep_idle_snapshots(self: Arc<Self>) {
        let timeout = self.settings.snapshot_idle_timeout;
        let period = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.stopped() => return,
                _ = tokio::time::sleep(period) => {}
            }
            self.with(|s| {
                for e in s.sessions.values_mut().filter(|e| e.snapshot.idle_for(timeout)) {
                    e.snapshot.release(&e.def.name, "idle timeout");
                }
            });
        }
    }
}

/// What of its snapshot session `def` may read: the tables it streams (every one
/// without `tables`), with its publication's row filters and column lists, never the
/// store's schema `hidden` (nor, in v2, a system schema). `exported_with`: the tables
/// the session had when the snapshot was exported, if they changed since.
pub(super) fn scope_of(def: &Definition, exported_with: Option<&Option<Vec<TableEntry>>>, hidden: &str) -> Scope {
    let narrowed =
        def.tables.iter().flatten().filter(|e| e.narrows()).filter_map(|e| match TablePattern::parse(e.pattern()) {
            Ok(TablePattern::Table(t)) => t.schema.map(|s| (s, t.name)),
            _ => None,
        });
    let narrowed: Vec<(String, String)> = narrowed.collect();
    Scope {
        tables: def.filter().tables,
        hidden_schemas: vec![hidden.to_owned()],
        // Without a publication (no session can be so) nothing narrowed is served.
        narrowed: (!narrowed.is_empty()).then(|| (def.publication().unwrap_or_default(), narrowed)),
        system_unknown: true,
        exported: exported_with.map(|then| exported_tables(then.as_ref(), def.tables.as_ref())),
    }
}

/// What a failed snapshot read of session `name` tells the client.
fn snapshot_error(e: SnapshotError, statement_timeout: Duration, name: &str) -> Error {
    let again = if name == DEFAULT_NAME {
        "call /v1/init for a new snapshot"
    } else {
        "create a new session for a new snapshot"
    };
    match e {
        SnapshotError::NoSuchTable(_) | SnapshotError::NoSuchColumn { .. } => Error::not_found(e.to_string()),
        SnapshotError::Dropped(_) | SnapshotError::Moved { .. } => Error::not_found(format!("{e}; {again}")),
        SnapshotError::SystemTable(_) => Error::new(ErrorKind::Forbidden, e.to_string()),
        SnapshotError::BadCursor(_) | SnapshotError::NoKey { .. } | SnapshotError::NoPrimaryKey(_) => {
            Error::bad_request(e.to_string())
        }
        SnapshotError::SnapshotGone(_) => Error::conflict(format!("{e}; {again}")),
        SnapshotError::AddedSince(_) => Error::conflict(e.to_string()),
        SnapshotError::Renamed { .. }
        | SnapshotError::Rewritten { .. }
        | SnapshotError::Repartitioned(_)
        | SnapshotError::ColumnsChanged { .. } => Error::conflict(format!("{e}; {again}")),
        SnapshotError::Db(db) if db.code() == Some(&SqlState::QUERY_CANCELED) => Error::new(
            ErrorKind::Timeout,
            format!(
                "the page took longer than the statement timeout of {} s (--snapshot-statement-timeout), \
                 waiting for the table's lock and sending the rows included; ask for a smaller limit \
                 (server said: {})",
                statement_timeout.as_secs_f64(),
                snapshot::describe(&db)
            ),
        ),
        SnapshotError::Db(db) => Error::from_tokio_pg(&db),
    }
}
