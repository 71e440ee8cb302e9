//! wal2json's bytes as [`Part`]s of messages, forwarded without re-serialising.
//!
//! The bytes are forwarded as they are (no parse, no re-serialisation). The
//! [`Assembler`] only looks at the head of each piece to know where it belongs:
//!
//! - [`Format::Transactions`] (the v1 API): wal2json format-version 1 with
//!   `write-in-chunks`, so Postgres sends a transaction as a head
//!   `{"nextlsn":"X/Y","change":[`, one piece per change, and a tail `]}`. The client
//!   still sees one websocket *message* per transaction, sent as many frames, so
//!   neither Postgres, nor we, nor the socket ever hold a whole transaction.
//! - [`Format::Changes`] (opt-in): wal2json format-version 2, one message per
//!   begin / change / commit record.
//!
//! It also repairs the one shape wal2json 2.5 gets wrong: a non-transactional logical
//! message printed as `{"change":[,{...}]}`. How a message is cut for the wire is the
//! sink's business ([`super::framer`] for a websocket).

use bytes::{BufMut, Bytes, BytesMut};

use super::binary_message;
use super::message::{Finish, MessageKind, Part, Start};
use crate::types::Lsn;

/// The frame sizes live with the websocket's framer; named here too, where the
/// settings have always found them.
pub use super::framer::DEFAULT_FRAME_BYTES;

/// The stream formats a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One message per transaction, wal2json format-version 1 (the original's).
    #[default]
    Transactions,
    /// One message per begin, change and commit, wal2json format-version 2.
    Changes,
}

/// Plugin output that is not UTF-8 and not a logical message: only a database whose
/// encoding is not UTF8 produces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the output plugin produced text that is not UTF-8; pgdeltastream needs a UTF8 database")]
pub struct NotUtf8;

/// Every body that goes on is UTF-8 (a websocket text message must be): a logical
/// message with binary content is mended ([`binary_message`]); anything else that is
/// not UTF-8 is refused.
pub(crate) fn utf8(data: Bytes) -> Result<Bytes, NotUtf8> {
    match std::str::from_utf8(&data) {
        Ok(_) => Ok(data),
        Err(_) => binary_message::repair(&data).ok_or(NotUtf8),
    }
}

/// Tracks where in a transaction the stream is.
#[derive(Debug, Default)]
pub struct Assembler {
    format: Format,
    in_transaction: bool,
    changes: u32,
    nextlsn: Option<Lsn>,
}

const BROKEN_MESSAGE_HEAD: &[u8] = b"{\"change\":[,";
const NEXTLSN_KEY: &[u8] = b"\"nextlsn\":\"";
const CHUNKED_HEAD_END: &[u8] = b"\"change\":[";
const CHUNKED_TAIL: &[u8] = b"]}";
const V2_ACTION: &[u8] = b"{\"action\":\"";

impl Assembler {
    pub fn new(format: Format) -> Assembler {
        Assembler { format, ..Assembler::default() }
    }

    /// Classifies one piece of plugin output (one XLogData payload) and appends the
    /// parts it makes to `out`: a body, with a start before it when it begins a message
    /// and a finish after it when it ends one.
    pub fn push(&mut self, data: Bytes, out: &mut impl Extend<Part>) -> Result<(), NotUtf8> {
        let data = utf8(data)?;
        match self.format {
            Format::Transactions => self.push_v1(data, out),
            Format::Changes => self.push_v2(data, out),
        }
        Ok(())
    }

    fn push_v1(&mut self, data: Bytes, out: &mut impl Extend<Part>) {
        if self.in_transaction {
            if data[..] == *CHUNKED_TAIL {
                self.in_transaction = false;
                let kind = if self.changes > 0 { MessageKind::Data } else { MessageKind::Empty };
                let finish = Finish { nextlsn: self.nextlsn.take(), kind, changes: self.changes };
                out.extend([Part::Body(data), Part::Finish(finish)]);
                return;
            }
            self.changes = self.changes.saturating_add(1);
            out.extend([Part::Body(data)]);
            return;
        }
        if data.starts_with(b"{") && data.ends_with(CHUNKED_HEAD_END) && !data.starts_with(BROKEN_MESSAGE_HEAD) {
            self.in_transaction = true;
            self.changes = 0;
            self.nextlsn = find_nextlsn(&data);
            out.extend([Part::Start(Start { nextlsn: self.nextlsn }), Part::Body(data)]);
            return;
        }
        // A whole message: a transaction printed without chunks, or a
        // non-transactional logical message.
        out.extend(prepare_v1(data));
    }

