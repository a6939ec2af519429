//! The Redis backend: every process pointing at the same server shares the namespaces.
//!
//! Keys are `{prefix}:{namespace}:{id}` (default prefix `nano_graphrag`, the Python
//! implementation's layout) and spread over every slot in a cluster: no hash tag pins a
//! namespace to one node. Values are plain JSON, or an lz4 frame when compression is on and pays
//! (see [`crate::codec`]). Batch operations take one round trip per chunk of 2,000 ids (reads)
//! or 1,000 items (writes), per node in a cluster; `all_keys` and `clear` use SCAN with a
//! glob-escaped MATCH pattern on every master, never KEYS.
//!
//! Three ways to reach the data, chosen by configuration:
//! - standalone: one server (`REDIS_URL`);
//! - Sentinel: the master that `REDIS_SENTINEL_URLS` name for `REDIS_SENTINEL_MASTER`, followed
//!   through failovers;
//! - cluster: several `REDIS_URL`s, `REDIS_CLUSTER=true`, or a server that says
//!   `cluster_enabled:1` (see its `cluster` module for how batches survive slot moves).

mod batch;
mod checkpoint;
pub(crate) mod cluster;
mod conn;
mod mode;
mod pool;
mod recompress;
mod resp;
mod store;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Value};
use serde_json::Value as Json;

pub use conn::OperationRetries;
pub use mode::RedisMode;
pub use recompress::Recompressed;
pub use store::RedisStore;

use crate::codec::Codec;
use crate::config::{redact_url, BackendKind, ClusterMode, RedisConfig};
use crate::error::{display_id, is_retryable_redis, ConnectFailure, Error, Result};
use crate::retry::RetryPolicy;
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, validate_namespace, Item, KvStore,
    NamespaceStats,
};

use checkpoint::{checkpoint_server, Coalescer, Durable, PersistOps};
use cluster::ClusterPool;
use conn::*;
use pool::{PooledConn, RedisPool};
use resp::*;

/// Ids per MGET / EXISTS pipeline / UNLINK: a call with a million ids becomes requests of this
/// size instead of one giant one.
pub(crate) const READ_CHUNK: usize = 2_000;
/// Ids per MGET of `get_by_ids` on a single server. Two MGETs are kept in flight, so the
/// server answers the next window while the caller decodes this one: decoding (lz4 and JSON)
/// costs the client about as much as the server spends on the same values, and on separate
/// cores the two overlap instead of adding up. Smaller windows overlap more but cost more
/// round trips. Measured in docs/BENCHMARKS.md.
const MGET_WINDOW: usize = 25;
/// Items per window of SETs in `upsert` on a single server. Two windows are kept in flight, so
/// the server stores one while the caller encodes (and compresses) the next; see
/// [`MGET_WINDOW`].
const UPSERT_WINDOW: usize = 25;
/// Items per SET pipeline.
pub(crate) const WRITE_CHUNK: usize = 1_000;
/// Bytes of values per SET pipeline.
pub(crate) const WRITE_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// SCAN's COUNT hint.
const SCAN_COUNT: usize = 1_000;
/// Keys whose value size is sampled by `stats`.
const STATS_SAMPLE: usize = 256;
/// How long a checkpoint may wait for the server's save.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// The connections: one pool, of single-server or of cluster connections.
enum Conns {
    Single(RedisPool),
    Cluster(ClusterPool),
}

