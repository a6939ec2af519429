//! What the metrics read from the layers at scrape time: pool sizes, retries, divergences.
//! The layers expose plain counters; nothing here is called from a store's hot path.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::backend::redis::RedisShared;

use super::clamp_i64;

/// `redis_connection_pool_size{status="active"|"idle"}`, read from the pools at scrape time.
///
/// Pools are attached with [`PoolGauge::watch`] (any `(open, idle)` source) or
/// [`PoolGauge::watch_redis`]; several pools are summed. Sources are asked when the registry is
/// gathered, so the figures are those of the scrape, not of the last operation. A source that
/// returns `None` (its pool was dropped) is forgotten.
#[derive(Clone)]
pub struct PoolGauge {
    gauge: IntGaugeVec,
    /// `std::sync::Mutex`: taken only at scrape time and when a pool is attached, never on the
    /// store's hot path.
    pub(super) sources: Arc<Mutex<Vec<PoolSource>>>,
}

type PoolSource = Box<dyn Fn() -> Option<(u32, u32)> + Send + Sync>;

impl fmt::Debug for PoolGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sources.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("PoolGauge").field("sources", &n).finish()
    }
}

impl PoolGauge {
    pub(super) fn new() -> prometheus::Result<PoolGauge> {
        Ok(PoolGauge {
            gauge: IntGaugeVec::new(
                Opts::new(
                    "redis_connection_pool_size",
                    "Pooled Redis connections: active (checked out) and idle.",
                ),
                &["status"],
            )?,
            sources: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Attaches a pool: `source` returns `(open, idle)` connections, or `None` once the pool is
    /// gone. `active` is `open - idle`.
    pub fn watch(&self, source: impl Fn() -> Option<(u32, u32)> + Send + Sync + 'static) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(source));
    }

    /// Attaches a Redis pool through [`RedisShared::pool_state`]. Holds only a weak reference:
    /// the gauge never keeps a pool (and its sockets) alive.
    pub fn watch_redis(&self, shared: &Arc<RedisShared>) {
        let weak: Weak<RedisShared> = Arc::downgrade(shared);
        self.watch(move || weak.upgrade().map(|s| s.pool_state()));
    }

    /// Asks every source and sets the gauge to the sums.
    fn refresh(&self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let (mut open, mut idle) = (0u64, 0u64);
        sources.retain(|source| match source() {
            Some((o, i)) => {
                open += u64::from(o);
                idle += u64::from(i);
                true
            }
            None => false,
        });
        self.gauge
            .with_label_values(&["active"])
            .set(clamp_i64(open.saturating_sub(idle)));
        self.gauge.with_label_values(&["idle"]).set(clamp_i64(idle));
    }
}

impl Collector for PoolGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.gauge.collect()
    }
}

/// A counter read from the layers at scrape time: each source returns its own running total
/// (a layer's plain counter), and the counter advances by what each source added since the
/// last scrape. A source that returns `None` (its layer is gone) is dropped; what it counted
/// stays counted, so the counter never goes down.
#[derive(Clone)]
pub(crate) struct ObservedCounter {
    counter: IntCounterVec,
    /// `std::sync::Mutex`: taken at scrape time and when a source is attached only.
    sources: Arc<Mutex<Vec<CounterSource>>>,
}

struct CounterSource {
    /// The labels of a one-series source; empty for a source of several series (whose reads
    /// carry their labels). With `id`, what tells a source attached again.
    labels: Vec<String>,
    /// The object read, when known: attaching it again is a no-op, not a double count.
    id: Option<usize>,
    read: SeriesRead,
    /// Each series' total at the last scrape.
    last: HashMap<Vec<String>, u64>,
}

/// Reads a source's running totals, one per series (label values), or `None` once its layer
/// is gone.
type SeriesRead = Box<dyn Fn() -> Option<Vec<(Vec<String>, u64)>> + Send + Sync>;

impl ObservedCounter {
    pub(crate) fn new(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        Ok(ObservedCounter {
            counter: IntCounterVec::new(Opts::new(name, help), labels)?,
            sources: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Attaches a source of one series, `labels`.
    pub(crate) fn watch(
        &self,
        labels: &[&str],
        id: Option<usize>,
        read: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) {
        let labels: Vec<String> = labels.iter().map(|l| (*l).to_string()).collect();
        let series = labels.clone();
        let attached = self.attach(
            labels.clone(),
            id,
            Box::new(move || read().map(|n| vec![(series.clone(), n)])),
        );
        if attached {
            // Zero series from the start, so dashboards see 0 rather than no data.
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            self.counter.with_label_values(&refs);
        }
    }

    /// Attaches a source of several series, each read with its label values; a series
    /// appears with its first count.
    pub(crate) fn watch_series(
        &self,
        id: Option<usize>,
        read: impl Fn() -> Option<Vec<(Vec<String>, u64)>> + Send + Sync + 'static,
    ) {
        self.attach(Vec::new(), id, Box::new(read));
    }

    /// False when a source of this `id` and `labels` is attached already.
    fn attach(&self, labels: Vec<String>, id: Option<usize>, read: SeriesRead) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if id.is_some() && sources.iter().any(|s| s.id == id && s.labels == labels) {
            return false;
        }
        sources.push(CounterSource {
            labels,
            id,
            read,
            last: HashMap::new(),
        });
        true
    }

    fn refresh(&self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.retain_mut(|s| {
            let Some(now) = (s.read)() else {
                return false;
            };
            for (labels, total) in now {
                let last = s.last.get(&labels).copied().unwrap_or(0);
                let added = total.saturating_sub(last);
                if added > 0 {
                    let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
                    self.counter.with_label_values(&refs).inc_by(added);
                }
                s.last.insert(labels, last.max(total));
            }
            true
        });
    }

    #[cfg(test)]
    pub(crate) fn source_count(&self) -> usize {
        self.sources.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl fmt::Debug for ObservedCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sources.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("ObservedCounter")
            .field("sources", &n)
            .finish()
    }
}

impl Collector for ObservedCounter {
    fn desc(&self) -> Vec<&Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.counter.collect()
    }
}

/// Reads the retries of a Redis pool per namespace and operation, weakly: the metrics never
/// keep a pool alive.
#[allow(clippy::type_complexity)]
pub(crate) fn retries_of(
    shared: &Arc<RedisShared>,
) -> (
    usize,
    impl Fn() -> Option<Vec<(Vec<String>, u64)>> + Send + Sync + 'static,
) {
    let weak: Weak<RedisShared> = Arc::downgrade(shared);
    (Arc::as_ptr(shared) as usize, move || {
        weak.upgrade().map(|s| {
            s.retries_by_operation()
                .into_iter()
                .map(|r| (vec![r.namespace, r.operation.to_string()], r.count))
                .collect()
        })
    })
}

/// A gauge per label value read from the layers at scrape time, summed over the sources of
/// each label value; it can also be set by hand for label values no source reads. When the
/// last source of a label value is gone, the gauge goes to 0 (a queue that is gone holds
/// nothing).
#[derive(Clone)]
pub(crate) struct ObservedGauge {
    pub(super) gauge: IntGaugeVec,
    /// `std::sync::Mutex`: taken at scrape time and when a source is attached only.
    sources: Arc<Mutex<Vec<GaugeSource>>>,
}

struct GaugeSource {
    label: String,
    read: Box<dyn Fn() -> Option<u64> + Send + Sync>,
}

impl ObservedGauge {
    pub(crate) fn new(name: &str, help: &str, label: &str) -> prometheus::Result<Self> {
        Ok(ObservedGauge {
            gauge: IntGaugeVec::new(Opts::new(name, help), &[label])?,
            sources: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub(crate) fn watch(
        &self,
        label: &str,
        read: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) {
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(GaugeSource {
                label: label.to_string(),
                read: Box::new(read),
            });
    }

    fn refresh(&self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut sums: Vec<(String, u64)> = Vec::new();
        let mut add = |label: &str, n: u64| match sums.iter_mut().find(|(l, _)| l == label) {
            Some((_, sum)) => *sum += n,
            None => sums.push((label.to_string(), n)),
        };
        sources.retain(|s| match (s.read)() {
            Some(n) => {
                add(&s.label, n);
                true
            }
            None => {
                add(&s.label, 0);
                false
            }
        });
        for (label, sum) in sums {
            self.gauge.with_label_values(&[&label]).set(clamp_i64(sum));
        }
    }
}

impl fmt::Debug for ObservedGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sources.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("ObservedGauge")
            .field("sources", &n)
            .finish()
    }
}

impl Collector for ObservedGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus::Registry;

