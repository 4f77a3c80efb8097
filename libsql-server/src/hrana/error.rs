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
    match extended_code(e) & 0xff {
        1 => "SQLITE_ERROR",
        2 => "SQLITE_INTERNAL",
        3 => "SQLITE_PERM",
        4 => "SQLITE_ABORT",
        5 => "SQLITE_BUSY",
        6 => "SQLITE_LOCKED",
        7 => "SQLITE_NOMEM",
        8 => "SQLITE_READONLY",
        9 => "SQLITE_INTERRUPT",
        10 => "SQLITE_IOERR",
        11 => "SQLITE_CORRUPT",
        12 => "SQLITE_NOTFOUND",
        13 => "SQLITE_FULL",
        14 => "SQLITE_CANTOPEN",
        15 => "SQLITE_PROTOCOL",
        16 => "SQLITE_EMPTY",
        17 => "SQLITE_SCHEMA",
        18 => "SQLITE_TOOBIG",
        19 => "SQLITE_CONSTRAINT",
        20 => "SQLITE_MISMATCH",
        21 => "SQLITE_MISUSE",
        22 => "SQLITE_NOLFS",
        23 => "SQLITE_AUTH",
        24 => "SQLITE_FORMAT",
        25 => "SQLITE_RANGE",
        26 => "SQLITE_NOTADB",
        _ => "SQLITE_ERROR",
    }
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
