//! The log as the durable record of every commit, in-process: a failure on the commit path
//! fails only its transaction or poisons the log, and after a crash (simulated power cuts:
//! an older or torn data file put back) the data file is rewritten from the log, while a
//! broken log never overwrites it.

use std::path::{Path, PathBuf};

use libsql_server::replication::{failpoint, recovery, RecoveryOptions};

use crate::common::primary::{compact_every, le_u64, no_compaction, Primary};

/// A log write that fails before SQLite commits (here: after its frames reached the file) fails
/// that transaction and nothing else: the log is not poisoned, and the frames it left past the
/// committed end are overwritten by the next transactions.
#[test]
fn a_failed_log_write_fails_only_its_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    let before = primary.logger().stats().frame_count;
    {
        let _armed = failpoint::arm("log.write", tmp.path());
        assert!(primary.try_exec("INSERT INTO t SELECT randomblob(3000) FROM generate_series(1, 50)").is_err());
    }
    assert!(!primary.logger().is_poisoned());
    assert_eq!(primary.logger().stats().frame_count, before, "nothing counted");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1, "the transaction did not commit");
    primary.exec("INSERT INTO t VALUES (2)");
    primary.exec("PRAGMA cache_size = 5; INSERT INTO t SELECT randomblob(3000) FROM generate_series(1, 100);");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 102);
    primary.assert_replay_equals_data();
    primary.close();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_none(), "a clean log is reopened as it is");
    primary.assert_replay_equals_data();
    primary.close();
}

/// A failed SQLite commit after the log already holds the transaction durably: the log
/// discards it, so the roll-forward of the next (dirty) open does not bring it back.
#[test]
fn a_failed_sqlite_commit_is_discarded_from_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    {
        let _armed = failpoint::arm("wal.commit", tmp.path());
        assert!(primary.try_exec("INSERT INTO t VALUES (2)").is_err());
    }
    assert!(!primary.logger().is_poisoned());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1);
    primary.crash();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1, "the failed transaction stays failed");
    primary.exec("INSERT INTO t VALUES (3)");
    primary.assert_replay_equals_data();
    primary.close();
}

/// Frames of a failed transaction that cannot even be discarded: the log is poisoned and
/// marked untrusted, so the next open trusts the data file instead of rolling them forward.
#[test]
fn undiscardable_frames_mark_the_log_untrusted() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    {
        let _write = failpoint::arm("log.write", tmp.path());
        let _discard = failpoint::arm("log.discard", tmp.path());
        assert!(primary.try_exec("INSERT INTO t VALUES (2)").is_err());
    }
    assert!(primary.logger().is_poisoned());
    assert!(tmp.path().join(".log-untrusted").exists());
    assert!(primary.try_exec("INSERT INTO t VALUES (3)").is_err(), "writes are refused");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1, "reads go on");
    primary.crash();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_some());
    assert!(!tmp.path().join(".log-untrusted").exists(), "the rebuild clears the mark");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1);
    primary.exec("INSERT INTO t VALUES (3)");
    primary.assert_replay_equals_data();
    primary.close();
}

/// The data file and its SQLite WAL as they are now (between statements, so consistent).
fn save_data(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    ["data", "data-wal"].iter().map(|f| (dir.join(f), std::fs::read(dir.join(f)).ok())).collect()
}

/// Puts a saved data file back after a crash: what a power cut does to a data file whose
/// last transactions were not yet synced. Legitimate only for a file saved no earlier than
/// the last `synced` record (see `restore_data` otherwise).
fn put_back(dir: &Path, saved: &[(PathBuf, Option<Vec<u8>>)]) {
    for (path, bytes) in saved {
        match bytes {
            Some(bytes) => std::fs::write(path, bytes).unwrap(),
            None => drop(std::fs::remove_file(path)),
        }
    }
    let _ = std::fs::remove_file(dir.join("data-shm"));
}

/// [`put_back`] of a data file that may be older than the record of how far the data file is
/// durable: the record goes too, as a power cut cannot lose what it names.
fn restore_data(dir: &Path, saved: &[(PathBuf, Option<Vec<u8>>)]) {
    let _ = std::fs::remove_file(dir.join("synced"));
    put_back(dir, saved);
}

/// Flips a byte inside the page of the log's frame at `index`, breaking its checksum chain.
fn break_frame(dir: &Path, index: usize) {
    let wallog = dir.join("wallog");
    let mut bytes = std::fs::read(&wallog).unwrap();
    bytes[64 + index * 4120 + 100] ^= 0xFF;
    std::fs::write(&wallog, bytes).unwrap();
}

