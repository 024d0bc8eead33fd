//! The monitoring files in docs/monitoring held against real tools: the
//! rules pass `promtool check rules` and their unit tests (`promtool test
//! rules`), and a real Prometheus scraping a running `vmm stress` (every
//! device, every kind of thread) loads the rules and answers every query of
//! the Grafana dashboard with data.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, spawn_lines, vmm, wait_for};
use serde_json::Value;

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/monitoring")
}

/// promtool from Debian's `prometheus` package (scripts/setup.sh installs
/// it): its output, asserting it succeeded.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "vmm-rules.yml"]);
    assert!(check.contains("SUCCESS"), "{check}");
    let test = promtool(&["test", "rules", "vmm-rules.test.yml"]);
    assert!(test.contains("SUCCESS"), "{test}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encoding of a query parameter (everything but unreserved).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET` over HTTP/1.0 (a large answer comes whole, not chunked).
fn http_get10(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// An instant query: the result vector.
fn query(prom: SocketAddr, q: &str) -> Vec<Value> {
    let body = http_get10(prom, &format!("/api/v1/query?query={}", encode(q)));
    let v: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: not JSON ({e}): {body}"));
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn start_prometheus(dir: &Path, target: u16, port: u16) -> Killed {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: vmm\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n",
            monitoring().join("vmm-rules.yml").display()
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus; scripts/setup.sh installs it)");
    Killed(child)
}

#[test]
fn dashboard_queries_and_rules_answer_on_a_real_prometheus() {
    let dir = std::env::temp_dir().join(format!("vmm-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let metrics = free_port();
    let mut c = vmm();
    // Longer than any wait below: the run lasts until the test kills it
    // (a run that ended would leave Prometheus only stale series).
    c.args(["stress", "--duration", "1h", "--hotplug", "256M"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    let (child, _out, _err) = spawn_lines(c);
    let _stress = Killed(child);
    let port = free_port();
    let _prom = start_prometheus(&dir, metrics, port);
    let prom: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    wait_for("Prometheus to scrape vmm", Duration::from_secs(300), || {
        std::net::TcpStream::connect(prom).is_ok()
            && http_get(prom, "/-/ready").contains("Ready")
            && query(prom, "up{job=\"vmm\"} == 1").len() == 1
    });
    eprintln!(
        "[{:4.1}s] Prometheus scrapes vmm",
        t0.elapsed().as_secs_f64()
    );

    // The dashboard's instance variable, then every panel's query with the
    // variables Grafana would substitute.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let var = &dash["templating"]["list"][1];
    assert_eq!(var["definition"], "label_values(vmm_fault_mode, instance)");
    assert_eq!(
        query(prom, "vmm_fault_mode").len(),
        1,
        "no instance for the variable"
    );
    // A rate() has data once two scrapes fall in its window: wait for each
    // panel's data (the run goes on meanwhile) rather than for some time.
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "10s")
                .replace("$instance", ".*");
            wait_for(
                &format!("data for panel {:?}: {expr}", panel["title"]),
                Duration::from_secs(300),
                || !query(prom, &expr).is_empty(),
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} queries");

    // Every recording rule is evaluated by the real server and has data.
    let rules = std::fs::read_to_string(monitoring().join("vmm-rules.yml")).unwrap();
    let records: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .collect();
    assert!(records.len() >= 5);
    for r in records {
        wait_for(
            &format!("rule {r} to have data"),
            Duration::from_secs(300),
            || !query(prom, r).is_empty(),
        );
    }
    // The rules loaded without errors.
    let body = http_get10(prom, "/api/v1/rules");
    let v: Value = serde_json::from_str(&body).unwrap();
    for g in v["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_eq!(r["health"], "ok", "{r}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
