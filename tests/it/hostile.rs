//! The catalogue of hostile and broken input. Each case gets the status and JSON
//! error it must, the server keeps serving afterwards, and no table changes.

use testkit::pg as common;
use testkit::support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

struct Case {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
}

fn post(body: impl Into<Vec<u8>>, status: u16) -> Case {
    Case {
        method: "POST",
        path: "/v1/snapshot/data".into(),
        headers: vec![("content-type", "application/json")],
        body: body.into(),
        status,
    }
}

fn table(name: &str, status: u16) -> Case {
    post(json!({ "table": name }).to_string(), status)
}

fn order_by(column: &str, status: u16) -> Case {
    post(json!({ "table": "test_table", "order_by": { "column": column } }).to_string(), status)
}

fn req(method: &'static str, path: &str, status: u16) -> Case {
    Case { method, path: path.into(), headers: vec![], body: vec![], status }
}

fn http_cases() -> Vec<Case> {
    let long = "a".repeat(64);
    vec![
        // Malformed and truncated JSON.
        post("", 400),
        post("{", 400),
        post("{\"table\": \"test_table\"", 400),
        post("{\"table\": \"test_table\",}", 400),
        post("nul", 400),
        post("\"test_table\"", 400),
        post(vec![0xff, 0xfe, 0x00], 400),
        // Wrong types.
        post("{\"table\": 1}", 400),
        post("{\"table\": null}", 400),
        post("{\"table\": [\"test_table\"]}", 400),
        post("{\"table\": \"test_table\", \"offset\": \"1\"}", 400),
        post("{\"table\": \"test_table\", \"limit\": true}", 400),
        post("{\"table\": \"test_table\", \"order_by\": \"id\"}", 400),
        post("{\"table\": \"test_table\", \"order_by\": {\"column\": 1}}", 400),
        // Huge, negative and fractional numbers.
        post("{\"table\": \"test_table\", \"offset\": -1}", 400),
        post("{\"table\": \"test_table\", \"limit\": -1}", 400),
        post("{\"table\": \"test_table\", \"limit\": 1e3}", 400),
        post("{\"table\": \"test_table\", \"offset\": 18446744073709551616}", 400),
        post("{\"table\": \"test_table\", \"offset\": 18446744073709551615}", 400),
        post("{\"table\": \"test_table\", \"limit\": 1000000}", 400),
        // Unknown fields.
        post("{\"table\": \"test_table\", \"where\": \"1=1\"}", 400),
        post("{\"table\": \"test_table\", \"order_by\": {\"column\": \"id\", \"nulls\": \"first\"}}", 400),
        // Over the size cap.
        post(format!("{{\"table\": \"{}\"}}", "x".repeat(70_000)), 413),
        // Quotes, semicolons, comments, subqueries, unicode, long identifiers.
        table("test_table'", 400),
        table("\"test_table", 400),
        table("test_table\"; DROP TABLE test_table; --", 400),
        table("test_table; DROP TABLE test_table", 400),
        table("test_table -- comment", 400),
        table("test_table/* c */", 400),
        table("(SELECT * FROM pg_shadow) x", 400),
        table("pg_catalog.pg_authid", 403),
        table("tést", 400),
        table("\"tést\"", 404),
        table("\u{0}", 400),
        table(&long, 400),
        table(&format!("public.{long}"), 400),
        table("public.", 400),
        table("", 400),
        order_by("id; DROP TABLE test_table", 404),
        order_by("(SELECT 1)", 404),
        order_by("id -- x", 404),
        order_by(&long, 400),
        order_by("", 400),
        post("{\"table\": \"test_table\", \"order_by\": {\"column\": \"id\", \"order\": \"ASC, (SELECT 1)\"}}", 400),
        // Wrong methods and unknown paths.
        req("POST", "/v1/init", 405),
        req("DELETE", "/v1/init", 405),
        req("GET", "/v1/snapshot/data", 405),
        req("PUT", "/v1/lr/stream", 405),
        // `GET /` is the viewer's page.
        req("GET", "/nope", 404),
        req("POST", "/", 405),
        req("GET", "/assets/nope.js", 404),
        req("GET", "/assets/%2e%2e%2fviewer.rs", 404),
        req("GET", "/v1/../etc/passwd", 404),
        req("GET", "/v2/init", 404),
        // The websocket endpoint without upgrade headers, and odd slot names.
        req("GET", "/v1/lr/stream?slotName=delta_face56", 400),
        req("GET", "/v1/lr/stream", 400),
        req("GET", "/v1/lr/stream?slotName=", 400),
    ]
}

