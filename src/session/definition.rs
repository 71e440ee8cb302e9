//! What a session is: a name, the slot it reads, the plugin that decodes it, and which
//! tables and actions reach its client. A definition is stored in Postgres, so it
//! outlives the process; everything else about a session (its snapshot, its stream) is
//! state of the process that holds it.

use serde::{Deserialize, Serialize};

use super::safety::{SlotFate, SlotPolicy};
use crate::error::Error;
use crate::pg::expr::check_expression;
use crate::pg::ident::{IdentError, MAX_IDENT_BYTES, TableRef, quote_ident};
pub(crate) use crate::stream::filter::{Action, Filter};
use crate::stream::plugin::Plugin;

/// The session `/v1/init` manages.
pub(crate) const DEFAULT_NAME: &str = "default";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub name: String,
    pub slot_name: String,
    pub plugin: Plugin,
    /// `schema.table` and `schema.*` patterns as resolved at creation; None: every table.
    pub tables: Option<Vec<TableEntry>>,
    pub actions: Vec<Action>,
    /// pgoutput on PostgreSQL 18+: the publication publishes generated columns (as
    /// wal2json always prints them). Left out of definitions that do not ask for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub publish_generated_columns: bool,
    #[serde(flatten, default)]
    pub policy: SlotPolicy,
    #[serde(flatten, default)]
    pub fate: SlotFate,
    /// pgoutput: a publication the operator made, read instead of one of the session's
    /// own, and never created nor dropped here. A standby needs one (made on the
    /// primary): no publication can be created in recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_publication: Option<String>,
    /// Schema changes (DDL) of its tables reach its client, from the server's event
    /// trigger ([`super::ddl`]). v2 only; left out of definitions that do not ask for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ddl: bool,
    /// The session's live backfill, and how far it got ([`super::backfill`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<super::backfill::BackfillState>,
}

/// One entry of a session's `tables`: a pattern, or (pgoutput) a table with the row
/// filter and column list its publication applies. Stored and shown as given, so that
/// the definitions stored before entries could be objects load as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TableEntry {
    Pattern(String),
    Table(TableSpec),
}

/// `{"table": "public.orders", "where": "amount > 100", "columns": ["id", "amount"]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    pub table: String,
    /// SQL by design: one expression ([`TableSpec::check`]), which Postgres checks as the
    /// publication's row filter.
    #[serde(rename = "where", default, skip_serializing_if = "Option::is_none")]
    pub row_filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Vec<String>>,
}

impl TableSpec {
    /// What can be told without the catalog, before anything is stored: columns are
    /// names Postgres takes as they are (a longer one it would cut to another column's
    /// name), and the row filter is one expression ([`check_expression`]).
    pub fn check(&self) -> Result<(), Error> {
        for column in self.columns.iter().flatten() {
            if column.is_empty() || column.len() > MAX_IDENT_BYTES || column.contains('\0') {
                return Err(Error::bad_request(format!(
                    "invalid column {column:?} in the column list of {}: a column name is 1 to {MAX_IDENT_BYTES} \
                     bytes, without NUL",
                    self.table
                )));
            }
        }
        if let Some(filter) = &self.row_filter {
            check_expression(filter).map_err(|e| {
                Error::bad_request(format!(
                    "the row filter (where) of {} must be one SQL expression: it {e}",
                    self.table
                ))
            })?;
        }
        Ok(())
    }
}

impl TableEntry {
    pub fn pattern(&self) -> &str {
        match self {
            TableEntry::Pattern(p) => p,
            TableEntry::Table(t) => &t.table,
        }
    }

    /// A row filter or a column list, which only a publication can apply.
    pub(crate) fn narrows(&self) -> bool {
        matches!(self, TableEntry::Table(t) if t.row_filter.is_some() || t.columns.is_some())
    }

    /// The same entry for another (resolved) pattern.
    pub(crate) fn with_pattern(&self, pattern: String) -> TableEntry {
        match self {
            TableEntry::Pattern(_) => TableEntry::Pattern(pattern),
            TableEntry::Table(t) => TableEntry::Table(TableSpec { table: pattern, ..t.clone() }),
        }
    }
}

impl Definition {
    /// The publication its slot reads (pgoutput).
    pub fn publication(&self) -> Option<String> {
        let own = || self.plugin.publication(&self.slot_name).map(str::to_owned);
        self.external_publication.clone().or_else(own)
    }

    /// What reaches the session's client, for the plugin.
    pub fn filter(&self) -> Filter {
        Filter {
            tables: self.tables.as_ref().map(|patterns| table_pairs(patterns.iter())),
            actions: self.actions.clone(),
            publication: self.external_publication.clone(),
            ddl: self.ddl,
            ..Filter::default()
        }
    }
}

