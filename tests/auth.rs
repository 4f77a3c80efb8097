//! Authentication and authorization on every user route: JWTs verified by the server's keys
//! (both key formats, several keys) or a namespace's own key, the legacy basic scheme, and
//! read-only grants; each refusal with its reason, counted in `/metrics`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::tokens::{epoch_secs, Signer};
use crate::common::*;

/// A user request on namespace `ns` with `credential` as its `authorization` value.
async fn user(method: Method, path: &str, ns: &str, credential: Option<&str>, body: String) -> (StatusCode, Value) {
    let mut headers = vec![("x-namespace", ns)];
    if let Some(credential) = credential {
        headers.push(("authorization", credential));
    }
    let (status, body) = call("primary", USER_PORT, method, path, &headers, body).await;
    // A cursor answers with JSON lines: kept as text then.
    (status, serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())))
}

/// What a route does with the namespace.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Read,
    Write,
}

/// Every user route that touches a namespace, reading and writing: (method, path, body, kind).
fn routes() -> Vec<(Method, &'static str, String, Kind)> {
    let pipeline = |sql: &str| json!({"requests": [execute(sql), close()]}).to_string();
    let cursor = |sql: &str| json!({"baton": null, "batch": {"steps": [{"stmt": {"sql": sql}}]}}).to_string();
    let v1 = |sql: &str| json!({"stmt": {"sql": sql}}).to_string();
    let batch = |sql: &str| json!({"batch": {"steps": [{"stmt": {"sql": sql}}]}}).to_string();
    let legacy = |sql: &str| json!({"statements": [sql]}).to_string();
    let (read, write) = ("SELECT count(*) FROM t", "INSERT INTO t VALUES (1)");
    vec![
        (Method::POST, "/v2/pipeline", pipeline(read), Kind::Read),
        (Method::POST, "/v2/pipeline", pipeline(write), Kind::Write),
        (Method::POST, "/v3/pipeline", pipeline(read), Kind::Read),
        (Method::POST, "/v3/cursor", cursor(read), Kind::Read),
        (Method::POST, "/v3/cursor", cursor(write), Kind::Write),
        (Method::POST, "/v1/execute", v1(read), Kind::Read),
        (Method::POST, "/v1/execute", v1(write), Kind::Write),
        (Method::POST, "/v1/batch", batch(read), Kind::Read),
        (Method::POST, "/v1/batch", batch(write), Kind::Write),
        (Method::POST, "/", legacy(read), Kind::Read),
        (Method::POST, "/", legacy(write), Kind::Write),
        (Method::GET, "/info", String::new(), Kind::Read),
        (Method::GET, "/export/1", String::new(), Kind::Read),
        (Method::GET, "/sync/1/1/2", String::new(), Kind::Read),
        // Not a valid push body: past authentication it is a 400, never a 401.
        (Method::POST, "/sync/1/1/2", "not frames".into(), Kind::Write),
    ]
}

/// Whether a route's answer says a write was refused for a read-only grant: a 401 on routes
/// of one statement, the Hrana error inside a pipeline's or cursor's answer.
fn refused_read_only(status: StatusCode, answer: &Value) -> bool {
    let code = |v: &Value| v.as_str() == Some("AUTH_READ_ONLY");
    (status == StatusCode::UNAUTHORIZED && code(&answer["code"]))
        || code(&answer["results"][0]["error"]["code"])
        || answer.to_string().contains("AUTH_READ_ONLY")
}

