//! What a session is: a name, the slot it reads, the plugin that decodes it, and which
//! tables and actions reach its client. A definition is stored in Postgres, so it
//! outlives the process; everything else about a session (its snapshot, its stream) is
//! state of the process that holds it.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::pg::ident::{IdentError, TableRef, quote_ident};
pub use crate::stream::filter::{Action, Filter};
use crate::stream::plugin::Plugin;

/// The session `/v1/init` manages.
pub const DEFAULT_NAME: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub name: String,
    pub slot_name: String,
    pub plugin: Plugin,
    /// `schema.table` and `schema.*` patterns as resolved at creation; None: every table.
    pub tables: Option<Vec<String>>,
    pub actions: Vec<Action>,
}

impl Definition {
    /// What reaches the session's client, for the plugin.
    pub fn filter(&self) -> Filter {
        let tables = self.tables.as_ref().map(|patterns| {
            patterns
                .iter()
                .filter_map(|p| match TablePattern::parse(p) {
                    Ok(TablePattern::Table(t)) => t.schema.map(|s| (s, Some(t.name))),
                    Ok(TablePattern::Schema(s)) => Some((s, None)),
                    Err(_) => None,
                })
                .collect()
        });
        Filter { tables, actions: self.actions.clone(), hidden_schemas: Vec::new() }
    }
}

/// `^[a-z][a-z0-9_]{0,39}$`: safe in URLs, logs and SQL literals alike.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = name.len() <= 40
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid session name {name:?}: use 1 to 40 characters a-z, 0-9 and _, starting with a letter"
        )))
    }
}

/// A table as a client names it in a session's `tables`: `name`, `schema.name` (SQL's
/// quoting and folding rules), or a wildcard `schema.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TablePattern {
    Table(TableRef),
    Schema(String),
}

impl TablePattern {
    pub fn parse(input: &str) -> Result<TablePattern, Error> {
        let refuse = |e: IdentError| {
            Error::bad_request(format!("invalid table {input:?}: it {e}; expected name, schema.name or schema.*"))
        };
        if let Some(schema) = input.strip_suffix(".*") {
            let parsed = TableRef::parse(schema).map_err(refuse)?;
            if parsed.schema.is_some() {
                return Err(refuse(IdentError::TooManyParts));
            }
            return Ok(TablePattern::Schema(parsed.name));
        }
        TableRef::parse(input).map(TablePattern::Table).map_err(refuse)
    }
}

/// A resolved pattern as stored and shown: `public.orders`, `audit.*`, with quotes only
/// where SQL would need them (`"Odd Name".t`), so that it parses back to itself.
pub fn display_pattern(schema: &str, table: Option<&str>) -> String {
    let ident = |s: &str| {
        let plain = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if plain { s.to_owned() } else { quote_ident(s) }
    };
    match table {
        Some(t) => format!("{}.{}", ident(schema), ident(t)),
        None => format!("{}.*", ident(schema)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["orders", "a", "search_indexer_2", &"a".repeat(40)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Orders", "2x", "_x", "a-b", "a b", "é", &"a".repeat(41), "a/../b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert_eq!(
            TablePattern::parse("public.orders").unwrap(),
            TablePattern::Table(TableRef { schema: Some("public".into()), name: "orders".into() })
        );
        assert_eq!(
            TablePattern::parse("Items").unwrap(),
            TablePattern::Table(TableRef { schema: None, name: "items".into() })
        );
        assert_eq!(TablePattern::parse("audit.*").unwrap(), TablePattern::Schema("audit".into()));
        assert_eq!(TablePattern::parse("\"Odd.Schema\".*").unwrap(), TablePattern::Schema("Odd.Schema".into()));
        for bad in ["", "*", "a.b.*", "a.b.c", "a;b", "*.t", "a.*.*"] {
            assert!(TablePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_patterns_parse_back() {
        for (schema, table) in
            [("public", Some("orders")), ("audit", None), ("Odd Schema", Some("t.x")), ("s", Some("Ab"))]
        {
            let shown = display_pattern(schema, table);
            let def = Definition {
                name: "n".into(),
                slot_name: "delta_x1".into(),
                plugin: Plugin::Wal2json,
                tables: Some(vec![shown.clone()]),
                actions: Action::ALL.to_vec(),
            };
            let filter = def.filter();
            assert_eq!(filter.tables.unwrap(), [(schema.to_owned(), table.map(str::to_owned))], "{shown}");
        }
        assert_eq!(display_pattern("public", Some("orders")), "public.orders");
    }
}
