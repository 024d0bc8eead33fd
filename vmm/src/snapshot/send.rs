//! The source of a live migration (pre-copy): guest RAM is sent while the
//! guest runs — every page that holds something, then rounds of what
//! changed (KVM's dirty log, the VMM's writes, discards as holes) — until
//! what is left fits the downtime budget (or the rounds run out); then the
//! vCPUs park, the devices are held, the last changes and the state go,
//! and once the destination has restored the VM (`Ready`) the source says
//! `Go` and its VM ends ("migrated"). Any failure before `Go` leaves the
//! source running as if nothing happened.
//!
//! Post-copy (`mode: postcopy`, or `auto` when the rounds do not converge):
//! at the stop, only holes and page-table pages go (the destination's
//! restore walks those before any vCPU runs); the other pages that hold
//! data are listed as pending, and after `Go` the source serves them
//! (`serve`): on request first, pushed otherwise, until the destination has
//! them all. Its VM ends only then.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use std::sync::mpsc;
use std::sync::Arc;

use super::postcopy::{runs, Arrivals, PostcopyStatus};
use super::save::{Snapshotter, PAUSE_LIMIT};
use super::serve::{Answering, Owed};
use super::stream::{Addr, Channel, Key, Msg, StreamError, VmState};
use super::SnapshotError;
use crate::devices::lock;
use crate::exit::ExitReason;
use crate::memory::migrate::{Page, Sent};
use crate::memory::PAGE_SIZE;

/// Pages per frame.
const BATCH: usize = 256;
/// How long the destination may take to restore the VM.
const RESTORE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("reading guest memory: {0}")]
    Memory(String),
    #[error("the destination failed: {0}")]
    Destination(String),
    #[error("the destination answered {0} where it should have said Ready")]
    Protocol(&'static str),
    #[error("a migration is running already")]
    Busy,
    #[error(
        "this VM was stopped during a paused post-copy: the destination never got all its pages"
    )]
    Abandoned,
}

/// How guest memory moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationMode {
    /// Rounds while the guest runs, the rest while it is stopped.
    #[default]
    Precopy,
    /// The guest runs on the destination at once; its pages follow.
    Postcopy,
    /// Pre-copy, and post-copy if the rounds do not converge.
    Auto,
}

impl MigrationMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::Auto => "auto",
        }
    }
}

/// What `PUT /vm/migrate` asks.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub to: Addr,
    pub key: Key,
    /// The longest the guest may be stopped (the last round's estimate).
    pub max_downtime: Duration,
    /// Rounds after the first before the guest is stopped anyway.
    pub max_rounds: u32,
    pub mode: MigrationMode,
    /// Bytes per second post-copy's push may take (0: no limit).
    pub max_postcopy_bandwidth: u64,
}

/// A migration's progress (`GET /vm/migrate`, `vmm ctl migrate show`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStatus {
    /// idle, connecting, precopy, stopped, postcopy, postcopy-paused
    /// (waiting for `migrate recover`), recovering, done, failed.
    pub state: String,
    /// precopy, postcopy or auto, as asked.
    pub mode: String,
    pub to: String,
    /// Rounds after the first (which sends every page that holds something).
    pub round: u32,
    pub pages_sent: u64,
    /// Pages each round sent, the first included.
    pub pages_per_round: Vec<u64>,
    /// Pages changed per second in the last round.
    pub dirty_pages_per_s: f64,
    /// Pages per second the stream carried so far.
    pub pages_per_s: f64,
    /// The last round's pages at that rate.
    pub expected_downtime_ms: f64,
    /// How long the guest was stopped (when done; post-copy: until it
    /// ran on the destination).
    pub downtime_ms: Option<f64>,
    pub total_ms: f64,
    pub error: Option<String>,
    /// Post-copy: pages the destination lacked when it started.
    pub pages_pending: u64,
    /// Post-copy: the destination's requests, the pages they asked, and
    /// the pages pushed without a request.
    pub requests: u64,
    pub pages_requested: u64,
    pub pages_pushed: u64,
    /// This VM came by a post-copy migration: its progress.
    pub incoming: Option<PostcopyStatus>,
    /// How KVM logged the guest's writes: `bitmap` or `ring:ENTRIES`
    /// (`vmm run --dirty-log`).
    pub dirty_log: String,
    /// Time spent reading the dirty log, every round together.
    pub dirty_log_ms: f64,
    /// Ring only: entries harvested during this migration (one per page
    /// per round on a host that logs a page once until it is reset).
    pub dirty_ring_entries: u64,
    /// Ring only: vCPU exits for a full ring during this migration.
    pub dirty_ring_full: u64,
    /// Ring only: times the host wrote past a ring during this migration
    /// (every page was then sent again).
    pub dirty_ring_lost: u64,
}

