//! Live migration (pre-copy) between two `vmm` processes on this machine:
//! a guest writing its pattern is moved while it writes, over a Unix
//! socket and over TCP loopback, and the destination's guest verifies every
//! page; a source with the wrong key is refused by the destination and
//! runs on; a destination lost in the middle of pre-copy leaves the source
//! running as if nothing happened, and a second migration is refused while
//! one runs.
//!
//! The writer (`touch loop=1`) never ends by itself: it writes pass after
//! pass, each checking the last one's values, until a byte arrives on its
//! serial port (the `vmm`'s stdin), then verifies every page. A test says
//! stop only after the event it waits for (the migration done, refused,
//! failed), so no outcome depends on how fast the host runs the guest.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
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

/// A `vmm` process, its output lines, and its stdin (the guest's serial
/// input).
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut c = vmm();
        c.args(args).stdin(Stdio::piped());
        let (mut child, out, err) = spawn_lines(c);
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            out,
            err,
        }
    }

    /// A byte on the guest's serial port: `touch loop=1` ends its pass,
    /// verifies every page and ends the VM. (A `vmm` that ended already
    /// cannot take it: what it printed says why.)
    fn stop_guest(&mut self) {
        let w = self.stdin.as_mut().expect("the vmm's stdin");
        let _ = w.write_all(b"s").and_then(|()| w.flush());
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
    destination_with(addr, key, &[])
}

fn destination_with(addr: &str, key: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "run",
        "--incoming",
        addr,
        "--migration-key",
        key.to_str().unwrap(),
    ];
    args.extend(extra);
    let d = Proc::spawn(&args);
    let line = d
        .err
        .recv_timeout(Duration::from_secs(30))
        .expect("the destination says where it waits");
    assert!(line.contains("waiting for a migration on"), "{line}");
    d
}

/// A source running `guest` with `cmdline`, its API on a socket.
fn source(name: &str, vcpus: &str, guest_name: &str, cmdline: &str) -> (Proc, PathBuf) {
    source_with(name, vcpus, guest_name, cmdline, &[])
}

fn source_with(
    name: &str,
    vcpus: &str,
    guest_name: &str,
    cmdline: &str,
    extra: &[&str],
) -> (Proc, PathBuf) {
    let socket = tmp(&format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let guest = guest(guest_name);
    let mut args = vec![
        "run",
        "--vcpus",
        vcpus,
        "--mem",
        "1G",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--api-socket",
        socket.to_str().unwrap(),
    ];
    args.extend(extra);
    let p = Proc::spawn(&args);
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

/// A writer over 900 MiB, one word per page, that runs until told to stop.
const TOUCH: &str = "bytes=900M stride=4096 seed=3 loop=1";

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
        // A writer that rewrites every page between two rounds need not
        // converge: five rounds after the first, then the stop sends what
        // changed since the last.
        let r = migrate(&socket, addr, &k, &["--max-rounds", "5"]);
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
        moved_and_verified(src, dst, addr);
    }
}

/// The migration is done (its `vmm ctl` said so): the destination's guest
/// is told to stop and verifies every page; the source ended saying where
/// its VM went, without finishing the `touch` guest.
fn moved_and_verified(src: Proc, mut dst: Proc, addr: &str) {
    dst.stop_guest();
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

/// `--dirty-log ring`: KVM's dirty ring in place of the bitmap. A writer
/// moved while it writes finds every page on the destination. Each vCPU
/// writes over fewer pages (8,192) than its ring holds, so no host needs
/// to stop a vCPU for a full ring: hardware KVM logs a page once until the
/// harvest resets it, whatever the number of passes. (A PVM host takes an
/// entry per store and does not stop the vCPU in time, so there the ring
/// is refused unless forced; there a round of this region takes well
/// under the eight passes of a vCPU that would fill its ring: measured on
/// the PVM dev host, ~35,000 entries a round over both rings.)
#[test]
fn the_dirty_ring_moves_a_writer_without_losing_a_page() {
    let k = key("ring-key", b"a key both sides hold, 32 bytes!");
    let addr = format!("unix:{}", tmp("ring-dst.sock").display());
    let dst = destination(&addr, &k);
    let (src, socket) = source_with(
        "ring",
        "2",
        "touch",
        "bytes=64M stride=4096 seed=5 loop=1",
        &["--dirty-log", "ring:65536", "--force-dirty-ring"],
    );
    wait_resident(&socket, 32.0);
    let r = migrate(&socket, &addr, &k, &[]);
    r.assert_ok();
    let status: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["dirty_log"], "ring:65536", "{status}");
    assert_eq!(status["dirty_ring_lost"], 0, "{status}");
    let rounds = status["pages_per_round"].as_array().unwrap();
    assert!(
        rounds.len() >= 2 && rounds[1].as_u64().unwrap() > 0,
        "rounds of what the ring logged: {status}"
    );
    moved_and_verified(src, dst, &addr);
}

