//! The admin API: namespaces (create, delete, list), their configuration, stats and
//! checkpoints, and `/metrics`. Served on its own port, behind `--admin-auth-key`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use libsql_replication::rpc::metadata::DurabilityMode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::{no_route, parse_json};
use super::limits::{enforce, RequestLimits};
use super::{track_requests, ApiError};
use crate::database::PAGE_SIZE;
use crate::hrana::Hrana;
use crate::metrics::Metrics;
use crate::namespace::repair::{Repair, Verdict};
use crate::namespace::{DatabaseConfig, NamespaceName, NamespaceStore};

#[derive(Clone)]
struct AdminState {
    store: NamespaceStore,
    hrana: Hrana,
    metrics: Arc<Metrics>,
}

pub fn router(hrana: Hrana, metrics: Arc<Metrics>, auth_key: Option<String>, limits: RequestLimits) -> Router {
    let state = AdminState { store: hrana.store().clone(), hrana, metrics: metrics.clone() };
    Router::new()
        .route("/", get(|| async { "libsql-server admin API" }))
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespaces/:ns/create", post(create_namespace))
        .route("/v1/namespaces/:ns", axum::routing::delete(delete_namespace))
        .route("/v1/namespaces/:ns/config", get(get_config).post(set_config))
        .route("/v1/namespaces/:ns/stats", get(stats))
        .route("/v1/namespaces/:ns/checkpoint", post(checkpoint))
        .route("/v1/namespaces/:ns/integrity-check", post(integrity_check))
        .route("/v1/namespaces/:ns/reset-replication", post(reset_replication))
        .route("/v1/namespaces/:ns/rebuild-data", post(rebuild_data))
        .route("/metrics", get(render_metrics))
        .route_layer(axum::middleware::from_fn_with_state((metrics, "admin"), track_requests))
        .fallback(no_route)
        .layer(axum::middleware::from_fn_with_state(Arc::new(auth_key), require_auth))
        .layer(axum::middleware::from_fn_with_state(limits, enforce))
        .with_state(state)
}

/// With an admin key configured, every request must carry `Authorization: Bearer <key>`.
async fn require_auth<B>(State(key): State<Arc<Option<String>>>, request: Request<B>, next: Next<B>) -> Response {
    if let Some(key) = key.as_deref() {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .is_some_and(|token| crate::auth::constant_time_eq(token.trim().as_bytes(), key.as_bytes()));
        if !ok {
            return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "missing or wrong admin key (Authorization: Bearer <key>)")
                .into_response();
        }
    }
    next.run(request).await
}

/// A namespace's `jwt_key` as given (an empty one is none), refused if it holds no usable key.
fn namespace_key(key: Option<String>) -> Result<Option<String>, ApiError> {
    match key.filter(|k| !k.trim().is_empty()) {
        None => Ok(None),
        Some(key) => match crate::auth::check_namespace_key(&key) {
            Ok(()) => Ok(Some(key)),
            Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, "JWT_KEY_INVALID", format!("jwt_key: {e}"))),
        },
    }
}

fn name_of(path: Result<Path<String>, PathRejection>) -> Result<NamespaceName, ApiError> {
    let Path(name) = path?;
    Ok(NamespaceName::new(name)?)
}

/// Parses an optional JSON body: an empty body means "all defaults".
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

async fn list_namespaces(State(state): State<AdminState>) -> Result<Json<serde_json::Value>, ApiError> {
    let names: Vec<String> = state.store.list().await?.into_iter().map(|n| n.to_string()).collect();
    Ok(Json(json!({ "namespaces": names })))
}

/// Body of `create`: every field optional, as the libSQL server accepts it.
#[derive(Deserialize, Default)]
struct CreateBody {
    max_db_size: Option<ByteSize>,
    jwt_key: Option<String>,
    txn_timeout_s: Option<u64>,
    allow_attach: Option<bool>,
    dump_url: Option<String>,
    bottomless_db_id: Option<String>,
    shared_schema: Option<bool>,
    shared_schema_name: Option<String>,
    durability_mode: Option<Durability>,
    heartbeat_url: Option<String>,
}

