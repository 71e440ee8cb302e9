//! Watching a session: a viewer gets a live copy of the session's changes without
//! touching the session's slot. Each watcher streams from a TEMPORARY slot of its own,
//! made with the session's plugin and filter (a pgoutput watcher reads the session's
//! publication) at the moment it starts; it confirms its slot as it sends, and
//! Postgres drops the slot when the watcher's replication connection ends. The
//! session's own stream, its confirmed position and its record of acks are never
//! involved, so its consumer can stream while it is watched.
//!
//! Each watcher costs a walsender (and a replication slot while it runs), so only
//! [`SessionSettings::max_watchers`](super::SessionSettings) may run at once (more are
//! refused with 503), one caller's only `max_watchers_per_caller` of them (429), and
//! none takes one of the last `watch_reserve_slots` replication slots or walsenders
//! Postgres has (503): watching never keeps a session from being created or streamed.
//! Ending a session, or the server, ends its watchers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::streams::OpenStream;
use super::{Registry, SessionSettings, names};
use crate::error::{Error, ErrorKind};
use crate::pg::pool::Pool;
use crate::stream::Stop as StreamStop;
use crate::stream::ddl::Ddl;
use crate::stream::filter::{Action, Filter};
use crate::stream::frame::Format;
use crate::stream::marks::Marks;

/// The watchers running now, and the limits on them; owns the one query it needs (the
/// room Postgres has left).
pub(super) struct Watchers {
    active: Mutex<Vec<Watcher>>,
    next_id: AtomicU64,
    max: usize,
    max_per_caller: usize,
    reserve: usize,
    pool: Pool,
}

struct Watcher {
    id: u64,
    session: String,
    /// Whose share it takes (none: only the server-wide limit applies).
    caller: Option<String>,
    stop: StreamStop,
}

/// A place among the watchers, given back when dropped.
struct WatchPermit {
    watchers: Arc<Watchers>,
    id: u64,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        lock(&self.watchers.active).retain(|w| w.id != self.id);
    }
}

impl Watchers {
    pub(super) fn new(settings: &SessionSettings, pool: Pool) -> Watchers {
        Watchers {
            active: Mutex::default(),
            next_id: AtomicU64::new(0),
            max: settings.max_watchers,
            max_per_caller: settings.max_watchers_per_caller,
            reserve: settings.watch_reserve_slots,
            pool,
        }
    }

    /// Stops the watchers of `session`.
    pub(super) fn stop(&self, session: &str, close_code: u16, why: &str) {
        for w in lock(&self.active).iter().filter(|w| w.session == session) {
            w.stop.stop(close_code, why);
        }
    }

    pub(super) fn count_of(&self, session: &str) -> usize {
        lock(&self.active).iter().filter(|w| w.session == session).count()
    }

    /// A place for a watcher of session `name` on behalf of `caller`, with a stop that
    /// `parent` (the server's) also stops; refused past the limits.
    fn enter(
        self: &Arc<Self>,
        name: &str,
        caller: Option<&str>,
        parent: &StreamStop,
    ) -> Result<(WatchPermit, StreamStop), Error> {
        let max = self.max;
        let mut active = lock(&self.active);
        if active.len() >= max {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("{max} viewers are watching already (each costs a walsender): try again later"),
            ));
        }
        let per_caller = self.max_per_caller;
        if caller.is_some() && active.iter().filter(|w| w.caller.as_deref() == caller).count() >= per_caller {
            return Err(Error::new(
                ErrorKind::TooMany,
                format!("this token watches {per_caller} times already, as many as one token may: close one first"),
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = parent.child();
        active.push(Watcher { id, session: name.to_owned(), caller: caller.map(str::to_owned), stop: stop.clone() });
        Ok((WatchPermit { watchers: Arc::clone(self), id }, stop))
    }

    /// Refuses a watcher (503) when Postgres has no more than the reserve of free
    /// replication slots or walsenders: those are for sessions and their streams.
    async fn check_room(&self) -> Result<(), Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT current_setting('max_replication_slots')::int \
                        - (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int, \
                        current_setting('max_wal_senders')::int \
                        - (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender')::int",
                &[],
            )
            .await?;
        let (slots, senders): (i32, i32) = (row.try_get(0)?, row.try_get(1)?);
        client.release();
        let reserve = self.reserve as i64;
        let free = i64::from(slots.min(senders));
        if free <= reserve {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Postgres has {free} free replication slots or walsenders, and the last {reserve} are kept for \
                     sessions (--watch-reserve-slots): try again later, or raise max_replication_slots and \
                     max_wal_senders"
                ),
            ));
        }
        Ok(())
    }
}

impl Registry {
    /// `GET /v2/sessions/{name}/watch`: a stream of the session's changes from now on,
    /// in the `changes` format, from a temporary slot of the watcher's own. `caller`:
    /// whose share of the watchers it takes (none: an admin's, only the server-wide
    /// limit applies).
    pub(crate) async fn open_watch(self: &Arc<Self>, name: &str, caller: Option<&str>) -> Result<OpenStream, Error> {
        self.refuse_when_stopping()?;
        let def = self.known(name).await?;
        let (permit, stop) = self.watchers.enter(name, caller, &self.shutdown)?;
        self.watchers.check_room().await?;
        let ours = self.our_slot(&def.slot_name).await?;
        let plugin = ours.plugin;
        let filter = Filter { hidden_schemas: vec![self.settings.schema.clone()], ..def.filter() };
        let filter = plugin.prepare(filter, &self.pool).await.map_err(Error::internal)?;
        let slot = names::watch_slot_name();
        // The options name the session's slot: a pgoutput watcher reads its publication.
        let options = plugin.watch_options(&filter, &def.slot_name, ours.major);
        let (start, stream) = self.slots.open_temporary(&slot, plugin, &options).await?;
        if stop.is_stopped() {
            return Err(Error::conflict(format!("session {name} was ended as the watch opened")));
        }
        tracing::info!(session = name, slot, %start, "watch started");
        Ok(OpenStream {
            slot,
            start,
            stream,
            stop,
            guard: Box::new(permit),
            // A fresh record: the session's last ack and last close stay its consumer's.
            progress: Arc::default(),
            decoder: plugin.decoder(Format::Changes, &filter, &self.pool, self.settings.pgoutput_memory),
            // A watcher sees no backfill: its chunks are the session's client's.
            marks: Marks::new(Format::Changes, None, filter.wants(Action::Message), Ddl::of(&filter)),
            skip_empty: true,
            settings: self.settings.clone(),
            options,
            preamble: None,
            explain: None,
            // A watcher of a session whose filter changes is ended instead (watch again).
            commands: None,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
