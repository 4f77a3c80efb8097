//! The primary replication log, in-process: the on-disk format, replay against live data,
//! compaction, the sentinel, and simulated crashes inside compaction and dirty recovery.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crc::{Crc, CRC_64_GO_ISO};
use libsql_server::database::Database;
use libsql_server::namespace::DatabaseConfig;
use libsql_server::replication::verify::{compare_with_data, Comparison};
use libsql_server::replication::{failpoint, recovery, LogSettings, RecoveryOptions, ReplicationLogger, Rebuild};

struct Primary {
    dir: PathBuf,
    db: Option<Database>,
    rebuild: Option<Rebuild>,
    options: RecoveryOptions,
}

impl Primary {
    fn open(dir: &Path, settings: LogSettings, options: RecoveryOptions) -> Primary {
        std::fs::create_dir_all(dir).unwrap();
        let data = dir.join("data");
        let (logger, rebuild) = recovery::open(dir, &data, settings, options).unwrap();
        let db = Database::open(&data, DatabaseConfig::default(), Duration::from_secs(5), logger).unwrap();
        Primary { dir: dir.to_owned(), db: Some(db), rebuild, options }
    }

    fn db(&self) -> &Database {
        self.db.as_ref().unwrap()
    }

    fn logger(&self) -> &Arc<ReplicationLogger> {
        self.db().logger()
    }

    /// Runs statements as the server does: each admitted (write lock, compaction trigger).
    fn exec(&self, sql: &str) {
        self.try_exec(sql).unwrap();
    }

    fn try_exec(&self, sql: &str) -> Result<(), libsql_server::database::AccessError> {
        let mut conn = self.db().connection().unwrap();
        let result = conn.execute_script(sql);
        self.db().recycle(conn);
        result
    }

    fn count(&self, sql: &str) -> i64 {
        let conn = self.db().connection().unwrap();
        let n = conn.sqlite().query_row(sql, [], |r| r.get(0)).unwrap();
        self.db().recycle(conn);
        n
    }

    /// A clean close: checkpoint, log synced, sentinel removed.
    fn close(mut self) {
        let db = self.db.take().unwrap();
        db.close().unwrap();
        recovery::close(db.logger(), self.options).unwrap();
    }

    /// A crash as far as the log can tell: everything dropped, nothing marked clean. The
    /// background threads a real crash would stop are waited for (failpoints stop them where
    /// a test wants), so they cannot race the next open.
    fn crash(mut self) {
        let db = self.db.take().unwrap();
        db.wait_for_compaction();
        drop(db);
    }

    fn assert_replay_equals_data(&self) {
        self.db().wait_for_compaction();
        match compare_with_data(&self.dir, &self.dir.join("data")).unwrap() {
            Comparison::Equal { .. } => {}
            other => panic!("replay differs from data: {other:?}"),
        }
    }
}

fn no_compaction() -> LogSettings {
    LogSettings::default()
}

fn compact_every(frames: u64) -> LogSettings {
    LogSettings { max_log_frames: Some(frames), max_log_duration: None }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn wallog_parses_by_the_documented_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x)");
    primary.exec("INSERT INTO t VALUES (randomblob(5000))");
    // A rolled-back transaction, large enough to spill to the WAL before its rollback.
    primary.exec("PRAGMA cache_size = 5; BEGIN; INSERT INTO t SELECT randomblob(3000) FROM generate_series(1, 200); ROLLBACK;");
    primary.exec("INSERT INTO t VALUES (1)");
    let stats = primary.logger().stats();
    primary.close();

    let bytes = std::fs::read(tmp.path().join("wallog")).unwrap();
    assert_eq!(&bytes[0..8], b"SQLDWAL\0");
    let start_checksum = le_u64(&bytes, 8);
    let log_id = u128::from_le_bytes(bytes[16..32].try_into().unwrap());
    assert_eq!(uuid::Uuid::from_u128(log_id).hyphenated().to_string(), stats.log_id);
    assert_eq!(uuid::Uuid::from_u128(log_id).get_version_num(), 4);
    assert_eq!(le_u64(&bytes, 32), 0, "start_frame_no");
    let frame_count = le_u64(&bytes, 40);
    assert_eq!(le_u32(&bytes, 48), 2, "version");
    assert_eq!(le_u32(&bytes, 52) as i32, 4096, "page_size");
    assert!(frame_count >= 4, "three transactions of at least one page each");
    assert!(bytes.len() as u64 >= 64 + frame_count * 4120);

    let crc = Crc::<u64>::new(&CRC_64_GO_ISO);
    let mut previous = start_checksum;
    let mut commits = 0;
    for i in 0..frame_count as usize {
        let frame = &bytes[64 + i * 4120..64 + (i + 1) * 4120];
        assert_eq!(le_u64(frame, 0), i as u64, "frame_no is contiguous from 0");
        let mut digest = crc.digest_with_initial(previous);
        digest.update(&frame[24..]);
        let sum = digest.finalize();
        assert_eq!(le_u64(frame, 8), sum, "checksum chain at frame {i}");
        previous = sum;
        assert!(le_u32(frame, 16) >= 1, "page_no");
        if le_u32(frame, 20) != 0 {
            commits += 1;
        }
    }
    assert_eq!(commits, 3, "the rolled-back transaction never reached the log");
    assert_ne!(le_u32(&bytes[64 + (frame_count as usize - 1) * 4120..], 20), 0, "the log ends on a commit frame");
}

