//! seccomp filters, one per thread class (rust-vmm's `seccompiler`).
//!
//! Each VMM thread installs the filter of its class before it serves the
//! guest: vCPU threads before their first `KVM_RUN`, the device event loop,
//! the userfaultfd handlers, the API, metrics and signal threads at their
//! start, and `vmm run`'s main thread once every other thread is running (a
//! filter is inherited by threads created after it, so the main thread's
//! must come last). The allow-lists are the system calls each class was
//! seen making in the test suite (`--seccomp log`, then the kernel's audit
//! lines in `dmesg`); `ioctl` is further limited to the request numbers
//! each class issues.
//!
//! A violation under `--seccomp kill` (the default) raises SIGSYS; the
//! handler here writes which thread class and which system call (number
//! and first two arguments) to stderr and ends the process with status
//! 128 + SIGSYS, as Firecracker does. Under `--seccomp log` the kernel logs
//! the call and lets it through (`dmesg`: `audit: type=1326 ... comm="vcpu0"
//! ... syscall=N`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::raw::c_uint;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use thiserror::Error;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// What a thread's filter does with a system call off its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filters.
    Off,
    /// Log the call (kernel audit log) and let it through.
    Log,
    /// Report the call and end the process (SIGSYS).
    #[default]
    Kill,
}

/// The thread classes, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadClass {
    Vcpu,
    /// The device event loop (virtio queues, serial input).
    Events,
    /// userfaultfd handler threads (`--fault-mode handler`).
    Handler,
    Api,
    /// Pause, resume and snapshot (`vm::actions`): kicks vCPUs, reads the
    /// VM's in-kernel state, writes snapshot files.
    Control,
    Metrics,
    Signals,
    /// `vmm run`'s main thread, after it started the others.
    Main,
    /// A post-copy destination's page receivers (`snapshot::receive`).
    Migration,
}

impl ThreadClass {
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Events => "events",
            ThreadClass::Handler => "uffd handler",
            ThreadClass::Api => "api",
            ThreadClass::Control => "control",
            ThreadClass::Metrics => "metrics",
            ThreadClass::Signals => "signals",
            ThreadClass::Main => "main",
            ThreadClass::Migration => "migration",
        }
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("building the {class} seccomp filter: {source}")]
    Build {
        class: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {class} seccomp filter: {source}")]
    Install {
        class: &'static str,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

thread_local! {
    /// This thread's class, for the SIGSYS report (const-initialised and
    /// without a destructor: safe to read in a signal handler).
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

/// Install the filter of `class` on the calling thread (nothing for `Off`).
pub fn apply(mode: SeccompMode, class: ThreadClass) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Kill => SeccompAction::Trap,
    };
    let program = program(class, mismatch)?;
    install(&program, class, mode == SeccompMode::Kill)
}

/// Install a built `program` for `class` on the calling thread (no
/// allocation: usable in a forked child).
fn install(program: &BpfProgram, class: ThreadClass, trap: bool) -> Result<(), SeccompError> {
    if trap {
        install_sigsys_handler()?;
    }
    CLASS.with(|c| c.set(Some(class)));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        class: class.name(),
        source,
    })
}

/// [`apply`] for a VM thread: on failure the VM ends with the error.
/// Returns whether the thread may go on.
pub fn confine(mode: SeccompMode, class: ThreadClass, exit: &crate::exit::VmExit) -> bool {
    match apply(mode, class) {
        Ok(()) => true,
        Err(e) => {
            exit.fail(e);
            false
        }
    }
}

