//! `sqld` as a real process: signals and restarts.

use crate::common::process::Sqld;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_closes_and_exits_zero_and_data_survives_restart() {
    let mut sqld = Sqld::start(&[]);
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (x)", ()).await.unwrap();
    conn.execute("INSERT INTO t SELECT value FROM generate_series(1, 500)", ()).await.unwrap();
    drop(conn);

    let status = tokio::task::block_in_place(|| sqld.signal("TERM"));
    assert!(status.success(), "sqld exited with {status}");
    let wal = sqld.db_path().join("dbs/default/data-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_len, 0, "a clean shutdown checkpoints the WAL into the data file");

    tokio::task::block_in_place(|| sqld.spawn(&[]));
    let conn = sqld.connect().await;
    let mut rows = conn.query("SELECT count(*), sum(x) FROM t", ()).await.unwrap();
    let row = rows.next().await.unwrap().unwrap();
    assert_eq!(row.get::<i64>(0).unwrap(), 500);
    assert_eq!(row.get::<i64>(1).unwrap(), 500 * 501 / 2);

    let status = tokio::task::block_in_place(|| sqld.signal("INT"));
    assert!(status.success(), "SIGINT: sqld exited with {status}");
}
