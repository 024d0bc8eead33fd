//! One descriptor chain as a device sees it, and what the device completes.
//!
//! The transport pops each available chain (rust-vmm's `virtio-queue`
//! walks it: loops end at the queue size, indirect tables are checked),
//! collects its descriptors, and hands the device a [`Chain`]: every read
//! and write through it is bounds-checked against guest RAM and against
//! the sizes the device asks for, so a device never indexes guest memory
//! itself. What the device completes goes into [`Completions`]; the
//! transport then writes the used ring and raises one interrupt.

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::Bytes;
use vmm_memory::GuestMemory;

/// A chain the device cannot use (counted as a guest error; the chain is
/// completed empty), or a queue the device cannot serve at all (the
/// device needs a reset).
#[derive(Debug, Error)]
pub enum ChainError {
    #[error("a write-only descriptor where the device reads")]
    WriteOnlyWhereRead,
    #[error("a readable descriptor after the response buffer")]
    ReadableAfterWritable,
    #[error("chain of more than {max} readable bytes")]
    TooLong { max: usize },
    #[error("{got} readable bytes (needs {need})")]
    TooShort { got: usize, need: usize },
    #[error("{got} bytes is not a whole number of {unit}-byte entries")]
    NotWhole { got: usize, unit: usize },
    #[error("no writable response buffer")]
    NoResponseBuffer,
    #[error("response buffer of {got} bytes (needs {need})")]
    ResponseTooSmall { got: u32, need: usize },
    #[error("descriptor at {addr:#x}+{len:#x} is not in guest RAM")]
    OutsideRam { addr: u64, len: u32 },
    #[error("{0}")]
    Request(&'static str),
    /// The device has no use for this queue (with these features): the
    /// driver is confused; it must reset the device.
    #[error("queue {queue} is not used with features {features:#x}")]
    QueueNotInUse { queue: usize, features: u64 },
    /// The avail or used ring itself is broken (an index beyond the queue
    /// size): the device needs a reset.
    #[error("{ring} ring: {error}")]
    Ring {
        ring: &'static str,
        error: virtio_queue::Error,
    },
}

impl ChainError {
    /// Whether the device must stop until the driver resets it.
    pub fn needs_reset(&self) -> bool {
        matches!(
            self,
            ChainError::QueueNotInUse { .. } | ChainError::Ring { .. }
        )
    }
}

/// One available chain: its head index and descriptors, over guest memory.
pub struct Chain<'m> {
    head: u16,
    descs: Vec<Descriptor>,
    mem: &'m GuestMemory,
}

impl<'m> Chain<'m> {
    pub fn new(chain: DescriptorChain<&'m GuestMemory>, mem: &'m GuestMemory) -> Self {
        let head = chain.head_index();
        Chain {
            head,
            descs: chain.collect(),
            mem,
        }
    }

    pub fn head(&self) -> u16 {
        self.head
    }

    fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descs.iter().take_while(|d| !d.is_write_only())
    }

    fn read(&self, d: &Descriptor, out: &mut [u8]) -> Result<(), ChainError> {
        self.mem
            .read_slice(out, d.addr())
            .map_err(|_| ChainError::OutsideRam {
                addr: d.addr().0,
                len: d.len(),
            })
    }

    /// Every device-readable byte, at most `max`; the chain must have no
    /// writable part (inflate, deflate, stats buffers).
    pub fn read_all(&self, max: usize) -> Result<Vec<u8>, ChainError> {
        if self.descs.iter().any(|d| d.is_write_only()) {
            return Err(ChainError::WriteOnlyWhereRead);
        }
        let mut out = Vec::new();
        for d in &self.descs {
            let len = d.len() as usize;
            if out.len() + len > max {
                return Err(ChainError::TooLong { max });
            }
            let start = out.len();
            out.resize(start + len, 0);
            self.read(d, &mut out[start..])?;
        }
        Ok(out)
    }

    /// [`Self::read_all`] as little-endian `N`-byte entries.
    pub fn read_entries<const N: usize>(&self, max: usize) -> Result<Vec<[u8; N]>, ChainError> {
        let bytes = self.read_all(max * N)?;
        if bytes.len() % N != 0 {
            return Err(ChainError::NotWhole {
                got: bytes.len(),
                unit: N,
            });
        }
        Ok(bytes
            .chunks_exact(N)
            .map(|c| c.try_into().unwrap_or([0; N]))
            .collect())
    }

    /// A request of exactly `N` bytes from the readable part (more readable
    /// bytes are ignored), which must come before any writable descriptor.
    pub fn read_request<const N: usize>(&self) -> Result<[u8; N], ChainError> {
        let mut req = [0u8; N];
        let mut got = 0;
        for d in self.readable() {
            if got == N {
                break;
            }
            let take = (d.len() as usize).min(N - got);
            let part = Descriptor::new(d.addr().0, take as u32, 0, 0);
            self.read(&part, &mut req[got..got + take])?;
            got += take;
        }
        if got < N {
            return Err(ChainError::TooShort { got, need: N });
        }
        let mut tail = self.descs.iter().skip_while(|d| !d.is_write_only());
        if tail.any(|d| !d.is_write_only()) {
            return Err(ChainError::ReadableAfterWritable);
        }
        Ok(req)
    }

    /// Write `bytes` into the first writable descriptor, which must hold
    /// them; returns the length written (for the used ring).
    pub fn write_response(&self, bytes: &[u8]) -> Result<u32, ChainError> {
        let d = self
            .descs
            .iter()
            .find(|d| d.is_write_only())
            .ok_or(ChainError::NoResponseBuffer)?;
        if (d.len() as usize) < bytes.len() {
            return Err(ChainError::ResponseTooSmall {
                got: d.len(),
                need: bytes.len(),
            });
        }
        self.mem
            .write_slice(bytes, d.addr())
            .map_err(|_| ChainError::OutsideRam {
                addr: d.addr().0,
                len: d.len(),
            })?;
        Ok(bytes.len() as u32)
    }

    /// Each descriptor as a guest-physical range (a device that is told
    /// about memory rather than given data: free page reporting).
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs.iter().map(|d| (d.addr().0, u64::from(d.len())))
    }
}

