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
//! | `redis_memory_usage_bytes` | gauge (sampled) | `namespace` | [`Metered::stats`], [`Metered::sample_memory`] |
//! | `redis_namespace_keys` | gauge | `namespace` | as above |
//! | `redis_connection_pool_size` | gauge | `status` = `active` / `idle` | [`PoolGauge`] sources, read at scrape time |
//! | `redis_retries_total` | counter | `namespace`, `operation` | [`Metrics::record_retry`], called by the backend |
//! | `redis_evicted_keys_total` | counter | | [`Metrics::sample_server`] (`INFO stats`) |
//! | `redis_server_used_memory_bytes`, `redis_server_maxmemory_bytes` | gauge | | [`Metrics::sample_server`] (`INFO memory`) |
//! | `redis_write_behind_queue_depth` | gauge | `namespace` | [`Metrics::set_write_behind_queue_depth`] |
//! | `redis_dual_write_divergences_total` | counter | `namespace` | [`crate::dual_write::DualWrite`] |
//!
//! Names keep the design's `redis_` prefix whatever the backend, so dashboards and alerts do not
//! change when a fleet moves from JSON files to Redis; the JSON backend simply has no server or
//! pool figures. docs/MONITORING.md says what healthy looks like for each and suggests alerts.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use serde_json::Value;

use crate::backend::redis::RedisShared;
use crate::error::{Error, Result};
use crate::store::{Item, KvStore, NamespaceStats};

/// Upper bounds of `redis_operation_duration_seconds`, from 50 µs (a pipelined GET on a local
/// server) to 1 s (a SCAN of a large namespace, or a retry after a failover). Slower calls land
/// in `+Inf`.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// The store operations, as the `operation` label spells them (nano-graphrag's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllKeys,
    GetById,
    GetByIds,
    FilterKeys,
    Upsert,
    DeleteByIds,
    Clear,
    IndexStartCallback,
    IndexDoneCallback,
    Stats,
}

impl Op {
    const ALL: [Op; 10] = [
        Op::AllKeys,
        Op::GetById,
        Op::GetByIds,
        Op::FilterKeys,
        Op::Upsert,
        Op::DeleteByIds,
        Op::Clear,
        Op::IndexStartCallback,
        Op::IndexDoneCallback,
        Op::Stats,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Op::AllKeys => "all_keys",
            Op::GetById => "get_by_id",
            Op::GetByIds => "get_by_ids",
            Op::FilterKeys => "filter_keys",
            Op::Upsert => "upsert",
            Op::DeleteByIds => "delete_by_ids",
            Op::Clear => "clear",
            Op::IndexStartCallback => "index_start_callback",
            Op::IndexDoneCallback => "index_done_callback",
            Op::Stats => "stats",
        }
    }
}

