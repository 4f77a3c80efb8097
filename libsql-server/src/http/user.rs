//! The user API: Hrana over HTTP (v1, v2, v3 with cursors), the legacy query route, health.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use libsql_hrana::proto::{Batch, CursorReqBody, CursorRespBody, PipelineReqBody, Stmt};
use serde::Deserialize;
use serde_json::json;

use super::error::{no_route, parse_json};
use super::limits::{budgeted, enforce, RequestLimits};
use super::{legacy, namespace_of, sync, track_requests, ApiError};
use crate::hrana::{Answered, Hrana};
use crate::metrics::Metrics;
use crate::namespace::NamespaceName;
use crate::net::ConnectionId;

const JSON: &str = "application/json";

#[derive(Clone)]
pub struct UserState {
    pub hrana: Hrana,
    pub metrics: Arc<Metrics>,
}

impl UserState {
    pub(super) fn namespace(&self, headers: &HeaderMap) -> Result<NamespaceName, ApiError> {
        namespace_of(headers, self.hrana.store().namespaces_enabled())
    }
}

pub fn router(hrana: Hrana, metrics: Arc<Metrics>, limits: RequestLimits) -> Router {
    let max_body_size = limits.max_body_size;
    Router::new()
        .route("/", post(legacy_query))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/version", get(|| async { concat!("libsql-server ", env!("CARGO_PKG_VERSION")) }))
        .route("/v1", get(|| async { StatusCode::OK }))
        .route("/v2", get(|| async { StatusCode::OK }))
        .route("/v3", get(|| async { StatusCode::OK }))
        .route("/v1/execute", post(execute_v1))
        .route("/v1/batch", post(batch_v1))
        .route("/v2/pipeline", post(pipeline))
        .route("/v3/pipeline", post(pipeline))
        .route("/v3/cursor", post(cursor))
        .route("/info", get(sync::info))
        .route("/export/:generation", get(sync::export))
        .route("/sync/:generation/:start/:end", get(sync::pull).post(sync::push))
        .route("/sync/:generation/:start/:end/:baton", post(sync::push_with_baton))
        .route_layer(axum::middleware::from_fn_with_state((metrics.clone(), "user"), track_requests))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_size))
        .layer(axum::middleware::from_fn_with_state(limits, enforce))
        .with_state(UserState { hrana, metrics })
}

/// Hrana clients send their bodies with or without `content-type` (the libSQL Rust crate sends
/// none): bodies are read as bytes and parsed as JSON whatever the header says.
async fn pipeline(
    State(state): State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let ns = state.namespace(&headers)?;
    let request: PipelineReqBody = parse_json(&body)?;
    let Answered { answer, budget } = state.hrana.pipeline(&ns, request, origin.map(|o| o.0 .0)).await?;
    Ok(budgeted(JSON, serde_json::to_vec(&answer).map_err(internal_json)?, budget))
}

/// A cursor answers with newline-separated JSON: the cursor header, then one entry a line.
async fn cursor(
    State(state): State<UserState>,
    origin: Option<Extension<ConnectionId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let ns = state.namespace(&headers)?;
    let request: CursorReqBody = parse_json(&body)?;
    let origin = origin.map(|o| o.0 .0);
    let Answered { answer: (baton, entries), budget } = state.hrana.cursor(&ns, request.baton.as_deref(), request.batch, origin).await?;
    let mut out = serde_json::to_vec(&CursorRespBody { baton, base_url: None }).map_err(internal_json)?;
    for entry in entries {
        out.push(b'\n');
        serde_json::to_writer(&mut out, &entry).map_err(internal_json)?;
    }
    out.push(b'\n');
    Ok(budgeted("text/plain", out, budget))
}

#[derive(Deserialize)]
struct ExecuteV1 {
    stmt: Stmt,
}

#[derive(Deserialize)]
struct BatchV1 {
    batch: Batch,
}

async fn execute_v1(State(state): State<UserState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let ns = state.namespace(&headers)?;
    let request: ExecuteV1 = parse_json(&body)?;
    let Answered { answer, budget } = state.hrana.execute_once(&ns, request.stmt).await?;
    let result = answer?;
    Ok(budgeted(JSON, serde_json::to_vec(&json!({ "result": result })).map_err(internal_json)?, budget))
}

async fn batch_v1(State(state): State<UserState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body?;
    let ns = state.namespace(&headers)?;
    let request: BatchV1 = parse_json(&body)?;
    let Answered { answer, budget } = state.hrana.batch_once(&ns, request.batch).await?;
    let result = answer?;
    Ok(budgeted(JSON, serde_json::to_vec(&json!({ "result": result })).map_err(internal_json)?, budget))
}

async fn legacy_query(
    State(state): State<UserState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let ns = state.namespace(&headers)?;
    let request: legacy::QueryRequest = parse_json(&body)?;
    legacy::run(&state.hrana, &ns, request).await
}

fn internal_json(e: serde_json::Error) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("encoding a response: {e}"))
}