fn upgrade_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
}

fn odd_slot_names() -> Vec<(String, u16)> {
    vec![
        ("delta_nosuch1".into(), 404),
        ("DELTA_FACE56".into(), 400),
        ("delta_face56'".into(), 400),
        ("delta_face56%22%3B%20DROP".into(), 400),
        ("pg_catalog".into(), 400),
        ("not_ours".into(), 400),
        ("delta_".into(), 400),
        ("delta_%C3%A9t%C3%A91".into(), 400),
        (format!("delta_{}1", "a".repeat(70)), 400),
        ("delta_face56&slotName=delta_other1".into(), 400),
        ("delta_face56&format=xml".into(), 400),
    ]
}

async fn setup() -> (tokio_postgres::Client, TestServer) {
    let db = common::fresh_db().await;
    let pg = db.client().await;
    pg.batch_execute("CREATE TABLE test_table (id serial PRIMARY KEY, name text); INSERT INTO test_table (name) VALUES ('abc'), ('abc1');")
        .await
        .unwrap();
    (pg, TestServer::start(&db).await)
}

async fn assert_still_serving(server: &TestServer, pg: &tokio_postgres::Client, after: &str) {
    let (status, rows) = server.snapshot(json!({"table": "test_table", "limit": 1})).await;
    assert_eq!((status, rows), (200, json!([{"id": 1, "name": "abc"}])), "after {after}");
    let n: i64 = pg.query_one("SELECT count(*) FROM test_table", &[]).await.unwrap().get(0);
    assert_eq!(n, 2, "no table changed, after {after}");
}

#[tokio::test]
async fn every_bad_http_request_gets_its_json_error() {
    let (pg, server) = setup().await;
    server.init().await;
    let mut cases = http_cases();
    for (name, status) in odd_slot_names() {
        cases.push(Case {
            method: "GET",
            path: format!("/v1/lr/stream?slotName={name}"),
            headers: upgrade_headers(),
            body: vec![],
            status,
        });
    }
    assert!(cases.len() >= 60, "the catalogue has {} cases", cases.len());
    for case in &cases {
        let (status, body) = raw_request(server.addr, case.method, &case.path, &case.headers, case.body.clone()).await;
        let what = format!(
            "{} {} {:?}",
            case.method,
            case.path,
            String::from_utf8_lossy(&case.body[..case.body.len().min(80)])
        );
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{what}: not JSON: {}", String::from_utf8_lossy(&body)));
        assert_eq!(status, case.status, "{what}: {json}");
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: {json}");
        assert_still_serving(&server, &pg, &what).await;
    }
    server.stop().await;
}