/// The `kind` label of `redis_errors_total` for an error: `timeout`, `connection`, `decode` or
/// `other`.
///
/// Decided by [`Error::is_timeout`], [`Error::is_connection`] and the variant, never by message
/// text. A pool timeout counts as `timeout` (it is both; the timeout is what an operator tunes).
pub(crate) fn error_kind(e: &Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connection() {
        "connection"
    } else if matches!(
        e,
        Error::Decode { .. } | Error::WrongType { .. } | Error::CorruptFile { .. }
    ) {
        "decode"
    } else {
        "other"
    }
}

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
    retries: IntCounterVec,
    evicted: IntCounter,
    server_memory: IntGauge,
    server_maxmemory: IntGauge,
    write_behind_depth: IntGaugeVec,
    divergences: IntCounterVec,
    pool: PoolGauge,
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
        let retries = counter(
            "redis_retries_total",
            "Commands retried after a connection error or timeout.",
            ns_op,
        )?;
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
        let write_behind_depth = gauge(
            "redis_write_behind_queue_depth",
            "Writes queued by write-behind and not yet flushed to the backend.",
            &["namespace"],
        )?;
        let divergences = counter(
            "redis_dual_write_divergences_total",
            "Dual-write calls that succeeded on one store only.",
            &["namespace"],
        )?;
        let pool = PoolGauge::new()?;
        registry.register(Box::new(pool.clone()))?;
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

    /// Counts one retry of `operation` on `namespace` (`""` for server-wide commands).
    ///
    /// The backend retries inside its own calls, so only the backend knows; `Metered` cannot
    /// see retries. The backend counts them in
    /// [`crate::backend::redis::RedisShared::retries_total`].
    pub fn record_retry(&self, namespace: &str, operation: &str) {
        self.retries
            .with_label_values(&[namespace, operation])
            .inc();
    }

    /// Sets `redis_write_behind_queue_depth` for `namespace`: the writes accepted but not yet
    /// flushed. A write-behind layer calls this when its queue changes (or on a timer).
    pub fn set_write_behind_queue_depth(&self, namespace: &str, depth: u64) {
        self.write_behind_depth
            .with_label_values(&[namespace])
            .set(clamp_i64(depth));
    }

    /// Counts one divergence of a dual-write store (a write that succeeded on one side only).
    pub fn record_divergence(&self, namespace: &str) {
        self.divergences.with_label_values(&[namespace]).inc();
    }

    /// Reads the server's INFO text through `info` and updates `redis_evicted_keys_total`,
    /// `redis_server_used_memory_bytes` and `redis_server_maxmemory_bytes`.
    ///
    /// `info` returns the text of `INFO` (or at least `INFO memory` and `INFO stats`) from any
    /// connection the host has; for a cluster, the nodes' texts one after another (each node's
    /// `used_memory`, `maxmemory` and `evicted_keys` are summed). [`server_info`] is the ready
    /// made version for a [`RedisShared`] pool.
    ///
    /// # Errors
    /// Whatever `info` returns; the metrics are then left unchanged.
    ///
    /// # Examples
    /// ```
    /// # let metrics = graphrag_kv::metrics::Metrics::new(&prometheus::Registry::new()).unwrap();
    /// let info = metrics
    ///     .sample_server(|| Ok::<_, std::io::Error>("used_memory:1024\r\nevicted_keys:3\r\n".into()))
    ///     .unwrap();
    /// assert_eq!((info.used_memory, info.evicted_keys), (1024, 3));
    /// ```
    pub fn sample_server<E>(
        &self,
        info: impl FnOnce() -> std::result::Result<String, E>,
    ) -> std::result::Result<ServerInfo, E> {
        let parsed = ServerInfo::parse(&info()?);
        self.record_server(&parsed);
        Ok(parsed)
    }

    /// Updates the server metrics from figures already read (see [`Metrics::sample_server`]).
    pub fn record_server(&self, info: &ServerInfo) {
        self.server_memory.set(clamp_i64(info.used_memory));
        self.server_maxmemory.set(clamp_i64(info.maxmemory));
        let mut last = self.last_evicted.lock().unwrap_or_else(|p| p.into_inner());
        let delta = match *last {
            // Dropped: the server restarted and counts from zero again.
            Some(prev) if info.evicted_keys < prev => info.evicted_keys,
            Some(prev) => info.evicted_keys - prev,
            None => info.evicted_keys,
        };
        self.evicted.inc_by(delta);
        *last = Some(info.evicted_keys);
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
    sources: Arc<Mutex<Vec<PoolSource>>>,
}

type PoolSource = Box<dyn Fn() -> Option<(u32, u32)> + Send + Sync>;

impl fmt::Debug for PoolGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sources.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("PoolGauge").field("sources", &n).finish()
    }
}

impl PoolGauge {
    fn new() -> prometheus::Result<PoolGauge> {
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

/// Server-wide figures from `INFO`, summed over the masters of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// `used_memory`: bytes the server uses, data and overhead.
    pub used_memory: u64,
    /// `maxmemory`: the limit in bytes, 0 for none.
    pub maxmemory: u64,
    /// `maxmemory_policy` (of the first node), empty when INFO did not say.
    pub maxmemory_policy: String,
    /// `evicted_keys`: keys evicted for maxmemory since the server started.
    pub evicted_keys: u64,
    /// `expired_keys`: keys that expired (TTL) since the server started.
    pub expired_keys: u64,
    /// Keys on the server, every database and every key prefix (`# Keyspace`).
    pub keys: u64,
    /// Nodes whose INFO was read: 1 for a single server.
    pub nodes: usize,
}

impl ServerInfo {
    /// Parses INFO text; several nodes' texts may follow one another (each node's figures are
    /// added). Unknown and missing fields are ignored.
    pub fn parse(text: &str) -> ServerInfo {
        let mut info = ServerInfo::default();
        let mut nodes = 0;
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let n = || value.trim().parse::<u64>().unwrap_or(0);
            match key {
                // Every INFO text that has a Server section names its version once per node.
                "redis_version" => nodes += 1,
                "used_memory" => info.used_memory += n(),
                "maxmemory" => info.maxmemory += n(),
                "maxmemory_policy" if info.maxmemory_policy.is_empty() => {
                    info.maxmemory_policy = value.trim().to_string();
                }
                "evicted_keys" => info.evicted_keys += n(),
                "expired_keys" => info.expired_keys += n(),
                db if db.starts_with("db") && db[2..].bytes().all(|b| b.is_ascii_digit()) => {
                    // db0:keys=12,expires=3,avg_ttl=0
                    let keys = value
                        .split(',')
                        .find_map(|kv| kv.strip_prefix("keys="))
                        .and_then(|k| k.parse::<u64>().ok())
                        .unwrap_or(0);
                    info.keys += keys;
                }
                _ => {}
            }
        }
        info.nodes = nodes.max(1);
        info
    }

