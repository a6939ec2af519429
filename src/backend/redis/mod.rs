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
//!   `cluster_enabled:1` (see [`cluster`] for how batches survive slot moves).

mod checkpoint;
pub(crate) mod cluster;
mod mode;
mod pool;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Value};
use serde_json::Value as Json;

pub use mode::RedisMode;

use crate::codec::Codec;
use crate::config::{redact_url, BackendKind, ClusterMode, RedisConfig};
use crate::error::{display_id, is_retryable_redis, ConnectFailure, Error, Result};
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, validate_namespace, Item, KvStore,
    NamespaceStats,
};

use checkpoint::{checkpoint_server, Coalescer, Durable, PersistOps};
use cluster::ClusterPool;
use pool::{PooledConn, RedisPool};

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
    /// Commands retried on these connections, for observers outside the backend (the metrics
    /// read it at scrape time through [`RedisShared::retries_total`]).
    retries: std::sync::atomic::AtomicU64,
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
            codec: Codec::new(config.compression, config.compression_min_bytes),
            checkpoints: Coalescer::default(),
            warned_no_durability: AtomicBool::new(false),
            retries: std::sync::atomic::AtomicU64::new(0),
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

    /// Runs `f` on a pooled connection (single server, or a cluster connection that routes
    /// single-key commands itself), retrying connection errors (and timeouts when allowed) with
    /// exponential backoff and jitter. Only idempotent commands go through here.
    pub(crate) fn with_conn<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Result<T> {
        self.retrying(operation, namespace, || match &self.conns {
            Conns::Single(p) => {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = f(&mut *c);
                if out.is_ok() {
                    pool::touch(&mut c);
                } else if out.as_ref().err().is_some_and(must_discard) || !c.is_open() {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }
            Conns::Cluster(p) => {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = f(&mut *c);
                if out.as_ref().err().is_some_and(must_discard) || !c.is_open() {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }
        })
    }

    /// `with_conn` for a single server, handing `f` the pooled connection itself, for exchanges
    /// that keep several replies in flight (`send_packed_command` / `recv_response`). Any
    /// failure discards the connection: replies of the exchange may still be on its socket.
    fn with_single<T>(
        &self,
        pool: &RedisPool,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut PooledConn) -> RedisResult<T>,
    ) -> Result<T> {
        self.retrying(operation, namespace, || {
            let mut c = pool
                .get()
                .map_err(|m| pool_error(operation, namespace, m))?;
            let out = f(&mut c);
            match out {
                Ok(_) => pool::touch(&mut c),
                Err(_) => c.mark_broken(),
            }
            out.map_err(|e| redis_error(operation, namespace, e))
        })
    }

    /// Runs `cmds` as one batch: a pipeline on a single server, per-node pipelines with
    /// redirect handling on a cluster. Returns one result per command; per-command server
    /// errors (e.g. WRONGTYPE) are left for the caller to name the key.
    fn batch(
        &self,
        operation: &'static str,
        namespace: &str,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<RedisResult<Value>>> {
        match &self.conns {
            Conns::Single(_) => {
                // Built once: a retry re-sends the same packed pipeline.
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.ignore_errors();
                let values: Vec<Value> = self.with_conn(operation, namespace, |c| p.query(c))?;
                Ok(values.into_iter().map(value_result).collect())
            }
            Conns::Cluster(p) => self.retrying(operation, namespace, || {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = cluster::pipeline(&mut c.conn, &cmds);
                if out.as_ref().err().is_some_and(must_discard) {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }),
        }
    }

    /// Runs `f` once per master with a connection and the master's address (`None` on a
    /// single server, where the connection is the server's). Every operation that must see
    /// all the data (`all_keys`, `clear`, `stats`, `list_namespaces`, the checkpoint) goes
    /// through here: on a cluster, [`cluster::on_every_master`] returns only results gathered
    /// under one stable slot map covering all slots, or [`Error::ClusterUnstable`].
    fn each_master<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut dyn PersistOps, Option<(&str, u16)>) -> RedisResult<T>,
    ) -> Result<Vec<T>> {
        match &self.conns {
            Conns::Single(_) => self
                .with_conn(operation, namespace, |c| f(&mut ConnOps(c), None))
                .map(|v| vec![v]),
            Conns::Cluster(p) => self.retrying(operation, namespace, || {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = cluster::on_every_master(&mut c.conn, |conn, host, port| {
                    f(&mut NodeOps { conn, host, port }, Some((host, port)))
                });
                match out {
                    Ok(v) => Ok(v),
                    Err(cluster::EveryMasterError::Redis(e)) => {
                        if must_discard(&e) {
                            c.mark_broken();
                        }
                        Err(redis_error(operation, namespace, e))
                    }
                    Err(cluster::EveryMasterError::Unstable { attempts, reason }) => {
                        Err(Error::ClusterUnstable {
                            operation,
                            namespace: namespace.to_string(),
                            attempts,
                            reason,
                        })
                    }
                }
            }),
        }
    }

    /// Retries `attempt` on retryable failures, with exponential backoff and jitter.
    fn retrying<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut n = 0u32;
        loop {
            let err = match attempt() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if n >= self.config.retries || !self.should_retry(&err) {
                return Err(err);
            }
            let pause = backoff(n);
            self.retries.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "redis {operation} on {namespace:?} failed ({err}); retry {} in {pause:?}",
                n + 1
            );
            std::thread::sleep(pause);
            n += 1;
        }
    }

    fn should_retry(&self, err: &Error) -> bool {
        match err {
            Error::Redis { source, .. } if source.is_timeout() => self.config.retry_on_timeout,
            Error::Redis { source, .. } => is_retryable_redis(source),
            Error::Pool { .. } => self.config.retry_on_timeout,
            // A refused connect costs nothing to repeat (a restarting server comes back within
            // the backoff); one that waited out REDIS_CONNECTION_TIMEOUT is not repeated, or
            // an outage would take (retries + 1) timeouts to be reported; a refused password
            // or certificate never heals.
            Error::Connect { cause, .. } => {
                matches!(cause, ConnectFailure::Refused | ConnectFailure::Unreachable)
            }
            _ => false,
        }
    }

    /// SCANs `pattern` on every master, handing each page of keys to `page`. A key may be
    /// handed over more than once (SCAN's guarantee); callers deduplicate.
    fn scan(
        &self,
        operation: &'static str,
        namespace: &str,
        pattern: &str,
        page: &mut dyn FnMut(Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        // Pages are collected per master before being handed over, so a retried attempt
        // (after a failover) never hands a partial page sequence twice to a non-idempotent
        // consumer; consumers still deduplicate.
        let pages = self.each_master(operation, namespace, |ops, _| {
            let mut pages = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(
                    ops.run(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(SCAN_COUNT),
                    )?,
                )?;
                if !keys.is_empty() {
                    pages.push(keys);
                }
                if next == 0 {
                    return Ok(pages);
                }
                cursor = next;
            }
        })?;
        for keys in pages.into_iter().flatten() {
            page(keys)?;
        }
        Ok(())
    }

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

    /// Commands retried on these connections since the pool was created (every retry, of any
    /// namespace or operation): a counter observers read, the backend never pushes it anywhere.
    pub fn retries_total(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
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

/// True when the connection cannot be reused: a reply may still be in flight, or it points at
/// a server that is no longer the master.
fn must_discard(e: &RedisError) -> bool {
    crate::error::is_connection_error(e) || e.code() == Some("READONLY")
}

fn pool_error(operation: &'static str, namespace: &str, e: pool::NoConnection) -> Error {
    e.into_error(operation, namespace)
}

fn redis_error(operation: &'static str, namespace: &str, source: RedisError) -> Error {
    Error::Redis {
        operation,
        namespace: namespace.to_string(),
        source,
    }
}

/// A pipeline reply item as a result: server errors become `Err`.
fn value_result(v: Value) -> RedisResult<Value> {
    match v {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

/// Appends a RESP array header, `*n\r\n`.
///
/// The batch paths of a single server pack their commands by hand into one buffer: building a
/// `redis::Cmd` per item allocates for the command and every argument and copies each value
/// twice more (into the command, then into the packed pipeline).
fn resp_array(buf: &mut Vec<u8>, n: usize) {
    buf.push(b'*');
    push_decimal(buf, n as u64);
    buf.extend_from_slice(b"\r\n");
}

/// Appends one bulk string made of `parts` concatenated (a key is written as prefix and id,
/// without building it first).
fn resp_bulk(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.push(b'$');
    push_decimal(buf, parts.iter().map(|p| p.len() as u64).sum());
    buf.extend_from_slice(b"\r\n");
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"\r\n");
}

fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// The replies of a hand-packed pipeline, or the error redis-rs's `Pipeline::query` gives for
/// them when some are server errors (the same error value as before the commands were packed
/// by hand: redis-rs builds it internally, so the replies are handed to a real pipeline).
fn pipeline_replies(replies: Vec<Value>) -> RedisResult<Vec<Value>> {
    if !replies.iter().any(|v| matches!(v, Value::ServerError(_))) {
        return Ok(replies);
    }
    /// A "connection" that answers with replies already received.
    struct Received(Option<Vec<Value>>);
    impl ConnectionLike for Received {
        fn req_packed_command(&mut self, _: &[u8]) -> RedisResult<Value> {
            Ok(Value::Nil)
        }
        fn req_packed_commands(&mut self, _: &[u8], _: usize, _: usize) -> RedisResult<Vec<Value>> {
            Ok(self.0.take().unwrap_or_default())
        }
        fn get_db(&self) -> i64 {
            0
        }
        fn check_connection(&mut self) -> bool {
            true
        }
        fn is_open(&self) -> bool {
            true
        }
    }
    let mut p = redis::pipe();
    for _ in 0..replies.len() {
        p.cmd("PING");
    }
    p.query(&mut Received(Some(replies)))
}

/// Persistence commands over a single-server connection.
struct ConnOps<'a>(&'a mut dyn ConnectionLike);

/// Persistence commands routed to one cluster node by address.
struct NodeOps<'a> {
    conn: &'a mut redis::cluster::ClusterConnection,
    host: &'a str,
    port: u16,
}

