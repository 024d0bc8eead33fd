//! Helpers shared by the integration tests: run the real `vmm` binary on
//! the machine's /dev/kvm and capture what it printed.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Poll `f` every 20 ms until it holds; panic after `limit`. A wait past
/// 30 s says what it waits for (see [`Progress`]).
pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut progress = Progress::new(what, limit);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        progress.tick();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line for the CI log now, past the test harness's capture of
/// `eprintln!`: what a long test is doing.
pub fn say(msg: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("test").to_string();
    let _ = writeln!(std::io::stderr().lock(), "    {name}: {msg}");
}

/// A long wait says what it waits for: a line after 30 s, then every
/// minute, written to the process's stderr itself (the test harness
/// captures `eprintln!`, so a CI log would otherwise show only "has been
/// running for over 60 seconds").
pub struct Progress {
    what: String,
    limit: Duration,
    t0: Instant,
    next: Duration,
}

impl Progress {
    pub fn new(what: &str, limit: Duration) -> Self {
        Self {
            what: what.to_string(),
            limit,
            t0: Instant::now(),
            next: Duration::from_secs(30),
        }
    }

    pub fn tick(&mut self) {
        let waited = self.t0.elapsed();
        if waited >= self.next {
            self.next += Duration::from_secs(60);
            say(&format!(
                "still waiting for {} ({} s of at most {} s)",
                self.what,
                waited.as_secs(),
                self.limit.as_secs()
            ));
        }
    }
}

/// The test guests built by vmm's build script.
pub fn guest(name: &str) -> PathBuf {
    vmm_guests::path(name)
}

/// A Linux guest file from `guest-images/build.sh` (kernels, initramfs).
pub fn linux_file(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest-images/out/linux")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build.sh",
        p.display()
    );
    p.display().to_string()
}

/// `GET path` over HTTP/1.1 on a TCP address: the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("read");
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.stdin(Stdio::null());
    c
}

/// The result of one `vmm` run.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && self.status != Some(101) && self.status.is_some(),
            "vmm crashed: status {:?}\nstderr:\n{}",
            self.status,
            self.stderr
        );
    }
    pub fn assert_ok(&self) {
        assert_eq!(
            self.status,
            Some(0),
            "vmm failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }
    /// Assert a clear error: non-zero status, message containing `needle`, no panic.
    pub fn assert_error(&self, needle: &str) {
        self.assert_no_panic();
        assert_ne!(
            self.status,
            Some(0),
            "vmm succeeded unexpectedly:\n{}",
            self.stdout
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
    }
}

/// Spawn `cmd`. A binary a test has just copied can be busy for a moment:
/// a child forked by another test thread holds the copy's write descriptor
/// until it execs (ETXTBSY); that spawn is retried.
fn spawn(cmd: &mut Command) -> std::process::Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.expect("spawn vmm"),
        }
    }
}

