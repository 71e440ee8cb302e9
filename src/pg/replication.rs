//! Our replication-protocol client.
//!
//! Upstream tokio-postgres cannot open a replication connection, so this is a small
//! client of our own on the `postgres-protocol` crate (the same message codec
//! tokio-postgres uses) and a tokio socket. It knows just enough of the protocol for
//! logical decoding:
//!
//! 1. [`ReplicationConnection::connect`]: TLS as PGSSLMODE says ([`super::tls`]), startup
//!    with `replication=database`, then authentication (trust, password, md5 or
//!    SCRAM-SHA-256).
//! 2. Simple queries and replication commands (`CREATE_REPLICATION_SLOT`, SQL such as
//!    `SELECT ... FROM pg_replication_slots`).
//! 3. [`ReplicationConnection::start_replication`] turns the connection into a
//!    [`ReplicationStream`]: the server sends CopyData messages (see [`super::frames`]),
//!    we send standby status updates, until either side ends the copy.
//!
//! Reading is cancel-safe: a message is taken out of the read buffer only once it is
//! complete, so `ReplicationStream::next` can sit in a `tokio::select!` next to timers
//! and channels without ever losing a byte.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PgConfig;
use super::error::{DbError, PgError};
use super::frames::{self, ServerFrame};
use crate::types::Lsn;

/// A TCP or Unix socket: whatever `PgConfig::host` names.
trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// A row of a simple query's result: every value in text form, as the server printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextRow {
    pub values: Vec<Option<String>>,
}

impl TextRow {
    pub fn get(&self, i: usize) -> Option<&str> {
        self.values.get(i).and_then(|v| v.as_deref())
    }
}

/// What `CREATE_REPLICATION_SLOT ... LOGICAL ... EXPORT_SNAPSHOT` answers.
#[derive(Debug, Clone)]
pub(crate) struct CreatedSlot {
    pub slot_name: String,
    pub consistent_point: Lsn,
    /// Valid only until the next command on the connection that created it.
    pub snapshot_name: Option<String>,
}

/// A `replication=database` connection in command mode.
pub(crate) struct ReplicationConnection {
    socket: Box<dyn Socket>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// ParameterStatus values the server reported (server_version, server_encoding, ...).
    params: HashMap<String, String>,
    /// The socket, when it is TCP: a busy stream is read in bursts ([`Pacing`]).
    tcp_fd: Option<std::os::fd::RawFd>,
    /// The backend's process id (BackendKeyData): the walsender's, which
    /// pg_replication_slots names as a slot's `active_pid` while it streams.
    backend_pid: Option<i32>,
}

/// One complete message from the server.
enum Incoming {
    Message(Message),
    /// CopyBothResponse (`W`), which `Message::parse` does not know; its body is unused.
    CopyBoth,
}

impl ReplicationConnection {
    /// Connects and authenticates, bounded by `config.connect_timeout`.
    pub async fn connect(config: &PgConfig) -> Result<Self, PgError> {
        match tokio::time::timeout(config.connect_timeout, Self::connect_inner(config)).await {
            Ok(result) => result,
            Err(_) => Err(PgError::Connect {
                address: config.address(),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            }),
        }
    }

