//! The test Postgres (the integration tests name it `common`).
//!
//! Every test talks to a real PostgreSQL with `wal_level=logical` and the wal2json plugin.
//! One cluster is started lazily per test process and shared by its tests (the first
//! caller of [`cluster`] or [`fresh_db`] starts it; concurrent callers wait), and every
//! test gets its own brand-new database from [`fresh_db`].
//!
//! A test module whose tests change the cluster itself (restart it, change a setting with
//! ALTER SYSTEM, take every replication slot, need settings or files of their own) gets a
//! cluster of its own instead, started in the same way on first use: [`own_cluster`] and
//! [`fresh_db_on`] (with [`configure_own_cluster`] before it starts). Such a module
//! declares its `common` as this module with those two in place of [`cluster`] and
//! [`fresh_db`], so its tests read as before:
//!
//! ```ignore
//! mod common {
//!     pub use testkit::pg::*;
//!     pub fn cluster() -> &'static Cluster { own_cluster("lifecycle") }
//!     pub async fn fresh_db() -> TestDb { fresh_db_on(cluster()).await }
//! }
//! ```
//!
//! Where the cluster comes from:
//! - `TEST_PG=local` or unset (the default, whether or not a Docker engine runs): a throwaway local
//!   cluster (`initdb` into a temp dir, `postgres` on a free port of 127.0.0.1). Binaries come
//!   from `$PG_BINDIR`, else `pg_config --bindir` or the highest `/usr/lib/postgresql/*/bin`
//!   (preferring one with wal2json). As root, initdb and postgres run as the `postgres` user.
//!   The server is killed when the test binary exits (PR_SET_PDEATHSIG) and its temp dir
//!   (data, `postgres.log`) is removed at exit (best effort; kept, and the server log with
//!   it, when `TEST_PG_KEEP=1`), or by the next run.
//! - `TEST_PG=docker`: a container of the image built from `fixtures/Dockerfile` (Debian
//!   bookworm's PostgreSQL 15 + wal2json, on a base `scripts/docker.sh bases` imports; `make
//!   test-docker` does it all), with 5432 published on a free port of 127.0.0.1. Run through
//!   testcontainers (which honours `DOCKER_HOST`; see `docker.rs`); the container is removed
//!   at exit (best effort; kept, stopped, when `TEST_PG_KEEP=1`; a killed run's leftovers by
//!   the next run).
//!
//! A cluster of its own may have extra settings, pg_hba.conf lines and files in the data
//! directory ([`configure_own_cluster`], before the cluster starts).
//!
//! Restarting a cluster ([`Cluster::restart_immediate`], or [`Cluster::stop_immediate`]
//! then [`Cluster::start`]) disconnects every client of it, so tests that restart use a
//! cluster of their own.

use std::{
    collections::BTreeMap,
    fs, io,
    os::unix::fs::PermissionsExt,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    sync::{
        Arc, Mutex, Once, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio_postgres::NoTls;

use crate::local::{self, process_alive};

mod docker;
use docker::{DockerBackend, start_docker};
mod standby;
pub use standby::{StandbySetup, start_standby};

/// Prefix of the temp dirs of local clusters; followed by `<pid>-<nanos>-<n>`.
const TMP_PREFIX: &str = "pgdeltastream-test-pg-";
/// max_replication_slots of the shared cluster: its tests leave their slots behind (each
/// test's database is its own), and all of the process's tests share it.
const SHARED_SLOTS: u32 = 1024;
/// max_replication_slots of a cluster of its own, as every test binary's cluster had
/// when each had one: tests count on it (v2 takes 50 of the 64, watch reserves 64).
const OWN_SLOTS: u32 = 64;
/// How long a starting or restarting server may take before we give up.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

/// A freshly created, empty database on the shared cluster.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
}

impl TestDb {
    /// A `tokio_postgres::Config` for this database (no replication mode).
    pub fn config(&self) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .connect_timeout(Duration::from_secs(10));
        if let Some(pw) = &self.password {
            cfg.password(pw);
        }
        cfg
    }

    /// A connected client; its connection task runs on the current runtime.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = self
            .config()
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to test database {}: {e}", self.conn_string()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("test db connection ended: {e}");
            }
        });
        client
    }

    /// libpq key/value connection string, e.g. `host=127.0.0.1 port=5432 user=postgres dbname=x`.
    pub fn conn_string(&self) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            kv_quote(&self.host),
            self.port,
            kv_quote(&self.user),
            kv_quote(&self.dbname)
        );
        if let Some(pw) = &self.password {
            s.push_str(&format!(" password={}", kv_quote(pw)));
        }
        s
    }
}

