//! Errors of the Hrana protocol: those of one statement (reported inside the response, with a
//! code the client can act on) and those of a whole request (an HTTP error).

use libsql_hrana::proto;
use libsql_sys::rusqlite;

use super::budget::BudgetError;
use crate::blocking::Panicked;
use crate::database::interrupt::Reason;
use crate::database::AccessError;
use crate::namespace;

/// Why a statement, batch step or stream request failed. Reported to the client as a Hrana
/// error `{message, code}`; the stream goes on.
#[derive(Debug, thiserror::Error)]
pub enum StmtError {
    #[error("a statement needs either `sql` or `sql_id`")]
    SqlMissing,
    #[error("a statement may give `sql` or `sql_id`, not both")]
    SqlConflict,
    #[error("no SQL text is stored under id {0}")]
    SqlNotFound(i32),
    #[error("the SQL text holds no statement")]
    NoStatement,
    #[error("the SQL text holds more than one statement (use `sequence` to run several)")]
    ManyStatements,
    #[error("invalid arguments: {0}")]
    ArgsInvalid(String),
    #[error("a batch condition refers to step {0}, which does not come before it")]
    InvalidCondition(u32),
    #[error("too many SQL texts stored on this stream (at most {0})")]
    SqlStoreFull(usize),
    #[error("stored SQL texts may take at most {0} bytes together; close some (close_sql) first")]
    SqlStoreTooLarge(usize),
    #[error("the stream is closed")]
    StreamClosed,
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("namespace: {0}")]
    Namespace(#[from] namespace::Error),
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// A statement error the primary reported (a replica forwarded the statement).
    #[error("{}", .0.message)]
    Remote(proto::Error),
    /// The call to the primary failed.
    #[error("the primary did not run the statement: {message}")]
    Primary { code: tonic::Code, message: String },
    #[error("this replica did not catch up with the stream's last write (frame {0}) in time; retry the read")]
    ReplicaBehind(u64),
    #[error(transparent)]
    Program(#[from] crate::replica::program::ProgramError),
}

impl StmtError {
    /// The machine-readable code: SQLite's own result code name for engine errors.
    pub fn code(&self) -> String {
        match self {
            StmtError::SqlMissing | StmtError::SqlConflict => "SQL_INVALID".into(),
            StmtError::SqlNotFound(_) => "SQL_NOT_FOUND".into(),
            StmtError::NoStatement => "SQL_NO_STATEMENT".into(),
            StmtError::ManyStatements => "SQL_MANY_STATEMENTS".into(),
            StmtError::ArgsInvalid(_) => "ARGS_INVALID".into(),
            StmtError::InvalidCondition(_) => "BATCH_COND_INVALID".into(),
            StmtError::SqlStoreFull(_) => "SQL_STORE_TOO_MANY".into(),
            StmtError::SqlStoreTooLarge(_) => "SQL_STORE_TOO_LARGE".into(),
            StmtError::StreamClosed => "STREAM_CLOSED".into(),
            StmtError::Access(AccessError::ReadsBlocked(_) | AccessError::WritesBlocked(_)) => "BLOCKED".into(),
            StmtError::Access(AccessError::WriteLockTimeout) => "SQLITE_BUSY".into(),
            StmtError::Access(AccessError::ReadOnly) => "AUTH_READ_ONLY".into(),
            StmtError::Access(AccessError::Interrupted(reason)) => match reason {
                Reason::StatementTimeout(_) => "STATEMENT_TIMEOUT".into(),
                Reason::TransactionTimeout(_) => "TRANSACTION_TIMEOUT".into(),
                Reason::ClientGone | Reason::ShuttingDown => "SQLITE_INTERRUPT".into(),
            },
            StmtError::Access(AccessError::QuotaExceeded { .. }) => "SQLITE_FULL".into(),
            StmtError::Access(AccessError::MemoryLimit(_)) => "MEMORY_LIMIT".into(),
            StmtError::Access(AccessError::Sqlite(e)) | StmtError::Sqlite(e) => sqlite_code(e).into(),
            StmtError::Namespace(_) => "NAMESPACE_UNAVAILABLE".into(),
            StmtError::Budget(BudgetError::TooLarge(_)) => "RESPONSE_TOO_LARGE".into(),
            StmtError::Budget(BudgetError::ServerFull) => "RESPONSES_EXHAUSTED".into(),
            StmtError::Remote(e) => e.code.clone(),
            // The primary's stream (its transaction) is gone; a new one starts afresh.
            StmtError::Primary { code: tonic::Code::Aborted, .. } => "STREAM_EXPIRED".into(),
            StmtError::Primary { code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated, .. } => "AUTH_PRIMARY_REFUSED".into(),
            StmtError::Primary { .. } => "PRIMARY_UNAVAILABLE".into(),
            StmtError::ReplicaBehind(_) => "REPLICA_BEHIND".into(),
            StmtError::Program(_) => "ARGS_INVALID".into(),
        }
    }

    pub fn to_proto(&self) -> proto::Error {
        proto::Error { message: self.to_string(), code: self.code() }
    }
}

impl StmtError {
    /// SQLite's extended result code for an engine error (the write lock's timeout is
    /// `SQLITE_BUSY`, a quota `SQLITE_FULL`); `SQLITE_ERROR` for the server's own refusals.
    pub fn extended_code(&self) -> i32 {
        match self {
            StmtError::Access(AccessError::Sqlite(e)) | StmtError::Sqlite(e) => extended_code(e),
            StmtError::Access(AccessError::WriteLockTimeout) => 5,
            StmtError::Access(AccessError::QuotaExceeded { .. }) => 13,
            StmtError::Access(AccessError::Interrupted(_)) => 9,
            _ => 1,
        }
    }
}

fn extended_code(e: &rusqlite::Error) -> i32 {
    match e {
        rusqlite::Error::SqliteFailure(e, _) => e.extended_code,
        rusqlite::Error::SqlInputError { error, .. } => error.extended_code,
        rusqlite::Error::InvalidParameterCount(..) | rusqlite::Error::InvalidParameterName(_) => 25,
        _ => 1,
    }
}

/// SQLite's name for the primary result code of an engine error.
fn sqlite_code(e: &rusqlite::Error) -> &'static str {
    crate::replica::program::code_name(extended_code(e))
}

