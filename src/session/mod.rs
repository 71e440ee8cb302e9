//! Sessions: a replication slot, the snapshot it exported, and the stream reading it.
//! This is the one place that knows their lifecycle.
//!
//! ```text
//!  /v1/init ──▶ create slot (exports snapshot) ──▶ hold snapshot ──▶ session registered
//!                                                     │                 │
//!            /v1/snapshot/data reads pages ◀──────────┘                 │
//!            released on: next init, DELETE /v1/snapshot, idle timeout   │
//!  /v1/lr/stream?slotName= ──▶ claim the slot (one client at a time) ──▶ pump + socket
//! ```
//!
//! Sessions live in a [`Registry`] keyed by slot name. `/v1/init` manages the *default*
//! session (the original's single-session API): it replaces it, and never touches any
//! other slot. Slots created by an earlier process get a session entry when first
//! streamed.

pub mod names;
pub mod retention;

pub use retention::{RetentionSettings, SlotReport};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::error::{Error, ErrorKind};
use crate::pg::PgConfig;
use crate::pg::ident::is_valid_slot_name;
use crate::pg::pool::{self, Pool, PoolSettings};
use crate::pg::replication::{ReplicationConnection, ReplicationStream};
use crate::pg::snapshot::{self, PageBody, PageRequest, SnapshotError};
use crate::stream::Stop as StreamStop;
use crate::stream::frame::Format;
use crate::stream::progress::Progress;
use crate::stream::pump::Pump;
use crate::stream::socket::SocketSettings;
use crate::stream::stop::{Stop, code};
use crate::types::Lsn;

/// The output plugin our slots use.
pub const PLUGIN: &str = "wal2json";

/// Why a slot created by an earlier process has no snapshot here.
const FROM_EARLIER_PROCESS: &str = "created by an earlier process";

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
    pub socket: SocketSettings,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            snapshot_idle_timeout: Duration::from_secs(600),
            status_interval: Duration::from_secs(10),
            stream_buffer: 8,
            frame_bytes: crate::stream::frame::DEFAULT_FRAME_BYTES,
            socket: SocketSettings { ping_interval: Duration::from_secs(15), dead_after: Duration::from_secs(60) },
        }
    }
}

/// The transaction that keeps an exported snapshot alive.
struct SnapshotHolder {
    /// Dropping the client ends the connection, and with it the transaction.
    client: Client,
    /// The id readers import (re-exported by the holder's transaction).
    id: String,
    last_used: Instant,
}

enum SnapshotState {
    Held(SnapshotHolder),
    Released(&'static str),
}

pub struct Session {
    pub slot: String,
    snapshot: Mutex<SnapshotState>,
    /// Held by the stream of this slot while it runs: one client at a time.
    stream_lock: Arc<tokio::sync::Mutex<()>>,
    /// Who streams the session, and whether it is being ended.
    stream: Mutex<StreamState>,
    /// Acks received on this slot's streams.
    pub progress: Arc<Progress>,
}

impl Session {
    fn new(slot: String, snapshot: SnapshotState) -> Session {
        Session {
            slot,
            snapshot: Mutex::new(snapshot),
            stream_lock: Arc::new(tokio::sync::Mutex::new(())),
            stream: Mutex::new(StreamState::default()),
            progress: Arc::new(Progress::default()),
        }
    }

    /// The snapshot id to import, marking the snapshot as used.
    fn touch_snapshot(&self) -> Result<String, Error> {
        let mut state = lock(&self.snapshot);
        if matches!(&*state, SnapshotState::Held(h) if h.client.is_closed()) {
            tracing::warn!(slot = %self.slot, "the snapshot's connection to Postgres was lost");
            *state = SnapshotState::Released("its connection to Postgres was lost; did Postgres restart?");
        }
        match &mut *state {
            SnapshotState::Held(h) => {
                h.last_used = Instant::now();
                Ok(h.id.clone())
            }
            SnapshotState::Released(why) => Err(Error::conflict(format!(
                "the snapshot of session {} was released ({why}); call /v1/init for a new session",
                self.slot
            ))),
        }
    }