/// Creates a brand-new empty database (unique name) on the shared cluster.
pub async fn fresh_db() -> TestDb {
    fresh_db_on(cluster()).await
}

/// Creates a brand-new empty database (unique in the process) on cluster `c`.
pub async fn fresh_db_on(c: &Cluster) -> TestDb {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dbname = format!("test_{}_{n}", std::process::id());
    let admin = TestDb {
        host: c.host.clone(),
        port: c.port,
        user: c.user.clone(),
        password: c.password.clone(),
        dbname: "postgres".into(),
    };
    let client = admin.client().await;
    client
        .batch_execute(&format!("CREATE DATABASE \"{dbname}\""))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {dbname}: {e:?}"));
    TestDb { dbname, ..admin }
}

/// The shared cluster of this test process, started on first use (from sync or async
/// code). If starting fails, every caller panics with the first failure's message (no
/// retries).
pub fn cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    started(&SHARED, None, SHARED_SLOTS, "the test Postgres cluster")
}

/// The cluster of its own of the tests that call it `name` (a test module, by
/// convention), started on first use like [`cluster`], with what
/// [`configure_own_cluster`] gave it.
pub fn own_cluster(name: &'static str) -> &'static Cluster {
    let own = own(name);
    started(&own.cluster, own.setup.get(), OWN_SLOTS, &format!("the test Postgres cluster {name:?}"))
}

/// Configures the cluster of its own `name`: call it before the first [`own_cluster`] of
/// `name`. Such a cluster is always a local one, whatever `TEST_PG` says.
pub fn configure_own_cluster(name: &'static str, setup: ClusterSetup) {
    let own = own(name);
    assert!(own.cluster.get().is_none(), "configure_own_cluster({name:?}) after the cluster started");
    if let Err(setup) = own.setup.set(setup) {
        let first = own.setup.get().map(|s| format!("{s:?}"));
        assert_eq!(Some(format!("{setup:?}")), first, "configure_own_cluster({name:?}) twice, differently");
    }
}

/// A cluster of its own: its setup, and the cluster once started.
#[derive(Default)]
struct Own {
    setup: OnceLock<ClusterSetup>,
    cluster: OnceLock<Result<Cluster, String>>,
}

fn own(name: &'static str) -> &'static Own {
    static OWN: Mutex<BTreeMap<&'static str, &'static Own>> = Mutex::new(BTreeMap::new());
    let mut own = OWN.lock().unwrap_or_else(|e| e.into_inner());
    own.entry(name).or_insert_with(|| &*Box::leak(Box::<Own>::default()))
}

fn started(
    cell: &'static OnceLock<Result<Cluster, String>>,
    setup: Option<&ClusterSetup>,
    slots: u32,
    what: &str,
) -> &'static Cluster {
    let started = cell.get_or_init(|| {
        std::panic::catch_unwind(AssertUnwindSafe(|| start_cluster(setup, slots))).map_err(|payload| {
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())
        })
    });
    match started {
        Ok(c) => c,
        Err(msg) => panic!("{what} failed to start: {msg}"),
    }
}

/// What [`configure_own_cluster`] adds to a cluster of its own.
#[derive(Debug, Clone, Default)]
pub struct ClusterSetup {
    /// postgresql.conf settings, `name=value` (in the file, not on the command line, so
    /// that a test may change them with ALTER SYSTEM and a reload).
    pub settings: Vec<String>,
    /// pg_hba.conf lines that replace initdb's. The harness keeps `local all all trust`
    /// for itself, and then reaches the cluster through its Unix socket:
    /// [`Cluster::host`] (and so every [`TestDb`]) names the socket directory, and TCP
    /// stays on `127.0.0.1:`[`Cluster::port`] for the lines given here.
    pub hba: Vec<String>,
    /// Files written into the data directory before the server starts, owned by the
    /// server's user and readable by it only (0600): certificates and keys, say.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The PostgreSQL server the tests use.
pub struct Cluster {
    pub host: String,
    pub port: u16,
    /// Superuser name.
    pub user: String,
    pub password: Option<String>,
    /// Directory of the PostgreSQL client/server binaries on this machine (may be empty on
    /// the Docker path when no local installation exists).
    pub bindir: PathBuf,
    /// Data directory (on the Docker path: the path inside the container).
    pub datadir: PathBuf,
    /// Server log file (local path only).
    pub logfile: Option<PathBuf>,
    backend: Backend,
    restart_lock: Mutex<()>,
}

impl Cluster {
    /// Path of a PostgreSQL binary, e.g. `cluster().bin("pg_recvlogical")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        let p = self.bindir.join(name);
        assert!(p.is_file(), "PostgreSQL binary {} not found (bindir {:?}; set PG_BINDIR)", name, self.bindir);
        p
    }

