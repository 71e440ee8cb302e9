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
        while let Some(piece) = c.next_piece().unwrap() {
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
    while let Some(p) = c.next_piece().unwrap() {
        pieces.push(p);
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
