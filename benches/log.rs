//! The replication log's cost and its rebuild time, each beside a baseline in the same run.
//!
//! `cargo bench --bench log` prints a table and writes `bench-results/log.json`:
//! * write throughput with the log on (the server's `Database`, each statement admitted as a
//!   request's is: write gate, time limits) beside a bare `libsql-sys`
//!   connection with the same durability: every acknowledged commit survives a power cut.
//!   The bare connection gets that from SQLite (WAL, `synchronous=FULL`); the server from the
//!   log, fsynced before SQLite commits with `synchronous=OFF`, the data file rewritten from
//!   it after a crash;
//! * dirty-recovery time (a dirty open: roll the data file forward from the log, then rebuild
//!   the log) beside a plain copy of the data file, fsynced (the physical floor), for 20k
//!   rows, 200k rows and a ~1 GiB database.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use libsql_server::database::{Connection, ConnectionParts, Database, Limits};
use libsql_server::namespace::DatabaseConfig;
use libsql_server::replication::{recovery, LogSettings, RecoveryOptions};
use libsql_sys::rusqlite::{params, Connection as Sqlite, OpenFlags};
use libsql_sys::wal::{Sqlite3Wal, Sqlite3WalManager};
use serde_json::{json, Value};

const TXNS: usize = 40;
const TXN_ROWS: usize = 1_000;
const SINGLE_INSERTS: usize = 2_000;