/// A ring of 1,024 entries against a writer of 115,200 pages per vCPU and
/// pass: what happens is the host's to say, and the test asks which host
/// this is. Hardware KVM stops a vCPU whose ring is full (an exit the VMM
/// harvests on that vCPU's thread), so the guest moves whole: the rings
/// filled, nothing was lost, every page is found on the destination. PVM
/// writes past the ring and its count of the ring never comes down (see
/// docs/FAULT-PATH.md "Dirty log"): the vCPU can never run again, and the
/// source ends with that reason, never a hang; the destination runs
/// nothing.
#[test]
fn a_small_dirty_ring_ends_clearly_where_the_host_overflows_it_and_loses_nothing_elsewhere() {
    let overflows = vmm::host::detect_flavor() == vmm::host::KvmFlavor::Pvm;
    let k = key("small-ring-key", b"a key both sides hold, 32 bytes!");
    let addr = format!("unix:{}", tmp("small-ring-dst.sock").display());
    let dst = destination(&addr, &k);
    let (src, socket) = source_with(
        "small-ring",
        "2",
        "touch",
        TOUCH,
        &["--dirty-log", "ring:1024", "--force-dirty-ring"],
    );
    wait_resident(&socket, 96.0);
    let r = migrate(&socket, &addr, &k, &["--max-rounds", "5"]);
    if !overflows {
        common::say("hardware KVM stops a vCPU whose ring is full: the guest moves whole");
        r.assert_ok();
        let status: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(status["state"], "done", "{status}");
        assert!(
            status["dirty_ring_full"].as_u64().unwrap() > 0,
            "the vCPUs exited for full rings: {status}"
        );
        assert_eq!(status["dirty_ring_lost"], 0, "{status}");
        moved_and_verified(src, dst, &addr);
        return;
    }
    common::say("PVM writes past the ring: the source ends saying why");
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    let (s_status, s_out, s_err) = src.finish();
    assert_ne!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(
        s_err.contains("exits for a full dirty ring with nothing to harvest")
            && s_err.contains("use --dirty-log bitmap"),
        "the source says why it ended:\n{s_err}"
    );
    assert!(!s_out.contains("touch: OK"), "{s_out}");
    let (d_status, _, d_err) = dst.finish();
    assert_ne!(d_status, Some(0), "{d_err}");
    assert!(
        !d_err.contains("the VM runs here"),
        "no VM runs from a migration cut short: {d_err}"
    );
}

/// The destination refuses a source without its key (and ends, saying
/// so); the source runs on, and its guest, told to stop after the
/// refusals, verifies every page.
#[test]
fn a_source_with_the_wrong_key_is_refused_and_runs_on() {
    let good = key("good", b"the destination's own key......");
    let wrong = key("wrong", b"not the key the destination has.");
    let addr = format!("unix:{}", tmp("refuse-dst.sock").display());
    let dst = destination(&addr, &good);
    let (mut src, socket) = source("refused", "1", "touch", "bytes=256M stride=4096 loop=1");
    let r = migrate(&socket, &addr, &wrong, &[]);
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
    assert_eq!(get(&socket, "/vm/migrate")["state"], "failed");
    let (d_status, _, d_err) = dst.finish();
    assert_ne!(d_status, Some(0));
    assert!(d_err.contains("authentication failed"), "{d_err}");
    src.stop_guest();
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(
        s_out.contains("touch: OK") && s_out.contains("errors=0"),
        "the source runs on: {s_out}"
    );
    // A bad address or a key file others can read: refused before any
    // connection.
    let (mut src, socket) = source("bad-input", "1", "touch", "bytes=64M stride=4096 loop=1");
    let r = migrate(&socket, "udp:1.2.3.4:5", &good, &[]);
    assert!(
        r.stderr.contains("expected tcp:HOST:PORT or unix:PATH"),
        "{}",
        r.stderr
    );
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = migrate(&socket, &addr, &good, &[]);
    assert!(r.stderr.contains("chmod 600"), "{}", r.stderr);
    assert_eq!(
        get(&socket, "/vm/migrate")["state"],
        "idle",
        "nothing started"
    );
    src.stop_guest();
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(s_out.contains("touch: OK"), "{s_out}");
}

