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
//! There is one case where accepted writes are not persisted: at close or drop, the backend is
//! still unreachable after [`WriteBehindConfig::flush_timeout`]. The unsent writes then go to
//! the [`UnsentSink`] if one was given (the fallback journal's hook). Otherwise their number is
//! logged at error level, and `close` returns an error.
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
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, Item, KvStore, NamespaceStats,
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
pub struct WriteBehindStats {
    /// Writes accepted and not yet taken by the flusher (the flusher holds up to `in_flight`
    /// more batches).
    pub queue_depth: u64,
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

/// One write that was accepted but could not be sent, handed to an [`UnsentSink`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum UnsentWrite {
    /// An upsert of one id.
    Upsert {
        /// The id.
        id: String,
        /// The value.
        value: Value,
    },
    /// A delete of one id.
    Delete {
        /// The id.
        id: String,
    },
}

/// Where [`WriteBehind`] puts accepted writes that are still unsent when its final flush
/// reaches [`WriteBehindConfig::flush_timeout`] at close or drop. The fallback journal
/// implements this, so that an outage at shutdown loses nothing. Without a sink, their count is
/// logged at error level.
pub trait UnsentSink: Send + Sync {
    /// Takes the unsent writes of `namespace`, in the order they were accepted (replaying them
    /// in that order gives the state the caller expected).
    ///
    /// # Errors
    /// When they cannot be kept. The writes are then lost, and their count is logged.
    fn save_unsent(&self, namespace: &str, writes: Vec<UnsentWrite>) -> Result<()>;
}

// ---------------------------------------------------------------------------------------------
// Internals

/// The newest accepted write of an id, as readers see it until the backend acknowledges it.
#[derive(Clone)]
enum Pending {
    /// `Arc`: the same value sits in the queue and in the overlay, and a reader clones it
    /// outside the lock.
    Upsert(Arc<Value>),
    Delete,
}

struct Entry {
    seq: u64,
    pending: Pending,
}

thread_local! {
    /// Lives as long as its thread; the queue keeps weak references to it. A refusal whose
    /// writer has ended is reported by any thread's next flush, so it is not lost with the
    /// thread (workers of a pool that ends before the main thread's `index_done_callback`).
    static WRITER_TOKEN: Arc<()> = Arc::new(());
}

/// The calling thread's token; a dead one while the thread is being torn down.
fn writer_token() -> Weak<()> {
    WRITER_TOKEN.try_with(Arc::downgrade).unwrap_or_default()
}

/// Refused writes of one thread since its last report.
struct Refusal {
    /// See [`Op::writer_alive`].
    writer_alive: Weak<()>,
    /// The backend's error for the first of them.
    first: Error,
    count: u64,
    /// The ids of the first [`REFUSED_IDS_KEPT`].
    ids: Vec<String>,
}

/// How many refused ids an error names: enough to find the writes, not a copy of a whole
/// batch's ids.
const REFUSED_IDS_KEPT: usize = 5;

/// How many times a write answered `OOM` is retried before it is dropped as refused: memory
/// can come back (keys expire, another client deletes), but a server full of keys it may not
/// evict stays full, and the queue must not stall on it until the flush deadline. With the
/// backoff this is about 1 to 2.5 s.
const OOM_RETRIES: u32 = 8;

/// One queued write.
struct Op {
    /// Position in the queue: increasing in queue order.
    seq: u64,
    /// Shared with the overlay's key and the flusher's map of ids in flight: one copy of the
    /// id per write, the others are reference counts.
    id: Arc<str>,
    /// `None` for a delete.
    value: Option<Arc<Value>>,
    /// Estimated JSON bytes, for the batch and queue byte limits.
    bytes: usize,
    /// The thread that queued it: a refusal is reported to that thread's next flush.
    writer: ThreadId,
    /// Dead once that thread has ended: its refusals then go to any thread's next flush.
    writer_alive: Weak<()>,
    /// When the call was accepted, for the age limit.
    at: Instant,
    /// A later write of the same id is in the same batch, so this one is not sent. Set when the
    /// batch is cut.
    superseded: bool,
}

enum Msg {
    /// The writes of one call.
    Ops(Vec<Op>),
    /// Someone waits in `flush`: send what came before this without lingering.
    Flush,
    /// Last message: send everything, then exit.
    Shutdown,
}

/// What producers, readers and the flusher share, under one mutex.
///
/// One `std::sync::Mutex` for all of it, and not a lock-free queue: a write must take a
/// sequence number, enter the overlay and enter the channel as one step. Otherwise two threads
/// writing the same id could enter the overlay in one order and the queue in the other, and
/// readers would see a different winner than the backend ends up with. Each critical section is
/// a few hash-map operations, and the flusher takes the lock once per batch, not per write.
struct State {
    /// id → newest accepted write not yet acknowledged by the inner store.
    overlay: HashMap<Arc<str>, Entry>,
    /// The last sequence number handed out.
    last_seq: u64,
    /// Every write with a sequence number up to this one has been acknowledged (or dropped after
    /// a refusal, or handed off at shutdown). Writes are acknowledged in queue order.
    acked_seq: u64,
    /// Writes accepted and not yet taken by the flusher: the quantity `capacity` bounds.
    queued: usize,
    /// Their estimated bytes: the quantity `capacity_bytes` bounds.
    queued_bytes: usize,
    /// Writes the backend refused (non-retryable errors), not yet reported, per writing thread:
    /// each thread's next flush reports its own, and no other thread's. A thread that never
    /// flushes again leaves them to `close` (they are logged at once in any case).
    refused: HashMap<ThreadId, Refusal>,
    /// The latest retryable error while the flusher is stuck on a batch; cleared when a batch
    /// gets through. A flush that times out returns it.
    last_error: Option<Error>,
    /// False once the flusher thread has exited (after shutdown, or after a panic).
    flusher_alive: bool,
}

/// Counters read by `stats_snapshot`. Atomics, so reading them never blocks the flusher.
#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    items: AtomicU64,
    last_batch_items: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
    last_latency_ns: AtomicU64,
    total_latency_ns: AtomicU64,
}

/// The shutdown signal: the deadline of the final flush, and a condvar that cuts the flusher's
/// retry pauses short. Separate from `State` so a retry pause never holds the main lock.
#[derive(Default)]
struct Shutdown {
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
}

impl Shutdown {
    fn request(&self, deadline: Instant) {
        *lock(&self.deadline) = Some(deadline);
        self.wake.notify_all();
    }

