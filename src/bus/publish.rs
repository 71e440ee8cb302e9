//! `pgdeltastream publish`: owns a session's slot and publishes each transaction to the
//! session's JetStream stream. The slot is confirmed only up to what JetStream
//! acknowledged, so a crash loses nothing: the slot resumes at its confirmed position,
//! and what is published again is dropped as a duplicate (`Nats-Msg-Id`) or skipped
//! (the stream's last message says how far it got).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio_util::sync::CancellationToken;

use super::acks::{SLOTS_BUCKET, bucket, incarnation, incarnation_key, slot_key};
use super::message::{HEADER_ROOM, Meta, SLOT, full_piece};
use super::{stream_name, subject, unavailable};
use crate::error::{Error, ErrorKind};
use crate::session::Registry;
use crate::session::definition::check_name;
use crate::stream::frame::Format;
use crate::stream::message::{Finish, Part, Start};
use crate::stream::pump::truncate_reason;
use crate::stream::sink::{Link, Outgoing, Sink};
use crate::stream::stop::code;
use crate::types::Lsn;

#[derive(Debug, Clone)]
pub struct PublishSettings {
    pub nats: String,
    pub session: String,
    /// The stream's limits; zero: none.
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_msgs: i64,
    /// How long JetStream remembers message ids to drop a re-publish.
    pub duplicate_window: Duration,
    /// Publishes awaiting JetStream's acknowledgement at once.
    pub window: usize,
}

/// How long to wait before opening the stream again after it ended or failed.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Publishes until `shutdown` resolves. A stream that ends (Postgres restarts, NATS
/// goes away, the slot is busy) is opened again after a pause.
pub async fn run(
    registry: Arc<Registry>,
    settings: PublishSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    check_name(&settings.session)?;
    let stopping = CancellationToken::new();
    tokio::spawn({
        let (stopping, registry) = (stopping.clone(), registry.clone());
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            stopping.cancel();
            registry.shutdown().await;
        }
    });
    // NATS down at the start is waited out as NATS down later is.
    let client = loop {
        match super::connect(&settings.nats).await {
            Ok(client) => break client,
            Err(e) => tracing::warn!(session = %settings.session, error = %e, "cannot publish; retrying"),
        }
        tokio::select! {
            _ = stopping.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RETRY_AFTER) => {}
        }
    };
    let js = jetstream::new(client.clone());
    while !stopping.is_cancelled() {
        match publish_once(&registry, &client, &js, &settings).await {
            Ok(()) if stopping.is_cancelled() => break,
            Ok(()) => tracing::warn!(session = %settings.session, "the stream ended; opening it again"),
            // No such session, or one we may not stream: waiting will not change that.
            Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::BadRequest | ErrorKind::Forbidden) => {
                return Err(e);
            }
            Err(e) => tracing::warn!(session = %settings.session, error = %e, "cannot publish; retrying"),
        }
        tokio::select! {
            _ = stopping.cancelled() => break,
            _ = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
    Ok(())
}

async fn publish_once(
    registry: &Arc<Registry>,
    client: &async_nats::Client,
    js: &jetstream::Context,
    settings: &PublishSettings,
) -> Result<(), Error> {
    let open = registry.open_session_stream(&settings.session, Format::Transactions).await?;
    let slots = bucket(js, SLOTS_BUCKET).await?;
    let stream = adopt_stream(js, &slots, settings, &open.slot).await?;
    let subject = subject(&settings.session);
    let resume = last_published(&stream, &subject).await?;
    slots
        .put(slot_key(&open.slot), Bytes::from(settings.session.clone()))
        .await
        .map_err(|e| unavailable("cannot record the session's slot in JetStream", e))?;
    let max_payload = client.server_info().max_payload;
    tracing::info!(session = %settings.session, slot = %open.slot, start = %open.start, ?resume, max_payload, "publishing");
    let sink = JetStreamSink {
        js: js.clone(),
        subject,
        slot: open.slot.clone(),
        piece_bytes: max_payload.saturating_sub(HEADER_ROOM).max(1024),
        window: settings.window.max(1),
        resume,
    };
    open.run(sink).await;
    Ok(())
}

