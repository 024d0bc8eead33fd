//! A small stderr logger for the `log` facade. (Messages a guest can
//! provoke at will are rate-limited where they arise: `vmm_devices::RateLimit`.)

struct StderrLogger {
    level: log::LevelFilter,
}

/// Crates whose messages describe what a guest did (a bad queue address,
/// ...): the VMM reports the same facts itself, counted and rate-limited, so
/// theirs are shown only at debug level (a guest must not flood the log).
const GUEST_DRIVEN_TARGETS: [&str; 1] = ["virtio_queue"];

fn effective_level(m: &log::Metadata) -> log::Level {
    if GUEST_DRIVEN_TARGETS
        .iter()
        .any(|t| m.target().starts_with(t))
    {
        log::Level::Debug
    } else {
        m.level()
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        effective_level(m) <= self.level
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("[vmm {}] {}", effective_level(r.metadata()), r.args());
        }
    }
    fn flush(&self) {}
}

/// Install the logger; `VMM_LOG=debug|info|warn|error` overrides `default`.
pub fn init(default: log::LevelFilter) {
    let level = std::env::var("VMM_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let logger = Box::leak(Box::new(StderrLogger { level }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
