//! Benchmarks, each printing its numbers side by side from one run (times
//! are ratios' raw material, not absolutes: the machines are shared).
//!
//! `vmm bench faults`: the same guest under each fault mode.
//!
//! The guest is `memstress` (mode 0, one round): every vCPU writes one word
//! per page over its share of `pages` pages, then writes the marker port.
//! The time from vCPU start to that marker is the fault phase.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod balloon;
mod churn;

use churn::us;
pub mod hotplug;
pub mod restore;

use clap::Parser;

use vmm::config::{FaultMode, SerialOut, VmConfig};
use vmm::exit::ExitReason;
use vmm::fault::stats::{bucket_bound_ns, ThreadStat, LATENCY_BUCKETS};
use vmm::memory::MemStat;
use vmm::memory::{NewSlot, PageSource};
use vmm::vm::{RunReport, Vm};

#[derive(Parser, Debug, Clone)]
pub struct BenchArgs {
    /// vCPU counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<usize>,
    /// Pages the guest touches (one word per 4 KiB page).
    #[arg(long, default_value_t = 20000)]
    pub pages: u64,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Largest fault-around window of the default rows (pages); the
    /// `vcpu-nofa` row always runs without fault-around.
    #[arg(long, default_value_t = vmm::config::DEFAULT_FAULT_AROUND)]
    pub fault_around: u64,
    /// Memslot changes per second for the churn row.
    #[arg(long, default_value_t = 100)]
    pub churn_hz: u64,
    /// First-touch content: `zero` (anonymous memory), or `file` (a memory
    /// image on disk: `vcpu` and `handler` read it into each fault, `kernel`
    /// maps it MAP_PRIVATE from the page cache, as Firecracker restores a
    /// snapshot by default; rows with a warm and a cold page cache).
    #[arg(long, value_enum, default_value = "zero")]
    pub source: BenchSource,
    /// Add rows with guest RAM on 2 MiB hugetlb pages (`--mem-hugepages`),
    /// beside the same modes on 4 KiB pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Keep this many host threads spinning for the whole run (a busy
    /// machine: on 2 cores, `--busy 1` leaves one core to the VM's threads).
    #[arg(long, default_value_t = 0)]
    pub busy: usize,
    /// Also write the table and each row's fault-latency histogram as
    /// tab-separated files into DIR (`faults.tsv`, `latency.tsv`), for
    /// `scripts/plot-faults.sh`.
    #[arg(long)]
    pub plot_data: Option<std::path::PathBuf>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchSource {
    Zero,
    File,
}

/// The image's page cache before a file-backed run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cache {
    /// Read whole just before the run.
    Warm,
    /// Dropped (`POSIX_FADV_DONTNEED`) just before the run.
    Cold,
}

const BASE: u64 = 16 << 20;

struct Sample {
    secs: f64,
    report: RunReport,
}

/// One benchmark configuration.
#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    mode: FaultMode,
    fault_around: u64,
    churn_hz: u64,
    /// Serve metrics and scrape them every 100 ms.
    scrape: bool,
    /// First touches in a seeded random order (memstress `random=1`).
    random: bool,
    /// RAM backed by the bench's image file (`--source file`).
    file: Option<Cache>,
    /// RAM on 2 MiB hugetlb pages.
    huge: bool,
}

fn mem_size(pages: u64) -> u64 {
    (BASE + pages * 4096 + (16 << 20)).next_multiple_of(2 << 20)
}

