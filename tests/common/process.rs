//! A real `sqld` process on free local ports, with its own data directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Sqld {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub user: SocketAddr,
    pub admin: SocketAddr,
    /// The gRPC port (HTTP/2).
    pub grpc: SocketAddr,
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl Sqld {
    /// A new server on free ports. A port found free may be taken by another test's process
    /// before this one binds it: a start that fails is tried again on other ports.
    pub fn start(args: &[&str]) -> Sqld {
        let dir = tempfile::tempdir().unwrap();
        let mut sqld = Sqld { child: None, dir, user: free_addr(), admin: free_addr(), grpc: free_addr() };
        for _ in 0..3 {
            match sqld.try_spawn(args) {
                Ok(()) => return sqld,
                Err(why) => eprintln!("{why}; trying other ports"),
            }
            (sqld.user, sqld.admin, sqld.grpc) = (free_addr(), free_addr(), free_addr());
        }
        sqld.spawn(args);
        sqld
    }

    /// A replica of `primary` (`--primary-grpc-url` its gRPC port), with `args` besides.
    pub fn replica_of(primary: &Sqld, args: &[&str]) -> Sqld {
        Sqld::start(&Self::as_replica_of(primary, args).iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Restarts a replica made by [`Self::replica_of`] on the same directory and ports.
    pub fn respawn_replica_of(&mut self, primary: &Sqld, args: &[&str]) {
        self.spawn(&Self::as_replica_of(primary, args).iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// `args` with the flag that makes a server a replica of `primary`.
    fn as_replica_of(primary: &Sqld, args: &[&str]) -> Vec<String> {
        let mut all = vec!["--primary-grpc-url".to_owned(), format!("http://{}", primary.grpc)];
        all.extend(args.iter().map(|a| a.to_string()));
        all
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data.sqld")
    }

    /// Starts (or restarts) the process on the same directory and ports, and waits until it
    /// answers `/health` (polled, with a deadline).
    pub fn spawn(&mut self, args: &[&str]) {
        if let Err(why) = self.try_spawn(args) {
            panic!("{why}");
        }
    }

    fn try_spawn(&mut self, args: &[&str]) -> Result<(), String> {
        // The server's log (to stdout) goes to a file, shown if the start fails.
        let log_path = self.dir.path().join("sqld.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sqld"))
            .arg("--db-path")
            .arg(self.db_path())
            .args(["--http-listen-addr", &self.user.to_string(), "--admin-listen-addr", &self.admin.to_string()])
            // A replica serves no gRPC of its own (the flags are refused together).
            .args(if args.contains(&"--primary-grpc-url") { vec![] } else { vec!["--grpc-listen-addr".to_owned(), self.grpc.to_string()] })
            .args(args)
            .env("RUST_LOG", "warn,sqld=info")
            .env("NO_COLOR", "1")
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning sqld");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Ours is listening (another test's server may have taken the port meanwhile and
        // answer /health on it), and answers.
        let listening = || std::fs::read_to_string(&log_path).is_ok_and(|log| log.contains("user API listening"));
        while !(listening() && self.healthy()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("sqld exited during start-up: {status}\n{log}"));
            }
            assert!(Instant::now() < deadline, "sqld did not become healthy in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.user)
    }

    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.user, Duration::from_millis(200)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    }

    /// Sends a signal and waits for the process to exit (bounded).
    pub fn signal(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("sqld is running");
        let status = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "sqld did not exit within 30 s of SIG{signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sqld {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Sqld {
    /// A `libsql` crate connection as a future that does not borrow the server (for a server
    /// behind a lock the future must not hold). The crate's own TLS connector is not compiled
    /// in, so a plain hyper connector is given.
    pub fn connect_owned(&self) -> impl std::future::Future<Output = libsql::Connection> + Send + 'static {
        self.connect_as(String::new())
    }

    /// [`Self::connect_owned`] with `token` as its auth token.
    pub fn connect_as(&self, token: String) -> impl std::future::Future<Output = libsql::Connection> + Send + 'static {
        remote(self.url(), token)
    }

    /// A `libsql` crate connection to this server over HTTP.
    pub async fn connect(&self) -> libsql::Connection {
        self.connect_owned().await
    }
}

/// A `libsql` crate connection over HTTP to the server at `url` (this one or another).
pub async fn remote(url: String, token: String) -> libsql::Connection {
    libsql::Builder::new_remote(url, token)
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
        .connect()
        .unwrap()
}

/// Every row `sql` answers on `conn`, as values.
pub async fn rows(conn: &libsql::Connection, sql: &str) -> Vec<Vec<libsql::Value>> {
    let mut rows = conn.query(sql, ()).await.unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().await.unwrap() {
        out.push((0..row.column_count()).map(|i| row.get_value(i).unwrap()).collect());
    }
    out
}

impl Sqld {
    /// A Hrana pipeline over plain HTTP: the answer's status and JSON.
    pub async fn pipeline(&self, body: serde_json::Value) -> (hyper::StatusCode, serde_json::Value) {
        self.post("/v2/pipeline", body.to_string()).await
    }

    /// A Hrana pipeline on namespace `ns` (the `x-namespace` header), with `token` if any:
    /// status and JSON.
    pub async fn pipeline_as(&self, ns: &str, token: Option<&str>, body: serde_json::Value) -> (hyper::StatusCode, serde_json::Value) {
        let mut request = hyper::Request::post(format!("{}/v2/pipeline", self.url())).header("x-namespace", ns);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        Self::answer(request.body(hyper::Body::from(body.to_string())).unwrap()).await
    }

    /// A POST to the user API: the answer's status and JSON.
    pub async fn post(&self, path: &str, body: String) -> (hyper::StatusCode, serde_json::Value) {
        Self::answer(hyper::Request::post(format!("{}{path}", self.url())).body(hyper::Body::from(body)).unwrap()).await
    }

    async fn answer(request: hyper::Request<hyper::Body>) -> (hyper::StatusCode, serde_json::Value) {
        let response = hyper::Client::new().request(request).await.expect("request");
        let status = response.status();
        let body = hyper::body::to_bytes(response.into_body()).await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body))))
    }

    /// A POST to the admin API with no body: the answer's status and JSON.
    pub async fn admin_post(&self, path: &str) -> (hyper::StatusCode, serde_json::Value) {
        let request = hyper::Request::post(format!("http://{}{path}", self.admin)).body(hyper::Body::empty()).unwrap();
        let response = hyper::Client::new().request(request).await.expect("request");
        let status = response.status();
        let body = hyper::body::to_bytes(response.into_body()).await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body))))
    }

    /// A GET of the admin API: the answer's JSON.
    pub async fn admin_get(&self, path: &str) -> serde_json::Value {
        let response = hyper::Client::new().get(format!("http://{}{path}", self.admin).parse().unwrap()).await.expect("request");
        serde_json::from_slice(&hyper::body::to_bytes(response.into_body()).await.expect("body")).expect("JSON")
    }

    /// Sends a pipeline on a raw connection and returns the connection without reading the
    /// answer (a client that may vanish).
    pub async fn send_raw_pipeline(&self, body: serde_json::Value) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let body = body.to_string();
        let mut stream = tokio::net::TcpStream::connect(self.user).await.unwrap();
        let head = format!("POST /v2/pipeline HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n", body.len());
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        stream
    }

    /// Polls `attempt` (with a deadline) until it returns true.
    pub async fn wait_until<F: std::future::Future<Output = bool>>(&self, what: &str, mut attempt: impl FnMut() -> F) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !attempt().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A value of the admin API's `/metrics` (0 if absent).
