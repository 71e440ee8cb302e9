//! A session's live backfill: its tables read again, chunk by chunk, into its stream
//! while it runs ([`crate::stream::backfill`] explains the watermarks).
//!
//! The backfill's progress is part of the session's definition, stored, so that it
//! outlives a stream and the process: each table's chunks and rows acked so far and
//! the key the next chunk starts after. A chunk counts once the client has acked the
//! transaction it came in; one sent but not acked when the stream ends is read again
//! by the next stream, as the slot sends again what was not acked. The runner lives
//! as long as the stream it writes watermarks for, and at most [`IN_FLIGHT`] chunks
//! are unacked at a time, so memory is bounded whatever the table's size.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::definition::{Definition, TablePattern, display_pattern};
use super::snapshots::scope_of;
use super::{Registry, names};
use crate::error::{Error, ErrorKind};
use crate::pg::ident::TableRef;
use crate::pg::keyset::live::{LiveTable, live_table, read_chunk};
use crate::stream::backfill::{Backfills, Chunk, ChunkInfo, PREFIX, RowShape, Watermark};
use crate::stream::plugin::Plugin;

/// Chunks written and not yet acked, at most: one travelling to the client while the
/// next travels through the WAL and a third is read.
const IN_FLIGHT: usize = 3;
/// The first chunk's rows; later chunks take as many as fill the chunk size
/// (`backfill_chunk_bytes`) at the rows' size so far.
const FIRST_CHUNK_ROWS: u64 = 1024;
const MAX_CHUNK_ROWS: u64 = 65536;
/// How often the runner looks at acks while it waits for one.
const ACK_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reads chunks while the session streams; waits while it does not.
    Running,
    Done,
    Cancelled,
    Failed,
}

/// A session's backfill, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackfillState {
    pub id: String,
    pub state: Phase,
    pub tables: Vec<TableProgress>,
    /// Rows still to come, as far as Postgres's estimates tell (kept as the tables go).
    #[serde(default)]
    pub estimated_remaining_rows: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableProgress {
    /// `schema.table`.
    pub table: String,
    /// Acked so far.
    pub rows: u64,
    pub chunks: u64,
    /// Postgres's estimate of the table's rows when the backfill started (-1: unknown).
    pub estimated_rows: i64,
    pub done: bool,
    /// The key (as text) the next chunk starts after; None at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<String>>,
}

impl BackfillState {
    /// Rows still to come, as far as the estimates tell.
    pub fn estimated_remaining(&self) -> u64 {
        let left = |t: &TableProgress| if t.done { 0 } else { (t.estimated_rows.max(0) as u64).saturating_sub(t.rows) };
        self.tables.iter().map(left).sum()
    }
}

/// A chunk written and not yet acked.
struct InFlight {
    chunk: u64,
    /// Where the next chunk starts, once this one is acked.
    after: Option<Vec<String>>,
    last: bool,
    /// Known once the stream delivered it.
    delivered: Option<(crate::types::Lsn, u64)>,
}

impl Registry {
    /// `POST /v2/sessions/{name}/backfill`: starts reading `tables` (each one of the
    /// session's, with a primary key) into the session's stream.
    pub(crate) async fn start_backfill(
        self: &Arc<Self>,
        name: &str,
        tables: &[String],
    ) -> Result<BackfillState, Error> {
        let def = self.known(name).await?;
        if def.backfill.as_ref().is_some_and(|b| b.state == Phase::Running) {
            return Err(Error::conflict(format!(
                "session {name} is backfilling already: wait for it, or DELETE /v2/sessions/{name}/backfill"
            )));
        }
        if tables.is_empty() {
            return Err(Error::bad_request("a backfill needs \"tables\": one or more of the session's tables"));
        }
        let ours = self.our_slot(&def.slot_name).await?;
        if ours.plugin == Plugin::Pgoutput && !ours.major.pgoutput_has_messages() {
            return Err(Error::conflict(format!(
                "a backfill needs logical messages in the stream, which pgoutput sends from PostgreSQL 14 \
                 (this server is {}); use a wal2json session",
                ours.major
            )));
        }
        let mut progress = Vec::new();
        let client = self.pool.get().await?;
        for table in tables {
            let live = self.live(&client, &def, table).await?;
            if progress
                .iter()
                .any(|p: &TableProgress| p.table == display_pattern(&live.info.schema, Some(&live.info.name)))
            {
                return Err(Error::bad_request(format!("table {table} is named twice")));
            }
            progress.push(TableProgress {
                table: display_pattern(&live.info.schema, Some(&live.info.name)),
                rows: 0,
                chunks: 0,
                estimated_rows: live.estimate,
                done: false,
                after: None,
            });
        }
        client.release();
        let mut state = BackfillState {
            id: names::backfill_id(),
            state: Phase::Running,
            tables: progress,
            estimated_remaining_rows: 0,
            error: None,
        };
        state.estimated_remaining_rows = state.estimated_remaining();
        self.set_backfill(name, Some(state.clone())).await?;
        if let Some(backfills) = self.with(|s| s.sessions.get(name).and_then(|e| e.stream.backfills.clone())) {
            self.spawn_backfill(name, backfills);
        }
        Ok(state)
    }