fn one_run(
    guest: &Path,
    image: Option<&Path>,
    row: Row,
    vcpus: usize,
    pages: u64,
) -> Result<Sample, String> {
    let Row {
        mode,
        fault_around,
        churn_hz,
        scrape,
        random,
        file,
        huge,
        ..
    } = row;
    let bytes = pages * 4096;
    let mut config = VmConfig::new(guest.to_path_buf());
    config.mem_size = mem_size(pages);
    config.mem_hugepages = huge;
    if let (Some(cache), Some(image)) = (file, image) {
        set_cache(image, cache)?;
        config.mem_source = Some(image.to_path_buf());
    }
    config.vcpus = vcpus;
    config.cmdline = format!(
        "mode=0 rounds=1 base={BASE} bytes={bytes} stride=4096 random={}",
        u8::from(random)
    );
    config.fault_mode = Some(mode);
    config.fault_around = fault_around;
    config.serial = SerialOut::Capture(Default::default());
    if scrape {
        config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let SerialOut::Capture(out) = config.serial.clone() else {
        unreachable!()
    };
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let churn = (churn_hz > 0).then(|| spawn_churn(&vm, churn_hz));
    let scraper = vm
        .metrics_addr()
        .map(|a| spawn_scraper(a, vm.exit_handle()));
    let report = vm.run().map_err(|e| e.to_string())?;
    if let Some((stop, t, _)) = churn {
        stop.store(true, Ordering::Relaxed);
        let _ = t.join();
    }
    if let Some(t) = scraper {
        let _ = t.join();
    }
    let text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    if report.reason != ExitReason::GuestStatus(0) || !text.contains("bad=0") {
        return Err(format!(
            "guest failed under {} ({}): {text}",
            mode.name(),
            report.reason
        ));
    }
    let t = report
        .markers
        .iter()
        .find(|(_, v)| *v == 1)
        .map(|(t, _)| *t)
        .ok_or("guest wrote no marker")?;
    Ok(Sample {
        secs: t.as_secs_f64(),
        report,
    })
}

/// The bench's memory image: `size` bytes, no page of them zero, on disk
/// (not tmpfs, so that its page cache can be dropped).
fn make_image(size: u64) -> Result<std::path::PathBuf, String> {
    use std::io::Write;
    let dir = Path::new("/var/tmp");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("vmm-bench-image-{}", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| e.to_string())?);
    let mut page = [0u8; 4096];
    for p in 0..size / 4096 {
        for (i, w) in page.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(p << 12 | i as u64 | 1 << 63).to_le_bytes());
        }
        f.write_all(&page).map_err(|e| e.to_string())?;
    }
    f.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(|e| e.to_string())?;
    Ok(path)
}

/// Warm: read the image whole (into the page cache). Cold: drop its clean
/// pages from the page cache.
pub(crate) fn set_cache(image: &Path, cache: Cache) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).map_err(|e| e.to_string())?;
    match cache {
        Cache::Warm => {
            std::io::copy(&mut &f, &mut std::io::sink()).map_err(|e| e.to_string())?;
        }
        Cache::Cold => {
            // SAFETY: an advisory call on a file descriptor we own.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if r != 0 {
                return Err(format!(
                    "posix_fadvise: {}",
                    std::io::Error::from_raw_os_error(r)
                ));
            }
        }
    }
    Ok(())
}

