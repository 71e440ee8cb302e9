//! Configuration: the original's environment variables, each also a command-line flag.

use std::time::Duration;

use clap::Parser;

use crate::pg::PgConfig;
use crate::pg::pool::PoolSettings;
use crate::server::HttpSettings;
use crate::session::{PluginChoice, RetentionSettings, SessionSettings};
use crate::stream::plugin::Plugin;
use crate::stream::socket::SocketSettings;

/// Stream PostgreSQL table changes to clients over websockets, using logical decoding
/// (wal2json, or pgoutput with a publication per session).
#[derive(Parser, Debug, Clone)]
#[command(name = "pgdeltastream", version, about)]
pub struct Cli {
    /// Database to stream from.
    #[arg(long, env = "DBNAME", default_value = "postgres")]
    pub dbname: String,
    /// Postgres user; needs the REPLICATION attribute (or superuser).
    #[arg(long, env = "PGUSER", default_value = "postgres")]
    pub pguser: String,
    /// Postgres password (PGPASSWORD is read too).
    #[arg(long, env = "PGPASS", hide_env_values = true)]
    pub pgpass: Option<String>,
    /// Postgres host, or a Unix socket directory.
    #[arg(long, env = "PGHOST", default_value = "localhost")]
    pub pghost: String,
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    pub pgport: u16,
    /// Address the server listens on. Keep it local unless a proxy guards it: the API
    /// has no authentication yet.
    #[arg(long, env = "SERVERHOST", default_value = "localhost")]
    pub serverhost: String,
    #[arg(long, env = "SERVERPORT", default_value_t = 12312)]
    pub serverport: u16,
    /// Largest `limit` a snapshot page may ask for (also the default limit).
    #[arg(long, env = "PGDELTASTREAM_MAX_LIMIT", default_value_t = 10_000)]
    pub max_limit: u64,
    /// At most this many ordinary connections to Postgres at once (snapshot reads, slot
    /// queries); the snapshot holders and streams have their own, one per session.
    #[arg(long, env = "PGDELTASTREAM_PG_POOL_SIZE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub pg_pool_size: u64,
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
    /// Viewers watching sessions at once (GET /v2/sessions/{name}/watch); more get 503.
    /// Each costs a walsender and a temporary replication slot while it runs.
    #[arg(long, env = "PGDELTASTREAM_MAX_WATCHERS", default_value_t = 8)]
    pub max_watchers: usize,
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
    pub fn pg_config(&self) -> PgConfig {
        PgConfig {
            host: self.pghost.clone(),
            port: self.pgport,
            user: self.pguser.clone(),
            password: self.pgpass.clone().or_else(|| std::env::var("PGPASSWORD").ok()),
            dbname: self.dbname.clone(),
            application_name: "pgdeltastream".into(),
            connect_timeout: Duration::from_secs(10),
        }
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
            schema: self.schema.clone(),
            plugin: self.plugin.into(),
            max_watchers: self.max_watchers,
            ..SessionSettings::default()
        }
    }

    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            size: usize::try_from(self.pg_pool_size).unwrap_or(usize::MAX),
            acquire_timeout: Duration::from_secs(self.pg_pool_timeout),
            statement_timeout: Duration::from_secs(self.snapshot_statement_timeout),
        }
    }

    pub fn http_settings(&self) -> HttpSettings {
        HttpSettings {
            header_timeout: Duration::from_secs(self.header_timeout.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
            max_connections: self.max_connections.max(1),
        }
    }

    pub fn retention_settings(&self) -> RetentionSettings {
        RetentionSettings {
            check_interval: Duration::from_secs(self.retention_check_interval.max(1)),
            warn_bytes: self.retention_warn_bytes,
            warn_idle: Duration::from_secs(self.retention_warn_idle),
        }
    }
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
}
