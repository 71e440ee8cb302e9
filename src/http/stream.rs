//! `GET /v1/lr/stream?slotName=NAME[&format=changes]` (websocket)

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use tokio::time::Instant;

use super::auth::{Principal, Role};
use super::extract::Query;
use super::upgrade::Upgrade;
use super::{ApiError, AppState};
use crate::error::{Error, ErrorKind};
use crate::session::OpenStream;
use crate::stream::frame::Format;
use crate::stream::observer::Observer;
use crate::stream::sink::Sink;
use crate::stream::stop::code;

#[derive(Deserialize)]
pub(crate) struct StreamQuery {
    #[serde(rename = "slotName")]
    slot_name: Option<String>,
    /// `transactions` (default: one message per transaction, wal2json v1) or
    /// `changes` (one message per begin/change/commit, wal2json v2).
    format: Option<String>,
}

/// Checks the slot and starts replication *before* upgrading, so that every refusal
/// is an HTTP error the client can read, never a silent socket.
pub async fn stream(
    State(state): State<AppState>,
    who: Principal,
    Query(q): Query<StreamQuery>,
    upgrade: Result<Upgrade, ApiError>,
) -> Result<Response, ApiError> {
    let slot = q.slot_name.filter(|s| !s.is_empty()).ok_or_else(|| Error::bad_request("no slotName provided"))?;
    require_slot(&state, &who, &slot).await?;
    let format = parse_format(q.format.as_deref())?;
    let upgrade = upgrade?;
    let open = state.registry.open_stream(&slot, format).await?;
    Ok(serve(&state, upgrade, open, who.stream_deadline()))
}

/// A v1 route names a slot: a consumer may use it when its token names the session the
/// slot belongs to, now (the default session's slot changes with each init), or the
/// slot itself. Whatever keeps the slot from being found is a 403 too, unless the token
/// names it: out of its scope a consumer learns nothing of other slots.
pub(super) async fn require_slot(state: &AppState, who: &Principal, slot: &str) -> Result<(), ApiError> {
    if who.role == Role::Admin {
        return Ok(());
    }
    match state.registry.slot_grants(slot).await {
        Ok(grants) if grants.iter().any(|n| who.may_use(n)) => Ok(()),
        Err(e) if who.may_use(slot) => Err(e.into()),
        _ => Err(ApiError(Error::new(
            ErrorKind::Forbidden,
            format!("the token grants neither slot {slot:?} nor the session it belongs to"),
        ))),
    }
}

/// `transactions` (the default) or `changes`.
pub(crate) fn parse_format(format: Option<&str>) -> Result<Format, Error> {
    match format {
        None | Some("transactions") => Ok(Format::Transactions),
        Some("changes") => Ok(Format::Changes),
        Some(other) => {
            Err(Error::bad_request(format!("unknown format {other:?}: use \"transactions\" or \"changes\"")))
        }
    }
}

/// Answers the upgrade and runs the stream on the websocket, until `deadline` (when
/// the token it was opened with expires) at the latest.
pub fn serve(state: &AppState, upgrade: Upgrade, open: OpenStream, deadline: Option<Instant>) -> Response {
    let settings = state.registry.settings();
    upgrade.websocket(state.registry.tasks(), settings.socket.clone(), settings.frame_bytes, move |socket| {
        run_until(open, socket, deadline)
    })
}

/// The same for a viewer watching a session: the stream is confirmed as it is sent.
pub(crate) fn serve_observer(
    state: &AppState,
    upgrade: Upgrade,
    open: OpenStream,
    deadline: Option<Instant>,
) -> Response {
    let settings = state.registry.settings();
    upgrade.websocket(state.registry.tasks(), settings.socket.clone(), settings.frame_bytes, move |socket| {
        run_until(open, Observer(socket), deadline)
    })
}

/// The stream, stopped with 1008 at `deadline`: only a disconnect, so the slot stays
/// as it was and the client resumes with a new token.
async fn run_until(open: OpenStream, sink: impl Sink, deadline: Option<Instant>) {
    let stop = open.stop();
    let run = open.run(sink);
    let Some(deadline) = deadline else {
        return run.await;
    };
    let mut run = std::pin::pin!(run);
    tokio::select! {
        () = &mut run => return,
        () = tokio::time::sleep_until(deadline) => {
            stop.stop(code::POLICY, "the token has expired: reconnect with a new one");
        }
    }
    run.await
}
