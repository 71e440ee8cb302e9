//! The JSON encoding of a single Postgres value, as wal2json writes it: the one
//! encoder of both the snapshot's rows and the pgoutput stream's changes.
//!
//! wal2json never looks at a value's binary form: it calls the type's output
//! function (the same text `psql` shows) and then decides, from the column's
//! type OID alone, whether to print that text bare (numbers, booleans) or as
//! a JSON string (everything else). A snapshot read with the text protocol
//! gives us the same text and the same OID, so by applying the same rules
//! here a snapshot row comes out byte-for-byte like a streamed one.
//!
//! The two callers need different answers only for text Postgres never prints,
//! and [`Mode`] says which: the stream must be wal2json's bytes even there (its
//! ERROR included), a snapshot page must stay valid JSON. For every text an
//! output function does print the modes write the same bytes; the tests below
//! hold them to that.
//!
//! One subtlety for callers: wal2json picks the rule by the column's declared
//! type. A domain over `integer` has its own OID, so its values are strings,
//! not numbers (in format 1 with `include-domain-data-type` on, wal2json uses
//! the base type's OID instead; pass that OID here in that case).

/// `bool`
pub(crate) const BOOLOID: u32 = 16;
/// `bytea`
pub(crate) const BYTEAOID: u32 = 17;
/// `bigint` / `int8`
pub(crate) const INT8OID: u32 = 20;
/// `smallint` / `int2`
pub(crate) const INT2OID: u32 = 21;
/// `integer` / `int4`
pub(crate) const INT4OID: u32 = 23;
/// `oid`
pub(crate) const OIDOID: u32 = 26;
/// `real` / `float4`
pub(crate) const FLOAT4OID: u32 = 700;
/// `double precision` / `float8`
pub(crate) const FLOAT8OID: u32 = 701;
/// `numeric` / `decimal`
pub(crate) const NUMERICOID: u32 = 1700;

/// Which of the two readings of wal2json's rules to apply to text that does not
/// fit them. Text Postgres prints fits them, and both modes write it alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// wal2json 2.5's `pg_decode_write_value` and Postgres's `escape_json`, byte
    /// for byte: the pgoutput stream is compared with a wal2json slot's bytes, so
    /// it copies wal2json's checks as they are, even where they let invalid JSON
    /// through. A number type's text outside `0123456789+-eE.` is [`NotANumber`]
    /// (wal2json raises an ERROR); a boolean is `true` only for `t`; bytea drops
    /// its first two bytes whatever they are; a string ends at a NUL (C strings).
    Wal2json,
    /// Valid JSON for any text, because a snapshot page cannot raise an ERROR
    /// halfway: only the spellings Postgres prints get a number's, boolean's or
    /// NULL's form (a JSON number, `t`/`true`, `f`/`false`, exactly `NaN`,
    /// `Infinity` and `-Infinity`); other text is written as a JSON string, bytea
    /// without a `\x` prefix is kept whole, and a NUL is `\u0000`. Never an error.
    AlwaysValid,
}

/// A number type's text that is not a number: wal2json raises an ERROR on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not a number")]
pub struct NotANumber(pub String);

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
/// Text that fits none of these is [`Mode`]'s business; only
/// [`Mode::Wal2json`] returns an error, and then has written nothing.
pub(crate) fn write_value(out: &mut Vec<u8>, mode: Mode, type_oid: u32, text: Option<&[u8]>) -> Result<(), NotANumber> {
    let Some(text) = text else {
        out.extend_from_slice(b"null");
        return Ok(());
    };
    match type_oid {
        INT2OID | INT4OID | INT8OID | OIDOID | FLOAT4OID | FLOAT8OID | NUMERICOID => {
            if is_special_number(mode, text) {
                out.extend_from_slice(b"null");
                return Ok(());
            }
            match mode {
                // wal2json's `strspn(outputstr, "0123456789+-eE.")`.
                Mode::Wal2json if text.iter().all(|b| b"0123456789+-eE.".contains(b)) => out.extend_from_slice(text),
                Mode::Wal2json => return Err(NotANumber(String::from_utf8_lossy(text).into_owned())),
                // Copy the text itself: going through f64 would lose digits
                // (int8's max, numeric's scale as in `3.540`).
                Mode::AlwaysValid if is_json_number(text) => out.extend_from_slice(text),
                Mode::AlwaysValid => write_string(out, mode, text),
            }
        }
        BOOLOID => match (mode, text) {
            (_, b"t") => out.extend_from_slice(b"true"),
            (Mode::Wal2json, _) => out.extend_from_slice(b"false"),
            (Mode::AlwaysValid, b"true") => out.extend_from_slice(b"true"),
            (Mode::AlwaysValid, b"f" | b"false") => out.extend_from_slice(b"false"),
            (Mode::AlwaysValid, _) => write_string(out, mode, text),
        },
        // bytea's output (`bytea_output = hex`, pinned on our connections) is `\x`
        // then hex digits; wal2json skips two bytes blindly (`outputstr + 2`).
        BYTEAOID => {
            let hex = match mode {
                Mode::Wal2json => text.get(2..).unwrap_or_default(),
                Mode::AlwaysValid => text.strip_prefix(b"\\x").unwrap_or(text),
            };
            write_string(out, mode, hex)
        }
        _ => write_string(out, mode, text),
    }
    Ok(())
}

