//! The websocket upgrade, done here rather than with axum's `WebSocketUpgrade` so that
//! the stream gets tokio-tungstenite's socket itself: it can send a transaction as one
//! message in many frames (fragmentation), which axum's `Message` cannot express.
//!
//! The handshake (RFC 6455 section 4.2): a GET with `Connection: upgrade`,
//! `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and a key; we answer 101 with
//! `Sec-WebSocket-Accept` derived from the key, and hyper hands over the connection.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

use super::ApiError;
use crate::error::Error;
use crate::stream::socket::{SocketSettings, WebSocket};

/// The server side of an upgraded connection, with our pings and ack checks.
pub(crate) type Socket = WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

/// Largest message we take from a client: acks are tiny.
const MAX_CLIENT_MESSAGE: usize = 4096;

/// A request that asks for a websocket, checked.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let refuse = |why: &str| ApiError(Error::bad_request(format!("this endpoint is a websocket: {why}")));
        let key = handshake_key(&parts.method, &parts.headers).map_err(refuse)?;
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or_else(|| refuse("this connection cannot be upgraded"))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and runs `serve` on the socket once hyper has switched protocols, in
    /// a task of `tasks` (which shutdown waits for): every websocket of the server and
    /// of the gateway starts here, its messages cut into frames of `frame_bytes`.
    pub fn websocket<F, Fut>(
        self,
        tasks: &TaskTracker,
        settings: SocketSettings,
        frame_bytes: usize,
        serve: F,
    ) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // tungstenite zeroes its read buffer before every read (128 KiB by default); a
        // client sends only small acks, and one read per ack must not cost a large memset.
        let config = WebSocketConfig::default()
            .read_buffer_size(MAX_CLIENT_MESSAGE)
            .max_message_size(Some(MAX_CLIENT_MESSAGE))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE));
        tasks.spawn(async move {
            match self.on_upgrade.await {
                Ok(upgraded) => {
                    let socket =
                        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    serve(WebSocket::new(socket, settings, frame_bytes)).await;
                }
                // The client went away during the handshake; `serve`'s resources drop here.
                Err(e) => tracing::info!(error = %e, "websocket upgrade failed"),
            }
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(self.key.as_bytes())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        response
    }
}

/// The handshake's key, or what makes the request no websocket handshake.
fn handshake_key(method: &Method, headers: &HeaderMap) -> Result<HeaderValue, &'static str> {
    if method != Method::GET {
        return Err("use GET");
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade") {
        return Err("the Connection header must contain \"upgrade\"");
    }
    if !header_has_token(headers, header::UPGRADE, "websocket") {
        return Err("the Upgrade header must be \"websocket\"");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err("Sec-WebSocket-Version must be 13");
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned().ok_or("Sec-WebSocket-Key is missing")?;
    if !is_websocket_key(key.as_bytes()) {
        return Err("Sec-WebSocket-Key must be the base64 of 16 bytes (24 characters ending in ==)");
    }
    Ok(key)
}

/// True when the request is a whole websocket handshake (RFC 6455 4.2.1).
pub(super) fn is_handshake(method: &Method, headers: &HeaderMap) -> bool {
    handshake_key(method, headers).is_ok()
}

/// True when the comma-separated header contains `token` (case-insensitive).
pub(super) fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

/// RFC 6455 4.2.1: the key is the base64 of 16 random bytes: 22 characters of the
/// alphabet, the last of which carries 2 bits and 4 zero bits of padding, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let sextet = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let Some((data, b"==")) = key.split_at_checked(22) else {
        return false;
    };
    data.iter().all(|&c| sextet(c).is_some()) && data.last().and_then(|&c| sextet(c)).is_some_and(|s| s & 0x0f == 0)
}

#[cfg(test)]
mod tests {
    use super::is_websocket_key;

    #[test]
    fn websocket_keys() {
        // The RFC's example, and the extremes of the alphabet.
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_websocket_key(b"AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(is_websocket_key(b"/////////////////////w=="));
        for bad in [
            &b""[..],
            b"x",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=",
            b"dGhlIHNhbXBsZSBub25jZQ===",
            b"dGhlIHNhbXBsZSBub25jZQ==\0",
            b"dGhlIHNhbXBsZSBub25jZR==",
            b"dGhlIHNhbXBsZSBub25jZ===",
            b"dGhlIHNhbXBsZSBub25j-Q==",
            b"dGhlIHNhbXBsZSBub25j Q==",
            b"dGhlIHNhbXBsZSBub25jZQAA",
            b"dGhlIHNhbXBsZSBub25jZSBub25jZQ==",
        ] {
            assert!(!is_websocket_key(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
