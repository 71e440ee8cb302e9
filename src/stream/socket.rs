//! The websocket side of a stream: a writer and a reader, each a small loop.
//!
//! The writer cuts the source's messages into frames of `frame_bytes` ([`Framer`]) and
//! sends them in order (a transaction as one message in many frames), error messages
//! for bad client input, and pings. It writes into the socket's buffer and flushes when
//! nothing is waiting, so a burst costs one syscall per buffer, not per change. The
//! reader takes acks, checks them against what the writer has delivered and passes
//! them to the pump. Either side, or the pump, can end
//! the stream through [`Stop`]; the writer then tells the client why in a close frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::ack::{check_ack, parse_ack};
use super::framer::{Fragment, Framer, WsFrame};
use super::message::Part;
use super::progress::{Closer, Progress};
use super::pump::truncate_reason;
use super::sink::{Link, Outgoing, Sink};
use super::stop::{Stop, code};
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

/// A websocket client as the sink of a stream.
pub struct WebSocket<S> {
    socket: WebSocketStream<S>,
    settings: SocketSettings,
    /// The size of the frames a message is cut into (`--frame-size`).
    frame_bytes: usize,
}

impl<S> WebSocket<S> {
    pub fn new(socket: WebSocketStream<S>, settings: SocketSettings, frame_bytes: usize) -> Self {
        WebSocket { socket, settings, frame_bytes }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Sink for WebSocket<S> {
    async fn run(self, link: Link) {
        serve(self, link).await
    }
}

/// Runs the websocket until the stream stops.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(websocket: WebSocket<S>, link: Link) {
    let WebSocket { socket, settings, frame_bytes } = websocket;
    let Link { slot, start, messages, acks, progress, stop } = link;
    let _client = progress.connected();
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(start.0),
        last_progress: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let (sink, stream) = socket.split();
    let (errors_tx, errors_rx) = mpsc::channel::<String>(16);
    let writer = Writer {
        sink,
        framer: Framer::new(frame_bytes),
        frames: Vec::new(),
        shared: shared.clone(),
        progress: progress.clone(),
        stop: stop.clone(),
        in_message: false,
    };
    let writer = writer.run(messages, errors_rx, settings.ping_interval);
    let reader = Reader {
        stream,
        slot: slot.clone(),
        last_ack: start,
        acks,
        errors: errors_tx,
        progress: progress.clone(),
        stop: stop.clone(),
        shared,
        dead_after: settings.dead_after,
    };
    let ((), client_close) = tokio::join!(writer, reader.run());
    match client_close {
        Some((code, reason)) => {
            tracing::info!(slot = %slot, code, reason = %reason, "websocket closed by the client");
            progress.record_close(Closer::Client, code, &reason);
        }
        None => {
            let (code, reason) = stop.reason();
            tracing::info!(slot = %slot, code, reason = %reason, "websocket closed");
            progress.record_close(Closer::Server, code, &reason);
        }
    }
}

struct Writer<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    /// Cuts messages into frames; holds the frame being filled between batches.
    framer: Framer,
    /// The frames the framer has completed and not sent yet (kept for its allocation).
    frames: Vec<WsFrame>,
    shared: Arc<Shared>,
    progress: Arc<Progress>,
    stop: Stop,
    /// A fragmented message is under way: no other data message may start until it ends.
    in_message: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<S> {
    async fn run(
        mut self,
        mut messages: mpsc::Receiver<Outgoing>,
        mut errors: mpsc::Receiver<String>,
        ping_every: Duration,
    ) {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        loop {
            // Flush once nothing more is ready to go (a no-op when nothing is buffered).
            if messages.is_empty() && (self.in_message || errors.is_empty()) && self.io(Io::Flush).await.is_err() {
                break;
            }
            let in_message = self.in_message;
            let result = tokio::select! {
                biased;
                _ = self.stop.stopped() => break,
                // Error replies wait for the end of a fragmented message.
                Some(message) = errors.recv(), if !in_message => self.io(Io::Feed(Message::Text(error_json(&message).into()))).await,
                item = messages.recv() => match item {
                    Some(Outgoing::Parts(parts)) => self.send_parts(parts).await,
                    Some(Outgoing::Fatal(message)) => {
                        self.end(code::INTERNAL, &message).await;
                        break;
                    }
                    Some(Outgoing::End { code, message }) => {
                        self.end(code, &message).await;
                        break;
                    }
                    None => break,
                },
                _ = ping.tick() => self.io(Io::Feed(Message::Ping(Bytes::from_static(b"pgdeltastream")))).await,
            };
            if result.is_err() {
                break;
            }
        }
        let (code, reason) = self.stop.reason();
        // An expired token is the client's to fix: say so in a message too, as a fatal
        // error is said (a fragmented message under way leaves the close frame alone).
        let tell = (code == code::POLICY && !self.in_message).then(|| Message::Text(error_json(&reason).into()));
        let close =
            Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: truncate_reason(&reason).into() }));
        // A client that stopped reading may never take the close frame: don't wait for it.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if let Some(message) = tell {
                let _ = self.sink.send(message).await;
            }
            let _ = self.sink.send(close).await;
            let _ = self.sink.close().await;
        })
        .await;
    }

    /// Tells the client why the stream ends and stops it with `code`. Inside a
    /// fragmented message no other message may be sent: the close frame alone carries
    /// the reason then.
    async fn end(&mut self, code: u16, message: &str) {
        if !self.in_message {
            let _ = self.io(Io::Feed(Message::Text(error_json(message).into()))).await;
        }
        self.stop.stop(code, truncate_reason(message));
    }

    /// One write to the socket, given up as soon as the stream is stopped: a client that
    /// stops reading fills the socket, and the write would otherwise wait for it forever
    /// while the session's slot stays taken.
    async fn io(&mut self, io: Io) -> Result<(), ()> {
        let write = async {
            match io {
                Io::Feed(message) => self.sink.feed(message).await,
                Io::Flush => self.sink.flush().await,
            }
        };
        let result = tokio::select! {
            biased;
            _ = self.stop.stopped() => return Err(()),
            result = write => result,
        };
        result.map_err(|e| {
            tracing::debug!(error = %e, "websocket write failed");
            self.stop.stop(code::GOING_AWAY, "client connection lost");
        })
    }

    /// Frames the parts and sends each frame as soon as it is complete; a frame still
    /// being filled waits in the framer for the next batch.
    async fn send_parts(&mut self, parts: Vec<Part>) -> Result<(), ()> {
        let mut frames = std::mem::take(&mut self.frames);
        let mut sent = Ok(());
        for part in parts {
            self.framer.push(part, &mut frames);
            for frame in frames.drain(..) {
                sent = self.send_frame(frame).await;
                if sent.is_err() {
                    break;
                }
            }
            if sent.is_err() {
                break;
            }
        }
        frames.clear();
        self.frames = frames;
        sent
    }

    /// Sends one frame of a text message. Its bytes are UTF-8: the decoders checked
    /// every body, and the framer cuts only between characters.
    async fn send_frame(&mut self, frame: WsFrame) -> Result<(), ()> {
        let (opcode, fin) = match frame.fragment {
            Fragment::Whole => (Data::Text, true),
            Fragment::First => (Data::Text, false),
            Fragment::Middle => (Data::Continue, false),
            Fragment::Last => (Data::Continue, true),
        };
        self.in_message = !fin;
        self.progress.record_sent(frame.payload.len(), frame.end.as_ref());
        self.io(Io::Feed(Message::Frame(Frame::message(frame.payload, OpCode::Data(opcode), fin)))).await?;
        self.shared.progress();
        if let Some(lsn) = frame.end.and_then(|end| end.ack_point()) {
            self.shared.delivered.fetch_max(lsn.0, Ordering::Release);
        }
        Ok(())
    }
}

