//! [`WriteBehind`]: the `KvStore` wrapper and its public methods.

use super::*;

// ---------------------------------------------------------------------------------------------
// The wrapper

/// A [`KvStore`] wrapper that queues `upsert` and `delete_by_ids` and sends them in batches
/// from a background thread. Reads see the queued writes. See the [module docs](crate::write_behind) for
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
    /// Wraps `inner` and starts the flusher thread. Writes still unsent when the final flush at
    /// close or drop reaches its deadline are handed to `inner`'s [`KvStore::park`] (the
    /// fallback keeps them in its journal; other stores refuse them, and they are counted in
    /// the error log).
    ///
    /// # Panics
    /// When the operating system cannot start a thread.
    pub fn new(inner: S, config: WriteBehindConfig) -> WriteBehind<S> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shutdown = Arc::new(Shutdown::default());
        let timeout = config.flush_timeout;
        let shared = Arc::new(Shared {
            inner,
            config,
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
        let (queue_depth, unsent, pending_ids) = {
            let st = self.shared.state();
            (
                st.queued as u64,
                st.last_seq - st.acked_seq,
                st.overlay.len() as u64,
            )
        };
        let c = &self.shared.counters;
        WriteBehindStats {
            queue_depth,
            unsent,
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
    /// [`Error::Unavailable`] when writes were still unsent at the deadline (kept by the inner
    /// store's [`KvStore::park`], or lost and counted in the error log). Also [`Error::WritesRefused`] for
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

    /// Queues the writes behind those already queued, as `upsert` and `delete_by_ids` would:
    /// handing them straight to the inner store would put them before older writes of the same
    /// ids. They are then sent, or parked in the inner store at close, in order.
    ///
    /// # Errors
    /// As [`WriteBehind::upsert`](#method.upsert).
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        let writes: Vec<(String, Option<Arc<Value>>)> = writes
            .into_iter()
            .map(|w| match w {
                UnsentWrite::Upsert { id, value } => (id, Some(Arc::new(value))),
                UnsentWrite::Delete { id } => (id, None),
            })
            .collect();
        validate_ids(self.namespace(), writes.iter().map(|(id, _)| id))?;
        if writes.is_empty() {
            return Ok(());
        }
        self.shared.enqueue(writes)
    }

    /// The inner store's pages, less the ids of queued deletes and upserts, then the ids of
    /// queued upserts: memory is bounded by a page and by the queue, not by the namespace.
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        // Read the overlay before the inner store, as `all_keys` does. The queued upserts are
        // taken out of the inner pages and handed over once at the end, so that an id both
        // queued and stored is not listed twice for that reason.
        let (added, pending): (Vec<String>, HashSet<String>) = {
            let st = self.shared.state();
            let mut added = Vec::new();
            let mut pending = HashSet::with_capacity(st.overlay.len());
            for (id, e) in &st.overlay {
                if let Pending::Upsert(_) = e.pending {
                    added.push(id.to_string());
                }
                pending.insert(id.to_string());
            }
            (added, pending)
        };
        if pending.is_empty() {
            return self.shared.inner.scan_keys(page);
        }
        self.shared.inner.scan_keys(&mut |mut ids| {
            ids.retain(|id| !pending.contains(id));
            if ids.is_empty() {
                return Ok(());
            }
            page(ids)
        })?;
        for chunk in added.chunks(crate::store::KEY_PAGE) {
            page(chunk.to_vec())?;
        }
        Ok(())
    }

    /// Queued upserts are handed over as the values they are; the other ids are read from
    /// the inner store, in its form.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        validate_ids(self.namespace(), ids)?;
        let Some(found) = self.shared.lookup(ids) else {
            return self.shared.inner.get_json_by_ids(ids, visit);
        };
        let mut misses: Vec<String> = Vec::new();
        let mut miss_index: Vec<usize> = Vec::new();
        for (i, f) in found.into_iter().enumerate() {
            match f {
                Some(Pending::Upsert(v)) => visit(i, Stored::Value(&v))?,
                Some(Pending::Delete) => {}
                None => {
                    misses.push(ids[i].clone());
                    miss_index.push(i);
                }
            }
        }
        if misses.is_empty() {
            return Ok(());
        }
        self.shared
            .inner
            .get_json_by_ids(&misses, &mut |j, stored| {
                let i = *miss_index.get(j).ok_or_else(|| Error::Unavailable {
                    namespace: self.namespace().to_string(),
                    reason: "the inner store answered for an id not asked".into(),
                })?;
                visit(i, stored)
            })
    }

    /// Parses the text and queues the values as [`WriteBehind::upsert`](#method.upsert) does:
    /// the queue keeps values, which readers see at once.
    ///
    /// # Errors
    /// As [`WriteBehind::upsert`](#method.upsert).
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        self.upsert(parse_items(self.namespace(), items)?)
    }
}