/// The destination all but stops reading in the middle of pre-copy (a
/// relay carries the first 16 MiB of a first round of 200 MiB or more,
/// then a trickle: the round cannot end while the test looks) and is then
/// killed: the migration fails, a second one is refused while the first
/// runs, and the source's guest, told to stop after all that, verifies
/// every page.
#[test]
fn a_destination_lost_in_precopy_leaves_the_source_running() {
    let k = key("lost", b"a key for the lost destination..");
    let port = free_tcp_port();
    let mut dst = destination(&format!("tcp:127.0.0.1:{port}"), &k);
    let relay = Relay::new(port, Carry::TrickleAfter(16 << 20));
    let via = format!("tcp:127.0.0.1:{}", relay.port);
    let (mut src, socket) = source("lost", "1", "touch", TOUCH);
    wait_resident(&socket, 200.0);
    let (s2, a2, k2) = (socket.clone(), via.clone(), k.clone());
    let first = std::thread::spawn(move || migrate(&s2, &a2, &k2, &[]));
    common::wait_for("pre-copy to carry 16 MiB", Duration::from_secs(120), || {
        assert!(!first.is_finished(), "the migration ended");
        relay.bytes.load(Ordering::Relaxed) >= 16 << 20
    });
    assert_eq!(get(&socket, "/vm/migrate")["state"], "precopy");
    let second = migrate(&socket, &via, &k, &[]);
    assert_ne!(second.status, Some(0));
    assert!(
        second.stderr.contains("running already"),
        "{}",
        second.stderr
    );
    assert_eq!(get(&socket, "/vm/migrate")["state"], "precopy");
    dst.child.kill().unwrap();
    relay.cut();
    let r = first.join().unwrap();
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    let s = get(&socket, "/vm/migrate");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().is_some_and(|e| !e.is_empty()), "{s}");
    src.stop_guest();
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(
        s_out.contains("touch: OK") && s_out.contains("errors=0"),
        "the source's guest runs on and verifies every page:\n{s_out}"
    );
    assert!(s_err.contains("the VM runs on"), "{s_err}");
}

