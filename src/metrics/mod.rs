//! Prometheus metrics: the [`Metered`] wrapper for any store, and the [`Metrics`] it records into.
//!
//! [`Metrics::new`] registers every metric into a [`prometheus::Registry`] the host program owns
//! (or [`Metrics::global`] into the crate-wide default one); [`render`] turns a registry into the
//! text exposition format a `/metrics` endpoint serves (`examples/metrics_server.rs` does exactly
//! that). Nothing here starts a thread or a server: the host decides when to scrape and sample.
//!
//! | metric | type | labels | source |
//! |---|---|---|---|
//! | `redis_operations_total` | counter | `namespace`, `operation` | [`Metered`], every call |
//! | `redis_operation_duration_seconds` | histogram (50 µs .. 1 s) | `namespace`, `operation` | [`Metered`] |
//! | `redis_errors_total` | counter | `namespace`, `operation`, `kind` (`timeout`, `connection`, `decode`, `other`) | [`Metered`], failed calls |
//! | `redis_cache_hits_total` / `redis_cache_misses_total` | counter | `namespace` | [`Metered`], ids found / not found by `get_by_id(s)` |
//! | `redis_memory_usage_bytes` | gauge (sampled) | `namespace` | `stats` through [`Metered`], [`Metered::sample_memory`] |
//! | `redis_namespace_keys` | gauge | `namespace` | as above |
//! | `redis_connection_pool_size` | gauge | `status` = `active` / `idle` | [`PoolGauge`] sources, read at scrape time |
//! | `redis_retries_total` | counter | `namespace`, `operation` | [`RedisShared::retries_by_operation`], read at scrape time ([`Metrics::watch_retries`]) |
//! | `redis_evicted_keys_total` | counter | | [`Metrics::sample_server`] (`INFO stats`) |
//! | `redis_server_used_memory_bytes`, `redis_server_maxmemory_bytes` | gauge | | [`Metrics::sample_server`] (`INFO memory`) |
//! | `redis_write_behind_queue_depth` | gauge | `namespace` | the queues of a metered `Storage`, read at scrape time ([`Metrics::watch_write_behind_depth`]), or [`Metrics::set_write_behind_queue_depth`] |
//! | `redis_dual_write_divergences_total` | counter | `namespace` | [`crate::dual_write::DualWrite::divergences`], read at scrape time ([`Metrics::watch_divergences`]) |
//!
//! Names keep the design's `redis_` prefix whatever the backend, so dashboards and alerts do not
//! change when a fleet moves from JSON files to Redis; the JSON backend simply has no server or
//! pool figures. docs/MONITORING.md says what healthy looks like for each and suggests alerts.
//!
//! `mod.rs` holds [`Metrics`] (every metric, registered once) and [`render`]; `metered.rs` the
//! [`Metered`] wrapper that counts and times calls; `labels.rs` the `operation` and `kind`
//! labels and the duration buckets; `observe.rs` the series read from the layers at scrape
//! time ([`PoolGauge`], retries, queue depths, divergences); `server.rs` the server's `INFO`
//! figures ([`ServerInfo`], [`server_info`], [`Metrics::sample_server`]).

mod labels;
mod metered;
mod observe;
mod server;

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::backend::redis::RedisShared;

use labels::Op;
pub(crate) use labels::{error_kind, DURATION_BUCKETS};
pub use metered::Metered;
use metered::{NsMetrics, OpMetrics};
pub use observe::PoolGauge;
use observe::{ObservedCounter, ObservedGauge};
pub use server::{server_info, ServerInfo};

