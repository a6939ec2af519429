//! [`Storage`]: opens namespaces from one configuration, owns what they share, and is the one
//! place that decides a namespace's stack (`stack.rs` lists the layers and why they are in that order).
//!
//! Ownership: a `Storage` owns its Redis pool, its fallback journal and prober thread, its JSON
//! directory lock, its write-behind queues (one per namespace), its lock capability
//! ([`Storage::locks`]) and the metrics chosen when it was built. Nothing of it is registered
//! process-wide: two `Storage`s share nothing (and two writing `Storage`s of one JSON directory
//! exclude each other like two processes do). Every handle [`Storage::namespace`] returns keeps
//! the storage alive, so the last handle dropped releases everything.

mod limits;
mod locks;
mod stack;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde_json::Value;

use crate::backend::json_file::JsonDir;
use crate::backend::redis::RedisShared;
use crate::config::{BackendKind, StoreConfig};
use crate::error::Result;
use crate::fallback::{Fallback, FallbackGuard, JournalTarget};
#[cfg(feature = "metrics")]
use crate::metrics::Metrics;
use crate::store::{Item, KvStore, NamespaceStats, UnsentWrite};
use crate::write_behind::WriteBehindConfig;

pub use locks::{LocalLocks, LockGuard, Locks, RedisLocks};

/// Opens namespaces of one configured backend, sharing what they can: one Redis connection
/// pool and checkpoint, or one JSON working directory and its write lock; one write-behind
/// queue per namespace.
///
/// Cheap to clone; every clone shares the same pool, lock and queues. Build it with
/// [`Storage::builder`] (to choose metrics), [`Storage::open`] or [`Storage::from_env`]; end it
/// with [`Storage::close`] to see flush and checkpoint errors (dropping it only logs them).
#[derive(Clone)]
pub struct Storage {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("backend", &self.shared.backend)
            .field("write_behind", &self.shared.write_behind.is_some())
            .finish_non_exhaustive()
    }
}

/// What one `Storage` and its clones and handles share.
struct Shared {
    backend: Backend,
    /// Wrap each namespace in a write-behind queue (never for read-only storages).
    write_behind: Option<WriteBehindConfig>,
    /// Count and time every call (outermost layer), chosen before any namespace is opened.
    #[cfg(feature = "metrics")]
    metrics: Option<Metrics>,
    /// The cross-process lock capability of this backend.
    locks: Arc<dyn Locks>,
    /// The LLM rate limiter of this backend, made on first use (`limits.rs`).
    limiter: OnceLock<Arc<dyn crate::rate_limit::RateLimiter>>,
    /// The stack of each namespace, while a handle uses it. Weak, so a namespace no handle uses
    /// any more costs nothing (its queue was flushed when the last handle dropped); while one
    /// lives, every `namespace()` call returns the same stack: one write-behind queue (one
    /// read-your-writes overlay) and one dual-write order per namespace.
    stacks: Mutex<HashMap<String, Weak<Handle>>>,
}

/// The backend(s) of a storage.
#[derive(Debug)]
pub(crate) enum Backend {
    Json(Arc<JsonDir>),
    Redis {
        redis: Arc<RedisShared>,
        fallback: Option<FallbackParts>,
    },
    /// Both, during a migration: writes go to each, reads come from `primary`.
    Dual {
        json: Arc<JsonDir>,
        redis: Arc<RedisShared>,
        primary: BackendKind,
    },
}

/// The fallback of a Redis storage and the guard of its prober thread (stopped when the
/// storage and every store wrapping the fallback are gone).
#[derive(Debug)]
pub(crate) struct FallbackParts {
    fallback: Arc<Fallback>,
    guard: Arc<FallbackGuard>,
}

/// Chooses what a [`Storage`] is built with before it opens anything; from
/// [`Storage::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `open` is called"]
pub struct StorageBuilder<'a> {
    config: &'a StoreConfig,
    read_only: bool,
    #[cfg(feature = "metrics")]
    metrics: Option<Metrics>,
}

