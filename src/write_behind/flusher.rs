//! The flusher thread: cuts the queue into batches, dispatches them to the senders, and
//! acknowledges outcomes in dispatch order.

use super::*;

/// What the flusher waits for when it has nothing to dispatch.
pub(super) enum Event {
    Msg(Msg),
    Done(Done),
    /// The oldest queued write is due.
    Wake,
    /// The channel closed (it cannot while `Shared` holds its sender): as a shutdown.
    Closed,
}

pub(super) struct Flusher<S: KvStore> {
    pub(super) shared: Arc<Shared<S>>,
    pub(super) rx: Receiver<Msg>,
    /// Writes taken from the channel, not yet dispatched. At most one batch plus one call.
    pub(super) backlog: VecDeque<Op>,
    pub(super) backlog_bytes: usize,
    /// Writes taken from the channel not yet subtracted from `State::queued`: subtracted once
    /// per batch (or before waiting), so the flusher takes the lock once per batch, not per call.
    pub(super) untracked: usize,
    /// Their bytes, not yet subtracted from `State::queued_bytes`.
    pub(super) untracked_bytes: usize,
    /// A `Flush` message arrived: no lingering until the backlog is empty.
    pub(super) flush_requested: bool,
    /// The `Shutdown` message arrived (or the channel closed): nothing follows it.
    pub(super) shutting_down: bool,
    /// Batches handed to the senders, in dispatch order (numbers `first_in_flight..`), each
    /// with its outcome once reported. Acknowledged from the front only, so acknowledgements
    /// follow queue order even when a later batch finishes first.
    pub(super) in_flight: VecDeque<Option<Done>>,
    pub(super) first_in_flight: u64,
    /// id → (number of the batch writing it, index there), for batches not yet reported. It
    /// keeps batches in flight disjoint and marks repeated ids within a batch; a hash map
    /// operation per write to place it and one to release it.
    pub(super) busy: HashMap<Arc<str>, (u64, usize)>,
    /// A batch gave up at the shutdown deadline: nothing more is dispatched.
    pub(super) gave_up: bool,
    pub(super) done: Receiver<Done>,
    /// Declared last: dropped (joined) after everything above.
    pub(super) senders: Senders,
}

impl<S: KvStore + 'static> Flusher<S> {
    pub(super) fn new(shared: Arc<Shared<S>>, rx: Receiver<Msg>) -> Flusher<S> {
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
    pub(super) fn run(mut self) -> Result<()> {
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
    pub(super) fn wait(&self, until: Option<Instant>) -> Event {
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

    pub(super) fn take(&mut self, msg: Msg) {
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
    pub(super) fn takes_writes(&self) -> bool {
        self.in_flight.len() < self.shared.config.in_flight && !self.full()
    }

    pub(super) fn full(&self) -> bool {
        let c = &self.shared.config;
        self.backlog.len() >= c.batch_items || self.backlog_bytes >= c.batch_bytes
    }

    /// Takes the next batch off the front of the backlog: at least one write, and none whose
    /// id a batch in flight writes. Repeated ids inside it are marked superseded but the last.
    pub(super) fn next_batch(&mut self) -> Vec<Op> {
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

    pub(super) fn dispatch(&mut self, batch: Vec<Op>) {
        let number = self.first_in_flight + self.in_flight.len() as u64;
        self.in_flight.push_back(None);
        self.senders.send(Job { number, batch });
    }

    /// Records a sender's report, frees its ids, and acknowledges the batches at the front
    /// that are done, in order.
    pub(super) fn complete(&mut self, done: Done) {
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
    pub(super) fn release(&mut self) {
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
    /// everything not sent is parked in the inner store ([`KvStore::park`]), or is
    /// counted in the error log. Returns the error
    /// `close` reports.
    pub(super) fn give_up(mut self) -> Result<()> {
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
        // Through the layer below, never around it: a store that can keep writes while the
        // backend is unreachable (the fallback's journal) takes them; others refuse.
        let reason = match self.shared.inner.park(writes) {
            Ok(()) => {
                log::warn!(
                    "write-behind: {n} writes of namespace {namespace:?} could not be sent \
                     within {timeout:?} at shutdown (last error: {last_error}); parked in the \
                     store below, which keeps them"
                );
                format!("{n} writes were parked in the store below instead")
            }
            Err(e) => {
                log::error!(
                    "write-behind: {n} accepted writes of namespace {namespace:?} are LOST: not \
                     sent within {timeout:?} at shutdown (last error: {last_error}), and the \
                     store below could not keep them: {e}"
                );
                format!("{n} writes are lost (the store below could not keep them: {e})")
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
pub(super) struct FlusherGuard {
    pub(super) handle: Option<JoinHandle<Result<()>>>,
    pub(super) tx: Sender<Msg>,
    pub(super) shutdown: Arc<Shutdown>,
    pub(super) timeout: Duration,
    pub(super) namespace: String,
}

impl FlusherGuard {
    /// Requests shutdown and waits for the thread: the queue is sent, or handed off after the
    /// deadline. A send in progress when the deadline passes finishes first (the backend's own
    /// timeouts bound it).
    pub(super) fn stop(&mut self) -> Result<()> {
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

pub(super) fn far_future() -> Instant {
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