async fn create_namespace(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = name_of(path)?;
    let body: CreateBody = optional_body(&body?)?;
    if body.dump_url.is_some() {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "NOT_IMPLEMENTED",
            "creating a namespace from dump_url is not supported yet",
        ));
    }
    let config = DatabaseConfig {
        max_db_pages: body.max_db_size.map(|s| s.pages()).unwrap_or(0),
        jwt_key: namespace_key(body.jwt_key)?,
        txn_timeout_s: body.txn_timeout_s,
        allow_attach: body.allow_attach.unwrap_or(false),
        bottomless_db_id: body.bottomless_db_id,
        shared_schema: body.shared_schema,
        shared_schema_name: body.shared_schema_name,
        durability_mode: body.durability_mode.map(|d| d.0 as i32),
        heartbeat_url: body.heartbeat_url,
        ..Default::default()
    };
    state.store.create(&name, config).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
struct DeleteBody {
    /// Accepted for compatibility; this server keeps no remote backups to keep.
    #[allow(dead_code)]
    keep_backup: Option<bool>,
}

async fn delete_namespace(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = name_of(path)?;
    let _: DeleteBody = optional_body(&body?)?;
    state.store.destroy(&name).await?;
    Ok(Json(json!({})))
}

/// A namespace's configuration as the admin API shows and takes it.
#[derive(Serialize, Deserialize, Default)]
struct ConfigBody {
    block_reads: Option<bool>,
    block_writes: Option<bool>,
    block_reason: Option<String>,
    max_db_size: Option<ByteSize>,
    heartbeat_url: Option<String>,
    jwt_key: Option<String>,
    allow_attach: Option<bool>,
    txn_timeout_s: Option<u64>,
    durability_mode: Option<Durability>,
}

impl ConfigBody {
    fn from_config(c: &DatabaseConfig) -> Self {
        ConfigBody {
            block_reads: Some(c.block_reads),
            block_writes: Some(c.block_writes),
            block_reason: c.block_reason.clone(),
            max_db_size: Some(ByteSize(c.max_db_pages.saturating_mul(PAGE_SIZE as u64))),
            heartbeat_url: c.heartbeat_url.clone(),
            jwt_key: c.jwt_key.clone(),
            allow_attach: Some(c.allow_attach),
            txn_timeout_s: c.txn_timeout_s,
            durability_mode: Some(Durability(
                c.durability_mode.and_then(|m| DurabilityMode::try_from(m).ok()).unwrap_or(DurabilityMode::Strong),
            )),
        }
    }

    /// The configuration after this update: fields not given keep their value.
    fn apply(self, mut c: DatabaseConfig) -> DatabaseConfig {
        if let Some(v) = self.block_reads {
            c.block_reads = v;
        }
        if let Some(v) = self.block_writes {
            c.block_writes = v;
        }
        if self.block_reason.is_some() || self.block_reads == Some(false) && self.block_writes == Some(false) {
            c.block_reason = self.block_reason;
        }
        if let Some(v) = self.max_db_size {
            c.max_db_pages = v.pages();
        }
        if self.heartbeat_url.is_some() {
            c.heartbeat_url = self.heartbeat_url;
        }
        if let Some(key) = self.jwt_key {
            c.jwt_key = Some(key).filter(|k| !k.is_empty());
        }
        if let Some(v) = self.allow_attach {
            c.allow_attach = v;
        }
        if self.txn_timeout_s.is_some() {
            c.txn_timeout_s = self.txn_timeout_s;
        }
        if let Some(v) = self.durability_mode {
            c.durability_mode = Some(v.0 as i32);
        }
        c
    }
}

