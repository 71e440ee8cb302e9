//! Sessions: a name with a definition (a slot, its plugin, the tables and actions its
//! client wants), the snapshot the slot exported, and the stream reading it. This is
//! the one place that knows their lifecycle.
//!
//! ```text
//!  POST /v2/sessions, /v1/init ──▶ create slot (exports snapshot) ──▶ hold snapshot
//!                                   ──▶ store the definition ──▶ session registered
//!  snapshot reads ◀── the held snapshot (released on: end, request, idle timeout)
//!  stream ──▶ claim the session's stream (one client at a time) ──▶ pump ──▶ sink
//! ```
//!
//! Definitions are stored in Postgres ([`store`]), so sessions outlive the process and
//! several processes see the same ones; a slot's position is Postgres's own. Everything
//! else, the snapshot holders and the streams, belongs to the process, in one
//! `Mutex<State>`. `/v1/init` manages the session named `default` (the original's
//! single-session API), and a slot of ours that no definition names (made by an earlier
//! version) still streams, as a session named after its slot that is not stored.
//!
//! The [`Registry`] orchestrates: it holds the one `Mutex<State>` and decides when
//! things happen; a few services each own their SQL and know nothing of the state:
//!
//! - [`store::Store`]: the stored definitions.
//! - `slots::Slots`: replication slots, created with a snapshot, checked, started,
//!   dropped; around them the plugin's hooks ([`Plugin::before_slot`],
//!   [`Plugin::after_drop`]), which for pgoutput make and drop the session's
//!   publication ([`publications`]).
//! - `snapshots::Snapshots`: reads from a held snapshot; the held snapshot itself
//!   (`SnapshotState`: held, released, or not here) is part of the state.
//! - `watch::Watchers`: viewers watching a session from temporary slots of their own.
//!
//! And the registry's own parts: [`lifecycle`] (creating and ending sessions, and the
//! one answer to "which session is this slot"), [`streams`] (claiming a session's one
//! stream and running it), [`views`] and [`retention`] (what the API reports),
//! [`health`] (what `/metrics` and `/readyz` report).
//!
//! Shutdown: the registry's stop is the parent of every stream's and watcher's, so
//! stopping it ends them all; it then waits, against one deadline, for the streams and
//! for every websocket task the server started ([`Registry::tasks`]).

pub(crate) mod backfill;
mod backfill_hook;
mod ddl;
pub(crate) mod definition;
pub mod health;
mod lifecycle;
pub(crate) mod names;
mod patch;
mod publications;
mod recovery;
pub mod retention;
pub(crate) mod safety;
pub(crate) mod slot_rows;
mod slots;
mod snapshots;
pub mod store;
mod streams;
pub(crate) mod views;
mod watch;

/// The output plugins, as the settings name them.
pub use crate::stream::plugin::Plugin;
pub(crate) use lifecycle::CreateRequest;
pub(crate) use patch::PatchRequest;
pub use retention::RetentionSettings;
pub(crate) use retention::SlotReport;
pub(crate) use streams::OpenStream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::error::{Error, ErrorKind};
use crate::pg::PgConfig;
use crate::pg::pool::{Pool, PoolSettings};
use crate::stream::Stop as StreamStop;
use crate::stream::progress::Progress;
use crate::stream::socket::SocketSettings;
use crate::stream::stop::{Stop, code};
use crate::types::Lsn;
use definition::Definition;
use slots::Slots;
use snapshots::{SnapshotState, Snapshots};
use store::Store;
use watch::Watchers;

/// The plugin of a session that does not name one (`--plugin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PluginChoice {
    /// wal2json when the database can load it, pgoutput otherwise: found out by creating
    /// each slot, so nothing is remembered that could go stale.
    #[default]
    Auto,
    Fixed(Plugin),
}