    /// Crash-like restart: `pg_ctl stop -m immediate`, then start again on the same port
    /// and wait until it accepts connections. Every existing connection is lost.
    pub fn restart_immediate(&self) {
        let _guard = self.restart_lock.lock().unwrap_or_else(|e| e.into_inner());
        match &self.backend {
            Backend::Local(local) => local.restart_immediate(self),
            Backend::Docker(docker) => {
                docker
                    .stop_immediate()
                    .and_then(|()| docker.start())
                    .unwrap_or_else(|e| panic!("restarting the Postgres container: {e}"));
                self.wait_docker_ready(docker);
            }
        }
    }

    /// The first half of [`Cluster::restart_immediate`]: a crash-like stop (`pg_ctl stop -m
    /// immediate`; on the Docker path a SIGKILL of the container). Postgres stays down until
    /// [`Cluster::start`]. Every existing connection is lost.
    pub fn stop_immediate(&self) {
        let _guard = self.restart_lock.lock().unwrap_or_else(|e| e.into_inner());
        match &self.backend {
            Backend::Local(local) => local.stop_immediate(self),
            Backend::Docker(docker) => {
                docker.stop_immediate().unwrap_or_else(|e| panic!("stopping the Postgres container: {e}"))
            }
        }
    }

    /// Starts the cluster again after [`Cluster::stop_immediate`], on the same port, and
    /// waits until it accepts connections.
    pub fn start(&self) {
        let _guard = self.restart_lock.lock().unwrap_or_else(|e| e.into_inner());
        match &self.backend {
            Backend::Local(local) => local.start(self),
            Backend::Docker(docker) => {
                docker.start().unwrap_or_else(|e| panic!("starting the Postgres container: {e}"));
                self.wait_docker_ready(docker);
            }
        }
    }

    /// A `tokio_postgres::Config` for database `dbname` of this cluster.
    pub fn config(&self, dbname: &str) -> tokio_postgres::Config {
        TestDb {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            password: self.password.clone(),
            dbname: dbname.into(),
        }
        .config()
    }

    /// The server log so far (on the Docker path: the container's `docker logs`).
    pub fn log(&self) -> String {
        match &self.backend {
            Backend::Local(_) => self.logfile.as_deref().and_then(|p| fs::read_to_string(p).ok()).unwrap_or_default(),
            Backend::Docker(docker) => docker.logs(),
        }
    }

    /// True on the Docker path (`TEST_PG=docker`): the server's files and binaries are not
    /// this machine's.
    pub fn is_docker(&self) -> bool {
        matches!(self.backend, Backend::Docker(_))
    }

    fn wait_docker_ready(&self, docker: &DockerBackend) {
        wait_ready(&self.host, self.port, &self.user, self.password.as_deref(), || None).unwrap_or_else(|e| {
            panic!("Postgres container did not come back: {e}\n--- docker logs ---\n{}", docker.logs())
        });
    }
}

// ---------------------------------------------------------------------------------------
// Choosing a backend
// ---------------------------------------------------------------------------------------

enum Backend {
    Local(LocalBackend),
    Docker(DockerBackend),
}

/// The local cluster unless `TEST_PG=docker`: a Docker engine that happens to answer (CI
/// starts one for `make test-docker`) must not change what `make test` runs against. A
/// cluster with a setup of its own is always local.
fn start_cluster(setup: Option<&ClusterSetup>, slots: u32) -> Cluster {
    if setup.is_some() {
        return start_local(setup, slots);
    }
    match std::env::var("TEST_PG").ok().as_deref() {
        Some("docker") => start_docker(slots).unwrap_or_else(|e| panic!("TEST_PG=docker: starting Postgres: {e}")),
        None | Some("local") | Some("") => start_local(None, slots),
        Some(other) => panic!("TEST_PG={other:?}: expected `local` or `docker`"),
    }
}

