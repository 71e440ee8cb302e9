//! `Lsn` from text: `str::parse` on arbitrary UTF-8.
//!
//! Checks, besides "never panics":
//! - parse accepts exactly Postgres's `X/Y` (1 to 8 hex digits each side), checked
//!   against a plain reference written here;
//! - when it parses, `Display` gives text that parses back to the same value, and
//!   that text is the canonical form (uppercase, no leading zeros);
//! - the serde form (a JSON string) agrees with `str::parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgdeltastream::types::Lsn;

/// The grammar, spelled out independently of the parser under test.
fn reference(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let half = |h: &str| {
        if h.is_empty() || h.len() > 8 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    };
    Some((half(hi)? << 32) | half(lo)?)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = text.parse::<Lsn>();
    assert_eq!(parsed.as_ref().ok().map(|l| l.as_u64()), reference(text), "{text:?}");

    // serde goes through the same parser: a JSON string holding the text.
    let json = serde_json::Value::String(text.to_owned());
    assert_eq!(serde_json::from_value::<Lsn>(json).ok(), parsed.clone().ok(), "{text:?}");

    match parsed {
        Ok(lsn) => {
            let shown = lsn.to_string();
            assert_eq!(shown.parse::<Lsn>(), Ok(lsn), "{text:?} shown as {shown:?}");
            let (hi, lo) = shown.split_once('/').expect("Display prints X/Y");
            for half in [hi, lo] {
                assert!(half == "0" || !half.starts_with('0'), "{shown:?} is not canonical");
                assert!(!half.bytes().any(|b| b.is_ascii_lowercase()), "{shown:?} is not uppercase");
            }
        }
        Err(e) => assert_eq!(e.text, text, "the error names its input"),
    }
});