    fn push_v2(&mut self, data: Bytes, out: &mut impl Extend<Part>) {
        let action = if data.starts_with(V2_ACTION) { data.get(V2_ACTION.len()).copied() } else { None };
        let finish = |nextlsn, kind, changes| Finish { nextlsn, kind, changes };
        let (start, finish) = match action {
            Some(b'B') => {
                self.in_transaction = true;
                self.changes = 0;
                self.nextlsn = find_nextlsn(&data);
                // B carries the transaction's end LSN too, but acking it before the
                // changes arrive would skip them: only C's counts.
                (None, finish(None, MessageKind::Begin, 0))
            }
            Some(b'C') => {
                self.in_transaction = false;
                self.nextlsn = None;
                let kind = if self.changes > 0 { MessageKind::Data } else { MessageKind::Empty };
                let nextlsn = find_nextlsn(&data);
                (nextlsn, finish(nextlsn, kind, self.changes))
            }
            Some(b'M') if !self.in_transaction => (None, finish(None, MessageKind::Unackable, 0)),
            _ => {
                self.changes = self.changes.saturating_add(1);
                (None, finish(None, MessageKind::Inside, 0))
            }
        };
        out.extend(Part::whole(Start { nextlsn: start }, data, finish));
    }

    /// The end LSN of the transaction whose pieces are under way, when one is and its
    /// head named it.
    pub(crate) fn open_transaction(&self) -> Option<Lsn> {
        if self.in_transaction { self.nextlsn } else { None }
    }

    /// The error record that ends the transaction under way, or, when none is, a whole
    /// one ([`error_record`]).
    pub(crate) fn error_record(&mut self, nextlsn: Lsn, xid: Option<u32>, error: &str) -> Vec<Part> {
        let open = std::mem::take(&mut self.in_transaction);
        let changes = std::mem::take(&mut self.changes);
        self.nextlsn = None;
        error_record(self.format, Failure { open, changes, nextlsn, xid, error })
    }
}

/// A transaction Postgres failed to decode, as [`error_record`] reports it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Failure<'a> {
    /// Part of the transaction went out already: its message is under way.
    pub open: bool,
    /// The changes of it that went out.
    pub changes: u32,
    /// Where it ends.
    pub nextlsn: Lsn,
    pub xid: Option<u32>,
    pub error: &'a str,
}

/// The error record of a transaction Postgres failed to decode. Format 1: the
/// transaction's message, `{"xid":..,"nextlsn":..,"change":[..],"error":".."}`, whose
/// `change` holds the changes already sent (a head that went out has no `xid`); format
/// 2: a commit record with `"error"`, after a begin record when none went out. The last
/// message is [`MessageKind::Failed`].
pub(crate) fn error_record(format: Format, failure: Failure<'_>) -> Vec<Part> {
    let Failure { open, changes, nextlsn, xid, error } = failure;
    let error = serde_json::Value::from(error).to_string();
    let xid = xid.map(|x| format!("\"xid\":{x},")).unwrap_or_default();
    let finish = Part::Finish(Finish { nextlsn: Some(nextlsn), kind: MessageKind::Failed, changes });
    let start = || Part::Start(Start { nextlsn: Some(nextlsn) });
    let body = |text: String| Part::Body(Bytes::from(text));
    match (format, open) {
        (Format::Transactions, true) => vec![body(format!("],\"error\":{error}}}")), finish],
        (Format::Transactions, false) => {
            vec![start(), body(format!("{{{xid}\"nextlsn\":\"{nextlsn}\",\"change\":[],\"error\":{error}}}")), finish]
        }
        (Format::Changes, open) => {
            let mut parts = Vec::new();
            if !open {
                let begin = Finish { nextlsn: None, kind: MessageKind::Begin, changes: 0 };
                let text = format!("{{\"action\":\"B\",{xid}\"nextlsn\":\"{nextlsn}\"}}");
                parts.extend(Part::whole(Start::default(), Bytes::from(text), begin));
            }
            let text = format!("{{\"action\":\"C\",{xid}\"nextlsn\":\"{nextlsn}\",\"error\":{error}}}");
            parts.extend([start(), body(text), finish]);
            parts
        }
    }
}

