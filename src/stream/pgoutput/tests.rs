//! The converter on built messages; tests/pgoutput.rs compares it with wal2json itself.

use bytes::Bytes;

use super::*;
use crate::pg::pgoutput::{Column, Datum, OldTuple};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn text(s: &str) -> Datum {
    Datum::Text(b(s))
}

/// `public.t (id integer key, name text, n numeric(5,2))`, or in `schema`.
fn relation(oid: u32, schema: &str, identity: u8) -> Message {
    let col = |key, name: &str, type_oid, typmod| Column { key, name: b(name), type_oid, typmod };
    Message::Relation(Relation {
        oid,
        namespace: b(schema),
        name: b("t"),
        replica_identity: identity,
        columns: vec![col(true, "id", 23, -1), col(false, "name", 25, -1), col(false, "n", 1700, 0x50006)],
    })
}

fn converter(format: Format, hold: usize) -> Converter {
    let mut c = Converter::new(format, &["pgdeltastream".to_owned()], hold);
    c.add_type(23, -1, "integer");
    c.add_type(25, -1, "text");
    c.add_type(1700, 0x50006, "numeric(5,2)");
    c
}

fn begin() -> Message {
    Message::Begin(Begin { final_lsn: Lsn(0x100), commit_time: 0, xid: 7 })
}

fn commit() -> Message {
    Message::Commit(Commit { flags: 0, commit_lsn: Lsn(0x100), end_lsn: Lsn(0x1_0000_0130), commit_time: 0 })
}

fn run(c: &mut Converter, messages: Vec<Message>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, m) in messages.into_iter().enumerate() {
        c.push(Lsn(0x10 + i as u64), m).unwrap();
        while let Some(part) = c.next_part().unwrap() {
            let Some(piece) = part.body() else { continue };
            out.push(String::from_utf8(piece.to_vec()).unwrap());
        }
    }
    out
}

fn insert(id: &str) -> Message {
    Message::Insert { relation: 1, new: vec![text(id), text("a\"b"), Datum::Null] }
}

#[test]
fn v1_transaction_is_held_until_its_commit() {
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
    c.push(Lsn(2), begin()).unwrap();
    c.push(Lsn(3), insert("1")).unwrap();
    assert!(!c.has_output(), "nothing before the commit: its end LSN is the head's");
    let out = run(&mut c, vec![insert("2"), commit()]);
    assert_eq!(
        out,
        [
            r#"{"nextlsn":"1/130","change":["#,
            r#"{"kind":"insert","schema":"public","table":"t","columnnames":["id","name","n"],"columntypes":["integer","text","numeric(5,2)"],"columnvalues":[1,"a\"b",null]}"#,
            r#",{"kind":"insert","schema":"public","table":"t","columnnames":["id","name","n"],"columntypes":["integer","text","numeric(5,2)"],"columnvalues":[2,"a\"b",null]}"#,
            "]}",
        ]
    );
}

/// The converter says what each message is in its start and finish: the transaction's
/// end LSN, whether it carried changes and how many, with no text to read back.
#[test]
fn messages_carry_their_metadata() {
    let end = Some(Lsn(0x1_0000_0130));
    let shape = |c: &mut Converter, messages: Vec<Message>| -> Vec<String> {
        let mut out = Vec::new();
        for m in messages {
            c.push(Lsn(0x10), m).unwrap();
            while let Some(part) = c.next_part().unwrap() {
                out.push(match part {
                    Part::Start(s) => format!("start {:?}", s.nextlsn),
                    Part::Body(_) => "body".to_owned(),
                    Part::Finish(f) => format!("finish {:?} {:?} {}", f.nextlsn, f.kind, f.changes),
                });
            }
        }
        out
    };
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
    c.push(Lsn(1), relation(2, "pgdeltastream", b'd')).unwrap();
    let hidden = Message::Insert { relation: 2, new: vec![text("1"), text("x"), Datum::Null] };
    let out = shape(&mut c, vec![begin(), insert("1"), insert("2"), commit(), begin(), hidden, commit()]);
    let data = format!("finish {end:?} Data 2");
    let empty = format!("finish {end:?} Empty 0");
    let start = format!("start {end:?}");
    let (start, data, empty) = (start.as_str(), data.as_str(), empty.as_str());
    assert_eq!(out, [start, "body", "body", "body", "body", data, start, "body", "body", empty]);

    let mut c = converter(Format::Changes, DEFAULT_HOLD_MEMORY);
    c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
    let out = shape(&mut c, vec![begin(), insert("1"), commit()]);
    let begin = "finish None Begin 0";
    let inside = "finish None Inside 0";
    let commit = format!("finish {end:?} Data 1");
    assert_eq!(out, ["start None", "body", begin, "start None", "body", inside, start, "body", commit.as_str()]);
}

