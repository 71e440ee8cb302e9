//! The event trigger behind `"ddl": true`: for each DDL command it writes a
//! transactional logical message ([`PREFIX`]), which the stream meets in its
//! transaction's place and turns into a DDL change of the session's tables
//! ([`crate::stream::ddl`]). A logical message belongs to no table, so every slot of the
//! database decodes it, whichever plugin and publication it reads.
//!
//! The function lives in the store's schema; the triggers (`ddl_command_end`, and
//! `sql_drop` for drops, whose objects are gone from the catalog by `ddl_command_end`)
//! are the database's. Creating an event trigger needs a superuser on every major we
//! support (13 to 18): a server whose role is not one gets a 403 that carries the SQL
//! for an admin to run, and nothing is created. The function is `SECURITY DEFINER` with
//! a fixed `search_path`, so that it writes its message whoever runs the DDL, and
//! catches its own errors: a user's DDL never fails because of it.

use tokio_postgres::error::SqlState;

use crate::error::{Error, ErrorKind};
use crate::pg::ident::quote_ident;
use crate::pg::pool::{Pool, PoolError};
use crate::pg::version::Major;
use crate::stream::ddl::PREFIX;
use crate::stream::plugin::Plugin;

/// The event triggers, by name and event. Names are the database's, not a schema's.
const TRIGGERS: [(&str, &str); 2] = [("pgdeltastream_ddl", "ddl_command_end"), ("pgdeltastream_ddl_drop", "sql_drop")];

/// The trigger function, in the store's schema.
const FUNCTION: &str = "ddl_event";

/// The function's body: one message per command (per dropped table or root object of a
/// drop), with the table's columns as the catalog has them after the command.
///
/// Then one more message, which the stream drops: decoding places a transactional
/// message at its record's end LSN, the same LSN as the next record's start, and when
/// that next record is another (sub)transaction's (the exception block is a
/// subtransaction of its own) the two tie, and Postgres may send the message after the
/// user's next change. After this one the last event ends strictly before it.
const BODY: &str = r#"
DECLARE
    r record;
    emitted int := 0;
BEGIN
    IF tg_event = 'sql_drop' THEN
        FOR r IN SELECT d.object_type, d.object_identity, d.schema_name,
                        CASE WHEN d.object_type = 'table' THEN d.object_name END AS table_name
                   FROM pg_event_trigger_dropped_objects() d
                  WHERE tg_tag LIKE 'DROP %' AND NOT d.is_temporary AND (d.original OR d.object_type = 'table')
        LOOP
            PERFORM pg_logical_emit_message(true, '{PREFIX}', json_build_object(
                'command', tg_tag, 'objectType', r.object_type, 'identity', r.object_identity,
                'schema', r.schema_name, 'table', r.table_name,
                'columnnames', '[]'::json, 'columntypes', '[]'::json)::text);
            emitted := emitted + 1;
        END LOOP;
    ELSE
        FOR r IN SELECT d.command_tag, d.object_type, d.object_identity, d.schema_name,
                        c.oid AS rel, c.relname::text AS table_name
                   FROM pg_event_trigger_ddl_commands() d
                   LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
                        AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
                  WHERE NOT d.in_extension
        LOOP
            PERFORM pg_logical_emit_message(true, '{PREFIX}', json_build_object(
                'command', r.command_tag, 'objectType', r.object_type, 'identity', r.object_identity,
                'schema', r.schema_name, 'table', r.table_name,
                'columnnames', coalesce((SELECT json_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                    WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped), '[]'::json),
                'columntypes', coalesce((SELECT json_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
                    FROM pg_attribute a WHERE a.attrelid = r.rel AND a.attnum > 0 AND NOT a.attisdropped),
                    '[]'::json))::text);
            emitted := emitted + 1;
        END LOOP;
    END IF;
    IF emitted > 0 THEN
        PERFORM pg_logical_emit_message(true, '{PREFIX}-end', '');
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgdeltastream: a schema change was not written to the stream: %', SQLERRM;
END
"#;

/// `schema.ddl_event()`, quoted.
fn function_name(schema: &str) -> String {
    format!("{}.{FUNCTION}()", quote_ident(schema))
}

/// `CREATE OR REPLACE FUNCTION ...`: the same text whoever runs it.
fn function_sql(schema: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {} RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp AS $pgdeltastream${}$pgdeltastream$",
        function_name(schema),
        BODY.replace("{PREFIX}", PREFIX)
    )
}

fn trigger_sql(schema: &str, name: &str, event: &str) -> String {
    format!("CREATE EVENT TRIGGER {name} ON {event} EXECUTE FUNCTION {}", function_name(schema))
}

/// What an admin runs for a server whose role may not: the function and both
/// triggers, in one transaction, again at will.
pub(crate) fn admin_sql(schema: &str) -> String {
    let mut sql = format!("BEGIN;\n{};\n", function_sql(schema));
    for (name, event) in TRIGGERS {
        sql.push_str(&format!("DROP EVENT TRIGGER IF EXISTS {name};\n{};\n", trigger_sql(schema, name, event)));
    }
    sql.push_str("COMMIT;");
    sql
}

