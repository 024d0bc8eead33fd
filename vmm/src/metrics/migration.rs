//! Live-migration series: the source's progress (`GET /vm/migrate` in
//! numbers) and, on a post-copy destination, its incoming pages and the
//! request-latency histogram.

use crate::counters::{Metric, Sample};
use crate::fault::stats::LatencySnapshot;
use crate::snapshot::send::MigrationStatus;

/// What a scrape reads of migrations.
#[derive(Debug, Clone)]
pub struct MigrationReading {
    pub status: MigrationStatus,
    /// A post-copy destination's request latency.
    pub incoming_latency: Option<LatencySnapshot>,
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
    let s = &r.status;
    let mut out = Vec::new();
    if s.state != "idle" {
        let ms = |v: Option<f64>| (v.unwrap_or(0.0) * 1e6) as u64;
        out.extend([
            sample(&TOTAL, ms(Some(s.total_ms))),
            sample(&DOWNTIME, ms(s.downtime_ms)),
            sample(&ROUNDS, u64::from(s.round)),
            sample(&PAGES_SENT, s.pages_sent),
            sample(&PAGES_PENDING, s.pages_pending),
            sample(&PAGES_REQUESTED, s.pages_requested),
            sample(&PAGES_PUSHED, s.pages_pushed),
            sample(&DIRTY_RATE, s.dirty_pages_per_s as u64),
        ]);
    }
    if let Some(i) = &s.incoming {
        out.extend([
            sample(&IN_AT_START, i.pages_pending_at_start),
            sample(&IN_LEFT, i.pages_left),
            sample(&IN_REQUESTED, i.pages_requested),
            sample(&IN_PUSHED, i.pages_pushed),
            sample(&IN_REQUESTS, i.requests),
        ]);
    }
    out
}