#[test]
fn v1_updates_and_deletes() {
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    let out = run(
        &mut c,
        vec![
            relation(1, "public", b'd'),
            begin(),
            // Key unchanged, a TOASTed column unchanged: left out.
            Message::Update { relation: 1, old: None, new: vec![text("1"), Datum::Unchanged, text("NaN")] },
            // Key changed: the old key row has NULLs but in the key.
            Message::Update {
                relation: 1,
                old: Some(OldTuple { whole_row: false, tuple: vec![text("1"), Datum::Null, Datum::Null] }),
                new: vec![text("2"), text("x"), text("1.50")],
            },
            Message::Delete {
                relation: 1,
                old: OldTuple { whole_row: false, tuple: vec![text("2"), Datum::Null, Datum::Null] },
            },
            commit(),
        ],
    );
    assert_eq!(
        &out[1..4],
        [
            r#"{"kind":"update","schema":"public","table":"t","columnnames":["id","n"],"columntypes":["integer","numeric(5,2)"],"columnvalues":[1,null],"oldkeys":{"keynames":["id"],"keytypes":["integer"],"keyvalues":[1]}}"#,
            r#",{"kind":"update","schema":"public","table":"t","columnnames":["id","name","n"],"columntypes":["integer","text","numeric(5,2)"],"columnvalues":[2,"x",1.50],"oldkeys":{"keynames":["id"],"keytypes":["integer"],"keyvalues":[1]}}"#,
            r#",{"kind":"delete","schema":"public","table":"t","oldkeys":{"keynames":["id"],"keytypes":["integer"],"keyvalues":[2]}}"#,
        ]
    );
}

#[test]
fn v2_records_carry_their_lsns() {
    let mut c = converter(Format::Changes, DEFAULT_HOLD_MEMORY);
    let full_old = OldTuple { whole_row: true, tuple: vec![text("1"), Datum::Null, text("2")] };
    let out = run(
        &mut c,
        vec![
            relation(1, "public", b'f'),
            begin(),
            insert("1"),
            Message::Delete { relation: 1, old: full_old },
            Message::Truncate { options: 0, relations: vec![1] },
            commit(),
        ],
    );
    assert_eq!(
        out,
        [
            r#"{"action":"B","lsn":"0/100","nextlsn":"1/130"}"#,
            r#"{"action":"I","lsn":"0/12","schema":"public","table":"t","columns":[{"name":"id","type":"integer","value":1},{"name":"name","type":"text","value":"a\"b"},{"name":"n","type":"numeric(5,2)","value":null}]}"#,
            r#"{"action":"D","lsn":"0/13","schema":"public","table":"t","identity":[{"name":"id","type":"integer","value":1},{"name":"name","type":"text","value":null},{"name":"n","type":"numeric(5,2)","value":2}]}"#,
            r#"{"action":"T","lsn":"0/14","schema":"public","table":"t"}"#,
            r#"{"action":"C","lsn":"0/100","nextlsn":"1/130"}"#,
        ]
    );
}

