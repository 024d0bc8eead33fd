//! Post-copy, the source's side: its VM is stopped for good (the
//! destination runs it), and its guest RAM is the only copy of the pages
//! the destination still lacks. One thread answers the destination's
//! requests on the urgent connection as they come; the caller's thread
//! pushes every other pending page on the main connection, skipping those
//! answered, then says `Done` and waits for `Complete`. If a connection
//! breaks, the VM stays stopped and its pages kept until `vmm ctl migrate
//! recover` connects again; the destination then says what it still lacks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::postcopy::MAX_REQUEST;
use super::send::{Batch, MigrateError, Migrations};
use super::stream::{Channel, Conn, Msg};
use crate::devices::lock;
use crate::memory::migrate::Page;
use crate::memory::{MemoryManager, PAGE_SIZE};

/// Pages the push reads at once.
const RUN: u64 = 256;

/// How long the destination may take to confirm the last pushed page.
const COMPLETE_LIMIT: Duration = Duration::from_secs(120);

/// The pages a stopped source still owes its destination.
pub struct Owed {
    memory: Arc<MemoryManager>,
    /// Sorted GPAs.
    pending: Mutex<Vec<u64>>,
    /// Answered on the urgent connection (the push skips them).
    answered: Mutex<HashSet<u64>>,
    requests: AtomicU64,
    pages_requested: AtomicU64,
    /// The destination's VM ended before it had every page (it said why):
    /// nothing more is owed.
    gone: Mutex<Option<String>>,
    /// Bytes per second the push may take (0: no limit).
    bandwidth: u64,
}

/// The thread that answers requests, while it runs.
pub struct Answering {
    closer: Option<Box<dyn Conn>>,
    thread: JoinHandle<()>,
}

impl Answering {
    pub fn stop(self) {
        if let Some(c) = &self.closer {
            c.shutdown();
        }
        let _ = self.thread.join();
    }
}

impl Owed {
    pub fn new(memory: Arc<MemoryManager>, mut pending: Vec<u64>, bandwidth: u64) -> Self {
        pending.sort_unstable();
        Self {
            memory,
            pending: Mutex::new(pending),
            answered: Mutex::new(HashSet::new()),
            requests: AtomicU64::new(0),
            pages_requested: AtomicU64::new(0),
            gone: Mutex::new(None),
            bandwidth,
        }
    }

    /// What the destination says it still lacks (a recovery): only those
    /// are pushed now.
    pub fn only(&self, runs: &[(u64, u64)]) -> Result<(), MigrateError> {
        let mut v = Vec::new();
        for &(gpa, n) in runs {
            if n > (1 << 40) / PAGE_SIZE || gpa % PAGE_SIZE != 0 {
                return Err(MigrateError::Destination(format!(
                    "{n} pages missing at {gpa:#x}"
                )));
            }
            v.extend((0..n).map(|i| gpa + i * PAGE_SIZE));
        }
        *lock(&self.pending) = v;
        lock(&self.answered).clear();
        Ok(())
    }

