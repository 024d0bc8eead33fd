//! The live-migration stream: where it goes (`tcp:HOST:PORT`,
//! `unix:PATH`), the pre-shared-key handshake, authenticated frames, and
//! the messages.
//!
//! **Authentication**: both sides hold the same key file (at least 16
//! bytes, readable by its owner only). The handshake exchanges two random
//! nonces and proves with HMAC-SHA256 that each side has the key (the
//! destination first, so a source never streams a VM to a stranger); every
//! frame after it carries an HMAC-SHA256 over its sequence number,
//! direction and payload under a key derived from both nonces, so a frame
//! altered, replayed, reordered or injected is refused. The stream is not
//! encrypted: on an untrusted network, carry it in a tunnel (ssh, WireGuard,
//! stunnel). Why a key and not TLS: one file to provision on two hosts of
//! one operator, no certificate authority, and no TLS stack in a process
//! that holds guest memory; QEMU offers TLS (x509 or PSK) for the same
//! purpose, Cloud Hypervisor no authentication at all.
//!
//! **Frames**: a length (u32 LE, at most 64 MiB), the payload (a
//! [`Msg`] in the snapshot format's bincode), the 32-byte MAC. Nothing is
//! decoded before its MAC is checked.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use super::{DevicesSnapshot, VcpuSnapshot, VmRecord, VmSnapshot};
use crate::memory::snapshot::SlotImage;

type HmacSha256 = Hmac<Sha256>;