impl PersistOps for ConnOps<'_> {
    fn run(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        self.0.req_command(cmd)
    }
}

impl PersistOps for NodeOps<'_> {
    fn run(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        cluster::on_node(self.conn, self.host, self.port, cmd)
    }
}

/// Backoff before retry `attempt` (0-based): 25 ms doubling up to 1 s, with jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = (25u64 << attempt.min(6)).min(1_000);
    // RandomState is seeded randomly per instance: enough jitter without a rand dependency.
    let r = RandomState::new().build_hasher().finish();
    Duration::from_millis(cap / 2 + r % (cap / 2 + 1))
}

/// Escapes Redis glob characters so the string matches only itself in SCAN MATCH.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One namespace in Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    namespace: String,
    /// `{prefix}:{namespace}:`, built once.
    key_prefix: String,
    ttl: u64,
    shared: Arc<RedisShared>,
}

impl RedisStore {
    /// The TTL applied to writes, in seconds (0 = none).
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl
    }

    /// The full Redis key of an id.
    pub fn key(&self, id: &str) -> String {
        let mut k = String::with_capacity(self.key_prefix.len() + id.len());
        k.push_str(&self.key_prefix);
        k.push_str(id);
        k
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<Json> {
        Codec::decode(bytes).map_err(|reason| Error::Decode {
            namespace: self.namespace.clone(),
            key: self.key(id),
            reason: reason.to_string(),
        })
    }

    /// The error for a per-key failure inside a batch.
    fn key_error(&self, operation: &'static str, id: &str, e: RedisError) -> Error {
        if e.code() == Some("WRONGTYPE") {
            return self.wrong_type(id, "non-string value");
        }
        Error::Redis {
            operation,
            namespace: self.namespace.clone(),
            source: e,
        }
    }

    fn wrong_type(&self, id: &str, found: &str) -> Error {
        Error::WrongType {
            namespace: self.namespace.clone(),
            key: self.key(id),
            found: found.to_string(),
        }
    }

    /// For ids that MGET reported missing: a key that exists with another type is an error,
    /// never "missing" (MGET answers nil for a hash, a list, ...).
    fn check_missing_types(&self, ids: &[&String]) -> Result<()> {
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        let existing: usize = self.shared.with_conn("get_by_ids", &self.namespace, |c| {
            redis::cmd("EXISTS").arg(&keys).query(c)
        })?;
        if existing == 0 {
            return Ok(());
        }
        let cmds: Vec<Cmd> = keys
            .iter()
            .map(|k| redis::cmd("TYPE").arg(k).clone())
            .collect();
        let types = self.shared.batch("get_by_ids", &self.namespace, cmds)?;
        for (id, t) in ids.iter().zip(types) {
            let t: String = t
                .and_then(|v| Ok(redis::from_redis_value(v)?))
                .unwrap_or_default();
            if t != "none" && t != "string" && !t.is_empty() {
                return Err(self.wrong_type(id, &t));
            }
        }
        Ok(())
    }

    fn encode(&self, id: &str, v: &Json) -> Result<Vec<u8>> {
        self.shared.codec.encode(v).map_err(|reason| Error::Encode {
            namespace: self.namespace.clone(),
            key: self.key(id),
            reason: reason.to_string(),
        })
    }

    /// Appends the stored bytes of `v` to `out`; see [`Codec::encode_into`].
    fn encode_into(&self, id: &str, v: &Json, out: &mut Vec<u8>) -> Result<usize> {
        self.shared
            .codec
            .encode_into(v, out)
            .map_err(|reason| Error::Encode {
                namespace: self.namespace.clone(),
                key: self.key(id),
                reason: reason.to_string(),
            })
    }

    /// `upsert` on a single server: each chunk's SETs (and WAIT) packed by hand, window by
    /// window (each value encoded into a reused buffer, then copied in).
    fn upsert_single(&self, pool: &RedisPool, items: &[(&str, &Json)]) -> Result<()> {
        let ttl = self.ttl.to_string();
        let want = self.shared.config.wait_replicas;
        let wait_ms = (self.shared.config.wait_timeout.as_millis() as u64).to_string();
        let mut value = Vec::new();
        let mut start = 0;
        while start < items.len() {
            // One chunk: at most WRITE_CHUNK items or WRITE_CHUNK_BYTES of values, sent as
            // windows of SET commands (the last followed by WAIT when replicas are awaited). The
            // packed windows are kept until the chunk is acknowledged: a retry re-sends the same
            // bytes without encoding again.
            let mut windows: Vec<(Vec<u8>, usize)> = Vec::new();
            let mut next = start;
            let mut bytes = 0usize;
            let mut chunk_done = false;
            // Encodes (and compresses) the next window on the caller's thread. Returns false
            // when the chunk has no more items.
            let mut encode_window = |windows: &mut Vec<(Vec<u8>, usize)>| -> Result<bool> {
                if chunk_done {
                    return Ok(false);
                }
                let mut buf = Vec::new();
                let first = next;
                while next < items.len()
                    && next - first < UPSERT_WINDOW
                    && next - start < WRITE_CHUNK
                    && bytes < WRITE_CHUNK_BYTES
                {
                    let (id, v) = &items[next];
                    value.clear();
                    bytes += self.encode_into(id, v, &mut value)?;
                    resp_array(&mut buf, if self.ttl > 0 { 5 } else { 3 });
                    resp_bulk(&mut buf, &[b"SET"]);
                    resp_bulk(&mut buf, &[self.key_prefix.as_bytes(), id.as_bytes()]);
                    resp_bulk(&mut buf, &[&value]);
                    if self.ttl > 0 {
                        resp_bulk(&mut buf, &[b"EX"]);
                        resp_bulk(&mut buf, &[ttl.as_bytes()]);
                    }
                    next += 1;
                }
                let mut count = next - first;
                chunk_done = next == items.len()
                    || next - start >= WRITE_CHUNK
                    || bytes >= WRITE_CHUNK_BYTES;
                if chunk_done && want > 0 {
                    // WAIT counts the replicas that have every write of this connection.
                    resp_array(&mut buf, 3);
                    resp_bulk(&mut buf, &[b"WAIT"]);
                    resp_bulk(&mut buf, &[want.to_string().as_bytes()]);
                    resp_bulk(&mut buf, &[wait_ms.as_bytes()]);
                    count += 1;
                }
                if count > 0 {
                    windows.push((buf, count));
                }
                Ok(count > 0)
            };
            // The first value that failed to encode: the windows before it are still sent (as
            // a whole chunk was before), then the error is returned.
            let mut failed: Option<Error> = None;
            let confirmed = self
                .shared
                .with_single(pool, "upsert", &self.namespace, |c| {
                    let (mut sent, mut received) = (0, 0);
                    let mut last = Value::Nil;
                    loop {
                        // Two windows in flight: the server stores one while the next is encoded.
                        while sent - received < 2 {
                            if sent == windows.len() {
                                if failed.is_some() {
                                    break;
                                }
                                match encode_window(&mut windows) {
                                    Ok(true) => {}
                                    Ok(false) => break,
                                    Err(e) => {
                                        failed = Some(e);
                                        break;
                                    }
                                }
                            }
                            c.conn.send_packed_command(&windows[sent].0)?;
                            sent += 1;
                        }
                        if received == sent {
                            break;
                        }
                        let count = windows[received].1;
                        let mut replies = Vec::with_capacity(count);
                        for _ in 0..count {
                            replies.push(c.conn.recv_response()?);
                        }
                        received += 1;
                        let mut replies = pipeline_replies(replies)?;
                        if let Some(v) = replies.pop() {
                            last = v;
                        }
                    }
                    if want > 0 && failed.is_none() {
                        redis::from_redis_value::<i64>(last).map_err(RedisError::from)
                    } else {
                        Ok(0)
                    }
                })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if want > 0 {
                check_replicas(&self.namespace, want, confirmed)?;
            }
            start = next;
        }
        Ok(())
    }

    fn pattern(&self) -> String {
        format!("{}*", glob_escape(&self.key_prefix))
    }

    fn id_of(&self, key: Vec<u8>) -> Result<String> {
        let prefix = self.key_prefix.len();
        match String::from_utf8(key) {
            Ok(mut k) if k.len() > prefix => Ok(k.split_off(prefix)),
            Ok(k) => Err(Error::Decode {
                namespace: self.namespace.clone(),
                key: k,
                reason: "key has no id after the namespace".into(),
            }),
            Err(e) => Err(Error::Decode {
                namespace: self.namespace.clone(),
                key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                reason: "key is not valid UTF-8".into(),
            }),
        }
    }

    /// `get_by_ids` on a single server: MGETs of [`MGET_WINDOW`] ids, two in flight, each
    /// window decoded while the server answers the next.
    fn get_by_ids_single(
        &self,
        pool: &RedisPool,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> Result<Vec<Option<Json>>> {
        let windows: Vec<&[String]> = ids.chunks(MGET_WINDOW).collect();
        // Packed once: a retry re-sends the same bytes.
        let mut key = String::with_capacity(self.key_prefix.len() + 64);
        let packed: Vec<Vec<u8>> = windows
            .iter()
            .map(|window| {
                let mut cmd = redis::cmd("MGET");
                for id in *window {
                    key.clear();
                    key.push_str(&self.key_prefix);
                    key.push_str(id);
                    cmd.arg(key.as_str());
                }
                cmd.get_packed_command()
            })
            .collect();
        let (out, missing, failed) =
            self.shared
                .with_single(pool, "get_by_ids", &self.namespace, |c| {
                    let mut out: Vec<Option<Json>> = Vec::with_capacity(ids.len());
                    let mut missing: Vec<&String> = Vec::new();
                    // The first value that does not decode. The exchange still runs to its end, so
                    // the connection goes back to the pool with nothing left on its socket.
                    let mut failed: Option<Error> = None;
                    let mut sent = 0;
                    while sent < packed.len().min(2) {
                        c.conn.send_packed_command(&packed[sent])?;
                        sent += 1;
                    }
                    for window in &windows {
                        let reply = c.conn.recv_response()?;
                        if sent < packed.len() {
                            c.conn.send_packed_command(&packed[sent])?;
                            sent += 1;
                        }
                        // An error reply (BUSY, LOADING ...) as a server error, with its code:
                        // converting it to values would make it a type error, never retried.
                        if let Value::ServerError(e) = reply {
                            return Err(e.into());
                        }
                        let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(reply)?;
                        if values.len() != window.len() {
                            return Err(RedisError::from((
                                redis::ErrorKind::Parse,
                                "MGET returned a different number of values than keys asked",
                            )));
                        }
                        if failed.is_some() {
                            continue;
                        }
                        for (id, v) in window.iter().zip(values) {
                            match v {
                                None => {
                                    missing.push(id);
                                    out.push(None);
                                }
                                Some(bytes) => match self.decode(id, &bytes) {
                                    Ok(value) => out.push(Some(project(value, fields))),
                                    Err(e) => {
                                        failed = Some(e);
                                        break;
                                    }
                                },
                            }
                        }
                    }
                    Ok((out, missing, failed))
                })?;
        if let Some(e) = failed {
            return Err(e);
        }
        // MGET answers nil for a key holding another type: only a missing key may be None.
        for part in missing.chunks(READ_CHUNK) {
            self.check_missing_types(part)?;
        }
        Ok(out)
    }

    /// One single-key command per id, as a batch; per-key failures name the id.
    fn per_key(
        &self,
        operation: &'static str,
        command: &str,
        ids: &[String],
    ) -> Result<Vec<Value>> {
        let mut key = String::with_capacity(self.key_prefix.len() + 64);
        let cmds: Vec<Cmd> = ids
            .iter()
            .map(|id| {
                key.clear();
                key.push_str(&self.key_prefix);
                key.push_str(id);
                let mut c = redis::cmd(command);
                c.arg(key.as_str());
                c
            })
            .collect();
        let results = self.shared.batch(operation, &self.namespace, cmds)?;
        ids.iter()
            .zip(results)
            .map(|(id, r)| r.map_err(|e| self.key_error(operation, id, e)))
            .collect()
    }

    /// One chunk of a cluster `upsert` (single servers go through [`RedisStore::upsert_single`]).
    fn write_chunk(&self, pool: &ClusterPool, keys: &[String], values: &[Vec<u8>]) -> Result<()> {
        let ttl = self.ttl;
        let set = |k: &String, v: &Vec<u8>| {
            let mut c = redis::cmd("SET");
            c.arg(k).arg(v.as_slice());
            if ttl > 0 {
                c.arg("EX").arg(ttl);
            }
            c
        };
        let cmds: Vec<Cmd> = keys.iter().zip(values).map(|(k, v)| set(k, v)).collect();
        self.shared.retrying("upsert", &self.namespace, || {
            let mut c = pool
                .get()
                .map_err(|m| pool_error("upsert", &self.namespace, m))?;
            let out = cluster::pipeline(&mut c.conn, &cmds);
            if out.as_ref().err().is_some_and(must_discard) {
                c.mark_broken();
            }
            let results = out.map_err(|e| redis_error("upsert", &self.namespace, e))?;
            if let Some((i, e)) = results
                .into_iter()
                .enumerate()
                .find_map(|(i, r)| r.err().map(|e| (i, e)))
            {
                // Rebuilt to name the key, keeping the server's code: retry decisions
                // (MISCONF, NOREPLICAS, OOM ...) are taken on it.
                return Err(Error::Redis {
                    operation: "upsert",
                    namespace: self.namespace.clone(),
                    source: redis::make_extension_error(
                        e.code().unwrap_or("ERR").to_string(),
                        Some(format!(
                            "SET {} failed: {}",
                            display_id(&keys[i]),
                            e.detail().unwrap_or_default()
                        )),
                    ),
                });
            }
            self.shared
                .wait_for_replicas_cluster(&self.namespace, &mut c.conn, keys)
        })
    }
}

impl KvStore for RedisStore {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        self.shared
            .scan("all_keys", &self.namespace, &self.pattern(), &mut |keys| {
                for k in keys {
                    let id = self.id_of(k)?;
                    // SCAN may return a key more than once (rehashing, slot migration).
                    if seen.insert(id.clone()) {
                        ids.push(id);
                    }
                }
                Ok(())
            })?;
        Ok(ids)
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Json>> {
        validate_id(&self.namespace, id)?;
        let key = self.key(id);
        let bytes: Option<Vec<u8>> = self
            .shared
            .with_conn("get_by_id", &self.namespace, |c| {
                redis::cmd("GET").arg(&key).query(c)
            })
            .map_err(|e| match e {
                Error::Redis { source, .. } if source.code() == Some("WRONGTYPE") => {
                    self.wrong_type(id, "non-string value")
                }
                other => other,
            })?;
        bytes.map(|b| self.decode(id, &b)).transpose()
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Json>>> {
        validate_ids(&self.namespace, ids)?;
        if let Conns::Single(pool) = &self.shared.conns {
            return self.get_by_ids_single(pool, ids, fields);
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READ_CHUNK) {
            // A cluster gets single-key GETs (never a multi-slot MGET): WRONGTYPE then comes
            // back per key.
            let values: Vec<Option<Vec<u8>>> = self
                .per_key("get_by_ids", "GET", chunk)?
                .into_iter()
                .map(|v| redis::from_redis_value(v).map_err(RedisError::from))
                .collect::<RedisResult<_>>()
                .map_err(|e| redis_error("get_by_ids", &self.namespace, e))?;
            for (id, v) in chunk.iter().zip(values) {
                out.push(match v {
                    None => None,
                    Some(bytes) => Some(project(self.decode(id, &bytes)?, fields)),
                });
            }
        }
        Ok(out)
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        validate_ids(&self.namespace, ids)?;
        let mut present = Vec::with_capacity(ids.len());
        let mut buf = Vec::new();
        for chunk in ids.chunks(READ_CHUNK) {
            let values = match &self.shared.conns {
                // One EXISTS per id (EXISTS with several keys only counts them), packed by hand.
                Conns::Single(_) => {
                    buf.clear();
                    for id in chunk {
                        resp_array(&mut buf, 2);
                        resp_bulk(&mut buf, &[b"EXISTS"]);
                        resp_bulk(&mut buf, &[self.key_prefix.as_bytes(), id.as_bytes()]);
                    }
                    let replies = self.shared.with_conn("filter_keys", &self.namespace, |c| {
                        c.req_packed_commands(&buf, 0, chunk.len())
                    })?;
                    chunk
                        .iter()
                        .zip(replies)
                        .map(|(id, r)| {
                            value_result(r).map_err(|e| self.key_error("filter_keys", id, e))
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                Conns::Cluster(_) => self.per_key("filter_keys", "EXISTS", chunk)?,
            };
            for v in values {
                present.push(matches!(v, Value::Int(n) if n > 0));
            }
        }
        Ok(missing_in_order(ids, |i| present[i]))
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        let refs: Vec<(&str, &Json)> = items.iter().map(|(id, v)| (id.as_str(), v)).collect();
        self.upsert_refs(&refs)
    }

    /// Encodes straight from the references: no copy of the values.
    fn upsert_refs(&self, items: &[(&str, &Json)]) -> Result<()> {
        for (id, _) in items {
            validate_id(&self.namespace, id)?;
        }
        let pool = match &self.shared.conns {
            Conns::Single(pool) => return self.upsert_single(pool, items),
            Conns::Cluster(pool) => pool,
        };
        let mut start = 0;
        while start < items.len() {
            // Encode (and compress) on the caller's thread, before holding a connection.
            let mut end = start;
            let mut bytes = 0usize;
            let mut values = Vec::new();
            while end < items.len() && end - start < WRITE_CHUNK && bytes < WRITE_CHUNK_BYTES {
                let v = self.encode(items[end].0, items[end].1)?;
                bytes += v.len();
                values.push(v);
                end += 1;
            }
            let keys: Vec<String> = items[start..end]
                .iter()
                .map(|(id, _)| self.key(id))
                .collect();
            self.write_chunk(pool, &keys, &values)?;
            start = end;
        }
        Ok(())
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        validate_ids(&self.namespace, ids)?;
        for chunk in ids.chunks(READ_CHUNK) {
            match &self.shared.conns {
                Conns::Single(_) => {
                    let keys: Vec<String> = chunk.iter().map(|id| self.key(id)).collect();
                    self.shared
                        .with_conn("delete_by_ids", &self.namespace, |c| {
                            redis::cmd("UNLINK").arg(&keys).query::<()>(c)
                        })?;
                }
                Conns::Cluster(_) => {
                    self.per_key("delete_by_ids", "UNLINK", chunk)?;
                }
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        let mut keys = Vec::new();
        self.shared
            .scan("clear", &self.namespace, &self.pattern(), &mut |page| {
                keys.extend(page);
                Ok(())
            })?;
        for chunk in keys.chunks(READ_CHUNK) {
            let cmds: Vec<Cmd> = chunk
                .iter()
                .map(|k| redis::cmd("UNLINK").arg(k.as_slice()).clone())
                .collect();
            for r in self.shared.batch("clear", &self.namespace, cmds)? {
                r.map_err(|e| redis_error("clear", &self.namespace, e))?;
            }
        }
        Ok(())
    }

    fn index_start_callback(&self) -> Result<()> {
        self.shared
            .with_conn("index_start_callback", &self.namespace, |c| {
                redis::cmd("PING").query::<()>(c)
            })
    }

    fn index_done_callback(&self) -> Result<()> {
        self.shared.checkpoint()
    }

    fn stats(&self) -> Result<NamespaceStats> {
        let mut count = 0u64;
        let mut sample: Vec<Vec<u8>> = Vec::new();
        self.shared
            .scan("stats", &self.namespace, &self.pattern(), &mut |keys| {
                count += keys.len() as u64;
                let room = STATS_SAMPLE.saturating_sub(sample.len());
                sample.extend(keys.into_iter().take(room));
                Ok(())
            })?;
        let bytes = if sample.is_empty() {
            0
        } else {
            let cmds: Vec<Cmd> = sample
                .iter()
                .map(|k| redis::cmd("STRLEN").arg(k.as_slice()).clone())
                .collect();
            let total: u64 = self
                .shared
                .batch("stats", &self.namespace, cmds)?
                .into_iter()
                .map(|r| match r {
                    Ok(Value::Int(n)) => n.max(0) as u64,
                    _ => 0,
                })
                .sum();
            total * count / sample.len() as u64
        };
        Ok(NamespaceStats {
            namespace: self.namespace.clone(),
            backend: BackendKind::Redis,
            keys: count,
            bytes,
            bytes_sampled: count > sample.len() as u64,
            ttl_seconds: self.ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape("a*b?[c]\\d"), "a\\*b\\?\\[c\\]\\\\d");
        assert_eq!(glob_escape("nano_graphrag:docs:"), "nano_graphrag:docs:");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for a in 0..10 {
            let d = backoff(a);
            assert!(d <= Duration::from_secs(1), "{a}: {d:?}");
        }
        assert!(backoff(0) <= Duration::from_millis(25));
    }
}
