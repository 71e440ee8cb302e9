//! The output plugin a slot decodes with, behind one type: its name (what a slot is
//! created with and what marks a slot as one we can read), the options a stream starts
//! with, how its bytes become frames, and the hooks the session layer calls around a
//! slot's life (before the slot, after its drop, what a watcher adds, what it can
//! filter). Nothing else in the server names a plugin.
//!
//! wal2json's output is forwarded as it is. pgoutput's binary messages are rendered
//! into exactly the pieces wal2json would have sent ([`super::pgoutput`]), so that
//! everything after the plugin is the same for both.

use std::future::Future;

use serde::{Deserialize, Serialize};

use super::decode::PluginDecoder;
use super::filter::{Action, Filter};
use super::frame::Format;
use super::partitions::Relabel;
use super::pgoutput::Converter;
use crate::error::Error;
use crate::pg::pool::Pool;
use crate::pg::version::Major;

/// A table pattern no table matches (a schema name Postgres reserves for itself).
const NO_TABLE: &str = "pg_pgdeltastream_none.none";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Plugin {
    Wal2json,
    /// Built into Postgres; needs a publication (one per session, named as its slot).
    Pgoutput,
}

/// The publication work a slot's plugin may need, done by whoever owns that SQL (the
/// session layer): the plugin only says whether and when, so that this layer never
/// reaches up into sessions.
pub trait Publications {
    /// Creates the publication `name`, or refuses with nothing left behind.
    fn create(&self, name: &str) -> impl Future<Output = Result<(), Error>> + Send;
    /// Drops the publication `name` if it exists; a failure is the implementor's to report.
    fn remove(&self, name: &str) -> impl Future<Output = ()> + Send;
}

impl Plugin {
    pub const ALL: &'static [Plugin] = &[Plugin::Wal2json, Plugin::Pgoutput];

    /// What `auto` tries first: wal2json, whose output is forwarded as it is.
    pub(crate) const PREFERRED: Plugin = Plugin::Wal2json;

