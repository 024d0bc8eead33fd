//! `vmm ctl`: a client for every API endpoint, so nobody needs curl.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// How long one request may take (a snapshot: as long as writing the
/// guest's memory takes).
const TIMEOUT: Duration = Duration::from_secs(10);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);

/// One request on `socket`; (status, body).
pub fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, String), String> {
    let timeout = if path == "/vm/snapshot" || path == "/vm/migrate" {
        SNAPSHOT_TIMEOUT
    } else {
        TIMEOUT
    };
    let what = socket.display().to_string();
    block_on(timeout, &what, send(socket, method, path, body))
}

/// Run one exchange on a fresh current-thread runtime, at most `timeout`.
fn block_on(
    timeout: Duration,
    what: &str,
    exchange: impl std::future::Future<Output = Result<(StatusCode, String), String>>,
) -> Result<(StatusCode, String), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer from {what} within {timeout:?}"))?
    })
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot connect to the API socket {}: {e}", socket.display()))?;
    exchange(stream, method, path, body).await
}

/// One request on a connected stream (the API's Unix socket, a metrics
/// endpoint's TCP connection).
async fn exchange<S>(
    stream: S,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `GET` of an `http://HOST:PORT/PATH` URL (a metrics endpoint,
/// `--metrics-addr`); (status, body). No TLS: the endpoint has none.
pub fn get_url(url: &str) -> Result<(StatusCode, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("bad URL {url}: only http:// is served"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("bad URL {url}: no host"))?;
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    block_on(TIMEOUT, url, async {
        let stream = tokio::net::TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        exchange(stream, Method::GET, &path, None).await
    })
}

/// How `vmm ctl` prints an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned `key  value` lines, nested objects indented (the default).
    Human,
    /// The API's JSON, pretty-printed (`--json`, for scripts).
    Json,
}

/// What `vmm ctl` prints for an answer, and whether it was a success.
pub fn render(status: StatusCode, body: &str, format: Format) -> (String, bool) {
    let ok = status.is_success();
    let text = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) if !ok => v
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string()),
        Ok(v) if format == Format::Human => human(&v),
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| body.to_string()),
        Err(_) if body.is_empty() => String::new(),
        Err(_) => body.to_string(),
    };
    (text, ok)
}

/// A JSON answer for a person: one `key  value` line per scalar, keys
/// aligned within each object, nested objects indented under their key; an
/// object of a few scalars (a labelled counter: `{"demand": 3, "prefetch":
/// 5}`) on one line as `demand 3, prefetch 5`; arrays of scalars on one
/// line; `null` as `-` (a device the VM does not have).
pub fn human(v: &serde_json::Value) -> String {
    let mut out = String::new();
    match v {
        serde_json::Value::Object(m) => object(&mut out, m, 0),
        other => out.push_str(&scalar(other)),
    }
    out.trim_end().to_string()
}

fn scalar(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => {
                // Seconds and MiB: enough digits to read, not a float dump.
                if f != 0.0 && f.abs() < 0.01 {
                    format!("{f:.6}")
                } else {
                    format!("{f:.3}")
                }
            }
            _ => n.to_string(),
        },
        Value::Bool(b) => b.to_string(),
        Value::Array(a) if a.iter().all(is_scalar) => {
            a.iter().map(scalar).collect::<Vec<_>>().join(" ")
        }
        Value::Array(a) => format!("[{} entries]", a.len()),
        Value::Object(m) if m.values().all(is_scalar) => m
            .iter()
            .map(|(k, v)| format!("{k} {}", scalar(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Object(_) => String::new(),
    }
}

fn is_scalar(v: &serde_json::Value) -> bool {
    !matches!(
        v,
        serde_json::Value::Array(_) | serde_json::Value::Object(_)
    )
}

/// The most keys an object of scalars may have to print on one line.
const INLINE_KEYS: usize = 4;

/// Whether `v` prints on its key's line (else its own block below it).
fn inline(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Object(m) => m.is_empty() || (m.len() <= INLINE_KEYS && m.values().all(is_scalar)),
        Value::Array(a) => !a.iter().any(|e| e.is_object()),
        _ => true,
    }
}

fn object(out: &mut String, m: &serde_json::Map<String, serde_json::Value>, depth: usize) {
    use std::fmt::Write as _;
    let width = m.keys().map(String::len).max().unwrap_or(0);
    let pad = "  ".repeat(depth);
    for (k, v) in m {
        if inline(v) {
            let _ = writeln!(out, "{pad}{k:<width$}  {}", scalar(v));
            continue;
        }
        let _ = writeln!(out, "{pad}{k}");
        match v {
            serde_json::Value::Object(inner) => object(out, inner, depth + 1),
            serde_json::Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let _ = writeln!(out, "{pad}  [{i}]");
                    match e {
                        serde_json::Value::Object(inner) => object(out, inner, depth + 2),
                        other => {
                            let _ = writeln!(out, "{pad}    {}", scalar(other));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn human_aligns_keys_and_nests_objects() {
        let v = json!({
            "state": "running",
            "vcpus": 2,
            "uptime_s": 12.345678,
            "balloon": null,
            "memory": {"boot_mib": 512, "resident_mib": 33.5, "a": 1, "b": 2, "c": 3},
            "restore": {
                "first_entry_seconds": 0.0100306,
                "all_vcpus_blocked_seconds": 0.000123,
                "restore_pages": {"demand": 3, "prefetch": 5},
                "vcpu_blocktime_seconds": [0.5, 0.25]
            }
        });
        let want = "\
balloon   -
memory
  a             1
  b             2
  boot_mib      512
  c             3
  resident_mib  33.500
restore
  all_vcpus_blocked_seconds  0.000123
  first_entry_seconds        0.010
  restore_pages              demand 3, prefetch 5
  vcpu_blocktime_seconds     0.500 0.250
state     running
uptime_s  12.346
vcpus     2";
        assert_eq!(human(&v), want);
    }

    #[test]
    fn errors_are_the_message_whatever_the_format() {
        let (text, ok) = render(
            StatusCode::CONFLICT,
            r#"{"error": "no balloon"}"#,
            Format::Human,
        );
        assert_eq!((text.as_str(), ok), ("no balloon", false));
        let (text, ok) = render(StatusCode::OK, r#"{"a": 1}"#, Format::Json);
        assert_eq!((text.as_str(), ok), ("{\n  \"a\": 1\n}", true));
        let (text, _) = render(StatusCode::NO_CONTENT, "", Format::Human);
        assert_eq!(text, "");
    }
}