/// What a device did while processing (or ticking): the chains it
/// completed (queue, head, bytes written), which the transport puts on the
/// used rings, and the guest mistakes it met in chains it still completed
/// (a request the device answers with an error), which the transport
/// counts and logs.
#[derive(Debug, Default)]
pub struct Completions {
    queue: usize,
    done: Vec<(usize, u16, u32)>,
    errors: Vec<ChainError>,
}

impl Completions {
    pub(crate) fn for_queue(queue: usize) -> Self {
        Completions {
            queue,
            ..Completions::default()
        }
    }

    /// A guest mistake in a chain the device completes anyway.
    pub fn guest_error(&mut self, e: ChainError) {
        self.errors.push(e);
    }

    pub(crate) fn take_errors(&mut self) -> Vec<ChainError> {
        std::mem::take(&mut self.errors)
    }

    /// Complete chain `head` of the queue being processed.
    pub fn used(&mut self, head: u16, written: u32) {
        self.done.push((self.queue, head, written));
    }

    /// Complete chain `head` of queue `queue` (a chain held earlier).
    pub fn used_on(&mut self, queue: usize, head: u16, written: u32) {
        self.done.push((queue, head, written));
    }

    pub(crate) fn take(&mut self) -> Vec<(usize, u16, u32)> {
        std::mem::take(&mut self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A chain of (addr, len, writable) descriptors on a mock queue.
    fn with_chain<T>(
        m: &GuestMemory,
        descs: &[(u64, u32, bool)],
        f: impl FnOnce(&Chain) -> T,
    ) -> T {
        let q = MockSplitQueue::new(m, 16);
        let table: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, w)| {
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                Descriptor::new(addr, len, flags, 0).into()
            })
            .collect();
        let chain = q.build_desc_chain(&table).unwrap();
        f(&Chain::new(chain, m))
    }

    #[test]
    fn reads_are_bounded_and_ordered() {
        let m = mem();
        m.write_slice(&[1, 0, 0, 0, 2, 0, 0, 0], GuestAddress(0x8000))
            .unwrap();
        with_chain(&m, &[(0x8000, 4, false), (0x8004, 4, false)], |c| {
            assert_eq!(c.read_all(8).unwrap(), vec![1, 0, 0, 0, 2, 0, 0, 0]);
            assert!(
                matches!(c.read_all(7), Err(ChainError::TooLong { max: 7 })),
                "{:?}",
                c.read_all(7)
            );
            assert_eq!(
                c.read_entries::<4>(2).unwrap(),
                vec![[1, 0, 0, 0], [2, 0, 0, 0]]
            );
            assert_eq!(c.read_request::<6>().unwrap(), [1, 0, 0, 0, 2, 0]);
            assert!(
                matches!(
                    c.read_request::<9>(),
                    Err(ChainError::TooShort { got: 8, need: 9 })
                ),
                "{:?}",
                c.read_request::<9>()
            );
            assert!(
                matches!(c.write_response(&[0]), Err(ChainError::NoResponseBuffer)),
                "{:?}",
                c.write_response(&[0])
            );
        });
        with_chain(&m, &[(0x8000, 3, false)], |c| {
            assert!(
                matches!(
                    c.read_entries::<4>(4),
                    Err(ChainError::NotWhole { got: 3, unit: 4 })
                ),
                "{:?}",
                c.read_entries::<4>(4)
            );
        });
        // Outside RAM, and writable where the device reads.
        with_chain(&m, &[(0xd000_0000, 8, false)], |c| {
            assert!(matches!(c.read_all(64), Err(ChainError::OutsideRam { .. })));
        });
        with_chain(&m, &[(0x8000, 8, true)], |c| {
            assert!(
                matches!(c.read_all(64), Err(ChainError::WriteOnlyWhereRead)),
                "{:?}",
                c.read_all(64)
            );
        });
    }

    #[test]
    fn responses_go_to_the_first_writable_buffer() {
        let m = mem();
        with_chain(&m, &[(0x8000, 4, false), (0x9000, 2, true)], |c| {
            assert!(
                matches!(
                    c.write_response(&[7, 7, 7]),
                    Err(ChainError::ResponseTooSmall { got: 2, need: 3 })
                ),
                "{:?}",
                c.write_response(&[7, 7, 7])
            );
            assert_eq!(c.write_response(&[7, 8]).unwrap(), 2);
        });
        let mut b = [0u8; 2];
        m.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
        assert_eq!(b, [7, 8]);
        with_chain(&m, &[(0x9000, 2, true), (0x8000, 4, false)], |c| {
            assert!(
                matches!(
                    c.read_request::<0>(),
                    Err(ChainError::ReadableAfterWritable)
                ),
                "{:?}",
                c.read_request::<0>()
            );
        });
    }
}
