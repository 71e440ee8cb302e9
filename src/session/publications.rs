//! A pgoutput session's publication: the tables and actions its slot decodes, named as
//! the slot, created before it (publications are looked up in the historic catalog of
//! each change) and dropped after it. The plugin says when ([`Plugin::before_slot`],
//! [`Plugin::after_drop`]); [`ForSession`] does it, with the SQL here.
//!
//! [`Plugin::before_slot`]: crate::stream::plugin::Plugin::before_slot
//! [`Plugin::after_drop`]: crate::stream::plugin::Plugin::after_drop
//!
//! A publication that publishes updates or deletes of a table without a replica
//! identity makes the application's own UPDATE and DELETE of that table fail. So the
//! publication is created in a transaction, checked there against Postgres's own view
//! of what it covers, and committed only when it breaks no table.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::definition::{Action, Definition, TableEntry, TablePattern};
use super::slots::Slots;
use crate::error::{Error, ErrorKind};
use crate::pg::ident::{quote_ident, quote_literal};
use crate::pg::pool::{Pool, PoolError, PooledClient};
use crate::pg::version::Major;
use crate::stream::plugin::Publications;

/// At most this many table names in a refusal.
const NAMES_SHOWN: usize = 20;

/// The publication hooks of one session's slot ([`Publications`]), done with the
/// SQL of this module: what the plugin asks for before the slot and after its drop.
pub(super) struct ForSession<'a> {
    pub slots: &'a Slots,
    pub def: &'a Definition,
}

impl Publications for ForSession<'_> {
    async fn create(&self, name: &str) -> Result<(), Error> {
        create_publication(&self.slots.pool, self.def, name, &self.slots.hidden_schema).await
    }

    async fn remove(&self, name: &str) {
        if let Err(e) = drop_publication(&self.slots.pool, name).await {
            tracing::error!(publication = name, error = %e, "cannot drop the publication: run DROP PUBLICATION {}", quote_ident(name));
        }
    }
}

/// Creates publication `name` of session `def`, or refuses with nothing left behind:
/// 409 when it would break the application's updates or deletes, 403 when the role may
/// not create it, 400 when Postgres refuses a row filter or a column.
async fn create_publication(pool: &Pool, def: &Definition, name: &str, hidden_schema: &str) -> Result<(), Error> {
    let client = pool.get().await?;
    let major = client.major().ok_or(PoolError::NoVersion)?;
    let plan = match Plan::new(def, name, hidden_schema, major) {
        Ok(plan) => plan,
        Err(e) => {
            client.release();
            return Err(e);
        }
    };
    client.batch_execute("BEGIN").await?;
    let done = plan.run_checked(&client, std::slice::from_ref(&plan.sql)).await;
    commit_or_roll_back(client, done).await?;
    if plan.all_tables {
        tracing::warn!(
            publication = %plan.name,
            "publication created FOR ALL TABLES: it covers tables created later too, and their UPDATE and DELETE \
             fail while they have no replica identity"
        );
    } else {
        tracing::info!(publication = %plan.name, "publication created");
    }
    Ok(())
}

/// Changes the publication of session `old` to publish what `new` says, and stores
/// `new`, in one transaction: checked as a new one is ([`Plan::run_checked`]), so that
/// a refusal leaves the publication and the stored definition as they were. Changes
/// decoded after its commit follow the new publication, in a running stream too.
pub(super) async fn alter_publication(slots: &Slots, old: &Definition, new: &Definition) -> Result<(), Error> {
    let name = new.publication().ok_or_else(|| Error::internal("the session reads no publication"))?;
    let client = slots.pool.get().await?;
    let major = client.major().ok_or(PoolError::NoVersion)?;
    let plan = match Plan::new(new, &name, &slots.hidden_schema, major) {
        Ok(plan) => plan,
        Err(e) => {
            client.release();
            return Err(e);
        }
    };
    let statements = plan.alter_statements(old.tables.is_none());
    client.batch_execute("BEGIN").await?;
    let done = async {
        plan.run_checked(&client, &statements).await?;
        slots.store.put_in(&client, new).await
    }
    .await;
    commit_or_roll_back(client, done).await?;
    tracing::info!(publication = %name, statements = ?statements, "publication changed");
    Ok(())
}

