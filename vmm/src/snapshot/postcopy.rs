//! Post-copy, the destination's side: the VM runs before all its pages are
//! here. The pages still at the source are *pending*; the memory image the
//! fault engine reads them from is opened with [`Arrivals`] as its
//! [`Arrival`], so a first touch of a pending page (on the faulting vCPU's
//! thread, in `prepare`, no lock held) sends a request on the urgent
//! connection and waits for the answer; the install that follows goes
//! through the generation protocol like any other. The source pushes the
//! rest on the main connection meanwhile. Either way a page only ever lands
//! in the image file, never in guest RAM: an install never overwrites a
//! present page (`UFFDIO_COPY` says EEXIST), and a page the balloon or
//! virtio-mem took since is installed as zeros whatever the file holds, so a
//! late page can neither undo a guest write nor refill a hole.
//!
//! If the connection breaks, vCPUs that need a pending page wait (nothing
//! is lost: the source keeps its stopped VM), and the destination listens
//! again where it was told for `vmm ctl migrate recover` on the source.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::stream::{Msg, Receiver, Sender};
use crate::devices::lock;
use crate::memory::{Arrival, PAGE_SIZE};

/// Most pages one request asks for (the fault engine's window is 16).
pub const MAX_REQUEST: u64 = 512;
/// Latency samples kept for the quantiles (the histogram counts all).
const SAMPLES: usize = 1 << 20;

/// What the source still owes, page by page (indexed by GPA).
pub struct Arrivals {
    file: File,
    gate: Mutex<Gate>,
    cond: Condvar,
    /// Pages still missing (0: every read goes straight to the file).
    left: AtomicU64,
    /// Pending at the switch.
    total: u64,
    urgent: Mutex<Option<Sender>>,
    stats: Mutex<Stats>,
    started: Instant,
}

struct Gate {
    /// One bit per page from GPA 0: still at the source.
    missing: Vec<u64>,
    /// Pending at the switch (what may arrive at all).
    expected: Vec<u64>,
    /// Pages asked for and not arrived, since when.
    requested: HashMap<u64, Instant>,
    link: Link,
    /// Which connection is current (a stale one's end is not a loss).
    epoch: u64,
}

#[derive(Clone, PartialEq)]
enum Link {
    Up,
    /// The connection broke: readers wait for a recovery.
    Lost(String),
    /// The VM ends (or the source gave up for good): readers fail.
    Ended(String),
}

#[derive(Default)]
struct Stats {
    requests: u64,
    pages_requested: u64,
    pages_pushed: u64,
    /// Request → answer, ns.
    latency: Vec<u64>,
    histogram: crate::fault::stats::Latency,
}

/// The destination's post-copy progress (`GET /vm/migrate`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PostcopyStatus {
    /// running, paused (the connection broke), complete, failed.
    pub state: String,
    pub pages_pending_at_start: u64,
    pub pages_left: u64,
    /// Requests sent on the urgent connection and the pages they asked.
    pub requests: u64,
    pub pages_requested: u64,
    /// Pages that came by the source's push before anyone asked.
    pub pages_pushed: u64,
    pub request_latency_p50_us: Option<f64>,
    pub request_latency_p99_us: Option<f64>,
    pub request_latency_max_us: Option<f64>,
    /// Seconds since the VM started here.
    pub elapsed_s: f64,
    pub error: Option<String>,
}

fn bit(words: &[u64], p: u64) -> bool {
    words
        .get((p / 64) as usize)
        .is_some_and(|w| w & (1 << (p % 64)) != 0)
}

fn clear(words: &mut [u64], p: u64) {
    if let Some(w) = words.get_mut((p / 64) as usize) {
        *w &= !(1 << (p % 64));
    }
}

