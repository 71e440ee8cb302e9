//! Configuration: the original's environment variables, each also a command-line flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::commands::Command;
use crate::http::auth::{self, Verifier};
use crate::pg::PgConfig;
use crate::pg::pool::PoolSettings;
use crate::pg::tls::{PgTls, SslMode, TlsSettings};
use crate::server::Guard;
use crate::server::HttpSettings;
use crate::server::tls::TlsConfig;
use crate::session::safety::OnMaxRetained;
use crate::session::{PluginChoice, RetentionSettings, SessionSettings};
use crate::stream::plugin::Plugin;
use crate::stream::socket::SocketSettings;

/// Stream PostgreSQL table changes to clients over websockets, using logical decoding
/// (wal2json, or pgoutput with a publication per session).
#[derive(Parser, Debug, Clone)]
#[command(name = "pgdeltastream", version, about)]
pub struct Cli {
    /// None: the server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Database to stream from.
    #[arg(long, global = true, env = "DBNAME", default_value = "postgres")]
    pub dbname: String,
    /// Postgres user; needs the REPLICATION attribute (or superuser).
    #[arg(long, global = true, env = "PGUSER", default_value = "postgres")]
    pub pguser: String,
    /// Postgres password (PGPASSWORD is read too).
    #[arg(long, global = true, env = "PGPASS", hide_env_values = true)]
    pub pgpass: Option<String>,
    /// Postgres host, or a Unix socket directory.
    #[arg(long, global = true, env = "PGHOST", default_value = "localhost")]
    pub pghost: String,
    #[arg(long, global = true, env = "PGPORT", default_value_t = 5432)]
    pub pgport: u16,
    /// TLS to Postgres, as libpq's sslmode: disable, prefer (TLS if the server offers
    /// it), require, verify-ca (the chain against --pgsslrootcert), verify-full (and the
    /// host name).
    #[arg(long, global = true, env = "PGSSLMODE", default_value = "prefer")]
    pub pgsslmode: SslMode,
    /// PEM file of the CAs to trust (default ~/.postgresql/root.crt), or `system`
    /// (verify-full only).
    #[arg(long, global = true, env = "PGSSLROOTCERT")]
    pub pgsslrootcert: Option<String>,
    /// Client certificate (PEM) for Postgres (default ~/.postgresql/postgresql.crt, if it exists).
    #[arg(long, global = true, env = "PGSSLCERT")]
    pub pgsslcert: Option<std::path::PathBuf>,
    /// Key of --pgsslcert (default ~/.postgresql/postgresql.key).
    #[arg(long, global = true, env = "PGSSLKEY")]
    pub pgsslkey: Option<std::path::PathBuf>,
    /// Address the server listens on. Anything but a loopback address needs auth (a
    /// JWT secret or public key) or --allow-unauthenticated.
    #[arg(long, global = true, env = "SERVERHOST", default_value = "localhost")]
    pub serverhost: String,
    #[arg(long, global = true, env = "SERVERPORT", default_value_t = 12312)]
    pub serverport: u16,
    /// Largest `limit` a snapshot page may ask for (also the default limit).
    #[arg(long, env = "PGDELTASTREAM_MAX_LIMIT", default_value_t = 10_000)]
    pub max_limit: u64,
    /// At most this many ordinary connections to Postgres at once (snapshot reads, slot
    /// queries); the snapshot holders and streams have their own, one per session.
    #[arg(long, env = "PGDELTASTREAM_PG_POOL_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub pg_pool_size: u64,
    /// Of the pool, how many connections snapshot pages and exports may hold at once
    /// (0: half the pool, at least one): the rest stay free for everything else.
    #[arg(long, env = "PGDELTASTREAM_PG_POOL_READ_SHARE", default_value_t = 0)]
    pub pg_pool_read_share: u64,
    /// Snapshot pages and exports one consumer token (by its `sub`) may read at once;
    /// more get 429. Admins are bounded by the read share alone.
    #[arg(long, env = "PGDELTASTREAM_SNAPSHOT_READS_PER_TOKEN", default_value_t = 2)]
    pub snapshot_reads_per_token: usize,
    /// Refuse a request (503) that waited this many seconds for a free connection.
    #[arg(long, env = "PGDELTASTREAM_PG_POOL_TIMEOUT", default_value_t = 5)]
    pub pg_pool_timeout: u64,
    /// Cancel a snapshot page that takes longer than this many seconds, sending it
    /// included (504; 0: no limit).
    #[arg(long, env = "PGDELTASTREAM_SNAPSHOT_STATEMENT_TIMEOUT", default_value_t = 60)]
    pub snapshot_statement_timeout: u64,
    /// Release a snapshot nobody has read for this many seconds (it holds back vacuum).
    #[arg(long, env = "PGDELTASTREAM_SNAPSHOT_IDLE_TIMEOUT", default_value_t = 600)]
    pub snapshot_idle_timeout: u64,
    /// Send a standby status update to Postgres at least every this many seconds.
    #[arg(long, env = "PGDELTASTREAM_STATUS_INTERVAL", default_value_t = 10)]
    pub status_interval: u64,
    /// Ping websocket clients every this many seconds.
    #[arg(long, env = "PGDELTASTREAM_PING_INTERVAL", default_value_t = 15)]
    pub ping_interval: u64,
    /// Drop a websocket client that shows no sign of life for this many seconds.
    #[arg(long, env = "PGDELTASTREAM_DEAD_AFTER", default_value_t = 60)]
    pub dead_after: u64,
    /// Size in bytes of the websocket frames a transaction is cut into (at most 1 MiB).
    /// Clients limit how many frames a message may have (Python websockets: 4,096), so
    /// larger frames allow larger transactions.
    #[arg(long, env = "PGDELTASTREAM_FRAME_SIZE", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    pub frame_size: u32,
    /// Output plugin of /v1/init and of a v2 session that names none: auto takes
    /// wal2json when the database can load it, pgoutput (built into Postgres, with a
    /// publication per session) otherwise.
    #[arg(long, env = "PGDELTASTREAM_PLUGIN", value_enum, default_value_t = PluginArg::Auto)]
    pub plugin: PluginArg,
    /// Bytes of a transaction a pgoutput stream holds in memory until its commit (the
    /// rest waits in an unlinked temporary file in TMPDIR).
    #[arg(long, env = "PGDELTASTREAM_PGOUTPUT_MEMORY", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(65536..=1024 * 1024 * 1024))]
    pub pgoutput_memory: u32,
    /// Bytes of rows a live backfill reads per chunk (its watermarks bracket each chunk;
    /// a chunk reaches the client in messages of 256 KiB).
    #[arg(long, env = "PGDELTASTREAM_BACKFILL_CHUNK_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(4096..=256 * 1024 * 1024))]
    pub backfill_chunk_bytes: u32,
    /// Schema of the table that stores session definitions (created on first use).
    #[arg(long, env = "PGDELTASTREAM_SCHEMA", default_value = "pgdeltastream")]
    pub schema: String,
    /// Log a warning for a slot that retains more than this many bytes of WAL (0: never).
    #[arg(long, env = "PGDELTASTREAM_RETENTION_WARN_BYTES", default_value_t = 1 << 30)]
    pub retention_warn_bytes: u64,
    /// Log a warning for a slot with no ack for this many seconds (0: never).
    #[arg(long, env = "PGDELTASTREAM_RETENTION_WARN_IDLE", default_value_t = 3600)]
    pub retention_warn_idle: u64,
    /// Check the WAL retention of every slot, and log a summary, every this many seconds.
    #[arg(long, env = "PGDELTASTREAM_RETENTION_CHECK_INTERVAL", default_value_t = 60)]
    pub retention_check_interval: u64,
    /// The WAL budget of a session that sets no maxRetainedBytes (0: none).
    #[arg(long, env = "PGDELTASTREAM_MAX_RETAINED_BYTES", default_value_t = 0)]
    pub max_retained_bytes: u64,
    /// Warn (log, metrics, views) past this percentage of a session's WAL budget.
    #[arg(long, env = "PGDELTASTREAM_RETENTION_WARN_PERCENT", default_value_t = 80,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub retention_warn_percent: u8,
    /// What happens to a slot past its budget, for sessions that do not say
    /// (onMaxRetained): keep it and warn, or drop it and invalidate the session.
    #[arg(long, env = "PGDELTASTREAM_ON_MAX_RETAINED", value_enum, default_value_t = OnMaxRetainedArg::Keep)]
    pub on_max_retained: OnMaxRetainedArg,
    /// Close a connection whose request head has not arrived within this many seconds
    /// (also how long a kept-alive connection may wait for its next request).
    #[arg(long, env = "PGDELTASTREAM_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout: u64,
    /// Shut down a connection on which nothing moved for this many seconds (a request
    /// in flight may finish); close it if it stays silent as long again.
    #[arg(long, env = "PGDELTASTREAM_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout: u64,
    /// Client connections at once, websockets included; more get 503. Lowered at start
    /// to what the limit on open files allows.
    #[arg(long, env = "PGDELTASTREAM_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Require an HS256 JSON Web Token signed with this secret on every request but the
    /// health probes and the viewer page.
    #[arg(long, global = true, env = "PGDELTASTREAM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Require an RS256 or ES256 token (by the key's kind) signed for this public key,
    /// a PEM file. Not together with --jwt-secret.
    #[arg(long, global = true, env = "PGDELTASTREAM_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// With auth: the token's `aud` must contain this.
    #[arg(long, global = true, env = "PGDELTASTREAM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// With auth: the token's `iss` must be this.
    #[arg(long, global = true, env = "PGDELTASTREAM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Serve without auth on an address that is not loopback (else refused at start).
    #[arg(long, global = true, env = "PGDELTASTREAM_ALLOW_UNAUTHENTICATED", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::SetTrue)]
    pub allow_unauthenticated: bool,
    /// Origins (`https://host[:port]`, comma-separated, or `*` for any) whose pages may
    /// use the API besides the server's own: open websockets, send requests. Browsers'
    /// requests from other origins are refused with 403.
    #[arg(long, global = true, env = "PGDELTASTREAM_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Without auth: host names (comma-separated) the server is reached by, besides its
    /// addresses and `localhost`; requests for other names get 421 (DNS rebinding).
    #[arg(long, global = true, env = "PGDELTASTREAM_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Serve https and wss with this certificate chain (PEM); needs --tls-key.
    #[arg(long, global = true, env = "PGDELTASTREAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, env = "PGDELTASTREAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Viewers watching sessions at once (GET /v2/sessions/{name}/watch); more get 503.
    /// Each costs a walsender and a temporary replication slot while it runs.
    #[arg(long, env = "PGDELTASTREAM_MAX_WATCHERS", default_value_t = 8)]
    pub max_watchers: usize,
    /// Of those, one consumer token's at most (by its `sub`); more get 429.
    #[arg(long, env = "PGDELTASTREAM_MAX_WATCHERS_PER_TOKEN", default_value_t = 2)]
    pub max_watchers_per_token: usize,
    /// Replication slots and walsenders a watcher never takes (503 instead), so that
    /// watching can not keep sessions from being created and streamed.
    #[arg(long, env = "PGDELTASTREAM_WATCH_RESERVE_SLOTS", default_value_t = 2)]
    pub watch_reserve_slots: usize,
    /// Create sessions' slots as failover slots (PostgreSQL 17+), which a standby with
    /// sync_replication_slots = on keeps in step, so that streams resume on it once it
    /// is promoted. Ignored, with a log line, below 17 and on a standby.
    #[arg(long, env = "PGDELTASTREAM_FAILOVER_SLOTS", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub failover_slots: bool,
}

