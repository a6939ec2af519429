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
//! | `redis_retries_total` | counter | | [`RedisShared::retries_total`], read at scrape time ([`Metrics::watch_retries`]) |
//! | `redis_evicted_keys_total` | counter | | [`Metrics::sample_server`] (`INFO stats`) |
//! | `redis_server_used_memory_bytes`, `redis_server_maxmemory_bytes` | gauge | | [`Metrics::sample_server`] (`INFO memory`) |
//! | `redis_write_behind_queue_depth` | gauge | `namespace` | the queues of a metered `Storage`, read at scrape time ([`Metrics::watch_write_behind_depth`]), or [`Metrics::set_write_behind_queue_depth`] |
//! | `redis_dual_write_divergences_total` | counter | `namespace` | [`crate::dual_write::DualWrite::divergences`], read at scrape time ([`Metrics::watch_divergences`]) |
//!
//! Names keep the design's `redis_` prefix whatever the backend, so dashboards and alerts do not
//! change when a fleet moves from JSON files to Redis; the JSON backend simply has no server or
//! pool figures. docs/MONITORING.md says what healthy looks like for each and suggests alerts.

mod metered;
mod observe;

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::backend::redis::RedisShared;
use crate::error::{Error, Result};

pub use metered::Metered;
use metered::{NsMetrics, OpMetrics};
pub use observe::PoolGauge;
use observe::{ObservedCounter, ObservedGauge};

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
    retries: ObservedCounter,
    evicted: IntCounter,
    server_memory: IntGauge,
    server_maxmemory: IntGauge,
    write_behind_depth: ObservedGauge,
    divergences: ObservedCounter,
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
        let retries = ObservedCounter::new(
            "redis_retries_total",
            "Commands the Redis backend retried after a connection error or timeout.",
            &[],
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

    /// Reads `redis_retries_total` from `shared`'s [`RedisShared::retries_total`] at scrape
    /// time. Holds only a weak reference; attaching the same pool again changes nothing.
    /// [`crate::StorageBuilder::metrics`] does this for its pool.
    pub fn watch_retries(&self, shared: &Arc<RedisShared>) {
        let (id, read) = observe::retries_of(shared);
        self.retries.watch(&[], Some(id), read);
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

    /// Sets `redis_write_behind_queue_depth` for `namespace`: the writes accepted but not yet
    /// flushed, for a queue no source is attached for (a `Storage` built with metrics attaches
    /// its queues itself: see [`Metrics::watch_write_behind_depth`]).
    pub fn set_write_behind_queue_depth(&self, namespace: &str, depth: u64) {
        self.write_behind_depth
            .gauge
            .with_label_values(&[namespace])
            .set(clamp_i64(depth));
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
}
