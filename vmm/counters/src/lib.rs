//! Counters declared once.
//!
//! Every layer that counts something (the fault engine per serving thread,
//! the memory manager per VM, each device) declares its counters with
//! [`metrics!`]: one line per series gives the Prometheus name, the JSON key
//! (also the summary's column), the help text, the kind and the labels, and
//! names the index of its value in a [`Counters`] array. The readers — the
//! OpenMetrics encoder, the JSON of `/metrics.json` and of the API, the
//! end-of-run summary, `vmm ctl` — walk the same table, so adding a counter
//! is one line here plus the line that bumps it.
//!
//! Storage is one cache line per value, written with relaxed atomics: no
//! lock and no allocation where the counting happens (the fault path).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a series is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (exported with `_total`).
    Counter,
    /// A level (may go down).
    Gauge,
    /// A latency distribution (its storage is its own).
    Histogram,
}

/// How a stored value is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// As stored.
    Count,
    /// Stored in nanoseconds, exported in seconds (the name says `_seconds`).
    Nanoseconds,
}

/// Which fault-serving threads a per-thread series exists for: a thread
/// outside the scope does not export it (it could never move there). Rows
/// of tables that are not per thread keep [`Scope::ANY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope(u8);

impl Scope {
    /// vCPU threads.
    pub const VCPU: Scope = Scope(1);
    /// userfaultfd handler threads (`--fault-mode handler`).
    pub const HANDLER: Scope = Scope(2);
    /// Other VMM threads that may meet a missing page (devices, the API).
    pub const VMM: Scope = Scope(4);
    pub const ANY: Scope = Scope(7);

    pub const fn or(self, other: Scope) -> Scope {
        Scope(self.0 | other.0)
    }

    pub const fn contains(self, other: Scope) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: Scope) -> bool {
        self.0 & other.0 != 0
    }
}

/// One series: a row of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// The Prometheus family (without `_total`), e.g. `vmm_faults`.
    pub name: &'static str,
    /// The key in JSON and the summary's column, e.g. `faults`. Rows of one
    /// family share it; their labels tell them apart.
    pub key: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub scope: Scope,
    /// Fixed labels of this row, e.g. `[("kind", "mmio")]`.
    pub labels: &'static [(&'static str, &'static str)],
}

impl Metric {
    pub const fn counter(name: &'static str, key: &'static str, help: &'static str) -> Self {
        Metric {
            name,
            key,
            help,
            kind: Kind::Counter,
            unit: Unit::Count,
            scope: Scope::ANY,
            labels: &[],
        }
    }

    pub const fn gauge(name: &'static str, key: &'static str, help: &'static str) -> Self {
        Metric {
            kind: Kind::Gauge,
            ..Metric::counter(name, key, help)
        }
    }

    pub const fn histogram(name: &'static str, key: &'static str, help: &'static str) -> Self {
        Metric {
            kind: Kind::Histogram,
            unit: Unit::Nanoseconds,
            ..Metric::counter(name, key, help)
        }
    }

    /// The same row with fixed labels.
    pub const fn labels(self, labels: &'static [(&'static str, &'static str)]) -> Self {
        Metric { labels, ..self }
    }

    /// The same row, stored in nanoseconds and exported in seconds.
    pub const fn nanoseconds(self) -> Self {
        Metric {
            unit: Unit::Nanoseconds,
            ..self
        }
    }

    /// The same row, for the threads of `scope` only.
    pub const fn only(self, scope: Scope) -> Self {
        Metric { scope, ..self }
    }

    /// A stored value as exported.
    pub fn export(&self, v: u64) -> f64 {
        match self.unit {
            Unit::Count => v as f64,
            Unit::Nanoseconds => v as f64 / 1e9,
        }
    }

    /// The first label's value (the JSON sub-key of a labelled row).
    pub fn label_value(&self) -> Option<&'static str> {
        self.labels.first().map(|(_, v)| *v)
    }
}

