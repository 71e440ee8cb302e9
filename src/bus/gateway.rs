//! A gateway client's feed: the session's JetStream stream from after the client's
//! last ack, its stored pieces joined back into the messages a websocket client of the
//! server receives. The websocket side is the server's own ([`crate::stream::socket`]):
//! the same frames of `--frame-size` (cut from the message, wherever NATS cut its
//! pieces), pings and ack checks; acks go to the KV bucket instead of a slot.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, kv};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::acks::{ACKS_BUCKET, AckRecord, SLOTS_BUCKET, bucket, incarnation, key, load, save, slot_key};
use super::hub::{Hub, Stored};
use super::message::{Meta, of_incarnation};
use super::{check_client, stream_name, subject, unavailable};
use crate::error::{Error, ErrorKind};
use crate::pg::ident::is_valid_slot_name;
use crate::session::definition::check_name;
use crate::stream::message::{Finish, MessageKind, Part, Start};
use crate::stream::sink::{Link, Outgoing, Sink};
use crate::stream::socket::SocketSettings;
use crate::stream::stop::{Stop, code};
use crate::types::Lsn;

/// The close code of a stream whose next changes the JetStream stream no longer holds
/// (its max age or max bytes let them go): the client missed changes for good.
pub(crate) const GONE: u16 = 4410;

/// Stored messages (pieces) taken into one batch for the socket, at most.
const BATCH: usize = 64;

pub struct Gateway {
    js: jetstream::Context,
    acks: kv::Store,
    slots: kv::Store,
    pub socket: SocketSettings,
    /// The size of the websocket frames a message is cut into (`--frame-size`).
    pub frame_bytes: usize,
    /// Ends every feed (the gateway shuts down).
    shutdown: Stop,
    /// The feeds running, so that shutting down waits for their last acks to be stored.
    feeds: TaskTracker,
    /// Each session's shared subscription, started by its first client.
    hubs: tokio::sync::Mutex<HashMap<String, Arc<Hub>>>,
    /// How many clients each session served here has now. A session stays, at 0, when
    /// its last client goes, as in the server's scrape; only sessions with a stream get
    /// here ([`Gateway::open`] checks), so clients cannot grow it with made-up names.
    clients: Mutex<BTreeMap<String, Arc<AtomicUsize>>>,
}