/// What the running or last migration did. (One runs at a time: the
/// caller refuses a second, `vm::actions`.)
#[derive(Default)]
pub struct Migrations {
    status: Mutex<MigrationStatus>,
    /// This VM's own arrival by post-copy, while its pages come.
    incoming: Mutex<Option<Arc<Arrivals>>>,
    /// A client read the final status of a migration that succeeded.
    reported: std::sync::atomic::AtomicBool,
    /// A post-copy whose connection broke waits here for a new one.
    recover: Mutex<Option<mpsc::Sender<(Addr, Key)>>>,
}

/// How long a migrated source waits for its client to read the result
/// before its VM ends (and its API with it).
const REPORT_WAIT: Duration = Duration::from_secs(2);

impl Migrations {
    /// The status for a client (`GET /vm/migrate`).
    pub fn status_for_client(&self) -> MigrationStatus {
        let s = self.status();
        if s.state == "done" {
            self.reported
                .store(true, std::sync::atomic::Ordering::Release);
        }
        s
    }

    pub fn status(&self) -> MigrationStatus {
        let mut s = lock(&self.status).clone();
        if let Some(a) = lock(&self.incoming).as_ref() {
            s.incoming = Some(a.status());
        }
        if s.state.is_empty() {
            s.state = "idle".into();
        }
        s
    }

    pub fn incoming(&self, a: Arc<Arrivals>) {
        *lock(&self.incoming) = Some(a);
    }

    /// The destination's post-copy request-latency histogram.
    pub fn incoming_latency(&self) -> Option<crate::fault::stats::LatencySnapshot> {
        lock(&self.incoming).as_ref().map(|a| a.histogram())
    }

    /// Resume a paused post-copy through `to` (`migrate recover`).
    pub fn recover(&self, to: Addr, key: Key) -> Result<(), String> {
        match lock(&self.recover).as_ref() {
            Some(tx) if self.status().state == "postcopy-paused" => {
                self.update(|s| s.state = "recovering".into());
                tx.send((to, key))
                    .map_err(|_| "the migration ended".to_string())
            }
            _ => Err(format!(
                "no post-copy migration is waiting for a recovery (the migration is {})",
                self.status().state
            )),
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }
}

/// Pages on their way into one frame.
pub(super) struct Batch {
    pub(super) gpas: Vec<(u64, bool)>,
    data: Vec<u8>,
    pub(super) pages: u64,
}

impl Batch {
    pub(super) fn new() -> Self {
        Self {
            gpas: Vec::with_capacity(BATCH),
            data: Vec::with_capacity(BATCH * PAGE_SIZE as usize),
            pages: 0,
        }
    }

