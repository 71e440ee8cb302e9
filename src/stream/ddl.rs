//! Schema changes (DDL) in a session's stream. The server's event trigger
//! ([`crate::session::ddl`]) writes each DDL command as a transactional logical message
//! with prefix [`PREFIX`], so that it is decoded in its transaction's place, between the
//! data changes before and after it. The stream's stage ([`super::marks`]) meets it
//! there and asks [`Ddl::render`] what the client gets instead: a DDL change of one of
//! the session's tables, in the stream's format, or nothing.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::filter::Filter;
use super::frame::Format;

/// The prefix of the event trigger's messages.
pub(crate) const PREFIX: &str = "pgdeltastream.ddl";

/// What a session with `ddl` wants of the trigger's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ddl {
    /// (schema, table) pairs, the table None for every table of the schema; None:
    /// every table.
    tables: Option<Vec<(String, Option<String>)>>,
    /// Never streamed: the store's schema.
    hidden_schemas: Vec<String>,
}

/// One DDL command as the trigger writes it, and as the client gets it (after its
/// `kind` or `action`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    schema: Option<String>,
    table: Option<String>,
    command: String,
    object_type: String,
    /// The trigger writes `identity`; a client gets `objectIdentity`, since a change's
    /// `identity` is its old row's columns (format 2).
    #[serde(rename = "objectIdentity", alias = "identity")]
    identity: String,
    /// The table's columns after the command (none after a drop).
    #[serde(default, rename = "columnnames")]
    column_names: Vec<String>,
    #[serde(default, rename = "columntypes")]
    column_types: Vec<String>,
}

impl Ddl {
    /// None when the session does not want schema changes.
    pub fn of(filter: &Filter) -> Option<Ddl> {
        filter.ddl.then(|| Ddl { tables: filter.tables.clone(), hidden_schemas: filter.hidden_schemas.clone() })
    }

    /// The DDL change that replaces a message of [`PREFIX`] with `content`, in
    /// `format` (format 1 with its leading comma, which the stage takes off a
    /// message's first change); None when it is not of a table the session streams.
    pub fn render(&self, format: Format, content: &str) -> Option<Bytes> {
        let event: Event = serde_json::from_str(content).ok()?;
        let (schema, table) = (event.schema.as_deref()?, event.table.as_deref()?);
        if !self.wants(schema, table) {
            return None;
        }
        let fields = serde_json::to_string(&event).ok()?;
        // `fields` is an object with at least one field: `{"schema":...}`.
        let rest = fields.strip_prefix('{')?;
        let body = match format {
            Format::Transactions => format!(",{{\"kind\":\"ddl\",{rest}"),
            Format::Changes => format!("{{\"action\":\"DDL\",{rest}"),
        };
        Some(Bytes::from(body))
    }

    /// A table the session streams: listed, in a listed schema (a table created there
    /// later too), or any when it streams every table; never one of the store's.
    fn wants(&self, schema: &str, table: &str) -> bool {
        if self.hidden_schemas.iter().any(|h| h == schema) {
            return false;
        }
        let Some(tables) = &self.tables else { return true };
        tables.iter().any(|(s, t)| s == schema && t.as_deref().is_none_or(|t| t == table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: &str = r#"{"command":"ALTER TABLE","objectType":"table","identity":"public.t","schema":"public","table":"t","columnnames":["id","x"],"columntypes":["integer","text"]}"#;

    fn ddl(tables: Option<Vec<(&str, Option<&str>)>>) -> Ddl {
        let tables = tables.map(|t| t.into_iter().map(|(s, t)| (s.to_owned(), t.map(str::to_owned))).collect());
        let filter = Filter { tables, ddl: true, hidden_schemas: vec!["pgdeltastream".into()], ..Filter::default() };
        Ddl::of(&filter).unwrap()
    }

    fn text(b: Option<Bytes>) -> Option<String> {
        b.map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn renders_in_both_formats() {
        let all = ddl(None);
        assert_eq!(
            text(all.render(Format::Transactions, ADD)).as_deref(),
            Some(
                r#",{"kind":"ddl","schema":"public","table":"t","command":"ALTER TABLE","objectType":"table","objectIdentity":"public.t","columnnames":["id","x"],"columntypes":["integer","text"]}"#
            )
        );
        assert_eq!(
            text(all.render(Format::Changes, ADD)).as_deref(),
            Some(
                r#"{"action":"DDL","schema":"public","table":"t","command":"ALTER TABLE","objectType":"table","objectIdentity":"public.t","columnnames":["id","x"],"columntypes":["integer","text"]}"#
            )
        );
    }

    #[test]
    fn only_the_sessions_tables() {
        assert!(ddl(Some(vec![("public", Some("t"))])).render(Format::Changes, ADD).is_some());
        assert!(ddl(Some(vec![("public", None)])).render(Format::Changes, ADD).is_some());
        assert!(ddl(Some(vec![("public", Some("u"))])).render(Format::Changes, ADD).is_none());
        assert!(ddl(Some(vec![("audit", None)])).render(Format::Changes, ADD).is_none());
        let ours = ADD.replace("\"public\"", "\"pgdeltastream\"");
        assert!(ddl(None).render(Format::Changes, &ours).is_none());
        let no_table = ADD.replace("\"table\":\"t\"", "\"table\":null");
        assert!(ddl(None).render(Format::Changes, &no_table).is_none());
        assert!(ddl(None).render(Format::Changes, "not json").is_none());
        assert_eq!(Ddl::of(&Filter::default()), None);
    }
}