    /// Sleeps `pause`, or less if the shutdown deadline comes first. Returns false when the
    /// deadline has passed.
    fn pause(&self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        let mut deadline = lock(&self.deadline);
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            let wake = deadline.map_or(until, |d| d.min(until));
            if now >= wake {
                return !deadline.is_some_and(|d| Instant::now() >= d);
            }
            deadline = self
                .wake
                .wait_timeout(deadline, wake - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

struct Shared<S> {
    inner: S,
    config: WriteBehindConfig,
    sink: Option<Arc<dyn UnsentSink>>,
    state: Mutex<State>,
    /// Signalled when the flusher takes writes from the queue, or exits.
    not_full: Condvar,
    /// Signalled when `acked_seq` moves, or the flusher exits.
    acked: Condvar,
    /// Unbounded on purpose: the bound is `capacity` in *items*, enforced under `state`. A call of
    /// n items must be taken whole or not at all, which a channel bounded in messages cannot
    /// express. Sends happen under `state`, so they never race, and the channel order is the
    /// sequence order.
    tx: Sender<Msg>,
    shutdown: Arc<Shutdown>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves these structures half-updated in a way that matters more
    // than losing the whole store would: keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: KvStore> Shared<S> {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn stopped_error(&self) -> Error {
        Error::Unavailable {
            namespace: self.namespace().to_string(),
            reason: "the write-behind flusher thread has stopped (see the error log); \
                     writes can no longer be queued"
                .into(),
        }
    }

    /// Queues one call's writes: all of them or, on timeout, none.
    fn enqueue(&self, writes: Vec<(String, Option<Arc<Value>>)>) -> Result<()> {
        let n = writes.len();
        // Work that needs no lock is done before taking it: sizes, the shared ids.
        let at = Instant::now();
        let writer = std::thread::current().id();
        let writer_alive = writer_token();
        let mut prepared: Vec<Op> = writes
            .into_iter()
            .map(|(id, value)| {
                let bytes = id.len() + value.as_deref().map_or(8, json_size);
                Op {
                    seq: 0,
                    id: id.into(),
                    value,
                    bytes,
                    writer,
                    writer_alive: writer_alive.clone(),
                    at,
                    superseded: false,
                }
            })
            .collect();
        let bytes: usize = prepared.iter().map(|op| op.bytes).sum();
        let deadline = at.checked_add(self.config.enqueue_timeout);
        let mut st = self.state();
        loop {
            if !st.flusher_alive {
                return Err(self.stopped_error());
            }
            if st.queued == 0
                || (st.queued + n <= self.config.capacity
                    && st.queued_bytes + bytes <= self.config.capacity_bytes)
            {
                break;
            }
            let now = Instant::now();
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            if left.is_zero() {
                return Err(Error::Unavailable {
                    namespace: self.namespace().to_string(),
                    reason: format!(
                        "the write-behind queue stayed full ({} of {} writes, {} of {} bytes \
                         queued) for {:?}: the backend is down or not keeping up; this write \
                         of {n} item(s), {bytes} bytes, was not taken",
                        st.queued,
                        self.config.capacity,
                        st.queued_bytes,
                        self.config.capacity_bytes,
                        self.config.enqueue_timeout
                    ),
                });
            }
            st = self
                .not_full
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.queued += n;
        st.queued_bytes += bytes;
        let mut ops = Vec::with_capacity(n);
        for mut op in prepared.drain(..) {
            st.last_seq += 1;
            op.seq = st.last_seq;
            let pending = match &op.value {
                Some(v) => Pending::Upsert(v.clone()),
                None => Pending::Delete,
            };
            st.overlay.insert(
                op.id.clone(),
                Entry {
                    seq: op.seq,
                    pending,
                },
            );
            ops.push(op);
        }
        // Sent under the lock: the channel's order must be the sequence order. The receiver
        // lives as long as the flusher, which `flusher_alive` (checked above, under this lock)
        // says is running.
        let _ = self.tx.send(Msg::Ops(ops));
        Ok(())
    }

    /// The overlay's answer for each id: `None` when the id has no pending write.
    fn lookup(&self, ids: &[String]) -> Option<Vec<Option<Pending>>> {
        let st = self.state();
        if st.overlay.is_empty() {
            return None;
        }
        let found: Vec<Option<Pending>> = ids
            .iter()
            .map(|id| st.overlay.get(id.as_str()).map(|e| e.pending.clone()))
            .collect();
        drop(st);
        found.iter().any(Option::is_some).then_some(found)
    }

    fn flush_timeout(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.state();
        let target = st.last_seq;
        if st.acked_seq < target {
            drop(st);
            // Cut the flusher's wait for a full batch short. Only if it is alive: otherwise
            // nobody reads the channel, and the messages would pile up.
            let _ = self.tx.send(Msg::Flush);
            st = self.state();
        }
        while st.acked_seq < target {
            if !st.flusher_alive {
                return Err(self.stopped_error());
            }
            let now = Instant::now();
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
            if left.is_zero() {
                let unsent = target - st.acked_seq;
                return Err(st.last_error.take().unwrap_or_else(|| Error::Unavailable {
                    namespace: self.namespace().to_string(),
                    reason: format!(
                        "write-behind flush did not finish within {timeout:?}: up to {unsent} \
                         queued writes are not yet acknowledged by the backend (still retrying)"
                    ),
                }));
            }
            st = self
                .acked
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        self.take_refused(&mut st, Some(std::thread::current().id()))
    }

    /// Reports (once) the writes the backend refused: those `writer` queued and those of
    /// threads that have ended, or every thread's when `None` (at close).
    fn take_refused(&self, st: &mut State, writer: Option<ThreadId>) -> Result<()> {
        let mine: Vec<ThreadId> = st
            .refused
            .iter()
            .filter(|(thread, r)| {
                writer.is_none_or(|w| w == **thread) || r.writer_alive.strong_count() == 0
            })
            .map(|(thread, _)| *thread)
            .collect();
        // The caller's own first, so its first error is the one returned.
        let mut taken: Vec<Refusal> = Vec::with_capacity(mine.len());
        for thread in mine {
            if let Some(r) = st.refused.remove(&thread) {
                if Some(thread) == writer {
                    taken.insert(0, r);
                } else {
                    taken.push(r);
                }
            }
        }
        let mut all = taken.into_iter();
        let refusal = all.next().map(|mut first| {
            for r in all {
                first.count += r.count;
                let room = REFUSED_IDS_KEPT.saturating_sub(first.ids.len());
                first.ids.extend(r.ids.into_iter().take(room));
            }
            first
        });
        match refusal {
            None => Ok(()),
            Some(r) => Err(Error::WritesRefused {
                namespace: self.namespace().to_string(),
                count: r.count,
                ids: r.ids,
                source: Box::new(r.first),
            }),
        }
    }
}

/// Estimated length of `v` as JSON, without serializing it (escapes are not counted).
fn json_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|v| json_size(v) + 1).sum::<usize>(),
        Value::Object(m) => {
            2 + m
                .iter()
                .map(|(k, v)| k.len() + 4 + json_size(v))
                .sum::<usize>()
        }
    }
}

/// Pause before retry `attempt` (0-based): 10 ms doubling up to 1 s, with jitter so that many
/// processes do not hammer a restarted server in step.
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (10u64 << attempt.min(7)).min(1000);
    // RandomState is seeded randomly per instance: enough jitter without a rand dependency.
    let r = RandomState::new().build_hasher().finish();
    Duration::from_millis(cap_ms / 2 + r % (cap_ms / 2 + 1))
}