fn main() {
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let mut table: Vec<Value> = Vec::new();
    println!("\n{:<46} {:>16} {:>16} {:>8}", "write throughput (2 cores)", "with log", "bare", "ratio");
    for (name, unit, logged, bare) in write_throughput(dir.path()) {
        println!("{name:<46} {logged:>12.0} {unit:<3} {bare:>12.0} {unit:<3} {:>7.1}%", 100.0 * logged / bare);
        table.push(json!({"workload": name, "unit": unit, "with_log": logged, "bare": bare, "ratio": logged / bare}));
    }

    println!("\n{:<46} {:>16} {:>16} {:>8}", "dirty open (roll-forward + log rebuild)", "dirty open", "copy+fsync", "ratio");
    for (label, rows, row_bytes) in [("20k rows", 20_000, 200), ("200k rows", 200_000, 200), ("~1 GiB database", 250_000, 4_000)] {
        let (bytes, rebuild, copy) = recovery_time(dir.path(), rows, row_bytes);
        let name = format!("{label} ({:.1} MiB)", bytes as f64 / (1 << 20) as f64);
        println!("{name:<46} {:>13.1} ms {:>13.1} ms {:>7.2}x", ms(rebuild), ms(copy), rebuild.as_secs_f64() / copy.as_secs_f64());
        table.push(json!({"workload": format!("dirty recovery, {label}"), "bytes": bytes, "rebuild_ms": ms(rebuild), "copy_ms": ms(copy)}));
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/log.json");
    std::fs::write(path, serde_json::to_string_pretty(&table).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn open_logged(dir: &Path) -> Database {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("data");
    let (logger, _) = recovery::open(dir, &data, LogSettings::from_flags(200, None), RecoveryOptions::default()).unwrap();
    Database::open(&data, DatabaseConfig::default(), Limits::unlimited(), logger).unwrap()
}

fn open_bare(path: &Path) -> libsql_sys::Connection<Sqlite3Wal> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = libsql_sys::Connection::open(path, flags, Sqlite3WalManager::new(), 1000, None).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn
}

/// Rounds of each workload, alternating between the logged and the bare database so both
/// see the same machine noise; the median round is reported.
const ROUNDS: usize = 7;

/// The database a round writes to: the server's (each statement admitted as a request's is:
/// the write gate, whose holder alone may commit, and the time limits) or the bare one.
enum Side<'a> {
    Logged(&'a mut Connection),
    Bare(&'a Sqlite),
}

impl Side<'_> {
    /// Runs `sql` (a cached statement), with `key` bound to its one parameter when given.
    fn run(&mut self, sql: &str, key: Option<i64>) {
        match self {
            Side::Logged(conn) => {
                let ConnectionParts { sqlite, access, .. } = conn.parts();
                let mut stmt = sqlite.prepare_cached(sql).unwrap();
                let kind = access.kind_of(&stmt, sql);
                access.admit(sqlite, kind).unwrap();
                if let Some(key) = key {
                    stmt.raw_bind_parameter(1, key).unwrap();
                }
                let stepped = stmt.raw_execute().map(drop);
                access.finish(sqlite, stepped).unwrap();
            }
            Side::Bare(conn) => {
                let mut stmt = conn.prepare_cached(sql).unwrap();
                match key {
                    Some(key) => stmt.execute(params![key]),
                    None => stmt.execute([]),
                }
                .unwrap();
            }
        }
    }
}

const INSERT: &str = "INSERT INTO t VALUES (?, randomblob(100))";

/// 1000-row transactions, rows keyed from `base`: rows per second.
fn batch_round(side: &mut Side<'_>, base: usize) -> f64 {
    let started = Instant::now();
    for t in 0..TXNS {
        side.run("BEGIN", None);
        for i in 0..TXN_ROWS {
            side.run(INSERT, Some((base + t * TXN_ROWS + i) as i64));
        }
        side.run("COMMIT", None);
    }
    (TXNS * TXN_ROWS) as f64 / started.elapsed().as_secs_f64()
}

/// Single-row autocommit inserts: transactions per second.
fn single_round(side: &mut Side<'_>, base: usize) -> f64 {
    let started = Instant::now();
    for i in 0..SINGLE_INSERTS {
        side.run(INSERT, Some((base + i) as i64));
    }
    SINGLE_INSERTS as f64 / started.elapsed().as_secs_f64()
}

/// Empties both connections' page caches before a round. libsql-ffi builds SQLite with
/// `SQLITE_ENABLE_MEMORY_MANAGEMENT`, so every connection in the process draws from one page
/// pool: a connection that fills its cache takes the other's pages and keeps them, and the
/// other then frees each page it unpins, re-reading the b-tree on every insert. Measured
/// here, that made whichever database ran first 2.4× slower at executing its inserts (~30k
/// page reads per round instead of 0), whether or not it had the log. Emptying both caches
/// before each round gives both the same start.
fn empty_caches(conns: &[&Sqlite]) {
    for conn in conns {
        conn.execute_batch("PRAGMA shrink_memory").unwrap();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn write_throughput(root: &Path) -> Vec<(&'static str, &'static str, f64, f64)> {
    let logged_db = open_logged(&root.join("logged"));
    let mut logged = logged_db.connection().unwrap();
    let bare = open_bare(&root.join("bare.db"));
    let create = "CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)";
    logged.execute_script(create).unwrap();
    bare.execute_batch(create).unwrap();
    let (mut lb, mut bb, mut ls, mut bs) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let base = round * (TXNS * TXN_ROWS + SINGLE_INSERTS);
        empty_caches(&[logged.sqlite(), &bare]);
        lb.push(batch_round(&mut Side::Logged(&mut logged), base));
        empty_caches(&[logged.sqlite(), &bare]);
        bb.push(batch_round(&mut Side::Bare(&bare), base));
        empty_caches(&[logged.sqlite(), &bare]);
        ls.push(single_round(&mut Side::Logged(&mut logged), base + TXNS * TXN_ROWS));
        empty_caches(&[logged.sqlite(), &bare]);
        bs.push(single_round(&mut Side::Bare(&bare), base + TXNS * TXN_ROWS));
    }
    vec![
        ("1000-row transactions (median of 7 rounds)", "row/s", median(lb), median(bb)),
        ("single-row autocommit inserts (median of 7)", "tx/s", median(ls), median(bs)),
    ]
}

/// Builds a database of `rows` rows, then times a log rebuild and a copy of its data file.
fn recovery_time(root: &Path, rows: usize, row_bytes: usize) -> (u64, Duration, Duration) {
    let dir = root.join(format!("recovery-{rows}-{row_bytes}"));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    {
        let conn = open_bare(&data);
        conn.pragma_update(None, "synchronous", "OFF").unwrap();
        conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)").unwrap();
        conn.execute_batch("BEGIN").unwrap();
        let mut insert = conn.prepare("INSERT INTO t VALUES (?, randomblob(?))").unwrap();
        for i in 0..rows {
            insert.execute(params![i as i64, row_bytes as i64]).unwrap();
        }
        drop(insert);
        conn.execute_batch("COMMIT; PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    }
    let bytes = std::fs::metadata(&data).unwrap().len();

    // A first open gives the data file a log (and this server's generation record); it leaves
    // the sentinel behind, so the timed open is a dirty one: the roll-forward walks and checks
    // the whole log against the data file, then the log is rebuilt.
    let settings = LogSettings::from_flags(0, None);
    let (logger, _) = recovery::open(&dir, &data, settings, RecoveryOptions::default()).unwrap();
    drop(logger);
    let started = Instant::now();
    let (logger, rebuilt) = recovery::open(&dir, &data, settings, RecoveryOptions::default()).unwrap();
    let rebuild = started.elapsed();
    assert!(rebuilt.is_some(), "the open was a dirty one");
    drop(logger);

    let copy_path = dir.join("copy");
    let started = Instant::now();
    std::fs::copy(&data, &copy_path).unwrap();
    File::open(&copy_path).unwrap().sync_all().unwrap();
    let copy = started.elapsed();
    std::fs::remove_dir_all(&dir).unwrap();
    (bytes, rebuild, copy)
}
