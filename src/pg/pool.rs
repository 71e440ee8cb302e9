//! A small, bounded pool of ordinary tokio-postgres connections.
//!
//! Every ordinary query (snapshot reads, slot queries) runs on a connection from here,
//! so the server never holds more than `size` of them, whatever the load: a burst of
//! requests waits for a permit instead of exhausting Postgres's `max_connections` for
//! every other application. A request that waits longer than `acquire_timeout` is
//! refused ([`PoolError::Busy`]), and the caller answers 503.
//!
//! Snapshot reads (pages and exports) take a connection from their own share of the
//! pool ([`Pool::get_for_read`]): a page or an export runs as long as its client reads,
//! and a client may read slowly, so without the share enough slow readers would hold
//! every connection and starve everything else (listing and creating sessions,
//! `/readyz`).
//!
//! A connection goes back to the pool only through [`PooledClient::release`], which the
//! caller uses when its last command succeeded outside any transaction. A connection
//! dropped any other way may be mid-query (the client went away): its query is
//! cancelled and the connection closed, and its permit is only given back once the
//! backend is gone, so the bound holds for Postgres too, not just for us.

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::PgConfig;
use super::version::Major;

/// How long a dropped connection may take to end before its permit is handed on anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// At most this many ordinary connections are open at once.
    pub size: usize,
    /// How long a request waits for a free connection before it is refused.
    pub acquire_timeout: Duration,
    /// The longest a snapshot read may run, sending its rows included (zero: no limit).
    pub statement_timeout: Duration,
    /// Of `size`, how many connections snapshot reads may hold at once (zero: half,
    /// at least one).
    pub read_share: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            size: 10,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(60),
            read_share: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "all {size} connections to Postgres are in use and none was free within {} ms; retry shortly \
         (or raise --pg-pool-size)",
        .waited.as_millis()
    )]
    Busy { size: usize, waited: Duration },
    #[error(
        "all {share} connections that snapshot reads may hold are in use and none was free within {} ms; \
         retry shortly (or raise --pg-pool-read-share)",
        .waited.as_millis()
    )]
    ReadsBusy { share: usize, waited: Duration },
    #[error(transparent)]
    Connect(#[from] tokio_postgres::Error),
    /// TLS was refused or failed, or the server's certificate did not verify.
    #[error("{0}")]
    Tls(String),
    /// Every Postgres reports `server_version` at startup; this one did not.
    #[error("the Postgres server did not report its server_version")]
    NoVersion,
}

/// What the pool holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolStats {
    /// The most connections the pool opens.
    pub size: usize,
    /// Connections taken by a request, or closing after one.
    pub in_use: usize,
    /// Open connections waiting for the next request.
    pub idle: usize,
}

/// A connection and the task that drives it, which ends once the backend is gone.
struct Conn {
    client: Client,
    driver: JoinHandle<()>,
    /// The server's major, as it reported at startup.
    major: Option<Major>,
}

struct Shared {
    config: PgConfig,
    settings: PoolSettings,
    idle: Mutex<Vec<Conn>>,
    permits: Arc<Semaphore>,
    /// The snapshot reads' share: a read holds one of these beside its connection's.
    read_permits: Arc<Semaphore>,
}