// ---------------------------------------------------------------------------------------------
// The flusher thread and its senders
//
// The flusher thread takes the queue in FIFO order, cuts it into batches and hands each batch
// to one of `in_flight` sender threads, which send it to the inner store (retrying as needed)
// and report back. So the next batch is encoded and sent while the previous one waits for its
// round trip. Two rules keep the guarantees of a single sender:
//
// - Batches in flight never share an id: a batch ends before the first write whose id is in a
//   batch still being sent, and that write waits until it is done. Per id, writes reach the
//   inner store in queue order, retries included.
// - Outcomes are acknowledged in dispatch order (a batch that finishes early waits for the
//   ones before it), so `acked_seq` still means "everything up to here".

/// Why a send stopped.
enum Stop {
    /// The shutdown deadline passed while the backend kept failing.
    GaveUp,
    /// A non-retryable error.
    Refused(Error),
}

/// Marks the flusher dead when the thread ends, normally or by a panic, and wakes everyone
/// who waits for it.
struct AliveGuard<S: KvStore> {
    shared: Arc<Shared<S>>,
}

impl<S: KvStore> Drop for AliveGuard<S> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            log::error!(
                "write-behind flusher of namespace {:?} panicked: queued writes are lost and \
                 further writes are refused",
                self.shared.namespace()
            );
        }
        self.shared.state().flusher_alive = false;
        self.shared.not_full.notify_all();
        self.shared.acked.notify_all();
    }
}

/// A batch handed to a sender thread. `number` counts batches in dispatch order.
struct Job {
    number: u64,
    batch: Vec<Op>,
}

/// What a sender thread reports for one batch.
enum Outcome {
    /// In the inner store, except the writes it refused (dropped, counted and recorded).
    Sent,
    /// The shutdown deadline passed while the backend kept failing: nothing of it counts as sent.
    GaveUp,
    /// The inner store panicked; the flusher re-raises it, as if it had sent the batch itself.
    Panicked(Box<dyn Any + Send>),
}

struct Done {
    number: u64,
    batch: Vec<Op>,
    outcome: Outcome,
}

/// Owns the sender threads. Dropping it closes their job channel, so each one exits after its
/// current batch, and joins them. The flusher drops it once no batch is in flight, except while
/// a panic unwinds: then a sender may be retrying a dead backend, so the shutdown deadline is
/// set to now first (the queued writes are lost anyway, as the flusher's panic says). Joining
/// them even then keeps [`WriteBehind::into_inner`]'s promise that the flusher's end leaves
/// no other owner of the inner store.
struct Senders {
    jobs: Option<Sender<Job>>,
    handles: Vec<JoinHandle<()>>,
    shutdown: Arc<Shutdown>,
}

