//! A throwaway Postgres cluster for the bench: initdb into a temp dir, `postgres` on a
//! free port of 127.0.0.1, as the `postgres` user when we are root. Killed when the bench
//! exits (drop, and PR_SET_PDEATHSIG if the bench dies). Its pieces are the test
//! harness's (`testkit::local`); its settings are the bench's own.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::local;
use tokio_postgres::NoTls;

use crate::Result;

const TMP_PREFIX: &str = "pgdeltastream-bench-";

/// The settings the cluster runs with (also written to the results).
pub const SETTINGS: &[&str] = &[
    "listen_addresses=127.0.0.1",
    "wal_level=logical",
    // sessions_50: 51 slots, 50 walsenders at once, and per session a connection that
    // holds its snapshot, next to the server's pool.
    "max_replication_slots=64",
    "max_wal_senders=64",
    "max_connections=200",
    "shared_buffers=256MB",
    // Throwaway cluster: no durability, no checkpoints or autovacuum in the middle of a
    // measurement (the bench checkpoints between workloads itself).
    "fsync=off",
    "full_page_writes=off",
    "autovacuum=off",
    "max_wal_size=32GB",
    "checkpoint_timeout=1h",
    // Logical decoding sees only flushed WAL: with synchronous_commit=off a commit would
    // reach the walsender only when the WAL writer flushes (wal_writer_delay, 200 ms).
    // With fsync=off, `on` costs a write(2) per commit and no fsync.
    "synchronous_commit=on",
];

pub struct Cluster {
    pub port: u16,
    pub bindir: PathBuf,
    pub tmpdir: PathBuf,
    pub version: String,
    run_as: Option<(u32, u32)>,
    child: Child,
    keep: bool,
}

impl Cluster {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host("127.0.0.1").port(self.port).user("postgres").dbname(dbname).connect_timeout(Duration::from_secs(10));
        cfg
    }

    /// A connected client; its connection runs on the current runtime.
    pub async fn client(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) =
            self.config(dbname).connect(NoTls).await.map_err(|e| format!("connect to {dbname}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.tmpdir.join("postgres.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or(&log).to_string()
    }

    /// Start `postgres` with the bench settings and wait until it answers.
    pub fn start(bindir: &Path, keep: bool) -> Result<Cluster> {
        for name in ["initdb", "postgres", "pg_recvlogical"] {
            if !bindir.join(name).is_file() {
                return Err(format!("{} not found (set --pg-bindir)", bindir.join(name).display()).into());
            }
        }
        remove_stale_tmpdirs();
        // SAFETY: geteuid has no preconditions.
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(
                local::postgres_user()
                    .ok_or("running as root, but there is no `postgres` user to run initdb/postgres as")?,
            )
        } else {
            None
        };
        let tmpdir = std::env::temp_dir().join(format!("{TMP_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmpdir);
        fs::create_dir_all(&tmpdir)?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&tmpdir, Some(uid), Some(gid))?;
            fs::set_permissions(&tmpdir, fs::Permissions::from_mode(0o700))?;
        }
        let datadir = tmpdir.join("data");
        let out = local::initdb(bindir, &datadir, &tmpdir, run_as)?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let version = Command::new(bindir.join("postgres"))
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let plugin_setting = local::plugin_setting(bindir);

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let log = fs::OpenOptions::new().create(true).append(true).open(tmpdir.join("postgres.log"))?;
            let mut cmd = local::command(bindir, "postgres", &tmpdir, run_as);
            cmd.arg("-D").arg(&datadir).arg("-p").arg(port.to_string()).arg("-k").arg(&tmpdir);
            for s in SETTINGS {
                cmd.arg("-c").arg(s);
            }
            // PostgreSQL 15.19+ trusts only the output plugins listed in this one.
            if let Some(setting) = plugin_setting {
                cmd.arg("-c").arg(setting);
            }
            cmd.stdout(log.try_clone()?).stderr(log);
            die_with_parent(&mut cmd);
            let child = cmd.spawn()?;
            let mut cluster = Cluster {
                port,
                bindir: bindir.to_path_buf(),
                tmpdir: tmpdir.clone(),
                version: version.clone(),
                run_as,
                child,
                keep,
            };
            match cluster.wait_ready() {
                Ok(()) => return Ok(cluster),
                Err(e) if attempt < 3 && cluster.log_tail().contains("could not bind") => {
                    eprintln!("bench: port {port} taken ({e}); retrying");
                    let _ = cluster.child.kill();
                    let _ = cluster.child.wait();
                    std::mem::forget(cluster); // keep the tmpdir for the next attempt
                }
                Err(e) => return Err(format!("Postgres did not start: {e}\n{}", cluster.log_tail()).into()),
            }
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("postgres exited ({status})").into());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Accepting TCP; a query confirms recovery is over.
                let cfg = self.config("postgres");
                let ok = tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
                    match cfg.connect(NoTls).await {
                        Ok((client, conn)) => {
                            let task = tokio::spawn(conn);
                            let ok = client.simple_query("SELECT 1").await.is_ok();
                            drop(client);
                            let _ = task.await;
                            ok
                        }
                        Err(_) => false,
                    }
                });
                if ok {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err("not ready after 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A command for a PostgreSQL client tool (pg_recvlogical), with a clean libpq
    /// environment.
    pub fn tool(&self, name: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.bin(name));
        cmd.stdin(Stdio::null());
        for var in ["PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS", "PGPASSWORD"] {
            cmd.env_remove(var);
        }
        let _ = self.run_as;
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown; nothing here needs to survive.
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep {
            eprintln!("bench: kept {}", self.tmpdir.display());
        } else {
            std::thread::sleep(Duration::from_millis(100));
            let _ = fs::remove_dir_all(&self.tmpdir);
        }
    }
}

/// PR_SET_PDEATHSIG=SIGKILL: the child dies with the thread that spawned it. Spawn long
/// lived children from the main thread only.
pub fn die_with_parent(cmd: &mut Command) {
    local::die_with_parent(cmd);
}

/// Same as [`die_with_parent`] for tokio's Command.
pub fn die_with_parent_tokio(cmd: &mut tokio::process::Command) {
    local::die_with_parent(cmd.as_std_mut());
}

pub fn free_port() -> Result<u16> {
    Ok(local::free_port()?)
}

/// Removes temp dirs of earlier bench runs whose process is gone.
fn remove_stale_tmpdirs() {
    for dir in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
        local::remove_stale_dirs(&dir, TMP_PREFIX);
    }
}

/// Where pg_recvlogical writes its output: tmpfs when there is one (a write there is a
/// memcpy), else the temp dir.
pub fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("{TMP_PREFIX}{}", std::process::id()))
}

/// Directory holding the PostgreSQL binaries: the given one, else `pg_config --bindir`
/// when it has wal2json, else the highest /usr/lib/postgresql/*/bin with wal2json.
pub fn find_bindir(given: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(d) = given {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_string_lossy().parse::<u32>().ok()?, e.path())))
        .filter(|(_, p)| p.join("lib/wal2json.so").is_file() && p.join("bin/postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p.join("bin"))
}
