//! The `pgdeltastream` binary: parse settings, log, serve until Ctrl-C or SIGTERM.
//! No subcommand runs the server; `publish` and `gateway` scale it out through NATS
//! JetStream.

#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use pgdeltastream::bus::gateway::Gateway;
use pgdeltastream::bus::publish;
use pgdeltastream::commands::{Command, GatewayArgs, PublishArgs};
use pgdeltastream::config::{Cli, Security, check_exposure};
use pgdeltastream::pg::PgConfig;
use pgdeltastream::server::{self, HttpSettings, Settings};
use pgdeltastream::session::Registry;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr (stdout is left to nothing), coloured only for a person at a
    // terminal: escapes would litter a file or a journal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match cli.command.clone() {
        None => serve(cli).await,
        Some(Command::Publish(args)) => run_publisher(&cli, args).await,
        Some(Command::Gateway(args)) => run_gateway(&cli, args).await,
    }
}

async fn serve(cli: Cli) -> ExitCode {
    let open_files = server::limits::raise_open_files_limit();
    let Some((listener, addr, http)) = listen(&cli).await else { return ExitCode::FAILURE };
    let Some(pg) = pg_config(&cli) else { return ExitCode::FAILURE };
    let open_files = open_files.map_or_else(|| "unknown".into(), |n| n.to_string());
    tracing::info!(listen = %addr, scheme = scheme(&http), auth = %auth_shown(&http), postgres = %pg.address(), database = %pg.dbname, user = %pg.user, sslmode = %pg.tls.mode(), %open_files, "pgdeltastream serving");
    let settings = Settings {
        pg,
        session: cli.session_settings(),
        max_limit: cli.max_limit,
        reads_per_token: cli.snapshot_reads_per_token,
        retention: cli.retention_settings(),
        pool: cli.pool_settings(),
        http,
    };
    match server::run(listener, settings, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Binds the listen address with the HTTP settings, auth and TLS included; refuses an
/// address that is not loopback without auth (unless allowed).
async fn listen(cli: &Cli) -> Option<(tokio::net::TcpListener, String, HttpSettings)> {
    let Security { auth, tls, guard } = cli.security().map_err(|e| tracing::error!("{e}")).ok()?;
    let addr = format!("{}:{}", cli.serverhost, cli.serverport);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            return None;
        }
    };
    // Checked on the address actually bound: `localhost` may be 127.0.0.1 or ::1.
    let exposure = listener
        .local_addr()
        .map_err(|e| e.to_string())
        .and_then(|listening| check_exposure(listening, auth.is_some(), cli.allow_unauthenticated));
    if let Err(e) = exposure {
        tracing::error!("{e}");
        return None;
    }
    Some((listener, addr, HttpSettings { auth, tls, guard, ..cli.http_settings() }))
}

fn pg_config(cli: &Cli) -> Option<PgConfig> {
    cli.pg_config().map_err(|e| tracing::error!(error = %e, "cannot set up TLS to Postgres")).ok()
}

fn scheme(http: &HttpSettings) -> &'static str {
    if http.tls.is_some() { "https" } else { "http" }
}

fn auth_shown(http: &HttpSettings) -> String {
    http.auth.as_ref().map_or_else(|| "none".to_owned(), |v| format!("{:?}", v.algorithm()))
}

async fn run_publisher(cli: &Cli, args: PublishArgs) -> ExitCode {
    let Some(pg) = pg_config(cli) else { return ExitCode::FAILURE };
    tracing::info!(postgres = %pg.address(), database = %pg.dbname, sslmode = %pg.tls.mode(), session = %args.session, nats = %args.nats, "pgdeltastream publishing");
    let registry = Registry::new(pg, cli.session_settings(), cli.pool_settings());
    match publish::run(registry, args.settings(), shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "publisher failed");
            ExitCode::FAILURE
        }
    }
}

async fn run_gateway(cli: &Cli, args: GatewayArgs) -> ExitCode {
    server::limits::raise_open_files_limit();
    let Some((listener, addr, http)) = listen(cli).await else { return ExitCode::FAILURE };
    let settings = cli.session_settings();
    let gateway = match Gateway::connect(&args.nats, settings.socket, settings.frame_bytes).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "gateway failed");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(listen = %addr, scheme = scheme(&http), auth = %auth_shown(&http), nats = %args.nats, "pgdeltastream gateway serving");
    server::run_gateway(listener, gateway, http, shutdown_signal()).await;
    ExitCode::SUCCESS
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
