//! The JetStream gateway's routes (`pgdeltastream gateway`): the server's two stream
//! endpoints, served from the stream a publisher fills. A client names itself with
//! `client=` (its own position, kept across gateways); without it, it is `default`.
//! With auth, a consumer's client names are its token's `sub`'s own
//! ([`Principal::position_owner`]).
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /v1/lr/stream?slotName=&client=` | [`v1_stream`] |
//! | `GET /v2/sessions/{name}/stream?client=` | [`v2_stream`] |
//! | `GET /metrics` | [`scrape`]: the HTTP figures and the clients per session |
//! | `GET /healthz`, `GET /readyz` | [`health::healthz`], [`readyz`]: whether JetStream answers |
//!
//! Behind the server's own [`layers`](super::layers): guard, auth, body limit, JSON 404s.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;

use super::auth::{Principal, Verifier};
use super::extract::{Path, Query};
use super::guard::Guard;
use super::health::{self, Answer, ReadyCache};
use super::metrics::{self, HttpMetrics};
use super::upgrade::Upgrade;
use super::{ApiError, layers};
use crate::bus::DEFAULT_CLIENT;
use crate::bus::gateway::Gateway;
use crate::error::Error;
use crate::session::health::{NotReady, Ready};

/// How long JetStream may take to answer a readiness check: a probe is answered well
/// within its own timeout, and a NATS that takes longer is as good as down.
const READY_WAIT: Duration = Duration::from_secs(2);

/// `auth`: the tokens a client needs, as on the server (None: none); `guard`: which
/// pages and host names are served, as on the server.
pub(crate) fn router(gateway: Arc<Gateway>, auth: Option<Arc<Verifier>>, guard: Guard) -> Router {
    let routes = Router::new()
        .route("/v1/lr/stream", get(v1_stream))
        .route("/v2/sessions/{name}/stream", get(v2_stream))
        .route("/metrics", get(scrape))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz));
    layers::common(routes, auth, guard).with_state(gateway)
}

#[derive(Deserialize)]
pub(crate) struct V1Query {
    #[serde(rename = "slotName")]
    slot_name: Option<String>,
    format: Option<String>,
    client: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct V2Query {
    format: Option<String>,
    client: Option<String>,
}

pub(crate) async fn v1_stream(
    State(gateway): State<Arc<Gateway>>,
    who: Principal,
    Query(q): Query<V1Query>,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    let slot = q.slot_name.filter(|s| !s.is_empty()).ok_or_else(|| Error::bad_request("no slotName provided"))?;
    check_format(q.format.as_deref())?;
    let upgrade = upgrade?;
    // As on the server, a v1 consumer's token names the slot's session (or the slot);
    // out of its scope, not finding the slot is a 403 too.
    let session = gateway.session_of_slot(&slot).await;
    if !session.as_ref().is_ok_and(|s| who.may_use(s)) {
        who.require_session(&slot)?;
    }
    let session = session?;
    let feed = gateway.open(&session, q.client.as_deref().unwrap_or(DEFAULT_CLIENT), who.position_owner()).await?;
    let deadline = who.stream_deadline();
    Ok(upgrade.websocket(gateway.tasks(), gateway.socket.clone(), gateway.frame_bytes, move |socket| {
        feed.run(socket, deadline)
    }))
}

pub(crate) async fn v2_stream(
    State(gateway): State<Arc<Gateway>>,
    who: Principal,
    Path(name): Path<String>,
    Query(q): Query<V2Query>,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    check_format(q.format.as_deref())?;
    who.require_session(&name)?;
    let upgrade = upgrade?;
    let feed = gateway.open(&name, q.client.as_deref().unwrap_or(DEFAULT_CLIENT), who.position_owner()).await?;
    let deadline = who.stream_deadline();
    Ok(upgrade.websocket(gateway.tasks(), gateway.socket.clone(), gateway.frame_bytes, move |socket| {
        feed.run(socket, deadline)
    }))
}

/// The publisher stores transactions (wal2json format-version 1), so that is what a
/// gateway serves.
fn check_format(format: Option<&str>) -> Result<(), Error> {
    match format {
        None | Some("transactions") => Ok(()),
        Some(other) => Err(Error::bad_request(format!(
            "format {other:?} is not served by a gateway: the publisher stores transactions"
        ))),
    }
}

/// `GET /metrics`: admin only, as on the server (the figures name every session).
pub async fn scrape(
    State(gateway): State<Arc<Gateway>>,
    who: Principal,
    http: Extension<Arc<HttpMetrics>>,
) -> Result<Response, ApiError> {
    who.require_admin()?;
    Ok(metrics::encode(&http, &metrics::gateway_registry(&gateway.clients())))
}

/// `GET /readyz`: 200 while JetStream answers, else 503; cached as the server's is, so
/// that a storm of probes costs NATS a check a second.
pub async fn readyz(State(gateway): State<Arc<Gateway>>, cache: Extension<Arc<ReadyCache>>) -> Response {
    health::respond(cache.answer(jetstream_ready(&gateway)).await)
}

async fn jetstream_ready(gateway: &Gateway) -> Answer {
    let failed = |reason| Err(NotReady::new("jetstream", reason));
    match tokio::time::timeout(READY_WAIT, gateway.check_jetstream()).await {
        Ok(Ok(())) => Ok(Ready { checks: &["jetstream"], postgres: None, standby: None }),
        Ok(Err(e)) => failed(e.message),
        Err(_) => failed(format!("JetStream did not answer within {} s", READY_WAIT.as_secs())),
    }
}
