//! Opening namespaces from one configuration: the one place that decides the backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::backend::json_file::JsonDir;
use crate::backend::redis::RedisShared;
use crate::config::{BackendKind, RedisConfig, StoreConfig};
use crate::dual_write::{DualWrite, WriteOrder};
use crate::error::Result;
use crate::fallback::{Fallback, FallbackGuard, JournalTarget};
#[cfg(feature = "metrics")]
use crate::metrics::{Metered, Metrics};
use crate::store::KvStore;
use crate::write_behind::{WriteBehind, WriteBehindConfig};

/// Opens namespaces of one configured backend, sharing what they can: one Redis connection
/// pool and checkpoint, or one JSON working directory and its write lock.
///
/// Cheap to clone; every clone shares the same pool or lock.
#[derive(Debug, Clone)]
pub struct Storage {
    inner: Inner,
    /// Wrap each namespace in a write-behind queue (never for read-only storages).
    write_behind: Option<WriteBehindConfig>,
    /// Count and time every call (outermost layer), when set with [`Storage::with_metrics`].
    #[cfg(feature = "metrics")]
    metrics: Option<Metrics>,
}

#[derive(Debug, Clone)]
enum Inner {
    Json(Arc<JsonDir>),
    Redis(Arc<RedisShared>, Option<FallbackParts>),
    /// Both, during a migration: writes go to each, reads come from `primary`.
    Dual {
        json: Arc<JsonDir>,
        redis: Arc<RedisShared>,
        primary: BackendKind,
        /// One write order per namespace, shared by every `DualWrite` this storage (and its
        /// clones) builds for it: each `namespace()` call builds a new `DualWrite`, and handles
        /// with separate locks could apply the same ids to the two stores in opposite orders.
        /// Weak, so a namespace no handle uses any more costs nothing.
        write_orders: Arc<Mutex<HashMap<String, Weak<Mutex<()>>>>>,
    },
}

/// The fallback of a Redis storage and the guard of its prober thread (stopped when the last
/// clone of the storage and of its stores is gone).
#[derive(Debug, Clone)]
struct FallbackParts {
    fallback: Arc<Fallback>,
    guard: Arc<FallbackGuard>,
}

impl Storage {
    /// Opens the configured backend for reading and writing.
    ///
    /// JSON: creates the working directory and takes its write lock. Redis: creates the pool
    /// and checks the server answers.
    ///
    /// # Errors
    /// [`crate::Error::Locked`] when another process writes the JSON directory; connection
    /// errors when Redis does not answer.
    pub fn open(config: &StoreConfig) -> Result<Storage> {
        if let Some(dual) = config.dual {
            return Ok(Storage {
                inner: Inner::Dual {
                    json: JsonDir::open(&config.json.working_dir)?,
                    redis: shared_redis(config)?,
                    primary: dual.primary,
                    write_orders: Arc::default(),
                },
                write_behind: config.write_behind.clone(),
                #[cfg(feature = "metrics")]
                #[cfg(feature = "metrics")]
                metrics: None,
            });
        }
        let inner = match config.backend {
            BackendKind::Json => Inner::Json(JsonDir::open(&config.json.working_dir)?),
            BackendKind::Redis => match &config.fallback {
                None => Inner::Redis(shared_redis(config)?, None),
                Some(fb) => {
                    // With a fallback the store must open while Redis is down: no PING here.
                    // A refused password or certificate is not an outage: it fails here.
                    let (shared, down) = match shared_redis(config) {
                        Ok(s) => (s, None),
                        Err(e) if e.is_connection() || e.is_timeout() => {
                            log::warn!("Redis is unreachable at start ({e}); opening anyway");
                            (RedisShared::new_unchecked(&config.redis)?, Some(e))
                        }
                        Err(e) => return Err(e),
                    };
                    let for_replay = shared.clone();
                    let (fallback, guard) = Fallback::open(
                        &fb.dir,
                        JournalTarget::from_redis(&config.redis),
                        Box::new(move |ns: &str| {
                            Ok(Arc::new(for_replay.namespace(ns)?) as Arc<dyn KvStore>)
                        }),
                    )?;
                    if let Some(e) = &down {
                        // Redis just failed to answer: the first write goes to the journal at
                        // once rather than waiting out another connect attempt.
                        fallback.start_offline(e);
                    }
                    Inner::Redis(
                        shared,
                        Some(FallbackParts {
                            fallback,
                            guard: Arc::new(guard),
                        }),
                    )
                }
            },
        };
        Ok(Storage {
            inner,
            write_behind: config.write_behind.clone(),
            #[cfg(feature = "metrics")]
            metrics: None,
        })
    }

