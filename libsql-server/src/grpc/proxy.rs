//! `proxy.Proxy`: the writes replicas forward to the primary (`Execute`, `Describe`,
//! `Disconnect`, as embedded replicas of the older protocol send them; `StreamExec`, as libSQL
//! server replicas do, is in [`stream_exec`]). A program runs as a
//! Hrana batch on a stream of the namespace, through the same admission as every Hrana request
//! (write gate, blocks, authorizer, the credential's access, limits). A client's stream is kept
//! under its `client_id` while it holds a transaction (an interactive transaction spans calls)
//! and counts against the stream bounds like a parked baton, expiring the same way; outside a
//! transaction it is closed after each call. Answers carry the log's last frame_no, so the
//! replica can wait until it has its own write before it reads.

use std::sync::Arc;

use libsql_hrana::proto::{self as hrana, Batch, BatchCond, BatchCondList, BatchStep, NamedArg, Stmt};
use libsql_replication::rpc::proxy::error::ErrorCode;
use libsql_replication::rpc::proxy::proxy_server::Proxy;
use libsql_replication::rpc::proxy::query_result::RowResult;
use libsql_replication::rpc::proxy::{
    cond, describe_result, query, Ack, Column, Cond, DescribeRequest, DescribeResult, Description, DisconnectMessage, Error as ProxyError,
    ExecReq, ExecuteResults, Program, ProgramReq, QueryResult, ResultRows, Row, State,
};
use tonic::{Request, Response, Status, Streaming};

use super::admit::caller;
use super::status::StatusOf;
use super::GrpcState;
use super::{stream_exec, Caller};
use crate::replica::value;
use crate::hrana::StmtError;

/// Most steps one program may have.
const MAX_STEPS: usize = 1024;

pub struct ProxyService {
    state: Arc<GrpcState>,
}

impl ProxyService {
    pub fn new(state: Arc<GrpcState>) -> Self {
        ProxyService { state }
    }
}

/// Longest `client_id` accepted (clients send a UUID).
const MAX_CLIENT_ID: usize = 128;

/// Where a client's stream is kept between calls: never a Hrana baton (those are hex), and
/// apart for each credential, so only its owner reaches it.
fn key(caller: &Caller, client_id: &str) -> Result<String, Status> {
    if client_id.len() > MAX_CLIENT_ID {
        return Err(Status::invalid_argument(format!("a client_id has at most {MAX_CLIENT_ID} bytes")));
    }
    Ok(format!("proxy/{}/{:016x}/{client_id}", caller.ns, caller.owner))
}

/// A proxy program as the Hrana batch it means.
pub(super) fn batch(program: Program) -> Result<Batch, Status> {
    if program.steps.len() > MAX_STEPS {
        return Err(Status::invalid_argument(format!("a program may have at most {MAX_STEPS} steps")));
    }
    let steps = program
        .steps
        .into_iter()
        .map(|step| {
            let query = step.query.ok_or_else(|| Status::invalid_argument("a step without a query"))?;
            Ok(BatchStep { condition: step.cond.map(condition).transpose()?, stmt: statement(query)? })
        })
        .collect::<Result<_, Status>>()?;
    Ok(Batch { steps, replication_index: None })
}

fn statement(query: libsql_replication::rpc::proxy::Query) -> Result<Stmt, Status> {
    let mut stmt = Stmt::new(query.stmt, !query.skip_rows);
    match query.params {
        None => {}
        Some(query::Params::Positional(p)) => stmt.args = p.values.iter().map(|v| value::decode(&v.data)).collect::<Result<_, _>>().map_err(bad_value)?,
        Some(query::Params::Named(n)) => {
            if n.names.len() != n.values.len() {
                return Err(Status::invalid_argument("named parameters: as many names as values are needed"));
            }
            stmt.named_args = n
                .names
                .into_iter()
                .zip(n.values)
                .map(|(name, v)| Ok(NamedArg { name, value: value::decode(&v.data).map_err(bad_value)? }))
                .collect::<Result<_, Status>>()?;
        }
    }
    Ok(stmt)
}

fn bad_value(e: value::BadValue) -> Status {
    Status::invalid_argument(format!("a parameter: {e}"))
}

fn condition(c: Cond) -> Result<BatchCond, Status> {
    let step = |s: i64| u32::try_from(s).map_err(|_| Status::invalid_argument("a condition names a negative step"));
    let list = |conds: Vec<Cond>| -> Result<BatchCondList, Status> {
        Ok(BatchCondList { conds: conds.into_iter().map(condition).collect::<Result<_, _>>()? })
    };
    Ok(match c.cond.ok_or_else(|| Status::invalid_argument("an empty condition"))? {
        cond::Cond::Ok(c) => BatchCond::Ok { step: step(c.step)? },
        cond::Cond::Err(c) => BatchCond::Error { step: step(c.step)? },
        cond::Cond::Not(c) => {
            BatchCond::Not { cond: Box::new(condition(*c.cond.ok_or_else(|| Status::invalid_argument("an empty condition"))?)?) }
        }
        cond::Cond::And(c) => BatchCond::And(list(c.conds)?),
        cond::Cond::Or(c) => BatchCond::Or(list(c.conds)?),
        cond::Cond::IsAutocommit(_) => BatchCond::IsAutocommit {},
    })
}

