//! Every gRPC call is admitted from its headers before its body is read: its namespace and
//! credential checked (see [`GrpcState::admit`]), the caller handed to the handler as a
//! request extension, and a refusal answered at once, so an unauthenticated client never
//! gets a message read, let alone decoded.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{ready, Either, Ready};
use tonic::body::BoxBody;
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower::Service;

use super::{Caller, GrpcState};

#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    state: Arc<GrpcState>,
}

impl<S> Admit<S> {
    pub fn new(inner: S, state: Arc<GrpcState>) -> Self {
        Admit { inner, state }
    }
}

impl<S> Service<http::Request<hyper::Body>> for Admit<S>
where
    S: Service<http::Request<hyper::Body>, Response = http::Response<BoxBody>>,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<hyper::Body>) -> Self::Future {
        match self.state.admit(&MetadataMap::from_headers(request.headers().clone())) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Either::Right(self.inner.call(request))
            }
            Err(status) => Either::Left(ready(Ok(status.to_http()))),
        }
    }
}

/// The caller [`Admit`] admitted.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request.extensions().get::<Caller>().cloned().ok_or_else(|| Status::internal("a call reached its handler without admission"))
}