    /// Opens the configured backend for reading only. For JSON no lock is taken, so this works
    /// while another process is writing (it sees the files as last saved); writes are refused.
    /// For Redis it is the same as [`Storage::open`].
    ///
    /// # Errors
    /// As [`Storage::open`].
    pub fn open_read_only(config: &StoreConfig) -> Result<Storage> {
        let inner = match config.backend {
            BackendKind::Json => Inner::Json(JsonDir::open_read_only(&config.json.working_dir)),
            BackendKind::Redis => Inner::Redis(shared_redis(config)?, None),
        };
        Ok(Storage {
            inner,
            write_behind: None,
            #[cfg(feature = "metrics")]
            metrics: None,
        })
    }

    /// Opens the backend configured in the environment (see [`StoreConfig::from_env`]).
    ///
    /// # Errors
    /// Configuration errors naming the variable, then as [`Storage::open`].
    pub fn from_env() -> Result<Storage> {
        Storage::open(&StoreConfig::from_env()?)
    }

    /// The store of `namespace`, shareable between threads.
    ///
    /// # Errors
    /// [`crate::Error::InvalidNamespace`]; for JSON, a file that cannot be read or parsed.
    pub fn namespace(&self, namespace: &str) -> Result<Arc<dyn KvStore>> {
        let store = self.stack(namespace)?;
        #[cfg(feature = "metrics")]
        let store: Arc<dyn KvStore> = match &self.metrics {
            Some(m) => Arc::new(Metered::new(store, m)),
            None => store,
        };
        Ok(store)
    }

    /// Counts and times every call of every namespace opened from now on (the outermost layer,
    /// so it sees what callers see), and reports the Redis pool's size.
    #[cfg(feature = "metrics")]
    pub fn with_metrics(mut self, metrics: &Metrics) -> Storage {
        if let Some(shared) = self.redis() {
            metrics.pool().watch_redis(shared);
        }
        self.metrics = Some(metrics.clone());
        self
    }

    fn stack(&self, namespace: &str) -> Result<Arc<dyn KvStore>> {
        // The whole stack of a namespace is decided here, innermost first:
        // backend -> FallbackStore (KV_FALLBACK) | DualWrite (dual) -> WriteBehind
        // (KV_WRITE_BEHIND) -> Metered (with_metrics).
        let base: Arc<dyn KvStore> = match &self.inner {
            Inner::Dual {
                json,
                redis,
                primary,
                write_orders,
            } => {
                let j: Arc<dyn KvStore> = json.namespace(namespace)?;
                let r: Arc<dyn KvStore> = Arc::new(redis.namespace(namespace)?);
                let (p, s, names) = match primary {
                    BackendKind::Json => (j, r, ("json", "redis")),
                    BackendKind::Redis => (r, j, ("redis", "json")),
                };
                let dual = DualWrite::new(p, s)
                    .with_names(names.0, names.1)
                    .with_write_order(write_order(write_orders, namespace));
                #[cfg(feature = "metrics")]
                let dual = match &self.metrics {
                    Some(m) => dual.with_metrics(m),
                    None => dual,
                };
                Arc::new(dual)
            }
            Inner::Json(dir) => dir.namespace(namespace)?,
            Inner::Redis(shared, None) => Arc::new(shared.namespace(namespace)?),
            Inner::Redis(shared, Some(fb)) => Arc::new(
                fb.fallback
                    .wrap(shared.namespace(namespace)?, Some(fb.guard.clone())),
            ),
        };
        let Some(config) = &self.write_behind else {
            return Ok(base);
        };
        // One queue per namespace and backend in the process: two queues for one namespace
        // would have separate read-your-writes overlays.
        let backend = match &self.inner {
            Inner::Json(dir) => Arc::as_ptr(dir) as usize,
            Inner::Redis(shared, _) | Inner::Dual { redis: shared, .. } => {
                Arc::as_ptr(shared) as usize
            }
        };
        let mut guard = WRITE_BEHIND_QUEUES
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let queues = guard.get_or_insert_with(HashMap::new);
        queues.retain(|_, w| w.strong_count() > 0);
        let key = (backend, namespace.to_string());
        if let Some(q) = queues.get(&key).and_then(Weak::upgrade) {
            return Ok(q);
        }
        let queue: Arc<dyn KvStore> = match &self.inner {
            // Writes the queue cannot send before its shutdown deadline go to the journal.
            Inner::Redis(_, Some(fb)) => Arc::new(WriteBehind::with_unsent_sink(
                base,
                config.clone(),
                fb.fallback.clone(),
            )),
            _ => Arc::new(WriteBehind::new(base, config.clone())),
        };
        queues.insert(key, Arc::downgrade(&queue));
        Ok(queue)
    }