/// Ends the transaction `client` is in: COMMIT after `done`, ROLLBACK after its error
/// (a connection that cannot roll back is not given back to the pool).
async fn commit_or_roll_back(client: PooledClient, done: Result<(), Error>) -> Result<(), Error> {
    match done {
        Ok(()) => {
            client.batch_execute("COMMIT").await?;
            client.release();
            Ok(())
        }
        Err(e) => {
            if client.batch_execute("ROLLBACK").await.is_ok() {
                client.release();
            }
            Err(e)
        }
    }
}

/// Drops a publication if it exists.
async fn drop_publication(pool: &Pool, name: &str) -> Result<(), Error> {
    let client = pool.get().await?;
    client.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name))).await?;
    client.release();
    tracing::info!(publication = name, "publication dropped");
    Ok(())
}

/// The publication to create, and what Postgres must say it covers.
#[derive(Debug)]
struct Plan {
    name: String,
    sql: String,
    /// `FOR ...` as in `sql` (empty for a publication of no table).
    target: String,
    /// What `WITH (...)` holds in `sql`.
    with: String,
    all_tables: bool,
    /// (schema, table) listed, sorted.
    tables: Vec<(String, String)>,
    schemas: Vec<String>,
    /// Tables with a row filter or a column list, quoted.
    narrowed: Vec<String>,
    /// (quoted table, row filter), each one expression (`TableSpec::check`).
    filters: Vec<(String, String)>,
    /// What `publish` says: (insert, update, delete, truncate).
    publishes: [bool; 4],
    /// Publishes updates or deletes: tables without a replica identity break.
    needs_identity: bool,
    publishes_delete: bool,
    publishes_generated: bool,
    major: Major,
}

impl Plan {
    fn new(def: &Definition, name: &str, hidden_schema: &str, major: Major) -> Result<Plan, Error> {
        let name = name.to_owned();
        let mut plan = Plan {
            sql: String::new(),
            target: String::new(),
            with: String::new(),
            all_tables: def.tables.is_none(),
            tables: Vec::new(),
            schemas: Vec::new(),
            narrowed: Vec::new(),
            filters: Vec::new(),
            publishes: [Action::Insert, Action::Update, Action::Delete, Action::Truncate]
                .map(|a| def.actions.contains(&a)),
            needs_identity: def.actions.iter().any(|a| matches!(a, Action::Update | Action::Delete)),
            publishes_delete: def.actions.contains(&Action::Delete),
            publishes_generated: def.publish_generated_columns,
            name,
            major,
        };
        let mut items = Vec::new();
        for entry in def.tables.iter().flatten() {
            if let Some(item) = plan.item(entry, hidden_schema)? {
                items.push(item);
            }
        }
        plan.tables.sort();
        plan.tables.dedup();
        plan.schemas.sort();
        plan.schemas.dedup();
        let target = if plan.all_tables {
            " FOR ALL TABLES".to_owned()
        } else if items.is_empty() {
            // Every listed table is the store's own: a publication of nothing.
            String::new()
        } else if major.repeats_table_keyword() {
            format!(" FOR {}", items.join(", "))
        } else {
            // Only tables before 15: `FOR TABLE a, b`.
            let names: Vec<&str> = items.iter().filter_map(|i| i.strip_prefix("TABLE ")).collect();
            format!(" FOR TABLE {}", names.join(", "))
        };
        let publish: Vec<&str> = def.actions.iter().filter(|a| **a != Action::Message).map(|a| a.name()).collect();
        // A listed partitioned table's changes come under its own name, not its
        // partitions' (as the session lists it, and as its snapshot names it). A
        // session without tables names every table: each change comes under the
        // partition that holds the row, as wal2json names it.
        let via_root = if plan.all_tables { "" } else { ", publish_via_partition_root = true" };
        let generated = match def.publish_generated_columns {
            true if !major.has_generated_column_publishing() => {
                return Err(needs(
                    major,
                    18,
                    "publishGeneratedColumns (generated columns through pgoutput)",
                    GENERATED,
                ));
            }
            true => ", publish_generated_columns = stored",
            false => "",
        };
        plan.with = format!("publish = {}{via_root}{generated}", quote_literal(&publish.join(", ")));
        plan.sql = format!("CREATE PUBLICATION {}{target} WITH ({})", quote_ident(&plan.name), plan.with);
        plan.target = target;
        Ok(plan)
    }

