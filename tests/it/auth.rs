//! Authentication: JSON Web Tokens (HS256, RS256, ES256), the scopes of admins and
//! consumers, `?access_token=` on websockets, streams that end when their token
//! expires, and the refusal to serve a network address without auth.

use testkit::pg as common;
use testkit::support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pgdeltastream::server::{KeySource, Verifier};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &[u8] = b"a test secret that is long enough";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn hs256(claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

fn admin() -> String {
    hs256(json!({"role": "admin", "exp": now() + 600}))
}

fn consumer(sessions: &[&str], exp: u64) -> String {
    hs256(json!({"role": "consumer", "sessions": sessions, "exp": exp}))
}

async fn server_with(db: &common::TestDb, verifier: Verifier) -> TestServer {
    let mut settings = fast_settings(db);
    settings.http.auth = Some(Arc::new(verifier));
    TestServer::start_with(settings).await
}

async fn hs256_server(db: &common::TestDb) -> TestServer {
    server_with(db, Verifier::new(KeySource::Secret(SECRET), None, None).unwrap()).await
}

/// One request with `Authorization: Bearer <token>` (when given); the whole reply.
async fn call(server: &TestServer, method: &str, path: &str, token: Option<&str>, body: &str) -> String {
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(server.addr, request.as_bytes()).await
}

fn status(reply: &str) -> u16 {
    reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {reply:?}"))
}

/// The status and JSON body of a request with `token`.
async fn with_token(server: &TestServer, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let (code, bytes) = raw_request(server.addr, method, path, &headers, body.as_bytes().to_vec()).await;
    (code, serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e})")))
}

