//! wal2json's JSON rules as the stream needs them. A value and a string are written
//! by [`crate::types::value`] in [`Mode::Wal2json`], the encoder the snapshot shares;
//! what is the stream's alone is how a type name is quoted. Bytes, not strings: a
//! logical message's content need not be UTF-8, and wal2json copies it as it is.

use crate::types::value::{Mode, write_string};

pub(crate) use crate::types::value::NotANumber;

/// Appends `s` as Postgres's `escape_json` does, which wal2json calls: it stops at a
/// NUL (it reads a C string).
pub fn escape(out: &mut Vec<u8>, s: &[u8]) {
    write_string(out, Mode::Wal2json, s);
}

/// A type name from `format_type` as wal2json prints it: a name that `format_type`
/// quoted already (`"Mood"`) is copied as it is, unless it ends in `]` (an array of
/// such a type, `"Mood"[]`), which is escaped like any other name.
pub(crate) fn type_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    if name.first() == Some(&b'"') && name.last() != Some(&b']') {
        out.extend_from_slice(name);
    } else {
        escape(&mut out, name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names() {
        assert_eq!(type_name(b"character varying(20)"), br#""character varying(20)""#);
        assert_eq!(type_name(br#""Mood""#), br#""Mood""#);
        assert_eq!(type_name(br#""Mood"[]"#), br#""\"Mood\"[]""#);
    }
}
