//! The subcommands beside the server (which runs when none is given): the JetStream
//! publisher and gateway. They take the server's flags where those apply (Postgres for
//! the publisher, the listen address and limits for the gateway).

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::bus::publish::PublishSettings;

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Own a v2 session's slot and publish its transactions to a NATS JetStream stream
    /// (PGDELTASTREAM_<SESSION>, subject pgdeltastream.<session>).
    Publish(PublishArgs),
    /// Serve the websocket API (/v1/lr/stream, /v2/sessions/{name}/stream) from the
    /// JetStream streams that publishers fill.
    Gateway(GatewayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    /// NATS server URL, e.g. nats://localhost:4222.
    #[arg(long, env = "PGDELTASTREAM_NATS_URL")]
    pub nats: String,
    /// The v2 session (POST /v2/sessions) whose slot to publish.
    #[arg(long, env = "PGDELTASTREAM_SESSION")]
    pub session: String,
    /// The stream lets go of messages older than this many seconds (0: never).
    #[arg(long, env = "PGDELTASTREAM_NATS_MAX_AGE", default_value_t = 7 * 24 * 3600)]
    pub nats_max_age: u64,
    /// The stream keeps at most this many bytes, dropping the oldest (0: no limit).
    #[arg(long, env = "PGDELTASTREAM_NATS_MAX_BYTES", default_value_t = 0)]
    pub nats_max_bytes: u64,
    /// The stream keeps at most this many messages, dropping the oldest (0: no limit).
    #[arg(long, env = "PGDELTASTREAM_NATS_MAX_MSGS", default_value_t = 0)]
    pub nats_max_msgs: u64,
    /// JetStream drops a message published again within this many seconds by its id.
    #[arg(long, env = "PGDELTASTREAM_NATS_DUPLICATE_WINDOW", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub nats_duplicate_window: u64,
    /// Publishes awaiting JetStream's acknowledgement at once.
    #[arg(long, env = "PGDELTASTREAM_NATS_PUBLISH_WINDOW", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub nats_publish_window: u64,
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// NATS server URL, e.g. nats://localhost:4222.
    #[arg(long, env = "PGDELTASTREAM_NATS_URL")]
    pub nats: String,
}

impl PublishArgs {
    pub fn settings(&self) -> PublishSettings {
        let limit = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        PublishSettings {
            nats: self.nats.clone(),
            session: self.session.clone(),
            max_age: Duration::from_secs(self.nats_max_age),
            max_bytes: limit(self.nats_max_bytes),
            max_msgs: limit(self.nats_max_msgs),
            duplicate_window: Duration::from_secs(self.nats_duplicate_window),
            window: usize::try_from(self.nats_publish_window).unwrap_or(256),
        }
    }
}
