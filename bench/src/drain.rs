//! Draining a slot: (a) through the server to a websocket client that acks every
//! transaction, on a wal2json slot and on a pgoutput slot; (b) with pg_recvlogical on
//! twin slots, in Postgres's three ways to produce the changes: wal2json with the
//! server's options, wal2json's default one message per transaction, and pgoutput.

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use memchr::memmem;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::Result;
use crate::cluster::{Cluster, die_with_parent_tokio};
use crate::cpu::{CpuUse, Snapshot};

/// What one change looks like in wal2json v1 output: counting these counts changes.
pub const CHANGE_MARK: &[u8] = b"\"kind\":\"";
const NEXTLSN_MARK: &[u8] = b"\"nextlsn\":\"";

/// The wal2json options the server streams with (`Plugin::start_options` of
/// src/stream/plugin.rs), given to pg_recvlogical too.
pub const PLUGIN_OPTIONS: &[&str] = &["include-lsn=on", "pretty-print=off", "write-in-chunks=on"];
/// wal2json's default output (one message per transaction), with the `nextlsn` a
/// client needs to ack.
pub const WHOLE_OPTIONS: &[&str] = &["include-lsn=on"];
/// The publication every pgoutput slot of a bench database reads (FOR ALL TABLES); the
/// server's pgoutput slots read one named as the slot.
pub const PUBLICATION: &str = "bench_all";

/// Who drains a slot, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tool {
    /// The server, on a wal2json slot.
    Server,
    /// The server, on a pgoutput slot: the same JSON, rendered by the server.
    ServerPgoutput,
    /// The server on a wal2json slot, read by a Python `websockets` client (bench/drain.py).
    ServerPython,
    /// pg_recvlogical with wal2json and the server's options (`write-in-chunks`).
    PgRecvlogical,
    /// pg_recvlogical with wal2json's default output: one message per transaction.
    PgRecvlogicalWhole,
    /// pg_recvlogical draining pgoutput itself (binary; no JSON at all).
    PgRecvlogicalPgoutput,
}