async fn create(ns: &str, body: Value) {
    let (status, answer) = admin(Method::POST, &format!("/v1/namespaces/{ns}/create"), &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[test]
fn every_user_route_checks_the_token_and_says_why_it_refused() {
    let (k1, k2, stranger) = (Signer::generate(), Signer::generate(), Signer::generate());
    // Several keys, in both formats: either verifies a token (key rotation).
    let keys = format!("{}\n{}\n", k1.pem(), k2.raw());
    let valid = [k1.token(json!({})), k2.token(json!({"a": "rw", "id": "a"}))];
    let read_only = [k1.token(json!({"a": "ro"})), k2.token(json!({"p": {"ro": {"ns": ["a"]}}}))];
    let refusals = [
        (None, "AUTH_MISSING"),
        (Some("Bearer ".to_owned()), "AUTH_MISSING"),
        (Some("Bearer not.a-jwt".to_owned()), "AUTH_MALFORMED"),
        (Some("Token abc".to_owned()), "AUTH_MALFORMED"),
        (Some(format!("Bearer {}", stranger.token(json!({})))), "AUTH_BAD_SIGNATURE"),
        (Some(format!("Bearer {}", k1.token(json!({"exp": epoch_secs(-3600)})))), "AUTH_EXPIRED"),
        (Some(format!("Bearer {}", k1.token(json!({"a": "rw", "id": "b"})))), "AUTH_WRONG_NAMESPACE"),
        (Some(format!("Bearer {}", k2.token(json!({"p": {"rw": {"ns": ["b"]}}})))), "AUTH_WRONG_NAMESPACE"),
        // `id` alone names one namespace; with `p`, a legacy `a` never widens it.
        (Some(format!("Bearer {}", k1.token(json!({"id": "b"})))), "AUTH_WRONG_NAMESPACE"),
        (Some(format!("Bearer {}", k1.token(json!({"a": "rw", "p": {"ro": {"ns": ["b"]}}})))), "AUTH_WRONG_NAMESPACE"),
        // Over HTTP a token comes with its scheme.
        (Some(k1.token(json!({}))), "AUTH_MALFORMED"),
        (Some(format!("Bearer {}", k1.token(json!({"exp": "soon"})))), "AUTH_MALFORMED"),
    ];
    run_sim(move |config| config.auth_jwt_key = Some(keys.clone()), async move {
        create("a", json!({})).await;
        create("b", json!({})).await;
        let owner = format!("Bearer {}", valid[0]);
        let (status, answer) = user(
            Method::POST,
            "/v2/pipeline",
            "a",
            Some(&owner),
            json!({"requests": [execute("CREATE TABLE t (x)"), execute("INSERT INTO t VALUES (0)"), close()]}).to_string(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["results"][1]["type"], "ok", "{answer}");

        for (method, path, body, kind) in routes() {
            let what = format!("{method} {path} ({kind:?})");
            for (credential, code) in &refusals {
                let (status, answer) = user(method.clone(), path, "a", credential.as_deref(), body.clone()).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{what} with {code}: {answer}");
                assert_eq!(answer["code"], *code, "{what}: {answer}");
                // The reason is said; the credential is not echoed.
                if let Some(credential) = credential {
                    let token = credential.trim_start_matches("Bearer ").trim_start_matches("Token ");
                    assert!(token.len() < 8 || !answer.to_string().contains(token), "{what}: {answer}");
                }
            }
            for token in &valid {
                let (status, answer) = user(method.clone(), path, "a", Some(&format!("Bearer {token}")), body.clone()).await;
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
                assert!(!refused_read_only(status, &answer), "{what}: {answer}");
                if path != "/sync/1/1/2" {
                    assert_eq!(status, StatusCode::OK, "{what}: {answer}");
                }
            }
            for token in &read_only {
                let (status, answer) = user(method.clone(), path, "a", Some(&format!("Bearer {token}")), body.clone()).await;
                match kind {
                    Kind::Read => {
                        assert_ne!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
                        assert!(!refused_read_only(status, &answer), "{what}: {answer}");
                    }
                    Kind::Write => assert!(refused_read_only(status, &answer), "{what} with a read-only token: {status} {answer}"),
                }
            }
        }

        // Nothing a read-only token sent was written: only the owner's rows are there.
        let (_, answer) = user(
            Method::POST,
            "/v2/pipeline",
            "a",
            Some(&owner),
            json!({"requests": [execute("SELECT count(*) FROM t"), close()]}).to_string(),
        )
        .await;
        let writes_with_valid_tokens = 2 * 5; // five write routes that insert, two tokens
        assert_eq!(rows(&answer, 0)[0][0]["value"], (1 + writes_with_valid_tokens).to_string(), "{answer}");

        // A stream is authenticated per request: begun with a read-write token, it cannot
        // write with a read-only one, nor open a write transaction.
        let ro = format!("Bearer {}", read_only[0]);
        let (_, answer) =
            user(Method::POST, "/v2/pipeline", "a", Some(&owner), json!({"requests": [execute("SELECT 1")]}).to_string()).await;
        let baton = answer["baton"].as_str().unwrap().to_owned();
        let (_, answer) = user(Method::POST, "/v2/pipeline", "a", Some(&ro), json!({"baton": baton, "requests": [execute("BEGIN IMMEDIATE"), execute("INSERT INTO t VALUES (2)"), execute("SELECT 1"), close()]}).to_string()).await;
        assert_eq!(error_code(&answer, 0), "AUTH_READ_ONLY", "{answer}");
        assert_eq!(error_code(&answer, 1), "AUTH_READ_ONLY", "{answer}");
        assert_eq!(rows(&answer, 2).len(), 1, "{answer}");

        // Nor commit a write transaction another grant began on it: it can only close the
        // stream, which rolls the transaction back.
        let (_, answer) = user(
            Method::POST,
            "/v2/pipeline",
            "a",
            Some(&owner),
            json!({"requests": [execute("BEGIN"), execute("INSERT INTO t VALUES (3)")]}).to_string(),
        )
        .await;
        let baton = answer["baton"].as_str().unwrap().to_owned();
        let (_, answer) = user(
            Method::POST,
            "/v2/pipeline",
            "a",
            Some(&ro),
            json!({"baton": baton, "requests": [execute("COMMIT"), close()]}).to_string(),
        )
        .await;
        assert_eq!(error_code(&answer, 0), "AUTH_READ_ONLY", "{answer}");
        let (_, answer) = user(
            Method::POST,
            "/v2/pipeline",
            "a",
            Some(&owner),
            json!({"requests": [execute("SELECT count(*) FROM t WHERE x = 3"), close()]}).to_string(),
        )
        .await;
        assert_eq!(rows(&answer, 0)[0][0]["value"], "0", "{answer}");

        // Probes stay open.
        let (status, _) = user(Method::GET, "/health", "a", None, String::new()).await;
        assert_eq!(status, StatusCode::OK);

        // Refusals are counted by reason.
        let (status, metrics) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        let metrics = String::from_utf8(metrics).unwrap();
        let count = |reason: &str| -> u64 {
            let prefix = format!("sqld_auth_refused_total{{reason=\"{reason}\"}} ");
            metrics.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{reason} not in metrics")).parse().unwrap()
        };
        let routes = routes().len() as u64;
        assert_eq!(count("missing"), 2 * routes);
        assert_eq!(count("malformed"), 4 * routes);
        assert_eq!(count("bad_signature"), routes);
        assert_eq!(count("expired"), routes);
        assert_eq!(count("wrong_namespace"), 4 * routes);
        assert!(count("read_only") >= 2 * 5 + 3, "{metrics}");
        Ok(())
    });
}

#[test]
fn a_namespace_key_guards_that_namespace_and_only_it() {
    let (own, server_key, other) = (Signer::generate(), Signer::generate(), Signer::generate());
    let own_raw = own.raw();
    let server_pem = server_key.pem();
    let select = json!({"requests": [execute("SELECT 1"), close()]}).to_string();
    let write = json!({"requests": [execute("CREATE TABLE IF NOT EXISTS t (x)"), close()]}).to_string();
    let (own_rw, own_ro, other_rw) = (own.token(json!({})), own.token(json!({"a": "ro"})), other.token(json!({})));
    let pipeline_as = move |ns: &'static str, token: Option<String>, body: String| async move {
        let credential = token.map(|t| format!("Bearer {t}"));
        user(Method::POST, "/v2/pipeline", ns, credential.as_deref(), body).await
    };
    let mut sim = sim();
    start_server(&mut sim, "primary", |_| {});
    {
        let (own_rw, own_ro, other_rw, select, write, own_raw) =
            (own_rw.clone(), own_ro.clone(), other_rw.clone(), select.clone(), write.clone(), own_raw.clone());
        sim.client("client", async move {
            create("locked", json!({"jwt_key": own_raw})).await;
            create("open", json!({})).await;
            // A key that verifies nothing is refused when it is set.
            let (status, answer) = admin(Method::POST, "/v1/namespaces/bad/create", &json!({"jwt_key": "not a key"}).to_string()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            assert_eq!(answer["code"], "JWT_KEY_INVALID");
            let (status, _) = admin(
                Method::POST,
                "/v1/namespaces/open/config",
                &json!({"jwt_key": "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----"}).to_string(),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST);

            // Without server keys, the other namespace needs nothing.
            let (status, _) = pipeline_as("open", None, select.clone()).await;
            assert_eq!(status, StatusCode::OK);
            let (status, answer) = pipeline_as("locked", None, select.clone()).await;
            assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("AUTH_MISSING")));
            let (status, answer) = pipeline_as("locked", Some(other_rw.clone()), select.clone()).await;
            assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("AUTH_BAD_SIGNATURE")));
            let (status, answer) = pipeline_as("locked", Some(own_rw.clone()), write.clone()).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
            let (_, answer) = pipeline_as(
                "locked",
                Some(own_ro.clone()),
                json!({"requests": [execute("INSERT INTO t VALUES (1)"), close()]}).to_string(),
            )
            .await;
            assert_eq!(error_code(&answer, 0), "AUTH_READ_ONLY", "{answer}");

            // An empty key removes it.
            let (status, _) = admin(Method::POST, "/v1/namespaces/locked/config", &json!({"jwt_key": ""}).to_string()).await;
            assert_eq!(status, StatusCode::OK);
            let (status, answer) = pipeline_as("locked", None, select.clone()).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            Ok(())
        });
    }
    sim.run().unwrap();

    // With server keys too: the namespace's key verifies tokens for its namespace only.
    let mut sim = self::sim();
    start_server(&mut sim, "primary", move |config| config.auth_jwt_key = Some(server_pem.clone()));
    let server_rw = server_key.token(json!({}));
    sim.client("client", async move {
        create("locked", json!({"jwt_key": own_raw})).await;
        create("open", json!({})).await;
        for (ns, token, expected) in [
            ("locked", Some(own_rw.clone()), StatusCode::OK),
            ("locked", Some(server_rw.clone()), StatusCode::OK),
            ("open", Some(server_rw.clone()), StatusCode::OK),
            ("open", Some(own_rw.clone()), StatusCode::UNAUTHORIZED),
            ("open", None, StatusCode::UNAUTHORIZED),
            ("locked", Some(other_rw.clone()), StatusCode::UNAUTHORIZED),
        ] {
            let (status, answer) = pipeline_as(ns, token, select.clone()).await;
            assert_eq!(status, expected, "{ns}: {answer}");
        }
        Ok(())
    });
    sim.run().unwrap();
}

