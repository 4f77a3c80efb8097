//! Limits every request passes before its handler: how many run at once, how large and how
//! slow a body may be. The body is read here, whole, under both bounds, so no handler ever
//! waits on a client that declared more than it sends; a declared length over the limit is
//! refused before a byte of it is read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::body::Bytes;
use axum::http::HeaderMap;
use hyper::body::{HttpBody, SizeHint};
use hyper::Body;
use tokio::sync::Semaphore;

use super::ApiError;
use crate::hrana::budget::ResponseBudget;
use crate::limit_hits::{Limit, LimitHits};

#[derive(Clone)]
pub struct RequestLimits {
    pub max_body_size: usize,
    pub body_read_timeout: Duration,
    /// Requests running at once; a request waits at most `queue_wait` for a place.
    pub running: Arc<Semaphore>,
    pub queue_wait: Duration,
    pub hits: Arc<LimitHits>,
}

impl RequestLimits {
    pub fn new(max_body_size: usize, body_read_timeout: Duration, max_concurrent: usize, hits: Arc<LimitHits>) -> Self {
        RequestLimits { max_body_size, body_read_timeout, running: Arc::new(Semaphore::new(max_concurrent)), queue_wait: QUEUE_WAIT, hits }
    }
}

/// How long a request waits for one of the `--max-concurrent-requests` places.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

enum BodyError {
    TooLarge,
    Broken(hyper::Error),
}

/// The middleware: the body (bounded in size and time), then a place among the running
/// requests, then the handler. The body comes first so that a slow sender holds a connection
/// but no place.
pub async fn enforce(State(limits): State<RequestLimits>, request: Request<Body>, next: Next<Body>) -> Response {
    let (parts, mut body) = request.into_parts();
    let path = parts.uri.path();
    let max = limits.max_body_size;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let read = match declared {
        Some(n) if n > max as u64 => Ok(Err(BodyError::TooLarge)),
        // A small body has usually arrived with its head: a timer only when it has not.
        _ => {
            let read = read_body(&mut body, max);
            tokio::pin!(read);
            match futures::poll!(read.as_mut()) {
                Poll::Ready(read) => Ok(read),
                Poll::Pending => tokio::time::timeout(limits.body_read_timeout, read).await,
            }
        }
    };
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(BodyError::TooLarge)) => {
            limits.hits.hit(Limit::BodySize, format_args!("{path}: a body over {max} bytes (declared: {declared:?})"));
            // A body not far over the limit is read to its end (and dropped), so the client
            // gets the 413 rather than a reset connection; a larger one is not waited for.
            if declared.is_none_or(|n| n <= DRAIN_FACTOR * max as u64) {
                let _ = tokio::time::timeout(limits.body_read_timeout, drain(&mut body, DRAIN_FACTOR as usize * max)).await;
            }
            return too_large(max);
        }
        Ok(Err(BodyError::Broken(e))) => return ApiError::bad_request(format!("the request body could not be read: {e}")).into_response(),
        Err(_) => {
            limits.hits.hit(Limit::BodyTimeout, format_args!("{path}: body not complete after {:?}", limits.body_read_timeout));
            let message = format!("the request body did not arrive within {:?}", limits.body_read_timeout);
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, "BODY_TIMEOUT", message).into_response();
        }
    };
    // A timer only when the request must wait (most do not).
    let place = match limits.running.clone().try_acquire_owned() {
        Ok(place) => Ok(Ok(place)),
        Err(_) => tokio::time::timeout(limits.queue_wait, limits.running.clone().acquire_owned()).await,
    };
    let Ok(Ok(_running)) = place else {
        limits.hits.hit(Limit::Requests, format_args!("{} {path}", parts.method));
        let mut response =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "REQUESTS_EXHAUSTED", "too many requests are running; retry later")
                .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    json_method_not_allowed(next.run(Request::from_parts(parts, Body::from(bytes))).await)
}

/// How far over the limit a body is still read to its end before the 413.
const DRAIN_FACTOR: u64 = 4;

async fn read_body(body: &mut Body, max: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(BodyError::Broken)?;
        if out.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads and drops up to `cap` more bytes of a body.
async fn drain(body: &mut Body, cap: usize) {
    let mut seen = 0;
    while let Some(Ok(chunk)) = body.data().await {
        seen += chunk.len();
        if seen > cap {
            return;
        }
    }
}

fn too_large(max: usize) -> Response {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE", format!("the request body is larger than {max} bytes")).into_response()
}

/// The router answers a known route with the wrong method with an empty 405: give it the
/// JSON error body every other answer has (keeping its `allow` header).
fn json_method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut answer =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", "this route does not take that method").into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

/// An answer body that holds its share of the response bound until hyper has taken its last
/// piece: it is handed out in pieces as the connection drains, so a client that does not read
/// keeps at most a socket buffer's worth in hyper, and the rest counted here.
struct Budgeted {
    rest: Bytes,
    _budget: ResponseBudget,
}

/// Piece size: what hyper buffers of an answer at a time.
const PIECE: usize = 64 * 1024;

impl HttpBody for Budgeted {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_data(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(PIECE);
        Poll::Ready(Some(Ok(self.rest.split_to(n))))
    }

    fn poll_trailers(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, Self::Error>> {
        Poll::Ready(Ok(None))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A 200 answer of `content_type` whose bytes stay counted against the response bounds until
/// sent.
pub fn budgeted(content_type: &'static str, bytes: Vec<u8>, budget: ResponseBudget) -> Response {
    let mut response = Response::new(axum::body::boxed(Budgeted { rest: Bytes::from(bytes), _budget: budget }));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
