//! Comparing what two slots streamed: the documented normalisations of accepted
//! differences, the parse into the typed models, and a report of the first difference.

use std::collections::HashSet;

use pgdeltastream::types::Lsn;
use pgdeltastream::types::wal2json::{Change, Column, OldKeys, Record, RowChange, Transaction};

/// What one slot streamed, in both formats, each websocket message as its text.
#[derive(Clone, Debug, Default)]
pub struct Streamed {
    /// `format=transactions` (wal2json format 1).
    pub v1: Vec<String>,
    /// `format=changes` (wal2json format 2).
    pub v2: Vec<String>,
}

/// Accepted difference `empty-transactions`: PG 15's pgoutput sends nothing for a
/// transaction without a published change (DDL only, the empty transaction around a
/// non-transactional message, a write to an unlogged table), where wal2json sends
/// `{"nextlsn":..,"change":[]}` in format 1 and a `B` directly followed by its `C` in
/// format 2. Drops those of wal2json's empty transactions whose end LSN (`nextlsn`) is
/// not in `sent`, the end LSNs of the transactions pgoutput did send (read by the
/// harness from a pgoutput slot of its own). An empty transaction pgoutput did send (a
/// TRUNCATE, which format 1 does not print; one whose changes the server hides) stays.
pub fn drop_empty_transactions(s: &Streamed, sent: &HashSet<Lsn>) -> Streamed {
    let unsent = |lsn: Option<Lsn>| lsn.is_some_and(|l| !sent.contains(&l));
    let records: Vec<Option<Record>> = s.v2.iter().map(|m| Record::parse(m.as_bytes()).ok()).collect();
    let mut v2 = Vec::with_capacity(s.v2.len());
    let mut i = 0;
    while i < s.v2.len() {
        if let (Some(Record::B(_)), Some(Some(Record::C(c)))) = (&records[i], records.get(i + 1))
            && unsent(c.nextlsn)
        {
            i += 2;
            continue;
        }
        v2.push(s.v2[i].clone());
        i += 1;
    }
    let v1 =
        s.v1.iter()
            .filter(|m| match Transaction::parse(m.as_bytes()) {
                Ok(t) => !(t.change.is_empty() && unsent(t.nextlsn)),
                Err(_) => true,
            })
            .cloned()
            .collect();
    Streamed { v1, v2 }
}

/// The end LSNs of the transactions in pgoutput's binary output (its Commit messages:
/// tag `C`, Int8 flags, Int64 commit LSN, Int64 end LSN, ...).
pub fn pgoutput_commits<'a>(messages: impl Iterator<Item = &'a [u8]>) -> HashSet<Lsn> {
    messages
        .filter(|m| m.first() == Some(&b'C') && m.len() >= 18)
        .filter_map(|m| m[10..18].try_into().ok().map(|b| Lsn(u64::from_be_bytes(b))))
        .collect()
}

/// Every normalisation there is, by name (apart from `empty-transactions`). A run
/// applies those of [`ACCEPTED`] always, the others only when `CONFORMANCE_ACCEPT` (a
/// comma list) names them: a difference found but not (yet) accepted gets a
/// normalisation here, and naming it lets a run look past it for the next. Accepting one
/// for good is adding it to [`ACCEPTED`] (and to docs/plugins.md).
pub const OPTIONAL: &[&str] = &[PARTITIONED_TRUNCATE, GENERATED_COLUMNS, MATERIALIZED_VIEWS, HISTORIC_TYPE_NAMES];

/// The differences accepted for good, applied in every run (`empty-transactions` is not
/// optional, so it is not listed: it is always applied).
/// The four here cannot match: pgoutput does not send what wal2json prints (generated
/// columns, materialized views, a partitioned table's own TRUNCATE), or it sends a type
/// as an oid named when the stream renders it (docs/plugins.md, "what differs").
pub const ACCEPTED: &[&str] = &[PARTITIONED_TRUNCATE, GENERATED_COLUMNS, MATERIALIZED_VIEWS, HISTORIC_TYPE_NAMES];

/// Difference `historic-type-names`: wal2json names a column's type as the catalog was
/// when the row was written; the renderer looks names up when it streams, so a type
/// renamed or moved since then has its new name, and a dropped one `???`. Not a
/// normalisation: accepting it leaves those type changes out of the workload.
pub const HISTORIC_TYPE_NAMES: &str = "historic-type-names";

