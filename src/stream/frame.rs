//! From the plugin's bytes to what the client receives.
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
//! message printed as `{"change":[,{...}]}`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::binary_message;
use crate::types::Lsn;

/// The stream formats a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One message per transaction, wal2json format-version 1 (the original's).
    #[default]
    Transactions,
    /// One message per begin, change and commit, wal2json format-version 2.
    Changes,
}

/// What a frame means for acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// The end of a transaction with changes: the client must ack its `nextlsn`.
    Data,
    /// The end of a transaction with no changes (DDL only, TRUNCATE in v1, filtered):
    /// nothing to lose.
    Empty,
    /// A non-transactional logical message: no `nextlsn`, so no ack can cover it by
    /// itself; a later transaction's ack does.
    Unackable,
    /// A part of a transaction that is not its end: nothing to ack yet.
    Inside,
    /// The begin record of a transaction (format 2): like [`FrameKind::Inside`].
    Begin,
    /// The end of an error record: a transaction Postgres could not decode, skipped
    /// ([`Assembler::error_record`]). The client must ack its `nextlsn` like a
    /// transaction's.
    Failed,
}

impl FrameKind {
    /// Whether the frame ends something the client can ack (its `nextlsn` counts as
    /// delivered once it is sent).
    pub fn is_ack_point(self) -> bool {
        matches!(self, FrameKind::Data | FrameKind::Empty | FrameKind::Failed)
    }

    /// Whether the client must ack the frame's `nextlsn` before the slot moves past it.
    pub fn must_ack(self) -> bool {
        matches!(self, FrameKind::Data | FrameKind::Failed)
    }
}

/// Where a frame sits in its websocket message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A message on its own.
    Whole,
    /// The first frame of a message sent in pieces.
    First,
    Middle,
    /// The frame that completes the message.
    Last,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub payload: Bytes,
    pub fragment: Fragment,
    /// The transaction's end LSN, on the frame that ends it.
    pub nextlsn: Option<Lsn>,
    pub kind: FrameKind,
    /// On the frame that ends a transaction, how many changes it carried (counted for
    /// `/metrics`); 0 on every other frame.
    pub changes: u32,
}

/// Plugin output that is not UTF-8 and not a logical message: only a database whose
/// encoding is not UTF8 produces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the output plugin produced text that is not UTF-8; pgdeltastream needs a UTF8 database")]
pub struct NotUtf8;

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

    /// Classifies one piece of plugin output (one XLogData payload). Every piece that
    /// comes out is UTF-8: a logical message with binary content is mended
    /// ([`binary_message`]); anything else that is not UTF-8 is refused.
    pub fn push(&mut self, data: Bytes) -> Result<OutFrame, NotUtf8> {
        let data = match std::str::from_utf8(&data) {
            Ok(_) => data,
            Err(_) => binary_message::repair(&data).ok_or(NotUtf8)?,
        };
        Ok(match self.format {
            Format::Transactions => self.push_v1(data),
            Format::Changes => self.push_v2(data),
        })
    }

    fn push_v1(&mut self, data: Bytes) -> OutFrame {
        if self.in_transaction {
            if data[..] == *CHUNKED_TAIL {
                self.in_transaction = false;
                let kind = if self.changes > 0 { FrameKind::Data } else { FrameKind::Empty };
                let (nextlsn, changes) = (self.nextlsn.take(), self.changes);
                return OutFrame { payload: data, fragment: Fragment::Last, nextlsn, kind, changes };
            }
            self.changes = self.changes.saturating_add(1);
            return OutFrame {
                payload: data,
                fragment: Fragment::Middle,
                nextlsn: None,
                kind: FrameKind::Inside,
                changes: 0,
            };
        }
        if data.starts_with(b"{") && data.ends_with(CHUNKED_HEAD_END) && !data.starts_with(BROKEN_MESSAGE_HEAD) {
            self.in_transaction = true;
            self.changes = 0;
            self.nextlsn = find_nextlsn(&data);
            return OutFrame {
                payload: data,
                fragment: Fragment::First,
                nextlsn: None,
                kind: FrameKind::Inside,
                changes: 0,
            };
        }
        // A whole message: a transaction printed without chunks, or a
        // non-transactional logical message.
        prepare_v1(data)
    }

    fn push_v2(&mut self, data: Bytes) -> OutFrame {
        let action = if data.starts_with(V2_ACTION) { data.get(V2_ACTION.len()).copied() } else { None };
        let whole = |payload, nextlsn, kind| OutFrame { payload, fragment: Fragment::Whole, nextlsn, kind, changes: 0 };
        match action {
            Some(b'B') => {
                self.in_transaction = true;
                self.changes = 0;
                self.nextlsn = find_nextlsn(&data);
                // B carries the transaction's end LSN too, but acking it before the
                // changes arrive would skip them: only C's counts.
                whole(data, None, FrameKind::Begin)
            }
            Some(b'C') => {
                self.in_transaction = false;
                self.nextlsn = None;
                let kind = if self.changes > 0 { FrameKind::Data } else { FrameKind::Empty };
                let nextlsn = find_nextlsn(&data);
                OutFrame { changes: self.changes, ..whole(data, nextlsn, kind) }
            }
            Some(b'M') if !self.in_transaction => whole(data, None, FrameKind::Unackable),
            _ => {
                self.changes = self.changes.saturating_add(1);
                whole(data, None, FrameKind::Inside)
            }
        }
    }
}

