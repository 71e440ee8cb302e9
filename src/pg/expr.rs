//! SQL expressions a client writes (a session's row filter), checked to be one
//! expression before they are placed in a statement.
//!
//! An expression goes into SQL as `(text)`. It stays one expression there only if no
//! token of it closes that parenthesis or ends the statement, and no comment swallows
//! what follows it. So the text is scanned here the way Postgres's lexer scans it
//! (string and identifier quoting, dollar quotes), and refused unless, outside its
//! literals, its parentheses and brackets balance, and it has no `;` and no comment.
//! Postgres then checks that the same text is a valid expression (see
//! `publications.rs`), and that it was read as only what it was meant to be.
//!
//! The scan assumes `standard_conforming_strings = on` (a backslash in `'...'` is an
//! ordinary character); the statements that carry the text set it.

/// Longer filters are refused: a row filter is a condition, not a program.
pub(crate) const MAX_EXPRESSION_BYTES: usize = 8 * 1024;

/// Why a text is not one expression (shown to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ExprError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_EXPRESSION_BYTES} bytes")]
    TooLong,
    #[error("contains a NUL byte")]
    Nul,
    #[error("contains a control character at byte {0}")]
    Control(usize),
    #[error("has a comment at byte {0} (-- or /*): leave comments out")]
    Comment(usize),
    #[error("has a ; at byte {0}: it must be one expression, not statements")]
    Semicolon(usize),
    #[error("has a {0:?} at byte {1} that closes nothing it opened")]
    Unbalanced(char, usize),
    #[error("leaves a {0:?} open")]
    Unclosed(char),
    #[error("has an unterminated {0} starting at byte {1}")]
    Unterminated(&'static str, usize),
}

/// Checks that `text`, placed in SQL as `(text)`, is read by Postgres as one
/// parenthesized piece with nothing after it.
pub(crate) fn check_expression(text: &str) -> Result<(), ExprError> {
    if text.trim().is_empty() {
        return Err(ExprError::Empty);
    }
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(ExprError::TooLong);
    }
    let b = text.as_bytes();
    let mut open: Vec<(u8, usize)> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            0 => return Err(ExprError::Nul),
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            _ if c < 0x20 || c == 0x7f => return Err(ExprError::Control(i)),
            b'-' if b.get(i + 1) == Some(&b'-') => return Err(ExprError::Comment(i)),
            b'/' if b.get(i + 1) == Some(&b'*') => return Err(ExprError::Comment(i)),
            b';' => return Err(ExprError::Semicolon(i)),
            b'(' | b'[' => {
                open.push((c, i));
                i += 1;
            }
            b')' | b']' => {
                let opener = if c == b')' { b'(' } else { b'[' };
                match open.pop() {
                    Some((o, _)) if o == opener => i += 1,
                    _ => return Err(ExprError::Unbalanced(c as char, i)),
                }
            }
            b'\'' => i = quoted(b, i, b'\'', false, "string")?,
            b'"' => i = quoted(b, i, b'"', false, "quoted identifier")?,
            b'$' => i = dollar(b, i)?,
            _ if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident_cont(b[i]) {
                    i += 1;
                }
                // E'...': the one string in which a backslash escapes the next byte.
                if i - start == 1 && matches!(c, b'e' | b'E') && b.get(i) == Some(&b'\'') {
                    i = quoted(b, i, b'\'', true, "string")?;
                }
            }
            _ => i += 1,
        }
    }
    match open.pop() {
        Some((c, _)) => Err(ExprError::Unclosed(c as char)),
        None => Ok(()),
    }
}

