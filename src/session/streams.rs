//! A session's one stream: claimed, started on Postgres, then run into a sink.
//! Everything that can be refused is refused before the sink exists, so that a
//! websocket client gets an HTTP error rather than a socket that closes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use bytes::Bytes;

use super::definition::Definition;
use super::safety::{Invalidation, OnInvalidated};
use super::{Registry, SessionSettings, State};
use crate::error::{Error, ErrorKind};
use crate::pg::replication::ReplicationStream;
use crate::pg::version::Major;
use crate::stream::Stop as StreamStop;
use crate::stream::backfill::Backfills;
use crate::stream::ddl::Ddl;
use crate::stream::decode::PluginDecoder;
use crate::stream::filter::{Action, Filter};
use crate::stream::frame::Format;
use crate::stream::marks::Marks;
use crate::stream::message::{Finish, MessageKind, Part, Start};
use crate::stream::plugin::Plugin;
use crate::stream::progress::Progress;
use crate::stream::pump::{ExplainFatal, Pump};
use crate::stream::reconfigure::{Commands, Reconfigurer};
use crate::stream::sink::{Link, Outgoing, Sink};
use crate::types::Lsn;

/// How long a new stream of a session waits for the session's previous stream in this
/// process to let go of the slot, its client having just closed it: for the stream to
/// end here (its goodbye to Postgres is bounded by as much), then, as long again, for
/// its walsender to release the slot. A client that reconnects at once is served
/// rather than refused for that moment.
const PREVIOUS_STREAM_WAIT: Duration = Duration::from_secs(5);
/// How often the slot is looked at while the previous walsender lets go.
const RELEASE_POLL: Duration = Duration::from_millis(25);

/// A stream that has started on Postgres and waits for its sink.
pub(crate) struct OpenStream {
    pub slot: String,
    pub start: Lsn,
    pub(super) stream: ReplicationStream,
    pub(super) stop: StreamStop,
    /// What the stream holds while it runs (the session's claim, or a watcher's
    /// place), given back when it ends.
    pub(super) guard: Box<dyn Send>,
    pub(super) progress: Arc<Progress>,
    /// The plugin's output as messages.
    pub(super) decoder: PluginDecoder,
    /// Our own logical messages in the stream (a backfill's watermarks).
    pub(super) marks: Marks,
    /// v2 sessions are not sent transactions with no change for them; v1 ones are, as
    /// the original sent them.
    pub(super) skip_empty: bool,
    pub(super) settings: SessionSettings,
    /// What the stream started with, to start again with.
    pub(super) options: Vec<(&'static str, String)>,
    /// A control message the client gets before the stream (`must-refetch`).
    pub(super) preamble: Option<Bytes>,
    /// What a failure of the stream meant (see [`Registry::explain_failure`]).
    pub(super) explain: Option<ExplainFatal>,
    /// Where a change of the session's filter reaches the running stream.
    pub(super) commands: Commands,
}

/// How a running stream of a session is given a new filter, and what it needs to know
/// to build one ([`Registry::stream_filter`]).
#[derive(Clone)]
pub(super) struct StreamControl {
    pub tx: Reconfigurer,
    pub plugin: Plugin,
    pub format: Format,
    pub major: Major,
}

/// The session's stream, taken: given back when dropped.
struct Claim {
    registry: Arc<Registry>,
    name: String,
    /// Set when the stream told its client `must-refetch`: the session's acks then,
    /// so that one after it shows the client started over.
    refetch_acks: Option<u64>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(before) = self.refetch_acks {
            let acked = self.registry.with(|s| s.sessions.get(&self.name).map(|e| e.progress.stats().acks));
            if acked.is_some_and(|n| n > before) {
                self.registry.refetched(&self.name);
            }
        }
        self.registry.with(|s| {
            if let Some(e) = s.sessions.get_mut(&self.name) {
                e.stream.running = None;
                e.stream.backfills = None;
                e.stream.control = None;
            }
        });
        self.registry.stream_ended.notify_waiters();
    }
}

impl Registry {
    /// `/v1/lr/stream?slotName=`: the session that reads `slot` (a slot of ours that no
    /// definition names streams as a session of its own, unfiltered).
    pub(crate) async fn open_stream(self: &Arc<Self>, slot: &str, format: Format) -> Result<OpenStream, Error> {
        self.refuse_when_stopping()?;
        let def = self.session_of_slot(slot).await?;
        self.start(&def.name, format, Some(slot)).await
    }

    /// `/v2/sessions/{name}/stream`.
    pub(crate) async fn open_session_stream(self: &Arc<Self>, name: &str, format: Format) -> Result<OpenStream, Error> {
        self.refuse_when_stopping()?;
        self.known(name).await?;
        self.start(name, format, None).await
    }