/// Post-copy: the guest runs on the destination at once, before its
/// pages; each first touch of a missing page is asked of the source and
/// the rest are pushed. Every page the guest wrote on the source is there
/// (its passes on the destination check each page before rewriting it,
/// and once the migration is done and it is told to stop it verifies them
/// all), and `auto` falls back to post-copy when pre-copy does not
/// converge.
#[test]
fn postcopy_runs_the_guest_at_once_and_every_page_follows() {
    let k = key("post", b"a key for the post-copy tests...");
    let port = free_tcp_port();
    let unix = format!("unix:{}", tmp("post-dst.sock").display());
    let tcp = format!("tcp:127.0.0.1:{port}");
    for (addr, vcpus, mode) in [
        (unix.as_str(), "1", "postcopy"),
        (tcp.as_str(), "2", "postcopy"),
        (unix.as_str(), "2", "auto"),
    ] {
        common::say(&format!("{mode} over {addr}, {vcpus} vCPUs"));
        let dst = destination(addr, &k);
        let (src, socket) = source("post", vcpus, "touch", TOUCH);
        // Post-copy: every page written on the source (the first pass
        // done), so that each page the guest's next pass checks on the
        // destination is one post-copy owes: the pass reads pages ahead
        // of the push (which goes up from the lowest), and asks for them.
        wait_resident(&socket, if mode == "auto" { 96.0 } else { 900.0 });
        let extra: &[&str] = if mode == "auto" {
            &["--mode", "auto", "--max-rounds", "1", "--max-downtime", "1"]
        } else {
            // The push held to 100 MiB/s: the guest reads most pages
            // before they would come unasked.
            &["--mode", "postcopy", "--max-postcopy-bandwidth", "100"]
        };
        let r = migrate(&socket, addr, &k, extra);
        let mut dst = dst;
        if r.status == Some(0) {
            dst.stop_guest();
        } else {
            let _ = dst.child.kill();
        }
        let (d_status, d_out, d_err) = dst.finish();
        assert!(
            d_out.contains("touch: OK") && d_out.contains("errors=0"),
            "{addr}: the destination's guest verifies every page:\n{d_out}\n{d_err}"
        );
        assert_eq!(d_status, Some(0), "{addr}:\n{d_out}\n{d_err}");
        assert!(d_err.contains("post-copy complete"), "{d_err}");
        r.assert_ok();
        let (s_status, s_out, s_err) = src.finish();
        assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
        assert!(s_err.contains(&format!("migrated to {addr}")), "{s_err}");
        let s: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(
            (s["state"].as_str(), s["mode"].as_str()),
            (Some("done"), Some(mode)),
            "{s}"
        );
        let pending = s["pages_pending"].as_u64().unwrap();
        let (asked, pushed) = (
            s["pages_requested"].as_u64().unwrap(),
            s["pages_pushed"].as_u64().unwrap(),
        );
        assert!(pending > 1000, "pages left for post-copy: {s}");
        if mode == "postcopy" {
            // (auto's pending pages are the last round's: the guest has
            // moved past them, and the push may beat every touch.)
            assert!(
                asked > 0 && s["requests"].as_u64().unwrap() > 0,
                "the destination asked: {s}"
            );
        }
        assert!(
            asked + pushed >= pending,
            "every pending page went, asked or pushed: {s}"
        );
        if mode == "auto" {
            assert_eq!(
                s["pages_per_round"].as_array().unwrap().len(),
                3,
                "rounds 0 and 1, then the stop: {s}"
            );
        } else {
            assert!(pending > 20_000, "nothing was sent before the stop: {s}");
        }
    }
}

/// What a [`Relay`] does with the bytes towards the destination.
#[derive(Clone, Copy)]
enum Carry {
    /// The first N, then it cuts every connection it carries.
    CutAfter(u64),
    /// The first N, then 64 KiB every 50 ms: a peer that all but stopped
    /// reading, whose sender never waits long enough to give up.
    TrickleAfter(u64),
}