/// Difference `partitioned-truncate`: TRUNCATE of a partitioned table. wal2json's format 2
/// prints a `T` for the partitioned table itself, then one per partition; pgoutput's
/// Truncate lists only the partitions (leaf relations), so the parent's `T` cannot be
/// told from a TRUNCATE of its partitions one by one. Drops the `T` of every table in
/// `partitioned` (schema, table) from format 2.
pub const PARTITIONED_TRUNCATE: &str = "partitioned-truncate";

pub fn drop_partitioned_truncates(s: &Streamed, partitioned: &[(String, String)]) -> Streamed {
    let v2 =
        s.v2.iter()
            .filter(|m| match Record::parse(m.as_bytes()) {
                Ok(Record::T(t)) => {
                    !partitioned.iter().any(|(schema, table)| t.schema.as_ref() == Some(schema) && &t.table == table)
                }
                _ => true,
            })
            .cloned()
            .collect();
    Streamed { v1: s.v1.clone(), v2 }
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
                let context = |m: &str| {
                    String::from_utf8_lossy(&m.as_bytes()[at.saturating_sub(40)..(at + 40).min(m.len())]).into_owned()
                };
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

/// Difference `generated-columns`: wal2json prints stored generated columns (name, type
/// and value, in the new row and in a FULL identity's old row); PG 15's pgoutput never
/// sends them, so their values are not in the stream to render. Drops the columns
/// `is_generated(schema, table, column)` from both formats.
pub const GENERATED_COLUMNS: &str = "generated-columns";

pub fn drop_generated_columns(s: &Streamed, is_generated: impl Fn(&Option<String>, &str, &str) -> bool) -> Streamed {
    let v1 =
        s.v1.iter()
            .map(|m| {
                let Ok(mut t) = Transaction::parse(m.as_bytes()) else { return m.clone() };
                let mut changed = false;
                for change in &mut t.change {
                    if let Change::Insert(row) | Change::Update(row) | Change::Delete(row) = change {
                        let (schema, table) = (row.schema.clone(), row.table.clone());
                        changed |= drop_from_row_change(row, |c| is_generated(&schema, &table, c));
                    }
                }
                if changed { serde_json::to_string(&t).unwrap_or_else(|_| m.clone()) } else { m.clone() }
            })
            .collect();
    let v2 =
        s.v2.iter()
            .map(|m| {
                let Ok(mut r) = Record::parse(m.as_bytes()) else { return m.clone() };
                let mut changed = false;
                if let Record::I(row) | Record::U(row) | Record::D(row) = &mut r {
                    let (schema, table) = (row.schema.clone(), row.table.clone());
                    for cols in [&mut row.columns, &mut row.identity].into_iter().flatten() {
                        let before = cols.len();
                        cols.retain(|c: &Column| !is_generated(&schema, &table, &c.name));
                        changed |= cols.len() != before;
                    }
                }
                if changed { serde_json::to_string(&r).unwrap_or_else(|_| m.clone()) } else { m.clone() }
            })
            .collect();
    Streamed { v1, v2 }
}

/// Removes the columns `drop` names from a format-1 row change; whether any was there.
fn drop_from_row_change(row: &mut RowChange, drop: impl Fn(&str) -> bool) -> bool {
    let keep: Vec<bool> = row.columnnames.iter().map(|n| !drop(n)).collect();
    let mut changed = keep.contains(&false);
    filter(&mut row.columnnames, &keep);
    if let Some(types) = &mut row.columntypes {
        filter(types, &keep);
    }
    filter(&mut row.columnvalues, &keep);
    if let Some(OldKeys { keynames, keytypes, keyvalues, .. }) = &mut row.oldkeys {
        let keep: Vec<bool> = keynames.iter().map(|n| !drop(n)).collect();
        changed |= keep.contains(&false);
        filter(keynames, &keep);
        if let Some(types) = keytypes {
            filter(types, &keep);
        }
        filter(keyvalues, &keep);
    }
    changed
}

/// Keeps the items of `v` whose place in `keep` is true.
fn filter<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep.get(i - 1).copied().unwrap_or(true)
    });
}

/// Difference `materialized-views`: wal2json prints the rows a materialized view is
/// filled with (by CREATE MATERIALIZED VIEW and REFRESH) as inserts into it; pgoutput
/// publishes no materialized view, not even FOR ALL TABLES. Drops the changes of the
/// relations in `views` (schema, name) from both formats; apply before
/// [`drop_empty_transactions`].
pub const MATERIALIZED_VIEWS: &str = "materialized-views";

