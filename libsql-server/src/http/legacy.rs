//! The legacy query route (`POST /`): `{"statements": ["SQL" | {"q": "SQL", "params": …}]}`,
//! run as one transaction, answered with `[{"results": {"columns": [...], "rows": [...]}}]`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libsql_hrana::proto::{Batch, BatchCond, BatchStep, NamedArg, Stmt, Value};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use super::ApiError;
use crate::database::Access;
use crate::hrana::budget::Hold;
use crate::hrana::Hrana;
use crate::namespace::NamespaceName;

#[derive(Deserialize)]
pub struct QueryRequest {
    statements: Vec<Statement>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Statement {
    Sql(String),
    Query {
        q: String,
        #[serde(default)]
        params: Params,
    },
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Params {
    #[default]
    None,
    Positional(Vec<Json_>),
    Named(Map<String, Json_>),
}

pub async fn run(hrana: &Hrana, ns: &NamespaceName, access: Access, request: QueryRequest, hold: Hold) -> Result<Response, ApiError> {
    let count = request.statements.len() as u32;
    let mut steps = vec![BatchStep { condition: None, stmt: Stmt::new("BEGIN", false) }];
    for (i, statement) in request.statements.into_iter().enumerate() {
        steps.push(BatchStep { condition: Some(BatchCond::Ok { step: i as u32 }), stmt: to_stmt(statement)? });
    }
    steps.push(BatchStep { condition: Some(BatchCond::Ok { step: count }), stmt: Stmt::new("COMMIT", false) });
    steps.push(BatchStep {
        condition: Some(BatchCond::Not { cond: Box::new(BatchCond::IsAutocommit {}) }),
        stmt: Stmt::new("ROLLBACK", false),
    });
    // The budget stays held until the answer is built.
    let answered = hrana.batch_once(ns, access, Batch { steps, replication_index: None }, hold).await?;
    let result = answered.answer.map_err(ApiError::from)?;

    if let Some(error) = result.step_errors.iter().flatten().next() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, error.code.clone(), error.message.clone()));
    }
    let answers: Vec<Json_> = result.step_results[1..=count as usize]
        .iter()
        .map(|res| {
            let res = res.as_ref().expect("every statement ran: no step failed");
            let columns: Vec<_> = res.cols.iter().map(|c| c.name.clone().unwrap_or_default()).collect();
            let rows: Vec<Vec<Json_>> = res.rows.iter().map(|row| row.values.iter().map(to_json).collect()).collect();
            json!({ "results": { "columns": columns, "rows": rows } })
        })
        .collect();
    Ok(Json(answers).into_response())
}

fn to_stmt(statement: Statement) -> Result<Stmt, ApiError> {
    let (sql, params) = match statement {
        Statement::Sql(sql) => (sql, Params::None),
        Statement::Query { q, params } => (q, params),
    };
    let mut stmt = Stmt::new(sql, true);
    match params {
        Params::None => {}
        Params::Positional(values) => stmt.args = values.iter().map(from_json).collect::<Result<_, _>>()?,
        Params::Named(values) => {
            stmt.named_args = values
                .into_iter()
                .map(|(name, value)| Ok(NamedArg { name, value: from_json(&value)? }))
                .collect::<Result<_, ApiError>>()?
        }
    }
    Ok(stmt)
}

fn from_json(value: &Json_) -> Result<Value, ApiError> {
    Ok(match value {
        Json_::Null => Value::Null,
        Json_::Bool(b) => Value::Integer { value: *b as i64 },
        Json_::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer { value: i },
            None => Value::Float { value: n.as_f64().unwrap_or(f64::NAN) },
        },
        Json_::String(s) => Value::Text { value: s.as_str().into() },
        Json_::Object(o) => match o.get("base64").and_then(Json_::as_str) {
            Some(b64) => Value::Blob {
                value: STANDARD
                    .decode(b64)
                    .map_err(|_| ApiError::bad_request("a blob parameter is not valid base64"))?
                    .into(),
            },
            None => return Err(ApiError::bad_request("an object parameter must be {\"base64\": \"...\"}")),
        },
        Json_::Array(_) => return Err(ApiError::bad_request("a parameter cannot be an array")),
    })
}

fn to_json(value: &Value) -> Json_ {
    match value {
        Value::None | Value::Null => Json_::Null,
        Value::Integer { value } => json!(value),
        Value::Float { value } => json!(value),
        Value::Text { value } => json!(value.as_ref()),
        Value::Blob { value } => json!({ "base64": STANDARD.encode(value) }),
    }
}
