//! Comparing what two slots streamed: the documented normalisations of accepted
//! differences, the parse into the typed models, and a report of the first difference.

use std::collections::HashSet;

use pgdeltastream::types::wal2json::{Record, Transaction};

/// What one slot streamed, in both formats, each websocket message as its text.
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// `format=transactions` (wal2json format 1).
    pub v1: Vec<String>,
    /// `format=changes` (wal2json format 2).
    pub v2: Vec<String>,
}

/// Accepted difference `EMPTY_TRANSACTIONS`: PG 15's pgoutput sends nothing for a
/// transaction without a published change (DDL only, a rolled-back write, the empty
/// transaction around a non-transactional message), where wal2json sends
/// `{"nextlsn":..,"change":[]}` in format 1 and a `B` directly followed by its `C` in
/// format 2. Applied to what a wal2json slot streamed.
///
/// A transaction is empty when its format-2 form is a bare B/C pair; its format-1 form
/// (same `nextlsn`) is dropped with it. A format-1 `"change":[]` whose format-2 form is
/// not empty (a TRUNCATE, which format 1 does not print) stays.
pub fn drop_empty_transactions(s: &Streamed) -> Streamed {
    let records: Vec<Option<Record>> = s.v2.iter().map(|m| Record::parse(m.as_bytes()).ok()).collect();
    let mut empty = HashSet::new();
    let mut v2 = Vec::with_capacity(s.v2.len());
    let mut i = 0;
    while i < s.v2.len() {
        if let (Some(Record::B(_)), Some(Some(Record::C(c)))) = (&records[i], records.get(i + 1)) {
            empty.insert(c.nextlsn);
            i += 2;
            continue;
        }
        v2.push(s.v2[i].clone());
        i += 1;
    }
    let v1 = s
        .v1
        .iter()
        .filter(|m| match Transaction::parse(m.as_bytes()) {
            Ok(t) => !(t.change.is_empty() && t.nextlsn.is_some() && empty.contains(&t.nextlsn)),
            Err(_) => true,
        })
        .cloned()
        .collect();
    Streamed { v1, v2 }
}

/// Every message parses into the typed model of its format; the first that does not, with
/// the error.
pub fn check_parse(label: &str, s: &Streamed) -> Result<(), String> {
    for (i, m) in s.v1.iter().enumerate() {
        Transaction::parse(m.as_bytes())
            .map_err(|e| format!("{label} format 1, message {i} does not parse as a Transaction: {e}\n{m}"))?;
    }
    for (i, m) in s.v2.iter().enumerate() {
        Record::parse(m.as_bytes())
            .map_err(|e| format!("{label} format 2, message {i} does not parse as a Record: {e}\n{m}"))?;
    }
    Ok(())
}

/// The first difference between `expected` and `actual`, described in full: both
/// messages and the byte offset where they part.
pub fn first_difference(what: &str, expected: &[String], actual: &[String]) -> Option<String> {
    let n = expected.len().max(actual.len());
    for i in 0..n {
        let (e, a) = (expected.get(i), actual.get(i));
        if e == a {
            continue;
        }
        let show = |m: Option<&String>| m.map_or_else(|| "<none: the stream ended before>".to_string(), |m| m.clone());
        let offset = match (e, a) {
            (Some(e), Some(a)) => {
                let at = e.bytes().zip(a.bytes()).take_while(|(x, y)| x == y).count();
                let context = |m: &str| String::from_utf8_lossy(&m.as_bytes()[at.saturating_sub(40)..(at + 40).min(m.len())]).into_owned();
                format!("they part at byte {at}:\n  expected ...{}...\n  actual   ...{}...\n", context(e), context(a))
            }
            _ => String::new(),
        };
        return Some(format!(
            "{what}: message {i} of {} (expected) / {} (actual) differs; {offset}expected (in full):\n{}\nactual (in full):\n{}\n",
            expected.len(),
            actual.len(),
            show(e),
            show(a)
        ));
    }
    None
}
