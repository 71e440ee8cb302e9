//! One subscription per session in a gateway, shared by its clients: the hub tails the
//! stream and keeps the latest messages in memory; a client whose next message is
//! there reads it from the hub, one that is further behind (or falls behind what the
//! hub keeps) reads from a consumer of its own until it has caught up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use super::message::of_incarnation;
use super::unavailable;
use crate::error::Error;
use crate::stream::stop::Stop;

/// What the hub keeps, at most: the newest messages within both bounds.
const MAX_MESSAGES: usize = 100_000;
const MAX_BYTES: usize = 64 * 1024 * 1024;

/// A message of the stream, as the feeds need it.
pub struct Stored {
    pub seq: u64,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

impl Stored {
    pub(crate) fn from_message(message: jetstream::Message) -> Result<Stored, String> {
        let seq = message.info().map_err(|e| format!("a JetStream message without its metadata: {e}"))?.stream_sequence;
        let message = message.message;
        Ok(Stored { seq, headers: message.headers, payload: message.payload })
    }
}

pub(crate) struct Hub {
    /// The incarnation subscribed to: a message of another (the stream was deleted and
    /// made again under the subscription) closes the hub.
    slot: Option<String>,
    ring: Mutex<Ring>,
    arrived: Notify,
}

struct Ring {
    /// The sequence of `items[0]`; the items are consecutive.
    first: u64,
    items: VecDeque<Arc<Stored>>,
    bytes: usize,
    /// The subscription ended: clients read from consumers of their own.
    closed: bool,
}

impl Ring {
    fn next(&self) -> u64 {
        self.first + self.items.len() as u64
    }
}

impl Hub {
    /// Subscribes from the end of the stream; the hub's task runs in `tasks` (which the
    /// gateway waits for at shutdown).
    pub async fn start(
        stream: &jetstream::stream::Stream,
        subject: String,
        slot: Option<String>,
        shutdown: Stop,
        tasks: &TaskTracker,
    ) -> Result<Arc<Hub>, Error> {
        let next = stream.cached_info().state.last_sequence + 1;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject,
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: next },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("cannot subscribe to the stream", e))?;
        let messages = consumer.messages().await.map_err(|e| unavailable("cannot read from JetStream", e))?;
        let hub = Arc::new(Hub {
            slot,
            ring: Mutex::new(Ring { first: next, items: VecDeque::new(), bytes: 0, closed: false }),
            arrived: Notify::new(),
        });
        tasks.spawn(Arc::clone(&hub).run(messages, shutdown));
        Ok(hub)
    }

    async fn run(self: Arc<Self>, mut messages: pull::Ordered, shutdown: Stop) {
        loop {
            let message = tokio::select! {
                _ = shutdown.stopped() => break,
                m = messages.next() => m,
            };
            match message.map(|m| m.map_err(|e| e.to_string()).and_then(Stored::from_message)) {
                Some(Ok(stored)) if of_incarnation(stored.headers.as_ref(), self.slot.as_deref()) => self.push(stored),
                Some(Ok(_)) => {
                    tracing::warn!("the session's stream was made again: the shared subscription ends");
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the shared subscription failed; clients read on their own");
                    break;
                }
                None => break,
            }
        }
        self.with(|ring| ring.closed = true);
        self.arrived.notify_waiters();
    }

    fn with<R>(&self, f: impl FnOnce(&mut Ring) -> R) -> R {
        f(&mut self.ring.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, stored: Stored) {
        self.with(|ring| {
            if stored.seq < ring.next() {
                return;
            }
            // A hole (messages let go before the hub got them): what it kept before is
            // no longer followed by what comes next.
            if stored.seq > ring.next() {
                ring.items.clear();
                ring.bytes = 0;
                ring.first = stored.seq;
            }
            ring.bytes += stored.payload.len();
            ring.items.push_back(Arc::new(stored));
            while ring.items.len() > MAX_MESSAGES || ring.bytes > MAX_BYTES {
                if let Some(old) = ring.items.pop_front() {
                    ring.bytes -= old.payload.len();
                    ring.first += 1;
                }
            }
        });
        self.arrived.notify_waiters();
    }

    /// The incarnation it follows.
    pub fn slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.with(|ring| ring.closed)
    }

    /// Whether a client that needs `seq` next can read from the hub.
    pub fn covers(&self, seq: u64) -> bool {
        self.with(|ring| !ring.closed && ring.first <= seq && seq <= ring.next())
    }

    /// Message `seq` if the hub holds it now.
    pub fn get(&self, seq: u64) -> Option<Arc<Stored>> {
        self.with(|ring| seq.checked_sub(ring.first).and_then(|i| ring.items.get(i as usize).cloned()))
    }

    /// Waits for message `seq`; none when the hub no longer has it (or never will).
    pub(crate) async fn wait_for(&self, seq: u64) -> Option<Arc<Stored>> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let found = self.with(|ring| {
                if ring.closed || seq < ring.first {
                    return Err(());
                }
                Ok(seq.checked_sub(ring.first).and_then(|i| ring.items.get(i as usize).cloned()))
            });
            match found {
                Err(()) => return None,
                Ok(Some(stored)) => return Some(stored),
                Ok(None) => arrived.await,
            }
        }
    }
}
