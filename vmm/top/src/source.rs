//! Where `vmm top` reads the metrics: a VMM's API socket (`GET
//! /vm/metrics`) or a metrics endpoint (`/metrics.json`).

use std::path::PathBuf;

use serde_json::Value;
use vmm::api::client;

#[derive(Debug, Clone)]
pub enum Source {
    Socket(PathBuf),
    Url(String),
}

impl Source {
    /// A metrics URL: `http://HOST:PORT` alone means its `/metrics.json`.
    pub fn url(u: &str) -> Source {
        let bare = u.trim_end_matches('/');
        let has_path = bare.splitn(4, '/').nth(3).is_some();
        if has_path {
            Source::Url(u.to_string())
        } else {
            Source::Url(format!("{bare}/metrics.json"))
        }
    }

    /// One scrape.
    pub fn fetch(&self) -> Result<Value, String> {
        let (status, body) = match self {
            Source::Socket(p) => client::request(p, hyper::Method::GET, "/vm/metrics", None)?,
            Source::Url(u) => client::get_url(u)?,
        };
        if !status.is_success() {
            return Err(format!("{self}: {status}: {}", body.trim()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{self}: not the metrics JSON: {e}"))
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Socket(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_endpoint_means_its_json() {
        let path = |s: Source| match s {
            Source::Url(u) => u,
            Source::Socket(_) => unreachable!(),
        };
        assert_eq!(
            path(Source::url("http://127.0.0.1:9464")),
            "http://127.0.0.1:9464/metrics.json"
        );
        assert_eq!(path(Source::url("http://h:1/")), "http://h:1/metrics.json");
        assert_eq!(path(Source::url("http://h:1/x.json")), "http://h:1/x.json");
    }
}