impl Senders {
    fn start<S: KvStore + 'static>(shared: &Arc<Shared<S>>, done: &Sender<Done>) -> Senders {
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        let handles = (0..shared.config.in_flight)
            .map(|i| {
                let (shared, rx, done) = (shared.clone(), rx.clone(), done.clone());
                std::thread::Builder::new()
                    .name(format!("kv-wb-send-{i}-{}", shared.namespace()))
                    .spawn(move || send_jobs(&shared, &rx, &done))
                    .expect("starting a write-behind sender thread")
            })
            .collect();
        Senders {
            jobs: Some(jobs),
            handles,
            shutdown: shared.shutdown.clone(),
        }
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // The senders live as long as this guard: the channel cannot be closed here.
            let _ = jobs.send(job);
        }
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.jobs = None;
        if std::thread::panicking() {
            self.shutdown.request(Instant::now());
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A sender thread: sends each batch it is handed and reports the outcome.
fn send_jobs<S: KvStore>(shared: &Shared<S>, jobs: &Receiver<Job>, done: &Sender<Done>) {
    while let Ok(Job { number, batch }) = jobs.recv() {
        let outcome = match panic::catch_unwind(AssertUnwindSafe(|| shared.send(&batch))) {
            Ok(Ok(())) => Outcome::Sent,
            Ok(Err(_)) => Outcome::GaveUp,
            Err(payload) => Outcome::Panicked(payload),
        };
        let panicked = matches!(outcome, Outcome::Panicked(_));
        let report = Done {
            number,
            batch,
            outcome,
        };
        if done.send(report).is_err() || panicked {
            return;
        }
    }
}

impl<S: KvStore> Shared<S> {
    /// Sends one batch, retrying retryable errors. The flusher acknowledges it afterwards.
    fn send(&self, batch: &[Op]) -> Result<(), Stop> {
        let start = Instant::now();
        // Only the last write of each id in the batch is sent (the flusher marked the others
        // superseded): the overlay shows it to readers until the whole batch is acknowledged,
        // so the intermediate states are never observable. What is left touches each id once,
        // so the upserts and the deletes are disjoint and can go in two calls in either order.
        let (upserts, deletes): (Vec<&Op>, Vec<&Op>) = batch
            .iter()
            .filter(|op| !op.superseded)
            .partition(|op| op.value.is_some());
        let mut dropped = 0;
        if !upserts.is_empty() {
            dropped += self.send_upserts(&upserts, OOM_RETRIES)?;
        }
        if !deletes.is_empty() {
            dropped += self.send_deletes(&deletes, OOM_RETRIES)?;
        }
        // Counted before the acknowledgement, so that a flush that returns sees its batch in
        // `stats_snapshot` (the report to the flusher orders these stores before it).
        let elapsed = start.elapsed();
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.items
            .fetch_add(batch.len() as u64 - dropped, Ordering::Relaxed);
        c.last_batch_items
            .store(batch.len() as u64, Ordering::Relaxed);
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        c.last_latency_ns.store(ns, Ordering::Relaxed);
        c.total_latency_ns.fetch_add(ns, Ordering::Relaxed);
        Ok(())
    }

    /// Sends upserts; on a refusal, item by item so that only the refused ones are dropped.
    /// Returns how many were dropped.
    ///
    /// `oom_retries`: [`OOM_RETRIES`] for the batch, none for the writes of a batch split after
    /// a refusal: the server was just found full for seconds, and a batch of 256 writes would
    /// otherwise stall the queue 256 times as long.
    fn send_upserts(&self, items: &[&Op], oom_retries: u32) -> Result<u64, Stop> {
        // Borrowed: the queue keeps its values for readers and for a retry, and no attempt
        // copies them (a deep copy of a 2 KB value costs about what encoding it does).
        let refs: Vec<(&str, &Value)> = items
            .iter()
            .filter_map(|op| Some((&*op.id, &**op.value.as_ref()?)))
            .collect();
        match self.with_retries(oom_retries, || self.inner.upsert_refs(&refs)) {
            Ok(()) => Ok(0),
            Err(Stop::GaveUp) => Err(Stop::GaveUp),
            Err(Stop::Refused(e)) if items.len() == 1 => {
                self.record_refusal(e, items[0]);
                Ok(1)
            }
            Err(Stop::Refused(e)) => {
                log::warn!(
                    "write-behind: namespace {:?} refused a batch of {} upserts ({e}); \
                     sending them one by one to find the refused ones",
                    self.namespace(),
                    items.len()
                );
                items
                    .iter()
                    .map(|item| self.send_upserts(std::slice::from_ref(item), 0))
                    .sum()
            }
        }
    }

    /// Sends deletes, as `send_upserts`.
    fn send_deletes(&self, ops: &[&Op], oom_retries: u32) -> Result<u64, Stop> {
        let ids: Vec<String> = ops.iter().map(|op| op.id.to_string()).collect();
        match self.with_retries(oom_retries, || self.inner.delete_by_ids(&ids)) {
            Ok(()) => Ok(0),
            Err(Stop::GaveUp) => Err(Stop::GaveUp),
            Err(Stop::Refused(e)) if ops.len() == 1 => {
                self.record_refusal(e, ops[0]);
                Ok(1)
            }
            Err(Stop::Refused(_)) => ops
                .iter()
                .map(|op| self.send_deletes(std::slice::from_ref(op), 0))
                .sum(),
        }
    }

    /// Runs `call` until it succeeds, fails with a non-retryable error, or the shutdown
    /// deadline passes. Retrying is safe because upserts and deletes of whole values are
    /// idempotent, and no later write of the same ids is sent meanwhile (batches in flight
    /// never share an id), so nothing is reordered.
    ///
    /// Retryable are connection errors, timeouts and the server's passing states
    /// ([`Error::is_retryable`]: MISCONF, NOREPLICAS, LOADING, BUSY ...), without limit until
    /// the deadline; and `OOM`, `oom_retries` times, after which it is a refusal.
    fn with_retries(
        &self,
        mut oom_retries: u32,
        mut call: impl FnMut() -> Result<()>,
    ) -> Result<(), Stop> {
        let mut attempt = 0u32;
        loop {
            match call() {
                Ok(()) => {
                    if attempt > 0 {
                        log::info!(
                            "write-behind: namespace {:?} is writable again after {attempt} \
                             retries",
                            self.namespace()
                        );
                    }
                    return Ok(());
                }
                Err(e) if e.is_retryable() || (e.is_out_of_memory() && oom_retries > 0) => {
                    if !e.is_retryable() {
                        oom_retries -= 1;
                    }
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    // A retryable error has already been retried by the store below (the
                    // backend's policy, REDIS_RETRIES + 1 sends): submitting again at once
                    // would multiply its attempts. So the batch is submitted again at most once
                    // per `RESUBMIT_INTERVAL` (see `crate::retry` for the bound). `OOM` is not
                    // retried below and keeps its own short schedule.
                    let pause = if e.is_retryable() {
                        crate::retry::resubmit_pause()
                    } else {
                        backoff(attempt)
                    };
                    if attempt == 0 {
                        log::warn!(
                            "write-behind: sending to namespace {:?} failed ({e}); retrying \
                             with backoff, writers continue until the queue is full",
                            self.namespace()
                        );
                    } else {
                        log::debug!(
                            "write-behind: retry {attempt} failed ({e}); next in {pause:?}"
                        );
                    }
                    self.state().last_error = Some(e);
                    if !self.shutdown.pause(pause) {
                        return Err(Stop::GaveUp);
                    }
                    attempt += 1;
                }
                Err(e) => return Err(Stop::Refused(e)),
            }
        }
    }

    fn record_refusal(&self, e: Error, op: &Op) {
        log::error!(
            "write-behind: namespace {:?} refused the queued write of {}, which is dropped: \
             {e} (reported again by the next flush of the thread that wrote it)",
            self.namespace(),
            crate::error::display_id(&op.id)
        );
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state();
        match st.refused.entry(op.writer) {
            MapEntry::Occupied(mut r) => {
                let r = r.get_mut();
                r.count += 1;
                if r.ids.len() < REFUSED_IDS_KEPT {
                    r.ids.push(op.id.to_string());
                }
            }
            MapEntry::Vacant(r) => {
                r.insert(Refusal {
                    writer_alive: op.writer_alive.clone(),
                    first: e,
                    count: 1,
                    ids: vec![op.id.to_string()],
                });
            }
        }
    }

    /// The batch is in the inner store (or dropped, or handed off): its ids leave the overlay,
    /// unless a newer write of the same id is pending. Only after this may readers go to the
    /// inner store for them. Called in queue order.
    fn acknowledge(&self, batch: &[Op]) {
        let mut st = self.state();
        for op in batch {
            // One hash lookup in the usual case; a newer pending write of the id (rare) goes
            // back in.
            if let Some((id, e)) = st.overlay.remove_entry(&*op.id) {
                if e.seq != op.seq {
                    st.overlay.insert(id, e);
                }
            }
        }
        if let Some(op) = batch.last() {
            st.acked_seq = st.acked_seq.max(op.seq);
        }
        st.last_error = None;
        drop(st);
        self.acked.notify_all();
    }
}

/// What the flusher waits for when it has nothing to dispatch.
enum Event {
    Msg(Msg),
    Done(Done),
    /// The oldest queued write is due.
    Wake,
    /// The channel closed (it cannot while `Shared` holds its sender): as a shutdown.
    Closed,
}

struct Flusher<S: KvStore> {
    shared: Arc<Shared<S>>,
    rx: Receiver<Msg>,
    /// Writes taken from the channel, not yet dispatched. At most one batch plus one call.
    backlog: VecDeque<Op>,
    backlog_bytes: usize,
    /// Writes taken from the channel not yet subtracted from `State::queued`: subtracted once
    /// per batch (or before waiting), so the flusher takes the lock once per batch, not per call.
    untracked: usize,
    /// Their bytes, not yet subtracted from `State::queued_bytes`.
    untracked_bytes: usize,
    /// A `Flush` message arrived: no lingering until the backlog is empty.
    flush_requested: bool,
    /// The `Shutdown` message arrived (or the channel closed): nothing follows it.
    shutting_down: bool,
    /// Batches handed to the senders, in dispatch order (numbers `first_in_flight..`), each
    /// with its outcome once reported. Acknowledged from the front only, so acknowledgements
    /// follow queue order even when a later batch finishes first.
    in_flight: VecDeque<Option<Done>>,
    first_in_flight: u64,
    /// id → (number of the batch writing it, index there), for batches not yet reported. It
    /// keeps batches in flight disjoint and marks repeated ids within a batch; a hash map
    /// operation per write to place it and one to release it.
    busy: HashMap<Arc<str>, (u64, usize)>,
    /// A batch gave up at the shutdown deadline: nothing more is dispatched.
    gave_up: bool,
    done: Receiver<Done>,
    /// Declared last: dropped (joined) after everything above.
    senders: Senders,
}

impl<S: KvStore + 'static> Flusher<S> {
    fn new(shared: Arc<Shared<S>>, rx: Receiver<Msg>) -> Flusher<S> {
        // Unbounded, but never holds more than `in_flight` reports.
        let (done_tx, done) = crossbeam_channel::unbounded();
        let senders = Senders::start(&shared, &done_tx);
        Flusher {
            shared,
            rx,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            untracked: 0,
            untracked_bytes: 0,
            flush_requested: false,
            shutting_down: false,
            in_flight: VecDeque::new(),
            first_in_flight: 0,
            busy: HashMap::new(),
            gave_up: false,
            done,
            senders,
        }
    }
}

