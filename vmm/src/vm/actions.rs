//! What the control plane asks of the VM itself ([`VmActions`]): pause,
//! resume, snapshot, and the end of a working-set recording.
//!
//! While the VM runs they are done on its `control` thread, whose seccomp
//! class may create files and kick vCPUs (the API thread, which parses
//! what clients send, may do neither): the API thread hands a job over and
//! waits for the answer. The control thread also ends a working-set
//! recording when its time is up or the VM ends.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Parts;
use crate::api::control::{MigrateRequest, MigrationModeName, RecoverRequest};
use crate::api::{ActionError, VmActions};
use crate::devices::lock;
use crate::exit::VmExit;
use crate::fault::prefetch::coalesce;
use crate::fault::FaultEngine;
use crate::memory::PAGE_SIZE;
use crate::seccomp::{confine, SeccompMode, ThreadClass};
use crate::snapshot::restore::WORKING_SET;
use crate::snapshot::save::Snapshotter;
use crate::snapshot::send::{MigrateError, MigrateOptions, MigrationMode, Migrations};
use crate::snapshot::stream::{Addr, Key, StreamError};
use crate::snapshot::{SavedConfig, SnapshotError, VmRecord};
use crate::vcpu::pause::{Pause, PauseError};

/// How long a plain pause waits for the vCPUs.
const PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// A restore recording its working set.
struct Recording {
    engine: Arc<FaultEngine>,
    path: PathBuf,
    started: Instant,
}

/// One request for the control thread.
enum Job {
    Snapshot {
        dir: PathBuf,
        resume: bool,
        diff: bool,
    },
    Pause,
    Resume,
    SaveWorkingSet,
    Migrate(MigrateRequest),
}

type Reply = mpsc::Sender<Result<Value, ActionError>>;

pub(super) struct Actions {
    snapshotter: Snapshotter,
    pause: Arc<Pause>,
    exit: Arc<VmExit>,
    recording: Mutex<Option<Recording>>,
    migrations: Migrations,
    /// A migration is asked for or running.
    migrating: std::sync::atomic::AtomicBool,
    /// The control thread's queue, while it runs.
    jobs: Mutex<Option<mpsc::Sender<(Job, Reply)>>>,
}

impl Actions {
    pub fn new(p: &Parts, pause: &Arc<Pause>) -> Self {
        let config = &p.config;
        let devices = &p.devices;
        let record = VmRecord {
            host: p.host.flavor.tag().to_string(),
            vcpus: config.vcpus,
            cpuid: Vec::new(),
            config: SavedConfig {
                kernel: config.kernel.name(),
                cmdline: config.cmdline.clone(),
                mem_size: config.mem_size,
                vcpus: config.vcpus,
                balloon: config.balloon,
                hotplug: config.hotplug,
                syscall_assist: config.syscall_assist,
                syscall_filter: p.syscall_assist,
            },
            created_unix: 0,
        };
        Self {
            snapshotter: Snapshotter {
                pause: pause.clone(),
                exit: p.exit.clone(),
                vm_fd: p.vm_fd.clone(),
                memory: p.memory.clone(),
                serial: devices.serial_input.device(),
                signal: devices.signal.clone(),
                transports: devices.transports(),
                balloon: devices.balloon.as_ref().map(|b| b.device.clone()),
                mem: devices.hotplug.as_ref().map(|h| h.device.clone()),
                record,
                busy: Mutex::new(()),
                base: Mutex::new(p.base.clone()),
                cwd: std::env::current_dir().unwrap_or_default(),
            },
            pause: pause.clone(),
            exit: p.exit.clone(),
            recording: Mutex::new(None),
            migrations: Migrations::default(),
            migrating: std::sync::atomic::AtomicBool::new(false),
            jobs: Mutex::new(None),
        }
    }

    /// Record the pages the guest touches first (the engine's recorder)
    /// until [`VmActions::save_working_set`], the timer, or the VM's end.
    pub fn start_recording(&self, engine: Arc<FaultEngine>, snapshot_dir: &Path) {
        if let Some(r) = engine.recorder() {
            r.start();
            *lock(&self.recording) = Some(Recording {
                engine,
                path: snapshot_dir.join(WORKING_SET),
                started: Instant::now(),
            });
        }
    }

