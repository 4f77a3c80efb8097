//! The one place where errors of every layer become HTTP statuses and JSON bodies.

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;
use crate::database::interrupt::Reason;
use crate::database::{AccessError, RebuildError, ResetError};
use crate::hrana::budget::BudgetError;
use crate::hrana::{RequestError, StmtError};
use crate::namespace::{self, InvalidName};

/// An HTTP error answer: `{"error": "...", "message": "...", "code": "..."}`. `error` is what
/// the libSQL admin API uses; `message` and `code` are what Hrana clients read.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub code: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), code: code.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "request failed");
        }
        let body = json!({ "error": self.message, "message": self.message, "code": self.code });
        (self.status, Json(body)).into_response()
    }
}

impl From<namespace::Error> for ApiError {
    fn from(e: namespace::Error) -> Self {
        use namespace::Error as E;
        let status = match &e {
            E::NotFound(_) | E::Deleted(_) => StatusCode::NOT_FOUND,
            E::AlreadyExists(_) => StatusCode::CONFLICT,
            E::InvalidName(_) | E::NamespacesDisabled | E::DefaultNamespace | E::NotPrimary(_) => StatusCode::BAD_REQUEST,
            E::ShuttingDown | E::Bootstrapping(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Rebuild { source, .. } => match source {
                RebuildError::LogCorrupt(_) | RebuildError::ReplayCorrupt(_) => StatusCode::CONFLICT,
                RebuildError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                RebuildError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            E::Reset { source: ResetError::Busy(_) | ResetError::Unchecked(_), .. } => StatusCode::SERVICE_UNAVAILABLE,
            E::Reset { .. } | E::Database { .. } | E::Meta(_) | E::Log { .. } | E::Io { .. } | E::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// A refused credential: 401, the reason in the code and message (never the credential).
impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, e.code(), e.to_string())
    }
}

impl From<InvalidName> for ApiError {
    fn from(e: InvalidName) -> Self {
        namespace::Error::from(e).into()
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        let status = match &e {
            RequestError::UnknownBaton
            | RequestError::ExpiredBaton
            | RequestError::TransactionTimedOut
            | RequestError::BatonNamespaceMismatch => StatusCode::BAD_REQUEST,
            RequestError::TooManyStreams => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::TooManyNamespaceStreams | RequestError::TooManyConnectionStreams => StatusCode::TOO_MANY_REQUESTS,
            RequestError::Namespace(_) => {
                let RequestError::Namespace(e) = e else { unreachable!() };
                return e.into();
            }
            RequestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// A statement's error as the answer of a one-statement request (Hrana v1 over HTTP): the
/// client's SQL is its own mistake (400); a namespace gone is 404; the server's own failures
/// (a broken log, I/O, a full disk) are 5xx.
impl From<StmtError> for ApiError {
    fn from(e: StmtError) -> Self {
        use libsql_sys::rusqlite::ErrorCode;
        let status = match &e {
            StmtError::Namespace(_) => {
                let StmtError::Namespace(e) = e else { unreachable!() };
                return e.into();
            }
            StmtError::Access(AccessError::WriteLockTimeout) => StatusCode::SERVICE_UNAVAILABLE,
            StmtError::Access(AccessError::ReadOnly) => StatusCode::UNAUTHORIZED,
            StmtError::Budget(BudgetError::ServerFull) => StatusCode::SERVICE_UNAVAILABLE,
            // A replica whose primary is out of reach, or which lags behind it.
            StmtError::Primary { .. } | StmtError::ReplicaBehind(_) => StatusCode::SERVICE_UNAVAILABLE,
            StmtError::Access(AccessError::Interrupted(Reason::ShuttingDown | Reason::ClientGone)) => StatusCode::SERVICE_UNAVAILABLE,
            // A statement over its time limit and a database at its quota are the client's.
            StmtError::Access(AccessError::Interrupted(_) | AccessError::QuotaExceeded { .. } | AccessError::MemoryLimit(_)) => {
                StatusCode::BAD_REQUEST
            }
            StmtError::Sqlite(err) | StmtError::Access(AccessError::Sqlite(err)) => match err.sqlite_error_code() {
                Some(ErrorCode::SystemIoFailure | ErrorCode::DiskFull | ErrorCode::DatabaseCorrupt | ErrorCode::CannotOpen) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            },
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<crate::blocking::Panicked> for ApiError {
    fn from(e: crate::blocking::Panicked) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string())
    }
}

/// A body that could not be read: too large (413) or broken off.
impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE { "BODY_TOO_LARGE" } else { "BODY_UNREADABLE" };
        ApiError::new(e.status(), code, e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<crate::hrana::shape::TooManyValues> for ApiError {
    fn from(e: crate::hrana::shape::TooManyValues) -> Self {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_MANY_VALUES", e.to_string())
    }
}

/// Parses a JSON body; any mistake in it is the client's (400), with serde's explanation.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BODY_INVALID", format!("invalid JSON body: {e}")))
}

/// Answer for routes that do not exist.
pub async fn no_route() -> ApiError {
    ApiError::not_found("no such route")
}