    /// The statements that make the publication, now FOR ALL TABLES or not as
    /// `was_all_tables` says, this one. ALTER PUBLICATION sets a list of tables and
    /// the options, but cannot turn FOR ALL TABLES into a list (nor back), nor set an
    /// empty list: then the publication is dropped and made again, in the caller's
    /// transaction, so that a decoder sees one or the other, never none.
    fn alter_statements(&self, was_all_tables: bool) -> Vec<String> {
        let name = quote_ident(&self.name);
        let options = format!("ALTER PUBLICATION {name} SET ({})", self.with);
        match self.target.strip_prefix(" FOR ") {
            _ if self.all_tables && was_all_tables => vec![options],
            Some(items) if !self.all_tables && !was_all_tables => {
                vec![format!("ALTER PUBLICATION {name} SET {items}"), options]
            }
            _ => vec![format!("DROP PUBLICATION {name}"), self.sql.clone()],
        }
    }

    /// One item of `FOR ...`; None for the store's schema, which is never streamed.
    fn item(&mut self, entry: &TableEntry, hidden_schema: &str) -> Result<Option<String>, Error> {
        match TablePattern::parse(entry.pattern())? {
            TablePattern::Schema(schema) => {
                if entry.narrows() {
                    return Err(Error::bad_request(format!(
                        "{}: a row filter or a column list applies to one table, not to every table of a schema",
                        entry.pattern()
                    )));
                }
                if schema == hidden_schema {
                    return Ok(None);
                }
                if !self.major.has_schema_publications() {
                    return Err(needs(
                        self.major,
                        15,
                        &format!("{} (every table of a schema, FOR TABLES IN SCHEMA) with pgoutput", entry.pattern()),
                        LIST_TABLES,
                    ));
                }
                let item = format!("TABLES IN SCHEMA {}", quote_ident(&schema));
                self.schemas.push(schema);
                Ok(Some(item))
            }
            TablePattern::Table(t) => {
                let schema = t.schema.ok_or_else(|| Error::internal(format!("table {} is not resolved", t.name)))?;
                if schema == hidden_schema {
                    return Ok(None);
                }
                let table = format!("{}.{}", quote_ident(&schema), quote_ident(&t.name));
                let mut item = format!("TABLE {table}");
                if entry.narrows() && !self.major.has_row_filters_and_column_lists() {
                    let what = format!("the row filter (where) or column list of {table}");
                    return Err(needs(self.major, 15, &what, UNFILTERED));
                }
                if let TableEntry::Table(spec) = entry {
                    spec.check()?;
                    if let Some(columns) = &spec.columns {
                        let quoted: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
                        item.push_str(&format!(" ({})", quoted.join(", ")));
                    }
                    if let Some(filter) = &spec.row_filter {
                        item.push_str(&format!(" WHERE ({filter})"));
                        self.filters.push((table.clone(), filter.clone()));
                    }
                }
                if entry.narrows() {
                    self.narrowed.push(table);
                }
                self.tables.push((schema, t.name));
                Ok(Some(item))
            }
        }
    }

    /// Runs `statements` (which make the publication this plan says: [`Plan::sql`]
    /// or [`Plan::alter_statements`]) in the caller's transaction, and checks the result.
    async fn run_checked(&self, client: &Client, statements: &[String]) -> Result<(), Error> {
        // check_expression reads quotes as Postgres does with this setting.
        client.batch_execute("SET LOCAL standard_conforming_strings = on").await?;
        self.check_filters(client).await?;
        for sql in statements {
            // The extended protocol runs one statement, whatever a row filter's text holds.
            client.execute(sql, &[]).await.map_err(|e| refused(&self.name, &e))?;
        }
        self.check_covers(client).await?;
        self.check_options(client).await?;
        if self.needs_identity {
            self.check_identities(client).await?;
            self.check_narrowed(client).await?;
            if self.major.has_generated_column_publishing() && !self.publishes_generated {
                self.check_generated(client).await?;
            }
        }
        Ok(())
    }

