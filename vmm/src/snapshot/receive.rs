//! The destination of a live migration: listen where the user said,
//! accept one connection, authenticate it, receive pages into a sparse
//! file indexed by guest-physical address, then the VM's state; the VM is
//! restored from them like a snapshot (its RAM served lazily from that
//! file by the fault engine, or copied first), the source is told `Ready`,
//! and the VM runs once the source says `Go` (it has stopped its copy).
//! The file is unlinked as soon as it is open: nothing is left behind.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::postcopy::Arrivals;
use super::restore::Loaded;
use super::stream::{Addr, Channel, Key, Listener, Msg, StreamError, VmState};
use crate::config::IncomingOptions;
use crate::memory::snapshot::check_layout;
use crate::memory::{ImageFile, Redirect, PAGE_SIZE};
use crate::seccomp::{SeccompMode, ThreadClass};

/// How long the source may be silent between frames.
const IDLE: Duration = Duration::from_secs(60);
/// Highest guest-physical address a page may be sent for (1 TiB).
const GPA_LIMIT: u64 = 1 << 40;

#[derive(Debug, Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the source sent {0} before the VM's state")]
    Unexpected(&'static str),
    #[error("the stream is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the source gave up: {0}")]
    SourceFailed(String),
    #[error("the source did not say Go ({0}): its VM may still run, this one does not")]
    NoGo(String),
}

/// A VM received, not yet running.
pub struct Received {
    channel: Channel,
    state: Option<VmState>,
    image: Arc<ImageFile>,
    /// Post-copy: the pages still at the source (their answers are
    /// received already, for the restore's own reads).
    pub postcopy: Option<Arc<Arrivals>>,
    addr: Addr,
    key: Key,
    seccomp: SeccompMode,
}

/// Receive one migration (see the module docs).
/// (`seccomp`: the filter of its post-copy threads.)
pub fn receive(o: &IncomingOptions, seccomp: SeccompMode) -> Result<Received, ReceiveError> {
    let addr: Addr = o.addr.parse()?;
    let key = Key::load(&o.key_file)?;
    let listener = Listener::bind(&addr)?;
    eprintln!("vmm: waiting for a migration on {addr}");
    let (mut ch, urgent, peer) = listener.accept_session(&key, IDLE)?;
    // One session only: nobody else gets in after it.
    drop(listener);
    let t0 = Instant::now();
    eprintln!("vmm: migration from {peer}: authenticated, receiving");
    let path = std::env::temp_dir().join(format!("vmm-incoming-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| ReceiveError::File {
            what: "creating",
            path: path.clone(),
            source,
        })?;
    let r = receive_into(&mut ch, &file, &path, t0);
    let _ = std::fs::remove_file(&path);
    match r {
        Ok((state, image, postcopy)) => {
            if let Some(p) = &postcopy {
                answer_on(p, urgent, Some(seccomp))?;
            }
            Ok(Received {
                channel: ch,
                state: Some(state),
                image,
                postcopy,
                addr,
                key,
                seccomp,
            })
        }
        Err(e) => {
            let _ = ch.send(&Msg::Failed(e.to_string()));
            Err(e)
        }
    }
}

/// Requests of `a` go on `urgent`, its answers are received by a thread.
/// (`seccomp`: the filter for the thread, `None` when the caller's is
/// inherited: a confined thread may not install another.)
fn answer_on(
    a: &Arc<Arrivals>,
    urgent: Channel,
    seccomp: Option<SeccompMode>,
) -> Result<(), ReceiveError> {
    let (tx, rx) = urgent.split();
    let epoch = a.connect(tx);
    let a = a.clone();
    spawn_migration_thread("postcopy-urgent", seccomp, a.clone(), move || {
        a.receive_answers(rx, epoch)
    })
}

/// A thread of the destination's post-copy, confined (`Migration`).
fn spawn_migration_thread(
    name: &str,
    seccomp: Option<SeccompMode>,
    a: Arc<Arrivals>,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), ReceiveError> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(Err(e)) = seccomp.map(|s| crate::seccomp::apply(s, ThreadClass::Migration))
            {
                a.end(&e.to_string());
                return;
            }
            f()
        })
        .map(|_| ())
        .map_err(|source| ReceiveError::File {
            what: "starting a thread for",
            path: name.into(),
            source,
        })
}

type Got = (VmState, Arc<ImageFile>, Option<Arc<Arrivals>>);

