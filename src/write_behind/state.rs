//! The queue's shared state: the overlay readers see, the FIFO of pending writes, the
//! counters, the shutdown signal, and enqueueing with backpressure.

use super::*;

// ---------------------------------------------------------------------------------------------
// Internals

/// The newest accepted write of an id, as readers see it until the backend acknowledges it.
#[derive(Clone)]
pub(super) enum Pending {
    /// `Arc`: the same value sits in the queue and in the overlay, and a reader clones it
    /// outside the lock.
    Upsert(Arc<Value>),
    Delete,
}

pub(super) struct Entry {
    pub(super) seq: u64,
    pub(super) pending: Pending,
}

thread_local! {
    /// Lives as long as its thread; the queue keeps weak references to it. A refusal whose
    /// writer has ended is reported by any thread's next flush, so it is not lost with the
    /// thread (workers of a pool that ends before the main thread's `index_done_callback`).
    static WRITER_TOKEN: Arc<()> = Arc::new(());
}

/// The calling thread's token; a dead one while the thread is being torn down.
pub(super) fn writer_token() -> Weak<()> {
    WRITER_TOKEN.try_with(Arc::downgrade).unwrap_or_default()
}

/// Refused writes of one thread since its last report.
pub(super) struct Refusal {
    /// See [`Op::writer_alive`].
    pub(super) writer_alive: Weak<()>,
    /// The backend's error for the first of them.
    pub(super) first: Error,
    pub(super) count: u64,
    /// The ids of the first [`REFUSED_IDS_KEPT`].
    pub(super) ids: Vec<String>,
}

/// How many refused ids an error names: enough to find the writes, not a copy of a whole
/// batch's ids.
pub(super) const REFUSED_IDS_KEPT: usize = 5;

/// How many times a write answered `OOM` is retried before it is dropped as refused: memory
/// can come back (keys expire, another client deletes), but a server full of keys it may not
/// evict stays full, and the queue must not stall on it until the flush deadline. With the
/// backoff this is about 1 to 2.5 s.
pub(super) const OOM_RETRIES: u32 = 8;

/// One queued write.
pub(super) struct Op {
    /// Position in the queue: increasing in queue order.
    pub(super) seq: u64,
    /// Shared with the overlay's key and the flusher's map of ids in flight: one copy of the
    /// id per write, the others are reference counts.
    pub(super) id: Arc<str>,
    /// `None` for a delete.
    pub(super) value: Option<Arc<Value>>,
    /// Estimated JSON bytes, for the batch and queue byte limits.
    pub(super) bytes: usize,
    /// The thread that queued it: a refusal is reported to that thread's next flush.
    pub(super) writer: ThreadId,
    /// Dead once that thread has ended: its refusals then go to any thread's next flush.
    pub(super) writer_alive: Weak<()>,
    /// When the call was accepted, for the age limit.
    pub(super) at: Instant,
    /// A later write of the same id is in the same batch, so this one is not sent. Set when the
    /// batch is cut.
    pub(super) superseded: bool,
}

pub(super) enum Msg {
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
pub(super) struct State {
    /// id → newest accepted write not yet acknowledged by the inner store.
    pub(super) overlay: HashMap<Arc<str>, Entry>,
    /// The last sequence number handed out.
    pub(super) last_seq: u64,
    /// Every write with a sequence number up to this one has been acknowledged (or dropped after
    /// a refusal, or handed off at shutdown). Writes are acknowledged in queue order.
    pub(super) acked_seq: u64,
    /// Writes accepted and not yet taken by the flusher: the quantity `capacity` bounds.
    pub(super) queued: usize,
    /// Their estimated bytes: the quantity `capacity_bytes` bounds.
    pub(super) queued_bytes: usize,
    /// Writes the backend refused (non-retryable errors), not yet reported, per writing thread:
    /// each thread's next flush reports its own, and no other thread's. A thread that never
    /// flushes again leaves them to `close` (they are logged at once in any case).
    pub(super) refused: HashMap<ThreadId, Refusal>,
    /// The latest retryable error while the flusher is stuck on a batch; cleared when a batch
    /// gets through. A flush that times out returns it.
    pub(super) last_error: Option<Error>,
    /// False once the flusher thread has exited (after shutdown, or after a panic).
    pub(super) flusher_alive: bool,
}

/// Counters read by `stats_snapshot`. Atomics, so reading them never blocks the flusher.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) batches: AtomicU64,
    pub(super) items: AtomicU64,
    pub(super) last_batch_items: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) last_latency_ns: AtomicU64,
    pub(super) total_latency_ns: AtomicU64,
}

/// The shutdown signal: the deadline of the final flush, and a condvar that cuts the flusher's
/// retry pauses short. Separate from `State` so a retry pause never holds the main lock.
#[derive(Default)]
pub(super) struct Shutdown {
    pub(super) deadline: Mutex<Option<Instant>>,
    pub(super) wake: Condvar,
}

impl Shutdown {
    pub(super) fn request(&self, deadline: Instant) {
        *lock(&self.deadline) = Some(deadline);
        self.wake.notify_all();
    }

    /// Sleeps `pause`, or less if the shutdown deadline comes first. Returns false when the
    /// deadline has passed.
    pub(super) fn pause(&self, pause: Duration) -> bool {
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

pub(super) struct Shared<S> {
    pub(super) inner: S,
    pub(super) config: WriteBehindConfig,
    pub(super) state: Mutex<State>,
    /// Signalled when the flusher takes writes from the queue, or exits.
    pub(super) not_full: Condvar,
    /// Signalled when `acked_seq` moves, or the flusher exits.
    pub(super) acked: Condvar,
    /// Unbounded on purpose: the bound is `capacity` in *items*, enforced under `state`. A call of
    /// n items must be taken whole or not at all, which a channel bounded in messages cannot
    /// express. Sends happen under `state`, so they never race, and the channel order is the
    /// sequence order.
    pub(super) tx: Sender<Msg>,
    pub(super) shutdown: Arc<Shutdown>,
    pub(super) counters: Counters,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves these structures half-updated in a way that matters more
    // than losing the whole store would: keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S: KvStore> Shared<S> {
    pub(super) fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn stopped_error(&self) -> Error {
        Error::Unavailable {
            namespace: self.namespace().to_string(),
            reason: "the write-behind flusher thread has stopped (see the error log); \
                     writes can no longer be queued"
                .into(),
        }
    }

    /// Queues one call's writes: all of them or, on timeout, none.
    pub(super) fn enqueue(&self, writes: Vec<(String, Option<Arc<Value>>)>) -> Result<()> {
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
    pub(super) fn lookup(&self, ids: &[String]) -> Option<Vec<Option<Pending>>> {
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

    pub(super) fn flush_timeout(&self, timeout: Duration) -> Result<()> {
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
    pub(super) fn take_refused(&self, st: &mut State, writer: Option<ThreadId>) -> Result<()> {
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
pub(super) fn json_size(v: &Value) -> usize {
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
pub(super) fn backoff(attempt: u32) -> Duration {
    let cap_ms = (10u64 << attempt.min(7)).min(1000);
    // RandomState is seeded randomly per instance: enough jitter without a rand dependency.
    let r = RandomState::new().build_hasher().finish();
    Duration::from_millis(cap_ms / 2 + r % (cap_ms / 2 + 1))
}
