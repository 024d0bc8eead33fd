//! `vmm`: command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vmm::config::{
    parse_mem_source, parse_size, BalloonOptions, FaultMode, HotplugOptions, Kernel, Prefetch,
    RestoreMode, RestoreOptions, SerialOut, SyscallAssistMode, VmConfig,
};
use vmm::vm::Vm;
use vmm_bench::{self as bench, BenchArgs};

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM VMM whose vCPU threads serve their own guest-memory faults"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it ends; exit with the guest's status.
    Run(RunArgs),
    /// Restore a VM from a snapshot (`vmm ctl snapshot create`) and run it
    /// until it ends.
    Restore(RestoreArgs),
    /// Benchmarks (numbers side by side, one run).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Talk to a running VMM's control API.
    Ctl(CtlArgs),
    /// Balloon and hotplug churn while every vCPU faults, with the
    /// invariants counted (exit status 1 on any violation).
    Stress(vmm_stress::StressArgs),
    /// A live view of a running VMM: per-vCPU faults, installs, latency,
    /// blocktime; memory, balloon and virtio-mem (`--once` for one plain
    /// frame).
    Top(vmm_top::TopArgs),
}

#[derive(Parser)]
struct CtlArgs {
    /// The API socket of the running VMM (`vmm run --api-socket PATH`).
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the API's JSON (for scripts) instead of aligned lines.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// The VM: state, vCPUs, memory.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The memory balloon.
    #[command(subcommand)]
    Balloon(BalloonCmd),
    /// Hotplug memory (virtio-mem).
    #[command(subcommand)]
    Mem(MemCmd),
    /// Snapshots of the running VM.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Live migration to a `vmm run --incoming` (pre-copy, post-copy).
    #[command(subcommand)]
    Migrate(MigrateCmd),
    /// End a restore's working-set recording now and write it.
    SaveWorkingSet,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Pause the VM, save it into DIR (which must not exist), and let it
    /// run on (unless --paused).
    Create {
        dir: PathBuf,
        /// Leave the VM paused after the snapshot (`vmm ctl vm resume`).
        #[arg(long)]
        paused: bool,
        /// Write only the pages changed since the VM's last snapshot (the
        /// one it took, or was restored from); restoring DIR reads the
        /// rest from that one, which must stay where it is.
        #[arg(long)]
        diff: bool,
    },
}

#[derive(Subcommand)]
enum MigrateCmd {
    /// Send the VM to ADDR while it runs; ends when the destination runs
    /// it (this VM then ends) or the migration failed (it runs on).
    Start {
        /// tcp:HOST:PORT or unix:PATH (the destination's --incoming).
        #[arg(long)]
        to: String,
        /// The pre-shared key file (the destination's --migration-key).
        #[arg(long)]
        key: PathBuf,
        /// Stop the guest once what is left fits this many milliseconds.
        #[arg(long, default_value_t = 300)]
        max_downtime: u64,
        /// Rounds after the first before the guest is stopped anyway.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// precopy: rounds while the guest runs, then the rest while it is
        /// stopped; postcopy: the guest runs on the destination at once and
        /// its pages follow (asked for when touched, pushed otherwise);
        /// auto: pre-copy, post-copy if the rounds do not converge.
        #[arg(long, default_value = "precopy", value_parser = ["precopy", "postcopy", "auto"])]
        mode: String,
        /// Post-copy pushes pages at most this fast (MiB/s; 0: no limit);
        /// the destination's requests are answered at once regardless.
        #[arg(long, default_value_t = 0)]
        max_postcopy_bandwidth: u64,
    },
    /// Resume a post-copy whose connection broke: the destination listens
    /// again at its --incoming address.
    Recover {
        #[arg(long)]
        to: String,
        #[arg(long)]
        key: PathBuf,
    },
    /// The running (or last) migration: state, round, pages sent, dirty
    /// rate, expected downtime; post-copy's requests and pushes.
    Show,
}

