//! Where the CPU went during a drain: the walsender (decoding), the server or
//! pg_recvlogical, and the bench's own client. On 2 cores this tells a slow server from
//! a starved walsender.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuUse {
    /// The walsender that decoded the slot.
    pub walsender_secs: f64,
    /// The server process (server drains) or pg_recvlogical.
    pub tool_secs: f64,
    /// The bench process: the websocket client (server drains); next to nothing otherwise.
    pub client_secs: f64,
}

/// CPU seconds (user + system) of a live process.
pub fn process_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

fn rusage_secs(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of the bench process so far.
pub fn own_secs() -> f64 {
    rusage_secs(libc::RUSAGE_SELF)
}

/// CPU counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    own: f64,
    children: f64,
    server: Option<f64>,
}

impl Snapshot {
    pub fn take(server_pid: Option<u32>) -> Snapshot {
        Snapshot {
            own: rusage_secs(libc::RUSAGE_SELF),
            children: rusage_secs(libc::RUSAGE_CHILDREN),
            server: server_pid.and_then(process_secs),
        }
    }

    /// Own and tool CPU since `earlier`: the tool is the server when its pid was given,
    /// else the children reaped meanwhile (pg_recvlogical).
    pub fn since(&self, earlier: &Snapshot) -> (f64, f64) {
        let tool = match (self.server, earlier.server) {
            (Some(now), Some(then)) => now - then,
            _ => self.children - earlier.children,
        };
        (self.own - earlier.own, tool)
    }
}

/// Follows the walsender of one slot: finds its pid (`active_pid`) and samples its CPU
/// every 20 ms, so the figure survives the process's exit at the end of the stream.
pub struct WalsenderWatch {
    pid: Arc<AtomicU32>,
    last_centisecs: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WalsenderWatch {
    pub fn start(client: Arc<tokio_postgres::Client>, slot: String) -> WalsenderWatch {
        let pid = Arc::new(AtomicU32::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let (pid2, last2) = (pid.clone(), last.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                let p = pid2.load(Ordering::Relaxed);
                if p == 0 {
                    let row = client
                        .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
                        .await;
                    if let Ok(Some(row)) = row
                        && let Ok(Some(found)) = row.try_get::<_, Option<i32>>(0)
                    {
                        pid2.store(found as u32, Ordering::Relaxed);
                    }
                    continue;
                }
                match process_secs(p) {
                    Some(secs) => last2.store((secs * 100.0).round() as u64, Ordering::Relaxed),
                    None => return,
                }
            }
        });
        WalsenderWatch { pid, last_centisecs: last, task }
    }

    /// The walsender's CPU seconds: read now if it still runs, else the last sample.
    pub fn finish(self) -> Option<f64> {
        self.task.abort();
        let pid = self.pid.load(Ordering::Relaxed);
        if pid == 0 {
            return None;
        }
        let last = self.last_centisecs.load(Ordering::Relaxed) as f64 / 100.0;
        Some(process_secs(pid).unwrap_or(last).max(last))
    }
}

impl Drop for WalsenderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