/// Resolved entries as the filter has them: (schema, table), the table None for every
/// table of the schema.
pub(crate) fn table_pairs<'a>(entries: impl Iterator<Item = &'a TableEntry>) -> Vec<(String, Option<String>)> {
    entries
        .filter_map(|e| match TablePattern::parse(e.pattern()) {
            Ok(TablePattern::Table(t)) => t.schema.map(|s| (s, Some(t.name))),
            Ok(TablePattern::Schema(s)) => Some((s, None)),
            Err(_) => None,
        })
        .collect()
}

/// Of the tables a session lists `now`, those its snapshot serves, exported when it
/// listed `then` (None: every table): the entries it had then and has unchanged now.
/// An entry added since, or whose row filter or column list changed, would be read
/// without its changes from the export until the change.
pub(crate) fn exported_tables(
    then: Option<&Vec<TableEntry>>,
    now: Option<&Vec<TableEntry>>,
) -> Option<Vec<(String, Option<String>)>> {
    match (then, now) {
        (None, None) => None,
        (None, Some(now)) => Some(table_pairs(now.iter().filter(|e| !e.narrows()))),
        (Some(then), None) => Some(table_pairs(then.iter().filter(|e| !e.narrows()))),
        (Some(then), Some(now)) => Some(table_pairs(then.iter().filter(|e| now.contains(e)))),
    }
}

/// `^[a-z][a-z0-9_]{0,39}$`: safe in URLs, logs and SQL literals alike.
pub(crate) fn check_name(name: &str) -> Result<(), Error> {
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
pub(crate) enum TablePattern {
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
pub(crate) fn display_pattern(schema: &str, table: Option<&str>) -> String {
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
                tables: Some(vec![TableEntry::Pattern(shown.clone())]),
                actions: Action::ALL.to_vec(),
                publish_generated_columns: false,
                policy: Default::default(),
                fate: Default::default(),
                external_publication: None,
                backfill: None,
                ddl: false,
            };
            let filter = def.filter();
            assert_eq!(filter.tables.unwrap(), [(schema.to_owned(), table.map(str::to_owned))], "{shown}");
        }
        assert_eq!(display_pattern("public", Some("orders")), "public.orders");
    }

    #[test]
    fn a_snapshot_serves_the_entries_it_was_exported_with_and_still_has() {
        let a = TableEntry::Pattern("public.a".into());
        let b = TableEntry::Pattern("public.b".into());
        let filtered =
            TableEntry::Table(TableSpec { table: "public.a".into(), row_filter: Some("n > 1".into()), columns: None });
        let pair = |t: &str| ("public".to_owned(), Some(t.to_owned()));
        assert_eq!(exported_tables(None, None), None);
        assert_eq!(exported_tables(Some(&vec![a.clone()]), Some(&vec![a.clone(), b.clone()])), Some(vec![pair("a")]));
        assert_eq!(exported_tables(Some(&vec![a.clone()]), Some(&vec![b.clone()])), Some(vec![]));
        assert_eq!(exported_tables(None, Some(&vec![filtered.clone(), b.clone()])), Some(vec![pair("b")]));
        assert_eq!(exported_tables(Some(&vec![filtered.clone(), b.clone()]), None), Some(vec![pair("b")]));
        assert_eq!(exported_tables(Some(&vec![filtered]), Some(&vec![a])), Some(vec![]), "a changed filter");
    }

    #[test]
    fn table_entries_round_trip_as_given() {
        let stored = serde_json::json!({
            "name": "n", "slotName": "delta_x1", "plugin": "pgoutput", "actions": ["insert"],
            "tables": ["public.a", {"table": "public.b", "where": "x > 1"}, {"table": "public.c", "columns": ["Id"]}]
        });
        let def: Definition = serde_json::from_value(stored.clone()).unwrap();
        let tables = def.tables.as_ref().unwrap();
        assert_eq!(tables[0], TableEntry::Pattern("public.a".into()));
        assert!(!tables[0].narrows() && tables[1].narrows() && tables[2].narrows());
        assert_eq!(serde_json::to_value(&def).unwrap(), stored);
        let old = serde_json::json!({
            "name": "n", "slotName": "delta_x1", "plugin": "wal2json", "actions": ["insert"], "tables": ["public.a"]
        });
        assert_eq!(serde_json::to_value(serde_json::from_value::<Definition>(old.clone()).unwrap()).unwrap(), old);
    }
}
