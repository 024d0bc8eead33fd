//! The metrics HTTP endpoint, on hyper (HTTP/1.1 parsing and limits are
//! hyper's; no hand-written parser).
//!
//! Why not tiny_http: with 0.12, five half-sent requests starve every later
//! connection (its task pool counts idle threads before they wake, queues new
//! connections behind readers blocked on silent clients, and has no read
//! timeout). hyper gives each connection its own task, a header read timeout
//! and a buffer limit. The listener is bound before the guest starts, so a
//! port in use is an error up front; one current-thread tokio runtime runs on
//! the `metrics` thread, away from the vCPUs.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use thiserror::Error;

use super::VmMetrics;
use crate::exit::VmExit;

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metrics address {addr} is not loopback; pass --metrics-allow-remote to expose metrics beyond this host")]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    pub fn bind(addr: SocketAddr, allow_remote: bool) -> Result<Self, MetricsError> {
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(MetricsError::NotLoopback { addr });
        }
        let bind_err = |source| MetricsError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound (port 0 picks one).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until the VM stops.
    /// Serve until the VM stops, and `linger` longer (a last scrape of the
    /// final counters).
    pub fn spawn(
        self,
        metrics: Arc<VmMetrics>,
        exit: Arc<VmExit>,
        linger: Duration,
        on_start: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<thread::JoinHandle<()>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                on_start();
                rt.block_on(serve(self.listener, metrics, exit, linger));
            })
    }
}

async fn serve(
    listener: TcpListener,
    metrics: Arc<VmMetrics>,
    exit: Arc<VmExit>,
    linger: Duration,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("metrics: {e}");
            return;
        }
    };
    let open = Arc::new(AtomicUsize::new(0));
    let mut stopped_at: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if exit.is_stopping() {
                    let stopped = *stopped_at.get_or_insert_with(std::time::Instant::now);
                    if stopped.elapsed() >= linger {
                        return;
                    }
                }
            }
            accepted = listener.accept(), if open.load(Ordering::Relaxed) < MAX_CONNECTIONS => {
                let Ok((stream, _)) = accepted else { continue };
                let metrics = metrics.clone();
                let open = open.clone();
                open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    crate::http1::serve(stream, "metrics", move |req| {
                        std::future::ready(respond(&req, &metrics))
                    })
                    .await;
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn respond(req: &Request<Incoming>, metrics: &VmMetrics) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/metrics.json" | "/healthz") {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /metrics.json or /healthz\n".into(),
            "text/plain",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n".into(),
            "text/plain",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            super::prometheus::render(metrics.snapshot()),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/metrics.json" => text(
            StatusCode::OK,
            metrics.snapshot().to_json().to_string(),
            "application/json",
        ),
        _ => text(StatusCode::OK, "ok\n".into(), "text/plain"),
    }
}