/// Asserts a 401 with a JSON error and a Bearer challenge; returns the error.
fn assert_unauthorized(reply: &str, invalid_token: bool) -> String {
    assert_eq!(status(reply), 401, "{reply}");
    let challenge = header(reply, "www-authenticate").unwrap_or_else(|| panic!("no challenge: {reply}"));
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert_eq!(challenge.contains(r#"error="invalid_token""#), invalid_token, "{challenge}");
    json_body(reply)["error"].as_str().unwrap_or_else(|| panic!("no JSON error: {reply}")).to_owned()
}

#[tokio::test]
async fn hs256_tokens_are_checked_and_every_refusal_is_a_json_401() {
    let db = common::fresh_db().await;
    let server = hs256_server(&db).await;

    let reply = call(&server, "GET", "/v2/sessions", None, "").await;
    assert!(assert_unauthorized(&reply, false).contains("no token"));
    // Unknown paths too: what exists is not told to strangers.
    let reply = call(&server, "GET", "/no/such/path", None, "").await;
    assert_unauthorized(&reply, false);

    let expired = hs256(json!({"role": "admin", "exp": now() - 3600}));
    let reply = call(&server, "GET", "/v2/sessions", Some(&expired), "").await;
    assert!(assert_unauthorized(&reply, true).contains("expired"));

    let other = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"role": "admin", "exp": now() + 600}),
        &EncodingKey::from_secret(b"another secret"),
    )
    .unwrap();
    let reply = call(&server, "GET", "/v2/sessions", Some(&other), "").await;
    assert!(assert_unauthorized(&reply, true).contains("signature"));

    // alg none: a header and claims with an empty signature.
    let b64 = |v: Value| base64_url(v.to_string().as_bytes());
    let none =
        format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(json!({"role": "admin", "exp": now() + 600})));
    let reply = call(&server, "GET", "/v2/sessions", Some(&none), "").await;
    assert_unauthorized(&reply, true);
    // HS384 with the right secret is still not the one algorithm allowed.
    let hs384 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &json!({"role": "admin", "exp": now() + 600}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap();
    let reply = call(&server, "GET", "/v2/sessions", Some(&hs384), "").await;
    assert!(assert_unauthorized(&reply, true).contains("algorithm"));

    for (claims, said) in [
        (json!({"role": "admin"}), "exp"),
        (json!({"exp": now() + 600}), "role"),
        (json!({"role": "root", "exp": now() + 600}), "root"),
        (json!({"role": "consumer", "sessions": "mine", "exp": now() + 600}), "sessions"),
    ] {
        let reply = call(&server, "GET", "/v2/sessions", Some(&hs256(claims.clone())), "").await;
        let error = assert_unauthorized(&reply, true);
        assert!(error.contains(said), "{claims}: {error}");
    }
    for garbage in ["abc", "a.b.c", "Basic"] {
        let reply = call(&server, "GET", "/v2/sessions", Some(garbage), "").await;
        assert_unauthorized(&reply, true);
    }
    let request = "GET /v2/sessions HTTP/1.1\r\nhost: x\r\nauthorization: Basic dTpw\r\nconnection: close\r\n\r\n";
    let reply = exchange(server.addr, request.as_bytes()).await;
    assert!(assert_unauthorized(&reply, false).contains("Bearer"));
    // A token in the query is for websockets only (a browser cannot set their headers).
    let reply = call(&server, "GET", &format!("/v2/sessions?access_token={}", admin()), None, "").await;
    assert_unauthorized(&reply, false);

    let (code, body) = with_token(&server, "GET", "/v2/sessions", &admin(), "").await;
    assert_eq!((code, body), (200, json!([])));
    // The probes need no token; the metrics need an admin's.
    for public in ["/healthz", "/readyz"] {
        let reply = call(&server, "GET", public, None, "").await;
        assert_eq!(status(&reply), 200, "{public}: {reply}");
    }
    assert_unauthorized(&call(&server, "GET", "/metrics", None, "").await, false);
    let reply = call(&server, "GET", "/metrics", Some(&consumer(&["orders"], now() + 600)), "").await;
    assert_eq!(status(&reply), 403, "{reply}");
    let reply = call(&server, "GET", "/metrics", Some(&admin()), "").await;
    assert_eq!(status(&reply), 200, "{reply}");
    assert!(reply.contains("pgdeltastream_postgres_up"), "{reply}");
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A key pair made with the openssl command: (private PKCS#8 PEM, public SPKI PEM).
fn openssl_rsa_key() -> (Vec<u8>, Vec<u8>) {
    let private = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("the openssl command");
    assert!(private.status.success(), "{}", String::from_utf8_lossy(&private.stderr));
    let mut public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    public.stdin.take().unwrap().write_all(&private.stdout).unwrap();
    let public = public.wait_with_output().unwrap();
    assert!(public.status.success());
    (private.stdout, public.stdout)
}

fn ec_key() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (key.serialize_pem().into_bytes(), key.public_key_pem().into_bytes())
}

#[tokio::test]
async fn rs256_and_es256_public_keys_pin_their_algorithm() {
    let db = common::fresh_db().await;
    let claims = json!({"role": "admin", "exp": now() + 600});
    let (rsa_private, rsa_public) = openssl_rsa_key();
    let (ec_private, ec_public) = ec_key();

    let rs = server_with(&db, Verifier::new(KeySource::PublicPem(&rsa_public), None, None).unwrap()).await;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(&rsa_private).unwrap(),
    )
    .unwrap();
    assert_eq!(with_token(&rs, "GET", "/v2/sessions", &token, "").await.0, 200);
    // The classic confusion: HS256 "signed" with the RSA public key's bytes.
    let confused =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&rsa_public)).unwrap();
    let reply = call(&rs, "GET", "/v2/sessions", Some(&confused), "").await;
    assert!(assert_unauthorized(&reply, true).contains("algorithm"));
    let es_token =
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &EncodingKey::from_ec_pem(&ec_private).unwrap())
            .unwrap();
    assert_unauthorized(&call(&rs, "GET", "/v2/sessions", Some(&es_token), "").await, true);

    let es = server_with(&db, Verifier::new(KeySource::PublicPem(&ec_public), None, None).unwrap()).await;
    assert_eq!(with_token(&es, "GET", "/v2/sessions", &es_token, "").await.0, 200);
    assert_unauthorized(&call(&es, "GET", "/v2/sessions", Some(&token), "").await, true);
    let (_, other_public) = ec_key();
    let other = server_with(&db, Verifier::new(KeySource::PublicPem(&other_public), None, None).unwrap()).await;
    assert!(
        assert_unauthorized(&call(&other, "GET", "/v2/sessions", Some(&es_token), "").await, true)
            .contains("signature")
    );
}

