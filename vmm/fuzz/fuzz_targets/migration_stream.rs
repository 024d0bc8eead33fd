//! What a migration destination reads from a connection: the handshake
//! (unauthenticated bytes), then frames, and a frame's payload once its MAC
//! passed. Any bytes give a message or an error (no panic, no unbounded
//! allocation, no wait: the connection ends where the input does).
#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::stream::{decode_msg, Channel, Conn, Key};

/// A connection whose peer sends `data` and then hangs up (its clones
/// read the same bytes, as a duplicated socket would).
#[derive(Clone)]
struct Replay(Arc<Mutex<std::io::Cursor<Vec<u8>>>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn for Replay {
    fn set_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn shutdown(&self) {}
    fn try_clone_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.clone()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        let _ = decode_msg(bytes);
        return;
    }
    let key = Key::from_bytes(b"the fuzzer's key, 32 bytes long!");
    let conn = Box::new(Replay(Arc::new(Mutex::new(std::io::Cursor::new(
        bytes.to_vec(),
    )))));
    if let Ok(mut ch) = Channel::accept(conn, &key, Duration::from_secs(1)) {
        for _ in 0..16 {
            if ch.recv().is_err() {
                break;
            }
        }
    }
});