    /// Namespaces that hold data: JSON files present, or key groups under the Redis prefix.
    ///
    /// # Errors
    /// Directory or Redis failures.
    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        match &self.inner {
            Inner::Json(dir) => dir.list_namespaces(),
            Inner::Redis(shared, _) => shared.list_namespaces(),
            Inner::Dual { json, redis, .. } => {
                let mut names = json.list_namespaces()?;
                names.extend(redis.list_namespaces()?);
                names.sort();
                names.dedup();
                Ok(names)
            }
        }
    }

    /// The shared Redis pool when the backend is Redis, `None` for JSON: for work outside the
    /// namespaces, such as [`crate::llm_cache::LlmCache`]'s cross-process locks.
    pub fn redis(&self) -> Option<&Arc<RedisShared>> {
        match &self.inner {
            Inner::Json(_) => None,
            Inner::Redis(shared, _) | Inner::Dual { redis: shared, .. } => Some(shared),
        }
    }

    /// The fallback's state (online or not, writes pending) when `KV_FALLBACK` is on.
    pub fn fallback(&self) -> Option<&Arc<Fallback>> {
        match &self.inner {
            Inner::Redis(_, Some(fb)) => Some(&fb.fallback),
            _ => None,
        }
    }

    /// The backend's name: `json` or `redis`.
    pub fn backend(&self) -> BackendKind {
        match &self.inner {
            Inner::Json(_) => BackendKind::Json,
            Inner::Redis(..) => BackendKind::Redis,
            Inner::Dual { primary, .. } => *primary,
        }
    }
}

/// Opens one namespace of the backend configured in the environment: the one call an indexer
/// needs. `STORAGE_KV_BACKEND=redis` switches to Redis with no code change.
///
/// Each call opens its own [`Storage`]; to open several namespaces sharing one pool (Redis) or
/// one directory lock (JSON), use [`Storage::from_env`] and [`Storage::namespace`].
///
/// # Errors
/// As [`Storage::from_env`] and [`Storage::namespace`].
pub fn open_from_env(namespace: &str) -> Result<Arc<dyn KvStore>> {
    Storage::from_env()?.namespace(namespace)
}

/// Redis pools of this process by configuration: opening the same configuration again (for
/// example one `open_from_env` call per namespace) shares one pool and one checkpoint.
static REDIS_POOLS: Mutex<Vec<(RedisConfig, Weak<RedisShared>)>> = Mutex::new(Vec::new());

fn shared_redis(config: &StoreConfig) -> Result<Arc<RedisShared>> {
    let mut pools = REDIS_POOLS.lock().unwrap_or_else(|p| p.into_inner());
    pools.retain(|(_, w)| w.strong_count() > 0);
    if let Some(s) = pools
        .iter()
        .find(|(c, _)| *c == config.redis)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(s);
    }
    let shared = RedisShared::connect(&config.redis)?;
    pools.push((config.redis.clone(), Arc::downgrade(&shared)));
    Ok(shared)
}

/// The write order of `namespace` in `orders`, created on first use.
fn write_order(orders: &Mutex<HashMap<String, Weak<Mutex<()>>>>, namespace: &str) -> WriteOrder {
    let mut orders = orders.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(order) = orders.get(namespace).and_then(Weak::upgrade) {
        return order;
    }
    orders.retain(|_, w| w.strong_count() > 0);
    let order = WriteOrder::default();
    orders.insert(namespace.to_string(), Arc::downgrade(&order));
    order
}

/// Write-behind queues of this process, by backend object and namespace.
type Queues = HashMap<(usize, String), Weak<dyn KvStore>>;
static WRITE_BEHIND_QUEUES: Mutex<Option<Queues>> = Mutex::new(None);
