//! Parking vCPU threads between exits, so another thread can save (or
//! look at) the VM while no guest instruction runs.
//!
//! [`Pause::pause`] raises a flag and kicks every vCPU thread out of
//! `KVM_RUN` (the stop kick: `immediate_exit`, so a kick that lands just
//! before the ioctl is not lost). Each vCPU thread sees the flag at the top
//! of its loop, saves its own state if asked (the vCPU fd is its thread's;
//! KVM serves the ioctls while it is out of `KVM_RUN`), reports, and waits
//! for [`Pause::resume`]. A VM that is ending parks nobody: the pause
//! fails instead of waiting.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::state::{StateError, VcpuSnapshot};
use crate::exit::VmExit;

#[derive(Debug, Error)]
pub enum PauseError {
    #[error("the VM is ending")]
    Ending,
    #[error("the VM is paused already")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("{parked} of {vcpus} vCPUs stopped within {waited:?}")]
    Timeout {
        parked: usize,
        vcpus: usize,
        waited: Duration,
    },
    #[error("vCPU {vcpu}: saving its state: {error}")]
    Save { vcpu: usize, error: StateError },
    #[error("vCPU {0} parked without saving its state")]
    NoState(usize),
}

#[derive(Default)]
struct Parked {
    /// Which pause this is (a vCPU that wakes late from the previous one
    /// does not count in this one).
    epoch: u64,
    /// A pause is on (requested or complete).
    on: bool,
    /// vCPUs parked now.
    parked: usize,
    /// Whether parking vCPUs save their state, and what they saved.
    save: bool,
    states: Vec<Option<Result<VcpuSnapshot, StateError>>>,
}

/// The pause of one VM's vCPUs.
pub struct Pause {
    vcpus: usize,
    requested: AtomicBool,
    inner: Mutex<Parked>,
    cv: Condvar,
    /// The vCPU threads, for the kick (registered as they start).
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl Pause {
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpus,
            requested: AtomicBool::new(false),
            inner: Mutex::new(Parked::default()),
            cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread, for the kick.
    pub fn register(&self, thread: libc::pthread_t) {
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(thread);
    }

    /// Whether a pause is asked for (the vCPU loop's cheap check).
    #[inline]
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn is_paused(&self) -> bool {
        self.lock().on
    }

    /// Stop every vCPU at its next exit and wait (at most `limit`) until
    /// all are parked; with `save`, each saves its state first (returned in
    /// vCPU order). The vCPUs stay parked until [`Self::resume`].
    pub fn pause(
        &self,
        save: bool,
        exit: &VmExit,
        limit: Duration,
    ) -> Result<Vec<VcpuSnapshot>, PauseError> {
        {
            let mut p = self.lock();
            if p.on {
                return Err(PauseError::AlreadyPaused);
            }
            *p = Parked {
                epoch: p.epoch + 1,
                on: true,
                parked: 0,
                save,
                states: (0..self.vcpus).map(|_| None).collect(),
            };
        }
        self.requested.store(true, Ordering::Release);
        for &t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            super::kick(t);
        }
        let start = Instant::now();
        let mut p = self.lock();
        while p.parked < self.vcpus {
            let waited = start.elapsed();
            if exit.is_stopping() || waited >= limit {
                let parked = p.parked;
                drop(p);
                self.resume_unchecked();
                return Err(if exit.is_stopping() {
                    PauseError::Ending
                } else {
                    PauseError::Timeout {
                        parked,
                        vcpus: self.vcpus,
                        waited,
                    }
                });
            }
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if !save {
            return Ok(Vec::new());
        }
        let states = std::mem::take(&mut p.states);
        drop(p);
        let out: Result<Vec<VcpuSnapshot>, PauseError> = states
            .into_iter()
            .enumerate()
            .map(|(vcpu, s)| match s {
                Some(Ok(s)) => Ok(s),
                Some(Err(error)) => Err(PauseError::Save { vcpu, error }),
                None => Err(PauseError::NoState(vcpu)),
            })
            .collect();
        if out.is_err() {
            self.resume_unchecked();
        }
        out
    }

    /// Let the parked vCPUs run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        if !self.lock().on {
            return Err(PauseError::NotPaused);
        }
        self.resume_unchecked();
        Ok(())
    }

    fn resume_unchecked(&self) {
        self.requested.store(false, Ordering::Release);
        let mut p = self.lock();
        p.on = false;
        p.states.clear();
        drop(p);
        self.cv.notify_all();
    }

    /// A vCPU thread's part: called at the top of its loop when
    /// [`Self::requested`]; saves with `save` if asked, reports, and waits
    /// until resumed (or the VM ends).
    pub fn park(
        &self,
        index: usize,
        exit: &VmExit,
        save: impl FnOnce() -> Result<VcpuSnapshot, StateError>,
    ) {
        let mut p = self.lock();
        if !p.on {
            return;
        }
        let epoch = p.epoch;
        if p.save {
            let s = save();
            if let Some(slot) = p.states.get_mut(index) {
                *slot = Some(s);
            }
        }
        p.parked += 1;
        self.cv.notify_all();
        // Until this pause ends (a newer one parks the thread again from
        // the top of its loop).
        while p.on && p.epoch == epoch && !exit.is_stopping() {
            p = self
                .cv
                .wait_timeout(p, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if p.epoch == epoch {
            p.parked = p.parked.saturating_sub(1);
        }
    }
}