impl<S: KvStore> Flusher<S> {
    fn run(mut self) -> Result<()> {
        loop {
            while let Ok(d) = self.done.try_recv() {
                self.complete(d);
            }
            if self.gave_up {
                return self.give_up();
            }
            while self.takes_writes() {
                match self.rx.try_recv() {
                    Ok(m) => self.take(m),
                    Err(_) => break,
                }
            }
            if self.backlog.is_empty() && self.shutting_down && self.in_flight.is_empty() {
                self.release();
                return Ok(());
            }
            let due = self
                .backlog
                .front()
                .map(|op| op.at.checked_add(self.shared.config.max_delay));
            let can_dispatch = self.in_flight.len() < self.shared.config.in_flight
                && self
                    .backlog
                    .front()
                    .is_some_and(|op| !self.busy.contains_key(&op.id));
            let ready = self.full()
                || self.flush_requested
                || self.shutting_down
                || due.is_some_and(|d| d.is_none_or(|d| Instant::now() >= d));
            if can_dispatch && ready {
                let batch = self.next_batch();
                self.release();
                self.dispatch(batch);
                continue;
            }
            // Writers blocked on a full queue must not wait for this pause.
            self.release();
            let timer = match due {
                Some(Some(d)) if can_dispatch => Some(d),
                _ => None,
            };
            match self.wait(timer) {
                Event::Msg(m) => self.take(m),
                Event::Done(d) => self.complete(d),
                Event::Wake => {}
                Event::Closed => self.shutting_down = true,
            }
        }
    }

    /// Waits for a message (when it takes writes), a sender's report, or `until`.
    fn wait(&self, until: Option<Instant>) -> Event {
        let mut sel = Select::new();
        let writes = (self.takes_writes() && !self.shutting_down).then(|| sel.recv(&self.rx));
        let done = sel.recv(&self.done);
        let oper = match until {
            Some(t) => match sel.select_deadline(t) {
                Ok(oper) => oper,
                Err(_) => return Event::Wake,
            },
            None => sel.select(),
        };
        if Some(oper.index()) == writes {
            return oper.recv(&self.rx).map_or(Event::Closed, Event::Msg);
        }
        debug_assert_eq!(oper.index(), done);
        match oper.recv(&self.done) {
            Ok(d) => Event::Done(d),
            // The senders exit only when this flusher drops them, or after a panic they report.
            Err(_) => unreachable!("the write-behind senders stopped while the flusher runs"),
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Ops(ops) => {
                self.untracked += ops.len();
                for op in ops {
                    self.backlog_bytes += op.bytes;
                    self.untracked_bytes += op.bytes;
                    self.backlog.push_back(op);
                }
            }
            Msg::Flush => self.flush_requested = true,
            Msg::Shutdown => self.shutting_down = true,
        }
    }

    /// Whether to take more writes from the channel: not while every sender is busy, nor beyond
    /// one batch. So at most `in_flight` batches are out of the queue (plus one call), and
    /// writers are held back by `capacity` alone.
    fn takes_writes(&self) -> bool {
        self.in_flight.len() < self.shared.config.in_flight && !self.full()
    }

    fn full(&self) -> bool {
        let c = &self.shared.config;
        self.backlog.len() >= c.batch_items || self.backlog_bytes >= c.batch_bytes
    }

    /// Takes the next batch off the front of the backlog: at least one write, and none whose
    /// id a batch in flight writes. Repeated ids inside it are marked superseded but the last.
    fn next_batch(&mut self) -> Vec<Op> {
        let c = &self.shared.config;
        let number = self.first_in_flight + self.in_flight.len() as u64;
        let mut batch: Vec<Op> = Vec::with_capacity(self.backlog.len().min(c.batch_items));
        let mut bytes = 0;
        while let Some(op) = self.backlog.front() {
            if !batch.is_empty()
                && (batch.len() >= c.batch_items || bytes + op.bytes > c.batch_bytes)
            {
                break;
            }
            match self.busy.entry(op.id.clone()) {
                MapEntry::Occupied(e) if e.get().0 != number => break,
                MapEntry::Occupied(mut e) => {
                    batch[e.get().1].superseded = true;
                    e.get_mut().1 = batch.len();
                }
                MapEntry::Vacant(e) => {
                    e.insert((number, batch.len()));
                }
            }
            bytes += op.bytes;
            batch.extend(self.backlog.pop_front());
        }
        self.backlog_bytes -= bytes;
        if self.backlog.is_empty() {
            self.flush_requested = false;
        }
        batch
    }

    fn dispatch(&mut self, batch: Vec<Op>) {
        let number = self.first_in_flight + self.in_flight.len() as u64;
        self.in_flight.push_back(None);
        self.senders.send(Job { number, batch });
    }

    /// Records a sender's report, frees its ids, and acknowledges the batches at the front
    /// that are done, in order.
    fn complete(&mut self, done: Done) {
        for op in done.batch.iter().filter(|op| !op.superseded) {
            self.busy.remove(&op.id);
        }
        let at = (done.number - self.first_in_flight) as usize;
        match done.outcome {
            Outcome::Panicked(payload) => panic::resume_unwind(payload),
            Outcome::GaveUp => self.gave_up = true,
            Outcome::Sent => {}
        }
        self.in_flight[at] = Some(done);
        while let Some(Some(d)) = self.in_flight.front() {
            if !matches!(d.outcome, Outcome::Sent) {
                break;
            }
            if let Some(Some(d)) = self.in_flight.pop_front() {
                self.first_in_flight += 1;
                self.shared.acknowledge(&d.batch);
            }
        }
    }

    /// Subtracts the writes taken from the channel from `queued`, and wakes blocked writers.
    fn release(&mut self) {
        if self.untracked == 0 {
            return;
        }
        let mut st = self.shared.state();
        st.queued -= self.untracked;
        st.queued_bytes -= self.untracked_bytes;
        drop(st);
        self.untracked = 0;
        self.untracked_bytes = 0;
        self.shared.not_full.notify_all();
    }