/// What every namespace opened from one configuration shares: the pool, the codec, the
/// checkpoint coalescer and the one-time warnings.
pub struct RedisShared {
    config: RedisConfig,
    conns: Conns,
    codec: Codec,
    checkpoints: Coalescer,
    warned_no_durability: AtomicBool,
    /// The one retry policy of these connections (`REDIS_RETRIES`), see [`crate::retry`].
    policy: RetryPolicy,
    /// Retries made so far, read at scrape time through [`RedisShared::retries_total`]: a plain
    /// counter, so the backend does not depend on who observes it.
    retries: AtomicU64,
    /// The same retries per namespace and operation, read through
    /// [`RedisShared::retries_by_operation`]. A `std::sync::Mutex` around a map: taken only
    /// when a command is retried (already a failure path, before a backoff pause) and at
    /// scrape time, never by a command that succeeds at once.
    retries_by: std::sync::Mutex<std::collections::HashMap<(String, &'static str), u64>>,
}

impl std::fmt::Debug for RedisShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisShared")
            .field("url", &redact_url(&self.config.url))
            .field("key_prefix", &self.config.key_prefix)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl RedisShared {
    /// Creates the pool and checks the server answers.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that cannot be used; [`Error::Connect`] when no connection
    /// can be opened (refused, timed out, wrong password, TLS), at once; [`Error::Pool`] or
    /// [`Error::Redis`] when the server does not answer PING (the message names the redacted
    /// URL).
    pub fn connect(config: &RedisConfig) -> Result<Arc<RedisShared>> {
        let mut shared = Self::new_unchecked(config)?;
        let ping = shared.with_conn("connect", "", |c| redis::cmd("PING").query::<()>(c));
        ping.map_err(|e| match e {
            Error::Pool {
                operation,
                namespace,
                message,
            } => Error::Pool {
                operation,
                namespace,
                message: format!("{message} (server {})", redact_url(&config.url)),
            },
            other => other,
        })?;
        if config.cluster == ClusterMode::Auto
            && config.sentinel_urls.is_empty()
            && matches!(shared.conns, Conns::Single(_))
            && shared.server_says_cluster()
        {
            log::info!("the server runs in cluster mode: using the cluster client");
            let mut c = config.clone();
            c.cluster = ClusterMode::Cluster;
            shared = Self::new_unchecked(&c)?;
            shared.with_conn("connect", "", |c| redis::cmd("PING").query::<()>(c))?;
        }
        shared.warn_on_eviction_policy();
        Ok(shared)
    }

    /// Creates the pool without contacting the server.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that cannot be used.
    pub fn new_unchecked(config: &RedisConfig) -> Result<Arc<RedisShared>> {
        let cluster = config.sentinel_urls.is_empty()
            && (config.cluster == ClusterMode::Cluster || config.urls().len() > 1);
        let conns = if cluster {
            ClusterPool::new(config).map(Conns::Cluster)
        } else {
            RedisPool::new(config).map(Conns::Single)
        }
        .map_err(|e| Error::Config {
            variable: if config.sentinel_urls.is_empty() {
                "REDIS_URL".into()
            } else {
                "REDIS_SENTINEL_URLS".into()
            },
            value: redact_url(&config.url),
            expected: format!("redis:// URLs ({})", e.category()),
        })?;
        Ok(Arc::new(RedisShared {
            config: config.clone(),
            conns,
            codec: Codec::new(config.compression, config.compression_min_bytes)
                .with_level(config.compression_level),
            checkpoints: Coalescer::default(),
            warned_no_durability: AtomicBool::new(false),
            policy: RetryPolicy::new(config.retries),
            retries: AtomicU64::new(0),
            retries_by: std::sync::Mutex::default(),
        }))
    }

    /// `INFO cluster` says `cluster_enabled:1`. False when INFO is denied (ACL).
    fn server_says_cluster(&self) -> bool {
        match self.with_conn("connect", "", |c| {
            redis::cmd("INFO").arg("cluster").query::<String>(c)
        }) {
            Ok(info) => info.lines().any(|l| l.trim() == "cluster_enabled:1"),
            Err(e) => {
                log::debug!("INFO cluster failed ({e}); assuming a standalone server");
                false
            }
        }
    }

    /// The configuration the stores use.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// How these connections reach Redis: standalone, through Sentinel, or a cluster.
    pub fn mode(&self) -> RedisMode {
        match (&self.conns, self.config.sentinel_urls.is_empty()) {
            (Conns::Cluster(_), _) => RedisMode::Cluster,
            (Conns::Single(_), true) => RedisMode::Standalone,
            (Conns::Single(_), false) => RedisMode::Sentinel,
        }
    }

    /// Open and idle pooled connections.
    pub fn pool_state(&self) -> (u32, u32) {
        match &self.conns {
            Conns::Single(p) => p.state(),
            Conns::Cluster(p) => p.state(),
        }
    }

    /// The store of one namespace.
    ///
    /// # Errors
    /// [`Error::InvalidNamespace`].
    pub fn namespace(self: &Arc<Self>, namespace: &str) -> Result<RedisStore> {
        validate_namespace(namespace)?;
        Ok(RedisStore {
            key_prefix: format!("{}:{}:", self.config.key_prefix, namespace),
            ttl: self.config.ttl.ttl_for(namespace),
            namespace: namespace.to_string(),
            shared: self.clone(),
        })
    }

    /// Namespaces that hold at least one key under this prefix, sorted (one SCAN of the
    /// prefix on every master).
    ///
    /// # Errors
    /// Redis failures.
    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        let pattern = format!("{}:*", glob_escape(&self.config.key_prefix));
        let skip = self.config.key_prefix.len() + 1;
        let mut names = HashSet::new();
        self.scan("list_namespaces", "", &pattern, &mut |keys| {
            for k in keys {
                let ns = k.get(skip..).and_then(|rest| {
                    let end = rest.iter().position(|b| *b == b':')?;
                    std::str::from_utf8(&rest[..end]).ok()
                });
                if let Some(ns) = ns.filter(|ns| validate_namespace(ns).is_ok()) {
                    names.insert(ns.to_string());
                }
            }
            Ok(())
        })?;
        let mut names: Vec<_> = names.into_iter().collect();
        names.sort();
        Ok(names)
    }
}

