//! Streams of a replica's namespace: reads run on the copy, the rest on the primary.
//!
//! Each request is routed on its own. Outside a transaction the primary holds for the
//! stream, a request whose every statement is a read (SQLite's `stmt_readonly`, no write
//! behind a read-only face, no transaction control: the authorizer sees each statement as it
//! is prepared) runs on the copy; anything else (a write, `BEGIN`, a statement the copy cannot
//! even prepare) is sent whole to the primary as the stream's `client_id`. While the primary
//! says the stream holds a transaction there, every request goes there, so the transaction
//! reads its own writes. After a write, the stream's next read on the copy first waits
//! (bounded) until the copy has applied the write's frame_no: a client reads its own writes.

use libsql_hrana::proto::{Batch, BatchResult, Stmt, StmtResult};
use libsql_replication::rpc::proxy::{ExecuteResults, Program, State};

use super::budget::ResponseBudget;
use super::stmt::SqlStore;
use super::StmtError;
use crate::database::interrupt::{Interrupt, Reason};
use crate::database::{Access, AccessError, Connection};
use crate::namespace::{NamespaceName, ReplicaCopy};
use crate::replica::program::{self, ProgramStep, StepOutcome};

/// A replica stream's standing with the primary.
pub struct Remote {
    copy: ReplicaCopy,
    /// The stream's id on the primary.
    client_id: String,
    /// The primary holds a transaction of this stream.
    in_transaction: bool,
    /// The primary's frame_no after this stream's last write, until the copy has it (with
    /// how many times the copy had started over then: see `Follower::wait_for_write`).
    written: Option<(u64, u64)>,
    /// The transaction the primary held for this stream was lost (a call failed inside it):
    /// like an expired baton, the stream runs nothing more, so no later statement of the
    /// transaction runs outside it.
    lost: bool,
}

/// Where a request runs.
pub enum Route {
    Copy,
    Primary,
}

impl Remote {
    pub fn new(copy: ReplicaCopy) -> Self {
        Remote { copy, client_id: uuid::Uuid::new_v4().simple().to_string(), in_transaction: false, written: None, lost: false }
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Where statements `sqls` run. Blocking: a read first waits for the copy to have the
    /// stream's last write.
    pub fn route<'a>(&mut self, conn: &mut Connection, sqls: impl IntoIterator<Item = &'a str>) -> Result<Route, StmtError> {
        // A write, a transaction, or a statement the copy cannot prepare (a table it does not
        // have yet): the primary decides.
        self.decide(conn, |conn| sqls.into_iter().all(|sql| conn.classify(sql).iter().all(|(_, local)| *local)))
    }

    /// Where a `sequence` runs: `None` on the copy, or its statements, each its own text, for
    /// the primary. The text is classified once.
    pub fn route_sequence(&mut self, conn: &mut Connection, sql: &str) -> Result<Option<Vec<String>>, StmtError> {
        let mut classified = None;
        let route = self.decide(conn, |conn| {
            let statements = conn.classify(sql);
            let local = statements.iter().all(|(_, local)| *local);
            classified = Some(statements);
            local
        })?;
        Ok(match route {
            Route::Copy => None,
            Route::Primary => Some(classified.unwrap_or_else(|| conn.classify(sql)).into_iter().map(|(text, _)| text).collect()),
        })
    }

    /// Where a request runs, given whether `local` says the copy can run all of it (asked
    /// only outside a remote transaction, once the copy has the stream's last write).
    fn decide(&mut self, conn: &mut Connection, local: impl FnOnce(&mut Connection) -> bool) -> Result<Route, StmtError> {
        if self.lost {
            return Err(StmtError::Primary {
                code: tonic::Code::Aborted,
                message: "the stream's transaction on the primary was lost".into(),
            });
        }
        if self.in_transaction {
            // Inside a transaction (begun under another grant, maybe), a read-only grant does
            // nothing, as on a primary.
            return self.primary_allowed(conn);
        }
        self.catch_up()?;
        match local(conn) {
            true => Ok(Route::Copy),
            false => self.primary_allowed(conn),
        }
    }

    fn primary_allowed(&self, conn: &Connection) -> Result<Route, StmtError> {
        match conn.access() {
            Access::ReadWrite => Ok(Route::Primary),
            Access::ReadOnly => Err(AccessError::ReadOnly.into()),
        }
    }

    /// Waits until the copy has the stream's last write. Until it has, every read on the copy
    /// waits again (bounded) and fails.
    pub fn catch_up(&mut self) -> Result<(), StmtError> {
        if let Some((frame_no, restarts)) = self.written {
            if !self.copy.catch_up(frame_no, restarts) {
                return Err(StmtError::ReplicaBehind(frame_no));
            }
            self.written = None;
        }
        Ok(())
    }

    /// Runs `program` on the primary; each step's outcome. Blocking; given up if the
    /// client goes away (`interrupt`).
    fn run(&mut self, ns: &NamespaceName, interrupt: &Interrupt, program: Program) -> Result<Vec<StepOutcome>, StmtError> {
        let call = self.copy.writes.execute(ns, &self.client_id, program);
        let answer = self.copy.block_on(async {
            tokio::select! {
                answer = call => Some(answer),
                () = abandoned(interrupt) => None,
            }
        });
        let failed = match answer {
            Some(Ok(answer)) => Ok(answer),
            Some(Err(status)) => Err(StmtError::Primary { code: status.code(), message: status.message().to_owned() }),
            None => Err(AccessError::Interrupted(Reason::ClientGone).into()),
        };
        let ExecuteResults { results, state, current_frame_no } = match failed {
            Ok(answer) => answer,
            Err(e) => {
                // What the primary holds of this stream is gone or unknown: ended there, and
                // a transaction it held is lost.
                self.lost = std::mem::take(&mut self.in_transaction);
                self.disconnect(ns);
                return Err(e);
            }
        };
        self.in_transaction = state == State::Txn as i32;
        if let Some(frame_no) = current_frame_no {
            let restarts = self.copy.progress().restarts;
            self.written = Some(self.written.filter(|(w, r)| *r == restarts && *w > frame_no).unwrap_or((frame_no, restarts)));
        }
        program::outcomes(results).map_err(|e| StmtError::Primary { code: tonic::Code::Internal, message: e.to_string() })
    }

