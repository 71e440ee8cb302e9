//! `GET /metrics`: Prometheus metrics in the OpenMetrics text format, and the
//! middleware that counts and times every HTTP request.
//!
//! The HTTP figures live here, in a registry of their own. The sessions' figures are
//! read at each scrape ([`crate::session::Registry::stats`]), with the slots'
//! positions (one query to Postgres, bounded by [`POSTGRES_WAIT`]): a scrape answers
//! with what the process knows even when Postgres does not. A gateway's scrape has
//! the HTTP figures and its clients per session ([`gateway_registry`]).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::auth::Principal;
use super::{ApiError, AppState};
use crate::error::Error;
use crate::session::health::{ProcessStats, SlotPosition};
use crate::session::slot_rows::DecodingStats;

/// How long a scrape waits for Postgres's answer about the slots.
pub(crate) const POSTGRES_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

const PREFIX: &str = "pgdeltastream";
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Requests that matched no route: never the raw path, which anyone can vary.
const UNMATCHED: &str = "unmatched";
const BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    session: String,
    slot: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GatewayLabels {
    session: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    kind: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The HTTP requests served, by route.
pub(crate) struct HttpMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(|| Histogram::new(BUCKETS));
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register("http_requests", "HTTP requests answered, by method, route and status", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request (a websocket: until the upgrade), by method and route",
            duration.clone(),
        );
        HttpMetrics { registry, requests, duration }
    }
}

/// Counts and times every request under its route template.
pub(crate) async fn track(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method()).to_owned();
    let route = req.extensions().get::<MatchedPath>().map_or(UNMATCHED, MatchedPath::as_str).to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    metrics.duration.get_or_create(&RouteLabels { method: method.clone(), route: route.clone() }).observe(seconds);
    metrics.requests.get_or_create(&RequestLabels { method, route, status }).inc();
    response
}

/// `GET /metrics`.
pub async fn scrape(
    State(state): State<AppState>,
    who: Principal,
    metrics: axum::Extension<Arc<HttpMetrics>>,
) -> Response {
    // The figures name every session and table: not for anyone with a consumer token.
    if let Err(refused) = who.require_admin() {
        return refused.into_response();
    }
    let stats = state.registry.stats();
    let positions = state.registry.slot_positions(POSTGRES_WAIT).await;
    if let Err(e) = &positions {
        tracing::debug!(error = %e, "a scrape could not read the slots' positions");
    }
    let scraped = scraped_registry(&stats, positions.as_deref().ok(), SystemTime::now());
    encode(&metrics, &scraped)
}

/// A scrape's answer: the HTTP figures, then those read for it.
pub fn encode(http: &HttpMetrics, scraped: &Registry) -> Response {
    let mut body = String::new();
    let encoded = encode_registry(&mut body, &http.registry)
        .and_then(|()| encode_registry(&mut body, scraped))
        .and_then(|()| encode_eof(&mut body));
    if encoded.is_err() {
        return ApiError(Error::internal("cannot encode the metrics")).into_response();
    }
    ([(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], body).into_response()
}

/// A gateway's figures: its clients, per session (from [`crate::bus::gateway::Gateway::clients`]).
pub(crate) fn gateway_registry(clients: &[(String, usize)]) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let gauge = Family::<GatewayLabels, Gauge>::default();
    for (session, count) in clients {
        gauge.get_or_create(&GatewayLabels { session: session.clone() }).set(saturate(*count as u64));
    }
    registry.register("connected_clients", "Clients streaming the session through this process", gauge);
    registry
}