enum Io {
    Feed(Message),
    Flush,
}

/// How long the close frame may take to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The client's side: acks in, signs of life, and how the client ends the stream.
struct Reader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    slot: String,
    last_ack: Lsn,
    acks: mpsc::Sender<Lsn>,
    errors: mpsc::Sender<String>,
    progress: Arc<Progress>,
    stop: Stop,
    shared: Arc<Shared>,
    dead_after: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<S> {
    /// Reads until the stream stops. Returns the client's close code and reason when
    /// the client ended it with a close frame.
    async fn run(mut self) -> Option<(u16, String)> {
        let check_every = (self.dead_after / 4).max(Duration::from_millis(50));
        loop {
            let message = tokio::select! {
                _ = self.stop.stopped() => return None,
                m = tokio::time::timeout(check_every, self.stream.next()) => m,
            };
            let message = match message {
                Err(_) if self.shared.idle_for() > self.dead_after => {
                    tracing::info!(slot = %self.slot, "client stopped answering pings");
                    self.stop.stop(code::GOING_AWAY, "no sign of life from the client");
                    return None;
                }
                Err(_) => continue,
                Ok(None) => {
                    self.stop.stop(code::NORMAL, "client went away");
                    return None;
                }
                Ok(Some(Err(e))) => {
                    let (c, reason) = refusal(e);
                    self.stop.stop(c, truncate_reason(&reason));
                    return None;
                }
                Ok(Some(Ok(m))) => m,
            };
            self.shared.progress();
            match message {
                Message::Text(text) => {
                    if !self.on_text(text.as_str()).await {
                        return None;
                    }
                }
                Message::Binary(_) => self.reply(
                    "binary frames are not accepted: send acks as text, e.g. {\"lsn\":\"0/170FCB0\"}".to_owned(),
                ),
                Message::Close(frame) => {
                    let (c, reason) =
                        frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    // Answer with the client's code where one may be sent back.
                    let answer = if matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999) { c } else { code::NORMAL };
                    self.stop.stop(answer, "client closed the connection");
                    return Some((c, reason));
                }
                // Pings are answered by the websocket library; pongs are a sign of life.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Checks and forwards an ack; false when the pump is gone.
    async fn on_text(&mut self, text: &str) -> bool {
        let delivered = Lsn(self.shared.delivered.load(Ordering::Acquire));
        match parse_ack(text).and_then(|lsn| check_ack(lsn, self.last_ack, delivered)) {
            Ok(lsn) => {
                self.last_ack = lsn;
                self.progress.record_ack(lsn);
                tracing::debug!(slot = %self.slot, lsn = %lsn, "ack");
                self.acks.send(lsn).await.is_ok()
            }
            Err(e) => {
                tracing::info!(slot = %self.slot, error = %e, "refused client message");
                self.reply(e.to_string());
                true
            }
        }
    }

    fn reply(&self, error: String) {
        if self.errors.try_send(error).is_err() {
            // The client floods us with bad input faster than we can answer.
            tracing::debug!(slot = %self.slot, "dropped an error reply");
        }
    }
}

/// The close code and reason for what the client sent that we cannot take
/// (RFC 6455 section 7.4.1).
fn refusal(e: WsError) -> (u16, String) {
    match e {
        WsError::Capacity(_) => (code::TOO_BIG, "message too big: acks are small JSON objects".to_owned()),
        WsError::Utf8(e) => (code::INVALID_DATA, format!("a text message that is not UTF-8: {e}")),
        WsError::Protocol(e) => (code::PROTOCOL_ERROR, format!("websocket protocol error: {e}")),
        e => (code::GOING_AWAY, format!("client connection error: {e}")),
    }
}

/// `{"error":"..."}`, the same shape as the HTTP API's errors.
pub(crate) fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}