// ---------------------------------------------------------------------------------------
// Local cluster
// ---------------------------------------------------------------------------------------

struct LocalBackend {
    /// (uid, gid) to run initdb/postgres/pg_ctl as (the `postgres` user when we are root).
    run_as: Option<(u32, u32)>,
    tmpdir: PathBuf,
    /// max_replication_slots.
    slots: u32,
    /// Shared with the exit cleanup, which kills the current postmaster.
    postmaster: Arc<Mutex<Postmaster>>,
}

struct Postmaster {
    pid: u32,
    /// Set by the owner thread once the process has exited.
    exited: Arc<OnceLock<ExitStatus>>,
}

/// Directory holding `initdb`, `postgres`, `pg_ctl`: `$PG_BINDIR` if set; else, among
/// `pg_config --bindir` and `/usr/lib/postgresql/*/bin` (highest version first), the first
/// one whose installation has wal2json, or failing that the first one at all.
fn find_bindir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let has_server = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    let mut candidates: Vec<(PathBuf, bool)> = Vec::new();
    let pg_config = |arg: &str| {
        Command::new("pg_config")
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    };
    if let Some(d) = pg_config("--bindir").filter(|d| has_server(d)) {
        let wal2json = pg_config("--pkglibdir").is_some_and(|l| l.join("wal2json.so").is_file());
        candidates.push((d, wal2json));
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name.split('.').map(str::parse::<u32>).collect::<Result<Vec<_>, _>>().ok()?;
            Some((version, entry.path()))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, dir) in versions {
        let bin = dir.join("bin");
        if has_server(&bin) {
            let wal2json = dir.join("lib/wal2json.so").is_file();
            candidates.push((bin, wal2json));
        }
    }
    candidates.iter().find(|(_, wal2json)| *wal2json).or(candidates.first()).map(|(d, _)| d.clone())
}

fn free_port() -> u16 {
    local::free_port().expect("pick a free TCP port on 127.0.0.1")
}

impl LocalBackend {
    fn command(&self, bindir: &Path, name: &str) -> Command {
        local::command(bindir, name, &self.tmpdir, self.run_as)
    }

    fn spawn_postmaster(&self, cluster_bindir: &Path, datadir: &Path, logfile: &Path, port: u16) -> Postmaster {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logfile)
            .unwrap_or_else(|e| panic!("open {}: {e}", logfile.display()));
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = self.command(cluster_bindir, "postgres");
        cmd.arg("-D").arg(datadir).arg("-p").arg(port.to_string()).arg("-k").arg(&self.tmpdir);
        cmd.arg("-c").arg(format!("max_replication_slots={}", self.slots));
        for setting in [
            "listen_addresses=127.0.0.1",
            "wal_level=logical",
            "max_wal_senders=64",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "shared_buffers=128MB",
        ] {
            cmd.arg("-c").arg(setting);
        }
        if let Some(setting) = local::plugin_setting(cluster_bindir) {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdout(log).stderr(log2);
        let (pid, exited) =
            spawn_owned(cmd).unwrap_or_else(|e| panic!("spawn {}: {e}", cluster_bindir.join("postgres").display()));
        Postmaster { pid, exited }
    }

    fn restart_immediate(&self, c: &Cluster) {
        self.stop_immediate(c);
        self.start(c);
    }

