//! Accepting connections so that idle, slow or numerous clients cannot exhaust the server.
//!
//! axum's own `serve` has no knob for these, so the accept loop is written here on hyper's
//! connection builder: at most [`MAX_CONNECTIONS`] connections at once (past that a new one is
//! closed at once), [`HEADER_READ_TIMEOUT`] to send a request's headers (a slow or idle client
//! is dropped; hyper applies it to every request of a kept-alive connection too), and a stop
//! that gives open connections [`SHUTDOWN_GRACE`] to finish, then closes them, so a stuck client
//! cannot hold the server up.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::{info, warn};

pub const MAX_CONNECTIONS: usize = 512;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serve `app` until `shutdown` resolves; then let open requests finish for at most
/// [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns: JoinSet<()> = JoinSet::new();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set stays small.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, do not spin.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(%addr, limit = MAX_CONNECTIONS, "too many connections; closing a new one");
                    drop(stream);
                    continue;
                };
                let app = app.clone();
                let stop = stop.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let svc = app.map_request(
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(ConnectInfo(addr));
                            req
                        },
                    );
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        }
    }
    // Stop accepting; ask every connection to finish its request and close.
    drop(listener);
    stop.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        info!(
            open = conns.len(),
            "closing connections still open after the grace period"
        );
        conns.abort_all();
    }
    Ok(())
}
