//! Hrana batches: steps run in order, each guarded by an optional condition on the outcome of
//! earlier steps; and the cursor form of a batch's result.

use libsql_hrana::proto::{Batch, BatchCond, BatchResult, CursorEntry, StepBeginEntry, StepEndEntry, StepErrorEntry};

use super::stmt::{self, SqlStore};
use super::budget::ResponseBudget;
use super::StmtError;
use crate::database::Connection;

pub fn run(conn: &mut Connection, sqls: &SqlStore, budget: &mut ResponseBudget, batch: &Batch) -> BatchResult {
    let n = batch.steps.len();
    let mut result = BatchResult { step_results: vec![None; n], step_errors: vec![None; n], replication_index: None };
    for (i, step) in batch.steps.iter().enumerate() {
        let outcome = match &step.condition {
            None => Ok(true),
            Some(cond) => eval(cond, i, &result, conn),
        }
        .and_then(|go| if go { stmt::execute(conn, sqls, budget, &step.stmt).map(Some) } else { Ok(None) });
        match outcome {
            Ok(res) => result.step_results[i] = res,
            Err(e) => result.step_errors[i] = Some(e.to_proto()),
        }
    }
    result
}

/// Evaluates a step's condition; only earlier steps may be referred to.
fn eval(cond: &BatchCond, current: usize, result: &BatchResult, conn: &Connection) -> Result<bool, StmtError> {
    let earlier = |step: u32| if (step as usize) < current { Ok(step as usize) } else { Err(StmtError::InvalidCondition(step)) };
    Ok(match cond {
        BatchCond::Ok { step } => result.step_results[earlier(*step)?].is_some(),
        BatchCond::Error { step } => result.step_errors[earlier(*step)?].is_some(),
        BatchCond::Not { cond } => !eval(cond, current, result, conn)?,
        BatchCond::And(list) => {
            let mut all = true;
            for c in &list.conds {
                all &= eval(c, current, result, conn)?;
            }
            all
        }
        BatchCond::Or(list) => {
            let mut any = false;
            for c in &list.conds {
                any |= eval(c, current, result, conn)?;
            }
            any
        }
        BatchCond::IsAutocommit {} => conn.sqlite().is_autocommit(),
        BatchCond::None => return Err(StmtError::ArgsInvalid("a batch condition without a type".into())),
    })
}

/// The entries of a cursor over a batch's result. Only Hrana 3 entry types are produced:
/// clients reject any other (the libSQL server's extra `replication_index` entry breaks them).
pub fn cursor_entries(result: BatchResult) -> Vec<CursorEntry> {
    let mut entries = Vec::new();
    for (step, (res, err)) in result.step_results.into_iter().zip(result.step_errors).enumerate() {
        let step = step as u32;
        if let Some(res) = res {
            entries.push(CursorEntry::StepBegin(StepBeginEntry { step, cols: res.cols }));
            entries.extend(res.rows.into_iter().map(|row| CursorEntry::Row { row }));
            entries.push(CursorEntry::StepEnd(StepEndEntry {
                affected_row_count: res.affected_row_count,
                last_insert_rowid: res.last_insert_rowid,
            }));
        } else if let Some(error) = err {
            entries.push(CursorEntry::StepError(StepErrorEntry { step, error }));
        }
    }
    entries
}

/// A cursor entry as Hrana's JSON encoding has it: `last_insert_rowid` is a string (the
/// `libsql-hrana` type writes a number there, which clients refuse).
pub struct JsonCursorEntry<'a>(pub &'a CursorEntry);

impl serde::Serialize for JsonCursorEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self.0 {
            CursorEntry::StepEnd(end) => {
                let mut entry = serializer.serialize_struct("StepEndEntry", 3)?;
                entry.serialize_field("type", "step_end")?;
                entry.serialize_field("affected_row_count", &end.affected_row_count)?;
                entry.serialize_field("last_insert_rowid", &end.last_insert_rowid.map(|id| id.to_string()))?;
                entry.end()
            }
            other => other.serialize(serializer),
        }
    }
}
