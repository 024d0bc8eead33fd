//! `vmm bench restore`: a guest that populated its RAM is snapshotted, then
//! restored in each way a VMM restores memory, and touches a working set
//! (sequential or random) the moment it runs; side by side in one run:
//! restore call → first guest instruction, restore call → working set
//! done, the faults the VMM served, the vCPUs' blocktime.
//!
//! The guest is `wset`: it writes one word per page over its RAM, marks 1
//! and waits on the host signal port; the snapshot is taken there. Each
//! restored VM is signalled before it runs, so it starts on its working
//! set at once (marking 2 when done). The `in memory` row signals the
//! booted guest instead: the same working set with every page resident and
//! no restore. Every row but `map-private warm` starts with the memory
//! file out of the page cache (POSIX_FADV_DONTNEED), as a restore on
//! another host, or long after the snapshot, would.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm::config::{FaultMode, Kernel, Prefetch, RestoreMode, RestoreOptions, SerialOut, VmConfig};
use vmm::fault::RestoreStat;
use vmm::vm::Vm;

use crate::{set_cache, Cache};

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug, Clone)]
pub struct RestoreBenchArgs {
    /// Guest RAM sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub mem_mib: Vec<u64>,
    /// The working set the restored guest touches (MiB).
    #[arg(long, default_value_t = 256)]
    pub ws_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Where the snapshots go (each is as large as the guest's RAM, sparse).
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
}

/// One row: how the memory comes back.
#[derive(Clone, Copy)]
struct Way {
    name: &'static str,
    restore: Option<(RestoreMode, FaultMode, Prefetch)>,
    cache: Cache,
}

const WAYS: &[Way] = &[
    Way {
        name: "in memory (no snapshot)",
        restore: None,
        cache: Cache::Warm,
    },
    Way {
        name: "copy",
        restore: Some((RestoreMode::Copy, FaultMode::Vcpu, Prefetch::None)),
        cache: Cache::Cold,
    },
    Way {
        name: "map-private, warm cache",
        restore: Some((RestoreMode::MapPrivate, FaultMode::Kernel, Prefetch::None)),
        cache: Cache::Warm,
    },
    Way {
        name: "map-private, cold cache",
        restore: Some((RestoreMode::MapPrivate, FaultMode::Kernel, Prefetch::None)),
        cache: Cache::Cold,
    },
    Way {
        name: "ondemand vcpu",
        restore: Some((RestoreMode::Ondemand, FaultMode::Vcpu, Prefetch::None)),
        cache: Cache::Cold,
    },
    Way {
        name: "ondemand handler",
        restore: Some((RestoreMode::Ondemand, FaultMode::Handler, Prefetch::None)),
        cache: Cache::Cold,
    },
    Way {
        name: "ondemand vcpu + working set",
        restore: Some((RestoreMode::Ondemand, FaultMode::Vcpu, Prefetch::WorkingSet)),
        cache: Cache::Cold,
    },
];

/// What one row measured.
struct Measured {
    first_entry: Option<Duration>,
    ws_done: Duration,
    faults: Option<u64>,
    blocktime: Option<Duration>,
}

/// A run of the guest: the time of marker 2 from `t0`, and the counters.
fn run_vm(vm: Vm, t0: Instant, out: &Arc<Mutex<Vec<u8>>>) -> Result<Measured, String> {
    let done: Arc<Mutex<Option<Instant>>> = Arc::default();
    let d = done.clone();
    vm.on_marker(Box::new(move |v| {
        if v == 2 {
            *d.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }));
    let (metrics, stats, mode) = (vm.metrics().clone(), vm.restore_stats().clone(), vm.mode());
    let report = vm.run().map_err(|e| e.to_string())?;
    let console =
        String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    if report.reason.status() != 0 || !console.contains("wset: done") || !console.contains("bad=0")
    {
        return Err(format!("the guest failed ({}):\n{console}", report.reason));
    }
    let at = done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or("no working-set marker")?;
    let snap = metrics.snapshot();
    let ns = |v: u64| Duration::from_nanos(v);
    let fe = stats.get(RestoreStat::FirstEntryNs);
    Ok(Measured {
        first_entry: (fe > 0).then(|| ns(fe)),
        ws_done: at - t0,
        faults: mode.uses_uffd().then(|| report.total().faults()),
        blocktime: mode.uses_uffd().then(|| {
            ns(snap
                .vcpus
                .iter()
                .map(|v| v[vmm::fault::ThreadStat::BlocktimeNs])
                .sum())
        }),
    })
}

fn guest_config(
    a: &RestoreBenchArgs,
    mem: u64,
    random: bool,
    out: &Arc<Mutex<Vec<u8>>>,
    kernel: Kernel,
) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.vcpus = a.vcpus;
    c.mem_size = mem;
    c.cmdline = format!("ws={} random={} seed=5", a.ws_mib * MIB, u8::from(random));
    c.serial = SerialOut::Capture(out.clone());
    c.seccomp = vmm::seccomp::SeccompMode::Off;
    c
}

/// Boot the guest, let it populate, and either snapshot it into `dir` or
/// (no `dir`) signal it and time its working set in memory.
fn boot(
    a: &RestoreBenchArgs,
    mem: u64,
    random: bool,
    dir: Option<&Path>,
) -> Result<Measured, String> {
    let guest = std::env::temp_dir().join(format!("vmm-bench-wset-{}.elf", std::process::id()));
    std::fs::write(&guest, vmm_guests::WSET).map_err(|e| e.to_string())?;
    let out: Arc<Mutex<Vec<u8>>> = Arc::default();
    let mut c = guest_config(a, mem, random, &out, Kernel::File(guest.clone()));
    c.fault_mode = Some(FaultMode::Vcpu);
    let vm = Vm::new(c).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&guest);
    let (control, actions) = (vm.control().clone(), vm.actions());
    let populated: Arc<Mutex<Option<Instant>>> = Arc::default();
    let p = populated.clone();
    let done: Arc<Mutex<Option<Instant>>> = Arc::default();
    let d = done.clone();
    vm.on_marker(Box::new(move |v| {
        let slot = if v == 1 { &p } else { &d };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }));
    let dir = dir.map(Path::to_path_buf);
    let driver = std::thread::spawn(move || -> Result<Option<Instant>, String> {
        while populated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        match dir {
            Some(dir) => {
                actions
                    .snapshot(&dir, false, false)
                    .map_err(|e| e.message)?;
                control.stop();
                Ok(None)
            }
            None => {
                let t0 = Instant::now();
                control.signal_guest(1);
                Ok(Some(t0))
            }
        }
    });
    let report = vm.run().map_err(|e| e.to_string())?;
    let t0 = driver.join().map_err(|_| "the driver panicked")??;
    let Some(t0) = t0 else {
        return Ok(Measured {
            first_entry: None,
            ws_done: Duration::ZERO,
            faults: None,
            blocktime: None,
        });
    };
    let at = done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok_or_else(|| format!("no working-set marker ({})", report.reason))?;
    Ok(Measured {
        first_entry: None,
        ws_done: at - t0,
        faults: None,
        blocktime: None,
    })
}