    fn release_snapshot(&self, why: &'static str) -> bool {
        let mut state = lock(&self.snapshot);
        let was_held = matches!(*state, SnapshotState::Held(_));
        if was_held {
            tracing::info!(slot = %self.slot, reason = why, "snapshot released");
            *state = SnapshotState::Released(why);
        }
        was_held
    }

    /// Takes the session's one stream. Checked and taken under one lock, so that a
    /// stream that is still opening is seen, and stopped, by [`Session::begin_end`].
    fn claim_stream(&self) -> Result<(OwnedMutexGuard<()>, StreamStop), Error> {
        let mut state = lock(&self.stream);
        if let Some(why) = state.closing {
            return Err(Error::conflict(format!("session {} is being ended ({why})", self.slot)));
        }
        let guard =
            self.stream_lock.clone().try_lock_owned().map_err(|_| {
                Error::conflict(format!("slot {} is already being streamed by another client", self.slot))
            })?;
        let stop = StreamStop::new();
        state.stop = Some(stop.clone());
        Ok((guard, stop))
    }

    /// Stops the stream, running or opening, and lets no new one start until
    /// [`Session::cancel_end`].
    fn begin_end(&self, code: u16, why: &'static str) {
        let mut state = lock(&self.stream);
        state.closing = Some(why);
        if let Some(stop) = &state.stop {
            stop.stop(code, why);
        }
    }

    fn cancel_end(&self) {
        lock(&self.stream).closing = None;
    }

    fn stop_stream(&self, code: u16, reason: &str) {
        if let Some(stop) = &lock(&self.stream).stop {
            stop.stop(code, reason);
        }
    }

    /// Waits until no stream runs on this session's slot (bounded), and keeps it so.
    async fn wait_stream_ended(&self, limit: Duration) -> Option<OwnedMutexGuard<()>> {
        tokio::time::timeout(limit, self.stream_lock.clone().lock_owned()).await.ok()
    }
}

/// A session's stream, from outside it.
#[derive(Default)]
struct StreamState {
    /// The stop handle of the stream that runs or is opening (or last ran).
    stop: Option<StreamStop>,
    /// Why the session is being ended: no new stream may start.
    closing: Option<&'static str>,
}

/// A poisoned lock only means another thread panicked mid-update of plain data; the
/// data is still usable, and a server must keep serving.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Registry {
    pg: PgConfig,
    pool: Pool,
    settings: SessionSettings,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    default_slot: Mutex<Option<String>>,
    /// Inits run one at a time: each replaces the default session.
    init_lock: tokio::sync::Mutex<()>,
    shutdown: Stop,
}

/// A stream that has started on Postgres and waits for its websocket.
pub struct OpenStream {
    pub slot: String,
    pub start: Lsn,
    stream: ReplicationStream,
    stop: StreamStop,
    guard: OwnedMutexGuard<()>,
    progress: Arc<Progress>,
    format: Format,
    settings: SessionSettings,
}