/// A TCP relay to `to`, cut by the test or at a byte count (so where a
/// stream breaks is the test's to say, not the speed of either side).
struct Relay {
    port: u16,
    /// Bytes carried towards `to`.
    bytes: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

fn cut_all(conns: &Mutex<Vec<std::net::TcpStream>>) {
    for c in conns.lock().unwrap().drain(..) {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
}

impl Relay {
    fn new(to: u16, carry: Carry) -> Relay {
        use std::net::TcpStream;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let bytes = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let cut = Arc::new(AtomicBool::new(false));
        let (b, c) = (bytes.clone(), conns.clone());
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                let Ok(d) = TcpStream::connect(("127.0.0.1", to)) else {
                    return;
                };
                c.lock()
                    .unwrap()
                    .extend([a.try_clone().unwrap(), d.try_clone().unwrap()]);
                let copy = |mut from: TcpStream, mut to: TcpStream, towards_dst: bool| {
                    let (b, c, cut) = (b.clone(), c.clone(), cut.clone());
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            let carried = b.load(Ordering::Relaxed);
                            let want = match carry {
                                Carry::CutAfter(n) if towards_dst && carried >= n => {
                                    if !cut.swap(true, Ordering::Relaxed) {
                                        cut_all(&c);
                                    }
                                    break;
                                }
                                Carry::TrickleAfter(n) if towards_dst && carried >= n => {
                                    std::thread::sleep(Duration::from_millis(50));
                                    buf.len()
                                }
                                _ => buf.len(),
                            };
                            let n = match from.read(&mut buf[..want]) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if towards_dst {
                                b.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                copy(a.try_clone().unwrap(), d.try_clone().unwrap(), true);
                copy(d, a, false);
            }
        });
        Relay { port, bytes, conns }
    }

    fn cut(&self) {
        cut_all(&self.conns);
    }
}

/// The connection breaks in the middle of post-copy (a relay cuts it once
/// it carried 200 MiB of the ~700 MiB or more post-copy owes): the source
/// says it is paused and keeps its stopped VM; the destination's vCPUs
/// that need a missing page wait, and it listens again; `migrate recover`
/// resumes it, and the destination's guest, told to stop once every page
/// came, finds every page.
#[test]
fn a_postcopy_cut_in_the_middle_waits_and_recovers() {
    let k = key("recover", b"a key for the recovery test.....");
    let port = free_tcp_port();
    let addr = format!("tcp:127.0.0.1:{port}");
    let dst_api = tmp("recover-dst-api.sock");
    let _ = std::fs::remove_file(&dst_api);
    let dst = destination_with(&addr, &k, &["--api-socket", dst_api.to_str().unwrap()]);
    let relay = Relay::new(port, Carry::CutAfter(200 << 20));
    let (src, socket) = source("recover", "2", "touch", TOUCH);
    // Most of it resident: post-copy has ~700 MiB to carry (the stream
    // before the guest runs there holds only page tables and holes).
    wait_resident(&socket, 700.0);
    let via = format!("tcp:127.0.0.1:{}", relay.port);
    let r = migrate(&socket, &via, &k, &["--mode", "postcopy"]);
    assert!(
        relay.bytes.load(Ordering::Relaxed) >= 200 << 20,
        "the relay cut it: {}",
        r.stderr
    );
    assert_ne!(r.status, Some(0), "{}", r.stdout);
    assert!(r.stderr.contains("post-copy paused"), "{}", r.stderr);
    let s = get(&socket, "/vm/migrate");
    assert_eq!(s["state"], "postcopy-paused", "{s}");
    // The destination says so too, and its metrics count what came.
    common::wait_for(
        "the destination to see the cut",
        Duration::from_secs(30),
        || get(&dst_api, "/vm/migrate")["incoming"]["state"] == "paused",
    );
    let d = get(&dst_api, "/vm/migrate")["incoming"].clone();
    assert!(d["pages_left"].as_u64().unwrap() > 0, "{d}");
    assert!(d["requests"].as_u64().unwrap() > 0, "{d}");
    let m = get(&dst_api, "/vm/metrics");
    assert_eq!(
        m["migration"]["incoming"]["pages_left"], d["pages_left"],
        "{m}"
    );
    // A recovery to nowhere fails and leaves it paused.
    let mut c = vmm();
    c.arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["migrate", "recover", "--to", "unix:/nonexistent/x", "--key"])
        .arg(&k);
    let bad = run_with(c, Duration::from_secs(60));
    assert_ne!(bad.status, Some(0), "{}", bad.stdout);
    common::wait_for("the failed recovery", Duration::from_secs(30), || {
        get(&socket, "/vm/migrate")["error"]
            .as_str()
            .is_some_and(|e| e.contains("recovery"))
    });
    assert_eq!(get(&socket, "/vm/migrate")["state"], "postcopy-paused");
    let mut c = vmm();
    c.arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["--json", "migrate", "recover", "--to", &addr, "--key"])
        .arg(&k);
    let r = run_with(c, Duration::from_secs(600));
    if r.status != Some(0) {
        let (mut src, mut dst) = (src, dst);
        let _ = (src.child.kill(), dst.child.kill());
        let (_, _, se) = src.finish();
        let (_, _, de) = dst.finish();
        panic!(
            "recovery failed: {}\n{}\nsource:\n{se}\ndestination:\n{de}",
            r.stdout, r.stderr
        );
    }
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["state"], "done", "{s}");
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    assert!(s_err.contains("post-copy resumed"), "{s_err}");
    let mut dst = dst;
    dst.stop_guest();
    let (d_status, d_out, d_err) = dst.finish();
    assert_eq!(d_status, Some(0), "{d_out}\n{d_err}");
    assert!(
        d_err.contains("post-copy paused") && d_err.contains("post-copy resumed"),
        "{d_err}"
    );
    assert!(
        d_out.contains("touch: OK") && d_out.contains("errors=0"),
        "the destination's guest verifies every page:\n{d_out}\n{d_err}"
    );
}