#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// A snapshot nobody read for this long is released (it holds back vacuum).
    pub snapshot_idle_timeout: Duration,
    /// Standby status updates go out at least this often.
    pub status_interval: Duration,
    /// Batches of frames buffered between the pump and a client.
    pub stream_buffer: usize,
    /// The size of the websocket frames a transaction is cut into.
    pub frame_bytes: usize,
    /// How much of a transaction a pgoutput stream holds in memory until its commit;
    /// the rest waits in a temporary file.
    pub pgoutput_memory: usize,
    pub socket: SocketSettings,
    /// The schema of the table that stores session definitions.
    pub schema: String,
    /// The plugin of `/v1/init`, and of a v2 session that names none.
    pub plugin: PluginChoice,
    /// Viewers watching sessions at once ([`watch`]): each costs a walsender.
    pub max_watchers: usize,
    /// Of those, one caller's ([`watch`]'s quota key) at most.
    pub max_watchers_per_caller: usize,
    /// Replication slots (and walsenders) a watcher never takes: what sessions, their
    /// streams and an operator need.
    pub watch_reserve_slots: usize,
    /// Sessions' slots are failover slots (PostgreSQL 17+; ignored, with a log line,
    /// below 17 and on a standby), which a standby with `sync_replication_slots` keeps
    /// a copy of, ready when it is promoted.
    pub failover_slots: bool,
    /// The size a live backfill's chunks aim at, rendered: larger chunks cost less per
    /// row (two watermarks and a trip through the walsender each), smaller ones hold
    /// less memory and leave fewer rows to the stream while writers change the table.
    pub backfill_chunk_bytes: usize,
}

/// [`SessionSettings::backfill_chunk_bytes`] unless set.
pub const DEFAULT_BACKFILL_CHUNK_BYTES: usize = 4 * 1024 * 1024;

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            snapshot_idle_timeout: Duration::from_secs(600),
            status_interval: Duration::from_secs(10),
            stream_buffer: 4,
            frame_bytes: crate::stream::frame::DEFAULT_FRAME_BYTES,
            pgoutput_memory: crate::stream::pgoutput::DEFAULT_HOLD_MEMORY,
            socket: SocketSettings { ping_interval: Duration::from_secs(15), dead_after: Duration::from_secs(60) },
            schema: store::DEFAULT_SCHEMA.to_owned(),
            plugin: PluginChoice::Auto,
            max_watchers: 8,
            max_watchers_per_caller: 2,
            watch_reserve_slots: 2,
            failover_slots: true,
            backfill_chunk_bytes: DEFAULT_BACKFILL_CHUNK_BYTES,
        }
    }
}

/// Everything this process knows about its sessions.
#[derive(Default)]
struct State {
    sessions: HashMap<String, Entry>,
}

/// One session, as this process holds it.
struct Entry {
    def: Definition,
    snapshot: SnapshotState,
    stream: StreamState,
    /// Acks and closes of the session's streams (written by the sink as they happen).
    progress: Arc<Progress>,
    /// Where the slot's stream begins (the snapshot shows everything before it); known
    /// to the process that created the session.
    consistent_point: Option<Lsn>,
    /// The definition is in the store (false: a slot of an earlier version, or a store
    /// that could not be written).
    stored: bool,
    /// The tables the session had when its snapshot was exported (None inside: every
    /// table), once a PATCH changed them: only they are read from it.
    snapshot_tables: Option<Option<Vec<definition::TableEntry>>>,
}

impl Entry {
    fn new(def: Definition, snapshot: SnapshotState, consistent_point: Option<Lsn>, stored: bool) -> Entry {
        let stream = StreamState::default();
        Entry { def, snapshot, stream, progress: Arc::default(), consistent_point, stored, snapshot_tables: None }
    }
}

/// A session's stream, seen from outside it.
#[derive(Default)]
struct StreamState {
    /// The stop handle of the stream that runs or is opening.
    running: Option<StreamStop>,
    /// Why the session is being ended: no new stream may start.
    closing: Option<&'static str>,
    /// The walsender of the last stream this process started for the session. While it
    /// still holds the slot, the slot is on its way to being free, not someone else's.
    walsender: Option<i32>,
    /// The running stream's backfill windows: where a backfill runs.
    backfills: Option<crate::stream::backfill::Backfills>,
    /// How the running stream is given a new filter (PATCH); None while none runs.
    control: Option<streams::StreamControl>,
}

impl State {
    /// The session of this process that reads `slot`: the one lookup by slot in the
    /// state ([`Registry::session_of_slot`] answers for every process).
    fn by_slot(&self, slot: &str) -> Option<&Entry> {
        self.sessions.values().find(|e| e.def.slot_name == slot)
    }