/// A client counted in [`Gateway::clients`] while this lives.
struct Connected(Arc<AtomicUsize>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gateway {
    pub async fn connect(url: &str, socket: SocketSettings, frame_bytes: usize) -> Result<Arc<Gateway>, Error> {
        let js = jetstream::new(super::connect(url).await?);
        let acks = bucket(&js, ACKS_BUCKET).await?;
        let slots = bucket(&js, SLOTS_BUCKET).await?;
        Ok(Arc::new(Gateway {
            js,
            acks,
            slots,
            socket,
            frame_bytes,
            shutdown: Stop::new(),
            feeds: TaskTracker::new(),
            hubs: tokio::sync::Mutex::default(),
            clients: Mutex::default(),
        }))
    }

    /// Whether JetStream serves what every feed needs: the buckets of the acks and of
    /// the slots answer (asked anew: the stores' own status is what they cached).
    pub(crate) async fn check_jetstream(&self) -> Result<(), Error> {
        let (acks, slots) = tokio::join!(self.js.get_key_value(ACKS_BUCKET), self.js.get_key_value(SLOTS_BUCKET));
        acks.and(slots).map(drop).map_err(|e| unavailable("JetStream does not answer", e))
    }

    /// The clients each session has on this gateway now.
    pub fn clients(&self) -> Vec<(String, usize)> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.iter().map(|(session, n)| (session.clone(), n.load(Ordering::Relaxed))).collect()
    }

    fn connected(&self, session: &str) -> Connected {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let count = Arc::clone(clients.entry(session.to_owned()).or_default());
        count.fetch_add(1, Ordering::Relaxed);
        Connected(count)
    }

    /// Where the gateway's tasks run (its websockets, its hubs), so that shutting down
    /// waits for them.
    pub fn tasks(&self) -> &TaskTracker {
        &self.feeds
    }

    /// Ends every feed (close code 1001) and waits, a few seconds at most, until they
    /// have stored their clients' last acks.
    pub async fn shutdown(&self) {
        self.shutdown.stop(code::GOING_AWAY, "gateway shutting down");
        self.feeds.close();
        if tokio::time::timeout(Duration::from_secs(5), self.feeds.wait()).await.is_err() {
            tracing::warn!(feeds = self.feeds.len(), "feeds still running at shutdown");
        }
    }

    /// The session whose publisher reads `slot` (for `/v1/lr/stream?slotName=`).
    pub(crate) async fn session_of_slot(&self, slot: &str) -> Result<String, Error> {
        // Also keeps a name that is no KV key from reaching the bucket (a 503 then).
        if !is_valid_slot_name(slot) {
            return Err(Error::bad_request(format!("invalid slot name {slot:?}: use 1 to 63 of a-z, 0-9 and _")));
        }
        let value = self.slots.get(slot_key(slot)).await.map_err(|e| unavailable("cannot read from JetStream", e))?;
        value.and_then(|v| String::from_utf8(v.to_vec()).ok()).ok_or_else(|| {
            Error::not_found(format!("no session published for slot {slot}: run pgdeltastream publish for its session"))
        })
    }

    /// Checks the session and the client's position, and subscribes from there; every
    /// refusal comes before the websocket exists. `owner`: whose client names these are
    /// (None: the session's shared ones).
    pub async fn open(self: &Arc<Self>, session: &str, client: &str, owner: Option<&str>) -> Result<Feed, Error> {
        check_name(session)?;
        check_client(client)?;
        let name = stream_name(session);
        let stream = self.js.get_stream(&name).await.map_err(|e| match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Error::not_found(format!(
                    "session {session} is not published: run pgdeltastream publish --session {session}"
                ))
            }
            _ => unavailable(&format!("cannot open stream {name}"), e),
        })?;
        let key = key(session, client, owner);
        let slot = incarnation(&self.slots, session).await?;
        let acked = load(&self.acks, &key).await?;
        if let Some(acked) = &acked {
            refuse_earlier_incarnation(session, client, acked, slot.as_deref())?;
        }
        let start_seq = acked.as_ref().map_or(1, |r| r.seq + 1);
        let first = stream.cached_info().state.first_sequence;
        if start_seq < first {
            let message = gone(session, client, &resumes(acked.as_ref()), start_seq, first - 1);
            return Err(Error::new(ErrorKind::Gone, message));
        }
        let hub = self.hub(session, slot.as_deref(), &stream).await;
        // A client the shared subscription can serve needs no consumer of its own.
        let source = match &hub {
            Some(hub) if hub.covers(start_seq) => Source::Hub,
            _ => Source::Own(Box::new(own_consumer(&stream, session, start_seq).await?)),
        };
        let shared = matches!(source, Source::Hub);
        tracing::info!(session, client, owner, start_seq, shared, acked = ?acked.as_ref().map(|r| r.lsn), "feed opened");
        Ok(Feed {
            _running: self.feeds.token(),
            gateway: Arc::clone(self),
            session: session.to_owned(),
            client: client.to_owned(),
            key,
            stream,
            hub,
            source,
            acked,
            start_seq,
            slot,
        })
    }

    /// The session's shared subscription, started unless it runs; none when it cannot
    /// start (each client then reads on its own).
    async fn hub(&self, session: &str, slot: Option<&str>, stream: &jetstream::stream::Stream) -> Option<Arc<Hub>> {
        let mut hubs = self.hubs.lock().await;
        // A hub of an earlier incarnation (the session was made again) is replaced.
        if let Some(hub) = hubs.get(session).filter(|h| h.slot() == slot && !h.is_closed()) {
            return Some(Arc::clone(hub));
        }
        match Hub::start(stream, subject(session), slot.map(str::to_owned), self.shutdown.clone(), &self.feeds).await {
            Ok(hub) => {
                hubs.insert(session.to_owned(), Arc::clone(&hub));
                Some(hub)
            }
            Err(e) => {
                tracing::warn!(session, error = %e, "no shared subscription");
                None
            }
        }
    }
}

