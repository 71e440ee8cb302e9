//! `pgdeltastream publish`: owns a session's slot and publishes each transaction to the
//! session's JetStream stream. The slot is confirmed only up to what JetStream
//! acknowledged, so a crash loses nothing: the slot resumes at its confirmed position,
//! and what is published again is dropped as a duplicate (`Nats-Msg-Id`) or skipped
//! (the stream's last message says how far it got).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio_util::sync::CancellationToken;

use super::acks::{SLOTS_BUCKET, bucket, slot_key};
use super::message::{HEADER_ROOM, Meta, split};
use super::{stream_name, subject, unavailable};
use crate::error::{Error, ErrorKind};
use crate::session::Registry;
use crate::session::definition::check_name;
use crate::stream::frame::{Format, Fragment, OutFrame};
use crate::stream::pump::{Outgoing, truncate_reason};
use crate::stream::sink::{Link, Sink};
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
    let client = super::connect(&settings.nats).await?;
    let js = jetstream::new(client.clone());
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
    let stream = ensure_stream(js, settings).await?;
    let subject = subject(&settings.session);
    let resume = last_published(&stream, &subject).await?;
    let open = registry.open_session_stream(&settings.session, Format::Transactions).await?;
    let slots = bucket(js, SLOTS_BUCKET).await?;
    slots
        .put(slot_key(&open.slot), Bytes::from(settings.session.clone()))
        .await
        .map_err(|e| unavailable("cannot record the session's slot in JetStream", e))?;
    let max_payload = client.server_info().max_payload;
    tracing::info!(session = %settings.session, slot = %open.slot, start = %open.start, ?resume, max_payload, "publishing");
    let sink = JetStreamSink {
        js: js.clone(),
        subject,
        piece_bytes: max_payload.saturating_sub(HEADER_ROOM).max(1024),
        window: settings.window.max(1),
        resume,
    };
    open.run(sink).await;
    Ok(())
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

type AckFuture = Pin<Box<dyn Future<Output = Result<Option<Lsn>, String>> + Send>>;

/// The stream's far end: JetStream.
struct JetStreamSink {
    js: jetstream::Context,
    subject: String,
    piece_bytes: usize,
    window: usize,
    resume: Option<Resume>,
}

impl Sink for JetStreamSink {
    async fn run(self, link: Link) {
        let Link { slot, start, mut frames, acks, progress, stop } = link;
        let window = self.window;
        let mut out = Publisher {
            sink: self,
            text: BytesMut::new(),
            after: start,
            unackable: 0,
            inflight: FuturesOrdered::new(),
        };
        let failure = loop {
            tokio::select! {
                biased;
                _ = stop.stopped() => break None,
                Some(done) = out.inflight.next(), if !out.inflight.is_empty() => match done {
                    Ok(Some(lsn)) => {
                        progress.record_ack(lsn);
                        if acks.send(lsn).await.is_err() {
                            break None;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => break Some(e),
                },
                item = frames.recv(), if out.inflight.len() < window => match item {
                    Some(Outgoing::Frames(batch)) => {
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
    /// The transaction being collected from its frames.
    text: BytesMut,
    /// The last transaction's nextlsn, and the logical messages since: the ids of those.
    after: Lsn,
    unackable: u32,
    /// Each piece's acknowledgement, in publish order; the last piece of a
    /// transaction resolves to its nextlsn.
    inflight: FuturesOrdered<AckFuture>,
}

impl Publisher {
    async fn take(&mut self, batch: Vec<OutFrame>) -> Result<(), String> {
        for frame in batch {
            self.text.extend_from_slice(&frame.payload);
            if matches!(frame.fragment, Fragment::Whole | Fragment::Last) {
                let text = self.text.split().freeze();
                let nextlsn = frame.nextlsn.filter(|_| frame.kind.is_ack_point());
                self.publish(text, nextlsn).await?;
            }
        }
        Ok(())
    }

    async fn publish(&mut self, text: Bytes, nextlsn: Option<Lsn>) -> Result<(), String> {
        let pieces = split(text, self.sink.piece_bytes);
        let n = u32::try_from(pieces.len()).map_err(|_| "a transaction of too many pieces".to_owned())?;
        let (after, unackable) = (self.after, self.unackable);
        match nextlsn {
            Some(lsn) => (self.after, self.unackable) = (lsn, 0),
            None => self.unackable += 1,
        }
        let stored = self.already_stored(nextlsn, n);
        for (i, piece) in (1..=n).zip(pieces) {
            let meta = Meta { nextlsn, piece: i, pieces: n };
            let ack = if meta.is_last() { nextlsn } else { None };
            if i <= stored {
                if ack.is_some() {
                    self.inflight.push_back(Box::pin(std::future::ready(Ok(ack))));
                }
                continue;
            }
            let publish = PublishMessage::build()
                .payload(piece)
                .headers(meta.headers())
                .message_id(meta.message_id(after, unackable));
            let future = self
                .sink
                .js
                .send_publish(self.sink.subject.clone(), publish)
                .await
                .map_err(|e| format!("cannot publish to JetStream: {e}"))?;
            self.inflight.push_back(Box::pin(async move {
                future.await.map(|_| ack).map_err(|e| format!("JetStream did not acknowledge a publish: {e}"))
            }));
        }
        Ok(())
    }

    /// How many leading pieces of this message the stream holds already: the slot may
    /// resume behind what was published (it is confirmed after JetStream's ack).
    fn already_stored(&mut self, nextlsn: Option<Lsn>, n: u32) -> u32 {
        let Some(resume) = self.sink.resume else { return 0 };
        match nextlsn {
            // A logical message before the last stored transaction.
            None => n,
            Some(lsn) if lsn < resume.nextlsn => n,
            Some(lsn) => {
                self.sink.resume = None;
                if lsn == resume.nextlsn { resume.piece.min(n) } else { 0 }
            }
        }
    }
}