/// The BPF program of `class`, with `mismatch` for calls off its list.
pub fn program(class: ThreadClass, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build {
        class: class.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in allowed(class) {
        rules.insert(nr, Vec::new());
    }
    // glibc's malloc reads /proc/sys/vm/overcommit_memory (read-only, close
    // on exec) the first time a thread's arena shrinks, in whichever thread
    // that happens: read-only opens are allowed, nothing else (BPF cannot
    // see the path).
    // The control thread creates snapshot files: any open.
    if class != ThreadClass::Control {
        let read_only = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
        let open = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, read_only)
            .map_err(err)?;
        rules.insert(
            libc::SYS_openat,
            vec![SeccompRule::new(vec![open]).map_err(err)?],
        );
    }
    if let Some(requests) = ioctls(class) {
        let mut r = Vec::with_capacity(requests.len());
        for req in requests {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .map_err(err)?;
            r.push(SeccompRule::new(vec![cond]).map_err(err)?);
        }
        rules.insert(libc::SYS_ioctl, r);
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(err)?;
    filter.try_into().map_err(err)
}

/// System calls every thread makes: memory allocation, locks, time,
/// signal return, logging, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn allowed(class: ThreadClass) -> Vec<i64> {
    let own: &[i64] = match class {
        // KVM_RUN and exit handling; serial output; irqfd/eventfd writes;
        // the device bus (virtio MMIO, the balloon's discards and
        // virtio-mem's memslots when a notification takes the bus path);
        // image pages read for a fault; the kick (tgkill by the main
        // thread arrives as a signal, nothing to allow).
        // A post-copy destination's page request (sendto on its socket).
        ThreadClass::Vcpu => &[
            libc::SYS_read,
            libc::SYS_pread64,
            libc::SYS_fadvise64,
            libc::SYS_mincore,
            libc::SYS_sendto,
        ],
        ThreadClass::Events => &[
            libc::SYS_epoll_create1,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_read,
            libc::SYS_pread64,
            libc::SYS_ioctl,
            libc::SYS_mincore,
            libc::SYS_fadvise64,
            libc::SYS_timerfd_settime,
            libc::SYS_sendto,
        ],
        ThreadClass::Handler => &[
            libc::SYS_read,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_pread64,
            libc::SYS_fadvise64,
            // A restore's prefetch (this class) skips installed pages.
            libc::SYS_mincore,
            libc::SYS_sendto,
        ],
        ThreadClass::Api | ThreadClass::Metrics => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_fcntl,
            libc::SYS_ioctl,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_mincore,
            libc::SYS_pread64,
            libc::SYS_fadvise64,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_statx,
        ],
        ThreadClass::Signals => &[libc::SYS_rt_sigtimedwait],
        // A snapshot: the kick, the VM's state ioctls, the directory under
        // a temporary name (created, filled sparse, synced, renamed; or
        // removed), guest pages read (mincore, a source's pread); a
        // working set written the same way.
        ThreadClass::Control => &[
            libc::SYS_tgkill,
            libc::SYS_ioctl,
            libc::SYS_openat,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
            libc::SYS_lseek,
            libc::SYS_pwrite64,
            libc::SYS_pread64,
            libc::SYS_fadvise64,
            libc::SYS_read,
            libc::SYS_mincore,
            libc::SYS_getdents64,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rmdir,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_fcntl,
            // A live migration: the stream to the destination (a TCP or
            // Unix socket it connects, with timeouts), the handshake's
            // nonce.
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_write,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
            libc::SYS_getrandom,
            // (+ POSTCOPY_THREADS: the thread that answers the
            // destination's requests.)
        ],
        // A post-copy destination's receivers: pages from the source's
        // connections into the incoming file; a recovery listens again
        // (a Unix socket's path is removed when it closes).
        ThreadClass::Migration => &[
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_pwrite64,
            libc::SYS_setsockopt,
            libc::SYS_shutdown,
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_fcntl,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            // (+ POSTCOPY_THREADS: a recovery starts the thread that
            // receives the answers.)
        ],
        // (sendto: a post-copy destination whose VM ends tells the source.)
        ThreadClass::Main => &[
            libc::SYS_sendto,
            libc::SYS_tgkill,
            libc::SYS_ioctl,
            libc::SYS_mincore,
            libc::SYS_read,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_statx,
            libc::SYS_fcntl,
        ],
    };
    let threads: &[i64] = match class {
        ThreadClass::Control | ThreadClass::Migration => POSTCOPY_THREADS,
        _ => &[],
    };
    COMMON.iter().chain(own).chain(threads).copied().collect()
}

/// A post-copy thread started under its starter's filter (the source's
/// answer thread from the control thread, a recovered receiver from the
/// destination's follower), at a higher priority.
const POSTCOPY_THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_setpriority,
];

const KVMIO: c_uint = 0xAE;
const UFFDIO: c_uint = 0xAA;

const fn io(ty: c_uint, nr: c_uint) -> u64 {
    ioctl_expr(_IOC_NONE, ty, nr, 0) as u64
}
const fn ior<T>(ty: c_uint, nr: c_uint) -> u64 {
    ioctl_expr(_IOC_READ, ty, nr, std::mem::size_of::<T>() as c_uint) as u64
}
const fn iow<T>(ty: c_uint, nr: c_uint) -> u64 {
    ioctl_expr(_IOC_WRITE, ty, nr, std::mem::size_of::<T>() as c_uint) as u64
}
const fn iowr<T>(ty: c_uint, nr: c_uint) -> u64 {
    ioctl_expr(
        _IOC_READ | _IOC_WRITE,
        ty,
        nr,
        std::mem::size_of::<T>() as c_uint,
    ) as u64
}