/// A deterministic pseudo-random sequence, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

fn random_workload(primary: &Primary, rng: &mut Rng, transactions: usize) {
    for _ in 0..transactions {
        let sql = match rng.next(7) {
            0 => format!("INSERT INTO t (k, v) VALUES ({}, randomblob({}))", rng.next(1000), rng.next(6000)),
            1 => format!("UPDATE t SET v = randomblob({}) WHERE k % 7 = {}", rng.next(3000), rng.next(7)),
            2 => format!("DELETE FROM t WHERE k % 11 = {}", rng.next(11)),
            3 => format!("BEGIN; INSERT INTO t (k, v) SELECT value, randomblob(500) FROM generate_series(1, {}); COMMIT;", rng.next(300)),
            4 => "BEGIN; INSERT INTO t (k, v) VALUES (-1, randomblob(9000)); ROLLBACK;".to_owned(),
            5 => "SAVEPOINT s; INSERT INTO t (k, v) VALUES (-2, zeroblob(20000)); ROLLBACK TO s; INSERT INTO t (k, v) VALUES (-3, 'kept'); RELEASE s;".to_owned(),
            _ => "PRAGMA cache_size = 3; BEGIN; UPDATE t SET v = randomblob(100); INSERT INTO t (k, v) SELECT value, randomblob(2000) FROM generate_series(1, 50); COMMIT;".to_owned(),
        };
        primary.exec(&sql);
    }
}

#[test]
fn replay_equals_data_after_random_workloads_compactions_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut primary = Primary::open(tmp.path(), compact_every(64), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k INTEGER, v BLOB)");
    for round in 0..6 {
        random_workload(&primary, &mut rng, 40);
        primary.assert_replay_equals_data();
        if round % 2 == 1 {
            primary.exec("DELETE FROM t WHERE k > 100; VACUUM;");
            primary.assert_replay_equals_data();
        }
        let log_id = primary.logger().log_id();
        primary.close();
        primary = Primary::open(tmp.path(), compact_every(64), RecoveryOptions::default());
        assert!(primary.rebuild.is_none(), "a clean restart keeps the log");
        assert_eq!(primary.logger().log_id(), log_id);
        primary.assert_replay_equals_data();
    }
    let stats = primary.logger().stats();
    assert!(stats.snapshot_count >= 2, "compactions happened: {stats:?}");
    assert!(stats.start_frame_no > 0);
    primary.close();
}

#[test]
fn sentinel_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let sentinel = tmp.path().join(".sentinel");
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(sentinel.exists(), "an open namespace has a sentinel");
    primary.exec("CREATE TABLE t (x); INSERT INTO t SELECT value FROM generate_series(1, 1000);");
    let first_id = primary.logger().log_id();
    primary.close();
    assert!(!sentinel.exists(), "a clean close removes the sentinel");

    // A crash leaves it; the next open rebuilds the log under a new log_id, data intact.
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_none());
    primary.exec("INSERT INTO t VALUES (1001)");
    primary.crash();
    assert!(sentinel.exists());
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    let rebuild = primary.rebuild.as_ref().expect("a dirty open rebuilds");
    assert!(rebuild.reason.contains("sentinel"));
    assert_ne!(primary.logger().log_id(), first_id);
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1001);
    assert_eq!(primary.logger().stats().start_frame_no, 0);
    primary.assert_replay_equals_data();

    // The preserve flag keeps the sentinel through a clean close: the next open rebuilds.
    let preserving = RecoveryOptions { preserve_sentinel: true, ..Default::default() };
    let id = primary.logger().log_id();
    primary.close();
    let primary = Primary::open(tmp.path(), no_compaction(), preserving);
    assert_eq!(primary.logger().log_id(), id, "the close before was clean");
    primary.close();
    assert!(sentinel.exists());
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_some());
    primary.assert_replay_equals_data();

    // LIBSQL_IGNORE_DIRTY_LOG trusts the log despite the sentinel.
    let id = primary.logger().log_id();
    primary.crash();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions { ignore_dirty: true, ..Default::default() });
    assert!(primary.rebuild.is_none());
    assert_eq!(primary.logger().log_id(), id);
    primary.close();
}