#[tokio::test]
async fn audience_and_issuer_when_configured() {
    let db = common::fresh_db().await;
    let verifier = Verifier::new(KeySource::Secret(SECRET), Some("pgdeltastream"), Some("https://issuer")).unwrap();
    let server = server_with(&db, verifier).await;
    let good = hs256(json!({"role": "admin", "exp": now() + 600, "aud": "pgdeltastream", "iss": "https://issuer"}));
    assert_eq!(with_token(&server, "GET", "/v2/sessions", &good, "").await.0, 200);
    let wrong_aud = hs256(json!({"role": "admin", "exp": now() + 600, "aud": "other", "iss": "https://issuer"}));
    assert!(
        assert_unauthorized(&call(&server, "GET", "/v2/sessions", Some(&wrong_aud), "").await, true).contains("aud")
    );
    let wrong_iss = hs256(json!({"role": "admin", "exp": now() + 600, "aud": "pgdeltastream", "iss": "x"}));
    assert!(
        assert_unauthorized(&call(&server, "GET", "/v2/sessions", Some(&wrong_iss), "").await, true).contains("iss")
    );
}

/// With `--jwt-audience` / `--jwt-issuer` set, a token must have the claim: one that
/// leaves it out is not waved through.
#[tokio::test]
async fn a_configured_audience_or_issuer_is_required_in_the_token() {
    let db = common::fresh_db().await;
    let verifier = Verifier::new(KeySource::Secret(SECRET), Some("pgdeltastream"), Some("https://issuer")).unwrap();
    let server = server_with(&db, verifier).await;
    for (claims, missing) in [
        (json!({"role": "admin", "exp": now() + 600, "iss": "https://issuer"}), "aud"),
        (json!({"role": "admin", "exp": now() + 600, "aud": "pgdeltastream"}), "iss"),
    ] {
        let reply = call(&server, "GET", "/v2/sessions", Some(&hs256(claims.clone())), "").await;
        let error = assert_unauthorized(&reply, true);
        assert!(error.contains(&format!("no {missing} claim")), "{claims}: {error}");
    }
    let neither = hs256(json!({"role": "admin", "exp": now() + 600}));
    assert_unauthorized(&call(&server, "GET", "/v2/sessions", Some(&neither), "").await, true);

    // Only an audience configured: the issuer stays optional.
    let db = common::fresh_db().await;
    let server = server_with(&db, Verifier::new(KeySource::Secret(SECRET), Some("pgdeltastream"), None).unwrap()).await;
    let no_iss = hs256(json!({"role": "admin", "exp": now() + 600, "aud": "pgdeltastream"}));
    assert_eq!(with_token(&server, "GET", "/v2/sessions", &no_iss, "").await.0, 200);
    let no_aud = hs256(json!({"role": "admin", "exp": now() + 600}));
    assert!(assert_unauthorized(&call(&server, "GET", "/v2/sessions", Some(&no_aud), "").await, true).contains("aud"));
}

/// A token in the URL is for the handshake of a websocket route only: not for
/// `/metrics`, a DELETE or a list, whatever `Upgrade` header they carry, and not for
/// half a handshake on a websocket route.
#[tokio::test]
async fn access_token_works_only_on_a_websocket_routes_handshake() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let server = hs256_server(&db).await;
    setup_sessions(&server, &pg).await;
    let admin = admin();
    let handshake = "connection: upgrade, close\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
                     sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for (method, path) in [
        ("GET", "/metrics".to_owned()),
        ("DELETE", "/v2/sessions/theirs".to_owned()),
        ("DELETE", "/v1/sessions/delta_x1".to_owned()),
        ("GET", "/v2/sessions".to_owned()),
        ("GET", "/v1/init".to_owned()),
    ] {
        let request = format!("{method} {path}?access_token={admin} HTTP/1.1\r\nhost: x\r\n{handshake}\r\n");
        let reply = exchange(server.addr, request.as_bytes()).await;
        assert!(assert_unauthorized(&reply, false).contains("no token"), "{method} {path}: {reply}");
    }
    let (code, list) = with_token(&server, "GET", "/v2/sessions", &admin, "").await;
    assert_eq!((code, list.as_array().map(Vec::len)), (200, Some(2)), "nothing was dropped: {list}");

    // Half a handshake on a websocket route: no key, no version.
    let request = format!(
        "GET /v2/sessions/mine/stream?access_token={admin} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
         connection: upgrade, close\r\n\r\n"
    );
    assert_unauthorized(&exchange(server.addr, request.as_bytes()).await, false);

    // A whole one is what browsers send: served.
    let url = format!("ws://{}/v2/sessions/mine/stream?access_token={admin}", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("a handshake with ?access_token= is served");
    pg.execute("INSERT INTO orders (item) VALUES ('by url token')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "by url token");
}

/// A validly signed token whose `exp` is past what the clock can count (2^63 s,
/// u64::MAX) gets an answer, not a dropped connection, and its stream streams.
#[tokio::test]
async fn a_token_expiring_past_any_clock_is_served_cleanly() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let server = hs256_server(&db).await;
    setup_sessions(&server, &pg).await;
    for (exp, session) in [(1u64 << 63, "mine"), (u64::MAX, "theirs")] {
        let token = hs256(json!({"role": "admin", "exp": exp}));
        let reply = call(&server, "GET", "/v2/sessions", Some(&token), "").await;
        assert_eq!(status(&reply), 200, "exp {exp}: {reply}");
        let url = format!("ws://{}/v2/sessions/{session}/stream", server.addr);
        let mut ws = connect_with(&url, &token).await.unwrap_or_else(|e| panic!("exp {exp}: {e:?}"));
        pg.execute("INSERT INTO orders (item) VALUES ($1)", &[&format!("exp {exp}")]).await.unwrap();
        // `theirs` has the earlier insert to send first.
        while next_changes(&mut ws).await["change"][0]["columnvalues"][1] != json!(format!("exp {exp}")) {}
    }
}

