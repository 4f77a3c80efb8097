//! `sqld`: the server binary.

use std::time::Duration;

use clap::Parser;
use libsql_server::{Config, Server};
use tracing_subscriber::EnvFilter;

/// How long the process waits, after the server stopped, for blocking work still running (a
/// statement that ignores the interrupt, an fsync): the process exits regardless.
const EXIT_GRACE: Duration = Duration::from_secs(2);

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let config = Config::parse();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(config));
    runtime.shutdown_timeout(EXIT_GRACE);
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let user = tokio::net::TcpListener::bind(config.http_listen_addr)
        .await
        .map_err(|e| format!("cannot listen on {} (--http-listen-addr): {e}", config.http_listen_addr))?;
    let admin = match config.admin_listen_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--admin-listen-addr): {e}"))?,
        ),
        None => None,
    };
    let grpc = match config.grpc_listen_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--grpc-listen-addr): {e}"))?,
        ),
        None => None,
    };
    tracing::info!(path = %config.db_path.display(), namespaces = config.enable_namespaces, "opening data directory");
    let server = Server::open(config).await?;
    tracing::info!(addr = %user.local_addr()?, "user API listening");
    if let Some(admin) = &admin {
        tracing::info!(addr = %admin.local_addr()?, "admin API listening");
    }
    if let Some(grpc) = &grpc {
        tracing::info!(addr = %grpc.local_addr()?, "gRPC API listening");
    }
    server.serve(user, admin, grpc, shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Raises the soft limit on open files to the hard one: every stream and open namespace holds
/// files, and the default soft limit (often 1024) is below what the default limits allow.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain calls with a valid pointer to a struct they fill or read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let wanted = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            tracing::info!(from = limit.rlim_cur, to = limit.rlim_max, "raised the open-file limit");
        }
    }
}