pub async fn metric(sqld: &Sqld, series: &str) -> u64 {
    let response = hyper::Client::new().get(format!("http://{}/metrics", sqld.admin).parse().unwrap()).await.unwrap();
    let text = String::from_utf8(hyper::body::to_bytes(response.into_body()).await.unwrap().to_vec()).unwrap();
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// The rows a follower's copy is compared by: every row of `t`, its blob as hex.
const COPY_ROWS: &str = "SELECT id, hex(v) FROM t ORDER BY id";

/// Every row of `t` in a follower's copy in `dir` (none while it has no table yet), as the
/// primary's Hrana answers them.
pub fn copy_rows(dir: &std::path::Path) -> Vec<Vec<libsql::Value>> {
    use libsql_sys::rusqlite;
    let Ok(conn) = rusqlite::Connection::open_with_flags(dir.join("data"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return Vec::new();
    };
    let Ok(mut stmt) = conn.prepare(COPY_ROWS) else { return Vec::new() };
    let rows = stmt.query_map([], |r| Ok(vec![libsql::Value::Integer(r.get(0)?), libsql::Value::Text(r.get(1)?)]));
    rows.and_then(|rows| rows.collect()).unwrap_or_default()
}

/// Waits (bounded) until the follower's copy in `dir` holds exactly `primary`'s rows.
pub async fn assert_copy_follows(primary: &libsql::Connection, dir: &std::path::Path) {
    let expected = rows(primary, COPY_ROWS).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let at = dir.to_owned();
        let got = tokio::task::spawn_blocking(move || copy_rows(&at)).await.unwrap();
        if got == expected {
            return;
        }
        assert!(Instant::now() < deadline, "the copy holds {} rows, not the primary's {}", got.len(), expected.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
