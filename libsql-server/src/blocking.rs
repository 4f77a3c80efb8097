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
            Ok(payload) => describe(payload.as_ref()),
            Err(e) => e.to_string(),
        };
        tracing::error!(panic = %what, "blocking task panicked");
        Panicked(what)
    })
}

/// Runs `f` on a thread of its own at background priority (see [`lower_priority`]), which
/// threads it starts inherit: an integrity check of one
/// namespace yields the cores and the disk to every namespace's requests. (Not for work that
/// holds a namespace's write lock: its writers would wait on a low-priority thread.) The
/// thread ends with the work, so no pool thread keeps the lowered priority.
pub async fn run_in_background<F, R>(f: F) -> Result<R, Panicked>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("sqld-background".into()).spawn(move || {
        lower_priority();
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    if let Err(e) = spawned {
        return Err(Panicked(format!("spawning a background thread: {e}")));
    }
    match rx.await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(payload)) => {
            let what = describe(payload.as_ref());
            tracing::error!(panic = %what, "background task panicked");
            Err(Panicked(what))
        }
        Err(_) => Err(Panicked("the background thread ended without an answer".into())),
    }
}

/// Drops `value` on a thread of its own at background priority: for handles whose release is
/// slow work (the last handle on a removed file frees its blocks) that no caller should wait
/// for. If no thread can be started, it is dropped here.
pub fn drop_in_background<T: Send + 'static>(value: T) {
    let spawned = std::thread::Builder::new().name("sqld-release".into()).spawn(move || {
        lower_priority();
        drop(value);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to release files in the background");
    }
}

fn describe(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Lowers the calling thread's CPU and I/O priority (Linux: both are per thread): SCHED_IDLE,
/// which runs only on a core no other thread wants (any request's thread preempts it at once;
/// `nice` alone still took whole time slices from readers: their p99 tripled), and the
/// lowest best-effort I/O priority (where the disk's scheduler honours it). For threads that
/// end with their work and hold no lock others wait for.
pub fn lower_priority() {
    // SAFETY: plain system calls on the calling thread; failures only leave the priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, class best-effort (2) << 13 | level 7).
        libc::syscall(libc::SYS_ioprio_set, 1, tid, (2 << 13) | 7);
    }
}
