//! The metrics endpoint against a running 2-vCPU guest on real KVM.
//!
//! The guests (`memstress hold=1`) stay up after their rounds, and a test
//! that must see them mid-run has them wait (`wait_after=R`) for a byte on
//! their serial port (the `vmm`'s stdin): no scrape races a guest's speed.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{guest, spawn_lines, vmm};

/// A `vmm run` with metrics on an ephemeral port; stdout lines and the
/// metrics address are collected as they appear.
struct Live {
    child: Child,
    /// The guest's serial input.
    stdin: ChildStdin,
    addr: SocketAddr,
    stdout: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Live {
    fn start(cmdline: &str) -> Live {
        let mut c = vmm();
        c.args([
            "run",
            "--vcpus",
            "2",
            "--mem",
            "256M",
            "--fault-mode",
            host_mode().name(),
            "--metrics-addr",
            "127.0.0.1:0",
            // One page per fault: pages installed then equal pages touched
            // exactly (fault-around may run a window past the region).
            "--fault-around",
            "1",
        ])
        .arg("--kernel")
        .arg(guest("memstress"))
        .args(["--cmdline", cmdline])
        .stdin(Stdio::piped());
        let (mut child, rx, err) = spawn_lines(c);
        let stdin = child.stdin.take().unwrap();
        let (atx, arx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in err {
                if let Some(a) = line.strip_prefix("vmm: metrics on http://") {
                    let _ = atx.send(
                        a.trim_end_matches("/metrics")
                            .parse::<SocketAddr>()
                            .unwrap(),
                    );
                }
            }
        });
        let addr = arx
            .recv_timeout(Duration::from_secs(30))
            .expect("metrics address");
        Live {
            child,
            stdin,
            addr,
            stdout: rx,
            seen: Vec::new(),
        }
    }

    /// A byte on the guest's serial port: it goes on from its wait.
    fn go_on(&mut self) {
        self.stdin
            .write_all(b"g")
            .and_then(|()| self.stdin.flush())
            .expect("a byte to the guest's serial port");
    }

