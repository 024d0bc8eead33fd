//! Boot the test guests on real KVM and check what they print and return.

mod common;

use common::{guest, run};

fn path(name: &str) -> String {
    guest(name).display().to_string()
}

#[test]
fn hello_prints_and_exits_zero() {
    for vcpus in ["1", "2"] {
        let r = run(&[
            "run",
            "--kernel",
            &path("hello"),
            "--vcpus",
            vcpus,
            "--mem",
            "64M",
        ]);
        r.assert_ok();
        assert!(
            r.stdout.contains("hello from vmm guest\n"),
            "stdout: {}",
            r.stdout
        );
    }
}

fn touch(vcpus: usize, cmdline: &str) -> common::Run {
    let v = vcpus.to_string();
    let r = run(&[
        "run",
        "--kernel",
        &path("touch"),
        "--vcpus",
        &v,
        "--mem",
        "128M",
        "--cmdline",
        cmdline,
    ]);
    r.assert_ok();
    for cpu in 0..vcpus {
        assert!(
            r.stdout.contains(&format!("touch cpu={cpu} ")),
            "no line from vCPU {cpu}: {}",
            r.stdout
        );
    }
    assert!(
        r.stdout.contains(&format!("vcpus={vcpus} ")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("touch: OK"), "{}", r.stdout);
    r
}

/// The checksum depends only on the region and seed, not on how the region
/// is split among vCPUs: 1 and 2 vCPUs must agree.
#[test]
fn touch_verifies_with_one_and_two_vcpus() {
    let checksum = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("touch: OK"))
            .and_then(|l| l.split("checksum=").nth(1))
            .map(str::to_string)
            .expect("checksum")
    };
    let one = touch(1, "bytes=1M seed=7");
    let two = touch(2, "bytes=1M seed=7");
    assert_eq!(checksum(&one.stdout), checksum(&two.stdout));
    let other = touch(2, "bytes=1M seed=8");
    assert_ne!(
        checksum(&two.stdout),
        checksum(&other.stdout),
        "seed must matter"
    );
}

#[test]
fn touch_fails_loudly_outside_ram() {
    let r = run(&[
        "run",
        "--kernel",
        &path("touch"),
        "--vcpus",
        "1",
        "--mem",
        "16M",
        "--cmdline",
        "base=0x2000000",
    ]);
    r.assert_no_panic();
    assert_eq!(r.status, Some(2), "stdout: {}", r.stdout);
}

#[test]
fn default_guest_runs_on_several_vcpus() {
    let r = run(&["run", "--vcpus", "2"]);
    r.assert_ok();
    assert!(r.stdout.contains("demo cpu=0 "), "{}", r.stdout);
    assert!(r.stdout.contains("demo cpu=1 "), "{}", r.stdout);
    assert!(r.stdout.contains("all verified"), "{}", r.stdout);
}

/// A guest that pokes unclaimed ports and MMIO addresses is logged (rate
/// limited) and keeps running.
#[test]
fn garbage_io_is_ignored_and_rate_limited() {
    let r = run(&[
        "run",
        "--kernel",
        &path("garbage"),
        "--vcpus",
        "2",
        "--mem",
        "64M",
    ]);
    r.assert_ok();
    assert!(r.stdout.contains("garbage: survived"), "{}", r.stdout);
    let warnings = r.stderr.lines().filter(|l| l.contains("unclaimed")).count();
    assert!(warnings > 0, "nothing logged:\n{}", r.stderr);
    // The guest makes thousands of bad accesses; the log must not carry them all.
    assert!(warnings < 200, "{warnings} warnings: not rate limited");
}

/// A triple fault ends the VM with a clear message and a non-zero status.
#[test]
fn triple_fault_is_reported() {
    let r = run(&[
        "run",
        "--kernel",
        &path("garbage"),
        "--vcpus",
        "1",
        "--mem",
        "64M",
        "--cmdline",
        "crash",
    ]);
    r.assert_error("triple-faulted");
}
