//! [`WriteBehind`]: writes are queued and sent in batches by a background thread, while reads
//! still see them at once.
//!
//! An indexer's worker threads each upsert one chunk or one cache entry at a time. Sent one by
//! one, each write waits a full round trip. Through `WriteBehind`, `upsert` and `delete_by_ids`
//! only queue the write and return. One flusher thread takes the queue in FIFO order and cuts
//! it into batches. A batch goes when it reaches [`WriteBehindConfig::batch_items`] items,
//! [`WriteBehindConfig::batch_bytes`] bytes, or when its oldest write is
//! [`WriteBehindConfig::max_delay`] old, whichever comes first. Up to
//! [`WriteBehindConfig::in_flight`] sender threads send batches to the inner store, so the next
//! batch is encoded and sent while the previous one waits for its round trip.
//!
//! # What it guarantees
//!
//! - **Same results as synchronous writes.** For each id, the last write wins, exactly as if
//!   each call had been applied when it returned, across threads and across any mix of upserts
//!   and deletes. One flusher takes one FIFO queue, and every write gets its sequence number in
//!   the order it enters that queue. Batches in flight at the same time never share an id (a
//!   batch ends before a write whose id is still being sent), so the writes of each id reach
//!   the inner store in queue order, and batches are acknowledged in queue order.
//! - **Read-your-writes, from any thread.** `get_by_id`, `get_by_ids`, `filter_keys` and
//!   `all_keys` see writes that are queued but not yet sent. An overlay (id → newest pending
//!   write) answers for those ids. An id leaves the overlay only after the inner store has
//!   acknowledged its newest write. So a reader that finds no entry knows the inner store
//!   already holds the newest value, and it never sees an older value after a newer one.
//! - **Backpressure, never silent loss.** When [`WriteBehindConfig::capacity`] items or
//!   [`WriteBehindConfig::capacity_bytes`] bytes of values are queued, whichever comes first,
//!   the writer waits up to [`WriteBehindConfig::enqueue_timeout`]. After that the call fails
//!   and the write is not taken: it is not queued and not visible.
//! - **Backend failures.** After a retryable error ([`Error::is_retryable`]: connection
//!   errors, timeouts, and the server's passing states `MISCONF`, `NOREPLICAS`, `LOADING`,
//!   `BUSY`, `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`, `READONLY`), its sender keeps the batch
//!   and submits it again until it goes through or the shutdown deadline passes: at most
//!   once per [`crate::retry::RESUBMIT_INTERVAL`] (1 s), each submission being one operation
//!   of the store below, which retries it itself (`REDIS_RETRIES + 1` sends). So within a
//!   deadline `T` one failing write causes at most `(REDIS_RETRIES + 1) ×`
//!   [`crate::retry::submissions_within`]`(T)` commands (see [`crate::retry`]). `OOM`, which
//!   the store below does not retry, is retried 8 times (about 1 to 2.5 s; the backoff starts
//!   at 10 ms and doubles up to 1 s), then it is a refusal. Nothing is reordered: a later
//!   write of the same id waits for it.
//!   Writers keep queueing until the queue is full; a `flush` meanwhile returns the last error
//!   at its deadline, and the writes stay queued.
//! - **Refusals reach the thread that wrote them.** A batch that the backend *refuses* (a
//!   non-retryable error: a value too large, `OOM` after its retries, `NOPERM`) is split and
//!   sent item by item, so only the refused writes are dropped. Each is logged at once, and the
//!   next [`WriteBehind::flush`] or `index_done_callback` *of the thread that queued it*
//!   returns [`Error::WritesRefused`]: the count, the first few ids and the first error. Other
//!   threads' flushes do not see it while that thread runs; once it has ended, its unreported
//!   refusals go to the next flush of any thread, so they are not lost with it. What is left
//!   is returned by [`WriteBehind::close`]; each refusal is also logged at error level when it
//!   happens.
//!
//! # What it costs
//!
//! A write is **durable only after [`WriteBehind::flush`], `index_done_callback`,
//! [`WriteBehind::close`] or drop**. When `upsert` returns, the write is only queued in this
//! process. If the process dies (SIGKILL included), everything not yet acknowledged is lost:
//! at most `capacity` items (and `capacity_bytes` bytes) queued, plus `in_flight` batches
//! being sent and one being cut, each at most `batch_items` items and `batch_bytes` bytes. What
//! a flush confirmed is in the backend, and each value there is whole: a batch is a set of
//! single-key writes, each stored entirely or not at all (`tests/write_behind_crash.rs`).
//! Also, a refused write is reported later, by a flush of the thread that queued it, not by
//! the `upsert` that queued it. `stats`, `clear` and `index_done_callback` flush first, so
//! they cost one flush.
//!
//! There is one case where accepted writes may not be persisted: at close or drop, the backend
//! is still unreachable after [`WriteBehindConfig::flush_timeout`]. The unsent writes are then
//! handed, in the order accepted, to the inner store's [`KvStore::park`]: the fallback keeps
//! them in its journal, replayed when Redis answers. A store that cannot keep them refuses
//! them (the default), and their number is logged at error level. Either way `close` returns
//! an error that says which.
//!
//! # Where it goes in a stack
//!
//! ```text
//! Metered<WriteBehind<FallbackStore<RedisStore>>>      right
//! Metered<FallbackStore<WriteBehind<RedisStore>>>      wrong: an outage stalls the queue
//! WriteBehind<Metered<..>>                             wrong: metrics time batches, not callers
//! ```
//!
//! Put it *outside* the fallback store. Then the flusher writes into the fallback, and an
//! outage fills the fallback's journal instead of stalling the queue. Inside the fallback, the
//! fallback would see only fast, successful enqueues and never notice the outage, while
//! accepted writes piled up in memory until producers blocked. Put it *inside* the metrics
//! wrapper, so the metrics count and time what callers see (enqueue latency). Outside the
//! metrics wrapper, the metrics would time the flusher's batches instead of the callers' calls.
//!
//! # Environment
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `KV_WRITE_BEHIND` | false | `true`/`1`/`yes` turns write-behind on |
//! | `KV_WRITE_BEHIND_BATCH` | 256 | most writes per batch |
//! | `KV_WRITE_BEHIND_BATCH_BYTES` | 4194304 | most bytes of JSON per batch (estimated) |
//! | `KV_WRITE_BEHIND_DELAY_MS` | 5 | most time a write waits for its batch to fill |
//! | `KV_WRITE_BEHIND_CAPACITY` | 16384 | most writes queued before writers block |
//! | `KV_WRITE_BEHIND_CAPACITY_BYTES` | 268435456 | most bytes of values queued (estimated JSON) before writers block |
//! | `KV_WRITE_BEHIND_ENQUEUE_TIMEOUT_MS` | 30000 | how long a writer blocks on a full queue |
//! | `KV_WRITE_BEHIND_FLUSH_TIMEOUT_MS` | 30000 | deadline of `flush`, `close` and drop |
//! | `KV_WRITE_BEHIND_IN_FLIGHT` | 4 | most batches being sent at once (1 to 64), one thread each |
//!
//! # Example
//!
//! ```
//! use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
//! use graphrag_kv::{JsonDir, KvStore};
//! use serde_json::json;
//!
//! # fn main() -> graphrag_kv::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let chunks = JsonDir::open(dir.path())?.namespace("text_chunks")?;
//! # struct Shared(std::sync::Arc<graphrag_kv::JsonFileStore>);
//! # impl KvStore for Shared {
//! #     fn namespace(&self) -> &str { self.0.namespace() }
//! #     fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> { self.0.all_keys() }
//! #     fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<serde_json::Value>> { self.0.get_by_id(id) }
//! #     fn get_by_ids(&self, ids: &[String], f: Option<&[String]>) -> graphrag_kv::Result<Vec<Option<serde_json::Value>>> { self.0.get_by_ids(ids, f) }
//! #     fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> { self.0.filter_keys(ids) }
//! #     fn upsert(&self, items: Vec<graphrag_kv::Item>) -> graphrag_kv::Result<()> { self.0.upsert(items) }
//! #     fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> { self.0.delete_by_ids(ids) }
//! #     fn clear(&self) -> graphrag_kv::Result<()> { self.0.clear() }
//! #     fn index_start_callback(&self) -> graphrag_kv::Result<()> { self.0.index_start_callback() }
//! #     fn index_done_callback(&self) -> graphrag_kv::Result<()> { self.0.index_done_callback() }
//! #     fn stats(&self) -> graphrag_kv::Result<graphrag_kv::NamespaceStats> { self.0.stats() }
//! # }
//! # let chunks = Shared(chunks);
//! let store = WriteBehind::new(chunks, WriteBehindConfig::default());
//! store.upsert(vec![("chunk-1".into(), json!({"content": "queued"}))])?; // returns at once
//! assert_eq!(store.filter_keys(&["chunk-1".into()])?, Vec::<String>::new()); // already visible
//! store.index_done_callback()?; // sent, then made durable
//! let stats = store.stats_snapshot();
//! assert_eq!(stats.items_sent, 1);
//! store.close()?;
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::collections::hash_map::{Entry as MapEntry, RandomState};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, Sender};
use serde_json::value::RawValue;
use serde_json::Value;

