//! `vmm`: command-line front end.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vmm::config::{parse_size, FaultMode, VmConfig};
use vmm::vm::Vm;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM VMM whose vCPU threads serve their own guest-memory faults"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest and run it until it ends; exit with the guest's status.
    Run(RunArgs),
}

#[derive(Parser)]
struct RunArgs {
    /// ELF image to boot (a test guest or a Linux vmlinux). Without it, the
    /// embedded default guest runs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest RAM: a size like 512M or 2G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Command line handed to the guest.
    #[arg(long, default_value = "")]
    cmdline: String,
}

fn parse_mem(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Make sure fds 0..=2 are open, so that no file we open later lands on them
/// (serial input reads fd 0; a closed stdin must not become /dev/kvm).
fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a small integer has no side effects.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: opening /dev/null with a static NUL-terminated path.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

fn main() -> ExitCode {
    ensure_std_fds();
    vmm::logger::init(log::LevelFilter::Warn);
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let config = VmConfig {
                kernel: a.kernel,
                mem_size: a.mem,
                vcpus: a.vcpus,
                cmdline: a.cmdline,
                fault_mode: FaultMode::default(),
            };
            let result = Vm::new(config).and_then(|vm| vm.run());
            match result {
                Ok(reason) => {
                    let status = reason.status();
                    if status == 0 {
                        log::info!("{reason}");
                    } else {
                        eprintln!("vmm: {reason}");
                    }
                    ExitCode::from(status as u8)
                }
                Err(e) => {
                    eprintln!("vmm: error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