    /// `DELETE /v2/sessions/{name}/backfill`: no more chunks; a chunk on its way may
    /// still arrive.
    pub(crate) async fn cancel_backfill(self: &Arc<Self>, name: &str) -> Result<BackfillState, Error> {
        let def = self.known(name).await?;
        let Some(mut state) = def.backfill else {
            return Err(Error::not_found(format!("session {name} has no backfill")));
        };
        if state.state == Phase::Running {
            state.state = Phase::Cancelled;
            self.set_backfill(name, Some(state.clone())).await?;
        }
        Ok(state)
    }

    /// Starts the runner of session `name`'s backfill, if it has one running, for the
    /// stream whose windows are `backfills`.
    pub(super) fn spawn_backfill(self: &Arc<Self>, name: &str, backfills: Backfills) {
        let running = self.with(|s| {
            s.sessions.get(name).is_some_and(|e| e.def.backfill.as_ref().is_some_and(|b| b.state == Phase::Running))
        });
        if !running {
            return;
        }
        let registry = Arc::clone(self);
        let name = name.to_owned();
        self.tasks().spawn(async move {
            let run = names::backfill_id();
            backfills.begin_run(&run);
            let result = registry.run_backfill(&name, &backfills, &run).await;
            backfills.end_run(&run);
            if let Err(e) = result {
                tracing::warn!(session = %name, error = %e, "the backfill failed");
                registry.fail_backfill(&name, &e).await;
            }
        });
    }

    async fn run_backfill(&self, name: &str, backfills: &Backfills, run: &str) -> Result<(), Error> {
        loop {
            let Some(def) = self.with(|s| s.sessions.get(name).map(|e| e.def.clone())) else { return Ok(()) };
            let Some(state) = def.backfill.clone().filter(|b| b.state == Phase::Running) else { return Ok(()) };
            let Some(index) = state.tables.iter().position(|t| !t.done) else {
                return self.finish_backfill(name, &state.id).await;
            };
            if self.runs_here(name, backfills).is_none() {
                return Ok(());
            }
            let table = state.tables[index].clone();
            if !self.backfill_table(&def, &state.id, &table, backfills, run).await? {
                return Ok(());
            }
        }
    }

