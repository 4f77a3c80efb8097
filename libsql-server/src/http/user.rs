//! The user API: Hrana over HTTP (v1, v2, v3 with cursors), the legacy query route, health.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, FromRef, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use libsql_hrana::proto::{Batch, CursorReqBody, CursorRespBody, PipelineReqBody, Stmt};
use serde::Deserialize;
use serde_json::json;

use super::error::{no_route, parse_json};
use super::limits::{answer_buffer, budgeted, method_not_allowed, LimitedBody, RequestLimits};
use super::auth::Authorized;
use super::{legacy, namespace_of, sync, track_requests, ApiError};
use crate::hrana::budget::ResponseBudget;
use crate::hrana::shape;
use tokio::sync::{watch, Semaphore};

use crate::auth::Auth;
use crate::limit_hits::Limit;
use crate::ws::{self, SocketLimits};
use crate::hrana::{Answered, Hrana, JsonCursorEntry};
use crate::metrics::Metrics;
use crate::namespace::NamespaceName;
use crate::net::ConnectionId;

const JSON: &str = "application/json";

#[derive(Clone)]
pub struct UserState {
    pub hrana: Hrana,
    pub auth: Arc<Auth>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<RequestLimits>,
    pub websockets: Arc<WebSockets>,
}

/// How the user port serves Hrana over WebSocket.
pub struct WebSockets {
    /// One place per socket served at once.
    pub places: Arc<Semaphore>,
    pub limits: SocketLimits,
    /// Largest message a client may send (the request body bound).
    pub max_message_size: usize,
    /// Most bytes a socket's outgoing buffer may hold (an answer, and the pongs of a client
    /// that pings and never reads); past it the socket is dropped.
    pub max_write_buffer: usize,
    /// Turns true when the server stops.
    pub stop: watch::Receiver<bool>,
}

impl FromRef<UserState> for Arc<RequestLimits> {
    fn from_ref(state: &UserState) -> Self {
        state.limits.clone()
    }
}

impl UserState {
    pub(super) fn namespace(&self, headers: &HeaderMap) -> Result<NamespaceName, ApiError> {
        namespace_of(headers, self.hrana.store().namespaces_enabled())
    }
}

/// The user API. Its limits (body size and time, running requests) are taken by the handlers'
/// extractors (`LimitedBody`, `Place`) rather than by a middleware on every route; a wrong
/// method gets the JSON 405 from each route's fallback.
pub fn router(hrana: Hrana, auth: Arc<Auth>, metrics: Arc<Metrics>, limits: RequestLimits, websockets: WebSockets) -> Router {
    Router::new()
        .route("/", post(legacy_query).get(websocket).fallback(method_not_allowed))
        .route("/health", get(|| async { StatusCode::OK }).fallback(method_not_allowed))
        .route("/version", get(|| async { concat!("libsql-server ", env!("CARGO_PKG_VERSION")) }).fallback(method_not_allowed))
        .route("/v1", get(|| async { StatusCode::OK }).fallback(method_not_allowed))
        .route("/v2", get(|| async { StatusCode::OK }).fallback(method_not_allowed))
        .route("/v3", get(|| async { StatusCode::OK }).fallback(method_not_allowed))
        .route("/v1/execute", post(execute_v1).fallback(method_not_allowed))
        .route("/v1/batch", post(batch_v1).fallback(method_not_allowed))
        .route("/v2/pipeline", post(pipeline).fallback(method_not_allowed))
        .route("/v3/pipeline", post(pipeline).fallback(method_not_allowed))
        .route("/v3/cursor", post(cursor).fallback(method_not_allowed))
        .route("/v3-protobuf", get(|| async { StatusCode::OK }).fallback(method_not_allowed))
        .route("/v3-protobuf/pipeline", post(pipeline_protobuf).fallback(method_not_allowed))
        .route("/v3-protobuf/cursor", post(cursor_protobuf).fallback(method_not_allowed))
        .route("/info", get(sync::info).fallback(method_not_allowed))
        .route("/export/:generation", get(sync::export).fallback(method_not_allowed))
        .route("/sync/:generation/:start/:end", get(sync::pull).post(sync::push).fallback(method_not_allowed))
        .route("/sync/:generation/:start/:end/:baton", post(sync::push_with_baton).fallback(method_not_allowed))
        .route_layer(axum::middleware::from_fn_with_state((metrics.clone(), "user"), track_requests))
        .fallback(no_route)
        .with_state(UserState { hrana, auth, metrics, limits: Arc::new(limits), websockets: Arc::new(websockets) })
}