    /// Wait for a stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Ok(l) = self
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(l.clone());
            if l.starts_with(prefix) {
                return l;
            }
        }
        panic!("no line {prefix:?}; saw {:?}", self.seen);
    }

    fn poll_lines(&mut self) {
        while let Ok(l) = self.stdout.try_recv() {
            self.seen.push(l);
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`; (status, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    common::http_exchange(s, method, path, "")
}

/// Pages installed by every fault-serving thread (vCPUs, handlers, others).
fn installed_total(m: &BTreeMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("vmm_pages_installed_total{"))
        .map(|(_, v)| v)
        .sum()
}

/// The fault mode this host auto-selects.
fn host_mode() -> vmm::config::FaultMode {
    common::inproc::host_mode()
}

/// Samples of a text exposition: "name{labels}" -> value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

const PER_VCPU: &[&str] = &[
    "vmm_faults_total{vcpu=\"N\",kind=\"mmio\"}",
    "vmm_speculative_installs_total{vcpu=\"N\"}",
    "vmm_fault_retries_total{vcpu=\"N\"}",
    "vmm_slow_path_installs_total{vcpu=\"N\"}",
    "vmm_already_present_total{vcpu=\"N\"}",
    "vmm_pages_installed_total{vcpu=\"N\"}",
    "vmm_source_read_bytes_total{vcpu=\"N\"}",
    "vmm_exits_total{vcpu=\"N\",reason=\"io\"}",
    "vmm_exits_total{vcpu=\"N\",reason=\"mmio\"}",
    "vmm_fault_latency_seconds_count{vcpu=\"N\"}",
    "vmm_fault_latency_seconds_sum{vcpu=\"N\"}",
    "vmm_fault_latency_seconds_bucket{le=\"+Inf\",vcpu=\"N\"}",
];

/// One scrape of `/metrics`: every per-vCPU and VM series is there, and
/// no counter went down since `prev`.
fn scrape(addr: SocketAddr, prev: Option<&BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
    let (status, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200);
    let m = samples(&body);
    for vcpu in ["0", "1"] {
        for key in PER_VCPU {
            get(&m, &key.replace('N', vcpu));
        }
    }
    for key in [
        "vmm_memslot_generation",
        "vmm_memslot_changes_total",
        "vmm_resident_pages",
        "vmm_discarded_pages_total",
    ] {
        get(&m, key);
    }
    get(
        &m,
        &format!("vmm_fault_mode{{mode=\"{}\"}}", host_mode().name()),
    );
    if let Some(prev) = prev {
        for (k, v) in prev {
            if k.contains("_total") || k.contains("_count") || k.contains("_bucket") {
                assert!(get(&m, k) >= *v, "{k} went down: {v} -> {}", get(&m, k));
            }
        }
    }
    m
}

#[test]
fn scrapes_of_a_running_guest() {
    // The guest waits after its first round: the scrapes then see it
    // mid-run, on any host; told to go on, it runs 29 more rounds under
    // scrapes.
    let mut live = Live::start("mode=0 rounds=30 bytes=96M stride=4096 hold=1 wait_after=1");
    live.wait_line("memstress: waiting after round=1");
    let mut last: Option<BTreeMap<String, f64>> = None;
    for _ in 0..3 {
        let m = scrape(live.addr, last.as_ref());
        assert!(
            installed_total(&m) > 0.0,
            "a scrape mid-run counts the pages the first round installed"
        );
        last = Some(m);
    }
    live.go_on();
    let limit = Duration::from_secs(600);
    let deadline = Instant::now() + limit;
    let mut progress = common::Progress::new("memstress: done", limit);
    loop {
        live.poll_lines();
        let done = live.seen.iter().any(|l| l.starts_with("memstress: done"));
        last = Some(scrape(live.addr, last.as_ref()));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest did not finish: {:?}",
            live.seen
        );
        progress.tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = live.wait_line("memstress: done");
    let words: f64 = done
        .split_whitespace()
        .find_map(|t| t.strip_prefix("words="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(done.contains("bad=0"), "{done}");
    // Final scrape of the finished (halted, still live) guest.
    let m = scrape(live.addr, last.as_ref());
    assert_eq!(
        installed_total(&m),
        words,
        "pages installed over all fault-serving threads != pages the guest touched"
    );
    for v in ["0", "1"] {
        // A vCPU never serves a userfaultfd event (handler threads do): a
        // series that could never move is not exported.
        let userfault = format!("vmm_faults_total{{vcpu=\"{v}\",kind=\"userfault\"}}");
        assert!(!m.contains_key(&userfault), "{userfault} is exported");
        let faults: f64 = ["mmio", "emulation_failure", "memory_fault", "sigbus"]
            .iter()
            .map(|k| {
                get(
                    &m,
                    &format!("vmm_faults_total{{vcpu=\"{v}\",kind=\"{k}\"}}"),
                )
            })
            .sum();
        let count = get(
            &m,
            &format!("vmm_fault_latency_seconds_count{{vcpu=\"{v}\"}}"),
        );
        assert_eq!(count, faults, "vCPU {v}: histogram count != faults");
        let inf = get(
            &m,
            &format!("vmm_fault_latency_seconds_bucket{{le=\"+Inf\",vcpu=\"{v}\"}}"),
        );
        assert_eq!(inf, count);
    }
    // JSON carries the same numbers.
    let (status, json) = http(live.addr, "GET", "/metrics.json");
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let jsum: u64 = ["vcpus", "handlers"]
        .iter()
        .flat_map(|k| j[k].as_array().unwrap().iter())
        .map(|v| v["pages_installed"].as_u64().unwrap())
        .sum();
    assert_eq!(jsum as f64, words);
    assert_eq!(j["fault_mode"], host_mode().name());
    assert_eq!(http(live.addr, "GET", "/healthz").0, 200);
}

#[test]
fn unknown_paths_and_methods() {
    let live = Live::start("mode=0 rounds=1 bytes=8M hold=1");
    assert_eq!(http(live.addr, "GET", "/nope").0, 404);
    assert_eq!(http(live.addr, "GET", "/").0, 404);
    assert_eq!(http(live.addr, "POST", "/metrics").0, 405);
    assert_eq!(http(live.addr, "DELETE", "/healthz").0, 405);
    assert_eq!(http(live.addr, "GET", "/healthz").0, 200);
}

#[test]
fn bad_clients_do_not_hurt_the_vm_or_other_scrapes() {
    let mut live = Live::start("mode=0 rounds=40 bytes=64M stride=4096 hold=1");
    // Half a request, then silence, on several connections.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(live.addr).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    // A scrape is answered while every stalled client still waits with
    // its half request: the server has neither answered nor dropped any
    // of them (a read on each would block), so the scrape did not wait
    // for them to be given up on.
    assert_eq!(http(live.addr, "GET", "/metrics").0, 200);
    for (i, s) in stalled.iter().enumerate() {
        s.set_nonblocking(true).unwrap();
        let r = (&*s).read(&mut [0u8; 1]);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "stalled client {i} was answered or dropped before the scrape was answered: {r:?}"
        );
        s.set_nonblocking(false).unwrap();
    }
    // Oversized headers: rejected or closed, never a crash.
    {
        let mut s = TcpStream::connect(live.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let big = "a".repeat(64 * 1024);
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
        );
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    assert_eq!(http(live.addr, "GET", "/metrics").0, 200);
    // A burst of 1,000 requests from 4 threads: every one answered.
    let addr = live.addr;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                (0..250)
                    .filter(|_| http(addr, "GET", "/healthz").0 == 200)
                    .count()
            })
        })
        .collect();
    let ok: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(ok, 1000);
    assert_eq!(http(live.addr, "GET", "/metrics").0, 200);
    drop(stalled);
    // The guest was unaffected: it finished every round correctly.
    let done = live.wait_line("memstress: done");
    assert!(done.contains("bad=0"), "{done}");
}