/// Declare a table: an enum whose variants index the rows, and the rows.
///
/// ```
/// vmm_counters::metrics! {
///     /// Counters of a thing.
///     pub enum ThingStat in THING_METRICS {
///         /// Things done.
///         Done = vmm_counters::Metric::counter("vmm_things_done", "done", "Things done"),
///         Failed = vmm_counters::Metric::counter("vmm_things", "things", "Things by result")
///             .labels(&[("result", "failed")]),
///     }
/// }
/// assert_eq!(THING_METRICS[ThingStat::Failed as usize].key, "things");
/// assert_eq!(ThingStat::COUNT, 2);
/// let c: vmm_counters::Counters<ThingStat, { ThingStat::COUNT }> = Default::default();
/// c.add_shared(ThingStat::Failed, 1);
/// assert_eq!(c.read(), [0, 1]);
/// ```
#[macro_export]
macro_rules! metrics {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident in $table:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $row:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(usize)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $crate::Row for $name {
            fn index(self) -> usize {
                self as usize
            }
        }

        #[allow(dead_code)]
        impl $name {
            /// Every row, in table order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            /// Number of rows.
            pub const COUNT: usize = Self::ALL.len();

            /// This row's description.
            pub fn metric(self) -> &'static $crate::Metric {
                &$table[self as usize]
            }
        }

        /// The rows, indexed by the enum of the same declaration.
        $vis static $table: [$crate::Metric; $name::COUNT] = [$($row),*];
    };
}

/// One value on its own cache line.
#[repr(align(64))]
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Owner-only increment: a relaxed load and store (no locked RMW). Only
    /// the one thread that owns the counter may call it.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Increment from any thread.
    #[inline]
    pub fn add_shared(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// A row of a table: the enum [`metrics!`] declares.
pub trait Row: Copy {
    fn index(self) -> usize;
}

/// The values of one table, indexed by its enum `E` (`N` is its row count,
/// `E::COUNT`).
pub struct Counters<E, const N: usize> {
    values: [Counter; N],
    rows: std::marker::PhantomData<E>,
}

impl<E, const N: usize> Default for Counters<E, N> {
    fn default() -> Self {
        Counters {
            values: std::array::from_fn(|_| Counter::default()),
            rows: std::marker::PhantomData,
        }
    }
}

impl<E: Row, const N: usize> Counters<E, N> {
    /// Owner-only increment (see [`Counter::add`]).
    #[inline]
    pub fn add(&self, row: E, n: u64) {
        self.values[row.index()].add(n);
    }

    /// Increment from any thread.
    #[inline]
    pub fn add_shared(&self, row: E, n: u64) {
        self.values[row.index()].add_shared(n);
    }

    #[inline]
    pub fn get(&self, row: E) -> u64 {
        self.values[row.index()].get()
    }

    #[inline]
    pub fn set(&self, row: E, v: u64) {
        self.values[row.index()].set(v);
    }

    /// Every value now (each read once).
    pub fn read(&self) -> [u64; N] {
        std::array::from_fn(|i| self.values[i].get())
    }

    /// Set every value (a restored device goes on counting from what it
    /// had); extra values are ignored, missing ones left as they are.
    pub fn load(&self, values: &[u64]) {
        for (c, v) in self.values.iter().zip(values) {
            c.set(*v);
        }
    }
}

/// One exported value: its row, the labels that place it (thread, device,
/// ...) besides the row's own, and the value as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub metric: &'static Metric,
    pub labels: Vec<(&'static str, String)>,
    pub value: u64,
}

/// The values of a table's rows at one moment, with the rows that apply
/// (a thread outside a row's scope does not export it). What every reader
/// takes: JSON (a map of keys, nested by the rows' label values), samples
/// for Prometheus, and single values for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Readings {
    rows: &'static [Metric],
    values: Vec<u64>,
    scope: Scope,
}

impl Readings {
    /// `values[i]` is `rows[i]`'s value; rows outside `scope` are left out.
    pub fn new(rows: &'static [Metric], values: &[u64], scope: Scope) -> Self {
        debug_assert_eq!(rows.len(), values.len());
        Readings {
            rows,
            values: values.to_vec(),
            scope,
        }
    }

    /// Row `i`'s value (a table enum `as usize`).
    pub fn get(&self, i: usize) -> u64 {
        self.values.get(i).copied().unwrap_or(0)
    }

