//! Column types and random values of each, as SQL expressions. Values favour the edges:
//! extremes, special floats and numerics, quoting, control characters, astral unicode.

use super::{Rng, lit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Int2,
    Int4,
    Int8,
    Numeric,
    /// `numeric(30,10)`: a typmod in `columntypes`.
    NumericTypmod,
    Float4,
    Float8,
    Bool,
    Text,
    Varchar,
    Char,
    Bytea,
    Date,
    Time,
    Timetz,
    Timestamp,
    Timestamptz,
    Interval,
    Uuid,
    Json,
    Jsonb,
    Int4Array,
    TextArray,
    /// Two dimensions, NULL elements.
    Int8Matrix,
    NumericArray,
    /// The enum, domain and composite types live in the odd schema ([`TYPES_SCHEMA`]).
    Enum,
    Domain,
    Composite,
    Inet,
    Cidr,
    Macaddr,
    Macaddr8,
    Money,
    Bit,
    Varbit,
    Tsvector,
    Point,
    Int4Range,
    TstzRange,
    Oid,
    CharOne,
    Xml,
    EnumArray,
    /// Typmods `format_type` spells out: `time(3) without time zone`, `interval day to
    /// second(2)`, `character varying` without a length.
    TimeTypmod,
    IntervalFields,
    VarcharUnbounded,
    /// An enum in `public`, on the search_path: `columntypes` does not qualify it.
    PublicEnum,
    /// Large incompressible text, stored out of line (TOAST).
    BigText,
    BigBytea,
}

/// Every type a generated column may have (the big ones only in TOAST tables).
pub const COMMON: &[Ty] = &[
    Ty::Int2,
    Ty::Int4,
    Ty::Int8,
    Ty::Numeric,
    Ty::NumericTypmod,
    Ty::Float4,
    Ty::Float8,
    Ty::Bool,
    Ty::Text,
    Ty::Varchar,
    Ty::Char,
    Ty::Bytea,
    Ty::Date,
    Ty::Time,
    Ty::Timetz,
    Ty::Timestamp,
    Ty::Timestamptz,
    Ty::Interval,
    Ty::Uuid,
    Ty::Json,
    Ty::Jsonb,
    Ty::Int4Array,
    Ty::TextArray,
    Ty::Int8Matrix,
    Ty::NumericArray,
    Ty::Enum,
    Ty::Domain,
    Ty::Composite,
    Ty::Inet,
    Ty::Cidr,
    Ty::Macaddr,
    Ty::Macaddr8,
    Ty::Money,
    Ty::Bit,
    Ty::Varbit,
    Ty::Tsvector,
    Ty::Point,
    Ty::Int4Range,
    Ty::TstzRange,
    Ty::Oid,
    Ty::CharOne,
    Ty::Xml,
    Ty::EnumArray,
    Ty::TimeTypmod,
    Ty::IntervalFields,
    Ty::VarcharUnbounded,
    Ty::PublicEnum,
];

/// The schema of the user-defined types: not on the search_path, so `columntypes` names
/// it (`conform_types.mood`). Not an odd name: wal2json 2.5 writes type names into its
/// format-1 JSON without escaping them, so a name `format_type` quotes
/// (`"Odd ""S""".mood`) makes wal2json's own output invalid JSON (reported, not tested).
pub const TYPES_SCHEMA: &str = "conform_types";

/// Creates the user-defined types (in [`TYPES_SCHEMA`], which must exist).
pub fn create_types_sql() -> String {
    let s = super::ident(TYPES_SCHEMA);
    format!(
        "CREATE TYPE {s}.mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'quo''te', 'ünï😀');\n\
         CREATE DOMAIN {s}.posint AS int4 CHECK (VALUE > 0);\n\
         CREATE TYPE {s}.pair AS (a int4, b text, c numeric[]);\n\
         CREATE TYPE public.color AS ENUM ('red', 'green');\n"
    )
}

