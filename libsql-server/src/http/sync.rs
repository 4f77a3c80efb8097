//! Sync protocol v2, what embedded replicas of current libSQL clients speak: `GET /info`,
//! `GET /export/{gen}`, `GET /sync/{gen}/{start}/{end}` (pull) and
//! `POST /sync/{gen}/{start}/{end}[/{baton}]` (push of offline writes). The namespace comes
//! from the request as for every user route (`Host`'s first label when no header names it).

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::auth::Authorized;
use super::limits::{LimitedBody, Place};
use super::user::UserState;
use super::ApiError;
use crate::blocking;
use crate::database::{PushError, PushOutcome};
use crate::replication::sync::{self, Pull};

/// Most frames one pull may ask for (clients ask for 128).
pub const MAX_PULL_FRAMES: u64 = 4096;

pub async fn info(State(state): State<UserState>, Authorized { ns, .. }: Authorized, _place: Place) -> Result<Response, ApiError> {
    let ns = state.hrana.store().get(&ns).await?;
    let generation = ns.log()?.generation();
    Ok(Json(json!({ "current_generation": generation })).into_response())
}

/// The database generation `gen` starts from. Every generation opens with a full image of the
/// database in its first frames, so it starts from the empty database: the export is empty,
/// and the client builds the database from frames 1.. (clients accept this; it saves sending
/// every page twice).
pub async fn export(
    State(state): State<UserState>,
    Authorized { ns, .. }: Authorized,
    _place: Place,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(generation) = path?;
    let generation = parse_number("generation", &generation)?;
    let ns = state.hrana.store().get(&ns).await?;
    let current = ns.log()?.generation();
    if generation != current {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "GENERATION_NOT_FOUND",
            format!("generation {generation} cannot be exported; the current generation is {current}"),
        ));
    }
    state.metrics.count("sqld_sync_exports_total", "Sync v2 database exports served.", 1);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Bytes::new()).into_response())
}

pub async fn pull(
    State(state): State<UserState>,
    Authorized { ns, .. }: Authorized,
    _place: Place,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((generation, start, end)) = path?;
    let generation = parse_number("generation", &generation)?;
    let start = parse_number("start frame", &start)?;
    let end = parse_number("end frame", &end)?;
    if end <= start {
        return Err(ApiError::bad_request(format!("the end frame ({end}) must be after the start frame ({start})")));
    }
    if end - start > MAX_PULL_FRAMES {
        return Err(ApiError::bad_request(format!("at most {MAX_PULL_FRAMES} frames may be pulled at once")));
    }
    let ns = state.hrana.store().get(&ns).await?;
    let answer = blocking::run(move || ns.log().map(|log| sync::pull(log, generation, start, end)))
        .await??
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "LOG_UNREADABLE", e.to_string()))?;
    match answer {
        Pull::Frames(frames) => {
            state.metrics.count("sqld_sync_frames_pulled_total", "Frames served to sync v2 clients.", frames.len() as u64 / 4120);
            state.metrics.count("sqld_sync_bytes_pulled_total", "Bytes of frames served to sync v2 clients.", frames.len() as u64);
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], frames).into_response())
        }
        // The protocol's end-of-generation answer: a 400 whose body names the current one.
        Pull::EndOfGeneration { current } => Ok((StatusCode::BAD_REQUEST, Json(json!({ "generation": current }))).into_response()),
    }
}

/// A positive decimal number that fits in 32 bits (what clients keep frame numbers and
/// generations in).
fn parse_number(what: &str, text: &str) -> Result<u64, ApiError> {
    match text.parse::<u32>() {
        Ok(0) => Err(ApiError::bad_request(format!("the {what} must be at least 1"))),
        Ok(n) => Ok(n as u64),
        Err(_) => Err(ApiError::bad_request(format!("the {what} {text:?} is not a number from 1 to {}", u32::MAX))),
    }
}

type PushPath = (String, String, String);

pub async fn push(
    state: State<UserState>,
    authorized: Authorized,
    path: Result<Path<PushPath>, PathRejection>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    push_frames(state, authorized, path.map(|Path(p)| p)?, body.bytes).await
}

/// The same push with a baton: batons tie the requests of one push together for the client;
/// this server applies each request on its own, so it accepts and ignores them.
pub async fn push_with_baton(
    state: State<UserState>,
    authorized: Authorized,
    path: Result<Path<(String, String, String, String)>, PathRejection>,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let Path((generation, start, end, _baton)) = path?;
    push_frames(state, authorized, (generation, start, end), body.bytes).await
}

async fn push_frames(State(state): State<UserState>, authorized: Authorized, path: PushPath, body: Bytes) -> Result<Response, ApiError> {
    authorized.require_write(&state.auth)?;
    let (generation, start, end) = path;
    let generation = parse_number("generation", &generation)?;
    let start = parse_number("start frame", &start)?;
    let end = parse_number("end frame", &end)?;
    if end <= start {
        return Err(ApiError::bad_request(format!("the end frame ({end}) must be after the start frame ({start})")));
    }
    let count = crate::database::check_frames(&body).map_err(push_error)?;
    if count as u64 != end - start {
        return Err(ApiError::bad_request(format!("the body holds {count} frames, the path says {}", end - start)));
    }
    let ns = state.hrana.store().get(&authorized.ns).await?;
    let outcome = blocking::run(move || ns.db().apply_push(generation, start, &body)).await?.map_err(push_error)?;
    let (status, target) = match outcome {
        PushOutcome::Applied(target) => {
            state.metrics.count("sqld_sync_pushes_accepted_total", "Sync v2 pushes applied.", 1);
            ("ok", target)
        }
        PushOutcome::Conflict(target) => {
            state.metrics.count("sqld_sync_pushes_conflicting_total", "Sync v2 pushes refused as conflicting.", 1);
            ("conflict", target)
        }
    };
    Ok(Json(json!({ "status": status, "generation": target.generation, "max_frame_no": target.max_frame_no, "baton": null })).into_response())
}

fn push_error(e: PushError) -> ApiError {
    let (status, code) = match &e {
        PushError::Malformed(_) => (StatusCode::BAD_REQUEST, "PUSH_MALFORMED"),
        PushError::FailsQuickCheck(_) => (StatusCode::UNPROCESSABLE_ENTITY, "PUSH_CORRUPT"),
        PushError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "BUSY"),
        PushError::Blocked(_) => (StatusCode::FORBIDDEN, "BLOCKED"),
        PushError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PUSH_TOO_LARGE"),
        PushError::Apply(_) => (StatusCode::INTERNAL_SERVER_ERROR, "PUSH_FAILED"),
    };
    ApiError::new(status, code, e.to_string())
}