impl RedisShared {
    /// One durable checkpoint shared by all concurrent callers, on every master.
    fn checkpoint(&self) -> Result<()> {
        let outcome = self.checkpoints.run(|| {
            let durable = self.each_master("index_done_callback", "", |ops, _| {
                checkpoint_server(ops, CHECKPOINT_TIMEOUT, &self.config.key_prefix)
            });
            let why = match durable {
                Ok(all) => all.into_iter().find_map(|d| match d {
                    Durable::Yes => None,
                    Durable::Unsupported(why) => Some(why),
                }),
                Err(e) if e.is_permission_denied() => Some(format!(
                    "the Redis user may not run INFO/BGSAVE/CONFIG ({e})"
                )),
                Err(e) => return Err(e.to_string()),
            };
            if let Some(why) = why {
                if !self.warned_no_durability.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "index_done_callback cannot make writes durable: {why}; \
                         continuing without a checkpoint (warned once)"
                    );
                }
            }
            Ok(())
        });
        outcome.map_err(|reason| Error::Checkpoint { reason })
    }

    /// Warns once if the server may evict keys that have no TTL.
    fn warn_on_eviction_policy(&self) {
        let policy = self.with_conn("connect", "", |c| {
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("maxmemory-policy")
                .query::<Vec<String>>(c)
        });
        match policy {
            Ok(pair) => {
                let policy = pair.get(1).map(String::as_str).unwrap_or("");
                if policy.starts_with("allkeys-") {
                    log::warn!(
                        "redis maxmemory-policy is {policy}: keys without a TTL (documents, \
                         chunks, community reports) can be evicted when memory is full; \
                         use volatile-lru or noeviction for index data"
                    );
                }
            }
            Err(e) => log::debug!("cannot read maxmemory-policy ({e}); eviction check skipped"),
        }
    }

    /// Waits until `wait_replicas` replicas confirmed this connection's writes of `keys`, when
    /// asked to.
    fn wait_for_replicas_cluster(
        &self,
        namespace: &str,
        conn: &mut redis::cluster::ClusterConnection,
        keys: &[String],
    ) -> Result<()> {
        let want = self.config.wait_replicas;
        if want == 0 {
            return Ok(());
        }
        let got = cluster::wait_for_keys(conn, keys, want, self.config.wait_timeout)
            .map_err(|e| redis_error("upsert", namespace, e))?;
        check_replicas(namespace, want, got)
    }

    /// Runs single-key commands the store API has no method for (`migrate`'s PTTL and
    /// PEXPIRE) as one batch, through the stores' own batch path: the pool with its TLS set-up
    /// on a single server, per-node pipelines with redirect handling on a cluster, the same
    /// retries. Only idempotent commands may be given (a batch can be sent again). One result
    /// per command, in order.
    pub(crate) fn run_batch(
        &self,
        operation: &'static str,
        namespace: &str,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<RedisResult<Value>>> {
        self.batch(operation, namespace, cmds)
    }
}

fn check_replicas(namespace: &str, want: u32, got: i64) -> Result<()> {
    if got < want as i64 {
        return Err(Error::Replication {
            namespace: namespace.to_string(),
            wanted: want,
            confirmed: got.max(0) as u32,
        });
    }
    Ok(())
}
