//! The payloads of CopyData messages inside a logical replication stream.
//!
//! Once `START_REPLICATION` succeeds, server and client exchange CopyData messages whose
//! first byte says what they carry:
//!
//! | byte | direction | payload |
//! | --- | --- | --- |
//! | `w` | server → client | XLogData: u64 wal_start, u64 wal_end, i64 send_time, then the plugin's bytes |
//! | `k` | server → client | primary keepalive: u64 wal_end, i64 send_time, u8 reply_requested |
//! | `r` | client → server | standby status update: u64 write, u64 flush, u64 apply, i64 time, u8 reply_requested |
//!
//! Times are microseconds since 2000-01-01 UTC; all integers are big-endian.
//! These functions are pure so they can be tested without a server.

use bytes::{BufMut, Bytes, BytesMut};

use crate::types::Lsn;

/// Microseconds between the Unix epoch and Postgres's epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// One message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// A chunk of decoded output: for wal2json v1 one whole transaction.
    XLogData { wal_start: Lsn, wal_end: Lsn, send_time: i64, data: Bytes },
    /// "I am alive, and I have sent you everything up to `wal_end`".
    Keepalive { wal_end: Lsn, send_time: i64, reply_requested: bool },
}

/// Why a CopyData payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty CopyData message")]
    Empty,
    #[error("truncated {0} message ({1} bytes)")]
    Truncated(&'static str, usize),
    #[error("unknown CopyData message type {0:#04x}")]
    UnknownKind(u8),
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Decodes a CopyData payload from the server. `data` of XLogData shares `payload`'s
/// memory: no copy of the plugin's bytes is made.
pub fn parse_server_frame(payload: Bytes) -> Result<ServerFrame, FrameError> {
    match payload.first() {
        None => Err(FrameError::Empty),
        Some(b'w') => {
            if payload.len() < 25 {
                return Err(FrameError::Truncated("XLogData", payload.len()));
            }
            Ok(ServerFrame::XLogData {
                wal_start: Lsn(be_u64(&payload[1..])),
                wal_end: Lsn(be_u64(&payload[9..])),
                send_time: be_u64(&payload[17..]) as i64,
                data: payload.slice(25..),
            })
        }
        Some(b'k') => {
            if payload.len() < 18 {
                return Err(FrameError::Truncated("keepalive", payload.len()));
            }
            Ok(ServerFrame::Keepalive {
                wal_end: Lsn(be_u64(&payload[1..])),
                send_time: be_u64(&payload[9..]) as i64,
                reply_requested: payload[17] != 0,
            })
        }
        Some(&other) => Err(FrameError::UnknownKind(other)),
    }
}

/// The 34-byte standby status update payload (to be wrapped in a CopyData message).
pub(crate) fn standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: std::time::SystemTime,
    reply_requested: bool,
) -> Bytes {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(write.0);
    b.put_u64(flush.0);
    b.put_u64(apply.0);
    b.put_i64(pg_timestamp(now));
    b.put_u8(u8::from(reply_requested));
    b.freeze()
}

/// A wall-clock time as Postgres's microseconds since 2000-01-01.
pub(crate) fn pg_timestamp(t: std::time::SystemTime) -> i64 {
    let unix_micros = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    };
    unix_micros - PG_EPOCH_OFFSET_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_xlogdata_without_copying() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x1_0000_0010);
        b.put_u64(0x1_0000_0020);
        b.put_i64(42);
        b.put_slice(b"{\"change\":[]}");
        let payload = b.freeze();
        let ServerFrame::XLogData { wal_start, wal_end, send_time, data } =
            parse_server_frame(payload.clone()).unwrap()
        else {
            panic!("not XLogData")
        };
        assert_eq!(wal_start, Lsn(0x1_0000_0010));
        assert_eq!(wal_end, Lsn(0x1_0000_0020));
        assert_eq!(send_time, 42);
        assert_eq!(&data[..], b"{\"change\":[]}");
        assert_eq!(data.as_ptr(), payload[25..].as_ptr(), "the plugin's bytes are shared, not copied");
    }

    #[test]
    fn parses_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x170_FCB0);
        b.put_i64(7);
        b.put_u8(1);
        assert_eq!(
            parse_server_frame(b.freeze()),
            Ok(ServerFrame::Keepalive { wal_end: Lsn(0x170_FCB0), send_time: 7, reply_requested: true })
        );
    }

    #[test]
    fn status_update_layout() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800 + 1);
        let b = standby_status_update(Lsn(1), Lsn(2), Lsn(3), t, true);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        assert_eq!(be_u64(&b[1..]), 1);
        assert_eq!(be_u64(&b[9..]), 2);
        assert_eq!(be_u64(&b[17..]), 3);
        assert_eq!(be_u64(&b[25..]) as i64, 1_000_000);
        assert_eq!(b[33], 1);
    }

    #[test]
    fn rejects_short_and_unknown() {
        assert_eq!(parse_server_frame(Bytes::new()), Err(FrameError::Empty));
        assert_eq!(parse_server_frame(Bytes::from_static(b"w123")), Err(FrameError::Truncated("XLogData", 4)));
        assert_eq!(parse_server_frame(Bytes::from_static(b"k")), Err(FrameError::Truncated("keepalive", 1)));
        assert_eq!(parse_server_frame(Bytes::from_static(b"x")), Err(FrameError::UnknownKind(b'x')));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_server_frame(Bytes::from(bytes));
        }
    }
}
