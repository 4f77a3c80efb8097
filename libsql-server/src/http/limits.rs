//! Limits every request passes before its handler: how many run at once, how large and how
//! slow a body may be. The body is read here, whole, under both bounds, so no handler ever
//! waits on a client that declared more than it sends; a declared length over the limit is
//! refused before a byte of it is read.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::{FromRef, FromRequest, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::http::{header, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{HttpBody, SizeHint};
use hyper::Body;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::hrana::budget::ResponseBudget;
use crate::limit_hits::{self, Limit, LimitHits};

#[derive(Clone)]
pub struct RequestLimits {
    pub max_body_size: usize,
    pub body_read_timeout: Duration,
    /// Requests running at once; a request waits at most `queue_wait` for a place.
    pub running: Arc<Semaphore>,
    pub queue_wait: Duration,
    /// Most values a Hrana request may hold (see `hrana::shape`).
    pub max_values: usize,
    pub hits: Arc<LimitHits>,
}

impl RequestLimits {
    pub fn new(max_body_size: usize, body_read_timeout: Duration, max_concurrent: usize, hits: Arc<LimitHits>) -> Self {
        RequestLimits {
            max_body_size,
            body_read_timeout,
            running: Arc::new(Semaphore::new(max_concurrent)),
            queue_wait: QUEUE_WAIT,
            max_values: usize::MAX,
            hits,
        }
    }
}

/// How long a request waits for one of the `--max-concurrent-requests` places.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

enum BodyError {
    TooLarge,
    Broken(hyper::Error),
}

/// The middleware form (the admin API): the body, then a place among the running requests,
/// then the handler, and a JSON body for a 405.
pub async fn enforce(State(limits): State<RequestLimits>, request: Request<Body>, next: Next<Body>) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = match read_limited(&limits, &parts, body).await {
        Ok(bytes) => bytes,
        Err(answer) => return answer,
    };
    let _place = match take_place(&limits, &parts).await {
        Ok(place) => place,
        Err(answer) => return answer,
    };
    json_method_not_allowed(next.run(Request::from_parts(parts, Body::from(bytes))).await)
}

/// The extractor form (the user API, where a middleware on every route costs more than the
/// rest of a point read's routing): the request's body read under the limits, and its place
/// among the running requests, held while the handler runs. The body comes first, so a slow
/// sender holds a connection but no place.
pub struct LimitedBody {
    pub bytes: Bytes,
    pub place: OwnedSemaphorePermit,
}

#[axum::async_trait]
impl<S: Send + Sync> FromRequest<S, Body> for LimitedBody
where
    Arc<RequestLimits>: FromRef<S>,
{
    type Rejection = Response;

    async fn from_request(request: Request<Body>, state: &S) -> Result<Self, Response> {
        let limits = Arc::<RequestLimits>::from_ref(state);
        let (parts, body) = request.into_parts();
        let bytes = read_limited(&limits, &parts, body).await?;
        let place = take_place(&limits, &parts).await?;
        Ok(LimitedBody { bytes, place })
    }
}

/// A place among the running requests, for a request without a body that does real work.
pub struct Place(pub OwnedSemaphorePermit);

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for Place
where
    Arc<RequestLimits>: FromRef<S>,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let limits = Arc::<RequestLimits>::from_ref(state);
        take_place(&limits, parts).await.map(Place)
    }
}