/// Leaves out transactions with no change for the client. A session's filter makes
/// every other transaction of the database one (wal2json still prints its begin and
/// commit), and a client that asked for one table should not be sent all of them. The
/// slot moves past them all the same: the pump has read them.
///
/// Whether a message is an empty transaction is known at its finish, so its first
/// parts are held until then; an empty one is a head and a tail at most, so a message
/// with a third body goes on at once, and what is held stays small.
#[derive(Debug, Default)]
pub(crate) struct SkipEmpty {
    /// A begin record (format 2), whole, held until it is known whether a change follows.
    begin: Vec<Part>,
    /// The parts of the message under way, while it may still be empty.
    held: Vec<Part>,
    /// The message under way has more than an empty one's bodies: it goes on as it comes.
    passing: bool,
    /// A non-transactional message went out and no ack point has followed it: only a
    /// later transaction's `nextlsn` can cover it, so the next one goes out even if it is
    /// empty, or the slot could not move past the message until a change came.
    uncovered: bool,
}

/// The bodies of the largest message that may be an empty transaction: a head and a tail.
const EMPTY_BODIES: usize = 2;

impl SkipEmpty {
    pub fn filter(&mut self, parts: Vec<Part>) -> Vec<Part> {
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            match part {
                Part::Finish(finish) => self.finish(finish, &mut out),
                part if self.passing => out.push(part),
                part => {
                    self.held.push(part);
                    if self.held.iter().filter(|p| p.body().is_some()).count() > EMPTY_BODIES {
                        self.passing = true;
                        out.append(&mut self.begin);
                        out.append(&mut self.held);
                    }
                }
            }
        }
        out
    }

    fn finish(&mut self, finish: Finish, out: &mut Vec<Part>) {
        let passed = std::mem::take(&mut self.passing);
        match finish.kind {
            MessageKind::Begin if !passed => {
                out.append(&mut self.begin);
                self.held.push(Part::Finish(finish));
                self.begin = std::mem::take(&mut self.held);
            }
            MessageKind::Empty if !passed && !self.uncovered => {
                self.begin.clear();
                self.held.clear();
            }
            kind => {
                match kind {
                    MessageKind::Unackable => self.uncovered = true,
                    k if k.is_ack_point() => self.uncovered = false,
                    _ => {}
                }
                out.append(&mut self.begin);
                out.append(&mut self.held);
                out.push(Part::Finish(finish));
            }
        }
    }
}

/// Prepares one whole wal2json v1 message (one transaction, or one non-transactional
/// logical message).
pub(crate) fn prepare_v1(data: Bytes) -> [Part; 3] {
    let payload = if data.starts_with(BROKEN_MESSAGE_HEAD) {
        let mut fixed = BytesMut::with_capacity(data.len() - 1);
        fixed.put_slice(&data[..BROKEN_MESSAGE_HEAD.len() - 1]);
        fixed.put_slice(&data[BROKEN_MESSAGE_HEAD.len()..]);
        fixed.freeze()
    } else {
        data
    };
    let nextlsn = find_nextlsn(&payload);
    let kind = match nextlsn {
        None => MessageKind::Unackable,
        Some(_) if payload.ends_with(b"\"change\":[]}") => MessageKind::Empty,
        Some(_) => MessageKind::Data,
    };
    // Without chunks the changes are not counted (we always ask for chunks): that
    // would mean parsing the message.
    Part::whole(Start { nextlsn }, payload, Finish { nextlsn, kind, changes: 0 })
}

