//! `vmm stress` on real KVM: a short churn run with every rate on passes
//! every invariant with checks made, its report agrees with the metrics
//! endpoint, and each injected fault is survived and reported.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{run_with, spawn_lines, vmm};
use serde_json::Value;
use vmm_stress::schedule::{self, Action, Limits};

fn stress(args: &[&str]) -> (Value, common::Run) {
    let mut c = vmm();
    c.args(["stress", "--json"]).args(args);
    let r = run_with(c, Duration::from_secs(600));
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}\n{}", r.stdout, r.stderr));
    (v, r)
}

fn invariant<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

/// Every invariant held; those in `checked` made checks (I6 needs a
/// hotplug region).
fn assert_all_held(report: &Value, r: &common::Run, checked: &[&str]) {
    for name in ["I1", "I2", "I3", "I4", "I6"] {
        let i = invariant(report, name);
        assert_eq!(
            i["violations"], 0,
            "{name} violated: {report:#}\n{}",
            r.stderr
        );
        if checked.contains(&name) {
            assert!(
                i["checks"].as_u64().unwrap() > 0,
                "{name} made no checks: {report:#}"
            );
        }
    }
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(r.status, Some(0));
}

const ALL: [&str; 5] = ["I1", "I2", "I3", "I4", "I6"];
const NO_HOTPLUG: [&str; 4] = ["I1", "I2", "I3", "I4"];

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    use std::io::Write;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// About 20 s, 2 vCPUs, every rate on: every invariant checked and held;
/// the report's numbers equal the metrics endpoint's at the end. The guest
/// runs until the run's time is up, so the churn counted happened while it
/// ran; how much churn a run makes is the schedule's (see
/// `the_seed_fixes_the_schedule`), how fast is a benchmark's question.
#[test]
fn short_stress_passes_and_matches_the_metrics() {
    let mut c = vmm();
    c.args([
        "stress",
        "--json",
        "--duration",
        "20s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "256M",
        "--seed",
        "7",
        "--balloon-rate",
        "2",
        "--hotplug-rate",
        "2",
        "--memslot-rate",
        "100",
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-linger",
        "30s",
    ]);
    let (mut child, out, err) = spawn_lines(c);
    let addr: SocketAddr = err
        .iter()
        .find_map(|l| {
            l.strip_prefix("vmm: metrics on http://")
                .map(str::to_string)
        })
        .expect("metrics address")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    // The report is printed whole at the end; the endpoint lingers.
    let mut text = String::new();
    for line in out.iter() {
        text.push_str(&line);
        text.push('\n');
        if line == "}" {
            break;
        }
    }
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let m: Value = serde_json::from_str(&get(addr, "/metrics.json")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    for name in ["I1", "I2", "I3", "I4", "I6"] {
        let i = invariant(&report, name);
        assert_eq!(i["violations"], 0, "{name}: {report:#}");
        assert!(i["checks"].as_u64().unwrap() > 0, "{name}: {report:#}");
    }
    assert_eq!(report["ok"], true);
    // Same numbers on both sides.
    let sum = |field: &str| -> u64 {
        ["vcpus", "handlers"]
            .iter()
            .flat_map(|k| m[k].as_array().unwrap().iter())
            .chain(m["threads"].as_object().unwrap().values())
            .map(|t| t[field].as_u64().unwrap())
            .sum()
    };
    let faults: u64 = ["vcpus", "handlers"]
        .iter()
        .flat_map(|k| m[k].as_array().unwrap().iter())
        .chain(m["threads"].as_object().unwrap().values())
        .flat_map(|t| t["faults"].as_object().unwrap().values())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(report["faults_total"].as_u64().unwrap(), faults);
    assert_eq!(report["retries"].as_u64().unwrap(), sum("retries"));
    assert_eq!(
        report["slow_path_installs"].as_u64().unwrap(),
        sum("slow_path_installs")
    );
    assert_eq!(
        report["pages_installed"].as_u64().unwrap(),
        sum("pages_installed")
    );
    assert_eq!(report["memslot_changes"], m["memslot_changes"]);
    assert_eq!(
        report["balloon"]["inflated_pages"],
        m["balloon"]["inflated_pages"]
    );
    assert_eq!(
        report["balloon"]["deflated_pages"],
        m["balloon"]["deflated_pages"]
    );
    assert_eq!(
        report["hotplug"]["plugs"],
        m["hotplug"]["requests"]["plug"]["ack"]
    );
    assert_eq!(
        report["hotplug"]["unplugs"],
        m["hotplug"]["requests"]["unplug"]["ack"]
    );
    assert!(report["hotplug"]["resizes"].as_u64().unwrap() > 0);
    assert!(report["extra_memslot_changes"].as_u64().unwrap() > 0);
}

/// UFFDIO_COPY answering EAGAIN (as if a discard were in flight) on every
/// 50th install: every fault still ends installed, through retries.
#[test]
fn injected_eagain_is_retried() {
    let (report, r) = stress(&[
        "--duration",
        "10s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "128M",
        "--inject-eagain-every",
        "50",
    ]);
    assert_all_held(&report, &r, &ALL);
    let faults = report["faults_total"].as_u64().unwrap();
    let retries = report["retries"].as_u64().unwrap();
    assert!(
        retries >= faults / 60,
        "{retries} retries for {faults} faults"
    );
}

/// A guest that ignores balloon requests: nothing is inflated, nothing
/// breaks.
#[test]
fn guest_ignoring_the_balloon() {
    let (report, r) = stress(&[
        "--duration",
        "10s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "0",
        "--guest-ignores-balloon",
    ]);
    assert_all_held(&report, &r, &NO_HOTPLUG);
    assert_eq!(report["balloon"]["inflated_pages"], 0);
    assert!(report["balloon"]["target_changes"].as_u64().unwrap() > 0);
}

/// A guest that keeps writing to pages it gave the balloon: its data is its
/// own to lose; the VMM stays consistent and says how many ballooned pages
/// the guest touched.
#[test]
fn guest_using_ballooned_pages() {
    let (report, r) = stress(&[
        "--duration",
        "10s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "0",
        "--guest-uses-ballooned",
        "--balloon-rate",
        "4",
    ]);
    assert_all_held(&report, &r, &NO_HOTPLUG);
    assert!(
        report["guest"]["ballooned_writes"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}

/// A guest that plugs beyond requested_size is NACKed, and nothing is
/// plugged beyond it.
#[test]
fn guest_plugging_beyond_requested_size_is_nacked() {
    let (report, r) = stress(&[
        "--duration",
        "10s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "256M",
        "--guest-overplugs",
        "--hotplug-rate",
        "1",
    ]);
    assert_all_held(&report, &r, &ALL);
    assert!(
        report["hotplug"]["nacks"].as_u64().unwrap() >= 1,
        "{report:#}"
    );
    assert_eq!(report["guest"]["overplug_acked"], 0);
}

/// The seed fixes the schedule a run follows. That `schedule::build` is a
/// function of the seed alone is the unit test
/// `vmm_stress::schedule::tests::the_same_seed_gives_the_same_schedule`;
/// what only a run shows is that the command line reaches it and the churn
/// follows it: one short run reports the digest of the schedule built here
/// from its seed and limits (another seed's differs), and counts exactly
/// that schedule's changes of each kind.
#[test]
fn the_seed_fixes_the_schedule() {
    let mib = 1u64 << 20;
    let (report, r) = stress(&[
        "--duration",
        "3s",
        "--vcpus",
        "2",
        "--mem",
        "128M",
        "--hotplug",
        "128M",
        "--seed",
        "42",
        "--balloon-rate",
        "2",
        "--hotplug-rate",
        "2",
        "--memslot-rate",
        "100",
    ]);
    assert_eq!(report["ok"], true, "{report:#}\n{}", r.stderr);
    // The limits `vmm stress` derives from those arguments: the balloon
    // moves in MiB up to its pool (a quarter of RAM), virtio-mem in blocks
    // (2 MiB by default) up to its region, over 4 extra memslots.
    let limits = Limits {
        duration: Duration::from_secs(3),
        balloon_rate: 2.0,
        hotplug_rate: 2.0,
        memslot_rate: 100.0,
        balloon_max: 32 * mib,
        balloon_unit: mib,
        hotplug_max: 128 * mib,
        hotplug_unit: 2 * mib,
        extra_slots: 4,
    };
    let events = schedule::build(42, &limits);
    let digest = |e: &[schedule::Event]| format!("{:016x}", schedule::digest(e));
    assert_eq!(
        report["schedule_digest"],
        digest(&events),
        "the run did not follow seed 42's schedule"
    );
    assert_ne!(
        report["schedule_digest"],
        digest(&schedule::build(43, &limits))
    );
    let count = |f: fn(&Action) -> bool| events.iter().filter(|e| f(&e.action)).count() as u64;
    let balloon = count(|a| matches!(a, Action::Balloon(_)));
    let hotplug = count(|a| matches!(a, Action::Hotplug(_)));
    let slots = count(|a| matches!(a, Action::SlotAdd(_) | Action::SlotRemove(_)));
    assert!(balloon > 0 && hotplug > 0 && slots > 0, "{events:?}");
    assert_eq!(report["balloon"]["target_changes"], balloon, "{report:#}");
    assert_eq!(report["hotplug"]["resizes"], hotplug, "{report:#}");
    assert_eq!(report["extra_memslot_changes"], slots, "{report:#}");
}

/// The same churn against Linux (the microVM kernel, `idle` /init): balloon
/// and virtio-mem targets cycled, each cycle waiting for the drivers, the
/// VMM's checks (I1, I4, I6) on its side.
#[test]
fn linux_churn() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest-images/out/linux");
    let kernel = dir.join("bzImage-micro");
    let initrd = dir.join("initramfs-idle.cpio");
    assert!(kernel.exists(), "run guest-images/build.sh");
    let (report, r) = stress(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--vcpus",
        "1",
        "--mem",
        "256M",
        "--hotplug",
        "256M",
        "--cycles",
        "2",
        "--memslot-rate",
        "20",
    ]);
    assert_eq!(report["ok"], true, "{report:#}\n{}", r.stderr);
    assert_eq!(report["guest"]["cycles"], 2, "{report:#}");
    for name in ["I1", "I4", "I6"] {
        assert_eq!(invariant(&report, name)["violations"], 0, "{report:#}");
    }
    // Memslots churned while Linux ran (how many depends on how long its
    // cycles took: counted, not timed).
    assert!(report["extra_memslot_changes"].as_u64().unwrap() > 0);
    assert!(report["balloon"]["inflated_pages"].as_u64().unwrap() > 0);
    assert!(report["hotplug"]["slices_added"].as_u64().unwrap() > 0);
}

/// `--mem-hugepages`: balloon, virtio-mem and memslot churn on hugetlb RAM
/// while vCPUs fault; every invariant checked and held (the guest checks
/// each deflated and re-plugged page reads zero), no ballooned frame counted
/// as touched, and every install a whole huge page.
#[test]
fn stress_on_huge_pages() {
    let (report, r) = stress(&[
        "--mem-hugepages",
        "--duration",
        "20s",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--hotplug",
        "256M",
        "--seed",
        "11",
    ]);
    assert_all_held(&report, &r, &ALL);
    assert!(report["balloon"]["inflated_pages"].as_u64().unwrap() > 0);
    assert_eq!(report["balloon"]["touched_in_balloon"], 0, "{report:#}");
    assert!(report["hotplug"]["plugs"].as_u64().unwrap() > 0);
    let installed = report["pages_installed"].as_u64().unwrap();
    assert!(installed > 0 && installed.is_multiple_of(512), "{report:#}");
}
