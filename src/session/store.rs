//! Session definitions, stored in the database they stream from, so that sessions
//! outlive the process and every process serving the database sees the same ones:
//! a table `<schema>.sessions` (schema `pgdeltastream` unless configured), created on
//! first use. A definition is a JSON document; the slot's position is Postgres's own.
//!
//! The [`Store`] owns this SQL: each call takes a pooled connection of its own and
//! gives it back, so callers never hold one across other work.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::definition::{DEFAULT_NAME, Definition};
use crate::error::Error;
use crate::pg::ident::quote_ident;
use crate::pg::pool::Pool;

pub const DEFAULT_SCHEMA: &str = "pgdeltastream";

/// Cheap to clone: the pool is shared.
#[derive(Clone)]
pub(crate) struct Store {
    pool: Pool,
    /// `"schema".sessions`, quoted.
    table: String,
    schema: String,
}

impl Store {
    pub fn new(pool: Pool, schema: &str) -> Store {
        Store { pool, table: format!("{}.sessions", quote_ident(schema)), schema: schema.to_owned() }
    }

    /// Creates the table unless it exists.
    pub async fn create(&self) -> Result<(), Error> {
        let client = self.pool.get().await?;
        self.create_on(&client).await?;
        client.release();
        Ok(())
    }

    /// Stores a new definition; false when its name is taken.
    pub async fn insert(&self, def: &Definition) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let inserted = self.insert_on(&client, def).await?;
        client.release();
        Ok(inserted)
    }

    /// Stores a definition (creating the table first), replacing the one of the same name.
    pub async fn put(&self, def: &Definition) -> Result<(), Error> {
        let client = self.pool.get().await?;
        self.create_on(&client).await?;
        self.put_on(&client, def).await?;
        client.release();
        Ok(())
    }

    /// Stores a definition on `client` (in the caller's transaction), replacing the one
    /// of the same name.
    pub(super) async fn put_in(&self, client: &Client, def: &Definition) -> Result<(), Error> {
        self.put_on(client, def).await
    }

    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let client = self.pool.get().await?;
        self.delete_on(&client, name, None).await?;
        client.release();
        Ok(())
    }

    /// Forgets `def` if it is still the one stored under its name: a definition stored
    /// since (the next `/v1/init`'s) is another session's and stays.
    pub async fn delete_exactly(&self, def: &Definition) -> Result<(), Error> {
        let client = self.pool.get().await?;
        self.delete_on(&client, &def.name, Some(&def.slot_name)).await?;
        client.release();
        Ok(())
    }

    /// Puts back the stored default session after a failed init: `previous`, or none.
    pub(crate) async fn restore_default(&self, previous: Option<&Definition>) {
        let restored = match previous {
            Some(def) => self.put(def).await,
            None => self.delete(DEFAULT_NAME).await,
        };
        if let Err(e) = restored {
            tracing::warn!(error = %e, "cannot restore the stored default session");
        }
    }

    /// Every stored definition, by name; none while the table does not exist.
    pub async fn load(&self) -> Result<Vec<Definition>, Error> {
        let client = self.pool.get().await?;
        let defs = self.select(&client, "TRUE", None).await?;
        client.release();
        Ok(defs)
    }

    pub async fn get(&self, name: &str) -> Result<Option<Definition>, Error> {
        let client = self.pool.get().await?;
        let def = self.select(&client, "name = $1", Some(name)).await?.pop();
        client.release();
        Ok(def)
    }

    /// The stored definition that reads `slot`.
    pub(crate) async fn by_slot(&self, slot: &str) -> Result<Option<Definition>, Error> {
        let client = self.pool.get().await?;
        let def = self.select(&client, "definition->>'slotName' = $1", Some(slot)).await?.pop();
        client.release();
        Ok(def)
    }

    /// The names of the stored sessions; none while the table does not exist.
    pub async fn names(&self) -> Result<Vec<String>, Error> {
        let client = self.pool.get().await?;
        if !self.exists(&client).await? {
            client.release();
            return Ok(Vec::new());
        }
        let rows = client.query(&format!("SELECT name FROM {}", self.table), &[]).await?;
        client.release();
        Ok(rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>()?)
    }

    /// The (slot, session) pairs of the stored definitions; none when the store cannot
    /// be read (the sessions of this process are still known).
    pub async fn slots(&self) -> Vec<(String, String)> {
        match self.load().await {
            Ok(defs) => defs.into_iter().map(|d| (d.slot_name, d.name)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored sessions");
                Vec::new()
            }
        }
    }

    /// Creates the schema and the table unless they exist. Two processes may do so at
    /// once: the loser's unique violation means the winner made them.
    async fn create_on(&self, client: &Client) -> Result<(), Error> {
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

    async fn insert_on(&self, client: &Client, def: &Definition) -> Result<bool, Error> {
        let sql = format!("INSERT INTO {} (name, definition) VALUES ($1, $2) ON CONFLICT DO NOTHING", self.table);
        let n = client.execute(&sql, &[&def.name, &to_json(def)?]).await?;
        Ok(n == 1)
    }

    async fn put_on(&self, client: &Client, def: &Definition) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (name, definition) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition, created_at = now()",
            self.table
        );
        client.execute(&sql, &[&def.name, &to_json(def)?]).await?;
        Ok(())
    }

    async fn delete_on(&self, client: &Client, name: &str, slot: Option<&str>) -> Result<(), Error> {
        if !self.exists(client).await? {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM {} WHERE name = $1 AND ($2::text IS NULL OR definition->>'slotName' = $2)",
            self.table
        );
        client.execute(&sql, &[&name, &slot]).await?;
        Ok(())
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
