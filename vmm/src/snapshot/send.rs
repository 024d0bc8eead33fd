//! The source of a live migration (pre-copy): guest RAM is sent while the
//! guest runs — every page that holds something, then rounds of what
//! changed (KVM's dirty log, the VMM's writes, discards as holes) — until
//! what is left fits the downtime budget (or the rounds run out); then the
//! vCPUs park, the devices are held, the last changes and the state go,
//! and once the destination has restored the VM (`Ready`) the source says
//! `Go` and its VM ends ("migrated"). Any failure before `Go` leaves the
//! source running as if nothing happened.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use super::save::{Snapshotter, PAUSE_LIMIT};
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
}

/// A migration's progress (`GET /vm/migrate`, `vmm ctl migrate show`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStatus {
    /// idle, connecting, precopy, stopped, done, failed.
    pub state: String,
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
    /// How long the guest was stopped (when done).
    pub downtime_ms: Option<f64>,
    pub total_ms: f64,
    pub error: Option<String>,
}

/// What the running or last migration did. (One runs at a time: the
/// caller refuses a second, `vm::actions`.)
#[derive(Default)]
pub struct Migrations {
    status: Mutex<MigrationStatus>,
    /// A client read the final status of a migration that succeeded.
    reported: std::sync::atomic::AtomicBool,
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
        let s = lock(&self.status).clone();
        if s.state.is_empty() {
            MigrationStatus {
                state: "idle".into(),
                ..s
            }
        } else {
            s
        }
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }
}

/// Pages on their way into one frame.
struct Batch {
    gpas: Vec<(u64, bool)>,
    data: Vec<u8>,
    pages: u64,
}

impl Batch {
    fn new() -> Self {
        Self {
            gpas: Vec::with_capacity(BATCH),
            data: Vec::with_capacity(BATCH * PAGE_SIZE as usize),
            pages: 0,
        }
    }

    fn push(&mut self, ch: &mut Channel, gpa: u64, page: Page<'_>) -> Result<(), StreamError> {
        match page {
            Page::Data(bytes) => {
                self.gpas.push((gpa, true));
                self.data.extend_from_slice(bytes);
            }
            Page::Hole => self.gpas.push((gpa, false)),
        }
        if self.gpas.len() >= BATCH {
            self.flush(ch)?;
        }
        Ok(())
    }

    fn flush(&mut self, ch: &mut Channel) -> Result<(), StreamError> {
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
            Err(e) => {
                eprintln!("vmm: migration to {} failed, the VM runs on: {e}", o.to);
                Err(e)
            }
        }
    }

    /// One round of pages into the stream.
    fn round(
        &self,
        first: bool,
        sent: &mut Sent,
        ch: &mut Channel,
        batch: &mut Batch,
    ) -> Result<u64, MigrateError> {
        let mut stream_err = None;
        let n = self
            .memory
            .migration_round(first, sent, &mut |gpa, page| {
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
        let mut ch = Channel::connect(&o.to, &o.key, Duration::from_secs(10))?;
        // What changed since the last snapshot is consumed here: a diff
        // after this needs a full snapshot first.
        lock(&self.base).take();
        self.memory
            .track_dirty()
            .map_err(|e| MigrateError::Memory(e.to_string()))?;
        m.update(|s| s.state = "precopy".into());
        connected();
        let mut sent = Sent::default();
        let mut batch = Batch::new();
        let first = self.round(true, &mut sent, &mut ch, &mut batch)?;
        m.update(|s| s.pages_per_round.push(first));
        let budget = o.max_downtime.as_secs_f64();
        let mut r = 0;
        loop {
            r += 1;
            let t = Instant::now();
            let n = self.round(false, &mut sent, &mut ch, &mut batch)?;
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
            });
            if expected <= budget || r >= o.max_rounds {
                break;
            }
        }
        // Stop the guest: the last changes and the state.
        m.update(|s| s.state = "stopped".into());
        let stopped = Instant::now();
        let vcpus = self
            .pause
            .pause(true, &self.exit, PAUSE_LIMIT)
            .map_err(SnapshotError::from)?;
        let done = (|| -> Result<(), MigrateError> {
            let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
            let last = self.round(false, &mut sent, &mut ch, &mut batch)?;
            let state = VmState {
                record: self.record_now(&vcpus),
                vm: self.save_vm()?,
                devices: self.save_devices(&transports),
                vcpus,
                layout: self.memory.migration_layout(&sent),
            };
            m.update(|s| {
                s.pages_per_round.push(last);
                s.pages_sent = batch.pages;
            });
            ch.send(&Msg::State(Box::new(state)))?;
            ch.set_timeout(Some(RESTORE_LIMIT));
            match ch.recv()? {
                Msg::Ready => {}
                Msg::Failed(why) => return Err(MigrateError::Destination(why)),
                Msg::Pages { .. } => return Err(MigrateError::Protocol("pages")),
                Msg::State(_) => return Err(MigrateError::Protocol("a state")),
                Msg::Go => return Err(MigrateError::Protocol("go")),
            }
            ch.send(&Msg::Go)?;
            Ok(())
        })();
        if done.is_err() {
            let _ = self.pause.resume();
            ch.shutdown();
            return done;
        }
        m.update(|s| s.downtime_ms = Some(stopped.elapsed().as_secs_f64() * 1e3));
        Ok(())
    }
}
