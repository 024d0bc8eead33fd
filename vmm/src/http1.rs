//! One HTTP/1.1 connection served by hyper with the limits both of the
//! VMM's servers apply (the control API on its Unix socket and the metrics
//! endpoint on TCP): a deadline for the request head and a cap on its size.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

/// A client gets this long to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (hyper answers 431 beyond it).
pub const MAX_HEAD: usize = 16 * 1024;

/// Serve `stream` (keep-alive) until the client closes it, answering each
/// request with `handler`; a broken connection is logged at debug level as
/// `<what>: connection: <error>`.
pub async fn serve<S, F, Fut>(stream: S, what: &'static str, handler: F)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = r {
        log::debug!("{what}: connection: {e}");
    }
}
