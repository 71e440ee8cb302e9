//! Postgres log sequence numbers (LSNs).
//!
//! An LSN is a byte position in the write-ahead log: a plain 64-bit integer.
//! Postgres prints it as two 32-bit halves in hexadecimal, `X/Y`, where `X` is
//! the high half and `Y` the low half (`16/B374D848` is `0x16_B374D848`).
//! Replication commands take and return LSNs in that text form, and wal2json
//! writes them that way in its JSON, so `Lsn` converts both ways.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A position in the Postgres write-ahead log.
///
/// Ordering is the numeric ordering of the underlying `u64`, which is the
/// order in which changes were written.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: "no position". Postgres uses it as InvalidXLogRecPtr.
    pub const ZERO: Lsn = Lsn(0);

    /// The raw 64-bit position.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

/// The text was not an LSN in Postgres's `X/Y` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {text:?}: expected X/Y with hexadecimal X and Y")]
pub struct LsnParseError {
    /// The rejected input, kept for the error message.
    pub text: String,
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Parses `X/Y`, each half 1 to 8 hex digits, either case.
    ///
    /// Stricter than Rust's `u32::from_str_radix`, which would also accept a
    /// leading `+`: we check every byte ourselves, so signs, spaces, `0x`
    /// prefixes and extra slashes are all rejected.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError { text: s.to_owned() };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = parse_half(hi).ok_or_else(err)?;
        // A second slash lands in `lo` and fails the hex-digit check there.
        let lo = parse_half(lo).ok_or_else(err)?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Parses 1 to 8 hex digits into a `u32`, or `None`.
///
/// Eight hex digits are exactly 32 bits, so the accumulation cannot overflow.
fn parse_half(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 {
        return None;
    }
    let mut value: u32 = 0;
    for b in s.bytes() {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        value = (value << 4) | u32::from(digit);
    }
    Some(value)
}

impl fmt::Display for Lsn {
    /// Prints like Postgres's `pg_lsn_out`: `%X/%X`, uppercase, no padding.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hi = (self.0 >> 32) as u32;
        let lo = self.0 as u32; // truncation keeps the low half, on purpose
        write!(f, "{hi:X}/{lo:X}")
    }
}

impl fmt::Debug for Lsn {
    /// `Lsn(0/170FCB0)`: the readable form is far more useful in logs and
    /// test failures than the raw integer.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsn({self})")
    }
}

// In JSON an LSN is always its text form, as wal2json writes it.

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `collect_str` formats straight into the output, no temporary String.
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor rather than `String::deserialize` so that borrowed input
        // is parsed in place without allocating.
        struct LsnVisitor;

        impl Visitor<'_> for LsnVisitor {
            type Value = Lsn;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an LSN string like \"0/170FCB0\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Lsn, E> {
                v.parse().map_err(E::custom)
            }
        }

        deserializer.deserialize_str(LsnVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x170FCB0).to_string(), "0/170FCB0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(1 << 32).to_string(), "1/0");
    }

    #[test]
    fn debug_shows_text_form() {
        assert_eq!(format!("{:?}", Lsn(0x170FCB0)), "Lsn(0/170FCB0)");
    }

    #[test]
    fn parses_valid_forms() {
        assert_eq!("0/170FCB0".parse(), Ok(Lsn(0x170FCB0)));
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse(), Ok(Lsn::ZERO));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse(), Ok(Lsn(u64::MAX)));
        // Leading zeros are fine as long as each half is at most 8 digits.
        assert_eq!("00000001/00000002".parse(), Ok(Lsn((1 << 32) | 2)));
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "170FCB0",
            " 0/1",
            "0/1 ",
            "0 /1",
            "+0/1",
            "0/+1",
            "-0/1",
            "0/-1",
            "0x0/1",
            "0/0x1",
            "123456789/0",
            "0/123456789",
            "0/1/2",
            "0//1",
            "g/0",
            "0/é",
            "abc",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn error_message_names_input() {
        let err = "abc".parse::<Lsn>().unwrap_err();
        assert_eq!(err.to_string(), r#"invalid LSN "abc": expected X/Y with hexadecimal X and Y"#);
    }

    #[test]
    fn serde_uses_text_form() {
        let json = serde_json::to_string(&Lsn(0x16_B374_D848)).unwrap();
        assert_eq!(json, r#""16/B374D848""#);
        let back: Lsn = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Lsn(0x16_B374_D848));
        assert!(serde_json::from_str::<Lsn>(r#""nope""#).is_err());
        assert!(serde_json::from_str::<Lsn>("12345").is_err());
        // Owned strings (e.g. from a serde_json::Value) work too.
        let v = serde_json::Value::String("0/10".into());
        assert_eq!(serde_json::from_value::<Lsn>(v).unwrap(), Lsn(0x10));
    }

    #[test]
    fn conversions() {
        assert_eq!(Lsn::from(42).as_u64(), 42);
        assert_eq!(u64::from(Lsn(7)), 7);
        assert_eq!(Lsn::default(), Lsn::ZERO);
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(n in any::<u64>()) {
            let text = Lsn(n).to_string();
            prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(n)));
            prop_assert_eq!(text.to_lowercase().parse::<Lsn>(), Ok(Lsn(n)));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn parse_never_panics_on_lsn_like_text(s in "[0-9a-fA-FxX+ /-]{0,20}") {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn ordering_matches_u64(a in any::<u64>(), b in any::<u64>()) {
            prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
        }

        #[test]
        fn serde_round_trip(n in any::<u64>()) {
            let json = serde_json::to_string(&Lsn(n)).unwrap();
            prop_assert_eq!(serde_json::from_str::<Lsn>(&json).unwrap(), Lsn(n));
        }
    }
}
