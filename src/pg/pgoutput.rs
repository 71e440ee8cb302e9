//! The messages of `pgoutput`, Postgres's built-in output plugin (protocol version 1):
//! one message per XLogData payload, integers big-endian, strings NUL-terminated.
//!
//! Values and names share the payload's memory ([`Bytes`]); anything malformed is an
//! error, never a panic, whatever the bytes.

use bytes::Bytes;

use crate::types::Lsn;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin { commit_lsn: Lsn, name: Bytes },
    Relation(Relation),
    Type { oid: u32, namespace: Bytes, name: Bytes },
    Insert { relation: u32, new: Tuple },
    Update { relation: u32, old: Option<OldTuple>, new: Tuple },
    Delete { relation: u32, old: OldTuple },
    Truncate { options: u8, relations: Vec<u32> },
    Message(LogicalMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record.
    pub final_lsn: Lsn,
    pub commit_time: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is
    /// delivered (wal2json's `nextlsn`).
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Empty for `pg_catalog`.
    pub namespace: Bytes,
    pub name: Bytes,
    /// `d`efault, `n`othing, `f`ull or `i`ndex.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity.
    pub key: bool,
    pub name: Bytes,
    pub type_oid: u32,
    pub typmod: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value the change did not rewrite: not sent.
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

pub(crate) type Tuple = Vec<Datum>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldTuple {
    /// `K`: the replica identity's columns only (the others are null); `O`: the whole
    /// old row (REPLICA IDENTITY FULL).
    pub whole_row: bool,
    pub tuple: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: Bytes,
    /// Any bytes, not necessarily UTF-8.
    pub content: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput message {0:?} ends early")]
    Truncated(char),
    #[error("pgoutput message {0:?} has a string without its NUL")]
    Unterminated(char),
    #[error("pgoutput message {0:?} has {1} bytes left over")]
    Trailing(char, usize),
    #[error("pgoutput message {0:?} has a negative count")]
    Negative(char),
    #[error("pgoutput message {0:?} has an unexpected byte {1:#04x}")]
    Unexpected(char, u8),
    #[error("unknown pgoutput message type {0:#04x}")]
    UnknownTag(u8),
}

/// A cursor over one message.
struct Reader {
    data: Bytes,
    at: usize,
    tag: char,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, ParseError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(ParseError::Truncated(self.tag))?;
        let out = self.data.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ParseError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, ParseError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, ParseError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, ParseError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    fn lsn(&mut self) -> Result<Lsn, ParseError> {
        Ok(Lsn(u64::from_be_bytes(self.array()?)))
    }

    /// A NUL-terminated string, without its NUL.
    fn string(&mut self) -> Result<Bytes, ParseError> {
        let rest = &self.data[self.at..];
        let len = rest.iter().position(|&b| b == 0).ok_or(ParseError::Unterminated(self.tag))?;
        let out = self.take(len)?;
        self.at += 1;
        Ok(out)
    }

    /// A count that cannot be negative.
    fn count16(&mut self) -> Result<usize, ParseError> {
        usize::try_from(self.i16()?).map_err(|_| ParseError::Negative(self.tag))
    }

    fn count32(&mut self) -> Result<usize, ParseError> {
        usize::try_from(self.i32()?).map_err(|_| ParseError::Negative(self.tag))
    }

    /// Room for `n` items of at least `min_size` bytes each, never more than what the
    /// rest of the message could hold: a lying count cannot make us allocate.
    fn capacity(&self, n: usize, min_size: usize) -> usize {
        n.min((self.data.len() - self.at) / min_size.max(1))
    }

    fn tuple(&mut self) -> Result<Tuple, ParseError> {
        let n = self.count16()?;
        let mut tuple = Vec::with_capacity(self.capacity(n, 1));
        for _ in 0..n {
            tuple.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.count32()?;
                    Datum::Text(self.take(len)?)
                }
                b'b' => {
                    let len = self.count32()?;
                    Datum::Binary(self.take(len)?)
                }
                other => return Err(ParseError::Unexpected(self.tag, other)),
            });
        }
        Ok(tuple)
    }

    /// `N` then the new tuple.
    fn new_tuple(&mut self) -> Result<Tuple, ParseError> {
        match self.u8()? {
            b'N' => self.tuple(),
            other => Err(ParseError::Unexpected(self.tag, other)),
        }
    }

    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple, ParseError> {
        match marker {
            b'K' | b'O' => Ok(OldTuple { whole_row: marker == b'O', tuple: self.tuple()? }),
            other => Err(ParseError::Unexpected(self.tag, other)),
        }
    }

    fn relation(&mut self) -> Result<Relation, ParseError> {
        let oid = self.u32()?;
        let namespace = self.string()?;
        let name = self.string()?;
        let replica_identity = self.u8()?;
        let n = self.count16()?;
        let mut columns = Vec::with_capacity(self.capacity(n, 10));
        for _ in 0..n {
            let flags = self.u8()?;
            let name = self.string()?;
            columns.push(Column { key: flags & 1 != 0, name, type_oid: self.u32()?, typmod: self.i32()? });
        }
        Ok(Relation { oid, namespace, name, replica_identity, columns })
    }

    fn update(&mut self) -> Result<Message, ParseError> {
        let relation = self.u32()?;
        let old = match self.u8()? {
            b'N' => None,
            marker => {
                let old = self.old_tuple(marker)?;
                return Ok(Message::Update { relation, old: Some(old), new: self.new_tuple()? });
            }
        };
        Ok(Message::Update { relation, old, new: self.tuple()? })
    }

    fn truncate(&mut self) -> Result<Message, ParseError> {
        let n = self.count32()?;
        let options = self.u8()?;
        let mut relations = Vec::with_capacity(self.capacity(n, 4));
        for _ in 0..n {
            relations.push(self.u32()?);
        }
        Ok(Message::Truncate { options, relations })
    }

    fn message(&mut self) -> Result<Message, ParseError> {
        let flags = self.u8()?;
        let lsn = self.lsn()?;
        let prefix = self.string()?;
        let len = self.count32()?;
        let content = self.take(len)?;
        Ok(Message::Message(LogicalMessage { transactional: flags & 1 != 0, lsn, prefix, content }))
    }
}

