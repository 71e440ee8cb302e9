//! `GET /v1/sessions` and `DELETE /v1/sessions/{slotName}`

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::auth::{Principal, Role};
use super::extract::{Admin, Path};
use super::{ApiError, AppState};
use crate::session::SlotReport;

/// Every slot of ours in the database: the WAL it retains and its last ack. A
/// consumer sees only the slots of the sessions its token names (or that it names).
pub async fn list(State(state): State<AppState>, who: Principal) -> Result<Json<Vec<SlotReport>>, ApiError> {
    let mut reports = state.registry.report().await?;
    reports.retain(|r| who.role == Role::Admin || r.grants.iter().any(|n| who.may_use(n)));
    Ok(Json(reports))
}

#[derive(Serialize)]
pub(crate) struct DropResponse {
    #[serde(rename = "slotName")]
    pub slot_name: String,
    pub dropped: bool,
}

/// Ends a session (its stream and snapshot) and drops its slot.
pub(crate) async fn drop_session(
    State(state): State<AppState>,
    _: Admin,
    Path(slot): Path<String>,
) -> Result<Json<DropResponse>, ApiError> {
    state.registry.drop_session(&slot).await?;
    Ok(Json(DropResponse { slot_name: slot, dropped: true }))
}