#[test]
fn a_broken_log_refuses_writes_and_is_rebuilt_on_the_next_open() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (1);");
    primary.logger().poison("simulated: a committed transaction could not be logged".into());
    assert!(primary.try_exec("INSERT INTO t VALUES (2)").is_err(), "writes are refused");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 1, "reads go on");
    let id = primary.logger().log_id();
    primary.close();
    assert!(tmp.path().join(".sentinel").exists(), "a broken log keeps its sentinel through a clean close");
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_some());
    assert_ne!(primary.logger().log_id(), id);
    primary.exec("INSERT INTO t VALUES (3)");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 2);
    primary.assert_replay_equals_data();
    primary.close();
}

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
/// last transactions were not yet synced. The record of how far the data file is durable goes
/// too, since the saved file may be older than it (see `restore_synced_data` for a loss no
/// older than the record).
fn restore_data(dir: &Path, saved: &[(PathBuf, Option<Vec<u8>>)]) {
    let _ = std::fs::remove_file(dir.join("synced"));
    for (path, bytes) in saved {
        match bytes {
            Some(bytes) => std::fs::write(path, bytes).unwrap(),
            None => drop(std::fs::remove_file(path)),
        }
    }
    let _ = std::fs::remove_file(dir.join("data-shm"));
}

fn integrity(primary: &Primary) -> String {
    let conn = primary.db().connection().unwrap();
    let result = conn.sqlite().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    primary.db().recycle(conn);
    result
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
        assert_eq!(integrity(&primary), "ok", "{case}");
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
    for (path, bytes) in &synced {
        match bytes {
            Some(bytes) => std::fs::write(path, bytes).unwrap(),
            None => drop(std::fs::remove_file(path)),
        }
    }
    let _ = std::fs::remove_file(tmp.path().join("data-shm"));
    let wallog = tmp.path().join("wallog");
    let mut bytes = std::fs::read(&wallog).unwrap();
    bytes[64 + 5 * 4120 + 100] ^= 0xFF;
    std::fs::write(&wallog, bytes).unwrap();

    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 350);
    assert_eq!(integrity(&primary), "ok");
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
    let wallog = tmp.path().join("wallog");
    let mut bytes = std::fs::read(&wallog).unwrap();
    bytes[64 + 5 * 4120 + 100] ^= 0xFF;
    std::fs::write(&wallog, bytes).unwrap();

    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_some());
    assert_eq!(primary.count("SELECT count(*) FROM t"), 300, "the data file as it was");
    assert_eq!(integrity(&primary), "ok");
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
    recovery::close(db.logger(), primary.options).unwrap();
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

#[test]
fn missing_old_or_unreadable_logs_are_rebuilt_from_data() {
    for damage in ["missing", "old version", "bad magic"] {
        let tmp = tempfile::tempdir().unwrap();
        let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
        primary.exec("CREATE TABLE t (x); INSERT INTO t SELECT randomblob(100) FROM generate_series(1, 500);");
        primary.close();
        let wallog = tmp.path().join("wallog");
        match damage {
            "missing" => std::fs::remove_file(&wallog).unwrap(),
            "old version" => {
                let mut bytes = std::fs::read(&wallog).unwrap();
                bytes[48..52].copy_from_slice(&1u32.to_le_bytes());
                std::fs::write(&wallog, bytes).unwrap();
            }
            _ => {
                let mut bytes = std::fs::read(&wallog).unwrap();
                bytes[0] = b'X';
                std::fs::write(&wallog, bytes).unwrap();
            }
        }
        let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
        assert!(primary.rebuild.is_some(), "{damage}: rebuilt");
        assert_eq!(primary.count("SELECT count(*) FROM t"), 500, "{damage}");
        primary.assert_replay_equals_data();
        primary.close();
    }
}