impl Arrivals {
    /// `pending` runs `(gpa, pages)` of the file (indexed by GPA, `end`
    /// bytes) are still at the source; `file` is written as they come.
    pub fn new(file: File, end: u64, pending: &[(u64, u64)]) -> Result<Arrivals, String> {
        let pages = end.div_ceil(PAGE_SIZE);
        let mut missing = vec![0u64; pages.div_ceil(64) as usize];
        let mut total = 0;
        for &(gpa, n) in pending {
            let first = gpa / PAGE_SIZE;
            if gpa % PAGE_SIZE != 0 || n == 0 || first.saturating_add(n) > pages {
                return Err(format!(
                    "a pending run of {n} pages at {gpa:#x} is outside guest RAM"
                ));
            }
            for p in first..first + n {
                if !bit(&missing, p) {
                    missing[(p / 64) as usize] |= 1 << (p % 64);
                    total += 1;
                }
            }
        }
        Ok(Arrivals {
            file,
            gate: Mutex::new(Gate {
                expected: missing.clone(),
                missing,
                requested: HashMap::new(),
                link: Link::Up,
                epoch: 0,
            }),
            cond: Condvar::new(),
            left: AtomicU64::new(total),
            total,
            urgent: Mutex::new(None),
            stats: Mutex::new(Stats::default()),
            started: Instant::now(),
        })
    }

    /// Requests go on `tx` from now on; the pages asked before (and not
    /// arrived) are asked again (a recovery). Returns the connection's
    /// epoch.
    pub fn connect(&self, tx: Sender) -> u64 {
        *lock(&self.urgent) = Some(tx);
        let (again, epoch): (Vec<u64>, u64) = {
            let mut g = lock(&self.gate);
            g.link = Link::Up;
            g.epoch += 1;
            let now = Instant::now();
            g.requested.values_mut().for_each(|t| *t = now);
            let mut v: Vec<u64> = g.requested.keys().copied().collect();
            v.sort_unstable();
            (v, g.epoch)
        };
        for (gpa, n) in runs(again.into_iter().map(|p| p * PAGE_SIZE)) {
            self.request(gpa, n);
        }
        epoch
    }

    /// The connection of `epoch` broke (ignored if a newer one is up).
    pub fn lost_at(&self, epoch: u64, why: &str) {
        if lock(&self.gate).epoch == epoch {
            self.lost(why);
        }
    }

    pub fn is_ended(&self) -> bool {
        matches!(lock(&self.gate).link, Link::Ended(_))
    }

    /// Pages still missing, as runs `(gpa, pages)`.
    pub fn missing_runs(&self) -> Vec<(u64, u64)> {
        let g = lock(&self.gate);
        let pages = (0..g.missing.len() as u64 * 64).filter(|&p| bit(&g.missing, p));
        runs(pages.map(|p| p * PAGE_SIZE))
    }

    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    fn request(&self, gpa: u64, pages: u64) {
        let r = match lock(&self.urgent).as_mut() {
            Some(tx) => tx
                .send(&Msg::Request { gpa, pages })
                .map_err(|e| e.to_string()),
            None => Err("no connection".into()),
        };
        let mut s = lock(&self.stats);
        s.requests += 1;
        s.pages_requested += pages;
        drop(s);
        if let Err(e) = r {
            self.lost(&format!("sending a page request: {e}"));
        }
    }

    /// Pages came (`urgent`: an answer to a request): into the file, then
    /// no longer missing. A page not pending at the switch is refused.
    pub fn arrived(&self, gpas: &[(u64, bool)], data: &[u8], urgent: bool) -> Result<(), String> {
        let mut fresh = Vec::with_capacity(gpas.len());
        {
            let g = lock(&self.gate);
            let mut at = 0;
            for &(gpa, has) in gpas {
                let p = gpa / PAGE_SIZE;
                if !has || !bit(&g.expected, p) {
                    return Err(format!(
                        "the source sent page {gpa:#x}, which was not pending{}",
                        if has { "" } else { " (as a hole)" }
                    ));
                }
                if bit(&g.missing, p) {
                    fresh.push((gpa, at));
                }
                at += PAGE_SIZE as usize;
            }
        }
        // Outside the lock: a page both pushed and answered is written
        // twice with the same content (the source's VM is stopped).
        for &(gpa, at) in &fresh {
            self.file
                .write_all_at(&data[at..at + PAGE_SIZE as usize], gpa)
                .map_err(|e| format!("writing page {gpa:#x} into the incoming file: {e}"))?;
        }
        let now = Instant::now();
        let mut g = lock(&self.gate);
        let mut asked = None;
        let mut pushed = 0;
        for &(gpa, _) in &fresh {
            let p = gpa / PAGE_SIZE;
            if bit(&g.missing, p) {
                clear(&mut g.missing, p);
                self.left.fetch_sub(1, Ordering::AcqRel);
                match g.requested.remove(&p) {
                    Some(t) => asked = asked.or(Some(t)),
                    None => pushed += 1,
                }
            }
        }
        drop(g);
        self.cond.notify_all();
        let mut s = lock(&self.stats);
        s.pages_pushed += pushed;
        if let (true, Some(t)) = (urgent, asked) {
            let ns = now.duration_since(t).as_nanos() as u64;
            s.histogram.record(ns);
            if s.latency.len() < SAMPLES {
                s.latency.push(ns);
            }
        }
        Ok(())
    }

