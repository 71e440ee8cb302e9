//! wal2json's JSON rules, byte for byte: Postgres's `escape_json`, the value rules of
//! `pg_decode_write_value`, and how a type name is quoted. Bytes, not strings: a
//! logical message's content need not be UTF-8, and wal2json copies it as it is.

use crate::types::value::{BOOLOID, BYTEAOID, FLOAT4OID, FLOAT8OID, INT2OID, INT4OID, INT8OID, NUMERICOID, OIDOID};

/// A numeric type's text that is not a number: wal2json raises an ERROR on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a number")]
pub struct NotANumber(pub String);

/// Appends `s` as Postgres's `escape_json` does: it stops at a NUL (it reads a C
/// string), escapes `"` `\` and the control characters (`\u00XX` in lowercase hex
/// but for the five short forms) and copies every other byte.
pub fn escape(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &b in s {
        match b {
            0 => break,
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c < b' ' => {
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(c >> 4)], HEX[usize::from(c & 0xf)]])
            }
            c => out.push(c),
        }
    }
    out.push(b'"');
}

/// A type name from `format_type` as wal2json prints it: a name that `format_type`
/// quoted already (`"Mood"`) is copied as it is, unless it ends in `]` (an array of
/// such a type, `"Mood"[]`), which is escaped like any other name.
pub fn type_name(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    if name.first() == Some(&b'"') && name.last() != Some(&b']') {
        out.extend_from_slice(name);
    } else {
        escape(&mut out, name);
    }
    out
}

/// Appends a value's text (its type's output) by the column's type oid: numbers bare
/// (NaN and infinities as `null`), booleans, bytea's hex without `\x`, anything else a
/// string. `None` is NULL.
pub fn value(out: &mut Vec<u8>, type_oid: u32, text: Option<&[u8]>) -> Result<(), NotANumber> {
    let Some(text) = text else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    match type_oid {
        INT2OID | INT4OID | INT8OID | OIDOID | FLOAT4OID | FLOAT8OID | NUMERICOID => {
            // pg_strncasecmp on a prefix: "nan", "infinity" and "-infinity" in any case.
            let starts = |p: &[u8]| text.len() >= p.len() && text[..p.len()].eq_ignore_ascii_case(p);
            if starts(b"NaN") || starts(b"Infinity") || starts(b"-Infinity") {
                out.extend_from_slice(b"null");
            } else if text.iter().all(|b| b"0123456789+-eE.".contains(b)) {
                out.extend_from_slice(text);
            } else {
                return Err(NotANumber(String::from_utf8_lossy(text).into_owned()));
            }
        }
        BOOLOID => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        BYTEAOID => escape(out, text.get(2..).unwrap_or_default()),
        _ => escape(out, text),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &[u8]) -> String {
        let mut out = Vec::new();
        escape(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    fn val(oid: u32, text: Option<&str>) -> Result<String, NotANumber> {
        let mut out = Vec::new();
        value(&mut out, oid, text.map(str::as_bytes))?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn escapes_like_postgres() {
        assert_eq!(esc(b"a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(esc(b"\x08\x0c\n\r\t\x01\x1f"), r#""\b\f\n\r\t\u0001\u001f""#);
        assert_eq!(esc("é/\x7f".as_bytes()), "\"é/\x7f\"");
        assert_eq!(esc(b"cut\0here"), r#""cut""#, "a C string ends at its NUL");
    }

    #[test]
    fn values_by_type() {
        assert_eq!(val(INT4OID, Some("-12")).unwrap(), "-12");
        assert_eq!(val(NUMERICOID, Some("3.540")).unwrap(), "3.540");
        assert_eq!(val(FLOAT8OID, Some("1e+30")).unwrap(), "1e+30");
        for special in ["NaN", "Infinity", "-Infinity", "nan"] {
            assert_eq!(val(FLOAT4OID, Some(special)).unwrap(), "null");
        }
        assert!(val(INT8OID, Some("12a")).is_err());
        assert_eq!(val(BOOLOID, Some("t")).unwrap(), "true");
        assert_eq!(val(BOOLOID, Some("f")).unwrap(), "false");
        assert_eq!(val(BYTEAOID, Some("\\x00ff")).unwrap(), r#""00ff""#);
        assert_eq!(val(25, Some("{1,2}")).unwrap(), r#""{1,2}""#);
        assert_eq!(val(25, None).unwrap(), "null");
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(b"character varying(20)"), br#""character varying(20)""#);
        assert_eq!(type_name(br#""Mood""#), br#""Mood""#);
        assert_eq!(type_name(br#""Mood"[]"#), br#""\"Mood\"[]""#);
    }
}
