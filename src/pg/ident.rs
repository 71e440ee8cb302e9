//! SQL identifiers as users type them: parsed, checked, and quoted.
//!
//! User text reaches SQL only through this module: a table reference is parsed into
//! its parts by a strict grammar, looked up in the catalog with the parts as query
//! parameters, and pasted into SQL only as the catalog's own names, quoted.

use std::fmt;

/// Postgres truncates longer identifiers silently (NAMEDATALEN - 1), which could make
/// a name match a different object; we refuse them instead.
pub const MAX_IDENT_BYTES: usize = 63;

/// `name` or `schema.name`, each part as Postgres would resolve it: unquoted parts
/// folded to lower case, quoted parts ("My Table") kept as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    pub schema: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_IDENT_BYTES} bytes")]
    TooLong,
    #[error("has an unterminated quoted identifier")]
    Unterminated,
    #[error("has an unexpected character {0:?} at byte {1}")]
    Unexpected(char, usize),
    #[error("has more than two dot-separated parts (expected name or schema.name)")]
    TooManyParts,
}

impl TableRef {
    /// Parses `name`, `schema.name`, with optional double quotes around either part.
    /// Anything else (spaces, parentheses, semicolons, comments, ...) is an error.
    pub fn parse(input: &str) -> Result<TableRef, IdentError> {
        let mut parts = Vec::with_capacity(2);
        let mut rest = input;
        let mut offset = 0;
        loop {
            let (part, used) = parse_part(rest, offset)?;
            parts.push(part);
            rest = &rest[used..];
            offset += used;
            match rest.chars().next() {
                None => break,
                Some('.') => {
                    if parts.len() == 2 {
                        return Err(IdentError::TooManyParts);
                    }
                    rest = &rest[1..];
                    offset += 1;
                }
                Some(c) => return Err(IdentError::Unexpected(c, offset)),
            }
        }
        let name = parts.pop().ok_or(IdentError::Empty)?;
        Ok(TableRef { schema: parts.pop(), name })
    }
}

impl fmt::Display for TableRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{}.{}", quote_ident(s), quote_ident(&self.name)),
            None => write!(f, "{}", quote_ident(&self.name)),
        }
    }
}

/// Parses one identifier at the start of `s`; returns it and the bytes consumed.
fn parse_part(s: &str, offset: usize) -> Result<(String, usize), IdentError> {
    let mut chars = s.char_indices().peekable();
    match chars.peek() {
        None | Some((_, '.')) => Err(IdentError::Empty),
        Some((_, '"')) => {
            chars.next();
            let mut out = String::new();
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if let Some((_, '"')) = chars.peek() {
                        chars.next();
                        out.push('"');
                        continue;
                    }
                    return check(out, i + 1);
                }
                if c == '\0' {
                    return Err(IdentError::Unexpected(c, offset + i));
                }
                out.push(c);
            }
            Err(IdentError::Unterminated)
        }
        Some(&(_, c)) if c.is_ascii_alphabetic() || c == '_' => {
            let end = s
                .char_indices()
                .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                .map_or(s.len(), |(i, _)| i);
            check(s[..end].to_ascii_lowercase(), end)
        }
        Some(&(_, c)) => Err(IdentError::Unexpected(c, offset)),
    }
}

fn check(ident: String, used: usize) -> Result<(String, usize), IdentError> {
    if ident.is_empty() {
        Err(IdentError::Empty)
    } else if ident.len() > MAX_IDENT_BYTES {
        Err(IdentError::TooLong)
    } else {
        Ok((ident, used))
    }
}

/// Quotes an identifier for SQL: `a"b` becomes `"a""b"`.
pub(crate) fn quote_ident(s: &str) -> String {
    quote(s, '"')
}

/// Quotes a string literal for SQL (standard_conforming_strings, on since 9.1):
/// `it's` becomes `'it''s'`. Used only where the protocol allows no parameter
/// (replication command options, `SET TRANSACTION SNAPSHOT`).
pub(crate) fn quote_literal(s: &str) -> String {
    quote(s, '\'')
}

/// Wraps `s` in `q`, doubling every `q` inside.
fn quote(s: &str, q: char) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        if c == q {
            out.push(q);
        }
        out.push(c);
    }
    out.push(q);
    out
}

/// A replication slot name as Postgres accepts it: 1 to 63 of `[a-z0-9_]`.
pub(crate) fn is_valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IDENT_BYTES
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// An exported snapshot id as Postgres prints it, e.g. `00000003-0000001B-1`.
pub(crate) fn is_valid_snapshot_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(schema: Option<&str>, name: &str) -> TableRef {
        TableRef { schema: schema.map(str::to_owned), name: name.to_owned() }
    }

    #[test]
    fn parses_plain_and_qualified_names() {
        assert_eq!(TableRef::parse("test_table"), Ok(t(None, "test_table")));
        assert_eq!(TableRef::parse("Public.Test_Table"), Ok(t(Some("public"), "test_table")));
        assert_eq!(TableRef::parse("\"My Table\""), Ok(t(None, "My Table")));
        assert_eq!(TableRef::parse("s.\"a\"\"b\""), Ok(t(Some("s"), "a\"b")));
        assert_eq!(TableRef::parse("\"a.b\".c"), Ok(t(Some("a.b"), "c")));
        assert_eq!(TableRef::parse("_x$1"), Ok(t(None, "_x$1")));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a.b.c",
            "a b",
            "a;drop table x",
            "(select usename, passwd from pg_shadow) x",
            "a--",
            "a/*",
            "1abc",
            "\"unterminated",
            "\"\"",
            "a\"b\"",
            "é",
            "\"a\0\"",
        ] {
            assert!(TableRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(TableRef::parse(&"a".repeat(64)), Err(IdentError::TooLong));
        assert!(TableRef::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(t(Some("s"), "a\"b").to_string(), "\"s\".\"a\"\"b\"");
    }

    #[test]
    fn slot_names() {
        assert!(is_valid_slot_name("delta_face56"));
        for bad in ["", "Delta", "a-b", "a b", "a\"", &"a".repeat(64)] {
            assert!(!is_valid_slot_name(bad), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = TableRef::parse(&s);
        }

        #[test]
        fn display_parses_back(schema in proptest::option::of("[^\0]{1,15}"), name in "[^\0]{1,15}") {
            let r = TableRef { schema, name };
            prop_assert_eq!(TableRef::parse(&r.to_string()), Ok(r));
        }
    }
}