    async fn connect_inner(config: &PgConfig) -> Result<Self, PgError> {
        let connect_err = |source| PgError::Connect { address: config.address(), source };
        let mut tcp_fd = None;
        let socket: Box<dyn Socket> = if config.is_unix_socket() {
            let path = format!("{}/.s.PGSQL.{}", config.host, config.port);
            Box::new(tokio::net::UnixStream::connect(path).await.map_err(connect_err)?)
        } else {
            let mut tcp =
                tokio::net::TcpStream::connect((config.host.as_str(), config.port)).await.map_err(connect_err)?;
            tcp.set_nodelay(true).map_err(connect_err)?;
            // Under TLS too: `Pacing` sets the low-water mark on the TCP socket itself.
            tcp_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            if config.tls.wanted(&config.host) && request_tls(&mut tcp, config).await? {
                let tls = config.tls.handshake(tcp, &config.host).await.map_err(|e| PgError::Tls(e.0))?;
                Box::new(tls)
            } else {
                Box::new(tcp)
            }
        };
        let mut conn = ReplicationConnection {
            socket,
            read_buf: BytesMut::with_capacity(64 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            tcp_fd,
            backend_pid: None,
        };
        let params = [
            ("user", config.user.as_str()),
            ("database", config.dbname.as_str()),
            ("replication", "database"),
            ("application_name", config.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        // Startup parameters set settings directly; no `options` string needed here.
        let pinned = super::config::PINNED_SETTINGS.iter();
        frontend::startup_message(params.iter().chain(pinned).copied(), &mut conn.write_buf)?;
        conn.flush().await?;
        conn.authenticate(config).await?;
        conn.wait_ready().await?;
        Ok(conn)
    }

    /// A run-time parameter the server reported at startup, e.g. `server_encoding`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    async fn authenticate(&mut self, config: &PgConfig) -> Result<(), PgError> {
        let password = || {
            config.password.as_deref().ok_or_else(|| {
                PgError::Auth("the server asks for a password and none is configured (PGPASSWORD)".into())
            })
        };
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::AuthenticationOk) => return Ok(()),
                Incoming::Message(Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Incoming::Message(Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(config.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Incoming::Message(Message::AuthenticationSasl(body)) => {
                    self.scram(&body, password()?).await?;
                }
                Incoming::Message(Message::ErrorResponse(body)) => {
                    return Err(PgError::Db(DbError::from_fields(body.fields())));
                }
                Incoming::Message(Message::NoticeResponse(_)) => {}
                _ => {
                    return Err(PgError::Auth(
                        "unsupported authentication method (use trust, password, md5 or scram-sha-256)".into(),
                    ));
                }
            }
        }
    }

    async fn scram(
        &mut self,
        body: &postgres_protocol::message::backend::AuthenticationSaslBody,
        password: &str,
    ) -> Result<(), PgError> {
        use fallible_iterator::FallibleIterator;
        let mut mechanisms = body.mechanisms();
        let mut supported = false;
        while let Some(m) = mechanisms.next()? {
            supported |= m == sasl::SCRAM_SHA_256;
        }
        if !supported {
            return Err(PgError::Auth("the server offers no SASL mechanism we support (SCRAM-SHA-256)".into()));
        }
        let mut scram = sasl::ScramSha256::new(password.as_bytes(), sasl::ChannelBinding::unsupported());
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read_message().await? {
            Incoming::Message(Message::AuthenticationSaslContinue(b)) => scram.update(b.data())?,
            Incoming::Message(Message::ErrorResponse(b)) => return Err(PgError::Db(DbError::from_fields(b.fields()))),
            _ => return Err(PgError::Auth("unexpected message during SCRAM exchange".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read_message().await? {
            Incoming::Message(Message::AuthenticationSaslFinal(b)) => scram.finish(b.data())?,
            Incoming::Message(Message::ErrorResponse(b)) => return Err(PgError::Db(DbError::from_fields(b.fields()))),
            _ => return Err(PgError::Auth("unexpected message at the end of SCRAM exchange".into())),
        }
        Ok(())
    }

    /// Reads until ReadyForQuery, keeping parameters and the backend key.
    async fn wait_ready(&mut self) -> Result<(), PgError> {
        let mut error = None;
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::ReadyForQuery(_)) => return error.map_or(Ok(()), Err),
                Incoming::Message(Message::ParameterStatus(p)) => {
                    if let (Ok(k), Ok(v)) = (p.name(), p.value()) {
                        self.params.insert(k.to_owned(), v.to_owned());
                    }
                }
                Incoming::Message(Message::BackendKeyData(key)) => self.backend_pid = Some(key.process_id()),
                Incoming::Message(Message::ErrorResponse(b)) => {
                    let e = DbError::from_fields(b.fields());
                    // A FATAL error at startup ends the connection: there is no ReadyForQuery.
                    if e.severity == "FATAL" || e.severity == "PANIC" {
                        return Err(PgError::Db(e));
                    }
                    error = Some(PgError::Db(e));
                }
                _ => {}
            }
        }
    }

    /// Runs a simple query (SQL or a replication command) and returns its rows as text.
    /// Several statements yield the rows of all of them.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, PgError> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Incoming::Message(Message::DataRow(row)) => {
                    use fallible_iterator::FallibleIterator;
                    let buf = row.buffer();
                    let values =
                        row.ranges().map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()))).collect()?;
                    rows.push(TextRow { values });
                }
                Incoming::Message(Message::ErrorResponse(b)) => {
                    error = Some(PgError::Db(DbError::from_fields(b.fields())))
                }
                Incoming::Message(Message::ReadyForQuery(_)) => return error.map_or(Ok(rows), Err),
                Incoming::CopyBoth => return Err(PgError::Protocol("unexpected CopyBothResponse to a query".into())),
                _ => {}
            }
        }
    }

    /// Creates a logical slot with `plugin` and exports a snapshot of the moment the slot
    /// became consistent; a `failover` slot (PostgreSQL 17+) is synchronized to standbys
    /// that ask for it. `name` must already be a valid slot name (it is quoted here).
    pub(crate) async fn create_logical_slot(
        &mut self,
        name: &str,
        plugin: &str,
        failover: bool,
    ) -> Result<CreatedSlot, PgError> {
        let sql = create_slot_sql(name, plugin, failover);
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let consistent_point = row
            .get(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))?;
        Ok(CreatedSlot {
            slot_name: row.get(0).unwrap_or(name).to_owned(),
            consistent_point,
            snapshot_name: row.get(2).map(str::to_owned),
        })
    }

    /// Creates a temporary logical slot with `plugin`, exporting no snapshot: Postgres
    /// drops it when this connection ends. Returns its consistent point.
    pub(crate) async fn create_temporary_slot(&mut self, name: &str, plugin: &str) -> Result<Lsn, PgError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL {} NOEXPORT_SNAPSHOT",
            super::ident::quote_ident(name),
            super::ident::quote_ident(plugin)
        );
        let rows = self.simple_query(&sql).await?;
        rows.first()
            .and_then(|row| row.get(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into()))
    }

    /// Starts logical streaming from `start` (`Lsn::ZERO` = from the slot's confirmed
    /// position) with the plugin's `options`. Option names and values are quoted here.
    pub(crate) async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream, PgError> {
        self.start_copy(slot, start, options).await?;
        Ok(ReplicationStream {
            conn: self,
            copy_done_sent: false,
            server_done: false,
            failed: false,
            pacing: Pacing::new(),
        })
    }

    /// Sends `START_REPLICATION` and waits for CopyBothResponse.
    async fn start_copy(&mut self, slot: &str, start: Lsn, options: &[(&str, String)]) -> Result<(), PgError> {
        let mut sql = format!("START_REPLICATION SLOT {} LOGICAL {start}", super::ident::quote_ident(slot));
        if !options.is_empty() {
            let opts: Vec<String> = options
                .iter()
                .map(|(k, v)| format!("{} {}", super::ident::quote_ident(k), super::ident::quote_literal(v)))
                .collect();
            sql.push_str(&format!(" ({})", opts.join(", ")));
        }
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            match self.read_message().await? {
                Incoming::CopyBoth => return Ok(()),
                Incoming::Message(Message::ErrorResponse(b)) => {
                    let e = PgError::Db(DbError::from_fields(b.fields()));
                    // Consume the ReadyForQuery that follows, so the connection stays usable.
                    let _ = self.wait_ready().await;
                    return Err(e);
                }
                Incoming::Message(Message::NoticeResponse(b)) => {
                    tracing::warn!(slot, notice = %DbError::from_fields(b.fields()), "notice from Postgres");
                }
                _ => {}
            }
        }
    }

    /// Ends the session politely (Terminate) and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.socket.shutdown().await;
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        self.socket.write_all(&self.write_buf).await?;
        self.write_buf.clear();
        self.socket.flush().await?;
        Ok(())
    }

    /// Returns the next complete message. Cancel-safe: bytes stay in `read_buf` until a
    /// whole message is there.
    async fn read_message(&mut self) -> Result<Incoming, PgError> {
        loop {
            if let Some(m) = self.parse_buffered()? {
                return Ok(m);
            }
            self.fill_buf().await?;
        }
    }

    /// Reads whatever the socket has into `read_buf`. Cancel-safe.
    async fn fill_buf(&mut self) -> Result<(), PgError> {
        if self.read_buf.capacity() - self.read_buf.len() < 8 * 1024 {
            self.read_buf.reserve(64 * 1024);
        }
        let n = self.socket.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(PgError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }

    fn parse_buffered(&mut self) -> Result<Option<Incoming>, PgError> {
        if self.read_buf.len() < 5 {
            return Ok(None);
        }
        // `Message::parse` does not know CopyBothResponse ('W'): peel it off here.
        if self.read_buf[0] == b'W' {
            let len =
                u32::from_be_bytes([self.read_buf[1], self.read_buf[2], self.read_buf[3], self.read_buf[4]]) as usize;
            if len < 4 {
                return Err(PgError::Protocol("invalid CopyBothResponse length".into()));
            }
            if self.read_buf.len() < len + 1 {
                self.read_buf.reserve(len + 1 - self.read_buf.len());
                return Ok(None);
            }
            self.read_buf.advance(len + 1);
            return Ok(Some(Incoming::CopyBoth));
        }
        Ok(Message::parse(&mut self.read_buf)?.map(Incoming::Message))
    }
}