/// Why a whole Hrana request failed; the HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown baton: the stream does not exist (it may have been closed)")]
    UnknownBaton,
    #[error("the stream of this baton expired after being idle; its transaction was rolled back")]
    ExpiredBaton,
    #[error("the stream's transaction held the write lock past its time limit (txn_timeout_s) and was rolled back")]
    TransactionTimedOut,
    #[error("the baton belongs to a stream of another namespace")]
    BatonNamespaceMismatch,
    #[error("too many open streams on this server; close streams or retry later")]
    TooManyStreams,
    #[error("too many open streams on this namespace; close streams or retry later")]
    TooManyNamespaceStreams,
    #[error("too many open streams opened over this connection; close streams or retry later")]
    TooManyConnectionStreams,
    #[error(transparent)]
    Namespace(#[from] namespace::Error),
    #[error("internal error: {0}")]
    Internal(#[from] Panicked),
}

impl RequestError {
    /// The error's code in Hrana answers (the same on every transport).
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::UnknownBaton => "STREAM_UNKNOWN",
            RequestError::ExpiredBaton => "STREAM_EXPIRED",
            RequestError::TransactionTimedOut => "TRANSACTION_TIMEOUT",
            RequestError::BatonNamespaceMismatch => "STREAM_NAMESPACE_MISMATCH",
            RequestError::TooManyStreams | RequestError::TooManyNamespaceStreams | RequestError::TooManyConnectionStreams => {
                "STREAMS_EXHAUSTED"
            }
            RequestError::Namespace(e) => e.code(),
            RequestError::Internal(_) => "INTERNAL",
        }
    }
}