/// Conversions `ALTER COLUMN ... TYPE` can always make of generated values.
pub fn widened(ty: Ty) -> Option<Ty> {
    Some(match ty {
        Ty::Int2 => Ty::Int4,
        Ty::Int4 => Ty::Int8,
        Ty::Int8 => Ty::Numeric,
        Ty::Float4 => Ty::Float8,
        Ty::Varchar | Ty::Char => Ty::Text,
        Ty::Json => Ty::Jsonb,
        Ty::Timestamp => Ty::Timestamptz,
        _ => return None,
    })
}

impl Ty {
    /// The type as SQL spells it in a column definition.
    pub fn sql(self) -> String {
        let s = super::ident(TYPES_SCHEMA);
        match self {
            Ty::Int2 => "int2".into(),
            Ty::Int4 => "int4".into(),
            Ty::Int8 => "int8".into(),
            Ty::Numeric => "numeric".into(),
            Ty::NumericTypmod => "numeric(30,10)".into(),
            Ty::Float4 => "float4".into(),
            Ty::Float8 => "float8".into(),
            Ty::Bool => "bool".into(),
            Ty::Text | Ty::BigText => "text".into(),
            Ty::Varchar => "varchar(20)".into(),
            Ty::Char => "char(5)".into(),
            Ty::Bytea | Ty::BigBytea => "bytea".into(),
            Ty::Date => "date".into(),
            Ty::Time => "time".into(),
            Ty::Timetz => "timetz".into(),
            Ty::Timestamp => "timestamp(3)".into(),
            Ty::Timestamptz => "timestamptz".into(),
            Ty::Interval => "interval".into(),
            Ty::Uuid => "uuid".into(),
            Ty::Json => "json".into(),
            Ty::Jsonb => "jsonb".into(),
            Ty::Int4Array => "int4[]".into(),
            Ty::TextArray => "text[]".into(),
            Ty::Int8Matrix => "int8[][]".into(),
            Ty::NumericArray => "numeric(8,2)[]".into(),
            Ty::Enum => format!("{s}.mood"),
            Ty::Domain => format!("{s}.posint"),
            Ty::Composite => format!("{s}.pair"),
            Ty::Inet => "inet".into(),
            Ty::Cidr => "cidr".into(),
            Ty::Macaddr => "macaddr".into(),
            Ty::Macaddr8 => "macaddr8".into(),
            Ty::Money => "money".into(),
            Ty::Bit => "bit(8)".into(),
            Ty::Varbit => "varbit(16)".into(),
            Ty::Tsvector => "tsvector".into(),
            Ty::Point => "point".into(),
            Ty::Int4Range => "int4range".into(),
            Ty::TstzRange => "tstzrange".into(),
            Ty::Oid => "oid".into(),
            Ty::CharOne => "\"char\"".into(),
            Ty::Xml => "xml".into(),
            Ty::EnumArray => format!("{s}.mood[]"),
            Ty::TimeTypmod => "time(3)".into(),
            Ty::IntervalFields => "interval day to second(2)".into(),
            Ty::VarcharUnbounded => "varchar".into(),
            Ty::PublicEnum => "color".into(),
        }
    }

    /// A value of the type, or (with `null_pct` percent) NULL, as an SQL expression.
    pub fn value_or_null(self, rng: &mut Rng, null_pct: usize) -> String {
        if rng.chance(null_pct) { "NULL".into() } else { self.value(rng) }
    }

