//! The JSON encoding of a single Postgres value, exactly as wal2json writes it.
//!
//! wal2json never looks at a value's binary form: it calls the type's output
//! function (the same text `psql` shows) and then decides, from the column's
//! type OID alone, whether to print that text bare (numbers, booleans) or as
//! a JSON string (everything else). A snapshot read with the text protocol
//! gives us the same text and the same OID, so by applying the same rules
//! here a snapshot row comes out byte-for-byte like a streamed one.
//!
//! One subtlety for callers: wal2json picks the rule by the column's declared
//! type. A domain over `integer` has its own OID, so its values are strings,
//! not numbers (in format 1 with `include-domain-data-type` on, wal2json uses
//! the base type's OID instead; pass that OID here in that case).

/// `bool`
pub const BOOLOID: u32 = 16;
/// `bytea`
pub const BYTEAOID: u32 = 17;
/// `bigint` / `int8`
pub const INT8OID: u32 = 20;
/// `smallint` / `int2`
pub const INT2OID: u32 = 21;
/// `integer` / `int4`
pub const INT4OID: u32 = 23;
/// `oid`
pub const OIDOID: u32 = 26;
/// `real` / `float4`
pub const FLOAT4OID: u32 = 700;
/// `double precision` / `float8`
pub const FLOAT8OID: u32 = 701;
/// `numeric` / `decimal`
pub const NUMERICOID: u32 = 1700;

/// Appends the JSON for one value: `type_oid` is the column's type and `text`
/// the output function's text, or `None` for SQL NULL.
///
/// * NULL → `null`.
/// * int2, int4, int8, oid, float4, float8, numeric → the text bare, every
///   digit kept (`3.540`, `9223372036854775807`, `1e+30`); `NaN`, `Infinity`
///   and `-Infinity` have no JSON form and become `null`, as in wal2json.
/// * bool → `true` / `false`.
/// * bytea → the hex digits as a string, without the leading `\x`.
/// * anything else → the text as a JSON string.
///
/// wal2json trusts Postgres here (it raises an ERROR on a non-number and
/// prints `false` for any non-`t` boolean). We cannot raise an ERROR in the
/// middle of a snapshot, so text that doesn't fit its type's rule is written
/// as a JSON string instead: the output is always valid JSON.
pub fn write_value(out: &mut String, type_oid: u32, text: Option<&str>) {
    let Some(text) = text else {
        out.push_str("null");
        return;
    };
    match type_oid {
        INT2OID | INT4OID | INT8OID | OIDOID | FLOAT4OID | FLOAT8OID | NUMERICOID => {
            if matches!(text, "NaN" | "Infinity" | "-Infinity") {
                out.push_str("null");
            } else if is_json_number(text) {
                // Copy the text itself: going through f64 would lose digits
                // (int8's max, numeric's scale as in `3.540`).
                out.push_str(text);
            } else {
                write_json_string(out, text);
            }
        }
        BOOLOID => match text {
            "t" | "true" => out.push_str("true"),
            "f" | "false" => out.push_str("false"),
            _ => write_json_string(out, text),
        },
        // bytea's default output (`bytea_output = hex`) is `\x` then hex
        // digits. The `escape` format has no `\x` prefix: keep it whole.
        BYTEAOID => write_json_string(out, text.strip_prefix("\\x").unwrap_or(text)),
        _ => write_json_string(out, text),
    }
}

/// Is `s` exactly one number in JSON's grammar (RFC 8259)?
///
/// ```text
/// number = [ "-" ] int [ frac ] [ exp ]
/// int    = "0" / ( digit1-9 *digit )
/// frac   = "." 1*digit
/// exp    = ( "e" / "E" ) [ "-" / "+" ] 1*digit
/// ```
///
/// No leading `+`, no leading zeros, no bare `.5` or `5.`, no whitespace.
pub fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;

    // Advances `i` over a run of ASCII digits and says how many there were.
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };

    if b.first() == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// What to write for each byte value: 0 means "copy as is", anything else is
