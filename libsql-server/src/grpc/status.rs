//! The one place where errors of every layer become gRPC statuses. Replicas act on a few of
//! them: `FAILED_PRECONDITION` with `NEED_SNAPSHOT` (fetch the snapshot), `NO_HELLO` (hello
//! again) or `NAMESPACE_DOESNT_EXIST` (give up); anything else makes them retry later.

use libsql_replication::rpc::replication::{NAMESPACE_DOESNT_EXIST, NEED_SNAPSHOT_ERROR_MSG, NO_HELLO_ERROR_MSG};
use tonic::Status;

use crate::auth::AuthError;
use crate::blocking::Panicked;
use crate::hrana::RequestError;
use crate::namespace;
use crate::replication::LogError;

/// The status an error is answered with.
pub trait StatusOf {
    fn status(&self) -> Status;
}

impl StatusOf for AuthError {
    fn status(&self) -> Status {
        match self {
            AuthError::WrongNamespace(_) | AuthError::ReadOnly => Status::permission_denied(self.to_string()),
            _ => Status::unauthenticated(self.to_string()),
        }
    }
}

impl StatusOf for namespace::Error {
    fn status(&self) -> Status {
        use namespace::Error as E;
        match self {
            E::NotFound(_) | E::Deleted(_) => Status::failed_precondition(NAMESPACE_DOESNT_EXIST),
            E::InvalidName(_) | E::NamespacesDisabled => Status::invalid_argument(self.to_string()),
            E::ShuttingDown | E::Bootstrapping(_) => Status::unavailable(self.to_string()),
            E::NotPrimary(_) => Status::failed_precondition(self.to_string()),
            _ => internal(self),
        }
    }
}

impl StatusOf for RequestError {
    fn status(&self) -> Status {
        use RequestError as E;
        match self {
            E::Namespace(e) => e.status(),
            E::Internal(e) => e.status(),
            // The client's transaction is gone (rolled back); its next call starts afresh.
            E::UnknownBaton | E::ExpiredBaton | E::TransactionTimedOut | E::BatonNamespaceMismatch => Status::aborted(self.to_string()),
            E::TooManyStreams | E::TooManyNamespaceStreams | E::TooManyConnectionStreams => Status::resource_exhausted(self.to_string()),
        }
    }
}

impl StatusOf for LogError {
    fn status(&self) -> Status {
        internal(self)
    }
}

impl StatusOf for Panicked {
    fn status(&self) -> Status {
        internal(self)
    }
}

fn internal(e: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %e, "gRPC call failed");
    Status::internal(e.to_string())
}

/// The replica must fetch the snapshot before more frames.
pub fn need_snapshot() -> Status {
    Status::failed_precondition(NEED_SNAPSHOT_ERROR_MSG)
}

/// The replica's session is not this log's (the server restarted, or the log was rebuilt):
/// it must say hello again.
pub fn no_hello() -> Status {
    Status::failed_precondition(NO_HELLO_ERROR_MSG)
}