/// Who may connect and how: [`Cli::security`].
#[derive(Debug)]
pub struct Security {
    pub auth: Option<Arc<Verifier>>,
    pub tls: Option<TlsConfig>,
    pub guard: Guard,
}

/// `--on-max-retained`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMaxRetainedArg {
    Keep,
    Drop,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginArg {
    Auto,
    Wal2json,
    Pgoutput,
}

impl From<PluginArg> for PluginChoice {
    fn from(p: PluginArg) -> PluginChoice {
        match p {
            PluginArg::Auto => PluginChoice::Auto,
            PluginArg::Wal2json => PluginChoice::Fixed(Plugin::Wal2json),
            PluginArg::Pgoutput => PluginChoice::Fixed(Plugin::Pgoutput),
        }
    }
}

impl Cli {
    /// Fails when a certificate file named for TLS cannot be used.
    pub fn pg_config(&self) -> Result<PgConfig, String> {
        let tls = PgTls::new(&TlsSettings {
            mode: self.pgsslmode,
            root_cert: self.pgsslrootcert.clone(),
            client_cert: self.pgsslcert.clone(),
            client_key: self.pgsslkey.clone(),
        })?;
        Ok(PgConfig {
            host: self.pghost.clone(),
            port: self.pgport,
            user: self.pguser.clone(),
            password: self.pgpass.clone().or_else(|| std::env::var("PGPASSWORD").ok()),
            dbname: self.dbname.clone(),
            application_name: "pgdeltastream".into(),
            connect_timeout: Duration::from_secs(10),
            tls,
        })
    }

