//! What comes from outside the server, other than wal2json's JSON:
//! - a client's ack on the websocket (`parse_ack`, then `check_ack`);
//! - a table reference typed by a user (`TableRef::parse`);
//! - a CopyData payload from the walsender (`parse_server_frame`).
//!
//! Every parser sees the whole input (the text ones only when it is UTF-8).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgdeltastream::pg::frames::{ServerFrame, parse_server_frame};
use pgdeltastream::pg::ident::{MAX_IDENT_BYTES, TableRef};
use pgdeltastream::stream::ack::{AckError, check_ack, parse_ack};
use pgdeltastream::types::Lsn;

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// `check_ack` against its specification.
fn check(ack: Lsn, last: Lsn, delivered: Lsn) {
    let result = check_ack(ack, last, delivered);
    match result {
        Ok(accepted) => {
            assert_eq!(accepted, ack);
            assert!(last <= ack && ack <= delivered, "{ack:?} accepted after {last:?}, delivered {delivered:?}");
        }
        Err(AckError::Backwards { ack: a, last: l }) => assert!((a, l) == (ack, last) && ack < last),
        Err(AckError::Ahead { ack: a, delivered: d }) => {
            assert!((a, d) == (ack, delivered) && last <= ack && ack > delivered)
        }
        Err(AckError::Malformed(_)) => panic!("check_ack returned Malformed"),
    }
}

fn ack(text: &str, data: &[u8]) {
    let Ok(lsn) = parse_ack(text) else {
        return;
    };
    // Independently: a JSON object whose "lsn" is a string holding an LSN.
    let value: serde_json::Value = serde_json::from_str(text).expect("an accepted ack is JSON");
    let field = value.get("lsn").and_then(|v| v.as_str()).expect("an accepted ack has a string lsn");
    assert_eq!(field.parse::<Lsn>(), Ok(lsn));
    assert_eq!(parse_ack(&format!(r#"{{"lsn":"{lsn}"}}"#)), Ok(lsn));

    // Repeating the last ack is fine, and the bounds are inclusive.
    assert_eq!(check_ack(lsn, lsn, lsn), Ok(lsn));
    // Bounds taken from the input's bytes, and next to the ack.
    let (a, b) = if data.len() >= 16 { (be_u64(data), be_u64(&data[8..])) } else { (0, u64::MAX) };
    let n = lsn.as_u64();
    for last in [a, b, n.saturating_sub(1), n, n.saturating_add(1)] {
        for delivered in [a, b, n.saturating_sub(1), n, n.saturating_add(1)] {
            check(lsn, Lsn(last), Lsn(delivered));
        }
    }
}

fn table_ref(text: &str) {
    let Ok(table) = TableRef::parse(text) else {
        return;
    };
    for part in table.schema.iter().chain([&table.name]) {
        assert!(!part.is_empty() && part.len() <= MAX_IDENT_BYTES, "{table:?}");
        assert!(!part.contains('\0'), "{table:?}");
    }
    let shown = table.to_string();
    assert_eq!(TableRef::parse(&shown), Ok(table), "{text:?} shown as {shown:?}");
}

fn server_frame(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    match parse_server_frame(payload) {
        Ok(ServerFrame::XLogData { wal_start, wal_end, send_time, data: plugin }) => {
            assert!(data.len() >= 25 && data[0] == b'w');
            assert_eq!(wal_start, Lsn(be_u64(&data[1..])));
            assert_eq!(wal_end, Lsn(be_u64(&data[9..])));
            assert_eq!(send_time, be_u64(&data[17..]) as i64);
            assert_eq!(plugin[..], data[25..]);
        }
        Ok(ServerFrame::Keepalive { wal_end, send_time, reply_requested }) => {
            assert!(data.len() >= 18 && data[0] == b'k');
            assert_eq!(wal_end, Lsn(be_u64(&data[1..])));
            assert_eq!(send_time, be_u64(&data[9..]) as i64);
            assert_eq!(reply_requested, data[17] != 0);
        }
        Err(_) => assert!(
            data.is_empty()
                || (data[0] == b'w' && data.len() < 25)
                || (data[0] == b'k' && data.len() < 18)
                || !matches!(data[0], b'w' | b'k')
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    server_frame(data);
    if let Ok(text) = std::str::from_utf8(data) {
        ack(text, data);
        table_ref(text);
    }
});
