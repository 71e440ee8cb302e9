//! The websocket side of a stream: a writer and a reader, each a small loop.
//!
//! The writer sends the pump's frames in order (a transaction as one message in many
//! frames), error messages for bad client input, and pings. It writes into the
//! socket's buffer and flushes when no frame is waiting, so a burst costs one syscall
//! per buffer, not per change. The reader takes acks, checks them against what the
//! writer has delivered and passes them to the pump. Either side, or the pump, can end
//! the stream through [`Stop`]; the writer then tells the client why in a close frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::ack::{check_ack, parse_ack};
use super::frame::{Fragment, OutFrame};
use super::progress::Progress;
use super::pump::{Outgoing, truncate_reason};
use super::stop::{Stop, code};
use crate::http::upgrade::Socket;
use crate::types::Lsn;

#[derive(Debug, Clone)]
pub struct SocketSettings {
    /// How often we ping the client.
    pub ping_interval: Duration,
    /// A client that neither sends anything nor takes any data for this long is dead.
    pub dead_after: Duration,
}

/// State the writer and the reader share.
struct Shared {
    /// The highest `nextlsn` written to the socket.
    delivered: AtomicU64,
    /// Milliseconds since `epoch` of the last sign of life: a message from the client,
    /// or data the socket accepted.
    last_progress: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn progress(&self) {
        self.last_progress.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Runs the websocket until the stream stops. `start` is the slot's confirmed
/// position when streaming began: the floor for acks.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    socket: Socket,
    slot: String,
    start: Lsn,
    frames: mpsc::Receiver<Outgoing>,
    acks: mpsc::Sender<Lsn>,
    progress: Arc<Progress>,
    stop: Stop,
    settings: SocketSettings,
) {
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(start.0),
        last_progress: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let (sink, stream) = socket.split();
    let (errors_tx, errors_rx) = mpsc::channel::<String>(16);
    let writer = Writer { sink, shared: shared.clone(), stop: stop.clone(), in_message: false };
    let writer = writer.run(frames, errors_rx, settings.ping_interval);
    let reader =
        read_loop(stream, slot.clone(), start, acks, errors_tx, progress, stop.clone(), shared, settings.dead_after);
    tokio::join!(writer, reader);
    tracing::info!(slot = %slot, reason = %stop.reason().1, "websocket closed");
}

struct Writer {
    sink: SplitSink<Socket, Message>,
    shared: Arc<Shared>,
    stop: Stop,
    /// A fragmented message is under way: no other data message may start until it ends.
    in_message: bool,
}

impl Writer {
    async fn run(
        mut self,
        mut frames: mpsc::Receiver<Outgoing>,
        mut errors: mpsc::Receiver<String>,
        ping_every: Duration,
    ) {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            // Flush once nothing more is ready to go (a no-op when nothing is buffered).
            if frames.is_empty() && (self.in_message || errors.is_empty()) && self.sink.flush().await.is_err() {
                self.lost();
                break;
            }
            let in_message = self.in_message;
            let result = tokio::select! {
                biased;
                _ = self.stop.stopped() => break,
                // Error replies wait for the end of a fragmented message.
                Some(message) = errors.recv(), if !in_message => self.sink.feed(Message::Text(error_json(&message).into())).await,
                item = frames.recv() => match item {
                    Some(Outgoing::Frames(frames)) => self.send_frames(frames).await,
                    Some(Outgoing::Fatal(message)) => {
                        // Inside a fragmented message no other message may be sent: the
                        // close frame alone carries the reason then.
                        if !self.in_message {
                            let _ = self.sink.feed(Message::Text(error_json(&message).into())).await;
                        }
                        self.stop.stop(code::INTERNAL, truncate_reason(&message));
                        break;
                    }
                    None => break,
                },
                _ = ping.tick() => self.sink.feed(Message::Ping(Bytes::from_static(b"pgdeltastream"))).await,
            };
            if result.is_err() {
                self.lost();
                break;
            }
        }
        let (code, reason) = self.stop.reason();
        let close =
            Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: truncate_reason(&reason).into() }));
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.sink.send(close).await;
            let _ = self.sink.close().await;
        })
        .await;
    }

    fn lost(&self) {
        self.stop.stop(code::GOING_AWAY, "client connection lost");
    }

    async fn send_frames(&mut self, frames: Vec<OutFrame>) -> Result<(), WsError> {
        for frame in frames {
            self.send_frame(frame).await?;
            if self.stop.is_stopped() {
                break;
            }
        }
        Ok(())
    }

    async fn send_frame(&mut self, frame: OutFrame) -> Result<(), WsError> {
        let text = |payload: &Bytes| std::str::from_utf8(payload).is_ok();
        let message = match frame.fragment {
            Fragment::Whole => Utf8Bytes::try_from(frame.payload).ok().map(Message::Text),
            Fragment::First if text(&frame.payload) => {
                Some(Message::Frame(Frame::message(frame.payload, OpCode::Data(Data::Text), false)))
            }
            Fragment::Middle if text(&frame.payload) => {
                Some(Message::Frame(Frame::message(frame.payload, OpCode::Data(Data::Continue), false)))
            }
            Fragment::Last if text(&frame.payload) => {
                Some(Message::Frame(Frame::message(frame.payload, OpCode::Data(Data::Continue), true)))
            }
            _ => None,
        };
        let Some(message) = message else {
            // Only a non-UTF-8 database can produce this; say so, don't send garbage.
            self.stop.stop(
                code::INTERNAL,
                "the plugin produced text that is not UTF-8; pgdeltastream needs a UTF8 database",
            );
            return Ok(());
        };
        self.in_message = matches!(frame.fragment, Fragment::First | Fragment::Middle);
        self.sink.feed(message).await?;
        self.shared.progress();
        if let (Some(lsn), true) = (frame.nextlsn, frame.kind.is_ack_point()) {
            self.shared.delivered.fetch_max(lsn.0, Ordering::Release);
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut stream: SplitStream<Socket>,
    slot: String,
    start: Lsn,
    acks: mpsc::Sender<Lsn>,
    errors: mpsc::Sender<String>,
    progress: Arc<Progress>,
    stop: Stop,
    shared: Arc<Shared>,
    dead_after: Duration,
) {
    let mut last_ack = start;
    let check_every = (dead_after / 4).max(Duration::from_millis(50));
    loop {
        let message = tokio::select! {
            _ = stop.stopped() => break,
            m = tokio::time::timeout(check_every, stream.next()) => m,
        };
        let message = match message {
            Err(_) => {
                if shared.idle_for() > dead_after {
                    tracing::info!(slot = %slot, "client stopped answering pings");
                    stop.stop(code::GOING_AWAY, "no sign of life from the client");
                    break;
                }
                continue;
            }
            Ok(None) => {
                stop.stop(code::NORMAL, "client went away");
                break;
            }
            Ok(Some(Err(e))) => {
                let (c, reason) = match e {
                    WsError::Capacity(_) => (code::TOO_BIG, "message too big: acks are small JSON objects".to_owned()),
                    e => (code::GOING_AWAY, format!("client connection error: {e}")),
                };
                stop.stop(c, truncate_reason(&reason));
                break;
            }
            Ok(Some(Ok(m))) => m,
        };
        shared.progress();
        match message {
            Message::Text(text) => {
                let delivered = Lsn(shared.delivered.load(Ordering::Acquire));
                match parse_ack(text.as_str()).and_then(|lsn| check_ack(lsn, last_ack, delivered)) {
                    Ok(lsn) => {
                        last_ack = lsn;
                        progress.record_ack(lsn);
                        tracing::debug!(slot = %slot, lsn = %lsn, "ack");
                        if acks.send(lsn).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::info!(slot = %slot, error = %e, "refused client message");
                        if errors.try_send(e.to_string()).is_err() {
                            // The client floods us with bad input faster than we can answer.
                            tracing::debug!(slot = %slot, "dropped an error reply");
                        }
                    }
                }
            }
            Message::Binary(_) => {
                let _ = errors.try_send(
                    "binary frames are not accepted: send acks as text, e.g. {\"lsn\":\"0/170FCB0\"}".to_owned(),
                );
            }
            Message::Close(_) => {
                stop.stop(code::NORMAL, "client closed the connection");
                break;
            }
            // Pings are answered by the websocket library; pongs are a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

/// `{"error":"..."}`, the same shape as the HTTP API's errors.
pub fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}
