//! The stream: a pipeline of small stages between a replication slot and a websocket.
//!
//! ```text
//!   Postgres ──XLogData──▶ pump ──frames──▶ writer ──text frames──▶ client
//!      ▲                    ▲                                         │
//!      └──status updates────┴────────── acks ◀── reader ◀──{"lsn"}────┘
//! ```
//!
//! - [`pump`] owns the replication connection: it reads frames, hands them on through a
//!   bounded channel (so a slow client slows the reading from Postgres instead of
//!   filling memory) and sends standby status updates for acks, on a timer and when
//!   asked, also while the channel is full.
//! - [`sink`] is the far end of the pipeline; [`socket`], a websocket client, is one: the writer sends frames and pings, the reader
//!   parses and checks acks ([`ack`]) and notices dead peers.
//! - [`frame`] turns the plugin's bytes into what the client receives: pieces
//!   classified by the assembler, cut into frames sized by bytes by the framer;
//!   [`binary_message`] mends logical messages whose content is not UTF-8.
//! - [`plugin`] is the output plugin: its name, its start options, its decoder
//!   ([`decode`]); [`pgoutput`] renders pgoutput's messages as wal2json's pieces.
//! - [`observer`] is the sink of a viewer watching a session from a slot of its own.
//! - [`stop`] is how any stage (or `/v1/init`, or shutdown) ends all of them, with a
//!   reason the client is told.

pub mod ack;
pub(crate) mod binary_message;
pub mod decode;
pub(crate) mod filter;
pub mod frame;
pub mod observer;
pub(crate) mod partitions;
pub mod pgoutput;
pub(crate) mod plugin;
pub(crate) mod progress;
pub(crate) mod pump;
pub(crate) mod sink;
pub mod socket;
pub(crate) mod stop;

pub use stop::Stop;
