//! Fault injection for crash tests: a named point on a recovery or compaction path can be made
//! to fail, which stops the operation right there as a crash would (the namespace is then
//! dropped without a clean close, and the next open must recover).
//!
//! A point is armed for the namespace directories under one path (so parallel tests do not
//! trip over each other), in-process by [`arm`], or for a whole real process by the
//! environment variable `SQLD_FAILPOINTS` (comma-separated names). Unarmed, a point costs one
//! atomic load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

static ANY_ARMED: AtomicBool = AtomicBool::new(false);

/// An armed point: its name and the directory it applies under (`None`: everywhere).
type Point = (String, Option<PathBuf>);

fn armed() -> &'static Mutex<Vec<Point>> {
    static ARMED: OnceLock<Mutex<Vec<Point>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let from_env: Vec<_> = std::env::var("SQLD_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| (s.to_owned(), None))
            .collect();
        if !from_env.is_empty() {
            ANY_ARMED.store(true, Ordering::Release);
        }
        Mutex::new(from_env)
    })
}

/// Fails with an I/O error if `name` is armed for `path`.
pub fn check(name: &str, path: &Path) -> io::Result<()> {
    let points = armed();
    if !ANY_ARMED.load(Ordering::Acquire) {
        return Ok(());
    }
    let hit = points
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(n, under)| n == name && under.as_ref().is_none_or(|dir| path.starts_with(dir)));
    if hit {
        tracing::warn!(failpoint = name, path = %path.display(), "failpoint hit: simulating a crash here");
        return Err(io::Error::other(format!("failpoint {name}")));
    }
    Ok(())
}

/// Arms `name` for paths under `under` until the guard is dropped (tests).
pub fn arm(name: &str, under: &Path) -> Armed {
    let entry = (name.to_owned(), Some(under.to_owned()));
    armed().lock().unwrap_or_else(|e| e.into_inner()).push(entry.clone());
    ANY_ARMED.store(true, Ordering::Release);
    Armed(entry)
}

#[must_use = "the failpoint is disarmed when the guard is dropped"]
pub struct Armed(Point);

impl Drop for Armed {
    fn drop(&mut self) {
        let mut points = armed().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = points.iter().position(|p| *p == self.0) {
            points.remove(i);
        }
    }
}
