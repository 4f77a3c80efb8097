//! `reset-replication` on the logger: a new log from the data file, taken up in place.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use uuid::Uuid;

use super::{LogState, ReplicationLogger, Superseded};
use crate::replication::{generation, recovery, synced, LogError, WALLOG};

impl ReplicationLogger {
    /// Replaces the log with a new one built from `data`: a new log_id, frame 0 on, one
    /// transaction carrying every page, no snapshots or retired logs, a new generation (see
    /// `recovery::rebuild`, which builds it beside the old one and swaps it in by rename).
    /// The caller holds the namespace's write gate and has checkpointed SQLite's WAL into
    /// `data` and checked it. The old generation stays readable for sync clients part-way
    /// through it. A broken (poisoned) log is working again afterwards.
    pub fn reset_from_data(&self, data: &Path, approve: impl FnOnce() -> Result<(), LogError>) -> Result<(Uuid, u64, u64), LogError> {
        // No snapshot of the old log may land after the old ones are dropped.
        self.wait_for_compactions();
        // Checkpoints record their position in `synced` under this lock: not meanwhile.
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        let rebuilt = match recovery::rebuild_approved(&self.dir, data, "reset-replication", approve) {
            Ok(rebuilt) => rebuilt,
            Err(e) => {
                self.follow_swapped_log(&e);
                return Err(e);
            }
        };
        let generation = generation::for_log(&self.dir, recovery::read_header(&self.dir.join(WALLOG))?.log_id, 0)?;
        let mut state = self.lock();
        let outgoing = Superseded { generation: state.generation.generation, file: state.file.clone(), frame_count: state.header.frame_count, at: Instant::now() };
        *state = LogState::read(&self.dir, generation)?;
        *synced = synced::read(&self.dir);
        self.generation.store(generation.generation, Ordering::Release);
        self.retire_wanted.store(false, Ordering::Release);
        if outgoing.frame_count > 0 {
            self.supersede(outgoing);
        }
        Ok((state.header.log_id, generation.generation, rebuilt.pages))
    }

    /// After a reset failed: if its new log was already swapped in, appending to the old one
    /// (no longer the `wallog`) would lose writes, so the new one is taken up, or, if even that
    /// fails, the log refuses writes until the next open rebuilds it.
    fn follow_swapped_log(&self, why: &LogError) {
        use std::os::unix::fs::MetadataExt;
        let mut state = self.lock();
        let path = self.dir.join(WALLOG);
        let same = match (state.file.metadata(), std::fs::metadata(&path)) {
            (Ok(ours), Ok(on_disk)) => (ours.dev(), ours.ino()) == (on_disk.dev(), on_disk.ino()),
            _ => false,
        };
        if same {
            return;
        }
        let taken_up = recovery::read_header(&path)
            .and_then(|header| generation::for_log(&self.dir, header.log_id, header.start_frame_no))
            .and_then(|generation| LogState::read(&self.dir, generation));
        match taken_up {
            Ok(new) => {
                self.generation.store(new.generation.generation, Ordering::Release);
                *state = new;
            }
            Err(e) => {
                state.poisoned = Some(format!("a reset failed after swapping in its new log ({why}), which could not be taken up: {e}"));
            }
        }
    }
}