impl Tool {
    /// Every tool a throughput workload is drained by.
    pub const THROUGHPUT: [Tool; 6] = [
        Tool::Server,
        Tool::ServerPgoutput,
        Tool::ServerPython,
        Tool::PgRecvlogical,
        Tool::PgRecvlogicalWhole,
        Tool::PgRecvlogicalPgoutput,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Tool::Server => "server",
            Tool::ServerPgoutput => "server on pgoutput",
            Tool::ServerPython => "server to Python websockets",
            Tool::PgRecvlogical => "pg_recvlogical",
            Tool::PgRecvlogicalWhole => "pg_recvlogical, one message per tx",
            Tool::PgRecvlogicalPgoutput => "pg_recvlogical, pgoutput",
        }
    }

    /// Its name in `--drains` and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Server => "server",
            Tool::ServerPgoutput => "server_pgoutput",
            Tool::ServerPython => "server_python",
            Tool::PgRecvlogical => "pg_recvlogical",
            Tool::PgRecvlogicalWhole => "pg_recvlogical_whole",
            Tool::PgRecvlogicalPgoutput => "pg_recvlogical_pgoutput",
        }
    }

    pub fn is_server(self) -> bool {
        matches!(self, Tool::Server | Tool::ServerPgoutput | Tool::ServerPython)
    }

    /// The plugin its slot decodes with.
    pub fn plugin(self) -> &'static str {
        match self {
            Tool::ServerPgoutput | Tool::PgRecvlogicalPgoutput => "pgoutput",
            _ => "wal2json",
        }
    }

    /// pg_recvlogical's `-o` options.
    fn options(self) -> Vec<String> {
        match self {
            Tool::PgRecvlogicalWhole => WHOLE_OPTIONS.iter().map(|o| o.to_string()).collect(),
            Tool::PgRecvlogicalPgoutput => {
                vec!["proto_version=1".into(), format!("publication_names={PUBLICATION}"), "messages=true".into()]
            }
            _ => PLUGIN_OPTIONS.iter().map(|o| o.to_string()).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub tool: Tool,
    pub slot: String,
    /// 1-based position of this drain among the workload's drains.
    pub order: usize,
    pub changes: u64,
    pub transactions: u64,
    /// Plugin output bytes (pg_recvlogical: without the newline it adds per record).
    pub bytes: u64,
    pub secs: f64,
    /// CPU seconds spent during the drain, by process.
    pub cpu: Option<CpuUse>,
}

impl Drain {
    pub fn changes_per_sec(&self) -> f64 {
        self.changes as f64 / self.secs
    }
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The `nextlsn` of a v1 message, from its head.
pub fn message_nextlsn(msg: &[u8]) -> Option<u64> {
    let head = &msg[..msg.len().min(128)];
    let at = memmem::find(head, NEXTLSN_MARK)? + NEXTLSN_MARK.len();
    let len = memchr::memchr(b'"', &head[at..])?;
    parse_lsn(std::str::from_utf8(&head[at..at + len]).ok()?)
}

/// Sends every nextlsn it is given as an ack, several per flush when they come in a
/// burst, from its own task so that a slow socket write never delays reading; closes
/// the socket when the sender is dropped.
pub fn spawn_acker<S>(
    mut sink: S,
) -> (mpsc::UnboundedSender<u64>, tokio::task::JoinHandle<std::result::Result<(), tokio_tungstenite::tungstenite::Error>>)
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin + Send + 'static,
{
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
    let acker = tokio::spawn(async move {
        while let Some(lsn) = ack_rx.recv().await {
            let mut next = Some(lsn);
            while let Some(lsn) = next {
                sink.feed(Message::text(format!("{{\"lsn\":\"{}\"}}", format_lsn(lsn)))).await?;
                next = ack_rx.try_recv().ok();
            }
            sink.flush().await?;
        }
        sink.send(Message::Close(None)).await?;
        Ok(())
    });
    (ack_tx, acker)
}

pub fn ws_config() -> WebSocketConfig {
    // A transaction is one message, however large (the 1M-row one is ~260 MB).
    // tungstenite zero-fills `read_buffer_size` bytes before every read attempt (128 KiB
    // by default), which made that memset the client's biggest cost; a server frame is a
    // change, mostly a few hundred bytes.
    WebSocketConfig::default().max_message_size(None).max_frame_size(None).read_buffer_size(16 * 1024)
}

/// Streams `slot` through the server until a message's nextlsn reaches `end`. Counts the
/// messages whose nextlsn is <= `end` (the workload's), acks every nextlsn it receives.
/// The clock runs from the websocket request to the last message.
pub async fn through_server(tool: Tool, port: u16, pid: u32, slot: &str, end: u64, limit: Duration) -> Result<Drain> {
    let url = format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName={slot}");
    let cpu0 = Snapshot::take(Some(pid));
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let (got, open) = receive(&url, slot, Until::Lsn(end), deadline).await?;
    let secs = got.finished.duration_since(t0).as_secs_f64();
    let (client_secs, tool_secs) = Snapshot::take(Some(pid)).since(&cpu0);
    open.close().await;
    let cpu = Some(CpuUse { walsender_secs: 0.0, tool_secs, client_secs });
    let Received { changes, transactions, bytes, .. } = got;
    Ok(Drain { tool, slot: slot.into(), order: 0, changes, transactions, bytes, secs, cpu })
}

/// The Python of `make clients`' venv, with `websockets`.
pub const PYTHON: &str = ".tools/venv/bin/python";

/// Streams `slot` through the server to bench/drain.py (Python `websockets`), which acks
/// every transaction and stops at `end`; its own clock runs from the connect to the last
/// message.
pub async fn with_python(port: u16, pid: u32, slot: &str, end: u64, limit: Duration) -> Result<Drain> {
    let url = format!("ws://127.0.0.1:{port}/v1/lr/stream?slotName={slot}");
    let cpu0 = Snapshot::take(Some(pid));
    let mut cmd = tokio::process::Command::new(PYTHON);
    cmd.arg("bench/drain.py").arg(&url).arg(format_lsn(end)).kill_on_drop(true);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| format!("python drain of {slot}: timed out after {limit:?}"))??;
    let (client_secs, tool_secs) = Snapshot::take(Some(pid)).since(&cpu0);
    if !out.status.success() {
        return Err(format!("python drain of {slot}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Drain {
        tool: Tool::ServerPython,
        slot: slot.into(),
        order: 0,
        changes: num("changes"),
        transactions: num("transactions"),
        bytes: num("bytes"),
        secs: v["secs"].as_f64().unwrap_or(f64::NAN),
        // The Python client's own CPU is not measured (client_secs is the bench's).
        cpu: Some(CpuUse { walsender_secs: 0.0, tool_secs, client_secs }),
    })
}

/// When a websocket drain stops.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// At the first message whose nextlsn reaches this LSN; later messages are not counted.
    Lsn(u64),
    /// Once this many changes arrived (a session filtered to the workload's table never
    /// sees the marker past the workload, so its drain stops on the count); only
    /// transactions with changes are counted.
    Changes(u64),
}

/// What a websocket client received before it stopped.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub changes: u64,
    pub transactions: u64,
    /// Message bytes (wal2json output) of the counted messages.
    pub bytes: u64,
    /// When the last counted message arrived.
    pub finished: Instant,
}

