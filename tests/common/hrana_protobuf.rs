//! Hrana 3's protobuf messages as a client encodes them (declared from the Hrana 3 schema, not
//! taken from the server's crate, which only decodes requests and encodes answers). Shared by
//! the tests and the transports bench.

#![allow(dead_code)]

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(message, optional, tag = "1")]
    pub null: Option<Empty>,
    #[prost(sint64, optional, tag = "2")]
    pub integer: Option<i64>,
    #[prost(double, optional, tag = "3")]
    pub float: Option<f64>,
    #[prost(string, optional, tag = "4")]
    pub text: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub blob: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Stmt {
    #[prost(string, optional, tag = "1")]
    pub sql: Option<String>,
    #[prost(message, repeated, tag = "3")]
    pub args: Vec<Value>,
    #[prost(bool, optional, tag = "5")]
    pub want_rows: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecuteReq {
    #[prost(message, optional, tag = "1")]
    pub stmt: Option<Stmt>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamReq {
    #[prost(message, optional, tag = "1")]
    pub close: Option<Empty>,
    #[prost(message, optional, tag = "2")]
    pub execute: Option<ExecuteReq>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PipelineReq {
    #[prost(string, optional, tag = "1")]
    pub baton: Option<String>,
    #[prost(message, repeated, tag = "2")]
    pub requests: Vec<StreamReq>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Col {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StmtResult {
    #[prost(message, repeated, tag = "1")]
    pub cols: Vec<Col>,
    #[prost(message, repeated, tag = "2")]
    pub rows: Vec<Row>,
    #[prost(uint64, tag = "3")]
    pub affected_row_count: u64,
    #[prost(sint64, optional, tag = "4")]
    pub last_insert_rowid: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecuteResp {
    #[prost(message, optional, tag = "1")]
    pub result: Option<StmtResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamResp {
    #[prost(message, optional, tag = "1")]
    pub close: Option<Empty>,
    #[prost(message, optional, tag = "2")]
    pub execute: Option<ExecuteResp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(string, tag = "2")]
    pub code: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamRes {
    #[prost(message, optional, tag = "1")]
    pub ok: Option<StreamResp>,
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PipelineResp {
    #[prost(string, optional, tag = "1")]
    pub baton: Option<String>,
    #[prost(message, repeated, tag = "3")]
    pub results: Vec<StreamRes>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchStep {
    #[prost(message, optional, tag = "2")]
    pub stmt: Option<Stmt>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Batch {
    #[prost(message, repeated, tag = "1")]
    pub steps: Vec<BatchStep>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CursorReq {
    #[prost(string, optional, tag = "1")]
    pub baton: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub batch: Option<Batch>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CursorResp {
    #[prost(string, optional, tag = "1")]
    pub baton: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StepBegin {
    #[prost(uint32, tag = "1")]
    pub step: u32,
    #[prost(message, repeated, tag = "2")]
    pub cols: Vec<Col>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StepEnd {
    #[prost(uint64, tag = "1")]
    pub affected_row_count: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CursorEntry {
    #[prost(message, optional, tag = "1")]
    pub step_begin: Option<StepBegin>,
    #[prost(message, optional, tag = "2")]
    pub step_end: Option<StepEnd>,
    #[prost(message, optional, tag = "4")]
    pub row: Option<Row>,
    #[prost(message, optional, tag = "5")]
    pub error: Option<Error>,
}

pub fn stmt(sql: &str, args: Vec<Value>) -> Stmt {
    Stmt { sql: Some(sql.into()), args, want_rows: Some(true) }
}

pub fn execute(sql: &str, args: Vec<Value>) -> StreamReq {
    StreamReq { execute: Some(ExecuteReq { stmt: Some(stmt(sql, args)) }), ..Default::default() }
}

pub fn close() -> StreamReq {
    StreamReq { close: Some(Empty {}), ..Default::default() }
}
