//! Runaway statements and transactions against a real `sqld`: each is stopped at its limit,
//! when its client goes away, or at shutdown, and the namespace goes on serving writers.

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::common::process::Sqld;
use crate::common::{close, execute};

/// Counts forever: only an interrupt ends it.
const ENDLESS: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

fn result(answer: &Value, i: usize) -> &Value {
    &answer["results"][i]
}

fn code(answer: &Value, i: usize) -> String {
    let r = result(answer, i);
    assert_eq!(r["type"], "error", "result {i} succeeded: {answer}");
    r["error"]["code"].as_str().unwrap().to_owned()
}

async fn values(sqld: &Sqld) -> Vec<String> {
    let (status, answer) = sqld.pipeline(json!({"requests": [execute("SELECT v FROM t ORDER BY rowid"), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    result(&answer, 0)["response"]["result"]["rows"].as_array().unwrap().iter().map(|r| r[0]["value"].as_str().unwrap().to_owned()).collect()
}

async fn insert(sqld: &Sqld, v: &str) -> Value {
    let (status, answer) = sqld.pipeline(json!({"requests": [execute(&format!("INSERT INTO t VALUES ('{v}')")), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn create_table(sqld: &Sqld) {
    let (_, answer) = sqld.pipeline(json!({"requests": [execute("CREATE TABLE t (v)"), close()]})).await;
    assert_eq!(result(&answer, 0)["type"], "ok", "{answer}");
}

/// Waits until another writer holds the write lock: with a short write-lock wait, a write
/// then fails with SQLITE_BUSY.
async fn wait_for_lock_holder(sqld: &Sqld) {
    sqld.wait_until("the runaway statement holds the write lock", || async {
        let (_, answer) = sqld.pipeline(json!({"requests": [execute("INSERT INTO probe VALUES (1)"), close()]})).await;
        result(&answer, 0)["type"] == "error" && result(&answer, 0)["error"]["code"] == "SQLITE_BUSY"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_read_stops_at_the_statement_limit() {
    let sqld = Sqld::start(&["--statement-timeout-ms", "300"]);
    let (status, answer) = sqld.pipeline(json!({"requests": [execute(ENDLESS), execute("SELECT 1"), close()]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(code(&answer, 0), "STATEMENT_TIMEOUT", "{answer}");
    assert_eq!(result(&answer, 1)["type"], "ok", "the stream goes on after a stopped statement: {answer}");

    let (status, answer) = sqld.post("/v1/execute", json!({"stmt": {"sql": ENDLESS}}).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "STATEMENT_TIMEOUT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_statement_in_a_write_transaction_is_rolled_back_at_the_transaction_limit() {
    let sqld = Sqld::start(&["--statement-timeout-ms", "0", "--txn-timeout-s", "1"]);
    create_table(&sqld).await;
    let runaway = sqld.pipeline(json!({"requests": [
        execute("BEGIN IMMEDIATE"),
        execute("INSERT INTO t VALUES ('doomed')"),
        execute(ENDLESS),
        execute("COMMIT"),
        close()
    ]}));
    let writer = async {
        insert(&sqld, "other").await
    };
    let ((status, runaway), written) = tokio::join!(runaway, writer);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(code(&runaway, 2), "TRANSACTION_TIMEOUT", "{runaway}");
    assert_eq!(result(&written, 0)["type"], "ok", "a writer queued behind the runaway gets in: {written}");
    assert_eq!(values(&sqld).await, vec!["other"], "the timed-out transaction was rolled back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_write_transaction_is_rolled_back_at_the_transaction_limit() {
    let sqld = Sqld::start(&["--txn-timeout-s", "1"]);
    create_table(&sqld).await;
    let (_, open) = sqld.pipeline(json!({"requests": [execute("BEGIN IMMEDIATE"), execute("INSERT INTO t VALUES ('idle')")]})).await;
    assert_eq!(result(&open, 1)["type"], "ok", "{open}");
    let baton = open["baton"].as_str().unwrap().to_owned();

    // Queues behind the idle transaction (the write-lock wait is 5 s) and gets in once it is
    // rolled back.
    let written = insert(&sqld, "other").await;
    assert_eq!(result(&written, 0)["type"], "ok", "{written}");

    let (status, answer) = sqld.pipeline(json!({"baton": baton, "requests": [execute("COMMIT")]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "TRANSACTION_TIMEOUT");
    assert_eq!(values(&sqld).await, vec!["other"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stops_when_its_client_goes_away() {
    let sqld = Sqld::start(&["--statement-timeout-ms", "0", "--txn-timeout-s", "0", "--write-lock-timeout-ms", "50"]);
    create_table(&sqld).await;
    let (_, answer) = sqld.pipeline(json!({"requests": [execute("CREATE TABLE probe (x)"), close()]})).await;
    assert_eq!(result(&answer, 0)["type"], "ok");
    let client = sqld.send_raw_pipeline(json!({"requests": [execute("BEGIN IMMEDIATE"), execute(ENDLESS), close()]})).await;
    wait_for_lock_holder(&sqld).await;
    drop(client);
    sqld.wait_until("a writer gets the lock the vanished client's statement held", || async {
        result(&insert(&sqld, "after").await, 0)["type"] == "ok"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_runaway_statement_and_exits_within_its_bound() {
    let mut sqld = Sqld::start(&["--statement-timeout-ms", "0", "--txn-timeout-s", "0", "--write-lock-timeout-ms", "50", "--shutdown-timeout-s", "1"]);
    create_table(&sqld).await;
    insert(&sqld, "kept").await;
    let (_, answer) = sqld.pipeline(json!({"requests": [execute("CREATE TABLE probe (x)"), close()]})).await;
    assert_eq!(result(&answer, 0)["type"], "ok");
    let _client = sqld.send_raw_pipeline(json!({"requests": [execute("BEGIN IMMEDIATE"), execute(ENDLESS), close()]})).await;
    wait_for_lock_holder(&sqld).await;

    let status = tokio::task::block_in_place(|| sqld.signal("TERM"));
    assert!(status.success(), "sqld exited with {status}");
    tokio::task::block_in_place(|| sqld.spawn(&[]));
    assert_eq!(values(&sqld).await, vec!["kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_wait_then_get_503() {
    let sqld = Sqld::start(&["--max-concurrent-requests", "1", "--statement-timeout-ms", "20000"]);
    // Holds the only place while its statement runs.
    let _holder = sqld.send_raw_pipeline(json!({"requests": [execute(ENDLESS), close()]})).await;
    sqld.wait_until("a request waits for a place and is refused", || async {
        let (status, answer) = sqld.pipeline(json!({"requests": [execute("SELECT 1"), close()]})).await;
        status == StatusCode::SERVICE_UNAVAILABLE && answer["code"] == "REQUESTS_EXHAUSTED"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answer_is_dropped_and_its_share_given_back() {
    let sqld = Sqld::start(&["--max-response-size", "64MB", "--max-total-response-size", "64MB", "--header-read-timeout-s", "2"]);
    let big = json!({"requests": [execute("SELECT randomblob(3000000) FROM generate_series(1, 10)"), close()]});
    // Never reads: its answer (about 40 MB as JSON, more than socket buffers take; two of them
    // do not fit together) waits in the server.
    let mut stuck = sqld.send_raw_pipeline(big.clone()).await;
    // Its answer has started (so it holds its share) before anything else runs.
    let mut head = vec![0u8; 1024];
    let n = tokio::io::AsyncReadExt::read(&mut stuck, &mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));
    sqld.wait_until("the unread answer holds its share", || async {
        let (_, answer) = sqld.pipeline(big.clone()).await;
        result(&answer, 0)["type"] == "error" && result(&answer, 0)["error"]["code"] == "RESPONSES_EXHAUSTED"
    })
    .await;
    sqld.wait_until("the server drops the stalled client and another large answer fits", || async {
        let (status, answer) = sqld.pipeline(big.clone()).await;
        status == StatusCode::OK && result(&answer, 0)["type"] == "ok"
    })
    .await;
    let metrics = hyper::Client::new().get(format!("http://{}/metrics", sqld.admin).parse().unwrap()).await.unwrap();
    let metrics = String::from_utf8(hyper::body::to_bytes(metrics.into_body()).await.unwrap().to_vec()).unwrap();
    assert!(metrics.contains("sqld_limit_hits_total{limit=\"unread_answer_timeout\"} 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_a_trickle_is_dropped_and_its_share_given_back() {
    use tokio::io::AsyncReadExt;
    let sqld = Sqld::start(&["--max-response-size", "64MB", "--max-total-response-size", "64MB", "--header-read-timeout-s", "2"]);
    let big = json!({"requests": [execute("SELECT randomblob(3000000) FROM generate_series(1, 10)"), close()]});
    let mut trickle = sqld.send_raw_pipeline(big.clone()).await;
    let mut head = vec![0u8; 1024];
    let n = trickle.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));
    // Reads 1 KiB every 100 ms. TCP reopens its window only in large steps, so the
    // server's writes still wait on this client past the limit, as for one that reads nothing.
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = trickle.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    sqld.wait_until("the trickling client's answer no longer holds its share", || async {
        let (status, answer) = sqld.pipeline(big.clone()).await;
        status == StatusCode::OK && result(&answer, 0)["type"] == "ok"
    })
    .await;
    reader.abort();
}

/// Text of `n` bytes of `a`, built by the statement itself.
fn a_text(n: usize) -> String {
    format!("replace(hex(zeroblob({})), '0', 'a')", n / 2)
}

/// One call of a function is not interrupted between virtual-machine steps: the functions
/// that could run for minutes on crafted input stop with their statement, run in linear time,
/// or are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_long_function_call_stops_at_the_statement_limit() {
    let sqld = Sqld::start(&["--statement-timeout-ms", "300"]);
    // Every character of the text is compared with each of 60,000 characters of the set.
    let set = "(WITH RECURSIVE c(n) AS (SELECT 256 UNION ALL SELECT n + 1 FROM c WHERE n < 60000) SELECT group_concat(char(n), '') FROM c)";
    let trim = format!("SELECT length(trim({}, {set} || 'a'))", a_text(4_000_000));
    // The needle compared at every position: quadratic in the built-ins.
    let instr = format!("SELECT instr({}, {} || 'b')", a_text(8_000_000), a_text(4_000_000));
    let replace = format!("SELECT length(replace({}, {} || 'b', 'c'))", a_text(8_000_000), a_text(4_000_000));
    let like = format!("SELECT {} LIKE ('%' || {} || 'b')", a_text(8_000_000), a_text(40_000));
    let strpos = format!("SELECT strpos({}, {} || 'b')", a_text(8_000_000), a_text(4_000_000));
    let requests = [&trim, &instr, &replace, &like, &strpos].map(|sql| execute(sql));
    let (status, answer) = sqld.pipeline(json!({"requests": [requests[0], requests[1], requests[2], requests[3], requests[4], close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(code(&answer, 0), "STATEMENT_TIMEOUT", "{answer}");
    assert_eq!(result(&answer, 1)["response"]["result"]["rows"][0][0]["value"], "0", "{answer}");
    assert_eq!(result(&answer, 2)["response"]["result"]["rows"][0][0]["value"], "8000000", "{answer}");
    assert!(result(&answer, 3)["error"]["message"].as_str().unwrap().contains("too complex for a value this long"), "{answer}");
    assert!(result(&answer, 4)["error"]["message"].as_str().unwrap().contains("not authorized"), "{answer}");
}

/// SQLite bounds each value, not a statement: a row of many large values would take the
/// whole machine's memory. A statement past `--max-statement-memory` stops with its own error
/// and the stream, and the server, go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_its_memory_limit_stops_and_the_stream_goes_on() {
    let sqld = Sqld::start(&["--max-statement-memory", "40MB"]);
    // The row's three values are all in memory at once before it is returned.
    let wide = "SELECT randomblob(16000000), randomblob(16000000), randomblob(16000000)";
    let narrow = "SELECT length(randomblob(16000000)) / 16000000";
    let (status, answer) = sqld.pipeline(json!({"requests": [execute(wide), execute(narrow), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(code(&answer, 0), "MEMORY_LIMIT", "{answer}");
    assert_eq!(result(&answer, 1)["response"]["result"]["rows"][0][0]["value"], "1", "{answer}");

    let (status, answer) = sqld.post("/v1/execute", json!({"stmt": {"sql": wide}}).to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "MEMORY_LIMIT", "{answer}");
}