impl Assembler {
    /// The end LSN of the transaction whose pieces are under way, when one is and its
    /// head named it.
    pub fn open_transaction(&self) -> Option<Lsn> {
        if self.in_transaction { self.nextlsn } else { None }
    }

    /// The error record of a transaction Postgres failed to decode, ending at `nextlsn`
    /// (`xid` when known): what ends the transaction under way, or, when none is, a
    /// whole one. Format 1: the transaction's message, `{"xid":..,"nextlsn":..,
    /// "change":[..],"error":".."}`, whose `change` holds the changes already sent (the
    /// head went out without `xid`); format 2: a commit record with `"error"`, after a
    /// begin record when none went out. The last frame is [`FrameKind::Failed`].
    pub fn error_record(&mut self, nextlsn: Lsn, xid: Option<u32>, error: &str) -> Vec<OutFrame> {
        let error = serde_json::Value::from(error).to_string();
        let xid = xid.map(|x| format!("\"xid\":{x},")).unwrap_or_default();
        let open = self.in_transaction;
        let changes = std::mem::take(&mut self.changes);
        self.in_transaction = false;
        self.nextlsn = None;
        let end = |payload: String, fragment| OutFrame {
            payload: Bytes::from(payload),
            fragment,
            nextlsn: Some(nextlsn),
            kind: FrameKind::Failed,
            changes,
        };
        match (self.format, open) {
            (Format::Transactions, true) => vec![end(format!("],\"error\":{error}}}"), Fragment::Last)],
            (Format::Transactions, false) => {
                vec![end(
                    format!("{{{xid}\"nextlsn\":\"{nextlsn}\",\"change\":[],\"error\":{error}}}"),
                    Fragment::Whole,
                )]
            }
            (Format::Changes, open) => {
                let mut frames = Vec::new();
                if !open {
                    frames.push(OutFrame {
                        payload: Bytes::from(format!("{{\"action\":\"B\",{xid}\"nextlsn\":\"{nextlsn}\"}}")),
                        fragment: Fragment::Whole,
                        nextlsn: None,
                        kind: FrameKind::Begin,
                        changes: 0,
                    });
                }
                frames.push(end(
                    format!("{{\"action\":\"C\",{xid}\"nextlsn\":\"{nextlsn}\",\"error\":{error}}}"),
                    Fragment::Whole,
                ));
                frames
            }
        }
    }
}

/// The default size of the frames a message is cut into.
pub const DEFAULT_FRAME_BYTES: usize = 256 * 1024;
/// The largest frame we send: some clients refuse larger ones.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Cuts the assembler's pieces into websocket frames sized by bytes.
///
/// Clients limit the number of *fragments* of a message (Python `websockets`: 4,096,
/// Node `ws`: 16,384), not only its size, so a frame per change would make any large
/// transaction undeliverable to them, and an undeliverable transaction comes back on
/// every reconnect. Frames of `frame_bytes` keep a 1 GB message under 4,096 frames,
/// while memory stays bounded by one frame. A message that fits goes out as one frame.
/// A piece is only ever cut at a UTF-8 character boundary, so every frame is valid text.
#[derive(Debug)]
pub struct Framer {
    frame_bytes: usize,
    buf: BytesMut,
    /// A frame of the current message has gone out already.
    started: bool,
}

