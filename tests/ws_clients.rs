//! `@libsql/client` over WebSocket (`ws://`) against a real `sqld`: every value type, a batch
//! in write mode, interactive transactions committed and rolled back; and its token in the
//! socket's `hello` (read-write, read-only, missing, foreign).

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
