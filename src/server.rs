//! Putting it together: a registry, the routes, a listener, and a clean shutdown.

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::http::{AppState, router};
use crate::pg::PgConfig;
use crate::pg::pool::PoolSettings;
use crate::session::{Registry, RetentionSettings, SessionSettings};

#[derive(Debug, Clone)]
pub struct Settings {
    pub pg: PgConfig,
    pub session: SessionSettings,
    pub max_limit: u64,
    pub retention: RetentionSettings,
    /// Ordinary connections to Postgres: how many, how long to wait for one, and how
    /// long a snapshot read may run.
    pub pool: PoolSettings,
}

/// Serves on `listener` until `shutdown` resolves; then ends every stream (close code
/// 1001), releases snapshots, and returns once in-flight requests are done.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Registry::new(settings.pg, settings.session, settings.pool);
    tokio::spawn(Arc::clone(&registry).sweep_idle_snapshots());
    let retention = &settings.retention;
    tokio::spawn(Arc::clone(&registry).watch_retention(
        retention.check_interval,
        retention.warn_bytes,
        retention.warn_idle,
    ));
    let app = router(AppState { registry: registry.clone(), max_limit: settings.max_limit });
    let on_shutdown = {
        let registry = registry.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            registry.shutdown().await;
        }
    };
    // Frames are small and latency matters: no Nagle delay on client sockets.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(on_shutdown).await
}