/// userfaultfd ioctl argument layouts (uapi `linux/userfaultfd.h`).
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
pub const UFFDIO_REGISTER: u64 = iowr::<UffdioRegister>(UFFDIO, 0x00);
pub const UFFDIO_UNREGISTER: u64 = ior::<UffdioRange>(UFFDIO, 0x01);
pub const UFFDIO_WAKE: u64 = ior::<UffdioRange>(UFFDIO, 0x02);
/// The two installs, as the fault path issues them.
pub const UFFDIO_COPY: u64 = crate::fault::uffd::UFFDIO_COPY;
pub const UFFDIO_ZEROPAGE: u64 = crate::fault::uffd::UFFDIO_ZEROPAGE;

/// `KVM_RESET_DIRTY_RINGS` (`--dirty-log ring`): after a harvest.
const KVM_RESET_DIRTY_RINGS: u64 = io(KVMIO, 0xc7);

/// The fault engine's ioctls (any thread that serves a fault).
const FAULT_IOCTLS: &[u64] = &[UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE];

/// What a vCPU thread issues: its own vCPU ioctls, the fault engine's, and
/// memslot changes a device may make on the bus path.
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::{
        kvm_debugregs, kvm_guest_debug, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
        kvm_sregs, kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    let mut v = vec![
        io(KVMIO, 0x80), // KVM_RUN
        ior::<kvm_regs>(KVMIO, 0x81),
        iow::<kvm_regs>(KVMIO, 0x82),
        ior::<kvm_sregs>(KVMIO, 0x83),
        iow::<kvm_sregs>(KVMIO, 0x84),
        iowr::<kvm_translation>(KVMIO, 0x85), // a fetch fault's RIP
        iowr::<kvm_msrs>(KVMIO, 0x88),
        iow::<kvm_msrs>(KVMIO, 0x89),
        iow::<kvm_guest_debug>(KVMIO, 0x9b),
        ior::<kvm_vcpu_events>(KVMIO, 0x9f),
        iow::<kvm_vcpu_events>(KVMIO, 0xa0),
        // A snapshot: each vCPU saves its own state while parked.
        ior::<kvm_mp_state>(KVMIO, 0x98),
        ior::<kvm_xsave>(KVMIO, 0xa4),
        ior::<kvm_xcrs>(KVMIO, 0xa6),
        ior::<kvm_lapic_state>(KVMIO, 0x8e),
        ior::<kvm_debugregs>(KVMIO, 0xa1),
        io(KVMIO, 0xa3),       // KVM_GET_TSC_KHZ
        KVM_RESET_DIRTY_RINGS, // a full dirty ring's harvest
    ];
    v.extend_from_slice(&memslot_ioctls());
    v.extend_from_slice(FAULT_IOCTLS);
    v
}

/// Memory changes a device makes (virtio-mem's slices come and go as
/// memslots registered with userfaultfd), on whichever thread serves it.
fn memslot_ioctls() -> [u64; 3] {
    [
        iow::<kvm_bindings::kvm_userspace_memory_region>(KVMIO, 0x46),
        UFFDIO_REGISTER,
        UFFDIO_UNREGISTER,
    ]
}

/// Terminal requests (`isatty`, `tcgetattr`, `tcsetattr` with each of its
/// actions): the main thread puts the console back as it found it.
const TERMINAL_IOCTLS: &[u64] = &[libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF];