#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(config: PgConfig, settings: PoolSettings) -> Pool {
        let size = settings.size.max(1);
        let read_share = match settings.read_share {
            0 => (size / 2).max(1),
            n => n.min(size),
        };
        let settings = PoolSettings { size, read_share, ..settings };
        Pool {
            shared: Arc::new(Shared {
                config,
                settings,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(size)),
                read_permits: Arc::new(Semaphore::new(read_share)),
            }),
        }
    }

    pub fn config(&self) -> &PgConfig {
        &self.shared.config
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.shared.settings
    }

    /// How many connections are taken (or closing), and how many are open but idle.
    pub(crate) fn stats(&self) -> PoolStats {
        let size = self.shared.settings.size;
        PoolStats {
            size,
            in_use: size.saturating_sub(self.shared.permits.available_permits()),
            idle: self.shared.idle.lock().unwrap_or_else(|e| e.into_inner()).len(),
        }
    }

    /// A connection: an idle one, or a new one if fewer than `size` are open. Waits at
    /// most `acquire_timeout` for one to come free.
    pub async fn get(&self) -> Result<PooledClient, PoolError> {
        self.get_within(self.shared.settings.acquire_timeout).await
    }

    /// A connection for a snapshot read, from the reads' share; waits as [`Pool::get`]
    /// does, for the share and the connection together.
    pub(crate) async fn get_for_read(&self) -> Result<PooledClient, PoolError> {
        let wait = self.shared.settings.acquire_timeout;
        let started = tokio::time::Instant::now();
        let share = self.shared.settings.read_share;
        let read = match tokio::time::timeout(wait, self.shared.read_permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Err(PoolError::ReadsBusy { share, waited: wait }),
        };
        let mut client = self.get_within(wait.saturating_sub(started.elapsed())).await?;
        client.read_permit = Some(read);
        Ok(client)
    }

    /// [`Pool::get`], waiting at most `wait` for a free connection (a health check
    /// must answer quickly when the pool is exhausted).
    pub(crate) async fn get_within(&self, wait: Duration) -> Result<PooledClient, PoolError> {
        let busy = || PoolError::Busy { size: self.shared.settings.size, waited: wait };
        let permit = match tokio::time::timeout(wait, self.shared.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; a closed one would mean no connection ever.
            Ok(Err(_)) | Err(_) => return Err(busy()),
        };
        // Idle connections count against the permits too: whoever holds a permit may
        // take one, so idle + in use never exceeds `size`.
        let conn = loop {
            match self.shared.take_idle() {
                Some(c) if !c.client.is_closed() => break c,
                Some(_) => continue,
                None => break open(&self.shared.config).await?,
            }
        };
        Ok(PooledClient { conn: Some(conn), permit: Some(permit), read_permit: None, shared: self.shared.clone() })
    }
}

impl Shared {
    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }
}

/// A connection taken from the pool, with its permit. See the module doc for what
/// dropping it does.
pub struct PooledClient {
    conn: Option<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    /// A snapshot read's place in the reads' share, given back with `permit`.
    read_permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl PooledClient {
    /// The major of the server this connection is to.
    pub fn major(&self) -> Option<Major> {
        self.conn.as_ref().and_then(|c| c.major)
    }

    /// Gives the connection back for the next caller. Only for a connection whose last
    /// command succeeded and that is outside any transaction.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.client.is_closed() {
                self.shared.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            }
        }
    }

    /// Closes the connection (it failed, or is in an unknown state) without cancelling
    /// anything.
    pub(crate) fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            close(conn, (self.permit.take(), self.read_permit.take()), false, &self.shared.config);
        }
    }
}

impl Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        match &self.conn {
            Some(c) => &c.client,
            // `conn` is only taken by `release`, `discard` and `drop`, which consume self.
            None => unreachable!("a PooledClient is used after it was given back"),
        }
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            close(conn, (self.permit.take(), self.read_permit.take()), true, &self.shared.config);
        }
    }
}

/// Ends a connection in the background: cancels its query if asked, lets the driver
/// finish (it sends Terminate once the pending replies are in), then frees the permit.
fn close(conn: Conn, permits: Permits, cancel: bool, config: &PgConfig) {
    // The cancel request negotiates TLS as the connection did.
    let tls = config.tls.clone();
    let Conn { client, driver, .. } = conn;
    let token = (cancel && !client.is_closed()).then(|| client.cancel_token());
    drop(client);
    // Without a runtime (the process is ending) everything goes with it.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        if let Some(token) = token {
            if let Err(e) = token.cancel_query(tls).await {
                tracing::debug!(error = %e, "cannot cancel the query of an abandoned connection");
            }
        }
        if tokio::time::timeout(CLOSE_WAIT, driver).await.is_err() {
            tracing::warn!("an abandoned Postgres connection did not end in time");
        }
        drop(permits);
    });
}

/// A connection's permit, and a snapshot read's place in its share.
type Permits = (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>);

/// Opens one connection and drives it on a task of its own (for callers outside the
/// pool, such as the snapshot holders).
pub async fn connect(config: &PgConfig) -> Result<Client, PoolError> {
    Ok(open(config).await?.client)
}

async fn open(config: &PgConfig) -> Result<Conn, PoolError> {
    let connected = config.tokio_config().connect(config.tls.clone()).await;
    let (client, connection) = connected.map_err(|e| match config.tls.failure(&e) {
        Some(tls) => PoolError::Tls(tls),
        None => PoolError::Connect(e),
    })?;
    let major = connection.parameter("server_version").and_then(Major::from_server_version);
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(Conn { client, driver, major })
}