/// How a Hrana 3 route's bodies are encoded: JSON (`/v2`, `/v3`) or protobuf
/// (`/v3-protobuf`). The routes share one code path; only decoding and encoding differ.
#[derive(Clone, Copy)]
enum Encoding {
    Json,
    Protobuf,
}

impl Encoding {
    /// Decodes a body that holds at most `--max-request-values` values (checked first, so a
    /// small body never decodes into a large request).
    fn decode<T: serde::de::DeserializeOwned + prost::Message + Default>(self, body: &[u8], limits: &RequestLimits) -> Result<T, ApiError> {
        match self {
            Encoding::Json => decode_json(body, limits),
            Encoding::Protobuf => {
                let invalid = |e: &dyn std::fmt::Display| ApiError::new(StatusCode::BAD_REQUEST, "BODY_INVALID", format!("invalid protobuf body: {e}"));
                match shape::check_protobuf(body, limits.max_values) {
                    Ok(()) => {}
                    Err(shape::ProtobufRefused::TooManyValues(e)) => return Err(too_many_values(e, limits)),
                    Err(e @ shape::ProtobufRefused::NotAMessage) => return Err(invalid(&e)),
                }
                T::decode(body).map_err(|e| invalid(&e))
            }
        }
    }

    /// Appends `value` to `out`: JSON, or a protobuf message prefixed by its length when
    /// `delimited` (the messages of a cursor's answer).
    fn write<T: serde::Serialize + prost::Message>(self, value: &T, out: &mut Vec<u8>, delimited: bool) -> Result<(), ApiError> {
        match self {
            Encoding::Json => serde_json::to_writer(&mut *out, value).map_err(internal_json),
            Encoding::Protobuf if delimited => value.encode_length_delimited(out).map_err(internal_protobuf),
            Encoding::Protobuf => value.encode(out).map_err(internal_protobuf),
        }
    }