#[test]
fn basic_credentials_are_checked() {
    let credential = STANDARD.encode("alice:secret");
    let configured = format!("basic:{credential}");
    run_sim(move |config| config.http_auth = Some(configured.clone()), async move {
        let select = json!({"requests": [execute("SELECT 1"), close()]}).to_string();
        let right = format!("Basic {credential}");
        let wrong = format!("Basic {}", STANDARD.encode("alice:guess"));
        let (status, answer) = user(Method::POST, "/v2/pipeline", "default", Some(&right), select.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let (status, answer) = user(Method::POST, "/v2/pipeline", "default", Some(&wrong), select.clone()).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("AUTH_BAD_PASSWORD")));
        let (status, answer) = user(Method::POST, "/v2/pipeline", "default", None, select).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("AUTH_MISSING")));
        Ok(())
    });
}

#[test]
fn keys_that_cannot_verify_stop_the_server_at_start() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let private = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
    for (keys, file, http_auth, says) in [
        (Some(private.to_owned()), None, None, "private key"),
        (Some("short".to_owned()), None, None, "line 1"),
        (None, Some(dir.path().join("missing.pem")), None, "missing.pem"),
        (None, None, Some("alice:secret".to_owned()), "--http-auth"),
        (None, None, Some("basic:".to_owned()), "--http-auth"),
        // The identity point: any signature with R = identity, S = 0 would verify against it.
        (Some("AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".to_owned()), None, None, "small order"),
    ] {
        let mut config = libsql_server::Config::with_db_path(dir.path().join("db"));
        config.auth_jwt_key = keys;
        config.auth_jwt_key_file = file;
        config.http_auth = http_auth;
        let error = runtime.block_on(libsql_server::Server::open(config)).err().expect("the server must refuse to start");
        assert!(error.to_string().contains(says), "{error}");
    }
    // A key file with a PEM key and a raw one starts.
    let signer = Signer::generate();
    let path = dir.path().join("keys.pem");
    std::fs::write(&path, format!("{}{}\n", signer.pem(), Signer::generate().raw())).unwrap();
    let mut config = libsql_server::Config::with_db_path(dir.path().join("db"));
    config.auth_jwt_key_file = Some(path);
    assert!(runtime.block_on(libsql_server::Server::open(config)).is_ok());
}