    /// The name Postgres knows it by (`pg_replication_slots.plugin`).
    pub fn name(self) -> &'static str {
        match self {
            Plugin::Wal2json => "wal2json",
            Plugin::Pgoutput => "pgoutput",
        }
    }

    /// The publication a pgoutput slot reads: named as the slot, created before it and
    /// dropped after it.
    pub(crate) fn publication_name(slot: &str) -> &str {
        slot
    }

    pub(crate) fn from_name(name: &str) -> Option<Plugin> {
        Plugin::ALL.iter().copied().find(|p| p.name() == name)
    }

    /// The publication a slot of this plugin reads, if it reads one.
    pub fn publication(self, slot: &str) -> Option<&str> {
        (self == Plugin::Pgoutput).then(|| Plugin::publication_name(slot))
    }

    /// Whether it applies a session's row filters and column lists (a publication does;
    /// wal2json has only whole tables).
    pub(crate) fn narrows(self) -> bool {
        self == Plugin::Pgoutput
    }

    /// The plugin that applies row filters and column lists.
    pub(crate) fn narrowing() -> Plugin {
        Plugin::Pgoutput
    }

    /// What `auto` takes instead when the database cannot load this plugin: pgoutput,
    /// which is built into Postgres.
    pub(crate) fn fallback(self) -> Option<Plugin> {
        (self == Plugin::Wal2json).then_some(Plugin::Pgoutput)
    }

    /// Others make slots of this plugin too (pgoutput: every subscriber): one of its
    /// slots is ours only when a session names it.
    pub fn shared(self) -> bool {
        self == Plugin::Pgoutput
    }

    /// Runs before slot `slot` is created: a pgoutput slot's publication must exist
    /// first, since each change is decoded with the catalog as it was then.
    pub(crate) async fn before_slot(self, slot: &str, publications: &impl Publications) -> Result<(), Error> {
        match self.publication(slot) {
            Some(name) => publications.create(name).await,
            None => Ok(()),
        }
    }

    /// Runs after slot `slot` was dropped (or never made): its publication goes too.
    pub(crate) async fn after_drop(self, slot: &str, publications: &impl Publications) {
        if let Some(name) = self.publication(slot) {
            publications.remove(name).await;
        }
    }

    /// The options of a watcher's stream of the session that reads `session_slot`
    /// (in the `changes` format): the session's, and wal2json names each change's key
    /// for the viewer (pgoutput names none; the viewer copes).
    pub(crate) fn watch_options(
        self,
        filter: &Filter,
        session_slot: &str,
        major: Major,
    ) -> Vec<(&'static str, String)> {
        let mut options = self.start_options(Format::Changes, filter, session_slot, major);
        if self == Plugin::Wal2json {
            options.push(("include-pk", "1".into()));
        }
        options
    }

    /// The options for `START_REPLICATION` of `slot` on a server of `major`: the format,
    /// and the filter applied inside Postgres.
    pub fn start_options(
        self,
        format: Format,
        filter: &Filter,
        slot: &str,
        major: Major,
    ) -> Vec<(&'static str, String)> {
        match self {
            Plugin::Wal2json => wal2json_options(format, filter),
            Plugin::Pgoutput => pgoutput_options(filter, slot, major),
        }
    }

    /// Completes `filter` for a stream that starts now. wal2json names a change by the
    /// leaf partition that holds the row, and its `add-tables` matches those names: when
    /// a listed table (or a table of a listed schema) is partitioned, wal2json is asked
    /// for every table's changes, and the decoder filters them and names each by its
    /// listed table ([`super::partitions`]), so that no partition is missed, attached
    /// later included. pgoutput's publication does both itself
    /// (`publish_via_partition_root`).
    pub async fn prepare(self, mut filter: Filter, pool: &Pool) -> Result<Filter, String> {
        let Some(tables) = &filter.tables else { return Ok(filter) };
        let rows = filter.actions.iter().any(|a| *a != Action::Message);
        if self != Plugin::Wal2json || !rows || tables.is_empty() {
            return Ok(filter);
        }
        let schemas: Vec<&str> = tables.iter().filter(|(_, t)| t.is_none()).map(|(s, _)| s.as_str()).collect();
        let (in_schemas, names): (Vec<&str>, Vec<&str>) =
            tables.iter().filter_map(|(s, t)| Some((s.as_str(), t.as_deref()?))).unzip();
        let query = async {
            let client = pool.get().await.map_err(|e| e.to_string())?;
            let row = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c                      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'p'                      AND (n.nspname = ANY ($1::text[]) OR (n.nspname::text, c.relname::text) IN                      (SELECT * FROM unnest($2::text[], $3::text[]))))",
                    &[&schemas, &in_schemas, &names],
                )
                .await
                .map_err(|e| e.to_string())?;
            client.release();
            row.try_get::<_, bool>(0).map_err(|e| e.to_string())
        };
        filter.partitioned = match tokio::time::timeout(std::time::Duration::from_secs(30), query).await {
            Ok(Ok(partitioned)) => partitioned,
            Ok(Err(e)) => return Err(format!("cannot look up the session's partitioned tables: {e}")),
            Err(_) => return Err("looking up the session's partitioned tables timed out".into()),
        };
        Ok(filter)
    }

    /// What turns the plugin's output into wal2json's messages. pgoutput's
    /// decoder drops the changes of `filter`'s hidden schemas (a publication FOR ALL
    /// TABLES cannot leave them out), names column types through `pool`, and holds up
    /// to `hold_memory` bytes of a transaction in memory until its commit.
    pub(crate) fn decoder(self, format: Format, filter: &Filter, pool: &Pool, hold_memory: usize) -> PluginDecoder {
        match self {
            Plugin::Wal2json => PluginDecoder::wal2json(
                format,
                filter
                    .partitioned
                    .then(|| Relabel::new(format, filter.tables.clone().unwrap_or_default(), pool.clone())),
            ),
            Plugin::Pgoutput => {
                PluginDecoder::pgoutput(Converter::new(format, &filter.hidden_schemas, hold_memory), pool.clone())
            }
        }
    }
}

