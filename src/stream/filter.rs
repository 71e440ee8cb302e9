//! Which changes reach a client: tables and kinds of change. The plugin applies a
//! filter inside Postgres where it can, so what a client does not want is never sent.

use serde::{Deserialize, Serialize};

/// A kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Insert,
    Update,
    Delete,
    Truncate,
    /// Logical messages (`pg_logical_emit_message`).
    Message,
}

impl Action {
    pub const ALL: [Action; 5] = [Action::Insert, Action::Update, Action::Delete, Action::Truncate, Action::Message];

    pub fn name(self) -> &'static str {
        match self {
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Truncate => "truncate",
            Action::Message => "message",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// (schema, table) pairs, the table None for every table of the schema; None:
    /// every table.
    pub tables: Option<Vec<(String, Option<String>)>>,
    pub actions: Vec<Action>,
    /// Schemas never streamed, whatever `tables` says: pgdeltastream's own.
    pub hidden_schemas: Vec<String>,
    /// A listed table (or a table of a listed schema) is partitioned: its changes come
    /// from its partitions, which a plugin that names the leaf partition (wal2json)
    /// cannot filter by name. Set when a stream starts ([`crate::stream::plugin::Plugin::prepare`]).
    pub partitioned: bool,
    /// The publication a pgoutput stream reads when it is not the one named as its
    /// slot (a session's `publication`, made by the operator).
    pub publication: Option<String>,
    /// Schema changes of the session's tables reach the client ([`super::ddl`]).
    pub ddl: bool,
}

impl Default for Filter {
    /// Everything.
    fn default() -> Self {
        Filter {
            tables: None,
            actions: Action::ALL.to_vec(),
            hidden_schemas: Vec::new(),
            partitioned: false,
            publication: None,
            ddl: false,
        }
    }
}

impl Filter {
    pub(crate) fn wants(&self, action: Action) -> bool {
        self.actions.contains(&action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_serialize_lowercase() {
        assert_eq!(
            serde_json::to_value(Action::ALL).unwrap(),
            serde_json::json!(["insert", "update", "delete", "truncate", "message"])
        );
        for a in Action::ALL {
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
        }
    }
}
