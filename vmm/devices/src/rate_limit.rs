//! A rate limiter for messages a guest can provoke at will (unclaimed port
//! I/O, bad virtio register writes): a guest must not flood the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Allows at most `per_second` events per wall-clock second; counts the rest.
/// Lock-free so that vCPU threads can share one.
pub struct RateLimit {
    per_second: u64,
    /// (second << 32) | count-in-that-second
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub const fn new(per_second: u64) -> Self {
        Self {
            per_second,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` if this event may be logged.
    pub fn check(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() & 0xffff_ffff)
            .unwrap_or(0);
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let (sec, count) = (cur >> 32, cur & 0xffff_ffff);
            let next = if sec == now {
                (now << 32) | (count + 1)
            } else {
                (now << 32) | 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    if next & 0xffff_ffff > self.per_second {
                        self.suppressed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                    return Some(self.suppressed.swap(0, Ordering::Relaxed));
                }
                Err(c) => cur = c,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_caps_a_burst() {
        let rl = RateLimit::new(5);
        let allowed = (0..1000).filter(|_| rl.check().is_some()).count();
        // A second boundary may fall inside the burst: at most two windows.
        assert!((5..=10).contains(&allowed), "allowed {allowed}");
    }
}
