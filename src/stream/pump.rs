//! The pump: reads the replication stream, hands frames to the client side through a
//! bounded channel, and keeps the slot's confirmed position moving.
//!
//! Which position may we confirm? Everything the client acked, and more when nothing
//! is at stake: once the client has acked every transaction that carried changes,
//! later empty transactions and (on a keepalive) the whole WAL the walsender has read
//! so far hold nothing the client could lose. Confirming them keeps an idle slot from
//! retaining WAL forever. A non-transactional message can only be covered by a later
//! transaction's ack, so it blocks that shortcut until then.

use std::time::Duration;

use tokio::sync::mpsc;

use super::decode::PluginDecoder;
use super::frame::{Assembler, Format, FrameKind, Framer, OutFrame, SkipEmpty};
use super::stop::{Stop, code};
use crate::pg::error::PgError;
use crate::pg::frames::ServerFrame;
use crate::pg::replication::{Buffered, ReplicationStream, StreamEvent};
use crate::types::Lsn;

/// A batch ends at this many frames or bytes, whichever comes first: it bounds the
/// memory a batch holds while keeping per-frame overhead (channel sends, wake-ups) low.
const MAX_BATCH_FRAMES: usize = 256;
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Status updates that only report progress go out at most this often.
const STATUS_WINDOW: Duration = Duration::from_millis(10);

/// What the pump hands to the websocket side.
#[derive(Debug)]
pub enum Outgoing {
    /// Frames in stream order.
    Frames(Vec<OutFrame>),
    /// Postgres ended the stream with this message; the client gets it as an error
    /// frame and a close.
    Fatal(String),
    /// The source ended the stream for a reason of its own (e.g. a JetStream stream
    /// that no longer holds what comes next): an error frame, then a close with `code`.
    End { code: u16, message: String },
}

/// The positions the pump tracks, apart from the I/O so the rules can be tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Positions {
    /// The client's last accepted ack.
    pub acked: Lsn,
    /// The highest `nextlsn` read from the stream.
    pub read: Lsn,
    /// The highest `nextlsn` of a transaction with changes.
    pub must_ack: Lsn,
    /// A non-transactional message was read and no transaction has followed it yet.
    pub uncovered_message: bool,
    /// Part of a transaction was read, but not its end.
    pub in_transaction: bool,
    /// What we last reported to Postgres as flushed.
    pub confirmed: Lsn,
    /// The walsender's position from its last keepalive: everything before it has
    /// been sent to us.
    pub walsender_end: Lsn,
}

impl Positions {
    pub fn new(start: Lsn) -> Positions {
        Positions {
            acked: start,
            read: start,
            must_ack: start,
            uncovered_message: false,
            in_transaction: false,
            confirmed: start,
            walsender_end: start,
        }
    }

    /// Notes a frame read from the stream.
    pub fn on_frame(&mut self, frame: &OutFrame) {
        self.in_transaction = matches!(frame.kind, FrameKind::Inside | FrameKind::Begin);
        match (frame.kind, frame.nextlsn) {
            (FrameKind::Inside | FrameKind::Begin, _) => {}
            (FrameKind::Unackable, _) | (_, None) => self.uncovered_message = true,
            (kind, Some(lsn)) => {
                self.read = self.read.max(lsn);
                if kind.must_ack() || self.uncovered_message {
                    self.must_ack = self.must_ack.max(lsn);
                }
                self.uncovered_message = false;
            }
        }
    }

    /// True when the client has acked everything that matters.
    fn settled(&self) -> bool {
        !self.uncovered_message && !self.in_transaction && self.acked >= self.must_ack
    }

    /// The position that is safe to confirm now.
    pub fn safe(&self) -> Lsn {
        if self.settled() { self.read.max(self.walsender_end).max(self.acked) } else { self.acked }
    }
}