/// Run `vmm` with `args`, killing it after `timeout`.
pub fn run_with(mut cmd: Command, timeout: Duration) -> Run {
    let start = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = spawn(&mut cmd);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out: Output = match rx.recv_timeout(timeout) {
        Ok(o) => o.expect("wait for vmm"),
        Err(_) => {
            // SAFETY: killing the child we spawned.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("vmm did not finish within {timeout:?}");
        }
    };
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

pub fn run(args: &[&str]) -> Run {
    let mut c = vmm();
    c.args(args);
    run_with(c, Duration::from_secs(300))
}

/// In-process runs through the library (tests that change memslots or hook
/// the marker port while the guest runs).
pub mod inproc {
    use std::sync::{Arc, Mutex};

    use vmm::config::{FaultMode, SerialOut, VmConfig};

    pub type Output = Arc<Mutex<Vec<u8>>>;

    pub fn config(
        name: &str,
        vcpus: usize,
        mem: u64,
        cmdline: &str,
        mode: FaultMode,
    ) -> (VmConfig, Output) {
        let out: Output = Default::default();
        let mut c = VmConfig::new(super::guest(name));
        c.vcpus = vcpus;
        c.mem_size = mem;
        c.cmdline = cmdline.to_string();
        c.fault_mode = Some(mode);
        c.serial = SerialOut::Capture(out.clone());
        (c, out)
    }

    /// The fault mode users get on this host (the VMM's own auto-selection:
    /// `vcpu` where the host reports missing pages to the vCPU, `handler`
    /// elsewhere), named in the test's output.
    pub fn host_mode() -> FaultMode {
        let m = vmm::host::detect_flavor().default_fault_mode();
        eprintln!("fault mode (auto-selected for this host): {}", m.name());
        m
    }

    /// Every demand-paging mode this host can run. Said on the CI log: a
    /// host that cannot run `vcpu` mode (hardware KVM without exit-on-
    /// missing) runs these tests in `handler` mode only, and says so.
    pub fn demand_modes() -> Vec<FaultMode> {
        let modes = match host_mode() {
            FaultMode::Vcpu => vec![FaultMode::Vcpu, FaultMode::Handler],
            m => vec![m],
        };
        if !modes.contains(&FaultMode::Vcpu) {
            super::say(&format!(
                "this host ({}) cannot run vcpu mode: demand-paging cases run in {} only",
                vmm::host::detect_flavor(),
                modes
                    .iter()
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        modes
    }

    /// Every fault mode this host can run.
    pub fn all_modes() -> Vec<FaultMode> {
        let mut v = demand_modes();
        v.extend([FaultMode::Prefault, FaultMode::Kernel]);
        v
    }

    /// Stops the VM if the thread holding it panics (a wait that timed
    /// out): a guest waiting for a step that will never come would
    /// otherwise keep the test running.
    pub struct StopIfPanicking(pub Arc<vmm::api::VmControl>);

    impl Drop for StopIfPanicking {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.stop();
            }
        }
    }

    /// Stops the VM when dropped: the thread that decides when a guest
    /// which never ends by itself has done enough ends it, however that
    /// thread ends (a wait that times out panics, and must not leave the
    /// guest running).
    pub struct StopOnDrop(pub Arc<vmm::api::VmControl>);

    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.stop();
        }
    }

    pub fn text(out: &Output) -> String {
        String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
    }

    /// `key=value` from the first line starting with `prefix`.
    pub fn field(text: &str, prefix: &str, key: &str) -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(prefix))?;
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
    }

    /// Every line starting with `prefix`.
    pub fn lines<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> {
        text.lines().filter(move |l| l.starts_with(prefix))
    }
}

/// Spawn `cmd` with stdout and stderr piped; each stream's lines arrive on
/// its own channel as the child writes them.
pub fn spawn_lines(
    mut cmd: Command,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader, Read};
    fn pump<R: Read + Send + 'static>(r: R) -> std::sync::mpsc::Receiver<String> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        rx
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = spawn(&mut cmd);
    let out = pump(child.stdout.take().unwrap());
    let err = pump(child.stderr.take().unwrap());
    (child, out, err)
}

/// A memory image of `len` bytes whose 8-byte word at offset o is
/// `(o ^ 0x1badb002) * 0x9e3779b97f4a7c15` (memstress `mode=1` checks it).
pub fn image_file(name: &str, len: u64) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("vmm-img-{name}-{}", std::process::id()));
    let mut buf = Vec::with_capacity(len as usize);
    for o in (0..len).step_by(8) {
        let v = (o ^ 0x1bad_b002).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        buf.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&p, buf).unwrap();
    p
}

