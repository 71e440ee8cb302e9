//! `POST /v2/sessions/{name}/backfill` starts a live backfill of some of the session's
//! tables into its stream; `DELETE` cancels it. Its progress is in the session's view.
//! A caller that may read the session's snapshot may backfill it: both read the same
//! tables, rows and columns.

use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{Json, Path};
use super::{ApiError, AppState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackfillBody {
    /// `schema.table` or `table`, each one of the session's.
    tables: Vec<String>,
}

pub(crate) async fn start(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    Json(body): Json<BackfillBody>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    who.require_session(&name)?;
    let backfill = state.registry.start_backfill(&name, &body.tables).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "session": name, "backfill": backfill }))))
}

pub(crate) async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    who.require_session(&name)?;
    let backfill = state.registry.cancel_backfill(&name).await?;
    Ok(Json(serde_json::json!({ "session": name, "backfill": backfill })))
}
