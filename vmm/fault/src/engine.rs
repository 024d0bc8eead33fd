//! The stage-2 fault path, run by whichever thread met the missing page (a
//! vCPU on its own exit, a handler thread, a SIGBUS handler): the protocol is
//! `memslots::resolve` (snapshot, lookup, prepare with no lock, trylock,
//! install or retry under the slots lock); this file is its userfaultfd
//! installer and the accounting around it.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use memslots::{Bail, Content, Install, InstallGuard, Installer, Outcome, Path, ResolveError};
use thiserror::Error;
use userfaultfd::Uffd;

use vmm_exit::VmExit;
use vmm_memory::{MemoryManager, PageSource, Slot, SlotBacking, SourceError, PAGE_SIZE};

use crate::blocktime::Blocktime;
use crate::restore::{Recorder, RestoreStat, RestoreStats};
use crate::stats::{FaultStats, ThreadStat};
use crate::uffd;

#[derive(Debug, Error)]
pub enum FaultError {
    #[error("guest access to GPA {0:#x}, which is not guest RAM")]
    NotRam(u64),
    #[error("guest access to GPA {0:#x}, in an unplugged memory block")]
    NotPlugged(u64),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("installing the page at GPA {gpa:#x} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Install { gpa: u64, errno: i32 },
    #[error("installing the page at GPA {gpa:#x} returned EAGAIN {attempts} times")]
    TooManyRetries { gpa: u64, attempts: u32 },
    /// Under the slots lock a slot of the current table refused its install
    /// lock: a protocol invariant failed (never a guest error, never NotRam).
    #[error("invariant violated: the install lock for GPA {gpa:#x} could not be taken under the slots lock ({bail:?})")]
    Invariant { gpa: u64, bail: Bail },
}

/// Why an install failed inside the installer.
#[derive(Debug)]
pub enum InstallError {
    Source(SourceError),
    Ioctl { gpa: u64, errno: i32 },
}

impl From<ResolveError<InstallError>> for FaultError {
    fn from(e: ResolveError<InstallError>) -> Self {
        match e {
            ResolveError::NotRam { gpa } => FaultError::NotRam(gpa),
            ResolveError::NotPlugged { gpa } => FaultError::NotPlugged(gpa),
            ResolveError::Installer(InstallError::Source(s)) => FaultError::Source(s),
            ResolveError::Installer(InstallError::Ioctl { gpa, errno }) => {
                FaultError::Install { gpa, errno }
            }
            ResolveError::TooManyRetries { gpa, attempts } => {
                FaultError::TooManyRetries { gpa, attempts }
            }
            ResolveError::SlowPathLock { gpa, bail } => FaultError::Invariant { gpa, bail },
        }
    }
}

/// How a fault ended (I4: installed or already present, nothing else).
pub type Resolved = Outcome;

/// The access that faulted, completed against the installed page while the
/// install lock is still held (so a discard cannot slip in between).
pub enum Access<'a> {
    /// Nothing to complete (the guest re-executes the access).
    None,
    /// A guest load: fill `data` from the page.
    Read(&'a mut [u8]),
    /// A guest store that KVM considers done: apply `data` to the page.
    Write(&'a [u8]),
}

impl Access<'_> {
    /// Bytes accessed.
    pub fn len(&self) -> u64 {
        match self {
            Access::None => 0,
            Access::Read(d) => d.len() as u64,
            Access::Write(d) => d.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE as usize]);

/// What one fault-serving thread owns: its bounce pages and counters.
pub struct FaultCtx {
    /// Image content read for an install (grows to the largest window).
    bounce: Vec<Page>,
    pub stats: Arc<FaultStats>,
    /// Page number just past this thread's last install: a fault there
    /// continues a sequential stream.
    next_page: u64,
    /// Fault-around window of the current stream, in pages (adaptive).
    window: u64,
    /// Install attempts, for injected failures.
    attempts: u64,
    /// The vCPU this thread is (its waits count in the blocktime).
    pub vcpu: Option<usize>,
}

impl FaultCtx {
    pub fn new(stats: Arc<FaultStats>) -> Self {
        Self {
            bounce: vec![Page([0; PAGE_SIZE as usize])],
            stats,
            next_page: u64::MAX,
            window: 1,
            attempts: 0,
            vcpu: None,
        }
    }

    /// A vCPU thread's context.
    pub fn for_vcpu(stats: Arc<FaultStats>, vcpu: usize) -> Self {
        Self {
            vcpu: Some(vcpu),
            ..Self::new(stats)
        }
    }
}

/// What a prefetch of one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetched {
    /// This many pages (from the first) are in now.
    Installed(u64),
    /// This many pages (from the first) were present already (a vCPU was
    /// there first).
    Present(u64),
    /// The first page was discarded, unplugged or removed since the plan:
    /// it stays out.
    Skipped,
}

/// Whether an install wakes threads blocked on the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Handler mode: the faulting thread sleeps in the kernel until woken.
    Waiters,
    /// vcpu mode: nobody sleeps on a missing page (SIGBUS mode).
    Nobody,
}