pub fn drop_changes_of(s: &Streamed, views: &[(String, String)]) -> Streamed {
    let listed =
        |schema: &Option<String>, table: &str| views.iter().any(|(s, t)| schema.as_ref() == Some(s) && t == table);
    let v1 = s
        .v1
        .iter()
        .map(|m| {
            let Ok(mut t) = Transaction::parse(m.as_bytes()) else { return m.clone() };
            let before = t.change.len();
            t.change.retain(|c| match c {
                Change::Insert(r) | Change::Update(r) | Change::Delete(r) => !listed(&r.schema, &r.table),
                Change::Message(_) => true,
            });
            if t.change.len() != before { serde_json::to_string(&t).unwrap_or_else(|_| m.clone()) } else { m.clone() }
        })
        .collect();
    let v2 =
        s.v2.iter()
            .filter(|m| match Record::parse(m.as_bytes()) {
                Ok(Record::I(r) | Record::U(r) | Record::D(r)) => !listed(&r.schema, &r.table),
                Ok(Record::T(t)) => !listed(&t.schema, &t.table),
                _ => true,
            })
            .cloned()
            .collect();
    Streamed { v1, v2 }
}

/// What pgoutput on PostgreSQL 13 sends of a stream: no logical messages (its pgoutput
/// has no `messages` option). Drops them from both formats, and a transaction that had
/// only messages with them (pgoutput sends nothing for it then); a transaction that was
/// empty already stays.
pub fn drop_messages(s: &Streamed) -> Streamed {
    let v1 =
        s.v1.iter()
            .filter_map(|m| {
                let Ok(mut t) = Transaction::parse(m.as_bytes()) else { return Some(m.clone()) };
                let before = t.change.len();
                t.change.retain(|c| !matches!(c, Change::Message(_)));
                match t.change.len() {
                    n if n == before => Some(m.clone()),
                    0 => None,
                    _ => Some(serde_json::to_string(&t).unwrap_or_else(|_| m.clone())),
                }
            })
            .collect();
    let mut v2 = Vec::with_capacity(s.v2.len());
    // The records of the open transaction, and whether a message was dropped from it.
    let mut open: Option<(Vec<String>, bool)> = None;
    for m in &s.v2 {
        match (Record::parse(m.as_bytes()), &mut open) {
            (Ok(Record::B(_)), _) => open = Some((vec![m.clone()], false)),
            (Ok(Record::M(_)), Some((_, dropped))) => *dropped = true,
            (Ok(Record::M(_)), None) => {}
            (Ok(Record::C(_)), Some(_)) => {
                let Some((mut records, dropped)) = open.take() else { continue };
                if !(dropped && records.len() == 1) {
                    records.push(m.clone());
                    v2.extend(records);
                }
            }
            (_, Some((records, _))) => records.push(m.clone()),
            (_, None) => v2.push(m.clone()),
        }
    }
    Streamed { v1, v2 }
}

/// `message` with the value of every `"lsn"` and `"nextlsn"` replaced by `X/X`: LSNs
/// differ from cluster to cluster, the rest must not. (Inside a JSON string a quote is
/// escaped, so the pattern only matches keys.)
pub fn mask_lsns(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    loop {
        let found = ["\"lsn\":\"", "\"nextlsn\":\""].iter().filter_map(|k| rest.find(k).map(|at| (at, k.len()))).min();
        let Some((at, len)) = found else { break };
        out.push_str(&rest[..at + len]);
        rest = &rest[at + len..];
        let end = rest.find('"').unwrap_or(rest.len());
        out.push_str("X/X");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The changes of each transaction in a canonical order, for a comparison across
/// clusters. A statement that changes several rows changes them in the order it finds
/// them, and where an earlier update put a row's new version depends on page pruning,
/// which other sessions of the cluster hold back or not: the same workload on two
/// clusters may list a transaction's rows in another order. (Two slots of one cluster
/// see one order: the live conformance test compares the order too.) Format 1 is
/// sorted before its LSNs are masked (it parses them), format 2 after
/// ([`canonical_v2`]).
pub fn canonical_v1(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            let Ok(mut t) = Transaction::parse(m.as_bytes()) else { return m.clone() };
            let mut keyed: Vec<(String, Change)> =
                t.change.drain(..).map(|c| (serde_json::to_string(&c).unwrap_or_default(), c)).collect();
            if keyed.windows(2).all(|w| w[0].0 <= w[1].0) {
                return m.clone();
            }
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
            t.change = keyed.into_iter().map(|(_, c)| c).collect();
            serde_json::to_string(&t).unwrap_or_else(|_| m.clone())
        })
        .collect()
}

