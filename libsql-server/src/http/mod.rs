//! HTTP transports: the user API (Hrana) and the admin API, both axum routers.

pub mod admin;
mod auth;
mod error;
mod legacy;
pub mod limits;
mod namespace_header;
mod sync;
pub mod user;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, State};
use axum::http::Request;
use axum::middleware::Next;
use axum::response::Response;

pub use error::ApiError;
pub use namespace_header::namespace_of;

use crate::metrics::Metrics;

/// Counts each request and its latency under its route pattern (never the raw path, which
/// would make one time series per namespace or baton).
pub(crate) async fn track_requests<B>(
    State((metrics, api)): State<(Arc<Metrics>, &'static str)>,
    request: Request<B>,
    next: Next<B>,
) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let method = request.method().clone();
    let response = next.run(request).await;
    metrics.record(api, method.as_str(), &route, response.status().as_u16(), started.elapsed());
    response
}
