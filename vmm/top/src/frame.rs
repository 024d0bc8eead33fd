//! One frame of `vmm top`: rates over the interval between two scrapes of
//! the metrics JSON (`GET /vm/metrics` or `/metrics.json`, docs/METRICS.md).
//! Pure arithmetic on the two samples, so it is tested without a VM.

use serde_json::Value;

const MIB: f64 = (1u64 << 20) as f64;
const PAGE: f64 = 4096.0;

/// What the header shows: the VM as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub fault_mode: String,
    pub resident_mib: f64,
    pub memslots: u64,
    pub generation: u64,
    pub memslot_changes_per_s: f64,
    pub discarded_pages_per_s: f64,
    /// (target, actual) MiB, if the VM has a balloon.
    pub balloon_mib: Option<(u64, u64)>,
    /// (requested, plugged) MiB, if the VM has virtio-mem.
    pub hotplug_mib: Option<(u64, u64)>,
    /// Pages installed over the interval by every thread, per second.
    pub pages_per_s: f64,
}

/// One fault-serving thread over the interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// `vcpu0`, `handler1`, `events`, ...
    pub name: String,
    /// Faults served since the VM started (the counter, not a rate).
    pub faults: u64,
    pub faults_per_s: f64,
    /// Faults per second by kind (`mmio`, `memory_fault`, ...), the kinds
    /// that moved, in the table's order.
    pub kinds_per_s: Vec<(String, f64)>,
    /// Faults that installed a page (speculative or after a retry) per
    /// second.
    pub installs_per_s: f64,
    /// Pages per install (fault-around), if anything was installed.
    pub pages_per_install: Option<f64>,
    /// Pages this thread installed per second.
    pub pages_per_s: f64,
    pub retries_per_s: f64,
    /// Fault latency quantiles over the interval (seconds), if any fault.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Share of the interval the thread waited for guest memory (vCPUs).
    pub blocked: Option<f64>,
}

/// A whole frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub interval_s: f64,
    pub header: Header,
    pub rows: Vec<Row>,
}

/// The orders rows can be sorted in (`--sort`; `s` cycles through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Thread,
    Faults,
    Installs,
    Retries,
    P99,
    Blocked,
}

impl SortBy {
    pub const ALL: [SortBy; 6] = [
        SortBy::Thread,
        SortBy::Faults,
        SortBy::Installs,
        SortBy::Retries,
        SortBy::P99,
        SortBy::Blocked,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Thread => "thread",
            SortBy::Faults => "faults/s",
            SortBy::Installs => "installs/s",
            SortBy::Retries => "retries/s",
            SortBy::P99 => "p99",
            SortBy::Blocked => "blocked",
        }
    }

    pub fn next(self) -> SortBy {
        let i = Self::ALL.iter().position(|s| *s == self).unwrap_or(0);
        Self::ALL[(i + 1) % Self::ALL.len()]
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// `later - earlier` of a counter, 0 if it went backwards (a new VM on the
/// same socket).
fn delta(later: u64, earlier: u64) -> u64 {
    later.saturating_sub(earlier)
}

/// A quantile of a histogram given as per-bucket (not cumulative) counts
/// with their upper bounds (`None` for `+Inf`): linear within the bucket
/// that holds it, as Prometheus's `histogram_quantile`; in the open bucket,
/// the last finite bound.
pub fn quantile(buckets: &[(Option<f64>, u64)], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|b| b.1).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for &(bound, n) in buckets {
        match bound {
            Some(upper) => {
                if n > 0 && (below + n) as f64 >= rank {
                    let within = (rank - below as f64) / n as f64;
                    return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
                }
                lower = upper;
            }
            None => return Some(lower),
        }
        below += n;
    }
    Some(lower)
}

