//! Prometheus/OpenMetrics text for a [`MetricsSnapshot`], through
//! `prometheus-client`'s encoder (a collector that encodes each scrape's
//! snapshot: the counters live on the fault path, not in the registry).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{MetricsSnapshot, ThreadMetrics};

#[derive(Debug)]
struct Snap(MetricsSnapshot);

type Labels = Vec<(&'static str, String)>;

/// Per-thread series: `vcpu="N"` for vCPUs, `handler="N"` for handler
/// threads, `thread="NAME"` for other VMM threads (devices, API) that met a
/// missing page.
fn threads(s: &MetricsSnapshot) -> impl Iterator<Item = (Labels, &ThreadMetrics)> {
    let v = s
        .vcpus
        .iter()
        .enumerate()
        .map(|(i, t)| (vec![("vcpu", i.to_string())], t));
    let h = s
        .handlers
        .iter()
        .enumerate()
        .map(|(i, t)| (vec![("handler", i.to_string())], t));
    let o = s
        .threads
        .iter()
        .map(|(name, t)| (vec![("thread", name.to_string())], t));
    v.chain(h).chain(o)
}

fn counter_family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: Vec<(Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: Labels,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m.encode_family(&labels)?)
}

impl Collector for Snap {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let per = |f: &dyn Fn(&ThreadMetrics) -> u64| -> Vec<(Labels, u64)> {
            threads(s).map(|(l, t)| (l, f(t))).collect()
        };
        let mut faults = Vec::new();
        for (l, t) in threads(s) {
            for (kind, v) in &t.faults {
                let mut l = l.clone();
                l.push(("kind", kind.to_string()));
                faults.push((l, *v));
            }
        }
        counter_family(
            &mut enc,
            "vmm_faults",
            "Stage-2 faults served, by how they reached the VMM",
            faults,
        )?;
        counter_family(
            &mut enc,
            "vmm_speculative_installs",
            "Pages installed on the speculative (lock-free lookup + trylock) path",
            per(&|t| t.speculative_installs),
        )?;
        counter_family(
            &mut enc,
            "vmm_fault_retries",
            "Speculative attempts that bailed out (memslot change, removal, contention) and retried under the slots lock",
            per(&|t| t.retries),
        )?;
        counter_family(
            &mut enc,
            "vmm_slow_path_installs",
            "Pages installed under the slots lock after a retry",
            per(&|t| t.slow_path_installs),
        )?;
        counter_family(
            &mut enc,
            "vmm_already_present",
            "Faults whose page another thread had installed first",
            per(&|t| t.already_present),
        )?;
        counter_family(
            &mut enc,
            "vmm_pages_installed",
            "Pages installed by this thread",
            per(&|t| t.pages_installed),
        )?;
        counter_family(
            &mut enc,
            "vmm_source_read_bytes",
            "Bytes read from page sources (memory image files)",
            per(&|t| t.source_bytes),
        )?;
        let mut exits = Vec::new();
        for (l, t) in s
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, t)| (vec![("vcpu", i.to_string())], t))
        {
            for (reason, v) in &t.exits {
                let mut l = l.clone();
                l.push(("reason", reason.to_string()));
                exits.push((l, *v));
            }
        }
        counter_family(&mut enc, "vmm_exits", "KVM_RUN exits, by reason", exits)?;
        let mut assists = Vec::new();
        for (i, t) in s.vcpus.iter().enumerate() {
            for (kind, v) in &t.assists {
                assists.push((
                    vec![("vcpu", i.to_string()), ("kind", kind.to_string())],
                    *v,
                ));
            }
        }
        counter_family(
            &mut enc,
            "vmm_assists",
            "What the VMM did for the guest on a PVM host, by kind",
            assists,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "vmm_assist_seconds",
                "Time the VMM spent on assists (exit to re-entry)",
                None,
                MetricType::Counter,
            )?;
            for (i, t) in s.vcpus.iter().enumerate() {
                ConstCounter::new(t.assist_seconds)
                    .encode(m.encode_family(&vec![("vcpu", i.to_string())])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "vmm_fault_latency_seconds",
                "Fault latency from the exit (or event) to re-entry (or wake)",
                None,
                MetricType::Histogram,
            )?;
            for (labels, t) in threads(s) {
                let h = &t.fault_latency;
                let buckets: Vec<(f64, u64)> = h
                    .buckets
                    .iter()
                    .map(|(b, n)| (b.unwrap_or(f64::INFINITY), *n))
                    .collect();
                m.encode_family(&labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        h.sum_seconds,
                        h.count,
                        &buckets,
                        None,
                    )?;
            }
        }
        gauge(
            &mut enc,
            "vmm_memslot_generation",
            "Generation of the memslot table (bumped by every committed change)",
            vec![],
            s.memslot_generation as i64,
        )?;
        counter_family(
            &mut enc,
            "vmm_memslot_changes",
            "Memslot changes (hotplug, unplug)",
            vec![(vec![], s.memslot_changes)],
        )?;
        gauge(
            &mut enc,
            "vmm_resident_pages",
            "Guest RAM pages resident on the host",
            vec![],
            s.resident_pages as i64,
        )?;
        counter_family(
            &mut enc,
            "vmm_discarded_pages",
            "Guest RAM pages discarded (balloon)",
            vec![(vec![], s.discarded_pages)],
        )?;
        let dev = |f: &dyn Fn(&crate::devices::virtio::manager::DeviceSummary) -> u64| {
            s.devices
                .iter()
                .map(|d| (vec![("device", d.name.to_string())], f(d)))
                .collect::<Vec<_>>()
        };
        counter_family(
            &mut enc,
            "vmm_virtio_notifies",
            "Queue notifications a virtio device received",
            dev(&|d| d.notifies),
        )?;
        counter_family(
            &mut enc,
            "vmm_virtio_chains",
            "Descriptor chains a virtio device completed",
            dev(&|d| d.chains),
        )?;
        counter_family(
            &mut enc,
            "vmm_virtio_guest_errors",
            "Guest errors a virtio device met (bad registers, descriptors, requests)",
            dev(&|d| d.guest_errors),
        )?;
        counter_family(
            &mut enc,
            "vmm_virtio_needs_reset",
            "Times a virtio device entered NEEDS_RESET",
            dev(&|d| d.needs_reset),
        )?;
        if let Some(b) = &s.balloon {
            gauge(
                &mut enc,
                "vmm_balloon_target_pages",
                "Balloon target (4 KiB pages)",
                vec![],
                b.target_pages as i64,
            )?;
            gauge(
                &mut enc,
                "vmm_balloon_actual_pages",
                "Pages in the balloon, as the guest reports it",
                vec![],
                b.actual_pages as i64,
            )?;
            for (name, help, v) in [
                (
                    "vmm_balloon_inflated_pages",
                    "Pages inflated (discarded)",
                    b.inflated_pages,
                ),
                (
                    "vmm_balloon_deflated_pages",
                    "Pages deflated",
                    b.deflated_pages,
                ),
                (
                    "vmm_balloon_reported_pages",
                    "Free pages the guest reported (discarded)",
                    b.reported_pages,
                ),
                (
                    "vmm_balloon_discarded_bytes",
                    "Bytes of guest RAM the balloon discarded",
                    b.discarded_bytes,
                ),
                (
                    "vmm_balloon_rejected_descriptors",
                    "Balloon descriptor chains rejected as malformed",
                    b.rejected_descriptors,
                ),
                (
                    "vmm_balloon_pfns_outside_ram",
                    "Balloon PFNs outside guest RAM (ignored)",
                    b.pfns_outside_ram,
                ),
            ] {
                counter_family(&mut enc, name, help, vec![(vec![], v)])?;
            }
            let mut m = enc.encode_descriptor(
                "vmm_balloon_guest_stat",
                "The guest's latest memory statistics (VIRTIO_BALLOON_S_*)",
                None,
                MetricType::Gauge,
            )?;
            for (stat, v) in &b.guest_stats {
                let labels: Labels = vec![("stat", stat.clone())];
                ConstGauge::new(*v as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Some(h) = &s.hotplug {
            gauge(
                &mut enc,
                "vmm_hotplug_plugged_bytes",
                "virtio-mem: bytes plugged",
                vec![],
                (h.plugged_mib << 20) as i64,
            )?;
            gauge(
                &mut enc,
                "vmm_hotplug_requested_bytes",
                "virtio-mem: requested_size",
                vec![],
                (h.requested_mib << 20) as i64,
            )?;
            let mut rows = Vec::new();
            for (kind, by) in &h.requests {
                for (result, v) in by {
                    rows.push((
                        vec![("request", kind.clone()), ("result", result.clone())],
                        *v,
                    ));
                }
            }
            counter_family(
                &mut enc,
                "vmm_hotplug_requests",
                "virtio-mem requests, by kind and result",
                rows,
            )?;
            counter_family(
                &mut enc,
                "vmm_hotplug_slices_added",
                "128 MiB slices that became memslots (first block plugged)",
                vec![(vec![], h.slices_added)],
            )?;
            counter_family(
                &mut enc,
                "vmm_hotplug_slices_removed",
                "128 MiB slices whose memslot was removed (last block unplugged)",
                vec![(vec![], h.slices_removed)],
            )?;
        }
        gauge(
            &mut enc,
            "vmm_fault_mode",
            "How guest RAM is populated (1 for the active mode)",
            vec![("mode", s.fault_mode.to_string())],
            1,
        )?;
        Ok(())
    }
}

/// OpenMetrics text of one snapshot.
pub fn render(s: MetricsSnapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snap(s)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}
