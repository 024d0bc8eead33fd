//! Live migration (pre-copy) between two `vmm` processes on this machine:
//! a guest writing its pattern is moved while it writes, over a Unix
//! socket and over TCP loopback, and the destination's guest verifies every
//! page; a source with the wrong key is refused by the destination and
//! runs on; a destination lost in the middle of pre-copy leaves the source
//! running as if nothing happened, and a second migration is refused while
//! one runs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::{guest, run_with, spawn_lines, vmm, Run};
use serde_json::Value;

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-mig-{name}-{}", std::process::id()))
}

/// A key file (mode 600) with these bytes.
fn key(name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A `vmm` process and its output lines.
struct Proc {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut c = vmm();
        c.args(args);
        let (child, out, err) = spawn_lines(c);
        Proc { child, out, err }
    }

    /// Wait for the process to end: (status, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let status = wait_child(&mut self.child, Duration::from_secs(300));
        let out: Vec<String> = self.out.iter().collect();
        let err: Vec<String> = self.err.iter().collect();
        (status, out.join("\n"), err.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A destination waiting on `addr`.
fn destination(addr: &str, key: &Path) -> Proc {
    let d = Proc::spawn(&[
        "run",
        "--incoming",
        addr,
        "--migration-key",
        key.to_str().unwrap(),
    ]);
    let line = d
        .err
        .recv_timeout(Duration::from_secs(30))
        .expect("the destination says where it waits");
    assert!(line.contains("waiting for a migration on"), "{line}");
    d
}

/// A source running `guest` with `cmdline`, its API on a socket.
fn source(name: &str, vcpus: &str, guest_name: &str, cmdline: &str) -> (Proc, PathBuf) {
    let socket = tmp(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let p = Proc::spawn(&[
        "run",
        "--vcpus",
        vcpus,
        "--mem",
        "1G",
        "--kernel",
        guest(guest_name).to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    common::wait_for("the source's API", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    (p, socket)
}

fn get(socket: &Path, path: &str) -> Value {
    let (status, body) = common::unix_http(socket, "GET", path, "", Duration::from_secs(30));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn wait_resident(socket: &Path, mib: f64) {
    common::wait_for("guest memory to fill", Duration::from_secs(120), || {
        get(socket, "/vm")["memory"]["resident_mib"]
            .as_f64()
            .unwrap_or(0.0)
            >= mib
    });
}

/// `vmm ctl migrate start` (JSON).
fn migrate(socket: &Path, to: &str, key: &Path, extra: &[&str]) -> Run {
    let mut c = vmm();
    c.arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(["--json", "migrate", "start", "--to", to, "--key"])
        .arg(key)
        .args(extra);
    run_with(c, Duration::from_secs(600))
}

/// The child's exit status; kill it after `limit`.
fn wait_child(c: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = c.kill();
            panic!("vmm did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const TOUCH: &str = "bytes=900M stride=4096 seed=3";

/// Moved while it writes, the guest finds every page it wrote on the
/// destination; the source ends saying where its VM went.
#[test]
fn a_guest_migrated_while_writing_finds_every_page() {
    let k = key("key", b"a key both sides hold, 32 bytes!");
    let port = free_tcp_port();
    let unix = format!("unix:{}", tmp("dst.sock").display());
    for (addr, vcpus) in [
        (unix.as_str(), "1"),
        (&format!("tcp:127.0.0.1:{port}"), "2"),
    ] {
        common::say(&format!("migrating over {addr}"));
        let dst = destination(addr, &k);
        let (src, socket) = source("writer", vcpus, "touch", TOUCH);
        wait_resident(&socket, 96.0);
        let r = migrate(&socket, addr, &k, &[]);
        r.assert_ok();
        let status: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(status["state"], "done", "{status}");
        let rounds = status["pages_per_round"].as_array().unwrap();
        assert!(
            rounds.len() >= 2 && rounds[0].as_u64().unwrap() > 20_000,
            "a first round of what was resident, then what changed: {status}"
        );
        let downtime = status["downtime_ms"].as_f64().unwrap();
        assert!(
            downtime > 0.0 && downtime < status["total_ms"].as_f64().unwrap(),
            "{status}"
        );
        let (s_status, s_out, s_err) = src.finish();
        assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
        assert!(s_err.contains(&format!("migrated to {addr}")), "{s_err}");
        assert!(
            !s_out.contains("touch: OK"),
            "the source finished it: {s_out}"
        );
        let (d_status, d_out, d_err) = dst.finish();
        assert_eq!(d_status, Some(0), "{addr}:\n{d_out}\n{d_err}");
        assert!(
            d_out.contains("touch: OK") && d_out.contains("errors=0"),
            "{addr}: the destination's guest verifies every page:\n{d_out}\n{d_err}"
        );
        assert!(d_err.contains("the VM runs here"), "{d_err}");
    }
}

/// The destination refuses a source without its key (and ends, saying
/// so); the source runs on to its end.
#[test]
fn a_source_with_the_wrong_key_is_refused_and_runs_on() {
    let good = key("good", b"the destination's own key......");
    let wrong = key("wrong", b"not the key the destination has.");
    let addr = format!("unix:{}", tmp("refuse-dst.sock").display());
    let dst = destination(&addr, &good);
    let (src, socket) = source("refused", "1", "touch", "bytes=256M stride=4096");
    let r = migrate(&socket, &addr, &wrong, &[]);
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
    assert_eq!(get(&socket, "/vm/migrate")["state"], "failed");
    let (d_status, _, d_err) = dst.finish();
    assert_ne!(d_status, Some(0));
    assert!(d_err.contains("authentication failed"), "{d_err}");
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(s_out.contains("touch: OK"), "the source runs on: {s_out}");
    // A bad address or a key file others can read: refused before any
    // connection.
    let (src, socket) = source("bad-input", "1", "touch", "bytes=64M stride=4096");
    let r = migrate(&socket, "udp:1.2.3.4:5", &good, &[]);
    assert!(
        r.stderr.contains("expected tcp:HOST:PORT or unix:PATH"),
        "{}",
        r.stderr
    );
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = migrate(&socket, &addr, &good, &[]);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    let (s_status, s_out, _) = src.finish();
    assert_eq!(s_status, Some(0));
    assert!(s_out.contains("touch: OK"));
}

/// The destination stops answering in the middle of pre-copy (stopped
/// with SIGSTOP, the stream backs up) and is then killed: the migration
/// fails, a second one is refused while the first runs, and the source's
/// guest goes on to verify every page.
#[test]
fn a_destination_lost_in_precopy_leaves_the_source_running() {
    let k = key("lost", b"a key for the lost destination..");
    let addr = format!("unix:{}", tmp("lost-dst.sock").display());
    let mut dst = destination(&addr, &k);
    let (src, socket) = source("lost", "1", "touch", TOUCH);
    wait_resident(&socket, 200.0);
    let (s2, a2, k2) = (socket.clone(), addr.clone(), k.clone());
    let first = std::thread::spawn(move || migrate(&s2, &a2, &k2, &[]));
    common::wait_for("pre-copy", Duration::from_secs(60), || {
        get(&socket, "/vm/migrate")["state"] == "precopy"
    });
    let pid = dst.child.id() as i32;
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let second = migrate(&socket, &addr, &k, &[]);
    assert_ne!(second.status, Some(0));
    assert!(
        second.stderr.contains("running already"),
        "{}",
        second.stderr
    );
    assert_eq!(get(&socket, "/vm/migrate")["state"], "precopy");
    dst.child.kill().unwrap();
    let r = first.join().unwrap();
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    let s = get(&socket, "/vm/migrate");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(
        s_out.contains("touch: OK") && s_out.contains("errors=0"),
        "the source's guest runs on and verifies every page:\n{s_out}"
    );
    assert!(s_err.contains("the VM runs on"), "{s_err}");
}