/// An ordered consumer of the session's subject from `start`.
async fn own_consumer(stream: &jetstream::stream::Stream, session: &str, start: u64) -> Result<pull::Ordered, Error> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject(session),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        })
        .await
        .map_err(|e| unavailable(&format!("cannot subscribe to stream {}", stream_name(session)), e))?;
    consumer.messages().await.map_err(|e| unavailable("cannot read from JetStream", e))
}

/// Where a feed reads: the shared subscription, or a consumer of its own.
enum Source {
    Hub,
    Own(Box<pull::Ordered>),
}

/// Why a client cannot go on: `needs` says what it was to get next, sequences `next`
/// to `upto` of the stream are gone.
fn gone(session: &str, client: &str, needs: &str, next: u64, upto: u64) -> String {
    format!(
        "client {client} of session {session} {needs}, but stream {} no longer holds sequences {next} to {upto} \
         (its max age, max bytes or max messages let them go): start again from a new snapshot, or give the \
         publisher larger --nats-max-age / --nats-max-bytes",
        stream_name(session)
    )
}

/// A position stored in an earlier session of the same name (deleted and made again
/// since): its stream is gone, and resuming by sequence in the new one would skip its
/// first transactions in silence.
fn refuse_earlier_incarnation(session: &str, client: &str, acked: &AckRecord, slot: Option<&str>) -> Result<(), Error> {
    match (acked.slot.as_deref(), slot) {
        (Some(then), Some(now)) if then != now => Err(Error::new(
            ErrorKind::Gone,
            format!(
                "client {client} acked {} in an earlier session {session} (slot {then}), which was deleted and \
                 made again since (slot {now}): nothing of the earlier one is served; start from the new \
                 session's snapshot with a new client id",
                acked.lsn
            ),
        )),
        _ => Ok(()),
    }
}

fn resumes(acked: Option<&AckRecord>) -> String {
    match acked {
        Some(r) => format!("resumes after its ack {} (stream sequence {})", r.lsn, r.seq),
        None => "starts at the stream's beginning (it has acked nothing)".to_owned(),
    }
}

/// A client's subscription, ready for its websocket.
pub struct Feed {
    _running: TaskTrackerToken,
    gateway: Arc<Gateway>,
    session: String,
    client: String,
    key: String,
    stream: jetstream::stream::Stream,
    hub: Option<Arc<Hub>>,
    source: Source,
    acked: Option<AckRecord>,
    start_seq: u64,
    /// The incarnation the feed serves: the slot of the session's stream.
    slot: Option<String>,
}

/// The nextlsn and stream sequence of each transaction handed to the socket and not
/// yet acked: an ack is stored with the sequence the client resumes after.
type Delivered = Arc<Mutex<VecDeque<(Lsn, u64)>>>;

