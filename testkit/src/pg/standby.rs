//! A physical standby of a local test cluster, for the tests of failover slots and of
//! logical decoding on a standby: [`start_standby`] makes one, [`Cluster::promote`]
//! promotes it.
//!
//! The standby is a copy of the primary's data directory taken with the low-level
//! backup API (`pg_backup_start`, a file copy, `pg_backup_stop` and its backup_label),
//! then started with `standby.signal` and streaming from the primary through a physical
//! slot. Not pg_basebackup: the npm builds of PostgreSQL the majors are tested on have
//! only initdb, pg_ctl and postgres. Not a copy of a cleanly shut down primary either:
//! the backup API leaves the primary running, with its clients, its postmaster's owner
//! thread and its port as they were.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{
    Backend, Cluster, LOCAL_EXIT_CLEANUP, LocalBackend, Postmaster, TMP_PREFIX, free_port, kv_quote, wait_ready,
};

/// What the standby is told besides being one.
#[derive(Debug, Clone, Default)]
pub struct StandbySetup {
    /// The physical slot on the primary it streams from (created here, reserving WAL
    /// from before the backup starts).
    pub slot: String,
    /// The database of `primary_conninfo`: the slot sync worker needs one.
    pub dbname: String,
    /// More settings, `name=value`, written into the standby's postgresql.auto.conf
    /// (e.g. `sync_replication_slots=on` on 17+).
    pub settings: Vec<String>,
}

/// Top-level entries of a data directory whose contents a base backup leaves out (the
/// directories themselves are kept, empty): the WAL comes from the primary through the
/// slot, and the rest is rebuilt or meaningless on another server. The primary's slots
/// are not the standby's.
const EMPTIED: &[&str] =
    &["pg_wal", "pg_replslot", "pg_dynshmem", "pg_notify", "pg_serial", "pg_snapshots", "pg_stat_tmp", "pg_subtrans"];
/// Files of the running primary that must not be in the copy.
const SKIPPED: &[&str] = &["postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map"];

/// Makes and starts a hot standby of `primary` (a local cluster, 15 or later) on a
/// free port of 127.0.0.1, and waits until it accepts connections. It lives, like every
/// local cluster, until the test process exits.
pub async fn start_standby(primary: &Cluster, setup: &StandbySetup) -> Cluster {
    let Backend::Local(local) = &primary.backend else { panic!("a standby needs a local primary, not Docker") };
    let admin = primary.client("postgres").await;
    admin
        .execute("SELECT pg_catalog.pg_create_physical_replication_slot($1, true)", &[&setup.slot])
        .await
        .unwrap_or_else(|e| panic!("create the physical slot {}: {e:?}", setup.slot));

    let tmpdir = std::env::temp_dir().join(format!(
        "{TMP_PREFIX}{}-standby-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
    ));
    make_dir(&tmpdir, local.run_as).unwrap_or_else(|e| panic!("create {}: {e}", tmpdir.display()));
    let datadir = tmpdir.join("data");
    // The backup's session must stay open from start to stop.
    admin
        .execute("SELECT pg_catalog.pg_backup_start('pgdeltastream standby', true)", &[])
        .await
        .unwrap_or_else(|e| panic!("pg_backup_start (PostgreSQL 15 or later): {e:?}"));
    copy_datadir(&primary.datadir, &datadir, local.run_as)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", primary.datadir.display(), datadir.display()));
    let row = admin
        .query_one("SELECT labelfile, spcmapfile FROM pg_catalog.pg_backup_stop(false)", &[])
        .await
        .unwrap_or_else(|e| panic!("pg_backup_stop: {e:?}"));
    let (label, spcmap): (String, String) = (row.get(0), row.get(1));
    let write = |name: &str, text: &str| {
        write_owned(&datadir.join(name), text.as_bytes(), local.run_as)
            .unwrap_or_else(|e| panic!("write {name} of the standby: {e}"))
    };
    write("backup_label", &label);
    if !spcmap.is_empty() {
        write("tablespace_map", &spcmap);
    }
    write("standby.signal", "");
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} dbname={} application_name={}",
        primary.port,
        kv_quote(&primary.user),
        kv_quote(&setup.dbname),
        kv_quote(&setup.slot)
    );
    let mut conf = fs::read_to_string(datadir.join("postgresql.auto.conf")).unwrap_or_default();
    let mut settings = vec![
        format!("primary_conninfo={conninfo}"),
        format!("primary_slot_name={}", setup.slot),
        "hot_standby_feedback=on".into(),
    ];
    settings.extend(setup.settings.iter().cloned());
    for setting in &settings {
        let (name, value) = setting.split_once('=').unwrap_or_else(|| panic!("setting {setting:?} is not name=value"));
        conf.push_str(&format!("{} = '{}'\n", name.trim(), value.trim().replace('\'', "''")));
    }
    write("postgresql.auto.conf", &conf);

    let backend = LocalBackend {
        run_as: local.run_as,
        tmpdir: tmpdir.clone(),
        slots: local.slots,
        postmaster: Arc::new(Mutex::new(Postmaster { pid: 0, exited: Arc::new(OnceLock::new()) })),
    };
    LOCAL_EXIT_CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).push((backend.postmaster.clone(), tmpdir.clone()));
    let logfile = tmpdir.join("postgres.log");
    let mut attempt = 0;
    let port = loop {
        attempt += 1;
        let port = free_port();
        let pm = backend.spawn_postmaster(&primary.bindir, &datadir, &logfile, port);
        let exited = pm.exited.clone();
        *backend.postmaster.lock().unwrap_or_else(|e| e.into_inner()) = pm;
        match wait_ready("127.0.0.1", port, &primary.user, None, || exited.get().copied()) {
            Ok(()) => break port,
            Err(e) => {
                let log = fs::read_to_string(&logfile).unwrap_or_default();
                if attempt < 3 && log.contains("could not bind") {
                    continue;
                }
                panic!("the standby did not start: {e}\n--- its log ({}) ---\n{log}", logfile.display());
            }
        }
    };
    Cluster {
        host: "127.0.0.1".into(),
        port,
        user: primary.user.clone(),
        password: None,
        bindir: primary.bindir.clone(),
        datadir,
        logfile: Some(logfile),
        backend: Backend::Local(backend),
        restart_lock: Mutex::new(()),
    }
}

