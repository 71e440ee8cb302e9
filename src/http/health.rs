//! `GET /healthz` (the process serves) and `GET /readyz` (Postgres can serve us too;
//! on a gateway, JetStream: [`super::gateway`]).
//!
//! Readiness is checked at most once per [`CACHE_FOR`]: probes that come meanwhile get
//! the last answer, and probes that come while a check runs wait for it rather than
//! start their own, so a storm of probes costs Postgres one check a second.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::AppState;
use crate::session::health::{NotReady, Ready};

/// How long an answer is reused.
pub(crate) const CACHE_FOR: Duration = Duration::from_secs(1);
/// How long a check may wait for a pool connection: an exhausted pool is reported, fast.
const POOL_WAIT: Duration = Duration::from_millis(500);
/// How long all the checks may take together.
const CHECK_LIMIT: Duration = Duration::from_secs(5);

/// The checks passed, or the one that failed.
pub(crate) type Answer = Result<Ready, NotReady>;

/// The last readiness answer and when it was found.
#[derive(Default)]
pub(crate) struct ReadyCache {
    last: Mutex<Option<(Instant, Answer)>>,
}

/// `GET /healthz`: 200 while the process serves; asks nothing of Postgres.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

impl ReadyCache {
    /// The last answer while it is fresh, else what `check` finds now.
    pub async fn answer(&self, check: impl Future<Output = Answer>) -> Answer {
        let mut last = self.last.lock().await;
        match &*last {
            Some((at, answer)) if at.elapsed() < CACHE_FOR => answer.clone(),
            _ => {
                let answer = check.await;
                *last = Some((Instant::now(), answer.clone()));
                answer
            }
        }
    }
}

/// `GET /readyz`: 200 with the checks passed, or 503 naming the one that failed.
pub async fn readyz(State(state): State<AppState>, cache: axum::Extension<Arc<ReadyCache>>) -> Response {
    respond(cache.answer(check(&state)).await)
}

/// What `/readyz` answers, on the server and on a gateway.
pub(crate) fn respond(answer: Answer) -> Response {
    match answer {
        Ok(ready) => {
            let mut body = json!({ "status": "ok", "checks": ready.checks });
            if let Some(server) = ready.postgres {
                body["postgres"] = json!(server);
            }
            if let Some(standby) = ready.standby {
                body["standby"] = json!(standby);
            }
            Json(body).into_response()
        }
        Err(e) => {
            let mut body =
                json!({ "status": "unavailable", "check": e.check, "error": format!("{}: {}", e.check, e.reason) });
            if let Some(server) = e.postgres {
                body["postgres"] = json!(server);
            }
            (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], Json(body)).into_response()
        }
    }
}

async fn check(state: &AppState) -> Answer {
    match tokio::time::timeout(CHECK_LIMIT, state.registry.readiness(POOL_WAIT)).await {
        Ok(answer) => answer,
        Err(_) => Err(NotReady::new(
            "connection",
            format!("Postgres did not answer the checks within {} s", CHECK_LIMIT.as_secs()),
        )),
    }
}