    /// The shutdown deadline passed: the other batches in flight finish (or give up too), and
    /// everything not sent goes to the sink, or is counted in the error log. Returns the error
    /// `close` reports.
    fn give_up(mut self) -> Result<()> {
        while self.in_flight.iter().any(Option::is_none) {
            match self.done.recv() {
                Ok(d) => self.complete(d),
                Err(_) => unreachable!("the write-behind senders stopped while the flusher runs"),
            }
        }
        // Sent batches stay acknowledged in order below; the rest is unsent, in queue order.
        let mut sent = Vec::new();
        let mut unsent = Vec::new();
        for d in self.in_flight.drain(..).flatten() {
            match d.outcome {
                Outcome::Sent => sent.push(d.batch),
                _ => unsent.extend(d.batch),
            }
        }
        unsent.extend(self.backlog.drain(..));
        while let Ok(m) = self.rx.try_recv() {
            if let Msg::Ops(ops) = m {
                self.untracked += ops.len();
                self.untracked_bytes += ops.iter().map(|op| op.bytes).sum::<usize>();
                unsent.extend(ops);
            }
        }
        self.release();
        let namespace = self.shared.namespace().to_string();
        let last_error = self
            .shared
            .state()
            .last_error
            .as_ref()
            .map_or_else(|| "none recorded".to_string(), |e| e.to_string());
        let n = unsent.len();
        let timeout = self.shared.config.flush_timeout;
        let writes: Vec<UnsentWrite> = unsent
            .iter()
            .map(|op| match &op.value {
                Some(v) => UnsentWrite::Upsert {
                    id: op.id.to_string(),
                    value: Value::clone(v),
                },
                None => UnsentWrite::Delete {
                    id: op.id.to_string(),
                },
            })
            .collect();
        let reason = match &self.shared.sink {
            Some(sink) => match sink.save_unsent(&namespace, writes) {
                Ok(()) => {
                    log::warn!(
                        "write-behind: {n} writes of namespace {namespace:?} could not be sent \
                         within {timeout:?} at shutdown (last error: {last_error}); handed to \
                         the fallback sink"
                    );
                    format!("{n} writes were handed to the fallback sink instead")
                }
                Err(e) => {
                    log::error!(
                        "write-behind: {n} accepted writes of namespace {namespace:?} are LOST: \
                         not sent within {timeout:?} at shutdown (last error: {last_error}), \
                         and the fallback sink refused them: {e}"
                    );
                    format!("{n} writes are lost (the fallback sink refused them: {e})")
                }
            },
            None => {
                log::error!(
                    "write-behind: {n} accepted writes of namespace {namespace:?} are LOST: not \
                     sent within {timeout:?} at shutdown (last error: {last_error}) and no \
                     fallback sink is configured"
                );
                format!("{n} writes are lost (no fallback sink is configured)")
            }
        };
        for batch in &sent {
            self.shared.acknowledge(batch);
        }
        self.shared.acknowledge(&unsent);
        Err(Error::Unavailable {
            namespace,
            reason: format!(
                "write-behind could not send its queue within {timeout:?} at shutdown (last \
                 error: {last_error}); {reason}"
            ),
        })
    }
}

/// Owns the flusher thread: dropping it requests shutdown (with the flush deadline), lets the
/// thread drain the queue, and joins it.
struct FlusherGuard {
    handle: Option<JoinHandle<Result<()>>>,
    tx: Sender<Msg>,
    shutdown: Arc<Shutdown>,
    timeout: Duration,
    namespace: String,
}

impl FlusherGuard {
    /// Requests shutdown and waits for the thread: the queue is sent, or handed off after the
    /// deadline. A send in progress when the deadline passes finishes first (the backend's own
    /// timeouts bound it).
    fn stop(&mut self) -> Result<()> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        self.shutdown.request(
            Instant::now()
                .checked_add(self.timeout)
                .unwrap_or_else(far_future),
        );
        // Nothing can be queued after this: stopping needs `&mut` or ownership of the store.
        let _ = self.tx.send(Msg::Shutdown);
        match handle.join() {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                namespace: self.namespace.clone(),
                reason: "the write-behind flusher thread panicked; its queued writes are lost"
                    .into(),
            }),
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            // Already logged by the flusher with the details; this line ties it to the drop.
            log::error!("write-behind: dropped with writes not sent: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The wrapper

/// A [`KvStore`] wrapper that queues `upsert` and `delete_by_ids` and sends them in batches
/// from a background thread. Reads see the queued writes. See the [module docs](self) for
/// what it guarantees and costs, and where it goes in a stack.
///
/// The inner store sits behind an `Arc`, not in a plain `inner: S` field: the flusher thread
/// and the callers use it at the same time. [`WriteBehind::into_inner`] gets it back once the
/// thread is joined.
pub struct WriteBehind<S: KvStore + 'static> {
    shared: Arc<Shared<S>>,
    flusher: FlusherGuard,
}

impl<S: KvStore + 'static> fmt::Debug for WriteBehind<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteBehind")
            .field("namespace", &self.shared.namespace())
            .field("config", &self.shared.config)
            .field("stats", &self.stats_snapshot())
            .finish_non_exhaustive()
    }
}

