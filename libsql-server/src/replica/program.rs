//! Hrana statements as the proxy protocol's programs, and its answers back as Hrana results:
//! what a replica sends its primary and makes of the answer (the primary's side is
//! `grpc::proxy`, the other way round).

use libsql_hrana::proto::{self as hrana, BatchCond, Col, Row, Stmt, StmtResult, Value};
use libsql_replication::rpc::proxy::query_result::RowResult;
use libsql_replication::rpc::proxy::{cond, query, AndCond, Cond, ErrCond, IsAutocommitCond, NotCond, OkCond, OrCond};
use libsql_replication::rpc::proxy::{Named, Positional, Program, Query, QueryResult, ResultRows, Step};

use super::value::{self, BadValue};

/// A step of a program: its condition, the statement with its SQL text.
pub struct ProgramStep<'a> {
    pub condition: Option<&'a BatchCond>,
    pub sql: &'a str,
    pub stmt: &'a Stmt,
}

/// What a statement cannot be sent as.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("a statement sent to the primary takes positional or named arguments, not both")]
    MixedArguments,
    #[error("a batch condition without a type")]
    EmptyCondition,
}

pub fn program<'a>(steps: impl IntoIterator<Item = ProgramStep<'a>>) -> Result<Program, ProgramError> {
    let steps = steps
        .into_iter()
        .map(|s| Ok(Step { cond: s.condition.map(condition).transpose()?, query: Some(query_of(s.sql, s.stmt)?) }))
        .collect::<Result<_, _>>()?;
    Ok(Program { steps })
}

fn query_of(sql: &str, stmt: &Stmt) -> Result<Query, ProgramError> {
    // Parameters are always given (the libSQL server refuses a query without them).
    let params = match (stmt.args.is_empty(), stmt.named_args.is_empty()) {
        (_, true) => Some(query::Params::Positional(Positional { values: stmt.args.iter().map(value::encode).collect() })),
        (true, false) => Some(query::Params::Named(Named {
            names: stmt.named_args.iter().map(|a| a.name.clone()).collect(),
            values: stmt.named_args.iter().map(|a| value::encode(&a.value)).collect(),
        })),
        (false, false) => return Err(ProgramError::MixedArguments),
    };
    Ok(Query { stmt: sql.to_owned(), params, skip_rows: !stmt.want_rows.unwrap_or(true) })
}

fn condition(c: &BatchCond) -> Result<Cond, ProgramError> {
    let step = |s: u32| i64::from(s);
    let list = |conds: &[BatchCond]| conds.iter().map(condition).collect::<Result<Vec<_>, _>>();
    let inner = match c {
        BatchCond::None => return Err(ProgramError::EmptyCondition),
        BatchCond::Ok { step: s } => cond::Cond::Ok(OkCond { step: step(*s) }),
        BatchCond::Error { step: s } => cond::Cond::Err(ErrCond { step: step(*s) }),
        BatchCond::Not { cond } => cond::Cond::Not(Box::new(NotCond { cond: Some(Box::new(condition(cond)?)) })),
        BatchCond::And(l) => cond::Cond::And(AndCond { conds: list(&l.conds)? }),
        BatchCond::Or(l) => cond::Cond::Or(OrCond { conds: list(&l.conds)? }),
        BatchCond::IsAutocommit {} => cond::Cond::IsAutocommit(IsAutocommitCond {}),
    };
    Ok(Cond { cond: Some(inner) })
}

/// A step's outcome on the primary: its rows, the error it met, or `None` when its condition
/// did not hold.
pub type StepOutcome = Option<Result<StmtResult, hrana::Error>>;

/// The outcome of each step of an answer.
pub fn outcomes(results: Vec<QueryResult>) -> Result<Vec<StepOutcome>, BadValue> {
    results
        .into_iter()
        .map(|r| match r.row_result {
            Some(RowResult::Row(rows)) => Ok(Some(Ok(stmt_result(rows)?))),
            Some(RowResult::Error(e)) => Ok(Some(Err(hrana::Error { message: e.message, code: code_name(e.extended_code).into() }))),
            None => Ok(None),
        })
        .collect()
}

fn stmt_result(rows: ResultRows) -> Result<StmtResult, BadValue> {
    Ok(StmtResult {
        cols: rows.column_descriptions.into_iter().map(|c| Col { name: Some(c.name), decltype: c.decltype }).collect(),
        rows: rows
            .rows
            .into_iter()
            .map(|r| Ok(Row { values: r.values.iter().map(|v| value::decode(&v.data)).collect::<Result<Vec<Value>, _>>()? }))
            .collect::<Result<_, _>>()?,
        affected_row_count: rows.affected_row_count,
        last_insert_rowid: rows.last_insert_rowid,
        replication_index: None,
        rows_read: 0,
        rows_written: 0,
        query_duration_ms: 0.0,
    })
}

/// SQLite's primary result codes by number, named.
const CODE_NAMES: [&str; 27] = [
    "SQLITE_OK",
    "SQLITE_ERROR",
    "SQLITE_INTERNAL",
    "SQLITE_PERM",
    "SQLITE_ABORT",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_NOMEM",
    "SQLITE_READONLY",
    "SQLITE_INTERRUPT",
    "SQLITE_IOERR",
    "SQLITE_CORRUPT",
    "SQLITE_NOTFOUND",
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_PROTOCOL",
    "SQLITE_EMPTY",
    "SQLITE_SCHEMA",
    "SQLITE_TOOBIG",
    "SQLITE_CONSTRAINT",
    "SQLITE_MISMATCH",
    "SQLITE_MISUSE",
    "SQLITE_NOLFS",
    "SQLITE_AUTH",
    "SQLITE_FORMAT",
    "SQLITE_RANGE",
    "SQLITE_NOTADB",
];