/// A post-copy in the middle, for tests that act on the destination while
/// pages are still coming.
struct SlowPostcopy {
    src: Proc,
    dst: Proc,
    dst_api: PathBuf,
    mig: std::thread::JoinHandle<Run>,
}

/// A source running `src_args` (its API on a socket) and a destination
/// with its own API; once `ready(source, its API)` returns, a post-copy
/// with the push held to 8 MiB/s starts (in a thread), and this returns
/// when the VM runs on the destination.
fn slow_postcopy(name: &str, src_args: &[&str], ready: impl FnOnce(&Proc, &Path)) -> SlowPostcopy {
    let k = key(name, b"a key for a slow post-copy test..");
    let addr = format!("unix:{}", tmp(&format!("{name}-dst.sock")).display());
    let dst_api = tmp(&format!("{name}-dst-api.sock"));
    let _ = std::fs::remove_file(&dst_api);
    let dst = destination_with(&addr, &k, &["--api-socket", dst_api.to_str().unwrap()]);
    let socket = tmp(&format!("{name}-src.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut args = vec!["run"];
    args.extend(src_args);
    args.extend(["--api-socket", socket.to_str().unwrap()]);
    let src = Proc::spawn(&args);
    common::wait_for("the source's API", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    ready(&src, &socket);
    let mig = std::thread::spawn(move || {
        migrate(
            &socket,
            &addr,
            &k,
            &["--mode", "postcopy", "--max-postcopy-bandwidth", "8"],
        )
    });
    common::wait_for(
        "the VM to run on the destination",
        Duration::from_secs(60),
        || {
            std::os::unix::net::UnixStream::connect(&dst_api).is_ok()
                && !get(&dst_api, "/vm/migrate")["incoming"].is_null()
        },
    );
    SlowPostcopy {
        src,
        dst,
        dst_api,
        mig,
    }
}

impl SlowPostcopy {
    /// `vmm ctl` on the destination.
    fn ctl(&self, args: &[&str]) -> Run {
        let mut c = vmm();
        c.arg("ctl")
            .arg("--api-socket")
            .arg(&self.dst_api)
            .args(args);
        run_with(c, Duration::from_secs(60))
    }

    /// The migration's end (it must succeed): its `vmm ctl` run, and the
    /// two processes.
    fn migrated(self) -> (Run, Proc, Proc) {
        let r = self.mig.join().unwrap();
        if r.status != Some(0) {
            let (mut src, mut dst) = (self.src, self.dst);
            let _ = (src.child.kill(), dst.child.kill());
            let (_, so, se) = src.finish();
            let (_, d_out, de) = dst.finish();
            panic!(
                "{}\nsource:\n{so}\n{se}\ndestination:\n{d_out}\n{de}",
                r.stderr
            );
        }
        (r, self.src, self.dst)
    }
}

/// The balloon inflated and deflated on the destination during post-copy,
/// over pages still at the source: a ballooned page stays a hole (it reads
/// zero when the guest takes it back, whatever arrives for it later) and
/// every other page keeps what the guest wrote.
#[test]
fn balloon_churn_during_postcopy_keeps_holes_and_writes() {
    // The push held to 8 MiB/s: the pool's top (pushed last) is still at
    // the source when the balloon takes it.
    let p = slow_postcopy(
        "balloon",
        &[
            "--mem",
            "256M",
            "--balloon",
            "0",
            "--kernel",
            guest("balloon").to_str().unwrap(),
            "--cmdline",
            "base=16M bytes=64M steps=2",
        ],
        |_, socket| wait_resident(socket, 64.0),
    );
    let (dst_api, ctl) = (&p.dst_api, |a: &[&str]| p.ctl(a));
    ctl(&["balloon", "set", "32M"]).assert_ok();
    common::wait_for("the balloon to inflate", Duration::from_secs(60), || {
        get(dst_api, "/balloon")["actual_mib"].as_u64() == Some(32)
    });
    let during = get(dst_api, "/vm/migrate")["incoming"].clone();
    assert!(
        during["pages_left"].as_u64().unwrap() > 0,
        "the balloon took pages while some were still coming: {during}"
    );
    ctl(&["balloon", "set", "0"]).assert_ok();
    let (r, src, dst) = p.migrated();
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    let (d_status, d_out, d_err) = dst.finish();
    assert!(
        d_out.contains("balloon: done") && d_out.contains("zero_bad=0 pattern_bad=0"),
        "deflated pages read zero, kept pages their pattern:\n{d_out}\n{d_err}"
    );
    assert_eq!(d_status, Some(0), "{d_out}\n{d_err}");
    // The guest finishes (and its VM ends) before the slow push does, as
    // a rule: the destination says so, and the source ends too, owing
    // nothing; or every page went.
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["state"], "done", "{s}");
    let all = |k: &str| s[k].as_u64().unwrap();
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("ended on the destination"))
            || all("pages_pushed") + all("pages_requested") >= all("pages_pending"),
        "{s}"
    );
}

