//! The `pgdeltastream` binary: parse settings, log, serve until Ctrl-C or SIGTERM.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::IsTerminal;

use clap::Parser;
use pgdeltastream::config::{Cli, check_exposure};
use pgdeltastream::server::{self, HttpSettings, Settings};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (stdout is left to nothing), coloured only for a person at a
    // terminal: escapes would litter a file or a journal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();

    let (auth, tls) = match cli.security() {
        Ok(security) => security,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let open_files = server::limits::raise_open_files_limit();
    let addr = format!("{}:{}", cli.serverhost, cli.serverport);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Checked on the address actually bound: `localhost` may be 127.0.0.1 or ::1.
    let exposure = listener
        .local_addr()
        .map_err(|e| e.to_string())
        .and_then(|listening| check_exposure(listening, auth.is_some(), cli.allow_unauthenticated));
    if let Err(e) = exposure {
        tracing::error!("{e}");
        return std::process::ExitCode::FAILURE;
    }
    let pg = match cli.pg_config() {
        Ok(pg) => pg,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up TLS to Postgres");
            return std::process::ExitCode::FAILURE;
        }
    };
    let open_files = open_files.map_or_else(|| "unknown".into(), |n| n.to_string());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let auth_shown = auth.as_ref().map_or_else(|| "none".to_owned(), |v| format!("{:?}", v.algorithm()));
    tracing::info!(listen = %addr, scheme, auth = %auth_shown, postgres = %pg.address(), database = %pg.dbname, user = %pg.user, sslmode = %pg.tls.mode(), %open_files, "pgdeltastream serving");
    let settings = Settings {
        pg,
        session: cli.session_settings(),
        max_limit: cli.max_limit,
        retention: cli.retention_settings(),
        pool: cli.pool_settings(),
        http: HttpSettings { auth, tls, ..cli.http_settings() },
    };
    match server::run(listener, settings, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