    /// Start the control thread: it does the jobs the API hands over, and
    /// ends a working-set recording after `record_for` or with the VM.
    pub fn spawn_control(
        self: &Arc<Self>,
        record_for: Option<Duration>,
        seccomp: SeccompMode,
    ) -> std::io::Result<thread::JoinHandle<()>> {
        let (tx, rx) = mpsc::channel::<(Job, Reply)>();
        *lock(&self.jobs) = Some(tx);
        let me = self.clone();
        let deadline = record_for.map(|d| Instant::now() + d);
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if !confine(seccomp, ThreadClass::Control, &me.exit) {
                    return;
                }
                let mut deadline = deadline;
                while !me.exit.is_stopping() {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok((Job::Migrate(r), reply)) => me.migrate_job(&r, reply),
                        Ok((job, reply)) => {
                            let _ = reply.send(me.perform(job));
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        deadline = None;
                        me.finish_recording("its time was up");
                    }
                }
                *lock(&me.jobs) = None;
                me.finish_recording("the VM ended");
            })
    }

    /// Do `job` here (the control thread, or the caller's thread when no
    /// control thread runs: the VM has not started or has ended).
    fn perform(&self, job: Job) -> Result<Value, ActionError> {
        match job {
            Job::Snapshot { dir, resume, diff } => match self
                .snapshotter
                .snapshot(&dir, resume, diff)
            {
                Ok(s) => serde_json::to_value(s).map_err(|e| ActionError::failed(e.to_string())),
                Err(SnapshotError::Pause(e)) => Err(pause_error(e)),
                Err(
                    e @ (SnapshotError::Busy
                    | SnapshotError::NoBase
                    | SnapshotError::Format(vmm_snapshot::SnapshotError::Exists(_))),
                ) => Err(ActionError::refused(e.to_string())),
                Err(e) => Err(ActionError::failed(e.to_string())),
            },
            Job::Pause => self
                .pause
                .pause(false, &self.exit, PAUSE_LIMIT)
                .map(|_| Value::Null)
                .map_err(pause_error),
            Job::Resume => self
                .pause
                .resume()
                .map(|_| Value::Null)
                .map_err(pause_error),
            Job::Migrate(_) => Err(ActionError::refused(
                "the VM is not running: nothing to migrate",
            )),
            Job::SaveWorkingSet => self
                .finish_recording("asked through the API")
                .unwrap_or_else(|| {
                    Err(ActionError::refused(
                        "no working set is being recorded (restore with --record-working-set)",
                    ))
                }),
        }
    }

    /// Hand `job` to the control thread and wait for its answer.
    fn ask(&self, job: Job) -> Result<Value, ActionError> {
        let queue = lock(&self.jobs).clone();
        let Some(queue) = queue else {
            return self.perform(job);
        };
        let (tx, rx) = mpsc::channel();
        if queue.send((job, tx)).is_err() {
            return Err(ActionError::refused("the VM is ending"));
        }
        rx.recv()
            .unwrap_or_else(|_| Err(ActionError::refused("the VM is ending")))
    }

    /// A migration, on the control thread: `reply` is answered once the
    /// destination is authenticated (or the migration failed before);
    /// the rest shows in the status (`GET /vm/migrate`).
    fn migrate_job(&self, r: &MigrateRequest, reply: Reply) {
        let mut reply = Some(reply);
        let r = migrate_options(r).and_then(|o| {
            let m = &self.migrations;
            let mut connected = || {
                if let Some(tx) = reply.take() {
                    let _ = tx.send(
                        serde_json::to_value(m.status())
                            .map_err(|e| ActionError::failed(e.to_string())),
                    );
                }
            };
            self.snapshotter.migrate(&o, m, &mut connected)
        });
        self.migrating
            .store(false, std::sync::atomic::Ordering::Release);
        if let (Err(e), Some(tx)) = (r, reply) {
            let _ = tx.send(Err(match e {
                e @ (MigrateError::Busy
                | MigrateError::Snapshot(SnapshotError::Busy)
                | MigrateError::Stream(StreamError::BadAddr(_) | StreamError::Key { .. })) => {
                    ActionError::refused(e.to_string())
                }
                MigrateError::Snapshot(SnapshotError::Pause(e)) => pause_error(e),
                e => ActionError::failed(e.to_string()),
            }));
        }
    }

    /// What the metrics read of migrations.
    pub fn migration_reading(&self) -> crate::metrics::migration::MigrationReading {
        use crate::metrics::migration::{Incoming, MigrationReading, Outgoing};
        let s = self.migrations.status();
        let ns = |ms: f64| (ms * 1e6) as u64;
        MigrationReading {
            json: serde_json::to_value(&s).unwrap_or(Value::Null),
            outgoing: (s.state != "idle").then(|| Outgoing {
                total_ns: ns(s.total_ms),
                downtime_ns: ns(s.downtime_ms.unwrap_or(0.0)),
                rounds: u64::from(s.round),
                pages_sent: s.pages_sent,
                pages_pending: s.pages_pending,
                pages_requested: s.pages_requested,
                pages_pushed: s.pages_pushed,
                dirty_pages_per_s: s.dirty_pages_per_s as u64,
            }),
            incoming: s.incoming.as_ref().map(|i| Incoming {
                pending_at_start: i.pages_pending_at_start,
                left: i.pages_left,
                requests: i.requests,
                pages_requested: i.pages_requested,
                pages_pushed: i.pages_pushed,
            }),
            incoming_latency: self.migrations.incoming_latency(),
        }
    }

    /// This VM came by a post-copy migration still under way: its
    /// progress shows in the migration status.
    pub fn incoming(&self, a: Arc<crate::snapshot::postcopy::Arrivals>) {
        self.migrations.incoming(a);
    }

    /// The VM is ending: a pause still on ends (its vCPU threads stop).
    /// A recording still on is written by the control thread as it ends.
    pub fn vm_ended(&self) {
        let _ = self.pause.resume();
    }

    fn finish_recording(&self, why: &str) -> Option<Result<Value, ActionError>> {
        let r = lock(&self.recording).take()?;
        Some(write_working_set(&r, why))
    }
}