    /// The connection broke: readers wait for a recovery.
    pub fn lost(&self, why: &str) {
        let mut g = lock(&self.gate);
        if g.link == Link::Up {
            eprintln!(
                "vmm: post-copy paused: {why}; {} pages are still at the source, vCPUs that need one wait (recover with 'vmm ctl migrate recover' on the source)",
                self.left()
            );
            g.link = Link::Lost(why.to_string());
        }
        lock(&self.urgent).take();
    }

    /// Readers give up (the VM ends, or the migration failed for good);
    /// the source is told, if pages were still coming (it ends too).
    pub fn end(&self, why: &str) {
        let mut g = lock(&self.gate);
        if !matches!(g.link, Link::Ended(_)) {
            g.link = Link::Ended(why.to_string());
        }
        drop(g);
        self.cond.notify_all();
        if self.left() > 0 {
            if let Some(tx) = lock(&self.urgent).as_mut() {
                let _ = tx.send(&Msg::Failed(why.to_string()));
            }
        }
    }

    /// Wait (at most `limit`) until nothing is missing.
    pub fn wait_all(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = lock(&self.gate);
        while self.left() > 0 {
            let now = Instant::now();
            if now >= deadline || matches!(g.link, Link::Ended(_)) {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    pub fn status(&self) -> PostcopyStatus {
        let link = lock(&self.gate).link.clone();
        let s = lock(&self.stats);
        let mut lat = s.latency.clone();
        lat.sort_unstable();
        let q = |q: f64| {
            (!lat.is_empty()).then(|| {
                let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
                lat[i] as f64 / 1e3
            })
        };
        let left = self.left();
        let (state, error) = match link {
            _ if left == 0 => ("complete", None),
            Link::Up => ("running", None),
            Link::Lost(e) => ("paused", Some(e)),
            Link::Ended(e) => ("failed", Some(e)),
        };
        PostcopyStatus {
            state: state.into(),
            pages_pending_at_start: self.total,
            pages_left: left,
            requests: s.requests,
            pages_requested: s.pages_requested,
            pages_pushed: s.pages_pushed,
            request_latency_p50_us: q(0.5),
            request_latency_p99_us: q(0.99),
            request_latency_max_us: lat.last().map(|n| *n as f64 / 1e3),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            error,
        }
    }

    /// The request-latency histogram.
    pub fn histogram(&self) -> crate::fault::stats::LatencySnapshot {
        lock(&self.stats).histogram.snapshot()
    }

    /// Serve the urgent connection's answers (of `epoch`) until it breaks.
    pub fn receive_answers(&self, mut rx: Receiver, epoch: u64) {
        rx.set_timeout(None);
        urgent_priority();
        loop {
            match rx.recv() {
                Ok(Msg::Pages { gpas, data }) => {
                    if let Err(e) = self.arrived(&gpas, &data, true) {
                        self.fail(epoch, &e);
                        return;
                    }
                }
                Ok(Msg::Failed(why)) => {
                    self.fail(epoch, &format!("the source gave up: {why}"));
                    return;
                }
                Ok(m) => {
                    self.fail(
                        epoch,
                        &format!("the source sent {} on the urgent connection", m.name()),
                    );
                    return;
                }
                Err(e) => {
                    if self.left() > 0 {
                        self.lost_at(epoch, &format!("the urgent connection: {e}"));
                    }
                    return;
                }
            }
        }
    }

    /// A broken stream (not a broken connection): nothing more can be
    /// trusted from it; readers still wait for a recovery.
    fn fail(&self, epoch: u64, why: &str) {
        eprintln!("vmm: post-copy: {why}");
        self.lost_at(epoch, why);
    }
}

impl Arrivals {
    /// Wait until the pages `[first, until)` are here, asking for the
    /// missing ones of `[first, ask_end)` not asked yet.
    fn wait_pages(&self, first: u64, until: u64, ask_end: u64) -> Result<(), String> {
        let mut g = lock(&self.gate);
        loop {
            if (first..until).all(|p| !bit(&g.missing, p)) {
                return Ok(());
            }
            let mut ask = Vec::new();
            for p in first..ask_end.max(until) {
                if bit(&g.missing, p) && p < ask_end {
                    if let std::collections::hash_map::Entry::Vacant(e) = g.requested.entry(p) {
                        e.insert(Instant::now());
                        ask.push(p * PAGE_SIZE);
                    }
                }
            }
            if let Link::Ended(why) = &g.link {
                return Err(format!(
                    "page {:#x} never came from the source: {why}",
                    first * PAGE_SIZE
                ));
            }
            if !ask.is_empty() && g.link == Link::Up {
                drop(g);
                for (gpa, n) in runs(ask.into_iter()) {
                    self.request(gpa, n);
                }
                g = lock(&self.gate);
                continue;
            }
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Pages from `first` (at most `pages`) here now.
    fn run_here(&self, first: u64, pages: u64) -> u64 {
        let g = lock(&self.gate);
        (first..first + pages)
            .take_while(|&p| !bit(&g.missing, p))
            .count() as u64
    }
}

/// Pages a fault asks for at once: its own and the missing ones after it
/// in its window, up to this many (the rest of a large window comes by
/// the push, or by the next fault's request). Measured by hand on
/// loopback with the push running (1 GiB guest rewriting 256 MiB, 2
/// vCPUs, 2 host cores): p50 1 page ~55 us, 4 pages ~50-75 us, 16 pages
/// ~125 us; 4 asks a quarter as often as 1 for the same latency.
const URGENT_WINDOW: u64 = 4;

impl Arrival for Arrivals {
    fn wait(&self, offset: u64, len: u64) -> Result<(), String> {
        if self.left.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let first = offset / PAGE_SIZE;
        let end = (offset + len).div_ceil(PAGE_SIZE);
        self.wait_pages(first, end, end)
    }

    fn ready(&self, offset: u64, len: u64) -> Result<u64, String> {
        if self.left.load(Ordering::Acquire) == 0 {
            return Ok(len);
        }
        let first = offset / PAGE_SIZE;
        let pages = len.div_ceil(PAGE_SIZE);
        self.wait_pages(first, first + 1, first + pages.min(URGENT_WINDOW))?;
        Ok((self.run_here(first, pages) * PAGE_SIZE).min(len))
    }

    fn ready_now(&self, offset: u64, len: u64) -> u64 {
        if self.left.load(Ordering::Acquire) == 0 {
            return len;
        }
        (self.run_here(offset / PAGE_SIZE, len.div_ceil(PAGE_SIZE)) * PAGE_SIZE).min(len)
    }
}

/// Raise the calling thread's scheduling priority (nice -10) if the host
/// lets it: the threads that carry page requests and answers wake ahead of
/// the vCPUs and the push they share the cores with. Best effort.
pub fn urgent_priority() {
    // SAFETY: setpriority on this thread's own id; no memory is passed.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10);
    }
}

/// Sorted page GPAs as runs `(gpa, pages)` of at most [`MAX_REQUEST`].
pub fn runs(gpas: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for gpa in gpas {
        match out.last_mut() {
            Some((g, n)) if *g + *n * PAGE_SIZE == gpa && *n < MAX_REQUEST => *n += 1,
            _ => out.push((gpa, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::stream::{Addr, Channel, Key, Listener};
    use std::sync::Arc;

    /// A source's and a destination's end of one authenticated connection.
    fn pair(tag: &str) -> (Channel, Channel) {
        let path = std::env::temp_dir().join(format!("vmm-pc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let addr = Addr::Unix(path);
        let l = Listener::bind(&addr).unwrap();
        let key = Key::from_bytes(b"the postcopy unit-test key");
        let k = key.clone();
        let t = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            Channel::accept(c, &k, Duration::from_secs(5)).unwrap()
        });
        let src = Channel::connect(&addr, &key, Duration::from_secs(5)).unwrap();
        (src, t.join().unwrap())
    }

    fn file(tag: &str) -> (File, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("vmm-pc-file-{tag}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(64 * PAGE_SIZE).unwrap();
        (f, p)
    }

    #[test]
    fn a_read_of_a_pending_page_asks_for_it_and_waits_for_the_answer() {
        let (f, path) = file("ask");
        let a = Arc::new(Arrivals::new(f, 64 * PAGE_SIZE, &[(8 * PAGE_SIZE, 8)]).unwrap());
        let (mut src, dst) = pair("ask");
        let (tx, _rx) = dst.split();
        a.connect(tx);
        // Not pending: no wait, no request.
        assert_eq!(a.ready(0, 4 * PAGE_SIZE).unwrap(), 4 * PAGE_SIZE);
        let r = {
            let a = a.clone();
            std::thread::spawn(move || a.ready(10 * PAGE_SIZE, 4 * PAGE_SIZE))
        };
        // The reader asks for its page and the missing ones after it in
        // its window (10..14), once.
        match src.recv().unwrap() {
            Msg::Request { gpa, pages } => assert_eq!((gpa, pages), (10 * PAGE_SIZE, 4)),
            m => panic!("{}", m.name()),
        }
        assert!(!r.is_finished(), "it waits for the answer");
        // A page that was never pending is refused.
        assert!(a.arrived(&[(0, true)], &[1; 4096], true).is_err());
        let data: Vec<u8> = (0..2).flat_map(|i| [0xa0 + i as u8; 4096]).collect();
        a.arrived(
            &[(10 * PAGE_SIZE, true), (11 * PAGE_SIZE, true)],
            &data,
            true,
        )
        .unwrap();
        // Here: 10 and 11 of the 4 pages it looked at.
        assert_eq!(r.join().unwrap().unwrap(), 2 * PAGE_SIZE);
        let mut page = [0u8; 4096];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut page, 11 * PAGE_SIZE)
            .unwrap();
        assert_eq!(page[0], 0xa1, "the answer is in the file");
        let s = a.status();
        assert_eq!(
            (s.requests, s.pages_requested, s.pages_left),
            (1, 4, 6),
            "{s:?}"
        );
        assert!(s.request_latency_p50_us.is_some());
        // A pushed page counts as pushed; the VM's end fails a waiter.
        a.arrived(&[(8 * PAGE_SIZE, true)], &[0; 4096], false)
            .unwrap();
        assert_eq!(a.status().pages_pushed, 1);
        let w = {
            let a = a.clone();
            std::thread::spawn(move || a.wait(15 * PAGE_SIZE, PAGE_SIZE))
        };
        assert!(matches!(src.recv().unwrap(), Msg::Request { .. }));
        a.end("the VM is ending");
        assert!(w.join().unwrap().is_err());
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_broken_connection_keeps_readers_waiting_and_a_new_one_asks_again() {
        let (f, path) = file("lost");
        let a = Arc::new(Arrivals::new(f, 64 * PAGE_SIZE, &[(0, 4)]).unwrap());
        let (src, dst) = pair("lost1");
        let (tx, _rx) = dst.split();
        let epoch = a.connect(tx);
        drop(src);
        a.lost_at(epoch, "the test cut it");
        let r = {
            let a = a.clone();
            std::thread::spawn(move || a.wait(PAGE_SIZE, PAGE_SIZE))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!r.is_finished(), "a reader waits while the link is down");
        assert_eq!(a.status().state, "paused");
        assert_eq!(a.missing_runs(), vec![(0, 4)]);
        // A stale connection's end does not undo the new one.
        let (mut src, dst) = pair("lost2");
        let (tx, _rx) = dst.split();
        a.connect(tx);
        a.lost_at(epoch, "the old one again");
        match src.recv().unwrap() {
            Msg::Request { gpa, pages } => assert_eq!((gpa, pages), (PAGE_SIZE, 1)),
            m => panic!("{}", m.name()),
        }
        a.arrived(&[(PAGE_SIZE, true)], &[5; 4096], true).unwrap();
        r.join().unwrap().unwrap();
        assert_eq!(a.status().state, "running");
        let _ = std::fs::remove_file(path);
    }
}
