//! The replication log's cost is a function of the database and of the work: a namespace
//! larger than the log limit compacts once per database's worth of changes, and each
//! compaction's snapshot replaces the ones before it.

use std::path::Path;

use libsql_server::replication::sync::{self, Pull};
use libsql_server::replication::RecoveryOptions;

use crate::common::primary::{compact_every, Primary};

/// Every byte under a namespace's directory.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[test]
fn a_namespace_larger_than_the_log_limit_compacts_once_per_database_of_changes() {
    let tmp = tempfile::tempdir().unwrap();
    // A log limit of 16 frames, a database of some 240 pages.
    let primary = Primary::open(tmp.path(), compact_every(16), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)");
    primary.exec("INSERT INTO t SELECT value, randomblob(3000) FROM generate_series(1, 240)");
    primary.db().wait_for_compaction();
    let before = primary.logger().stats();
    let pages = std::fs::metadata(tmp.path().join("data")).unwrap().len() / 4096;
    assert!(pages > 200, "{pages}");

    // 150 single-row writes change a page or two each: less than the database's size.
    for i in 0..150 {
        primary.exec(&format!("UPDATE t SET v = randomblob(3000) WHERE k = {}", i % 240 + 1));
    }
    primary.db().wait_for_compaction();
    let after = primary.logger().stats();
    let compactions = after.generation - before.generation;
    assert!(compactions <= 1, "{compactions} compactions for 150 single-row writes to a {pages}-page database: {after:?}");

    // A database's worth of changes more, and compaction comes.
    for i in 0..pages {
        primary.exec(&format!("UPDATE t SET v = randomblob(3000) WHERE k = {}", i % 240 + 1));
    }
    primary.db().wait_for_compaction();
    let end = primary.logger().stats();
    assert!(end.generation > after.generation, "a database's worth of changes retires the log: {end:?}");
    assert!(end.generation - before.generation <= 3, "{end:?}");
    assert_eq!(end.snapshot_count, 1, "one snapshot covers every frame before the log: {end:?}");
    primary.assert_replay_equals_data();
    primary.close();

    // Reopened, the log still knows how much of it is its opening image: a few writes more
    // compact nothing.
    let primary = Primary::open(tmp.path(), compact_every(16), RecoveryOptions::default());
    let reopened = primary.logger().stats();
    for i in 0..10 {
        primary.exec(&format!("UPDATE t SET v = randomblob(3000) WHERE k = {}", i + 1));
    }
    primary.db().wait_for_compaction();
    assert_eq!(primary.logger().stats().generation, reopened.generation, "no compaction after a reopen");
    primary.close();

    let data = std::fs::metadata(tmp.path().join("data")).unwrap().len();
    let total = dir_bytes(tmp.path());
    assert!(total <= 4 * data + 16 * 4120 + (1 << 20), "{total} bytes beside a {data}-byte data file");
}

/// Frames of `generation` from `start` (1-based) as a sync client pulls them, 128 at a time,
/// or the generation the server says comes next.
fn pull(primary: &Primary, generation: u64, start: u64) -> Result<Vec<u8>, u64> {
    match sync::pull(primary.logger(), generation, start, start + 128).unwrap() {
        Pull::Frames(frames) => Ok(frames),
        Pull::EndOfGeneration { current } => Err(current),
    }
}

/// Whether the last of `frames` (SQLite WAL layout) ends a transaction.
fn ends_transaction(frames: &[u8]) -> bool {
    let last = &frames[frames.len() - 4120..];
    last[4..8] != [0, 0, 0, 0]
}

/// A client part-way through a generation's transaction when compactions supersede it gets
/// the rest of that generation first, then the next; one with nothing of it moves on at once.
#[test]
fn a_client_part_way_through_a_transaction_finishes_it_across_compactions() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), compact_every(64), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)");
    primary.exec("INSERT INTO t SELECT value, randomblob(3000) FROM generate_series(1, 300)");
    primary.db().wait_for_compaction();
    let generation = primary.logger().generation();
    // The generation opens with a full image of some 300 pages: a transaction of 3 pulls.
    let first = pull(&primary, generation, 1).unwrap();
    assert!(!ends_transaction(&first), "the image spans several pulls");

    // Two compactions meanwhile (each once the log holds a database's worth of changes).
    for target in [generation + 1, generation + 2] {
        for _ in 0..3 {
            if primary.logger().generation() < target {
                primary.exec("UPDATE t SET v = randomblob(3000)");
                primary.db().wait_for_compaction();
            }
        }
    }
    let current = primary.logger().generation();
    assert_eq!(current, generation + 2, "two compactions");

    // The client goes on with its generation to its end, which ends a transaction.
    let mut start = 129;
    let mut last = first;
    loop {
        match pull(&primary, generation, start) {
            Ok(frames) => {
                start += (frames.len() / 4120) as u64;
                last = frames;
            }
            Err(next) => {
                assert_eq!(next, current);
                break;
            }
        }
    }
    assert!(ends_transaction(&last), "the superseded generation was served to a transaction's end");
    // The next generation, superseded too, has nothing for it: it moves on at once.
    assert_eq!(pull(&primary, generation + 1, 1), Err(current));
    assert!(pull(&primary, current, 1).is_ok());
    primary.close();
}