    /// Pages still to go.
    pub fn left(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Answer the requests on `urgent` from guest RAM, in a thread.
    pub fn answer(self: &Arc<Self>, urgent: Channel) -> Result<Answering, MigrateError> {
        let closer = urgent.closer();
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("postcopy-answers".into())
            .spawn(move || me.answer_all(urgent))
            .map_err(|e| MigrateError::Memory(format!("starting the answer thread: {e}")))?;
        Ok(Answering { closer, thread })
    }

    fn answer_all(&self, mut urgent: Channel) {
        urgent.rx.set_timeout(None);
        super::postcopy::urgent_priority();
        let mut buf = Vec::new();
        loop {
            let (gpa, pages) = match urgent.recv() {
                Ok(Msg::Request { gpa, pages }) => (gpa, pages),
                Ok(Msg::Failed(why)) => {
                    *lock(&self.gone) = Some(why);
                    return;
                }
                Ok(m) => {
                    log::warn!(
                        "post-copy: the destination sent {} on the urgent connection",
                        m.name()
                    );
                    return;
                }
                Err(_) => return,
            };
            if pages == 0 || pages > MAX_REQUEST {
                let _ = urgent.send(&Msg::Failed(format!("a request for {pages} pages")));
                return;
            }
            buf.resize((pages * PAGE_SIZE) as usize, 0);
            if let Err(e) = self.memory.read_stopped(gpa, &mut buf) {
                let _ = urgent.send(&Msg::Failed(e));
                return;
            }
            let gpas: Vec<(u64, bool)> = (0..pages).map(|i| (gpa + i * PAGE_SIZE, true)).collect();
            lock(&self.answered).extend(gpas.iter().map(|g| g.0));
            let data = std::mem::take(&mut buf);
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.pages_requested.fetch_add(pages, Ordering::Relaxed);
            if urgent.send(&Msg::Pages { gpas, data }).is_err() {
                return;
            }
        }
    }

    fn report(&self, m: &Migrations, pushed: u64) {
        m.update(|s| {
            s.requests = self.requests.load(Ordering::Relaxed);
            s.pages_requested = self.pages_requested.load(Ordering::Relaxed);
            s.pages_pushed = pushed;
        });
    }

    /// Why the destination's VM ended before it had every page, if it did.
    pub fn gone(&self) -> Option<String> {
        lock(&self.gone).clone()
    }

    /// The main connection: every pending page not answered, then `Done`,
    /// then the destination's `Complete` (or the destination's VM ended:
    /// nothing more is owed).
    pub fn push(&self, main: &mut Channel, m: &Migrations) -> Result<(), MigrateError> {
        let r = self.push_all(main, m);
        if r.is_err() {
            // The destination says why before it closes, on the urgent
            // connection: give the answer thread a moment to read it.
            let t = std::time::Instant::now();
            while self.gone().is_none() && t.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.gone().is_some() {
                return Ok(());
            }
        }
        r
    }

    fn push_all(&self, main: &mut Channel, m: &Migrations) -> Result<(), MigrateError> {
        let pending = lock(&self.pending).clone();
        let mut batch = Batch::new();
        let mut buf = Vec::new();
        let snap = self.memory.snapshot();
        let started = std::time::Instant::now();
        let mut i = 0;
        while i < pending.len() {
            if self.gone().is_some() {
                return Ok(());
            }
            if self.bandwidth > 0 {
                // Ahead of the allowed rate: wait until it catches up.
                let due = (batch.pages * PAGE_SIZE) as f64 / self.bandwidth as f64;
                let ahead = due - started.elapsed().as_secs_f64();
                if ahead > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(ahead));
                }
            }
            // A run of pages not answered yet, in one memslot: one read.
            let start = pending[i];
            let end = snap.lookup(start).map_or(start + PAGE_SIZE, |s| s.end());
            let mut n = 0u64;
            {
                let answered = lock(&self.answered);
                while let Some(&gpa) = pending.get(i) {
                    if gpa != start + n * PAGE_SIZE || gpa >= end || n == RUN {
                        break;
                    }
                    if answered.contains(&gpa) {
                        if n == 0 {
                            i += 1;
                            break;
                        }
                        break;
                    }
                    n += 1;
                    i += 1;
                }
            }
            if n == 0 {
                continue;
            }
            buf.resize((n * PAGE_SIZE) as usize, 0);
            self.memory
                .read_stopped(start, &mut buf)
                .map_err(MigrateError::Memory)?;
            for (k, page) in buf.chunks(PAGE_SIZE as usize).enumerate() {
                batch.push(main, start + k as u64 * PAGE_SIZE, Page::Data(page))?;
                if batch.gpas.is_empty() {
                    self.report(m, batch.pages);
                }
            }
        }
        batch.flush(main)?;
        self.report(m, batch.pages);
        main.send(&Msg::Done)?;
        main.rx.set_timeout(Some(COMPLETE_LIMIT));
        let r = match main.recv()? {
            Msg::Complete => Ok(()),
            Msg::Failed(why) => Err(MigrateError::Destination(why)),
            other => Err(MigrateError::Protocol(other.name())),
        };
        self.report(m, batch.pages);
        r
    }
}