/// The whole body, bounded in size and in time, or the answer to give instead. Waiting for a
/// body still on its way is the rare path: its timer lives in a boxed future made only then.
async fn read_limited(limits: &RequestLimits, parts: &Parts, mut body: Body) -> Result<Bytes, Response> {
    let path = parts.uri.path();
    let max = limits.max_body_size;
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut got = Received::default();
    let read = match declared {
        Some(n) if n > max as u64 => Ok(Err(BodyError::TooLarge)),
        _ => match futures::FutureExt::now_or_never(read_body(&mut body, &mut got, max)) {
            Some(read) => Ok(read),
            None => Box::pin(tokio::time::timeout(limits.body_read_timeout, read_body(&mut body, &mut got, max))).await,
        },
    };
    match read {
        Ok(Ok(())) => Ok(got.into_bytes()),
        Ok(Err(BodyError::TooLarge)) => {
            limits.hits.hit(Limit::BodySize, format_args!("{path}: a body over {max} bytes (declared: {declared:?})"));
            // A body not far over the limit is read to its end (and dropped), so the client
            // gets the 413 rather than a reset connection; a larger one is not waited for.
            if declared.is_none_or(|n| n <= DRAIN_FACTOR * max as u64) {
                let _ = Box::pin(tokio::time::timeout(limits.body_read_timeout, drain(&mut body, DRAIN_FACTOR as usize * max))).await;
            }
            Err(too_large(max))
        }
        Ok(Err(BodyError::Broken(e))) => Err(ApiError::bad_request(format!("the request body could not be read: {e}")).into_response()),
        Err(_) => {
            limits.hits.hit(Limit::BodyTimeout, format_args!("{path}: body not complete after {:?}", limits.body_read_timeout));
            let message = format!("the request body did not arrive within {:?}", limits.body_read_timeout);
            Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "BODY_TIMEOUT", message).into_response())
        }
    }
}

/// A place among the running requests: at once if one is free, else after a bounded wait.
async fn take_place(limits: &RequestLimits, parts: &Parts) -> Result<OwnedSemaphorePermit, Response> {
    if let Some(place) = Box::pin(limit_hits::take_place(&limits.running, limits.queue_wait)).await {
        return Ok(place);
    }
    limits.hits.hit(Limit::Requests, format_args!("{} {}", parts.method, parts.uri.path()));
    let mut response =
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "REQUESTS_EXHAUSTED", "too many requests are running; retry later").into_response();
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    Err(response)
}

/// How far over the limit a body is still read to its end before the 413.
const DRAIN_FACTOR: u64 = 4;

/// What has arrived of a body. A body that arrives in one piece (most) is never copied.
#[derive(Default)]
struct Received {
    first: Option<Bytes>,
    rest: Vec<u8>,
}

impl Received {
    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, |f| f.len()) + self.rest.len()
    }

    fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            None => self.rest.extend_from_slice(&chunk),
            Some(first) => {
                self.rest.reserve(first.len() + chunk.len());
                self.rest.extend_from_slice(&first);
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| Bytes::from(self.rest))
    }
}

/// Reads the rest of the body into `got`, up to `max` bytes in all. What arrived stays in
/// `got` if the future is dropped midway.
async fn read_body(body: &mut Body, got: &mut Received, max: usize) -> Result<(), BodyError> {
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(BodyError::Broken)?;
        if got.len() + chunk.len() > max {
            return Err(BodyError::TooLarge);
        }
        got.push(chunk);
    }
    Ok(())
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
    method_not_allowed_with(response)
}

/// The JSON 405 answer (a route's method fallback on the user API).
pub async fn method_not_allowed() -> ApiError {
    method_not_allowed_error()
}

fn method_not_allowed_error() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED", "this route does not take that method")
}

fn method_not_allowed_with(response: Response) -> Response {
    let (parts, _) = response.into_parts();
    let mut answer = method_not_allowed_error().into_response();
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

/// A buffer for an answer of about the size its budget was charged.
pub fn answer_buffer(budget: &ResponseBudget) -> Vec<u8> {
    Vec::with_capacity(budget.used() + 256)
}

/// A 200 answer of `content_type` whose bytes stay counted against the response bounds until
/// sent.
pub fn budgeted(content_type: &'static str, bytes: Vec<u8>, budget: ResponseBudget) -> Response {
    let mut response = Response::new(axum::body::boxed(Budgeted { rest: Bytes::from(bytes), _budget: budget }));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
