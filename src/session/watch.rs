//! Watching a session: a viewer gets a live copy of the session's changes without
//! touching the session's slot. Each watcher streams from a TEMPORARY slot of its own,
//! made with the session's plugin and filter (a pgoutput watcher reads the session's
//! publication) at the moment it starts; it confirms its slot as it sends, and
//! Postgres drops the slot when the watcher's replication connection ends. The
//! session's own stream, its confirmed position and its record of acks are never
//! involved, so its consumer can stream while it is watched.
//!
//! Each watcher costs a walsender (and a replication slot while it runs), so only
//! [`SessionSettings::max_watchers`](super::SessionSettings) may run at once; more are
//! refused with 503. Ending a session, or the server, ends its watchers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Registry;
use super::names;
use super::streams::{Guard, OpenStream};
use crate::error::{Error, ErrorKind};
use crate::pg::replication::ReplicationConnection;
use crate::stream::Stop as StreamStop;
use crate::stream::filter::Filter;
use crate::stream::frame::Format;
use crate::stream::plugin::Plugin;
use crate::stream::stop::code;

/// The watchers running now.
#[derive(Default)]
pub(super) struct Watchers {
    active: Mutex<Vec<Watcher>>,
    next_id: AtomicU64,
}

struct Watcher {
    id: u64,
    session: String,
    stop: StreamStop,
}

/// A place among the watchers, given back when dropped.
pub(super) struct WatchPermit {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        lock(&self.registry.watchers.active).retain(|w| w.id != self.id);
    }
}

impl Watchers {
    /// Stops the watchers of `session` (every one when `None`).
    pub(super) fn stop(&self, session: Option<&str>, close_code: u16, why: &str) {
        for w in lock(&self.active).iter().filter(|w| session.is_none_or(|s| s == w.session)) {
            w.stop.stop(close_code, why);
        }
    }

    pub(super) fn count_of(&self, session: &str) -> usize {
        lock(&self.active).iter().filter(|w| w.session == session).count()
    }
}

impl Registry {
    /// `GET /v2/sessions/{name}/watch`: a stream of the session's changes from now on,
    /// in the `changes` format, from a temporary slot of the watcher's own.
    pub async fn open_watch(self: &Arc<Self>, name: &str) -> Result<OpenStream, Error> {
        self.refuse_when_stopping()?;
        let def = self.known(name).await?;
        let (permit, stop) = self.enter_watchers(name)?;
        let plugin = self.our_slot(&def.slot_name).await?.plugin;
        let filter = Filter { hidden_schemas: vec![self.settings.schema.clone()], ..def.filter() };
        let filter = plugin.prepare(filter, &self.pool).await.map_err(Error::internal)?;
        let slot = names::watch_slot_name();
        let mut conn = ReplicationConnection::connect(&self.pg).await?;
        let start = match conn.create_temporary_slot(&slot, plugin.name()).await {
            Ok(start) => start,
            Err(e) => {
                conn.close().await;
                return Err(e.into());
            }
        };
        // The options name the session's slot: a pgoutput watcher reads its publication.
        let mut options = plugin.start_options(Format::Changes, &filter, &def.slot_name);
        if plugin == Plugin::Wal2json {
            // The viewer shows each change's key; pgoutput names none, the viewer copes.
            options.push(("include-pk", "1".into()));
        }
        let stream = conn.start_replication(&slot, start, &options).await?;
        if stop.is_stopped() {
            return Err(Error::conflict(format!("session {name} was ended as the watch opened")));
        }
        tracing::info!(session = name, slot, %start, "watch started");
        Ok(OpenStream {
            slot,
            start,
            stream,
            stop,
            guard: Guard::Watch { _permit: permit },
            // A fresh record: the session's last ack and last close stay its consumer's.
            progress: Arc::default(),
            format: Format::Changes,
            decoder: plugin.decoder(Format::Changes, &filter, &self.pool, self.settings.pgoutput_memory),
            skip_empty: true,
            settings: self.settings.clone(),
            options,
        })
    }

    fn enter_watchers(self: &Arc<Self>, name: &str) -> Result<(WatchPermit, StreamStop), Error> {
        let max = self.settings.max_watchers;
        let mut active = lock(&self.watchers.active);
        if active.len() >= max {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!("{max} viewers are watching already (each costs a walsender): try again later"),
            ));
        }
        let id = self.watchers.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = StreamStop::new();
        if self.shutdown.is_stopped() {
            stop.stop(code::GOING_AWAY, "server shutting down");
        }
        active.push(Watcher { id, session: name.to_owned(), stop: stop.clone() });
        Ok((WatchPermit { registry: Arc::clone(self), id }, stop))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