    /// The rows that apply, with their values.
    pub fn rows(&self) -> impl Iterator<Item = (&'static Metric, u64)> + '_ {
        self.rows
            .iter()
            .zip(self.values.iter().copied())
            .filter(|(m, _)| self.scope.intersects(m.scope))
    }

    /// The rows that apply as samples, each with `labels` first.
    pub fn samples(&self, labels: &[(&'static str, String)]) -> Vec<Sample> {
        self.rows()
            .map(|(metric, value)| Sample {
                metric,
                labels: labels.to_vec(),
                value,
            })
            .collect()
    }

    /// `{key: value}` per row, `{key: {label value: ...}}` for labelled rows.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        for (m, v) in self.rows() {
            let value = match m.unit {
                Unit::Count => serde_json::Value::from(v),
                Unit::Nanoseconds => serde_json::Value::from(m.export(v)),
            };
            // The path: the key, then each label's value.
            let path: Vec<&str> = std::iter::once(m.key)
                .chain(m.labels.iter().map(|(_, v)| *v))
                .collect();
            insert(&mut out, &path, value);
        }
        out
    }
}

/// Put `value` at `path` in nested maps (a path through a non-map leaves
/// the map as it is: tables never declare one).
fn insert(
    map: &mut serde_json::Map<String, serde_json::Value>,
    path: &[&str],
    value: serde_json::Value,
) {
    match path {
        [] => {}
        [last] => {
            map.insert(last.to_string(), value);
        }
        [first, rest @ ..] => {
            let next = map
                .entry(first.to_string())
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
            if let Some(inner) = next.as_object_mut() {
                insert(inner, rest, value);
            }
        }
    }
}

impl serde::Serialize for Readings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    metrics! {
        enum T in T_METRICS {
            A = Metric::counter("vmm_a", "a", "A"),
            B1 = Metric::counter("vmm_b", "b", "B").labels(&[("kind", "one")]),
            B2 = Metric::counter("vmm_b", "b", "B").labels(&[("kind", "two")]),
            Ns = Metric::gauge("vmm_t_seconds", "t_seconds", "T").nanoseconds(),
        }
    }

    #[test]
    fn a_table_is_indexed_by_its_enum() {
        assert_eq!(T::COUNT, 4);
        assert_eq!(T::B2.metric().label_value(), Some("two"));
        assert_eq!(T_METRICS[T::Ns as usize].kind, Kind::Gauge);
        let c: Counters<T, { T::COUNT }> = Counters::default();
        c.add(T::A, 3);
        c.add(T::B2, 2);
        c.add_shared(T::Ns, 1_500_000_000);
        let v = c.read();
        assert_eq!(v, [3, 0, 2, 1_500_000_000]);
        let r = Readings::new(&T_METRICS, &v, Scope::ANY);
        assert_eq!(r.get(T::B2 as usize), 2);
        let s = r.samples(&[("vcpu", "0".into())]);
        assert_eq!(s.len(), 4);
        assert_eq!(
            s[3].metric.export(s[3].value),
            1.5,
            "nanoseconds export as seconds"
        );
        assert_eq!(s[0].labels, vec![("vcpu", "0".to_string())]);
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"a": 3, "b": {"one": 0, "two": 2}, "t_seconds": 1.5})
        );
    }

    metrics! {
        enum U in U_METRICS {
            All = Metric::counter("vmm_all", "all", "All"),
            Vcpu = Metric::counter("vmm_v", "v", "V").only(Scope::VCPU),
            Handler = Metric::counter("vmm_h", "h", "H").only(Scope::HANDLER),
            Some = Metric::counter("vmm_s", "s", "S").only(Scope::VCPU.or(Scope::VMM)),
        }
    }

    #[test]
    fn rows_outside_a_threads_scope_are_left_out() {
        let keys = |scope| {
            let r = Readings::new(&U_METRICS, &[0; U::COUNT], scope);
            r.rows().map(|(m, _)| m.key).collect::<Vec<_>>()
        };
        assert_eq!(keys(Scope::VCPU), ["all", "v", "s"]);
        assert_eq!(keys(Scope::HANDLER), ["all", "h"]);
        assert_eq!(keys(Scope::VMM), ["all", "s"]);
        assert_eq!(keys(Scope::ANY), ["all", "v", "h", "s"]);
    }
}
