//! Putting it together: a registry, the routes, our accept loop, and a clean shutdown.

mod accept;
mod conn;
mod hyper_errors;
mod io;
pub mod limits;
pub mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::http::auth::{KeySource, Verifier};
pub use crate::http::guard::Guard;
use crate::http::shares::CallerShares;
use crate::http::{AppState, router};
use crate::pg::PgConfig;
use crate::pg::pool::PoolSettings;
use crate::session::{Registry, RetentionSettings, SessionSettings};

#[derive(Debug, Clone)]
pub struct Settings {
    pub pg: PgConfig,
    pub session: SessionSettings,
    pub max_limit: u64,
    /// Snapshot pages and exports one consumer token may read at once.
    pub reads_per_token: usize,
    pub retention: RetentionSettings,
    /// Ordinary connections to Postgres: how many, how long to wait for one, and how
    /// long a snapshot read may run.
    pub pool: PoolSettings,
    pub http: HttpSettings,
}

/// How long clients may take, and how many may be connected.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// A request head must arrive within this; also how long a kept-alive connection
    /// may wait for its next request.
    pub header_timeout: Duration,
    /// A connection on which nothing moves for this long is shut down (a request in
    /// flight may finish), and closed if it stays silent as long again.
    pub idle_timeout: Duration,
    /// Client connections (websockets included) at once; lowered to what the limit on
    /// open files allows.
    pub max_connections: usize,
    /// Tokens every request but the public ones needs; None: no auth.
    pub auth: Option<Arc<Verifier>>,
    /// https and wss rather than http and ws.
    pub tls: Option<tls::TlsConfig>,
    /// Which other origins' pages may use the API, and (without auth) which host names
    /// besides addresses and `localhost` it is reached by.
    pub guard: Guard,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            auth: None,
            tls: None,
            guard: Guard::default(),
        }
    }
}

/// Serves on `listener` until `shutdown` resolves; then stops accepting, closes idle
/// connections, ends every stream (close code 1001), releases snapshots, and returns
/// once in-flight requests are done.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Registry::new(settings.pg, settings.session, settings.pool);
    // In the registry's tasks, as every websocket is: shutdown waits for all of them.
    registry.tasks().spawn(Arc::clone(&registry).sweep_idle_snapshots());
    registry.tasks().spawn(Arc::clone(&registry).watch_retention(settings.retention.clone()));
    let auth = settings.http.auth.clone();
    let reads = CallerShares::new(settings.reads_per_token, "snapshot reads");
    let guard = settings.http.guard.clone();
    let app = router(AppState { registry: registry.clone(), max_limit: settings.max_limit, auth, reads, guard });
    serve_router(listener, app, settings.http, shutdown, async move { registry.shutdown().await }).await;
    Ok(())
}

/// Runs the JetStream gateway on `listener` with the server's accept loop and limits,
/// until `shutdown` resolves; then ends every feed (close code 1001) and waits for the
/// connections to end.
pub async fn run_gateway(
    listener: TcpListener,
    gateway: Arc<crate::bus::gateway::Gateway>,
    http: HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let app = crate::http::gateway::router(gateway.clone(), http.auth.clone(), http.guard.clone());
    serve_router(listener, app, http, shutdown, async move { gateway.shutdown().await }).await
}

/// Our accept loop over `app` until `shutdown` resolves; then it stops accepting and
/// runs `wind_down` (ending the streams), and returns once the connections are done.
async fn serve_router(
    listener: TcpListener,
    app: axum::Router,
    http: HttpSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    wind_down: impl Future<Output = ()> + Send + 'static,
) {
    let cap = connection_cap(http.max_connections);
    let stop = CancellationToken::new();
    let on_shutdown = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            stop.cancel();
            wind_down.await;
        }
    };
    tokio::join!(accept::serve(listener, app, http, cap, stop), on_shutdown);
}

/// `wanted`, or less if the open files would not suffice.
fn connection_cap(wanted: usize) -> usize {
    let Some(open_files) = limits::open_files_limit() else {
        return wanted.max(1);
    };
    let budget = limits::connection_budget(open_files);
    if wanted > budget {
        tracing::warn!(
            wanted,
            cap = budget,
            open_files,
            "the limit on open files allows fewer connections; capping there"
        );
        return budget;
    }
    wanted.max(1)
}
