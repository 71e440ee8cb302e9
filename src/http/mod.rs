//! The HTTP API: routes and thin handlers over the session registry.
//!
//! | route | handler |
//! | --- | --- |
//! | `GET /v1/init` | [`init::init`]: a new slot and snapshot; answers `{"slotName":...}` |
//! | `POST /v1/snapshot/data` | [`snapshot::data`]: a page of a table from the snapshot |
//! | `DELETE /v1/snapshot` | [`snapshot::release`]: let go of the snapshot early |
//! | `GET /v1/lr/stream?slotName=` | [`stream::stream`]: the websocket of changes |
//! | `GET /v1/sessions` | [`sessions::list`]: every slot of ours, its WAL retention and last ack |
//! | `DELETE /v1/sessions/{slotName}` | [`sessions::drop_session`]: end a session and drop its slot |
//! | `/v2/sessions...` | [`v2`]: named sessions with their own tables and actions |
//! | `GET /`, `GET /assets/{file}` | [`viewer`]: the page for operators, built in |
//! | `GET /metrics` | [`metrics::scrape`]: Prometheus metrics |
//! | `GET /healthz`, `GET /readyz` | [`health`]: liveness, and whether Postgres can serve us |
//!
//! With auth configured every route but the few in [`auth`]'s public list needs a
//! token; each handler checks the scope it needs on the [`auth::Principal`]. Before
//! that, [`guard`] refuses what other sites' pages make browsers send.
//!
//! Every error, including unknown paths and wrong methods, is `{"error":"..."}` with
//! the right status ([`error::ApiError`]); [`extract`] makes bad paths, queries and
//! bodies such errors; [`layers`] is the edge this router and the gateway's run behind.

pub mod auth;
pub(crate) mod backfill;
pub mod error;
pub mod extract;
pub mod gateway;
pub mod guard;
pub mod health;
pub mod init;
pub mod layers;
pub mod metrics;
pub mod sessions;
pub mod shares;
pub mod snapshot;
pub mod stream;
pub mod upgrade;
pub mod v2;
pub mod viewer;

use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post};

use crate::session::Registry;
pub(crate) use error::ApiError;

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct AppState {
    pub registry: Arc<Registry>,
    /// The largest `limit` a snapshot page may ask for.
    pub max_limit: u64,
    /// How tokens are checked; None: no auth, everyone is an admin.
    pub auth: Option<Arc<auth::Verifier>>,
    /// Each consumer's share of the snapshot reads under way.
    pub reads: Arc<shares::CallerShares>,
    /// Which origins' pages and which host names are served.
    pub guard: guard::Guard,
}

pub(crate) fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", get(viewer::index))
        .route("/assets/{file}", get(viewer::asset))
        .route("/v1/init", get(init::init).head(error::get_only).fallback(error::get_only))
        .route("/v1/snapshot/data", post(snapshot::data))
        .route("/v1/snapshot", delete(snapshot::release))
        .route("/v1/lr/stream", get(stream::stream))
        .route("/v1/sessions", get(sessions::list))
        .route("/v1/sessions/{slot}", delete(sessions::drop_session))
        .route("/v2/sessions", post(v2::create).get(v2::list))
        .route("/v2/sessions/{name}", get(v2::get_one).patch(v2::patch_one).delete(v2::delete_one))
        .route("/v2/sessions/{name}/stream", get(v2::stream))
        .route("/v2/sessions/{name}/backfill", post(backfill::start).delete(backfill::cancel))
        .route("/v2/sessions/{name}/watch", get(v2::watch))
        .route("/v2/sessions/{name}/snapshot", delete(v2::release_snapshot))
        .route("/v2/sessions/{name}/snapshot/{table}", get(v2::snapshot))
        .merge(monitoring());
    layers::common(routes, state.auth.clone(), state.guard.clone()).with_state(state)
}

/// Probes and scrapes: they never need credentials, and answer without a free pool
/// connection.
fn monitoring() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(metrics::scrape))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
}