    pub fn session_settings(&self) -> SessionSettings {
        SessionSettings {
            snapshot_idle_timeout: Duration::from_secs(self.snapshot_idle_timeout.max(1)),
            status_interval: Duration::from_secs(self.status_interval.max(1)),
            socket: SocketSettings {
                ping_interval: Duration::from_secs(self.ping_interval.max(1)),
                dead_after: Duration::from_secs(self.dead_after.max(2)),
            },
            frame_bytes: self.frame_size as usize,
            pgoutput_memory: self.pgoutput_memory as usize,
            backfill_chunk_bytes: self.backfill_chunk_bytes as usize,
            schema: self.schema.clone(),
            plugin: self.plugin.into(),
            max_watchers: self.max_watchers,
            max_watchers_per_caller: self.max_watchers_per_token,
            watch_reserve_slots: self.watch_reserve_slots,
            failover_slots: self.failover_slots,
            ..SessionSettings::default()
        }
    }

    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            size: usize::try_from(self.pg_pool_size).unwrap_or(usize::MAX),
            acquire_timeout: Duration::from_secs(self.pg_pool_timeout),
            statement_timeout: Duration::from_secs(self.snapshot_statement_timeout),
            read_share: usize::try_from(self.pg_pool_read_share).unwrap_or(usize::MAX),
        }
    }

    pub fn http_settings(&self) -> HttpSettings {
        HttpSettings {
            header_timeout: Duration::from_secs(self.header_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            max_connections: self.max_connections.max(1),
            ..HttpSettings::default()
        }
    }

    /// Auth, TLS and the browser guard as the flags ask, or why the server must not start.
    pub fn security(&self) -> Result<Security, String> {
        let auth = auth::from_settings(
            self.jwt_secret.as_deref(),
            self.jwt_public_key.as_deref(),
            self.jwt_audience.as_deref(),
            self.jwt_issuer.as_deref(),
        )?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig::from_pem_files(cert, key)?),
            (None, None) => None,
            _ => return Err("--tls-cert and --tls-key go together: give both or neither".into()),
        };
        let guard = Guard::new(&self.allowed_origins, &self.allowed_hosts)?;
        Ok(Security { auth, tls, guard })
    }

    pub fn retention_settings(&self) -> RetentionSettings {
        RetentionSettings {
            check_interval: Duration::from_secs(self.retention_check_interval.max(1)),
            warn_bytes: self.retention_warn_bytes,
            warn_idle: Duration::from_secs(self.retention_warn_idle),
            max_retained_bytes: self.max_retained_bytes,
            warn_fraction: f64::from(self.retention_warn_percent) / 100.0,
            on_max_retained: match self.on_max_retained {
                OnMaxRetainedArg::Keep => OnMaxRetained::Keep,
                OnMaxRetainedArg::Drop => OnMaxRetained::Drop,
            },
        }
    }
}