/// Bad input on an open stream: each gets an error message (or, for what the protocol
/// forbids, a close with a reason), and the stream or the next one goes on.
#[tokio::test]
async fn bad_websocket_input_is_answered_and_harmless() {
    let (pg, server) = setup().await;
    let slot = server.init().await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('x')", &[]).await.unwrap();
    let first = next_changes(&mut ws).await;
    let lsn = first["nextlsn"].as_str().unwrap().to_owned();
    ack(&mut ws, &lsn).await;
    await_confirmed(&pg, &slot, &lsn).await;

    let bad_texts = [
        "",
        "{",
        "{\"lsn\":",
        "null",
        "42",
        "[\"0/1\"]",
        "{\"lsn\": 12345}",
        "{\"lsn\": null}",
        "{\"LSN\": \"0/1\"}",
        "{\"lsn\": \"\"}",
        "{\"lsn\": \"0/\"}",
        "{\"lsn\": \"/1\"}",
        "{\"lsn\": \"0x1/1\"}",
        "{\"lsn\": \"-1/1\"}",
        "{\"lsn\": \"123456789/1\"}",
        "{\"lsn\": \"0/1/2\"}",
        "{\"lsn\": \"ü/1\"}",
        "{\"lsn\": \"0/1\"}",
        "{\"lsn\": \"FFFFFFFF/FFFFFFFF\"}",
    ];
    for text in bad_texts {
        ws.send(Message::Text(text.into())).await.unwrap();
        let reply = next_json(&mut ws).await;
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("ack")), "{text:?}: {reply}");
    }
    ws.send(Message::Binary(vec![0u8; 10].into())).await.unwrap();
    assert!(next_json(&mut ws).await["error"].as_str().unwrap().contains("binary"));
    // A ping flood: answered by pongs, nothing breaks.
    for _ in 0..500 {
        ws.feed(Message::Ping(vec![1, 2, 3].into())).await.unwrap();
    }
    ws.flush().await.unwrap();
    pg.execute("INSERT INTO test_table (name) VALUES ('after the flood')", &[]).await.unwrap();
    let next = next_changes(&mut ws).await;
    assert_eq!(next["change"][0]["columnvalues"][1], "after the flood");
    assert!(confirmed_flush_below(&pg, &slot, "FFFFFFFF/0").await, "no bad ack was applied");
    pg.execute("DELETE FROM test_table WHERE name IN ('x', 'after the flood')", &[]).await.unwrap();

    // An oversized message: closed with 1009 and a reason; the slot is free again.
    ws.send(Message::Text("x".repeat(100_000).into())).await.ok();
    let (code, reason) = await_close(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");
    drop(ws);
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let mut ws = server.connect(&slot).await;
    let again = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("stream works again");
    assert!(again.is_some());
    assert_still_serving(&server, &pg, "websocket abuse").await;
    server.stop().await;
}

async fn confirmed_flush_below(pg: &tokio_postgres::Client, slot: &str, lsn: &str) -> bool {
    pg.query_one(
        "SELECT confirmed_flush_lsn < $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot, &lsn],
    )
    .await
    .unwrap()
    .get(0)
}

/// Frames that break RFC 6455 get the close code it names (section 7.4.1): 1002 for a
/// protocol violation, 1007 for a text message that is not UTF-8. Each close is on
/// record in `/v1/sessions`, and the slot is free again.
#[tokio::test]
async fn broken_frames_get_the_close_codes_of_rfc_6455() {
    let (pg, server) = setup().await;
    let slot = server.init().await;
    // Frames from a client are masked; a zero mask leaves the payload as it is.
    let not_utf8 = [0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe];
    let reserved_bit = [0xC1, 0x80, 0, 0, 0, 0];
    for (frame, expected) in [(&not_utf8[..], 1007), (&reserved_bit[..], 1002)] {
        let mut tcp = raw_websocket(&server, &slot).await;
        tcp.write_all(frame).await.unwrap();
        let (code, reason) = read_close(&mut tcp).await;
        assert_eq!(code, expected, "{reason}");
        await_slot(&pg, &slot, "inactive", "NOT active").await;
        let (_, sessions) = server.get("/v1/sessions").await;
        let close = &sessions[0]["lastClose"];
        assert_eq!((&close["by"], &close["code"]), (&json!("server"), &json!(expected)), "{sessions}");
    }
    assert_still_serving(&server, &pg, "broken frames").await;
    server.stop().await;
}

/// A websocket opened by hand, to send what no client library would.
async fn raw_websocket(server: &TestServer, slot: &str) -> tokio::net::TcpStream {
    testkit::raw::websocket(server.addr, &format!("/v1/lr/stream?slotName={slot}")).await
}

/// Reads the server's (unmasked) frames until its close frame: its code and reason.
async fn read_close(tcp: &mut tokio::net::TcpStream) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (head, payload) = testkit::raw::frame(tcp).await;
            if head & 0x0f == 0x8 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
            }
        }
    })
    .await
    .expect("a close frame within 20 s")
}