    /// Starts session `name`'s stream: through v1 with `v1_slot`, the slot the client
    /// named, which must still be the session's.
    async fn start(self: &Arc<Self>, name: &str, format: Format, v1_slot: Option<&str>) -> Result<OpenStream, Error> {
        self.wait_for_stopped_stream(name, Instant::now() + PREVIOUS_STREAM_WAIT).await;
        self.follow_stored_change(name).await;
        let (def, progress, stop) = self.with(|s| s.claim(name, &self.shutdown))?;
        let mut claim = Claim { registry: Arc::clone(self), name: name.to_owned(), refetch_acks: None };
        let slot = def.slot_name.clone();
        let slot = slot.as_str();
        if let Some(asked) = v1_slot.filter(|s| *s != slot) {
            // The session has another slot since (an init in between).
            return Err(Error::not_found(format!("replication slot {asked} was dropped as the stream opened")));
        }
        // v1 sessions are sent transactions with no change for them, as the original
        // sent them; v2 ones are not.
        let skip_empty = v1_slot.is_none();
        let def = self.meet_fate(def).await?;
        let preamble = self.refetch_message(&def);
        if preamble.is_some() {
            claim.refetch_acks = Some(progress.stats().acks);
        }
        let previous = self.with(|s| s.sessions.get(name).and_then(|e| e.stream.walsender));
        let deadline = Instant::now() + PREVIOUS_STREAM_WAIT;
        let (info, start, filter, options, stream) = loop {
            if stop.is_stopped() {
                return Err(ended_as_it_opened(slot, &stop));
            }
            let info = self.our_slot(slot).await?;
            match info.active_pid {
                Some(pid) if Some(pid) == previous && Instant::now() < deadline => {
                    tokio::time::sleep(RELEASE_POLL).await;
                    continue;
                }
                Some(pid) if Some(pid) == previous => {
                    return Err(Error::conflict(format!(
                        "slot {slot} is still held by the walsender (pid {pid}) of this session's previous stream: \
                         retry shortly"
                    )));
                }
                Some(pid) => {
                    return Err(Error::conflict(format!("slot {slot} is in use by another process (pid {pid})")));
                }
                None => {}
            }
            // Postgres keeps a slot's confirmed position in memory and writes it to disk only
            // at checkpoints: after a crash the slot may be behind the client's last ack.
            // Start after whichever is later, so that an acked change never comes back.
            let last_ack = progress.last_ack().map_or(Lsn::ZERO, |(lsn, _)| lsn);
            let start = info.confirmed_flush.max(last_ack);
            let (filter, options) = self.stream_filter(&def, info.plugin, format, info.major).await?;
            match self.slots.start_replication(slot, start, &options).await {
                // Taken since we looked: who holds it now decides, when we look again.
                Err(e) if e.kind == ErrorKind::Conflict && Instant::now() < deadline => continue,
                Err(e) => return Err(e),
                Ok(stream) => break (info, start, filter, options, stream),
            }
        };
        let walsender = stream.backend_pid();
        let backfills = Backfills::default();
        let (tx, commands) = tokio::sync::mpsc::channel(1);
        let control = StreamControl { tx, plugin: info.plugin, format, major: info.major };
        self.with(|s| {
            s.sessions.get_mut(name).map(|e| {
                e.stream.walsender = walsender;
                e.stream.backfills = Some(backfills.clone());
                e.stream.control = Some(control);
            })
        });
        self.spawn_backfill(name, backfills.clone());
        if stop.is_stopped() {
            // Ended (by an init or a drop) while it was opening: the dropped stream
            // closes its connection, which frees the slot for whoever ended it.
            return Err(ended_as_it_opened(slot, &stop));
        }
        tracing::info!(session = name, slot, %start, "stream started");
        Ok(OpenStream {
            slot: slot.to_owned(),
            start,
            stream,
            stop,
            guard: Box::new(claim),
            progress,
            decoder: info.plugin.decoder(format, &filter, &self.pool, self.settings.pgoutput_memory),
            marks: Marks::new(format, Some(backfills), filter.wants(Action::Message), Ddl::of(&filter)),
            skip_empty,
            settings: self.settings.clone(),
            options,
            preamble,
            explain: Some(self.explain_failure(&def)),
            commands: Some(commands),
        })
    }