/// Postgres's `ident_start`: every byte of a multibyte character counts as a letter.
fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// `ident_cont`: identifiers may contain `$` (so `a$$` is a name, not a dollar quote).
fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Skips the literal opened by `q` at `start` (doubled `q` is one `q`; with
/// `backslash`, `\` escapes the byte after it); answers the index after it.
fn quoted(b: &[u8], start: usize, q: u8, backslash: bool, what: &'static str) -> Result<usize, ExprError> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            0 => return Err(ExprError::Nul),
            b'\\' if backslash => i += 2,
            c if c == q => {
                if b.get(i + 1) == Some(&q) {
                    i += 2;
                } else {
                    return Ok(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    Err(ExprError::Unterminated(what, start))
}

/// A `$` outside a name: a dollar quote `$tag$...$tag$` (tag empty or a name without
/// `$`), or anything else Postgres makes of a `$` (a parameter `$1`, which it refuses
/// here later), one byte.
fn dollar(b: &[u8], start: usize) -> Result<usize, ExprError> {
    let mut i = start + 1;
    if i < b.len() && is_ident_start(b[i]) {
        i += 1;
        while i < b.len() && (is_ident_start(b[i]) || b[i].is_ascii_digit()) {
            i += 1;
        }
    }
    if b.get(i) != Some(&b'$') {
        return Ok(start + 1);
    }
    let delimiter = &b[start..=i];
    let body = i + 1;
    match b[body..].windows(delimiter.len()).position(|w| w == delimiter) {
        Some(at) if !b[body..body + at].contains(&0) => Ok(body + at + delimiter.len()),
        Some(_) => Err(ExprError::Nul),
        None => Err(ExprError::Unterminated("dollar-quoted string", start)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn expressions_pass() {
        for ok in [
            "amount > 100",
            "true",
            "(a > 1) AND (b < 2)",
            "item = 'a) --'",
            "item = 'it''s ; /* not a comment */'",
            "item = E'\\' ) --'",
            "\"Odd ) Name\" = 1",
            "\"a\"\"b\" IS NULL",
            "item = $$x); -- $$",
            "item = $tag$ $$ ) $tag$",
            "a$$b = 1",
            "arr[1] = 2",
            "U&'\\0041' = 'A'",
            "x - -1 > 0",
            "a / 2 > 1",
            "é = 1",
        ] {
            assert_eq!(check_expression(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn escapes_are_refused() {
        for (bad, want) in [
            ("true) --", ExprError::Unbalanced(')', 4)),
            ("true --", ExprError::Comment(5)),
            ("true); drop table x; --", ExprError::Unbalanced(')', 4)),
            ("true; drop table x", ExprError::Semicolon(4)),
            ("true /* c */", ExprError::Comment(5)),
            ("true) /*", ExprError::Unbalanced(')', 4)),
            ("amount > 1), TABLE items WHERE (true", ExprError::Unbalanced(')', 10)),
            ("(true", ExprError::Unclosed('(')),
            ("arr[1)", ExprError::Unbalanced(')', 5)),
            ("item = 'open", ExprError::Unterminated("string", 7)),
            ("item = E'\\'", ExprError::Unterminated("string", 8)),
            ("\"open", ExprError::Unterminated("quoted identifier", 0)),
            ("item = $$open", ExprError::Unterminated("dollar-quoted string", 7)),
            ("item = $a$ x $b$", ExprError::Unterminated("dollar-quoted string", 7)),
            ("true\0", ExprError::Nul),
            ("'a\0'", ExprError::Nul),
            ("true\x1b", ExprError::Control(4)),
            ("", ExprError::Empty),
            ("   ", ExprError::Empty),
        ] {
            assert_eq!(check_expression(bad), Err(want), "{bad:?}");
        }
        assert_eq!(check_expression(&"1".repeat(MAX_EXPRESSION_BYTES + 1)), Err(ExprError::TooLong));
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = check_expression(&s);
        }

        /// Whatever passes has, outside literals, balanced parentheses and no `;`:
        /// checked again by a second, simpler scan over texts without quotes.
        #[test]
        fn unquoted_texts_that_pass_balance(s in "[a-z0-9 ()<>=;+*/-]{0,40}") {
            if check_expression(&s).is_ok() {
                let mut depth = 0i32;
                for c in s.chars() {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    prop_assert!(depth >= 0, "{s:?}");
                }
                prop_assert_eq!(depth, 0, "{:?}", s);
                prop_assert!(!s.contains(';') && !s.contains("--") && !s.contains("/*"), "{:?}", s);
            }
        }
    }
}
