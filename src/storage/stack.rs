//! The stack of one namespace, built in one place, innermost first.
//!
//! ```text
//! Metered                      metrics (StorageBuilder::metrics): outermost, sees what callers see
//!   WriteBehind                KV_WRITE_BEHIND: callers wait for the queue, not the network
//!     FallbackStore | DualWrite    KV_FALLBACK (journal while Redis is down) | dual (migration)
//!       backend              JsonFileStore | RedisStore, which applies the one retry
//!                              policy (crate::retry) once per operation, at its connections
//! ```
//!
//! Retries are not a layer: only the Redis backend knows which commands are safe to send again
//! and when a connection must be discarded, so it applies [`crate::retry::RetryPolicy`] itself,
//! and no layer above retries again (write-behind re-submits a batch that failed with a
//! passing server state at most once per [`crate::retry::RESUBMIT_INTERVAL`], and one refused
//! for memory (OOM) up to 8 times on a 10 ms–1 s backoff; each submission one operation under
//! that policy).
//!
//! Why this order: the fallback must see an operation's final outcome (after retries) to decide
//! that Redis is down; write-behind sits over the fallback so a queued batch that fails over is
//! journaled, not lost, and writes unsent at shutdown are parked in it ([`KvStore::park`]); the metrics sit
//! outside everything so they count and time the calls callers make, not the queue's batches.
//! [`build`] is the only code in the crate that composes these layers.

use std::sync::Arc;

use crate::backend::json_file::{JsonDir, JsonFileStore};
use crate::backend::redis::{RedisShared, RedisStore};
use crate::config::BackendKind;
use crate::dual_write::DualWrite;
use crate::error::Result;
use crate::fallback::OpenBackend;
#[cfg(feature = "metrics")]
use crate::metrics::{Metered, Metrics};
use crate::store::KvStore;
use crate::write_behind::{WriteBehind, WriteBehindConfig};

use super::Backend;

/// A namespace's stack: the whole of it, and the part under the metrics (which
/// [`super::Storage::close`] flushes and checkpoints without counting those calls as the
/// caller's).
pub(super) struct Stack {
    pub(super) top: Arc<dyn KvStore>,
    pub(super) unmetered: Arc<dyn KvStore>,
}

/// The bottom of every JSON stack: the directory's store of `namespace`, nothing over it.
fn json_bottom(dir: &Arc<JsonDir>, namespace: &str) -> Result<Arc<JsonFileStore>> {
    dir.namespace(namespace)
}

/// The bottom of every Redis stack: the pool's store of `namespace`, nothing over it (the
/// backend applies the retry policy itself). The one way to get "Redis for namespace N": the
/// fallback probes and replays its journal through it too ([`RedisBackend`]).
fn redis_bottom(redis: &Arc<RedisShared>, namespace: &str) -> Result<RedisStore> {
    redis.namespace(namespace)
}

/// [`redis_bottom`] for the fallback of a Redis storage: journaled writes are replayed into
/// the same store the bottom of the namespace's stack is, through the storage's own pool
/// (TLS, cluster, Sentinel and ACL included), and never through the layers above it (the
/// fallback itself, write-behind, metrics), which would journal, queue or count them again.
pub(super) struct RedisBackend(pub(super) Arc<RedisShared>);

impl OpenBackend for RedisBackend {
    fn open(&self, namespace: &str) -> Result<Arc<dyn KvStore>> {
        Ok(Arc::new(redis_bottom(&self.0, namespace)?))
    }
}

/// Builds the stack of `namespace` over `backend`, bottom to top.
pub(super) fn build(
    backend: &Backend,
    namespace: &str,
    write_behind: Option<&WriteBehindConfig>,
    #[cfg(feature = "metrics")] metrics: Option<&Metrics>,
) -> Result<Stack> {
    // 1 + 2. The backend (which retries, see the module docs), then the fallback journal or
    // the dual write that pairs two backends.
    let store: Arc<dyn KvStore> = match backend {
        Backend::Json(dir) => json_bottom(dir, namespace)?,
        Backend::Redis { redis, fallback } => {
            let store = redis_bottom(redis, namespace)?;
            match fallback {
                None => Arc::new(store),
                Some(fb) => Arc::new(fb.fallback.wrap(store, Some(fb.guard.clone()))),
            }
        }
        Backend::Dual {
            json,
            redis,
            primary,
        } => {
            let j: Arc<dyn KvStore> = json_bottom(json, namespace)?;
            let r: Arc<dyn KvStore> = Arc::new(redis_bottom(redis, namespace)?);
            let (p, s, names) = match primary {
                BackendKind::Json => (j, r, ("json", "redis")),
                BackendKind::Redis => (r, j, ("redis", "json")),
            };
            let dual = DualWrite::new(p, s).with_names(names.0, names.1);
            // Observed from outside: the metrics read the counter at scrape time.
            #[cfg(feature = "metrics")]
            if let Some(m) = metrics {
                m.watch_divergences(namespace, dual.divergences_source());
            }
            Arc::new(dual)
        }
    };
    // 3. Write-behind. Writes it cannot send before its shutdown deadline are parked in the
    // store below (`KvStore::park`): the fallback journals them, other stores refuse them.
    let store: Arc<dyn KvStore> = match write_behind {
        None => store,
        Some(config) => {
            let queue = Arc::new(WriteBehind::new(store, config.clone()));
            // Observed from outside: the metrics read the depth at scrape time, weakly.
            #[cfg(feature = "metrics")]
            if let Some(m) = metrics {
                let weak = Arc::downgrade(&queue);
                m.watch_write_behind_depth(namespace, move || {
                    weak.upgrade().map(|q| q.stats_snapshot().unsent)
                });
            }
            queue
        }
    };
    // 4. Metrics, outermost.
    #[cfg(feature = "metrics")]
    if let Some(m) = metrics {
        return Ok(Stack {
            top: Arc::new(Metered::new(store.clone(), m)),
            unmetered: store,
        });
    }
    Ok(Stack {
        top: store.clone(),
        unmetered: store,
    })
}