/// SQLite does not sync the data file (synchronous=OFF): after a power cut it may hold an
/// older state, or torn pages, while the log holds every acknowledged transaction durably.
/// Simulated by putting back an earlier data file after a crash (and, in one case, tearing
/// it): the next open rewrites it to the log's last state, across spills, a shrinking VACUUM
/// and a compaction (whose new log opens with an image), also after a crash in the middle of
/// the roll-forward itself, and also when the log is then kept (LIBSQL_IGNORE_DIRTY_LOG).
#[test]
fn acknowledged_commits_survive_the_data_file_losing_its_last_transactions() {
    for case in ["earlier data file", "torn data file", "crash inside the roll-forward", "log kept"] {
        let tmp = tempfile::tempdir().unwrap();
        let options = RecoveryOptions { ignore_dirty: case == "log kept", ..Default::default() };
        let primary = Primary::open(tmp.path(), compact_every(400), options);
        primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 300);");
        let earlier = save_data(tmp.path());
        for i in 0..20 {
            primary.exec(&format!("INSERT INTO t VALUES ({}, randomblob(500))", 1000 + i));
        }
        primary.exec("PRAGMA cache_size = 5; INSERT INTO t SELECT value + 2000, randomblob(3000) FROM generate_series(1, 200);");
        primary.exec("DELETE FROM t WHERE k <= 250; VACUUM;");
        let expected = (primary.count("SELECT count(*) FROM t"), primary.count("SELECT sum(length(v)) + sum(k) FROM t"));
        assert_eq!(expected.0, 50 + 20 + 200);
        primary.crash();
        restore_data(tmp.path(), &earlier);
        let data = tmp.path().join("data");
        if case == "torn data file" {
            let mut bytes = std::fs::read(&data).unwrap();
            bytes[..4096].fill(0xAB);
            bytes.truncate(bytes.len() / 2);
            std::fs::write(&data, bytes).unwrap();
            let _ = std::fs::remove_file(tmp.path().join("data-wal"));
        }
        if case == "crash inside the roll-forward" {
            let _armed = failpoint::arm("recovery.mid_roll_forward", tmp.path());
            assert!(recovery::open(tmp.path(), &data, compact_every(400), options).is_err(), "the roll-forward was not reached");
        }
        let primary = Primary::open(tmp.path(), compact_every(400), options);
        assert_eq!(primary.rebuild.is_none(), case == "log kept", "{case}");
        let found = (primary.count("SELECT count(*) FROM t"), primary.count("SELECT sum(length(v)) + sum(k) FROM t"));
        assert_eq!(found, expected, "{case}");
        assert_eq!(primary.integrity(), "ok", "{case}");
        primary.assert_replay_equals_data();
        primary.exec("INSERT INTO t VALUES (-1, 'after')");
        primary.assert_replay_equals_data();
        primary.close();
    }
}

/// A complete checkpoint syncs the data file and records how far it is durable; a power cut
/// can then only cost it what came later, and the roll-forward replays only the log after the
/// recorded point. Shown by breaking a frame before that point: a walk from the log's start
/// would stop there and trust the stale data file.
#[test]
fn the_roll_forward_starts_where_the_data_file_was_recorded_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 300);");
    primary.db().checkpoint(libsql_server::database::CheckpointMode::Truncate).unwrap();
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("synced")).unwrap()).unwrap();
    assert_eq!(record["frame_no"].as_u64(), primary.logger().stats().last_frame_no);
    let synced = save_data(tmp.path());
    primary.exec("INSERT INTO t SELECT value + 1000, randomblob(2000) FROM generate_series(1, 50);");
    primary.crash();
    put_back(tmp.path(), &synced);
    break_frame(tmp.path(), 5);

    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 350);
    assert_eq!(primary.integrity(), "ok");
    primary.assert_replay_equals_data();
    primary.close();
}

/// A log whose committed frames fail the checksum chain never overwrites the data file: the
/// data file is trusted as it is and the log rebuilt from it.
#[test]
fn a_corrupt_log_never_overwrites_the_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 300);");
    let earlier = save_data(tmp.path());
    primary.exec("INSERT INTO t SELECT value + 1000, randomblob(2000) FROM generate_series(1, 10);");
    primary.crash();
    restore_data(tmp.path(), &earlier);
    break_frame(tmp.path(), 5);

    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_some());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 300, "the data file as it was");
    assert_eq!(primary.integrity(), "ok");
    primary.assert_replay_equals_data();
    primary.close();
}

/// A header that cannot be written after SQLite committed: the transaction's frames are
/// durable and count, so the log is poisoned but a close keeps them (and writes the count).
#[test]
fn a_failed_header_write_keeps_the_committed_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    let before = primary.logger().stats().frame_count;
    {
        let _armed = failpoint::arm("log.header", tmp.path());
        primary.exec("INSERT INTO t VALUES (2)");
    }
    assert!(primary.logger().is_poisoned());
    let counted = primary.logger().stats().frame_count;
    assert!(counted > before);
    primary.close();
    let bytes = std::fs::read(tmp.path().join("wallog")).unwrap();
    assert_eq!(le_u64(&bytes, 40), counted, "the close wrote the count");
    assert_eq!(bytes.len() as u64, 64 + counted * 4120, "and kept the frames");
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 2);
    primary.assert_replay_equals_data();
    primary.close();
}

/// A write still in flight when its namespace closes (a shutdown past its timeout) does not
/// commit: the data file was already synced and the sentinel removed.
#[test]
fn a_closed_log_takes_no_more_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    let mut held = primary.db().connection().unwrap();
    let db = primary.db.take().unwrap();
    db.close().unwrap();
    recovery::close(db.log().unwrap(), primary.options).unwrap();
    assert!(!tmp.path().join(".sentinel").exists());
    assert!(held.execute_script("INSERT INTO t VALUES (2)").is_err());
    drop(held);
    drop(db);
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_none());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1);
    primary.assert_replay_equals_data();
    primary.close();
}
