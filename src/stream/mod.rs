//! The stream: a pipeline of small stages between a replication slot and a sink.
//!
//! ```text
//!   Postgres ──XLogData──▶ pump ──messages──▶ sink ──▶ websocket: frames of --frame-size ──▶ client
//!      ▲                    ▲   (decoder)               JetStream: pieces of max_payload
//!      └──status updates────┴────────── acks ◀──────── (the client's, or JetStream's) ◀──┘
//! ```
//!
//! - [`pump`] owns the replication connection: it reads the plugin's output, has the
//!   decoder turn it into messages ([`message`]: a start, bodies, a finish with the
//!   `nextlsn`, kind and change count), tracks positions on them, hands them on through
//!   a bounded channel (so a slow client slows the reading from Postgres instead of
//!   filling memory) and sends standby status updates for acks, on a timer and when
//!   asked, also while the channel is full. Passing failures are tried again
//!   ([`error`]).
//! - [`decode`] is the decoder, whatever the plugin: the wal2json [`frame::Assembler`]
//!   classifies wal2json's text without re-serialising it ([`binary_message`] mends
//!   logical messages whose content is not UTF-8); [`pgoutput`] renders pgoutput's
//!   messages as wal2json's and knows what each is.
//! - [`sink`] is the contract of the far end; [`socket`], a websocket client, is one: the
//!   writer cuts messages into frames ([`framer`]) and sends them and pings, the reader
//!   parses and checks acks ([`ack`]) and notices dead peers. The JetStream publisher
//!   ([`crate::bus::publish`]) is another.
//! - [`plugin`] is the output plugin: its name, its start options, its decoder.
//! - [`observer`] is the sink of a viewer watching a session from a slot of its own.
//! - [`stop`] is how any stage (or `/v1/init`, or shutdown) ends all of them, with a
//!   reason the client is told.

pub mod ack;
pub(crate) mod backfill;
pub(crate) mod binary_message;
pub(crate) mod ddl;
pub mod decode;
pub mod error;
pub(crate) mod filter;
pub mod frame;
pub mod framer;
pub(crate) mod marks;
pub mod message;
pub mod observer;
pub(crate) mod partitions;
pub mod pgoutput;
pub(crate) mod plugin;
pub(crate) mod progress;
pub(crate) mod pump;
pub(crate) mod reconfigure;
pub(crate) mod sink;
pub mod socket;
pub(crate) mod stop;

pub use stop::Stop;