impl Feed {
    /// Feeds `sink` until the client goes, the gateway shuts down, or `deadline` (when
    /// the client's token expires: close 1008, its stored ack stays).
    pub async fn run(self, sink: impl Sink, deadline: Option<tokio::time::Instant>) {
        let Feed { _running, gateway, session, client, key, stream, hub, source, acked, start_seq, slot } = self;
        let _connected = gateway.connected(&session);
        let start = acked.map_or(Lsn::ZERO, |r| r.lsn);
        let (messages_tx, messages_rx) = mpsc::channel(4);
        let (acks_tx, acks_rx) = mpsc::channel(64);
        // A child of the gateway's: shutdown stops every feed with its reason (1001).
        let stop = gateway.shutdown.child();
        let delivered = Delivered::default();
        let link = Link {
            slot: format!("{session}/{client}"),
            start,
            messages: messages_rx,
            acks: acks_tx,
            progress: Arc::default(),
            stop: stop.clone(),
        };
        let feeder = Feeder {
            session: session.clone(),
            client: client.clone(),
            stream,
            hub,
            source,
            out: messages_tx,
            delivered: delivered.clone(),
            last: (start, u32::MAX),
            expected: start_seq,
            slot: slot.clone(),
            stop: stop.clone(),
        };
        let feed = async {
            tokio::join!(feeder.run(), sink.run(link), store_acks(acks_rx, delivered, &gateway.acks, &key, slot));
        };
        let mut feed = std::pin::pin!(feed);
        if let Some(at) = deadline {
            tokio::select! {
                () = &mut feed => {}
                () = tokio::time::sleep_until(at) => {
                    stop.stop(code::POLICY, "the token has expired: reconnect with a new one");
                }
            }
        }
        // After an expiry too: the sink tells the client why and the last acks are stored.
        feed.await;
        tracing::info!(session, client, "feed closed");
    }
}

struct Feeder {
    session: String,
    client: String,
    stream: jetstream::stream::Stream,
    hub: Option<Arc<Hub>>,
    source: Source,
    out: mpsc::Sender<Outgoing>,
    delivered: Delivered,
    /// The last transaction and piece handed on: anything at or below it is a
    /// duplicate (a re-publish, or what the client acked).
    last: (Lsn, u32),
    /// The stream sequence that must come next: the stream holds one subject, so a
    /// jump means messages were let go before the client got them.
    expected: u64,
    /// The incarnation the feed serves: a message of another ends it.
    slot: Option<String>,
    stop: Stop,
}