    pub(super) fn push(
        &mut self,
        ch: &mut Channel,
        gpa: u64,
        page: Page<'_>,
    ) -> Result<(), StreamError> {
        match page {
            Page::Data(bytes) => {
                self.gpas.push((gpa, true));
                self.data.extend_from_slice(bytes);
            }
            Page::Hole => self.gpas.push((gpa, false)),
            // Listed, not sent (the caller collects them).
            Page::Later => return Ok(()),
        }
        if self.gpas.len() >= BATCH {
            self.flush(ch)?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self, ch: &mut Channel) -> Result<(), StreamError> {
        if self.gpas.is_empty() {
            return Ok(());
        }
        self.pages += self.gpas.len() as u64;
        ch.send(&Msg::Pages {
            gpas: std::mem::take(&mut self.gpas),
            data: std::mem::take(&mut self.data),
        })
    }
}

impl Snapshotter {
    /// Migrate the VM to `o.to` (see the module docs). `connected` is
    /// called once the destination is authenticated (the caller may
    /// answer its client then; the rest shows in `m`'s status). On success
    /// the VM is ending (`ExitReason::Migrated`); on failure it runs on.
    pub fn migrate(
        &self,
        o: &MigrateOptions,
        m: &Migrations,
        connected: &mut dyn FnMut(),
    ) -> Result<MigrationStatus, MigrateError> {
        m.reported
            .store(false, std::sync::atomic::Ordering::Release);
        let _no_snapshot = self.busy.try_lock().map_err(|_| SnapshotError::Busy)?;
        let t0 = Instant::now();
        *lock(&m.status) = MigrationStatus {
            state: "connecting".into(),
            mode: o.mode.name().into(),
            to: o.to.to_string(),
            ..Default::default()
        };
        let r = self.run_migration(o, m, t0, connected);
        m.update(|s| {
            s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            match &r {
                Ok(()) => s.state = "done".into(),
                Err(e) => {
                    s.state = "failed".into();
                    s.error = Some(e.to_string());
                }
            }
        });
        match r {
            Ok(()) => {
                let waited = Instant::now();
                while !m.reported.load(std::sync::atomic::Ordering::Acquire)
                    && waited.elapsed() < REPORT_WAIT
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let s = m.status();
                eprintln!(
                    "vmm: migrated to {}: {} pages in {} rounds, {:.1} s, guest stopped {:.1} ms; this VM ends",
                    o.to,
                    s.pages_sent,
                    s.pages_per_round.len(),
                    s.total_ms / 1e3,
                    s.downtime_ms.unwrap_or(0.0)
                );
                self.exit.request(ExitReason::Migrated(o.to.to_string()));
                Ok(m.status())
            }
            Err(MigrateError::Abandoned) => {
                eprintln!("vmm: migration to {}: {}", o.to, MigrateError::Abandoned);
                Err(MigrateError::Abandoned)
            }
            Err(e) => {
                eprintln!("vmm: migration to {} failed, the VM runs on: {e}", o.to);
                Err(e)
            }
        }
    }

    /// One round of pages into the stream; `later`: data pages (but
    /// page tables) go into it, not into the stream.
    fn round(
        &self,
        first: bool,
        sent: &mut Sent,
        ch: &mut Channel,
        batch: &mut Batch,
        mut later: Option<&mut Vec<u64>>,
    ) -> Result<u64, MigrateError> {
        let mut stream_err = None;
        let n = self
            .memory
            .migration_round(first, later.is_some(), sent, &mut |gpa, page| {
                if let (Page::Later, Some(l)) = (&page, later.as_mut()) {
                    l.push(gpa);
                }
                batch.push(ch, gpa, page).map_err(|e| {
                    let msg = e.to_string();
                    stream_err = Some(e);
                    std::io::Error::other(msg)
                })
            })
            .map_err(|e| match stream_err.take() {
                Some(s) => MigrateError::Stream(s),
                None => MigrateError::Memory(e.to_string()),
            })?;
        batch.flush(ch)?;
        Ok(n)
    }