/// SSLRequest: true when the server is ready for the TLS handshake, false when it
/// declined and the mode allows plain (prefer).
async fn request_tls(tcp: &mut tokio::net::TcpStream, config: &PgConfig) -> Result<bool, PgError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8];
    tcp.read_exact(&mut answer).await?;
    let mode = config.tls.mode();
    match answer[0] {
        b'S' => Ok(true),
        b'N' if mode == super::tls::SslMode::Prefer => Ok(false),
        b'N' => Err(PgError::Tls(format!(
            "PGSSLMODE={mode}, but the server at {} does not accept TLS (is ssl = on in its postgresql.conf?)",
            config.address()
        ))),
        // An ErrorResponse: a server too old for SSLRequest.
        other => Err(PgError::Tls(format!(
            "PGSSLMODE={mode}: unexpected answer {other:#04x} to the TLS request from {}",
            config.address()
        ))),
    }
}

/// What a replication stream yields.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    /// A frame of decoded changes or a keepalive.
    Frame(ServerFrame),
    /// A NoticeResponse inside the stream, e.g. a wal2json WARNING about a table
    /// without replica identity. Informational: the stream goes on.
    Notice(DbError),
}

/// What [`ReplicationStream::try_next`] found in the read buffer.
#[derive(Debug)]
pub(crate) enum Buffered {
    Event(StreamEvent),
    /// The server ended the stream (CopyDone).
    Ended,
    /// Nothing complete yet.
    Empty,
}