/// SQLite's name for the primary result code of an extended code (`SQLITE_ERROR` for any
/// other).
pub fn code_name(extended_code: i32) -> &'static str {
    match (extended_code & 0xff) as usize {
        0 => "SQLITE_ERROR",
        n => CODE_NAMES.get(n).copied().unwrap_or("SQLITE_ERROR"),
    }
}

/// The primary result code SQLite names `name` (`SQLITE_ERROR` for a name of the server's
/// own, such as `BLOCKED`).
pub fn code_of(name: &str) -> i32 {
    CODE_NAMES.iter().position(|n| *n == name).filter(|n| *n > 0).map_or(1, |n| n as i32)
}

#[cfg(test)]
mod tests {
    use libsql_hrana::proto::{BatchCondList, NamedArg};
    use libsql_replication::rpc::proxy::{Column, Error as ProxyError, Row as ProxyRow};

    use super::*;

    #[test]
    fn statements_become_steps_with_their_arguments_and_conditions() {
        let mut positional = Stmt::new("INSERT INTO t VALUES (?)".to_owned(), false);
        positional.args = vec![Value::Integer { value: 7 }];
        let mut named = Stmt::new("SELECT :a".to_owned(), true);
        named.named_args = vec![NamedArg { name: ":a".into(), value: Value::Text { value: "x".into() } }];
        let cond = BatchCond::And(BatchCondList {
            conds: vec![BatchCond::Ok { step: 0 }, BatchCond::Not { cond: Box::new(BatchCond::IsAutocommit {}) }],
        });
        let sent = program([
            ProgramStep { condition: None, sql: "INSERT INTO t VALUES (?)", stmt: &positional },
            ProgramStep { condition: Some(&cond), sql: "SELECT :a", stmt: &named },
        ])
        .unwrap();
        let first = sent.steps[0].query.as_ref().unwrap();
        assert!(first.skip_rows);
        assert!(
            matches!(&first.params, Some(query::Params::Positional(p)) if p.values == vec![value::encode(&Value::Integer { value: 7 })])
        );
        let second = &sent.steps[1];
        assert!(matches!(&second.query.as_ref().unwrap().params, Some(query::Params::Named(n)) if n.names == [":a"]));
        let Some(cond::Cond::And(and)) = second.cond.as_ref().and_then(|c| c.cond.clone()) else { panic!("{:?}", second.cond) };
        assert!(matches!(and.conds[0].cond, Some(cond::Cond::Ok(OkCond { step: 0 }))));
        assert!(matches!(&and.conds[1].cond, Some(cond::Cond::Not(_))));

        // Parameters are always present, even none; both kinds at once, or an empty
        // condition, cannot be sent.
        let bare = Stmt::new("SELECT 1".to_owned(), true);
        let sent = program_of(&bare, None).unwrap();
        assert!(matches!(&sent.steps[0].query.as_ref().unwrap().params, Some(query::Params::Positional(p)) if p.values.is_empty()));
        let mut both = positional.clone();
        both.named_args = named.named_args.clone();
        assert!(matches!(program_of(&both, None), Err(ProgramError::MixedArguments)));
        assert!(matches!(program_of(&bare, Some(&BatchCond::None)), Err(ProgramError::EmptyCondition)));
    }

    fn program_of(stmt: &Stmt, condition: Option<&BatchCond>) -> Result<Program, ProgramError> {
        program([ProgramStep { condition, sql: "SELECT 1", stmt }])
    }

    #[test]
    fn answers_become_hrana_results_with_sqlite_codes() {
        let rows = ResultRows {
            column_descriptions: vec![Column { name: "v".into(), decltype: Some("TEXT".into()) }],
            rows: vec![ProxyRow { values: vec![value::encode(&Value::Text { value: "a".into() })] }],
            affected_row_count: 0,
            last_insert_rowid: None,
        };
        let error = ProxyError { code: 1, message: "UNIQUE constraint failed".into(), extended_code: 2067 };
        let results = vec![
            QueryResult { row_result: Some(RowResult::Row(rows)) },
            QueryResult { row_result: Some(RowResult::Error(error)) },
            QueryResult { row_result: None },
        ];
        let got = outcomes(results).unwrap();
        let Some(Ok(first)) = &got[0] else { panic!("{got:?}") };
        assert_eq!(first.cols[0].name.as_deref(), Some("v"));
        assert!(matches!(&first.rows[0].values[0], Value::Text { value } if &**value == "a"));
        assert!(matches!(&got[1], Some(Err(e)) if e.code == "SQLITE_CONSTRAINT"));
        assert!(got[2].is_none());
        let bad = vec![QueryResult {
            row_result: Some(RowResult::Row(ResultRows {
                rows: vec![ProxyRow { values: vec![libsql_replication::rpc::proxy::Value { data: vec![9] }] }],
                ..Default::default()
            })),
        }];
        assert!(outcomes(bad).is_err());

        for code in [1, 5, 19, 26] {
            assert_eq!(code_of(code_name(code)), code);
        }
        assert_eq!(code_name(0), "SQLITE_ERROR");
        assert_eq!(code_of("BLOCKED"), 1);
    }
}
