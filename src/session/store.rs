//! Session definitions, stored in the database they stream from, so that sessions
//! outlive the process and every process serving the database sees the same ones:
//! a table `<schema>.sessions` (schema `pgdeltastream` unless configured), created on
//! first use. A definition is a JSON document; the slot's position is Postgres's own.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::definition::Definition;
use crate::error::Error;
use crate::pg::ident::quote_ident;

pub const DEFAULT_SCHEMA: &str = "pgdeltastream";

pub struct Store {
    /// `"schema".sessions`, quoted.
    table: String,
    schema: String,
}

impl Store {
    pub fn new(schema: &str) -> Store {
        Store { table: format!("{}.sessions", quote_ident(schema)), schema: schema.to_owned() }
    }

    /// Creates the schema and the table unless they exist. Two processes may do so at
    /// once: the loser's unique violation means the winner made them.
    pub async fn create(&self, client: &Client) -> Result<(), Error> {
        let sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {}; \
             CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, definition jsonb NOT NULL, \
             created_at timestamptz NOT NULL DEFAULT now())",
            quote_ident(&self.schema),
            self.table
        );
        match client.batch_execute(&sql).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(()),
            Err(e) => Err(Error::internal(format!(
                "cannot create the table of session definitions {}: {}; grant CREATE on the database, \
                 or create it beforehand",
                self.table,
                crate::pg::snapshot::describe(&e)
            ))),
        }
    }

    /// Stores a new definition; false when its name is taken.
    pub async fn insert(&self, client: &Client, def: &Definition) -> Result<bool, Error> {
        let sql = format!("INSERT INTO {} (name, definition) VALUES ($1, $2) ON CONFLICT DO NOTHING", self.table);
        let n = client.execute(&sql, &[&def.name, &to_json(def)?]).await?;
        Ok(n == 1)
    }

    /// Stores a definition, replacing the one of the same name.
    pub async fn put(&self, client: &Client, def: &Definition) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (name, definition) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, created_at = now()",
            self.table
        );
        client.execute(&sql, &[&def.name, &to_json(def)?]).await?;
        Ok(())
    }

    pub async fn delete(&self, client: &Client, name: &str) -> Result<(), Error> {
        if !self.exists(client).await? {
            return Ok(());
        }
        let sql = format!("DELETE FROM {} WHERE name = $1", self.table);
        client.execute(&sql, &[&name]).await?;
        Ok(())
    }

    /// Every stored definition, by name; none while the table does not exist.
    pub async fn load(&self, client: &Client) -> Result<Vec<Definition>, Error> {
        self.select(client, "TRUE", None).await
    }

    pub async fn get(&self, client: &Client, name: &str) -> Result<Option<Definition>, Error> {
        Ok(self.select(client, "name = $1", Some(name)).await?.pop())
    }

    pub async fn by_slot(&self, client: &Client, slot: &str) -> Result<Option<Definition>, Error> {
        Ok(self.select(client, "definition->>'slotName' = $1", Some(slot)).await?.pop())
    }

    /// The names of the stored sessions; none while the table does not exist.
    pub async fn names(&self, client: &Client) -> Result<Vec<String>, Error> {
        if !self.exists(client).await? {
            return Ok(Vec::new());
        }
        let rows = client.query(&format!("SELECT name FROM {}", self.table), &[]).await?;
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    async fn select(&self, client: &Client, condition: &str, arg: Option<&str>) -> Result<Vec<Definition>, Error> {
        if !self.exists(client).await? {
            return Ok(Vec::new());
        }
        let sql = format!("SELECT definition FROM {} WHERE {condition} ORDER BY name", self.table);
        let rows = match arg {
            Some(a) => client.query(&sql, &[&a]).await,
            None => client.query(&sql, &[]).await,
        }?;
        let mut defs = Vec::with_capacity(rows.len());
        for row in rows {
            let json: serde_json::Value = row.try_get(0)?;
            match serde_json::from_value::<Definition>(json) {
                Ok(def) => defs.push(def),
                // Someone edited the table by hand: say so, and serve the rest.
                Err(e) => {
                    tracing::warn!(table = %self.table, error = %e, "ignoring a session definition that does not parse")
                }
            }
        }
        Ok(defs)
    }

    async fn exists(&self, client: &Client) -> Result<bool, Error> {
        let row = client.query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&self.table]).await?;
        Ok(row.try_get(0)?)
    }
}

fn to_json(def: &Definition) -> Result<serde_json::Value, Error> {
    serde_json::to_value(def).map_err(|e| Error::internal(format!("cannot store session {}: {e}", def.name)))
}