impl Framer {
    pub fn new(frame_bytes: usize) -> Framer {
        let frame_bytes = frame_bytes.clamp(16, MAX_FRAME_BYTES);
        Framer { frame_bytes, buf: BytesMut::new(), started: false }
    }

    /// Takes one piece; appends the frames that are complete to `out`.
    pub fn push(&mut self, piece: OutFrame, out: &mut Vec<OutFrame>) {
        match piece.fragment {
            Fragment::Whole if piece.payload.len() <= self.frame_bytes && !self.started && self.buf.is_empty() => {
                out.push(piece)
            }
            Fragment::First | Fragment::Middle => self.append(piece.payload, out),
            Fragment::Whole | Fragment::Last => {
                self.append(piece.payload, out);
                let payload = self.buf.split().freeze();
                let fragment = if self.started { Fragment::Last } else { Fragment::Whole };
                self.started = false;
                out.push(OutFrame {
                    payload,
                    fragment,
                    nextlsn: piece.nextlsn,
                    kind: piece.kind,
                    changes: piece.changes,
                });
            }
        }
    }

    /// Adds bytes to the frame being filled, sending out each frame that fills up.
    /// Large pieces are cut into frames without being copied.
    fn append(&mut self, mut data: Bytes, out: &mut Vec<OutFrame>) {
        loop {
            let room = self.frame_bytes - self.buf.len();
            if data.len() <= room {
                self.buf.extend_from_slice(&data);
                return;
            }
            let mut cut = char_floor(&data, room);
            if cut == 0 && self.buf.is_empty() {
                cut = room; // not UTF-8 at all: any cut beats none
            }
            // With less room than the next character, the frame goes out as it is.
            let payload = if self.buf.is_empty() {
                data.split_to(cut)
            } else {
                self.buf.extend_from_slice(&data[..cut]);
                data.advance(cut);
                self.buf.split().freeze()
            };
            self.emit_inside(payload, out);
        }
    }

    fn emit_inside(&mut self, payload: Bytes, out: &mut Vec<OutFrame>) {
        let fragment = if self.started { Fragment::Middle } else { Fragment::First };
        self.started = true;
        out.push(OutFrame { payload, fragment, nextlsn: None, kind: FrameKind::Inside, changes: 0 });
    }
}

/// Leaves out transactions with no change for the client. A session's filter makes
/// every other transaction of the database one (wal2json still prints its begin and
/// commit), and a client that asked for one table should not be sent all of them. The
/// slot moves past them all the same: the pump has read them.
#[derive(Debug, Default)]
pub struct SkipEmpty {
    /// A begin record (format 2), held until it is known whether a change follows.
    begin: Option<OutFrame>,
    /// A non-transactional message went out and no ack point has followed it: only a
    /// later transaction's `nextlsn` can cover it, so the next one goes out even if it is
    /// empty, or the slot could not move past the message until a change came.
    uncovered: bool,
}

impl SkipEmpty {
    pub fn filter(&mut self, frames: Vec<OutFrame>) -> Vec<OutFrame> {
        let mut out = Vec::with_capacity(frames.len());
        for frame in frames {
            match (frame.kind, frame.fragment) {
                (FrameKind::Begin, _) => out.extend(self.begin.replace(frame)),
                (FrameKind::Empty, Fragment::Whole) if !self.uncovered => self.begin = None,
                (kind, _) => {
                    match kind {
                        FrameKind::Unackable => self.uncovered = true,
                        k if k.is_ack_point() => self.uncovered = false,
                        _ => {}
                    }
                    out.extend(self.begin.take());
                    out.push(frame);
                }
            }
        }
        out
    }
}

/// The largest cut at or before `n` that falls between two UTF-8 characters of `data`.
fn char_floor(data: &[u8], n: usize) -> usize {
    let mut n = n.min(data.len());
    // Continuation bytes are 0b10xx_xxxx; a character is at most 4 bytes.
    while n > 0 && data.get(n).is_some_and(|b| b & 0xC0 == 0x80) {
        n -= 1;
    }
    n
}