    fn stop_immediate(&self, c: &Cluster) {
        let out = self
            .command(&c.bindir, "pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&c.datadir)
            .args(["-m", "immediate", "-w", "-t", "60"])
            .output()
            .expect("run pg_ctl stop");
        assert!(
            out.status.success(),
            "pg_ctl stop -m immediate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let pm = self.postmaster.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + Duration::from_secs(30);
        while pm.exited.get().is_none() {
            assert!(Instant::now() < deadline, "postmaster (pid {}) did not exit after pg_ctl stop", pm.pid);
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn start(&self, c: &Cluster) {
        let mut pm = self.postmaster.lock().unwrap_or_else(|e| e.into_inner());
        assert!(pm.exited.get().is_some(), "Postgres (pid {}) is still running: stop it first", pm.pid);
        let logfile = c.logfile.as_deref().expect("local cluster has a log file");
        *pm = self.spawn_postmaster(&c.bindir, &c.datadir, logfile, c.port);
        let exited = pm.exited.clone();
        drop(pm);
        wait_ready(&c.host, c.port, &c.user, None, || exited.get().copied()).unwrap_or_else(|e| {
            panic!(
                "Postgres did not come back after restart: {e}\n--- server log ({}) ---\n{}",
                logfile.display(),
                c.log()
            )
        });
    }
}

/// Spawns `cmd` from a dedicated thread that then waits for it. The child gets
/// PR_SET_PDEATHSIG=SIGKILL, which fires when the spawning *thread* exits: this thread
/// lives as long as the child, i.e. until the test process ends (or the server stops).
fn spawn_owned(mut cmd: Command) -> io::Result<(u32, Arc<OnceLock<ExitStatus>>)> {
    let exited = Arc::new(OnceLock::new());
    let exited2 = exited.clone();
    local::die_with_parent(&mut cmd);
    let (tx, rx) = mpsc::channel();
    thread::Builder::new().name("test-postgres-owner".into()).spawn(move || match cmd.spawn() {
        Ok(mut child) => {
            let _ = tx.send(Ok(child.id()));
            if let Ok(status) = child.wait() {
                let _ = exited2.set(status);
            }
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    })?;
    let pid = rx.recv().map_err(|_| io::Error::other("owner thread died"))??;
    Ok((pid, exited))
}

/// What the atexit handler kills and removes, for each local cluster: its postmaster (the
/// current one, after restarts too) and its temp dir (statics are never dropped).
static LOCAL_EXIT_CLEANUP: Mutex<Vec<(Arc<Mutex<Postmaster>>, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn local_exit_cleanup() {
    let clusters = LOCAL_EXIT_CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    for (postmaster, _) in clusters.iter() {
        if let Some(pid) = postmaster.try_lock().map(|pm| pm.pid).ok().filter(|p| *p != 0) {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    if std::env::var_os("TEST_PG_KEEP").is_some_and(|v| !v.is_empty()) {
        for (_, tmpdir) in clusters.iter() {
            eprintln!("TEST_PG_KEEP: kept {}", tmpdir.display());
        }
        return;
    }
    // Backends notice the postmaster's death within moments; removal is best effort
    // (a leftover is removed by the next run's remove_stale_dirs).
    thread::sleep(Duration::from_millis(100));
    for (_, tmpdir) in clusters.iter() {
        let _ = fs::remove_dir_all(tmpdir);
    }
}

fn start_local(setup: Option<&ClusterSetup>, slots: u32) -> Cluster {
    let bindir = find_bindir().unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries found (tried $PG_BINDIR, `pg_config --bindir`, \
             /usr/lib/postgresql/*/bin). Run `make setup` (installs postgresql-15 and \
             postgresql-15-wal2json), or set TEST_PG=docker with a Docker engine."
        )
    });
    // Looked up once: getpwnam's storage is static, and clusters may start at once.
    static RUN_AS: OnceLock<Option<Option<(u32, u32)>>> = OnceLock::new();
    // SAFETY: geteuid has no preconditions.
    let run_as = *RUN_AS.get_or_init(|| (unsafe { libc::geteuid() } == 0).then(local::postgres_user));
    let run_as = run_as.map(|user| {
        user.unwrap_or_else(|| {
            panic!(
                "running as root, but there is no `postgres` system user to run initdb/postgres \
                 as (install the postgresql package, or run the tests as a normal user)"
            )
        })
    });

    local::remove_stale_dirs(&std::env::temp_dir(), TMP_PREFIX);
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let tmpdir = std::env::temp_dir().join(format!("{TMP_PREFIX}{}-{nanos}-{n}", std::process::id()));
    fs::create_dir_all(&tmpdir).unwrap_or_else(|e| panic!("create {}: {e}", tmpdir.display()));
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&tmpdir, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", tmpdir.display()));
        fs::set_permissions(&tmpdir, fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", tmpdir.display()));
    }
    let datadir = tmpdir.join("data");
    let logfile = tmpdir.join("postgres.log");

    let backend = LocalBackend {
        run_as,
        tmpdir: tmpdir.clone(),
        slots,
        postmaster: Arc::new(Mutex::new(Postmaster { pid: 0, exited: Arc::new(OnceLock::new()) })),
    };

    let out = local::initdb(&bindir, &datadir, &tmpdir, run_as)
        .unwrap_or_else(|e| panic!("run {}: {e}", bindir.join("initdb").display()));
    if !out.status.success() {
        panic!(
            "initdb failed ({}) in {}{}:\n{}{}",
            out.status,
            datadir.display(),
            if run_as.is_some() { " as user postgres (is the temp dir reachable for it? set TMPDIR)" } else { "" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    if let Some(setup) = setup {
        apply_setup(setup, &datadir, run_as);
    }
    // With pg_hba lines of the test's, the harness goes through the Unix socket.
    let host = match setup {
        Some(s) if !s.hba.is_empty() => tmpdir.to_str().expect("temp dir path is UTF-8").to_owned(),
        _ => "127.0.0.1".to_owned(),
    };

    static EXIT_HANDLER: Once = Once::new();
    // SAFETY: registering a plain extern "C" fn.
    EXIT_HANDLER.call_once(|| unsafe {
        libc::atexit(local_exit_cleanup);
    });
    LOCAL_EXIT_CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).push((backend.postmaster.clone(), tmpdir.clone()));

    // The free port can be taken by someone else before postgres binds it: retry then.
    let mut attempt = 0;
    let port = loop {
        attempt += 1;
        let port = free_port();
        let log_len = fs::metadata(&logfile).map(|m| m.len()).unwrap_or(0) as usize;
        let pm = backend.spawn_postmaster(&bindir, &datadir, &logfile, port);
        let exited = pm.exited.clone();
        *backend.postmaster.lock().unwrap() = pm;
        match wait_ready(&host, port, "postgres", None, || exited.get().copied()) {
            Ok(()) => break port,
            Err(e) => {
                let log = fs::read_to_string(&logfile).unwrap_or_default();
                let this_run = log.get(log_len..).unwrap_or(&log);
                if attempt < 3 && this_run.contains("could not bind") {
                    continue;
                }
                panic!(
                    "local Postgres ({}) did not start: {e}\n--- server log ({}) ---\n{log}",
                    bindir.display(),
                    logfile.display(),
                );
            }
        }
    };

    Cluster {
        host,
        port,
        user: "postgres".into(),
        password: None,
        bindir,
        datadir,
        logfile: Some(logfile),
        backend: Backend::Local(backend),
        restart_lock: Mutex::new(()),
    }
}

/// Writes the files and pg_hba.conf of a [`ClusterSetup`] into a fresh data directory.
fn apply_setup(setup: &ClusterSetup, datadir: &Path, run_as: Option<(u32, u32)>) {
    let write = |name: &str, contents: &[u8], mode: u32| {
        let path = datadir.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
        }
    };
    for (name, contents) in &setup.files {
        write(name, contents, 0o600);
    }
    if !setup.settings.is_empty() {
        let conf = datadir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).unwrap_or_else(|e| panic!("read {}: {e}", conf.display()));
        for setting in &setup.settings {
            let (name, value) =
                setting.split_once('=').unwrap_or_else(|| panic!("setting {setting:?} is not name=value"));
            text.push_str(&format!("{} = '{}'\n", name.trim(), value.trim().replace('\'', "''")));
        }
        write("postgresql.conf", text.as_bytes(), 0o600);
    }
    if !setup.hba.is_empty() {
        let hba = format!("local all all trust\nlocal replication all trust\n{}\n", setup.hba.join("\n"));
        write("pg_hba.conf", hba.as_bytes(), 0o600);
    }
}

// ---------------------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------------------

/// Runs a future to completion on a fresh current-thread runtime in a helper thread, so it
/// works from sync code and from inside another runtime alike.
fn block_on_helper<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build helper runtime")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Polls until `SELECT 1` works, the server process exits (`exited`), or READY_TIMEOUT.
fn wait_ready(
    host: &str,
    port: u16,
    user: &str,
    password: Option<&str>,
    exited: impl Fn() -> Option<ExitStatus> + Send + Sync,
) -> Result<(), String> {
    block_on_helper(async {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(host).port(port).user(user).dbname("postgres").connect_timeout(Duration::from_secs(2));
        if let Some(pw) = password {
            cfg.password(pw);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = exited() {
                return Err(format!("the server exited ({status})"));
            }
            let err = match cfg.connect(NoTls).await {
                Ok((client, conn)) => {
                    let task = tokio::spawn(conn);
                    let res = client.simple_query("SELECT 1").await;
                    drop(client);
                    let _ = task.await;
                    match res {
                        Ok(_) => return Ok(()),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("not accepting connections on {host}:{port} after {READY_TIMEOUT:?}: {err}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Quotes a libpq key/value connection string value when needed.
fn kv_quote(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}