    /// Ends the stream's session on the primary, if it holds a transaction there (rolled
    /// back). Does not wait.
    pub fn end(&mut self, ns: &NamespaceName) {
        if std::mem::take(&mut self.in_transaction) {
            self.disconnect(ns);
        }
    }

    /// Ends the stream's session on the primary (its transaction, if any, rolls back). Does
    /// not wait; the stream goes on under a new `client_id`, so neither a late `Disconnect`
    /// nor a late call of the old session reaches what it does next.
    fn disconnect(&mut self, ns: &NamespaceName) {
        let client_id = std::mem::replace(&mut self.client_id, uuid::Uuid::new_v4().simple().to_string());
        let (writes, ns) = (self.copy.writes.clone(), ns.clone());
        self.copy.runtime.spawn(async move {
            if let Err(e) = writes.disconnect(&ns, &client_id).await {
                tracing::debug!(namespace = %ns, error = %e, "ending a stream's session on the primary failed; it expires there");
            }
        });
    }

    /// Executes one statement on the primary.
    pub fn execute(
        &mut self,
        ns: &NamespaceName,
        conn: &Connection,
        sqls: &SqlStore,
        budget: &mut ResponseBudget,
        stmt: &Stmt,
    ) -> Result<StmtResult, StmtError> {
        let sql = sqls.resolve(stmt.sql.as_deref(), stmt.sql_id)?;
        let program = program::program([ProgramStep { condition: None, sql, stmt }])?;
        match self.run(ns, conn.interrupt(), program)?.into_iter().next().flatten() {
            Some(Ok(result)) => Ok(charged(budget, result)),
            Some(Err(e)) => Err(StmtError::Remote(e)),
            None => Err(StmtError::Primary { code: tonic::Code::Internal, message: "the primary answered no result".into() }),
        }
    }

    /// Runs a batch on the primary, its conditions there.
    pub fn batch(
        &mut self,
        ns: &NamespaceName,
        conn: &Connection,
        sqls: &SqlStore,
        budget: &mut ResponseBudget,
        batch: &Batch,
    ) -> Result<BatchResult, StmtError> {
        let steps = batch
            .steps
            .iter()
            .map(|step| {
                Ok(ProgramStep {
                    condition: step.condition.as_ref(),
                    sql: sqls.resolve(step.stmt.sql.as_deref(), step.stmt.sql_id)?,
                    stmt: &step.stmt,
                })
            })
            .collect::<Result<Vec<_>, StmtError>>()?;
        let outcomes = self.run(ns, conn.interrupt(), program::program(steps)?)?;
        if outcomes.len() != batch.steps.len() {
            // The batch as a whole failed (its stream on the primary was gone, say).
            return Err(match outcomes.into_iter().flatten().next() {
                Some(Err(e)) => StmtError::Remote(e),
                _ => StmtError::Primary { code: tonic::Code::Internal, message: "the primary answered another number of steps".into() },
            });
        }
        let mut result = BatchResult {
            step_results: Vec::with_capacity(outcomes.len()),
            step_errors: Vec::with_capacity(outcomes.len()),
            replication_index: None,
        };
        for outcome in outcomes {
            let (ok, err) = match outcome {
                Some(Ok(rows)) => (Some(charged(budget, rows)), None),
                Some(Err(e)) => (None, Some(e)),
                None => (None, None),
            };
            result.step_results.push(ok);
            result.step_errors.push(err);
        }
        Ok(result)
    }

    /// Runs the statements of a `sequence` on the primary, stopping at the first error.
    pub fn sequence(&mut self, ns: &NamespaceName, conn: &Connection, statements: &[String]) -> Result<(), StmtError> {
        let stmt = Stmt::new(String::new(), false);
        let conditions: Vec<_> =
            (0..statements.len()).map(|i| libsql_hrana::proto::BatchCond::Ok { step: i.saturating_sub(1) as u32 }).collect();
        let steps = statements.iter().zip(&conditions).enumerate().map(|(i, (sql, condition))| ProgramStep {
            condition: (i > 0).then_some(condition),
            sql,
            stmt: &stmt,
        });
        for outcome in self.run(ns, conn.interrupt(), program::program(steps)?)? {
            if let Some(Err(e)) = outcome {
                return Err(StmtError::Remote(e));
            }
        }
        Ok(())
    }
}

/// Resolves once the client of the stream's current use goes away (or the server stops).
async fn abandoned(interrupt: &Interrupt) {
    while !interrupt.abandoned() {
        tokio::time::sleep(ABANDON_CHECK).await;
    }
}

/// How often a call to the primary checks whether its client is still there.
const ABANDON_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// A result from the primary, charged to the answer's budget like rows read here. Over the
/// budget it is still given: its statement ran on the primary (a write committed), and an
/// error would hide that; the answer was bounded on its way (the primary's own budget, the
/// call's decoding limit).
fn charged(budget: &mut ResponseBudget, result: StmtResult) -> StmtResult {
    let size = result.rows.iter().flat_map(|row| row.values.iter()).map(ResponseBudget::hrana_value_size).sum();
    if let Err(e) = budget.charge(size) {
        tracing::debug!(error = %e, "a result from the primary passed the answer's bound; given all the same");
    }
    result
}