    fn run_migration(
        &self,
        o: &MigrateOptions,
        m: &Migrations,
        t0: Instant,
        connected: &mut dyn FnMut(),
    ) -> Result<(), MigrateError> {
        let (mut ch, urgent) = Channel::connect_session(&o.to, &o.key, Duration::from_secs(10))?;
        // What changed since the last snapshot is consumed here: a diff
        // after this needs a full snapshot first.
        lock(&self.base).take();
        self.memory
            .track_dirty()
            .map_err(|e| MigrateError::Memory(e.to_string()))?;
        let log0 = self.memory.dirty_log_stats();
        m.update(|s| s.dirty_log = log0.kind.clone());
        let log = |s: &mut MigrationStatus| {
            let now = self.memory.dirty_log_stats();
            s.dirty_log_ms = (now.read_ns - log0.read_ns) as f64 / 1e6;
            s.dirty_ring_entries = now.ring_entries - log0.ring_entries;
            s.dirty_ring_full = now.ring_full - log0.ring_full;
            s.dirty_ring_lost = now.ring_lost - log0.ring_lost;
        };
        let mut sent = Sent::default();
        let mut batch = Batch::new();
        let mut converged = false;
        if o.mode != MigrationMode::Postcopy {
            m.update(|s| s.state = "precopy".into());
            connected();
            converged = self.precopy(o, m, t0, &mut sent, &mut ch, &mut batch, &log)?;
        } else {
            connected();
        }
        let post =
            o.mode == MigrationMode::Postcopy || (o.mode == MigrationMode::Auto && !converged);
        // Stop the guest: the last changes and the state.
        m.update(|s| s.state = "stopped".into());
        let stopped = Instant::now();
        let vcpus = self
            .pause
            .pause(true, &self.exit, PAUSE_LIMIT)
            .map_err(SnapshotError::from)?;
        // The devices stay still until this VM ends or runs on.
        let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        let mut pending = Vec::new();
        let went = (|| -> Result<(), MigrateError> {
            let first = o.mode == MigrationMode::Postcopy;
            let later = post.then_some(&mut pending);
            let last = self.round(first, &mut sent, &mut ch, &mut batch, later)?;
            let state = VmState {
                record: self.record_now(&vcpus),
                vm: self.save_vm()?,
                devices: self.save_devices(&transports),
                vcpus,
                layout: self.memory.migration_layout(&sent),
            };
            m.update(|s| {
                s.pages_per_round.push(last - pending.len() as u64);
                s.pages_sent = batch.pages;
                s.pages_pending = pending.len() as u64;
                log(s);
            });
            if post {
                ch.send(&Msg::Postcopy {
                    pending: runs(pending.iter().copied()),
                })?;
            }
            ch.send(&Msg::State(Box::new(state)))?;
            Ok(())
        })();
        let owed = Arc::new(Owed::new(
            self.memory.clone(),
            std::mem::take(&mut pending),
            o.max_postcopy_bandwidth,
        ));
        // Post-copy: the destination's restore reads pending pages (the
        // pages the host walks for a vCPU): they are answered already.
        let mut answering = None;
        let went = went.and_then(|()| {
            if post {
                answering = Some(owed.answer(urgent)?);
            } else {
                drop(urgent);
            }
            ready_then_go(&mut ch)
        });
        if let Err(e) = went {
            if let Some(a) = answering {
                a.stop();
            }
            drop(transports);
            let _ = self.pause.resume();
            ch.shutdown();
            return Err(e);
        }
        m.update(|s| s.downtime_ms = Some(stopped.elapsed().as_secs_f64() * 1e3));
        if post {
            // No way back: the destination runs the guest.
            self.postcopy(&owed, answering, ch, m)?;
        }
        drop(transports);
        Ok(())
    }

    /// Rounds while the guest runs; whether the last fits the budget.
    /// `log` adds the dirty log's counters to the status.
    #[allow(clippy::too_many_arguments)]
    fn precopy(
        &self,
        o: &MigrateOptions,
        m: &Migrations,
        t0: Instant,
        sent: &mut Sent,
        ch: &mut Channel,
        batch: &mut Batch,
        log: &dyn Fn(&mut MigrationStatus),
    ) -> Result<bool, MigrateError> {
        let first = self.round(true, sent, ch, batch, None)?;
        m.update(|s| s.pages_per_round.push(first));
        let budget = o.max_downtime.as_secs_f64();
        let mut r = 0;
        loop {
            r += 1;
            let t = Instant::now();
            let n = self.round(false, sent, ch, batch, None)?;
            let dt = t.elapsed().as_secs_f64().max(1e-6);
            let rate = batch.pages as f64 / t0.elapsed().as_secs_f64().max(1e-6);
            let expected = n as f64 / rate.max(1.0);
            m.update(|s| {
                s.round = r;
                s.pages_sent = batch.pages;
                s.pages_per_round.push(n);
                s.dirty_pages_per_s = n as f64 / dt;
                s.pages_per_s = rate;
                s.expected_downtime_ms = expected * 1e3;
                log(s);
            });
            if expected <= budget {
                return Ok(true);
            }
            if r >= o.max_rounds {
                return Ok(false);
            }
        }
    }