/// `ioctl` request numbers a class may issue; `None`: `ioctl` is not in
/// its list at all (see [`allowed`]).
fn ioctls(class: ThreadClass) -> Option<Vec<u64>> {
    let mut v = match class {
        ThreadClass::Vcpu => return Some(vcpu_ioctls()),
        ThreadClass::Handler => return Some(FAULT_IOCTLS.to_vec()),
        ThreadClass::Signals => return None,
        // Device work: queue processing serves its own missing pages and
        // virtio-mem adds and removes memslots.
        ThreadClass::Events => memslot_ioctls().to_vec(),
        // tokio/mio make each accepted socket non-blocking (FIONBIO); a
        // request that reads guest memory serves its own missing pages.
        ThreadClass::Api | ThreadClass::Metrics | ThreadClass::Migration => vec![libc::FIONBIO],
        ThreadClass::Main => TERMINAL_IOCTLS.to_vec(),
        // The VM's in-kernel state, for a snapshot; KVM's dirty log, for
        // a diff snapshot (turned on on each memslot by registering it
        // again with the flag, read and cleared by KVM_GET_DIRTY_LOG).
        ThreadClass::Control => vec![
            iowr::<kvm_bindings::kvm_irqchip>(KVMIO, 0x62), // KVM_GET_IRQCHIP
            ior::<kvm_bindings::kvm_clock_data>(KVMIO, 0x7c), // KVM_GET_CLOCK
            ior::<kvm_bindings::kvm_pit_state2>(KVMIO, 0x9f), // KVM_GET_PIT2
            iow::<kvm_bindings::kvm_userspace_memory_region>(KVMIO, 0x46),
            iow::<kvm_bindings::kvm_dirty_log>(KVMIO, 0x42), // KVM_GET_DIRTY_LOG
            KVM_RESET_DIRTY_RINGS,                           // or its rings' (`--dirty-log ring`)
        ],
    };
    v.extend_from_slice(FAULT_IOCTLS);
    Some(v)
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: a plain sigaction with an async-signal-safe handler.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    })
    .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e)))
}

/// `siginfo_t` for SIGSYS (`_sigsys` of the union): the call's number.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: u64,
    syscall: i32,
    arch: u32,
}

