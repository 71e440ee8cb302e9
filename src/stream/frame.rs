//! From the plugin's bytes to the client's frame, for wal2json format-version 1.
//!
//! The bytes are forwarded as they are (no parse, no re-serialisation); we only look
//! at the head of the message for its `nextlsn`, and repair the one shape wal2json 2.5
//! gets wrong.

use bytes::{BufMut, Bytes, BytesMut};

use crate::types::Lsn;

/// What a frame means for acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A transaction with changes: the client must ack its `nextlsn`.
    Data,
    /// A transaction with no changes (DDL only, TRUNCATE, filtered): nothing to lose.
    Empty,
    /// A non-transactional logical message: no `nextlsn`, so no ack can cover it by
    /// itself; a later transaction's ack does.
    Unackable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutFrame {
    pub payload: Bytes,
    pub nextlsn: Option<Lsn>,
    pub kind: FrameKind,
}

const BROKEN_MESSAGE_HEAD: &[u8] = b"{\"change\":[,";
const NEXTLSN_KEY: &[u8] = b"\"nextlsn\":\"";

/// Prepares one wal2json v1 message (one transaction, or one non-transactional
/// logical message) for the client.
pub fn prepare_v1(data: Bytes) -> OutFrame {
    // wal2json 2.5 prints a non-transactional message as `{"change":[,{...}]}`: drop
    // the stray comma so that every frame is valid JSON.
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
    OutFrame { payload, nextlsn, kind }
}

/// The top-level `"nextlsn":"X/Y"`, which wal2json prints before `"change"` (after
/// `xid` at most), so only the head of the message is searched.
fn find_nextlsn(payload: &[u8]) -> Option<Lsn> {
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

    #[test]
    fn transaction_is_forwarded_untouched() {
        let raw = Bytes::from_static(br#"{"nextlsn":"0/170FCB0","change":[{"kind":"insert","schema":"public","table":"t","columnnames":["a"],"columntypes":["integer"],"columnvalues":[1]}]}"#);
        let f = prepare_v1(raw.clone());
        assert_eq!(f.payload.as_ptr(), raw.as_ptr(), "no copy");
        assert_eq!(f.nextlsn, Some(Lsn(0x170_FCB0)));
        assert_eq!(f.kind, FrameKind::Data);
    }

    #[test]
    fn empty_transaction() {
        let f = prepare_v1(Bytes::from_static(br#"{"xid":7,"nextlsn":"1/A","change":[]}"#));
        assert_eq!(f.nextlsn, Some(Lsn(0x1_0000_000A)));
        assert_eq!(f.kind, FrameKind::Empty);
    }

    #[test]
    fn repairs_non_transactional_message() {
        let f = prepare_v1(Bytes::from_static(
            br#"{"change":[,{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#,
        ));
        assert_eq!(
            &f.payload[..],
            br#"{"change":[{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#
        );
        assert!(serde_json::from_slice::<serde_json::Value>(&f.payload).is_ok());
        assert_eq!(f.nextlsn, None);
        assert_eq!(f.kind, FrameKind::Unackable);
    }

    #[test]
    fn nextlsn_inside_values_is_not_taken() {
        let f =
            prepare_v1(Bytes::from_static(br#"{"change":[{"kind":"insert","columnvalues":["\"nextlsn\":\"0/1\""]}]}"#));
        assert_eq!(f.nextlsn, None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = prepare_v1(Bytes::from(bytes));
        }
    }
}