    /// After `Go`: serve the pages still owed until the destination has
    /// them all; a broken connection waits for `migrate recover` (or for
    /// this VM's end).
    fn postcopy(
        &self,
        owed: &Arc<Owed>,
        mut answering: Option<Answering>,
        mut ch: Channel,
        m: &Migrations,
    ) -> Result<(), MigrateError> {
        m.update(|s| s.state = "postcopy".into());
        let (tx, rx) = mpsc::channel();
        *lock(&m.recover) = Some(tx);
        loop {
            let r = owed.push(&mut ch, m);
            if let Some(a) = answering.take() {
                a.stop();
            }
            match r {
                Ok(()) => {
                    lock(&m.recover).take();
                    if let Some(why) = owed.gone() {
                        eprintln!("vmm: the VM ended on the destination before all its pages went ({why}); nothing more is owed");
                        m.update(|s| {
                            s.error = Some(format!("the VM ended on the destination first: {why}"))
                        });
                    }
                    return Ok(());
                }
                // A broken connection, or a stream that broke: nothing can
                // resume this VM (the destination ran it); it waits with
                // its pages for a recovery, or for its end.
                Err(e) => {
                    ch.shutdown();
                    eprintln!(
                        "vmm: post-copy paused: {e}; the VM stays stopped here with the pages the destination lacks (resume with 'vmm ctl migrate recover --to ADDR')"
                    );
                    m.update(|s| {
                        s.state = "postcopy-paused".into();
                        s.error = Some(e.to_string());
                    });
                }
            }
            let (c, u) = loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok((to, key)) => match self.reconnect(&to, &key, owed, m) {
                        Ok(pair) => break pair,
                        Err(e) => {
                            eprintln!("vmm: post-copy recovery through {to} failed: {e}");
                            m.update(|s| {
                                s.state = "postcopy-paused".into();
                                s.error = Some(format!("recovery: {e}"));
                            });
                        }
                    },
                    Err(mpsc::RecvTimeoutError::Timeout) if !self.exit.is_stopping() => {}
                    Err(_) => {
                        lock(&m.recover).take();
                        return Err(MigrateError::Abandoned);
                    }
                }
            };
            ch = c;
            answering = Some(owed.answer(u)?);
        }
    }

    /// A recovery: a new session, `Recover`, and what the destination
    /// still lacks.
    fn reconnect(
        &self,
        to: &Addr,
        key: &Key,
        owed: &Owed,
        m: &Migrations,
    ) -> Result<(Channel, Channel), MigrateError> {
        let (mut ch, urgent) = Channel::connect_session(to, key, Duration::from_secs(10))?;
        ch.send(&Msg::Recover)?;
        match ch.recv()? {
            Msg::Postcopy { pending } => owed.only(&pending)?,
            Msg::Failed(why) => return Err(MigrateError::Destination(why)),
            other => return Err(MigrateError::Protocol(other.name())),
        }
        eprintln!(
            "vmm: post-copy resumed through {to}: {} pages to go",
            owed.left()
        );
        m.update(|s| {
            s.state = "postcopy".into();
            s.to = to.to_string();
            s.error = None;
        });
        Ok((ch, urgent))
    }
}

/// Pre-copy's end: the destination restored the VM (`Ready`); `Go`.
fn ready_then_go(ch: &mut Channel) -> Result<(), MigrateError> {
    ch.rx.set_timeout(Some(RESTORE_LIMIT));
    match ch.recv()? {
        Msg::Ready => {}
        Msg::Failed(why) => return Err(MigrateError::Destination(why)),
        other => return Err(MigrateError::Protocol(other.name())),
    }
    ch.send(&Msg::Go)?;
    Ok(())
}