/// Is `text` a number type's `NaN` or infinity, which JSON cannot spell?
fn is_special_number(mode: Mode, text: &[u8]) -> bool {
    match mode {
        // wal2json's `pg_strncasecmp` on a prefix: any case, anything after.
        Mode::Wal2json => [&b"NaN"[..], b"Infinity", b"-Infinity"]
            .iter()
            .any(|p| text.get(..p.len()).is_some_and(|head| head.eq_ignore_ascii_case(p))),
        Mode::AlwaysValid => matches!(text, b"NaN" | b"Infinity" | b"-Infinity"),
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
pub(crate) fn is_json_number(b: &[u8]) -> bool {
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

/// Postgres's `escape_json` over `s`, quotes left to the caller: `emit` gets
/// each run of bytes to copy as a range of `s`, then the escape of the byte
/// that ended it, if any. Both sinks below share it, so bytes and text cannot
/// be escaped differently.
///
/// Every byte that needs escaping is ASCII, and an ASCII byte is always a char
/// boundary in UTF-8, so when `s` is UTF-8 every range falls on boundaries.
#[inline]
fn escape_runs(s: &[u8], mode: Mode, mut emit: impl FnMut(std::ops::Range<usize>, &[u8])) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run_start = 0;
    for (i, &byte) in s.iter().enumerate() {
        let esc = ESCAPE[usize::from(byte)];
        if esc == 0 {
            continue;
        }
        if byte == 0 && mode == Mode::Wal2json {
            // escape_json reads a C string: it ends at the NUL.
            emit(run_start..i, b"");
            return;
        }
        let long = [b'\\', b'u', b'0', b'0', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]];
        let short = [b'\\', esc];
        emit(run_start..i, if esc == b'u' { &long } else { &short });
        run_start = i + 1;
    }
    emit(run_start..s.len(), b"");
}

/// Appends `s` as a JSON string literal, quotes included, escaping exactly as
/// Postgres's `escape_json` does (which is what wal2json calls).
///
/// `"` and `\` are backslash-escaped; `\b \f \n \r \t` use their short forms;
/// other control characters become `\u00XX` with lowercase hex; everything
/// else, non-ASCII included, is copied unchanged: wal2json copies a value's
/// bytes whatever their encoding, and so does this. A NUL is where
/// [`Mode::Wal2json`] stops and [`Mode::AlwaysValid`] writes `\u0000`.
pub(crate) fn write_string(out: &mut Vec<u8>, mode: Mode, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    escape_runs(s, mode, |run, esc| {
        out.extend_from_slice(&s[run]);
        out.extend_from_slice(esc);
    });
    out.push(b'"');
}

/// [`write_string`] in [`Mode::AlwaysValid`] for a caller that builds text.
pub(crate) fn write_json_string(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    escape_runs(s.as_bytes(), Mode::AlwaysValid, |run, esc| {
        // The range is on char boundaries (see escape_runs) and every escape is ASCII.
        out.push_str(&s[run]);
        out.extend(esc.iter().map(|&b| char::from(b)));
    });
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODES: [Mode; 2] = [Mode::Wal2json, Mode::AlwaysValid];
    const NUMBER_TYPES: [u32; 7] = [INT2OID, INT4OID, INT8OID, OIDOID, FLOAT4OID, FLOAT8OID, NUMERICOID];

    fn encode(mode: Mode, type_oid: u32, text: Option<&str>) -> Result<String, NotANumber> {
        let mut out = Vec::new();
        write_value(&mut out, mode, type_oid, text.map(str::as_bytes))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// A value in both modes, which must agree: for the text Postgres prints.
    fn value(type_oid: u32, text: Option<&str>) -> String {
        let valid = encode(Mode::AlwaysValid, type_oid, text).unwrap();
        assert_eq!(encode(Mode::Wal2json, type_oid, text).as_ref(), Ok(&valid), "{type_oid} {text:?}");
        valid
    }

    /// A value where wal2json's reading and ours part: text Postgres never prints.
    fn wal2json(type_oid: u32, text: &str) -> Result<String, NotANumber> {
        encode(Mode::Wal2json, type_oid, Some(text))
    }

    fn valid(type_oid: u32, text: &str) -> String {
        encode(Mode::AlwaysValid, type_oid, Some(text)).unwrap()
    }

    fn string(mode: Mode, s: &[u8]) -> String {
        let mut out = Vec::new();
        write_string(&mut out, mode, s);
        String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(value(INT4OID, Some("-12")), "-12");
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
    fn wal2json_matches_specials_by_prefix_in_any_case() {
        for text in ["nan", "NAN", "infinity", "-INFINITY", "NaNx", "Infinity1"] {
            assert_eq!(wal2json(FLOAT4OID, text).unwrap(), "null", "{text}");
        }
    }

    #[test]
    fn bad_number_text() {
        // wal2json raises an ERROR on text outside its number characters...
        for text in ["12abc", "x1", "1 ", "0x10", "١"] {
            assert_eq!(wal2json(INT8OID, text), Err(NotANumber(text.to_owned())));
        }
        // ...and prints text inside them bare, even when no JSON number.
        assert_eq!(wal2json(NUMERICOID, "+5").unwrap(), "+5");
        assert_eq!(wal2json(INT4OID, "").unwrap(), "");
        // Ours writes anything but a JSON number as a string.
        assert_eq!(valid(INT4OID, ""), r#""""#);
        assert_eq!(valid(INT4OID, "12abc"), r#""12abc""#);
        assert_eq!(valid(NUMERICOID, ".5"), r#"".5""#);
        assert_eq!(valid(NUMERICOID, "+5"), r#""+5""#);
        assert_eq!(valid(NUMERICOID, "nan"), r#""nan""#);
    }

    #[test]
    fn a_failed_value_writes_nothing() {
        let mut out = b"[1,".to_vec();
        assert!(write_value(&mut out, Mode::Wal2json, INT4OID, Some(b"1x")).is_err());
        assert_eq!(out, b"[1,");
    }

    #[test]
    fn booleans() {
        assert_eq!(value(BOOLOID, Some("t")), "true");
        assert_eq!(value(BOOLOID, Some("f")), "false");
        assert_eq!(valid(BOOLOID, "true"), "true");
        assert_eq!(valid(BOOLOID, "false"), "false");
        assert_eq!(valid(BOOLOID, "yes"), r#""yes""#);
        // wal2json: `t` or else false.
        for text in ["true", "false", "yes", ""] {
            assert_eq!(wal2json(BOOLOID, text).unwrap(), "false", "{text}");
        }
    }

    #[test]
    fn bytea_drops_the_hex_prefix() {
        assert_eq!(value(BYTEAOID, Some(r"\x0a0b")), r#""0a0b""#);
        assert_eq!(value(BYTEAOID, Some(r"\x00ff")), r#""00ff""#);
        assert_eq!(value(BYTEAOID, Some(r"\x")), r#""""#);
        // `bytea_output = escape` text has no prefix and may hold backslashes:
        // ours keeps it whole, wal2json skips two bytes anyway.
        assert_eq!(valid(BYTEAOID, r"ab\000"), r#""ab\\000""#);
        assert_eq!(wal2json(BYTEAOID, r"ab\000").unwrap(), r#""\\000""#);
        assert_eq!(wal2json(BYTEAOID, "a").unwrap(), r#""""#);
    }

    #[test]
    fn other_types_are_strings() {
        assert_eq!(value(25, Some("hello")), r#""hello""#);
        // json/jsonb and arrays are strings too, as in wal2json.
        assert_eq!(value(3802, Some(r#"{"a": 1}"#)), r#""{\"a\": 1}""#);
        assert_eq!(value(1007, Some("{1,2,3}")), r#""{1,2,3}""#);
        assert_eq!(value(25, Some("{1,2}")), r#""{1,2}""#);
        assert_eq!(value(1184, Some("2026-11-24 13:55:54.462002+00")), r#""2026-11-24 13:55:54.462002+00""#);
        // An integer-looking text of a non-numeric type stays a string.
        assert_eq!(value(25, Some("42")), r#""42""#);
    }

    #[test]
    fn json_string_escapes() {
        for mode in MODES {
            let string = |s: &str| string(mode, s.as_bytes());
            assert_eq!(string(""), r#""""#);
            assert_eq!(string("plain"), r#""plain""#);
            assert_eq!(string(r#"a"b\c"#), r#""a\"b\\c""#);
            assert_eq!(string("\u{8}\u{c}\n\r\t"), r#""\b\f\n\r\t""#);
            assert_eq!(string("\u{1}\u{1f}"), r#""\u0001\u001f""#);
            assert_eq!(string("\u{1b}"), r#""\u001b""#);
            // DEL, non-ASCII and `/` are not escaped.
            assert_eq!(string("\u{7f}é€😀/"), "\"\u{7f}é€😀/\"");
            assert_eq!(string("x\ny"), r#""x\ny""#);
        }
        // Appends, never clears.
        let mut out = b"[".to_vec();
        write_string(&mut out, Mode::Wal2json, b"a");
        assert_eq!(out, br#"["a""#);
    }

    #[test]
    fn a_nul_ends_wal2jsons_string_and_is_escaped_in_ours() {
        assert_eq!(string(Mode::Wal2json, b"cut\0here"), r#""cut""#, "a C string ends at its NUL");
        assert_eq!(string(Mode::AlwaysValid, b"cut\0here"), r#""cut\u0000here""#);
    }

    #[test]
    fn bytes_are_copied_whatever_their_encoding() {
        // Latin-1 `é`, not UTF-8: wal2json copies it, so does the stream.
        let mut out = Vec::new();
        write_string(&mut out, Mode::Wal2json, b"caf\xe9");
        assert_eq!(out, b"\"caf\xe9\"");
    }

    #[test]
    fn text_and_bytes_are_escaped_alike() {
        let mut text = String::from("[");
        write_json_string(&mut text, "\u{0}a\"é\n\u{1f}");
        let mut bytes = b"[".to_vec();
        write_string(&mut bytes, Mode::AlwaysValid, "\u{0}a\"é\n\u{1f}".as_bytes());
        assert_eq!(text.as_bytes(), bytes);
        assert_eq!(text, r#"["\u0000a\"é\n\u001f""#);
    }

    #[test]
    fn json_number_grammar() {
        for good in ["0", "-0", "1", "10", "-10", "0.0", "1.25", "1e5", "1E5", "1e+5", "1e-5", "1.5e10", "0e0", "1e007"]
        {
            assert!(is_json_number(good.as_bytes()), "{good:?} should be a number");
        }
        for bad in [
            "", "-", "+1", "01", "-01", ".5", "5.", "1.e5", "1e", "1e+", "e5", "1 ", " 1", "1.2.3", "0x10", "NaN",
            "Infinity", "1_000", "--1", "١",
        ] {
            assert!(!is_json_number(bad.as_bytes()), "{bad:?} should not be a number");
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
        prop_oneof![Just(BOOLOID), Just(BYTEAOID), prop::sample::select(NUMBER_TYPES.to_vec()), any::<u32>(),]
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

    /// A JSON number as Postgres prints one: integers, numeric's fixed point,
    /// float's shortest digits with `e+XX`/`e-XX` exponents.
    const POSTGRES_NUMBER: &str = r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,30})?(e[+-][0-9]{2,3})?";

    /// A type and a text its output function could print, with the JSON value
    /// wal2json prints for it.
    fn postgres_value() -> impl Strategy<Value = (u32, Option<String>, serde_json::Value)> {
        use serde_json::Value;
        let number = (prop::sample::select(NUMBER_TYPES.to_vec()), POSTGRES_NUMBER).prop_map(|(oid, text)| {
            let n = serde_json::from_str(&text).unwrap();
            (oid, Some(text), Value::Number(n))
        });
        let special = (
            prop::sample::select(vec![FLOAT4OID, FLOAT8OID, NUMERICOID]),
            prop::sample::select(vec!["NaN", "Infinity", "-Infinity"]),
        )
            .prop_map(|(oid, text)| (oid, Some(text.to_owned()), Value::Null));
        let boolean = any::<bool>().prop_map(|b| (BOOLOID, Some(if b { "t" } else { "f" }.to_owned()), Value::Bool(b)));
        let bytea = "([0-9a-f]{2}){0,16}".prop_map(|hex| (BYTEAOID, Some(format!("\\x{hex}")), Value::String(hex)));
        // No output function prints a NUL: Postgres text cannot hold one.
        let other = (
            any::<u32>().prop_filter("a type with its own rule", |oid| {
                ![BOOLOID, BYTEAOID].contains(oid) && !NUMBER_TYPES.contains(oid)
            }),
            "[^\u{0}]{0,40}",
        )
            .prop_map(|(oid, text)| (oid, Some(text.clone()), Value::String(text)));
        let null = type_oid().prop_map(|oid| (oid, None, Value::Null));
        prop_oneof![number, special, boolean, bytea, other, null]
    }

    proptest! {
        /// The snapshot and the stream cannot drift apart: for what Postgres
        /// prints, both modes write the same bytes, which are JSON and parse
        /// back to the value wal2json prints (every digit of a number kept).
        #[test]
        fn postgres_text_is_the_same_json_in_every_mode((oid, text, expected) in postgres_value()) {
            for mode in MODES {
                let out = encode(mode, oid, text.as_deref());
                prop_assert!(out.is_ok(), "{:?}: {:?}", mode, out);
                let out = out.unwrap();
                let parsed: Result<serde_json::Value, _> = serde_json::from_str(&out);
                prop_assert!(parsed.is_ok(), "{:?}: {:?} is not JSON", mode, out);
                prop_assert_eq!(parsed.unwrap(), expected.clone(), "{:?}", mode);
                if let serde_json::Value::Number(_) = &expected {
                    prop_assert_eq!(&out, text.as_deref().unwrap_or_default());
                }
            }
        }

        #[test]
        fn always_valid_is_valid_json_for_any_text(oid in type_oid(), text in value_text()) {
            let out = encode(Mode::AlwaysValid, oid, text.as_deref());
            prop_assert!(out.is_ok(), "{:?}", out);
            let out = out.unwrap();
            let parsed = serde_json::from_str::<serde_json::Value>(&out);
            prop_assert!(parsed.is_ok(), "{out:?} is not JSON");
        }

        #[test]
        fn wal2json_never_panics_on_any_bytes(oid in type_oid(), text in prop::option::of(any::<Vec<u8>>())) {
            let mut out = Vec::new();
            let _ = write_value(&mut out, Mode::Wal2json, oid, text.as_deref());
        }

        #[test]
        fn numbers_keep_every_digit(
            text in r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
            oid in prop::sample::select(NUMBER_TYPES.to_vec()),
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
            prop_assert_eq!(is_json_number(text.as_bytes()), serde_says, "{:?}", text);
        }

        #[test]
        fn strings_round_trip(s in any::<String>()) {
            let mut text = String::new();
            write_json_string(&mut text, &s);
            prop_assert_eq!(&text, &string(Mode::AlwaysValid, s.as_bytes()));
            let back: String = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&back, &s);
            // wal2json's reading gives back the text up to its first NUL.
            let back: String = serde_json::from_str(&string(Mode::Wal2json, s.as_bytes())).unwrap();
            prop_assert_eq!(back.as_str(), s.split('\0').next().unwrap_or_default());
        }

        #[test]
        fn control_heavy_strings_round_trip(s in "[\\x00-\\x1f\"\\\\a-zé]{0,40}") {
            let back: String = serde_json::from_str(&string(Mode::AlwaysValid, s.as_bytes())).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