impl Registry {
    pub fn new(pg: PgConfig, settings: SessionSettings, pool: PoolSettings) -> Arc<Registry> {
        Arc::new(Registry {
            pool: Pool::new(pg.clone(), pool),
            pg,
            settings,
            sessions: Mutex::new(HashMap::new()),
            default_slot: Mutex::new(None),
            init_lock: tokio::sync::Mutex::new(()),
            shutdown: Stop::new(),
        })
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    pub fn get(&self, slot: &str) -> Option<Arc<Session>> {
        lock(&self.sessions).get(slot).cloned()
    }

    pub fn default_session(&self) -> Option<Arc<Session>> {
        let slot = lock(&self.default_slot).clone()?;
        self.get(&slot)
    }

    /// `/v1/init`: creates a new slot with an exported snapshot, then ends the default
    /// session (its stream, snapshot and slot) and makes the new one the default.
    ///
    /// It runs to completion in a task of its own, whatever the client does: a client
    /// that gives up half way must not leave behind a slot nobody owns, which would
    /// retain WAL forever.
    pub async fn init(self: &Arc<Self>) -> Result<Arc<Session>, Error> {
        let registry = Arc::clone(self);
        tokio::spawn(async move { registry.replace_default().await })
            .await
            .map_err(|e| Error::internal(format!("init failed: {e}")))?
    }

    async fn replace_default(&self) -> Result<Arc<Session>, Error> {
        let _one_at_a_time = self.init_lock.lock().await;
        if self.shutdown.is_stopped() {
            return Err(Error::new(ErrorKind::Unavailable, "the server is shutting down"));
        }
        // The new slot first: if anything fails, the previous session is still whole.
        let session = Arc::new(self.create_session().await?);
        let previous = lock(&self.default_slot).clone();
        if let Some(slot) = previous {
            if let Err(e) = self.end_session(&slot, "session reset by /v1/init").await {
                self.discard(&session).await;
                return Err(e);
            }
        }
        lock(&self.sessions).insert(session.slot.clone(), session.clone());
        *lock(&self.default_slot) = Some(session.slot.clone());
        tracing::info!(slot = %session.slot, "session created");
        Ok(session)
    }

    /// Undoes a session that was created but never registered.
    async fn discard(&self, session: &Session) {
        session.release_snapshot("init failed");
        if let Err(e) = self.drop_slot(&session.slot).await {
            tracing::error!(slot = %session.slot, error = %e, "cannot drop the slot of a failed init; drop it with DELETE /v1/sessions/{{slotName}}");
        }
    }

    async fn create_session(&self) -> Result<Session, Error> {
        let mut conn = ReplicationConnection::connect(&self.pg).await.map_err(|e| Error::from_pg(&e))?;
        let created = async {
            let existing: Vec<String> = conn
                .simple_query("SELECT slot_name FROM pg_catalog.pg_replication_slots")
                .await?
                .into_iter()
                .filter_map(|r| r.values.into_iter().next().flatten())
                .collect();
            let mut last_err = None;
            for _ in 0..20 {
                let name = names::random_name();
                if existing.contains(&name) {
                    continue;
                }
                match conn.create_logical_slot(&name, PLUGIN).await {
                    Ok(slot) => return Ok(slot),
                    // 42710 duplicate_object: someone took the name meanwhile; pick another.
                    Err(e) if e.code() == Some("42710") => last_err = Some(e),
                    Err(e) => return Err(e),
                }
            }
            Err(last_err.unwrap_or_else(|| crate::pg::PgError::Protocol("no free slot name found".into())))
        }
        .await;
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                conn.close().await;
                return Err(Error::from_pg(&e));
            }
        };
        // Import the snapshot before anything else runs on `conn`: the next command
        // there would end it.
        let held = async {
            let exported =
                created.snapshot_name.as_deref().ok_or_else(|| Error::internal("Postgres exported no snapshot"))?;
            let client = pool::connect(&self.pg).await.map_err(|e| Error::from_tokio_pg(&e))?;
            let id = snapshot::hold_snapshot(&client, exported).await.map_err(|e| Error::from_tokio_pg(&e))?;
            Ok::<_, Error>(SnapshotHolder { client, id, last_used: Instant::now() })
        }
        .await;
        conn.close().await;
        match held {
            Ok(holder) => {
                tracing::info!(slot = %created.slot_name, consistent_point = %created.consistent_point, "slot created");
                Ok(Session::new(created.slot_name, SnapshotState::Held(holder)))
            }
            Err(e) => {
                // Leave nothing behind.
                let _ = self.drop_slot(&created.slot_name).await;
                Err(e)
            }
        }
    }

    /// Stops a session's stream, releases its snapshot and drops its slot.
    async fn end_session(&self, slot: &str, why: &'static str) -> Result<(), Error> {
        let session = self.get(slot);
        let mut _no_stream = None;
        if let Some(s) = &session {
            s.begin_end(code::NORMAL, why);
            _no_stream = s.wait_stream_ended(Duration::from_secs(10)).await;
            if _no_stream.is_none() {
                tracing::warn!(slot, "stream did not end in time");
            }
        }
        // The snapshot goes with the slot; if the drop fails the session stays whole.
        if let Err(e) = self.drop_slot(slot).await {
            if let Some(s) = &session {
                s.cancel_end();
            }
            return Err(e);
        }
        if let Some(s) = &session {
            s.release_snapshot(why);
        }
        lock(&self.sessions).remove(slot);
        Ok(())
    }

    /// Drops a slot, waiting a little for a walsender that is still letting go of it.
    async fn drop_slot(&self, slot: &str) -> Result<(), Error> {
        let client = self.pool.get().await.map_err(|e| Error::from_pool(&e))?;
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
                Err(e) => return Err(Error::from_tokio_pg(&e)),
            }
        }
    }

    /// `/v1/snapshot/data`: one page from the default session's snapshot. Refusals come
    /// here; the body streams the rows on a pooled connection that it holds until it
    /// ends (or is dropped, which cancels the query).
    pub async fn snapshot_page(&self, req: &PageRequest) -> Result<PageBody, Error> {
        let session = self
            .default_session()
            .ok_or_else(|| Error::conflict("no session: call /v1/init first to create a slot and its snapshot"))?;
        let id = session.touch_snapshot()?;
        let conn = self.pool.get().await.map_err(|e| Error::from_pool(&e))?;
        let timeout = self.pool.settings().statement_timeout;
        snapshot::open_page(conn, &id, req, timeout).await.map_err(|e| snapshot_error(e, timeout))
    }

    /// Releases a session's snapshot (the default session's when `slot` is None).
    pub fn release_snapshot(&self, slot: Option<&str>) -> Result<String, Error> {
        let session = match slot {
            Some(s) => self.get(s).ok_or_else(|| Error::not_found(format!("no session for slot {s}")))?,
            None => self.default_session().ok_or_else(|| Error::conflict("no session: call /v1/init first"))?,
        };
        session.release_snapshot("released on request");
        Ok(session.slot.clone())
    }

    /// Releases snapshots nobody has read for the idle timeout. Runs until shutdown.
    pub async fn sweep_idle_snapshots(self: Arc<Self>) {
        let timeout = self.settings.snapshot_idle_timeout;
        let period = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.stopped() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
            for s in sessions {
                let idle = matches!(&*lock(&s.snapshot), SnapshotState::Held(h) if h.last_used.elapsed() >= timeout);
                if idle {
                    s.release_snapshot("idle timeout");
                }
            }
        }
    }

    /// Checks a slot and starts streaming it. Everything that can be refused is refused
    /// here, before the websocket upgrade, so the client gets an HTTP error.
    pub async fn open_stream(&self, slot: &str, format: Format) -> Result<OpenStream, Error> {
        if self.shutdown.is_stopped() {
            return Err(Error::new(ErrorKind::Unavailable, "the server is shutting down"));
        }
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
        if info.plugin.as_deref() != Some(PLUGIN) {
            return Err(Error::bad_request(format!(
                "replication slot {slot} uses plugin {}, not {PLUGIN}",
                info.plugin.as_deref().unwrap_or("(none)")
            )));
        }
        let session = {
            let mut sessions = lock(&self.sessions);
            sessions
                .entry(slot.to_owned())
                .or_insert_with(|| {
                    Arc::new(Session::new(slot.to_owned(), SnapshotState::Released(FROM_EARLIER_PROCESS)))
                })
                .clone()
        };
        let (guard, stop) = session.claim_stream()?;
        if let Some(pid) = info.active_pid {
            return Err(Error::conflict(format!("slot {slot} is in use by another process (pid {pid})")));
        }
        // Postgres keeps a slot's confirmed position in memory and writes it to disk only
        // at checkpoints: after a crash the slot may be behind the client's last ack.
        // Start after whichever is later, so that an acked change never comes back.
        let last_ack = session.progress.last_ack().map_or(Lsn::ZERO, |(lsn, _)| lsn);
        let start = info.confirmed_flush.max(last_ack);
        let conn = ReplicationConnection::connect(&self.pg).await.map_err(|e| Error::from_pg(&e))?;
        if let Some(encoding) = conn.parameter("server_encoding").filter(|e| *e != "UTF8") {
            let encoding = encoding.to_owned();
            conn.close().await;
            return Err(Error::internal(format!(
                "database {} is encoded in {encoding}: pgdeltastream streams only UTF8 databases",
                self.pg.dbname
            )));
        }
        let stream =
            conn.start_replication(slot, start, format.plugin_options()).await.map_err(|e| match e.code() {
                Some("55006") => Error::conflict(format!("slot {slot} is in use by another process: {e}")),
                Some("42704") => Error::not_found(format!("replication slot {slot} does not exist")),
                _ => Error::from_pg(&e),
            })?;
        if stop.is_stopped() {
            // Ended (by /v1/init or DELETE) while it was opening: the dropped stream
            // closes its connection, which frees the slot for whoever ended it.
            return Err(Error::conflict(format!(
                "the stream of slot {slot} was ended as it opened: {}",
                stop.reason().1
            )));
        }
        tracing::info!(slot, %start, "stream started");
        Ok(OpenStream {
            slot: slot.to_owned(),
            start,
            stream,
            stop,
            guard,
            progress: session.progress.clone(),
            format,
            settings: self.settings.clone(),
        })
    }

    async fn slot_info(&self, slot: &str) -> Result<Option<SlotInfo>, Error> {
        let client = self.pool.get().await.map_err(|e| Error::from_pool(&e))?;
        let row = client
            .query_opt(
                "SELECT plugin::text, database::text, active_pid, coalesce(confirmed_flush_lsn, '0/0')::text \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| Error::from_tokio_pg(&e))?;
        client.release();
        let Some(row) = row else { return Ok(None) };
        let get = |e: tokio_postgres::Error| Error::from_tokio_pg(&e);
        let confirmed: String = row.try_get(3).map_err(get)?;
        Ok(Some(SlotInfo {
            plugin: row.try_get(0).map_err(get)?,
            database: row.try_get(1).map_err(get)?,
            active_pid: row.try_get(2).map_err(get)?,
            confirmed_flush: confirmed
                .parse()
                .map_err(|_| Error::internal(format!("bad LSN {confirmed:?} from Postgres")))?,
        }))
    }

    /// Ends every stream (close code 1001) and releases every snapshot; waits a few
    /// seconds for the streams to send their last status update.
    pub async fn shutdown(&self) {
        self.shutdown.stop(code::GOING_AWAY, "server shutting down");
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        for s in &sessions {
            s.stop_stream(code::GOING_AWAY, "server shutting down");
            s.release_snapshot("server shutting down");
        }
        for s in &sessions {
            s.wait_stream_ended(Duration::from_secs(5)).await;
        }
    }
}