/// The figures read at this scrape. `positions` is None when Postgres did not answer.
fn scraped_registry(stats: &ProcessStats, positions: Option<&[SlotPosition]>, now: SystemTime) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let counter =
        |registry: &mut Registry, name: &str, help: &str, value: fn(&crate::stream::progress::Stats) -> u64| {
            let family = Family::<SessionLabels, Counter>::default();
            for s in &stats.sessions {
                family.get_or_create(&labels(&s.name, &s.slot)).inc_by(value(&s.stats));
            }
            registry.register(name, help, family);
        };
    counter(&mut registry, "changes", "Changes sent to clients, per session", |s| s.changes);
    counter(&mut registry, "transactions", "Transactions sent to clients, per session", |s| s.transactions);
    counter(
        &mut registry,
        "skipped_transactions",
        "Transactions Postgres could not decode, sent to clients as error records and skipped, per session",
        |s| s.skipped,
    );
    counter(&mut registry, "sent_bytes", "Bytes of change data sent to clients, per session", |s| s.bytes_sent);
    counter(&mut registry, "acks", "Acks accepted from clients, per session", |s| s.acks);

    let clients = Family::<SessionLabels, Gauge>::default();
    let since_ack = Family::<SessionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for s in &stats.sessions {
        clients.get_or_create(&labels(&s.name, &s.slot)).set(saturate(s.stats.clients));
        if let Some(at) = s.last_ack_at {
            let seconds = now.duration_since(at).unwrap_or_default().as_secs_f64();
            since_ack.get_or_create(&labels(&s.name, &s.slot)).set(seconds);
        }
    }
    registry.register("connected_clients", "Clients streaming the session through this process", clients);
    registry.register(
        "seconds_since_last_ack",
        "Seconds since a client last acked, per session that had an ack since the process started",
        since_ack,
    );

    let up = Gauge::<i64>::default();
    up.set(i64::from(positions.is_some()));
    registry.register("postgres_up", "1 when Postgres answered this scrape's query about the slots", up);
    let lag = Family::<SessionLabels, Gauge>::default();
    let retained = Family::<SessionLabels, Gauge>::default();
    for p in positions.unwrap_or_default() {
        let Some(s) = stats.sessions.iter().find(|s| s.slot == p.slot) else { continue };
        if let Some(bytes) = p.lag_bytes {
            lag.get_or_create(&labels(&s.name, &s.slot)).set(saturate(bytes));
        }
        if let Some(bytes) = p.retained_bytes {
            retained.get_or_create(&labels(&s.name, &s.slot)).set(saturate(bytes));
        }
    }
    registry.register("lag_bytes", "WAL from the slot's confirmed position to the current one", lag);
    registry.register("retained_bytes", "WAL the slot keeps: from its restart_lsn to the current position", retained);
    slot_safety(&mut registry, stats, positions.unwrap_or_default());

    let connections = Family::<ConnectionLabels, Gauge>::default();
    for (kind, count) in [("pool", stats.pool.in_use), ("stream", stats.streams), ("snapshot", stats.snapshots)] {
        connections.get_or_create(&ConnectionLabels { kind }).set(saturate(count as u64));
    }
    registry.register(
        "postgres_connections",
        "Connections to Postgres in use: pool (queries), stream and snapshot (replication)",
        connections,
    );
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: usize| {
        let g = Gauge::<i64>::default();
        g.set(saturate(value as u64));
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "postgres_pool_idle_connections",
        "Open pool connections waiting for a request",
        stats.pool.idle,
    );
    gauge(&mut registry, "postgres_pool_size", "The most connections the pool opens (--pg-pool-size)", stats.pool.size);
    gauge(&mut registry, "sessions", "Sessions this process knows", stats.sessions.len());
    registry
}

/// A counter of `pg_stat_replication_slots`: its family, name, help and column.
type DecodingCounter = (Family<SessionLabels, Counter>, &'static str, &'static str, fn(&DecodingStats) -> u64);

