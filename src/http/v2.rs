//! The v2 API: named sessions, each with its own slot, snapshot, tables and actions.
//!
//! | route | handler |
//! | --- | --- |
//! | `POST /v2/sessions` | [`create`]: a session, its slot and its snapshot (201) |
//! | `GET /v2/sessions` | [`list`]: every session, with its state |
//! | `GET /v2/sessions/{name}` | [`get_one`] |
//! | `PATCH /v2/sessions/{name}` | [`patch_one`]: changes its tables and actions as it streams |
//! | `DELETE /v2/sessions/{name}` | [`delete_one`]: ends its stream, drops its slot |
//! | `GET /v2/sessions/{name}/stream` | [`stream`]: the websocket, only its changes |
//! | `GET /v2/sessions/{name}/watch` | [`watch`]: a viewer's copy, from a temporary slot |
//! | `GET /v2/sessions/{name}/snapshot/{table}` | [`snapshot`]: keyset pages, or NDJSON |
//! | `DELETE /v2/sessions/{name}/snapshot` | [`release_snapshot`]: let go of its snapshot |
//! | `POST /v2/sessions/{name}/backfill` | [`super::backfill::start`]: tables read again into the stream |
//! | `DELETE /v2/sessions/{name}/backfill` | [`super::backfill::cancel`] |

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{Admin, Json, Path, Query};
use super::stream::{parse_format, serve, serve_observer};
use super::upgrade::Upgrade;
use super::{ApiError, AppState};
use crate::error::Error;
use crate::pg::ident::TableRef;
use crate::pg::keyset::KeysetRequest;
use crate::session::definition::{Action, TableEntry, TableSpec};
use crate::session::safety::{OnInvalidated, OnMaxRetained, SlotPolicy};
use crate::session::views::{Created, SessionView};
use crate::session::{CreateRequest, PatchRequest};
use crate::stream::plugin::Plugin;

/// The body of `POST /v2/sessions`. Unknown fields are refused, so that a typo is an
/// error rather than a session that streams more than wanted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    pub name: String,
    /// Each a string (`schema.table`, `schema.*`) or `{"table", "where", "columns"}`.
    pub tables: Option<Vec<serde_json::Value>>,
    pub actions: Option<Vec<Action>>,
    pub plugin: Option<Plugin>,
    /// Generated columns in pgoutput's changes (PostgreSQL 18+, as Postgres names the
    /// publication option too).
    #[serde(default, rename = "publishGeneratedColumns", alias = "publish_generated_columns")]
    pub publish_generated_columns: bool,
    /// WAL the slot may retain before `onMaxRetained` applies.
    #[serde(default, rename = "maxRetainedBytes")]
    pub max_retained_bytes: Option<u64>,
    /// `keep` or `drop`.
    #[serde(default, rename = "onMaxRetained")]
    pub on_max_retained: Option<OnMaxRetained>,
    /// `fail` or `recreate`.
    #[serde(default, rename = "onInvalidated")]
    pub on_invalidated: OnInvalidated,
    /// pgoutput: an existing publication to read (made on the primary when the server
    /// is a standby), rather than one the session makes.
    pub publication: Option<String>,
    /// Schema changes (DDL) of the session's tables in its stream.
    #[serde(default)]
    pub ddl: bool,
}

pub async fn create(
    State(state): State<AppState>,
    _: Admin,
    Json(body): Json<CreateBody>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let tables = entries(body.tables, body.actions.as_ref(), "every table", "every action")?;
    let req = CreateRequest {
        name: body.name,
        tables,
        actions: body.actions,
        plugin: body.plugin,
        publish_generated_columns: body.publish_generated_columns,
        policy: SlotPolicy {
            max_retained_bytes: body.max_retained_bytes,
            on_max_retained: body.on_max_retained,
            on_invalidated: body.on_invalidated,
        },
        publication: body.publication,
        ddl: body.ddl,
    };
    let (definition, consistent_point) = state.registry.create(req).await?;
    Ok((StatusCode::CREATED, Json(Created::new(definition, consistent_point))))
}

/// The body of `PATCH /v2/sessions/{name}`: what is left out stays as it is.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    /// As at create.
    pub tables: Option<Vec<serde_json::Value>>,
    pub actions: Option<Vec<Action>>,
    /// Backfill the tables added.
    #[serde(default)]
    pub backfill: bool,
}

/// `PATCH /v2/sessions/{name}`: the session as `GET` shows it, and the entries added.
pub(crate) async fn patch_one(
    State(state): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
    Json(body): Json<PatchBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if body.tables.is_none() && body.actions.is_none() {
        return Err(Error::bad_request("nothing to change: give tables, actions or both").into());
    }
    let tables = entries(body.tables, body.actions.as_ref(), "the tables as they are", "the actions as they are")?;
    let req = PatchRequest { tables, actions: body.actions, backfill: body.backfill };
    let added = state.registry.patch(&name, req).await?;
    let mut view = serde_json::to_value(state.registry.view_one(&name).await?)
        .map_err(|e| Error::internal(format!("cannot show session {name}: {e}")))?;
    view["added"] = serde_json::json!(added);
    Ok(Json(view))
}

