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
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

impl Sqld {
    pub fn start(args: &[&str]) -> Sqld {
        let dir = tempfile::tempdir().unwrap();
        let mut sqld = Sqld { child: None, dir, user: free_addr(), admin: free_addr() };
        sqld.spawn(args);
        sqld
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data.sqld")
    }

    /// Starts (or restarts) the process on the same directory and ports, and waits until it
    /// answers `/health` (polled, with a deadline).
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new(env!("CARGO_BIN_EXE_sqld"))
            .arg("--db-path")
            .arg(self.db_path())
            .args(["--http-listen-addr", &self.user.to_string(), "--admin-listen-addr", &self.admin.to_string()])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning sqld");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("sqld exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "sqld did not become healthy in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
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
        let url = self.url();
        async move {
            libsql::Builder::new_remote(url, String::new())
                .connector(hyper::client::HttpConnector::new())
                .build()
                .await
                .unwrap()
                .connect()
                .unwrap()
        }
    }

    /// A `libsql` crate connection to this server over HTTP.
    pub async fn connect(&self) -> libsql::Connection {
        self.connect_owned().await
    }
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