/// What a failed snapshot read tells the client.
fn snapshot_error(e: SnapshotError, statement_timeout: Duration) -> Error {
    let again = "call /v1/init for a new snapshot";
    match e {
        SnapshotError::NoSuchTable(_) | SnapshotError::NoSuchColumn { .. } => Error::not_found(e.to_string()),
        SnapshotError::Dropped(_) | SnapshotError::Moved { .. } => Error::not_found(format!("{e}; {again}")),
        SnapshotError::SystemTable(_) => Error::new(ErrorKind::Forbidden, e.to_string()),
        SnapshotError::BadCursor(_) | SnapshotError::NoKey { .. } => Error::bad_request(e.to_string()),
        SnapshotError::SnapshotGone(_) => Error::conflict(format!("{e}; call /v1/init for a new session")),
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

struct SlotInfo {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    confirmed_flush: Lsn,
}

impl OpenStream {
    /// Runs the stream over `socket` until it ends.
    pub async fn run(self, socket: crate::http::upgrade::Socket) {
        let OpenStream { slot, start, stream, stop, guard, progress, format, settings } = self;
        let (frames_tx, frames_rx) = mpsc::channel(settings.stream_buffer);
        let (acks_tx, acks_rx) = mpsc::channel(64);
        let pump = Pump {
            slot: slot.clone(),
            stream,
            start,
            out: frames_tx,
            acks: acks_rx,
            stop: stop.clone(),
            status_interval: settings.status_interval,
            format,
            frame_bytes: settings.frame_bytes,
        };
        let socket = crate::stream::socket::serve(
            socket,
            slot.clone(),
            start,
            frames_rx,
            acks_tx,
            progress,
            stop.clone(),
            settings.socket,
        );
        // The stages run in this one task rather than as tasks of their own: handing a
        // frame from one stage to the next is then a poll in the same thread, not a
        // wake-up of another worker (which cost more than the forwarding itself).
        tokio::join!(pump.run(), socket);
        drop(guard);
    }
}
