//! Snapshot and restore on real KVM: a guest snapshotted halfway through
//! its first touches comes back in every restore mode and fault mode and
//! finds every page it wrote; a prefetch racing the vCPUs loses no write;
//! every bad snapshot gives its error before any vCPU runs; a failed
//! snapshot leaves nothing and the VM runs on; a recorded working set is
//! replayed; nothing in a snapshot directory is modified by a restore.
//!
//! The guests stop where a test acts on them (`touch holds=N`, `memstress
//! wait_after=R`) and go on when a byte arrives on their serial port (the
//! `vmm`'s stdin): a snapshot holds exactly what the guest wrote up to
//! there, on any host, and no test races a guest's own end.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

use common::{guest, run_with, spawn_lines, vmm, Run};
use serde_json::{json, Value};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-snap-{name}-{}", std::process::id()))
}

/// One raw HTTP/1.1 request on the API socket; (status, body).
fn http(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    common::unix_http(socket, method, path, &body, Duration::from_secs(300))
}

/// Bytes for a restored guest's serial port, one per hold (or wait) it may
/// still have ahead: a guest snapshotted at a hold goes on at once.
const GO_ON: &[u8] = b"gggggggg";

/// A pipe that holds `bytes`, then ends: a child's stdin (the guest's
/// serial input; a regular file could not be polled).
fn stdin_with(bytes: &[u8]) -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and ours alone.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    std::fs::File::from(wr).write_all(bytes).unwrap();
    Stdio::from(rd)
}

/// A `vmm run` with the API on a socket; its stdin is the guest's serial
/// input.
struct Live {
    child: Child,
    socket: PathBuf,
    stdin: ChildStdin,
    out: Receiver<String>,
    err: Receiver<String>,
    /// Console lines read so far.
    console: Vec<String>,
}

impl Live {
    fn start(name: &str, args: &[&str]) -> Live {
        let socket = tmp(&format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut c = vmm();
        c.arg("run")
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::piped());
        let (mut child, out, err) = spawn_lines(c);
        let stdin = child.stdin.take().unwrap();
        common::wait_for("the API socket", Duration::from_secs(30), || {
            UnixStream::connect(&socket).is_ok()
        });
        Live {
            child,
            socket,
            stdin,
            out,
            err,
            console: Vec::new(),
        }
    }

