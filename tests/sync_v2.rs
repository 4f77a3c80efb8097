//! Sync protocol v2 with the `libsql` crate's own embedded replicas against a real `sqld`:
//! bootstrap, follow commits and a spilled transaction, follow log rebuilds from the same
//! local files, catch up several generations, and the protocol's bad input.

use std::path::Path;

use libsql::{Database, Value};

use crate::common::process::{rows, Sqld};

async fn synced(sqld: &Sqld, path: &Path) -> Database {
    libsql::Builder::new_synced_database(path, sqld.url(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
}

/// The `libsql` crate's remote replica of `sqld` at `path`, speaking `protocol`.
pub async fn remote_replica(sqld: &Sqld, path: &Path, protocol: libsql::SyncProtocol) -> Database {
    libsql::Builder::new_remote_replica(path, sqld.url(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .sync_protocol(protocol)
        .build()
        .await
        .unwrap()
}

pub const ALL: &str = "SELECT id, v FROM t ORDER BY id";

/// Every row of `t`, fetched a page at a time (a whole table can be larger than one answer
/// may be, `--max-response-size`).
pub async fn all_rows(conn: &libsql::Connection) -> Vec<Vec<Value>> {
    let mut out: Vec<Vec<Value>> = Vec::new();
    loop {
        let after = match out.last() {
            Some(row) => row[0].clone(),
            None => Value::Integer(i64::MIN),
        };
        let mut page = conn.query("SELECT id, v FROM t WHERE id > ?1 ORDER BY id LIMIT 2000", [after]).await.unwrap();
        let mut n = 0;
        while let Some(row) = page.next().await.unwrap() {
            out.push(vec![row.get_value(0).unwrap(), row.get_value(1).unwrap()]);
            n += 1;
        }
        if n == 0 {
            return out;
        }
    }
}

/// Syncs `replica` and checks it holds exactly the primary's rows, every one compared.
pub async fn assert_in_sync(primary: &libsql::Connection, replica: &Database) {
    replica.sync().await.unwrap();
    let expected = all_rows(primary).await;
    let got = all_rows(&replica.connect().unwrap()).await;
    assert_eq!(got.len(), expected.len(), "row counts differ");
    assert!(got == expected, "replica rows differ from the primary's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_replicas_bootstrap_follow_and_survive_log_rebuilds() {
    let mut sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)", ()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let synced_db = synced(&sqld, &dir.path().join("synced.db")).await;
    let replica_db = remote_replica(&sqld, &dir.path().join("replica.db"), libsql::SyncProtocol::V2).await;
    assert_in_sync(&primary, &synced_db).await;
    assert_in_sync(&primary, &replica_db).await;

    // Single-row commits.
    for i in 0..3 {
        primary.execute("INSERT INTO t VALUES (?1, randomblob(50))", [100_000 + i]).await.unwrap();
        assert_in_sync(&primary, &synced_db).await;
    }
    // A transaction larger than SQLite's page cache: it spills to the WAL before its commit,
    // and replicas pull it across several batches.
    let tx = primary.transaction().await.unwrap();
    tx.execute("UPDATE t SET v = randomblob(300) WHERE id % 2 = 0", ()).await.unwrap();
    tx.execute("INSERT INTO t SELECT 200000 + value, randomblob(1000) FROM generate_series(1, 6000)", ()).await.unwrap();
    tx.commit().await.unwrap();
    assert_in_sync(&primary, &synced_db).await;
    assert_in_sync(&primary, &replica_db).await;

    // kill -9: the next open rebuilds the log, a new generation. Replicas follow from the same
    // local files, without a new export.
    let generation_before = generation(&sqld).await;
    tokio::task::block_in_place(|| {
        sqld.signal("KILL");
        sqld.spawn(&[]);
    });
    assert!(generation(&sqld).await > generation_before);
    let primary = sqld.connect().await;
    primary.execute("DELETE FROM t WHERE id % 3 = 0", ()).await.unwrap();
    assert_in_sync(&primary, &synced_db).await;
    assert_in_sync(&primary, &replica_db).await;
    drop(synced_db);
    drop(replica_db);

    // A client that stood three generations behind catches up, from its own files.
    let reopened = synced(&sqld, &dir.path().join("synced.db")).await;
    for round in 0..3 {
        tokio::task::block_in_place(|| {
            sqld.signal("KILL");
            sqld.spawn(&[]);
        });
        sqld.connect().await.execute("INSERT INTO t VALUES (?1, 'gen')", [300_000 + round]).await.unwrap();
    }
    let primary = sqld.connect().await;
    assert_in_sync(&primary, &reopened).await;
}

async fn generation(sqld: &Sqld) -> u64 {
    let (status, body) = http_get(sqld, "/info").await;
    assert_eq!(status, 200);
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["current_generation"].as_u64().unwrap()
}

async fn http_get(sqld: &Sqld, path: &str) -> (u16, Vec<u8>) {
    let client = hyper::Client::new();
    let response = client.get(format!("{}{path}", sqld.url()).parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    (status, hyper::body::to_bytes(response.into_body()).await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_writes_of_a_replica_land_on_the_primary_and_come_back() {
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = libsql::Builder::new_synced_database(dir.path().join("r.db"), sqld.url(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .remote_writes(true)
        .build()
        .await
        .unwrap();
    replica.sync().await.unwrap();
    let conn = replica.connect().unwrap();
    conn.execute("INSERT INTO t VALUES (1, 'from the replica')", ()).await.unwrap();
    assert_eq!(rows(&primary, ALL).await, vec![vec![Value::Integer(1), Value::Text("from the replica".into())]]);
    assert_in_sync(&primary, &replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_protocol_bad_input_is_4xx_and_the_server_goes_on() {
    let sqld = Sqld::start(&[]);
    sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    let current = generation(&sqld).await;
    for path in [
        "/sync/0/1/2".to_owned(),
        "/sync/x/1/2".into(),
        "/sync/1/1/99999999999".into(),
        "/sync/1/5/5".into(),
        "/sync/1/9/3".into(),
        "/sync/1/1/100000".into(),
        "/export/0".into(),
        "/export/abc".into(),
        format!("/export/{}", current + 1),
    ] {
        let (status, body) = http_get(&sqld, &path).await;
        assert!((400..500).contains(&status), "{path}: {status}");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{path}: not JSON"));
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    // Past the end, or an older generation: the protocol's end-of-generation answer.
    for path in [format!("/sync/{current}/1000/1128"), format!("/sync/{}/1/128", current + 5)] {
        let (status, body) = http_get(&sqld, &path).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).unwrap()["generation"], current, "{path}");
    }
    // The first frames of the generation: whole frames in SQLite's WAL layout.
    let (status, body) = http_get(&sqld, &format!("/sync/{current}/1/128")).await;
    assert_eq!(status, 200);
    assert!(!body.is_empty() && body.len() % 4120 == 0);
    assert_eq!(u32::from_be_bytes(body[0..4].try_into().unwrap()), 1, "a generation opens with page 1");
    let (status, body) = http_get(&sqld, &format!("/export/{current}")).await;
    assert_eq!((status, body.len()), (200, 0), "generations start from the empty database");
    assert_eq!(http_get(&sqld, "/health").await.0, 200);

    let metrics = hyper::Client::new().get(format!("http://{}/metrics", sqld.admin).parse().unwrap()).await.unwrap();
    let metrics = String::from_utf8(hyper::body::to_bytes(metrics.into_body()).await.unwrap().to_vec()).unwrap();
    let value = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let frames = value("sqld_sync_frames_pulled_total");
    assert!(frames >= 1, "frames pulled are counted");
    assert_eq!(value("sqld_sync_bytes_pulled_total"), frames * 4120);
    assert_eq!(value("sqld_sync_exports_total"), 1);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_ahead_of_the_server_changes_nothing_on_the_server() {
    let mut sqld = Sqld::start(&[]);
    sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    sqld.connect().await.execute("INSERT INTO t VALUES (1, 'old')", ()).await.unwrap();
    // Keep a copy of the server's directory while it is at an early generation.
    tokio::task::block_in_place(|| assert!(sqld.signal("TERM").success()));
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&sqld.db_path(), backup.path());
    tokio::task::block_in_place(|| sqld.spawn(&[]));
    let old_generation = generation(&sqld).await;

    for _ in 0..2 {
        tokio::task::block_in_place(|| {
            sqld.signal("KILL");
            sqld.spawn(&[]);
        });
    }
    sqld.connect().await.execute("INSERT INTO t VALUES (2, 'new')", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = synced(&sqld, &dir.path().join("r.db")).await;
    replica.sync().await.unwrap();
    drop(replica);

    // The server goes back to the old directory: the replica's generation is now ahead.
    tokio::task::block_in_place(|| assert!(sqld.signal("TERM").success()));
    std::fs::remove_dir_all(sqld.db_path()).unwrap();
    copy_dir(backup.path(), &sqld.db_path());
    tokio::task::block_in_place(|| sqld.spawn(&[]));
    assert_eq!(generation(&sqld).await, old_generation);
    let before = rows(&sqld.connect().await, ALL).await;

    let replica = synced(&sqld, &dir.path().join("r.db")).await;
    // The client may refuse or stop at once; either way it takes nothing and changes nothing.
    let _ = replica.sync().await;
    assert_eq!(rows(&replica.connect().unwrap(), ALL).await.len(), 2, "the replica kept its rows");
    assert_eq!(rows(&sqld.connect().await, ALL).await, before, "the server is unchanged");
    assert_eq!(generation(&sqld).await, old_generation);
}

async fn http_post(sqld: &Sqld, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let client = hyper::Client::new();
    let request = hyper::Request::post(format!("{}{path}", sqld.url())).body(hyper::Body::from(body)).unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = hyper::body::to_bytes(response.into_body()).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_are_pushed_seen_by_other_replicas_and_conflicts_are_refused() {
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t VALUES (1, 'base')", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let writer = synced(&sqld, &dir.path().join("writer.db")).await;
    let late = synced(&sqld, &dir.path().join("late.db")).await;
    writer.sync().await.unwrap();
    late.sync().await.unwrap();

    // Offline writes on one replica, pushed by its next sync.
    let local = writer.connect().unwrap();
    local.execute("INSERT INTO t VALUES (100, 'offline')", ()).await.unwrap();
    local.execute("UPDATE t SET v = 'changed offline' WHERE id = 1", ()).await.unwrap();
    writer.sync().await.unwrap();
    let expected = vec![
        vec![Value::Integer(1), Value::Text("changed offline".into())],
        vec![Value::Integer(100), Value::Text("offline".into())],
    ];
    assert_eq!(rows(&primary, ALL).await, expected, "the push landed on the primary");

    // A second replica pulls it: it went through the log like any write.
    let reader = synced(&sqld, &dir.path().join("reader.db")).await;
    assert_in_sync(&primary, &reader).await;

    // A replica that wrote from an older state conflicts and changes nothing.
    late.connect().unwrap().execute("INSERT INTO t VALUES (200, 'conflicting')", ()).await.unwrap();
    assert!(late.sync().await.is_err(), "a conflicting push is an error for the client");
    assert_eq!(rows(&primary, ALL).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_corrupting_pushes_are_refused_and_the_primary_is_intact() {
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 100)", ()).await.unwrap();
    let before = rows(&primary, ALL).await;
    let generation = generation(&sqld).await;

    let frame = |page: u32, commit: u32, fill: u8| {
        let mut f = vec![fill; 4120];
        f[..24].fill(0);
        f[0..4].copy_from_slice(&page.to_be_bytes());
        f[4..8].copy_from_slice(&commit.to_be_bytes());
        f
    };
    // Where the server stands: its frames (a small database fits one pull), and a conflict
    // answer to a well-formed push that does not continue from its last frame.
    let (status, all) = http_get(&sqld, &format!("/sync/{generation}/1/4097")).await;
    assert_eq!(status, 200);
    let max = (all.len() / 4120) as u64;
    let db_pages = all.chunks(4120).map(|f| u32::from_be_bytes(f[4..8].try_into().unwrap())).rfind(|s| *s != 0).unwrap();
    let mut stale = all[..4120].to_vec();
    stale[4..8].copy_from_slice(&db_pages.to_be_bytes());
    let (status, answer) = http_post(&sqld, &format!("/sync/{generation}/1/2"), stale).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("conflict")), "{answer}");
    assert_eq!(answer["max_frame_no"].as_u64(), Some(max), "{answer}");
    let next = format!("/sync/{generation}/{}/{}", max + 1, max + 2);
    // The server's own page 1, in a transaction committing `commit` pages, its header naming
    // `header` pages.
    let page_one = |commit: u32, header: u32| {
        let mut f = all.chunks(4120).rfind(|f| u32::from_be_bytes(f[0..4].try_into().unwrap()) == 1).unwrap().to_vec();
        f[4..8].copy_from_slice(&commit.to_be_bytes());
        f[24 + 28..24 + 32].copy_from_slice(&header.to_be_bytes());
        f
    };
    let data_file = sqld.db_path().join("dbs/default/data");
    let size_before = std::fs::metadata(&data_file).unwrap().len() + std::fs::metadata(data_file.with_file_name("data-wal")).map(|m| m.len()).unwrap_or(0);

    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("not whole frames", vec![0u8; 100], 400),
        ("page number 0", frame(0, db_pages, 1), 400),
        ("no commit frame", frame(2, 0, 1), 400),
        ("a page size other than 4096", { let mut f = frame(1, db_pages, 0); f[24 + 16..24 + 18].copy_from_slice(&1024u16.to_be_bytes()); f }, 400),
        ("a page past its transaction's database size", frame(db_pages + 5, db_pages, 0), 400),
        ("a database far larger than any allowed", frame(2, u32::MAX, 0), 413),
        ("garbage over the table's root page", frame(2, db_pages, 0xAB), 422),
        ("one frame growing the database to 12,800 pages", page_one(12_800, db_pages), 400),
        ("a database its frames do not define", page_one(12_800, 12_800), 400),
        ("page 1 naming another size than its commit", page_one(db_pages, 12_800), 400),
    ];
    for (what, body, expected) in cases {
        let (status, answer) = http_post(&sqld, &next, body).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
    let conflicts = hyper::Client::new().get(format!("http://{}/metrics", sqld.admin).parse().unwrap()).await.unwrap();
    let conflicts = String::from_utf8(hyper::body::to_bytes(conflicts.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(conflicts.contains("sqld_sync_pushes_conflicting_total 1\n"), "{conflicts}");
    let (status, _) = http_post(&sqld, &format!("/sync/{generation}/9/3"), frame(2, db_pages, 0)).await;
    assert_eq!(status, 400, "end before start");
    // A namespace whose writes are blocked takes no pushes either.
    let blocked = hyper::Request::post(format!("http://{}/v1/namespaces/default/config", sqld.admin))
        .body(hyper::Body::from(r#"{"block_writes": true}"#))
        .unwrap();
    assert!(hyper::Client::new().request(blocked).await.unwrap().status().is_success());
    let mut valid = all[all.len() - 4120..].to_vec();
    valid[4..8].copy_from_slice(&db_pages.to_be_bytes());
    let (status, answer) = http_post(&sqld, &next, valid).await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(rows(&primary, ALL).await, before, "the primary is intact");
    let size_after = std::fs::metadata(&data_file).unwrap().len() + std::fs::metadata(data_file.with_file_name("data-wal")).map(|m| m.len()).unwrap_or(0);
    assert!(size_after <= size_before + 64 * 4120, "refused pushes grew the files from {size_before} to {size_after} bytes");
    let checkpoint = hyper::Request::post(format!("http://{}/v1/namespaces/default/checkpoint", sqld.admin)).body(hyper::Body::empty()).unwrap();
    assert!(hyper::Client::new().request(checkpoint).await.unwrap().status().is_success(), "checkpoint after refused pushes");
    let integrity = rows(&primary, "PRAGMA integrity_check").await;
    assert_eq!(integrity, vec![vec![Value::Text("ok".into())]]);
}