    fn by_slot_mut(&mut self, slot: &str) -> Option<&mut Entry> {
        self.sessions.values_mut().find(|e| e.def.slot_name == slot)
    }

    /// Registers a session this process did not create (from the store, or a slot of
    /// an earlier version) unless it is known already.
    fn adopt(&mut self, def: Definition, stored: bool) {
        let name = def.name.clone();
        self.sessions.entry(name).or_insert_with(|| Entry::new(def, SnapshotState::NotHere, None, stored));
    }
}

pub struct Registry {
    pool: Pool,
    settings: SessionSettings,
    store: Store,
    slots: Slots,
    snapshots: Snapshots,
    watchers: Arc<Watchers>,
    state: Mutex<State>,
    /// Creating and ending sessions run one at a time: each may wait on Postgres, and
    /// `/v1/init` replaces what the one before it made.
    admin: tokio::sync::Mutex<()>,
    /// Woken whenever a stream ends.
    stream_ended: Notify,
    /// The parent of every stream's stop: stopping it ends them all.
    shutdown: Stop,
    /// The tasks that serve streams (websockets): shutdown waits for them.
    tasks: TaskTracker,
    /// The retention thresholds and the default WAL budget, for the views and budgets
    /// (set as the retention check starts).
    retention: Mutex<RetentionSettings>,
}

impl Registry {
    pub fn new(pg: PgConfig, settings: SessionSettings, pool: PoolSettings) -> Arc<Registry> {
        let pool = Pool::new(pg.clone(), pool);
        let store = Store::new(pool.clone(), &settings.schema);
        Arc::new(Registry {
            slots: Slots {
                pg,
                pool: pool.clone(),
                store: store.clone(),
                hidden_schema: settings.schema.clone(),
                failover: settings.failover_slots,
                failover_skipped: std::sync::Once::new(),
            },
            snapshots: Snapshots { pool: pool.clone() },
            watchers: Arc::new(Watchers::new(&settings, pool.clone())),
            store,
            pool,
            settings,
            state: Mutex::new(State::default()),
            admin: tokio::sync::Mutex::new(()),
            stream_ended: Notify::new(),
            shutdown: Stop::new(),
            tasks: TaskTracker::new(),
            retention: Mutex::new(RetentionSettings { warn_bytes: 0, ..RetentionSettings::default() }),
        })
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// Where the tasks that serve this registry's streams are spawned (the websockets),
    /// so that shutdown waits for them too.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Runs `f` on the state. A poisoned lock only means another thread panicked in the
    /// middle of an update of plain data: the data is still usable, and a server must
    /// keep serving.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }

    fn refuse_when_stopping(&self) -> Result<(), Error> {
        if self.shutdown.is_stopped() {
            return Err(Error::new(ErrorKind::Unavailable, "the server is shutting down"));
        }
        Ok(())
    }

    /// Ends every stream and watcher (close code 1001: their stops are children of the
    /// registry's) and releases every snapshot; waits a few seconds, one deadline for
    /// all, for the streams to send their last status update and for their websocket
    /// tasks to end.
    pub async fn shutdown(&self) {
        self.shutdown.stop(code::GOING_AWAY, "server shutting down");
        self.with(|s| {
            for e in s.sessions.values_mut() {
                e.snapshot.release(&e.def.name, "server shutting down");
            }
        });
        // One deadline for everything, not one each after the other: many stuck streams
        // must not hold shutdown many times as long.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let all_ended = |s: &State| s.sessions.values().all(|e| e.stream.running.is_none());
        if !self.wait_streams(deadline, all_ended).await {
            tracing::warn!("streams still running at the shutdown deadline");
        }
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait()).await.is_err() {
            tracing::warn!(tasks = self.tasks.len(), "websocket tasks still running at the shutdown deadline");
        }
    }

    /// Waits (until `deadline`) until `done` holds of the state, checked whenever a
    /// stream ends; true when it does.
    async fn wait_streams(&self, deadline: tokio::time::Instant, done: impl Fn(&State) -> bool) -> bool {
        loop {
            let ended = self.stream_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.with(|s| done(s)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return false;
            }
        }
    }
}
