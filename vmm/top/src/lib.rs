//! `vmm top`: a live view of a running VMM, one row per vCPU and serving
//! thread (faults/s by kind, installs/s, pages per install, retries,
//! fault latency p50/p99 over the interval, blocktime) under a header of
//! the VM's memory (resident, memslots and their changes, balloon,
//! virtio-mem). It reads the metrics JSON from the API socket or a metrics
//! endpoint; `--once` prints one plain frame for scripts, and when stdout is
//! not a terminal it prints plain frames every interval.

pub mod frame;
pub mod source;
pub mod text;
mod tui;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use frame::SortBy;
use source::Source;

#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false, id = "source")]
pub struct TopSource {
    /// The API socket of the running VMM (`vmm run --api-socket PATH`).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A metrics endpoint (`vmm run --metrics-addr`), e.g.
    /// http://127.0.0.1:9464 (its /metrics.json is read).
    #[arg(long)]
    pub metrics_url: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    #[command(flatten)]
    pub source: TopSource,
    /// Seconds between frames (rates are over this interval).
    #[arg(long, default_value_t = 1.0, value_parser = interval)]
    pub interval: f64,
    /// Print one plain-text frame (one interval) and exit.
    #[arg(long)]
    pub once: bool,
    /// The first sort order (`s` changes it in the live view).
    #[arg(long, value_enum, default_value_t = SortBy::Thread)]
    pub sort: SortBy,
}

fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s} is not a number of seconds"))?;
    if (0.05..=3600.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{s}: the interval must be from 0.05 to 3600 seconds"
        ))
    }
}

/// Two scrapes `interval` apart and the frame between them.
fn one_frame(source: &Source, interval: Duration, sort: SortBy) -> Result<frame::Frame, String> {
    let then = source.fetch()?;
    let t0 = Instant::now();
    std::thread::sleep(interval);
    let now = source.fetch()?;
    let mut f = frame::frame(&then, &now, t0.elapsed().as_secs_f64());
    f.sort(sort);
    Ok(f)
}

/// `vmm top`.
pub fn run(a: &TopArgs) -> Result<(), String> {
    let source = match (&a.source.api_socket, &a.source.metrics_url) {
        (Some(p), _) => Source::Socket(p.clone()),
        (None, Some(u)) => Source::url(u),
        (None, None) => return Err("give --api-socket PATH or --metrics-url URL".into()),
    };
    let interval = Duration::from_secs_f64(a.interval);
    let sort = a.sort;
    if a.once {
        print!(
            "{}",
            text::render(&one_frame(&source, interval, sort)?, sort)
        );
        return Ok(());
    }
    if std::io::stdout().is_terminal() {
        return tui::run(&source, interval, sort);
    }
    // Plain frames, one per interval, until the VM goes away.
    let mut then = source.fetch()?;
    let mut t0 = Instant::now();
    loop {
        std::thread::sleep(interval);
        // The VM ending is the normal end of a stream (it was there).
        let now = match source.fetch() {
            Ok(v) => v,
            Err(e) => {
                eprintln!("vmm top: {source} went away: {e}");
                return Ok(());
            }
        };
        let mut f = frame::frame(&then, &now, t0.elapsed().as_secs_f64());
        f.sort(sort);
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{}", text::render(&f, sort)).is_err() {
            return Ok(()); // the reader went away (`| head`)
        }
        let _ = out.flush();
        then = now;
        t0 = Instant::now();
    }
}