impl Cluster {
    /// Promotes this standby (`pg_ctl promote`), waiting until it is a primary.
    pub fn promote(&self) {
        let Backend::Local(local) = &self.backend else { panic!("promote: not a local cluster") };
        let out = local
            .command(&self.bindir, "pg_ctl")
            .arg("promote")
            .arg("-D")
            .arg(&self.datadir)
            .args(["-w", "-t", "60"])
            .output()
            .expect("run pg_ctl promote");
        assert!(
            out.status.success(),
            "pg_ctl promote failed: {}{}\n--- server log ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// A connected client of database `dbname`; its connection runs on the current runtime.
    pub async fn client(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, conn) = self
            .config(dbname)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {dbname} on port {}: {e}", self.port));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}

/// Copies the data directory `from` (of a server in backup mode) to `to`, leaving out
/// what a base backup does. Files that vanish while it copies were temporary.
fn copy_datadir(from: &Path, to: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    copy_dir(from, to, run_as, true)
}

fn copy_dir(from: &Path, to: &Path, run_as: Option<(u32, u32)>, top: bool) -> io::Result<()> {
    make_dir(to, run_as)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if top && SKIPPED.contains(&name.as_ref()) {
            continue;
        }
        let target = to.join(&*name);
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if kind.is_dir() {
            if top && EMPTIED.contains(&name.as_ref()) {
                make_dir(&target, run_as)?;
                if name == "pg_wal" {
                    // As pg_basebackup leaves them (summaries: 17's WAL summarizer).
                    make_dir(&target.join("archive_status"), run_as)?;
                    make_dir(&target.join("summaries"), run_as)?;
                }
                continue;
            }
            match copy_dir(&entry.path(), &target, run_as, false) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other?,
            }
        } else if kind.is_file() {
            match fs::copy(entry.path(), &target) {
                Ok(_) => chown(&target, run_as)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn make_dir(dir: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    fs::create_dir(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    chown(dir, run_as)
}

fn write_owned(path: &Path, contents: &[u8], run_as: Option<(u32, u32)>) -> io::Result<()> {
    fs::write(path, contents)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    chown(path, run_as)
}

fn chown(path: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    match run_as {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}
