//! The accept loop: one task per connection, every task tracked, at most `cap` client
//! connections (websockets included) at a time.
//!
//! A client past the cap gets a quick `503 {"error":...}` with `Retry-After: 1` and the
//! connection closed (on a TLS port a fatal TLS alert instead: plaintext there would be
//! an answer no TLS client can read, and one that a proxy or a client treating the
//! port as plain HTTP would take as the server's), rather than a place in a backlog
//! that never moves; while many are
//! being refused at once, the rest are closed without an answer, so that refusing costs
//! only a few descriptors. Accept errors (out of descriptors or memory, aborted
//! connections) back off from 10 ms to 1 s and are logged at most once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{HttpSettings, conn};

/// Refusals in progress at once; each holds a descriptor for up to a second.
const MAX_REFUSING: usize = 32;
/// How long a refusal waits for the client to take its answer and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts until `stop` is cancelled, then waits for every connection task to end
/// (idle ones end at once, in-flight requests finish).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    cap: usize,
    stop: CancellationToken,
) {
    let places = Arc::new(Semaphore::new(cap));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    let builder = Arc::new(conn::builder(&settings));
    let settings = Arc::new(settings);
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::default();
    let mut accept_errors = Throttle::default();
    let mut at_cap = Throttle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff.reset();
                tcp
            }
            Err(e) => {
                let delay = backoff.next();
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::warn!(error = %e, suppressed, retry_ms = delay.as_millis() as u64, "cannot accept connections");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        // Frames are small and latency matters: no Nagle delay on client sockets.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        match places.clone().try_acquire_owned() {
            Ok(place) => {
                tasks.spawn(conn::serve(tcp, place, app.clone(), builder.clone(), settings.clone(), stop.clone()));
            }
            Err(_) => {
                if let Some(suppressed) = at_cap.allow() {
                    tracing::warn!(cap, suppressed, "at the connection cap: refusing connections with 503");
                }
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let answer = if settings.tls.is_some() { TLS_REFUSAL } else { REFUSAL };
                    tasks.spawn(refuse(tcp, answer, permit));
                }
            }
        }
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// The answer past the cap.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 72\r\n\r\n\
{\"error\":\"the server is at its connection limit; try again in a moment\"}";

/// The answer past the cap on a TLS port: a TLS record (RFC 8446 6, 5.1): alert, TLS
/// 1.2 framing, 2 bytes, fatal, internal_error. TLS has no "try again later"; a client
/// reports the alert where a plaintext answer would be a garbled record.
const TLS_REFUSAL: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];

/// Answers (503, or a TLS alert) and closes. The request is not read, but what the
/// client sent is drained for a moment after our answer: closing on unread data sends
/// a reset, which can destroy the answer before the client has read it.
async fn refuse(mut tcp: TcpStream, answer: &'static [u8], _permit: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        tcp.write_all(answer).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// 10 ms, doubling to 1 s.
#[derive(Debug, Default)]
struct Backoff {
    last: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let next = self.last.map_or(Duration::from_millis(10), |d| (d * 2).min(Duration::from_secs(1)));
        self.last = Some(next);
        next
    }
    fn reset(&mut self) {
        self.last = None;
    }
}

/// Lets a log line through at most once a second, counting the ones it held back.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// Some(number held back since the last one) when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(10));
    }

    #[test]
    fn throttle_lets_one_line_a_second_through() {
        let mut t = Throttle::default();
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(t.allow(), Some(2));
    }

    #[test]
    fn refusal_is_a_whole_json_response() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}\r\n", body.len()))
                || head.ends_with(&format!("content-length: {}", body.len()))
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(json["error"].as_str().unwrap().contains("connection limit"));
    }
}
