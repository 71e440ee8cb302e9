//! The binary: configuration from the original's environment variables and flags,
//! and `pgdeltastream` with no arguments serves.

use testkit::pg as common;
use testkit::support;

use std::process::{Command, Stdio};

use std::time::Duration;
use support::server_command;

const BIN: &str = env!("CARGO_BIN_EXE_pgdeltastream");

#[test]
fn help_lists_every_setting_with_its_environment_variable() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let http = [
        "PGDELTASTREAM_HEADER_TIMEOUT",
        "PGDELTASTREAM_IDLE_TIMEOUT",
        "PGDELTASTREAM_MAX_CONNECTIONS",
        "PGDELTASTREAM_PLUGIN",
        "PGDELTASTREAM_JWT_SECRET",
        "PGDELTASTREAM_JWT_PUBLIC_KEY",
        "PGDELTASTREAM_JWT_AUDIENCE",
        "PGDELTASTREAM_JWT_ISSUER",
        "PGDELTASTREAM_ALLOW_UNAUTHENTICATED",
        "PGDELTASTREAM_TLS_CERT",
        "PGDELTASTREAM_TLS_KEY",
    ];
    for var in ["DBNAME", "PGUSER", "PGPASS", "PGHOST", "PGPORT", "SERVERHOST", "SERVERPORT"].into_iter().chain(http) {
        assert!(help.contains(&format!("env: {var}")), "--help does not mention {var}:\n{help}");
    }
    assert!(help.contains("12312"), "default port shown");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn serves_with_no_arguments_configured_by_the_environment() {
    let db = common::fresh_db().await;
    let port = free_port();
    let child = Child(server_command(&db, port).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the server never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = support::request(addr, "GET", "/v1/init", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["slotName"].as_str().unwrap().starts_with("delta_"));

    // SIGTERM: a clean exit, and the snapshot is let go.
    let pid = child.0.id() as i32;
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let mut child = child;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pg = db.client().await;
    let slot: String = body["slotName"].as_str().unwrap().to_owned();
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.unwrap();
}

#[test]
fn bad_settings_are_reported_not_panicked() {
    let out = Command::new(BIN).args(["--pgport", "notaport"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pgport"));
    let out = Command::new(BIN).args(["--plugin", "decoderbufs"]).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("auto") && said.contains("pgoutput") && said.contains("wal2json"), "{said}");
    let port = free_port();
    let _hold = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = Command::new(BIN).env("SERVERHOST", "127.0.0.1").env("SERVERPORT", port.to_string()).output().unwrap();
    assert!(!out.status.success(), "a port in use is an error");
}

#[test]
fn publish_and_gateway_refuse_bad_settings() {
    let out = Command::new(BIN).args(["gateway"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nats"), "{}", String::from_utf8_lossy(&out.stderr));
    // A session name that cannot be one is refused before anything connects.
    let out = Command::new(BIN)
        .env("NO_COLOR", "1")
        .args(["publish", "--nats", "nats://127.0.0.1:1", "--session", "Bad.Name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid session name"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