/// A thread's latency buckets as (bound, count).
fn buckets(t: &Value) -> Vec<(Option<f64>, u64)> {
    t.pointer("/fault_latency/buckets")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|b| {
                    (
                        b.get(0).and_then(Value::as_f64),
                        b.get(1).and_then(Value::as_u64).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn row(name: String, now: &Value, then: Option<&Value>, dt: f64) -> Row {
    let empty = Value::Null;
    let then = then.unwrap_or(&empty);
    let rate = |key: &str| delta(u(now, key), u(then, key)) as f64 / dt;
    let kinds: Vec<(String, u64, u64)> = now
        .get("faults")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let was = then
                        .pointer(&format!("/faults/{k}"))
                        .and_then(Value::as_u64);
                    (k.clone(), v.as_u64().unwrap_or(0), was.unwrap_or(0))
                })
                .collect()
        })
        .unwrap_or_default();
    let faults: u64 = kinds.iter().map(|k| k.1).sum();
    let faults_before: u64 = kinds.iter().map(|k| k.2).sum();
    let installs = delta(
        u(now, "speculative_installs"),
        u(then, "speculative_installs"),
    ) + delta(u(now, "slow_path_installs"), u(then, "slow_path_installs"));
    let pages = delta(u(now, "pages_installed"), u(then, "pages_installed"));
    let hist: Vec<(Option<f64>, u64)> = {
        let a = buckets(now);
        let b = buckets(then);
        a.iter()
            .enumerate()
            .map(|(i, (bound, n))| (*bound, delta(*n, b.get(i).map_or(0, |x| x.1))))
            .collect()
    };
    let blocked = f(now, "blocktime_seconds").map(|b| {
        let was = f(then, "blocktime_seconds").unwrap_or(0.0);
        ((b - was).max(0.0) / dt).min(1.0)
    });
    Row {
        name,
        faults,
        faults_per_s: delta(faults, faults_before) as f64 / dt,
        kinds_per_s: kinds
            .iter()
            .filter(|k| k.1 > k.2)
            .map(|k| (k.0.clone(), (k.1 - k.2) as f64 / dt))
            .collect(),
        installs_per_s: installs as f64 / dt,
        pages_per_install: (installs > 0).then(|| pages as f64 / installs as f64),
        pages_per_s: pages as f64 / dt,
        retries_per_s: rate("retries"),
        p50: quantile(&hist, 0.5),
        p99: quantile(&hist, 0.99),
        blocked,
    }
}

/// The frame for the interval from `then` to `now` (`dt` seconds apart).
pub fn frame(then: &Value, now: &Value, dt: f64) -> Frame {
    let dt = dt.max(1e-3);
    let mut rows = Vec::new();
    for (array, prefix) in [("vcpus", "vcpu"), ("handlers", "handler")] {
        let empty = Vec::new();
        let earlier = then.get(array).and_then(Value::as_array).unwrap_or(&empty);
        for (i, t) in now
            .get(array)
            .and_then(Value::as_array)
            .unwrap_or(&empty)
            .iter()
            .enumerate()
        {
            rows.push(row(format!("{prefix}{i}"), t, earlier.get(i), dt));
        }
    }
    if let Some(m) = now.get("threads").and_then(Value::as_object) {
        for (name, t) in m {
            rows.push(row(
                name.clone(),
                t,
                then.pointer(&format!("/threads/{name}")),
                dt,
            ));
        }
    }
    let header = Header {
        fault_mode: now
            .get("fault_mode")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string(),
        resident_mib: u(now, "resident_pages") as f64 * PAGE / MIB,
        memslots: u(now, "memslots"),
        generation: u(now, "memslot_generation"),
        memslot_changes_per_s: delta(u(now, "memslot_changes"), u(then, "memslot_changes")) as f64
            / dt,
        discarded_pages_per_s: delta(u(now, "discarded_pages"), u(then, "discarded_pages")) as f64
            / dt,
        balloon_mib: now
            .get("balloon")
            .filter(|b| b.is_object())
            .map(|b| (u(b, "target_mib"), u(b, "actual_mib"))),
        hotplug_mib: now
            .get("hotplug")
            .filter(|h| h.is_object())
            .map(|h| (u(h, "requested_mib"), u(h, "plugged_mib"))),
        pages_per_s: rows.iter().map(|r| r.pages_per_s).sum(),
    };
    Frame {
        interval_s: dt,
        header,
        rows,
    }
}

