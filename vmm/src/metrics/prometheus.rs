//! OpenMetrics text for a [`MetricsSnapshot`], through `prometheus-client`'s
//! encoder: a collector that encodes each scrape's samples family by
//! family, as the tables declare them (the counters live where they are
//! counted, not in the registry).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::MetricsSnapshot;
use crate::counters::{Kind, Sample, Unit};
use crate::fault::stats::{bucket_bound_ns, FAULT_LATENCY, LATENCY_BUCKETS};

#[derive(Debug)]
struct Snap(MetricsSnapshot);

type Labels = Vec<(&'static str, String)>;

/// One sample's labels: where it is (thread, device), then its row's own.
fn labels_of(s: &Sample) -> Labels {
    let own = s.metric.labels.iter().map(|(k, v)| (*k, v.to_string()));
    s.labels.iter().cloned().chain(own).collect()
}

/// Samples of one family, encoded under its row's name, help and kind.
fn family(enc: &mut DescriptorEncoder, samples: &[&Sample]) -> Result<(), std::fmt::Error> {
    let m = samples[0].metric;
    let kind = match m.kind {
        Kind::Counter => MetricType::Counter,
        _ => MetricType::Gauge,
    };
    let mut f = enc.encode_descriptor(m.name, m.help, None, kind)?;
    for s in samples {
        let labels = labels_of(s);
        let e = f.encode_family(&labels)?;
        match (m.kind, m.unit) {
            (Kind::Counter, Unit::Count) => ConstCounter::new(s.value).encode(e)?,
            (Kind::Counter, Unit::Nanoseconds) => ConstCounter::new(m.export(s.value)).encode(e)?,
            (_, Unit::Count) => ConstGauge::new(s.value as i64).encode(e)?,
            (_, Unit::Nanoseconds) => ConstGauge::new(m.export(s.value)).encode(e)?,
        }
    }
    Ok(())
}

impl Collector for Snap {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let samples = s.samples();
        // Families in the order their first row appears.
        let mut names: Vec<&str> = Vec::new();
        for x in &samples {
            if !names.contains(&x.metric.name) {
                names.push(x.metric.name);
            }
        }
        for name in names {
            let rows: Vec<&Sample> = samples.iter().filter(|x| x.metric.name == name).collect();
            family(&mut enc, &rows)?;
        }
        let mut m = enc.encode_descriptor(
            FAULT_LATENCY.name,
            FAULT_LATENCY.help,
            None,
            MetricType::Histogram,
        )?;
        for t in s.threads() {
            let l = &t.stats.latency;
            m.encode_family(&vec![t.label.clone()])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    l.sum_ns as f64 / 1e9,
                    l.count,
                    &buckets(l),
                    None,
                )?;
        }
        if let Some(l) = s.migration.as_ref().and_then(|m| m.incoming_latency) {
            let r = &super::migration::REQUEST_LATENCY;
            let mut m = enc.encode_descriptor(r.name, r.help, None, MetricType::Histogram)?;
            m.encode_family(&Vec::<(&str, String)>::new())?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                l.sum_ns as f64 / 1e9,
                l.count,
                &buckets(&l),
                None,
            )?;
        }
        Ok(())
    }
}

/// A latency histogram's buckets as (upper bound in seconds, count).
fn buckets(l: &crate::fault::stats::LatencySnapshot) -> Vec<(f64, u64)> {
    (0..LATENCY_BUCKETS)
        .map(|i| {
            let bound = bucket_bound_ns(i).map_or(f64::INFINITY, |b| b as f64 / 1e9);
            (bound, l.buckets[i])
        })
        .collect()
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
