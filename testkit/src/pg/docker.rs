//! The Docker backend of the harness (`TEST_PG=docker`): the fixtures image run through
//! testcontainers.
//!
//! testcontainers' bollard 0.20.2 sends its requests without an API version, so Debian
//! bookworm's docker.io 20.10 (API 1.41) answers them as 1.41 (see the pins in
//! Cargo.toml). The image is built with the `docker` CLI, as `scripts/docker.sh` builds it:
//! that engine's classic builder needs nothing more.

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, MutexGuard, Once, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use bollard::{
    Docker,
    query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder},
};
use testcontainers_modules::testcontainers::{
    ContainerAsync, GenericImage, ImageExt,
    core::{IntoContainerPort, WaitFor},
    runners::AsyncRunner,
};

use super::{Backend, Cluster, READY_TIMEOUT, find_bindir, free_port, process_alive, wait_ready};

/// The image built from fixtures/ (see fixtures/Dockerfile; `scripts/docker.sh
/// fixtures-image` builds the same).
const IMAGE_NAME: &str = "pgdeltastream-test-postgres";
const IMAGE_TAG: &str = "15-wal2json";
/// Every container of ours carries the pid of the test binary that made it, so that a
/// later run can remove those of a binary killed before its exit cleanup.
const PID_LABEL: &str = "pgdeltastream.test-pid";
/// And which start of a cluster in that process made it (a process may run several).
const START_LABEL: &str = "pgdeltastream.test-start";
const PASSWORD: &str = "postgres";

type Container = Arc<Mutex<Option<Box<ContainerAsync<GenericImage>>>>>;

pub(super) struct DockerBackend {
    id: String,
    /// Taken by the exit cleanup, which removes (or, with TEST_PG_KEEP, keeps) it.
    container: Container,
}

impl DockerBackend {
    /// SIGKILL at once, like a crash.
    pub(super) fn stop_immediate(&self) -> Result<(), String> {
        let guard = self.lock();
        block_on(self.present(&guard)?.stop_with_timeout(Some(0))).map_err(|e| e.to_string())
    }

    /// Starts the stopped container again, on the same host port (mapped explicitly).
    /// Unlike the first start, this does not wait for readiness: the caller polls.
    pub(super) fn start(&self) -> Result<(), String> {
        let guard = self.lock();
        block_on(self.present(&guard)?.start()).map_err(|e| e.to_string())
    }

    /// The container's output so far, stdout then stderr (Postgres logs to stderr).
    pub(super) fn logs(&self) -> String {
        let guard = self.lock();
        let logs = self.present(&guard).and_then(|c| {
            block_on(async {
                let mut out = c.stdout_to_vec().await?;
                out.extend(c.stderr_to_vec().await?);
                Ok::<_, testcontainers_modules::testcontainers::TestcontainersError>(out)
            })
            .map_err(|e| e.to_string())
        });
        match logs {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("(no logs of container {}: {e})", self.id),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<ContainerAsync<GenericImage>>>> {
        self.container.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn present<'g>(
        &self,
        guard: &'g MutexGuard<'_, Option<Box<ContainerAsync<GenericImage>>>>,
    ) -> Result<&'g ContainerAsync<GenericImage>, String> {
        guard.as_deref().ok_or_else(|| format!("container {} is gone (the test binary is exiting)", self.id))
    }
}

/// One runtime for every Docker call of this binary: bollard's connections belong to
/// the runtime that opened them, and the harness is called from many short-lived ones
/// (and from sync code, and from the exit handler).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-docker")
            .enable_all()
            .build()
            .expect("build the Docker runtime")
    })
}

/// Runs `fut` on [`runtime`] from a helper thread, so it works from inside another
/// runtime too.
fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    thread::scope(|s| s.spawn(|| runtime().block_on(fut)).join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
}

/// Builds the fixtures image once per process (layer cache: a moment when nothing
/// changed) and starts a container of it with 5432 published on a free port of 127.0.0.1.
pub(super) fn start_docker(slots: u32) -> Result<Cluster, String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT.get_or_init(build_image).clone()?;
    remove_containers(|pid, _| pid != std::process::id() && !process_alive(pid));
    // A host port chosen here and mapped explicitly, so a restart keeps it (Docker would
    // pick a new one); someone else can take it first, so retry then.
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let mut attempt = 0;
    let (container, port) = loop {
        attempt += 1;
        let port = free_port();
        let start = STARTS.fetch_add(1, Ordering::Relaxed).to_string();
        match block_on(run_container(port, &start, slots)) {
            Ok(container) => break (container, port),
            Err(e) => {
                // A container that was created but did not start is ours to remove.
                remove_containers(|pid, s| pid == std::process::id() && s == Some(start.as_str()));
                if attempt < 3 && (e.contains("already allocated") || e.contains("address already in use")) {
                    continue;
                }
                return Err(e);
            }
        }
    };
    let backend =
        DockerBackend { id: container.id().to_string(), container: Arc::new(Mutex::new(Some(Box::new(container)))) };
    static EXIT_HANDLER: Once = Once::new();
    // SAFETY: registering a plain extern "C" fn.
    EXIT_HANDLER.call_once(|| unsafe {
        libc::atexit(exit_cleanup);
    });
    EXIT_CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).push((backend.id.clone(), backend.container.clone()));
    wait_ready("127.0.0.1", port, "postgres", Some(PASSWORD), || None)
        .map_err(|e| format!("{e}\n--- docker logs ---\n{}", backend.logs()))?;
    Ok(Cluster {
        host: "127.0.0.1".into(),
        port,
        user: "postgres".into(),
        password: Some(PASSWORD.into()),
        bindir: find_bindir().unwrap_or_default(),
        datadir: PathBuf::from("/var/lib/postgresql/data"),
        logfile: None,
        backend: Backend::Docker(backend),
        restart_lock: Mutex::new(()),
    })
}