/// A websocket request carrying `token` in the Authorization header.
async fn connect_with(url: &str, token: &str) -> Result<Ws, (u16, Value)> {
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    refused(tokio_tungstenite::connect_async(request).await)
}

fn refused(
    result: Result<
        (Ws, tokio_tungstenite::tungstenite::handshake::client::Response),
        tokio_tungstenite::tungstenite::Error,
    >,
) -> Result<Ws, (u16, Value)> {
    match result {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or(Value::Null)))
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

async fn setup_sessions(server: &TestServer, pg: &tokio_postgres::Client) {
    pg.batch_execute("CREATE TABLE orders (id serial PRIMARY KEY, item text); INSERT INTO orders (item) VALUES ('a');")
        .await
        .unwrap();
    for name in ["mine", "theirs"] {
        let body = json!({"name": name, "tables": ["public.orders"]}).to_string();
        let (code, created) = with_token(server, "POST", "/v2/sessions", &admin(), &body).await;
        assert_eq!(code, 201, "{created}");
    }
}

#[tokio::test]
async fn a_consumer_reaches_only_its_sessions_and_an_admin_everything() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let server = hs256_server(&db).await;
    setup_sessions(&server, &pg).await;
    let me = consumer(&["mine"], now() + 600);

    // Listing shows only the consumer's own sessions.
    let (code, list) = with_token(&server, "GET", "/v2/sessions", &me, "").await;
    assert_eq!(code, 200, "{list}");
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["mine"]);
    let (_, all) = with_token(&server, "GET", "/v2/sessions", &admin(), "").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let slot_of = |name: &str| {
        all.as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["slotName"].as_str().unwrap().to_owned()
    };
    // v1 scopes by the session a slot belongs to, or by the slot's name.
    let (code, v1) = with_token(&server, "GET", "/v1/sessions", &me, "").await;
    assert_eq!(code, 200);
    assert_eq!(
        v1.as_array().unwrap().iter().map(|s| s["slotName"].clone()).collect::<Vec<_>>(),
        [json!(slot_of("mine"))]
    );
    let my_slot = consumer(&[&slot_of("mine")], now() + 600);
    let (code, v1) = with_token(&server, "GET", "/v1/sessions", &my_slot, "").await;
    assert_eq!(code, 200);
    assert_eq!(v1.as_array().unwrap().len(), 1);
    assert_eq!(v1[0]["slotName"], slot_of("mine").as_str());

    for (method, path, mine) in [
        ("GET", "/v2/sessions/mine", 200),
        ("GET", "/v2/sessions/mine/snapshot/orders", 200),
        ("DELETE", "/v2/sessions/mine/snapshot", 200),
    ] {
        let (code, body) = with_token(&server, method, path, &me, "").await;
        assert_eq!(code, mine, "{method} {path}: {body}");
        let theirs = path.replace("mine", "theirs");
        let (code, body) = with_token(&server, method, &theirs, &me, "").await;
        assert_eq!(code, 403, "{method} {theirs}: {body}");
        assert!(body["error"].as_str().unwrap().contains("theirs"), "{body}");
    }
    // Admin only: creating, deleting, v1 init and its snapshot (it names no slot).
    for (method, path, body) in [
        ("POST", "/v2/sessions", r#"{"name":"more"}"#),
        ("DELETE", "/v2/sessions/mine", ""),
        ("GET", "/v1/init", ""),
        ("POST", "/v1/snapshot/data", r#"{"table":"orders"}"#),
        ("DELETE", "/v1/snapshot", ""),
        ("DELETE", &format!("/v1/sessions/{}", slot_of("mine")), ""),
    ] {
        let (code, answer) = with_token(&server, method, path, &my_slot, body).await;
        assert_eq!(code, 403, "{method} {path}: {answer}");
        assert!(answer["error"].as_str().unwrap().contains("admin"), "{answer}");
    }
    // v1 release by slot name: the consumer's own slot.
    let path = format!("/v1/snapshot?slotName={}", slot_of("mine"));
    assert_eq!(with_token(&server, "DELETE", &path, &my_slot, "").await.0, 200);
    let path = format!("/v1/snapshot?slotName={}", slot_of("theirs"));
    assert_eq!(with_token(&server, "DELETE", &path, &my_slot, "").await.0, 403);

    // Streams: out of scope 403 before any upgrade; in scope by header or ?access_token=.
    let url = |name: &str| format!("ws://{}/v2/sessions/{name}/stream", server.addr);
    let (code, body) = connect_with(&url("theirs"), &me).await.err().unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, _) = refused(tokio_tungstenite::connect_async(url("mine")).await).err().unwrap();
    assert_eq!(code, 401);
    let bad = refused(tokio_tungstenite::connect_async(format!("{}?access_token=nonsense", url("mine"))).await);
    assert_eq!(bad.err().unwrap().0, 401);
    let v1_url = |slot: &str| format!("ws://{}/v1/lr/stream?slotName={slot}", server.addr);
    assert_eq!(connect_with(&v1_url(&slot_of("theirs")), &my_slot).await.err().unwrap().0, 403);

    let mut ws = tokio_tungstenite::connect_async(format!("{}?access_token={me}&format=transactions", url("mine")))
        .await
        .expect("a stream with ?access_token=")
        .0;
    pg.execute("INSERT INTO orders (item) VALUES ('b')", &[]).await.unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "b", "{tx}");
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}

    // The admin may do everything, the consumer's session included.
    let mut ws = connect_with(&url("theirs"), &admin()).await.expect("admin streams any session");
    pg.execute("INSERT INTO orders (item) VALUES ('c')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "b");
    drop(ws);
    let (code, body) = with_token(&server, "DELETE", "/v2/sessions/theirs", &admin(), "").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_stream_ends_with_1008_when_its_token_expires_and_resumes_with_a_new_one() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let server = hs256_server(&db).await;
    setup_sessions(&server, &pg).await;
    let url = format!("ws://{}/v2/sessions/mine/stream", server.addr);

    // Past its exp but within the 30 s of leeway: accepted, so its stream lasts until
    // the leeway is up (a few seconds), rather than being closed at once.
    let short = consumer(&["mine"], now() - 25);
    let mut ws = connect_with(&url, &short).await.expect("upgrade");
    let started = std::time::Instant::now();
    pg.execute("INSERT INTO orders (item) VALUES ('before')", &[]).await.unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "before");
    ack(&mut ws, tx["nextlsn"].as_str().unwrap()).await;

    // An error message, then the close frame, at exp (pings alone never end the wait).
    let (error, (code, reason)) = tokio::time::timeout(Duration::from_secs(20), async {
        let error = loop {
            match next_message(&mut ws).await {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v.get("error").is_some() {
                        break v;
                    }
                }
                other => panic!("expected the error message, got {other:?}"),
            }
        };
        (error, await_close(&mut ws).await)
    })
    .await
    .expect("the stream ended within 20 s of its token's expiry");
    assert!(error["error"].as_str().unwrap().contains("expired"), "{error}");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("expired"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(20), "closed only after {:?}", started.elapsed());

    // Only a disconnect: the slot is there, and a new token streams from the ack on.
    pg.execute("INSERT INTO orders (item) VALUES ('after')", &[]).await.unwrap();
    let fresh = consumer(&["mine"], now() + 600);
    // At once: the old stream may still be letting go of the slot, which the server
    // waits for.
    let mut ws = connect_with(&url, &fresh).await.unwrap_or_else(|e| panic!("reconnect refused: {e:?}"));
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "after", "{tx}");
}