/// Every metric of this crate, registered in one registry. Cheap to clone: clones share the
/// same series (prometheus metrics are reference-counted).
#[derive(Clone)]
pub struct Metrics {
    operations: IntCounterVec,
    duration: HistogramVec,
    errors: IntCounterVec,
    hits: IntCounterVec,
    misses: IntCounterVec,
    memory: IntGaugeVec,
    keys: IntGaugeVec,
    retries: ObservedCounter,
    evicted: IntCounter,
    server_memory: IntGauge,
    server_maxmemory: IntGauge,
    write_behind_depth: ObservedGauge,
    divergences: ObservedCounter,
    pool: PoolGauge,
    rate_limit: crate::rate_limit::RateLimitMetrics,
    /// The server's `evicted_keys` at the last sample. The server reports a running total since
    /// its start; the counter is advanced by the difference so it stays a counter (a server
    /// restart, where the total drops, adds the new total). `None` before the first sample.
    last_evicted: Arc<Mutex<Option<u64>>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates every metric and registers it in `registry`.
    ///
    /// # Errors
    /// The registry's error when a metric of the same name is already registered there (for
    /// example `Metrics::new` called twice on one registry: clone the first `Metrics` instead).
    ///
    /// # Examples
    /// ```
    /// let registry = prometheus::Registry::new();
    /// let metrics = graphrag_kv::metrics::Metrics::new(&registry).unwrap();
    /// metrics.set_write_behind_queue_depth("text_chunks", 3);
    /// assert!(graphrag_kv::metrics::render(&registry).contains("redis_write_behind_queue_depth"));
    /// ```
    pub fn new(registry: &Registry) -> prometheus::Result<Metrics> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let ns_op = &["namespace", "operation"];
        let operations = counter(
            "redis_operations_total",
            "Store operations called, per namespace and operation (failed ones included).",
            ns_op,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "redis_operation_duration_seconds",
                "Time the caller waited for each store operation, in seconds.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            ns_op,
        )?;
        registry.register(Box::new(duration.clone()))?;
        let errors = counter(
            "redis_errors_total",
            "Store operations that failed, by kind: timeout, connection, decode, other.",
            &["namespace", "operation", "kind"],
        )?;
        let hits = counter(
            "redis_cache_hits_total",
            "Ids found by get_by_id and get_by_ids.",
            &["namespace"],
        )?;
        let misses = counter(
            "redis_cache_misses_total",
            "Ids not found by get_by_id and get_by_ids.",
            &["namespace"],
        )?;
        let memory = gauge(
            "redis_memory_usage_bytes",
            "Bytes of the namespace's stored values at the last stats() call; estimated from a \
             sample of keys on Redis.",
            &["namespace"],
        )?;
        let keys = gauge(
            "redis_namespace_keys",
            "Ids stored in the namespace at the last stats() call.",
            &["namespace"],
        )?;
        let retries = ObservedCounter::new(
            "redis_retries_total",
            "Commands the Redis backend retried after a connection error, a timeout or a \
             passing server state, per namespace and operation.",
            &["namespace", "operation"],
        )?;
        registry.register(Box::new(retries.clone()))?;
        let evicted = IntCounter::new(
            "redis_evicted_keys_total",
            "Keys the server evicted for maxmemory (INFO stats evicted_keys, summed over masters).",
        )?;
        registry.register(Box::new(evicted.clone()))?;
        let server_memory = IntGauge::new(
            "redis_server_used_memory_bytes",
            "Memory the server uses (INFO memory used_memory, summed over masters).",
        )?;
        registry.register(Box::new(server_memory.clone()))?;
        let server_maxmemory = IntGauge::new(
            "redis_server_maxmemory_bytes",
            "The server's maxmemory setting (0 = no limit), summed over masters.",
        )?;
        registry.register(Box::new(server_maxmemory.clone()))?;
        let write_behind_depth = ObservedGauge::new(
            "redis_write_behind_queue_depth",
            "Writes queued by write-behind and not yet flushed to the backend.",
            "namespace",
        )?;
        registry.register(Box::new(write_behind_depth.clone()))?;
        let divergences = ObservedCounter::new(
            "redis_dual_write_divergences_total",
            "Dual-write calls that succeeded on one store only.",
            &["namespace"],
        )?;
        registry.register(Box::new(divergences.clone()))?;
        let pool = PoolGauge::new()?;
        registry.register(Box::new(pool.clone()))?;
        let rate_limit = crate::rate_limit::RateLimitMetrics::new(registry)?;
        Ok(Metrics {
            operations,
            duration,
            errors,
            hits,
            misses,
            memory,
            keys,
            retries,
            evicted,
            server_memory,
            server_maxmemory,
            write_behind_depth,
            divergences,
            pool,
            rate_limit,
            last_evicted: Arc::new(Mutex::new(None)),
        })
    }

    /// The metrics registered once in prometheus's default registry
    /// ([`prometheus::default_registry`]), for programs that do not manage a registry.
    ///
    /// # Panics
    /// When the default registry already holds a metric of the same name registered by other
    /// code.
    pub fn global() -> &'static Metrics {
        static GLOBAL: OnceLock<Metrics> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            Metrics::new(prometheus::default_registry())
                .expect("registering graphrag-kv metrics in the default registry")
        })
    }

    /// The connection-pool gauge, to attach pools to (see [`PoolGauge::watch_redis`]).
    pub fn pool(&self) -> &PoolGauge {
        &self.pool
    }

    /// Reads `redis_retries_total{namespace,operation}` from `shared`'s
    /// [`RedisShared::retries_by_operation`] at scrape time (a series appears with its first
    /// retry). Holds only a weak reference; attaching the same pool again changes nothing.
    /// [`crate::StorageBuilder::metrics`] does this for its pool.
    pub fn watch_retries(&self, shared: &Arc<RedisShared>) {
        let (id, read) = observe::retries_of(shared);
        self.retries.watch_series(Some(id), read);
    }

    /// Reads `redis_write_behind_queue_depth{namespace}` from `source` (a queue's depth, `None`
    /// once the queue is gone) at scrape time; the sources of one namespace are summed.
    /// [`crate::StorageBuilder::metrics`] does this for its write-behind queues.
    pub fn watch_write_behind_depth(
        &self,
        namespace: &str,
        source: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) {
        self.write_behind_depth.watch(namespace, source);
    }

    /// Reads `redis_dual_write_divergences_total{namespace}` from `source` at scrape time, for
    /// example [`crate::DualWrite::divergences_source`]; several sources of one namespace are
    /// summed. [`crate::StorageBuilder::metrics`] does this for its dual-write namespaces.
    pub fn watch_divergences(
        &self,
        namespace: &str,
        source: impl Fn() -> Option<u64> + Send + Sync + 'static,
    ) {
        self.divergences.watch(&[namespace], None, source);
    }

    /// Reads the `llm_rate_limit_*` counters of `llm` (time waited for budget, requests
    /// admitted, 429s seen) at scrape time; see [`crate::rate_limit::RateLimitMetrics`]. Holds
    /// only a weak reference; several wrappers are summed.
    pub fn watch_rate_limit<C: crate::llm::LlmClient>(
        &self,
        llm: &crate::rate_limit::RateLimitedLlm<C>,
    ) {
        self.rate_limit.watch(llm);
    }

    /// Sets `redis_write_behind_queue_depth` for `namespace`: the writes accepted but not yet
    /// flushed, for a queue no source is attached for (a `Storage` built with metrics attaches
    /// its queues itself: see [`Metrics::watch_write_behind_depth`]).
    pub fn set_write_behind_queue_depth(&self, namespace: &str, depth: u64) {
        self.write_behind_depth
            .gauge
            .with_label_values(&[namespace])
            .set(clamp_i64(depth));
    }

    /// The per-namespace series, resolved once so each call does no label lookup.
    fn for_namespace(&self, namespace: &str) -> NsMetrics {
        let ops = Op::ALL.map(|op| OpMetrics {
            count: self.operations.with_label_values(&[namespace, op.as_str()]),
            duration: self.duration.with_label_values(&[namespace, op.as_str()]),
        });
        NsMetrics {
            metrics: self.clone(),
            namespace: namespace.to_string(),
            ops,
            hits: self.hits.with_label_values(&[namespace]),
            misses: self.misses.with_label_values(&[namespace]),
            memory: self.memory.with_label_values(&[namespace]),
            keys: self.keys.with_label_values(&[namespace]),
        }
    }
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Renders every metric of `registry` in Prometheus's text exposition format (what a
/// `/metrics` endpoint returns, content type [`prometheus::TEXT_FORMAT`]).
pub fn render(registry: &Registry) -> String {
    prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        // Encoding only fails for metric families the registry itself would have refused.
        .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
}
