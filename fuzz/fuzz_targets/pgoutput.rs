//! pgoutput messages: the parser and the converter that renders them as wal2json.
//!
//! The input is a sequence of messages, each a length byte then that many bytes. Each
//! message goes to the parser, which must not panic; a message that parses must encode
//! and parse back to itself. The messages that parse then go, in order, to a converter
//! of each format (every type named `t`): it must not panic, and whatever it hands out
//! before an error is a sequence of whole JSON documents whenever it is UTF-8 (a value's
//! bytes are copied as they are, as wal2json does) and no column is of a number type.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgdeltastream::pg::pgoutput::{Message, encode, parse};
use pgdeltastream::stream::frame::Format;
use pgdeltastream::stream::pgoutput::Converter;
use pgdeltastream::types::Lsn;

fn convert(format: Format, messages: &[Message]) {
    // A small bound, so that the file behind it is exercised too.
    let mut converter = Converter::new(format, &["hidden".to_owned()], 256);
    let mut out = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        for (oid, typmod) in converter.missing_types(message) {
            converter.add_type(oid, typmod, "t");
        }
        if converter.push(Lsn(i as u64), message.clone()).is_err() {
            break;
        }
        loop {
            match converter.next_part() {
                Ok(Some(part)) => out.extend_from_slice(part.body().map_or(&[][..], |b| &b[..])),
                Ok(None) => break,
                Err(e) => panic!("reading held pieces back failed: {e}"),
            }
        }
    }
    // A number column's text is printed bare, as wal2json does, even when it is no
    // number (`""`, `e`): Postgres never outputs such text, the fuzzer does.
    let numbers = messages.iter().any(|m| match m {
        Message::Relation(r) => r.columns.iter().any(|c| [20, 21, 23, 26, 700, 701, 1700].contains(&c.type_oid)),
        _ => false,
    });
    if !numbers && std::str::from_utf8(&out).is_ok() {
        for doc in serde_json::Deserializer::from_slice(&out).into_iter::<serde_json::Value>() {
            if let Err(e) = doc {
                panic!("not a JSON document ({e}): {}", String::from_utf8_lossy(&out));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = Bytes::copy_from_slice(data);
    let mut messages = Vec::new();
    let mut at = 0;
    while at < whole.len() {
        let len = usize::from(whole[at]);
        let end = (at + 1 + len).min(whole.len());
        if let Ok(message) = parse(whole.slice(at + 1..end)) {
            let again = parse(Bytes::from(encode(&message))).expect("an encoded message parses");
            assert_eq!(again, message);
            messages.push(message);
        }
        at = end;
    }
    convert(Format::Transactions, &messages);
    convert(Format::Changes, &messages);
});
