//! https and wss: a CA the test makes, a server certificate it signs, and rustls
//! clients that trust only that CA.

use testkit::pg as common;
use testkit::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use pgdeltastream::server::tls::TlsConfig;
use pgdeltastream::server::{KeySource, Verifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A CA, and a certificate it signed for localhost and 127.0.0.1.
struct Pki {
    ca: CertificateDer<'static>,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn make_pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pgdeltastream test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca: ca.der().clone(),
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

async fn tls_server(db: &common::TestDb, pki: &Pki, header_timeout: Duration) -> TestServer {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
    let mut settings = fast_settings(db);
    settings.http.tls = Some(TlsConfig::new(vec![pki.cert.clone()], key).unwrap());
    settings.http.header_timeout = header_timeout;
    TestServer::start_with(settings).await
}

/// A TLS connection to `addr` as `localhost`, trusting only the test's CA.
async fn tls_connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// One https GET; the status and JSON body.
async fn https_get(addr: SocketAddr, ca: &CertificateDer<'static>, path: &str) -> (u16, Value) {
    https_get_as(addr, ca, path, None).await
}

async fn https_get_as(addr: SocketAddr, ca: &CertificateDer<'static>, path: &str, token: Option<&str>) -> (u16, Value) {
    let tls = tls_connect(addr, ca).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", "localhost");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn https_and_wss_through_a_ca_the_client_trusts() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
    let pki = make_pki();
    let server = tls_server(&db, &pki, Duration::from_secs(10)).await;

    let (status, body) = https_get(server.addr, &pki.ca, "/v1/init").await;
    assert_eq!(status, 200, "{body}");
    let slot = body["slotName"].as_str().unwrap().to_owned();

    let tls = tls_connect(server.addr, &pki.ca).await.unwrap();
    let url = format!("wss://localhost:{}/v1/lr/stream?slotName={slot}", server.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.expect("wss upgrade");
    pg.execute("INSERT INTO t VALUES (1, 'over tls')", &[]).await.unwrap();
    let tx = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await.expect("open").expect("a message") {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["change"].as_array().is_some_and(|c| !c.is_empty()) {
                        return v;
                    }
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a change within 20 s");
    assert_eq!(tx["change"][0]["columnvalues"][1], "over tls", "{tx}");

    // A client that does not trust the CA gets no connection.
    let stranger = make_pki();
    assert!(tls_connect(server.addr, &stranger.ca).await.is_err());
}

#[tokio::test]
async fn plain_http_on_the_tls_port_is_told_and_a_silent_client_blocks_nobody() {
    let db = common::fresh_db().await;
    let pki = make_pki();
    let server = tls_server(&db, &pki, Duration::from_secs(1)).await;

    let reply = exchange(server.addr, b"GET /v2/sessions HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(json_body(&reply)["error"].as_str().unwrap().contains("TLS"), "{reply}");

    // A client that connects and says nothing: others are served meanwhile, and it is
    // closed after the header timeout.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    assert_eq!(https_get(server.addr, &pki.ca, "/v2/sessions").await.0, 200);
    for stream in [&mut silent, &mut half] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "not closed: {read:?}");
    }
}

/// Past the connection cap a TLS port sends no plaintext: a TLS client reads a fatal
/// alert (a plaintext 503 would be a garbled record to it), and the bytes on the wire
/// are a TLS record, never an HTTP answer.
#[tokio::test]
async fn past_the_connection_cap_the_tls_port_answers_with_a_tls_alert() {
    let db = common::fresh_db().await;
    let pki = make_pki();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
    let mut settings = fast_settings(&db);
    settings.http.tls = Some(TlsConfig::new(vec![pki.cert.clone()], key).unwrap());
    settings.http.max_connections = 1;
    let server = TestServer::start_with(settings).await;
    let _held = tls_connect(server.addr, &pki.ca).await.expect("the one place");

    let mut raw = TcpStream::connect(server.addr).await.unwrap();
    let _ = raw.write_all(b"GET /v2/sessions HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), raw.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "not closed");
    assert!(!reply.starts_with(b"HTTP/"), "plaintext on the TLS port: {:?}", String::from_utf8_lossy(&reply));
    assert_eq!(reply, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50], "a fatal internal_error alert");

    let refused = tls_connect(server.addr, &pki.ca).await.expect_err("no place for a second client");
    assert!(refused.to_string().contains("InternalError"), "{refused}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn the_binary_serves_https_from_pem_files() {
    let db = common::fresh_db().await;
    let pki = make_pki();
    let dir = std::env::temp_dir().join(format!("pgdeltastream-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem).unwrap();
    std::fs::write(&key, &pki.key_pem).unwrap();

    let out = server_command(&db, free_port()).env("PGDELTASTREAM_TLS_CERT", &cert).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("go together"));
    let out = server_command(&db, free_port())
        .env("PGDELTASTREAM_TLS_CERT", &key)
        .env("PGDELTASTREAM_TLS_KEY", &key)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a key is no certificate");

    let port = free_port();
    let mut child = server_command(&db, port)
        .env("PGDELTASTREAM_TLS_CERT", &cert)
        .env("PGDELTASTREAM_TLS_KEY", &key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(std::time::Instant::now() < deadline, "the server never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = https_get(addr, &pki.ca, "/v2/sessions").await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status, 200, "{body}");
}

/// Python's `websockets` (the venv of `make clients`) over wss, trusting the test CA,
/// with the token in `?access_token=` as a browser would send it.
const PYTHON_WSS: &str = r#"
import asyncio, json, ssl, sys, websockets
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[2])
    async with websockets.connect(sys.argv[1], ssl=ctx) as ws:
        async for m in ws:
            d = json.loads(m)
            if d.get("change"):
                print(json.dumps(d))
                return
asyncio.run(main())
"#;

#[tokio::test]
async fn python_websockets_streams_over_wss_with_an_access_token() {
    let venv_python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/python");
    assert!(venv_python.exists(), "{} is missing: run `make clients`", venv_python.display());
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
    let pki = make_pki();
    let secret = b"the wss test secret";
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
    let mut settings = fast_settings(&db);
    settings.http.tls = Some(TlsConfig::new(vec![pki.cert.clone()], key).unwrap());
    settings.http.auth = Some(Arc::new(Verifier::new(KeySource::Secret(secret), None, None).unwrap()));
    let server = TestServer::start_with(settings).await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let sign = |claims: Value| {
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
            .unwrap()
    };

    let admin = sign(serde_json::json!({"role": "admin", "exp": exp}));
    assert_eq!(https_get(server.addr, &pki.ca, "/v1/init").await.0, 401);
    let (status, body) = https_get_as(server.addr, &pki.ca, "/v1/init", Some(&admin)).await;
    assert_eq!(status, 200, "{body}");
    let slot = body["slotName"].as_str().unwrap().to_owned();
    pg.execute("INSERT INTO t VALUES (7, 'python over wss')", &[]).await.unwrap();

    let ca = std::env::temp_dir().join(format!("pgdeltastream-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let consumer = sign(serde_json::json!({"role": "consumer", "sessions": [slot], "exp": exp}));
    let url = format!("wss://localhost:{}/v1/lr/stream?slotName={slot}&access_token={consumer}", server.addr.port());
    let child = tokio::process::Command::new(venv_python)
        .args(["-c", PYTHON_WSS, &url, ca.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out =
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("within 60 s").unwrap();
    let _ = std::fs::remove_file(&ca);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let tx: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(tx["change"][0]["columnvalues"][1], "python over wss", "{tx}");
}
