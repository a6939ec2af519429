//! The Redis backend: every process pointing at the same server shares the namespaces.
//!
//! Keys are `{prefix}:{namespace}:{id}` (default prefix `nano_graphrag`, the Python
//! implementation's layout). Values are plain JSON, or an lz4 frame when compression is on
//! and pays (see [`crate::codec`]). Batch operations take one round trip per chunk of
//! [`READ_CHUNK`] ids or [`WRITE_CHUNK`] items; `all_keys` and `clear` use SCAN with a
//! glob-escaped MATCH pattern, never KEYS.

mod checkpoint;
mod pool;

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{ConnectionLike, RedisError, RedisResult};
use serde_json::Value;

use crate::codec::Codec;
use crate::config::{redact_url, RedisConfig};
use crate::error::{display_id, is_retryable_redis, Error, Result};
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, validate_namespace, Item, KvStore,
    NamespaceStats,
};

use checkpoint::{checkpoint_server, Coalescer, Durable};
use pool::{touch, PooledConn, RedisPool};

/// Ids per MGET / EXISTS pipeline / UNLINK: a call with a million ids becomes requests of this
/// size instead of one giant one.
pub const READ_CHUNK: usize = 2_000;
/// Items per SET pipeline.
pub const WRITE_CHUNK: usize = 1_000;
/// Bytes of values per SET pipeline.
pub const WRITE_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// SCAN's COUNT hint.
const SCAN_COUNT: usize = 1_000;
/// Keys whose value size is sampled by `stats`.
const STATS_SAMPLE: usize = 256;
/// How long a checkpoint may wait for the server's save.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);

/// What every namespace opened from one configuration shares: the pool, the codec, the
/// checkpoint coalescer and the one-time warnings.
pub struct RedisShared {
    config: RedisConfig,
    pool: RedisPool,
    codec: Codec,
    checkpoints: Coalescer,
    warned_no_durability: AtomicBool,
}

impl std::fmt::Debug for RedisShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisShared")
            .field("url", &redact_url(&self.config.url))
            .field("key_prefix", &self.config.key_prefix)
            .finish_non_exhaustive()
    }
}

impl RedisShared {
    /// Creates the pool and checks the server answers.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that cannot be used; [`Error::Pool`] or [`Error::Redis`]
    /// when the server does not answer PING (the message names the redacted URL).
    pub fn connect(config: &RedisConfig) -> Result<Arc<RedisShared>> {
        let shared = Self::new_unchecked(config)?;
        shared
            .with_conn("connect", "", |c| redis::cmd("PING").query::<()>(c))
            .map_err(|e| match e {
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
        shared.warn_on_eviction_policy();
        Ok(shared)
    }

    /// Creates the pool without contacting the server.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that cannot be used.
    pub fn new_unchecked(config: &RedisConfig) -> Result<Arc<RedisShared>> {
        let pool = RedisPool::new(config).map_err(|e| Error::Config {
            variable: "REDIS_URL".into(),
            value: redact_url(&config.url),
            expected: format!("a redis:// or unix:// URL ({})", e.category()),
        })?;
        Ok(Arc::new(RedisShared {
            config: config.clone(),
            pool,
            codec: Codec::new(config.compression, config.compression_min_bytes),
            checkpoints: Coalescer::default(),
            warned_no_durability: AtomicBool::new(false),
        }))
    }

    /// The configuration the stores use.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Open and idle pooled connections.
    pub fn pool_state(&self) -> (u32, u32) {
        self.pool.state()
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
    /// prefix).
    ///
    /// # Errors
    /// Redis failures.
    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        let pattern = format!("{}:*", glob_escape(&self.config.key_prefix));
        let skip = self.config.key_prefix.len() + 1;
        let mut names = HashSet::new();
        self.scan("list_namespaces", "", &pattern, |keys| {
            for k in keys {
                if let Some(ns) = k.get(skip..).and_then(|rest| {
                    let end = rest.iter().position(|b| *b == b':')?;
                    std::str::from_utf8(&rest[..end]).ok()
                }) {
                    if validate_namespace(ns).is_ok() {
                        names.insert(ns.to_string());
                    }
                }
            }
            Ok(())
        })?;
        let mut names: Vec<_> = names.into_iter().collect();
        names.sort();
        Ok(names)
    }

    /// Runs `f` on a pooled connection, retrying connection errors (and timeouts when allowed)
    /// with exponential backoff and jitter. Only idempotent commands go through here.
    pub(crate) fn with_conn<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut PooledConn) -> RedisResult<T>,
    ) -> Result<T> {
        let mut attempt = 0u32;
        loop {
            let err = match self.try_once(operation, namespace, &mut f) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt >= self.config.retries || !self.should_retry(&err) {
                return Err(err);
            }
            let pause = backoff(attempt);
            log::debug!(
                "redis {operation} failed ({err}); retry {} in {pause:?}",
                attempt + 1
            );
            std::thread::sleep(pause);
            attempt += 1;
        }
    }