/// virtio-mem plugged (128 MiB, workers writing in it) and a balloon when
/// post-copy starts; on the destination, over pages still at the source,
/// blocks are unplugged and plugged again and the balloon inflates. The
/// guest's checks all hold there: plugged blocks read zero, unplugged
/// blocks kept what the workers wrote until they went, pool and worker
/// patterns intact.
#[test]
fn hotplug_and_balloon_churn_during_postcopy_hold_every_check() {
    let reached = |p: &Proc, n: usize| {
        for _ in 0..n {
            loop {
                let l = p
                    .out
                    .recv_timeout(Duration::from_secs(120))
                    .expect("the guest reaches its target");
                if l.contains("memchurn: reached") {
                    break;
                }
            }
        }
    };
    let p = slow_postcopy(
        "churn",
        &[
            "--vcpus",
            "3",
            "--mem",
            "256M",
            "--balloon",
            "0",
            "--hotplug",
            "256M",
            "--hotplug-requested",
            "128M",
            "--kernel",
            guest("memchurn").to_str().unwrap(),
            "--cmdline",
            "steps=4 wbytes=32M",
        ],
        |src, _| reached(src, 1),
    );
    let ctl = |a: &[&str]| p.ctl(a).assert_ok();
    let dst = &p.dst;
    ctl(&["mem", "resize", "64M"]);
    reached(dst, 1);
    let during = get(&p.dst_api, "/vm/migrate")["incoming"].clone();
    ctl(&["balloon", "set", "8M"]);
    reached(dst, 1);
    ctl(&["mem", "resize", "192M"]);
    let (_, src, mut dst) = p.migrated();
    let (s_status, s_out, s_err) = src.finish();
    assert_eq!(s_status, Some(0), "{s_out}\n{s_err}");
    let status = wait_child(&mut dst.child, Duration::from_secs(120));
    let out: Vec<String> = dst.out.iter().collect();
    let err: Vec<String> = dst.err.iter().collect();
    let all = format!("{}\n{}", out.join("\n"), err.join("\n"));
    let done = out
        .iter()
        .find(|l| l.contains("memchurn: done"))
        .unwrap_or_else(|| panic!("the guest finished:\n{all}"));
    for bad in [
        "state_bad=0 ",
        "errors=0 ",
        "zero_bad=0 ",
        "pattern_bad=0 ",
        "worker_bad=0 ",
    ] {
        assert!(done.contains(bad), "{bad}: {done}\n{all}");
    }
    assert!(done.contains("steps=4 "), "{done}");
    assert_eq!(status, Some(0), "{all}");
    assert!(
        during["pages_left"].as_u64().unwrap() > 0,
        "the unplug raced pages still coming: {during}"
    );
}
