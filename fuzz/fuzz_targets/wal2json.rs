//! wal2json output: the typed models and the stream's frame assembler.
//!
//! The whole input goes to `Transaction::parse` (format 1) and `Record::parse`
//! (format 2). When either parses, serialising it and parsing that again must give
//! an equal value, and serialising is then stable. The same value written with every
//! `"kind"` / `"action"` tag moved to the end of its object must parse equal too: that
//! takes the parser's buffered path for tags that do not come first, which wal2json's
//! own output never reaches.
//!
//! The input split at `\n` is also parsed a line at a time, and is a sequence of
//! XLogData payloads for an `Assembler` of each `Format`. wal2json's compact JSON never
//! holds a raw newline, so a seed file is written one plugin message per line, and a
//! chunked transaction's lines together are one JSON document for the parsers (a
//! newline is whitespace there). The assembler's parts must keep the payload as it
//! came (but for the one repair it makes) and form whole messages, and the websocket
//! framer must cut them into valid frames that keep every byte.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgdeltastream::stream::frame::{Assembler, Format};
use pgdeltastream::stream::framer::Framer;
use pgdeltastream::stream::message::{MessageKind, Part};
use pgdeltastream::types::wal2json::{Record, Transaction};
use serde_json::Value;

/// wal2json 2.5's non-transactional message head, which the assembler repairs.
const BROKEN_MESSAGE_HEAD: &[u8] = b"{\"change\":[,";

/// Writes `value` as JSON with the key `tag` last in every object that has it.
fn write_tag_last(value: &Value, tag: &str, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            let entries = map.iter().filter(|(k, _)| *k != tag).chain(map.get_key_value(tag));
            for (i, (key, item)) in entries.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).expect("a key serialises"));
                out.push(':');
                write_tag_last(item, tag, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_tag_last(item, tag, out);
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).expect("a value serialises")),
    }
}

fn tag_last<T: serde::Serialize>(parsed: &T, tag: &str) -> String {
    let mut out = String::new();
    write_tag_last(&serde_json::to_value(parsed).expect("to a Value"), tag, &mut out);
    out
}

fn round_trip_v1(data: &[u8]) {
    let Ok(txn) = Transaction::parse(data) else {
        return;
    };
    let text = serde_json::to_vec(&txn).expect("a parsed transaction serialises");
    let again = Transaction::parse(&text).unwrap_or_else(|e| {
        panic!("re-serialised transaction does not parse ({e}): {}", String::from_utf8_lossy(&text))
    });
    assert_eq!(again, txn, "{}", String::from_utf8_lossy(&text));
    assert_eq!(serde_json::to_vec(&again).expect("serialises"), text);

    let late = tag_last(&txn, "kind");
    match Transaction::parse(late.as_bytes()) {
        Ok(again) => assert_eq!(again, txn, "{late}"),
        Err(e) => panic!("transaction with late tags does not parse ({e}): {late}"),
    }
}

fn round_trip_v2(data: &[u8]) {
    let Ok(record) = Record::parse(data) else {
        return;
    };
    let text = serde_json::to_vec(&record).expect("a parsed record serialises");
    let again = Record::parse(&text)
        .unwrap_or_else(|e| panic!("re-serialised record does not parse ({e}): {}", String::from_utf8_lossy(&text)));
    assert_eq!(again, record, "{}", String::from_utf8_lossy(&text));
    assert_eq!(again.lsn(), record.lsn());
    assert_eq!(serde_json::to_vec(&again).expect("serialises"), text);

    let late = tag_last(&record, "action");
    match Record::parse(late.as_bytes()) {
        Ok(again) => assert_eq!(again, record, "{late}"),
        Err(e) => panic!("record with a late tag does not parse ({e}): {late}"),
    }
}

fn assemble_v1(chunks: &[Bytes]) {
    let mut assembler = Assembler::new(Format::Transactions);
    let mut in_message = false;
    let mut framer = Framer::new(64);
    let (mut bodies, mut frames) = (Vec::new(), Vec::new());
    for chunk in chunks {
        let mut parts = Vec::new();
        // Not UTF-8 and not a mendable logical message: refused, nothing forwarded.
        if assembler.push(chunk.clone(), &mut parts).is_err() {
            assert!(parts.is_empty());
            continue;
        }
        let mut forwarded = Vec::new();
        for part in parts {
            match &part {
                Part::Start(_) => {
                    assert!(!in_message, "{part:?} inside a message");
                    in_message = true;
                }
                Part::Body(body) => {
                    assert!(in_message, "{part:?} outside a message");
                    assert!(std::str::from_utf8(body).is_ok(), "{part:?}");
                    forwarded.extend_from_slice(body);
                }
                Part::Finish(finish) => {
                    assert!(in_message, "{part:?} outside a message");
                    in_message = false;
                    assert_eq!(finish.kind == MessageKind::Unackable, finish.nextlsn.is_none(), "{finish:?}");
                }
            }
            let mut out = Vec::new();
            framer.push(part, &mut out);
            for f in out {
                assert!(f.payload.len() <= 64 && std::str::from_utf8(&f.payload).is_ok(), "{f:?}");
                frames.extend_from_slice(&f.payload);
            }
        }
        if chunk.starts_with(BROKEN_MESSAGE_HEAD) && !in_message {
            let head = BROKEN_MESSAGE_HEAD.len() - 1;
            assert_eq!(forwarded.len(), chunk.len() - 1);
            assert_eq!(forwarded[..head], chunk[..head]);
            assert_eq!(forwarded[head..], chunk[head + 1..]);
        } else if std::str::from_utf8(chunk).is_ok() {
            assert_eq!(forwarded, *chunk, "forwarded as it came");
        }
        bodies.extend_from_slice(&forwarded);
    }
    if !in_message {
        assert_eq!(frames, bodies, "the framer forwards every byte, in order");
    }
}

fn assemble_v2(chunks: &[Bytes]) {
    let mut assembler = Assembler::new(Format::Changes);
    for chunk in chunks {
        let mut parts = Vec::new();
        if assembler.push(chunk.clone(), &mut parts).is_err() {
            continue;
        }
        let [Part::Start(_), Part::Body(body), Part::Finish(finish)] = &parts[..] else {
            panic!("a record is a message of its own: {parts:?}")
        };
        if std::str::from_utf8(chunk).is_ok() {
            assert_eq!(body, chunk, "forwarded as it came");
        }
        if finish.nextlsn.is_some() {
            assert!(finish.kind.is_ack_point(), "{finish:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip_v1(data);
    round_trip_v2(data);

    let whole = Bytes::copy_from_slice(data);
    let chunks: Vec<Bytes> = data
        .split(|&b| b == b'\n')
        .scan(0, |at, piece| {
            let start = *at;
            *at += piece.len() + 1;
            Some(whole.slice(start..start + piece.len()))
        })
        .collect();
    if chunks.len() > 1 {
        // Each message on its own too: a seed of several format-2 records is one
        // record a line, which as a whole is no JSON document.
        for chunk in &chunks {
            round_trip_v1(chunk);
            round_trip_v2(chunk);
        }
    }
    assemble_v1(&chunks);
    assemble_v2(&chunks);
});