/// Restore `dir` the row's way and time it.
fn restore(
    a: &RestoreBenchArgs,
    dir: &Path,
    mem: u64,
    random: bool,
    w: Way,
    record: bool,
) -> Result<Measured, String> {
    let (mode, fault, prefetch) = w.restore.ok_or("no restore")?;
    set_cache(&dir.join("memory"), w.cache)?;
    let out: Arc<Mutex<Vec<u8>>> = Arc::default();
    let mut c = guest_config(a, mem, random, &out, Kernel::Snapshot(dir.to_path_buf()));
    c.fault_mode = Some(fault);
    c.restore = RestoreOptions {
        mode,
        prefetch,
        record_working_set: record.then_some(Duration::from_secs(3600)),
        verify_memory: false,
    };
    let t0 = Instant::now();
    let vm = Vm::new(c).map_err(|e| e.to_string())?;
    vm.control().signal_guest(1);
    run_vm(vm, t0, &out)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Run the benchmark and print one table per RAM size and pattern.
pub fn run(a: &RestoreBenchArgs) -> Result<(), String> {
    for &mem_mib in &a.mem_mib {
        for random in [false, true] {
            let mem = mem_mib * MIB;
            let dir = a.dir.join(format!(
                "vmm-bench-restore-{mem_mib}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let t = Instant::now();
            boot(a, mem, random, Some(&dir))?;
            eprintln!(
                "snapshot of {mem_mib} MiB populated in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            println!(
                "\n{mem_mib} MiB guest, {} MiB working set, {}, {} vCPUs",
                a.ws_mib,
                if random { "random" } else { "sequential" },
                a.vcpus
            );
            println!(
                "{:<30} {:>14} {:>14} {:>10} {:>13} {:>8}",
                "restore", "first insn ms", "ws done ms", "faults", "blocktime ms", "vs mem"
            );
            let mut base = None;
            for w in WAYS {
                let m = match w.restore {
                    None => boot(a, mem, random, None)?,
                    Some((_, _, Prefetch::WorkingSet)) => {
                        // Record the set once (an ondemand restore), then replay.
                        let rec = Way {
                            restore: Some((RestoreMode::Ondemand, FaultMode::Vcpu, Prefetch::None)),
                            ..*w
                        };
                        restore(a, &dir, mem, random, rec, true)?;
                        restore(a, &dir, mem, random, *w, false)?
                    }
                    Some(_) => restore(a, &dir, mem, random, *w, false)?,
                };
                let b = *base.get_or_insert(m.ws_done);
                println!(
                    "{:<30} {:>14} {:>14} {:>10} {:>13} {:>7.2}x",
                    w.name,
                    m.first_entry.map(ms).unwrap_or_else(|| "-".into()),
                    ms(m.ws_done),
                    m.faults
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "-".into()),
                    m.blocktime.map(ms).unwrap_or_else(|| "-".into()),
                    m.ws_done.as_secs_f64() / b.as_secs_f64()
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}