    /// The filter and start options of a stream of session `def` (the store's own
    /// writes are never a client's business), completed for a stream that starts now.
    pub(super) async fn stream_filter(
        &self,
        def: &Definition,
        plugin: Plugin,
        format: Format,
        major: Major,
    ) -> Result<(Filter, Vec<(&'static str, String)>), Error> {
        let filter = Filter { hidden_schemas: vec![self.settings.schema.clone()], ..def.filter() };
        let filter = plugin.prepare(filter, &self.pool).await.map_err(Error::internal)?;
        let options = plugin.start_options(format, &filter, &def.slot_name, major);
        Ok((filter, options))
    }
}

/// The stream of `slot` was stopped before it ran.
fn ended_as_it_opened(slot: &str, stop: &StreamStop) -> Error {
    Error::conflict(format!("the stream of slot {slot} was ended as it opened: {}", stop.reason().1))
}

impl Registry {
    /// Waits (until `deadline`) for a stream of session `name` that has been stopped,
    /// its client gone, to end here. A stream that runs is not waited for: a second
    /// client is refused at once.
    async fn wait_for_stopped_stream(&self, name: &str, deadline: Instant) {
        let stopping = |s: &State| {
            s.sessions.get(name).and_then(|e| e.stream.running.as_ref()).is_some_and(|stop| stop.is_stopped())
        };
        if self.with(|s| stopping(s)) && !self.wait_streams(deadline, |s| !stopping(s)).await {
            tracing::warn!(session = name, "the previous stream did not end in time");
        }
    }
}

impl Registry {
    /// A session whose slot was invalidated fails (410) or is made again
    /// (`onInvalidated`); answers the definition to stream.
    async fn meet_fate(self: &Arc<Self>, def: Definition) -> Result<Definition, Error> {
        let catalog = match def.fate.invalidated {
            Some(_) => None,
            None => {
                let info = self.our_slot(&def.slot_name).await?;
                info.invalidated.map(|reason| (reason, info.confirmed_flush))
            }
        };
        let Some(lost) = Invalidation::met(&def, catalog) else { return Ok(def) };
        match def.policy.on_invalidated {
            OnInvalidated::Fail => Err(lost.gone(&def)),
            OnInvalidated::Recreate => self.recreate(&def, lost).await,
        }
    }
}

impl State {
    /// Takes session `name`'s one stream, with a stop that `parent` also stops. Checked
    /// and taken under the state's lock, so that a stream still opening is seen, and
    /// stopped, by whoever ends the session.
    fn claim(&mut self, name: &str, parent: &StreamStop) -> Result<(Definition, Arc<Progress>, StreamStop), Error> {
        let e = self.sessions.get_mut(name).ok_or_else(|| Error::not_found(format!("no session named {name}")))?;
        if let Some(why) = e.stream.closing {
            return Err(Error::conflict(format!("session {name} is being ended ({why})")));
        }
        if e.stream.running.is_some() {
            return Err(Error::conflict(format!(
                "slot {} is already being streamed by another client",
                e.def.slot_name
            )));
        }
        let stop = parent.child();
        e.stream.running = Some(stop.clone());
        Ok((e.def.clone(), e.progress.clone(), stop))
    }
}

impl OpenStream {
    /// Stops the stream once it runs (and its sink tells the client why).
    pub fn stop(&self) -> StreamStop {
        self.stop.clone()
    }

    /// Runs the stream into `sink` until it ends.
    pub async fn run(self, sink: impl Sink) {
        let OpenStream {
            slot,
            start,
            stream,
            stop,
            guard,
            progress,
            decoder,
            marks,
            skip_empty,
            settings,
            options,
            preamble,
            explain,
            commands,
        } = self;
        let (messages_tx, messages_rx) = mpsc::channel(settings.stream_buffer.max(1));
        if let Some(body) = preamble {
            // Not a transaction: nothing acks it, and the first ack after it is the
            // client's word that it started over.
            let finish = Finish { nextlsn: None, kind: MessageKind::Unackable, changes: 0 };
            let parts = Part::whole(Start::default(), body, finish).to_vec();
            // The channel is empty and has room: this never waits.
            let _ = messages_tx.try_send(Outgoing::Parts(parts));
        }
        let (acks_tx, acks_rx) = mpsc::channel(64);
        let pump = Pump {
            slot: slot.clone(),
            stream,
            start,
            out: messages_tx,
            acks: acks_rx,
            stop: stop.clone(),
            status_interval: settings.status_interval,
            decoder,
            marks,
            skip_empty,
            options,
            explain,
            commands,
        };
        let link = Link { slot, start, messages: messages_rx, acks: acks_tx, progress, stop };
        // The stages run in this one task rather than as tasks of their own: handing a
        // message from one stage to the next is then a poll in the same thread, not a
        // wake-up of another worker (which cost more than the forwarding itself).
        tokio::join!(pump.run(), sink.run(link));
        drop(guard);
    }
}