/// While the stream is busy, a read waits for this many bytes (`SO_RCVLOWAT`)...
const BURST_BYTES: i32 = 64 * 1024;
/// ... or this long, whichever comes first.
const BURST_WAIT: Duration = Duration::from_millis(1);
/// Busy: at least this many messages per millisecond (a 10,000 tx/s stream of one-row
/// transactions sends 30).
const BUSY_FRAMES_PER_MS: u32 = 64;

/// How eagerly the stream reads its socket.
///
/// The walsender sends each message as soon as it is made. A client that reads every
/// message as it arrives wakes up and makes a `read` per message: on a busy stream that
/// was most of the server's CPU (4.8 s for 1,000,000 changes, against 0.9 s read in
/// bursts), and on 2 cores it is CPU the walsender, always the bottleneck, then lacks.
/// So while messages come fast, a read waits until [`BURST_BYTES`] are there, at most
/// [`BURST_WAIT`]; once a wait runs out, the stream trickles, and reads are eager again,
/// so that a quiet stream's latency stays that of one message.
struct Pacing {
    window_start: Instant,
    /// Messages taken since `window_start`.
    frames: u32,
    busy: bool,
    /// The `SO_RCVLOWAT` the socket has now.
    lowat: i32,
}

impl Pacing {
    fn new() -> Pacing {
        Pacing { window_start: Instant::now(), frames: 0, busy: false, lowat: 1 }
    }

    /// Whether the stream is busy, judged over the last millisecond or more.
    fn busy(&mut self) -> bool {
        let elapsed = self.window_start.elapsed();
        if elapsed >= BURST_WAIT {
            let per_ms = u128::from(self.frames) * 1000 / elapsed.as_micros().max(1);
            self.busy = per_ms >= u128::from(BUSY_FRAMES_PER_MS);
            self.window_start = Instant::now();
            self.frames = 0;
        }
        self.busy
    }

    fn quiet(&mut self) {
        self.busy = false;
        self.window_start = Instant::now();
        self.frames = 0;
    }

    fn set_lowat(&mut self, fd: std::os::fd::RawFd, bytes: i32) {
        if self.lowat == bytes {
            return;
        }
        // SAFETY: setsockopt(2) on a socket this connection owns, with an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        // Lowering it wakes a reader that now has enough; if it fails, reads stay eager.
        self.lowat = if rc == 0 { bytes } else { 1 };
    }
}