    /// Each row filter, on its own, is an expression of its table's columns: Postgres
    /// parses and plans it alone before the same text goes into the publication (which
    /// then checks what a row filter may use).
    async fn check_filters(&self, client: &Client) -> Result<(), Error> {
        for (table, filter) in &self.filters {
            let sql = format!("SELECT ({filter})::pg_catalog.bool FROM ONLY {table} LIMIT 0");
            let statement = client.prepare(&sql).await.map_err(|e| match e.code() {
                Some(code) if CLIENT_CLASSES.contains(&&code.code()[..2]) => Error::bad_request(format!(
                    "the row filter (where) of {table} is not a valid expression: {}",
                    crate::pg::snapshot::describe(&e)
                )),
                _ => Error::from_tokio_pg(&e),
            })?;
            if !statement.params().is_empty() || statement.columns().len() != 1 {
                return Err(Error::bad_request(format!(
                    "the row filter (where) of {table} must be one SQL expression without parameters ($1)"
                )));
            }
        }
        Ok(())
    }

    /// What the publication publishes is what was asked: a row filter cannot have
    /// rewritten the options after it (they decide the replica identity check).
    async fn check_options(&self, client: &Client) -> Result<(), Error> {
        let row = client
            .query_one(
                "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate \
                 FROM pg_catalog.pg_publication WHERE pubname = $1",
                &[&self.name],
            )
            .await?;
        let all_tables: bool = row.try_get(0)?;
        let publishes: [bool; 4] = [row.try_get(1)?, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?];
        if all_tables != self.all_tables || publishes != self.publishes {
            return Err(Error::bad_request(
                "a row filter (where) must be one SQL expression: Postgres read it as more of the publication",
            ));
        }
        Ok(())
    }

