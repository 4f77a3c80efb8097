//! The `hrana3-protobuf` messages of Hrana over WebSocket (the `hrana.ws` schema), around
//! `libsql-hrana`'s statement, batch and result types, which carry their own encodings.

use libsql_hrana::proto::{Batch, BatchResult, CursorEntry, DescribeResult, Error, Stmt, StmtResult};

#[derive(prost::Message)]
pub struct ClientMsg {
    #[prost(oneof = "ClientMsgKind", tags = "1, 2")]
    pub msg: Option<ClientMsgKind>,
}

#[derive(prost::Oneof)]
pub enum ClientMsgKind {
    #[prost(message, tag = "1")]
    Hello(HelloMsg),
    #[prost(message, tag = "2")]
    Request(RequestMsg),
}

#[derive(prost::Message)]
pub struct HelloMsg {
    #[prost(string, optional, tag = "1")]
    pub jwt: Option<String>,
}

#[derive(prost::Message)]
pub struct RequestMsg {
    #[prost(int32, tag = "1")]
    pub request_id: i32,
    #[prost(oneof = "Request", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")]
    pub request: Option<Request>,
}

#[derive(prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "2")]
    OpenStream(StreamIdReq),
    #[prost(message, tag = "3")]
    CloseStream(StreamIdReq),
    #[prost(message, tag = "4")]
    Execute(ExecuteReq),
    #[prost(message, tag = "5")]
    Batch(BatchReq),
    #[prost(message, tag = "6")]
    OpenCursor(OpenCursorReq),
    #[prost(message, tag = "7")]
    CloseCursor(CursorIdReq),
    #[prost(message, tag = "8")]
    FetchCursor(FetchCursorReq),
    #[prost(message, tag = "9")]
    Sequence(SqlReq),
    #[prost(message, tag = "10")]
    Describe(SqlReq),
    #[prost(message, tag = "11")]
    StoreSql(StoreSqlReq),
    #[prost(message, tag = "12")]
    CloseSql(SqlIdReq),
    #[prost(message, tag = "13")]
    GetAutocommit(StreamIdReq),
}

#[derive(prost::Message)]
pub struct StreamIdReq {
    #[prost(int32, tag = "1")]
    pub stream_id: i32,
}

#[derive(prost::Message)]
pub struct ExecuteReq {
    #[prost(int32, tag = "1")]
    pub stream_id: i32,
    #[prost(message, optional, tag = "2")]
    pub stmt: Option<Stmt>,
}

#[derive(prost::Message)]
pub struct BatchReq {
    #[prost(int32, tag = "1")]
    pub stream_id: i32,
    #[prost(message, optional, tag = "2")]
    pub batch: Option<Batch>,
}

#[derive(prost::Message)]
pub struct OpenCursorReq {
    #[prost(int32, tag = "1")]
    pub stream_id: i32,
    #[prost(int32, tag = "2")]
    pub cursor_id: i32,
    #[prost(message, optional, tag = "3")]
    pub batch: Option<Batch>,
}

#[derive(prost::Message)]
pub struct CursorIdReq {
    #[prost(int32, tag = "1")]
    pub cursor_id: i32,
}

#[derive(prost::Message)]
pub struct FetchCursorReq {
    #[prost(int32, tag = "1")]
    pub cursor_id: i32,
    #[prost(uint32, tag = "2")]
    pub max_count: u32,
}

#[derive(prost::Message)]
pub struct SqlReq {
    #[prost(int32, tag = "1")]
    pub stream_id: i32,
    #[prost(string, optional, tag = "2")]
    pub sql: Option<String>,
    #[prost(int32, optional, tag = "3")]
    pub sql_id: Option<i32>,
}

#[derive(prost::Message)]
pub struct StoreSqlReq {
    #[prost(int32, tag = "1")]
    pub sql_id: i32,
    #[prost(string, tag = "2")]
    pub sql: String,
}

#[derive(prost::Message)]
pub struct SqlIdReq {
    #[prost(int32, tag = "1")]
    pub sql_id: i32,
}

#[derive(prost::Message)]
pub struct ServerMsg {
    #[prost(oneof = "ServerMsgKind", tags = "1, 2, 3, 4")]
    pub msg: Option<ServerMsgKind>,
}

#[derive(prost::Oneof)]
pub enum ServerMsgKind {
    #[prost(message, tag = "1")]
    HelloOk(Empty),
    #[prost(message, tag = "2")]
    HelloError(HelloErrorMsg),
    #[prost(message, tag = "3")]
    ResponseOk(ResponseOkMsg),
    #[prost(message, tag = "4")]
    ResponseError(ResponseErrorMsg),
}

#[derive(prost::Message)]
pub struct Empty {}

#[derive(prost::Message)]
pub struct HelloErrorMsg {
    #[prost(message, optional, tag = "1")]
    pub error: Option<Error>,
}

#[derive(prost::Message)]
pub struct ResponseErrorMsg {
    #[prost(int32, tag = "1")]
    pub request_id: i32,
    #[prost(message, optional, tag = "2")]
    pub error: Option<Error>,
}

#[derive(prost::Message)]
pub struct ResponseOkMsg {
    #[prost(int32, tag = "1")]
    pub request_id: i32,
    #[prost(oneof = "Response", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")]
    pub response: Option<Response>,
}

#[derive(prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "2")]
    OpenStream(Empty),
    #[prost(message, tag = "3")]
    CloseStream(Empty),
    #[prost(message, tag = "4")]
    Execute(ExecuteResp),
    #[prost(message, tag = "5")]
    Batch(BatchResp),
    #[prost(message, tag = "6")]
    OpenCursor(Empty),
    #[prost(message, tag = "7")]
    CloseCursor(Empty),
    #[prost(message, tag = "8")]
    FetchCursor(FetchCursorResp),
    #[prost(message, tag = "9")]
    Sequence(Empty),
    #[prost(message, tag = "10")]
    Describe(DescribeResp),
    #[prost(message, tag = "11")]
    StoreSql(Empty),
    #[prost(message, tag = "12")]
    CloseSql(Empty),
    #[prost(message, tag = "13")]
    GetAutocommit(GetAutocommitResp),
}

#[derive(prost::Message)]
pub struct ExecuteResp {
    #[prost(message, optional, tag = "1")]
    pub result: Option<StmtResult>,
}

#[derive(prost::Message)]
pub struct BatchResp {
    #[prost(message, optional, tag = "1")]
    pub result: Option<BatchResult>,
}

#[derive(prost::Message)]
pub struct FetchCursorResp {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<CursorEntry>,
    #[prost(bool, tag = "2")]
    pub done: bool,
}

#[derive(prost::Message)]
pub struct DescribeResp {
    #[prost(message, optional, tag = "1")]
    pub result: Option<DescribeResult>,
}

#[derive(prost::Message)]
pub struct GetAutocommitResp {
    #[prost(bool, tag = "1")]
    pub is_autocommit: bool,
}