/// A drained websocket, still open (its slot still streaming) until [`Open::close`].
pub struct Open {
    stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    >,
    ack_tx: mpsc::UnboundedSender<u64>,
    acker: tokio::task::JoinHandle<std::result::Result<(), tokio_tungstenite::tungstenite::Error>>,
}

impl Open {
    /// Lets the acks and the close go out, then reads until the server closes.
    pub async fn close(self) {
        let Open { mut stream, ack_tx, acker } = self;
        drop(ack_tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async { while stream.next().await.is_some() {} }).await;
    }
}

/// Opens the websocket at `url` and reads it until `until`, acking every nextlsn it
/// receives (from its own task, several per flush when they arrive in a burst, so that
/// a slow socket write never delays reading). `label` names the drain in errors.
pub async fn receive(url: &str, label: &str, until: Until, deadline: tokio::time::Instant) -> Result<(Received, Open)> {
    let finder = memmem::Finder::new(CHANGE_MARK);
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true);
    let (ws, _) = tokio::time::timeout_at(deadline, connect)
        .await
        .map_err(|_| format!("websocket {url}: no answer in time"))?
        .map_err(|e| format!("websocket {url}: {e}"))?;
    let (sink, mut stream) = ws.split();
    let (ack_tx, acker) = spawn_acker(sink);
    let (mut changes, mut transactions, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(format!("drain of {label}: timed out ({changes} changes so far)").into()),
            Ok(None) => return Err(format!("drain of {label}: the socket ended").into()),
            Ok(Some(Err(e))) => return Err(format!("drain of {label}: {e}").into()),
            Ok(Some(Ok(m))) => m,
        };
        let data: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(c) => return Err(format!("drain of {label}: closed by the server: {c:?}").into()),
            _ => continue,
        };
        if data.starts_with(b"{\"error\"") {
            return Err(format!("drain of {label}: {}", String::from_utf8_lossy(data)).into());
        }
        let Some(lsn) = message_nextlsn(data) else { continue };
        let _ = ack_tx.send(lsn);
        let n = finder.find_iter(data).count() as u64;
        let counted = match until {
            Until::Lsn(end) => lsn <= end,
            // Transactions of other tables come filtered to `"change":[]`: creating the
            // later sessions wrote some, which only the earlier sessions' slots see.
            Until::Changes(_) => n > 0,
        };
        if counted {
            transactions += 1;
            bytes += data.len() as u64;
            changes += n;
        }
        let done = match until {
            Until::Lsn(end) => lsn >= end,
            Until::Changes(n) => changes >= n,
        };
        if done {
            let got = Received { changes, transactions, bytes, finished: Instant::now() };
            return Ok((got, Open { stream, ack_tx, acker }));
        }
    }
}

