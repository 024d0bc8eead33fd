//! A run in one phase, or in two around a snapshot and restore
//! (`--restore-at`): the first VM is churned, snapshotted while paused and
//! ended; a second VM is restored from the snapshot and churned with the
//! rest of the schedule until the guest verifies everything it wrote, in
//! both VMs. Right after the restore, no page the snapshot holds as a hole
//! (never touched, ballooned, unplugged) may be resident (R1).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::api::{VmActions, VmControl};
use vmm::exit::{ExitReason, VmExit};
use vmm::fault::FaultSnapshot;
use vmm::memory::snapshot::SlotImage;
use vmm::memory::{resident_pages, MemoryManager, PAGE_SIZE};
use vmm::vm::{RunReport, Vm};

use super::audit::{SlotAudit, Tally};
use super::report::Invariant;
use super::schedule::Event;
use super::{
    discard_each_pass, Activity, Churn, Console, Kernel, Layout, RestoreOptions, SerialOut,
    StressArgs, VmConfig,
};

/// How a phase ends once its time is up.
pub(crate) enum End {
    /// The guest verifies what it wrote and reports.
    Finish,
    /// The VM is saved here (left paused) and ended.
    Snapshot(PathBuf),
}

impl End {
    pub fn apply(&self, control: &VmControl, actions: &dyn VmActions, exit: &VmExit) {
        match self {
            End::Finish => control.signal_guest(1),
            End::Snapshot(dir) => match actions.snapshot(dir, false, false) {
                Ok(_) => control.stop(),
                Err(e) => {
                    exit.fail(SnapshotFailed(e.message));
                }
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stress: the snapshot failed: {0}")]
struct SnapshotFailed(String);

pub(crate) struct Phases {
    restore_at: Option<Duration>,
    events: Vec<Event>,
    dir: PathBuf,
    /// The directory is ours to remove.
    temporary: bool,
}

/// What the phases left.
pub(crate) struct Ran {
    pub last: Option<RunReport>,
    /// Fault counters of every phase.
    pub total: FaultSnapshot,
    pub stuck: Tally,
    pub activity: Arc<Activity>,
    pub control: Arc<VmControl>,
    pub vm_memory: Arc<MemoryManager>,
    /// R1 when there was a restore.
    pub restored: Vec<Invariant>,
}

impl Phases {
    pub fn new(a: &StressArgs, events: Vec<Event>) -> Result<Self, String> {
        if a.restore_at.is_some_and(|t| t >= a.duration) {
            return Err("--restore-at must come before the end of --duration".into());
        }
        let temporary = a.snapshot_dir.is_none();
        let dir = a.snapshot_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("vmm-stress-snapshot-{}", std::process::id()))
        });
        Ok(Self {
            restore_at: a.restore_at,
            events,
            dir,
            temporary,
        })
    }

    pub fn run(
        mut self,
        a: &StressArgs,
        vm: Vm,
        lay: Layout,
        extra_base: u64,
        audit: &Arc<Mutex<(SlotAudit, SlotAudit)>>,
        out: &Console,
    ) -> Result<Ran, String> {
        let activity = Arc::new(Activity::default());
        let phase =
            |vm: Vm,
             events,
             span|
             -> Result<(RunReport, Tally, Arc<VmControl>, Arc<MemoryManager>), String> {
                discard_each_pass(&vm, lay);
                let churn = Churn::start(
                    a,
                    &vm,
                    events,
                    span,
                    extra_base,
                    audit.clone(),
                    activity.clone(),
                )?;
                let (control, memory) = (vm.control().clone(), vm.memory().clone());
                let run = vm.run().map_err(|e| e.to_string())?;
                let (_, stuck) = churn.join();
                Ok((run, stuck, control, memory))
            };
        let Some(at) = self.restore_at else {
            let (run, stuck, control, vm_memory) =
                phase(vm, self.events, (a.duration, End::Finish))?;
            return Ok(Ran {
                total: run.total(),
                last: Some(run),
                stuck,
                activity,
                control,
                vm_memory,
                restored: Vec::new(),
            });
        };
        let (first, second): (Vec<Event>, Vec<Event>) = std::mem::take(&mut self.events)
            .into_iter()
            .partition(|e| e.at < at);
        let second = second
            .into_iter()
            .map(|e| Event { at: e.at - at, ..e })
            .collect();
        let (run, mut stuck, _, _) = phase(vm, first, (at, End::Snapshot(self.dir.clone())))?;
        if run.reason != ExitReason::Stopped {
            return Err(format!(
                "stress: the first VM ended with {} before the snapshot",
                run.reason
            ));
        }
        let mut total = run.total();
        {
            let mut au = audit.lock().unwrap_or_else(|e| e.into_inner());
            au.0.new_vm();
            au.1.new_vm();
        }
        eprintln!(
            "stress: snapshot at {at:?} into {}; restoring",
            self.dir.display()
        );
        let vm = Vm::new(self.restore_config(a, out)).map_err(|e| format!("restore: {e}"))?;
        let r1 = holes_stay_holes(&self.dir, vm.memory())?;
        let (run, stuck2, control, vm_memory) = phase(vm, second, (a.duration - at, End::Finish))?;
        stuck.add(stuck2);
        total.add(&run.total());
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        Ok(Ran {
            last: Some(run),
            total,
            stuck,
            activity,
            control,
            vm_memory,
            restored: vec![Invariant::new(
                "R1",
                "a restore materializes no hole",
                r1,
                "mincore of every page the snapshot holds as a hole, right after the restore",
            )],
        })
    }

    /// The restore of the snapshot: this run's fault mode and options, the
    /// console into the same capture.
    fn restore_config(&self, a: &StressArgs, out: &Console) -> VmConfig {
        let mut c = VmConfig::new(Kernel::Snapshot(self.dir.clone()));
        c.fault_mode = a.fault_mode;
        c.serial = SerialOut::Capture(out.clone());
        c.inject_eagain_every = a.inject_eagain_every;
        c.metrics_addr = a.metrics_addr;
        c.metrics_linger = a.metrics_linger;
        c.restore = RestoreOptions {
            mode: a.restore_mode,
            prefetch: a.prefetch,
            ..RestoreOptions::default()
        };
        c
    }
}

/// R1: pages the snapshot holds no data for (never touched, ballooned,
/// unplugged) are not resident in the restored VM.
fn holes_stay_holes(dir: &std::path::Path, memory: &MemoryManager) -> Result<Tally, String> {
    let layout: Vec<SlotImage> =
        vmm::snapshot::restore::memory_layout(dir).map_err(|e| e.to_string())?;
    let snap = memory.snapshot();
    let mut t = Tally::default();
    for s in &layout {
        let Some(slot) = snap.lookup(s.gpa) else {
            continue;
        };
        let mut p = 0;
        while p < s.pages() {
            let mut n = 0;
            while p + n < s.pages() && !s.has_data(p + n) {
                n += 1;
            }
            if n == 0 {
                p += 1;
                continue;
            }
            let hva = slot.backing.hva() + (s.gpa - slot.gpa) + p * PAGE_SIZE;
            t.checks += n;
            t.violations += resident_pages(hva, n * PAGE_SIZE);
            p += n;
        }
    }
    if t.violations > 0 {
        log::error!("R1: {} hole pages resident after the restore", t.violations);
    }
    Ok(t)
}