    /// A non-NULL value of the type, as an SQL expression.
    pub fn value(self, rng: &mut Rng) -> String {
        let cast = |v: String| format!("{}::{}", lit(&v), self.sql());
        match self {
            Ty::Int2 => cast(int(rng, i16::MIN as i64, i16::MAX as i64)),
            Ty::Int4 => cast(int(rng, i32::MIN as i64, i32::MAX as i64)),
            Ty::Int8 => cast(int(rng, i64::MIN, i64::MAX)),
            Ty::Numeric => cast(numeric(rng, true)),
            Ty::NumericTypmod => cast(numeric(rng, false)),
            Ty::Float4 => cast(float(rng, FLOAT4)),
            Ty::Float8 => cast(float(rng, FLOAT8)),
            Ty::Bool => cast(rng.pick(&["true", "false"]).to_string()),
            Ty::Text => cast(text(rng, 5)),
            Ty::Varchar => format!("left({}, 20)::{}", lit(&text(rng, 3)), self.sql()),
            Ty::Char => format!("left({}, 5)::{}", lit(&text(rng, 2)), self.sql()),
            Ty::Bytea => {
                let n = rng.below(40);
                cast(bytea(rng, n))
            }
            Ty::Date => cast(date(rng)),
            Ty::Time => {
                cast(rng.pick(&["00:00", "24:00:00", "12:34:56.789012", "23:59:59.999999", "01:02"]).to_string())
            }
            Ty::Timetz => {
                cast(rng.pick(&["00:00+00", "12:34:56.5+05:30", "23:59:59-14:59", "04:05:06 PST"]).to_string())
            }
            Ty::Timestamp => cast(timestamp(rng, "")),
            Ty::Timestamptz => {
                let zone = *rng.pick(&["+00", "+05:30", "-11", " Europe/Paris"]);
                cast(timestamp(rng, zone))
            }
            Ty::Interval => cast(
                rng.pick(&[
                    "0",
                    "1 year 2 mons 3 days 04:05:06.789",
                    "-1 day +02:00",
                    "178000000 years",
                    "1 microsecond",
                    "-00:00:00.000001",
                    "P1Y2M3DT4H5M6S",
                ])
                .to_string(),
            ),
            Ty::Uuid => cast(uuid(rng)),
            Ty::Json => cast(json(rng, true)),
            Ty::Jsonb => cast(json(rng, false)),
            Ty::Int4Array => cast(int_array(rng)),
            Ty::TextArray => cast(text_array(rng)),
            Ty::Int8Matrix => cast(matrix(rng)),
            Ty::NumericArray => cast(rng.pick(&["{1.5,NULL,-2.25}", "{}", "{NaN,0.00,999999.99}"]).to_string()),
            Ty::Enum => cast(rng.pick(&["sad", "ok", "happy", "with space", "quo'te", "ünï😀"]).to_string()),
            Ty::Domain => cast(int(rng, 1, i32::MAX as i64)),
            Ty::Composite => {
                let b = if rng.chance(20) { "NULL".into() } else { lit(&text(rng, 3)) };
                format!("ROW({}, {b}, '{{1.5,NULL}}')::{}", int(rng, -9, 9), self.sql())
            }
            Ty::Inet => cast(rng.pick(&["192.168.0.1/24", "10.0.0.1", "::1", "2001:db8::ff00:42:8329/64"]).to_string()),
            Ty::Cidr => cast(rng.pick(&["10.0.0.0/8", "192.168.100.128/25", "2001:db8::/32"]).to_string()),
            Ty::Macaddr => cast(rng.pick(&["08:00:2b:01:02:03", "ff-ff-ff-ff-ff-ff", "0800.2b01.0203"]).to_string()),
            Ty::Macaddr8 => cast(rng.pick(&["08:00:2b:01:02:03:04:05", "08:00:2b:01:02:03"]).to_string()),
            Ty::Money => cast(rng.pick(&["0", "12.34", "-1000000.01", "92233720368547758.07"]).to_string()),
            Ty::Bit => cast(format!("{:08b}", rng.below(256))),
            Ty::Varbit => cast(bits(rng)),
            Ty::Tsvector => cast(rng.pick(&["a fat cat sat", "'it''s':1A quote:2B,3", "", "ünï:4 😀"]).to_string()),
            Ty::Point => cast(rng.pick(&["(0,0)", "(1.5,-2.25)", "(1e300,-1e-300)", "(NaN,Infinity)"]).to_string()),
            Ty::Int4Range => cast(rng.pick(&["[1,5)", "empty", "(,10]", "[-3,)", "(1,2)"]).to_string()),
            Ty::TstzRange => cast(
                rng.pick(&["[\"2020-01-01 00:00+00\",\"2021-06-01 12:00+02\")", "empty", "(,infinity]"]).to_string(),
            ),
            Ty::Oid => cast(int(rng, 0, u32::MAX as i64)),
            Ty::CharOne => cast(rng.pick(&["a", "Z", " ", "é"]).to_string()),
            Ty::Xml => {
                cast(rng.pick(&["<a b=\"1\">t&amp;x</a>", "text only", "<?xml version=\"1.0\"?><r/>", ""]).to_string())
            }
            Ty::EnumArray => cast(rng.pick(&["{sad,NULL,\"with space\"}", "{}", "{\"quo'te\",ünï😀}"]).to_string()),
            Ty::TimeTypmod => cast(rng.pick(&["12:34:56.789012", "00:00:00.0005", "23:59:59.9999"]).to_string()),
            Ty::IntervalFields => cast(rng.pick(&["1 day 02:03:04.5678", "-3 days", "1 year 1 second"]).to_string()),
            Ty::VarcharUnbounded => cast(text(rng, 4)),
            Ty::PublicEnum => cast(rng.pick(&["red", "green"]).to_string()),
            Ty::BigText => {
                // Random characters of a 64-letter alphabet: pglz finds nothing to
                // compress, and the column is EXTERNAL anyway.
                let n = rng.range(9000, 20000) as usize;
                const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                let s: String = (0..n).map(|_| ALPHABET[rng.below(64)] as char).collect();
                cast(s)
            }
            Ty::BigBytea => {
                let n = rng.range(9000, 16000) as usize;
                cast(bytea(rng, n))
            }
        }
    }
}

