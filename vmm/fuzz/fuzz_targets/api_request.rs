//! Bytes a local client sends the control API socket: HTTP/1.1 framing
//! (hyper), routing, JSON bodies (serde), and the control plane's checks
//! behind them, against a VM with a balloon and virtio-mem (no KVM). Any
//! input may be answered with an error; none may panic or hang, and every
//! answer is an HTTP/1.x response.
#![no_main]

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmm::api::control::VmControl;
use vmm::api::server::serve_connection;
use vmm::config::FaultMode;
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonHandle};
use vmm::devices::virtio::mem::{HotplugHandle, MemRegion, VirtioMem};
use vmm::devices::virtio::Interrupt;
use vmm::exit::VmExit;
use vmm::memory::{MemoryManager, NoKvm, PageSource, RamRange};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MIB: u64 = 1 << 20;

fn control() -> Arc<VmControl> {
    let memory = Arc::new(
        MemoryManager::new(
            Arc::new(NoKvm),
            &[RamRange {
                gpa: 0,
                size: 64 * MIB,
            }],
            PageSource::Zero,
            8,
        )
        .expect("guest memory"),
    );
    let irq = || Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let balloon = Balloon::new(
        memory.clone(),
        irq(),
        BalloonConfig {
            target_pages: 0,
            free_page_reporting: true,
            stats_interval: Duration::ZERO,
        },
    );
    let region = MemRegion {
        addr: 512 * MIB,
        size: 256 * MIB,
        block_size: 2 * MIB,
    };
    let mem = VirtioMem::new(memory.clone(), irq(), region);
    let balloon = BalloonHandle {
        stats: balloon.stats(),
        counters: Default::default(),
        device: Arc::new(Mutex::new(balloon)),
    };
    let hotplug = HotplugHandle {
        stats: mem.stats(),
        counters: Default::default(),
        device: Arc::new(Mutex::new(mem)),
        region,
    };
    Arc::new(VmControl::new(
        Arc::new(VmExit::new()),
        memory,
        Some(balloon),
        Some(hotplug),
        Arc::new(AtomicU32::new(0)),
        2,
        FaultMode::Vcpu,
    ))
}

fuzz_target!(|data: &[u8]| {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static CONTROL: OnceLock<Arc<VmControl>> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    let control = CONTROL.get_or_init(control).clone();
    rt.block_on(async {
        let (mut client, server) = tokio::net::UnixStream::pair().expect("socketpair");
        let served = tokio::spawn(serve_connection(server, control));
        let answer = async {
            // The client writes everything, says it is done, reads to EOF.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let out = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the API answered and closed within 10 s");
        served.await.expect("the connection task did not panic");
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    });
});
