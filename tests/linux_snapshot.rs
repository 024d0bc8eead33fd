//! Linux from a snapshot: the micro kernel booted to its shell once
//! (cached, `common::micro_linux_snapshot`), restored, answers a command at
//! the restored shell and powers off; two restores of one snapshot run at
//! once, each with its own session. Prints how long the first shell output
//! took (the boot takes about a minute here).

mod common;

use std::time::Duration;

use common::{micro_linux_snapshot, restore_shell, Restored};

fn check_session(r: &Restored, word: &str, what: &str) {
    assert!(r.has_line(word), "{what}: `{word}` answered\n{}", r.tail());
    let release = std::fs::read_to_string(common::linux_file("vmlinux-micro.version")).unwrap();
    assert!(r.has_line(release.trim()), "{what}: uname -r\n{}", r.tail());
    assert_eq!(
        r.status,
        Some(0),
        "{what}: poweroff ends the VM\n{}",
        r.tail()
    );
}

fn first_output(r: &Restored) -> Duration {
    r.first_output.expect("some output")
}

/// Restored in each fault mode: on this PVM host a restore served on the
/// vCPU thread needs the whole file prefetched behind it (a guest
/// user-mode touch of a missing page spins in KVM's async-PF path without
/// reaching the VMM; docs/FAULT-PATH.md), a handler-mode restore does not;
/// without `--prefetch` the VMM prefetches all and warns.
#[test]
fn the_restored_shell_answers() {
    let snap = micro_linux_snapshot();
    for (args, word) in [
        (&["--fault-mode", "handler"][..], "restored-handler"),
        (
            &["--fault-mode", "vcpu", "--prefetch", "all"][..],
            "restored-vcpu",
        ),
        (&["--restore-mode", "copy"][..], "restored-copy"),
        // No prefetch asked for: the VMM turns it on, and says so.
        (&["--fault-mode", "vcpu"][..], "restored-auto"),
    ] {
        let r = restore_shell(&snap, args, &format!("echo {word}; uname -r; poweroff\n"));
        eprintln!(
            "{args:?}: restore → first shell output {:.0} ms",
            first_output(&r).as_secs_f64() * 1e3
        );
        check_session(&r, word, &format!("{args:?}"));
        let warned = r
            .stderr
            .iter()
            .any(|l| l.contains("prefetching every page"));
        assert_eq!(
            warned,
            args == ["--fault-mode", "vcpu"]
                && vmm::host::detect_flavor() == vmm::host::KvmFlavor::Pvm,
            "{args:?}: the prefetch warning\n{}",
            r.stderr.join("\n")
        );
    }
}

/// Two VMs restored from one snapshot at once: each answers its own
/// session; the snapshot serves both (read-only).
#[test]
fn two_restores_of_one_snapshot_at_once() {
    let snap = micro_linux_snapshot();
    let a = {
        let snap = snap.clone();
        std::thread::spawn(move || {
            restore_shell(
                &snap,
                &["--fault-mode", "handler"],
                "echo first-vm; uname -r; poweroff\n",
            )
        })
    };
    let b = restore_shell(
        &snap,
        &["--fault-mode", "vcpu", "--prefetch", "all"],
        "echo second-vm; uname -r; poweroff\n",
    );
    let a = a.join().unwrap();
    check_session(&a, "first-vm", "first");
    check_session(&b, "second-vm", "second");
    assert!(!a.has_line("second-vm") && !b.has_line("first-vm"));
}

/// The micro Linux at its shell moves by post-copy to a second `vmm` (its
/// pages asked for as the guest touches them, pushed meanwhile) and the
/// shell answers there: the source is a restore of the cached snapshot.
#[test]
fn the_shell_moved_by_postcopy_answers_on_the_destination() {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Stdio;
    let snap = micro_linux_snapshot();
    let tmp =
        |n: &str| std::env::temp_dir().join(format!("vmm-linux-mig-{n}-{}", std::process::id()));
    let key = tmp("key");
    std::fs::write(&key, b"the linux migration test's key..").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let addr = format!("unix:{}", tmp("dst.sock").display());
    let api = tmp("src.sock");
    let _ = std::fs::remove_file(&api);
    // On this PVM host a Linux guest's user-mode touch of a missing page
    // needs the handler mode (docs/FAULT-PATH.md), on both sides.
    let mut d = common::vmm();
    d.args(["run", "--incoming", &addr, "--migration-key"])
        .arg(&key)
        .args(["--fault-mode", "handler"])
        .stdin(Stdio::piped());
    let (mut dst, d_out, d_err) = common::spawn_lines(d);
    let first = d_err.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(first.contains("waiting for a migration"), "{first}");
    let mut s = common::vmm();
    s.args(["restore", "--snapshot"])
        .arg(&snap)
        .args(["--fault-mode", "handler", "--api-socket"])
        .arg(&api);
    let (mut src, _s_out, s_err) = common::spawn_lines(s);
    common::wait_for("the source's API", Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&api).is_ok()
    });
    let mut c = common::vmm();
    c.arg("ctl")
        .arg("--api-socket")
        .arg(&api)
        .args(["--json", "migrate", "start", "--to", &addr, "--key"])
        .arg(&key)
        .args(["--mode", "postcopy"]);
    let r = common::run_with(c, Duration::from_secs(300));
    let src_status = src.wait().unwrap().code();
    let s_err: Vec<String> = s_err.try_iter().collect();
    assert_eq!(
        r.status,
        Some(0),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        s_err.join("\n")
    );
    assert_eq!(src_status, Some(0), "{}", s_err.join("\n"));
    let status: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(status["pages_pending"].as_u64().unwrap() > 1000, "{status}");
    let mut stdin = dst.stdin.take().unwrap();
    stdin
        .write_all(b"echo migrated-shell; uname -r; poweroff\n")
        .unwrap();
    stdin.flush().unwrap();
    let mut console = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while std::time::Instant::now() < deadline {
        match d_out.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => console.push(l),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(_) => {}
        }
    }
    drop(stdin);
    let d_status = dst.wait().unwrap().code();
    let release = std::fs::read_to_string(common::linux_file("vmlinux-micro.version")).unwrap();
    let has = |w: &str| console.iter().any(|l| l.trim() == w);
    let d_err: Vec<String> = d_err.try_iter().collect();
    let tail = format!("{}\n{}", console.join("\n"), d_err.join("\n"));
    assert!(has("migrated-shell"), "the shell answered there:\n{tail}");
    assert!(has(release.trim()), "uname -r:\n{tail}");
    assert_eq!(d_status, Some(0), "poweroff ends the VM there:\n{tail}");
    assert!(
        d_err.iter().any(|l| l.contains("post-copy complete")),
        "{tail}"
    );
}
