//! The layers every route runs behind, on the server and on a gateway alike: the same
//! guard, auth, body limit, request log, metrics and JSON 404/405, so that an edge
//! added to one is not missing from the other.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};

use super::auth::{self, Verifier};
use super::guard::{self, Guard};
use super::{error, health, metrics};

/// Request bodies are small JSON objects; anything larger is refused with 413.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

/// `routes` behind the common layers. A request meets them outermost first: metrics,
/// the request log, nosniff, the guard (before any token is looked at), auth, then the
/// body limit. `/metrics` and `/readyz` find the request figures and the last
/// readiness answer as extensions.
pub fn common<S>(routes: Router<S>, auth: Option<Arc<Verifier>>, guard: Guard) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let http_metrics = Arc::new(metrics::HttpMetrics::default());
    let guard = Arc::new(guard.for_auth(auth.is_some()));
    routes
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(refuse_large_bodies))
        .layer(middleware::from_fn_with_state(auth, auth::authenticate))
        .layer(middleware::from_fn_with_state(guard, guard::guard))
        .layer(middleware::from_fn(nosniff))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn_with_state(http_metrics.clone(), metrics::track))
        .layer(Extension(http_metrics))
        .layer(Extension(Arc::new(health::ReadyCache::default())))
}

/// A `Content-Length` over [`BODY_LIMIT`] gets 413 at once: reading the body (or
/// answering `Expect: 100-continue`) first would only invite the upload.
/// Chunked bodies are still cut at the limit by [`DefaultBodyLimit`].
async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > BODY_LIMIT as u64 => error::body_too_large(length, BODY_LIMIT),
        _ => next.run(req).await,
    }
}

/// Every answer, JSON errors included: a browser must never guess a type (an error
/// that repeats a path is no HTML page).
async fn nosniff(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// One log line per request: method, path (never the query or body), status, time.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(%method, %path, status, ms, "request");
    } else {
        tracing::info!(%method, %path, status, ms, "request");
    }
    response
}
