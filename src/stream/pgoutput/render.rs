//! One row change as wal2json prints it, in format 1 (one object in a transaction's
//! `change` array) and format 2 (one record).
//!
//! Which columns each part shows follows wal2json 2.5 (`tuple_to_stringinfo`,
//! `pg_decode_write_tuple`): unchanged TOAST values are left out everywhere; format 1's
//! `oldkeys` leaves out NULLs, format 2's `identity` prints them; the old row (`K` or
//! `O`) gives the identity when pgoutput sent it, else the new row's key columns.

use super::ConvertError;
use super::json;
use crate::pg::pgoutput::{Datum, OldTuple, Relation, Tuple};
use crate::types::Lsn;
use crate::types::value::{Mode, write_value};

/// A relation as the stream needs it, names and types already in their JSON form.
#[derive(Debug, Clone)]
pub(crate) struct Rel {
    /// pgdeltastream's own tables: never streamed.
    pub hidden: bool,
    schema: Vec<u8>,
    table: Vec<u8>,
    /// REPLICA IDENTITY FULL.
    full: bool,
    columns: Vec<Col>,
}

#[derive(Debug, Clone)]
struct Col {
    key: bool,
    name: Vec<u8>,
    type_name: Vec<u8>,
    type_oid: u32,
}

/// A row change of a relation.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Insert(&'a Tuple),
    Update { old: Option<&'a OldTuple>, new: &'a Tuple },
    Delete(&'a OldTuple),
}

/// A column a part shows, and its value (`None`: NULL).
type Shown<'a> = (&'a Col, Option<&'a [u8]>);

/// Which of a row's columns a part shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    All,
    Keys,
}

impl Rel {
    /// `schema` is the relation's schema as Postgres names it (pgoutput sends `""` for
    /// `pg_catalog`); `type_name` gives each column's `format_type` text.
    pub fn new(
        r: &Relation,
        hidden: bool,
        mut type_name: impl FnMut(u32, i32) -> Option<Vec<u8>>,
    ) -> Result<Rel, ConvertError> {
        let schema: &[u8] = if r.namespace.is_empty() { b"pg_catalog" } else { &r.namespace };
        let mut columns = Vec::with_capacity(r.columns.len());
        for c in &r.columns {
            let type_name = type_name(c.type_oid, c.typmod).ok_or(ConvertError::UnknownType(c.type_oid, c.typmod))?;
            columns.push(Col { key: c.key, name: escaped(&c.name), type_name, type_oid: c.type_oid });
        }
        Ok(Rel { hidden, schema: escaped(schema), table: escaped(&r.name), full: r.replica_identity == b'f', columns })
    }

    /// wal2json skips an update or delete of a table that has neither a replica
    /// identity index nor REPLICA IDENTITY FULL (with a WARNING).
    fn identifies_rows(&self) -> bool {
        self.full || self.columns.iter().any(|c| c.key)
    }

    /// The `"schema":..,"table":..` pair.
    fn write_names(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\"schema\":");
        out.extend_from_slice(&self.schema);
        out.extend_from_slice(b",\"table\":");
        out.extend_from_slice(&self.table);
    }

    /// The columns of `tuple` that `pick` selects, with their values; unchanged TOAST
    /// values left out, and NULLs too when `skip_nulls`.
    fn columns<'a>(&'a self, tuple: &'a Tuple, pick: Pick, skip_nulls: bool) -> Result<Vec<Shown<'a>>, ConvertError> {
        if tuple.len() != self.columns.len() {
            return Err(ConvertError::ColumnCount { relation: self.columns.len(), tuple: tuple.len() });
        }
        let mut out = Vec::with_capacity(tuple.len());
        for (col, datum) in self.columns.iter().zip(tuple) {
            if pick == Pick::Keys && !col.key {
                continue;
            }
            let value = match datum {
                Datum::Unchanged => continue,
                Datum::Null if skip_nulls => continue,
                Datum::Null => None,
                Datum::Text(text) => Some(&text[..]),
                Datum::Binary(_) => return Err(ConvertError::Binary),
            };
            out.push((col, value));
        }
        Ok(out)
    }

    /// A format 1 change object (without the comma that separates it from the one
    /// before); false when wal2json would print nothing for it.
    pub fn v1(&self, out: &mut Vec<u8>, change: Change<'_>) -> Result<bool, ConvertError> {
        let kind: &[u8] = match change {
            Change::Insert(_) => b"insert",
            Change::Update { .. } => b"update",
            Change::Delete(_) => b"delete",
        };
        if !matches!(change, Change::Insert(_)) && !self.identifies_rows() {
            return Ok(false);
        }
        out.extend_from_slice(b"{\"kind\":\"");
        out.extend_from_slice(kind);
        out.extend_from_slice(b"\",");
        self.write_names(out);
        if let Change::Insert(new) | Change::Update { new, .. } = change {
            out.extend_from_slice(b",");
            let columns = self.columns(new, Pick::All, false)?;
            v1_arrays(out, [&b"\"columnnames\""[..], b"\"columntypes\"", b"\"columnvalues\""], &columns)?;
        }
        let old = match change {
            Change::Insert(_) => None,
            // Format 1 takes every non-NULL column of an old row pgoutput sent: a `K`
            // row has NULLs but in its key columns.
            Change::Update { old: Some(old), .. } => Some(self.columns(&old.tuple, Pick::All, true)?),
            Change::Update { old: None, new } => Some(self.columns(new, Pick::Keys, true)?),
            Change::Delete(old) => {
                let pick = if old.whole_row { Pick::All } else { Pick::Keys };
                Some(self.columns(&old.tuple, pick, true)?)
            }
        };
        if let Some(old) = old {
            out.extend_from_slice(b",\"oldkeys\":{");
            v1_arrays(out, [&b"\"keynames\""[..], b"\"keytypes\"", b"\"keyvalues\""], &old)?;
            out.push(b'}');
        }
        out.push(b'}');
        Ok(true)
    }

    /// A format 2 record; false when wal2json would print nothing for it.
    pub fn v2(&self, out: &mut Vec<u8>, lsn: Lsn, change: Change<'_>) -> Result<bool, ConvertError> {
        let (action, new, identity) = match change {
            Change::Insert(new) => (b'I', Some(new), None),
            Change::Update { old: Some(old), new } => (b'U', Some(new), Some(self.identity(old)?)),
            Change::Update { old: None, new } if self.identifies_rows() => {
                (b'U', Some(new), Some(self.columns(new, Pick::Keys, false)?))
            }
            Change::Update { old: None, .. } => return Ok(false),
            Change::Delete(old) => (b'D', None, Some(self.identity(old)?)),
        };
        out.extend_from_slice(b"{\"action\":\"");
        out.push(action);
        out.extend_from_slice(format!("\",\"lsn\":\"{lsn}\",").as_bytes());
        self.write_names(out);
        if let Some(new) = new {
            out.extend_from_slice(b",\"columns\":");
            v2_array(out, &self.columns(new, Pick::All, false)?)?;
        }
        if let Some(identity) = identity {
            out.extend_from_slice(b",\"identity\":");
            v2_array(out, &identity)?;
        }
        out.push(b'}');
        Ok(true)
    }

    /// Format 2's identity from an old row: its key columns (`K`), or all of them
    /// (`O`, REPLICA IDENTITY FULL), NULLs included.
    fn identity<'a>(&'a self, old: &'a OldTuple) -> Result<Vec<Shown<'a>>, ConvertError> {
        self.columns(&old.tuple, if old.whole_row || self.full { Pick::All } else { Pick::Keys }, false)
    }

    /// A format 2 truncate record.
    pub(crate) fn v2_truncate(&self, out: &mut Vec<u8>, lsn: Lsn) {
        out.extend_from_slice(format!("{{\"action\":\"T\",\"lsn\":\"{lsn}\",").as_bytes());
        self.write_names(out);
        out.push(b'}');
    }
}

