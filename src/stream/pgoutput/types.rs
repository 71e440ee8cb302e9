//! Column type names as wal2json prints them: `format_type(oid, typmod)` as computed
//! in the walsender (`character varying(20)`, `numeric(30,10)`, and a schema only for a
//! type not visible on the search_path). pgoutput sends only oids, so the names are
//! looked up on an ordinary connection, which has the replication connection's
//! settings (the same role, database and startup options: the same search_path), once
//! per (oid, typmod) per stream.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::json;
use crate::pg::pool::Pool;
use crate::stream::error::StreamError;

/// The longest a lookup may take (a pool connection included).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
pub(crate) struct TypeNames {
    /// Each name in its JSON form already.
    names: HashMap<(u32, i32), Vec<u8>>,
}

impl TypeNames {
    /// The pairs of `wanted` not named yet, each once.
    pub fn missing(&self, wanted: impl Iterator<Item = (u32, i32)>) -> Vec<(u32, i32)> {
        let mut seen = HashSet::new();
        wanted.filter(|key| !self.names.contains_key(key) && seen.insert(*key)).collect()
    }

    pub fn insert(&mut self, oid: u32, typmod: i32, name: &str) {
        self.names.insert((oid, typmod), json::type_name(name.as_bytes()));
    }

    pub fn get(&self, oid: u32, typmod: i32) -> Option<Vec<u8>> {
        self.names.get(&(oid, typmod)).cloned()
    }
}

/// `format_type` of each pair, in order. A busy pool or a broken connection is
/// [`StreamError::Transient`]: the pump tries again later.
pub(crate) async fn lookup(pool: &Pool, wanted: &[(u32, i32)]) -> Result<Vec<String>, StreamError> {
    let query = async {
        let client = pool.get().await?;
        let oids: Vec<u32> = wanted.iter().map(|(oid, _)| *oid).collect();
        let typmods: Vec<i32> = wanted.iter().map(|(_, typmod)| *typmod).collect();
        let rows = client
            .query(
                "SELECT pg_catalog.format_type(t, m) FROM unnest($1::pg_catalog.oid[], $2::pg_catalog.int4[]) \
                 WITH ORDINALITY AS u(t, m, i) ORDER BY i",
                &[&oids, &typmods],
            )
            .await?;
        client.release();
        rows.iter().map(|row| row.try_get::<_, String>(0).map_err(StreamError::fatal)).collect::<Result<Vec<_>, _>>()
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT, query).await {
        Ok(Ok(names)) if names.len() == wanted.len() => Ok(names),
        Ok(Ok(_)) => Err(StreamError::Fatal("format_type returned a wrong number of rows".into())),
        Ok(Err(e)) => Err(e.context("cannot look up the column types of a table")),
        Err(_) => Err(StreamError::Transient("looking up the column types of a table timed out".into())),
    }
}
