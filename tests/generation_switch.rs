//! A generation that changes under a replica pulling a long transaction. A restart (kill -9:
//! the log is rebuilt) costs that replica one failed sync, not every sync. Compactions cost
//! it nothing: the superseded generation is served to its end first. A proxy between replica
//! and server makes the change right after a pull that ended inside a transaction.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response};
use serde_json::json;

use crate::common::process::{rows, Sqld};
use crate::common::{close, execute};

/// What the proxy does, once armed, when a pull's answer ends inside a transaction: before
/// that answer reaches the replica.
pub type Change = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Forwards every request to `upstream`; once armed, the first pull answer that ends inside a
/// transaction is held back until `change` has run.
pub async fn start_proxy(upstream: SocketAddr, armed: Arc<AtomicBool>, change: Change) -> SocketAddr {
    let make = make_service_fn(move |_| {
        let (armed, change) = (armed.clone(), change.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |request: Request<Body>| {
                let (armed, change) = (armed.clone(), change.clone());
                async move {
                    let (mut parts, body) = request.into_parts();
                    let path = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    parts.uri = format!("http://{upstream}{path}").parse().unwrap();
                    let response = hyper::Client::new().request(Request::from_parts(parts, body)).await.unwrap();
                    let status = response.status();
                    let body = hyper::body::to_bytes(response.into_body()).await.unwrap();
                    let mid_transaction = path.starts_with("/sync/")
                        && status == 200
                        && body.len() >= 4120
                        && body[body.len() - 4120 + 4..body.len() - 4120 + 8] == [0, 0, 0, 0];
                    if mid_transaction && armed.swap(false, Ordering::SeqCst) {
                        change().await;
                    }
                    Ok::<_, Infallible>(Response::builder().status(status).body(Body::from(body)).unwrap())
                }
            }))
        }
    });
    let server = hyper::Server::bind(&"127.0.0.1:0".parse().unwrap()).serve(make);
    let addr = server.local_addr();
    tokio::spawn(server);
    addr
}

async fn current_generation(upstream: SocketAddr) -> u64 {
    let response = hyper::Client::new().get(format!("http://{upstream}/info").parse().unwrap()).await.unwrap();
    let body = hyper::body::to_bytes(response.into_body()).await.unwrap();
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["current_generation"].as_u64().unwrap()
}

/// A change that makes `count` compactions of table `t` on a server run with
/// `--max-log-size 1`: rewrites every row until the generation has moved on `count` times.
pub fn compactions(upstream: SocketAddr, count: u64) -> Change {
    Arc::new(move || {
        Box::pin(async move {
            let target = current_generation(upstream).await + count;
            for _ in 0..4 * count {
                let before = current_generation(upstream).await;
                if before >= target {
                    break;
                }
                let body = json!({"requests": [execute("UPDATE t SET v = randomblob(length(v))"), close()]}).to_string();
                let request = Request::post(format!("http://{upstream}/v2/pipeline")).body(Body::from(body)).unwrap();
                let response = hyper::Client::new().request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                // A compaction starts once the writer is done; it is over when the generation moves.
                for _ in 0..250 {
                    if current_generation(upstream).await > before {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            assert!(current_generation(upstream).await >= target, "{count} compactions happened");
        })
    })
}

async fn open(url: String, path: std::path::PathBuf) -> libsql::Database {
    libsql::Builder::new_synced_database(path, url, String::new())
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_switch_mid_transaction_costs_one_failed_sync() {
    let sqld = Arc::new(Mutex::new(Sqld::start(&[])));
    let primary = sqld.lock().unwrap().connect_owned();
    let primary = primary.await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t VALUES (1, 'first')", ()).await.unwrap();

    let armed = Arc::new(AtomicBool::new(false));
    let upstream = sqld.lock().unwrap().user;
    let restarted = sqld.clone();
    let restart: Change = Arc::new(move || {
        let sqld = restarted.clone();
        Box::pin(async move {
            tokio::task::block_in_place(|| {
                let mut sqld = sqld.lock().unwrap();
                sqld.signal("KILL");
                sqld.spawn(&[]);
            })
        })
    });
    let proxy = start_proxy(upstream, armed.clone(), restart).await;
    let url = format!("http://{proxy}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    open(url.clone(), path.clone()).await.sync().await.unwrap();

    // A transaction of far more than one pull (128 frames).
    primary.execute("INSERT INTO t SELECT 1 + value, randomblob(3000) FROM generate_series(1, 1000)", ()).await.unwrap();
    armed.store(true, Ordering::SeqCst);
    let (u, p) = (url.clone(), path.clone());
    let first = tokio::spawn(async move { open(u, p).await.sync().await.map(|_| ()) }).await;
    assert!(!armed.load(Ordering::SeqCst), "the proxy switched the generation mid-transaction");
    assert!(!matches!(first, Ok(Ok(()))), "the sync caught mid-transaction by the switch fails (once)");

    // The next sync, from the same local files, succeeds and holds the primary's rows.
    let primary = sqld.lock().unwrap().connect_owned();
    let primary = primary.await;
    primary.execute("INSERT INTO t VALUES (5000, 'after the switch')", ()).await.unwrap();
    let replica = open(url, path).await;
    replica.sync().await.unwrap();
    let expected = rows(&primary, "SELECT id, v FROM t ORDER BY id").await;
    let got = rows(&replica.connect().unwrap(), "SELECT id, v FROM t ORDER BY id").await;
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the replica holds exactly the primary's rows");
}

/// Replicas at the start of a generation (none yet), in its middle (inside a transaction) and
/// at its end follow across several compactions, each without a failed sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_anywhere_in_a_generation_follow_across_compactions_without_a_failed_sync() {
    let sqld = Sqld::start(&["--max-log-size", "1"]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t VALUES (1, 'first')", ()).await.unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let proxy = start_proxy(sqld.user, armed.clone(), compactions(sqld.user, 2)).await;
    let url = format!("http://{proxy}");
    let dir = tempfile::tempdir().unwrap();
    let (middle, end, start) = (dir.path().join("middle.db"), dir.path().join("end.db"), dir.path().join("start.db"));
    open(url.clone(), middle.clone()).await.sync().await.unwrap();

    // A transaction of far more than one pull (128 frames); the replica at the end has it.
    primary.execute("INSERT INTO t SELECT 1 + value, randomblob(3000) FROM generate_series(1, 1000)", ()).await.unwrap();
    let at_end = open(sqld.url(), end).await;
    at_end.sync().await.unwrap();
    armed.store(true, Ordering::SeqCst);
    open(url.clone(), middle.clone()).await.sync().await.expect("a sync part-way through a transaction when compactions come");
    assert!(!armed.load(Ordering::SeqCst), "the proxy made compactions mid-transaction");

    primary.execute("INSERT INTO t VALUES (5000, 'after the compactions')", ()).await.unwrap();
    let expected = rows(&primary, "SELECT id, v FROM t ORDER BY id").await;
    for (which, replica) in [("middle", open(url.clone(), middle).await), ("end", at_end), ("start", open(url.clone(), start).await)] {
        replica.sync().await.unwrap_or_else(|e| panic!("{which}: {e}"));
        let got = rows(&replica.connect().unwrap(), "SELECT id, v FROM t ORDER BY id").await;
        assert!(got == expected, "the replica at the {which} holds exactly the primary's rows");
    }
}