/// A thread that adds and removes a 2 MiB memslot above guest RAM at `hz`
/// changes per second (each add and each remove is one change).
fn spawn_churn(vm: &Vm, hz: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mem = vm.memory().clone();
    let exit = vm.exit_handle();
    let gpa = 0x1_0000_0000 + (64 << 30);
    let (s, c) = (stop.clone(), count.clone());
    let t = std::thread::spawn(move || {
        let period = Duration::from_nanos(1_000_000_000 / hz.max(1));
        let mut next = Instant::now();
        let mut present = false;
        while !s.load(Ordering::Relaxed) && !exit.is_stopping() {
            let r = if present {
                mem.remove_slot(gpa)
            } else {
                mem.add_slot(NewSlot {
                    gpa,
                    size: 2 << 20,
                    source: PageSource::Zero,
                    source_offset: 0,
                    block_size: None,
                })
                .map(|_| ())
            };
            if r.is_ok() {
                present = !present;
                c.fetch_add(1, Ordering::Relaxed);
            }
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    (stop, t, count)
}

/// Scrape `/metrics` every 100 ms until the VM stops (a Prometheus server's
/// behaviour, ten times more often than usual).
fn spawn_scraper(
    addr: std::net::SocketAddr,
    exit: Arc<vmm::exit::VmExit>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        while !exit.is_stopping() {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let _ = s.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

/// Host threads that burn CPU until dropped (`--busy`).
struct Spinners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Spinners {
    fn start(n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if n > 0 {
            println!("busy: {n} host thread(s) spinning throughout");
        }
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..1000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005) + 1);
                        }
                    }
                    x
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = v.len() / 2;
    v.swap_remove(mid)
}

/// Run the fault benchmark and print its table.
///
/// Rows: the fault modes with default flags (adaptive fault-around on),
/// `vcpu-nofa` (one page per fault), `vcpu+churn` and `vcpu+scrape`, then
/// the same modes with first touches in random order (`/r`). `us/page` is
/// the headline: the cost per faulted page over the guest's own loop, `1 /
/// rate - 1 / prefault rate` (same pattern, same run).
pub fn faults(a: &BenchArgs) -> Result<(), String> {
    let guest =
        std::env::temp_dir().join(format!("vmm-bench-memstress-{}.elf", std::process::id()));
    std::fs::write(&guest, vmm_guests::MEMSTRESS).map_err(|e| e.to_string())?;
    println!(
        "fault benchmark: {} pages (one store per 4 KiB page), median of {} runs, fault-around up to {} pages",
        a.pages, a.repeat, a.fault_around
    );
    let spinners = Spinners::start(a.busy);
    println!(
        "{:<13} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "mode",
        "vcpus",
        "pages/s",
        "us/page",
        "p50_us",
        "p99_us",
        "faults",
        "installed",
        "resident",
        "retries"
    );
    let image = match a.source {
        BenchSource::File => Some(make_image(mem_size(a.pages))?),
        BenchSource::Zero => None,
    };
    let mut plot = match &a.plot_data {
        Some(dir) => Some(PlotData::create(dir)?),
        None => None,
    };
    let r = run_rows(a, &guest, image.as_deref(), plot.as_mut());
    drop(spinners);
    if let Some(image) = image {
        let _ = std::fs::remove_file(image);
    }
    let _ = std::fs::remove_file(&guest);
    r
}

/// The table and the latency histograms as tab-separated files for plots.
struct PlotData {
    table: std::fs::File,
    latency: std::fs::File,
}

impl PlotData {
    fn create(dir: &Path) -> Result<Self, String> {
        use std::io::Write;
        let err = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut table = std::fs::File::create(dir.join("faults.tsv")).map_err(err)?;
        let mut latency = std::fs::File::create(dir.join("latency.tsv")).map_err(err)?;
        writeln!(table, "# row\tvcpus\tpages_per_s\tus_per_page").map_err(err)?;
        writeln!(
            latency,
            "# row\tvcpus\tbucket_upper_us (0: +Inf)\tshare_of_faults"
        )
        .map_err(err)?;
        Ok(Self { table, latency })
    }

    /// One row of the table and, if it faulted, its latency distribution
    /// (each bucket's share of the row's faults).
    fn row(
        &mut self,
        r: &Row,
        s: &Sample,
        vcpus: usize,
        pps: f64,
        overhead: f64,
    ) -> Result<(), String> {
        use std::io::Write;
        let err = |e: std::io::Error| e.to_string();
        writeln!(self.table, "{}\t{vcpus}\t{pps:.0}\t{overhead:.3}", r.name).map_err(err)?;
        let total = s.report.total();
        let n: u64 = total.latency.buckets.iter().sum();
        if n == 0 {
            return Ok(());
        }
        for i in 0..LATENCY_BUCKETS {
            let upper = bucket_bound_ns(i).map_or(0.0, |b| b as f64 / 1e3);
            let share = total.latency.buckets[i] as f64 / n as f64;
            writeln!(self.latency, "{}\t{vcpus}\t{upper}\t{share:.5}", r.name).map_err(err)?;
        }
        // Two blank lines: the next row is a new gnuplot data block.
        writeln!(self.latency, "\n").map_err(err)
    }
}

fn run_rows(
    a: &BenchArgs,
    guest: &Path,
    image: Option<&Path>,
    mut plot: Option<&mut PlotData>,
) -> Result<(), String> {
    for &vcpus in &a.vcpus {
        let rows = rows(a, image.is_some());
        // Repetitions interleave the rows (all rows once, then again), so
        // drift in the shared machine's load hits every row alike.
        let mut samples: Vec<Vec<Sample>> = rows.iter().map(|_| Vec::new()).collect();
        for _ in 0..a.repeat.max(1) {
            for (i, r) in rows.iter().enumerate() {
                samples[i].push(one_run(guest, image, *r, vcpus, a.pages)?);
            }
        }
        let medians: Vec<Sample> = samples.into_iter().map(median).collect();
        let rate: HashMap<&str, f64> = rows
            .iter()
            .zip(&medians)
            .map(|(r, s)| (r.name, a.pages as f64 / s.secs))
            .collect();
        for (r, s) in rows.iter().zip(&medians) {
            let (pps, overhead) = print_row(r, s, vcpus, &rate);
            if let Some(p) = plot.as_deref_mut() {
                p.row(r, s, vcpus, pps, overhead)?;
            }
        }
        print_ratios(a, image.is_some(), vcpus, &rate);
    }
    Ok(())
}

/// The rows of one table: the fault modes on zero-filled RAM, on an image
/// file (`--source file`), or on huge pages (`--hugepages`).
fn rows(a: &BenchArgs, file_backed: bool) -> Vec<Row> {
    let fa = a.fault_around;
    let row = |name, mode, fault_around, churn_hz, scrape, random| Row {
        name,
        mode,
        fault_around,
        churn_hz,
        scrape,
        random,
        file: None,
        huge: false,
    };
    let huge = |name, mode, random| Row {
        huge: true,
        ..row(name, mode, fa, 0, false, random)
    };
    let file = |name, mode, random, cache| Row {
        file: Some(cache),
        ..row(name, mode, fa, 0, false, random)
    };
    if file_backed {
        // Prefault stays anonymous: the no-fault baseline.
        return vec![
            row("prefault", FaultMode::Prefault, fa, 0, false, false),
            file("kernel", FaultMode::Kernel, false, Cache::Warm),
            file("vcpu", FaultMode::Vcpu, false, Cache::Warm),
            file("handler", FaultMode::Handler, false, Cache::Warm),
            file("kernel-cold", FaultMode::Kernel, false, Cache::Cold),
            file("vcpu-cold", FaultMode::Vcpu, false, Cache::Cold),
            row("prefault/r", FaultMode::Prefault, fa, 0, false, true),
            file("kernel/r", FaultMode::Kernel, true, Cache::Warm),
            file("vcpu/r", FaultMode::Vcpu, true, Cache::Warm),
            file("handler/r", FaultMode::Handler, true, Cache::Warm),
        ];
    }
    if a.hugepages {
        return vec![
            row("prefault", FaultMode::Prefault, fa, 0, false, false),
            row("kernel", FaultMode::Kernel, fa, 0, false, false),
            row("vcpu", FaultMode::Vcpu, fa, 0, false, false),
            huge("prefault-2m", FaultMode::Prefault, false),
            huge("kernel-2m", FaultMode::Kernel, false),
            huge("vcpu-2m", FaultMode::Vcpu, false),
            huge("handler-2m", FaultMode::Handler, false),
            row("prefault/r", FaultMode::Prefault, fa, 0, false, true),
            row("vcpu/r", FaultMode::Vcpu, fa, 0, false, true),
            huge("prefault-2m/r", FaultMode::Prefault, true),
            huge("kernel-2m/r", FaultMode::Kernel, true),
            huge("vcpu-2m/r", FaultMode::Vcpu, true),
            huge("handler-2m/r", FaultMode::Handler, true),
        ];
    }
    vec![
        row("prefault", FaultMode::Prefault, fa, 0, false, false),
        row("kernel", FaultMode::Kernel, fa, 0, false, false),
        row("vcpu", FaultMode::Vcpu, fa, 0, false, false),
        row("vcpu-nofa", FaultMode::Vcpu, 1, 0, false, false),
        row("handler", FaultMode::Handler, fa, 0, false, false),
        row("vcpu+churn", FaultMode::Vcpu, fa, a.churn_hz, false, false),
        row("vcpu+scrape", FaultMode::Vcpu, fa, 0, true, false),
        row("prefault/r", FaultMode::Prefault, fa, 0, false, true),
        row("kernel/r", FaultMode::Kernel, fa, 0, false, true),
        row("vcpu/r", FaultMode::Vcpu, fa, 0, false, true),
        row("handler/r", FaultMode::Handler, fa, 0, false, true),
    ]
}

/// One row of the table: rate, cost per page over the no-fault baseline of
/// the same pattern, latency, counters. Gives the rate and the cost.
fn print_row(r: &Row, s: &Sample, vcpus: usize, rate: &HashMap<&str, f64>) -> (f64, f64) {
    let total = s.report.total();
    let pps = rate[r.name];
    let base = rate[if r.random { "prefault/r" } else { "prefault" }];
    let overhead = (1.0 / pps - 1.0 / base) * 1e6;
    let uffd = |v: u64| {
        if r.mode.uses_uffd() {
            v.to_string()
        } else {
            "-".into()
        }
    };
    println!(
        "{:<13} {:>5} {:>10.0} {:>8.2} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        r.name,
        vcpus,
        pps,
        overhead,
        us(total.latency_quantile_ns(0.5)),
        us(total.latency_quantile_ns(0.99)),
        uffd(total.faults()),
        uffd(total[ThreadStat::PagesInstalled]),
        s.report.memory[MemStat::ResidentPages],
        total[ThreadStat::Retries],
    );
    (pps, overhead)
}

/// The ratios of one table, the headline line last.
fn print_ratios(a: &BenchArgs, file_backed: bool, vcpus: usize, rate: &HashMap<&str, f64>) {
    let per = |n: &str, base: &str| (1.0 / rate[n] - 1.0 / rate[base]) * 1e6;
    if file_backed {
        println!(
            "ratios (image file): vcpu/kernel={:.2} vcpu/r/kernel/r={:.2} vcpu/handler={:.2} vcpu-cold/kernel-cold={:.2} (vcpus={vcpus})",
            rate["vcpu"] / rate["kernel"],
            rate["vcpu/r"] / rate["kernel/r"],
            rate["vcpu"] / rate["handler"],
            rate["vcpu-cold"] / rate["kernel-cold"],
        );
        return;
    }
    if a.hugepages {
        println!(
            "ratios (2 MiB pages): vcpu-2m/prefault={:.2} vcpu-2m/r/prefault/r={:.2} vcpu-2m/prefault-2m={:.2} vcpu-2m/kernel-2m={:.2} vcpu-2m/handler-2m={:.2} (vcpus={vcpus})",
            rate["vcpu-2m"] / rate["prefault"],
            rate["vcpu-2m/r"] / rate["prefault/r"],
            rate["vcpu-2m"] / rate["prefault-2m"],
            rate["vcpu-2m"] / rate["kernel-2m"],
            rate["vcpu-2m"] / rate["handler-2m"],
        );
        return;
    }
    println!(
        "more ratios: vcpu-nofa/prefault={:.2} vcpu+scrape/vcpu={:.3} vcpu/r overhead/kernel/r overhead={:.2} (vcpus={vcpus})",
        rate["vcpu-nofa"] / rate["prefault"],
        rate["vcpu+scrape"] / rate["vcpu"],
        per("vcpu/r", "prefault/r") / per("kernel/r", "prefault/r"),
    );
    // The headline line, last for the last vCPU count.
    println!(
        "ratios: vcpu/prefault={:.2} vcpu/handler={:.2} vcpu/kernel={:.2} vcpu/r/handler/r={:.2} (vcpus={vcpus})",
        rate["vcpu"] / rate["prefault"],
        rate["vcpu"] / rate["handler"],
        rate["vcpu"] / rate["kernel"],
        rate["vcpu/r"] / rate["handler/r"],
    );
}