    fn content_type(self, json: &'static str) -> &'static str {
        match self {
            Encoding::Json => json,
            Encoding::Protobuf => "application/x-protobuf",
        }
    }
}

/// Decodes a JSON body that holds at most `--max-request-values` values.
fn decode_json<T: serde::de::DeserializeOwned>(body: &[u8], limits: &RequestLimits) -> Result<T, ApiError> {
    shape::check_json(body, limits.max_values).map_err(|e| too_many_values(e, limits))?;
    parse_json(body)
}

fn too_many_values(e: shape::TooManyValues, limits: &RequestLimits) -> ApiError {
    limits.hits.hit(Limit::RequestValues, format_args!("{e}"));
    e.into()
}

/// Hrana clients send their bodies with or without `content-type` (the libSQL Rust crate sends
/// none): bodies are read as bytes and parsed whatever the header says.
async fn pipeline(
    state: State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    authorized: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    run_pipeline(Encoding::Json, state, origin, authorized, body).await
}

async fn pipeline_protobuf(
    state: State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    authorized: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    run_pipeline(Encoding::Protobuf, state, origin, authorized, body).await
}

async fn run_pipeline(
    encoding: Encoding,
    State(state): State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    Authorized { ns, access }: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let LimitedBody { bytes: body, place } = body;
    let request: PipelineReqBody = encoding.decode(&body, &state.limits)?;
    let Answered { answer, budget } = state.hrana.pipeline(&ns, access, request, origin.map(|o| o.0 .0), Some(Box::new(place))).await?;
    let mut out = answer_buffer(&budget);
    encoding.write(&answer, &mut out, false)?;
    Ok(budgeted(encoding.content_type(JSON), out, budget))
}

async fn cursor(
    state: State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    authorized: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    run_cursor(Encoding::Json, state, origin, authorized, body).await
}

async fn cursor_protobuf(
    state: State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    authorized: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    run_cursor(Encoding::Protobuf, state, origin, authorized, body).await
}

/// A cursor answers with its header, then one entry at a time: JSON lines, or protobuf
/// messages each prefixed by its length.
async fn run_cursor(
    encoding: Encoding,
    State(state): State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    Authorized { ns, access }: Authorized,
    body: LimitedBody,
) -> Result<Response, ApiError> {
    let LimitedBody { bytes: body, place } = body;
    let request: CursorReqBody = encoding.decode(&body, &state.limits)?;
    let origin = origin.map(|o| o.0 .0);
    let Answered { answer: (baton, entries), budget } =
        state.hrana.cursor(&ns, access, request.baton.as_deref(), request.batch, origin, Some(Box::new(place))).await?;
    let mut out = answer_buffer(&budget);
    encoding.write(&CursorRespBody { baton, base_url: None }, &mut out, true)?;
    for entry in entries {
        match encoding {
            Encoding::Json => {
                out.push(b'\n');
                serde_json::to_writer(&mut out, &JsonCursorEntry(&entry)).map_err(internal_json)?;
            }
            Encoding::Protobuf => encoding.write(&entry, &mut out, true)?,
        }
    }
    if let Encoding::Json = encoding {
        out.push(b'\n');
    }
    Ok(budgeted(encoding.content_type("text/plain"), out, budget))
}

#[derive(Deserialize)]
struct ExecuteV1 {
    stmt: Stmt,
}

#[derive(Deserialize)]
struct BatchV1 {
    batch: Batch,
}

async fn execute_v1(State(state): State<UserState>, Authorized { ns, access }: Authorized, body: LimitedBody) -> Result<Response, ApiError> {
    let LimitedBody { bytes: body, place } = body;
    let request: ExecuteV1 = decode_json(&body, &state.limits)?;
    let Answered { answer, budget } = state.hrana.execute_once(&ns, access, request.stmt, Some(Box::new(place))).await?;
    let result = answer?;
    Ok(budgeted(JSON, to_json(&json!({ "result": result }), &budget)?, budget))
}

async fn batch_v1(State(state): State<UserState>, Authorized { ns, access }: Authorized, body: LimitedBody) -> Result<Response, ApiError> {
    let LimitedBody { bytes: body, place } = body;
    let request: BatchV1 = decode_json(&body, &state.limits)?;
    let Answered { answer, budget } = state.hrana.batch_once(&ns, access, request.batch, Some(Box::new(place))).await?;
    let result = answer?;
    Ok(budgeted(JSON, to_json(&json!({ "result": result }), &budget)?, budget))
}

async fn legacy_query(State(state): State<UserState>, Authorized { ns, access }: Authorized, body: LimitedBody) -> Result<Response, ApiError> {
    let LimitedBody { bytes: body, place } = body;
    let request: legacy::QueryRequest = decode_json(&body, &state.limits)?;
    legacy::run(&state.hrana, &ns, access, request, Some(Box::new(place))).await
}

/// Hrana over WebSocket: the upgrade, with the best subprotocol the client offers, if a place
/// among the sockets is free. The socket's `hello` authenticates it (see `ws`).
async fn websocket(
    State(state): State<UserState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|e| ApiError::new(e.status(), "NOT_A_WEBSOCKET", e.body_text()))?;
    let ns = state.namespace(&headers)?;
    state.hrana.store().learn_config(&ns).await?;
    let websockets = &state.websockets;
    let Ok(place) = websockets.places.clone().try_acquire_owned() else {
        state.metrics.hits.hit(Limit::WebSockets, format_args!("namespace {ns}"));
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "WEBSOCKETS_EXHAUSTED", "too many WebSockets are open; retry later"));
    };
    let socket = ws::Socket {
        hrana: state.hrana.clone(),
        auth: state.auth.clone(),
        metrics: state.metrics.clone(),
        ns,
        limits: websockets.limits,
        stop: websockets.stop.clone(),
        place,
        running: state.limits.running.clone(),
        queue_wait: state.limits.queue_wait,
    };
    Ok(upgrade
        .protocols(ws::PROTOCOLS)
        .max_message_size(websockets.max_message_size)
        .max_frame_size(websockets.max_message_size)
        .max_write_buffer_size(websockets.max_write_buffer)
        .on_upgrade(move |socket_io| ws::serve(socket_io, socket)))
}

/// An answer as JSON, in a buffer sized from its budget.
fn to_json<T: serde::Serialize>(value: &T, budget: &ResponseBudget) -> Result<Vec<u8>, ApiError> {
    let mut out = answer_buffer(budget);
    serde_json::to_writer(&mut out, value).map_err(internal_json)?;
    Ok(out)
}

fn internal_protobuf(e: prost::EncodeError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("encoding a response: {e}"))
}

fn internal_json(e: serde_json::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("encoding a response: {e}"))
}