/// Format 2's records between each `B` and its `C` in a canonical order (their masked
/// text's); see [`canonical_v1`].
pub fn canonical_v2(masked: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(masked.len());
    let mut inside: Option<Vec<String>> = None;
    for m in masked {
        if m.starts_with("{\"action\":\"B\"") {
            out.push(m.clone());
            inside = Some(Vec::new());
        } else if m.starts_with("{\"action\":\"C\"") {
            let mut records = inside.take().unwrap_or_default();
            records.sort();
            out.extend(records);
            out.push(m.clone());
        } else if let Some(records) = &mut inside {
            records.push(m.clone());
        } else {
            out.push(m.clone());
        }
    }
    out.extend(inside.unwrap_or_default());
    out
}

/// A stored reference of a stream: a line per message, its SHA-256 (the first 16 bytes,
/// hex), its length, and its first bytes to read. The messages themselves are tens of
/// megabytes (the workload's TOASTed values); their digests are enough to compare.
pub fn reference_lines(messages: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    messages
        .iter()
        .map(|m| {
            let digest = Sha256::digest(m.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            let preview: String = m.chars().take(100).collect();
            format!("{hex} {} {preview}", m.len())
        })
        .collect()
}

/// The first message of `actual` whose reference line is not `expected`'s, described.
pub fn first_reference_difference(what: &str, expected: &[String], actual: &[String]) -> Option<String> {
    let lines = reference_lines(actual);
    let digest = |l: &str| l.split(' ').next().unwrap_or("").to_owned();
    for i in 0..expected.len().max(lines.len()) {
        let (e, a) = (expected.get(i), lines.get(i));
        if e.map(|e| digest(e)) == a.map(|a| digest(a)) {
            continue;
        }
        let full: String =
            actual.get(i).map_or_else(|| "<none: the stream ended>".into(), |m| m.chars().take(2000).collect());
        return Some(format!(
            "{what}: message {i} of {} (reference) / {} (actual) differs:\n  reference {}\n  actual    {}\nactual message (first 2000 characters):\n{full}\n",
            expected.len(),
            lines.len(),
            e.map_or("<none: the reference ended>", String::as_str),
            a.map_or("<none>", String::as_str),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_are_masked_and_values_left() {
        let m = r#"{"action":"I","lsn":"0/16B3748","nextlsn":"1/A0","columns":[{"name":"lsn","value":"\"lsn\":\"x"}]}"#;
        assert_eq!(
            mask_lsns(m),
            r#"{"action":"I","lsn":"X/X","nextlsn":"X/X","columns":[{"name":"lsn","value":"\"lsn\":\"x"}]}"#
        );
    }

    #[test]
    fn messages_go_and_transactions_of_only_messages_with_them() {
        let s = Streamed {
            v1: vec![
                r#"{"nextlsn":"0/1","change":[{"kind":"message","transactional":true,"prefix":"p","content":"c"}]}"#
                    .into(),
                r#"{"nextlsn":"0/2","change":[]}"#.into(),
                r#"{"change":[{"kind":"message","transactional":false,"prefix":"p","content":"c"}]}"#.into(),
            ],
            v2: vec![
                r#"{"action":"B","lsn":"0/1","nextlsn":"0/2"}"#.into(),
                r#"{"action":"M","lsn":"0/1","transactional":true,"prefix":"p","content":"c"}"#.into(),
                r#"{"action":"C","lsn":"0/1","nextlsn":"0/2"}"#.into(),
                r#"{"action":"B","lsn":"0/3","nextlsn":"0/4"}"#.into(),
                r#"{"action":"C","lsn":"0/3","nextlsn":"0/4"}"#.into(),
                r#"{"action":"M","lsn":"0/5","transactional":false,"prefix":"p","content":"c"}"#.into(),
            ],
        };
        let d = drop_messages(&s);
        assert_eq!(d.v1, [s.v1[1].clone()]);
        assert_eq!(d.v2, [s.v2[3].clone(), s.v2[4].clone()]);
    }
}