impl Feeder {
    async fn run(mut self) {
        let stop = self.stop.clone();
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.stopped() => return,
                m = self.next() => m,
            };
            let mut batch = Vec::new();
            let mut next = first;
            let mut taken = 0;
            let end = loop {
                if let Err(end) = self.parts(next, &mut batch) {
                    break Some(end);
                }
                taken += 1;
                if taken >= BATCH {
                    break None;
                }
                match self.ready() {
                    Some(more) => next = more,
                    None => break None,
                }
            };
            if !batch.is_empty() && self.out.send(Outgoing::Parts(batch)).await.is_err() {
                return;
            }
            if let Some(end) = end {
                tracing::warn!(session = %self.session, client = %self.client, reason = ?end, "feed ended");
                let _ = self.out.send(end).await;
                return;
            }
        }
    }

    /// The next message, from the hub when it has it, else from a consumer of our own.
    async fn next(&mut self) -> Option<Result<Arc<Stored>, String>> {
        loop {
            self.join_hub();
            match (&mut self.source, &self.hub) {
                (Source::Own(messages), _) => return messages.next().await.map(own_message),
                (Source::Hub, Some(hub)) => {
                    if let Some(stored) = hub.wait_for(self.expected).await {
                        return Some(Ok(stored));
                    }
                }
                (Source::Hub, None) => {}
            }
            // The hub let go of what we need next (or stopped): read on our own.
            match own_consumer(&self.stream, &self.session, self.expected).await {
                Ok(messages) => self.source = Source::Own(Box::new(messages)),
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }

    /// The next message if it is there already.
    fn ready(&mut self) -> Option<Option<Result<Arc<Stored>, String>>> {
        match (&mut self.source, &self.hub) {
            (Source::Own(messages), _) => messages.next().now_or_never().map(|m| m.map(own_message)),
            (Source::Hub, Some(hub)) => hub.get(self.expected).map(|s| Some(Ok(s))),
            (Source::Hub, None) => None,
        }
    }

    /// A feed on its own consumer that has caught up with the hub reads from the hub.
    fn join_hub(&mut self) {
        if let (Source::Own(_), Some(hub)) = (&self.source, &self.hub) {
            if hub.covers(self.expected) {
                tracing::debug!(session = %self.session, client = %self.client, seq = self.expected, "caught up: reading from the shared subscription");
                self.source = Source::Hub;
            }
        }
    }

    /// The parts a stored message (a piece of a message) becomes; none for a duplicate.
    fn parts(&mut self, message: Option<Result<Arc<Stored>, String>>, out: &mut Vec<Part>) -> Result<(), Outgoing> {
        let fatal = |what: String| Outgoing::Fatal(what);
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(fatal(format!("reading the JetStream stream failed: {e}"))),
            None => return Err(fatal("the JetStream subscription ended".into())),
        };
        let seq = message.seq;
        if seq < self.expected {
            // Delivered again (the consumer was recreated): handed on already.
            return Ok(());
        }
        if seq > self.expected {
            let needs = format!("needs stream sequence {} next", self.expected);
            let message = gone(&self.session, &self.client, &needs, self.expected, seq - 1);
            return Err(Outgoing::End { code: GONE, message });
        }
        if !of_incarnation(message.headers.as_ref(), self.slot.as_deref()) {
            let message = format!(
                "session {} was deleted and made again while client {} read it: nothing of the new one \
                 continues this stream; start from the new session's snapshot with a new client id",
                self.session, self.client
            );
            return Err(Outgoing::End { code: GONE, message });
        }
        self.expected = seq + 1;
        let meta = Meta::from_headers(message.headers.as_ref()).map_err(fatal)?;
        if let Some(lsn) = meta.nextlsn {
            if (lsn, meta.piece) <= self.last {
                return Ok(());
            }
            self.last = (lsn, meta.piece);
        }
        if meta.piece == 1 {
            out.push(Part::Start(Start { nextlsn: meta.nextlsn }));
        }
        out.push(Part::Body(message.payload.clone()));
        if meta.last {
            // Stored messages say only whether they end a transaction: an empty one or
            // an error record is acked like one with changes. A gateway keeps no
            // per-session counters: `changes` is for the server's /metrics.
            let kind = if meta.nextlsn.is_some() { MessageKind::Data } else { MessageKind::Unackable };
            if let Some(lsn) = meta.nextlsn {
                self.delivered.lock().unwrap_or_else(|e| e.into_inner()).push_back((lsn, seq));
            }
            out.push(Part::Finish(Finish { nextlsn: meta.nextlsn, kind, changes: 0 }));
        }
        Ok(())
    }
}

fn own_message(m: Result<jetstream::Message, pull::OrderedError>) -> Result<Arc<Stored>, String> {
    m.map_err(|e| e.to_string()).and_then(Stored::from_message).map(Arc::new)
}

/// Stores the client's acks, the latest of those that came while a write was under
/// way (a client acking every transaction costs one KV write per round trip, not one
/// per ack). Ends when the socket's reader is gone, after storing the last.
async fn store_acks(
    mut acks: mpsc::Receiver<Lsn>,
    delivered: Delivered,
    store: &kv::Store,
    key: &str,
    slot: Option<String>,
) {
    while let Some(mut lsn) = acks.recv().await {
        while let Ok(later) = acks.try_recv() {
            lsn = later;
        }
        let seq = {
            let mut delivered = delivered.lock().unwrap_or_else(|e| e.into_inner());
            let mut seq = None;
            while let Some(&(_, s)) = delivered.front().filter(|(l, _)| *l <= lsn) {
                seq = Some(s);
                delivered.pop_front();
            }
            seq
        };
        // An ack that covers no new transaction changes nothing stored.
        let Some(seq) = seq else { continue };
        if let Err(e) = save(store, key, AckRecord { lsn, seq, slot: slot.clone() }).await {
            tracing::warn!(key, error = %e, "cannot store an ack");
        }
    }
}