    /// Parses a reply to `INFO`: a single server's text, or a cluster client's map of node
    /// address to text.
    fn from_reply(reply: redis::Value) -> ServerInfo {
        let text = |v: redis::Value| redis::from_redis_value::<String>(v).unwrap_or_default();
        match reply {
            redis::Value::Map(nodes) => {
                let all: Vec<String> = nodes.into_iter().map(|(_, v)| text(v)).collect();
                let mut info = ServerInfo::parse(&all.join("\n"));
                info.nodes = all.len().max(1);
                info
            }
            other => ServerInfo::parse(&text(other)),
        }
    }
}

/// Reads `INFO` through a Redis pool (every master of a cluster).
///
/// # Errors
/// Redis failures; [`Error::is_permission_denied`] when the ACL user may not run INFO.
pub fn server_info(shared: &RedisShared) -> Result<ServerInfo> {
    let reply: redis::Value =
        shared.with_conn("server_info", "", |c| redis::cmd("INFO").query(c))?;
    Ok(ServerInfo::from_reply(reply))
}

/// One operation's series for one namespace.
#[derive(Clone)]
struct OpMetrics {
    count: IntCounter,
    duration: prometheus::Histogram,
}

/// A namespace's series, resolved once.
#[derive(Clone)]
struct NsMetrics {
    metrics: Metrics,
    namespace: String,
    ops: [OpMetrics; Op::ALL.len()],
    hits: IntCounter,
    misses: IntCounter,
    memory: IntGauge,
    keys: IntGauge,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_text_is_parsed_and_nodes_summed() {
        let one = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1000\r\n\
                   maxmemory:2000\r\nmaxmemory_policy:volatile-lru\r\n# Stats\r\n\
                   evicted_keys:5\r\nexpired_keys:7\r\n# Keyspace\r\n\
                   db0:keys=12,expires=3,avg_ttl=0\r\ndb1:keys=1,expires=0,avg_ttl=0\r\n";
        let i = ServerInfo::parse(one);
        assert_eq!(
            i,
            ServerInfo {
                used_memory: 1000,
                maxmemory: 2000,
                maxmemory_policy: "volatile-lru".into(),
                evicted_keys: 5,
                expired_keys: 7,
                keys: 13,
                nodes: 1,
            }
        );
        let two = ServerInfo::parse(&format!("{one}{one}"));
        assert_eq!((two.used_memory, two.keys, two.nodes), (2000, 26, 2));
        let map = redis::Value::Map(vec![
            (
                redis::Value::BulkString(b"a:1".to_vec()),
                redis::Value::BulkString(one.as_bytes().to_vec()),
            ),
            (
                redis::Value::BulkString(b"b:2".to_vec()),
                redis::Value::BulkString(one.as_bytes().to_vec()),
            ),
        ]);
        let cluster = ServerInfo::from_reply(map);
        assert_eq!((cluster.evicted_keys, cluster.nodes), (10, 2));
    }

    #[test]
    fn evictions_counter_follows_the_server_total_across_restarts() {
        let m = Metrics::new(&Registry::new()).unwrap();
        for (total, want) in [(10, 10), (15, 15), (15, 15), (2, 17), (4, 19)] {
            m.record_server(&ServerInfo {
                evicted_keys: total,
                ..ServerInfo::default()
            });
            assert_eq!(m.evicted.get(), want, "after server total {total}");
        }
    }

    #[test]
    fn error_kinds() {
        let decode = Error::Decode {
            namespace: "n".into(),
            key: "k".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&decode), "decode");
        let pool = Error::Pool {
            operation: "get_by_id",
            namespace: "n".into(),
            message: "m".into(),
        };
        assert_eq!(error_kind(&pool), "timeout");
        let down = Error::Unavailable {
            namespace: "n".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&down), "connection");
        let refused = Error::Redis {
            operation: "get_by_id",
            namespace: "n".into(),
            source: redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )),
        };
        assert_eq!(error_kind(&refused), "connection");
        let bad = Error::InvalidId {
            namespace: "n".into(),
            id: "".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&bad), "other");
    }

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
}