impl StorageBuilder<'_> {
    /// Counts and times every call of every namespace (the outermost layer, so it sees what
    /// callers see), and lets `metrics` read the Redis pool's size, the backend's retries and
    /// dual-write divergences at scrape time.
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    /// Opens for reading only: for JSON no lock is taken, so this works while another process
    /// is writing (it sees the files as last saved); writes are refused. No write-behind, no
    /// fallback, no dual write.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Opens the backend.
    ///
    /// JSON: creates the working directory and takes its write lock. Redis: creates the pool
    /// and checks the server answers (with a fallback, opens even while it does not).
    ///
    /// # Errors
    /// [`crate::Error::Locked`] when another process, or another writing `Storage` of this
    /// process, holds the JSON directory; connection errors when Redis does not answer.
    pub fn open(self) -> Result<Storage> {
        let config = self.config;
        let backend = if self.read_only {
            match config.backend {
                BackendKind::Json => {
                    Backend::Json(JsonDir::open_read_only(&config.json.working_dir))
                }
                BackendKind::Redis => Backend::Redis {
                    redis: RedisShared::connect(&config.redis)?,
                    fallback: None,
                },
            }
        } else {
            open_backend(config)?
        };
        let locks: Arc<dyn Locks> = match &backend {
            Backend::Json(_) => Arc::new(LocalLocks::default()),
            Backend::Redis { redis, .. } | Backend::Dual { redis, .. } => {
                Arc::new(RedisLocks::new(redis.clone()))
            }
        };
        #[cfg(feature = "metrics")]
        if let (Some(m), Backend::Redis { redis, .. } | Backend::Dual { redis, .. }) =
            (&self.metrics, &backend)
        {
            // Read at scrape time: the backend never pushes into the metrics.
            m.pool().watch_redis(redis);
            m.watch_retries(redis);
        }
        Ok(Storage {
            shared: Arc::new(Shared {
                backend,
                write_behind: if self.read_only {
                    None
                } else {
                    config.write_behind.clone()
                },
                #[cfg(feature = "metrics")]
                metrics: self.metrics,
                locks,
                limiter: OnceLock::new(),
                stacks: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Opens the backend(s) `config` names, with the fallback when it is configured.
fn open_backend(config: &StoreConfig) -> Result<Backend> {
    if let Some(dual) = config.dual {
        return Ok(Backend::Dual {
            json: JsonDir::open(&config.json.working_dir)?,
            redis: RedisShared::connect(&config.redis)?,
            primary: dual.primary,
        });
    }
    let (BackendKind::Redis, Some(fb)) = (config.backend, &config.fallback) else {
        return Ok(match config.backend {
            BackendKind::Json => Backend::Json(JsonDir::open(&config.json.working_dir)?),
            BackendKind::Redis => Backend::Redis {
                redis: RedisShared::connect(&config.redis)?,
                fallback: None,
            },
        });
    };
    // With a fallback the store must open while Redis is down: no PING here. A refused
    // password or certificate is not an outage: it fails here.
    let (redis, down) = match RedisShared::connect(&config.redis) {
        Ok(s) => (s, None),
        Err(e) if e.is_connection() || e.is_timeout() => {
            log::warn!("Redis is unreachable at start ({e}); opening anyway");
            (RedisShared::new_unchecked(&config.redis)?, Some(e))
        }
        Err(e) => return Err(e),
    };
    // Probes and replays go to the bottom of the stacks, built as `stack::build` builds it.
    let (fallback, guard) = Fallback::open(
        &fb.dir,
        JournalTarget::from_redis(&config.redis),
        Box::new(stack::RedisBackend(redis.clone())),
    )?;
    if let Some(e) = &down {
        // Redis just failed to answer: the first write goes to the journal at once rather
        // than waiting out another connect attempt.
        fallback.start_offline(e);
    }
    Ok(Backend::Redis {
        redis,
        fallback: Some(FallbackParts {
            fallback,
            guard: Arc::new(guard),
        }),
    })
}

impl Storage {
    /// Chooses metrics (and read-only) before opening:
    /// `Storage::builder(&config).metrics(&m).open()?`.
    pub fn builder(config: &StoreConfig) -> StorageBuilder<'_> {
        StorageBuilder {
            config,
            read_only: false,
            #[cfg(feature = "metrics")]
            metrics: None,
        }
    }

    /// Opens the configured backend for reading and writing, without metrics.
    ///
    /// # Errors
    /// As [`StorageBuilder::open`].
    pub fn open(config: &StoreConfig) -> Result<Storage> {
        Storage::builder(config).open()
    }

    /// Opens the configured backend for reading only (see [`StorageBuilder::read_only`]).
    ///
    /// # Errors
    /// As [`StorageBuilder::open`].
    pub fn open_read_only(config: &StoreConfig) -> Result<Storage> {
        Storage::builder(config).read_only().open()
    }

    /// Opens the backend configured in the environment (see [`StoreConfig::from_env`]).
    ///
    /// # Errors
    /// Configuration errors naming the variable, then as [`Storage::open`].
    pub fn from_env() -> Result<Storage> {
        Storage::open(&StoreConfig::from_env()?)
    }

    /// The store of `namespace`, shareable between threads. Every call for one namespace
    /// returns the same stack while a handle of it lives: one write-behind queue, so a write
    /// through one handle is read back through another.
    ///
    /// # Errors
    /// [`crate::Error::InvalidNamespace`]; for JSON, a file that cannot be read or parsed.
    pub fn namespace(&self, namespace: &str) -> Result<Arc<dyn KvStore>> {
        let mut stacks = self.shared.stacks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(handle) = stacks.get(namespace).and_then(Weak::upgrade) {
            return Ok(handle);
        }
        let stack = stack::build(
            &self.shared.backend,
            namespace,
            self.shared.write_behind.as_ref(),
            #[cfg(feature = "metrics")]
            self.shared.metrics.as_ref(),
        )?;
        let handle = Arc::new(Handle {
            stack,
            _storage: self.shared.clone(),
        });
        stacks.retain(|_, w| w.strong_count() > 0);
        stacks.insert(namespace.to_string(), Arc::downgrade(&handle));
        Ok(handle)
    }

    /// The cross-process lock this stack offers: Redis locks (`SET NX PX`, token-checked
    /// release) through this storage's own pool for Redis and dual storages; in-process locks
    /// for JSON, whose directory lock already keeps other writing processes out.
    pub fn locks(&self) -> Arc<dyn Locks> {
        self.shared.locks.clone()
    }

    /// Flushes every write-behind queue and checkpoints every open namespace (JSON files
    /// saved, Redis persisted as `index_done_callback` does, journals synced), then releases
    /// this handle on the storage. Background threads (flushers, the fallback prober) stop
    /// when the last clone of the storage and the last namespace handle are gone: after
    /// `close`, drop the handles too.
    ///
    /// # Errors
    /// The first failure, as the layer that failed reported it (a write-behind flush that could
    /// not reach Redis is a connection error); every failure is also logged with its namespace
    /// and step. Everything is still attempted after a failure.
    pub fn close(self) -> Result<()> {
        let mut handles: Vec<(String, Arc<Handle>)> = {
            let stacks = self.shared.stacks.lock().unwrap_or_else(|p| p.into_inner());
            stacks
                .iter()
                .filter_map(|(ns, w)| w.upgrade().map(|h| (ns.clone(), h)))
                .collect()
        };
        handles.sort_by(|a, b| a.0.cmp(&b.0));
        let mut first: Option<crate::Error> = None;
        for (ns, handle) in &handles {
            let store = &handle.stack.unmetered;
            for (what, result) in [
                ("flushing", store.flush()),
                ("checkpointing", store.index_done_callback()),
            ] {
                if let Err(e) = result {
                    log::error!("closing the storage: {what} namespace {ns:?} failed: {e}");
                    first.get_or_insert(e);
                }
            }
        }
        drop(handles);
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Namespaces that hold data: JSON files present, or key groups under the Redis prefix.
    ///
    /// # Errors
    /// Directory or Redis failures.
    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        match &self.shared.backend {
            Backend::Json(dir) => dir.list_namespaces(),
            Backend::Redis { redis, .. } => redis.list_namespaces(),
            Backend::Dual { json, redis, .. } => {
                let mut names = json.list_namespaces()?;
                names.extend(redis.list_namespaces()?);
                names.sort();
                names.dedup();
                Ok(names)
            }
        }
    }

    /// The Redis pool when the backend is Redis (or dual), `None` for JSON: for work outside
    /// the namespaces, such as server figures (`graphrag-kv stats`) and migration.
    pub fn redis(&self) -> Option<&Arc<RedisShared>> {
        match &self.shared.backend {
            Backend::Json(_) => None,
            Backend::Redis { redis, .. } | Backend::Dual { redis, .. } => Some(redis),
        }
    }

    /// The fallback's state (online or not, writes pending) when `KV_FALLBACK` is on.
    pub fn fallback(&self) -> Option<&Arc<Fallback>> {
        match &self.shared.backend {
            Backend::Redis {
                fallback: Some(fb), ..
            } => Some(&fb.fallback),
            _ => None,
        }
    }

    /// The backend's name: `json` or `redis` (the primary during a dual write).
    pub fn backend(&self) -> BackendKind {
        match &self.shared.backend {
            Backend::Json(_) => BackendKind::Json,
            Backend::Redis { .. } => BackendKind::Redis,
            Backend::Dual { primary, .. } => *primary,
        }
    }
}

/// Opens one namespace of the backend configured in the environment: the one call an indexer
/// needs. `STORAGE_KV_BACKEND=redis` switches to Redis with no code change.
///
/// Calls share one process-wide [`Storage`] (one pool, one directory lock, one queue per
/// namespace) while the configuration in the environment stays the same and a handle it
/// returned is alive; it is released with the last handle, as a `Storage` of your own would be.
///
/// # Errors
/// As [`Storage::from_env`] and [`Storage::namespace`].
pub fn open_from_env(namespace: &str) -> Result<Arc<dyn KvStore>> {
    /// The process-wide storage: weak, so it never outlives its handles (whose drop saves
    /// and flushes; statics are never dropped).
    static PROCESS: Mutex<Option<(StoreConfig, Weak<Shared>)>> = Mutex::new(None);
    let config = StoreConfig::from_env()?;
    let mut process = PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((c, w)) = &*process {
        if *c == config {
            if let Some(shared) = w.upgrade() {
                return Storage { shared }.namespace(namespace);
            }
        }
    }
    let storage = Storage::open(&config)?;
    *process = Some((config, Arc::downgrade(&storage.shared)));
    storage.namespace(namespace)
}

/// What [`Storage::namespace`] returns: the namespace's stack, keeping its storage (and with
/// it the shared queue map, pool and locks) alive for as long as the handle lives.
struct Handle {
    stack: stack::Stack,
    _storage: Arc<Shared>,
}

// Forwards every method, so a batch call never decays into single calls.
impl KvStore for Handle {
    fn namespace(&self) -> &str {
        self.stack.top.namespace()
    }
    fn all_keys(&self) -> Result<Vec<String>> {
        self.stack.top.all_keys()
    }
    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        self.stack.top.get_by_id(id)
    }
    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        self.stack.top.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        self.stack.top.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        self.stack.top.upsert(items)
    }
    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        self.stack.top.upsert_refs(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        self.stack.top.delete_by_ids(ids)
    }
    fn clear(&self) -> Result<()> {
        self.stack.top.clear()
    }
    fn index_start_callback(&self) -> Result<()> {
        self.stack.top.index_start_callback()
    }
    fn index_done_callback(&self) -> Result<()> {
        self.stack.top.index_done_callback()
    }
    fn stats(&self) -> Result<NamespaceStats> {
        self.stack.top.stats()
    }
    fn flush(&self) -> Result<()> {
        self.stack.top.flush()
    }
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        self.stack.top.park(writes)
    }

    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        self.stack.top.scan_keys(page)
    }
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, crate::store::Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        self.stack.top.get_json_by_ids(ids, visit)
    }
    fn upsert_json(&self, items: &[(&str, &serde_json::value::RawValue)]) -> Result<()> {
        self.stack.top.upsert_json(items)
    }
}
