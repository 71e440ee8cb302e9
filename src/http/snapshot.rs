//! `POST /v1/snapshot/data` and `DELETE /v1/snapshot`

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{Admin, Json, Query};
use super::{ApiError, AppState};
use crate::error::Error;
use crate::pg::ident::TableRef;
use crate::pg::snapshot::{Direction, PageRequest};

/// The request body, as the original defined it. Unknown fields are refused so that a
/// typo (`"ofset"`) is an error rather than a silent default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DataRequest {
    pub table: String,
    #[serde(default)]
    pub offset: u64,
    pub limit: Option<u64>,
    pub order_by: Option<OrderBy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrderBy {
    pub column: String,
    pub order: Option<String>,
}

impl DataRequest {
    /// Checks the request; the table and column are checked against the catalog later.
    pub(crate) fn into_page(self, max_limit: u64) -> Result<PageRequest, Error> {
        let table = TableRef::parse(&self.table).map_err(|e| {
            Error::bad_request(format!("invalid table {:?}: it {e}; expected name or schema.name", self.table))
        })?;
        let limit = self.limit.unwrap_or(max_limit);
        if limit > max_limit {
            return Err(Error::bad_request(format!(
                "limit {limit} is above the maximum of {max_limit}; page through with offset"
            )));
        }
        if self.offset > i64::MAX as u64 {
            return Err(Error::bad_request(format!("offset {} is too large", self.offset)));
        }
        let order_by = match self.order_by {
            None => None,
            Some(o) => {
                let dir = match o.order.as_deref().map(str::to_ascii_uppercase).as_deref() {
                    None | Some("ASC") => Direction::Asc,
                    Some("DESC") => Direction::Desc,
                    Some(_) => return Err(Error::bad_request("order_by.order must be \"ASC\" or \"DESC\"")),
                };
                if o.column.is_empty() || o.column.len() > crate::pg::ident::MAX_IDENT_BYTES {
                    return Err(Error::bad_request("order_by.column must be a column name of 1 to 63 bytes"));
                }
                Some((o.column, dir))
            }
        };
        Ok(PageRequest { table, offset: self.offset, limit, order_by })
    }
}

/// Admin only: the request names no slot, so no consumer's scope can cover it.
pub async fn data(
    State(state): State<AppState>,
    _: Admin,
    Json(request): Json<DataRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let page = request.into_page(state.max_limit)?;
    let rows = state.registry.snapshot_page(&page).await?;
    // The status is sent with the first chunk; a later error can only cut the body
    // short, which the client sees as a broken response rather than a whole page.
    let rows = rows.inspect_err(|e| tracing::warn!(error = %e, "snapshot page failed after it started"));
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from_stream(rows)))
}

#[derive(Deserialize)]
pub(crate) struct ReleaseQuery {
    #[serde(rename = "slotName")]
    slot_name: Option<String>,
}

/// Releases a snapshot before its idle timeout (it holds back vacuum while held).
pub async fn release(
    State(state): State<AppState>,
    who: Principal,
    Query(q): Query<ReleaseQuery>,
) -> Result<impl IntoResponse, ApiError> {
    // A consumer may let go of the snapshot of a slot it holds; the default session's
    // (no slotName) is an admin's.
    match q.slot_name.as_deref() {
        Some(slot) => super::stream::require_slot(&state, &who, slot).await?,
        None => who.require_admin()?,
    }
    let slot = state.registry.release_snapshot(q.slot_name.as_deref())?;
    Ok(Json(serde_json::json!({ "slotName": slot, "released": true })))
}