    /// Reads one table from where its acked chunks end until it is done (true), or the
    /// stream or the backfill ends (false).
    async fn backfill_table(
        &self,
        def: &Definition,
        id: &str,
        progress: &TableProgress,
        backfills: &Backfills,
        run: &str,
    ) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let live = self.live(&client, def, &progress.table).await?;
        let shape = shape_of(&live);
        let key_names: Vec<String> = live.key_at().iter().map(|&i| live.info.columns[i].name.clone()).collect();
        let (mut after, mut chunk, mut limit) = (progress.after.clone(), progress.chunks, FIRST_CHUNK_ROWS);
        let mut in_flight: Vec<InFlight> = Vec::new();
        let mut last_written = false;
        loop {
            let runs = self.settle(def, id, &progress.table, backfills, &mut in_flight).await?;
            if last_written && in_flight.is_empty() {
                client.release();
                return Ok(true);
            }
            if !runs {
                return Ok(false);
            }
            if last_written || in_flight.len() >= IN_FLIGHT {
                tokio::select! {
                    _ = backfills.delivered.notified() => {}
                    _ = tokio::time::sleep(ACK_POLL) => {}
                }
                continue;
            }
            chunk += 1;
            backfills.open_window(chunk, &live.info.schema, &live.info.name, key_names.clone());
            let mark =
                |high| serde_json::to_string(&Watermark { run: run.to_owned(), chunk, high }).unwrap_or_default();
            emit(&client, &mark(false), false).await?;
            let key_at = live.key_at();
            let width = live.info.columns.len();
            let (mut buffer, mut rows, mut keys) = (Vec::with_capacity(1 << 20), Vec::new(), Vec::new());
            let mut next_after: Vec<String> = vec![String::new(); key_at.len()];
            let read = read_chunk(&client, &live, after.as_deref(), limit, |row| {
                if !buffer.is_empty() {
                    buffer.push(b',');
                }
                let from = buffer.len() as u32;
                shape.render((0..width).map(|i| row.get(i)), &mut buffer, &mut keys);
                rows.push((from, buffer.len() as u32));
                for (text, &i) in next_after.iter_mut().zip(&key_at) {
                    text.clear();
                    text.push_str(row.get(i).unwrap_or_default());
                }
            });
            let count = match read.await {
                Ok(count) => count,
                Err(e) => {
                    backfills.abandon(chunk);
                    return Err(Error::internal(format!("reading a chunk of {}: {e}", progress.table)));
                }
            };
            let last = count < limit;
            limit = next_limit(limit, rows.len(), buffer.len(), self.settings.backfill_chunk_bytes);
            let next_after = (count > 0).then_some(next_after);
            let info = ChunkInfo {
                id: id.to_owned(),
                table: progress.table.clone(),
                chunk,
                part: None,
                more: None,
                rows: 0,
                last,
            };
            let buffer = bytes::Bytes::from(buffer);
            let key_width = key_at.len();
            backfills.fill(chunk, Chunk { info, names: shape.names(), buffer, rows, keys, key_width });
            emit(&client, &mark(true), true).await?;
            after = next_after.or(after);
            in_flight.push(InFlight { chunk, after: after.clone(), last, delivered: None });
            last_written = last;
        }
    }

    /// Notes what was delivered and what the client acked since, and stores the progress
    /// of acked chunks (also after the stream ended: its last acks count). False when
    /// the runner should stop: the stream ended, or the backfill was cancelled or
    /// replaced.
    async fn settle(
        &self,
        def: &Definition,
        id: &str,
        table: &str,
        backfills: &Backfills,
        in_flight: &mut Vec<InFlight>,
    ) -> Result<bool, Error> {
        // Looked at first: once the stream has ended, its acks are all in.
        let runs = self.runs_here(&def.name, backfills).is_some();
        for d in backfills.take_delivered() {
            if let Some(f) = in_flight.iter_mut().find(|f| f.chunk == d.info.chunk) {
                f.delivered = Some((d.nextlsn, d.info.rows));
            }
        }
        let (now, acked) = self.with(|s| {
            let e = s.sessions.get(&def.name);
            (e.map(|e| e.def.clone()), e.and_then(|e| e.progress.last_ack()).map(|(lsn, _)| lsn))
        });
        let Some(mut state) = now.and_then(|d| d.backfill).filter(|b| b.id == id && b.state == Phase::Running) else {
            return Ok(false);
        };
        let mut moved = false;
        while let Some(first) = in_flight.first() {
            let Some((nextlsn, rows)) = first.delivered else { break };
            if acked.is_none_or(|a| a < nextlsn) {
                break;
            }
            if let Some(t) = state.tables.iter_mut().find(|t| t.table == table) {
                t.rows += rows;
                t.chunks = first.chunk;
                t.after = first.after.clone();
                t.done = first.last;
            }
            in_flight.remove(0);
            moved = true;
        }
        if moved {
            self.set_backfill(&def.name, Some(state)).await?;
        }
        Ok(runs)
    }

    /// The session's definition while the stream whose windows are `backfills` runs.
    fn runs_here(&self, name: &str, backfills: &Backfills) -> Option<Definition> {
        self.with(|s| {
            let e = s.sessions.get(name)?;
            e.stream.backfills.as_ref()?.same(backfills).then(|| e.def.clone())
        })
    }

    async fn finish_backfill(&self, name: &str, id: &str) -> Result<(), Error> {
        let def = self.known(name).await?;
        if let Some(mut state) = def.backfill.filter(|b| b.id == id && b.state == Phase::Running) {
            state.state = Phase::Done;
            tracing::info!(session = name, backfill = id, "backfill done");
            self.set_backfill(name, Some(state)).await?;
        }
        Ok(())
    }

    async fn fail_backfill(&self, name: &str, e: &Error) {
        let Ok(def) = self.known(name).await else { return };
        if let Some(mut state) = def.backfill.filter(|b| b.state == Phase::Running) {
            state.state = Phase::Failed;
            state.error = Some(e.message.clone());
            if let Err(e) = self.set_backfill(name, Some(state)).await {
                tracing::warn!(session = name, error = %e, "cannot store the failed backfill");
            }
        }
    }

    /// Stores the session's backfill, and holds it in the session's entry.
    async fn set_backfill(&self, name: &str, mut state: Option<BackfillState>) -> Result<(), Error> {
        if let Some(state) = &mut state {
            state.estimated_remaining_rows = state.estimated_remaining();
        }
        let def = self.with(|s| {
            let e = s.sessions.get_mut(name)?;
            e.def.backfill = state;
            Some(e.def.clone())
        });
        let def = def.ok_or_else(|| Error::not_found(format!("no session named {name}")))?;
        self.remember(&def).await;
        Ok(())
    }

    /// `table`, one of session `def`'s, as a backfill reads it.
    async fn live(&self, client: &tokio_postgres::Client, def: &Definition, table: &str) -> Result<LiveTable, Error> {
        let parsed = match TablePattern::parse(table)? {
            TablePattern::Table(t) => t,
            TablePattern::Schema(_) => {
                return Err(Error::bad_request(format!("{table:?}: a backfill names tables, not schemas")));
            }
        };
        let scope = scope_of(def, None, &self.settings.schema);
        live_table(client, &TableRef { schema: parsed.schema, name: parsed.name }, &scope).await.map_err(|e| match e {
            crate::pg::snapshot::SnapshotError::NoSuchTable(_) => {
                Error::not_found(format!("session {} has no table {table}", def.name))
            }
            crate::pg::snapshot::SnapshotError::Db(db) => Error::from_tokio_pg(&db),
            other => Error::new(ErrorKind::BadRequest, other.to_string()),
        })
    }
}

