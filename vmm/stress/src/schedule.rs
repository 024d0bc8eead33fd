//! The churn schedule: which memory change happens when, fixed by the seed
//! (the same seed gives the same schedule, whatever the machine does).

use std::time::Duration;

/// One change the controller makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Move the balloon's target (bytes).
    Balloon(u64),
    /// Move virtio-mem's requested_size (bytes).
    Hotplug(u64),
    /// Add the extra memslot number `n`.
    SlotAdd(u32),
    /// Remove the extra memslot number `n`.
    SlotRemove(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
}

/// xorshift64*: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// What the schedule may do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub duration: Duration,
    /// Changes per second of each kind.
    pub balloon_rate: f64,
    pub hotplug_rate: f64,
    pub memslot_rate: f64,
    /// Largest balloon target, and its granularity (bytes).
    pub balloon_max: u64,
    pub balloon_unit: u64,
    /// Largest requested_size, and the block size (bytes).
    pub hotplug_max: u64,
    pub hotplug_unit: u64,
    /// Extra memslots that may exist at once.
    pub extra_slots: u32,
}

/// Times of a stream of `rate` events per second over `d`: one per period,
/// jittered within ±25 % of it.
fn times(rng: &mut Rng, rate: f64, d: Duration) -> Vec<Duration> {
    if rate <= 0.0 {
        return Vec::new();
    }
    let period = 1.0 / rate;
    let n = (d.as_secs_f64() * rate) as u64;
    (0..n)
        .map(|k| {
            let jitter = (rng.below(1000) as f64 / 1000.0 - 0.5) * 0.5 * period;
            Duration::from_secs_f64(((k as f64 + 0.5) * period + jitter).max(0.0))
        })
        .collect()
}

/// The whole schedule, sorted by time.
pub fn build(seed: u64, l: &Limits) -> Vec<Event> {
    let mut rng = Rng::new(seed);
    let mut events = Vec::new();
    let pick = |rng: &mut Rng, max: u64, unit: u64| {
        if max < unit || unit == 0 {
            0
        } else {
            rng.below(max / unit + 1) * unit
        }
    };
    for at in times(&mut rng, l.balloon_rate, l.duration) {
        let v = pick(&mut rng, l.balloon_max, l.balloon_unit);
        events.push(Event {
            at,
            action: Action::Balloon(v),
        });
    }
    for at in times(&mut rng, l.hotplug_rate, l.duration) {
        let v = pick(&mut rng, l.hotplug_max, l.hotplug_unit);
        events.push(Event {
            at,
            action: Action::Hotplug(v),
        });
    }
    // Memslots: each event flips one extra slot (added if absent, removed
    // if present), so removals follow adds.
    let mut present = vec![false; l.extra_slots as usize];
    for at in times(&mut rng, l.memslot_rate, l.duration) {
        if present.is_empty() {
            break;
        }
        let n = rng.below(present.len() as u64) as usize;
        let action = if present[n] {
            Action::SlotRemove(n as u32)
        } else {
            Action::SlotAdd(n as u32)
        };
        present[n] = !present[n];
        events.push(Event { at, action });
    }
    events.sort_by_key(|e| e.at);
    events
}

/// A digest of the schedule (FNV-1a over its events), printed so two runs
/// can be seen to have had the same one.
pub fn digest(events: &[Event]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in events {
        eat(e.at.as_nanos() as u64);
        let (kind, v) = match e.action {
            Action::Balloon(v) => (0, v),
            Action::Hotplug(v) => (1, v),
            Action::SlotAdd(n) => (2, u64::from(n)),
            Action::SlotRemove(n) => (3, u64::from(n)),
        };
        eat(kind);
        eat(v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            duration: Duration::from_secs(10),
            balloon_rate: 2.0,
            hotplug_rate: 3.0,
            memslot_rate: 50.0,
            balloon_max: 64 << 20,
            balloon_unit: 1 << 20,
            hotplug_max: 256 << 20,
            hotplug_unit: 2 << 20,
            extra_slots: 4,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let a = build(7, &limits());
        assert_eq!(a, build(7, &limits()));
        assert_eq!(digest(&a), digest(&build(7, &limits())));
        assert_ne!(digest(&a), digest(&build(8, &limits())));
    }

    #[test]
    fn rates_values_and_order() {
        let l = limits();
        let e = build(1, &l);
        let count = |f: fn(&Action) -> bool| e.iter().filter(|x| f(&x.action)).count();
        assert_eq!(count(|a| matches!(a, Action::Balloon(_))), 20);
        assert_eq!(count(|a| matches!(a, Action::Hotplug(_))), 30);
        assert_eq!(
            count(|a| matches!(a, Action::SlotAdd(_) | Action::SlotRemove(_))),
            500
        );
        assert!(e.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(e.iter().all(|x| x.at <= l.duration));
        for x in &e {
            match x.action {
                Action::Balloon(v) => assert!(v <= l.balloon_max && v % l.balloon_unit == 0),
                Action::Hotplug(v) => assert!(v <= l.hotplug_max && v % l.hotplug_unit == 0),
                _ => {}
            }
        }
        // A slot is never removed before it was added.
        let mut present = [false; 4];
        for x in &e {
            match x.action {
                Action::SlotAdd(n) => {
                    assert!(!present[n as usize]);
                    present[n as usize] = true;
                }
                Action::SlotRemove(n) => {
                    assert!(present[n as usize]);
                    present[n as usize] = false;
                }
                _ => {}
            }
        }
    }
}
