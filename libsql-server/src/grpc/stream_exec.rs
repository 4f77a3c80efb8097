//! `proxy.Proxy/StreamExec`: the session libSQL server replicas open per client connection to
//! forward its writes and transactions. One Hrana stream (a connection of the namespace,
//! counted against the stream bounds like a WebSocket's) serves the session's requests in
//! order; each request is admitted again (the token may have expired) and takes a place among
//! the running requests. A program's answer is the step-by-step account replicas rebuild
//! their results from: `Init`, then per step `BeginStep`, its columns and rows or its error,
//! `FinishStep`, and `Finish` with the log's last frame_no and whether the connection is in
//! autocommit. The session ends when the replica ends it, when the server stops, after
//! `--stream-expiry-s` without a request while it holds a transaction (rolled back, so other
//! writers proceed), or after `--websocket-idle-timeout-s` without one otherwise.

use std::sync::Arc;

use libsql_hrana::proto::{self as hrana, BatchResult};
use libsql_replication::rpc::proxy::exec_req::Request as ExecRequest;
use libsql_replication::rpc::proxy::exec_resp::Response as ExecAnswer;
use libsql_replication::rpc::proxy::resp_step::Step;
use libsql_replication::rpc::proxy::{
    row_value, AddRowValue, BeginRow, BeginRows, BeginStep, ColsDescription, Column, DescribeCol, DescribeParam, DescribeResp, ExecReq,
    ExecResp, Finish, FinishRow, FinishRows, FinishStep, Init, ProgramResp, RespStep, RowValue, StepError,
};
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use super::proxy::{batch, error, hrana_error};
use super::status::StatusOf;
use super::{received, Caller, GrpcState};
use crate::hrana::{drop_off_runtime, Held, Stream};

/// How often an idle session inside a transaction checks the transaction's time limit.
const TRANSACTION_CHECK: Duration = Duration::from_millis(250);

pub type Answers = libsql_replication::rpc::replication::BoxStream<'static, Result<ExecResp, Status>>;

/// Opens a session for `caller` (admitted with `metadata`, which each request is admitted
/// with again) and serves `requests` on it.
pub async fn open(state: Arc<GrpcState>, caller: Caller, metadata: MetadataMap, requests: Streaming<ExecReq>) -> Result<Answers, Status> {
    let (stream, held) = state.hrana.open_held(&caller.ns).await.map_err(|e| e.status())?;
    // Answers wait here for the replica to read them: a few at most, then requests wait.
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(Session { state, metadata, stream: Some(stream), _held: held }.serve(requests, tx));
    Ok(received(rx))
}

struct Session {
    state: Arc<GrpcState>,
    metadata: MetadataMap,
    /// Out only while a request runs on it.
    stream: Option<Stream>,
    _held: Held,
}

impl Session {
    async fn serve(mut self, mut requests: Streaming<ExecReq>, tx: mpsc::Sender<Result<ExecResp, Status>>) {
        let mut stop = self.state.stop.clone();
        while let Some(request) = self.next_request(&mut requests, &tx, &mut stop).await {
            let answer = self.answer(request).await;
            let fatal = answer.is_err();
            // A replica that leaves its answer unread (over HTTP/2 a zero window does it
            // quietly) must not keep the session's transaction, and its write lock, open.
            let sent = tokio::time::timeout(self.state.stall, tx.send(answer)).await;
            if !matches!(sent, Ok(Ok(()))) || fatal {
                break;
            }
        }
        // Rolls back what the replica left open.
        drop_off_runtime(self.stream.take().into_iter().collect());
    }