fn int(rng: &mut Rng, lo: i64, hi: i64) -> String {
    match rng.below(6) {
        0 => lo.to_string(),
        1 => hi.to_string(),
        2 => 0.max(lo).to_string(),
        _ => {
            let small = rng.range(-1000, 1000).clamp(lo, hi);
            if rng.chance(50) { small.to_string() } else { rng.range(lo / 2, hi / 2).to_string() }
        }
    }
}

fn numeric(rng: &mut Rng, unconstrained: bool) -> String {
    let special = ["NaN", "Infinity", "-Infinity"];
    if unconstrained && rng.chance(20) {
        return rng.pick(&special).to_string();
    }
    if !unconstrained && rng.chance(10) {
        return "NaN".into();
    }
    match rng.below(if unconstrained { 7 } else { 4 }) {
        0 => "0".into(),
        1 => format!("{}.{:03}", rng.range(-99999, 99999), rng.below(1000)),
        2 => "-0.0000000001".into(),
        3 => "12345678901234567890.1234567890".into(),
        4 => format!("1e{}", rng.range(100, 1000)),
        5 => format!("0.{}1", "0".repeat(rng.range(20, 300) as usize)),
        _ => "-99999999999999999999999999999999999999.000000000000000000001".into(),
    }
}

const FLOAT4: &[&str] = &["0", "-0", "1.5", "-3.4028235e38", "1e-45", "1.17549435e-38", "0.1", "16777217", "NaN"];
const FLOAT8: &[&str] =
    &["0", "-0", "0.1", "1.7976931348623157e308", "5e-324", "-2.2250738585072014e-308", "123456789.123456789"];

fn float(rng: &mut Rng, table: &[&str]) -> String {
    if rng.chance(15) {
        return rng.pick(&["NaN", "Infinity", "-Infinity"]).to_string();
    }
    if rng.chance(50) { rng.pick(table).to_string() } else { format!("{}.{}", rng.range(-1000, 1000), rng.below(100)) }
}

/// Pieces of text worth getting right: quotes, backslashes, control characters, JSON's
/// escapes, unicode in and beyond the BMP, look-alikes of NULL and of escapes.
const FRAGMENTS: &[&str] = &[
    "plain",
    "it's",
    "\"double\"",
    "back\\slash",
    "\\x41\\u0041\\n",
    "tab\there",
    "new\nline",
    "cr\rlf\r\n",
    "\u{1}\u{8}\u{c}\u{1b}\u{1f}\u{7f}",
    "é à ü ß",
    "中文字",
    "😀🎉𝄞",
    "\u{10FFFF}",
    "\u{2028}\u{2029}",
    "\u{feff}bom",
    "\u{200b}zero\u{200d}width",
    "",
    " ",
    "NULL",
    "null",
    "{}[],:",
    "</script>",
    "a'\"\\b",
];