/// `pg_recvlogical --start` on `slot` with `tool`'s options, until `end` (`--endpos`),
/// writing to a file in `scratch` (tmpfs) that is counted afterwards. The clock runs from
/// spawning the process to its exit. pgoutput's binary output cannot be counted by
/// pattern: its drain reports the workload's `expected` changes (it ran to `end`, past
/// all of them) and its bytes.
#[allow(clippy::too_many_arguments)]
pub async fn with_pg_recvlogical(
    tool: Tool,
    expected: (u64, u64),
    cluster: &Cluster,
    db: &str,
    slot: &str,
    end: u64,
    scratch: &Path,
    limit: Duration,
) -> Result<Drain> {
    let out = scratch.join(format!("{db}-{slot}.out"));
    let _ = std::fs::remove_file(&out);
    let mut cmd = cluster.tool("pg_recvlogical");
    cmd.args(["-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "-d", db, "-S", slot])
        .args(["--start", "--no-loop", "-F", "0"])
        .arg(format!("--endpos={}", format_lsn(end)))
        .arg("-f")
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for o in tool.options() {
        cmd.args(["-o", &o]);
    }
    die_with_parent_tokio(&mut cmd);
    let cpu0 = Snapshot::take(None);
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("pg_recvlogical: {e}"))?;
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .map_err(|_| format!("pg_recvlogical on {slot}: timed out after {limit:?}"))??;
    let secs = t0.elapsed().as_secs_f64();
    let (client_secs, tool_secs) = Snapshot::take(None).since(&cpu0);
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err).await;
        }
        return Err(format!("pg_recvlogical on {slot} failed ({status}): {err}").into());
    }
    let mut counted = count_file(&out, end)?;
    let _ = std::fs::remove_file(&out);
    if tool == Tool::PgRecvlogicalPgoutput {
        (counted.changes, counted.transactions) = expected;
    }
    Ok(Drain {
        tool,
        slot: slot.into(),
        order: 0,
        changes: counted.changes,
        transactions: counted.transactions,
        bytes: counted.bytes - counted.lines,
        secs,
        cpu: Some(CpuUse { walsender_secs: 0.0, tool_secs, client_secs }),
    })
}

struct Counted {
    changes: u64,
    transactions: u64,
    bytes: u64,
    lines: u64,
}

/// Counts pg_recvlogical's output up to `end`: one line per plugin record (wal2json
/// escapes newlines inside strings, so every `\n` is pg_recvlogical's). A transaction
/// counts when its `nextlsn` is at most `end`: `--endpos` may let the marker past it
/// through (wal2json's one-message-per-transaction output does). Records of a
/// transaction follow the one with its `nextlsn` (write-in-chunks), or are that record.
fn count_file(path: &Path, end: u64) -> Result<Counted> {
    use std::io::BufRead;
    let mut f = std::io::BufReader::with_capacity(8 << 20, std::fs::File::open(path)?);
    let change = memmem::Finder::new(CHANGE_MARK);
    let mut c = Counted { changes: 0, transactions: 0, bytes: 0, lines: 0 };
    let mut line = Vec::new();
    let mut counting = true;
    loop {
        line.clear();
        if f.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if let Some(lsn) = message_nextlsn(&line) {
            counting = lsn <= end;
            c.transactions += u64::from(counting);
        }
        if counting {
            c.bytes += line.len() as u64;
            c.lines += u64::from(line.ends_with(b"\n"));
            c.changes += change.find_iter(&line).count() as u64;
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("1/2A"), Some((1 << 32) | 0x2a));
        assert_eq!(format_lsn((1 << 32) | 0x2a), "1/2A");
        assert_eq!(message_nextlsn(br#"{"nextlsn":"0/170FCB0","change":[]}"#), Some(0x170FCB0));
        assert_eq!(message_nextlsn(br#"{"change":[]}"#), None);
    }

    #[test]
    fn counting_stops_at_end() {
        let dir = std::env::temp_dir().join(format!("bench-count-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let mut text = String::new();
        for i in 0..300_000 {
            text.push_str(&format!("{{\"nextlsn\":\"0/{i:X}\",\"change\":[\n{{\"kind\":\"insert\",\"x\":{i}}}\n]}}\n"));
        }
        let past = "{\"nextlsn\":\"1/0\",\"change\":[{\"kind\":\"insert\",\"x\":0}]}\n";
        std::fs::write(&path, format!("{text}{past}")).unwrap();
        let c = count_file(&path, 300_000).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((c.changes, c.transactions, c.lines, c.bytes), (300_000, 300_000, 900_000, text.len() as u64));
    }
}
