//! `GET /v1/sessions` and `DELETE /v1/sessions/{slotName}`

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::error::Error;
use crate::session::SlotReport;

/// Every slot of ours in the database: the WAL it retains and its last ack.
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<SlotReport>>, ApiError> {
    Ok(Json(state.registry.report().await?))
}

#[derive(Serialize)]
pub struct DropResponse {
    #[serde(rename = "slotName")]
    pub slot_name: String,
    pub dropped: bool,
}

/// Ends a session (its stream and snapshot) and drops its slot.
pub async fn drop_session(
    State(state): State<AppState>,
    slot: Result<Path<String>, PathRejection>,
) -> Result<Json<DropResponse>, ApiError> {
    let Path(slot) = slot.map_err(|e| Error::bad_request(e.body_text()))?;
    state.registry.drop_session(&slot).await?;
    Ok(Json(DropResponse { slot_name: slot, dropped: true }))
}
