//! The `libsql` Rust crate (remote) against a real `sqld` process.

use libsql::{params, Value};

use crate::common::process::{rows, Sqld};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_ddl_parameters_values_batches_and_transactions() {
    let sqld = Sqld::start(&[]);
    let conn = sqld.connect().await;

    conn.execute("CREATE TABLE v (id INTEGER PRIMARY KEY, i INTEGER, f REAL, t TEXT, b BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO v (i, f, t, b) VALUES (?1, ?2, ?3, ?4)", params![i64::MAX, 0.25, "tëxt", vec![0u8, 1, 255]])
        .await
        .unwrap();
    conn.execute(
        "INSERT INTO v (i, f, t, b) VALUES (:i, :f, :t, :b)",
        libsql::named_params! { ":i": i64::MIN, ":f": -1e300, ":t": "", ":b": Value::Null },
    )
    .await
    .unwrap();
    assert_eq!(
        rows(&conn, "SELECT i, f, t, b FROM v ORDER BY id").await,
        vec![
            vec![Value::Integer(i64::MAX), Value::Real(0.25), Value::Text("tëxt".into()), Value::Blob(vec![0, 1, 255])],
            vec![Value::Integer(i64::MIN), Value::Real(-1e300), Value::Text(String::new()), Value::Null],
        ]
    );

    conn.execute_batch("CREATE TABLE b (x); INSERT INTO b VALUES (1); INSERT INTO b VALUES (2);").await.unwrap();
    assert_eq!(rows(&conn, "SELECT sum(x) FROM b").await, vec![vec![Value::Integer(3)]]);

    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO b VALUES (10)", ()).await.unwrap();
    tx.execute("INSERT INTO b VALUES (20)", ()).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(rows(&conn, "SELECT sum(x) FROM b").await, vec![vec![Value::Integer(33)]]);

    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO b VALUES (100)", ()).await.unwrap();
    assert_eq!(rows(&tx, "SELECT sum(x) FROM b").await, vec![vec![Value::Integer(133)]], "the transaction sees its own write");
    tx.rollback().await.unwrap();
    assert_eq!(rows(&conn, "SELECT sum(x) FROM b").await, vec![vec![Value::Integer(33)]]);

    // An SQL error is an error for the client, and the connection goes on working.
    let err = conn.execute("INSERT INTO missing VALUES (1)", ()).await.unwrap_err();
    assert!(err.to_string().contains("no such table"), "{err}");
    assert_eq!(rows(&conn, "SELECT count(*) FROM v").await, vec![vec![Value::Integer(2)]]);

    // The sqlean extensions are compiled in, as on the libSQL server.
    let uuid = rows(&conn, "SELECT length(uuid4())").await;
    assert_eq!(uuid, vec![vec![Value::Integer(36)]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_queue_for_the_write_lock_instead_of_failing() {
    let sqld = Sqld::start(&[]);
    let first = sqld.connect().await;
    first.execute("CREATE TABLE t (x)", ()).await.unwrap();
    let tx = first.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1)", ()).await.unwrap();

    // A second writer arrives while the first transaction holds the write lock.
    let second = sqld.connect().await;
    let waiter = tokio::spawn(async move { second.execute("INSERT INTO t VALUES (2)", ()).await });
    // A reader is not held up by the open write transaction and sees only committed data.
    let reader = sqld.connect().await;
    assert_eq!(rows(&reader, "SELECT count(*) FROM t").await, vec![vec![Value::Integer(0)]]);

    tx.commit().await.unwrap();
    waiter.await.unwrap().expect("the queued writer succeeds once the lock is free");
    assert_eq!(rows(&reader, "SELECT count(*) FROM t").await, vec![vec![Value::Integer(2)]]);
}