impl Frame {
    /// Sort the rows: by name for [`SortBy::Thread`] (in the order the VM
    /// lists them), else busiest first.
    pub fn sort(&mut self, by: SortBy) {
        let key = |r: &Row| -> f64 {
            match by {
                SortBy::Thread => 0.0,
                SortBy::Faults => r.faults_per_s,
                SortBy::Installs => r.installs_per_s,
                SortBy::Retries => r.retries_per_s,
                SortBy::P99 => r.p99.unwrap_or(-1.0),
                SortBy::Blocked => r.blocked.unwrap_or(-1.0),
            }
        };
        // Stable: ties keep the VM's order.
        self.rows.sort_by(|a, b| key(b).total_cmp(&key(a)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn thread(
        mmio: u64,
        spec: u64,
        slow: u64,
        pages: u64,
        retries: u64,
        hist: &[u64],
        block: f64,
    ) -> Value {
        let bounds = [Some(1e-6), Some(2e-6), Some(4e-6), None];
        let buckets: Vec<Value> = bounds
            .iter()
            .zip(hist)
            .map(|(b, n)| json!([b, n]))
            .collect();
        json!({
            "faults": {"mmio": mmio, "memory_fault": 0},
            "speculative_installs": spec,
            "slow_path_installs": slow,
            "pages_installed": pages,
            "retries": retries,
            "blocktime_seconds": block,
            "fault_latency": {"sum_seconds": 0.0, "count": hist.iter().sum::<u64>(), "buckets": buckets},
        })
    }

    fn vm(vcpu: Value, generation: u64, changes: u64, balloon: Value) -> Value {
        json!({
            "fault_mode": "vcpu", "resident_pages": 512, "memslots": 2,
            "memslot_generation": generation, "memslot_changes": changes, "discarded_pages": 0,
            "vcpus": [vcpu], "handlers": [],
            "threads": {"events": {"faults": {"sigbus": 0}}},
            "balloon": balloon, "hotplug": null,
        })
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let then = vm(
            thread(10, 8, 2, 40, 1, &[5, 5, 0, 0], 0.5),
            3,
            3,
            json!(null),
        );
        let now = vm(
            thread(30, 24, 6, 120, 3, &[5, 15, 10, 0], 0.75),
            7,
            7,
            json!({"target_mib": 64, "actual_mib": 32}),
        );
        let fr = frame(&then, &now, 2.0);
        let r = &fr.rows[0];
        assert_eq!(r.name, "vcpu0");
        assert_eq!(r.faults, 30);
        assert_eq!(r.faults_per_s, 10.0);
        assert_eq!(r.kinds_per_s, vec![("mmio".to_string(), 10.0)]);
        assert_eq!(r.installs_per_s, 10.0);
        assert_eq!(r.pages_per_install, Some(4.0));
        assert_eq!(r.retries_per_s, 1.0);
        assert_eq!(r.blocked, Some(0.125));
        // Interval histogram: 0, 10, 10, 0: the median is the 2 µs bound.
        assert_eq!(r.p50, Some(2e-6));
        assert!((r.p99.unwrap() - 3.96e-6).abs() < 1e-12, "{:?}", r.p99);
        assert_eq!(fr.header.generation, 7);
        assert_eq!(fr.header.memslot_changes_per_s, 2.0);
        assert_eq!(fr.header.resident_mib, 2.0);
        assert_eq!(fr.header.balloon_mib, Some((64, 32)));
        assert_eq!(fr.header.hotplug_mib, None);
        assert_eq!(fr.header.pages_per_s, 40.0);
        assert_eq!(fr.rows[1].name, "events");
        assert_eq!(fr.rows[1].blocked, None);
        assert_eq!(fr.rows[1].p50, None);
    }

    #[test]
    fn quantile_in_the_open_bucket_is_the_last_bound() {
        let h = [(Some(1e-6), 1), (Some(2e-6), 0), (None, 99)];
        assert_eq!(quantile(&h, 0.99), Some(2e-6));
        assert_eq!(quantile(&h, 0.005), Some(0.5e-6));
        assert_eq!(quantile(&[(Some(1.0), 0), (None, 0)], 0.5), None);
    }

    #[test]
    fn a_counter_going_backwards_is_a_new_vm_not_a_negative_rate() {
        let then = vm(
            thread(100, 50, 0, 50, 9, &[0, 0, 0, 0], 9.0),
            9,
            9,
            json!(null),
        );
        let now = vm(thread(3, 3, 0, 3, 0, &[0, 0, 0, 0], 0.0), 0, 0, json!(null));
        let fr = frame(&then, &now, 1.0);
        let r = &fr.rows[0];
        assert_eq!(
            (r.faults_per_s, r.installs_per_s, r.retries_per_s),
            (0.0, 0.0, 0.0)
        );
        assert_eq!(r.blocked, Some(0.0));
    }

    #[test]
    fn sorting_puts_the_busiest_first_and_keeps_ties_in_order() {
        let then = json!({"vcpus": [{}, {}, {}]});
        let now = json!({"vcpus": [
            {"faults": {"mmio": 1}}, {"faults": {"mmio": 5}}, {"faults": {"mmio": 1}}
        ]});
        let mut fr = frame(&then, &now, 1.0);
        fr.sort(SortBy::Faults);
        let names: Vec<&str> = fr.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["vcpu1", "vcpu0", "vcpu2"]);
        assert_eq!(SortBy::Blocked.next(), SortBy::Thread);
    }
}