/// 13's pgoutput sends no logical messages: a pgoutput session there would never see one.
pub(super) fn check_plugin(plugin: Plugin, major: Major) -> Result<(), Error> {
    if plugin == Plugin::Pgoutput && !major.pgoutput_has_messages() {
        return Err(Error::bad_request(format!(
            "ddl needs logical messages, which pgoutput sends from PostgreSQL 14; this server is PostgreSQL \
             {major}: use \"plugin\": \"wal2json\" where it is installed, or leave ddl out"
        )));
    }
    Ok(())
}

/// What the database has of the trigger.
struct Installed {
    superuser: bool,
    /// Trigger names that exist, and of them those enabled on our function.
    present: Vec<String>,
    ready: Vec<String>,
}

impl Installed {
    async fn read(client: &tokio_postgres::Client, schema: &str) -> Result<Installed, Error> {
        let names: Vec<&str> = TRIGGERS.iter().map(|(n, _)| *n).collect();
        let row = client
            .query_one(
                "SELECT pg_catalog.current_setting('is_superuser') = 'on', \
                 ARRAY(SELECT evtname::text FROM pg_catalog.pg_event_trigger WHERE evtname = ANY ($1)), \
                 ARRAY(SELECT evtname::text FROM pg_catalog.pg_event_trigger WHERE evtname = ANY ($1) \
                       AND evtenabled <> 'D' AND evtfoid = pg_catalog.to_regprocedure($2))",
                &[&names, &function_name(schema)],
            )
            .await?;
        Ok(Installed { superuser: row.try_get(0)?, present: row.try_get(1)?, ready: row.try_get(2)? })
    }

    fn is_ready(&self) -> bool {
        TRIGGERS.iter().all(|(n, _)| self.ready.iter().any(|r| r == n))
    }
}

/// Makes sure the event trigger writes DDL messages before a session with `ddl` is
/// created: creates (or updates) the function and the missing triggers where the role
/// is a superuser, else refuses with the SQL for an admin (403; 409 on a standby,
/// where nothing can be created). A trigger an admin made is used as it is.
pub(super) async fn prepare(pool: &Pool, schema: &str, plugin: Plugin, standby: bool) -> Result<(), Error> {
    let client = pool.get().await?;
    check_plugin(plugin, client.major().ok_or(PoolError::NoVersion)?)?;
    let installed = Installed::read(&client, schema).await?;
    if !installed.superuser || standby {
        client.release();
        return match installed.is_ready() {
            true => Ok(()),
            false => Err(refusal(schema, standby)),
        };
    }
    install(&client, schema, &installed).await?;
    let installed = Installed::read(&client, schema).await?;
    client.release();
    if !installed.is_ready() {
        return Err(Error::conflict(format!(
            "an event trigger named {} exists but is disabled or runs another function: enable it \
             (ALTER EVENT TRIGGER ... ENABLE) or drop it, and create the session again",
            TRIGGERS.map(|(n, _)| n).join(" or ")
        )));
    }
    Ok(())
}

/// Why the trigger cannot be made here, with the SQL that makes it.
fn refusal(schema: &str, standby: bool) -> Error {
    if standby {
        return Error::conflict(format!(
            "ddl needs the server's event trigger, which a standby cannot create: run on the primary, as a \
             superuser:\n{}",
            admin_sql(schema)
        ));
    }
    Error::new(
        ErrorKind::Forbidden,
        format!(
            "ddl needs an event trigger, and only a superuser may create one (PostgreSQL 13 to 18); the configured \
             user is not one. Leave ddl out, connect as a superuser, or have a superuser run, in this database:\n{}",
            admin_sql(schema)
        ),
    )
}

/// The function, and each trigger not there yet, in one transaction.
async fn install(client: &tokio_postgres::Client, schema: &str, installed: &Installed) -> Result<(), Error> {
    let mut sql = format!("BEGIN; {};", function_sql(schema));
    for (name, event) in TRIGGERS.iter().filter(|(n, _)| !installed.present.iter().any(|p| p == n)) {
        sql.push_str(&format!(" {};", trigger_sql(schema, name, event)));
    }
    sql.push_str(" COMMIT;");
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(function = %function_name(schema), "DDL event trigger installed");
            Ok(())
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            // Another process made a trigger since we looked: the check after says.
            if e.code() == Some(&SqlState::DUPLICATE_OBJECT) {
                return Ok(());
            }
            Err(Error::internal(format!("cannot install the DDL event trigger: {}", crate::pg::snapshot::describe(&e))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_sql_names_the_schema_quoted_and_both_triggers() {
        let sql = admin_sql("Odd \"s\"");
        assert!(sql.contains("FUNCTION \"Odd \"\"s\"\"\".ddl_event()"), "{sql}");
        assert!(sql.contains("ON ddl_command_end") && sql.contains("ON sql_drop"), "{sql}");
        assert!(sql.contains("'pgdeltastream.ddl'") && !sql.contains("{PREFIX}"), "{sql}");
        assert!(sql.starts_with("BEGIN;") && sql.ends_with("COMMIT;"), "{sql}");
    }

    #[test]
    fn pgoutput_on_13_cannot_carry_ddl() {
        assert!(check_plugin(Plugin::Pgoutput, Major(13)).is_err());
        assert!(check_plugin(Plugin::Pgoutput, Major(14)).is_ok());
        assert!(check_plugin(Plugin::Wal2json, Major(13)).is_ok());
    }
}
