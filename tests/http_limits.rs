//! The HTTP server's limits, seen from raw TCP clients: what a request that is too large
//! gets, and that slow, idle or too many connections cannot take the server offline.

mod common;
mod support;

use std::time::Duration;

use support::*;

async fn server() -> TestServer {
    TestServer::start(&common::fresh_db().await).await
}

fn assert_json_error(reply: &str, status: &str) {
    assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply:?}");
    assert_eq!(header(reply, "content-type"), Some("application/json"), "{reply:?}");
    let json = json_body(reply);
    assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{reply:?}");
}

/// A declared body over the cap is refused before it is sent: no `100 Continue` first.
#[tokio::test]
async fn a_declared_body_over_the_cap_is_refused_at_once() {
    let server = server().await;
    let head = "POST /v1/snapshot/data HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 10000000\r\nexpect: 100-continue\r\n\r\n";
    let started = std::time::Instant::now();
    let reply = exchange(server.addr, head.as_bytes()).await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_json_error(&reply, "413");
    assert!(!reply.contains("100 Continue"), "{reply:?}");
    assert_eq!(header(&reply, "connection"), Some("close"), "{reply:?}");
    assert!(json_body(&reply)["error"].as_str().unwrap().contains("10000000"), "{reply:?}");
    // Without Expect too, and a body within the cap is still read.
    let head = "POST /v1/snapshot/data HTTP/1.1\r\nhost: x\r\ncontent-length: 65537\r\n\r\n{";
    assert_json_error(&exchange(server.addr, head.as_bytes()).await, "413");
    let (status, body) = server.post("/v1/snapshot/data", &format!("{{\"table\":\"{}\"}}", "x".repeat(60_000))).await;
    assert_eq!(status, 400, "{body}");
    server.stop().await;
}