/// The micro kernel booted to its shell (1 vCPU, 256 MiB, the userland
/// initramfs) and snapshotted there: made once and cached outside the
/// clone, keyed by the kernel, the initramfs, the snapshot format, the
/// boot arguments and the `vmm` binary that made it (a restore test must
/// not pass against a snapshot an older `vmm` wrote)
/// (`VMM_SNAPSHOT_CACHE`, default /var/cache/vmm/snapshots). Tests that do
/// not test the boot itself restore from it. A lock file serializes the
/// first making across test processes; snapshots other binaries made are
/// removed then (each is the guest's resident RAM, ~100 MiB).
pub fn micro_linux_snapshot() -> PathBuf {
    use std::hash::{Hash, Hasher};
    use std::os::fd::AsRawFd;
    let kernel = linux_file("bzImage-micro");
    let initrd = linux_file("initramfs-userland.cpio");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(&kernel).unwrap().hash(&mut h);
    std::fs::read(&initrd).unwrap().hash(&mut h);
    vmm::snapshot::FORMAT_VERSION.hash(&mut h);
    MICRO_ARGS.hash(&mut h);
    std::fs::read(env!("CARGO_BIN_EXE_vmm"))
        .expect("the vmm binary")
        .hash(&mut h);
    let cache = std::env::var_os("VMM_SNAPSHOT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/vmm/snapshots"));
    std::fs::create_dir_all(&cache).expect("the snapshot cache directory");
    let dir = cache.join(format!("micro-shell-{:016x}", h.finish()));
    let lock = std::fs::File::create(cache.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor we own; released when it is closed.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if !dir.join("manifest.json").exists() {
        // Older entries (another binary, kernel or initramfs) are stale:
        // nothing will restore them again.
        for e in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("micro-shell-") && p != dir {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
        make_micro_snapshot(&kernel, &initrd, &dir);
    }
    dir
}

/// How the cached micro kernel is booted.
const MICRO_ARGS: &[&str] = &[
    "--vcpus",
    "1",
    "--mem",
    "256M",
    "--cmdline",
    "console=ttyS0",
];

fn make_micro_snapshot(kernel: &str, initrd: &str, dir: &std::path::Path) {
    let socket = std::env::temp_dir().join(format!("vmm-micro-snap-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut c = vmm();
    c.arg("run")
        .args(MICRO_ARGS)
        .args(["--kernel", kernel, "--initrd", initrd])
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::piped());
    let t0 = Instant::now();
    let (mut child, out, _err) = spawn_lines(c);
    let deadline = t0 + Duration::from_secs(15 * 60);
    let mut progress = Progress::new("the micro kernel's shell, to snapshot it", deadline - t0);
    let mut console = Vec::new();
    // Up, then a moment for the shell to print its prompt (which ends in
    // no newline: not a line to wait for). Input typed after a restore
    // waits in the terminal anyway.
    while !console
        .iter()
        .any(|l: &String| l.contains("VMM-USERLAND: up"))
    {
        assert!(
            Instant::now() < deadline,
            "no userland:\n{}",
            console.join("\n")
        );
        progress.tick();
        if let Ok(l) = out.recv_timeout(Duration::from_millis(200)) {
            console.push(l);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    eprintln!(
        "[{:6.1}s] micro kernel at its shell: snapshot into {}",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
    let mut ctl = vmm();
    ctl.arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["snapshot", "create", "--paused"])
        .arg(dir);
    let r = run_with(ctl, Duration::from_secs(300));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&socket);
    r.assert_ok();
}

/// A restored micro kernel shell: `script` is typed at once; the console
/// until the VM ends, and how long the first line of output took.
pub struct Restored {
    pub status: Option<i32>,
    pub console: Vec<String>,
    pub stderr: Vec<String>,
    /// From the spawn to the first console line that is not the typed echo.
    pub first_output: Option<Duration>,
}

impl Restored {
    pub fn has_line(&self, l: &str) -> bool {
        self.console.iter().any(|c| c.trim_end_matches('\r') == l)
    }

    pub fn tail(&self) -> String {
        let n = self.console.len().saturating_sub(40);
        format!(
            "console:\n{}\nstderr:\n{}",
            self.console[n..].join("\n"),
            self.stderr.join("\n")
        )
    }
}

pub fn restore_shell(snapshot: &std::path::Path, args: &[&str], script: &str) -> Restored {
    use std::io::Write;
    let mut c = vmm();
    c.args(["restore", "--snapshot"])
        .arg(snapshot)
        .args(args)
        .stdin(Stdio::piped());
    let t0 = Instant::now();
    let (mut child, out, err) = spawn_lines(c);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let deadline = t0 + Duration::from_secs(300);
    let mut console = Vec::new();
    let mut first_output = None;
    let first_typed = script.lines().next().unwrap_or("").to_string();
    loop {
        match out.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                if first_output.is_none() && !l.contains(&first_typed) && !l.trim().is_empty() {
                    first_output = Some(t0.elapsed());
                }
                console.push(l);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) if Instant::now() > deadline => {
                let _ = child.kill();
                break;
            }
            Err(_) => {}
        }
    }
    drop(stdin);
    let status = child.wait().unwrap().code();
    Restored {
        status,
        console,
        stderr: err.try_iter().collect(),
        first_output,
    }
}

/// One HTTP/1.1 request with `Connection: close` over any stream (the API's
/// Unix socket, the metrics port); (status, body). A read that times out
/// gives what came so far.
pub fn http_exchange(
    mut s: impl std::io::Read + std::io::Write,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// [`http_exchange`] on a Unix socket, waiting at most `timeout` for the
/// answer.
pub fn unix_http(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> (u16, String) {
    let s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    http_exchange(s, method, path, body)
}