/// Up to `max` random fragments, joined.
pub fn text(rng: &mut Rng, max: usize) -> String {
    let n = rng.below(max + 1);
    (0..n).map(|_| *rng.pick(FRAGMENTS)).collect()
}

fn bytea(rng: &mut Rng, n: usize) -> String {
    let mut s = String::from("\\x");
    for _ in 0..n {
        s.push_str(&format!("{:02x}", rng.next_u64() as u8));
    }
    s
}

fn date(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => "infinity".into(),
        1 => "-infinity".into(),
        2 => "4713-01-01 BC".into(),
        3 => "5874897-12-31".into(),
        _ => format!("{:04}-{:02}-{:02}", rng.range(1, 9999), rng.range(1, 12), rng.range(1, 28)),
    }
}

fn timestamp(rng: &mut Rng, zone: &str) -> String {
    match rng.below(8) {
        0 => "infinity".into(),
        1 => "-infinity".into(),
        2 => format!("0044-03-15 12:00:00{zone} BC"),
        _ => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}{zone}",
            rng.range(1900, 2100),
            rng.range(1, 12),
            rng.range(1, 28),
            rng.range(0, 23),
            rng.range(0, 59),
            rng.range(0, 59),
            rng.range(0, 999_999),
        ),
    }
}

fn bits(rng: &mut Rng) -> String {
    let n = rng.below(17);
    (0..n).map(|_| if rng.chance(50) { '1' } else { '0' }).collect()
}

fn uuid(rng: &mut Rng) -> String {
    let hex = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

fn json(rng: &mut Rng, keep_layout: bool) -> String {
    let s1 = serde_json::to_string(&text(rng, 3)).unwrap_or_default();
    let s2 = serde_json::to_string(&text(rng, 2)).unwrap_or_default();
    let spaces = if keep_layout && rng.chance(50) { "  \n\t" } else { "" };
    match rng.below(6) {
        0 => format!(r#"{{"a":{spaces}[1, 2.50, -0, 1e400, null, true, {s1}],{spaces}"b": {{"c": {s2}}}}}"#),
        1 => format!("[{s1}, {s2}, {{}}, []]"),
        2 => s1,
        3 => rng.pick(&["null", "0", "-1.0e-10", "true", "123456789012345678901234567890"]).to_string(),
        4 => r#"{"dup": 1, "dup": 2, "\u00e9\ud83d\ude00": "\/\b\f"}"#.into(),
        _ => format!(r#"{{"nested": {{"deep": [[[{s1}]]]}}, "z": {s2}, "a": 1}}"#),
    }
}

/// An array literal's element: NULL, or double-quoted with `\` before `"` and `\`.
fn array_elem(v: Option<&str>) -> String {
    match v {
        None => "NULL".into(),
        Some(v) => format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")),
    }
}

fn int_array(rng: &mut Rng) -> String {
    if rng.chance(15) {
        return rng.pick(&["{}", "[0:2]={1,2,3}", "{NULL}"]).to_string();
    }
    let n = rng.range(1, 5);
    let elems: Vec<String> = (0..n)
        .map(|_| if rng.chance(20) { "NULL".into() } else { int(rng, i32::MIN as i64, i32::MAX as i64) })
        .collect();
    format!("{{{}}}", elems.join(","))
}

fn text_array(rng: &mut Rng) -> String {
    let n = rng.range(0, 4);
    let elems: Vec<String> = (0..n)
        .map(|_| {
            let t = text(rng, 2);
            array_elem(if rng.chance(20) { None } else { Some(&t) })
        })
        .collect();
    format!("{{{}}}", elems.join(","))
}

fn matrix(rng: &mut Rng) -> String {
    let (rows, cols) = (rng.range(1, 3), rng.range(1, 3));
    let rows: Vec<String> = (0..rows)
        .map(|_| {
            let cells: Vec<String> =
                (0..cols).map(|_| if rng.chance(25) { "NULL".into() } else { int(rng, i64::MIN, i64::MAX) }).collect();
            format!("{{{}}}", cells.join(","))
        })
        .collect();
    format!("{{{}}}", rows.join(","))
}