    /// A row filter is SQL in the middle of the statement: make sure it added no table
    /// or schema of its own.
    async fn check_covers(&self, client: &Client) -> Result<(), Error> {
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_publication p \
                 JOIN pg_catalog.pg_publication_rel r ON r.prpubid = p.oid \
                 JOIN pg_catalog.pg_class c ON c.oid = r.prrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1 ORDER BY 1, 2",
                &[&self.name],
            )
            .await?;
        let tables: Vec<(String, String)> =
            rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, tokio_postgres::Error>>()?;
        // Before 15 a publication has no schemas (nor their catalog).
        let mut schemas: Vec<String> = Vec::new();
        if self.major.has_schema_publications() {
            let rows = client
                .query(
                    "SELECT n.nspname::text FROM pg_catalog.pg_publication p \
                     JOIN pg_catalog.pg_publication_namespace pn ON pn.pnpubid = p.oid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = pn.pnnspid \
                     WHERE p.pubname = $1 ORDER BY 1",
                    &[&self.name],
                )
                .await?;
            schemas = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        }
        if tables != self.tables || schemas != self.schemas {
            return Err(Error::bad_request(
                "a row filter (where) must be one SQL expression: Postgres read it as more of the publication",
            ));
        }
        Ok(())
    }

    /// The tables the publication covers (as Postgres counts them: future ones of FOR
    /// ALL TABLES aside) whose UPDATE and DELETE it would break.
    async fn check_identities(&self, client: &Client) -> Result<(), Error> {
        let rows = client
            .query(
                "SELECT pg_catalog.format('%I.%I', pt.schemaname, pt.tablename) \
                 FROM pg_catalog.pg_publication_tables pt \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
                 WHERE pt.pubname = $1 AND (c.relreplident = 'n' OR (c.relreplident IN ('d', 'i') AND NOT EXISTS ( \
                     SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid \
                     AND CASE c.relreplident WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END))) \
                 ORDER BY 1",
                &[&self.name],
            )
            .await?;
        let broken: Vec<String> = rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?;
        if broken.is_empty() {
            return Ok(());
        }
        let mut shown = broken.iter().take(NAMES_SHOWN).cloned().collect::<Vec<_>>().join(", ");
        if broken.len() > NAMES_SHOWN {
            shown.push_str(&format!(" and {} more", broken.len() - NAMES_SHOWN));
        }
        Err(Error::conflict(format!(
            "refusing to create publication {}: it publishes updates or deletes of tables without a replica identity \
             ({shown}), which would make the application's own UPDATE and DELETE of them fail. Fix: give them one \
             (ALTER TABLE ... REPLICA IDENTITY FULL, or a primary key), list the session's tables without them, \
             leave update and delete out of its actions, or use \"plugin\": \"wal2json\"",
            self.name
        )))
    }

    /// A row filter or column list must cover the replica identity, or Postgres refuses
    /// the table's UPDATE and DELETE.
    async fn check_narrowed(&self, client: &Client) -> Result<(), Error> {
        for table in &self.narrowed {
            if let Some(e) = self.refused_write(client, table).await? {
                return Err(Error::conflict(format!(
                    "refusing to create publication {}: with its row filter or column list, the application's \
                     own UPDATE and DELETE of {table} would fail ({e}). Fix: filter and list only replica identity \
                     columns, give the table REPLICA IDENTITY FULL, or leave update and delete out of the actions",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// From 18, a publication that leaves generated columns out makes Postgres refuse
    /// UPDATE and DELETE of a table whose replica identity has one (REPLICA IDENTITY
    /// FULL with a stored generated column).
    async fn check_generated(&self, client: &Client) -> Result<(), Error> {
        let rows = client
            .query(
                "SELECT DISTINCT pg_catalog.format('%I.%I', pt.schemaname, pt.tablename) \
                 FROM pg_catalog.pg_publication_tables pt \
                 JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
                 JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attgenerated <> '' AND NOT a.attisdropped \
                 WHERE pt.pubname = $1 AND c.relreplident <> 'n' ORDER BY 1",
                &[&self.name],
            )
            .await?;
        for row in rows {
            let table: String = row.try_get(0)?;
            if let Some(e) = self.refused_write(client, &table).await? {
                return Err(Error::conflict(format!(
                    "refusing to create publication {}: the application's own UPDATE and DELETE of {table} would fail \
                     ({e}), as PostgreSQL 18 refuses them for a table whose replica identity has a generated column \
                     that the publication leaves out. Fix: \"publishGeneratedColumns\": true, a replica identity \
                     without generated columns, or leave update and delete out of the actions",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// Why Postgres would refuse an UPDATE or DELETE of `table` (quoted) now, if it
    /// would: it checks a replica identity against the publications when it plans one,
    /// so plan one, in a savepoint.
    async fn refused_write(&self, client: &Client, table: &str) -> Result<Option<String>, Error> {
        let sql = if self.publishes_delete {
            format!("EXPLAIN DELETE FROM {table}")
        } else {
            let row = client
                .query_opt(
                    "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass \
                     AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum LIMIT 1",
                    &[&table],
                )
                .await?;
            let Some(row) = row else { return Ok(None) };
            let column = quote_ident(&row.try_get::<_, String>(0)?);
            format!("EXPLAIN UPDATE {table} SET {column} = {column}")
        };
        client.batch_execute("SAVEPOINT planned").await?;
        match client.batch_execute(&sql).await {
            Ok(()) => client.batch_execute("RELEASE SAVEPOINT planned").await?,
            Err(e) => {
                client.batch_execute("ROLLBACK TO SAVEPOINT planned").await?;
                // May not write the table: Postgres will check the writers, not us.
                if e.code() != Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    return Ok(Some(crate::pg::snapshot::describe(&e)));
                }
            }
        }
        Ok(None)
    }
}

/// The classes of SQLSTATE that a request's tables, filters and columns cause: syntax
/// and access (42), data (22), unsupported (0A), object state (55).
const CLIENT_CLASSES: &[&str] = &["42", "22", "0A", "55"];

/// 400: `what` needs PostgreSQL `major` or later, and the server is older.
fn needs(server: Major, major: u32, what: &str, instead: &str) -> Error {
    Error::bad_request(format!(
        "{what} needs PostgreSQL {major} or later; this server is PostgreSQL {server}: {instead}"
    ))
}

const LIST_TABLES: &str = "list the tables one by one, or use \"plugin\": \"wal2json\" where it is installed";
const UNFILTERED: &str = "leave out where and columns, or use \"plugin\": \"wal2json\" with its actions and tables";
const GENERATED: &str = "leave it out, or use \"plugin\": \"wal2json\", which prints generated columns";

/// Postgres refused `CREATE PUBLICATION`.
fn refused(name: &str, e: &tokio_postgres::Error) -> Error {
    let said = crate::pg::snapshot::describe(e);
    let Some(code) = e.code() else { return Error::from_tokio_pg(e) };
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return Error::new(
            ErrorKind::Forbidden,
            format!(
                "the configured user may not create publication {name}: {said}. A publication FOR ALL \
                 TABLES (a session without tables) or FOR TABLES IN SCHEMA (schema.*) needs a superuser, one FOR \
                 TABLE needs the owner of each table and CREATE on the database; or use \"plugin\": \"wal2json\""
            ),
        );
    }
    // The request's tables, row filters and columns: Postgres's reason is the answer.
    if CLIENT_CLASSES.contains(&&code.code()[..2]) {
        return Error::bad_request(format!("Postgres refused the publication: {said}"));
    }
    Error::from_tokio_pg(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::definition::TableSpec;
    use crate::stream::plugin::Plugin;

    fn def(tables: Option<Vec<TableEntry>>, actions: &[Action]) -> Definition {
        Definition {
            name: "n".into(),
            slot_name: "delta_amber1".into(),
            plugin: Plugin::Pgoutput,
            tables,
            actions: actions.to_vec(),
            publish_generated_columns: false,
            policy: Default::default(),
            fate: Default::default(),
            external_publication: None,
            backfill: None,
            ddl: false,
        }
    }

    impl Plan {
        fn new_for(def: &Definition, hidden_schema: &str) -> Result<Plan, Error> {
            Plan::new(def, Plugin::publication_name(&def.slot_name), hidden_schema, Major(15))
        }
    }

    #[test]
    fn every_table_and_every_action() {
        let plan = Plan::new_for(&def(None, &Action::ALL), "pgdeltastream").unwrap();
        assert_eq!(
            plan.sql,
            "CREATE PUBLICATION \"delta_amber1\" FOR ALL TABLES WITH (publish = 'insert, update, delete, truncate')"
        );
        assert!(plan.all_tables && plan.needs_identity);
    }

    #[test]
    fn tables_schemas_filters_and_columns() {
        let tables = vec![
            TableEntry::Pattern("public.orders".into()),
            TableEntry::Pattern("audit.*".into()),
            TableEntry::Pattern("pgdeltastream.*".into()),
            TableEntry::Pattern("pgdeltastream.sessions".into()),
            TableEntry::Table(TableSpec {
                table: "\"Odd\".t".into(),
                row_filter: Some("amount > 100".into()),
                columns: Some(vec!["id".into(), "Amount".into()]),
            }),
        ];
        let plan = Plan::new_for(&def(Some(tables), &[Action::Insert, Action::Message]), "pgdeltastream").unwrap();
        assert_eq!(
            plan.sql,
            "CREATE PUBLICATION \"delta_amber1\" FOR TABLE \"public\".\"orders\", TABLES IN SCHEMA \"audit\", \
             TABLE \"Odd\".\"t\" (\"id\", \"Amount\") WHERE (amount > 100) WITH (publish = 'insert', \
             publish_via_partition_root = true)"
        );
        assert_eq!(plan.tables, [("Odd".to_owned(), "t".to_owned()), ("public".into(), "orders".into())]);
        assert_eq!(plan.schemas, ["audit"]);
        assert_eq!(plan.narrowed, ["\"Odd\".\"t\""]);
        assert!(!plan.all_tables && !plan.needs_identity);
    }

    #[test]
    fn no_row_action_publishes_nothing_and_the_store_alone_is_no_table() {
        let only_store = Some(vec![TableEntry::Pattern("pgdeltastream.*".into())]);
        let plan = Plan::new_for(&def(only_store, &[Action::Message]), "pgdeltastream").unwrap();
        assert_eq!(
            plan.sql,
            "CREATE PUBLICATION \"delta_amber1\" WITH (publish = '', publish_via_partition_root = true)"
        );
    }

    #[test]
    fn a_row_filter_that_would_be_more_than_one_expression_never_reaches_the_statement() {
        let spec = |filter: &str, columns: Option<Vec<String>>| {
            vec![TableEntry::Table(TableSpec { table: "public.t".into(), row_filter: Some(filter.into()), columns })]
        };
        for filter in ["true) --", "true); DROP TABLE t", "true /* */", "(true", "'open", "x\0"] {
            let e = Plan::new_for(&def(Some(spec(filter, None)), &[Action::Insert]), "pgdeltastream").unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{filter:?}: {e}");
        }
        let nul = Some(vec!["id\0".to_owned()]);
        assert!(Plan::new_for(&def(Some(spec("true", nul)), &[Action::Insert]), "pgdeltastream").is_err());
        let plan = Plan::new_for(&def(Some(spec("note = 'a) --'", None)), &[Action::Insert]), "pgdeltastream").unwrap();
        assert!(
            plan.sql.ends_with("WHERE (note = 'a) --') WITH (publish = 'insert', publish_via_partition_root = true)"),
            "{}",
            plan.sql
        );
        assert_eq!(plan.filters, [("\"public\".\"t\"".to_owned(), "note = 'a) --'".to_owned())]);
        assert_eq!(plan.publishes, [true, false, false, false]);
    }

    #[test]
    fn a_list_is_altered_and_every_table_made_again() {
        let listed = Some(vec![TableEntry::Pattern("public.a".into()), TableEntry::Pattern("audit.*".into())]);
        let plan = Plan::new_for(&def(listed, &[Action::Insert]), "pgdeltastream").unwrap();
        let options = "ALTER PUBLICATION \"delta_amber1\" SET (publish = 'insert', publish_via_partition_root = true)";
        assert_eq!(
            plan.alter_statements(false),
            ["ALTER PUBLICATION \"delta_amber1\" SET TABLE \"public\".\"a\", TABLES IN SCHEMA \"audit\"", options]
        );
        // FOR ALL TABLES cannot be altered to a list: dropped and made again.
        assert_eq!(plan.alter_statements(true), ["DROP PUBLICATION \"delta_amber1\"".to_owned(), plan.sql.clone()]);
        let every = Plan::new_for(&def(None, &[Action::Delete]), "pgdeltastream").unwrap();
        assert_eq!(every.alter_statements(true), ["ALTER PUBLICATION \"delta_amber1\" SET (publish = 'delete')"]);
        let only_store = Some(vec![TableEntry::Pattern("pgdeltastream.*".into())]);
        let nothing = Plan::new_for(&def(only_store, &[Action::Insert]), "pgdeltastream").unwrap();
        assert_eq!(nothing.alter_statements(false)[0], "DROP PUBLICATION \"delta_amber1\"");
    }

    #[test]
    fn a_schema_cannot_be_narrowed() {
        let tables = vec![TableEntry::Table(TableSpec {
            table: "audit.*".into(),
            row_filter: Some("true".into()),
            columns: None,
        })];
        let e = Plan::new_for(&def(Some(tables), &Action::ALL), "pgdeltastream").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    }

    #[test]
    fn before_15_tables_are_listed_after_one_keyword_and_schemas_filters_columns_are_refused() {
        let two = vec![TableEntry::Pattern("public.orders".into()), TableEntry::Pattern("public.items".into())];
        let d = def(Some(two), &[Action::Insert]);
        for major in [13, 14] {
            let plan = Plan::new(&d, "delta_amber1", "pgdeltastream", Major(major)).unwrap();
            assert_eq!(
                plan.sql,
                "CREATE PUBLICATION \"delta_amber1\" FOR TABLE \"public\".\"orders\", \"public\".\"items\" \
                 WITH (publish = 'insert', publish_via_partition_root = true)"
            );
        }
        let schema = def(Some(vec![TableEntry::Pattern("audit.*".into())]), &[Action::Insert]);
        let e = Plan::new(&schema, "delta_amber1", "pgdeltastream", Major(14)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.to_string().contains("needs PostgreSQL 15 or later; this server is PostgreSQL 14"), "{e}");
        let filtered = vec![TableEntry::Table(TableSpec {
            table: "public.t".into(),
            row_filter: Some("true".into()),
            columns: None,
        })];
        let e =
            Plan::new(&def(Some(filtered), &[Action::Insert]), "delta_amber1", "pgdeltastream", Major(13)).unwrap_err();
        assert!(e.to_string().contains("needs PostgreSQL 15 or later; this server is PostgreSQL 13"), "{e}");
    }

    #[test]
    fn generated_columns_are_published_from_18_and_refused_before() {
        let mut d = def(Some(vec![TableEntry::Pattern("public.t".into())]), &[Action::Insert]);
        d.publish_generated_columns = true;
        let plan = Plan::new(&d, "delta_amber1", "pgdeltastream", Major(18)).unwrap();
        assert!(
            plan.sql.ends_with("publish_via_partition_root = true, publish_generated_columns = stored)"),
            "{}",
            plan.sql
        );
        let e = Plan::new(&d, "delta_amber1", "pgdeltastream", Major(17)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.to_string().contains("needs PostgreSQL 18 or later; this server is PostgreSQL 17"), "{e}");
    }
}
