//! Sender threads: each sends one batch to the inner store, submitting it again after a
//! retryable failure at most once per [`crate::retry::RESUBMIT_INTERVAL`].

use super::*;

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
pub(super) enum Stop {
    /// The shutdown deadline passed while the backend kept failing.
    GaveUp,
    /// A non-retryable error.
    Refused(Error),
}

/// Marks the flusher dead when the thread ends, normally or by a panic, and wakes everyone
/// who waits for it.
pub(super) struct AliveGuard<S: KvStore> {
    pub(super) shared: Arc<Shared<S>>,
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
pub(super) struct Job {
    pub(super) number: u64,
    pub(super) batch: Vec<Op>,
}

/// What a sender thread reports for one batch.
pub(super) enum Outcome {
    /// In the inner store, except the writes it refused (dropped, counted and recorded).
    Sent,
    /// The shutdown deadline passed while the backend kept failing: nothing of it counts as sent.
    GaveUp,
    /// The inner store panicked; the flusher re-raises it, as if it had sent the batch itself.
    Panicked(Box<dyn Any + Send>),
}

pub(super) struct Done {
    pub(super) number: u64,
    pub(super) batch: Vec<Op>,
    pub(super) outcome: Outcome,
}

/// Owns the sender threads. Dropping it closes their job channel, so each one exits after its
/// current batch, and joins them. The flusher drops it once no batch is in flight, except while
/// a panic unwinds: then a sender may be retrying a dead backend, so the shutdown deadline is
/// set to now first (the queued writes are lost anyway, as the flusher's panic says). Joining
/// them even then keeps [`WriteBehind::into_inner`]'s promise that the flusher's end leaves
/// no other owner of the inner store.
pub(super) struct Senders {
    pub(super) jobs: Option<Sender<Job>>,
    pub(super) handles: Vec<JoinHandle<()>>,
    pub(super) shutdown: Arc<Shutdown>,
}

impl Senders {
    pub(super) fn start<S: KvStore + 'static>(
        shared: &Arc<Shared<S>>,
        done: &Sender<Done>,
    ) -> Senders {
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

    pub(super) fn send(&self, job: Job) {
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
pub(super) fn send_jobs<S: KvStore>(shared: &Shared<S>, jobs: &Receiver<Job>, done: &Sender<Done>) {
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
    pub(super) fn send(&self, batch: &[Op]) -> Result<(), Stop> {
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
    pub(super) fn send_upserts(&self, items: &[&Op], oom_retries: u32) -> Result<u64, Stop> {
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
    pub(super) fn send_deletes(&self, ops: &[&Op], oom_retries: u32) -> Result<u64, Stop> {
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
    pub(super) fn with_retries(
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

    pub(super) fn record_refusal(&self, e: Error, op: &Op) {
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
    pub(super) fn acknowledge(&self, batch: &[Op]) {
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
