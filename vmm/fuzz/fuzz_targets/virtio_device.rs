//! A virtio driver the fuzzer writes: register reads and writes of any
//! width on the virtio-mmio window, guest RAM the rings and buffers live
//! in, queue notifications, the event loop's tick and host-side target
//! changes, against the balloon or virtio-mem device. This covers the
//! transport's lifecycle checks, rust-vmm's queue and descriptor-chain walk
//! over our memory view, and every request the two devices parse (inflate,
//! deflate, stats, free-page reports; plug, unplug, unplug-all, state).
//!
//! Any input may end in a guest error or NEEDS_RESET; none may panic, touch
//! memory outside guest RAM or allocate without bound. After the run the
//! device's accounting must still hold together (checked below).
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig};
use vmm::devices::virtio::mem::{MemRegion, VirtioMem};
use vmm::devices::virtio::mmio::{reg, MmioTransport};
use vmm::devices::virtio::{Interrupt, VirtioDevice};
use vmm::devices::BusDevice;
use vmm::memory::{MemStat, MemoryManager, NoKvm, PageSource, RamRange, PAGE_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
/// Where the fuzzer's rings and buffers go (it may point anywhere, though).
const WINDOW: u64 = MIB;
const WINDOW_LEN: u64 = 256 * 1024;
const HOTPLUG: MemRegion = MemRegion {
    addr: 512 * MIB,
    size: 512 * MIB,
    block_size: 2 * MIB,
};

/// The input, consumed from the front; runs dry as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = N.min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn slice(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

enum Dev {
    Balloon(Arc<Mutex<Balloon>>),
    Mem(Arc<Mutex<VirtioMem>>),
}

fn reg_write(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// What a well-behaved driver does first, so the fuzzer reaches the queues
/// quickly: reset, negotiate `features`, set up every queue (size 2^k,
/// rings in the window), DRIVER_OK.
fn bring_up(t: &mut MmioTransport, inp: &mut Input) {
    reg_write(t, reg::STATUS, 0);
    reg_write(t, reg::STATUS, 1);
    reg_write(t, reg::STATUS, 3);
    for sel in 0..2 {
        reg_write(t, reg::DEVICE_FEATURES_SEL, sel);
        let mut d = [0u8; 4];
        t.read(reg::DEVICE_FEATURES, &mut d);
        let mask = inp.u32();
        reg_write(t, reg::DRIVER_FEATURES_SEL, sel);
        reg_write(t, reg::DRIVER_FEATURES, u32::from_le_bytes(d) & !mask);
    }
    reg_write(t, reg::STATUS, 11);
    for q in 0..t.queue_count() as u32 {
        let size = 1u32 << (inp.u8() % 9);
        let base = WINDOW + u64::from(q) * 0x8000;
        reg_write(t, reg::QUEUE_SEL, q);
        reg_write(t, reg::QUEUE_NUM, size);
        for (off, a) in [(0x80, base), (0x90, base + 0x2000), (0xa0, base + 0x4000)] {
            reg_write(t, off, a as u32);
            reg_write(t, off + 4, (a >> 32) as u32);
        }
        reg_write(t, reg::QUEUE_READY, 1);
    }
    reg_write(t, reg::STATUS, 15);
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let memory = Arc::new(
        MemoryManager::new(
            Arc::new(NoKvm),
            &[RamRange { gpa: 0, size: RAM }],
            PageSource::Zero,
            16,
        )
        .expect("guest memory"),
    );
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let (dev, device): (Dev, Arc<Mutex<dyn VirtioDevice>>) = if inp.u8() & 1 == 0 {
        let b = Arc::new(Mutex::new(Balloon::new(
            memory.clone(),
            irq.clone(),
            BalloonConfig {
                target_pages: u32::from(inp.u16()),
                free_page_reporting: true,
                stats_interval: Duration::ZERO,
            },
        )));
        (Dev::Balloon(b.clone()), b)
    } else {
        let m = Arc::new(Mutex::new(VirtioMem::new(
            memory.clone(),
            irq.clone(),
            HOTPLUG,
        )));
        (Dev::Mem(m.clone()), m)
    };
    let mut t = MmioTransport::new(device, irq.clone(), memory.clone());
    let mut ops = 0;
    while !inp.0.is_empty() && ops < 4096 {
        ops += 1;
        match inp.u8() % 8 {
            0 => {
                let off = u64::from(inp.u16() & 0x1ff);
                let v = inp.bytes::<8>();
                let len = [1, 2, 4, 8][usize::from(inp.u8() % 4)];
                t.write(off, &v[..len]);
            }
            1 => {
                let off = u64::from(inp.u16() & 0x1ff);
                let mut d = [0u8; 8];
                let len = [1, 2, 4, 8][usize::from(inp.u8() % 4)];
                t.read(off, &mut d[..len]);
            }
            2 => {
                // Guest RAM: the rings and buffers (or anything else).
                let at = WINDOW + u64::from(inp.u16()) * 4 % WINDOW_LEN;
                let n = usize::from(inp.u8());
                let bytes = inp.slice(n).to_vec();
                let _ = memory.memory().write_slice(&bytes, GuestAddress(at));
            }
            3 => {
                // A descriptor, then publish it: the common shape, cheaply.
                let q = u64::from(inp.u8() % 4);
                let i = u64::from(inp.u8());
                let base = WINDOW + q * 0x8000;
                let (addr, len, flags, next) = (inp.u64(), inp.u32(), inp.u16(), inp.u16());
                let addr = if addr >> 63 == 0 {
                    WINDOW + addr % WINDOW_LEN
                } else {
                    addr
                };
                let m = memory.memory();
                let d = base + 16 * (i % 256);
                let _ = m.write_obj(addr, GuestAddress(d));
                let _ = m.write_obj(len, GuestAddress(d + 8));
                let _ = m.write_obj(flags, GuestAddress(d + 12));
                let _ = m.write_obj(next, GuestAddress(d + 14));
                let idx: u16 = m.read_obj(GuestAddress(base + 0x2002)).unwrap_or(0);
                let _ = m.write_obj(
                    i as u16,
                    GuestAddress(base + 0x2004 + 2 * u64::from(idx % 256)),
                );
                let _ = m.write_obj(idx.wrapping_add(1), GuestAddress(base + 0x2002));
                drop(m);
                reg_write(&mut t, reg::QUEUE_NOTIFY, q as u32);
            }
            4 => reg_write(&mut t, reg::QUEUE_NOTIFY, u32::from(inp.u8() % 4)),
            5 => t.tick(),
            6 => match &dev {
                Dev::Balloon(b) => b
                    .lock()
                    .unwrap()
                    .set_target(inp.u32() % (RAM / PAGE_SIZE * 2) as u32),
                Dev::Mem(m) => {
                    let _ = m
                        .lock()
                        .unwrap()
                        .set_requested(u64::from(inp.u8() % 5) * 128 * MIB);
                }
            },
            _ => bring_up(&mut t, &mut inp),
        }
    }
    // The accounting must hold whatever the driver did.
    match &dev {
        Dev::Mem(m) => {
            let m = m.lock().unwrap();
            let plugged = m.plugged_bytes();
            assert!(
                plugged <= HOTPLUG.size,
                "plugged {plugged:#x} beyond the region"
            );
            assert_eq!(
                plugged % HOTPLUG.block_size,
                0,
                "plugged {plugged:#x} not whole blocks"
            );
            // A slice is a memslot exactly while one of its blocks is plugged.
            let slots = memory.stats()[MemStat::Memslots];
            assert!(slots <= 1 + HOTPLUG.size / (128 * MIB), "{slots} memslots");
            assert_eq!(
                plugged == 0,
                slots == 1,
                "{slots} memslots, {plugged:#x} plugged"
            );
        }
        Dev::Balloon(b) => {
            let b = b.lock().unwrap();
            assert!(b.touched_pages() <= RAM / PAGE_SIZE);
        }
    }
});
