//! Our extractors: axum's, with every rejection turned into an [`ApiError`] by the
//! `From` impls below, so that a handler takes `Path(name): Path<String>` and a bad
//! path, query or body is a `{"error":"..."}` without a line of its own.
//!
//! Extractors run in the order of the handler's arguments, before its body: a handler
//! that must refuse a caller before judging its input takes [`Admin`] first, or takes
//! the input as `Result<Query<T>, ApiError>` and applies `?` after its own check.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ApiError;
use super::auth::Principal;
use crate::error::{Error, ErrorKind};

/// The route's parameters, as [`axum::extract::Path`]; 400 with axum's reason.
pub struct Path<T>(pub T);

/// The query string, as [`axum::extract::Query`]; 400 with axum's reason.
pub(crate) struct Query<T>(pub T);

/// A JSON body. Unlike [`axum::Json`] it needs no `Content-Type`: the original's
/// clients send none, and [`super::guard`] already refuses any type but JSON (415).
/// As an answer it is axum's, so that a handler needs one `Json`.
pub struct Json<T>(pub T);

/// A caller with an admin token (every caller, without auth). Taken before the path and
/// body, so that a consumer is refused with 403 whatever it sent.
pub struct Admin;

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError(Error::bad_request(e.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError(Error::bad_request(e.body_text()))
    }
}

/// A body cut at [`super::layers::BODY_LIMIT`] (chunked, so no length was declared) is a 413,
/// as a declared one is; anything else that stops it being read is the client's 400.
impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let kind = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorKind::PayloadTooLarge
        } else {
            ErrorKind::BadRequest
        };
        ApiError(Error::new(kind, format!("cannot read the request body: {}", e.body_text())))
    }
}

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(value) = axum::extract::Path::from_request_parts(parts, state).await?;
        Ok(Path(value))
    }
}

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(value) = axum::extract::Query::from_request_parts(parts, state).await?;
        Ok(Query(value))
    }
}

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state).await?;
        let value =
            serde_json::from_slice(&body).map_err(|e| Error::bad_request(format!("invalid input JSON: {e}")))?;
        Ok(Json(value))
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Principal::from_request_parts(parts, state).await?.require_admin()?;
        Ok(Admin)
    }
}