fn escaped(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    json::escape(&mut out, s);
    out
}

/// Format 1's three parallel arrays: `"names":[..],"types":[..],"values":[..]`.
fn v1_arrays(out: &mut Vec<u8>, keys: [&[u8]; 3], columns: &[Shown<'_>]) -> Result<(), ConvertError> {
    let list = |out: &mut Vec<u8>, key: &[u8], part: &dyn Fn(&Col) -> &[u8]| {
        out.extend_from_slice(key);
        out.extend_from_slice(b":[");
        for (i, (col, _)) in columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(part(col));
        }
        out.extend_from_slice(b"],");
    };
    list(out, keys[0], &|c| &c.name);
    list(out, keys[1], &|c| &c.type_name);
    out.extend_from_slice(keys[2]);
    out.extend_from_slice(b":[");
    for (i, (col, value)) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_value(out, Mode::Wal2json, col.type_oid, char_as_15(col.type_oid, *value).as_deref())?;
    }
    out.push(b']');
    Ok(())
}

/// The `"char"` type's oid.
const CHAR_OID: u32 = 18;

/// A `"char"` of a byte with the high bit set, as PostgreSQL 15 and later print it:
/// `\ooo`. Before 15 its output function sends the byte as it is, which in a UTF8
/// database is not text at all (a stream that refused it would stop at it for good).
fn char_as_15(type_oid: u32, value: Option<&[u8]>) -> Option<std::borrow::Cow<'_, [u8]>> {
    match value? {
        [byte] if type_oid == CHAR_OID && *byte >= 0x80 => Some(format!("\\{byte:03o}").into_bytes().into()),
        value => Some(value.into()),
    }
}

/// Format 2's `[{"name":..,"type":..,"value":..},..]`.
fn v2_array(out: &mut Vec<u8>, columns: &[Shown<'_>]) -> Result<(), ConvertError> {
    out.push(b'[');
    for (i, (col, value)) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        out.extend_from_slice(&col.name);
        out.extend_from_slice(b",\"type\":");
        out.extend_from_slice(&col.type_name);
        out.extend_from_slice(b",\"value\":");
        write_value(out, Mode::Wal2json, col.type_oid, char_as_15(col.type_oid, *value).as_deref())?;
        out.push(b'}');
    }
    out.push(b']');
    Ok(())
}

#[cfg(test)]
mod char_tests {
    use super::*;

    #[test]
    fn a_char_with_the_high_bit_reads_as_15_prints_it() {
        assert_eq!(char_as_15(CHAR_OID, Some(&[0xE9])).as_deref(), Some(&b"\\351"[..]));
        assert_eq!(char_as_15(CHAR_OID, Some(b"Z")).as_deref(), Some(&b"Z"[..]));
        assert_eq!(char_as_15(25, Some(&[0xE9])).as_deref(), Some(&[0xE9][..]));
        assert_eq!(char_as_15(CHAR_OID, None), None);
    }
}