fn receive_into(
    ch: &mut Channel,
    file: &File,
    path: &std::path::Path,
    t0: Instant,
) -> Result<Got, ReceiveError> {
    let werr = |source| ReceiveError::File {
        what: "writing",
        path: path.to_path_buf(),
        source,
    };
    let mut data = BTreeSet::new();
    let (mut frames, mut pages) = (0u64, 0u64);
    let mut pending = None;
    let state = loop {
        match ch.recv()? {
            Msg::Pages { gpas, data: bytes } => {
                let mut at = 0;
                for (gpa, has) in gpas {
                    if gpa >= GPA_LIMIT {
                        return Err(ReceiveError::Inconsistent(format!("a page at {gpa:#x}")));
                    }
                    if has {
                        file.write_all_at(&bytes[at..at + PAGE_SIZE as usize], gpa)
                            .map_err(werr)?;
                        at += PAGE_SIZE as usize;
                        data.insert(gpa);
                    } else if data.remove(&gpa) {
                        punch_hole(file, gpa).map_err(werr)?;
                    }
                    pages += 1;
                }
                frames += 1;
            }
            Msg::Postcopy { pending: p } => {
                for &(gpa, n) in &p {
                    if gpa >= GPA_LIMIT || n > GPA_LIMIT / PAGE_SIZE {
                        return Err(ReceiveError::Inconsistent(format!(
                            "{n} pending pages at {gpa:#x}"
                        )));
                    }
                    for i in 0..n {
                        data.insert(gpa + i * PAGE_SIZE);
                    }
                }
                pending = Some(p);
            }
            Msg::State(s) => break *s,
            Msg::Failed(why) => return Err(ReceiveError::SourceFailed(why)),
            m => return Err(ReceiveError::Unexpected(m.name())),
        }
    };
    eprintln!(
        "vmm: migration received: {pages} pages in {frames} frames, {} MiB of data, in {:.1} s",
        (data.len() as u64 * PAGE_SIZE) >> 20,
        t0.elapsed().as_secs_f64()
    );
    let total: u64 = state.layout.iter().map(|s| s.size).sum();
    check_layout(&state.layout, total).map_err(|e| ReceiveError::Inconsistent(e.to_string()))?;
    // The layout's data pages are exactly the pages received.
    let mut listed = 0u64;
    for s in &state.layout {
        for p in (0..s.pages()).filter(|&p| s.has_data(p)) {
            if !data.contains(&(s.gpa + p * PAGE_SIZE)) {
                return Err(ReceiveError::Inconsistent(format!(
                    "page {:#x} holds data but was never sent",
                    s.gpa + p * PAGE_SIZE
                )));
            }
            listed += 1;
        }
    }
    if listed != data.len() as u64 {
        return Err(ReceiveError::Inconsistent(format!(
            "{} pages received, the layout lists {listed}",
            data.len()
        )));
    }
    // The memory "file" of the layout, slot after slot, read from where
    // each slot's pages are: at their GPA.
    let end = state
        .layout
        .iter()
        .map(|s| s.gpa + s.size)
        .max()
        .unwrap_or(0);
    file.set_len(end.max(total)).map_err(werr)?;
    let postcopy = match pending {
        Some(p) => {
            let w = file.try_clone().map_err(werr)?;
            let a = Arrivals::new(w, end, &p).map_err(ReceiveError::Inconsistent)?;
            eprintln!(
                "vmm: post-copy: {} pages ({} MiB) come while the VM runs",
                a.left(),
                (a.left() * PAGE_SIZE) >> 20
            );
            Some(Arc::new(a))
        }
        None => None,
    };
    let below = match &postcopy {
        Some(a) => ImageFile::open_arriving(path, end, a.clone()),
        None => ImageFile::open(path, end),
    }
    .map_err(|e| ReceiveError::Inconsistent(e.to_string()))?;
    let redirects = state
        .layout
        .iter()
        .map(|s| Redirect {
            offset: s.offset,
            len: s.size,
            at: s.gpa,
        })
        .collect();
    let image = ImageFile::open_over(path, total, below, redirects)
        .map_err(|e| ReceiveError::Inconsistent(e.to_string()))?;
    Ok((state, image, postcopy))
}