pub(super) fn error(e: &StmtError) -> ProxyError {
    ProxyError { code: ErrorCode::SqlError as i32, message: e.to_string(), extended_code: e.extended_code() }
}

pub(super) fn hrana_error(e: &hrana::Error) -> ProxyError {
    ProxyError { code: ErrorCode::SqlError as i32, message: e.message.clone(), extended_code: crate::replica::program::code_of(&e.code) }
}

fn rows(result: hrana::StmtResult) -> ResultRows {
    ResultRows {
        column_descriptions: result.cols.into_iter().map(|c| Column { name: c.name.unwrap_or_default(), decltype: c.decltype }).collect(),
        rows: result.rows.into_iter().map(|r| Row { values: r.values.iter().map(value::encode).collect() }).collect(),
        affected_row_count: result.affected_row_count,
        last_insert_rowid: result.last_insert_rowid,
    }
}

#[tonic::async_trait]
impl Proxy for ProxyService {
    type StreamExecStream = stream_exec::Answers;

    async fn execute(&self, request: Request<ProgramReq>) -> Result<Response<ExecuteResults>, Status> {
        let caller = caller(&request)?;
        let _place = self.state.place(&caller.ns, "Execute").await?;
        let ProgramReq { client_id, pgm } = request.into_inner();
        let batch = batch(pgm.unwrap_or_default())?;
        let key = key(&caller, &client_id)?;
        let hrana = &self.state.hrana;
        let ((result, frame_no), in_transaction, _budget) = hrana
            .run_keyed(&caller.ns, caller.access, &key, None, move |stream, budget| {
                let result = stream.run_batch(&batch, budget);
                (result, stream.last_frame_no())
            })
            .await
            .map_err(|e| e.status())?;
        let results = match result {
            Ok(result) => result
                .step_results
                .into_iter()
                .zip(result.step_errors)
                .map(|(ok, err)| QueryResult {
                    row_result: match (ok, err) {
                        (Some(ok), _) => Some(RowResult::Row(rows(ok))),
                        (None, Some(e)) => Some(RowResult::Error(hrana_error(&e))),
                        // A step whose condition did not hold.
                        (None, None) => None,
                    },
                })
                .collect(),
            Err(e) => vec![QueryResult { row_result: Some(RowResult::Error(error(&e))) }],
        };
        let state = if in_transaction { State::Txn } else { State::Init };
        Ok(Response::new(ExecuteResults { results, state: state as i32, current_frame_no: frame_no }))
    }

    async fn describe(&self, request: Request<DescribeRequest>) -> Result<Response<DescribeResult>, Status> {
        let caller = caller(&request)?;
        let _place = self.state.place(&caller.ns, "Describe").await?;
        let DescribeRequest { client_id, stmt: sql } = request.into_inner();
        let key = key(&caller, &client_id)?;
        let (result, _, _) = self
            .state
            .hrana
            .run_keyed(&caller.ns, caller.access, &key, None, move |stream, _| stream.describe(&sql))
            .await
            .map_err(|e| e.status())?;
        let describe_result = match result {
            Ok(d) => describe_result::DescribeResult::Description(Description {
                param_count: d.params.len() as u64,
                param_names: d.params.into_iter().map(|p| p.name.unwrap_or_default()).collect(),
                column_descriptions: d.cols.into_iter().map(|c| Column { name: c.name, decltype: c.decltype }).collect(),
            }),
            Err(e) => describe_result::DescribeResult::Error(error(&e)),
        };
        Ok(Response::new(DescribeResult { describe_result: Some(describe_result) }))
    }

    async fn disconnect(&self, request: Request<DisconnectMessage>) -> Result<Response<Ack>, Status> {
        let caller = caller(&request)?;
        self.state.hrana.discard_keyed(&caller.ns, &key(&caller, &request.get_ref().client_id)?);
        Ok(Response::new(Ack {}))
    }

    async fn stream_exec(&self, request: Request<Streaming<ExecReq>>) -> Result<Response<Self::StreamExecStream>, Status> {
        let caller = caller(&request)?;
        let (metadata, _, requests) = request.into_parts();
        Ok(Response::new(stream_exec::open(self.state.clone(), caller, metadata, requests).await?))
    }
}