/// Parses one pgoutput message (one XLogData payload).
pub fn parse(data: Bytes) -> Result<Message, ParseError> {
    let tag = *data.first().ok_or(ParseError::Empty)?;
    let mut r = Reader { data, at: 1, tag: char::from(tag) };
    let message = match tag {
        b'B' => Message::Begin(Begin { final_lsn: r.lsn()?, commit_time: r.i64()?, xid: r.u32()? }),
        b'C' => {
            Message::Commit(Commit { flags: r.u8()?, commit_lsn: r.lsn()?, end_lsn: r.lsn()?, commit_time: r.i64()? })
        }
        b'O' => Message::Origin { commit_lsn: r.lsn()?, name: r.string()? },
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type { oid: r.u32()?, namespace: r.string()?, name: r.string()? },
        b'I' => Message::Insert { relation: r.u32()?, new: r.new_tuple()? },
        b'U' => r.update()?,
        b'D' => {
            let relation = r.u32()?;
            let marker = r.u8()?;
            Message::Delete { relation, old: r.old_tuple(marker)? }
        }
        b'T' => r.truncate()?,
        b'M' => r.message()?,
        other => return Err(ParseError::UnknownTag(other)),
    };
    match r.data.len() - r.at {
        0 => Ok(message),
        left => Err(ParseError::Trailing(r.tag, left)),
    }
}