/// pgoutput before 15 sends Begin and Commit for a transaction that published nothing;
/// 15 sends nothing, and that is what reaches a client on every major.
#[test]
fn a_transaction_pgoutput_sent_nothing_of_is_not_sent() {
    for format in [Format::Transactions, Format::Changes] {
        let mut c = converter(format, DEFAULT_HOLD_MEMORY);
        c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
        let out = run(&mut c, vec![begin(), commit(), begin(), commit(), begin(), insert("1"), commit()]);
        assert_eq!(out.len(), 3, "one transaction of one change: {out:?}");
        assert!(out[1].contains(r#""a\"b""#), "the change: {out:?}");
        assert!(!c.holds_transaction() && !c.has_output());
    }
}

#[test]
fn truncate_prints_nothing_in_v1_and_hidden_tables_are_dropped() {
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    let out = run(
        &mut c,
        vec![
            relation(1, "public", b'd'),
            relation(2, "pgdeltastream", b'd'),
            begin(),
            Message::Truncate { options: 0, relations: vec![1] },
            Message::Insert { relation: 2, new: vec![text("1"), text("x"), Datum::Null] },
            commit(),
        ],
    );
    assert_eq!(out, [r#"{"nextlsn":"1/130","change":["#, "]}"]);
}

#[test]
fn messages() {
    let m = |transactional, content: &'static [u8]| {
        Message::Message(LogicalMessage {
            transactional,
            lsn: Lsn(0xAB),
            prefix: b("p"),
            content: Bytes::from_static(content),
        })
    };
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    let out = run(
        &mut c,
        vec![m(false, b"a\nb\0cut"), relation(1, "public", b'd'), begin(), insert("1"), m(true, b"c"), commit()],
    );
    assert_eq!(out[0], r#"{"change":[{"kind":"message","transactional":false,"prefix":"p","content":"a\nb"}]}"#);
    assert_eq!(out[3], r#",{"kind":"message","transactional":true,"prefix":"p","content":"c"}"#);

    let mut c = converter(Format::Changes, DEFAULT_HOLD_MEMORY);
    let out = run(&mut c, vec![m(false, b"x")]);
    assert_eq!(out, [r#"{"action":"M","lsn":"0/AB","transactional":false,"prefix":"p","content":"x"}"#]);
}

#[test]
fn a_transaction_larger_than_memory_spills_and_comes_out_whole() {
    let mut c = converter(Format::Transactions, 1024);
    c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
    c.push(Lsn(2), begin()).unwrap();
    for i in 0..10_000 {
        c.push(Lsn(3), insert(&i.to_string())).unwrap();
    }
    c.push(Lsn(4), commit()).unwrap();
    let mut pieces = Vec::new();
    while let Some(part) = c.next_part().unwrap() {
        pieces.extend(part.body().cloned());
    }
    assert_eq!(pieces.len(), 10_002);
    let whole: Vec<u8> = pieces.concat();
    let v: serde_json::Value = serde_json::from_slice(&whole).unwrap();
    assert_eq!(v["change"].as_array().unwrap().len(), 10_000);
    assert_eq!(v["change"][9_999]["columnvalues"][0], 9_999);
}

#[test]
fn malformed_streams_are_errors() {
    let mut c = converter(Format::Transactions, DEFAULT_HOLD_MEMORY);
    assert!(matches!(c.push(Lsn(1), insert("1")), Err(ConvertError::UnknownRelation(1))));
    c.push(Lsn(1), relation(1, "public", b'd')).unwrap();
    assert!(matches!(c.push(Lsn(1), insert("1")), Err(ConvertError::OutsideTransaction(_))));
    assert!(matches!(c.push(Lsn(1), commit()), Err(ConvertError::OutsideTransaction(_))));
    c.push(Lsn(1), begin()).unwrap();
    assert!(matches!(c.push(Lsn(1), begin()), Err(ConvertError::NestedBegin)));
    let short = Message::Insert { relation: 1, new: vec![text("1")] };
    assert!(matches!(c.push(Lsn(1), short), Err(ConvertError::ColumnCount { .. })));
    let nan = Message::Insert { relation: 1, new: vec![text("x1"), Datum::Null, Datum::Null] };
    assert!(matches!(c.push(Lsn(1), nan), Err(ConvertError::NotANumber(_))));
    let mut unnamed = Converter::new(Format::Changes, &[], DEFAULT_HOLD_MEMORY);
    assert_eq!(unnamed.missing_types(&relation(1, "public", b'd')).len(), 3);
    assert!(matches!(unnamed.push(Lsn(1), relation(1, "public", b'd')), Err(ConvertError::UnknownType(23, -1))));
}

/// The fuzz target's seed (length-prefixed messages) parses and converts whole: the
/// held pieces spill past a small bound and come back in order.
#[test]
fn the_fuzz_seed_converts() {
    let seed = include_bytes!("../../../fuzz/corpus/pgoutput/transaction");
    for format in [Format::Transactions, Format::Changes] {
        let mut c = Converter::new(format, &["hidden".to_owned()], 64);
        let mut out = Vec::new();
        let mut at = 0;
        while at < seed.len() {
            let end = at + 1 + usize::from(seed[at]);
            let message = crate::pg::pgoutput::parse(Bytes::copy_from_slice(&seed[at + 1..end])).unwrap();
            for (oid, typmod) in c.missing_types(&message) {
                c.add_type(oid, typmod, &format!("type{oid}"));
            }
            c.push(Lsn(at as u64), message).unwrap();
            while let Some(part) = c.next_part().unwrap() {
                let Some(piece) = part.body() else { continue };
                out.extend_from_slice(piece);
            }
            at = end;
        }
        // The message's content is not UTF-8: copied as it is (the decoder mends it).
        let out = String::from_utf8_lossy(&out);
        let docs: Vec<serde_json::Value> =
            serde_json::Deserializer::from_str(&out).into_iter().collect::<Result<_, _>>().unwrap();
        let changes = match format {
            Format::Transactions => docs[0]["change"].as_array().unwrap().len(),
            Format::Changes => docs.len() - 3,
        };
        // insert, two updates, the message, the delete; v2 adds a truncate record
        // (the hidden table's is dropped) and the non-transactional message.
        assert_eq!(changes, if format == Format::Transactions { 5 } else { 6 }, "{docs:#?}");
    }
}

mod properties {
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;

    /// What a stream does after describing its relations.
    #[derive(Debug, Clone)]
    enum Op {
        Change { rel: usize, kind: u8, old_row: bool, a: Vec<Datum>, b: Vec<Datum> },
        Truncate(usize),
        Commit,
        Message { transactional: bool, content: String },
    }

    fn datum() -> impl Strategy<Value = Datum> {
        prop_oneof![
            Just(Datum::Null),
            Just(Datum::Unchanged),
            "[a-z0-9\"\\\\\n\u{1}é ]{0,6}".prop_map(|s| Datum::Text(Bytes::from(s))),
        ]
    }

    /// Relations of the types whose text is printed as a string or a boolean: a number
    /// type's text is printed bare and bytea's loses its first two bytes (`\x`), as
    /// wal2json does, so other text would make invalid JSON or UTF-8 (Postgres never
    /// outputs such text).
    fn relation(oid: u32) -> impl Strategy<Value = Relation> {
        let column = (any::<bool>(), "[a-z\"\\\\ ]{0,4}", select(vec![25u32, 16, 3802, 1043]))
            .prop_map(|(key, name, type_oid)| Column { key, name: Bytes::from(name), type_oid, typmod: -1 });
        ("[a-z\" ]{0,4}", select(vec![b'd', b'f', b'i', b'n']), proptest::collection::vec(column, 0..4)).prop_map(
            move |(name, replica_identity, columns)| Relation {
                oid,
                namespace: Bytes::from_static(b"public"),
                name: Bytes::from(name),
                replica_identity,
                columns,
            },
        )
    }

    fn op() -> impl Strategy<Value = Op> {
        let row = || proptest::collection::vec(datum(), 4);
        prop_oneof![
            6 => (0usize..3, 0u8..4, any::<bool>(), row(), row())
                .prop_map(|(rel, kind, old_row, a, b)| Op::Change { rel, kind, old_row, a, b }),
            1 => (0usize..3).prop_map(Op::Truncate),
            2 => Just(Op::Commit),
            1 => (any::<bool>(), "[a-z\"\n]{0,5}").prop_map(|(transactional, content)| Op::Message { transactional, content }),
        ]
    }

    /// A well-formed pgoutput stream: relations, then transactions of changes, with
    /// non-transactional messages between them.
    fn stream(rels: &[Relation], ops: &[Op]) -> (Vec<Message>, usize) {
        let mut out: Vec<Message> = rels.iter().cloned().map(Message::Relation).collect();
        let (mut open, mut txns, mut lsn) = (false, 0, 0x100u64);
        let begin = |out: &mut Vec<Message>, open: &mut bool, lsn: u64| {
            if !*open {
                out.push(Message::Begin(Begin { final_lsn: Lsn(lsn), commit_time: 0, xid: 1 }));
                *open = true;
            }
        };
        for op in ops {
            lsn += 0x10;
            match op {
                Op::Change { rel, kind, old_row, a, b } => {
                    begin(&mut out, &mut open, lsn);
                    let r = &rels[*rel];
                    let row = |d: &Vec<Datum>| d[..r.columns.len()].to_vec();
                    let old = OldTuple { whole_row: *old_row, tuple: row(a) };
                    let relation = r.oid;
                    out.push(match kind {
                        0 => Message::Insert { relation, new: row(b) },
                        1 => Message::Update { relation, old: None, new: row(b) },
                        2 => Message::Update { relation, old: Some(old), new: row(b) },
                        _ => Message::Delete { relation, old },
                    });
                }
                Op::Truncate(rel) => {
                    begin(&mut out, &mut open, lsn);
                    out.push(Message::Truncate { options: 0, relations: vec![rels[*rel].oid] });
                }
                Op::Commit if open => {
                    out.push(Message::Commit(Commit {
                        flags: 0,
                        commit_lsn: Lsn(lsn),
                        end_lsn: Lsn(lsn + 8),
                        commit_time: 0,
                    }));
                    open = false;
                    txns += 1;
                }
                Op::Commit => {}
                Op::Message { transactional, content } => {
                    if *transactional {
                        begin(&mut out, &mut open, lsn);
                    } else if open {
                        continue; // pgoutput sends them between transactions only
                    } else {
                        txns += 1; // a document of its own
                    }
                    out.push(Message::Message(LogicalMessage {
                        transactional: *transactional,
                        lsn: Lsn(lsn),
                        prefix: Bytes::from_static(b"p"),
                        content: Bytes::from(content.clone()),
                    }));
                }
            }
        }
        if open {
            out.push(Message::Commit(Commit { flags: 0, commit_lsn: Lsn(lsn), end_lsn: Lsn(lsn + 8), commit_time: 0 }));
            txns += 1;
        }
        (out, txns)
    }

    proptest! {
        /// Any well-formed stream converts without error into whole JSON documents, a
        /// transaction (or a lone message) per document in format 1, whatever the
        /// memory bound.
        #[test]
        fn well_formed_streams_convert_to_json(
            rels in (relation(1), relation(2), relation(3)).prop_map(|(a, b, c)| vec![a, b, c]),
            ops in proptest::collection::vec(op(), 0..40),
            hold in select(vec![0usize, 100, DEFAULT_HOLD_MEMORY]),
        ) {
            let (messages, docs) = stream(&rels, &ops);
            for format in [Format::Transactions, Format::Changes] {
                let mut c = Converter::new(format, &[], hold);
                for (oid, name) in [(25, "text"), (16, "boolean"), (3802, "jsonb"), (1043, "\"My Type\"")] {
                    c.add_type(oid, -1, name);
                }
                let mut out = Vec::new();
                for (i, m) in messages.iter().enumerate() {
                    c.push(Lsn(i as u64), m.clone()).unwrap();
                    while let Some(part) = c.next_part().unwrap() {
            let Some(piece) = part.body() else { continue };
                        out.extend_from_slice(piece);
                    }
                }
                let parsed: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&out)
                    .into_iter()
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
                if format == Format::Transactions {
                    prop_assert_eq!(parsed.len(), docs);
                }
            }
        }
    }
}