#[derive(Subcommand)]
enum MemCmd {
    /// Show the region, block size, plugged and requested sizes, counters.
    Show,
    /// Ask the guest to plug or unplug memory until `size` is plugged
    /// (e.g. 1G; whole MiB).
    Resize {
        #[arg(value_parser = parse_mem)]
        size: u64,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Show the VM's state.
    Show,
    /// Stop the VM (status 0).
    Stop,
    /// Stop every vCPU at its next exit (devices and the API go on).
    Pause,
    /// Let a paused VM run again.
    Resume,
}

#[derive(Subcommand)]
enum BalloonCmd {
    /// Show target, actual size, counters and the guest's statistics.
    Show,
    /// Set the target size (e.g. 256M; whole MiB).
    Set {
        #[arg(value_parser = parse_mem)]
        size: u64,
    },
    /// Set how often the guest's statistics are polled (seconds; 0 = off).
    StatsInterval { seconds: u64 },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Fault throughput and latency under each fault mode.
    Faults(BenchArgs),
    /// Balloon inflate/deflate rates and fault latency while inflating.
    Balloon(vmm_bench::balloon::BalloonBenchArgs),
    /// virtio-mem plug/unplug latency and fault latency while they happen.
    Hotplug(vmm_bench::hotplug::HotplugBenchArgs),
    /// Restore a snapshot each way (copy, map-private, ondemand, working
    /// set) and time the guest's working set.
    Restore(vmm_bench::restore::RestoreBenchArgs),
}

#[derive(Parser)]
struct RunArgs {
    /// Kernel to boot: a Linux bzImage or ELF vmlinux, or an ELF test guest.
    /// Without it, the embedded default guest runs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Boot nothing: wait on tcp:HOST:PORT or unix:PATH for one live
    /// migration (`vmm ctl migrate start`) and run the VM it brings.
    #[arg(long, requires = "migration_key", conflicts_with_all = ["kernel", "initrd", "mem_source", "balloon", "hotplug", "mem_hugepages"])]
    incoming: Option<String>,
    /// The pre-shared key file a source must hold (at least 16 bytes,
    /// mode 600; e.g. `head -c 32 /dev/urandom > key`).
    #[arg(long, requires = "incoming")]
    migration_key: Option<PathBuf>,
    /// Guest RAM: a size like 512M or 2G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Command line handed to the guest (Linux: appended to the VMM's
    /// defaults, e.g. `console=ttyS0`).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Initramfs for a Linux kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Back guest RAM with a memory image, read lazily at first touch
    /// (file:PATH; needs --fault-mode vcpu or handler).
    #[arg(long, value_parser = parse_source)]
    mem_source: Option<PathBuf>,
    /// Add a virtio-balloon device with this initial target (e.g. 0, 128M).
    #[arg(long, value_parser = parse_balloon)]
    balloon: Option<u64>,
    /// Offer the balloon's free page reporting (the guest returns free
    /// memory on its own).
    #[arg(long, requires = "balloon")]
    balloon_free_page_reporting: bool,
    /// How often the balloon polls the guest's memory statistics (seconds;
    /// 0 = never).
    #[arg(long, default_value_t = 5, requires = "balloon")]
    balloon_stats_interval: u64,
    /// Add a virtio-mem device with a hotplug region of this size (a
    /// multiple of 128M) above boot RAM; nothing is plugged until asked.
    #[arg(long, value_parser = parse_mem)]
    hotplug: Option<u64>,
    /// virtio-mem block size: a power of two from 2M dividing 128M.
    #[arg(long, default_value = "2M", value_parser = parse_mem, requires = "hotplug")]
    hotplug_block: u64,
    /// virtio-mem requested size at boot: the driver plugs this much as soon
    /// as it starts (whole blocks, at most --hotplug; the API moves it).
    #[arg(long, default_value = "0", value_parser = parse_mem, requires = "hotplug")]
    hotplug_requested: u64,
    /// Back guest RAM with 2 MiB hugetlb pages (the host's pool is raised
    /// if it is short; a fault installs a whole huge page).
    #[arg(long)]
    mem_hugepages: bool,
    /// PVM hosts: complete guest SYSCALLs the host leaves half done (a
    /// breakpoint on the guest's #PF handler). auto: for Linux kernels that
    /// do not do it themselves; never armed on hardware KVM.
    #[arg(long, value_enum, default_value = "auto")]
    syscall_assist: SyscallAssistMode,
}

/// How a VM is served, booted or restored alike.
#[derive(clap::Args)]
struct ServeArgs {
    /// How guest RAM is populated. Default: vcpu where the host reports
    /// faulting addresses to the vCPU, handler elsewhere.
    #[arg(long, value_enum)]
    fault_mode: Option<FaultMode>,
    /// Handler threads in handler mode.
    #[arg(long, default_value_t = 1)]
    fault_threads: usize,
    /// Largest adaptive fault-around window in pages: a thread's sequential
    /// faults double it from 1 up to this (1 = off; default 512 = 2 MiB).
    #[arg(long, default_value_t = vmm::config::DEFAULT_FAULT_AROUND)]
    fault_around: u64,
    /// Serve fault metrics over HTTP at ADDR (e.g. 127.0.0.1:9464):
    /// /metrics (OpenMetrics text), /metrics.json, /healthz.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Allow --metrics-addr to be a non-loopback address.
    #[arg(long)]
    metrics_allow_remote: bool,
    /// Keep serving metrics this long after the VM ends (a last scrape of
    /// the final counters), e.g. 10s.
    #[arg(long, default_value = "0s", value_parser = vmm::config::parse_duration, requires = "metrics_addr")]
    metrics_linger: std::time::Duration,
    /// Do not print the fault summary at the end.
    #[arg(long)]
    quiet: bool,
    /// Serve the control API (HTTP/JSON) on this Unix socket (mode 0600).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// seccomp filters per VMM thread: kill (a forbidden system call ends
    /// the VMM with a report), log (the kernel logs it, `dmesg`), off.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: vmm::seccomp::SeccompMode,
    /// How KVM reports the pages the guest writes (live migration, diff
    /// snapshots): bitmap (KVM_GET_DIRTY_LOG per memslot) or ring[:ENTRIES]
    /// (a ring per vCPU, a power of two from 1024; ring = ring:4096).
    #[arg(long, default_value = "bitmap")]
    dirty_log: vmm::config::DirtyLog,
    /// Use --dirty-log ring even on a PVM host, which writes past the ring
    /// (measured: every emulated guest store takes an entry and the host
    /// does not stop the vCPU in time; a vCPU can be left unable to run,
    /// which ends the VM). For measuring it.
    #[arg(long)]
    force_dirty_ring: bool,
}

impl ServeArgs {
    /// `config` with these options.
    fn apply(&self, config: VmConfig) -> VmConfig {
        VmConfig {
            fault_mode: self.fault_mode,
            fault_threads: self.fault_threads,
            fault_around: self.fault_around,
            metrics_addr: self.metrics_addr,
            metrics_allow_remote: self.metrics_allow_remote,
            metrics_linger: self.metrics_linger,
            api_socket: self.api_socket.clone(),
            seccomp: self.seccomp,
            seccomp_caller: true,
            dirty_log: match self.dirty_log {
                vmm::config::DirtyLog::Ring { entries, .. } => vmm::config::DirtyLog::Ring {
                    entries,
                    force: self.force_dirty_ring,
                },
                d => d,
            },
            ..config
        }
    }
}

#[derive(Parser)]
struct RestoreArgs {
    /// The snapshot directory (`vmm ctl snapshot create DIR`). Nothing in
    /// it is modified (a recorded working set is added beside).
    #[arg(long)]
    snapshot: PathBuf,
    /// ondemand: each first touch is served from the memory file by the
    /// fault engine; copy: all of it is read before the guest runs;
    /// map-private: a private file mapping served by the host's page cache
    /// (with --fault-mode kernel).
    #[arg(long, value_enum, default_value = "ondemand")]
    restore_mode: RestoreMode,
    /// Fill memory in the background while the guest runs (ondemand):
    /// working-set (an earlier restore's recording) or all.
    #[arg(long, value_enum, default_value = "none")]
    prefetch: Prefetch,
    /// Record the pages the guest touches first, for this long (or until
    /// `vmm ctl save-working-set`), into DIR/working-set (e.g. 10s).
    #[arg(long, value_parser = vmm::config::parse_duration)]
    record_working_set: Option<std::time::Duration>,
    /// Read the whole memory file first and check its checksum.
    #[arg(long)]
    verify_memory: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_balloon(s: &str) -> Result<u64, String> {
    // A bare 0 is zero bytes, not 0 MiB: the same.
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_source(s: &str) -> Result<PathBuf, String> {
    parse_mem_source(s).map_err(|e| e.to_string())
}

/// Make sure fds 0..=2 are open, so that no file we open later lands on them
/// (serial input reads fd 0; a closed stdin must not become /dev/kvm).
fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a small integer has no side effects.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: opening /dev/null with a static NUL-terminated path.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

fn run(a: RunArgs) -> ExitCode {
    if let (Some(addr), Some(key_file)) = (&a.incoming, &a.migration_key) {
        let config = a.serve.apply(VmConfig::new(Kernel::Incoming(
            vmm::config::IncomingOptions {
                addr: addr.clone(),
                key_file: key_file.clone(),
            },
        )));
        return execute(config, &a.serve);
    }
    let kernel = match a.kernel {
        Some(path) => Kernel::File(path),
        None => Kernel::Embedded {
            name: "the embedded demo guest",
            image: vmm_guests::DEMO,
        },
    };
    let config = a.serve.apply(VmConfig {
        mem_size: a.mem,
        vcpus: a.vcpus,
        cmdline: a.cmdline,
        initrd: a.initrd,
        mem_source: a.mem_source,
        mem_hugepages: a.mem_hugepages,
        serial: SerialOut::Stdout,
        balloon: a.balloon.map(|target| BalloonOptions {
            target,
            free_page_reporting: a.balloon_free_page_reporting,
            stats_interval_s: a.balloon_stats_interval,
        }),
        hotplug: a.hotplug.map(|size| HotplugOptions {
            size,
            block_size: a.hotplug_block,
            requested: a.hotplug_requested,
        }),
        syscall_assist: a.syscall_assist,
        ..VmConfig::new(kernel)
    });
    execute(config, &a.serve)
}

fn restore(a: RestoreArgs) -> ExitCode {
    let mut config = a.serve.apply(VmConfig::new(Kernel::Snapshot(a.snapshot)));
    config.restore = RestoreOptions {
        mode: a.restore_mode,
        prefetch: a.prefetch,
        record_working_set: a.record_working_set,
        verify_memory: a.verify_memory,
    };
    execute(config, &a.serve)
}

/// Run a VM to its end and report.
fn execute(config: VmConfig, serve: &ServeArgs) -> ExitCode {
    let result = Vm::new(config).and_then(|vm| {
        // Raw keystrokes to the guest while it runs (a terminal only);
        // restored before anything below prints.
        let _raw = vmm::terminal::RawStdin::new_if_tty();
        vm.run()
    });
    match result {
        Ok(report) => {
            if !serve.quiet {
                eprint!("{}", vmm::summary::render(&report));
            }
            let status = report.reason.status();
            if status == 0 {
                log::info!("{}", report.reason);
            } else {
                eprintln!("vmm: {}", report.reason);
            }
            if !serve.metrics_linger.is_zero() {
                // The summary is out; the endpoint serves the same final
                // counters a little longer.
                std::thread::sleep(serve.metrics_linger);
            }
            ExitCode::from(status as u8)
        }
        Err(e) => {
            eprintln!("vmm: error: {e}");
            ExitCode::from(1)
        }
    }
}

fn ctl(a: CtlArgs) -> ExitCode {
    use hyper::Method;
    use serde_json::json;
    const MIB: u64 = 1 << 20;
    let (method, path, body) = match a.what {
        CtlCmd::Vm(VmCmd::Show) => (Method::GET, "/vm", None),
        CtlCmd::Vm(VmCmd::Stop) => (Method::PUT, "/vm/stop", None),
        CtlCmd::Vm(VmCmd::Pause) => (Method::PUT, "/vm/pause", None),
        CtlCmd::Vm(VmCmd::Resume) => (Method::PUT, "/vm/resume", None),
        CtlCmd::Snapshot(SnapshotCmd::Create { dir, paused, diff }) => {
            // The VMM resolves a relative path against its own directory:
            // make it this command's.
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            (
                Method::PUT,
                "/vm/snapshot",
                Some(json!({ "dir": dir, "resume": !paused, "diff": diff })),
            )
        }
        CtlCmd::SaveWorkingSet => (Method::PUT, "/vm/working-set", None),
        CtlCmd::Migrate(MigrateCmd::Start {
            to,
            key,
            max_downtime,
            max_rounds,
            mode,
            max_postcopy_bandwidth,
        }) => (
            Method::PUT,
            "/vm/migrate",
            Some(json!({
                "to": to,
                "key_file": std::path::absolute(&key).unwrap_or(key),
                "max_downtime_ms": max_downtime,
                "max_rounds": max_rounds,
                "mode": mode,
                "max_postcopy_bandwidth_mib": max_postcopy_bandwidth,
            })),
        ),
        CtlCmd::Migrate(MigrateCmd::Recover { to, key }) => (
            Method::PUT,
            "/vm/migrate/recover",
            Some(json!({
                "to": to,
                "key_file": std::path::absolute(&key).unwrap_or(key),
            })),
        ),
        CtlCmd::Migrate(MigrateCmd::Show) => (Method::GET, "/vm/migrate", None),
        CtlCmd::Balloon(BalloonCmd::Show) => (Method::GET, "/balloon", None),
        CtlCmd::Balloon(BalloonCmd::Set { size }) => {
            if size % MIB != 0 {
                eprintln!("vmm ctl: the balloon target is set in whole MiB");
                return ExitCode::from(2);
            }
            (
                Method::PUT,
                "/balloon",
                Some(json!({ "target_mib": size / MIB })),
            )
        }
        CtlCmd::Mem(MemCmd::Show) => (Method::GET, "/memory", None),
        CtlCmd::Mem(MemCmd::Resize { size }) => {
            if size % MIB != 0 {
                eprintln!("vmm ctl: the requested size is set in whole MiB");
                return ExitCode::from(2);
            }
            (
                Method::PUT,
                "/memory",
                Some(json!({ "requested_mib": size / MIB })),
            )
        }
        CtlCmd::Balloon(BalloonCmd::StatsInterval { seconds }) => (
            Method::PUT,
            "/balloon/statistics",
            Some(json!({ "interval_s": seconds })),
        ),
    };
    if path.starts_with("/vm/migrate") && method == Method::PUT {
        return follow_migration(&a.api_socket, path, body, a.json);
    }
    match vmm::api::client::request(&a.api_socket, method, path, body) {
        Ok((status, body)) => {
            let format = if a.json {
                vmm::api::client::Format::Json
            } else {
                vmm::api::client::Format::Human
            };
            let (text, ok) = vmm::api::client::render(status, &body, format);
            if ok {
                if text.is_empty() || print_out(&text) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            } else {
                eprintln!("vmm ctl: {status}: {text}");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// Prints `text` and a newline on stdout. A reader that went away before
/// reading (`vmm ctl vm show | head -0`) is no error: Rust ignores SIGPIPE, so the
/// write fails with EPIPE, and `println!` would panic on it. Any other
/// failure to write is said on stderr and returns false.
fn print_out(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) => {
            eprintln!("vmm ctl: cannot write the answer: {e}");
            false
        }
    }
}

/// `vmm ctl migrate start`: start it, then follow `GET /vm/migrate`
/// (a line per round) until it is done or failed.
fn follow_migration(
    socket: &std::path::Path,
    path: &str,
    body: Option<serde_json::Value>,
    json: bool,
) -> ExitCode {
    use hyper::{Method, StatusCode};
    use vmm::api::client::{render, request, Format};
    let format = if json { Format::Json } else { Format::Human };
    match request(socket, Method::PUT, path, body) {
        Ok((StatusCode::OK, _)) => {}
        Ok((status, body)) => {
            eprintln!("vmm ctl: {status}: {}", render(status, &body, format).0);
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("vmm ctl: {e}");
            return ExitCode::from(1);
        }
    }
    let mut shown = (String::new(), u64::MAX);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (status, body) = match request(socket, Method::GET, "/vm/migrate", None) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "vmm ctl: the source stopped answering ({e}); last seen: {}",
                    shown.0
                );
                return ExitCode::from(1);
            }
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let state = v["state"].as_str().unwrap_or("").to_string();
        let round = v["round"].as_u64().unwrap_or(0);
        let ended = ["done", "failed", "postcopy-paused"].contains(&state.as_str());
        // Post-copy progresses in pushed pages, not rounds: a line a second.
        let tick = if state == "postcopy" {
            v["pages_pushed"].as_u64().unwrap_or(0) >> 18
        } else {
            round
        };
        if !json && (state != shown.0 || tick != shown.1) && !ended {
            if state == "postcopy" {
                eprintln!(
                    "migration: postcopy, {} of {} pending pages pushed, {} asked for by the destination",
                    v["pages_pushed"], v["pages_pending"], v["pages_requested"]
                );
            } else {
                eprintln!(
                    "migration: {state}, round {round}, {} pages sent, {:.0} pages/s dirtied, expected downtime {:.1} ms",
                    v["pages_sent"], v["dirty_pages_per_s"].as_f64().unwrap_or(0.0),
                    v["expected_downtime_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
        shown = (state.clone(), tick);
        if state == "postcopy-paused" {
            let _ = print_out(&render(status, &body, format).0);
            eprintln!(
                "vmm ctl: post-copy paused ({}): the VM waits stopped here; 'vmm ctl migrate recover --to ADDR --key FILE' resumes it",
                v["error"].as_str().unwrap_or("?")
            );
            return ExitCode::from(1);
        }
        if state == "done" || state == "failed" {
            let written = print_out(&render(status, &body, format).0);
            if state == "failed" {
                eprintln!(
                    "vmm ctl: migration failed: {}",
                    v["error"].as_str().unwrap_or("?")
                );
                return ExitCode::from(1);
            }
            return if written {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
    }
}

fn bench_result(r: Result<(), String>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// A panic anywhere ends the whole VMM at once, after its message: a vCPU
/// or device thread that died alone would leave a guest half run. A hook
/// rather than `panic = "abort"` in the release profile, which cargo
/// ignores for test targets: with it every dependency was built twice, once
/// for this binary and once, unwinding, for the tests.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    abort_on_panic();
    ensure_std_fds();
    vmm::logger::init(log::LevelFilter::Warn);
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::Bench(BenchCmd::Faults(a)) => match bench::faults(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm: bench: {e}");
                ExitCode::from(1)
            }
        },
        Command::Bench(BenchCmd::Balloon(a)) => bench_result(vmm_bench::balloon::run(&a)),
        Command::Bench(BenchCmd::Hotplug(a)) => bench_result(vmm_bench::hotplug::run(&a)),
        Command::Bench(BenchCmd::Restore(a)) => bench_result(vmm_bench::restore::run(&a)),
        Command::Ctl(a) => ctl(a),
        Command::Stress(a) => match vmm_stress::run(&a) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("vmm: stress: {e}");
                ExitCode::from(2)
            }
        },
        Command::Top(a) => match vmm_top::run(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vmm: top: {e}");
                ExitCode::from(1)
            }
        },
    }
}
