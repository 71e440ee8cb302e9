//! A tiny pool of ordinary tokio-postgres connections.
//!
//! Snapshot reads are short and bursty; opening a backend per call costs a fork on the
//! server. Connections that come back healthy are kept (up to `max_idle`); anything
//! that went wrong on a connection closes it instead of returning it, so one failed
//! call can never poison the next.

use std::sync::Mutex;

use tokio_postgres::{Client, NoTls};

use super::PgConfig;

pub struct Pool {
    config: PgConfig,
    idle: Mutex<Vec<Client>>,
    max_idle: usize,
}

impl Pool {
    pub fn new(config: PgConfig, max_idle: usize) -> Pool {
        Pool { config, idle: Mutex::new(Vec::new()), max_idle }
    }

    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// An idle connection, or a new one.
    pub async fn get(&self) -> Result<Client, tokio_postgres::Error> {
        loop {
            let client = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(_) => None,
            };
            match client {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => return connect(&self.config).await,
            }
        }
    }

    /// Gives a connection back. Only hand back connections whose last use succeeded
    /// and that are outside any transaction.
    pub fn put(&self, client: Client) {
        if client.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(client);
            }
        }
    }

    /// Closes every idle connection (used when Postgres went away).
    pub fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

/// Opens one connection and drives it on a task of its own.
pub async fn connect(config: &PgConfig) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.tokio_config().connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}
