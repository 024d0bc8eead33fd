//! A frame as plain text: what `--once` prints, and what `vmm top` prints
//! every interval when its output is not a terminal. The interactive view
//! shows the same cells ([`cells`]).

use std::fmt::Write;

use crate::frame::{Frame, Header, Row, SortBy};

/// The columns, whole words (a header names its unit).
pub const COLUMNS: [&str; 10] = [
    "thread",
    "faults",
    "faults/s",
    "installs/s",
    "pages/install",
    "retries/s",
    "p50",
    "p99",
    "blocked",
    "faults/s by kind",
];

/// A rate for a person: no decimals from 100 up.
pub fn rate(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Seconds as µs or ms.
pub fn latency(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1e-3 => format!("{:.1}us", s * 1e6),
        Some(s) => format!("{:.2}ms", s * 1e3),
    }
}

/// One row's cells, in [`COLUMNS`] order.
pub fn cells(r: &Row) -> [String; 10] {
    let kinds: Vec<String> = r
        .kinds_per_s
        .iter()
        .map(|(k, v)| format!("{k} {}", rate(*v)))
        .collect();
    [
        r.name.clone(),
        r.faults.to_string(),
        rate(r.faults_per_s),
        rate(r.installs_per_s),
        r.pages_per_install
            .map_or("-".into(), |p| format!("{p:.1}")),
        rate(r.retries_per_s),
        latency(r.p50),
        latency(r.p99),
        r.blocked
            .map_or("-".into(), |b| format!("{:.1}%", b * 100.0)),
        if kinds.is_empty() {
            "-".into()
        } else {
            kinds.join(", ")
        },
    ]
}

/// The header's lines: `key value` pairs a script can find.
pub fn header_lines(h: &Header, interval_s: f64) -> Vec<String> {
    let mut first = format!(
        "mode {}  resident {:.1} MiB  memslots {}  generation {}  memslot changes/s {}  pages installed/s {}  discarded pages/s {}",
        h.fault_mode,
        h.resident_mib,
        h.memslots,
        h.generation,
        rate(h.memslot_changes_per_s),
        rate(h.pages_per_s),
        rate(h.discarded_pages_per_s),
    );
    let _ = write!(first, "  interval {interval_s:.2}s");
    let balloon = match h.balloon_mib {
        Some((t, a)) => format!("balloon target {t} MiB actual {a} MiB"),
        None => "balloon -".into(),
    };
    let hotplug = match h.hotplug_mib {
        Some((r, p)) => format!("virtio-mem requested {r} MiB plugged {p} MiB"),
        None => "virtio-mem -".into(),
    };
    vec![first, format!("{balloon}  {hotplug}")]
}

/// The whole frame as aligned text.
pub fn render(frame: &Frame, sort: SortBy) -> String {
    let mut out = header_lines(&frame.header, frame.interval_s).join("\n");
    out.push_str(&format!("\nsorted by {}\n", sort.name()));
    let rows: Vec<[String; 10]> = frame.rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| -> String {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(l, "{c:<w$}");
            } else if i == cells.len() - 1 {
                let _ = write!(l, "  {c}");
            } else {
                let _ = write!(l, "  {c:>w$}");
            }
        }
        l.trim_end().to_string()
    };
    out.push_str(&line(&COLUMNS));
    out.push('\n');
    for r in &rows {
        let refs: Vec<&str> = r.iter().map(String::as_str).collect();
        out.push_str(&line(&refs));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::frame;
    use serde_json::json;

    #[test]
    fn columns_are_whole_words_and_rows_line_up() {
        let then = json!({"vcpus": [{"faults": {"mmio": 0}}], "fault_mode": "vcpu"});
        let now = json!({"vcpus": [{"faults": {"mmio": 1234}, "speculative_installs": 1234,
                                    "pages_installed": 4936, "blocktime_seconds": 0.5}],
                         "fault_mode": "vcpu", "memslot_generation": 5,
                         "hotplug": {"requested_mib": 128, "plugged_mib": 64}});
        let text = render(&frame(&then, &now, 1.0), SortBy::Thread);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("generation 5"), "{text}");
        assert!(lines[1].contains("balloon -"), "{text}");
        assert!(
            lines[1].contains("virtio-mem requested 128 MiB plugged 64 MiB"),
            "{text}"
        );
        let head = lines[3];
        let row = lines[4];
        for c in COLUMNS {
            assert!(head.contains(c), "{c} missing: {head}");
        }
        // Right-aligned numbers end under their header.
        let end = head.find("installs/s").unwrap() + "installs/s".len();
        assert_eq!(&row[end - 4..end + 2], "1234  ", "{text}");
        let end = head.find("pages/install").unwrap() + "pages/install".len();
        assert_eq!(&row[end - 3..end + 2], "4.0  ", "{text}");
        assert!(row.starts_with("vcpu0"), "{row}");
        assert!(row.contains("50.0%"), "{row}");
        assert!(row.ends_with("mmio 1234"), "{row}");
    }

    #[test]
    fn latencies_and_rates_read_well() {
        assert_eq!(latency(Some(3.2e-6)), "3.2us");
        assert_eq!(latency(Some(2.5e-3)), "2.50ms");
        assert_eq!(latency(None), "-");
        assert_eq!(rate(1234.4), "1234");
        assert_eq!(rate(0.25), "0.2");
    }
}
