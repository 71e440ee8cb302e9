//! `GET /v1/lr/stream?slotName=NAME` (websocket)

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::error::Error;

#[derive(Deserialize)]
pub struct StreamQuery {
    #[serde(rename = "slotName")]
    slot_name: Option<String>,
}

/// Largest message we take from a client: acks are tiny.
const MAX_CLIENT_MESSAGE: usize = 4096;

/// Checks the slot and starts replication *before* upgrading, so that every refusal
/// is an HTTP error the client can read, never a silent socket.
pub async fn stream(
    State(state): State<AppState>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| Error::bad_request(e.body_text()))?;
    let slot = q.slot_name.filter(|s| !s.is_empty()).ok_or_else(|| Error::bad_request("no slotName provided"))?;
    let upgrade =
        upgrade.map_err(|e| Error::bad_request(format!("this endpoint is a websocket: {}", e.body_text())))?;
    let open = state.registry.open_stream(&slot).await?;
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| open.run(socket)))
}