    /// The replica's next request; `None` once the session should end.
    async fn next_request(
        &mut self,
        requests: &mut Streaming<ExecReq>,
        tx: &mpsc::Sender<Result<ExecResp, Status>>,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<ExecReq> {
        // Owned while waiting (a stream is not `Sync`: no reference to it may cross an await).
        let stream = self.stream.take()?;
        let in_transaction = !stream.is_autocommit();
        let idle = if in_transaction { self.state.stream_expiry } else { self.state.session_idle };
        let deadline = Instant::now() + idle;
        let request = loop {
            // Inside a transaction, checked often: one past its time limit is rolled back at
            // once, so the writers queued behind it proceed.
            let wake = if in_transaction { deadline.min(Instant::now() + TRANSACTION_CHECK) } else { deadline };
            tokio::select! {
                request = requests.message() => {
                    break request.inspect_err(|status| tracing::debug!(%status, "a StreamExec request could not be read")).ok().flatten()
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline || stream.transaction_expired() {
                        break None;
                    }
                }
                _ = tx.closed() => break None,
                _ = stop.changed() => break None,
            }
        };
        self.stream = Some(stream);
        request
    }

    async fn answer(&mut self, request: ExecReq) -> Result<ExecResp, Status> {
        let caller = self.state.admit(&self.metadata)?;
        let _place = self.state.place(&caller.ns, "StreamExec").await?;
        let request_id = request.request_id;
        // Checked before the stream is taken: a refusal leaves it in place.
        let request = match request.request {
            None => return Err(Status::invalid_argument("a StreamExec request without a request")),
            Some(ExecRequest::Execute(program)) => Ok(batch(program.pgm.unwrap_or_default())?),
            Some(ExecRequest::Describe(describe)) => Err(describe.stmt),
        };
        let Some(stream) = self.stream.take() else { return Err(Status::aborted("the session's stream is gone")) };
        let answer = match request {
            Ok(batch) => {
                let run = self.state.hrana.run_held(stream, caller.access, None, move |stream, budget| {
                    let result = stream.run_batch(&batch, budget);
                    (result, stream.last_frame_no(), stream.is_autocommit())
                });
                let (stream, (result, frame_no, autocommit), _budget) = run.await.map_err(|e| e.status())?;
                self.stream = Some(stream);
                match result {
                    Ok(result) => ExecAnswer::ProgramResp(ProgramResp { steps: steps(result, frame_no, autocommit) }),
                    Err(e) => ExecAnswer::Error(error(&e)),
                }
            }
            Err(sql) => {
                let run = self.state.hrana.run_held(stream, caller.access, None, move |stream, _| stream.describe(&sql));
                let (stream, result, _budget) = run.await.map_err(|e| e.status())?;
                self.stream = Some(stream);
                match result {
                    Ok(d) => ExecAnswer::DescribeResp(DescribeResp {
                        params: d.params.into_iter().map(|p| DescribeParam { name: p.name }).collect(),
                        cols: d.cols.into_iter().map(|c| DescribeCol { name: c.name, decltype: c.decltype }).collect(),
                        is_explain: d.is_explain,
                        is_readonly: d.is_readonly,
                    }),
                    Err(e) => ExecAnswer::Error(error(&e)),
                }
            }
        };
        Ok(ExecResp { request_id, response: Some(answer) })
    }
}

/// A batch's results as the steps replicas rebuild them from.
fn steps(result: BatchResult, last_frame_no: Option<u64>, is_autocommit: bool) -> Vec<RespStep> {
    let step = |s: Step| RespStep { step: Some(s) };
    let mut out = vec![step(Step::Init(Init {}))];
    for (ok, err) in result.step_results.into_iter().zip(result.step_errors) {
        out.push(step(Step::BeginStep(BeginStep {})));
        let (affected_row_count, last_insert_rowid) = match (ok, err) {
            (Some(r), _) => {
                let columns = r.cols.into_iter().map(|c| Column { name: c.name.unwrap_or_default(), decltype: c.decltype }).collect();
                out.push(step(Step::ColsDescription(ColsDescription { columns })));
                out.push(step(Step::BeginRows(BeginRows {})));
                for row in r.rows {
                    out.push(step(Step::BeginRow(BeginRow {})));
                    for value in &row.values {
                        out.push(step(Step::AddRowValue(AddRowValue { val: Some(row_value(value)) })));
                    }
                    out.push(step(Step::FinishRow(FinishRow {})));
                }
                out.push(step(Step::FinishRows(FinishRows {})));
                (r.affected_row_count, r.last_insert_rowid)
            }
            (None, Some(e)) => {
                out.push(step(Step::StepError(StepError { error: Some(hrana_error(&e)) })));
                (0, None)
            }
            // A step whose condition did not hold.
            (None, None) => (0, None),
        };
        out.push(step(Step::FinishStep(FinishStep { affected_row_count, last_insert_rowid })));
    }
    out.push(step(Step::Finish(Finish { last_frame_no, is_autocommit })));
    out
}

fn row_value(value: &hrana::Value) -> RowValue {
    let value = match value {
        hrana::Value::None | hrana::Value::Null => row_value::Value::Null(true),
        hrana::Value::Integer { value } => row_value::Value::Integer(*value),
        hrana::Value::Float { value } => row_value::Value::Real(*value),
        hrana::Value::Text { value } => row_value::Value::Text(value.to_string()),
        hrana::Value::Blob { value } => row_value::Value::Blob(value.to_vec()),
    };
    RowValue { value: Some(value) }
}