/// Prepares one whole wal2json v1 message (one transaction, or one non-transactional
/// logical message).
pub fn prepare_v1(data: Bytes) -> OutFrame {
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
        None => FrameKind::Unackable,
        Some(_) if payload.ends_with(b"\"change\":[]}") => FrameKind::Empty,
        Some(_) => FrameKind::Data,
    };
    // Without chunks the changes are not counted (we always ask for chunks): that
    // would mean parsing the message.
    OutFrame { payload, fragment: Fragment::Whole, nextlsn, kind, changes: 0 }
}

/// The top-level `"nextlsn":"X/Y"`, which wal2json prints before `"change"` (after
/// `xid` at most), so only the head of the message is searched.
pub fn find_nextlsn(payload: &[u8]) -> Option<Lsn> {
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

    #[test]
    fn transaction_is_forwarded_untouched() {
        let raw = b(
            r#"{"nextlsn":"0/170FCB0","change":[{"kind":"insert","schema":"public","table":"t","columnnames":["a"],"columntypes":["integer"],"columnvalues":[1]}]}"#,
        );
        let f = prepare_v1(raw.clone());
        assert_eq!(f.payload.as_ptr(), raw.as_ptr(), "no copy");
        assert_eq!(f.nextlsn, Some(Lsn(0x170_FCB0)));
        assert_eq!((f.kind, f.fragment), (FrameKind::Data, Fragment::Whole));
    }

    #[test]
    fn empty_transaction() {
        let f = prepare_v1(b(r#"{"xid":7,"nextlsn":"1/A","change":[]}"#));
        assert_eq!(f.nextlsn, Some(Lsn(0x1_0000_000A)));
        assert_eq!(f.kind, FrameKind::Empty);
    }

    #[test]
    fn repairs_non_transactional_message() {
        let f = prepare_v1(b(r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#));
        assert_eq!(
            &f.payload[..],
            br#"{"change":[{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#
        );
        assert_eq!((f.nextlsn, f.kind), (None, FrameKind::Unackable));
    }

    #[test]
    fn nextlsn_inside_values_is_not_taken() {
        let f = prepare_v1(b(r#"{"change":[{"kind":"insert","columnvalues":["\"nextlsn\":\"0/1\""]}]}"#));
        assert_eq!(f.nextlsn, None);
    }

    /// Real chunked output of wal2json 2.5 (pg_logical_slot_peek_changes with
    /// write-in-chunks): a transaction, a non-transactional message, an empty one.
    #[test]
    fn assembles_chunked_transactions() {
        let mut a = Assembler::new(Format::Transactions);
        let pieces = [
            (r#"{"nextlsn":"0/15D0DB0","change":["#, Fragment::First, None, FrameKind::Inside),
            (
                r#"{"kind":"insert","schema":"public","table":"c","columnnames":["id"],"columntypes":["integer"],"columnvalues":[1]}"#,
                Fragment::Middle,
                None,
                FrameKind::Inside,
            ),
            (
                r#",{"kind":"insert","schema":"public","table":"c","columnnames":["id"],"columntypes":["integer"],"columnvalues":[2]}"#,
                Fragment::Middle,
                None,
                FrameKind::Inside,
            ),
            ("]}", Fragment::Last, Some(Lsn(0x15D_0DB0)), FrameKind::Data),
            (
                r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"nontx"}]}"#,
                Fragment::Whole,
                None,
                FrameKind::Unackable,
            ),
            (r#"{"nextlsn":"0/15D0F08","change":["#, Fragment::First, None, FrameKind::Inside),
            ("]}", Fragment::Last, Some(Lsn(0x15D_0F08)), FrameKind::Empty),
        ];
        let mut message = Vec::new();
        for (raw, fragment, nextlsn, kind) in pieces {
            let f = a.push(b(raw)).unwrap();
            assert_eq!((f.fragment, f.nextlsn, f.kind), (fragment, nextlsn, kind), "{raw}");
            if f.fragment != Fragment::Whole {
                message.extend_from_slice(&f.payload);
            }
            if f.fragment == Fragment::Last {
                assert!(serde_json::from_slice::<serde_json::Value>(&message).is_ok());
                message.clear();
            }
        }
    }

    #[test]
    fn classifies_v2_records() {
        let mut a = Assembler::new(Format::Changes);
        let records = [
            (r#"{"action":"B","lsn":"0/1","nextlsn":"0/9"}"#, None, FrameKind::Begin),
            (r#"{"action":"I","lsn":"0/2","schema":"public","table":"t","columns":[]}"#, None, FrameKind::Inside),
            (r#"{"action":"C","lsn":"0/8","nextlsn":"0/9"}"#, Some(Lsn(9)), FrameKind::Data),
            (
                r#"{"action":"M","lsn":"0/A","transactional":false,"prefix":"p","content":"c"}"#,
                None,
                FrameKind::Unackable,
            ),
            (r#"{"action":"B","lsn":"0/B","nextlsn":"0/C"}"#, None, FrameKind::Begin),
            (r#"{"action":"C","lsn":"0/B","nextlsn":"0/C"}"#, Some(Lsn(12)), FrameKind::Empty),
        ];
        for (raw, nextlsn, kind) in records {
            let f = a.push(b(raw)).unwrap();
            assert_eq!((f.fragment, f.nextlsn, f.kind), (Fragment::Whole, nextlsn, kind), "{raw}");
        }
    }

    #[test]
    fn the_frame_that_ends_a_transaction_counts_its_changes() {
        let mut a = Assembler::new(Format::Transactions);
        let v1 = [r#"{"nextlsn":"0/1","change":["#, r#"{"kind":"insert"}"#, r#",{"kind":"delete"}"#, "]}"];
        let counts: Vec<u32> = v1
            .into_iter()
            .chain([r#"{"nextlsn":"0/2","change":["#, "]}"])
            .map(|raw| a.push(b(raw)).unwrap().changes)
            .collect();
        assert_eq!(counts, [0, 0, 0, 2, 0, 0]);

        let mut a = Assembler::new(Format::Changes);
        let v2 = [
            r#"{"action":"B","nextlsn":"0/9"}"#,
            r#"{"action":"I","table":"t"}"#,
            r#"{"action":"U","table":"t"}"#,
            r#"{"action":"C","nextlsn":"0/9"}"#,
            r#"{"action":"B","nextlsn":"0/C"}"#,
            r#"{"action":"C","nextlsn":"0/C"}"#,
        ];
        let counts: Vec<u32> = v2.into_iter().map(|raw| a.push(b(raw)).unwrap().changes).collect();
        assert_eq!(counts, [0, 0, 0, 2, 0, 0]);

        // Cut into frames, the count stays on the frame that ends the message.
        let mut framer = Framer::new(16);
        let mut out = Vec::new();
        framer.push(OutFrame { changes: 0, ..piece("{\"change\":[", Fragment::First) }, &mut out);
        framer.push(piece(&"x".repeat(40), Fragment::Middle), &mut out);
        framer.push(OutFrame { changes: 7, ..piece("]}", Fragment::Last) }, &mut out);
        let counts: Vec<u32> = out.iter().map(|f| f.changes).collect();
        assert_eq!(counts.last(), Some(&7), "{counts:?}");
        assert_eq!(counts.iter().sum::<u32>(), 7, "{counts:?}");
    }

    fn piece(text: &str, fragment: Fragment) -> OutFrame {
        let (nextlsn, kind) = match fragment {
            Fragment::Last | Fragment::Whole => (Some(Lsn(42)), FrameKind::Data),
            _ => (None, FrameKind::Inside),
        };
        OutFrame { payload: Bytes::copy_from_slice(text.as_bytes()), fragment, nextlsn, kind, changes: 0 }
    }

    fn shape(frames: &[OutFrame]) -> Vec<(Fragment, String)> {
        frames.iter().map(|f| (f.fragment, String::from_utf8(f.payload.to_vec()).unwrap())).collect()
    }

    #[test]
    fn a_small_transaction_is_one_frame() {
        let mut framer = Framer::new(64);
        let mut out = Vec::new();
        for (t, f) in [
            ("{\"change\":[", Fragment::First),
            ("1", Fragment::Middle),
            (",2", Fragment::Middle),
            ("]}", Fragment::Last),
        ] {
            framer.push(piece(t, f), &mut out);
        }
        assert_eq!(shape(&out), [(Fragment::Whole, "{\"change\":[1,2]}".to_owned())]);
        assert_eq!((out[0].nextlsn, out[0].kind), (Some(Lsn(42)), FrameKind::Data));
    }

    #[test]
    fn frames_fill_up_and_cut_between_characters() {
        let mut framer = Framer::new(16);
        let mut out = Vec::new();
        framer.push(piece("0123456789", Fragment::First), &mut out);
        assert!(out.is_empty(), "nothing goes out before a frame is full");
        framer.push(piece("abcdé€xyz", Fragment::Middle), &mut out);
        framer.push(piece("]", Fragment::Last), &mut out);
        assert_eq!(
            shape(&out),
            [(Fragment::First, "0123456789abcdé".to_owned()), (Fragment::Last, "€xyz]".to_owned()),]
        );
        assert!(out[0].nextlsn.is_none() && out[1].nextlsn == Some(Lsn(42)));
    }

    #[test]
    fn a_large_whole_message_is_cut_without_copies() {
        let mut framer = Framer::new(16);
        let mut out = Vec::new();
        let big = piece(&"x".repeat(40), Fragment::Whole);
        let at = big.payload.as_ptr();
        framer.push(big, &mut out);
        let sizes: Vec<_> = out.iter().map(|f| (f.fragment, f.payload.len())).collect();
        assert_eq!(sizes, [(Fragment::First, 16), (Fragment::Middle, 16), (Fragment::Last, 8)]);
        assert_eq!(out[0].payload.as_ptr(), at, "the first frame is a slice of the piece");
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
            kept.extend(skip.filter(vec![a.push(b(r)).unwrap()]));
        }
        let kept: Vec<_> = kept.iter().map(|f| String::from_utf8(f.payload.to_vec()).unwrap()).collect();
        assert_eq!(kept, &records[2..]);

        let mut a = Assembler::new(Format::Transactions);
        let mut framer = Framer::new(1024);
        let mut frames = Vec::new();
        for p in [r#"{"nextlsn":"0/2","change":["#, "]}", r#"{"nextlsn":"0/4","change":["#, "{}", "]}"] {
            framer.push(a.push(b(p)).unwrap(), &mut frames);
        }
        let kept = SkipEmpty::default().filter(frames);
        assert_eq!(kept.len(), 1);
        assert_eq!(&kept[0].payload[..], br#"{"nextlsn":"0/4","change":[{}]}"#);
    }

    #[test]
    fn an_empty_transaction_after_a_lone_message_is_kept_to_be_acked() {
        let mut a = Assembler::new(Format::Transactions);
        let mut framer = Framer::new(1024);
        let mut frames = Vec::new();
        let pieces = [
            r#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#,
            r#"{"nextlsn":"0/2","change":["#,
            "]}",
            r#"{"nextlsn":"0/4","change":["#,
            "]}",
        ];
        for p in pieces {
            framer.push(a.push(b(p)).unwrap(), &mut frames);
        }
        let kept = SkipEmpty::default().filter(frames);
        let nextlsns: Vec<_> = kept.iter().map(|f| f.nextlsn).collect();
        assert_eq!(nextlsns, [None, Some(Lsn(2))], "the message, then the transaction that covers it; no more");
    }

    #[test]
    fn error_records() {
        let error = "invalid memory alloc request size 1080000003";
        let shapes = |frames: Vec<OutFrame>| -> Vec<(Fragment, FrameKind, Option<Lsn>, String)> {
            frames
                .into_iter()
                .map(|f| (f.fragment, f.kind, f.nextlsn, String::from_utf8(f.payload.to_vec()).unwrap()))
                .collect()
        };
        let end = Some(Lsn(0x1F9_FCA8));
        // Nothing of the transaction went out (pgoutput holds it until its commit).
        let mut a = Assembler::new(Format::Transactions);
        assert_eq!(
            shapes(a.error_record(Lsn(0x1F9_FCA8), Some(745), error)),
            [(
                Fragment::Whole,
                FrameKind::Failed,
                end,
                r#"{"xid":745,"nextlsn":"0/1F9FCA8","change":[],"error":"invalid memory alloc request size 1080000003"}"#
                    .to_owned()
            )]
        );
        let mut a = Assembler::new(Format::Changes);
        assert_eq!(
            shapes(a.error_record(Lsn(0x1F9_FCA8), Some(745), error)),
            [
                (Fragment::Whole, FrameKind::Begin, None, r#"{"action":"B","xid":745,"nextlsn":"0/1F9FCA8"}"#.to_owned()),
                (
                    Fragment::Whole,
                    FrameKind::Failed,
                    end,
                    r#"{"action":"C","xid":745,"nextlsn":"0/1F9FCA8","error":"invalid memory alloc request size 1080000003"}"#
                        .to_owned()
                ),
            ]
        );
        // wal2json: the head and a change went out; the record ends that message.
        let mut a = Assembler::new(Format::Transactions);
        let mut framer = Framer::new(1024);
        let mut out = Vec::new();
        framer.push(a.push(b(r#"{"nextlsn":"0/1F9FCA8","change":["#)).unwrap(), &mut out);
        framer.push(a.push(b(r#"{"kind":"insert"}"#)).unwrap(), &mut out);
        assert_eq!(a.open_transaction(), end);
        for f in a.error_record(a.open_transaction().unwrap(), None, "x\"y") {
            framer.push(f, &mut out);
        }
        assert_eq!(
            shapes(out),
            [(
                Fragment::Whole,
                FrameKind::Failed,
                end,
                r#"{"nextlsn":"0/1F9FCA8","change":[{"kind":"insert"}],"error":"x\"y"}"#.to_owned()
            )]
        );
        assert_eq!(a.open_transaction(), None);
        let mut a = Assembler::new(Format::Changes);
        a.push(b(r#"{"action":"B","lsn":"0/1","nextlsn":"0/1F9FCA8"}"#)).unwrap();
        assert_eq!(a.open_transaction(), end);
        assert_eq!(
            shapes(a.error_record(Lsn(0x1F9_FCA8), None, "e")),
            [(
                Fragment::Whole,
                FrameKind::Failed,
                end,
                r#"{"action":"C","nextlsn":"0/1F9FCA8","error":"e"}"#.to_owned()
            )]
        );
    }

    proptest! {
        #[test]
        fn never_panics(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            for format in [Format::Transactions, Format::Changes] {
                let mut a = Assembler::new(format);
                for p in &pieces {
                    let _ = a.push(Bytes::from(p.clone()));
                }
            }
        }

        /// Whatever the pieces and the frame size: each message's frames join to its
        /// pieces, every frame is UTF-8 and at most the frame size, only the last frame of a
        /// message carries its LSN, and every frame but the last is full.
        #[test]
        fn framing_keeps_messages_whole(
            messages in proptest::collection::vec(proptest::collection::vec("[a-zé€😀]{0,40}", 1..6), 0..6),
            frame_bytes in 16usize..64,
        ) {
            let mut framer = Framer::new(frame_bytes);
            let mut out = Vec::new();
            for pieces in &messages {
                let n = pieces.len();
                for (i, text) in pieces.iter().enumerate() {
                    let fragment = match (i, n) {
                        (_, 1) => Fragment::Whole,
                        (0, _) => Fragment::First,
                        (i, n) if i == n - 1 => Fragment::Last,
                        _ => Fragment::Middle,
                    };
                    framer.push(piece(text, fragment), &mut out);
                }
            }
            let mut frames = out.iter();
            for pieces in &messages {
                let mut joined = String::new();
                loop {
                    let f = frames.next().expect("a frame for every message");
                    prop_assert!(f.payload.len() <= frame_bytes);
                    joined.push_str(std::str::from_utf8(&f.payload).expect("UTF-8 frame"));
                    if matches!(f.fragment, Fragment::Whole | Fragment::Last) {
                        prop_assert_eq!(f.nextlsn, Some(Lsn(42)));
                        break;
                    }
                    prop_assert!(f.nextlsn.is_none());
                    prop_assert!(f.payload.len() + 4 > frame_bytes, "a frame that is not full went out");
                }
                prop_assert_eq!(joined, pieces.concat());
            }
            prop_assert!(frames.next().is_none());
        }
    }
}