async fn run_container(port: u16, start: &str, slots: u32) -> Result<ContainerAsync<GenericImage>, String> {
    GenericImage::new(IMAGE_NAME, IMAGE_TAG)
        .with_exposed_port(5432.tcp())
        // The entrypoint's temporary server says so too, but listens on no TCP port:
        // `wait_ready` afterwards is what counts.
        .with_wait_for(WaitFor::message_on_stderr("database system is ready to accept connections"))
        .with_label(PID_LABEL, std::process::id().to_string())
        .with_label(START_LABEL, start)
        .with_env_var("POSTGRES_PASSWORD", PASSWORD)
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "trust")
        // After the entrypoint's own settings, so this one wins.
        .with_cmd(["-c".to_owned(), format!("max_replication_slots={slots}")])
        .with_mapped_port(port, 5432.tcp())
        // testcontainers publishes on every interface; the tests need loopback only.
        .with_host_config_modifier(|host_config| {
            for binding in host_config.port_bindings.iter_mut().flat_map(|b| b.values_mut()).flatten().flatten() {
                binding.host_ip = Some("127.0.0.1".into());
            }
        })
        .with_startup_timeout(READY_TIMEOUT)
        .start()
        .await
        .map_err(|e| format!("starting a container of {IMAGE_NAME}:{IMAGE_TAG}: {e}"))
}

fn build_image() -> Result<(), String> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let out = Command::new("docker")
        .args(["build", "--quiet", "--tag", &format!("{IMAGE_NAME}:{IMAGE_TAG}")])
        .arg(&fixtures)
        // The classic builder: bookworm's engine has no buildx.
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run `docker build` (is the Docker CLI installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`docker build {}` failed ({}): {}\n(the base image comes from `scripts/docker.sh bases`; `make test-docker` runs it)",
            fixtures.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Removes the containers of ours whose test binary's pid and start pass `doomed`. Best
/// effort.
fn remove_containers(doomed: impl Fn(u32, Option<&str>) -> bool + Send + Sync) {
    let res = block_on(async {
        let docker = Docker::connect_with_defaults()?;
        let filters = HashMap::from([("label", vec![PID_LABEL])]);
        let listed = docker
            .list_containers(Some(ListContainersOptionsBuilder::new().all(true).filters(&filters).build()))
            .await?;
        for container in listed {
            let label = |name: &str| container.labels.as_ref().and_then(|l| l.get(name)).map(String::as_str);
            let pid = label(PID_LABEL).and_then(|p| p.parse::<u32>().ok());
            if let (Some(id), Some(pid)) = (container.id.as_deref(), pid)
                && doomed(pid, label(START_LABEL))
            {
                let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
                docker.remove_container(id, Some(options)).await?;
            }
        }
        Ok::<_, bollard::errors::Error>(())
    });
    if let Err(e) = res {
        eprintln!("removing leftover test containers: {e}");
    }
}

/// The containers the exit cleanup removes: every one this process started.
static EXIT_CLEANUP: Mutex<Vec<(String, Container)>> = Mutex::new(Vec::new());

/// Removes the containers at exit (kept, stopped, with TEST_PG_KEEP). Best effort: a
/// killed binary's containers are removed by the next run.
extern "C" fn exit_cleanup() {
    let containers = EXIT_CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    for (id, container) in containers.iter() {
        let Some(container) = container.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            continue;
        };
        if std::env::var_os("TEST_PG_KEEP").is_some_and(|v| !v.is_empty()) {
            let _ = block_on(container.stop_with_timeout(Some(10)));
            // Dropping it would remove it.
            std::mem::forget(container);
            eprintln!("TEST_PG_KEEP: kept the stopped container {id} (docker logs {id})");
            continue;
        }
        if let Err(e) = block_on(async { tokio::time::timeout(Duration::from_secs(30), (*container).rm()).await }) {
            eprintln!("removing test container {id}: {e}");
        }
    }
}