    fn try_once<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        f: &mut impl FnMut(&mut PooledConn) -> RedisResult<T>,
    ) -> Result<T> {
        let mut conn = self.pool.get().map_err(|message| Error::Pool {
            operation,
            namespace: namespace.to_string(),
            message,
        })?;
        match f(&mut conn) {
            Ok(v) => {
                touch(&mut conn);
                Ok(v)
            }
            Err(e) => {
                if crate::error::is_connection_error(&e) || !conn.is_open() {
                    // A reply may still be on its way on this socket: never reuse it.
                    conn.mark_broken();
                }
                Err(Error::Redis {
                    operation,
                    namespace: namespace.to_string(),
                    source: e,
                })
            }
        }
    }

    fn should_retry(&self, err: &Error) -> bool {
        match err {
            Error::Redis { source, .. } => {
                if source.is_timeout() {
                    self.config.retry_on_timeout
                } else {
                    is_retryable_redis(source)
                }
            }
            Error::Pool { .. } => self.config.retry_on_timeout,
            _ => false,
        }
    }

    /// SCANs `pattern`, handing each page of keys to `page`.
    fn scan(
        &self,
        operation: &'static str,
        namespace: &str,
        pattern: &str,
        mut page: impl FnMut(Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        let mut cursor: u64 = 0;
        loop {
            // Each SCAN step is retried on its own: repeating a cursor is allowed.
            let (next, keys): (u64, Vec<Vec<u8>>) = self.with_conn(operation, namespace, |c| {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query(c)
            })?;
            if !keys.is_empty() {
                page(keys)?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// One durable checkpoint shared by all concurrent callers.
    fn checkpoint(&self) -> Result<()> {
        let outcome = self.checkpoints.run(|| {
            self.with_conn("index_done_callback", "", |c| {
                checkpoint_server(c, CHECKPOINT_TIMEOUT)
            })
            .map_err(|e| {
                if e.is_permission_denied() {
                    return Ok(Durable::Unsupported(format!(
                        "the Redis user may not run INFO/BGSAVE/CONFIG ({e})"
                    )));
                }
                Err(e.to_string())
            })
            .or_else(|r| r)
            .map(|d| {
                if let Durable::Unsupported(why) = d {
                    if !self.warned_no_durability.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "index_done_callback cannot make writes durable: {why}; \
                             continuing without a checkpoint (warned once)"
                        );
                    }
                }
            })
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
}

/// Backoff before retry `attempt` (0-based): 25 ms doubling up to 1 s, with full jitter.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(25 * 2u64.pow(attempt.min(6))).min(Duration::from_secs(1));
    // RandomState is seeded randomly per instance: enough jitter without a rand dependency.
    let r = RandomState::new().build_hasher().finish();
    Duration::from_millis(cap.as_millis() as u64 / 2 + r % (cap.as_millis() as u64 / 2 + 1))
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

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<Value> {
        Codec::decode(bytes).map_err(|reason| Error::Decode {
            namespace: self.namespace.clone(),
            key: self.key(id),
            reason,
        })
    }

    fn redis_err(&self, operation: &'static str, source: RedisError) -> Error {
        Error::Redis {
            operation,
            namespace: self.namespace.clone(),
            source,
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
        let types: Vec<String> = self.shared.with_conn("get_by_ids", &self.namespace, |c| {
            let mut p = redis::pipe();
            for k in &keys {
                p.cmd("TYPE").arg(k);
            }
            p.query(c)
        })?;
        for (k, t) in keys.into_iter().zip(types) {
            if t != "none" && t != "string" {
                return Err(Error::WrongType {
                    namespace: self.namespace.clone(),
                    key: k,
                    found: t,
                });
            }
        }
        Ok(())
    }

    fn encode_items(&self, items: &[Item]) -> Result<Vec<Vec<u8>>> {
        items
            .iter()
            .map(|(id, v)| {
                self.shared.codec.encode(v).map_err(|reason| Error::Encode {
                    namespace: self.namespace.clone(),
                    key: display_id(id),
                    reason,
                })
            })
            .collect()
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
}

/// Appends `SET key value [EX ttl]` for each item to `pipe`.
fn add_sets(pipe: &mut redis::Pipeline, keys: &[String], values: &[Vec<u8>], ttl: u64) {
    for (k, v) in keys.iter().zip(values) {
        let cmd = pipe.cmd("SET").arg(k).arg(v.as_slice());
        if ttl > 0 {
            cmd.arg("EX").arg(ttl);
        }
        cmd.ignore();
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
            .scan("all_keys", &self.namespace, &self.pattern(), |keys| {
                for k in keys {
                    let id = self.id_of(k)?;
                    // SCAN may return a key more than once (e.g. during a rehash).
                    if seen.insert(id.clone()) {
                        ids.push(id);
                    }
                }
                Ok(())
            })?;
        Ok(ids)
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        validate_id(&self.namespace, id)?;
        let key = self.key(id);
        let bytes: Option<Vec<u8>> = self
            .shared
            .with_conn("get_by_id", &self.namespace, |c| {
                redis::cmd("GET").arg(&key).query(c)
            })
            .map_err(|e| match e {
                Error::Redis { source, .. } if source.code() == Some("WRONGTYPE") => {
                    Error::WrongType {
                        namespace: self.namespace.clone(),
                        key: key.clone(),
                        found: "non-string value".into(),
                    }
                }
                other => other,
            })?;
        bytes.map(|b| self.decode(id, &b)).transpose()
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        validate_ids(&self.namespace, ids)?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READ_CHUNK) {
            let mut cmd = redis::cmd("MGET");
            let mut key = String::with_capacity(self.key_prefix.len() + 64);
            for id in chunk {
                key.clear();
                key.push_str(&self.key_prefix);
                key.push_str(id);
                cmd.arg(key.as_str());
            }
            let values: Vec<Option<Vec<u8>>> =
                self.shared
                    .with_conn("get_by_ids", &self.namespace, |c| cmd.query(c))?;
            if values.len() != chunk.len() {
                return Err(self.redis_err(
                    "get_by_ids",
                    RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "MGET returned a different number of values than keys asked",
                    )),
                ));
            }
            let missing: Vec<&String> = chunk
                .iter()
                .zip(&values)
                .filter(|(_, v)| v.is_none())
                .map(|(id, _)| id)
                .collect();
            if !missing.is_empty() {
                self.check_missing_types(&missing)?;
            }
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
        for chunk in ids.chunks(READ_CHUNK) {
            let mut p = redis::pipe();
            for id in chunk {
                p.cmd("EXISTS").arg(self.key(id));
            }
            let found: Vec<bool> = self
                .shared
                .with_conn("filter_keys", &self.namespace, |c| p.query(c))?;
            present.extend(found);
        }
        Ok(missing_in_order(ids, |i| present[i]))
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        validate_ids(&self.namespace, items.iter().map(|(id, _)| id))?;
        let mut start = 0;
        while start < items.len() {
            // Encode (and compress) on the caller's thread, before holding a connection.
            let mut end = start;
            let mut bytes = 0usize;
            let mut values = Vec::new();
            while end < items.len() && end - start < WRITE_CHUNK && bytes < WRITE_CHUNK_BYTES {
                let v = self
                    .encode_items(&items[end..end + 1])?
                    .pop()
                    .unwrap_or_default();
                bytes += v.len();
                values.push(v);
                end += 1;
            }
            let keys: Vec<String> = items[start..end]
                .iter()
                .map(|(id, _)| self.key(id))
                .collect();
            let mut pipe = redis::pipe();
            add_sets(&mut pipe, &keys, &values, self.ttl);
            self.shared
                .with_conn("upsert", &self.namespace, |c| pipe.query::<()>(c))?;
            start = end;
        }
        Ok(())
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        validate_ids(&self.namespace, ids)?;
        for chunk in ids.chunks(READ_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|id| self.key(id)).collect();
            self.shared
                .with_conn("delete_by_ids", &self.namespace, |c| {
                    redis::cmd("UNLINK").arg(&keys).query::<()>(c)
                })?;
        }
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        let shared = &self.shared;
        shared.scan("clear", &self.namespace, &self.pattern(), |keys| {
            shared.with_conn("clear", &self.namespace, |c| {
                redis::cmd("UNLINK").arg(&keys).query::<()>(c)
            })
        })
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
            .scan("stats", &self.namespace, &self.pattern(), |keys| {
                count += keys.len() as u64;
                let room = STATS_SAMPLE.saturating_sub(sample.len());
                sample.extend(keys.into_iter().take(room));
                Ok(())
            })?;
        let bytes = if sample.is_empty() {
            0
        } else {
            let lens: Vec<u64> = self.shared.with_conn("stats", &self.namespace, |c| {
                let mut p = redis::pipe();
                for k in &sample {
                    p.cmd("STRLEN").arg(k.as_slice());
                }
                p.query(c)
            })?;
            let total: u64 = lens.iter().sum();
            total * count / sample.len() as u64
        };
        Ok(NamespaceStats {
            namespace: self.namespace.clone(),
            backend: "redis",
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