impl<S: KvStore + 'static> WriteBehind<S> {
    /// Wraps `inner` and starts the flusher thread. Unsent writes at a failed shutdown are
    /// counted in the error log.
    ///
    /// # Panics
    /// When the operating system cannot start a thread.
    pub fn new(inner: S, config: WriteBehindConfig) -> WriteBehind<S> {
        Self::start(inner, config, None)
    }

    /// As [`WriteBehind::new`], with a sink for writes still unsent when the final flush at
    /// close or drop reaches its deadline (the fallback journal).
    ///
    /// # Panics
    /// When the operating system cannot start a thread.
    pub fn with_unsent_sink(
        inner: S,
        config: WriteBehindConfig,
        sink: Arc<dyn UnsentSink>,
    ) -> WriteBehind<S> {
        Self::start(inner, config, Some(sink))
    }

    fn start(
        inner: S,
        config: WriteBehindConfig,
        sink: Option<Arc<dyn UnsentSink>>,
    ) -> WriteBehind<S> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shutdown = Arc::new(Shutdown::default());
        let timeout = config.flush_timeout;
        let shared = Arc::new(Shared {
            inner,
            config,
            sink,
            state: Mutex::new(State {
                overlay: HashMap::new(),
                last_seq: 0,
                acked_seq: 0,
                queued: 0,
                queued_bytes: 0,
                refused: HashMap::new(),
                last_error: None,
                flusher_alive: true,
            }),
            not_full: Condvar::new(),
            acked: Condvar::new(),
            tx: tx.clone(),
            shutdown: shutdown.clone(),
            counters: Counters::default(),
        });
        let flusher = Flusher::new(shared.clone(), rx);
        let alive = AliveGuard {
            shared: shared.clone(),
        };
        let namespace = shared.namespace().to_string();
        let handle = std::thread::Builder::new()
            .name(format!("kv-write-behind-{namespace}"))
            .spawn(move || {
                let _alive = alive;
                flusher.run()
            })
            .expect("starting the write-behind flusher thread");
        WriteBehind {
            shared,
            flusher: FlusherGuard {
                handle: Some(handle),
                tx,
                shutdown,
                timeout,
                namespace,
            },
        }
    }

    /// The inner store.
    pub fn inner(&self) -> &S {
        &self.shared.inner
    }

    /// The configuration in use.
    pub fn config(&self) -> &WriteBehindConfig {
        &self.shared.config
    }

    /// Blocks until every write accepted before the call has been acknowledged by the inner
    /// store, for at most [`WriteBehindConfig::flush_timeout`].
    ///
    /// # Errors
    /// - The backend's last error when it keeps failing until the deadline (the flusher keeps
    ///   retrying after that), or [`Error::Unavailable`] if none was recorded.
    /// - [`Error::WritesRefused`] for writes this thread queued that the backend refused since
    ///   this thread's last report (they were dropped): their count, first ids and first
    ///   error; also those of threads that have ended without hearing of theirs. Writes
    ///   refused from other running threads are theirs to hear about.
    /// - [`Error::Unavailable`] when the flusher thread has stopped.
    pub fn flush(&self) -> Result<()> {
        self.shared.flush_timeout(self.shared.config.flush_timeout)
    }

    /// [`WriteBehind::flush`] with its own deadline.
    ///
    /// # Errors
    /// As [`WriteBehind::flush`].
    pub fn flush_timeout(&self, timeout: Duration) -> Result<()> {
        self.shared.flush_timeout(timeout)
    }

    /// The queue's figures: depth, batches, latencies, retries.
    pub fn stats_snapshot(&self) -> WriteBehindStats {
        let (queue_depth, pending_ids) = {
            let st = self.shared.state();
            (st.queued as u64, st.overlay.len() as u64)
        };
        let c = &self.shared.counters;
        WriteBehindStats {
            queue_depth,
            pending_ids,
            batches_sent: c.batches.load(Ordering::Relaxed),
            items_sent: c.items.load(Ordering::Relaxed),
            last_batch_items: c.last_batch_items.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            failed_writes: c.failed.load(Ordering::Relaxed),
            last_flush_latency: Duration::from_nanos(c.last_latency_ns.load(Ordering::Relaxed)),
            total_flush_latency: Duration::from_nanos(c.total_latency_ns.load(Ordering::Relaxed)),
        }
    }

    /// Sends everything queued and stops the flusher thread. The final flush has a deadline of
    /// [`WriteBehindConfig::flush_timeout`]. Dropping the store does the same, but can only log
    /// the outcome.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when writes were still unsent at the deadline (handed to the
    /// [`UnsentSink`], or lost and counted in the error log). Also [`Error::WritesRefused`] for
    /// refused writes that no flush reported yet, whichever thread queued them.
    pub fn close(mut self) -> Result<()> {
        let stopped = self.flusher.stop();
        let refused = self.shared.take_refused(&mut self.shared.state(), None);
        stopped.and(refused)
    }

    /// Closes the store as [`WriteBehind::close`] does (logging a failure), and returns the inner
    /// store.
    pub fn into_inner(self) -> S {
        let WriteBehind {
            shared,
            mut flusher,
        } = self;
        if let Err(e) = flusher
            .stop()
            .and_then(|()| shared.take_refused(&mut shared.state(), None))
        {
            log::error!("write-behind: closed with an error: {e}");
        }
        drop(flusher);
        match Arc::try_unwrap(shared) {
            Ok(shared) => shared.inner,
            // The flusher thread was joined and it held the only other reference.
            Err(_) => unreachable!("the write-behind flusher still holds the store after join"),
        }
    }
}