pub struct FaultEngine {
    memory: Arc<MemoryManager>,
    uffd: Arc<Uffd>,
    exit: Arc<VmExit>,
    wake: Wake,
    /// Largest fault-around window, in pages (1 = off).
    fault_around: u64,
    zeros: Box<[Page]>,
    /// Testing: every Nth install attempt answers EAGAIN, as if a discard
    /// were in flight.
    inject_eagain: Option<u32>,
    blocktime: Blocktime,
    restore: Arc<RestoreStats>,
    /// Records first touches of a restored VM's memory file.
    recorder: Option<Recorder>,
    /// vCPU threads by kernel thread ID (a handler thread's userfault
    /// names the thread it blocks): their index and counters.
    vcpu_threads: RwLock<Vec<(i32, usize, Arc<FaultStats>)>>,
    /// Testing: called with a prefetch's first page after its residency
    /// check, before its read (where a vCPU's install races it).
    #[cfg(test)]
    pub(crate) after_residency: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

impl FaultEngine {
    pub fn new(
        memory: Arc<MemoryManager>,
        uffd: Arc<Uffd>,
        exit: Arc<VmExit>,
        wake: Wake,
        fault_around: u64,
        vcpus: usize,
        restore: Arc<RestoreStats>,
    ) -> Self {
        let fault_around = fault_around.max(1);
        // Zeros for the largest install: a window, or a 2 MiB huge page.
        let zero_pages = if memory.has_hugetlb() {
            fault_around.max(vmm_memory::hugetlb::HUGE_PAGE / PAGE_SIZE)
        } else {
            fault_around
        };
        Self {
            memory,
            uffd,
            exit,
            wake,
            fault_around,
            zeros: (0..zero_pages)
                .map(|_| Page([0; PAGE_SIZE as usize]))
                .collect(),
            inject_eagain: None,
            blocktime: Blocktime::new(vcpus),
            restore,
            recorder: None,
            vcpu_threads: RwLock::new(Vec::new()),
            #[cfg(test)]
            after_residency: std::sync::OnceLock::new(),
        }
    }

    /// Record first touches of the memory file (`capacity` runs at most;
    /// [`Recorder::start`] turns it on).
    pub fn with_recorder(&mut self, capacity: usize) {
        self.recorder = Some(Recorder::new(capacity));
    }

    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    pub fn restore_stats(&self) -> &Arc<RestoreStats> {
        &self.restore
    }

    /// Time every vCPU waited at once, with the VM's other counters.
    pub fn sync_stats(&self) {
        self.restore
            .counters
            .set(RestoreStat::AllBlockedNs, self.blocktime.all_blocked_ns());
        if let Some(r) = &self.recorder {
            self.restore
                .counters
                .set(RestoreStat::RecordedPages, r.pages());
        }
    }

    /// A vCPU thread (kernel thread ID `tid`), so a handler thread can
    /// charge its waits to it.
    pub fn register_vcpu_thread(&self, tid: i32, vcpu: usize, stats: Arc<FaultStats>) {
        self.vcpu_threads
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((tid, vcpu, stats));
    }

    /// The vCPU of kernel thread `tid`, if it is one.
    pub fn vcpu_of_thread(&self, tid: i32) -> Option<(usize, Arc<FaultStats>)> {
        self.vcpu_threads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(t, _, _)| *t == tid)
            .map(|(_, i, s)| (*i, s.clone()))
    }

