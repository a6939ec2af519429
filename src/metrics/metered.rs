//! [`Metered`]: the outermost layer of a stack, counting and timing what callers see.

use std::fmt;
use std::time::Instant;

use prometheus::{IntCounter, IntGauge};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::Result;
use crate::store::{Item, KvStore, NamespaceStats, Stored, UnsentWrite};

use super::{clamp_i64, error_kind, Metrics, Op};

/// One operation's series for one namespace.
#[derive(Clone)]
pub(super) struct OpMetrics {
    pub(super) count: IntCounter,
    pub(super) duration: prometheus::Histogram,
}

/// A namespace's series, resolved once.
#[derive(Clone)]
pub(super) struct NsMetrics {
    pub(super) metrics: Metrics,
    pub(super) namespace: String,
    pub(super) ops: [OpMetrics; Op::ALL.len()],
    pub(super) hits: IntCounter,
    pub(super) misses: IntCounter,
    pub(super) memory: IntGauge,
    pub(super) keys: IntGauge,
}

impl NsMetrics {
    /// Runs `f`, counting and timing it as `op`; a failure is also counted by kind.
    fn observe<T>(&self, op: Op, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = f();
        let m = &self.ops[op as usize];
        m.duration.observe(start.elapsed().as_secs_f64());
        m.count.inc();
        if let Err(e) = &out {
            self.metrics
                .errors
                .with_label_values(&[self.namespace.as_str(), op.as_str(), error_kind(e)])
                .inc();
        }
        out
    }

    fn count_reads<'a>(&self, values: impl IntoIterator<Item = &'a Option<Value>>) {
        let (mut hit, mut miss) = (0, 0);
        for v in values {
            if v.is_some() {
                hit += 1;
            } else {
                miss += 1;
            }
        }
        self.hits.inc_by(hit);
        self.misses.inc_by(miss);
    }

    fn record_stats(&self, s: &NamespaceStats) {
        self.memory.set(clamp_i64(s.bytes));
        self.keys.set(clamp_i64(s.keys));
    }
}

/// Counts and times every call to the store it wraps, into a [`Metrics`].
///
/// # Where it goes in a stack
///
/// Outermost, directly under the caller:
///
/// ```text
/// right: Metered<WriteBehind<FallbackStore<RedisStore>>>   times what the caller waits for
/// wrong: WriteBehind<Metered<RedisStore>>                  times the flusher's batches instead
/// ```
///
/// Inside a write-behind layer it would time the background flusher's batches and report
/// upserts as slow while the caller never waited for them, and it would miss reads answered by
/// the write-behind overlay. Outermost, `redis_operation_duration_seconds` is the latency the
/// indexer sees and `redis_errors_total` the errors it got, whichever layer produced them.
///
/// Works over any store: a backend, another wrapper, or the `Arc<dyn KvStore>` that
/// [`crate::Storage::namespace`] returns.
///
/// # Examples
/// ```
/// use graphrag_kv::metrics::{render, Metered, Metrics};
/// use graphrag_kv::{KvStore, Storage, StoreConfig};
///
/// # fn main() -> graphrag_kv::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let registry = prometheus::Registry::new();
/// let metrics = Metrics::new(&registry).expect("fresh registry");
/// let storage = Storage::open(&StoreConfig::builder().working_dir(dir.path()).build()?)?;
/// let docs = Metered::new(storage.namespace("full_docs")?, &metrics);
/// docs.upsert(vec![("doc-1".into(), serde_json::json!({"content": "x"}))])?;
/// assert_eq!(docs.get_by_id("doc-1")?.is_some(), true);
/// let text = render(&registry);
/// assert!(text.contains(r#"redis_cache_hits_total{namespace="full_docs"} 1"#));
/// # Ok(())
/// # }
/// ```
pub struct Metered<S> {
    inner: S,
    m: NsMetrics,
}

impl<S> fmt::Debug for Metered<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("namespace", &self.m.namespace)
            .finish_non_exhaustive()
    }
}

impl<S: KvStore> Metered<S> {
    /// Wraps `inner`, recording into `metrics` under `inner`'s namespace. The namespace's hit
    /// and miss counters start at zero here, so a hit ratio is defined from the first scrape.
    pub fn new(inner: S, metrics: &Metrics) -> Metered<S> {
        let m = metrics.for_namespace(inner.namespace());
        Metered { inner, m }
    }

    /// The wrapped store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The wrapped store, by reference.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Refreshes `redis_memory_usage_bytes` and `redis_namespace_keys` of this namespace from
    /// [`KvStore::stats`] (counted as a `stats` operation) and returns the stats.
    ///
    /// On Redis this SCANs the whole keyspace (seconds per million keys on the server, measured
    /// in docs/MONITORING.md): call it on a timer of a minute or so, not on every scrape of a
    /// large index.
    ///
    /// # Errors
    /// As [`KvStore::stats`].
    pub fn sample_memory(&self) -> Result<NamespaceStats> {
        let s = self.m.observe(Op::Stats, || self.inner.stats())?;
        self.m.record_stats(&s);
        Ok(s)
    }
}

#[deny(clippy::missing_trait_methods)]
impl<S: KvStore> KvStore for Metered<S> {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        self.m.observe(Op::AllKeys, || self.inner.all_keys())
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        let v = self.m.observe(Op::GetById, || self.inner.get_by_id(id))?;
        self.m.count_reads([&v]);
        Ok(v)
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        let values = self
            .m
            .observe(Op::GetByIds, || self.inner.get_by_ids(ids, fields))?;
        self.m.count_reads(&values);
        Ok(values)
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        self.m
            .observe(Op::FilterKeys, || self.inner.filter_keys(ids))
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        self.m.observe(Op::Upsert, || self.inner.upsert(items))
    }

    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        self.m.observe(Op::Upsert, || self.inner.upsert_refs(items))
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        self.m
            .observe(Op::DeleteByIds, || self.inner.delete_by_ids(ids))
    }

    fn clear(&self) -> Result<()> {
        self.m.observe(Op::Clear, || self.inner.clear())
    }

    fn index_start_callback(&self) -> Result<()> {
        self.m
            .observe(Op::IndexStartCallback, || self.inner.index_start_callback())
    }

    fn index_done_callback(&self) -> Result<()> {
        self.m
            .observe(Op::IndexDoneCallback, || self.inner.index_done_callback())
    }

    fn stats(&self) -> Result<NamespaceStats> {
        self.sample_memory()
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Forwarded, not counted: parked writes are a layer's hand-off at shutdown, not a
    /// caller's call.
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        self.inner.park(writes)
    }

    /// Timed as `all_keys`: the same work, handed over a page at a time. The time includes
    /// what the caller's `page` does with each page (it may use the store).
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        self.m.observe(Op::AllKeys, || self.inner.scan_keys(page))
    }

    /// Timed and counted as `get_by_ids`: the same read, decoded by the caller.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut hits = 0u64;
        self.m.observe(Op::GetByIds, || {
            self.inner.get_json_by_ids(ids, &mut |i, stored| {
                hits += 1;
                visit(i, stored)
            })
        })?;
        self.m.hits.inc_by(hits);
        self.m
            .misses
            .inc_by((ids.len() as u64).saturating_sub(hits));
        Ok(())
    }

    /// Timed as `upsert`.
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        self.m.observe(Op::Upsert, || self.inner.upsert_json(items))
    }
}
