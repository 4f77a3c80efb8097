//! A generation that changes under a replica pulling a long transaction costs that replica
//! one failed sync, not every sync: a proxy between replica and server restarts the server
//! (kill -9: the log is rebuilt, a new generation) right after a pull that ended inside a
//! transaction.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Request, Response};

use crate::common::process::{rows, Sqld};

/// Forwards every request to `sqld`; once armed, the first pull answer that ends inside a
/// transaction is held back until the server has been killed and restarted.
async fn start_proxy(sqld: Arc<Mutex<Sqld>>, armed: Arc<AtomicBool>) -> SocketAddr {
    let upstream = sqld.lock().unwrap().user;
    let make = make_service_fn(move |_| {
        let (sqld, armed) = (sqld.clone(), armed.clone());
        async move {
            Ok::<_, Infallible>(service_fn(move |request: Request<Body>| {
                let (sqld, armed) = (sqld.clone(), armed.clone());
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
                        tokio::task::block_in_place(|| {
                            let mut sqld = sqld.lock().unwrap();
                            sqld.signal("KILL");
                            sqld.spawn(&[]);
                        });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_switch_mid_transaction_costs_one_failed_sync() {
    let sqld = Arc::new(Mutex::new(Sqld::start(&[])));
    let primary = sqld.lock().unwrap().connect_owned();
    let primary = primary.await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t VALUES (1, 'first')", ()).await.unwrap();

    let armed = Arc::new(AtomicBool::new(false));
    let proxy = start_proxy(sqld.clone(), armed.clone()).await;
    let url = format!("http://{proxy}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    let open = |url: String, path: std::path::PathBuf| async move {
        libsql::Builder::new_synced_database(path, url, String::new())
            .connector(hyper::client::HttpConnector::new())
            .build()
            .await
            .unwrap()
    };
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
