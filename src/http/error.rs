//! The API's one error type: `{"error":"..."}` with the status its kind calls for.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{Error, ErrorKind};

/// What a 503's `Retry-After` says.
const RETRY_AFTER_SECONDS: &str = "1";

#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self.0.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorKind::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            ErrorKind::Gone => StatusCode::GONE,
            ErrorKind::TooMany => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self.0, "request failed");
        }
        let mut body = serde_json::json!({ "error": self.0.message });
        if let (Some(serde_json::Value::Object(details)), Some(fields)) = (self.0.details, body.as_object_mut()) {
            fields.extend(details.into_iter().filter(|(k, _)| k != "error"));
        }
        let mut response = (status, Json(body)).into_response();
        // Every 503 and 429 is worth retrying: Postgres is restarting, out of
        // connections, or the caller's own share is in use for now.
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}

pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(Error::not_found(format!("no such endpoint: {}", uri.path())))
}

pub(crate) async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let body = Json(serde_json::json!({ "error": format!("method {method} is not allowed on {}", uri.path()) }));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

/// Wrong methods on `/v1/init`. axum would answer HEAD with the GET handler, and only
/// GET may create a session, so HEAD is refused too, and `Allow` says just GET.
pub(crate) async fn get_only(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let mut response = method_not_allowed(method, uri).await;
    response.headers_mut().insert(axum::http::header::ALLOW, axum::http::HeaderValue::from_static("GET"));
    response
}

/// A declared body over `limit` is refused before any of it is read (and before a
/// `100 Continue` invites it); `Connection: close` because the body stays unread.
pub(crate) fn body_too_large(length: u64, limit: usize) -> Response {
    let e = ApiError(Error::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body is {length} bytes; at most {limit} are accepted"),
    ));
    let mut response = e.into_response();
    response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    response
}
