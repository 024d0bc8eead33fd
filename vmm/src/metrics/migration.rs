//! Live-migration series: the source's progress (`GET /vm/migrate` in
//! numbers) and, on a post-copy destination, its incoming pages and the
//! request-latency histogram.

use crate::counters::{Metric, Sample};
use crate::fault::stats::LatencySnapshot;

/// What a scrape reads of migrations (the VM fills it from its status).
#[derive(Debug, Clone, Default)]
pub struct MigrationReading {
    /// The status as `GET /vm/migrate` gives it (for `/metrics.json`).
    pub json: serde_json::Value,
    /// The outgoing migration's numbers, once one ran.
    pub outgoing: Option<Outgoing>,
    /// A post-copy destination's incoming pages.
    pub incoming: Option<Incoming>,
    pub incoming_latency: Option<LatencySnapshot>,
}

#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    pub total_ns: u64,
    pub downtime_ns: u64,
    pub rounds: u64,
    pub pages_sent: u64,
    pub pages_pending: u64,
    pub pages_requested: u64,
    pub pages_pushed: u64,
    pub dirty_pages_per_s: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub pending_at_start: u64,
    pub left: u64,
    pub requests: u64,
    pub pages_requested: u64,
    pub pages_pushed: u64,
}

/// Reads it (the VM's control plane keeps the status).
pub type MigrationProbe = Box<dyn Fn() -> MigrationReading + Send + Sync>;

static TOTAL: Metric = Metric::gauge(
    "vmm_migration_total_seconds",
    "total_seconds",
    "The running or last outgoing migration's time so far",
)
.nanoseconds();
static DOWNTIME: Metric = Metric::gauge(
    "vmm_migration_downtime_seconds",
    "downtime_seconds",
    "How long the guest was stopped (post-copy: until it ran on the destination)",
)
.nanoseconds();
static ROUNDS: Metric = Metric::gauge(
    "vmm_migration_rounds",
    "rounds",
    "Pre-copy rounds after the first",
);
static PAGES: Metric = Metric::counter(
    "vmm_migration_pages",
    "pages",
    "Pages of the outgoing migration: sent while pre-copying and at the stop, left for post-copy, asked for by the destination, pushed",
);
const SENT: &[(&str, &str)] = &[("kind", "sent")];
const PENDING: &[(&str, &str)] = &[("kind", "postcopy_pending")];
const REQUESTED: &[(&str, &str)] = &[("kind", "requested")];
const PUSHED: &[(&str, &str)] = &[("kind", "pushed")];
static PAGES_SENT: Metric = PAGES.labels(SENT);
static PAGES_PENDING: Metric = PAGES.labels(PENDING);
static PAGES_REQUESTED: Metric = PAGES.labels(REQUESTED);
static PAGES_PUSHED: Metric = PAGES.labels(PUSHED);
static DIRTY_RATE: Metric = Metric::gauge(
    "vmm_migration_dirty_pages_per_second",
    "dirty_pages_per_second",
    "Pages the guest changed per second in the last pre-copy round",
);
static INCOMING: Metric = Metric::counter(
    "vmm_postcopy_incoming_pages",
    "incoming_pages",
    "A post-copy destination's pages: pending at the start, asked for, pushed unasked",
);
const AT_START: &[(&str, &str)] = &[("kind", "pending_at_start")];
static IN_AT_START: Metric = INCOMING.labels(AT_START);
static IN_LEFT: Metric = Metric::gauge(
    "vmm_postcopy_incoming_pages_left",
    "incoming_pages_left",
    "A post-copy destination's pages still at the source",
);
static IN_REQUESTED: Metric = INCOMING.labels(REQUESTED);
static IN_PUSHED: Metric = INCOMING.labels(PUSHED);
static IN_REQUESTS: Metric = Metric::counter(
    "vmm_postcopy_requests",
    "requests",
    "Page requests a post-copy destination sent on its urgent connection",
);

/// The request-latency histogram of a post-copy destination.
pub static REQUEST_LATENCY: Metric = Metric::histogram(
    "vmm_postcopy_request_latency_seconds",
    "request_latency",
    "A post-copy destination's page requests, from the request to the answer's arrival",
);

fn sample(metric: &'static Metric, value: u64) -> Sample {
    Sample {
        metric,
        labels: Vec::new(),
        value,
    }
}

/// Its samples: the outgoing migration's once one ran, the incoming
/// pages' on a post-copy destination.
pub fn samples(r: &MigrationReading) -> Vec<Sample> {
    let mut out = Vec::new();
    if let Some(o) = &r.outgoing {
        out.extend([
            sample(&TOTAL, o.total_ns),
            sample(&DOWNTIME, o.downtime_ns),
            sample(&ROUNDS, o.rounds),
            sample(&PAGES_SENT, o.pages_sent),
            sample(&PAGES_PENDING, o.pages_pending),
            sample(&PAGES_REQUESTED, o.pages_requested),
            sample(&PAGES_PUSHED, o.pages_pushed),
            sample(&DIRTY_RATE, o.dirty_pages_per_s),
        ]);
    }
    if let Some(i) = &r.incoming {
        out.extend([
            sample(&IN_AT_START, i.pending_at_start),
            sample(&IN_LEFT, i.left),
            sample(&IN_REQUESTED, i.pages_requested),
            sample(&IN_PUSHED, i.pages_pushed),
            sample(&IN_REQUESTS, i.requests),
        ]);
    }
    out
}
