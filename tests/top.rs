//! `vmm top` against a live VMM: its frame's numbers checked against the
//! API they were read through, while Linux's balloon and virtio-mem drivers
//! churn; the plain-text stream when stdout is not a terminal; bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{linux_file, run_with, spawn_lines, unix_http, vmm, wait_for};
use serde_json::Value;

fn get(socket: &Path, path: &str) -> Value {
    let (status, body) = unix_http(socket, "GET", path, "", Duration::from_secs(10));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn put(socket: &Path, path: &str, body: &str) {
    let (status, text) = unix_http(socket, "PUT", path, body, Duration::from_secs(10));
    assert_eq!(status, 204, "PUT {path} {body}: {text}");
}

/// `vmm top --once` on `args`: the frame's lines.
fn top_once(interval: &str, args: &[&str]) -> Vec<String> {
    let mut c = vmm();
    c.args(["top", "--once", "--interval", interval]).args(args);
    let r = run_with(c, Duration::from_secs(60));
    r.assert_ok();
    r.stdout.lines().map(str::to_string).collect()
}

/// The word after `key` in the frame's header (its first two lines).
fn word(lines: &[String], key: &str) -> String {
    let line = lines
        .iter()
        .take(2)
        .find(|l| l.contains(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} in\n{}", lines.join("\n")));
    let at = line.find(&format!("{key} ")).unwrap();
    line[at + key.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn num(lines: &[String], key: &str) -> f64 {
    word(lines, key).trim_end_matches('s').parse().unwrap()
}

/// The row of thread `name`: its cells (the by-kind cell split in words).
fn row(lines: &[String], name: &str) -> Vec<String> {
    let l = lines
        .iter()
        .skip(4)
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{}", lines.join("\n")));
    l.split_whitespace().map(str::to_string).collect()
}

fn faults(metrics: &Value, vcpu: usize) -> u64 {
    metrics["vcpus"][vcpu]["faults"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

struct Linux {
    child: std::process::Child,
    socket: PathBuf,
    console: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Linux {
    /// Ends the VM; a failed test also shows how the VM was doing (its
    /// console's tail, its stderr: a VM that ended early says why there).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let status = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        if std::thread::panicking() {
            let console: Vec<String> = self.console.try_iter().collect();
            let tail = &console[console.len().saturating_sub(40)..];
            let stderr: Vec<String> = self.stderr.try_iter().collect();
            common::say(&format!(
                "the Linux VM ({status:?}):\nconsole tail:\n{}\nvmm stderr:\n{}",
                tail.join("\n"),
                stderr.join("\n")
            ));
        }
    }
}

/// The micro kernel with both memory devices, up to the point where both
/// drivers are ready.
fn boot_linux(metrics_port: u16) -> Linux {
    let socket = std::env::temp_dir().join(format!("vmm-top-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut c = vmm();
    c.arg("run")
        .args(["--kernel", &linux_file("bzImage-micro")])
        .args(["--initrd", &linux_file("initramfs-idle.cpio")])
        .args([
            "--vcpus",
            "2",
            "--mem",
            "256M",
            "--cmdline",
            "console=ttyS0",
        ])
        .args(["--balloon", "0", "--hotplug", "256M"])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null());
    let (child, console, stderr) = spawn_lines(c);
    let linux = Linux {
        child,
        socket,
        console,
        stderr,
    };
    let s = linux.socket.clone();
    let t0 = Instant::now();
    eprintln!("waiting for Linux's balloon and virtio-mem drivers (up to 10 min)");
    wait_for("the drivers", Duration::from_secs(600), || {
        s.exists()
            && get(&s, "/balloon")["driver_ready"] == true
            && get(&s, "/memory")["driver_ready"] == true
    });
    eprintln!("[{:5.1}s] drivers ready", t0.elapsed().as_secs_f64());
    linux
}

#[test]
fn top_matches_the_api_on_linux_with_balloon_and_virtio_mem_churning() {
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let linux = boot_linux(port);
    let s = linux.socket.clone();
    let sock = s.to_str().unwrap();

    // Settled: the header is exactly what the API says, and each vCPU's
    // fault count lies between the API's before and after.
    put(&s, "/balloon", r#"{"target_mib": 16}"#);
    put(&s, "/memory", r#"{"requested_mib": 128}"#);
    wait_for("the drivers to follow", Duration::from_secs(600), || {
        get(&s, "/balloon")["actual_mib"] == 16 && get(&s, "/memory")["plugged_mib"] == 128
    });
    let before = get(&s, "/vm/metrics");
    let lines = top_once("0.5", &["--api-socket", sock]);
    let after = get(&s, "/vm/metrics");
    eprintln!("{}", lines.join("\n"));
    assert_eq!(word(&lines, "mode"), after["fault_mode"].as_str().unwrap());
    assert_eq!(num(&lines, "target"), 16.0);
    assert_eq!(num(&lines, "actual"), 16.0);
    assert_eq!(num(&lines, "requested"), 128.0);
    assert_eq!(num(&lines, "plugged"), 128.0);
    assert_eq!(
        num(&lines, "memslots") as u64,
        after["memslots"].as_u64().unwrap()
    );
    let generation = num(&lines, "generation") as u64;
    assert!(before["memslot_generation"].as_u64().unwrap() <= generation);
    assert!(generation <= after["memslot_generation"].as_u64().unwrap());
    for i in 0..2 {
        let r = row(&lines, &format!("vcpu{i}"));
        let total: u64 = r[1].parse().unwrap();
        assert!(
            (faults(&before, i)..=faults(&after, i)).contains(&total),
            "vcpu{i}: {total} faults, the API said {} then {}",
            faults(&before, i),
            faults(&after, i)
        );
        assert!(r[8].ends_with('%'), "blocked: {r:?}");
    }
    for t in ["events", "api", "prefetch"] {
        assert_eq!(row(&lines, t)[8], "-", "no blocktime for {t}");
    }

    // Churning: every frame's rates fit inside what the API counted around
    // it; until one frame saw memslots change and pages discarded. The
    // balloon flips between 0 and 48 MiB; virtio-mem between 128 and 256
    // MiB (plugging the second 128 MiB slice adds a memslot), each step
    // given up to a minute for Linux to follow. The frames start once the
    // first step is set (before it the balloon's target is still 16 MiB).
    let stop = Arc::new(AtomicBool::new(false));
    let (first_step, stepped) = std::sync::mpsc::channel();
    let churn = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (b, m) = if n.is_multiple_of(2) {
                    (48, 256)
                } else {
                    (0, 128)
                };
                put(&s, "/balloon", &format!(r#"{{"target_mib": {b}}}"#));
                put(&s, "/memory", &format!(r#"{{"requested_mib": {m}}}"#));
                let _ = first_step.send(());
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed)
                    && t0.elapsed() < Duration::from_secs(60)
                    && get(&s, "/memory")["plugged_mib"] != m
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                n += 1;
            }
        })
    };
    stepped
        .recv_timeout(Duration::from_secs(60))
        .expect("the churn's first step");
    let mut seen = (false, false);
    let limit = Duration::from_secs(900);
    let deadline = Instant::now() + limit;
    let mut progress = common::Progress::new("a frame that saw the churn", limit);
    while !(seen.0 && seen.1) {
        assert!(
            Instant::now() < deadline,
            "no frame saw the churn: {seen:?}"
        );
        progress.tick();
        let before = get(&s, "/vm/metrics");
        let lines = top_once("1.5", &["--api-socket", sock]);
        let after = get(&s, "/vm/metrics");
        let interval = num(&lines, "interval");
        let counted = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
        let changes = num(&lines, "changes/s") * interval;
        let discarded = num(&lines, "discarded pages/s") * interval;
        assert!(
            changes <= counted("memslot_changes") as f64 + 1.0,
            "{}",
            lines.join("\n")
        );
        assert!(
            discarded <= counted("discarded_pages") as f64 * 1.01 + 1.0,
            "{}",
            lines.join("\n")
        );
        assert!([0.0, 48.0].contains(&num(&lines, "target")));
        assert!([128.0, 256.0].contains(&num(&lines, "requested")));
        assert!(num(&lines, "plugged") <= 256.0);
        seen.0 |= changes > 0.0;
        seen.1 |= discarded > 0.0;
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();

    // The metrics endpoint gives the same view. Linux may still be
    // following the churn's last step (a slice's memslot comes or goes
    // when its first block is plugged or its last unplugged), so the
    // count is compared for a frame with no memslot change around it.
    let url = format!("http://127.0.0.1:{port}");
    wait_for(
        "a frame with no memslot change around it",
        Duration::from_secs(600),
        || {
            let before = get(&s, "/vm/metrics");
            let lines = top_once("0.5", &["--metrics-url", &url]);
            let after = get(&s, "/vm/metrics");
            row(&lines, "vcpu0");
            row(&lines, "vcpu1");
            if before["memslot_changes"] != after["memslot_changes"] {
                eprintln!("memslots changed around the frame: another one");
                return false;
            }
            assert_eq!(
                num(&lines, "memslots") as u64,
                after["memslots"].as_u64().unwrap(),
                "{}",
                lines.join("\n")
            );
            true
        },
    );
    put(&s, "/vm/stop", "");
}

/// A test guest that holds after its pages are touched, with the API on.
fn holding_vm(name: &str) -> Linux {
    let socket = std::env::temp_dir().join(format!("vmm-top-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let mut c = vmm();
    c.args(["run", "--vcpus", "2", "--mem", "64M", "--api-socket"])
        .arg(&socket)
        .args(["--kernel", common::guest("memstress").to_str().unwrap()])
        .args(["--cmdline", "mode=0 rounds=1 bytes=4M hold=1"]);
    let (child, console, stderr) = spawn_lines(c);
    wait_for("the API socket", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    Linux {
        child,
        socket,
        console,
        stderr,
    }
}

/// The live view on a terminal (a pseudo-terminal here): it draws on the
/// alternate screen, `s` changes the sort, `p` pauses, `q` quits with
/// status 0 and gives the screen back.
#[test]
fn live_view_on_a_terminal_sorts_pauses_and_quits() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Mutex;
    let vm = holding_vm("tty");
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 30,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors we then own.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are ours alone from here on.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut c = vmm();
    c.args(["top", "--interval", "0.2", "--api-socket"])
        .arg(&vm.socket)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // The pseudo-terminal becomes the child's controlling terminal, as a
    // login's is (crossterm reads keys and sets raw mode on /dev/tty).
    // SAFETY: setsid and ioctl are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        c.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut top = c.spawn().unwrap();
    drop(c);
    let screen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    {
        let screen = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    // The screen as a terminal would show it (ratatui positions the
    // cursor with CSI row;col H and writes only the cells that changed).
    let shown = |what: &str| {
        let s = screen.lock().unwrap();
        let raw = String::from_utf8_lossy(&s).into_owned();
        if what.starts_with('\x1b') {
            return raw.contains(what);
        }
        render(&raw).iter().any(|line| line.contains(what))
    };
    wait_for("a frame with vcpu0", Duration::from_secs(30), || {
        shown("sorted by thread") && shown("vcpu0") && shown("faults/s by kind")
    });
    assert!(shown("\x1b[?1049h"), "not on the alternate screen");
    let mut keys = std::fs::File::from(master);
    keys.write_all(b"s").unwrap();
    wait_for("the sort to change", Duration::from_secs(10), || {
        shown("sorted by faults/s")
    });
    keys.write_all(b"p").unwrap();
    wait_for("the pause to show", Duration::from_secs(10), || {
        shown("PAUSED")
    });
    keys.write_all(b"q").unwrap();
    let status = exit_of(&mut top, "q to quit");
    assert!(status.success(), "{status}");
    wait_for("the screen given back", Duration::from_secs(5), || {
        shown("\x1b[?1049l")
    });
}

/// The lines of a 30x160 terminal after `raw`: printable characters at
/// the cursor, `CSI row;col H` moves it, other escape sequences change
/// nothing on the grid, `CSI ?1049h` clears it (the alternate screen).
fn render(raw: &str) -> Vec<String> {
    let mut grid = vec![vec![' '; 160]; 30];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            let mut params = String::new();
            for e in chars.by_ref() {
                if ('@'..='~').contains(&e) {
                    match e {
                        'H' => {
                            let mut it = params.split(';').map(|n| n.parse::<usize>().unwrap_or(1));
                            row = it.next().unwrap_or(1).saturating_sub(1);
                            col = it.next().unwrap_or(1).saturating_sub(1);
                        }
                        'h' if params == "?1049" => grid = vec![vec![' '; 160]; 30],
                        _ => {}
                    }
                    break;
                }
                params.push(e);
            }
        } else if c == '\r' {
            col = 0;
        } else if c == '\n' {
            row += 1;
        } else if !c.is_control() {
            if row < grid.len() && col < grid[row].len() {
                grid[row][col] = c;
            }
            col += 1;
        }
    }
    grid.into_iter().map(|r| r.into_iter().collect()).collect()
}

/// The child's exit status, once it has exited; panics after 30 s.
fn exit_of(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let mut status = None;
    wait_for(what, Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// Not a terminal: a plain frame every interval, rows for each thread.
#[test]
fn plain_frames_when_stdout_is_not_a_terminal() {
    let vm = holding_vm("plain");
    let socket = vm.socket.clone();
    let mut t = vmm();
    t.args([
        "top",
        "--interval",
        "0.2",
        "--sort",
        "faults",
        "--api-socket",
    ])
    .arg(&socket);
    let (mut top, out, _err) = spawn_lines(t);
    let mut frames = 0;
    let mut rows = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while frames < 3 {
        assert!(Instant::now() < deadline, "{frames} frames in 30 s");
        if let Ok(l) = out.recv_timeout(Duration::from_millis(100)) {
            frames += usize::from(l == "sorted by faults/s");
            rows += usize::from(l.starts_with("vcpu"));
        }
    }
    assert!(rows >= 4, "{rows} vCPU rows in 3 frames");
    // The VM ends: so does the stream, successfully.
    drop(vm);
    let status = exit_of(&mut top, "vmm top to end with its VM");
    assert!(status.success(), "{status}");
}

#[test]
fn bad_sources_are_refused_clearly() {
    let r = common::run(&["top", "--once"]);
    r.assert_error("--api-socket");
    let r = common::run(&["top", "--once", "--api-socket", "/nonexistent/vmm.sock"]);
    r.assert_error("cannot connect to the API socket /nonexistent/vmm.sock");
    let r = common::run(&["top", "--once", "--metrics-url", "ftp://127.0.0.1:1"]);
    r.assert_error("only http://");
    let r = common::run(&["top", "--once", "--metrics-url", "http://127.0.0.1:1"]);
    r.assert_error("cannot connect to 127.0.0.1:1");
    let r = common::run(&["top", "--once", "--interval", "0", "--api-socket", "x"]);
    r.assert_error("interval");
}
