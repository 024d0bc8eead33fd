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