#[deny(clippy::missing_trait_methods)]
impl<S: KvStore + 'static> KvStore for WriteBehind<S> {
    fn namespace(&self) -> &str {
        self.shared.namespace()
    }

    /// The inner store's ids, plus the ids of queued upserts, minus the ids of queued deletes.
    fn all_keys(&self) -> Result<Vec<String>> {
        // Read the overlay before the inner store. A write acknowledged during the inner scan
        // might be missed by the scan, but it is in this snapshot.
        let (added, removed): (Vec<String>, HashSet<String>) = {
            let st = self.shared.state();
            let mut added = Vec::new();
            let mut removed = HashSet::new();
            for (id, e) in &st.overlay {
                match e.pending {
                    Pending::Upsert(_) => added.push(id.to_string()),
                    Pending::Delete => {
                        removed.insert(id.to_string());
                    }
                }
            }
            (added, removed)
        };
        let mut keys = self.shared.inner.all_keys()?;
        if added.is_empty() && removed.is_empty() {
            return Ok(keys);
        }
        keys.retain(|k| !removed.contains(k));
        let mut seen: HashSet<String> = keys.iter().cloned().collect();
        for id in added {
            if seen.insert(id.clone()) {
                keys.push(id);
            }
        }
        Ok(keys)
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        validate_id(self.namespace(), id)?;
        let pending = {
            let st = self.shared.state();
            st.overlay.get(id).map(|e| e.pending.clone())
        };
        match pending {
            Some(Pending::Upsert(v)) => Ok(Some(Value::clone(&v))),
            Some(Pending::Delete) => Ok(None),
            // No pending write: the inner store already holds the newest value.
            None => self.shared.inner.get_by_id(id),
        }
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        validate_ids(self.namespace(), ids)?;
        let Some(found) = self.shared.lookup(ids) else {
            return self.shared.inner.get_by_ids(ids, fields);
        };
        let misses: Vec<String> = ids
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let mut fetched = if misses.is_empty() {
            Vec::new()
        } else {
            self.shared.inner.get_by_ids(&misses, fields)?
        }
        .into_iter();
        found
            .into_iter()
            .map(|f| match f {
                Some(Pending::Upsert(v)) => Ok(Some(project(Value::clone(&v), fields))),
                Some(Pending::Delete) => Ok(None),
                None => fetched.next().ok_or_else(|| Error::Unavailable {
                    namespace: self.namespace().to_string(),
                    reason: "the inner store returned fewer values than ids asked".into(),
                }),
            })
            .collect()
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        validate_ids(self.namespace(), ids)?;
        let Some(found) = self.shared.lookup(ids) else {
            return self.shared.inner.filter_keys(ids);
        };
        let misses: Vec<String> = ids
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let missing: HashSet<String> = if misses.is_empty() {
            HashSet::new()
        } else {
            self.shared
                .inner
                .filter_keys(&misses)?
                .into_iter()
                .collect()
        };
        Ok(missing_in_order(ids, |i| match &found[i] {
            Some(Pending::Upsert(_)) => true,
            Some(Pending::Delete) => false,
            None => !missing.contains(&ids[i]),
        }))
    }

    /// Queues the items and returns; they are visible to reads at once.
    ///
    /// # Errors
    /// An invalid id (nothing is queued). [`Error::Unavailable`] when the queue stayed full for
    /// [`WriteBehindConfig::enqueue_timeout`] (nothing is queued), or the flusher has stopped.
    /// Errors from the backend come later, from [`WriteBehind::flush`].
    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        validate_ids(self.namespace(), items.iter().map(|(id, _)| id))?;
        if items.is_empty() {
            return Ok(());
        }
        self.shared.enqueue(
            items
                .into_iter()
                .map(|(id, v)| (id, Some(Arc::new(v))))
                .collect(),
        )
    }

    /// Copies the items and queues them as [`WriteBehind::upsert`](#method.upsert) does: the
    /// queue must own what it keeps.
    ///
    /// # Errors
    /// As [`WriteBehind::upsert`](#method.upsert).
    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        self.upsert(
            items
                .iter()
                .map(|(id, v)| ((*id).to_string(), (*v).clone()))
                .collect(),
        )
    }

    /// Queues the deletes and returns; reads see the ids as gone at once.
    ///
    /// # Errors
    /// As [`WriteBehind::upsert`](#method.upsert).
    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        validate_ids(self.namespace(), ids)?;
        if ids.is_empty() {
            return Ok(());
        }
        self.shared
            .enqueue(ids.iter().map(|id| (id.clone(), None)).collect())
    }

    /// Flushes, then clears the inner store, so no write queued before the call resurfaces.
    fn clear(&self) -> Result<()> {
        self.flush()?;
        self.shared.inner.clear()
    }

    fn index_start_callback(&self) -> Result<()> {
        self.shared.inner.index_start_callback()
    }

    /// Flushes, then runs the inner store's checkpoint.
    fn index_done_callback(&self) -> Result<()> {
        // The checkpoint runs even when the flush reports an error (e.g. a write the backend
        // refused): the writes that did go through are made durable all the same, and the
        // flush's error is the one returned.
        let flushed = self.flush();
        let checkpoint = self.shared.inner.index_done_callback();
        flushed.and(checkpoint)
    }

    /// Flushes, then returns the inner store's figures. Flushing first makes the counts exact.
    /// Adjusting them by the overlay instead would need to know which queued upserts replace
    /// an existing id, which costs a lookup per pending id.
    fn stats(&self) -> Result<NamespaceStats> {
        self.flush()?;
        self.shared.inner.stats()
    }

    /// [`WriteBehind::flush`] (every write accepted before the call is acknowledged by the
    /// inner store), then the inner store's flush.
    fn flush(&self) -> Result<()> {
        WriteBehind::flush(self)?;
        self.shared.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn off_unless_enabled() {
        assert_eq!(WriteBehindConfig::from_vars(&vars(&[])).unwrap(), None);
        for off in ["false", "0", "no", "NO", " "] {
            let v = vars(&[(ENV_ENABLED, off), (ENV_BATCH, "10")]);
            assert_eq!(WriteBehindConfig::from_vars(&v).unwrap(), None, "{off:?}");
        }
        for on in ["true", "1", "yes", "TRUE"] {
            let c = WriteBehindConfig::from_vars(&vars(&[(ENV_ENABLED, on)]))
                .unwrap()
                .unwrap();
            assert_eq!(c, WriteBehindConfig::default(), "{on}");
        }
    }

    #[test]
    fn every_variable_is_read() {
        let c = WriteBehindConfig::from_vars(&vars(&[
            (ENV_ENABLED, "yes"),
            (ENV_BATCH, "64"),
            (ENV_BATCH_BYTES, "1048576"),
            (ENV_DELAY_MS, "0"),
            (ENV_CAPACITY, "100"),
            (ENV_CAPACITY_BYTES, "1000000"),
            (ENV_ENQUEUE_TIMEOUT_MS, "250"),
            (ENV_FLUSH_TIMEOUT_MS, "1500"),
            (ENV_IN_FLIGHT, "3"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            c,
            WriteBehindConfig {
                batch_items: 64,
                batch_bytes: 1 << 20,
                max_delay: Duration::ZERO,
                capacity: 100,
                capacity_bytes: 1_000_000,
                enqueue_timeout: Duration::from_millis(250),
                flush_timeout: Duration::from_millis(1500),
                in_flight: 3,
            }
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v, needle) in [
            (ENV_ENABLED, "maybe", "yes/no"),
            (ENV_BATCH, "0", "from 1"),
            (ENV_BATCH, "-3", "an integer"),
            (ENV_BATCH_BYTES, "4MB", "an integer"),
            (ENV_DELAY_MS, "1.5", "an integer"),
            (ENV_CAPACITY, "0", "from 1"),
            (ENV_CAPACITY_BYTES, "0", "from 1"),
            (ENV_CAPACITY_BYTES, "256MiB", "an integer"),
            (ENV_ENQUEUE_TIMEOUT_MS, "x", "an integer"),
            (ENV_FLUSH_TIMEOUT_MS, "0", "from 1"),
            (ENV_IN_FLIGHT, "0", "from 1"),
            (ENV_IN_FLIGHT, "65", "to 64"),
        ] {
            // Checked even when write-behind is off.
            for enabled in ["true", "false"] {
                let e = WriteBehindConfig::from_vars(&vars(&[(ENV_ENABLED, enabled), (k, v)]));
                if k == ENV_ENABLED && enabled == "false" {
                    continue;
                }
                let e = e.unwrap_err();
                assert!(matches!(e, Error::Config { .. }), "{e:?}");
                let text = e.to_string();
                assert!(text.contains(k) && text.contains(needle), "{k}={v}: {text}");
            }
        }
        let e = WriteBehindConfig::builder()
            .capacity(0)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains(ENV_CAPACITY), "{e}");
        let e = WriteBehindConfig::builder()
            .capacity_bytes(0)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains(ENV_CAPACITY_BYTES), "{e}");
    }

    #[test]
    fn json_size_is_close() {
        let v = serde_json::json!({"content": "x".repeat(2000), "tokens": 12, "tags": ["a", "b"], "ok": true, "n": null});
        let real = serde_json::to_vec(&v).unwrap().len();
        let est = json_size(&v);
        assert!(
            est >= real * 9 / 10 && est <= real * 11 / 10,
            "{est} vs {real}"
        );
    }

    #[test]
    fn backoff_is_capped() {
        for a in 0..40 {
            assert!(backoff(a) <= Duration::from_secs(1));
        }
        assert!(backoff(0) <= Duration::from_millis(10));
    }
}