    /// Wait for the console line starting with `prefix` (the guest at a
    /// hold): the line.
    fn wait_line(&mut self, prefix: &str) -> String {
        let limit = Duration::from_secs(600);
        let mut progress = common::Progress::new(prefix, limit);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.console.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} line:\n{}",
                self.console.join("\n")
            );
            progress.tick();
            match self.out.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => self.console.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => panic!(
                    "the VM ended before {prefix:?}:\n{}",
                    self.console.join("\n")
                ),
            }
        }
    }

    /// A byte on the guest's serial port: it goes on from its hold.
    fn go_on(&mut self) {
        self.stdin
            .write_all(b"g")
            .and_then(|()| self.stdin.flush())
            .expect("a byte to the guest's serial port");
    }

    fn vm(&self) -> Value {
        let (status, body) = http(&self.socket, "GET", "/vm", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Wait until the guest has this much resident memory.
    fn wait_resident(&self, mib: f64) {
        common::wait_for("guest memory to fill", Duration::from_secs(120), || {
            self.vm()["memory"]["resident_mib"].as_f64().unwrap_or(0.0) >= mib
        });
    }

    fn snapshot(&self, dir: &Path, resume: bool) -> (u16, Value) {
        self.snapshot_with(&json!({ "dir": dir, "resume": resume }))
    }

    fn snapshot_with(&self, request: &Value) -> (u16, Value) {
        let (status, body) = http(&self.socket, "PUT", "/vm/snapshot", Some(request));
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `vmm ctl snapshot create DIR [ARGS]`: its JSON summary.
    fn ctl_snapshot(&self, dir: &Path, args: &[&str]) -> Value {
        let mut c = vmm();
        c.arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(["--json", "snapshot", "create"])
            .arg(dir)
            .args(args);
        let ctl = run_with(c, Duration::from_secs(300));
        ctl.assert_ok();
        serde_json::from_str(&ctl.stdout).unwrap()
    }

    /// Wait for the process to end: (status, console, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let status = self.child.wait().unwrap().code();
        let mut console = std::mem::take(&mut self.console);
        console.extend(self.out.iter());
        let err: Vec<String> = self.err.iter().collect();
        let _ = std::fs::remove_file(&self.socket);
        (status, console.join("\n"), err.join("\n"))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn restore(dir: &Path, args: &[&str]) -> Run {
    let mut c = vmm();
    c.args(["restore", "--snapshot"])
        .arg(dir)
        .args(args)
        .stdin(stdin_with(GO_ON));
    run_with(c, Duration::from_secs(300))
}

/// Every file of a snapshot directory: name, length, mtime, and the bytes
/// of every file but the (large, sparse) memory file.
fn dir_state(dir: &Path) -> Vec<(String, u64, SystemTime, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = if name == "memory" {
                Vec::new()
            } else {
                std::fs::read(e.path()).unwrap()
            };
            (name, m.len(), m.modified().unwrap(), bytes)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `key=value` from the console line starting with `prefix`.
fn field(console: &str, prefix: &str, key: &str) -> Option<String> {
    let line = console.lines().find(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// Halfway through its first touches, `touch` holds.
const TOUCH: &str = "bytes=640M stride=4096 seed=7 holds=1";

/// Pages a `touch` hold line says are written (one word per page).
fn hold_pages(line: &str) -> u64 {
    field(line, "touch: hold", "words")
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no words= in {line:?}"))
}

/// `touch` on 2 vCPUs writes a pattern over 640 MiB, one word per page;
/// snapshotted (through `vmm ctl`) at its hold, with the first half of its
/// pages written and the rest never touched, then left to finish. Returns
/// the snapshot and the checksum of the whole run.
fn touch_snapshot(name: &str) -> (PathBuf, String) {
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    let mut live = Live::start(
        name,
        &[
            "--vcpus",
            "2",
            "--mem",
            "1G",
            "--kernel",
            guest("touch").to_str().unwrap(),
            "--cmdline",
            TOUCH,
        ],
    );
    let written = hold_pages(&live.wait_line("touch: hold 1/1")) * 4096;
    let summary = live.ctl_snapshot(&dir, &[]);
    let data = summary["data_bytes"].as_u64().unwrap();
    // The written pages, and the guest's image, stacks and tables (8 MiB
    // at most) beside them.
    assert!(
        data >= written && data <= written + (8 << 20) && written < 640 << 20,
        "the snapshot holds what the guest wrote ({written} bytes) and no more: {summary}"
    );
    assert_eq!(summary["resumed"], true);
    live.go_on();
    let (status, console, err) = live.finish();
    assert_eq!(status, Some(0), "{console}\n{err}");
    let sum = field(&console, "touch: OK", "checksum")
        .unwrap_or_else(|| panic!("no touch: OK line:\n{console}"));
    (dir, sum)
}

fn assert_touch_ok(r: &Run, sum: &str, what: &str) {
    assert_eq!(r.status, Some(0), "{what}:\n{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        field(&r.stdout, "touch: OK", "checksum").as_deref(),
        Some(sum),
        "{what}: the restored guest finds every page, with the checksum of the uninterrupted run:\n{}",
        r.stdout
    );
}

/// The restored guest finishes its pattern and verifies every page, in
/// every restore mode and fault mode (and with a prefetch racing the
/// vCPUs); the snapshot directory is as it was.
#[test]
fn a_guest_snapshotted_while_faulting_restores_in_every_mode() {
    let (dir, sum) = touch_snapshot("modes");
    let before = dir_state(&dir);
    let modes: &[&[&str]] = &[
        &["--restore-mode", "ondemand", "--fault-mode", "vcpu"],
        &["--restore-mode", "ondemand", "--fault-mode", "handler"],
        &[
            "--restore-mode",
            "ondemand",
            "--fault-mode",
            "vcpu",
            "--prefetch",
            "all",
        ],
        &[
            "--restore-mode",
            "ondemand",
            "--fault-mode",
            "handler",
            "--prefetch",
            "all",
        ],
        &["--restore-mode", "copy", "--fault-mode", "vcpu"],
        &["--restore-mode", "copy", "--fault-mode", "prefault"],
        &["--restore-mode", "map-private", "--fault-mode", "kernel"],
        &["--verify-memory"],
    ];
    for m in modes {
        let r = restore(&dir, m);
        assert_touch_ok(&r, &sum, &m.join(" "));
    }
    assert!(dir_state(&dir) == before, "a restore modified the snapshot");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `touch` snapshotted on its way through its first touches, at each of
/// three holds: a full snapshot, then two diffs, each on the one before,
/// the guest writing a quarter of its pages between them. Each diff
/// holds only what was written since its base, names it, and restores —
/// the chain laid together — to a guest that finds every page it wrote;
/// a restore never writes into any of them; a diff whose base was
/// replaced or moved, or restored as a file mapping, is refused, saying
/// why.
#[test]
fn diff_snapshots_restore_to_every_page_written() {
    let dirs: Vec<PathBuf> = ["diff-a", "diff-b", "diff-c"]
        .iter()
        .map(|n| tmp(n))
        .collect();
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    // One vCPU over 900 MiB, holding after each quarter.
    let mut live = Live::start(
        "diff",
        &[
            "--vcpus",
            "1",
            "--mem",
            "1G",
            "--kernel",
            guest("touch").to_str().unwrap(),
            "--cmdline",
            "bytes=900M stride=4096 seed=3 holds=3",
        ],
    );
    let data = |v: &Value| v["data_bytes"].as_u64().unwrap();
    // The guest's image, stacks and tables beside the pages it wrote (it
    // rewrites its stack between holds).
    let slack = 8 << 20;
    let mut written = hold_pages(&live.wait_line("touch: hold 1/3")) * 4096;
    let full = live.ctl_snapshot(&dirs[0], &[]);
    assert!(full.get("base").is_none(), "{full}");
    assert!(
        data(&full) >= written && data(&full) <= written + slack,
        "the full snapshot holds the {written} bytes written: {full}"
    );
    for i in [1, 2] {
        live.go_on();
        let now = hold_pages(&live.wait_line(&format!("touch: hold {}/3", i + 1))) * 4096;
        let diff = live.ctl_snapshot(&dirs[i], &["--diff"]);
        let base = std::fs::canonicalize(&dirs[i - 1]).unwrap();
        assert_eq!(diff["base"], json!(base), "{diff}");
        // touch writes each page once: the diff holds the pages written
        // since its base.
        assert!(
            data(&diff) >= now - written && data(&diff) <= now - written + slack,
            "diff {i}: {} bytes of data; {} bytes written since its base",
            data(&diff),
            now - written
        );
        written = now;
    }
    live.go_on();
    let (status, console, err) = live.finish();
    assert_eq!(status, Some(0), "{console}\n{err}");
    let sum = field(&console, "touch: OK", "checksum")
        .unwrap_or_else(|| panic!("no touch: OK line:\n{console}"));
    let before: Vec<_> = dirs.iter().map(|d| dir_state(d)).collect();
    for m in [
        &["--restore-mode", "ondemand", "--fault-mode", "vcpu"][..],
        &[
            "--restore-mode",
            "ondemand",
            "--fault-mode",
            "handler",
            "--prefetch",
            "all",
        ],
        &["--restore-mode", "copy", "--fault-mode", "vcpu"],
        &["--verify-memory"],
    ] {
        let r = restore(&dirs[2], m);
        assert_touch_ok(&r, &sum, &format!("the second diff, {}", m.join(" ")));
    }
    assert_touch_ok(&restore(&dirs[1], &[]), &sum, "the first diff");
    let after: Vec<_> = dirs.iter().map(|d| dir_state(d)).collect();
    assert!(before == after, "a restore modified a snapshot");

    let refused = |args: &[&str], want: &str| {
        let r = restore(&dirs[2], args);
        assert_ne!(r.status, Some(0), "{}", r.stdout);
        assert!(r.stderr.contains(want), "want {want:?}:\n{}", r.stderr);
        assert!(!r.stdout.contains("touch:"), "a vCPU ran: {}", r.stdout);
    };
    refused(
        &["--restore-mode", "map-private", "--fault-mode", "kernel"],
        "a diff snapshot restores with ondemand or copy",
    );
    // The first diff's base replaced by another snapshot of the VM.
    let moved = tmp("diff-a-moved");
    let _ = std::fs::remove_dir_all(&moved);
    std::fs::rename(&dirs[0], &moved).unwrap();
    refused(&[], "cannot open");
    copy_dir(&moved, &dirs[0]);
    edit_manifest(&dirs[0], |m| m["memory"]["crc32"] = json!(1));
    refused(&[], "it was replaced");
    std::fs::remove_dir_all(&moved).unwrap();
    for d in &dirs {
        std::fs::remove_dir_all(d).unwrap();
    }
}

/// memstress rewrites every page each round: restored with a prefetch of
/// the whole file racing the vCPUs' rounds, no page the guest rewrote is
/// replaced by the file's older content.
#[test]
fn a_prefetch_racing_the_vcpus_loses_no_write() {
    let dir = tmp("race");
    let _ = std::fs::remove_dir_all(&dir);
    // It waits after its first round: every page has data in the
    // snapshot, and 19 rounds rewrite them all after the restore.
    let cmdline = "mode=0 rounds=20 bytes=256M stride=4096 random=1 wait_after=1";
    let mut live = Live::start(
        "race",
        &[
            "--vcpus",
            "2",
            "--mem",
            "512M",
            "--kernel",
            guest("memstress").to_str().unwrap(),
            "--cmdline",
            cmdline,
        ],
    );
    live.wait_line("memstress: waiting after round=1");
    let (status, summary) = live.snapshot(&dir, false);
    assert_eq!(status, 200, "{summary}");
    assert_eq!(live.vm()["state"], "paused");
    drop(live);
    for fault_mode in ["vcpu", "handler"] {
        let r = restore(&dir, &["--fault-mode", fault_mode, "--prefetch", "all"]);
        assert_eq!(
            r.status,
            Some(0),
            "{fault_mode}:\n{}\n{}",
            r.stdout,
            r.stderr
        );
        assert!(
            r.stdout.contains("memstress: done") && r.stdout.contains("bad=0"),
            "{fault_mode}: {}",
            r.stdout
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Snapshot a small guest that idles (memstress hold=1): the base of the
/// bad-snapshot variants.
fn small_snapshot(name: &str) -> PathBuf {
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    let live = Live::start(
        name,
        &[
            "--vcpus",
            "1",
            "--mem",
            "128M",
            "--kernel",
            guest("memstress").to_str().unwrap(),
            "--cmdline",
            "mode=0 rounds=1 bytes=4M hold=1",
        ],
    );
    live.wait_resident(4.0);
    let (status, summary) = live.snapshot(&dir, true);
    assert_eq!(status, 200, "{summary}");
    drop(live);
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut m);
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
}

/// Every bad snapshot gives an error naming what is wrong, before any vCPU
/// runs (no fault summary), and no restore writes into the directory.
#[test]
fn every_bad_snapshot_gives_its_error() {
    let good = small_snapshot("bad-base");
    let before = dir_state(&good);
    let variant = |name: &str, f: &dyn Fn(&Path)| -> PathBuf {
        let d = tmp(&format!("bad-{name}"));
        copy_dir(&good, &d);
        f(&d);
        d
    };
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "newer",
            variant("newer", &|d| edit_manifest(d, |m| m["format"] = json!(99))),
            "snapshot format 99 is newer than this vmm reads",
        ),
        (
            "checksum",
            variant("checksum", &|d| {
                let p = d.join("vcpu0.bin");
                let mut b = std::fs::read(&p).unwrap();
                b[100] ^= 0xff;
                std::fs::write(&p, b).unwrap();
            }),
            "section vcpu0: checksum",
        ),
        (
            "truncated",
            variant("truncated", &|d| {
                let p = d.join("devices.bin");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "section devices: ",
        ),
        (
            "memory-size",
            variant("memory-size", &|d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                f.set_len(64 << 20).unwrap();
            }),
            "memory file: 67108864 bytes, the manifest says",
        ),
        (
            "missing",
            variant("missing", &|d| {
                std::fs::remove_file(d.join("vm.bin")).unwrap()
            }),
            "section vm is not in the snapshot",
        ),
        (
            "cpuid",
            variant("cpuid", &|d| {
                edit_manifest(d, |m| {
                    for e in m["info"]["cpuid"].as_array_mut().unwrap() {
                        if e["function"] == 7 && e["index"] == 0 {
                            e["ebx"] = json!(u32::MAX);
                        }
                    }
                })
            }),
            "section manifest: CPUID leaf 0x7 index 0 ebx has bits",
        ),
        (
            "vcpus",
            variant("vcpus", &|d| {
                edit_manifest(d, |m| {
                    m["info"]["vcpus"] = json!(100_000);
                    m["info"]["config"]["vcpus"] = json!(100_000);
                })
            }),
            "100000 vCPUs, more than this host allows",
        ),
        (
            "host",
            variant("host", &|d| {
                edit_manifest(d, |m| m["info"]["host"] = json!("elsewhere"))
            }),
            "the snapshot was taken on elsewhere",
        ),
        (
            "manifest",
            variant("manifest", &|d| {
                std::fs::write(d.join("manifest.json"), b"{ not json").unwrap()
            }),
            "is not a snapshot manifest",
        ),
        ("nothing", tmp("bad-does-not-exist"), "cannot open"),
    ];
    for (name, dir, needle) in &cases {
        let r = restore(dir, &[]);
        r.assert_error(needle);
        assert!(
            !r.stderr.contains("fault summary"),
            "{name}: a vCPU ran:\n{}",
            r.stderr
        );
        let _ = std::fs::remove_dir_all(dir);
    }
    // Options that do not go together.
    for (args, needle) in [
        (
            &["--restore-mode", "map-private", "--fault-mode", "vcpu"][..],
            "map-private is served by the host's page cache",
        ),
        (
            &["--restore-mode", "ondemand", "--fault-mode", "prefault"][..],
            "ondemand is served by the fault engine",
        ),
        (
            &["--restore-mode", "copy", "--prefetch", "all"][..],
            "--prefetch fills an ondemand restore",
        ),
        (
            &["--prefetch", "working-set"][..],
            "record one with `vmm restore --record-working-set`",
        ),
    ] {
        restore(&good, args).assert_error(needle);
    }
    assert!(
        dir_state(&good) == before,
        "a restore modified the snapshot"
    );
    std::fs::remove_dir_all(&good).unwrap();
}

/// A snapshot that cannot be written (a full file system) fails with the
/// reason, leaves no snapshot and no partial directory, and the VM runs on
/// to its end (the guest holds halfway until the test is done with it); a
/// snapshot over an existing directory is refused.
#[test]
fn a_failed_snapshot_leaves_nothing_and_the_vm_runs_on() {
    let mnt = tmp("full");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8M", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        ok.success(),
        "mounting a small tmpfs (the test runs as root)"
    );
    let mut live = Live::start(
        "full",
        &[
            "--vcpus",
            "2",
            "--mem",
            "512M",
            "--kernel",
            guest("touch").to_str().unwrap(),
            "--cmdline",
            "bytes=384M stride=4096 holds=1",
        ],
    );
    live.wait_line("touch: hold 1/1");
    let dir = mnt.join("snap");
    let (status, body) = live.snapshot(&dir, true);
    assert_eq!(status, 500, "{body}");
    assert!(
        body.to_string().contains("No space left on device"),
        "{body}"
    );
    let left: Vec<_> = std::fs::read_dir(&mnt).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The directory exists now: refused, nothing written.
    let existing = tmp("existing");
    std::fs::create_dir_all(&existing).unwrap();
    let (status, body) = live.snapshot(&existing, true);
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("already exists"), "{body}");
    // The failed snapshot consumed what changed since the VM started: a
    // diff has no base.
    let (status, body) = live.snapshot_with(&json!({ "dir": tmp("nobase"), "diff": true }));
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("needs a base"), "{body}");
    live.go_on();
    let (status, console, err) = live.finish();
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir_all(&mnt);
    let _ = std::fs::remove_dir_all(&existing);
    assert_eq!(status, Some(0), "{console}\n{err}");
    assert!(console.contains("touch: OK"), "{console}");
}

/// Lines from `rx` up to the first that starts with `prefix` (included);
/// panics after 10 minutes or at the stream's end without one.
fn lines_until(rx: &Receiver<String>, prefix: &str) -> Vec<String> {
    let limit = Duration::from_secs(600);
    let deadline = Instant::now() + limit;
    let mut progress = common::Progress::new(prefix, limit);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                let last = l.starts_with(prefix);
                seen.push(l);
                if last {
                    return seen;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                assert!(
                    Instant::now() < deadline,
                    "no {prefix:?} line:\n{}",
                    seen.join("\n")
                );
                progress.tick();
            }
            Err(_) => panic!("no {prefix:?} line:\n{}", seen.join("\n")),
        }
    }
}

fn metrics_json(r_stderr: &str) -> Option<std::net::SocketAddr> {
    r_stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmm: metrics on http://"))
        .and_then(|a| a.trim_end_matches("/metrics").parse().ok())
}

/// A restore records the pages the guest touches first (into the snapshot
/// directory, beside its files); the next restore prefetches that set
/// first and its metrics count the hits; the restore → first entry time
/// and the vCPUs' blocktime are reported. The replayed guest stays at its
/// hold until the prefetch is done, so the whole set is prefetched, not
/// whatever a fast or slow guest left to it.
#[test]
fn a_recorded_working_set_is_replayed() {
    let (dir, sum) = touch_snapshot("ws");
    let before = dir_state(&dir);
    let r = restore(&dir, &["--record-working-set", "10m"]);
    assert_touch_ok(&r, &sum, "recording");
    assert!(r.stderr.contains("vmm: working set:"), "{}", r.stderr);
    assert!(dir.join("working-set").exists());
    let mut after = dir_state(&dir);
    after.retain(|f| f.0 != "working-set");
    assert!(
        after == before,
        "recording changed the snapshot's own files"
    );
    // Replay, with the metrics endpoint lingering for a last scrape.
    let mut c = vmm();
    c.args(["restore", "--snapshot"])
        .arg(&dir)
        .args(["--prefetch", "working-set"])
        .args(["--metrics-addr", "127.0.0.1:0", "--metrics-linger", "10m"])
        .stdin(Stdio::piped());
    let (mut child, out, err) = spawn_lines(c);
    let mut stdin = child.stdin.take().unwrap();
    let mut stderr = Vec::new();
    let addr = loop {
        let l = err
            .recv_timeout(Duration::from_secs(60))
            .expect("metrics line");
        stderr.push(l.clone());
        if let Some(a) = metrics_json(&l) {
            break a;
        }
    };
    let metrics =
        || -> Value { serde_json::from_str(&common::http_get(addr, "/metrics.json")).unwrap() };
    common::wait_for(
        "the working set's prefetch",
        Duration::from_secs(300),
        || {
            let p = &metrics()["restore"]["prefetch_pages"];
            let planned = p["planned"].as_u64().unwrap_or(0);
            planned > 0 && p["done"].as_u64().unwrap_or(0) >= planned
        },
    );
    stdin.write_all(b"g").unwrap();
    stdin.flush().unwrap();
    // The guest's last line, then the VM's end: the fault summary (the
    // counters are final; the endpoint lingers for this scrape).
    let console = lines_until(&out, "touch: ").join("\n");
    stderr.extend(lines_until(&err, "fault summary:"));
    let m = metrics();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        field(&console, "touch: OK", "checksum").as_deref(),
        Some(sum.as_str())
    );
    let restore = &m["restore"];
    let hits = restore["working_set_pages"]["hit"].as_u64().unwrap();
    let misses = restore["working_set_pages"]["miss"].as_u64().unwrap();
    assert!(hits > 1000, "the replayed set was prefetched: {restore}");
    assert!(
        restore["first_entry_seconds"].as_f64().unwrap() > 0.0,
        "restore → first entry reported: {restore}"
    );
    assert!(
        restore["prefetch_pages"]["done"].as_u64().unwrap()
            >= restore["prefetch_pages"]["planned"].as_u64().unwrap(),
        "{restore}"
    );
    eprintln!("working set: hits {hits}, misses {misses}; {restore}");
    let blocktime: f64 = m["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["blocktime_seconds"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(blocktime > 0.0, "the vCPUs waited for memory some: {m}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Balloon and virtio-mem churn across a snapshot and restore: every
/// invariant of `vmm stress` holds in both VMs, and right after the
/// restore no hole (ballooned, unplugged, never touched) is resident.
#[test]
fn churn_across_a_restore_loses_no_write() {
    for extra in [
        &["--restore-mode", "ondemand"][..],
        &["--restore-mode", "copy"][..],
        &["--prefetch", "all"][..],
    ] {
        let mut c = vmm();
        c.args([
            "stress",
            "--json",
            "--duration",
            "12s",
            "--restore-at",
            "5s",
        ])
        .args(extra);
        let r = run_with(c, Duration::from_secs(600));
        let report: Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}\n{}", r.stdout, r.stderr));
        for i in report["invariants"].as_array().unwrap() {
            assert_eq!(
                i["violations"], 0,
                "{extra:?}: {} violated: {report:#}\n{}",
                i["name"], r.stderr
            );
        }
        let r1 = report["invariants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "R1")
            .expect("R1 is checked");
        assert!(r1["checks"].as_u64().unwrap() > 1000, "{r1}");
        assert_eq!(report["ok"], true, "{extra:?}: {report:#}");
    }
}