/// The top-level `"nextlsn":"X/Y"`, which wal2json prints before `"change"` (after
/// `xid` at most), so only the head of the message is searched.
pub(crate) fn find_nextlsn(payload: &[u8]) -> Option<Lsn> {
    let head = &payload[..payload.len().min(128)];
    let change_at = find(head, b"\"change\"").unwrap_or(head.len());
    let at = find(&head[..change_at], NEXTLSN_KEY)? + NEXTLSN_KEY.len();
    let rest = &head[at..];
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn push(a: &mut Assembler, raw: &'static str) -> Vec<Part> {
        let mut out = Vec::new();
        a.push(b(raw), &mut out).unwrap();
        out
    }

    fn finish(parts: &[Part]) -> Option<Finish> {
        parts.iter().find_map(|p| match p {
            Part::Finish(f) => Some(*f),
            _ => None,
        })
    }

    /// The messages in `parts`, each its bodies joined, with how it finished.
    fn messages(parts: &[Part]) -> Vec<(String, Finish)> {
        let mut out = Vec::new();
        let mut text = Vec::new();
        for part in parts {
            match part {
                Part::Start(_) => text.clear(),
                Part::Body(bytes) => text.extend_from_slice(bytes),
                Part::Finish(f) => out.push((String::from_utf8(std::mem::take(&mut text)).unwrap(), *f)),
            }
        }
        out
    }

    #[test]
    fn transaction_is_forwarded_untouched() {
        let raw = b(
            r#"{"nextlsn":"0/170FCB0","change":[{"kind":"insert","schema":"public","table":"t","columnnames":["a"],"columntypes":["integer"],"columnvalues":[1]}]}"#,
        );
        let [start, body, Part::Finish(f)] = prepare_v1(raw.clone()) else { panic!("a finish") };
        assert_eq!(body.body().unwrap().as_ptr(), raw.as_ptr(), "no copy");
        assert_eq!(start, Part::Start(Start { nextlsn: Some(Lsn(0x170_FCB0)) }));
        assert_eq!((f.nextlsn, f.kind), (Some(Lsn(0x170_FCB0)), MessageKind::Data));
    }

    #[test]
    fn empty_transaction() {
        let f = finish(&prepare_v1(b(r#"{"xid":7,"nextlsn":"1/A","change":[]}"#))).unwrap();
        assert_eq!((f.nextlsn, f.kind), (Some(Lsn(0x1_0000_000A)), MessageKind::Empty));
    }

    #[test]
    fn repairs_non_transactional_message() {
        let parts =
            prepare_v1(b(r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#));
        let (text, f) = messages(&parts).remove(0);
        assert_eq!(text, r#"{"change":[{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#);
        assert_eq!((f.nextlsn, f.kind), (None, MessageKind::Unackable));
        assert_eq!(parts[0], Part::Start(Start { nextlsn: None }));
    }

    #[test]
    fn nextlsn_inside_values_is_not_taken() {
        let parts = prepare_v1(b(r#"{"change":[{"kind":"insert","columnvalues":["\"nextlsn\":\"0/1\""]}]}"#));
        assert_eq!(finish(&parts).unwrap().nextlsn, None);
    }

    /// Real chunked output of wal2json 2.5 (pg_logical_slot_peek_changes with
    /// write-in-chunks): a transaction, a non-transactional message, an empty one.
    #[test]
    fn assembles_chunked_transactions() {
        let mut a = Assembler::new(Format::Transactions);
        let pieces = [
            r#"{"nextlsn":"0/15D0DB0","change":["#,
            r#"{"kind":"insert","schema":"public","table":"c","columnnames":["id"],"columntypes":["integer"],"columnvalues":[1]}"#,
            r#",{"kind":"insert","schema":"public","table":"c","columnnames":["id"],"columntypes":["integer"],"columnvalues":[2]}"#,
            "]}",
            r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"nontx"}]}"#,
            r#"{"nextlsn":"0/15D0F08","change":["#,
            "]}",
        ];
        let mut parts = Vec::new();
        let mut shapes = Vec::new();
        for raw in pieces {
            let out = push(&mut a, raw);
            let shape: String = out
                .iter()
                .map(|p| match p {
                    Part::Start(_) => 'S',
                    Part::Body(_) => 'B',
                    Part::Finish(_) => 'F',
                })
                .collect();
            shapes.push(shape);
            parts.extend(out);
        }
        assert_eq!(shapes, ["SB", "B", "B", "BF", "SBF", "SB", "BF"]);
        assert_eq!(parts[0], Part::Start(Start { nextlsn: Some(Lsn(0x15D_0DB0)) }));
        let ends: Vec<_> = messages(&parts).iter().map(|(_, f)| (f.nextlsn, f.kind, f.changes)).collect();
        assert_eq!(
            ends,
            [
                (Some(Lsn(0x15D_0DB0)), MessageKind::Data, 2),
                (None, MessageKind::Unackable, 0),
                (Some(Lsn(0x15D_0F08)), MessageKind::Empty, 0),
            ]
        );
        for (text, _) in messages(&parts) {
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn classifies_v2_records() {
        let mut a = Assembler::new(Format::Changes);
        let records = [
            (r#"{"action":"B","lsn":"0/1","nextlsn":"0/9"}"#, None, MessageKind::Begin, 0),
            (r#"{"action":"I","lsn":"0/2","schema":"public","table":"t","columns":[]}"#, None, MessageKind::Inside, 0),
            (r#"{"action":"C","lsn":"0/8","nextlsn":"0/9"}"#, Some(Lsn(9)), MessageKind::Data, 1),
            (
                r#"{"action":"M","lsn":"0/A","transactional":false,"prefix":"p","content":"c"}"#,
                None,
                MessageKind::Unackable,
                0,
            ),
            (r#"{"action":"B","lsn":"0/B","nextlsn":"0/C"}"#, None, MessageKind::Begin, 0),
            (r#"{"action":"C","lsn":"0/B","nextlsn":"0/C"}"#, Some(Lsn(12)), MessageKind::Empty, 0),
        ];
        for (raw, nextlsn, kind, changes) in records {
            let parts = push(&mut a, raw);
            assert_eq!(messages(&parts), [(raw.to_owned(), Finish { nextlsn, kind, changes })], "{raw}");
            assert_eq!(parts[0], Part::Start(Start { nextlsn }), "the start names what the finish acks");
        }
    }

    #[test]
    fn empty_transactions_are_left_out_in_both_formats() {
        let mut a = Assembler::new(Format::Changes);
        let mut skip = SkipEmpty::default();
        let records = [
            r#"{"action":"B","lsn":"0/1","nextlsn":"0/2"}"#,
            r#"{"action":"C","lsn":"0/1","nextlsn":"0/2"}"#,
            r#"{"action":"B","lsn":"0/3","nextlsn":"0/4"}"#,
            r#"{"action":"I","lsn":"0/3","schema":"public","table":"t","columns":[]}"#,
            r#"{"action":"C","lsn":"0/3","nextlsn":"0/4"}"#,
        ];
        let mut kept = Vec::new();
        for r in records {
            // One record at a time: a held begin waits across batches.
            kept.extend(skip.filter(push(&mut a, r)));
        }
        let kept: Vec<_> = messages(&kept).into_iter().map(|(text, _)| text).collect();
        assert_eq!(kept, &records[2..]);

        let mut a = Assembler::new(Format::Transactions);
        let mut skip = SkipEmpty::default();
        let mut kept = Vec::new();
        for p in [r#"{"nextlsn":"0/2","change":["#, "]}", r#"{"nextlsn":"0/4","change":["#, "{}", "]}"] {
            // Piece by piece: the head of a message waits across batches.
            kept.extend(skip.filter(push(&mut a, p)));
        }
        let kept = messages(&kept);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, r#"{"nextlsn":"0/4","change":[{}]}"#);
    }

    #[test]
    fn a_large_transaction_is_not_held_back() {
        let mut a = Assembler::new(Format::Transactions);
        let mut skip = SkipEmpty::default();
        let head = skip.filter(push(&mut a, r#"{"nextlsn":"0/4","change":["#));
        assert!(head.is_empty(), "held: it may be empty");
        assert!(skip.filter(push(&mut a, "{}")).is_empty(), "held: a head and a body may still be a whole empty one");
        let third = skip.filter(push(&mut a, ",{}"));
        assert_eq!(third.len(), 4, "start, head and both changes go on: {third:?}");
        assert_eq!(skip.filter(push(&mut a, ",{}")).len(), 1, "then each part as it comes");
        let end = skip.filter(push(&mut a, "]}"));
        assert_eq!(finish(&end).map(|f| f.changes), Some(3));
    }

    #[test]
    fn an_empty_transaction_after_a_lone_message_is_kept_to_be_acked() {
        let mut a = Assembler::new(Format::Transactions);
        let mut parts = Vec::new();
        let pieces = [
            r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#,
            r#"{"nextlsn":"0/2","change":["#,
            "]}",
            r#"{"nextlsn":"0/4","change":["#,
            "]}",
        ];
        for p in pieces {
            parts.extend(push(&mut a, p));
        }
        let kept = SkipEmpty::default().filter(parts);
        let nextlsns: Vec<_> = messages(&kept).iter().map(|(_, f)| f.nextlsn).collect();
        assert_eq!(nextlsns, [None, Some(Lsn(2))], "the message, then the transaction that covers it; no more");
    }

    #[test]
    fn error_records() {
        let error = "invalid memory alloc request size 1080000003";
        let end = Some(Lsn(0x1F9_FCA8));
        let failed = |changes| Finish { nextlsn: end, kind: MessageKind::Failed, changes };
        // Nothing of the transaction went out (pgoutput holds it until its commit).
        let mut a = Assembler::new(Format::Transactions);
        let parts = a.error_record(Lsn(0x1F9_FCA8), Some(745), error);
        assert_eq!(parts[0], Part::Start(Start { nextlsn: end }));
        assert_eq!(
            messages(&parts),
            [(
                r#"{"xid":745,"nextlsn":"0/1F9FCA8","change":[],"error":"invalid memory alloc request size 1080000003"}"#
                    .to_owned(),
                failed(0)
            )]
        );
        let mut a = Assembler::new(Format::Changes);
        assert_eq!(
            messages(&a.error_record(Lsn(0x1F9_FCA8), Some(745), error)),
            [
                (
                    r#"{"action":"B","xid":745,"nextlsn":"0/1F9FCA8"}"#.to_owned(),
                    Finish { nextlsn: None, kind: MessageKind::Begin, changes: 0 }
                ),
                (
                    r#"{"action":"C","xid":745,"nextlsn":"0/1F9FCA8","error":"invalid memory alloc request size 1080000003"}"#
                        .to_owned(),
                    failed(0)
                ),
            ]
        );
        // wal2json: the head and a change went out; the record ends that message.
        let mut a = Assembler::new(Format::Transactions);
        let mut parts = push(&mut a, r#"{"nextlsn":"0/1F9FCA8","change":["#);
        parts.extend(push(&mut a, r#"{"kind":"insert"}"#));
        assert_eq!(a.open_transaction(), end);
        parts.extend(a.error_record(a.open_transaction().unwrap(), None, "x\"y"));
        assert_eq!(
            messages(&parts),
            [(r#"{"nextlsn":"0/1F9FCA8","change":[{"kind":"insert"}],"error":"x\"y"}"#.to_owned(), failed(1))]
        );
        assert_eq!(a.open_transaction(), None);
        let mut a = Assembler::new(Format::Changes);
        push(&mut a, r#"{"action":"B","lsn":"0/1","nextlsn":"0/1F9FCA8"}"#);
        assert_eq!(a.open_transaction(), end);
        assert_eq!(
            messages(&a.error_record(Lsn(0x1F9_FCA8), None, "e")),
            [(r#"{"action":"C","nextlsn":"0/1F9FCA8","error":"e"}"#.to_owned(), failed(0))]
        );
    }

    proptest! {
        #[test]
        fn never_panics(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            for format in [Format::Transactions, Format::Changes] {
                let mut a = Assembler::new(format);
                let mut out = Vec::new();
                for p in &pieces {
                    let _ = a.push(Bytes::from(p.clone()), &mut out);
                }
            }
        }
    }
}