/// Only GET creates a session: axum answers HEAD with the GET handler unless told.
#[tokio::test]
async fn head_on_init_is_refused_and_leaves_the_session_alone() {
    let (pg, server) = setup().await;
    let slot = server.init().await;
    let reply = exchange(server.addr, b"HEAD /v1/init HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
    assert_eq!(header(&reply, "allow"), Some("GET"), "{reply}");
    assert_eq!(header(&reply, "content-type"), Some("application/json"), "{reply}");
    // Every other method gets the same answer.
    let (status, body) = raw_request(server.addr, "PUT", "/v1/init", &[], vec![]).await;
    assert_eq!(status, 405);
    assert!(String::from_utf8_lossy(&body).contains("method PUT is not allowed"));

    let (status, sessions) = server.get("/v1/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 1, "HEAD created a slot: {sessions:?}");
    assert_eq!(sessions[0]["slotName"], slot.as_str());
    assert_eq!(sessions[0]["default"], true);
    assert_eq!(sessions[0]["snapshot"], "held");
    assert_still_serving(&server, &pg, "HEAD /v1/init").await;
    server.stop().await;
}

/// RFC 6455 4.2.1: the key must be the base64 of 16 bytes.
#[tokio::test]
async fn a_bad_websocket_key_is_refused() {
    let (pg, server) = setup().await;
    let slot = server.init().await;
    let path = format!("/v1/lr/stream?slotName={slot}");
    let bad_keys = [
        "",
        "x",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZQ=",
        "dGhlIHNhbXBsZSBub25jZR==",
        "dGhlIHNhbXBsZSBub25j-Q==",
        "dGhlIHNhbXBsZSBub25jZSBub25jZQ==",
        "not base64 at all, not!!",
    ];
    for key in bad_keys {
        let mut headers = upgrade_headers();
        headers.retain(|(k, _)| *k != "sec-websocket-key");
        headers.push(("sec-websocket-key", key));
        let (status, body) = raw_request(server.addr, "GET", &path, &headers, vec![]).await;
        let json: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{key:?}: not JSON: {}", String::from_utf8_lossy(&body)));
        assert_eq!(status, 400, "{key:?}: {json}");
        assert!(json["error"].as_str().is_some_and(|e| e.contains("Sec-WebSocket-Key")), "{key:?}: {json}");
    }
    // A good key still upgrades, and the refusals left the slot free.
    let (status, _) = raw_request(server.addr, "GET", &path, &upgrade_headers(), vec![]).await;
    assert_eq!(status, 101);
    await_slot(&pg, &slot, "inactive", "NOT active").await;
    let mut ws = server.connect(&slot).await;
    pg.execute("INSERT INTO test_table (name) VALUES ('keyed')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "keyed");
    server.stop().await;
}

/// A websocket handshake to `path` with these extra headers: Ok, or the refusal's
/// status and JSON body.
async fn handshake(
    server: &TestServer,
    path: &str,
    headers: &[(&str, String)],
) -> Result<Ws, (u16, serde_json::Value)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{}{path}", server.addr).into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        request.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((resp.status().as_u16(), serde_json::from_slice(&body).unwrap_or_default()))
        }
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

/// DNS rebinding: a page of evil.example, its name now pointing at us, is refused
/// (421, JSON); our addresses and localhost are served. Every answer says nosniff.
#[tokio::test]
async fn without_auth_a_request_for_another_host_name_is_refused() {
    let (_pg, server) = setup().await;
    let slot = server.init().await;
    let port = server.addr.port();
    for host in [format!("evil.example:{port}"), "evil.example".into(), format!("localhost.evil.example:{port}")] {
        let request = format!("GET /v1/sessions HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        let reply = exchange(server.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 421 "), "{host}: {reply}");
        assert!(json_body(&reply)["error"].as_str().unwrap().contains("evil.example"), "{reply}");
        assert_eq!(header(&reply, "x-content-type-options"), Some("nosniff"), "{reply}");
    }
    let stream = format!("/v1/lr/stream?slotName={slot}");
    let rebound = handshake(&server, &stream, &[("host", format!("evil.example:{port}"))]).await;
    assert_eq!(rebound.err().map(|e| e.0), Some(421));
    for host in [server.addr.to_string(), format!("localhost:{port}"), format!("[::1]:{port}"), "127.0.0.1".into()] {
        let request = format!("GET /v1/sessions HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        let reply = exchange(server.addr, request.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 200 "), "{host}: {reply}");
        assert_eq!(header(&reply, "x-content-type-options"), Some("nosniff"), "{reply}");
    }
    server.stop().await;
}