    /// vCPU `vcpu` waits for memory since `at`.
    #[inline]
    pub fn wait_begins(&self, vcpu: usize, at: Instant) {
        self.blocktime.enter(vcpu, at);
    }

    /// vCPU `vcpu`'s exit turned out not to be a wait (device MMIO).
    #[inline]
    pub fn wait_cancelled(&self, vcpu: usize) {
        self.blocktime.cancel(vcpu);
    }

    /// vCPU `vcpu`'s wait ends: charged to its `stats`.
    #[inline]
    pub fn wait_ends(&self, vcpu: usize, stats: &FaultStats) {
        let ns = self.blocktime.leave(vcpu);
        stats.add_shared(ThreadStat::BlocktimeNs, ns);
    }

    /// Testing: make every `n`th install attempt fail with EAGAIN (as if a
    /// discard were in flight), to exercise the retry path under load.
    pub fn inject_eagain_every(&mut self, n: u32) {
        self.inject_eagain = Some(n.max(1));
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    pub fn exit(&self) -> &Arc<VmExit> {
        &self.exit
    }

    /// Last resort after a failed fault: map zeros so the faulting thread can
    /// run on while the VM stops (its error is already reported).
    pub fn install_zero_hva(&self, hva: u64) {
        let page = hva & !(PAGE_SIZE - 1);
        // SAFETY: `page` is inside a registered guest RAM mapping (the caller
        // found it with `gpa_of_hva`); a zero page over it is harmless.
        let _ = unsafe { uffd::zeropage(self.uffd.as_raw_fd(), page, PAGE_SIZE, true) };
    }

    /// Resolve a fault at `gpa` and complete `access` (which must not cross
    /// a page boundary; see [`Self::resolve_range`]). A completed access is
    /// taken (left `Access::None`); on an error it is left as it was, for
    /// the caller to route elsewhere (e.g. the MMIO bus for `NotRam`).
    pub fn resolve(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        access: &mut Access,
    ) -> Result<Resolved, FaultError> {
        // Adaptive fault-around, as the kernel's readahead: a fault just
        // past this thread's previous install continues a stream and
        // doubles the window (up to `fault_around`); any other fault starts
        // over at one page, so random access installs what it touches.
        let pn = gpa / PAGE_SIZE;
        ctx.window = if pn == ctx.next_page {
            (ctx.window * 2).min(self.fault_around)
        } else {
            1
        };
        let mut installer = UffdInstaller {
            engine: self,
            want: ctx.window,
            installed: 0,
            from_source: false,
            prefetch: false,
            ctx,
            gpa,
            access,
        };
        let r = memslots::resolve(self.memory.slots(), gpa, &mut installer);
        let installed = installer.installed;
        if installer.from_source && installed > 0 {
            self.restore.add(RestoreStat::DemandPages, installed);
            if let Some(rec) = &self.recorder {
                rec.record(pn * PAGE_SIZE, installed);
            }
        }
        installer.ctx.next_page = pn + installed.max(1);
        let stats = &installer.ctx.stats;
        let r = r?;
        stats.add(ThreadStat::Retries, u64::from(r.retries()));
        if r.outcome == Outcome::Installed {
            match r.path {
                Path::Speculative => stats.add(ThreadStat::SpeculativeInstalls, 1),
                Path::Slow => stats.add(ThreadStat::SlowPathInstalls, 1),
            }
        }
        Ok(r.outcome)
    }

    /// Install up to `pages` pages of source content from `gpa` (a
    /// background prefetch), through the same protocol as a fault: under
    /// the install lock, never over a present page, never into a page
    /// discarded or unplugged since (those are skipped: a prefetch never
    /// installs zeros). The run stops at the first present or discarded
    /// page, the slot's or the block's end.
    pub fn prefetch(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        pages: u64,
    ) -> Result<Prefetched, FaultError> {
        // What a vCPU installed already is skipped without reading it again
        // (a vCPU's sequential window is up to 512 pages), and the read
        // stops where the next installed page begins. A vCPU installing
        // after this look still wins: the install refuses a present page.
        let (present, missing) = self.residency(gpa, pages.clamp(1, RESIDENCY_MAX));
        if present > 0 {
            return Ok(Prefetched::Present(present));
        }
        #[cfg(test)]
        if let Some(hook) = self.after_residency.get() {
            hook(gpa);
        }
        let mut installer = UffdInstaller {
            engine: self,
            want: missing.max(1),
            installed: 0,
            from_source: false,
            prefetch: true,
            ctx,
            gpa,
            access: &mut Access::None,
        };
        let r = memslots::resolve(self.memory.slots(), gpa, &mut installer);
        let installed = installer.installed;
        match r.map(|r| r.outcome) {
            Ok(Outcome::Installed) => {
                self.restore.add(RestoreStat::PrefetchPages, installed);
                Ok(Prefetched::Installed(installed.max(1)))
            }
            Ok(Outcome::AlreadyPresent) => Ok(Prefetched::Present(1)),
            Ok(Outcome::Declined)
            | Err(ResolveError::NotRam { .. } | ResolveError::NotPlugged { .. }) => {
                Ok(Prefetched::Skipped)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Ask the host to read `pages` from `gpa` of a file-backed slot into
    /// its page cache, asynchronously (a prefetch's plan, up front: the
    /// disk reads it at its bandwidth while the vCPUs run).
    pub fn advise(&self, gpa: u64, pages: u64) {
        let snap = self.memory.snapshot();
        let Some(slot) = snap.lookup(gpa) else {
            return;
        };
        if let PageSource::File(img) = slot.backing.source() {
            let len = (pages * PAGE_SIZE).min(slot.end() - gpa);
            img.read_around(slot.backing.source_offset() + (gpa - slot.gpa), len);
        }
    }

    /// How many pages from `gpa` (at most `pages`, within its slot) are
    /// resident, or if the first is not, how many are not (mincore).
    /// Outside RAM: (0, 1), for the install to say why.
    fn residency(&self, gpa: u64, pages: u64) -> (u64, u64) {
        let snap = self.memory.snapshot();
        let Some(slot) = snap.lookup(gpa) else {
            return (0, 1);
        };
        let page = gpa & !(PAGE_SIZE - 1);
        let pages = pages.min((slot.end() - page) / PAGE_SIZE) as usize;
        let mut vec = [0u8; RESIDENCY_MAX as usize];
        let hva = slot.backing.hva() + (page - slot.gpa);
        // SAFETY: `vec` has a byte for each of the `pages` pages (at most
        // RESIDENCY_MAX) of a range inside the slot's mapping, which the
        // snapshot keeps mapped; mincore only reads page-table state.
        let r = unsafe {
            libc::mincore(
                hva as *mut libc::c_void,
                pages * PAGE_SIZE as usize,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return (0, 1);
        }
        let first = vec[0] & 1;
        let run = vec[..pages].iter().take_while(|b| *b & 1 == first).count() as u64;
        if first != 0 {
            (run, 0)
        } else {
            (0, run)
        }
    }

    /// Resolve every page that `[gpa, gpa+len)` touches, completing the
    /// access on the last one (unaligned accesses may straddle two pages).
    pub fn resolve_range(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        access: &mut Access,
    ) -> Result<Resolved, FaultError> {
        let last = gpa.saturating_add(access.len().max(1) - 1) & !(PAGE_SIZE - 1);
        if last == gpa & !(PAGE_SIZE - 1) {
            return self.resolve(ctx, gpa, access);
        }
        // Straddling: install the first page, then the second, then complete
        // with no lock held. A discard racing in between makes the
        // completion's touch of a page fault again (SIGBUS handler), which
        // installs zero: the access then orders after the discard, as it may.
        self.resolve(ctx, gpa, &mut Access::None)?;
        let r = self.resolve(ctx, last, &mut Access::None)?;
        let snap = self.memory.snapshot();
        let slot = snap.lookup(gpa).ok_or(FaultError::NotRam(gpa))?;
        complete(slot, gpa, std::mem::replace(access, Access::None));
        Ok(r)
    }
}

/// Most pages a prefetch looks at (and reads) at once.
const RESIDENCY_MAX: u64 = 512;

/// Smallest window of a fault on a file page, in pages.
const FILE_WINDOW: u64 = 16;

/// The file block read around a short first touch of a file page (the
/// host kernel reads 128 KiB around a file mapping's fault likewise).
const READ_AROUND: u64 = 128 << 10;

/// The production installer: userfaultfd ioctls into the slot's mapping.
struct UffdInstaller<'e, 'a> {
    engine: &'e FaultEngine,
    ctx: &'e mut FaultCtx,
    gpa: u64,
    access: &'e mut Access<'a>,
    /// The stream's window (pages) for this fault.
    want: u64,
    /// Pages the install put in (0: none, e.g. already present).
    installed: u64,
    /// They came from the slot's source (a memory file).
    from_source: bool,
    /// A background prefetch: source content only, never zeros.
    prefetch: bool,
}

impl UffdInstaller<'_, '_> {
    /// Pages to install at `page`: up to the stream's window. The window
    /// never leaves the slot, never leaves a plugged block (I6), and stops
    /// before a discarded page (a page the balloon took stays out of the
    /// host until the guest touches it, and then reads zero). The caller
    /// fills it with zeros only in a zero-sourced slot and with image
    /// content only in an image slot (I3).
    fn window(&self, slot: &Slot, page: u64) -> u64 {
        if self.want <= 1 {
            return 1;
        }
        let end = match slot.block_size() {
            Some(b) => (((page - slot.gpa) / b + 1) * b + slot.gpa).min(slot.end()),
            None => slot.end(),
        };
        let pages = self.want.min((end - page) / PAGE_SIZE);
        1 + slot.undiscarded_run(slot.page_index(page) + 1, pages - 1)
    }
}

impl Installer<SlotBacking> for UffdInstaller<'_, '_> {
    /// Image pages read into the bounce buffer.
    type Prepared = u64;
    type Error = InstallError;

    /// Step 3, no lock held: read image content for the window into the
    /// bounce pages (one read), or decide on zeros.
    fn prepare(&mut self, slot: &Slot, page: u64) -> Result<Content<u64>, InstallError> {
        match slot.backing.source() {
            PageSource::File(img) if !slot.is_discarded(slot.page_index(page)) => {
                // A file page's neighbours come at the price of one read:
                // at least a 64 KiB window, as the kernel's fault-around
                // maps a file mapping's (a restore's pages are the
                // guest's own; none is installed twice).
                if !self.prefetch {
                    self.want = self.want.max(FILE_WINDOW.min(self.engine.fault_around));
                }
                let offset = slot.backing.source_offset() + (page - slot.gpa);
                let mut pages = self.window(slot, page);
                // A post-copy destination's image: what is there from the
                // faulting page on (it waits for that page alone).
                let ready = img
                    .ready(offset, pages * PAGE_SIZE)
                    .map_err(InstallError::Source)?;
                pages = pages.min(ready / PAGE_SIZE).max(1);
                let bounce = &mut self.ctx.bounce;
                if bounce.len() < pages as usize {
                    bounce.resize_with(pages as usize, || Page([0; PAGE_SIZE as usize]));
                }
                if pages < READ_AROUND / PAGE_SIZE {
                    // A short read (a random touch): have the host read the
                    // block around it, so the neighbours' faults find it in
                    // the page cache.
                    img.read_around(offset & !(READ_AROUND - 1), READ_AROUND);
                }
                // SAFETY: `Page` is plain bytes; the first `pages` of the
                // vector are one contiguous, initialised buffer.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(
                        bounce.as_mut_ptr().cast::<u8>(),
                        (pages * PAGE_SIZE) as usize,
                    )
                };
                img.read_page(offset, buf).map_err(InstallError::Source)?;
                self.ctx
                    .stats
                    .add(ThreadStat::SourceBytes, pages * PAGE_SIZE);
                Ok(Content::Source(pages))
            }
            _ => Ok(Content::Zero),
        }
    }

    /// Step 4, guard held: `UFFDIO_COPY` of the bounce page or of zeros (a
    /// store follows: no copy-on-write fault after it), `UFFDIO_ZEROPAGE`
    /// for a read of a zero page.
    fn install(
        &mut self,
        slot: &Slot,
        page: u64,
        content: Content<u64>,
        _held: &InstallGuard<'_>,
    ) -> Result<Install, InstallError> {
        if self.prefetch && matches!(content, Content::Zero) {
            // Discarded since the plan (I3 turned the content into zero),
            // or a zero-sourced slot: nothing for a prefetch to do.
            return Ok(Install::Declined);
        }
        if let Some(n) = self.engine.inject_eagain {
            self.ctx.attempts += 1;
            if self.ctx.attempts.is_multiple_of(u64::from(n)) {
                return Ok(Install::Again);
            }
        }
        let fd = self.engine.uffd.as_raw_fd();
        let wake = self.engine.wake == Wake::Waiters;
        let read = matches!(self.access, Access::Read(_));
        let (first, pages) = match slot.backing.huge_page() {
            // hugetlb: the whole huge page, always zeros (hugetlb has no
            // UFFDIO_ZEROPAGE and no smaller install; its slots are
            // zero-sourced, a discard drops or zeroes whole pieces in
            // place, and a block is whole huge pages).
            Some(huge) => (slot.gpa + (page - slot.gpa) / huge * huge, huge / PAGE_SIZE),
            // The window again, under the guard: a discard since `prepare`
            // shortens it. Zeros go only where the slot's content is zero
            // (I3).
            None => (
                page,
                match content {
                    Content::Zero if matches!(slot.backing.source(), PageSource::Zero) => {
                        self.window(slot, page)
                    }
                    Content::Zero => 1,
                    Content::Source(read) => read.min(self.window(slot, page)),
                },
            ),
        };
        let hva = slot.backing.hva() + (first - slot.gpa);
        let len = pages * PAGE_SIZE;
        // SAFETY: `hva..hva+len` lies in the slot's mapping (the window stays
        // inside the slot), which is registered with the uffd and cannot be
        // removed while the guard is held; the sources are live buffers of at
        // least `len` bytes (`zeros` holds the largest window or huge page,
        // `bounce` the pages `prepare` read).
        let r = unsafe {
            match content {
                Content::Source(_) => {
                    uffd::copy(fd, hva, self.ctx.bounce.as_ptr().cast(), len, wake)
                }
                Content::Zero if read && pages == 1 => uffd::zeropage(fd, hva, len, wake),
                Content::Zero => uffd::copy(fd, hva, self.engine.zeros.as_ptr().cast(), len, wake),
            }
        };
        let stats = &self.ctx.stats;
        match r {
            Ok(uffd::Install::Done) => {
                self.installed = pages;
                self.from_source = matches!(content, Content::Source(_));
                stats.add(ThreadStat::PagesInstalled, pages);
                Ok(Install::Done)
            }
            // A window stopped at a present page: the faulting page is in.
            Ok(uffd::Install::Again(n) | uffd::Install::Exists(n)) if n >= PAGE_SIZE => {
                self.installed = n / PAGE_SIZE;
                self.from_source = matches!(content, Content::Source(_));
                stats.add(ThreadStat::PagesInstalled, n / PAGE_SIZE);
                Ok(Install::Done)
            }
            Ok(uffd::Install::Exists(_)) => {
                stats.add(ThreadStat::AlreadyPresent, 1);
                if wake {
                    // A failed copy wakes nobody; the faulting thread may be
                    // blocked on this page (handler mode).
                    let _ = self
                        .engine
                        .uffd
                        .wake(hva as *mut libc::c_void, PAGE_SIZE as usize);
                }
                Ok(Install::Exists)
            }
            Ok(uffd::Install::Again(_)) => Ok(Install::Again),
            Err(errno) => Err(InstallError::Ioctl { gpa: page, errno }),
        }
    }

    fn complete(&mut self, slot: &Slot, _held: &InstallGuard<'_>) {
        let access = std::mem::replace(self.access, Access::None);
        complete(slot, self.gpa, access);
    }
}

/// Apply a completed guest access to `gpa` of `slot`'s host memory. A
/// write is the VMM's, not the guest's, as KVM sees it: it is marked
/// changed for the next diff snapshot (KVM's dirty log never sees it).
fn complete(slot: &Slot, gpa: u64, access: Access) {
    let hva = slot.backing.hva() + (gpa - slot.gpa);
    match access {
        Access::None => {}
        Access::Read(data) => {
            for (i, b) in data.iter_mut().enumerate() {
                // SAFETY: `hva` points into guest RAM that is installed and
                // mapped for at least the access length (the caller holds the
                // install lock or re-faults through the SIGBUS handler).
                *b = unsafe { std::ptr::read_volatile((hva + i as u64) as *const u8) };
            }
        }
        Access::Write(data) => {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile((hva + i as u64) as *mut u8, *b) };
            }
            slot.backing.mark_changed(gpa - slot.gpa, data.len() as u64);
        }
    }
}