/// The stream's version; both sides must speak it.
pub const VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"vmm-mig\x01";
const NONCE: usize = 32;
const MAC: usize = 32;
/// Largest frame payload (a batch of pages, or the VM's state).
pub const MAX_FRAME: usize = 64 << 20;
/// Shortest key file.
const MIN_KEY: usize = 16;

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("{0}: expected tcp:HOST:PORT or unix:PATH")]
    BadAddr(String),
    #[error("key file {path}: {why}")]
    Key { path: PathBuf, why: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the peer is not a vmm migration stream (bad magic)")]
    NotAStream,
    #[error("the peer speaks migration stream version {0}, this vmm {VERSION}")]
    Version(u32),
    #[error("authentication failed: {0}")]
    Auth(&'static str),
    #[error("frame of {0} bytes, more than the {MAX_FRAME} a frame may have")]
    TooLarge(usize),
    #[error("a frame's MAC does not match (altered, replayed or not from the peer): refused")]
    BadMac,
    #[error("a frame does not decode: {0}")]
    Decode(String),
    #[error("the peer closed the stream")]
    Closed,
    #[error("the second connection does not belong to this migration: refused")]
    NotJoined,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            StreamError::Closed
        } else {
            StreamError::Io { what, source }
        }
    }
}

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = StreamError;
    fn from_str(s: &str) -> Result<Self, StreamError> {
        match s.split_once(':') {
            Some(("tcp", hp))
                if hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Addr::Tcp(hp.to_string()))
            }
            Some(("unix", p)) if !p.is_empty() => Ok(Addr::Unix(PathBuf::from(p))),
            _ => Err(StreamError::BadAddr(s.to_string())),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(hp) => write!(f, "tcp:{hp}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The pre-shared key.
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// Read a key file: at least 16 bytes (one trailing newline dropped),
    /// readable and writable by its owner only.
    pub fn load(path: &Path) -> Result<Key, StreamError> {
        let bad = |why: String| StreamError::Key {
            path: path.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "mode {:o}: a key must be its owner's only (chmod 600)",
                meta.permissions().mode() & 0o777
            )));
        }
        let mut bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.len() < MIN_KEY {
            return Err(bad(format!(
                "{} bytes, a key has at least {MIN_KEY} (e.g. head -c 32 /dev/urandom | base64)",
                bytes.len()
            )));
        }
        Ok(Key(bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Key {
        Key(bytes.to_vec())
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; MAC] {
        mac_with(&self.0, parts)
    }
}

fn mac_with(key: &[u8], parts: &[&[u8]]) -> [u8; MAC] {
    // HMAC takes a key of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn nonce() -> Result<[u8; NONCE], StreamError> {
    let mut n = [0u8; NONCE];
    // SAFETY: getrandom(2) fills the buffer it is given.
    let r = unsafe { libc::getrandom(n.as_mut_ptr().cast(), NONCE, 0) };
    if r != NONCE as isize {
        return Err(StreamError::Io {
            what: "getrandom",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(n)
}

/// A connection, TCP or Unix.
pub trait Conn: Read + Write + Send {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn shutdown(&self);
    /// The same connection on a second descriptor (one thread sends while
    /// another receives).
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>>;
}

impl Conn for TcpStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Conn for UnixStream {
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// What goes over an authenticated stream.
#[derive(Serialize, Deserialize)]
pub enum Msg {
    /// Source → destination: pages, each at its GPA: `Some` its content
    /// (in `data`, in order), `None` a hole.
    Pages {
        gpas: Vec<(u64, bool)>,
        /// One copy, not a sequence of bytes (measured by hand: a 64 KiB
        /// answer took ~100 µs more to encode and decode byte by byte).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Source → destination: the VM, stopped: restore it and say `Ready`.
    State(Box<VmState>),
    /// Destination → source: restored and not running; waiting for `Go`.
    Ready,
    /// Source → destination: the source has stopped its VM: run it.
    Go,
    /// Either side: it gives up, and why.
    Failed(String),
    /// Source → destination, first frame of the second (urgent)
    /// connection: the main connection's [`Channel::token`], which binds
    /// it to that session.
    Join([u8; MAC]),
    /// Source → destination, post-copy, before the state: these runs of
    /// pages `(gpa, pages)` hold data the destination does not have yet;
    /// the source pushes them after `Go`, and serves any of them asked for
    /// on the urgent connection first. (Also the destination's answer to
    /// `Recover`: what it still lacks.)
    Postcopy { pending: Vec<(u64, u64)> },
    /// Destination → source, urgent connection: send these pages now.
    Request { gpa: u64, pages: u64 },
    /// Source → destination: every pending page has been pushed.
    Done,
    /// Destination → source: every page is here; the source may end.
    Complete,
    /// Source → destination, first frame of a main connection that
    /// resumes a post-copy whose connection broke (`migrate recover`).
    Recover,
}

impl Msg {
    /// Its name, for an error about an unexpected one.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Pages { .. } => "pages",
            Msg::State(_) => "the state",
            Msg::Ready => "Ready",
            Msg::Go => "Go",
            Msg::Failed(_) => "Failed",
            Msg::Join(_) => "Join",
            Msg::Postcopy { .. } => "Postcopy",
            Msg::Request { .. } => "a request",
            Msg::Done => "Done",
            Msg::Complete => "Complete",
            Msg::Recover => "Recover",
        }
    }
}

/// Everything of a stopped VM but its pages.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub record: VmRecord,
    pub vm: VmSnapshot,
    pub devices: DevicesSnapshot,
    pub vcpus: Vec<VcpuSnapshot>,
    pub layout: Vec<SlotImage>,
}

/// An authenticated stream: its sending and receiving halves (which may
/// go to different threads, [`Channel::split`]).
pub struct Channel {
    pub tx: Sender,
    pub rx: Receiver,
    /// Binds a second connection to this session ([`Msg::Join`]).
    token: [u8; MAC],
}

/// The sending half of a [`Channel`].
pub struct Sender {
    conn: Box<dyn Conn>,
    key: [u8; MAC],
    /// This side's direction byte (1: source, 2: destination).
    me: u8,
    sent: u64,
}

/// The receiving half of a [`Channel`].
pub struct Receiver {
    conn: Box<dyn Conn>,
    key: [u8; MAC],
    /// The peer's direction byte.
    peer: u8,
    received: u64,
}

/// A frame's payload up to this size goes out in one write with its
/// length and MAC (one segment for a request or a small reply).
const ONE_WRITE: usize = 64 << 10;

impl Sender {
    pub fn send(&mut self, msg: &Msg) -> Result<(), StreamError> {
        let payload = vmm_snapshot::encode(msg);
        if payload.len() > MAX_FRAME {
            return Err(StreamError::TooLarge(payload.len()));
        }
        let len = (payload.len() as u32).to_le_bytes();
        let mac = mac_with(
            &self.key,
            &[&self.sent.to_le_bytes(), &[self.me], &len, &payload],
        );
        self.sent += 1;
        let w = &mut self.conn;
        if payload.len() <= ONE_WRITE {
            let mut frame = Vec::with_capacity(4 + payload.len() + MAC);
            frame.extend_from_slice(&len);
            frame.extend_from_slice(&payload);
            frame.extend_from_slice(&mac);
            return w.write_all(&frame).map_err(io("sending"));
        }
        w.write_all(&len)
            .and_then(|_| w.write_all(&payload))
            .and_then(|_| w.write_all(&mac))
            .map_err(io("sending"))
    }

    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}

impl Receiver {
    pub fn recv(&mut self) -> Result<Msg, StreamError> {
        let mut len = [0u8; 4];
        self.conn.read_exact(&mut len).map_err(io("receiving"))?;
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(StreamError::TooLarge(n));
        }
        let mut payload = vec![0u8; n];
        self.conn
            .read_exact(&mut payload)
            .map_err(io("receiving"))?;
        let mut mac = [0u8; MAC];
        self.conn.read_exact(&mut mac).map_err(io("receiving"))?;
        let want = mac_with(
            &self.key,
            &[&self.received.to_le_bytes(), &[self.peer], &len, &payload],
        );
        if !same(&mac, &want) {
            return Err(StreamError::BadMac);
        }
        self.received += 1;
        decode_msg(&payload)
    }

    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.conn.set_timeout(t);
    }

    pub fn shutdown(&self) {
        self.conn.shutdown();
    }
}

impl Channel {
    /// Connect to a destination and authenticate (the source's side).
    pub fn connect(addr: &Addr, key: &Key, timeout: Duration) -> Result<Channel, StreamError> {
        let conn: Box<dyn Conn> = match addr {
            Addr::Tcp(hp) => {
                let s = TcpStream::connect(hp).map_err(io("connecting"))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Addr::Unix(p) => Box::new(UnixStream::connect(p).map_err(io("connecting"))?),
        };
        conn.set_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        let mut conn = conn;
        let mine = nonce()?;
        let mut hello = Vec::with_capacity(44);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&mine);
        conn.write_all(&hello).map_err(io("sending hello"))?;
        let mut reply = [0u8; 8 + 4 + NONCE + MAC];
        conn.read_exact(&mut reply).map_err(|_| {
            StreamError::Auth(
                "the destination closed the stream (a wrong key, or it accepts one migration only)",
            )
        })?;
        let theirs = check_hello(&reply[..44])?;
        let proof = key.mac(&[b"destination", &mine, &theirs]);
        if !same(&proof, &reply[44..]) {
            return Err(StreamError::Auth("the destination does not hold the key"));
        }
        conn.write_all(&key.mac(&[b"source", &mine, &theirs]))
            .map_err(io("sending proof"))?;
        Channel::new(conn, key.mac(&[b"session", &mine, &theirs]), 1)
    }

    /// Authenticate a source on an accepted connection (the
    /// destination's side).
    pub fn accept(
        mut conn: Box<dyn Conn>,
        key: &Key,
        timeout: Duration,
    ) -> Result<Channel, StreamError> {
        conn.set_timeout(Some(timeout))
            .map_err(io("setting a timeout"))?;
        let mut hello = [0u8; 44];
        conn.read_exact(&mut hello).map_err(io("reading hello"))?;
        let theirs = check_hello(&hello)?;
        let mine = nonce()?;
        let mut reply = Vec::with_capacity(76);
        reply.extend_from_slice(MAGIC);
        reply.extend_from_slice(&VERSION.to_le_bytes());
        reply.extend_from_slice(&mine);
        reply.extend_from_slice(&key.mac(&[b"destination", &theirs, &mine]));
        conn.write_all(&reply).map_err(io("sending challenge"))?;
        let mut proof = [0u8; MAC];
        conn.read_exact(&mut proof).map_err(|_| {
            StreamError::Auth("the source sent no proof (its key is not this one): refused")
        })?;
        if !same(&proof, &key.mac(&[b"source", &theirs, &mine])) {
            conn.shutdown();
            return Err(StreamError::Auth(
                "the source does not hold the key: refused",
            ));
        }
        Channel::new(conn, key.mac(&[b"session", &theirs, &mine]), 2)
    }

    fn new(conn: Box<dyn Conn>, key: [u8; MAC], me: u8) -> Result<Channel, StreamError> {
        let rx = conn.try_clone_conn().map_err(io("duplicating"))?;
        Ok(Channel {
            tx: Sender {
                conn,
                key,
                me,
                sent: 0,
            },
            rx: Receiver {
                conn: rx,
                key,
                peer: 3 - me,
                received: 0,
            },
            token: mac_with(&key, &[b"urgent"]),
        })
    }

    /// What a second connection of this session sends first ([`Msg::Join`]).
    pub fn token(&self) -> [u8; MAC] {
        self.token
    }

    /// Whether `theirs` is this session's token.
    pub fn is_token(&self, theirs: &[u8]) -> bool {
        same(&self.token, theirs)
    }

    pub fn set_timeout(&self, t: Option<Duration>) {
        let _ = self.tx.conn.set_timeout(t);
    }

    pub fn send(&mut self, msg: &Msg) -> Result<(), StreamError> {
        self.tx.send(msg)
    }

    pub fn recv(&mut self) -> Result<Msg, StreamError> {
        self.rx.recv()
    }

    pub fn shutdown(&self) {
        self.tx.conn.shutdown();
    }

    /// Connect a session: the main connection (pages, state, control)
    /// and the urgent one (post-copy's page requests and their answers,
    /// never queued behind the main one's pages).
    pub fn connect_session(
        addr: &Addr,
        key: &Key,
        timeout: Duration,
    ) -> Result<(Channel, Channel), StreamError> {
        let main = Channel::connect(addr, key, timeout)?;
        let mut urgent = Channel::connect(addr, key, timeout)?;
        urgent.send(&Msg::Join(main.token()))?;
        Ok((main, urgent))
    }

    /// A handle that can shut the connection down from another thread.
    pub fn closer(&self) -> Option<Box<dyn Conn>> {
        self.tx.conn.try_clone_conn().ok()
    }

    /// Its halves, for two threads.
    pub fn split(self) -> (Sender, Receiver) {
        (self.tx, self.rx)
    }
}

/// Decode a frame's payload (after its MAC was checked; the fuzz target
/// feeds it anything).
pub fn decode_msg(payload: &[u8]) -> Result<Msg, StreamError> {
    let msg: Msg =
        vmm_snapshot::decode("stream", payload).map_err(|e| StreamError::Decode(e.to_string()))?;
    if let Msg::Pages { gpas, data } = &msg {
        let pages = gpas.iter().filter(|(_, d)| *d).count();
        if data.len() != pages * crate::memory::PAGE_SIZE as usize
            || gpas.iter().any(|(g, _)| g % crate::memory::PAGE_SIZE != 0)
        {
            return Err(StreamError::Decode(format!(
                "{} pages of data for {pages} data pages, or an unaligned GPA",
                data.len() / crate::memory::PAGE_SIZE as usize
            )));
        }
    }
    Ok(msg)
}

fn check_hello(h: &[u8]) -> Result<[u8; NONCE], StreamError> {
    if &h[..8] != MAGIC {
        return Err(StreamError::NotAStream);
    }
    let v = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if v != VERSION {
        return Err(StreamError::Version(v));
    }
    let mut n = [0u8; NONCE];
    n.copy_from_slice(&h[12..12 + NONCE]);
    Ok(n)
}

/// Listen where the user said (one connection is accepted).
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(addr: &Addr) -> Result<Listener, StreamError> {
        Ok(match addr {
            Addr::Tcp(hp) => Listener::Tcp(TcpListener::bind(hp).map_err(io("listening"))?),
            Addr::Unix(p) => {
                Listener::Unix(UnixListener::bind(p).map_err(io("listening"))?, p.clone())
            }
        })
    }

    /// A session ([`Channel::connect_session`]): its main and urgent
    /// connections, authenticated and bound together; and the peer.
    pub fn accept_session(
        &self,
        key: &Key,
        timeout: Duration,
    ) -> Result<(Channel, Channel, String), StreamError> {
        let (conn, peer) = self.accept()?;
        let main = Channel::accept(conn, key, timeout)?;
        let (conn, _) = self.accept()?;
        let mut urgent = Channel::accept(conn, key, timeout)?;
        match urgent.recv()? {
            Msg::Join(t) if main.is_token(&t) => Ok((main, urgent, peer)),
            _ => Err(StreamError::NotJoined),
        }
    }

    /// The first connection.
    pub fn accept(&self) -> Result<(Box<dyn Conn>, String), StreamError> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().map_err(io("accepting"))?;
                let _ = s.set_nodelay(true);
                (Box::new(s), peer.to_string())
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept().map_err(io("accepting"))?;
                (Box::new(s), p.display().to_string())
            }
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        src_key: &[u8],
        dst_key: &[u8],
    ) -> (Result<Channel, StreamError>, Result<Channel, StreamError>) {
        let dir =
            std::env::temp_dir().join(format!("vmm-stream-{}-{}", std::process::id(), src_key[0]));
        let _ = std::fs::remove_file(&dir);
        let addr = Addr::Unix(dir);
        let l = Listener::bind(&addr).unwrap();
        let dk = Key::from_bytes(dst_key);
        let t = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            Channel::accept(c, &dk, Duration::from_secs(5))
        });
        let s = Channel::connect(&addr, &Key::from_bytes(src_key), Duration::from_secs(5));
        (s, t.join().unwrap())
    }

    #[test]
    fn the_same_key_talks_a_wrong_key_is_refused_on_both_sides() {
        let (s, d) = pair(b"1-the-key-of-both-sides", b"1-the-key-of-both-sides");
        let (mut s, mut d) = (s.unwrap(), d.unwrap());
        s.send(&Msg::Pages {
            gpas: vec![(0x1000, true), (0x2000, false)],
            data: vec![7; 4096],
        })
        .unwrap();
        match d.recv().unwrap() {
            Msg::Pages { gpas, data } => assert_eq!((gpas.len(), data[0]), (2, 7)),
            _ => panic!("not pages"),
        }
        d.send(&Msg::Ready).unwrap();
        assert!(matches!(s.recv().unwrap(), Msg::Ready));
        let (s, d) = pair(b"2-the-source-key-xxxx", b"2-another-key-entirely");
        assert!(matches!(s, Err(StreamError::Auth(_))), "{:?}", s.err());
        assert!(matches!(d, Err(StreamError::Auth(_))), "{:?}", d.err());
    }

    #[test]
    fn addresses_parse_or_say_what_they_should_be() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/m.sock".into())
        );
        for bad in ["tcp:host", "tcp::1", "udp:1.2.3.4:5", "unix:", "/tmp/x"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_page_batch_must_hold_exactly_its_data() {
        let msg = Msg::Pages {
            gpas: vec![(0x1000, true)],
            data: vec![0; 100],
        };
        assert!(decode_msg(&vmm_snapshot::encode(&msg)).is_err());
        let msg = Msg::Pages {
            gpas: vec![(0x1001, false)],
            data: vec![],
        };
        assert!(decode_msg(&vmm_snapshot::encode(&msg)).is_err());
    }
}
