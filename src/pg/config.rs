//! Where and how to connect to Postgres.

use std::time::Duration;

/// Connection settings shared by the replication client and the ordinary
/// (tokio-postgres) connections, so both always reach the same server as the same user.
#[derive(Clone)]
pub struct PgConfig {
    /// A host name or IP address, or an absolute path to a Unix socket directory.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    /// Shown in `pg_stat_activity`, so an operator can tell our connections apart.
    pub application_name: String,
    pub connect_timeout: Duration,
    /// PGSSLMODE and its certificates.
    pub tls: super::tls::PgTls,
}

impl std::fmt::Debug for PgConfig {
    // Hand-written so that the password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The settings that decide how values are printed, pinned on every connection we open
/// (replication and ordinary), so that the stream and the snapshot print a value alike
/// whatever the database, the role or postgresql.conf set. `bytea_output = escape`, say,
/// would make wal2json pass escape text on as if it were hex.
///
/// `search_path` is deliberately not pinned: wal2json names a type outside the
/// walsender's search_path with its schema, as users' own sessions would. Both kinds
/// of connection get the same one (same role, database and startup options), which
/// pgoutput's rendering relies on when it names types on a pool connection
/// (`stream::pgoutput::types`).
pub(crate) const PINNED_SETTINGS: &[(&str, &str)] = &[
    ("bytea_output", "hex"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "1"),
];

/// [`PINNED_SETTINGS`] as the `options` startup parameter (`-c name=value ...`), in
/// which a space inside a value is escaped with a backslash.
pub(crate) fn pinned_options() -> String {
    PINNED_SETTINGS
        .iter()
        .map(|(name, value)| format!("-c {name}={}", value.replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ")
}

impl PgConfig {
    /// True when `host` names a Unix socket directory rather than a TCP host.
    pub(crate) fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// `host:port`, or the socket path, for error messages.
    pub fn address(&self) -> String {
        if self.is_unix_socket() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The same settings for an ordinary tokio-postgres connection.
    pub(crate) fn tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .options(pinned_options())
            .connect_timeout(self.connect_timeout)
            .ssl_mode(self.tls.tokio_mode(&self.host));
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_spaces() {
        assert_eq!(
            pinned_options(),
            "-c bytea_output=hex -c DateStyle=ISO,\\ MDY -c IntervalStyle=postgres -c TimeZone=UTC -c extra_float_digits=1"
        );
    }
}