/// Format `v` in decimal or hex into `buf` from `at`; returns the new end.
fn put_num(buf: &mut [u8], mut at: usize, v: u64, hex: bool) -> usize {
    let base = if hex { 16 } else { 10 };
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut x = v;
    loop {
        let d = (x % base) as u8;
        digits[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        n += 1;
        x /= base;
        if x == 0 {
            break;
        }
    }
    if hex && at + 2 <= buf.len() {
        buf[at..at + 2].copy_from_slice(b"0x");
        at += 2;
    }
    while n > 0 && at < buf.len() {
        n -= 1;
        buf[at] = digits[n];
        at += 1;
    }
    at
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    let n = s.len().min(buf.len() - at);
    buf[at..at + n].copy_from_slice(&s[..n]);
    at + n
}

/// The report line, built without allocating (signal context).
pub fn report_line(buf: &mut [u8; 192], class: &str, nr: u64, a0: u64, a1: u64) -> usize {
    let mut at = put(buf, 0, b"vmm: seccomp: the ");
    at = put(buf, at, class.as_bytes());
    at = put(buf, at, b" thread made a forbidden system call: number ");
    at = put_num(buf, at, nr, false);
    at = put(buf, at, b" (args ");
    at = put_num(buf, at, a0, true);
    at = put(buf, at, b", ");
    at = put_num(buf, at, a1, true);
    at = put(buf, at, b"); ending the VMM\n");
    at
}

extern "C" fn on_sigsys(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo (the `_sigsys` layout) and
    // this thread's ucontext; both are valid for the handler's duration.
    let (nr, a0, a1) = unsafe {
        let i = &*(info as *const SigsysInfo);
        let uc = &*(ctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        (
            i.syscall as u64,
            g[libc::REG_RDI as usize] as u64,
            g[libc::REG_RSI as usize] as u64,
        )
    };
    let class = CLASS
        .with(|c| c.get())
        .map_or("unfiltered", ThreadClass::name);
    let mut buf = [0u8; 192];
    let n = report_line(&mut buf, class, nr, a0, a1);
    // SAFETY: write(2) and _exit(2) are async-signal-safe and on every
    // class's list.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles() {
        for c in [
            ThreadClass::Vcpu,
            ThreadClass::Events,
            ThreadClass::Handler,
            ThreadClass::Api,
            ThreadClass::Control,
            ThreadClass::Metrics,
            ThreadClass::Signals,
            ThreadClass::Main,
        ] {
            let p = program(c, SeccompAction::Trap).unwrap();
            assert!(p.len() > 10, "{c:?}");
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values from the uapi headers (x86_64).
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(vcpu_ioctls()[0], 0xae80);
        assert_eq!(vcpu_ioctls()[1], 0x8090_ae81); // KVM_GET_REGS
    }

    /// Fork; in the child install `class`'s filter built with `mismatch`,
    /// make `syscall`, exit 0 if it returned. Returns the
    /// child's wait status and what it wrote to stderr.
    /// Arguments as for openat(AT_FDCWD, path, O_WRONLY); the other calls
    /// tested ignore or reject them.
    fn open_args() -> [u64; 3] {
        [
            libc::AT_FDCWD as u64,
            c"/nonexistent-vmm-test".as_ptr() as u64,
            libc::O_WRONLY as u64,
        ]
    }

    /// `ioctl(-1, request)`: fails with EBADF if the filter lets it through.
    fn ioctl_args(request: u64) -> [u64; 3] {
        [u64::MAX, request, 0]
    }

    fn in_child(
        class: ThreadClass,
        mismatch: SeccompAction,
        syscall: i64,
        args: [u64; 3],
    ) -> (i32, String) {
        let trap = mismatch == SeccompAction::Trap;
        let program = program(class, mismatch).unwrap();
        if trap {
            install_sigsys_handler().unwrap();
        }
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a local array; fork(2) whose child only
        // makes async-signal-safe calls (dup2, prctl/seccomp, the system
        // call under test, write, _exit) and never returns.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                libc::dup2(fds[1], 2);
                if install(&program, class, trap).is_err() {
                    libc::_exit(3);
                }
                libc::syscall(syscall, args[0], args[1], args[2]);
                libc::_exit(0);
            }
            libc::close(fds[1]);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            let mut buf = [0u8; 512];
            let n = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
            libc::close(fds[0]);
            (
                status,
                String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned(),
            )
        }
    }

    #[test]
    fn a_forbidden_call_ends_the_process_with_a_report() {
        // A vCPU thread has no business opening sockets.
        let (status, err) = in_child(
            ThreadClass::Vcpu,
            SeccompAction::Trap,
            libc::SYS_socket,
            open_args(),
        );
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{err}");
        assert!(
            err.contains("the vcpu thread made a forbidden system call: number 41"),
            "{err}"
        );
        // A write-mode open is refused too.
        let (status, err) = in_child(
            ThreadClass::Events,
            SeccompAction::Trap,
            libc::SYS_openat,
            open_args(),
        );
        assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{err}");
        // An allowed call goes through.
        let (status, err) = in_child(
            ThreadClass::Vcpu,
            SeccompAction::Trap,
            libc::SYS_gettid,
            open_args(),
        );
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{err}"
        );
    }

    /// Each class's ioctl list: what the class issues goes through, another
    /// class's request ends the process (the report shows the request).
    #[test]
    fn ioctl_requests_are_limited_per_class() {
        let run = ioctl_args(0xae80); // KVM_RUN
        let memslot = ioctl_args(memslot_ioctls()[0]);
        let cases = [
            (ThreadClass::Api, ioctl_args(libc::FIONBIO), true),
            (ThreadClass::Api, run, false),
            // Only the control thread reads the irqchip (a snapshot).
            (ThreadClass::Control, ioctl_args(0xc208_ae62), true),
            (ThreadClass::Control, run, false),
            (ThreadClass::Api, ioctl_args(0xc208_ae62), false),
            (ThreadClass::Metrics, memslot, false),
            (ThreadClass::Events, memslot, true),
            (ThreadClass::Events, ioctl_args(UFFDIO_COPY), true),
            (ThreadClass::Events, ioctl_args(libc::TCSETS), false),
            (ThreadClass::Main, ioctl_args(libc::TCSETS), true),
            (ThreadClass::Main, run, false),
            (ThreadClass::Handler, memslot, false),
            (ThreadClass::Vcpu, run, true),
            (ThreadClass::Signals, ioctl_args(libc::FIONBIO), false),
        ];
        for (class, args, allowed) in cases {
            let (status, err) = in_child(class, SeccompAction::Trap, libc::SYS_ioctl, args);
            let what = format!(
                "{} ioctl {:#x}: status {status:#x} {err}",
                class.name(),
                args[1]
            );
            assert!(libc::WIFEXITED(status), "{what}");
            if allowed {
                assert_eq!(libc::WEXITSTATUS(status), 0, "{what}");
            } else {
                assert_eq!(libc::WEXITSTATUS(status), 128 + libc::SIGSYS, "{what}");
                let shown = format!("number 16 (args 0xffffffffffffffff, {:#x})", args[1]);
                assert!(err.contains(&shown), "{what}");
            }
        }
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let (status, err) = in_child(
            ThreadClass::Vcpu,
            SeccompAction::Log,
            libc::SYS_socket,
            open_args(),
        );
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{err}"
        );
    }

    #[test]
    fn the_report_names_thread_and_call() {
        let mut buf = [0u8; 192];
        let n = report_line(&mut buf, "vcpu", 41, 2, 0x10);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "vmm: seccomp: the vcpu thread made a forbidden system call: number 41 (args 0x2, 0x10); ending the VMM\n"
        );
    }
}