    use crate::metrics::{render, Metrics};

    #[test]
    fn pool_gauge_sums_sources_and_forgets_dropped_ones() {
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        m.pool().watch(|| Some((5, 2)));
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        m.pool().watch(move || weak.upgrade().map(|_| (3, 3)));
        let text = render(&registry);
        assert!(
            text.contains(r#"redis_connection_pool_size{status="active"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"redis_connection_pool_size{status="idle"} 5"#),
            "{text}"
        );
        drop(alive);
        let text = render(&registry);
        assert!(
            text.contains(r#"redis_connection_pool_size{status="idle"} 2"#),
            "{text}"
        );
        assert_eq!(m.pool().sources.lock().unwrap().len(), 1);
    }

    #[test]
    fn observed_counters_follow_their_sources_and_keep_what_retired_ones_counted() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        let a = Arc::new(AtomicU64::new(2));
        let weak = Arc::downgrade(&a);
        let read = move || weak.upgrade().map(|c| c.load(Ordering::Relaxed));
        m.divergences.watch(&["ns"], Some(1), read.clone());
        // The same source again: ignored, not counted twice.
        m.divergences.watch(&["ns"], Some(1), read);
        m.watch_divergences("ns", || Some(1));
        let text = render(&registry);
        assert!(
            text.contains(r#"redis_dual_write_divergences_total{namespace="ns"} 3"#),
            "{text}"
        );
        a.store(5, Ordering::Relaxed);
        let text = render(&registry);
        assert!(
            text.contains(r#"redis_dual_write_divergences_total{namespace="ns"} 6"#),
            "{text}"
        );
        drop(a);
        let text = render(&registry);
        assert!(
            text.contains(r#"redis_dual_write_divergences_total{namespace="ns"} 6"#),
            "{text}"
        );
        assert_eq!(m.divergences.source_count(), 1);
    }

    #[test]
    fn observed_counters_of_several_series_count_each_and_keep_them_when_retired() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let registry = Registry::new();
        let m = Metrics::new(&registry).unwrap();
        let a = Arc::new(AtomicU64::new(1));
        let weak = Arc::downgrade(&a);
        let read = move || {
            weak.upgrade().map(|c| {
                let n = c.load(Ordering::Relaxed);
                vec![
                    (vec!["ns".to_string(), "upsert".to_string()], n),
                    (vec!["".to_string(), "connect".to_string()], 2 * n),
                ]
            })
        };
        m.retries.watch_series(Some(7), read.clone());
        m.retries.watch_series(Some(7), read);
        let series = |text: &str, ns: &str, op: &str| {
            let name = format!(r#"redis_retries_total{{namespace="{ns}",operation="{op}"}} "#);
            text.lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .map(|v| v.parse::<u64>().unwrap())
        };
        let text = render(&registry);
        assert_eq!(series(&text, "ns", "upsert"), Some(1), "{text}");
        assert_eq!(series(&text, "", "connect"), Some(2), "{text}");
        a.store(4, Ordering::Relaxed);
        drop(render(&registry));
        drop(a);
        let text = render(&registry);
        assert_eq!(series(&text, "ns", "upsert"), Some(4), "{text}");
        assert_eq!(series(&text, "", "connect"), Some(8), "{text}");
        assert_eq!(m.retries.source_count(), 0);
    }
}