/// The stream of the session's incarnation that reads `slot`. A stream published from
/// another slot is an earlier session's of the same name (deleted and made again): it
/// is deleted, so that none of its history reaches the new session's clients, and the
/// new slot is recorded before the new stream exists (a crash in between deletes
/// nothing twice). A stream with no slot recorded (published by an older version) is
/// taken as this one's.
async fn adopt_stream(
    js: &jetstream::Context,
    slots: &kv::Store,
    settings: &PublishSettings,
    slot: &str,
) -> Result<stream::Stream, Error> {
    let session = settings.session.as_str();
    let name = stream_name(session);
    if let Some(previous) = incarnation(slots, session).await?.filter(|previous| previous != slot) {
        tracing::warn!(
            session,
            previous,
            slot,
            "the session was made again since its stream was published: starting a new stream"
        );
        match js.delete_stream(&name).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(unavailable(&format!("cannot delete stream {name} of the earlier session"), e)),
        }
    }
    slots
        .put(incarnation_key(session), Bytes::from(slot.to_owned()))
        .await
        .map_err(|e| unavailable("cannot record the session's slot in JetStream", e))?;
    ensure_stream(js, settings).await
}

/// Creates the session's stream, or brings its limits in line with the flags.
async fn ensure_stream(js: &jetstream::Context, settings: &PublishSettings) -> Result<stream::Stream, Error> {
    let name = stream_name(&settings.session);
    let unlimited = |n: i64| if n > 0 { n } else { -1 };
    let config = stream::Config {
        name: name.clone(),
        description: Some(format!("pgdeltastream session {}", settings.session)),
        subjects: vec![subject(&settings.session)],
        max_age: settings.max_age,
        max_bytes: unlimited(settings.max_bytes),
        max_messages: unlimited(settings.max_msgs),
        storage: stream::StorageType::File,
        // JetStream refuses a duplicate window longer than the max age.
        duplicate_window: match settings.max_age {
            Duration::ZERO => settings.duplicate_window,
            age => settings.duplicate_window.min(age),
        },
        ..Default::default()
    };
    js.create_or_update_stream(config).await.map_err(|e| unavailable(&format!("cannot create stream {name}"), e))?;
    js.get_stream(&name).await.map_err(|e| unavailable(&format!("cannot open stream {name}"), e))
}

/// How far the stream got: the last stored transaction and piece.
#[derive(Debug, Clone, Copy)]
struct Resume {
    nextlsn: Lsn,
    piece: u32,
}

async fn last_published(stream: &stream::Stream, subject: &str) -> Result<Option<Resume>, Error> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => {
            let meta = Meta::from_headers(Some(&message.headers)).map_err(Error::internal)?;
            Ok(meta.nextlsn.map(|nextlsn| Resume { nextlsn, piece: meta.piece }))
        }
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable("cannot read the stream's last message", e)),
    }
}

/// A publish's acknowledgement: the nextlsn it completes (on a transaction's last
/// piece), and the bytes it held.
type AckFuture = Pin<Box<dyn Future<Output = Result<(Option<Lsn>, usize), String>> + Send>>;

/// Bytes published and not yet acknowledged, at most (beside the `window` of publishes):
/// memory stays bounded however large a transaction is.
const INFLIGHT_BYTES: usize = 16 << 20;

/// The stream's far end: JetStream.
struct JetStreamSink {
    js: jetstream::Context,
    subject: String,
    /// Every message names it: which incarnation of the session it is of.
    slot: String,
    piece_bytes: usize,
    window: usize,
    resume: Option<Resume>,
}

impl Sink for JetStreamSink {
    async fn run(self, link: Link) {
        let Link { slot, start, mut messages, acks, progress, stop } = link;
        let window = self.window;
        let mut out = Publisher {
            sink: self,
            current: None,
            after: start,
            unackable: 0,
            inflight: FuturesOrdered::new(),
            inflight_bytes: 0,
        };
        let failure = loop {
            let room = out.inflight.len() < window && out.inflight_bytes < INFLIGHT_BYTES;
            tokio::select! {
                biased;
                _ = stop.stopped() => break None,
                Some(done) = out.inflight.next(), if !out.inflight.is_empty() => match done {
                    Ok((nextlsn, bytes)) => {
                        out.inflight_bytes -= bytes;
                        if let Some(lsn) = nextlsn {
                            progress.record_ack(lsn);
                            if acks.send(lsn).await.is_err() {
                                break None;
                            }
                        }
                    }
                    Err(e) => break Some(e),
                },
                item = messages.recv(), if room => match item {
                    Some(Outgoing::Parts(batch)) => {
                        if let Err(e) = out.take(batch).await {
                            break Some(e);
                        }
                    }
                    Some(Outgoing::Fatal(message) | Outgoing::End { message, .. }) => break Some(message),
                    None => break None,
                },
            }
        };
        match failure {
            Some(message) => {
                tracing::error!(slot = %slot, error = %message, "publishing stopped");
                stop.stop(code::INTERNAL, truncate_reason(&message));
            }
            None => stop.stop(code::NORMAL, "the publisher stopped"),
        }
    }
}

