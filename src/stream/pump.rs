//! The pump: reads the replication stream, hands the decoder's messages to the sink
//! through a bounded channel, and keeps the slot's confirmed position moving. A payload
//! the decoder cannot take for a passing reason ([`StreamError::Transient`]) is fed
//! again after a pause, while acks and status updates go on; only a fatal error, or a
//! passing one that does not pass, ends the stream.
//!
//! Which position may we confirm? Everything the client acked, and more when nothing
//! is at stake: once the client has acked every transaction that carried changes,
//! later empty transactions and (on a keepalive) the whole WAL the walsender has read
//! so far hold nothing the client could lose. Confirming them keeps an idle slot from
//! retaining WAL forever. A non-transactional message can only be covered by a later
//! transaction's ack, so it blocks that shortcut until then.

use std::time::Duration;

use tokio::sync::mpsc;

use super::decode::{Abandoned, PluginDecoder};
use super::error::StreamError;
use super::frame::SkipEmpty;
use super::marks::Marks;
use super::message::{Finish, MessageKind, Part};
use super::reconfigure::{self, Commands, Switched};
use super::sink::Outgoing;
use super::stop::{Stop, code};
use crate::pg::error::PgError;
use crate::pg::frames::ServerFrame;
use crate::pg::replication::{Buffered, ReplicationStream, StreamEvent};
use crate::types::Lsn;

/// A batch ends at this many bodies or bytes, whichever comes first: it bounds the
/// memory a batch holds while keeping per-part overhead (channel sends, wake-ups) low.
const MAX_BATCH_BODIES: usize = 256;
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Status updates that only report progress go out at most this often.
const STATUS_WINDOW: Duration = Duration::from_millis(10);

/// A payload the decoder could not take for a passing reason (a busy pool while it
/// looked up a type name) is fed again after a pause that doubles from the first to
/// the last, for this long in all; then the stream ends.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_LAST: Duration = Duration::from_secs(2);
const RETRY_FOR: Duration = Duration::from_secs(120);

