//! The control API: HTTP/1.1 + JSON on a Unix socket (mode 0600), served by
//! hyper on its own thread (the Firecracker and Cloud Hypervisor
//! convention). Routes are in [`route`]; every answer is JSON, every error
//! `{"error": "..."}` with a 4xx status that says what was wrong. See
//! docs/API.md and docs/openapi.json.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

use super::control::{
    BalloonTarget, ControlError, MemoryRequest, MigrateRequest, RecoverRequest, SnapshotRequest,
    StatsInterval, VmControl,
};
use crate::exit::VmExit;

/// Largest request body (the head's limits are [`crate::http1`]'s).
pub const MAX_BODY: usize = 64 * 1024;
const MIB: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("API socket {0} is in use by a running VMM (another vmm serves it)")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bound API socket, served once the VM runs.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Bind `path` with mode 0600. An existing socket nobody answers on (a
    /// VMM that died) is replaced; one a VMM answers on is an error, as is
    /// any other kind of file.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ApiError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
            Err(_) => {}
        }
        // Bind under a temporary name, restrict it, then move it into place:
        // the socket is never reachable with looser permissions.
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(bind_err(e));
        }
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve until the VM stops; the socket file is removed then.
    pub fn spawn(
        self,
        control: Arc<VmControl>,
        exit: Arc<VmExit>,
        on_start: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<thread::JoinHandle<()>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        thread::Builder::new().name("api".into()).spawn(move || {
            on_start();
            let path = self.path.clone();
            rt.block_on(serve(self.listener, control, exit));
            let _ = std::fs::remove_file(path);
        })
    }
}

async fn serve(listener: UnixListener, control: Arc<VmControl>, exit: Arc<VmExit>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("api: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if exit.is_stopping() {
                    return;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(serve_connection(stream, control.clone()));
            }
        }
    }
}

/// Serve one client connection (HTTP/1.1, keep-alive) until it closes: any
/// byte stream, so the request parser can be fuzzed without a socket
/// (vmm/fuzz/fuzz_targets/api_request.rs).
pub async fn serve_connection<S>(stream: S, control: Arc<VmControl>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    crate::http1::serve(stream, "api", move |req| {
        let control = control.clone();
        async move { handle(req, &control).await }
    })
    .await;
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    let body =
        serde_json::to_vec(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn from_control(e: ControlError) -> Response<Full<Bytes>> {
    error(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
        e.to_string(),
    )
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

/// The request body as `T`: at most [`MAX_BODY`] bytes of JSON.
/// 204 for a done action, its error otherwise.
fn done(r: Result<(), ControlError>) -> Response<Full<Bytes>> {
    match r {
        Ok(()) => no_content(),
        Err(e) => from_control(e),
    }
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body unreadable or over {MAX_BODY} bytes: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad JSON body: {e}")))
}

/// The routes: (path, allowed methods).
pub const ROUTES: &[(&str, &[Method])] = &[
    ("/vm", &[Method::GET]),
    ("/vm/metrics", &[Method::GET]),
    ("/vm/stop", &[Method::PUT]),
    ("/vm/snapshot", &[Method::PUT]),
    ("/vm/pause", &[Method::PUT]),
    ("/vm/resume", &[Method::PUT]),
    ("/vm/working-set", &[Method::PUT]),
    ("/vm/migrate", &[Method::GET, Method::PUT]),
    ("/vm/migrate/recover", &[Method::PUT]),
    ("/balloon", &[Method::GET, Method::PUT]),
    ("/balloon/statistics", &[Method::PUT]),
    ("/memory", &[Method::GET, Method::PUT]),
];

async fn handle(req: Request<Incoming>, control: &VmControl) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let Some((_, allowed)) = ROUTES.iter().find(|(p, _)| *p == path) else {
        let known: Vec<&str> = ROUTES.iter().map(|(p, _)| *p).collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("no such path {path}; the API has {}", known.join(", ")),
        );
    };
    if !allowed.contains(&method) {
        let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{method} is not allowed on {path}; use {}",
                names.join(", ")
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
            r.headers_mut().insert(ALLOW, v);
        }
        return r;
    }
    match (method, path.as_str()) {
        (Method::GET, "/vm") => json(StatusCode::OK, &control.vm_info()),
        (Method::GET, "/vm/metrics") => match control.metrics() {
            Ok(m) => json(StatusCode::OK, &m),
            Err(e) => from_control(e),
        },
        (Method::PUT, "/vm/stop") => {
            control.stop();
            no_content()
        }
        (Method::PUT, "/vm/snapshot") => match body::<SnapshotRequest>(req).await {
            Ok(r) => match control.snapshot(&r) {
                Ok(summary) => json(StatusCode::OK, &summary),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        (Method::PUT, "/vm/migrate") => match body::<MigrateRequest>(req).await {
            Ok(r) => match control.migrate(&r) {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        (Method::PUT, "/vm/migrate/recover") => match body::<RecoverRequest>(req).await {
            Ok(r) => match control.recover(&r) {
                Ok(status) => json(StatusCode::OK, &status),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        (Method::GET, "/vm/migrate") => match control.migration() {
            Ok(status) => json(StatusCode::OK, &status),
            Err(e) => from_control(e),
        },
        (Method::PUT, "/vm/pause") => done(control.pause()),
        (Method::PUT, "/vm/resume") => done(control.resume()),
        (Method::PUT, "/vm/working-set") => match control.save_working_set() {
            Ok(summary) => json(StatusCode::OK, &summary),
            Err(e) => from_control(e),
        },
        (Method::GET, "/balloon") => match control.balloon_info() {
            Ok(i) => json(StatusCode::OK, &i),
            Err(e) => from_control(e),
        },
        (Method::PUT, "/balloon") => match body::<BalloonTarget>(req).await {
            Ok(t) => match t
                .target_mib
                .checked_mul(MIB)
                .ok_or(ControlError::TooLarge("target_mib"))
                .and_then(|b| control.set_balloon_target(b))
            {
                Ok(()) => no_content(),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        (Method::PUT, "/balloon/statistics") => match body::<StatsInterval>(req).await {
            Ok(s) => match control.set_balloon_stats_interval(s.interval_s) {
                Ok(()) => no_content(),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        (Method::GET, "/memory") => match control.memory_info() {
            Ok(i) => json(StatusCode::OK, &i),
            Err(e) => from_control(e),
        },
        (Method::PUT, "/memory") => match body::<MemoryRequest>(req).await {
            Ok(m) => match m
                .requested_mib
                .checked_mul(MIB)
                .ok_or(ControlError::TooLarge("requested_mib"))
                .and_then(|b| control.set_requested_memory(b))
            {
                Ok(()) => no_content(),
                Err(e) => from_control(e),
            },
            Err(r) => r,
        },
        _ => error(StatusCode::NOT_FOUND, "no such route"),
    }
}