/// Every failpoint inside compaction: the write that triggered the compaction is kept, the
/// process "crashes" right there, and the next open recovers, whether it rebuilds (sentinel)
/// or trusts the log (LIBSQL_IGNORE_DIRTY_LOG, which exercises the finishing of half-done
/// compactions).
#[test]
fn crashes_inside_compaction_recover_on_next_open() {
    let points = [
        "compaction.before_retire",
        "compaction.after_new_log",
        "compaction.after_retire",
        "compaction.before_snapshot_rename",
        "compaction.before_retired_removed",
    ];
    for point in points {
        for ignore_dirty in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let options = RecoveryOptions { ignore_dirty, ..Default::default() };
            let primary = Primary::open(tmp.path(), compact_every(30), options);
            primary.exec("CREATE TABLE t (k, v)");
            let armed = failpoint::arm(point, tmp.path());
            let mut acknowledged = 0;
            for i in 0..40 {
                if primary.try_exec(&format!("INSERT INTO t VALUES ({i}, randomblob(3000))")).is_ok() {
                    acknowledged += 1;
                }
            }
            primary.db().wait_for_compaction();
            if point == "compaction.after_retire" {
                // A failure after the old log moved away leaves no log to append to: the log
                // refuses further writes (SQLITE_IOERR) rather than lose them.
                assert!(primary.try_exec("INSERT INTO t VALUES (-1, 'refused')").is_err(), "{point}: writes are refused");
            } else {
                assert_eq!(acknowledged, 40, "{point}: a failed compaction does not stop writes");
            }
            drop(armed);
            primary.crash();

            let primary = Primary::open(tmp.path(), compact_every(30), options);
            assert_eq!(primary.count("SELECT count(*) FROM t"), acknowledged, "{point}, ignore_dirty={ignore_dirty}");
            // Trusting the log after a crash between the renames of a retire finds a new log
            // without its opening image: that one is rebuilt all the same.
            let rebuilds = !ignore_dirty || point == "compaction.after_retire";
            assert_eq!(primary.rebuild.is_some(), rebuilds, "{point}, ignore_dirty={ignore_dirty}");
            primary.assert_replay_equals_data();
            // The log goes on working after recovery.
            primary.exec("INSERT INTO t VALUES (40, 'after')");
            primary.assert_replay_equals_data();
            primary.close();
        }
    }
}

#[test]
fn crashes_inside_dirty_recovery_recover_on_next_open() {
    for point in ["recovery.after_checkpoint", "image.mid_frames", "recovery.before_swap", "recovery.after_swap"] {
        let tmp = tempfile::tempdir().unwrap();
        let primary = Primary::open(tmp.path(), compact_every(50), RecoveryOptions::default());
        primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 1500);");
        primary.crash();

        {
            let _armed = failpoint::arm(point, tmp.path());
            let data = tmp.path().join("data");
            let failed = recovery::open(tmp.path(), &data, compact_every(50), RecoveryOptions::default());
            assert!(failed.is_err(), "{point} was not reached");
        }
        let primary = Primary::open(tmp.path(), compact_every(50), RecoveryOptions::default());
        assert!(primary.rebuild.is_some(), "{point}: the sentinel is still there, so the next open rebuilds");
        assert_eq!(primary.count("SELECT count(*) FROM t"), 1500, "{point}");
        assert_eq!(primary.count("SELECT sum(length(v)) FROM t"), 1500 * 2000, "{point}");
        primary.assert_replay_equals_data();
        primary.close();
    }
}

#[test]
fn verifier_names_the_file_and_first_bad_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(20000));");
    primary.exec("INSERT INTO t VALUES (2)");
    primary.close();
    let wallog = tmp.path().join("wallog");
    let mut bytes = std::fs::read(&wallog).unwrap();
    // Flip one byte in the page of frame 3.
    bytes[64 + 3 * 4120 + 24 + 100] ^= 0xff;
    std::fs::write(&wallog, &bytes).unwrap();
    let err = libsql_server::replication::verify::walk_wallog(&wallog, |_, _| {}).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("wallog") && text.contains("frame_no 3") && text.contains("checksum"), "{text}");

    // A frame number out of sequence is named too.
    bytes[64 + 3 * 4120 + 24 + 100] ^= 0xff;
    bytes[64 + 2 * 4120..64 + 2 * 4120 + 8].copy_from_slice(&9u64.to_le_bytes());
    std::fs::write(&wallog, &bytes).unwrap();
    let err = libsql_server::replication::verify::walk_wallog(&wallog, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("frame_no 2"), "{err}");
}