fn shape_of(live: &LiveTable) -> RowShape {
    let names: Vec<String> = live.info.columns.iter().map(|c| c.name.clone()).collect();
    let oids = live.info.columns.iter().map(|c| c.type_oid).collect();
    let mut shape = RowShape::new(&live.info.schema, &live.info.name, &names, (live.type_names.clone(), oids));
    shape.key_at = live.key_at();
    shape
}

/// The next chunk's rows: as many as fill `target` bytes at this chunk's row size.
fn next_limit(limit: u64, rows: usize, bytes: usize, target: usize) -> u64 {
    if rows == 0 || bytes == 0 {
        return limit;
    }
    let per_row = (bytes / rows).max(1) as u64;
    (target as u64 / per_row).clamp(16, MAX_CHUNK_ROWS).min(limit.saturating_mul(4))
}

/// Writes a watermark. The high one is flushed at once (`synchronous_commit` on): the
/// walsender sends only flushed WAL, and the chunk waits for it.
async fn emit(client: &tokio_postgres::Client, content: &str, flush: bool) -> Result<(), Error> {
    let commit = if flush { "on" } else { "off" };
    client.batch_execute(&format!("BEGIN; SET LOCAL synchronous_commit = {commit}")).await?;
    let written = client.execute("SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)", &[&PREFIX, &content]).await;
    match written {
        Ok(_) => client.batch_execute("COMMIT").await?,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_aim_at_their_size() {
        let target = 4 << 20;
        assert_eq!(next_limit(1024, 1024, 1024 * 100, target), 4096, "grows at most fourfold");
        assert_eq!(next_limit(65536, 65536, 65536 * 1024, target), 4096);
        assert_eq!(next_limit(100, 0, 0, target), 100);
        assert_eq!(next_limit(65536, 65536, 65536, target), MAX_CHUNK_ROWS);
        assert_eq!(next_limit(256, 10, 100 * 1024 * 1024, target), 16);
        assert_eq!(next_limit(1024, 1024, 1024 * 64, 32 << 10), 512);
    }

    #[test]
    fn remaining_rows_come_from_the_estimates() {
        let t = |rows, est, done| TableProgress {
            table: "public.t".into(),
            rows,
            chunks: 1,
            estimated_rows: est,
            done,
            after: None,
        };
        let state = BackfillState {
            id: "b".into(),
            state: Phase::Running,
            tables: vec![t(10, 100, false), t(5, 5, true), t(3, -1, false)],
            estimated_remaining_rows: 0,
            error: None,
        };
        assert_eq!(state.estimated_remaining(), 90);
    }
}
