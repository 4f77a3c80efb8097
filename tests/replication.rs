//! The primary replication log, in-process: the on-disk format, replay against live data,
//! compaction, the sentinel, and simulated crashes inside compaction and dirty recovery.

use std::path::Path;
use std::time::Duration;

use crc::{Crc, CRC_64_GO_ISO};
use libsql_server::replication::{failpoint, recovery, LogSettings, RecoveryOptions};

use crate::common::primary::{compact_every, le_u32, le_u64, no_compaction, Primary};


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
    assert!(stats.generation >= 3, "compactions happened: {stats:?}");
    assert_eq!(stats.snapshot_count, 1, "each snapshot merges the ones before it: {stats:?}");
    assert!(stats.start_frame_no > 0);
    primary.close();
    // Space: the data file, one snapshot and the log, each at most the database's size, and
    // the log's changes, at most the database's size or the limit.
    let data = std::fs::metadata(tmp.path().join("data")).unwrap().len();
    let total: u64 = ["data", "wallog", "snapshots", "to_compact", "data-wal"]
        .iter()
        .flat_map(|name| {
            let path = tmp.path().join(name);
            let files = if path.is_dir() { std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()).collect() } else { vec![path] };
            files.into_iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        })
        .sum();
    assert!(total <= 4 * data + 64 * 4120 + (1 << 20), "{total} bytes beside a {data}-byte data file");
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
        "compaction.prune",
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
    // A zero duration has always elapsed: a commit asks for a retirement once the log holds
    // as many changed pages as the database has (2 here).
    let settings = LogSettings { max_log_frames: None, max_log_duration: Some(Duration::ZERO) };
    let primary = Primary::open(tmp.path(), settings, RecoveryOptions::default());
    primary.exec("CREATE TABLE t (x)");
    primary.db().wait_for_compaction();
    assert_eq!(primary.logger().stats().generation, 2);
    primary.exec("INSERT INTO t VALUES (1)");
    primary.db().wait_for_compaction();
    assert_eq!(primary.logger().stats().generation, 2, "one changed page of two: not yet");
    primary.exec("INSERT INTO t VALUES (2)");
    primary.db().wait_for_compaction();
    let stats = primary.logger().stats();
    assert_eq!(stats.snapshot_count, 1, "the second snapshot merged the first: {stats:?}");
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

/// A reset that fails at any step changes nothing the next open cannot use: after a crash
/// there, every row is kept, the log replays to the data, and writes go on. A reset that
/// fails without a crash leaves the namespace working on its old log or its new one.
#[test]
fn crashes_inside_reset_replication_recover_on_next_open() {
    for point in ["image.mid_frames", "reset.before_swap", "reset.after_swap"] {
        for ignore_dirty in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let options = RecoveryOptions { ignore_dirty, ..Default::default() };
            let primary = Primary::open(tmp.path(), no_compaction(), options);
            primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 1500);");
            {
                let _armed = failpoint::arm(point, tmp.path());
                assert!(primary.db().reset_replication().is_err(), "{point}: the failpoint stops the reset");
            }
            // Without a crash, the namespace goes on (on its old log, or its new one).
            primary.exec("INSERT INTO t VALUES (-1, 'after a failed reset')");
            primary.crash();

            let primary = Primary::open(tmp.path(), no_compaction(), options);
            assert_eq!(primary.count("SELECT count(*) FROM t"), 1501, "{point}, ignore_dirty={ignore_dirty}");
            primary.assert_replay_equals_data();
            primary.exec("INSERT INTO t VALUES (-2, 'after recovery')");
            primary.assert_replay_equals_data();
            primary.db().reset_replication().unwrap();
            primary.assert_replay_equals_data();
            primary.close();
        }
    }
}