fn punch_hole(file: &File, gpa: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            gpa as libc::off_t,
            PAGE_SIZE as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Received {
    /// What a restore reads (taken once).
    pub fn loaded(&mut self) -> Loaded {
        let s = self.state.take().expect("the state is taken once");
        let data_bytes = s.layout.iter().map(|l| l.data_pages()).sum::<u64>() * PAGE_SIZE;
        Loaded {
            reader: None,
            memory: vmm_snapshot::MemoryFile {
                bytes: s.layout.iter().map(|l| l.size).sum(),
                data_bytes,
                crc32: 0,
            },
            record: s.record,
            vm: s.vm,
            devices: s.devices,
            vcpus: s.vcpus,
            layout: s.layout,
            image: self.image.clone(),
            bases: Vec::new(),
        }
    }

    /// Tell the source the VM is restored, and wait until it has stopped
    /// its own (`Go`).
    pub fn ready_then_go(&mut self) -> Result<(), ReceiveError> {
        self.channel.send(&Msg::Ready)?;
        self.channel.set_timeout(Some(IDLE));
        match self.channel.recv() {
            Ok(Msg::Go) => Ok(()),
            Ok(Msg::Failed(why)) => Err(ReceiveError::SourceFailed(why)),
            Ok(_) => Err(ReceiveError::NoGo("another message".into())),
            Err(e) => Err(ReceiveError::NoGo(e.to_string())),
        }
    }

    /// Post-copy, once the VM runs: a thread receives the pushed pages
    /// until the source is done, says `Complete`; when a connection
    /// breaks it listens again where the migration came for a recovery.
    pub fn follow(self) -> Result<(), ReceiveError> {
        let Some(a) = self.postcopy.clone() else {
            return Ok(());
        };
        let (ch, addr, key, seccomp) = (self.channel, self.addr, self.key, self.seccomp);
        spawn_migration_thread("postcopy", Some(seccomp), a.clone(), move || {
            follow_postcopy(&a, ch, &addr, &key)
        })
    }

    /// Tell the source the restore failed (it runs on).
    pub fn fail(&mut self, why: &str) {
        let _ = self.channel.send(&Msg::Failed(why.to_string()));
    }
}

/// Pushed pages until `Done`, and recoveries (see [`Received::follow`]).
fn follow_postcopy(a: &Arc<Arrivals>, mut ch: Channel, addr: &Addr, key: &Key) {
    loop {
        match pushes(a, &mut ch) {
            Ok(()) => return,
            Err(why) => a.lost(&why),
        }
        drop(ch);
        ch = loop {
            if a.is_ended() {
                return;
            }
            match recover(a, addr, key) {
                Ok(c) => break c,
                Err(e) => {
                    eprintln!("vmm: post-copy: a recovery on {addr} failed: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
    }
}

fn pushes(a: &Arrivals, ch: &mut Channel) -> Result<(), String> {
    ch.rx.set_timeout(None);
    loop {
        match ch.recv() {
            Ok(Msg::Pages { gpas, data }) => a.arrived(&gpas, &data, false)?,
            Ok(Msg::Done) => {
                if !a.wait_all(IDLE) {
                    return Err(format!(
                        "the source said it sent everything, {} pages are missing",
                        a.left()
                    ));
                }
                ch.send(&Msg::Complete).map_err(|e| e.to_string())?;
                let s = a.status();
                eprintln!(
                    "vmm: post-copy complete in {:.2} s: {} pages pending at the start, {} asked for in {} requests (latency p50 {:.0} us, p99 {:.0} us), {} pushed",
                    s.elapsed_s,
                    s.pages_pending_at_start,
                    s.pages_requested,
                    s.requests,
                    s.request_latency_p50_us.unwrap_or(0.0),
                    s.request_latency_p99_us.unwrap_or(0.0),
                    s.pages_pushed
                );
                return Ok(());
            }
            Ok(Msg::Failed(why)) => return Err(format!("the source gave up: {why}")),
            Ok(m) => return Err(format!("the source sent {}", m.name())),
            Err(e) => return Err(format!("the main connection: {e}")),
        }
    }
}

/// Listen at `addr` again for the source's `migrate recover`: tell it what
/// is still missing, ask again what was asked.
fn recover(a: &Arc<Arrivals>, addr: &Addr, key: &Key) -> Result<Channel, ReceiveError> {
    let listener = Listener::bind(addr)?;
    eprintln!("vmm: post-copy: waiting for 'vmm ctl migrate recover --to {addr}' on the source");
    let (mut ch, urgent, peer) = listener.accept_session(key, IDLE)?;
    drop(listener);
    match ch.recv()? {
        Msg::Recover => {}
        m => return Err(ReceiveError::Unexpected(m.name())),
    }
    ch.send(&Msg::Postcopy {
        pending: a.missing_runs(),
    })?;
    answer_on(a, urgent, None)?;
    eprintln!(
        "vmm: post-copy resumed from {peer}: {} pages to go",
        a.left()
    );
    Ok(ch)
}