/// A connection in CopyBoth mode after `START_REPLICATION`.
pub(crate) struct ReplicationStream {
    conn: ReplicationConnection,
    copy_done_sent: bool,
    server_done: bool,
    /// The server ended the stream with an ErrorResponse: the walsender is back in
    /// command mode, and the connection can start streaming again ([`Self::restart`]).
    failed: bool,
    pacing: Pacing,
}

impl ReplicationStream {
    /// The walsender's process id, as the server reported it at startup.
    pub(crate) fn backend_pid(&self) -> Option<i32> {
        self.conn.backend_pid
    }

    /// The next event, or `None` once the server has ended the stream normally
    /// (CopyDone). An ErrorResponse (slot dropped, server shutting down) is an `Err`.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, PgError> {
        loop {
            match self.try_next()? {
                Buffered::Event(e) => return Ok(Some(e)),
                Buffered::Ended => return Ok(None),
                Buffered::Empty => self.fill_paced().await?,
            }
        }
    }

    /// The next event if it is already buffered, without waiting: lets a caller take a
    /// whole burst of frames in one go.
    pub(crate) fn try_next(&mut self) -> Result<Buffered, PgError> {
        if self.server_done {
            return Ok(Buffered::Ended);
        }
        loop {
            let Some(incoming) = self.conn.parse_buffered()? else { return Ok(Buffered::Empty) };
            match incoming {
                Incoming::Message(Message::CopyData(body)) => {
                    self.pacing.frames += 1;
                    let frame =
                        frames::parse_server_frame(body.into_bytes()).map_err(|e| PgError::Protocol(e.to_string()))?;
                    return Ok(Buffered::Event(StreamEvent::Frame(frame)));
                }
                Incoming::Message(Message::NoticeResponse(b)) => {
                    return Ok(Buffered::Event(StreamEvent::Notice(DbError::from_fields(b.fields()))));
                }
                Incoming::Message(Message::ErrorResponse(b)) => {
                    self.failed = true;
                    return Err(PgError::Db(DbError::from_fields(b.fields())));
                }
                Incoming::Message(Message::CopyDone) => {
                    self.server_done = true;
                    return Ok(Buffered::Ended);
                }
                Incoming::Message(Message::ParameterStatus(_)) => {}
                Incoming::Message(other) => {
                    return Err(PgError::Protocol(format!(
                        "unexpected message in replication stream: {}",
                        message_name(&other)
                    )));
                }
                Incoming::CopyBoth => return Err(PgError::Protocol("second CopyBothResponse".into())),
            }
        }
    }

    /// Reads more of the stream: eagerly while it trickles, in bursts while it is busy.
    /// Cancel-safe: the pacing state is only ever a hint.
    ///
    /// Under TLS the low-water mark is on the TCP socket beneath rustls, and still only
    /// delays wake-ups: tokio-rustls hands out plaintext it already holds without
    /// touching the socket, and a record that is only partly in waits for the rest at
    /// most [`BURST_WAIT`], as a plain read does.
    async fn fill_paced(&mut self) -> Result<(), PgError> {
        let Some(fd) = self.conn.tcp_fd else { return self.conn.fill_buf().await };
        if !self.pacing.busy() {
            self.pacing.set_lowat(fd, 1);
            return self.conn.fill_buf().await;
        }
        self.pacing.set_lowat(fd, BURST_BYTES);
        if self.conn.read_buf.capacity() - self.conn.read_buf.len() < BURST_BYTES as usize {
            self.conn.read_buf.reserve(BURST_BYTES as usize);
        }
        tokio::select! {
            read = self.conn.fill_buf() => return read,
            _ = tokio::time::sleep(BURST_WAIT) => {}
        }
        // The stream slowed down: read what is there, and eagerly from now on.
        self.pacing.quiet();
        self.pacing.set_lowat(fd, 1);
        self.conn.fill_buf().await
    }

    /// Sends a standby status update: everything before `flush` may be forgotten by the
    /// slot. We report write = flush = apply, as pg_recvlogical does for a consumer
    /// that has no separate durability step.
    pub(crate) async fn send_status(&mut self, flush: Lsn, reply_requested: bool) -> Result<(), PgError> {
        let payload = frames::standby_status_update(flush, flush, flush, SystemTime::now(), reply_requested);
        frontend::CopyData::new(payload)?.write(&mut self.conn.write_buf);
        self.conn.flush().await
    }

    /// After the server ended the stream with an error (a walsender survives an ERROR
    /// and waits for the next command), streams the slot again from `start` on the same
    /// connection. Anything else is an error.
    pub async fn restart(&mut self, slot: &str, start: Lsn, options: &[(&str, String)]) -> Result<(), PgError> {
        if !self.failed || self.server_done {
            return Err(PgError::Protocol("the stream cannot be restarted: it did not end with an error".into()));
        }
        if let Some(fd) = self.conn.tcp_fd {
            self.pacing.set_lowat(fd, 1);
        }
        self.conn.wait_ready().await?;
        self.conn.start_copy(slot, start, options).await?;
        self.failed = false;
        self.copy_done_sent = false;
        self.pacing = Pacing::new();
        Ok(())
    }

    /// Streams the slot again from `start` with other `options`, on `fresh`, a new
    /// connection: a walsender does not start a logical stream again once one ended
    /// well (it answers the second START_REPLICATION as done). So this stream ends
    /// (CopyDone; what is still in flight is discarded, the new stream sends again what
    /// comes after `start`; the slot is free once the walsender is ready), the new one
    /// starts, and this connection is closed.
    pub async fn switch(
        &mut self,
        mut fresh: ReplicationConnection,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<(), PgError> {
        if self.failed || self.server_done {
            return Err(PgError::Protocol("the stream cannot be switched: it has ended".into()));
        }
        if let Some(fd) = self.conn.tcp_fd {
            self.pacing.set_lowat(fd, 1);
        }
        if !self.copy_done_sent {
            frontend::copy_done(&mut self.conn.write_buf);
            self.conn.flush().await?;
            self.copy_done_sent = true;
        }
        self.conn.wait_ready().await?;
        fresh.start_copy(slot, start, options).await?;
        std::mem::replace(&mut self.conn, fresh).close().await;
        self.copy_done_sent = false;
        self.pacing = Pacing::new();
        Ok(())
    }

    /// Ends streaming (CopyDone), waits for the server to finish the command, and
    /// returns the connection in command mode. Data still in flight is discarded.
    pub async fn stop(mut self) -> Result<ReplicationConnection, PgError> {
        // What is left to read is small: a burst's low-water mark would wait for it forever.
        if let Some(fd) = self.conn.tcp_fd {
            self.pacing.set_lowat(fd, 1);
        }
        if !self.copy_done_sent {
            frontend::copy_done(&mut self.conn.write_buf);
            self.conn.flush().await?;
            self.copy_done_sent = true;
        }
        loop {
            match self.conn.read_message().await? {
                Incoming::Message(Message::ReadyForQuery(_)) => return Ok(self.conn),
                Incoming::Message(Message::ErrorResponse(b)) => {
                    let e = DbError::from_fields(b.fields());
                    let _ = self.conn.wait_ready().await;
                    return Err(PgError::Db(e));
                }
                _ => {}
            }
        }
    }
}