async fn get_config(State(state): State<AdminState>, path: Result<Path<String>, PathRejection>) -> Result<Json<ConfigBody>, ApiError> {
    let name = name_of(path)?;
    Ok(Json(ConfigBody::from_config(&*state.store.config(&name).await?)))
}

async fn set_config(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ConfigBody>, ApiError> {
    let name = name_of(path)?;
    let mut update: ConfigBody = parse_json(&body?)?;
    if let Some(key) = update.jwt_key.take() {
        // An empty key removes the namespace's key.
        update.jwt_key = Some(namespace_key(Some(key))?.unwrap_or_default());
    }
    let config = state.store.update_config(&name, move |current| update.apply(current)).await?;
    Ok(Json(ConfigBody::from_config(&config)))
}

async fn stats(State(state): State<AdminState>, path: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let name = name_of(path)?;
    Ok(Json(state.store.stats(&name).await?).into_response())
}

async fn checkpoint(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = name_of(path)?;
    state.store.checkpoint(&name).await?;
    Ok(Json(json!({})))
}

/// Body of `integrity-check`: `{}` or no body is a quick check.
#[derive(Deserialize, Default)]
struct IntegrityCheckBody {
    full: Option<bool>,
}

/// The verdict on a namespace's data file and replication log, and the repair that fixes
/// what was found (see `namespace::repair`).
async fn integrity_check(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Verdict>, ApiError> {
    let name = name_of(path)?;
    let body: IntegrityCheckBody = optional_body(&body?)?;
    let verdict = state.store.integrity_check(&name, body.full.unwrap_or(false)).await?;
    let counter = match verdict.repair {
        Repair::None => "sqld_integrity_verdict_none_total",
        Repair::ResetReplication => "sqld_integrity_verdict_reset_replication_total",
        Repair::RebuildData => "sqld_integrity_verdict_rebuild_data_total",
        Repair::RestoreFromBackup => "sqld_integrity_verdict_restore_from_backup_total",
    };
    state.metrics.count(counter, "Integrity checks by the repair their verdict names.", 1);
    tracing::info!(namespace = %name, check = verdict.check, data_ok = verdict.ok, log_ok = verdict.replication_log.ok, repair = verdict.repair.name(), elapsed_ms = verdict.elapsed_ms, "integrity check");
    Ok(Json(verdict))
}

/// A body for routes that take no fields: none, `{}`, or a JSON object (fields ignored).
#[derive(Deserialize, Default)]
struct NoFields {}

/// Rebuilds a namespace's replication log from its live data (Mode A: the data is fine, the
/// log or snapshots are broken).
async fn reset_replication(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = name_of(path)?;
    let NoFields {} = optional_body(&body?)?;
    tracing::info!(namespace = %name, "reset-replication started");
    match state.store.reset_replication(&name).await {
        Ok(reset) => {
            state.metrics.count("sqld_repair_reset_replication_done_total", "reset-replication calls that rebuilt the log.", 1);
            tracing::info!(namespace = %name, old_log_id = %reset.old_log_id, log_id = %reset.log_id, generation = reset.generation, pages = reset.pages, elapsed_ms = reset.elapsed.as_millis() as u64, pin_ms = reset.writers_held.0.as_secs_f64() * 1e3, swap_ms = reset.writers_held.1.as_secs_f64() * 1e3, "reset-replication done");
            Ok(Json(json!({
                "elapsed_ms": reset.elapsed.as_millis() as u64,
                "log_id": reset.log_id.hyphenated().to_string(),
                "generation": reset.generation,
                "pages": reset.pages,
            })))
        }
        Err(e) => Err(refused(&state, "sqld_repair_reset_replication_refused_total", &name, "reset-replication", e)),
    }
}

/// Rebuilds a namespace's data file from its replication log (Mode B: the data is corrupt,
/// the log verifies). The log does not change.
async fn rebuild_data(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = name_of(path)?;
    let NoFields {} = optional_body(&body?)?;
    tracing::info!(namespace = %name, "rebuild-data started");
    match state.store.rebuild_data(&name).await {
        Ok(rebuilt) => {
            state.metrics.count("sqld_repair_rebuild_data_done_total", "rebuild-data calls that rebuilt the data file.", 1);
            tracing::info!(namespace = %name, pages = rebuilt.pages, elapsed_ms = rebuilt.elapsed.as_millis() as u64, "rebuild-data done");
            Ok(Json(json!({ "elapsed_ms": rebuilt.elapsed.as_millis() as u64, "pages": rebuilt.pages })))
        }
        Err(e) => Err(refused(&state, "sqld_repair_rebuild_data_refused_total", &name, "rebuild-data", e)),
    }
}

/// A repair refused or failed (nothing was changed): counted in `counter`, logged, answered.
fn refused(state: &AdminState, counter: &'static str, name: &NamespaceName, repair: &str, e: crate::namespace::Error) -> ApiError {
    state.metrics.count(counter, "Repair calls refused or failed; nothing was changed.", 1);
    tracing::warn!(namespace = %name, error = %e, "{repair} refused");
    e.into()
}

async fn render_metrics(State(state): State<AdminState>, _headers: HeaderMap) -> Response {
    let gauges = [
        ("sqld_namespaces_loaded", "Namespaces open right now.", state.store.loaded_count() as f64),
        ("sqld_hrana_streams_parked", "Hrana streams waiting for their next request.", state.hrana.streams().len() as f64),
    ];
    let mut text = state.metrics.render(&gauges);
    replica_lag(&mut text, &state.store.replica_progress());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// On a replica: how far each followed namespace's copy is behind the primary.
fn replica_lag(out: &mut String, progress: &[(crate::namespace::NamespaceName, crate::replica::Progress)]) {
    use std::fmt::Write;
    if progress.is_empty() {
        return;
    }
    let series: [(&str, &str, fn(&crate::replica::Progress) -> f64); 3] = [
        ("sqld_replica_lag_frames", "Frames of the primary's log a replica's copy has not applied yet, by namespace.", |p| p.lag_frames() as f64),
        ("sqld_replica_lag_seconds", "Since when a replica's copy has been behind its primary (0: caught up), by namespace.", |p| p.lag_seconds()),
        ("sqld_replica_replicated_index", "The frame_no of the primary's log a replica's copy has applied, by namespace.", |p| {
            p.applied.map_or(0.0, |applied| applied as f64)
        }),
    ];
    for (name, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (ns, p) in progress {
            let _ = writeln!(out, "{name}{{namespace=\"{ns}\"}} {}", value(p));
        }
    }
}

/// A size in bytes, given as a number or as text with a unit (`"10MB"`, `"512kb"`, `"1GiB"`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct ByteSize(u64);

impl ByteSize {
    fn pages(self) -> u64 {
        self.0.div_ceil(PAGE_SIZE as u64)
    }

    fn parse(text: &str) -> Option<u64> {
        crate::config::parse_size(text)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t)
                .map(ByteSize)
                .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a size (like 10MB or 1048576)"))),
        }
    }
}

/// A durability mode by its name: relaxed, strong, extra or off.
#[derive(Clone, Copy)]
struct Durability(DurabilityMode);

impl Serialize for Durability {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.as_str_name().to_ascii_lowercase())
    }
}

impl<'de> Deserialize<'de> for Durability {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        DurabilityMode::from_str_name(&name.to_ascii_uppercase())
            .map(Durability)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown durability mode {name:?} (relaxed, strong, extra, off)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("10MB"), Some(10_000_000));
        assert_eq!(ByteSize::parse("1 gib"), Some(1 << 30));
        assert_eq!(ByteSize::parse("4096"), Some(4096));
        assert_eq!(ByteSize::parse("ten"), None);
        assert_eq!(ByteSize::parse("99999999999999999999tb"), None);
        assert_eq!(ByteSize(4097).pages(), 2);
    }
}
