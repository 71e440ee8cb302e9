//! Clients' acks, kept in a JetStream KV bucket so that they survive a gateway and are
//! seen by every gateway: key `<session>.<client>` (a client of a token's `sub`:
//! `<session>.<sha256 of sub>.<client>`), value the acked LSN and the stream
//! sequence of the message that ended at it (where the client resumes after).
//! Also the slot a session's publisher reads, for `/v1/lr/stream?slotName=`, and the
//! session's incarnation: the slot its stream was published from. A session deleted
//! and made again under its name has a new slot, so its stream starts anew and no
//! client's position in the old one carries over.

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::unavailable;
use crate::error::Error;
use crate::types::Lsn;

pub(crate) const ACKS_BUCKET: &str = "pgdeltastream_acks";
/// Key `slot.<slot name>`, value the session's name; key `session.<name>`, value the
/// slot of the session's stream. Both written by the publisher.
pub(crate) const SLOTS_BUCKET: &str = "pgdeltastream_slots";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    pub lsn: Lsn,
    /// The stream sequence of the last message at or below `lsn`.
    pub seq: u64,
    /// The slot of the session's stream the position is in (absent in records stored
    /// before incarnations were recorded: those are taken as the current one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
}

/// The bucket, created on first use (by whichever process comes first). Created as
/// the stream a KV bucket is, rather than with `create_key_value`: that first asks for
/// the account's info, whose reply from a 2.9 server async-nats cannot parse.
pub async fn bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, Error> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        duplicate_window: std::time::Duration::from_secs(120),
        ..Default::default()
    };
    // Another process may create it meanwhile: the same config is no conflict.
    js.get_or_create_stream(config).await.map_err(|e| unavailable(&format!("cannot create KV bucket {name}"), e))?;
    js.get_key_value(name).await.map_err(|e| unavailable(&format!("cannot open KV bucket {name}"), e))
}

/// A `sub` can hold any character and be long; KV keys take only `[-/_=.A-Za-z0-9]`,
/// so an owner is named by its hash. Two parts or three: no owner's key is another's.
pub fn key(session: &str, client: &str, owner: Option<&str>) -> String {
    match owner {
        None => format!("{session}.{client}"),
        Some(owner) => {
            use std::fmt::Write;
            let mut key = format!("{session}.");
            for b in ring::digest::digest(&ring::digest::SHA256, owner.as_bytes()).as_ref() {
                let _ = write!(key, "{b:02x}");
            }
            let _ = write!(key, ".{client}");
            key
        }
    }
}

pub async fn load(store: &kv::Store, key: &str) -> Result<Option<AckRecord>, Error> {
    let value = store.get(key).await.map_err(|e| unavailable("cannot read acks from JetStream", e))?;
    match value {
        None => Ok(None),
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(e) => Err(Error::internal(format!("the ack record {key} in {ACKS_BUCKET} does not parse: {e}"))),
        },
    }
}

/// Stores `record` unless the stored one is as far or further, compare-and-set on the
/// key's revision: an older connection of the same client (not yet noticed dead, on
/// this gateway or another) must not move its position back.
pub(crate) async fn save(store: &kv::Store, key: &str, record: AckRecord) -> Result<(), Error> {
    let value = Bytes::from(serde_json::to_vec(&record).map_err(|e| Error::internal(e.to_string()))?);
    let mut last_error = String::new();
    for _ in 0..CAS_ATTEMPTS {
        let entry = store.entry(key).await.map_err(|e| unavailable("cannot read acks from JetStream", e))?;
        let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
            Some(entry) => {
                let stored = serde_json::from_slice::<AckRecord>(&entry.value).ok();
                if stored.is_some_and(|s| s.lsn >= record.lsn) {
                    return Ok(());
                }
                store.update(key, value.clone(), entry.revision).await.map(drop).map_err(|e| e.to_string())
            }
            None => store.create(key, value.clone()).await.map(drop).map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(()),
            // Someone wrote it meanwhile: look again.
            Err(e) => last_error = e,
        }
    }
    Err(unavailable("cannot store an ack in JetStream", last_error))
}

/// Writers of one key racing each other get this many tries.
const CAS_ATTEMPTS: usize = 5;

pub(crate) fn slot_key(slot: &str) -> String {
    format!("slot.{slot}")
}

/// Where the slot of a session's stream is recorded.
pub(crate) fn incarnation_key(session: &str) -> String {
    format!("session.{session}")
}

/// The slot the session's stream was published from; none before its first publisher.
pub async fn incarnation(slots: &kv::Store, session: &str) -> Result<Option<String>, Error> {
    let value = slots.get(incarnation_key(session)).await.map_err(|e| unavailable("cannot read from JetStream", e))?;
    Ok(value.and_then(|v| String::from_utf8(v.to_vec()).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_gets_keys_of_its_own_that_nats_accepts() {
        assert_eq!(key("orders", "c1", None), "orders.c1");
        let alice = key("orders", "c1", Some("alice@example.com"));
        let bob = key("orders", "c1", Some("bob"));
        assert_ne!(alice, bob);
        for k in [&alice, &bob] {
            let parts: Vec<&str> = k.split('.').collect();
            assert_eq!(parts.len(), 3, "{k}");
            assert_eq!((parts[0], parts[2]), ("orders", "c1"));
            assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b)), "{k}");
        }
    }
}
