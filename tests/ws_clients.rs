//! `@libsql/client` over WebSocket (`ws://`) against a real `sqld`: every value type, a batch
//! in write mode, interactive transactions committed and rolled back; and its token in the
//! socket's `hello` (read-write, read-only, missing, foreign). And `@libsql/hrana-client`, the
//! Hrana library under it, over HTTP and WebSocket (Hrana 3 picks protobuf on both), Hrana 2
//! and 3.

use std::process::Command;

use serde_json::{json, Value};

use crate::common::process::Sqld;
use crate::common::tokens::Signer;
use crate::foreign_clients::clients_dir;

/// Runs `node_ws.js` against `sqld` with `token`: its summary, or its error output.
fn node_ws(sqld: &Sqld, token: Option<&str>) -> Result<Value, String> {
    let output = Command::new("node")
        .arg(clients_dir().join("node_ws.js"))
        .arg(format!("ws://{}", sqld.user))
        .args(token)
        .current_dir(clients_dir())
        .output()
        .expect("running node");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("no summary ({e}): {}", String::from_utf8_lossy(&output.stdout))))
}

#[test]
fn the_node_client_over_websocket_runs_values_batches_and_transactions() {
    let sqld = Sqld::start(&[]);
    let summary = node_ws(&sqld, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        summary,
        json!({"i": "9007199254740993", "f": 0.25, "t": "tëxt", "b": "0001FF", "n": null, "ti": "integer", "tf": "real", "sum": 13, "protocol": "ws"})
    );
    // Again on the same database: the committed rows add up, the rolled-back one never does.
    assert_eq!(node_ws(&sqld, None).unwrap()["sum"], 26);
}

#[test]
fn the_node_client_over_websocket_passes_its_token_in_hello() {
    let signer = Signer::generate();
    let keys = tempfile::tempdir().unwrap();
    let path = keys.path().join("jwt.pem");
    std::fs::write(&path, signer.pem()).unwrap();
    let sqld = Sqld::start(&["--auth-jwt-key-file", path.to_str().unwrap()]);
    let summary = node_ws(&sqld, Some(&signer.token(json!({"a": "rw"})))).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary["sum"], 13);
    let refused = node_ws(&sqld, Some(&signer.token(json!({"a": "ro"})))).unwrap_err();
    assert!(refused.contains("AUTH_READ_ONLY"), "{refused}");
    let refused = node_ws(&sqld, None).unwrap_err();
    assert!(refused.contains("AUTH_MISSING"), "{refused}");
    let refused = node_ws(&sqld, Some(&Signer::generate().token(json!({})))).unwrap_err();
    assert!(refused.contains("AUTH_BAD_SIGNATURE"), "{refused}");
}

/// Runs `hrana_client.js` in `mode` (`http` or `ws`) asking for Hrana `version`, the library
/// offering only the WebSocket subprotocols `offer` when given (all of its list otherwise).
fn hrana_client(sqld: &Sqld, mode: &str, version: u8, offer: Option<&str>) -> Value {
    let url = format!("{mode}://{}", sqld.user);
    let output = Command::new("node")
        .arg(clients_dir().join("hrana_client.js"))
        .args([mode, &url, &version.to_string()])
        .args(offer)
        .current_dir(clients_dir())
        .output()
        .expect("running node");
    assert!(output.status.success(), "hrana-client {mode} v{version}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hrana_client_library_over_every_transport_and_version() {
    let sqld = Sqld::start(&[]);
    let mut rows = 0;
    // (transport, version asked, subprotocols offered, version spoken)
    let runs = [
        ("http", 3, None, 3),
        ("ws", 3, None, 3),
        ("ws", 2, None, 2),
        ("http", 2, None, 2),
        ("ws", 3, Some("hrana3"), 3),
        ("ws", 2, Some("hrana1"), 1),
    ];
    for (mode, version, offer, spoken) in runs {
        let summary = tokio::task::block_in_place(|| hrana_client(&sqld, mode, version, offer));
        rows += 1;
        let autocommit = if spoken == 3 { json!(true) } else { Value::Null };
        // Hrana 1 has no describe.
        let (columns, params) = if spoken >= 2 { (json!(["one", "x"]), json!(["?1"])) } else { (Value::Null, Value::Null) };
        assert_eq!(
            summary,
            json!({"version": spoken, "affected": 1, "count": rows, "skipped": true, "failed": "SQLITE_ERROR",
                   "recovered": "recovered", "columns": columns, "params": params, "autocommit": autocommit}),
            "{mode} v{version} offering {offer:?}"
        );
    }
    // Hrana 3 over HTTP went through protobuf (the batch through a cursor), over WebSocket
    // through a cursor too.
    let metrics = hyper::Client::new().get(format!("http://{}/metrics", sqld.admin).parse().unwrap()).await.unwrap();
    let metrics = String::from_utf8(hyper::body::to_bytes(metrics.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(metrics.contains("route=\"/v3-protobuf/cursor\",status=\"200\""), "{metrics}");
    assert!(metrics.contains("sqld_ws_requests_total{type=\"open_cursor\"} 2"), "{metrics}");
    // The library offers hrana3-protobuf first for Hrana 3: that is what its socket spoke.
    assert!(metrics.contains("sqld_ws_sockets_opened_total{protocol=\"hrana3-protobuf\"} 1"), "{metrics}");
    assert!(metrics.contains("sqld_ws_sockets_opened_total{protocol=\"hrana2\"} 1"), "{metrics}");
    // Offered alone, Hrana 3 over JSON (its batch through a cursor) and Hrana 1.
    assert!(metrics.contains("sqld_ws_sockets_opened_total{protocol=\"hrana3\"} 1"), "{metrics}");
    assert!(metrics.contains("sqld_ws_sockets_opened_total{protocol=\"hrana1\"} 1"), "{metrics}");
}