/// Whether each session's slot can stream, how it stands against its budget, and what
/// decoding it cost Postgres (spilled to disk, streamed in progress, in all).
fn slot_safety(registry: &mut Registry, stats: &ProcessStats, positions: &[SlotPosition]) {
    let gauge = || Family::<SessionLabels, Gauge>::default();
    let (invalidated, warning, budget) = (gauge(), gauge(), gauge());
    let counter = || Family::<SessionLabels, Counter>::default();
    let decoding: [DecodingCounter; 6] = [
        (counter(), "slot_spilled_transactions", "Transactions Postgres spilled to disk decoding the slot", |d| {
            d.spill_txns
        }),
        (counter(), "slot_spilled_bytes", "Bytes Postgres spilled to disk decoding the slot", |d| d.spill_bytes),
        (counter(), "slot_streamed_transactions", "In-progress transactions Postgres streamed from the slot", |d| {
            d.stream_txns
        }),
        (counter(), "slot_streamed_bytes", "Bytes of in-progress transactions Postgres streamed from the slot", |d| {
            d.stream_bytes
        }),
        (counter(), "slot_decoded_transactions", "Transactions Postgres decoded from the slot", |d| d.total_txns),
        (counter(), "slot_decoded_bytes", "Bytes Postgres decoded from the slot", |d| d.total_bytes),
    ];
    for p in positions {
        let Some(s) = stats.sessions.iter().find(|s| s.slot == p.slot) else { continue };
        let l = labels(&s.name, &s.slot);
        invalidated.get_or_create(&l).set(i64::from(p.invalidated));
        warning.get_or_create(&l).set(i64::from(p.retention_warning));
        if let Some(max) = p.max_retained_bytes {
            budget.get_or_create(&l).set(saturate(max));
        }
        if let Some(d) = &p.decoding {
            for (family, _, _, value) in &decoding {
                family.get_or_create(&l).inc_by(value(d));
            }
        }
    }
    registry.register("slot_invalidated", "1 when the session's slot can never stream again", invalidated);
    registry.register(
        "retention_warning",
        "1 when the slot retains more WAL than --retention-warn-bytes or the warning share of its budget",
        warning,
    );
    registry.register("max_retained_bytes", "The session's WAL budget (maxRetainedBytes), if it has one", budget);
    for (family, name, help, _) in decoding {
        registry.register(name, help, family);
    }
    backfills(registry, stats, positions);
}

/// Each session's live backfill (the last one it had): running or not, and its rows and
/// chunks acked so far and still to come (Postgres's estimate).
fn backfills(registry: &mut Registry, stats: &ProcessStats, positions: &[SlotPosition]) {
    let gauge = || Family::<SessionLabels, Gauge>::default();
    let (running, rows, chunks, remaining) = (gauge(), gauge(), gauge(), gauge());
    for p in positions {
        let Some(b) = &p.backfill else { continue };
        let Some(s) = stats.sessions.iter().find(|s| s.slot == p.slot) else { continue };
        let l = labels(&s.name, &s.slot);
        running.get_or_create(&l).set(i64::from(b.state == crate::session::backfill::Phase::Running));
        rows.get_or_create(&l).set(saturate(b.tables.iter().map(|t| t.rows).sum()));
        chunks.get_or_create(&l).set(saturate(b.tables.iter().map(|t| t.chunks).sum()));
        remaining.get_or_create(&l).set(saturate(b.estimated_remaining()));
    }
    registry.register("backfill_running", "1 while the session's live backfill runs", running);
    registry.register("backfill_rows", "Rows of the session's live backfill its client has acked", rows);
    registry.register("backfill_chunks", "Chunks of the session's live backfill its client has acked", chunks);
    registry.register(
        "backfill_remaining_rows",
        "Rows the session's live backfill has still to send, as Postgres estimates the tables",
        remaining,
    );
}

/// The standard methods by name; any other (hyper accepts any token) is `other`, so
/// that clients cannot mint label values.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"];
    KNOWN.into_iter().find(|m| *m == method.as_str()).unwrap_or("other")
}

fn labels(session: &str, slot: &str) -> SessionLabels {
    SessionLabels { session: session.to_owned(), slot: slot.to_owned() }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