/// A reset moves the old log's snapshots and retired logs aside under the write gate and frees
/// them after it (freeing a large file's blocks takes a while; writers do not wait for it),
/// also when it fails after the move. A crash before they are freed leaves them aside, where
/// nothing reads them, and the next open removes them.
#[test]
fn a_reset_frees_the_old_snapshots_after_the_swap_and_the_next_open_frees_what_a_crash_left() {
    let aside = |dir: &Path| {
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(".dropped-")).count()
    };
    // A directory holding a file of 1 MB.
    let filled = |dir: &Path| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("old"), vec![7u8; 1 << 20]).unwrap();
    };
    let stale = |dir: &Path| ["snapshots", "to_compact"].into_iter().for_each(|name| filled(&dir.join(name)));
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 500);");
    stale(tmp.path());
    primary.db().reset_replication().unwrap();
    assert_eq!(aside(tmp.path()), 0, "a reset frees what it moved aside before it answers");
    assert!(!tmp.path().join("snapshots").exists() && !tmp.path().join("to_compact").exists());

    stale(tmp.path());
    {
        let _armed = failpoint::arm("log.dropped_aside", tmp.path());
        assert!(primary.db().reset_replication().is_err(), "the failpoint stops the reset once the old snapshots are aside");
    }
    assert_eq!(aside(tmp.path()), 0, "a reset that failed after moving them aside frees them too");
    assert!(!tmp.path().join("snapshots").exists() && !tmp.path().join("to_compact").exists());
    primary.exec("INSERT INTO t VALUES (-1, 'after')");
    // What a crash between the move and the free leaves.
    filled(&tmp.path().join(".dropped-snapshots-crashed"));
    primary.crash();

    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    assert_eq!(aside(tmp.path()), 0, "the next open frees what a crash left aside");
    assert_eq!(primary.count("SELECT count(*) FROM t"), 501);
    primary.assert_replay_equals_data();
    primary.close();
}

/// A reset holds writers only while it pins the data file and while it swaps the new log in:
/// a write made while the new log's image is built is not held (it would wait for the write
/// lock on this very thread, and fail), and it is in the new log.
#[test]
fn writes_go_on_while_a_reset_builds_the_new_log_and_land_in_it() {
    let tmp = tempfile::tempdir().unwrap();
    let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
    primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 500);");
    let old = primary.logger().log_id();
    let reset = primary.db().reset_replication_with(|| {
        primary.exec("INSERT INTO t VALUES (-1, 'written while the image was built')");
        primary.exec("UPDATE t SET v = x'00' WHERE k % 10 = 0");
    });
    let reset = reset.unwrap();
    assert_ne!(reset.log_id, old);
    assert_eq!(primary.logger().log_id(), reset.log_id);
    assert_eq!(primary.count("SELECT count(*) FROM t"), 501);
    // The new log holds the image and the two transactions after it: it replays to the data.
    primary.assert_replay_equals_data();
    primary.exec("INSERT INTO t VALUES (-2, 'after')");
    primary.assert_replay_equals_data();
    primary.close();
}

/// `rebuild-data` stopped at any step changes nothing the next open cannot use: online it is
/// one WAL transaction (all of it or none), unloaded one rename; each is reopened and checked.
#[test]
fn crashes_inside_rebuild_data_recover_on_next_open() {
    for point in ["rebuild.mid_insert", "rebuild.before_rename", "rebuild.after_rename"] {
        let tmp = tempfile::tempdir().unwrap();
        let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
        primary.exec("CREATE TABLE t (k, v); INSERT INTO t SELECT value, randomblob(2000) FROM generate_series(1, 800);");
        let primary = if point == "rebuild.mid_insert" {
            let _armed = failpoint::arm(point, tmp.path());
            assert!(primary.db().rebuild_data().is_err(), "{point}: the failpoint stops the rebuild");
            drop(_armed);
            assert_eq!(primary.count("SELECT count(*) FROM t"), 800, "{point}: nothing changed");
            primary.exec("INSERT INTO t VALUES (-1, 'after a failed rebuild')");
            primary.crash();
            Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default())
        } else {
            primary.close();
            {
                let _armed = failpoint::arm(point, tmp.path());
                assert!(libsql_server::namespace::repair::rebuild_unloaded(tmp.path()).is_err(), "{point}");
            }
            let primary = Primary::open(tmp.path(), no_compaction(), RecoveryOptions::default());
            primary.exec("INSERT INTO t VALUES (-1, 'after a failed rebuild')");
            primary
        };
        assert_eq!(primary.count("SELECT count(*) FROM t"), 801, "{point}");
        assert_eq!(primary.integrity(), "ok", "{point}");
        primary.assert_replay_equals_data();
        // And the rebuild then works.
        primary.db().rebuild_data().unwrap();
        assert_eq!(primary.count("SELECT count(*) FROM t"), 801, "{point}");
        primary.assert_replay_equals_data();
        primary.close();
    }
}
