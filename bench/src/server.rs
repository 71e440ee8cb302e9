//! One pgdeltastream process per workload, its HTTP API, and its memory.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Result;
use crate::cluster::{Cluster, die_with_parent_tokio, free_port};

pub struct Server {
    pub port: u16,
    pub pid: u32,
    child: tokio::process::Child,
    /// Highest VmRSS seen by the sampler, in KiB.
    pub max_sampled_rss_kib: Arc<AtomicU64>,
    sampler: tokio::task::JoinHandle<()>,
    log: std::path::PathBuf,
}

/// Our binary against database `dbname` of `cluster`, logging to `log`, with none of the
/// caller's Postgres or listen variables; dies with the bench. Arguments may follow.
pub fn command(binary: &Path, cluster: &Cluster, dbname: &str, log: fs::File) -> Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(["--dbname", dbname, "--pghost", "127.0.0.1", "--pguser", "postgres"])
        .args(["--pgport", &cluster.port.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    for var in ["DBNAME", "PGUSER", "PGPASS", "PGPASSWORD", "PGHOST", "PGPORT", "SERVERHOST", "SERVERPORT"] {
        cmd.env_remove(var);
    }
    die_with_parent_tokio(&mut cmd);
    Ok(cmd)
}

impl Server {
    /// Starts the server binary against database `dbname` and waits until it listens.
    pub async fn start(binary: &Path, cluster: &Cluster, dbname: &str, logdir: &Path) -> Result<Server> {
        let port = free_port()?;
        let log = logdir.join(format!("server-{dbname}.log"));
        let logfile = fs::File::create(&log)?;
        let mut cmd = command(binary, cluster, dbname, logfile)?;
        cmd.args(["--serverhost", "127.0.0.1", "--serverport", &port.to_string()]);
        let mut child = cmd.spawn().map_err(|e| format!("start {}: {e}", binary.display()))?;
        let pid = child.id().ok_or("server exited at once")?;
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            if let Some(status) = child.try_wait()? {
                return Err(
                    format!("server exited ({status}): {}", fs::read_to_string(&log).unwrap_or_default()).into()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("server did not listen within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let max_sampled_rss_kib = Arc::new(AtomicU64::new(0));
        let max2 = max_sampled_rss_kib.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                match status_kib(pid, "VmRSS:") {
                    Some(kib) => {
                        max2.fetch_max(kib, Ordering::Relaxed);
                    }
                    None => return,
                }
            }
        });
        Ok(Server { port, pid, child, max_sampled_rss_kib, sampler, log })
    }

    /// Peak resident set size of the process so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_kib(self.pid, "VmHWM:")
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http(self.port, "GET", path, None).await
    }

    pub async fn post(&self, path: &str, json: &str) -> Result<(u16, String)> {
        http(self.port, "POST", path, Some(json)).await
    }

    pub async fn delete(&self, path: &str) -> Result<(u16, String)> {
        http(self.port, "DELETE", path, None).await
    }

    /// `POST /v2/sessions` with `tables` (every action): the new session's slot name.
    pub async fn create_session(&self, name: &str, tables: &[&str]) -> Result<String> {
        let body = serde_json::json!({ "name": name, "tables": tables }).to_string();
        let (status, reply) = http(self.port, "POST", "/v2/sessions", Some(&body)).await?;
        if status != 201 {
            return Err(format!("POST /v2/sessions {body} answered {status}: {reply}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&reply)?;
        Ok(v["slotName"].as_str().ok_or("POST /v2/sessions: no slotName")?.to_string())
    }

    /// `/v1/init`: the new slot's name.
    pub async fn init(&self) -> Result<String> {
        let (status, body) = self.get("/v1/init").await?;
        if status != 200 {
            return Err(format!("/v1/init answered {status}: {body}").into());
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["slotName"].as_str().ok_or("/v1/init: no slotName")?.to_string())
    }

    /// SIGTERM, then wait (SIGKILL after 10 s). Returns an error if it had died earlier.
    pub async fn stop(mut self) -> Result<()> {
        self.sampler.abort();
        if let Some(status) = self.child.try_wait()? {
            return Err(format!("the server had exited ({status}); log: {}", self.log.display()).into());
        }
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        Ok(())
    }
}

/// A field of /proc/PID/status in KiB, e.g. `VmHWM:`.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// A minimal HTTP/1.1 request (Connection: close), with a JSON body if given; returns
/// status and body.
async fn http(port: u16, method: &str, path: &str, json: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(body) = json {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await.map_err(|_| "HTTP timeout")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("malformed HTTP status")?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