pub struct Pump {
    pub slot: String,
    pub stream: ReplicationStream,
    pub start: Lsn,
    pub out: mpsc::Sender<Outgoing>,
    pub acks: mpsc::Receiver<Lsn>,
    pub stop: Stop,
    pub status_interval: Duration,
    pub format: Format,
    /// The plugin's output as wal2json pieces.
    pub decoder: PluginDecoder,
    /// The size of the websocket frames a message is cut into.
    pub frame_bytes: usize,
    /// Leave out transactions with no change for the client (v2 sessions).
    pub skip_empty: bool,
    /// The options the stream was started with: a stream restarted past a transaction
    /// Postgres cannot decode starts with them again.
    pub options: Vec<(&'static str, String)>,
}

/// Whether Postgres failed because of what a transaction holds rather than a passing
/// state of the server: a value whose text form (or the change around it) is past its
/// 1 GB limit on an allocation or a string. Such a failure comes back at every restart
/// of the stream, at the same transaction.
pub fn undecodable(e: &PgError) -> bool {
    let PgError::Db(db) = e else { return false };
    // 54000 program_limit_exceeded: "out of memory" / "Cannot enlarge string buffer ...".
    db.code == "54000" || (db.code == "XX000" && db.message.starts_with("invalid memory alloc request size"))
}

/// Turns what the replication stream brings into frames, and tracks positions.
struct Decoder {
    slot: String,
    plugin: PluginDecoder,
    assembler: Assembler,
    framer: Framer,
    skip_empty: Option<SkipEmpty>,
    pos: Positions,
    /// Postgres asked for a status update.
    reply_requested: bool,
}

impl Decoder {
    /// Hands on the pieces the plugin's decoder holds, then takes `first` and whatever
    /// else is already buffered, up to a batch: one channel send and one wake-up for
    /// many frames. Frames still being filled stay in the framer; the batch may be
    /// empty. Pieces beyond a batch stay in the decoder for the next call.
    async fn read_burst(
        &mut self,
        first: Option<StreamEvent>,
        stream: &mut ReplicationStream,
    ) -> Result<Vec<OutFrame>, String> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut next = first;
        'burst: loop {
            while let Some(piece) = self.plugin.next_piece()? {
                bytes += piece.len();
                let piece = self.assembler.push(piece).map_err(|e| e.to_string())?;
                self.pos.on_frame(&piece);
                self.framer.push(piece, &mut batch);
                if batch.len() >= MAX_BATCH_FRAMES || bytes >= MAX_BATCH_BYTES {
                    break 'burst;
                }
            }
            // Whatever ends the stream is found again by the next `next()`.
            let event = match next.take() {
                Some(event) => event,
                None => match stream.try_next() {
                    Ok(Buffered::Event(event)) => event,
                    _ => break,
                },
            };
            match event {
                StreamEvent::Frame(ServerFrame::XLogData { wal_start, data, .. }) => {
                    self.plugin.feed(wal_start, data).await?;
                }
                StreamEvent::Frame(ServerFrame::Keepalive { wal_end, reply_requested, .. }) => {
                    self.pos.walsender_end = self.pos.walsender_end.max(wal_end);
                    self.reply_requested |= reply_requested;
                }
                StreamEvent::Notice(notice) => {
                    tracing::warn!(slot = %self.slot, severity = %notice.severity, notice = %notice, "Postgres notice in the stream");
                }
            }
        }
        // A transaction the decoder holds is under way as much as one whose pieces
        // went out: the walsender may have sent keepalives past its start.
        self.pos.in_transaction |= self.plugin.holds_transaction();
        Ok(self.skip_empty(batch))
    }

    fn skip_empty(&mut self, batch: Vec<OutFrame>) -> Vec<OutFrame> {
        match &mut self.skip_empty {
            Some(skip) => skip.filter(batch),
            None => batch,
        }
    }

    /// Postgres failed in the middle of a transaction: ends it with an error record
    /// (what of it went out stays, and the record says it is not whole). Returns the
    /// LSN past the transaction, from which the stream goes on, and the record's
    /// frames; None when no transaction is under way or where it ends is not known.
    fn cut(&mut self, error: &str) -> Option<(Lsn, Option<u32>, Vec<OutFrame>)> {
        let (nextlsn, xid) = match self.plugin.abandon_transaction() {
            Some(held) => held,
            None => (self.assembler.open_transaction()?, None),
        };
        let mut batch = Vec::new();
        for piece in self.assembler.error_record(nextlsn, xid, error) {
            self.pos.on_frame(&piece);
            self.framer.push(piece, &mut batch);
        }
        Some((nextlsn, xid, self.skip_empty(batch)))
    }
}

/// When to send standby status updates: at once when asked or on the timer, and for
/// progress at most once per [`STATUS_WINDOW`], so that a client acking 10,000
/// transactions a second does not cost the walsender 10,000 replies to process.
struct StatusTimer {
    last: tokio::time::Instant,
    due: Option<tokio::time::Instant>,
}