/// the character after the backslash (`u` for the `\u00XX` form).
///
/// A table keeps the hot loop to one load and one compare per byte.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = b'u';
        i += 1;
    }
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `s` as a JSON string literal, quotes included, escaping exactly as
/// Postgres's `escape_json` does (which is what wal2json calls).
///
/// `"` and `\` are backslash-escaped; `\b \f \n \r \t` use their short forms;
/// other control characters become `\u00XX` with lowercase hex; everything
/// else, non-ASCII included, is copied unchanged.
pub fn write_json_string(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";

    out.reserve(s.len() + 2);
    out.push('"');

    // Copy whole runs of plain bytes with one push_str each. Every byte that
    // needs escaping is ASCII, and an ASCII byte is always a char boundary in
    // UTF-8, so the slices below always fall on boundaries.
    let mut run_start = 0;
    for (i, &byte) in s.as_bytes().iter().enumerate() {
        let esc = ESCAPE[usize::from(byte)];
        if esc == 0 {
            continue;
        }
        out.push_str(&s[run_start..i]);
        out.push('\\');
        out.push(char::from(esc));
        if esc == b'u' {
            out.push_str("00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        run_start = i + 1;
    }
    out.push_str(&s[run_start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value(type_oid: u32, text: Option<&str>) -> String {
        let mut out = String::new();
        write_value(&mut out, type_oid, text);
        out
    }

    fn string(s: &str) -> String {
        let mut out = String::new();
        write_json_string(&mut out, s);
        out
    }

    #[test]
    fn null_is_null_for_every_type() {
        for oid in [BOOLOID, BYTEAOID, INT4OID, NUMERICOID, 25, 0, u32::MAX] {
            assert_eq!(value(oid, None), "null");
        }
    }

    #[test]
    fn numbers_are_bare_and_keep_their_digits() {
        assert_eq!(value(INT4OID, Some("1")), "1");
        assert_eq!(value(INT2OID, Some("-32768")), "-32768");
        assert_eq!(value(INT8OID, Some("9223372036854775807")), "9223372036854775807");
        assert_eq!(value(OIDOID, Some("4294967295")), "4294967295");
        assert_eq!(value(NUMERICOID, Some("3.540")), "3.540");
        assert_eq!(value(NUMERICOID, Some("-0.000001")), "-0.000001");
        assert_eq!(value(FLOAT8OID, Some("1e+30")), "1e+30");
        assert_eq!(value(FLOAT8OID, Some("-0")), "-0");
        assert_eq!(value(FLOAT4OID, Some("3.4028235e+38")), "3.4028235e+38");
        assert_eq!(value(FLOAT8OID, Some("1.5e-07")), "1.5e-07");
    }

    #[test]
    fn non_finite_numbers_are_null() {
        for oid in [FLOAT4OID, FLOAT8OID, NUMERICOID] {
            for special in ["NaN", "Infinity", "-Infinity"] {
                assert_eq!(value(oid, Some(special)), "null", "{oid} {special}");
            }
        }
    }

    #[test]
    fn bad_number_text_becomes_a_string() {
        assert_eq!(value(INT4OID, Some("")), r#""""#);
        assert_eq!(value(INT4OID, Some("12abc")), r#""12abc""#);
        assert_eq!(value(NUMERICOID, Some(".5")), r#"".5""#);
        assert_eq!(value(NUMERICOID, Some("+5")), r#""+5""#);
        assert_eq!(value(NUMERICOID, Some("nan")), r#""nan""#);
    }

    #[test]
    fn booleans() {
        assert_eq!(value(BOOLOID, Some("t")), "true");
        assert_eq!(value(BOOLOID, Some("f")), "false");
        assert_eq!(value(BOOLOID, Some("true")), "true");
        assert_eq!(value(BOOLOID, Some("false")), "false");
        assert_eq!(value(BOOLOID, Some("yes")), r#""yes""#);
    }

    #[test]
    fn bytea_drops_the_hex_prefix() {
        assert_eq!(value(BYTEAOID, Some(r"\x0a0b")), r#""0a0b""#);
        assert_eq!(value(BYTEAOID, Some(r"\x")), r#""""#);
        // `bytea_output = escape` text has no prefix and may hold backslashes.
        assert_eq!(value(BYTEAOID, Some(r"ab\000")), r#""ab\\000""#);
    }

    #[test]
    fn other_types_are_strings() {
        assert_eq!(value(25, Some("hello")), r#""hello""#);
        // json/jsonb and arrays are strings too, as in wal2json.
        assert_eq!(value(3802, Some(r#"{"a": 1}"#)), r#""{\"a\": 1}""#);
        assert_eq!(value(1007, Some("{1,2,3}")), r#""{1,2,3}""#);
        assert_eq!(value(1184, Some("2026-11-24 13:55:54.462002+00")), r#""2026-11-24 13:55:54.462002+00""#);
        // An integer-looking text of a non-numeric type stays a string.
        assert_eq!(value(25, Some("42")), r#""42""#);
    }

    #[test]
    fn json_string_escapes() {
        assert_eq!(string(""), r#""""#);
        assert_eq!(string("plain"), r#""plain""#);
        assert_eq!(string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(string("\u{8}\u{c}\n\r\t"), r#""\b\f\n\r\t""#);
        assert_eq!(string("\u{0}\u{1}\u{1f}"), r#""\u0000\u0001\u001f""#);
        assert_eq!(string("\u{1b}"), r#""\u001b""#);
        // DEL, non-ASCII and `/` are not escaped.
        assert_eq!(string("\u{7f}é€😀/"), "\"\u{7f}é€😀/\"");
        assert_eq!(string("x\ny"), r#""x\ny""#);
        // Appends, never clears.
        let mut out = String::from("[");
        write_json_string(&mut out, "a");
        assert_eq!(out, r#"["a""#);
    }

    #[test]
    fn json_number_grammar() {
        for good in ["0", "-0", "1", "10", "-10", "0.0", "1.25", "1e5", "1E5", "1e+5", "1e-5", "1.5e10", "0e0", "1e007"]
        {
            assert!(is_json_number(good), "{good:?} should be a number");
        }
        for bad in [
            "", "-", "+1", "01", "-01", ".5", "5.", "1.e5", "1e", "1e+", "e5", "1 ", " 1", "1.2.3", "0x10", "NaN",
            "Infinity", "1_000", "--1", "١",
        ] {
            assert!(!is_json_number(bad), "{bad:?} should not be a number");
        }
    }

    /// serde_json's spelling of a number's exponent: `e`, then always a sign.
    fn normalize_exponent(text: &str) -> String {
        match text.find(['e', 'E']) {
            None => text.to_owned(),
            Some(at) => {
                let (mantissa, exp) = (&text[..at], &text[at + 1..]);
                let exp = if exp.starts_with(['+', '-']) { exp.to_owned() } else { format!("+{exp}") };
                format!("{mantissa}e{exp}")
            }
        }
    }

    #[test]
    fn postgres_float_output_survives_serde_json_unchanged() {
        for text in ["1e+30", "1.5e-07", "-3.4028235e+38", "1e-310", "0.1"] {
            let n: serde_json::Number = serde_json::from_str(&value(FLOAT8OID, Some(text))).unwrap();
            assert_eq!(n.to_string(), text);
        }
    }

    /// A type OID: mostly the ones with special rules, sometimes any.
    fn type_oid() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(BOOLOID),
            Just(BYTEAOID),
            Just(INT2OID),
            Just(INT4OID),
            Just(INT8OID),
            Just(OIDOID),
            Just(FLOAT4OID),
            Just(FLOAT8OID),
            Just(NUMERICOID),
            any::<u32>(),
        ]
    }

    /// Text that is often number-like, so the numeric branch gets exercised.
    fn value_text() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![
            any::<String>(),
            "[-+0-9eE.]{0,12}",
            r"\\x[0-9a-f]{0,8}",
            Just("t".to_owned()),
            Just("NaN".to_owned()),
        ])
    }

    proptest! {
        #[test]
        fn output_is_always_valid_json(oid in type_oid(), text in value_text()) {
            let out = value(oid, text.as_deref());
            let parsed = serde_json::from_str::<serde_json::Value>(&out);
            prop_assert!(parsed.is_ok(), "{out:?} is not JSON");
        }

        #[test]
        fn numbers_keep_every_digit(
            text in r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
            oid in prop::sample::select(vec![
                INT2OID, INT4OID, INT8OID, OIDOID, FLOAT4OID, FLOAT8OID, NUMERICOID,
            ]),
        ) {
            let out = value(oid, Some(&text));
            prop_assert_eq!(&out, &text);
            // arbitrary_precision keeps a Number's digits. It does rewrite
            // the exponent marker to `e+`/`e-` (`1E5` → `1e+5`); Postgres
            // always prints that form anyway (`1e+30`, `1.5e-07`).
            let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
            let serde_json::Value::Number(n) = parsed else {
                return Err(TestCaseError::fail(format!("{out} is not a number")));
            };
            prop_assert_eq!(n.to_string(), normalize_exponent(&text));
        }

        #[test]
        fn number_validator_agrees_with_serde_json(text in "[-+0-9eE.]{0,12}") {
            // serde_json accepts exactly JSON's number grammar for a lone
            // number (plus surrounding whitespace, which our strategy lacks).
            let serde_says = matches!(
                serde_json::from_str::<serde_json::Value>(&text),
                Ok(serde_json::Value::Number(_))
            );
            prop_assert_eq!(is_json_number(&text), serde_says, "{:?}", text);
        }

        #[test]
        fn strings_round_trip(s in any::<String>()) {
            let out = string(&s);
            let back: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn control_heavy_strings_round_trip(s in "[\\x00-\\x1f\"\\\\a-zé]{0,40}") {
            let out = string(&s);
            let back: String = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
