//! Running blocking work (SQLite, fsync, directory scans) off the async workers.

/// The blocking task panicked: a bug, reported as an internal error instead of tearing down
/// the connection that asked.
#[derive(Debug, thiserror::Error)]
#[error("a blocking task panicked: {0}")]
pub struct Panicked(String);

/// Runs `f` on tokio's blocking pool, so one namespace's slow SQLite call or fsync never holds
/// an async worker that other namespaces' requests need.
pub async fn run<F, R>(f: F) -> Result<R, Panicked>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        let what = match e.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into()),
            Err(e) => e.to_string(),
        };
        tracing::error!(panic = %what, "blocking task panicked");
        Panicked(what)
    })
}
