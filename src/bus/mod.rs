//! Scale-out through NATS JetStream: one publisher owns a session's slot and stores
//! each transaction in a JetStream stream; any number of gateways serve the websocket
//! API from that stream, so one slot feeds clients on many machines.
//!
//! ```text
//!   Postgres ──slot──▶ publisher ──PubAck──▶ JetStream stream PGDELTASTREAM_<SESSION>
//!      ▲                  │                     │ subject pgdeltastream.<session>
//!      └── confirm ◀──────┘                     ├──▶ gateway ──▶ websocket clients
//!                                               └──▶ gateway ──▶ websocket clients
//!   client acks ──▶ gateway ──▶ KV bucket pgdeltastream_acks (<session>.<client>)
//! ```
//!
//! - [`publish`]: the publisher, a [`crate::stream::sink::Sink`] that publishes and
//!   confirms to Postgres only what JetStream acknowledged.
//! - [`gateway`]: a client's feed from the stream, resumed after its last ack.
//! - [`hub`]: one subscription per session and gateway, shared by its clients.
//! - [`acks`]: the clients' acks in a KV bucket, shared by every gateway.
//! - [`message`]: what a stored message carries (headers, pieces).

pub mod acks;
pub mod gateway;
pub mod hub;
pub mod message;
pub mod publish;

use crate::error::{Error, ErrorKind};

/// The client of a connection that names none: every such connection shares one
/// position, as the original's one consumer per slot.
pub(crate) const DEFAULT_CLIENT: &str = "default";

/// The JetStream stream of a session. Session names are `[a-z][a-z0-9_]*`, so the
/// upper-cased name is a valid stream name and maps back to one session only.
pub(crate) fn stream_name(session: &str) -> String {
    format!("PGDELTASTREAM_{}", session.to_ascii_uppercase())
}

/// The subject a session's transactions are published on.
pub(crate) fn subject(session: &str) -> String {
    format!("pgdeltastream.{session}")
}

/// Client ids are KV key tokens: 1 to 64 of `A-Z a-z 0-9 _ -`.
pub(crate) fn check_client(client: &str) -> Result<(), Error> {
    let ok =
        (1..=64).contains(&client.len()) && client.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!("invalid client {client:?}: use 1 to 64 characters A-Z, a-z, 0-9, _ and -")))
    }
}

/// Connects to NATS; the client reconnects by itself after that.
pub async fn connect(url: &str) -> Result<async_nats::Client, Error> {
    async_nats::ConnectOptions::new()
        .name("pgdeltastream")
        .connect(url)
        .await
        .map_err(|e| Error::new(ErrorKind::Unavailable, format!("cannot connect to NATS at {url}: {e}")))
}

/// A NATS or JetStream failure, as a 503: the bus is down or overloaded.
pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(stream_name("orders_2"), "PGDELTASTREAM_ORDERS_2");
        assert_eq!(subject("orders_2"), "pgdeltastream.orders_2");
        for ok in ["a", "billing-1", "B_2", &"x".repeat(64)] {
            assert!(check_client(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "a b", "*", ">", "é", &"x".repeat(65)] {
            assert!(check_client(bad).is_err(), "{bad}");
        }
    }
}