/// The binary, serving `db` on `host`:`port` with `env` on top.
fn spawn(db: &common::TestDb, host: &str, port: u16, env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = server_command(db, port);
    cmd.env("SERVERHOST", host).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits for the child to exit (bounded); its status and what it logged.
fn exited(child: std::process::Child) -> (bool, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when the child serves `port` on 127.0.0.1 within 20 s; then stops it.
async fn serves(mut child: std::process::Child, port: u16) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let listening = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    listening
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn no_auth_on_a_network_address_refuses_to_start() {
    let db = common::fresh_db().await;
    let (ok, said) = exited(spawn(&db, "0.0.0.0", free_port(), &[]));
    assert!(!ok);
    assert!(said.contains("refusing to serve") && said.contains("--allow-unauthenticated"), "{said}");

    let (ok, said) = exited(spawn(&db, "0.0.0.0", free_port(), &[("PGDELTASTREAM_ALLOW_UNAUTHENTICATED", "false")]));
    assert!(!ok, "{said}");
    for allow in ["true", "1"] {
        let port = free_port();
        assert!(serves(spawn(&db, "0.0.0.0", port, &[("PGDELTASTREAM_ALLOW_UNAUTHENTICATED", allow)]), port).await);
    }
    let port = free_port();
    assert!(serves(spawn(&db, "0.0.0.0", port, &[("PGDELTASTREAM_JWT_SECRET", "s3cret")]), port).await);
    // localhost is loopback, whichever address it resolves to.
    let port = free_port();
    let child = spawn(&db, "localhost", port, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut child = child;
    loop {
        let up = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
            || tokio::net::TcpStream::connect(("::1", port)).await.is_ok();
        if up {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "localhost was refused");
        assert!(std::time::Instant::now() < deadline, "never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();

    let key = std::env::temp_dir().join(format!("pgdeltastream-auth-{}.pem", std::process::id()));
    std::fs::write(&key, ec_key().1).unwrap();
    let both = [("PGDELTASTREAM_JWT_SECRET", "s3cret"), ("PGDELTASTREAM_JWT_PUBLIC_KEY", key.to_str().unwrap())];
    let (ok, said) = exited(spawn(&db, "127.0.0.1", free_port(), &both));
    assert!(!ok && said.contains("choose one"), "{said}");
    let port = free_port();
    assert!(serves(spawn(&db, "0.0.0.0", port, &both[1..]), port).await);
    let (ok, said) =
        exited(spawn(&db, "127.0.0.1", free_port(), &[("PGDELTASTREAM_JWT_PUBLIC_KEY", "/nonexistent.pem")]));
    assert!(!ok && said.contains("/nonexistent.pem"), "{said}");
    let _ = std::fs::remove_file(key);
    // The secret is never shown, not even in --help.
    let out = server_command(&db, 1).env("PGDELTASTREAM_JWT_SECRET", "s3cret").arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("s3cret"));
}

/// Issue 18: through v1, a consumer's token grants a slot by the session it belongs to:
/// `"sessions": ["default"]` streams whatever slot the default session has now, across
/// inits, and a named session's token its slot; a token naming a session never reaches
/// a slot of another session, even one named like that session (stored before names
/// were kept apart).
#[tokio::test]
async fn v1_scope_follows_the_session_a_slot_belongs_to() {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    let server = hs256_server(&db).await;
    setup_sessions(&server, &pg).await;
    let (_, all) = with_token(&server, "GET", "/v2/sessions", &admin(), "").await;
    let slot_of = |name: &str| {
        all.as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["slotName"].as_str().unwrap().to_owned()
    };
    let (mine, theirs) = (slot_of("mine"), slot_of("theirs"));
    let default = consumer(&["default"], now() + 600);
    let me = consumer(&["mine"], now() + 600);
    let v1_url = |slot: &str| format!("ws://{}/v1/lr/stream?slotName={slot}", server.addr);

    // A named session's token streams and acks its slot through v1, no other.
    let mut ws = connect_with(&v1_url(&mine), &me).await.expect("the session's token streams its slot");
    pg.execute("INSERT INTO orders (item) VALUES ('b')", &[]).await.unwrap();
    let tx = next_changes(&mut ws).await;
    assert_eq!(tx["change"][0]["columnvalues"][1], "b", "{tx}");
    ack(&mut ws, tx["nextlsn"].as_str().unwrap()).await;
    await_confirmed(&pg, &mine, tx["nextlsn"].as_str().unwrap()).await;
    drop(ws);
    assert_eq!(connect_with(&v1_url(&theirs), &me).await.err().unwrap().0, 403);
    let (code, v1) = with_token(&server, "GET", "/v1/sessions", &me, "").await;
    assert_eq!(code, 200, "{v1}");
    assert_eq!(v1.as_array().unwrap().iter().map(|s| s["slotName"].clone()).collect::<Vec<_>>(), [json!(mine)]);

    // The default session's token follows its slot across inits.
    for _ in 0..2 {
        let (code, init) = with_token(&server, "GET", "/v1/init", &admin(), "").await;
        assert_eq!(code, 200, "{init}");
        let slot = init["slotName"].as_str().unwrap().to_owned();
        let (code, v1) = with_token(&server, "GET", "/v1/sessions", &default, "").await;
        assert_eq!(code, 200, "{v1}");
        assert_eq!(v1.as_array().unwrap().iter().map(|s| s["slotName"].clone()).collect::<Vec<_>>(), [json!(slot)]);
        let ws = connect_with(&v1_url(&slot), &default).await.expect("the default token streams the default slot");
        drop(ws);
        let path = format!("/v1/snapshot?slotName={slot}");
        let (code, body) = with_token(&server, "DELETE", &path, &default, "").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(connect_with(&v1_url(&mine), &default).await.err().unwrap().0, 403);
        let path = format!("/v1/snapshot?slotName={mine}");
        assert_eq!(with_token(&server, "DELETE", &path, &default, "").await.0, 403);
    }
    // Out of scope, a slot that does not exist is a 403 like any other.
    assert_eq!(connect_with(&v1_url("delta_nosuch1"), &default).await.err().unwrap().0, 403);

    // A session stored (before names were kept apart) under the name of another
    // session's slot: its token does not reach that slot.
    let legacy = json!({"name": theirs, "slotName": "delta_gone1", "plugin": "wal2json", "tables": null,
                        "actions": ["insert", "update", "delete", "truncate", "message"]});
    pg.execute("INSERT INTO pgdeltastream.sessions (name, definition) VALUES ($1, $2)", &[&theirs, &legacy])
        .await
        .unwrap();
    let named_like_the_slot = consumer(&[&theirs], now() + 600);
    let (code, body) = connect_with(&v1_url(&theirs), &named_like_the_slot).await.err().unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, v1) = with_token(&server, "GET", "/v1/sessions", &named_like_the_slot, "").await;
    assert_eq!((code, v1), (200, json!([])));
    let (code, _) = with_token(&server, "DELETE", "/v2/sessions/theirs", &admin(), "").await;
    assert_eq!(code, 200);
    server.stop().await;
}

/// A consumer is refused for its scope before its input is judged: bad input from a
/// caller who may not make the request at all is a 403, not a 400 that describes it.
#[tokio::test]
async fn scope_is_checked_before_the_input() {
    let db = common::fresh_db().await;
    let server = hs256_server(&db).await;
    let mine = consumer(&["mine"], now() + 600);
    for (method, path, body) in [
        ("POST", "/v2/sessions", "{"),
        ("DELETE", "/v2/sessions/%FF", ""),
        ("POST", "/v1/snapshot/data", "{"),
        ("DELETE", "/v1/sessions/%FF", ""),
    ] {
        let (code, answer) = with_token(&server, method, path, &mine, body).await;
        assert_eq!(code, 403, "{method} {path}: {answer}");
        let (code, answer) = with_token(&server, method, path, &admin(), body).await;
        assert_eq!(code, 400, "{method} {path} as an admin: {answer}");
    }
    let path = "/v2/sessions/theirs/snapshot/orders?limit=many";
    let (code, answer) = with_token(&server, "GET", path, &mine, "").await;
    assert_eq!(code, 403, "{answer}");
    let (code, answer) = with_token(&server, "GET", path, &consumer(&["theirs"], now() + 600), "").await;
    assert_eq!(code, 400, "{answer}");
    let url = format!("ws://{}/v2/sessions/theirs/stream?format=changes&format=changes", server.addr);
    assert_eq!(connect_with(&url, &mine).await.err().unwrap().0, 403);
    assert_eq!(connect_with(&url, &consumer(&["theirs"], now() + 600)).await.err().unwrap().0, 400);
}