/// Without auth, only a loopback address is served, unless allowed: an open API on a
/// network would let anyone read every table.
pub fn check_exposure(listening: SocketAddr, auth: bool, allow_unauthenticated: bool) -> Result<(), String> {
    if auth || allow_unauthenticated || listening.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "refusing to serve {listening} without authentication: set PGDELTASTREAM_JWT_SECRET or \
         PGDELTASTREAM_JWT_PUBLIC_KEY (--jwt-secret, --jwt-public-key), listen on a loopback address \
         (--serverhost localhost), or pass --allow-unauthenticated"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_defaults_to_auto() {
        let plugin = |args: &[&str]| Cli::try_parse_from(args).unwrap().session_settings().plugin;
        assert_eq!(plugin(&["pgdeltastream"]), PluginChoice::Auto);
        assert_eq!(plugin(&["pgdeltastream", "--plugin", "pgoutput"]), PluginChoice::Fixed(Plugin::Pgoutput));
        assert_eq!(plugin(&["pgdeltastream", "--plugin", "wal2json"]), PluginChoice::Fixed(Plugin::Wal2json));
        assert!(Cli::try_parse_from(["pgdeltastream", "--plugin", "test_decoding"]).is_err());
    }

    #[test]
    fn failover_slots_default_on_and_can_be_turned_off() {
        let failover = |args: &[&str]| Cli::try_parse_from(args).unwrap().session_settings().failover_slots;
        assert!(failover(&["pgdeltastream"]));
        assert!(!failover(&["pgdeltastream", "--failover-slots", "false"]));
        assert!(failover(&["pgdeltastream", "--failover-slots", "true"]));
        assert!(Cli::try_parse_from(["pgdeltastream", "--failover-slots", "maybe"]).is_err());
    }

    #[test]
    fn pgsslmode_is_checked_at_start() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).unwrap();
        if std::env::var_os("PGSSLMODE").is_none() {
            assert_eq!(parse(&["pgdeltastream"]).pgsslmode, SslMode::Prefer);
        }
        assert_eq!(parse(&["pgdeltastream", "--pgsslmode", "verify-full"]).pgsslmode, SslMode::VerifyFull);
        assert!(Cli::try_parse_from(["pgdeltastream", "--pgsslmode", "allow"]).is_err());
        let missing = parse(&["pgdeltastream", "--pgsslmode", "verify-ca", "--pgsslrootcert", "/nonexistent/ca.pem"]);
        let error = missing.pg_config().unwrap_err();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let disabled = parse(&["pgdeltastream", "--pgsslmode", "disable", "--pgsslrootcert", "/nonexistent/ca.pem"]);
        assert_eq!(disabled.pg_config().unwrap().tls.mode(), SslMode::Disable);
    }

    #[test]
    fn only_loopback_is_served_without_auth() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        for open in ["0.0.0.0:1", "[::]:1", "10.1.2.3:1", "[2001:db8::1]:1"] {
            assert!(check_exposure(addr(open), false, false).is_err(), "{open}");
            assert!(check_exposure(addr(open), true, false).is_ok(), "{open}");
            assert!(check_exposure(addr(open), false, true).is_ok(), "{open}");
        }
        for local in ["127.0.0.1:1", "127.3.4.5:1", "[::1]:1"] {
            assert!(check_exposure(addr(local), false, false).is_ok(), "{local}");
        }
    }

    #[test]
    fn allow_unauthenticated_reads_the_usual_booleans() {
        let allow = |args: &[&str]| Cli::try_parse_from(args).unwrap().allow_unauthenticated;
        assert!(!allow(&["pgdeltastream"]));
        assert!(allow(&["pgdeltastream", "--allow-unauthenticated"]));
    }

    #[test]
    fn tls_needs_both_files() {
        let cli = Cli::try_parse_from(["pgdeltastream", "--tls-cert", "/nonexistent"]).unwrap();
        assert!(cli.security().unwrap_err().contains("go together"));
    }

    #[test]
    fn allowed_origins_and_hosts_are_lists() {
        let cli =
            Cli::try_parse_from(["pgdeltastream", "--allowed-origins", "https://a.example,http://b:8080"]).unwrap();
        assert_eq!(cli.allowed_origins, ["https://a.example", "http://b:8080"]);
        assert!(cli.security().is_ok());
        let bad = Cli::try_parse_from(["pgdeltastream", "--allowed-origins", "a.example"]).unwrap();
        assert!(bad.security().unwrap_err().contains("allowed origin"));
        let hosts = Cli::try_parse_from(["pgdeltastream", "--allowed-hosts", "pgds.internal,db"]).unwrap();
        assert_eq!(hosts.allowed_hosts, ["pgds.internal", "db"]);
    }
}