/// The positions the pump tracks, apart from the I/O so the rules can be tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Positions {
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

    /// Notes a part read from the stream: a message that has started and not finished
    /// is part of a transaction under way.
    pub(crate) fn on_part(&mut self, part: &Part) {
        match part {
            Part::Start(_) => self.in_transaction = true,
            Part::Body(_) => {}
            Part::Finish(finish) => self.on_finish(finish),
        }
    }

    fn on_finish(&mut self, finish: &Finish) {
        self.in_transaction = matches!(finish.kind, MessageKind::Inside | MessageKind::Begin);
        match (finish.kind, finish.nextlsn) {
            (MessageKind::Inside | MessageKind::Begin, _) => {}
            (MessageKind::Unackable, _) | (_, None) => self.uncovered_message = true,
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

pub(crate) struct Pump {
    pub slot: String,
    pub stream: ReplicationStream,
    pub start: Lsn,
    pub out: mpsc::Sender<Outgoing>,
    pub acks: mpsc::Receiver<Lsn>,
    pub stop: Stop,
    pub status_interval: Duration,
    /// The plugin's output as messages.
    pub decoder: PluginDecoder,
    /// Our own logical messages met in the stream (a backfill's watermarks).
    pub marks: Marks,
    /// Leave out transactions with no change for the client (v2 sessions).
    pub skip_empty: bool,
    /// The options the stream was started with: a stream restarted past a transaction
    /// Postgres cannot decode starts with them again.
    pub options: Vec<(&'static str, String)>,
    /// Says what Postgres's error ending the stream meant, when the session can tell
    /// (the slot was invalidated): the client is told that instead.
    pub explain: Option<ExplainFatal>,
    /// Another filter to stream with, from the next transaction boundary on
    /// ([`super::reconfigure`]).
    pub commands: Commands,
}

/// Asked once the stream has failed: a better reason than Postgres's message, if any.
pub(crate) type ExplainFatal = std::sync::Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send>> + Send + Sync,
>;

/// Whether Postgres failed because of what a transaction holds rather than a passing
/// state of the server: a value whose text form (or the change around it) is past its
/// 1 GB limit on an allocation or a string. Such a failure comes back at every restart
/// of the stream, at the same transaction.
pub(crate) fn undecodable(e: &PgError) -> bool {
    let PgError::Db(db) = e else { return false };
    // 54000 program_limit_exceeded: "out of memory" / "Cannot enlarge string buffer ...".
    db.code == "54000" || (db.code == "XX000" && db.message.starts_with("invalid memory alloc request size"))
}

/// Turns what the replication stream brings into message parts, and tracks positions.
struct Decoder {
    slot: String,
    plugin: PluginDecoder,
    marks: Marks,
    skip_empty: Option<SkipEmpty>,
    pos: Positions,
    /// Postgres asked for a status update.
    reply_requested: bool,
    /// A payload to feed again: the stream is read no further until it is taken.
    retry: Option<Retry>,
    /// The highest XLogData start fed: a logical message's own position.
    fed_to: Lsn,
}

/// A payload the plugin's decoder could not take yet, and when to try again.
struct Retry {
    wal_start: Lsn,
    data: bytes::Bytes,
    at: tokio::time::Instant,
    pause: Duration,
    until: tokio::time::Instant,
}

impl Retry {
    fn first(wal_start: Lsn, data: bytes::Bytes) -> Retry {
        let now = tokio::time::Instant::now();
        Retry { wal_start, data, at: now + RETRY_FIRST, pause: RETRY_FIRST, until: now + RETRY_FOR }
    }

    /// The next try, or the error that ends the stream once tries are over.
    fn again(mut self, error: String) -> Result<Retry, String> {
        let now = tokio::time::Instant::now();
        if now >= self.until {
            return Err(format!("{error} (tried for {} s)", RETRY_FOR.as_secs()));
        }
        self.pause = (self.pause * 2).min(RETRY_LAST);
        self.at = now + self.pause;
        Ok(self)
    }
}

impl Decoder {
    /// Hands on the parts the plugin's decoder holds, then takes `first` and whatever
    /// else is already buffered, up to a batch: one channel send and one wake-up for
    /// many parts. The batch may be empty. Parts beyond a batch stay in the decoder for
    /// the next call. A payload the decoder cannot take for now is kept to be fed again
    /// ([`Decoder::retry`]); only a fatal error ends the stream.
    async fn read_burst(
        &mut self,
        first: Option<StreamEvent>,
        stream: &mut ReplicationStream,
    ) -> Result<Vec<Part>, String> {
        let mut batch = Vec::new();
        let (mut bodies, mut bytes) = (0, 0);
        let mut next = first;
        if let Some(retry) = self.retry.take() {
            self.feed(retry.wal_start, retry.data.clone(), Some(retry)).await?;
        }
        'burst: while self.retry.is_none() {
            while let Some(part) = self.plugin.next_part().map_err(|e| e.to_string())? {
                let from = batch.len();
                self.marks.push(part, &mut batch);
                for part in &batch[from..] {
                    if let Some(body) = part.body() {
                        (bodies, bytes) = (bodies + 1, bytes + body.len());
                    }
                    self.pos.on_part(part);
                }
                if bodies >= MAX_BATCH_BODIES || bytes >= MAX_BATCH_BYTES {
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
                    self.feed(wal_start, data, None).await?;
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
        // A transaction the decoder holds is under way as much as one whose parts
        // went out: the walsender may have sent keepalives past its start.
        self.pos.in_transaction |= self.plugin.holds_transaction() || self.marks.holds() || self.retry.is_some();
        Ok(self.skip_empty(batch))
    }

    /// Feeds one payload (`retry`: the earlier tries of it). A transient failure keeps
    /// it for another try; a fatal one, or one that lasted too long, is the error.
    async fn feed(&mut self, wal_start: Lsn, data: bytes::Bytes, retry: Option<Retry>) -> Result<(), String> {
        self.fed_to = self.fed_to.max(wal_start);
        let kept = data.clone();
        match self.plugin.feed(wal_start, data).await {
            Ok(()) => {
                if retry.is_some() {
                    tracing::info!(slot = %self.slot, "the stream goes on after a passing failure");
                }
                Ok(())
            }
            Err(StreamError::Transient(error)) => {
                let retry = match retry {
                    Some(retry) => retry.again(error)?,
                    None => {
                        tracing::warn!(slot = %self.slot, %error, "a passing failure: trying again shortly");
                        Retry::first(wal_start, kept)
                    }
                };
                self.retry = Some(retry);
                Ok(())
            }
            Err(StreamError::Fatal(error)) => Err(error),
        }
    }

    /// When the payload kept for another try is due (never, when none is).
    async fn retry_due(&self) {
        match &self.retry {
            Some(retry) => tokio::time::sleep_until(retry.at).await,
            None => std::future::pending().await,
        }
    }

    /// Between transactions, with nothing held: the stream may start again here.
    fn at_boundary(&self) -> bool {
        !self.pos.in_transaction
            && self.retry.is_none()
            && !self.plugin.has_output()
            && !self.plugin.holds_transaction()
    }

    /// Where a stream switched at a boundary starts: past everything read, and past
    /// what the walsender said it had read (which confirming may already cover).
    fn switch_point(&self) -> Lsn {
        self.pos.read.max(self.fed_to).max(self.pos.walsender_end)
    }

    fn skip_empty(&mut self, batch: Vec<Part>) -> Vec<Part> {
        match &mut self.skip_empty {
            Some(skip) => skip.filter(batch),
            None => batch,
        }
    }

    /// Postgres failed in the middle of a transaction: ends it with an error record
    /// (what of it went out stays, and the record says it is not whole). Returns where
    /// the transaction ends, from which the stream goes on, with the record's parts;
    /// None when no transaction is under way or where it ends is not known.
    fn cut(&mut self, error: &str) -> Option<Abandoned> {
        let mut abandoned = self.plugin.abandon_transaction(error)?;
        let mut held = Vec::new();
        self.marks.flush(&mut held);
        held.append(&mut abandoned.record);
        abandoned.record = held;
        for part in &abandoned.record {
            self.pos.on_part(part);
        }
        abandoned.record = self.skip_empty(std::mem::take(&mut abandoned.record));
        Some(abandoned)
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
            decoder: plugin,
            marks,
            skip_empty,
            mut options,
            explain,
            mut commands,
        } = self;
        let mut decoder = Decoder {
            slot: slot.clone(),
            plugin,
            marks,
            skip_empty: skip_empty.then(SkipEmpty::default),
            pos: Positions::new(start),
            reply_requested: false,
            retry: None,
            fed_to: start,
        };
        let mut pending: Option<Outgoing> = None;
        let mut skipped_to = start;
        let mut ticker = tokio::time::interval(status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status = StatusTimer { last: tokio::time::Instant::now() - STATUS_WINDOW, due: None };
        let fatal = loop {
            let mut asked = false;
            // The stream is read only when nothing waits: not a batch for the sink, nor
            // parts in the decoder, nor a payload to feed again.
            let idle = pending.is_none() && decoder.retry.is_none();
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
                _ = decoder.retry_due(), if pending.is_none() && decoder.retry.is_some() => {
                    if let Some(message) = hand_on(&mut pending, decoder.read_burst(None, &mut stream).await) {
                        break Some(message);
                    }
                }
                // Taken only between transactions, before more of the stream is read.
                command = reconfigure::next(&mut commands), if decoder.at_boundary() => match command {
                    Some(command) => {
                        let at = decoder.switch_point();
                        if let Err(e) = stream.switch(command.connection, &slot, at, &command.options).await {
                            let _ = command.done.send(Err(e.to_string()));
                            break Some(format!("replication stream failed: {e}"));
                        }
                        tracing::info!(slot = %slot, %at, "stream switched to the session's new filter");
                        (decoder.plugin, options) = (command.decoder, command.options);
                        decoder.marks.refilter(command.app_messages, command.ddl);
                        let _ = command.done.send(Ok(Switched { at, walsender: stream.backend_pid() }));
                    }
                    None => commands = None,
                },
                // A committed transaction still being handed out comes before more
                // of the stream.
                _ = std::future::ready(()), if idle && decoder.plugin.has_output() => {
                    if let Some(message) = hand_on(&mut pending, decoder.read_burst(None, &mut stream).await) {
                        break Some(message);
                    }
                }
                event = stream.next(), if idle && !decoder.plugin.has_output() => match event {
                    Ok(Some(event)) => {
                        if let Some(message) = hand_on(&mut pending, decoder.read_burst(Some(event), &mut stream).await) {
                            break Some(message);
                        }
                    }
                    Ok(None) => break Some("Postgres ended the replication stream".into()),
                    Err(e) if undecodable(&e) => match decoder.cut(&e.to_string()) {
                        // Each skip must get further, or the same failure would loop.
                        Some(Abandoned { nextlsn, xid, record }) if nextlsn > skipped_to => {
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
                            pending = Some(Outgoing::Parts(record));
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
            Some(message) => {
                let message = match explain {
                    Some(explain) => match tokio::time::timeout(Duration::from_secs(2), explain()).await {
                        Ok(Some(better)) => format!("{better} ({message})"),
                        _ => message,
                    },
                    None => message,
                };
                report_fatal(&slot, message, &out, &stop).await
            }
            None => {
                finish(&slot, stream, &decoder.pos).await;
                stop.stop(code::NORMAL, "stream ended");
            }
        }
    }
}

/// Keeps a burst's batch to hand on (an empty one is nothing); the error that ends the
/// stream, if the burst ended in one.
fn hand_on(pending: &mut Option<Outgoing>, burst: Result<Vec<Part>, String>) -> Option<String> {
    match burst {
        Ok(batch) if batch.is_empty() => None,
        Ok(batch) => {
            *pending = Some(Outgoing::Parts(batch));
            None
        }
        Err(message) => Some(message),
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
pub(crate) fn truncate_reason(s: &str) -> String {
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
    use crate::stream::message::Start;
    use bytes::Bytes;

    /// A message of one body that finishes as `kind`, read in one go.
    fn message(p: &mut Positions, kind: MessageKind, lsn: Option<u64>) {
        let finish = Finish { nextlsn: lsn.map(Lsn), kind, changes: 0 };
        for part in Part::whole(Start { nextlsn: finish.ack_point() }, Bytes::new(), finish) {
            p.on_part(&part);
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
        message(&mut p, MessageKind::Data, Some(200));
        p.walsender_end = Lsn(500);
        assert_eq!(p.safe(), Lsn(100));
        p.acked = Lsn(200);
        assert_eq!(p.safe(), Lsn(500));
    }

    #[test]
    fn empty_transactions_after_acked_changes_are_free() {
        let mut p = Positions::new(Lsn(100));
        message(&mut p, MessageKind::Data, Some(200));
        message(&mut p, MessageKind::Empty, Some(300));
        assert_eq!(p.safe(), Lsn(100));
        p.acked = Lsn(200);
        assert_eq!(p.safe(), Lsn(300));
    }

    #[test]
    fn a_message_needs_a_later_ack() {
        let mut p = Positions::new(Lsn(100));
        message(&mut p, MessageKind::Unackable, None);
        p.walsender_end = Lsn(250);
        assert_eq!(p.safe(), Lsn(100));
        message(&mut p, MessageKind::Empty, Some(300));
        assert_eq!(p.safe(), Lsn(100), "the empty transaction's ack is what covers the message");
        p.acked = Lsn(300);
        p.walsender_end = Lsn(400);
        assert_eq!(p.safe(), Lsn(400));
    }

    #[test]
    fn a_transaction_under_way_holds_the_slot() {
        let mut p = Positions::new(Lsn(100));
        p.on_part(&Part::Start(Start { nextlsn: Some(Lsn(600)) }));
        p.on_part(&Part::Body(Bytes::from_static(b"{\"nextlsn\":\"0/258\",\"change\":[")));
        p.walsender_end = Lsn(500);
        assert_eq!(p.safe(), Lsn(100), "the walsender may be in the middle of it");
        p.on_part(&Part::Body(Bytes::from_static(b"]}")));
        p.on_part(&Part::Finish(Finish { nextlsn: Some(Lsn(600)), kind: MessageKind::Data, changes: 1 }));
        assert_eq!(p.safe(), Lsn(100), "the client has not acked it");
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