/// Stop `r` and write its set.
fn write_working_set(r: &Recording, why: &str) -> Result<Value, ActionError> {
    let runs = r
        .engine
        .recorder()
        .map(|rec| rec.stop())
        .unwrap_or_default();
    let pages: u64 = coalesce(runs.clone()).iter().map(|(_, n)| n).sum();
    match vmm_snapshot::write_sidecar(&r.path, &runs) {
        Ok(()) => {
            eprintln!(
                "vmm: working set: {} MiB in {} runs recorded over {:.1} s ({why}) into {}",
                (pages * PAGE_SIZE) >> 20,
                runs.len(),
                r.started.elapsed().as_secs_f64(),
                r.path.display()
            );
            Ok(json!({
                "path": r.path,
                "pages": pages,
                "runs": runs.len(),
                "seconds": r.started.elapsed().as_secs_f64(),
            }))
        }
        Err(e) => {
            let msg = format!("writing the working set: {e}");
            eprintln!("vmm: {msg}");
            Err(ActionError::failed(msg))
        }
    }
}

/// A request's address parsed and key read (on the control thread, which
/// may open files).
fn migrate_options(r: &MigrateRequest) -> Result<MigrateOptions, MigrateError> {
    let to: Addr = r.to.parse()?;
    Ok(MigrateOptions {
        to,
        key: Key::load(&r.key_file)?,
        max_downtime: Duration::from_millis(r.max_downtime_ms),
        max_rounds: r.max_rounds,
        mode: match r.mode {
            MigrationModeName::Precopy => MigrationMode::Precopy,
            MigrationModeName::Postcopy => MigrationMode::Postcopy,
            MigrationModeName::Auto => MigrationMode::Auto,
        },
        max_postcopy_bandwidth: r.max_postcopy_bandwidth_mib << 20,
    })
}

fn pause_error(e: PauseError) -> ActionError {
    match e {
        PauseError::AlreadyPaused | PauseError::NotPaused | PauseError::Ending => {
            ActionError::refused(e.to_string())
        }
        _ => ActionError::failed(e.to_string()),
    }
}

impl VmActions for Actions {
    fn snapshot(&self, dir: &Path, resume: bool, diff: bool) -> Result<Value, ActionError> {
        self.ask(Job::Snapshot {
            dir: dir.to_path_buf(),
            resume,
            diff,
        })
    }

    fn pause(&self) -> Result<(), ActionError> {
        self.ask(Job::Pause).map(|_| ())
    }

    fn resume(&self) -> Result<(), ActionError> {
        self.ask(Job::Resume).map(|_| ())
    }

    fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    fn save_working_set(&self) -> Result<Value, ActionError> {
        self.ask(Job::SaveWorkingSet)
    }

    fn migrate(&self, r: &MigrateRequest) -> Result<Value, ActionError> {
        // Refused here, not queued behind the running one.
        if self
            .migrating
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return Err(ActionError::refused(MigrateError::Busy.to_string()));
        }
        let answer = self.ask(Job::Migrate(r.clone()));
        if answer.is_err() {
            // Failed before it ran (the job clears it when it ends).
            self.migrating
                .store(false, std::sync::atomic::Ordering::Release);
        }
        answer
    }

    fn migration(&self) -> Value {
        serde_json::to_value(self.migrations.status_for_client()).unwrap_or(Value::Null)
    }

    fn recover(&self, r: &RecoverRequest) -> Result<Value, ActionError> {
        let to: Addr =
            r.to.parse()
                .map_err(|e: StreamError| ActionError::refused(e.to_string()))?;
        let key = Key::load(&r.key_file).map_err(|e| ActionError::refused(e.to_string()))?;
        self.migrations
            .recover(to, key)
            .map_err(ActionError::refused)?;
        Ok(self.migration())
    }
}