mod flusher;
mod sender;
mod state;
#[cfg(test)]
mod tests;
mod wrapper;

use crate::error::{Error, Result};
use crate::store::{
    missing_in_order, parse_items, project, validate_id, validate_ids, Item, KvStore,
    NamespaceStats, Stored,
};

// ---------------------------------------------------------------------------------------------
// Configuration (in `config`, which must not depend on the queue)

pub use crate::config::write_behind::{
    WriteBehindConfigBuilder, DEFAULT_BATCH_BYTES, DEFAULT_BATCH_ITEMS, DEFAULT_CAPACITY,
    DEFAULT_CAPACITY_BYTES, DEFAULT_ENQUEUE_TIMEOUT, DEFAULT_FLUSH_TIMEOUT, DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_DELAY, ENV_BATCH, ENV_BATCH_BYTES, ENV_CAPACITY, ENV_CAPACITY_BYTES, ENV_DELAY_MS,
    ENV_ENABLED, ENV_ENQUEUE_TIMEOUT_MS, ENV_FLUSH_TIMEOUT_MS, ENV_IN_FLIGHT,
};
pub use crate::config::WriteBehindConfig;

// ---------------------------------------------------------------------------------------------
// Public figures and hooks

/// A snapshot of the queue's figures, as returned by [`WriteBehind::stats_snapshot`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteBehindStats {
    /// Writes accepted and not yet taken by the flusher (the flusher holds up to `in_flight`
    /// more batches).
    pub queue_depth: u64,
    /// Writes accepted and not yet acknowledged by the backend: those queued, those the
    /// flusher is gathering into a batch and those being sent. What
    /// `redis_write_behind_queue_depth` reports.
    pub unsent: u64,
    /// Ids whose newest write the backend has not yet acknowledged (the overlay's size).
    pub pending_ids: u64,
    /// Batches acknowledged by the backend.
    pub batches_sent: u64,
    /// Writes acknowledged by the backend (before coalescing repeated ids within a batch).
    pub items_sent: u64,
    /// Writes in the last batch sent.
    pub last_batch_items: u64,
    /// Attempts that failed with a retryable error and were retried.
    pub retries: u64,
    /// Writes dropped because the backend refused them (non-retryable errors).
    pub failed_writes: u64,
    /// Time to send the last batch, retries included.
    pub last_flush_latency: Duration,
    /// Time spent sending batches since the start, retries included.
    pub total_flush_latency: Duration,
}

/// One write that was accepted but could not be sent, handed to the inner store's
/// [`KvStore::park`] at close (defined with the trait; re-exported here where it was first).
pub use crate::store::UnsentWrite;

pub use wrapper::WriteBehind;

use flusher::*;
use sender::*;
use state::*;