struct Publisher {
    sink: JetStreamSink,
    /// The message (a transaction, or a logical message) whose parts are coming.
    current: Option<Current>,
    /// The last transaction's nextlsn, and the logical messages since: the ids of those.
    after: Lsn,
    unackable: u32,
    /// Each piece's acknowledgement, in publish order.
    inflight: FuturesOrdered<AckFuture>,
    inflight_bytes: usize,
}

/// A message being published a piece at a time.
struct Current {
    /// From the transaction's head, before its changes; none on a logical message.
    nextlsn: Option<Lsn>,
    /// [`Publisher::after`] and [`Publisher::unackable`] when it began: its message ids.
    after: Lsn,
    unackable: u32,
    /// Pieces published (or found stored) so far.
    pieces: u32,
    /// How many leading pieces the stream holds already.
    stored: u32,
    /// Text not yet published: less than a piece, plus a body.
    text: BytesMut,
}

impl Publisher {
    /// Publishes the parts: each message cut into pieces of at most `piece_bytes`, a
    /// piece as soon as it is full, the last at the message's finish.
    async fn take(&mut self, batch: Vec<Part>) -> Result<(), String> {
        for part in batch {
            match part {
                Part::Start(start) if self.current.is_none() => self.current = Some(self.begin(start)),
                Part::Body(body) => {
                    let mut current = self.current.take().ok_or("the decoder sent a body outside a message")?;
                    current.text.extend_from_slice(&body);
                    while let Some(piece) = full_piece(&mut current.text, self.sink.piece_bytes) {
                        self.publish(&mut current, piece, false).await?;
                    }
                    self.current = Some(current);
                }
                Part::Finish(finish) => {
                    let current = self.current.take().ok_or("the decoder finished a message it did not start")?;
                    self.finish(current, finish).await?;
                }
                Part::Start(_) => return Err("the decoder started a message inside another".into()),
            }
        }
        Ok(())
    }

    /// A message starts: its nextlsn is known from its head (wal2json prints it first).
    fn begin(&mut self, start: Start) -> Current {
        let stored = self.already_stored(start.nextlsn);
        Current {
            nextlsn: start.nextlsn,
            after: self.after,
            unackable: self.unackable,
            pieces: 0,
            stored,
            text: BytesMut::new(),
        }
    }

    /// Publishes what is left of the message as its last piece.
    async fn finish(&mut self, mut current: Current, finish: Finish) -> Result<(), String> {
        let ends = finish.ack_point();
        if ends != current.nextlsn {
            return Err(format!("a transaction began as {:?} and ended as {ends:?}", current.nextlsn));
        }
        let rest = current.text.split().freeze();
        self.publish(&mut current, rest, true).await?;
        match ends {
            Some(lsn) => (self.after, self.unackable) = (lsn, 0),
            None => self.unackable += 1,
        }
        Ok(())
    }

    async fn publish(&mut self, current: &mut Current, piece: Bytes, last: bool) -> Result<(), String> {
        current.pieces = current.pieces.checked_add(1).ok_or("a transaction of too many pieces")?;
        let meta = Meta { nextlsn: current.nextlsn, piece: current.pieces, last };
        let ack = if last { current.nextlsn } else { None };
        if current.pieces <= current.stored {
            if ack.is_some() {
                self.inflight.push_back(Box::pin(std::future::ready(Ok((ack, 0)))));
            }
            return Ok(());
        }
        let bytes = piece.len();
        let mut headers = meta.headers();
        headers.insert(SLOT, self.sink.slot.as_str());
        let publish = PublishMessage::build()
            .payload(piece)
            .headers(headers)
            .message_id(meta.message_id(current.after, current.unackable));
        let future = self
            .sink
            .js
            .send_publish(self.sink.subject.clone(), publish)
            .await
            .map_err(|e| format!("cannot publish to JetStream: {e}"))?;
        self.inflight_bytes += bytes;
        self.inflight.push_back(Box::pin(async move {
            future.await.map(|_| (ack, bytes)).map_err(|e| format!("JetStream did not acknowledge a publish: {e}"))
        }));
        Ok(())
    }

    /// How many leading pieces of this message the stream holds already: the slot may
    /// resume behind what was published (it is confirmed after JetStream's ack). A
    /// message is cut into the same pieces every time ([`full_piece`]).
    fn already_stored(&mut self, nextlsn: Option<Lsn>) -> u32 {
        let Some(resume) = self.sink.resume else { return 0 };
        match nextlsn {
            // A logical message before the last stored transaction.
            None => u32::MAX,
            Some(lsn) if lsn < resume.nextlsn => u32::MAX,
            Some(lsn) => {
                self.sink.resume = None;
                if lsn == resume.nextlsn { resume.piece } else { 0 }
            }
        }
    }
}