/// pgoutput's filter is its publication (tables, actions); the format is ours to render.
/// 13's pgoutput refuses `messages`, and sends none: the option goes only where it exists.
/// Where it exists it is on whatever the session wants: a backfill's watermarks are
/// messages, and the stream's stage ([`super::marks`]) drops those the client does not
/// want.
fn pgoutput_options(filter: &Filter, slot: &str, major: Major) -> Vec<(&'static str, String)> {
    let publication = filter.publication.as_deref().unwrap_or(Plugin::publication_name(slot)).replace('"', "\"\"");
    let mut options = vec![("proto_version", "1".into()), ("publication_names", format!("\"{publication}\""))];
    if major.pgoutput_has_messages() {
        options.push(("messages", "true".into()));
    }
    options
}

fn wal2json_options(format: Format, filter: &Filter) -> Vec<(&'static str, String)> {
    let fixed: &[(&str, &str)] = match format {
        Format::Transactions => &[("include-lsn", "on"), ("pretty-print", "off"), ("write-in-chunks", "on")],
        Format::Changes => &[("format-version", "2"), ("include-lsn", "on")],
    };
    let mut options: Vec<_> = fixed.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let mut tables = filter.tables.as_ref().map(|tables| {
        let patterns: Vec<String> = tables.iter().map(|(s, t)| wal2json_pattern(s, t.as_deref())).collect();
        patterns.join(",")
    });
    if filter.actions.len() < Action::ALL.len() {
        let rows: Vec<&str> = filter.actions.iter().filter(|a| **a != Action::Message).map(|a| a.name()).collect();
        if rows.is_empty() {
            // wal2json refuses an empty list: keep inserts, of a table that no
            // table is.
            options.push(("actions", "insert".into()));
            tables = Some(NO_TABLE.into());
        } else {
            options.push(("actions", rows.join(",")));
        }
        if !filter.wants(Action::Message) {
            // wal2json cannot leave out every message, only pass those of listed
            // prefixes: list only ours (a backfill's watermarks, and schema changes
            // when the session wants them), which the stream's stage takes out or
            // turns into changes.
            let mut prefixes = vec![super::backfill::PREFIX];
            if filter.ddl {
                prefixes.push(super::ddl::PREFIX);
            }
            options.push(("add-msg-prefixes", prefixes.join(",")));
        }
    }
    // A partitioned table's changes come under its partitions' names: the decoder
    // filters them (see `Plugin::prepare`).
    if let Some(tables) = tables.filter(|_| !filter.partitioned) {
        options.push(("add-tables", tables));
    }
    if !filter.hidden_schemas.is_empty() {
        let hidden: Vec<String> = filter.hidden_schemas.iter().map(|s| wal2json_pattern(s, None)).collect();
        options.push(("filter-tables", hidden.join(",")));
    }
    options
}

/// A table or a schema's tables as wal2json's `add-tables` takes them: `schema.table` or
/// `schema.*`, with `\` before each character its list syntax gives a meaning to.
pub(crate) fn wal2json_pattern(schema: &str, table: Option<&str>) -> String {
    let escape = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if matches!(c, ',' | '.' | '*' | '\\' | ' ') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    match table {
        Some(t) => format!("{}.{}", escape(schema), escape(t)),
        None => format!("{}.*", escape(schema)),
    }
}

