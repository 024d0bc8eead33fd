//! The size parser behind `--mem`, `--balloon`, `--hotplug` and the API's
//! sizes: any string gives a size or an error (no panic, no overflow).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = vmm::config::parse_size(s);
    }
});
