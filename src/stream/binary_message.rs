//! Logical messages whose content is not UTF-8.
//!
//! `pg_logical_emit_message(transactional, prefix, content bytea)` takes any bytes, and
//! any role may call it. wal2json escapes the content as a JSON string but passes bytes
//! above 0x7F through as they are, so binary content makes the output invalid UTF-8,
//! which no websocket text message may carry. Refusing it would stop the stream at the
//! same place on every reconnect and the slot would retain WAL forever.
//!
//! So such a message is delivered with its exact bytes in an added field, base64
//! encoded, and `content` holds the same bytes decoded lossily (each invalid sequence
//! as U+FFFD), for clients that only print it:
//!
//! ```text
//! {"kind":"message","transactional":true,"prefix":"bin","content":"\u{FFFD}A","content_base64":"/0E="}
//! ```
//!
//! Messages whose content is UTF-8 are left exactly as wal2json prints them.

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};

use crate::types::value::write_json_string;

const CONTENT_KEY: &[u8] = b"\"content\":\"";

/// The added field: the content's bytes, base64 (RFC 4648, with padding).
pub(crate) const CONTENT_BASE64_KEY: &str = "content_base64";

/// Rewrites a wal2json message (format 1 or 2) whose `content` is not UTF-8. None when
/// the piece has no such content, or is not UTF-8 for another reason.
pub fn repair(piece: &[u8]) -> Option<Bytes> {
    let (start, end) = content_string(piece)?;
    let content = unescape(&piece[start..end])?;
    if std::str::from_utf8(&content).is_ok() {
        return None; // the invalid bytes are elsewhere
    }
    let mut text = String::with_capacity(content.len() * 2);
    write_json_string(&mut text, &String::from_utf8_lossy(&content));
    text.push_str(",\"");
    text.push_str(CONTENT_BASE64_KEY);
    text.push_str("\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(&content, &mut text);
    text.push('"');
    let mut out = BytesMut::with_capacity(piece.len() + text.len());
    out.put_slice(&piece[..start - 1]);
    out.put_slice(text.as_bytes());
    out.put_slice(&piece[end + 1..]);
    std::str::from_utf8(&out).ok()?;
    Some(out.freeze())
}

/// The bytes between the quotes of the `"content":"..."` value: found outside any other
/// string, so a prefix or value that merely contains that text is not taken for it.
fn content_string(piece: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < piece.len() {
        if piece[i] != b'"' {
            i += 1;
            continue;
        }
        if piece[i..].starts_with(CONTENT_KEY) {
            let start = i + CONTENT_KEY.len();
            return Some((start, string_end(piece, start)?));
        }
        i = string_end(piece, i + 1)? + 1;
    }
    None
}

/// The index of the quote that closes the string whose text starts at `from`.
fn string_end(piece: &[u8], mut from: usize) -> Option<usize> {
    while from < piece.len() {
        match piece[from] {
            b'"' => return Some(from),
            b'\\' => from += 2,
            _ => from += 1,
        }
    }
    None
}

/// The bytes a JSON string's text stands for; raw bytes stay as they are.
fn unescape(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        i += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let escaped = *text.get(i)?;
        i += 1;
        match escaped {
            b'"' | b'\\' | b'/' => out.push(escaped),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0C),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'u' => {
                let hex = std::str::from_utf8(text.get(i..i + 4)?).ok()?;
                let c = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
                i += 4;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
    }

    fn decode(s: &serde_json::Value) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap()
    }

    #[test]
    fn v1_piece_inside_a_transaction() {
        let raw = b",{\"kind\":\"message\",\"transactional\":true,\"prefix\":\"bin\",\"content\":\"\xff\"}";
        let fixed = repair(raw).unwrap();
        assert_eq!(
            std::str::from_utf8(&fixed).unwrap(),
            ",{\"kind\":\"message\",\"transactional\":true,\"prefix\":\"bin\",\"content\":\"\u{FFFD}\",\"content_base64\":\"/w==\"}"
        );
    }

    #[test]
    fn v1_non_transactional_and_v2() {
        for raw in [
            &b"{\"change\":[,{\"kind\":\"message\",\"transactional\":false,\"prefix\":\"p\",\"content\":\"a\\n\\u0001\xc3\"}]}"[..],
            &b"{\"action\":\"M\",\"lsn\":\"0/1\",\"transactional\":false,\"prefix\":\"p\",\"content\":\"a\\n\\u0001\xc3\"}"[..],
        ] {
            let fixed = repair(raw).unwrap();
            let text = std::str::from_utf8(&fixed).unwrap();
            let want = "\"content\":\"a\\n\\u0001\u{FFFD}\",\"content_base64\":\"YQoBww==\"}";
            assert!(text.contains(want), "{text}");
        }
    }

    #[test]
    fn keys_inside_other_strings_are_not_taken() {
        let raw = b"{\"action\":\"M\",\"prefix\":\"\\\"content\\\":\\\"x\",\"content\":\"\xfe\"}";
        let fixed = repair(raw).unwrap();
        let v = parse(&fixed);
        assert_eq!(v["prefix"], "\"content\":\"x");
        assert_eq!(decode(&v["content_base64"]), vec![0xfe]);
    }

    #[test]
    fn leaves_what_it_cannot_mend() {
        assert_eq!(repair(br#"{"action":"M","content":"fine"}"#), None, "valid content");
        assert_eq!(repair(b"{\"kind\":\"insert\",\"columnvalues\":[\"\xff\"]}"), None, "no content");
        assert_eq!(repair(b"{\"prefix\":\"\xff\",\"content\":\"ok\"}"), None, "the bad bytes are elsewhere");
        assert_eq!(repair(b"{\"content\":\"\xff"), None, "unterminated");
        assert_eq!(repair(b"{\"content\":\"\\q\xff\"}"), None, "bad escape");
    }

    proptest! {
        /// Any content, escaped as wal2json escapes it, comes back exactly.
        #[test]
        fn content_round_trips(content in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut raw = b"{\"kind\":\"message\",\"transactional\":true,\"prefix\":\"p\",\"content\":\"".to_vec();
            for &b in &content {
                match b {
                    b'"' => raw.extend_from_slice(b"\\\""),
                    b'\\' => raw.extend_from_slice(b"\\\\"),
                    b'\n' => raw.extend_from_slice(b"\\n"),
                    0..=0x1f => raw.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                    _ => raw.push(b),
                }
            }
            raw.extend_from_slice(b"\"}");
            match repair(&raw) {
                None => prop_assert!(std::str::from_utf8(&content).is_ok()),
                Some(fixed) => {
                    let v = parse(&fixed);
                    prop_assert_eq!(decode(&v["content_base64"]), content.clone());
                    prop_assert_eq!(v["content"].as_str().unwrap(), String::from_utf8_lossy(&content));
                }
            }
        }

        #[test]
        fn never_panics(piece in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Some(fixed) = repair(&piece) {
                prop_assert!(std::str::from_utf8(&fixed).is_ok());
            }
        }
    }
}
