//! The pieces of a throwaway local Postgres cluster, shared by the test harness
//! (`pg`) and the bench (`bench/src/cluster.rs`): each starts its cluster with settings of
//! its own, from these.
//!
//! - initdb into a temp dir ([`initdb`]), the server tools run with a clean libpq
//!   environment and, as root, as the `postgres` user ([`command`], [`postgres_user`]);
//! - a free port of 127.0.0.1 ([`free_port`]);
//! - the setting PostgreSQL 15.19+ needs to load wal2json ([`plugin_setting`]);
//! - children that die with the thread that spawned them ([`die_with_parent`]);
//! - the temp dirs of earlier runs whose process is gone ([`remove_stale_dirs`]).

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// uid/gid of the `postgres` system user.
pub fn postgres_user() -> Option<(u32, u32)> {
    let name = CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the two ints
    // out immediately. Callers start their clusters one at a time (a OnceLock, or the
    // bench's main thread).
    unsafe {
        let pw = libc::getpwnam(name.as_ptr());
        if pw.is_null() { None } else { Some(((*pw).pw_uid, (*pw).pw_gid)) }
    }
}

/// A command for PostgreSQL's `name` in `bindir`, run in `dir`, stdin closed, without the
/// caller's libpq settings, as `run_as` when given.
pub fn command(bindir: &Path, name: &str, dir: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bindir.join(name));
    cmd.current_dir(dir).stdin(Stdio::null());
    // Keep the caller's libpq settings away from the server tools.
    for var in ["PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
        cmd.env_remove(var);
    }
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs initdb for a throwaway cluster in `datadir`: trust authentication, superuser
/// `postgres`, UTF8 and the C locale, no sync. The caller checks the status.
pub fn initdb(bindir: &Path, datadir: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> io::Result<Output> {
    command(bindir, "initdb", dir, run_as)
        .arg("-D")
        .arg(datadir)
        .args(["--auth=trust", "-U", "postgres", "--encoding=UTF8", "--locale=C", "--no-sync"])
        .output()
}

/// PostgreSQL 15.19+ (and the matching minors of later majors) trusts only the output
/// plugins listed in output_plugin_libraries; older servers refuse the unknown setting,
/// so this is `Some` (the `-c` value) only where it exists.
pub fn plugin_setting(bindir: &Path) -> Option<&'static str> {
    supports_setting(bindir, "output_plugin_libraries")
        .then_some("output_plugin_libraries=pgoutput, test_decoding, wal2json")
}

/// True when this server knows the configuration parameter `name`.
pub fn supports_setting(bindir: &Path, name: &str) -> bool {
    Command::new(bindir.join("postgres"))
        .arg("--describe-config")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.split('\t').next() == Some(name)))
        .unwrap_or(false)
}

/// A free TCP port of 127.0.0.1 (someone else may take it before the caller binds it).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// PR_SET_PDEATHSIG=SIGKILL: the child dies with the *thread* that spawned it, so spawn
/// long-lived children from a thread that lives as long as they should.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            // Runs after the uid/gid switch, which would otherwise clear the setting.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("the parent process exited before the child started"));
            }
            Ok(())
        });
    }
}

/// Whether `pid` is a live process (a zombie, e.g. a killed test binary not yet reaped,
/// counts as dead).
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: `pid (comm) state ...`; comm may contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Removes the entries of `dir` named `<prefix><pid>` or `<prefix><pid>-<anything>` whose
/// process no longer exists (leftovers of runs that were killed). Best effort.
pub fn remove_stale_dirs(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