#[test]
fn max_log_duration_retires_the_log_after_a_commit() {
    let tmp = tempfile::tempdir().unwrap();
    // A zero duration has always elapsed: every commit asks for a retirement.
    let settings = LogSettings { max_log_frames: None, max_log_duration: Some(Duration::ZERO) };
    let primary = Primary::open(tmp.path(), settings, RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x)");
    primary.db().wait_for_compaction();
    primary.exec("INSERT INTO t VALUES (1)");
    primary.db().wait_for_compaction();
    let stats = primary.logger().stats();
    assert_eq!(stats.snapshot_count, 2, "{stats:?}");
    assert_eq!(stats.pending_compactions, 0);
    assert!(stats.generation >= 3, "each retirement opens a generation: {stats:?}");
    primary.assert_replay_equals_data();
    primary.close();
}

/// Reads the first transaction of the wallog in `dir`: (its pages, its commit size).
fn first_transaction(dir: &Path) -> (Vec<u32>, u32) {
    let bytes = std::fs::read(dir.join("wallog")).unwrap();
    let frames = le_u64(&bytes, 40) as usize;
    let mut pages = Vec::new();
    for i in 0..frames {
        let frame = &bytes[64 + i * 4120..];
        pages.push(le_u32(frame, 16));
        if le_u32(frame, 20) != 0 {
            return (pages, le_u32(frame, 20));
        }
    }
    panic!("no committed transaction in the log");
}

#[test]
fn every_log_opens_with_a_full_image_and_starts_a_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), compact_every(40), RecoveryOptions::default());
    let first_generation = primary.logger().generation();
    assert_eq!(first_generation, 1);
    primary.exec("CREATE TABLE t (k, v)");
    for i in 0..30 {
        primary.exec(&format!("INSERT INTO t VALUES ({i}, randomblob(3000))"));
    }
    primary.db().wait_for_compaction();
    let after_compaction = primary.logger().generation();
    assert!(after_compaction > first_generation, "compaction opens a new generation");
    let stats = primary.logger().stats();
    assert!(stats.start_frame_no > 0 && stats.snapshot_count >= 1, "{stats:?}");
    let (pages, size) = first_transaction(tmp.path());
    assert_eq!(pages.len() as u32, size, "the new log opens with every page once");
    assert_eq!(pages, (1..=size).collect::<Vec<_>>());
    primary.assert_replay_equals_data();

    // The generation survives a clean restart, and grows with a rebuild.
    primary.close();
    let primary = Primary::open(tmp.path(), compact_every(40), RecoveryOptions::default());
    assert_eq!(primary.logger().generation(), after_compaction);
    primary.crash();
    let primary = Primary::open(tmp.path(), compact_every(40), RecoveryOptions::default());
    assert_eq!(primary.logger().generation(), after_compaction + 1);
    let (pages, size) = first_transaction(tmp.path());
    assert_eq!(pages, (1..=size).collect::<Vec<_>>());
    primary.close();
}

#[test]
fn a_log_without_an_opening_image_is_rebuilt_once() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x); INSERT INTO t SELECT randomblob(500) FROM generate_series(1, 300);");
    primary.close();
    // A directory from another server: the log is fine but no generation record names it
    // (and, say, its first transaction were not a full image: simulate by dropping the
    // record and the log's first transaction is still a full image, so it is kept).
    std::fs::remove_file(tmp.path().join("generation")).unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert!(primary.rebuild.is_none(), "a log that opens with an image is kept");
    let id = primary.logger().log_id();
    primary.close();

    // Now a log whose first transaction is not a full image: keep only the header and the
    // last transaction's frames (a log continued after compaction on another server).
    std::fs::remove_file(tmp.path().join("generation")).unwrap();
    let wallog = tmp.path().join("wallog");
    let mut bytes = std::fs::read(&wallog).unwrap();
    let frames = le_u64(&bytes, 40) as usize;
    let last = &bytes[64 + (frames - 1) * 4120..64 + frames * 4120].to_vec();
    bytes.truncate(64);
    bytes.extend_from_slice(last);
    bytes[40..48].copy_from_slice(&1u64.to_le_bytes());
    let frame_no = le_u64(last, 0);
    bytes[32..40].copy_from_slice(&frame_no.to_le_bytes());
    std::fs::write(&wallog, &bytes).unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions { ignore_dirty: true, ..Default::default() });
    let rebuild = primary.rebuild.as_ref().expect("rebuilt to open with an image");
    assert!(rebuild.reason.contains("full image"), "{}", rebuild.reason);
    assert_ne!(primary.logger().log_id(), id);
    assert_eq!(primary.count("SELECT count(*) FROM t"), 300);
    primary.assert_replay_equals_data();
    primary.close();
}