/// A request's `tables`, parsed, once both lists are known not to be empty (left out,
/// each means what `tables_out` and `actions_out` say).
fn entries(
    tables: Option<Vec<serde_json::Value>>,
    actions: Option<&Vec<Action>>,
    tables_out: &str,
    actions_out: &str,
) -> Result<Option<Vec<TableEntry>>, Error> {
    if tables.as_ref().is_some_and(Vec::is_empty) {
        return Err(Error::bad_request(format!("tables is empty: leave it out for {tables_out}")));
    }
    if actions.is_some_and(Vec::is_empty) {
        return Err(Error::bad_request(format!("actions is empty: leave it out for {actions_out}")));
    }
    tables.map(|t| t.into_iter().map(table_entry).collect()).transpose()
}

/// One entry of `tables`, with an error that says which.
fn table_entry(value: serde_json::Value) -> Result<TableEntry, Error> {
    let shown = value.to_string();
    let entry = match value {
        serde_json::Value::String(s) => return Ok(TableEntry::Pattern(s)),
        serde_json::Value::Object(_) => serde_json::from_value::<TableSpec>(value)
            .map_err(|e| Error::bad_request(format!("invalid table {shown}: {e}")))?,
        _ => {
            return Err(Error::bad_request(format!(
                "invalid table {shown}: expected a string or {{\"table\": ..., \"where\": ..., \"columns\": [...]}}"
            )));
        }
    };
    if entry.columns.as_ref().is_some_and(Vec::is_empty) {
        return Err(Error::bad_request(format!("columns of {} is empty: leave it out for every column", entry.table)));
    }
    Ok(TableEntry::Table(entry))
}

/// A consumer sees only the sessions its token names.
pub async fn list(State(state): State<AppState>, who: Principal) -> Result<Json<Vec<SessionView>>, ApiError> {
    let mut sessions = state.registry.list().await?;
    sessions.retain(|s| who.may_use(&s.definition.name));
    Ok(Json(sessions))
}

pub(crate) async fn get_one(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    who.require_session(&name)?;
    Ok(Json(state.registry.view_one(&name).await?))
}

pub(crate) async fn delete_one(
    State(state): State<AppState>,
    _: Admin,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.registry.delete(&name).await?;
    Ok(Json(serde_json::json!({ "name": name, "dropped": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    limit: Option<u64>,
    after: Option<String>,
}

/// `GET /v2/sessions/{name}/snapshot/{table}?limit=N&after=CURSOR`: a keyset page, or
/// with `Accept: application/x-ndjson` the whole table, a row per line. The query is
/// judged after the scope: out of it, a consumer gets 403 whatever it asked.
pub async fn snapshot(
    State(state): State<AppState>,
    who: Principal,
    Path((name, table)): Path<(String, String)>,
    query: Result<Query<PageQuery>, ApiError>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    who.require_session(&name)?;
    let Query(q) = query?;
    // Held until the body is sent (or dropped): a consumer's reads are its share.
    let place = state.reads.enter(who.quota_key())?;
    let table = TableRef::parse(&table)
        .map_err(|e| Error::bad_request(format!("invalid table {table:?}: it {e}; expected name or schema.name")))?;
    let ndjson = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)));
    let (rows, content_type) = if ndjson {
        if q.limit.is_some() || q.after.is_some() {
            return Err(Error::bad_request("the NDJSON export is the whole table: leave out limit and after").into());
        }
        (state.registry.export(&name, &table).await?, NDJSON)
    } else {
        let limit = q.limit.unwrap_or(DEFAULT_PAGE).min(state.max_limit);
        if q.limit.is_some_and(|l| l == 0 || l > state.max_limit) {
            return Err(Error::bad_request(format!("limit must be 1 to {}", state.max_limit)).into());
        }
        let req = KeysetRequest { table, after: q.after, limit };
        (state.registry.keyset_page(&name, &req).await?, "application/json")
    };
    // The status goes with the first chunk; a later error can only cut the body short,
    // which the client sees as a broken response rather than a whole page.
    let rows = rows.inspect_err(move |e| {
        let _held = &place;
        tracing::warn!(error = %e, "snapshot read failed after it started")
    });
    Ok(([(header::CONTENT_TYPE, content_type)], Body::from_stream(rows)).into_response())
}

const NDJSON: &str = "application/x-ndjson";
/// Rows per page when `limit` is left out.
const DEFAULT_PAGE: u64 = 1000;

/// `DELETE /v2/sessions/{name}/snapshot`.
pub(crate) async fn release_snapshot(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    who.require_session(&name)?;
    let was_held = state.registry.release_named_snapshot(&name).await?;
    Ok(Json(serde_json::json!({ "name": name, "released": true, "wasHeld": was_held })))
}

#[derive(Deserialize)]
pub(crate) struct StreamQuery {
    format: Option<String>,
}

/// `GET /v2/sessions/{name}/stream`: the scope, then the query, as for the snapshot.
pub async fn stream(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    query: Result<Query<StreamQuery>, ApiError>,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    who.require_session(&name)?;
    let Query(q) = query?;
    let format = parse_format(q.format.as_deref())?;
    let upgrade = upgrade?;
    let open = state.registry.open_session_stream(&name, format).await?;
    Ok(serve(&state, upgrade, open, who.stream_deadline()))
}

/// `GET /v2/sessions/{name}/watch`: the session's changes from now on (`changes`
/// format), from a temporary slot of the watcher's own; the session's slot, stream and
/// acks are left alone. Query parameters are ignored (a token may travel there).
pub async fn watch(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    who.require_session(&name)?;
    let upgrade = upgrade?;
    let open = state.registry.open_watch(&name, who.quota_key().as_deref()).await?;
    Ok(serve_observer(&state, upgrade, open, who.stream_deadline()))
}
