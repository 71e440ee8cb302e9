//! `GET /v1/init`

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::auth::Principal;
use super::{ApiError, AppState};

#[derive(Serialize)]
pub(crate) struct InitResponse {
    #[serde(rename = "slotName")]
    pub slot_name: String,
}

/// Replaces the default session with a new slot and snapshot.
pub async fn init(State(state): State<AppState>, who: Principal) -> Result<Json<InitResponse>, ApiError> {
    who.require_admin()?;
    let session = state.registry.init().await?;
    Ok(Json(InitResponse { slot_name: session.slot_name }))
}