impl std::fmt::Display for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Plugin::ALL {
            assert_eq!(Plugin::from_name(p.name()), Some(*p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
        assert_eq!(Plugin::from_name("test_decoding"), None);
    }

    #[test]
    fn wal2json_escaping() {
        assert_eq!(wal2json_pattern("public", Some("orders")), "public.orders");
        assert_eq!(wal2json_pattern("audit", None), "audit.*");
        assert_eq!(wal2json_pattern("a.b", Some("c,d*")), "a\\.b.c\\,d\\*");
        assert_eq!(wal2json_pattern("s p", Some("t\\")), "s\\ p.t\\\\");
    }

    #[test]
    fn the_hooks_say_what_each_plugin_needs() {
        let f = Filter::default();
        assert!(Plugin::Wal2json.watch_options(&f, "s", Major(15)).contains(&("include-pk", "1".into())));
        assert!(!Plugin::Pgoutput.watch_options(&f, "s", Major(15)).iter().any(|(k, _)| *k == "include-pk"));
        assert_eq!(Plugin::Pgoutput.publication("delta_x1"), Some("delta_x1"));
        assert_eq!(Plugin::Wal2json.publication("delta_x1"), None);
        assert!(Plugin::narrowing().narrows() && !Plugin::PREFERRED.narrows());
        assert_eq!(Plugin::PREFERRED.fallback(), Some(Plugin::Pgoutput));
        assert_eq!(Plugin::Pgoutput.fallback(), None);
        assert!(Plugin::Pgoutput.shared() && !Plugin::Wal2json.shared());
    }

    #[test]
    fn options_carry_the_filter() {
        let all = Plugin::Wal2json.start_options(Format::Transactions, &Filter::default(), "s", Major(15));
        assert!(all.iter().all(|(k, _)| !["add-tables", "actions", "add-msg-prefixes"].contains(k)), "{all:?}");
        let filter = Filter {
            tables: Some(vec![("public".into(), Some("orders".into())), ("audit".into(), None)]),
            actions: vec![Action::Insert, Action::Delete],
            hidden_schemas: vec!["pgdeltastream".into()],
            partitioned: false,
            publication: None,
            ddl: false,
        };
        let some = Plugin::Wal2json.start_options(Format::Changes, &filter, "s", Major(15));
        let get = |k: &str| some.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("add-tables"), Some("public.orders,audit.*"));
        assert_eq!(get("actions"), Some("insert,delete"));
        assert_eq!(get("add-msg-prefixes"), Some(super::super::backfill::PREFIX));
        assert_eq!(get("filter-tables"), Some("pgdeltastream.*"));
        let ddl = Filter { ddl: true, ..filter };
        let some = Plugin::Wal2json.start_options(Format::Changes, &ddl, "s", Major(15));
        let prefixes = some.iter().find(|(key, _)| *key == "add-msg-prefixes").map(|(_, v)| v.as_str());
        assert_eq!(prefixes, Some("pgdeltastream.backfill,pgdeltastream.ddl"));
    }

    #[test]
    fn pgoutput_is_asked_for_messages_only_where_it_has_them() {
        let messages = |major| {
            let options = Plugin::Pgoutput.start_options(Format::Changes, &Filter::default(), "s", Major(major));
            options.iter().find(|(k, _)| *k == "messages").map(|(_, v)| v.clone())
        };
        assert_eq!(messages(13), None);
        assert_eq!(messages(14).as_deref(), Some("true"));
        assert_eq!(messages(18).as_deref(), Some("true"));
        let named = |filter: &Filter| {
            let options = Plugin::Pgoutput.start_options(Format::Changes, filter, "delta_x1", Major(16));
            options.into_iter().find(|(k, _)| *k == "publication_names").map(|(_, v)| v)
        };
        assert_eq!(named(&Filter::default()).as_deref(), Some("\"delta_x1\""));
        let theirs = Filter { publication: Some("Made \"here\"".into()), ..Filter::default() };
        assert_eq!(named(&theirs).as_deref(), Some("\"Made \"\"here\"\"\""));
    }
}