/// What a page of another origin makes a browser send, by hand: its websockets are
/// refused (403), its text/plain POST too (the session is not created), and a
/// cross-site GET of /v1/init leaves the default session alone. A client that is no
/// browser (no Origin) and curl's GET /v1/init are served.
#[tokio::test]
async fn requests_from_other_origins_are_refused_and_clients_without_origin_served() {
    let (pg, server) = setup().await;
    let slot = server.init().await;
    let port = server.addr.port();
    let stream = format!("/v1/lr/stream?slotName={slot}");
    for origin in ["http://evil.example".to_owned(), format!("http://localhost:{}", port + 1), "null".into()] {
        let refused = handshake(&server, &stream, &[("origin", origin.clone())]).await;
        let (status, body) = refused.err().unwrap_or_else(|| panic!("{origin}: upgraded"));
        assert_eq!(status, 403, "{origin}: {body}");
        assert!(body["error"].as_str().unwrap().contains("origin"), "{body}");
    }
    // Its own origin (the viewer's), and none at all, are served.
    let own = handshake(&server, &stream, &[("origin", format!("http://{}", server.addr))]).await;
    drop(own.expect("the server's own origin"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ws = loop {
        match handshake(&server, &stream, &[]).await {
            Ok(ws) => break ws,
            Err((409, _)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("a client without Origin: {e:?}"),
        }
    };
    pg.execute("INSERT INTO test_table (name) VALUES ('no origin')", &[]).await.unwrap();
    assert_eq!(next_changes(&mut ws).await["change"][0]["columnvalues"][1], "no origin");
    drop(ws);

    let create = br#"{"name":"evil","tables":["public.test_table"]}"#.to_vec();
    let (status, body) =
        raw_request(server.addr, "POST", "/v2/sessions", &[("content-type", "text/plain")], create.clone()).await;
    assert_eq!(status, 415, "{}", String::from_utf8_lossy(&body));
    let form = [("content-type", "application/x-www-form-urlencoded"), ("origin", "http://evil.example")];
    assert_eq!(raw_request(server.addr, "POST", "/v2/sessions", &form, create.clone()).await.0, 403);
    let (_, sessions) = server.get("/v2/sessions").await;
    assert!(sessions.as_array().unwrap().iter().all(|s| s["name"] != "evil"), "a session was created: {sessions}");

    for (name, value) in
        [("sec-fetch-site", "cross-site"), ("sec-fetch-site", "same-site"), ("origin", "http://evil.example")]
    {
        let (status, body) = raw_request(server.addr, "GET", "/v1/init", &[(name, value)], vec![]).await;
        assert_eq!(status, 403, "{name}: {value}: {}", String::from_utf8_lossy(&body));
    }
    let slots: Vec<String> = database_slots(&pg).await;
    assert_eq!(slots, vec![slot.clone()], "the default session is the same");
    // curl localhost:12312/v1/init, and a typed URL (Sec-Fetch-Site: none), still reset it.
    let (status, _) = raw_request(server.addr, "GET", "/v1/init", &[("sec-fetch-site", "none")], vec![]).await;
    assert_eq!(status, 200);
    assert_ne!(server.init().await, slot);
    server.stop().await;
}

/// Origins listed in the settings are served as the server's own.
#[tokio::test]
async fn listed_origins_are_served() {
    let db = common::fresh_db().await;
    let mut settings = fast_settings(&db);
    settings.http.guard =
        pgdeltastream::server::Guard::new(&["https://dash.example".into()], &["pgds.internal".into()]).unwrap();
    let server = TestServer::start_with(settings).await;
    let slot = server.init().await;
    let stream = format!("/v1/lr/stream?slotName={slot}");
    let listed = [("origin", "https://dash.example".to_owned()), ("sec-fetch-site", "cross-site".into())];
    drop(handshake(&server, &stream, &listed).await.expect("a listed origin"));
    let other = handshake(&server, &stream, &[("origin", "https://dash.example:8443".to_owned())]).await;
    assert_eq!(other.err().map(|e| e.0), Some(403));
    let named = "GET /v1/sessions HTTP/1.1\r\nhost: pgds.internal:12312\r\nconnection: close\r\n\r\n";
    assert!(exchange(server.addr, named.as_bytes()).await.starts_with("HTTP/1.1 200 "));
    server.stop().await;
}