/// The encoding of a message, as the walsender writes it (for tests and fuzzing seeds:
/// feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(s);
        out.push(0);
    };
    let tuple = |out: &mut Vec<u8>, t: &Tuple| {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for d in t {
            match d {
                Datum::Null => out.push(b'n'),
                Datum::Unchanged => out.push(b'u'),
                Datum::Text(b) | Datum::Binary(b) => {
                    out.push(if matches!(d, Datum::Text(_)) { b't' } else { b'b' });
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    };
    let old = |out: &mut Vec<u8>, o: &OldTuple| {
        out.push(if o.whole_row { b'O' } else { b'K' });
        tuple(out, &o.tuple);
    };
    match message {
        Message::Begin(b) => {
            out.push(b'B');
            out.extend_from_slice(&b.final_lsn.0.to_be_bytes());
            out.extend_from_slice(&b.commit_time.to_be_bytes());
            out.extend_from_slice(&b.xid.to_be_bytes());
        }
        Message::Commit(c) => {
            out.push(b'C');
            out.push(c.flags);
            out.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
            out.extend_from_slice(&c.end_lsn.0.to_be_bytes());
            out.extend_from_slice(&c.commit_time.to_be_bytes());
        }
        Message::Origin { commit_lsn, name } => {
            out.push(b'O');
            out.extend_from_slice(&commit_lsn.0.to_be_bytes());
            string(&mut out, name);
        }
        Message::Relation(r) => {
            out.push(b'R');
            out.extend_from_slice(&r.oid.to_be_bytes());
            string(&mut out, &r.namespace);
            string(&mut out, &r.name);
            out.push(r.replica_identity);
            out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
            for c in &r.columns {
                out.push(u8::from(c.key));
                string(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.typmod.to_be_bytes());
            }
        }
        Message::Type { oid, namespace, name } => {
            out.push(b'Y');
            out.extend_from_slice(&oid.to_be_bytes());
            string(&mut out, namespace);
            string(&mut out, name);
        }
        Message::Insert { relation, new } => {
            out.push(b'I');
            out.extend_from_slice(&relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Update { relation, old: o, new } => {
            out.push(b'U');
            out.extend_from_slice(&relation.to_be_bytes());
            if let Some(o) = o {
                old(&mut out, o);
            }
            out.push(b'N');
            tuple(&mut out, new);
        }
        Message::Delete { relation, old: o } => {
            out.push(b'D');
            out.extend_from_slice(&relation.to_be_bytes());
            old(&mut out, o);
        }
        Message::Truncate { options, relations } => {
            out.push(b'T');
            out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
            out.push(*options);
            for r in relations {
                out.extend_from_slice(&r.to_be_bytes());
            }
        }
        Message::Message(m) => {
            out.push(b'M');
            out.push(u8::from(m.transactional));
            out.extend_from_slice(&m.lsn.0.to_be_bytes());
            string(&mut out, &m.prefix);
            out.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
            out.extend_from_slice(&m.content);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(1u8..=255, 0..12).prop_map(Bytes::from)
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::Unchanged),
            bytes().prop_map(Datum::Text),
            bytes().prop_map(Datum::Binary),
        ]
    }

    fn tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(datum(), 0..6)
    }

    fn old() -> impl Strategy<Value = OldTuple> {
        (any::<bool>(), tuple()).prop_map(|(whole_row, tuple)| OldTuple { whole_row, tuple })
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn column() -> impl Strategy<Value = Column> {
        (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(|(key, name, type_oid, typmod)| Column {
            key,
            name,
            type_oid,
            typmod,
        })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| Message::Begin(Begin {
                final_lsn,
                commit_time,
                xid
            })),
            (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                Message::Commit(Commit { flags, commit_lsn, end_lsn, commit_time })
            }),
            (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (any::<u32>(), name(), name(), any::<u8>(), proptest::collection::vec(column(), 0..5)).prop_map(
                |(oid, namespace, name, replica_identity, columns)| {
                    Message::Relation(Relation { oid, namespace, name, replica_identity, columns })
                }
            ),
            (any::<u32>(), name(), name()).prop_map(|(oid, namespace, name)| Message::Type { oid, namespace, name }),
            (any::<u32>(), tuple()).prop_map(|(relation, new)| Message::Insert { relation, new }),
            (any::<u32>(), proptest::option::of(old()), tuple()).prop_map(|(relation, old, new)| Message::Update {
                relation,
                old,
                new
            }),
            (any::<u32>(), old()).prop_map(|(relation, old)| Message::Delete { relation, old }),
            (any::<u8>(), proptest::collection::vec(any::<u32>(), 0..5))
                .prop_map(|(options, relations)| Message::Truncate { options, relations }),
            (any::<bool>(), lsn(), name(), bytes()).prop_map(|(transactional, lsn, prefix, content)| {
                Message::Message(LogicalMessage { transactional, lsn, prefix, content })
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in message()) {
            let encoded = Bytes::from(encode(&m));
            prop_assert_eq!(parse(encoded.clone()), Ok(m));
            // Every proper prefix is an error, not a panic nor a different message.
            for cut in 0..encoded.len() {
                prop_assert!(parse(encoded.slice(..cut)).is_err());
            }
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse(Bytes::from(bytes));
        }
    }

    #[test]
    fn values_share_the_payload() {
        let m = Message::Insert { relation: 7, new: vec![Datum::Text(Bytes::from_static(b"hello"))] };
        let encoded = Bytes::from(encode(&m));
        let Ok(Message::Insert { new, .. }) = parse(encoded.clone()) else { panic!("not an insert") };
        let Datum::Text(value) = &new[0] else { panic!("not text") };
        assert_eq!(value.as_ptr(), encoded[encoded.len() - 5..].as_ptr());
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse(Bytes::new()), Err(ParseError::Empty));
        assert_eq!(parse(Bytes::from_static(b"Z")), Err(ParseError::UnknownTag(b'Z')));
        assert_eq!(parse(Bytes::from_static(b"I\0\0\0\x01X")), Err(ParseError::Unexpected('I', b'X')));
        assert_eq!(parse(Bytes::from_static(b"I\0\0\0\x01N\xff\xff")), Err(ParseError::Negative('I')));
        // A huge count with nothing behind it allocates nothing and fails.
        assert_eq!(parse(Bytes::from_static(b"T\x7f\xff\xff\xff\0")), Err(ParseError::Truncated('T')));
        assert_eq!(parse(Bytes::from_static(b"Y\0\0\0\x01abc")), Err(ParseError::Unterminated('Y')));
        let mut long = encode(&Message::Origin { commit_lsn: Lsn(1), name: Bytes::from_static(b"o") });
        long.push(0);
        assert_eq!(parse(Bytes::from(long)), Err(ParseError::Trailing('O', 1)));
    }
}