impl StatusTimer {
    /// Whether to report `safe` now; otherwise a report is scheduled if there is news.
    fn report_now(&mut self, asked: bool, safe: Lsn, confirmed: Lsn) -> bool {
        let now = tokio::time::Instant::now();
        if asked || (safe > confirmed && now >= self.last + STATUS_WINDOW) {
            self.last = now;
            self.due = None;
            return true;
        }
        if safe > confirmed && self.due.is_none() {
            self.due = Some(self.last + STATUS_WINDOW);
        }
        false
    }

    async fn wait_due(&self) {
        match self.due {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

impl Pump {
    /// Runs until the client goes, the stream is stopped, or Postgres ends it. Always
    /// leaves the slot free: a final status update, CopyDone, then the connection closes.
    pub async fn run(self) {
        let Pump {
            slot,
            mut stream,
            start,
            out,
            mut acks,
            stop,
            status_interval,
            format,
            decoder: plugin,
            frame_bytes,
            skip_empty,
            options,
        } = self;
        let mut decoder = Decoder {
            slot: slot.clone(),
            plugin,
            assembler: Assembler::new(format),
            framer: Framer::new(frame_bytes),
            skip_empty: skip_empty.then(SkipEmpty::default),
            pos: Positions::new(start),
            reply_requested: false,
        };
        let mut pending: Option<Outgoing> = None;
        let mut skipped_to = start;
        let mut ticker = tokio::time::interval(status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = StatusTimer { last: tokio::time::Instant::now() - STATUS_WINDOW, due: None };
        let fatal = loop {
            let mut asked = false;
            tokio::select! {
                biased;
                _ = stop.stopped() => break None,
                ack = acks.recv() => match ack {
                    Some(lsn) => decoder.pos.acked = decoder.pos.acked.max(lsn),
                    None => break None, // the reader is gone: the client left
                },
                _ = ticker.tick() => asked = true,
                _ = status.wait_due() => asked = true,
                permit = out.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        if let Some(item) = pending.take() {
                            permit.send(item);
                        }
                    }
                    Err(_) => break None,
                },
                // A committed transaction still being handed out comes before more
                // of the stream.
                _ = std::future::ready(()), if pending.is_none() && decoder.plugin.has_output() => {
                    match decoder.read_burst(None, &mut stream).await {
                        Ok(batch) if batch.is_empty() => {}
                        Ok(batch) => pending = Some(Outgoing::Frames(batch)),
                        Err(message) => break Some(message),
                    }
                }
                event = stream.next(), if pending.is_none() && !decoder.plugin.has_output() => match event {
                    Ok(Some(event)) => match decoder.read_burst(Some(event), &mut stream).await {
                        Ok(batch) if batch.is_empty() => {}
                        Ok(batch) => pending = Some(Outgoing::Frames(batch)),
                        Err(message) => break Some(message),
                    },
                    Ok(None) => break Some("Postgres ended the replication stream".into()),
                    Err(e) if undecodable(&e) => match decoder.cut(&e.to_string()) {
                        // Each skip must get further, or the same failure would loop.
                        Some((nextlsn, xid, frames)) if nextlsn > skipped_to => {
                            skipped_to = nextlsn;
                            tracing::warn!(
                                slot = %slot, %nextlsn, xid, error = %e,
                                "Postgres cannot decode a transaction: the client is sent an error record for it, \
                                 and the stream goes on after it"
                            );
                            // The walsender is back in command mode: stream again from
                            // past the transaction (Postgres skips what committed before).
                            if let Err(e) = stream.restart(&slot, nextlsn, &options).await {
                                break Some(format!("replication stream failed: {e}"));
                            }
                            pending = Some(Outgoing::Frames(frames));
                        }
                        _ => break Some(format!("replication stream failed: {e}")),
                    },
                    Err(e) => break Some(format!("replication stream failed: {e}")),
                },
            }
            asked |= std::mem::take(&mut decoder.reply_requested);
            let pos = &mut decoder.pos;
            if status.report_now(asked, pos.safe(), pos.confirmed) {
                pos.confirmed = pos.confirmed.max(pos.safe());
                if let Err(e) = stream.send_status(pos.confirmed, false).await {
                    break Some(format!("replication stream failed: {e}"));
                }
                tracing::trace!(slot = %slot, confirmed = %pos.confirmed, "status update");
            }
        };

        // Acks the reader accepted before the end still count.
        while let Ok(lsn) = acks.try_recv() {
            decoder.pos.acked = decoder.pos.acked.max(lsn);
        }
        match fatal {
            // The writer stops the stream once it has told the client.
            Some(message) => report_fatal(&slot, message, &out, &stop).await,
            None => {
                finish(&slot, stream, &decoder.pos).await;
                stop.stop(code::NORMAL, "stream ended");
            }
        }
    }
}

/// Postgres ended the stream (or sent what we cannot forward): the writer sends the
/// reason after the frames before it, then closes. A client too slow to take it within
/// a few seconds is just closed. The connection is broken: nothing more to tell Postgres.
async fn report_fatal(slot: &str, message: String, out: &mpsc::Sender<Outgoing>, stop: &Stop) {
    tracing::warn!(slot = %slot, error = %message, "stream ended by Postgres");
    let sent = tokio::time::timeout(Duration::from_secs(5), out.send(Outgoing::Fatal(message.clone()))).await;
    if !matches!(sent, Ok(Ok(()))) {
        stop.stop(code::INTERNAL, truncate_reason(&message));
    }
}

/// A last status update, CopyDone, and a polite close: the slot is free at once.
async fn finish(slot: &str, mut stream: ReplicationStream, pos: &Positions) {
    let confirmed = pos.confirmed.max(pos.safe());
    let finish = async {
        stream.send_status(confirmed, false).await?;
        let conn = stream.stop().await?;
        conn.close().await;
        Ok::<_, crate::pg::PgError>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), finish).await {
        Ok(Ok(())) => tracing::debug!(slot = %slot, confirmed = %confirmed, "stream stopped"),
        Ok(Err(e)) => tracing::warn!(slot = %slot, error = %e, "error while stopping the stream"),
        Err(_) => tracing::warn!(slot = %slot, "timed out stopping the stream; connection dropped"),
    }
}

/// A close reason must fit in a control frame (123 bytes).
pub fn truncate_reason(s: &str) -> String {
    if s.len() <= 123 {
        return s.to_owned();
    }
    let mut end = 120;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(kind: FrameKind, lsn: Option<u64>) -> OutFrame {
        OutFrame {
            payload: Bytes::new(),
            fragment: crate::stream::frame::Fragment::Whole,
            nextlsn: lsn.map(Lsn),
            kind,
            changes: 0,
        }
    }

    #[test]
    fn idle_slot_follows_the_walsender() {
        let mut p = Positions::new(Lsn(100));
        p.walsender_end = Lsn(500);
        assert_eq!(p.safe(), Lsn(500));
    }

    #[test]
    fn unacked_changes_hold_the_slot() {
        let mut p = Positions::new(Lsn(100));
        p.on_frame(&frame(FrameKind::Data, Some(200)));
        p.walsender_end = Lsn(500);
        assert_eq!(p.safe(), Lsn(100));
        p.acked = Lsn(200);
        assert_eq!(p.safe(), Lsn(500));
    }

    #[test]
    fn empty_transactions_after_acked_changes_are_free() {
        let mut p = Positions::new(Lsn(100));
        p.on_frame(&frame(FrameKind::Data, Some(200)));
        p.on_frame(&frame(FrameKind::Empty, Some(300)));
        assert_eq!(p.safe(), Lsn(100));
        p.acked = Lsn(200);
        assert_eq!(p.safe(), Lsn(300));
    }

    #[test]
    fn a_message_needs_a_later_ack() {
        let mut p = Positions::new(Lsn(100));
        p.on_frame(&frame(FrameKind::Unackable, None));
        p.walsender_end = Lsn(250);
        assert_eq!(p.safe(), Lsn(100));
        p.on_frame(&frame(FrameKind::Empty, Some(300)));
        assert_eq!(p.safe(), Lsn(100), "the empty transaction's ack is what covers the message");
        p.acked = Lsn(300);
        p.walsender_end = Lsn(400);
        assert_eq!(p.safe(), Lsn(400));
    }

    #[test]
    fn a_transaction_under_way_holds_the_slot() {
        let mut p = Positions::new(Lsn(100));
        p.on_frame(&frame(FrameKind::Inside, None));
        p.walsender_end = Lsn(500);
        assert_eq!(p.safe(), Lsn(100), "the walsender may be in the middle of it");
        p.on_frame(&frame(FrameKind::Data, Some(600)));
        p.acked = Lsn(600);
        p.walsender_end = Lsn(700);
        assert_eq!(p.safe(), Lsn(700));
    }

    #[test]
    fn reasons_fit_a_control_frame() {
        assert_eq!(truncate_reason("short"), "short");
        let long = "é".repeat(100);
        let r = truncate_reason(&long);
        assert!(r.len() <= 123 && r.ends_with("..."));
    }
}