/// FAILOVER has no keyword form, only the option list (15's grammar; the option is 17's):
/// without it the keyword form stays, which 13 and 14 read too.
fn create_slot_sql(name: &str, plugin: &str, failover: bool) -> String {
    let (name, plugin) = (super::ident::quote_ident(name), super::ident::quote_ident(plugin));
    if failover {
        format!("CREATE_REPLICATION_SLOT {name} LOGICAL {plugin} (SNAPSHOT 'export', FAILOVER true)")
    } else {
        format!("CREATE_REPLICATION_SLOT {name} LOGICAL {plugin} EXPORT_SNAPSHOT")
    }
}

fn message_name(m: &Message) -> &'static str {
    match m {
        Message::CommandComplete(_) => "CommandComplete",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::DataRow(_) => "DataRow",
        Message::RowDescription(_) => "RowDescription",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::CopyInResponse(_) => "CopyInResponse",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::create_slot_sql;

    #[test]
    fn a_failover_slot_is_asked_for_in_the_option_list() {
        assert_eq!(
            create_slot_sql("delta_a1", "pgoutput", false),
            "CREATE_REPLICATION_SLOT \"delta_a1\" LOGICAL \"pgoutput\" EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create_slot_sql("delta_a1", "wal2json", true),
            "CREATE_REPLICATION_SLOT \"delta_a1\" LOGICAL \"wal2json\" (SNAPSHOT 'export', FAILOVER true)"
        );
    }
}
