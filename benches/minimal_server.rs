//! The simplest Hrana-over-HTTP server on the crates this server is built from (axum 0.6,
//! hyper 0.14, libsql-sys, serde_json, libsql-hrana's types): the request-path bench's
//! baseline. `POST /v2/pipeline` runs `execute` and `close` requests on a pooled connection in
//! `spawn_blocking`, with a prepared-statement cache, and answers Hrana-shaped JSON. Nothing
//! else: no replication log, no batons, no namespaces, no limits, no metrics.
//!
//! Durability is the same as the server's: WAL with `synchronous=FULL` is one fsync per
//! commit, as the server's replication log is. Writers take turns on one lock rather than
//! meeting `SQLITE_BUSY`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use libsql_hrana::proto::{
    CloseStreamResp, Col, Error, ExecuteStreamResp, PipelineReqBody, PipelineRespBody, Row, Stmt, StmtResult, StreamRequest,
    StreamResponse, StreamResult, Value,
};
use libsql_sys::rusqlite::types::{ToSqlOutput, ValueRef};
use libsql_sys::rusqlite::{self, OpenFlags};
use libsql_sys::wal::{Sqlite3Wal, Sqlite3WalManager};

type Connection = libsql_sys::Connection<Sqlite3Wal>;

struct Shared {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
    writer: Mutex<()>,
}

/// Serves `db` on `addr` until the process is killed.
pub fn serve(addr: SocketAddr, db: PathBuf) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let shared = Arc::new(Shared { path: db, pool: Mutex::new(Vec::new()), writer: Mutex::new(()) });
        let app = Router::new().route("/v2/pipeline", post(pipeline)).with_state(shared);
        axum::Server::bind(&addr).serve(app.into_make_service()).await.unwrap();
    });
    unreachable!("the minimal server stopped")
}

async fn pipeline(State(shared): State<Arc<Shared>>, body: Bytes) -> Result<Json<PipelineRespBody>, StatusCode> {
    let body: PipelineReqBody = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_REQUEST)?;
    let results = tokio::task::spawn_blocking(move || {
        let conn = shared.pool.lock().unwrap().pop().unwrap_or_else(|| open(&shared.path));
        let results = body.requests.into_iter().map(|request| run(&shared, &conn, request)).collect();
        shared.pool.lock().unwrap().push(conn);
        results
    })
    .await
    .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(Json(PipelineRespBody { baton: None, base_url: None, results }))
}

fn run(shared: &Shared, conn: &Connection, request: StreamRequest) -> StreamResult {
    let response = match request {
        StreamRequest::Execute(req) => execute(shared, conn, req.stmt).map(|result| StreamResponse::Execute(ExecuteStreamResp { result })),
        StreamRequest::Close(_) => Ok(StreamResponse::Close(CloseStreamResp {})),
        _ => return StreamResult::Error { error: Error { message: "not supported".into(), code: "NOT_SUPPORTED".into() } },
    };
    match response {
        Ok(response) => StreamResult::Ok { response },
        Err(e) => StreamResult::Error { error: Error { message: e.to_string(), code: "SQLITE_ERROR".into() } },
    }
}

fn execute(shared: &Shared, conn: &Connection, stmt: Stmt) -> rusqlite::Result<StmtResult> {
    let mut prepared = conn.prepare_cached(stmt.sql.as_deref().unwrap_or_default())?;
    for (i, arg) in stmt.args.iter().enumerate() {
        prepared.raw_bind_parameter(i + 1, to_sql(arg))?;
    }
    let _turn = (!prepared.readonly()).then(|| shared.writer.lock().unwrap());
    let cols = prepared.columns().iter().map(|c| Col { name: Some(c.name().into()), decltype: c.decl_type().map(Into::into) }).collect();
    let width = prepared.column_count();
    let mut rows = Vec::new();
    let mut stepping = prepared.raw_query();
    while let Some(row) = stepping.next()? {
        let values = (0..width).map(|i| row.get_ref(i).map(from_sql)).collect::<rusqlite::Result<_>>()?;
        rows.push(Row { values });
    }
    Ok(StmtResult {
        cols,
        rows,
        affected_row_count: conn.changes(),
        last_insert_rowid: Some(conn.last_insert_rowid()),
        replication_index: None,
        rows_read: 0,
        rows_written: 0,
        query_duration_ms: 0.0,
    })
}

fn to_sql(value: &Value) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match value {
        Value::None | Value::Null => ValueRef::Null,
        Value::Integer { value } => ValueRef::Integer(*value),
        Value::Float { value } => ValueRef::Real(*value),
        Value::Text { value } => ValueRef::Text(value.as_bytes()),
        Value::Blob { value } => ValueRef::Blob(value),
    })
}

fn from_sql(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(value) => Value::Integer { value },
        ValueRef::Real(value) => Value::Float { value },
        ValueRef::Text(text) => Value::Text { value: String::from_utf8_lossy(text).into() },
        ValueRef::Blob(blob) => Value::Blob { value: Bytes::copy_from_slice(blob) },
    }
}

fn open(path: &std::path::Path) -> Connection {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = libsql_sys::Connection::open(path, flags, Sqlite3WalManager::new(), 1000, None).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}
