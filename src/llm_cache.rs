//! A shared LLM response cache with single-flight: each distinct prompt is paid for once.
//!
//! [`LlmCache`] keeps answers in the `llm_response_cache` namespace exactly as nano-graphrag
//! does: the id is [`compute_args_hash`]`(model, messages)` (the md5 of Python's
//! `str((model, messages))`) and the value `{"return": answer, "model": model}`, so Rust and
//! Python workers read each other's entries.
//!
//! [`LlmCache::get_or_compute`] adds single-flight on a miss:
//!
//! - **Threads** of one process that miss the same key at the same time: exactly one (the
//!   leader) calls the LLM; the others block until its answer is stored and return it. If the
//!   leader fails (or panics), one of the waiters becomes the leader and calls the LLM itself.
//! - **Processes** sharing a Redis backend: before calling the LLM, the leader takes a Redis lock
//!   (`SET {lock key} {token} NX PX {ttl}`, with a random owner token). A process that finds the
//!   lock taken polls the cache key and the lock every [`LlmCache::poll_interval`] until the
//!   answer appears or the lock is free. The holder renews the lock while the LLM works and
//!   releases it (only if it still owns it, by a compare-and-delete script) after storing the
//!   answer, or after failing. A holder that dies stops renewing: its lock expires after the TTL
//!   and a waiter takes over.
//! - **The answer is in Redis before the lock is released.** The holder stores it, then calls
//!   [`KvStore::flush`] on the store: every layer forwards it, and a write-behind queue
//!   (`KV_WRITE_BEHIND`) first waits until the answer is sent. Otherwise the answer could still
//!   sit in this process's queue when the lock is released, and the next process to take the
//!   lock would miss it in Redis and pay the LLM again.
//!
//! Lock keys are `{prefix}::lock:{namespace}:{hash}`. A namespace can never be empty, so no
//! namespace's keys (`{prefix}:{namespace}:*`) include them: `all_keys`, `clear`, `stats`,
//! export and migration never see a lock, and `list_namespaces` skips them.
//!
//! The lock is the one the stack offers ([`Storage::locks`]), taken through the storage's own
//! pool, so the cache works the same over every stack (write-behind, fallback, metrics, TLS,
//! cluster). On the JSON backend the locks are in-process: a JSON working directory has one
//! writing process at a time anyway (its directory lock).
//!
//! # During a Redis outage
//!
//! With the fallback journal (`KV_FALLBACK=json`; [`LlmCache::open`] picks it up), an outage
//! does not fail [`LlmCache::get_or_compute`]: the cache degrades to in-process single-flight
//! and logs a warning once per outage. Each prompt is computed once per process: the answer
//! goes to the journal, which answers this process's later calls. Other processes cannot see
//! the journal, nor take the lock, so during the outage each process may pay once for the same
//! prompt, and an answer that is in Redis but not in this process's journal is computed again
//! (an LLM call, never a wrong answer). When Redis answers again, the journals are replayed
//! (the last replay wins, every replayed answer is a valid one) and single-flight across
//! processes resumes. While the fallback is offline the lock is not even tried, so an outage
//! costs no connection timeout per prompt.
//!
//! Without the fallback, an outage fails `get_or_compute` with the backend's error.
//!
//! # With a rate limit
//!
//! Pass a [`crate::rate_limit::RateLimitedLlm`] to [`LlmCache::complete`] (or call it in the
//! `f` of [`LlmCache::get_or_compute`]): the limiter then sits inside the cache, so a hit never
//! waits for budget and only the one caller that computes a prompt spends it, however many
//! threads and processes asked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::fallback::Fallback;
use crate::llm::LlmClient;
use crate::llm_hash::{compute_args_hash, Message};
use crate::storage::{Locks, Storage};
use crate::store::{KvStore, LLM_RESPONSE_CACHE};

/// Counters of [`LlmCache::get_or_compute`] calls, as returned by [`LlmCache::stats`].
///
/// Every successful call counts once, as a hit, a miss or a wait; a failed call counts as a miss
/// when it called the LLM, else not at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LlmCacheStats {
    /// Answered from the cache without waiting for anyone.
    pub hits: u64,
    /// Called the LLM (the computing function), whether it succeeded or not.
    pub misses: u64,
    /// Answered by waiting for another thread or process that was computing the same prompt.
    pub waits: u64,
}

/// Answers of the `llm_response_cache` namespace, keyed as nano-graphrag keys them, with
/// single-flight across threads (and across processes on Redis). See the [module
/// docs](self).
///
/// Share one `LlmCache` between all worker threads of a process (`&self` everywhere; wrap it in
/// an `Arc`): single-flight between threads works within one `LlmCache`.
///
/// # Examples
///
/// ```
/// use graphrag_kv::llm::{LlmClient, LocalLlm};
/// use graphrag_kv::llm_cache::LlmCache;
/// use graphrag_kv::llm_hash::Message;
/// use graphrag_kv::{Storage, StoreConfig};
///
/// # fn main() -> graphrag_kv::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let storage = Storage::open(&StoreConfig::builder().working_dir(dir.path()).build()?)?;
/// let cache = LlmCache::open(&storage)?; // with the Redis lock when the backend is Redis
/// let llm = LocalLlm::new();
/// let prompt = [Message::new("user", "Summarise: the tide comes in twice a day.")];
///
/// let first = cache.get_or_compute("gpt-4o-mini", &prompt, || llm.complete("gpt-4o-mini", &prompt))?;
/// let again = cache.get_or_compute("gpt-4o-mini", &prompt, || unreachable!("cached"))?;
/// assert_eq!(first, again);
/// assert_eq!((cache.stats().misses, cache.stats().hits), (1, 1));
/// assert_eq!(llm.calls(), 1);
/// # Ok(())
/// # }
/// ```
pub struct LlmCache {
    store: Arc<dyn KvStore>,
    /// The lock the stack offers (see [`Storage::locks`]); `None` for a cache built with
    /// [`LlmCache::new`] alone (in-process single-flight only).
    lock: Option<CacheLock>,
    /// The fallback under the store, if any: while it is offline (or when Redis fails with a
    /// connection error or timeout), `get_or_compute` degrades to in-process single-flight
    /// instead of failing, since the store still takes the answers.
    fallback: Option<Arc<Fallback>>,
    /// True from the first degradation of an outage to the next lock taken: the warning is
    /// logged once per outage, not once per prompt.
    degraded: AtomicBool,
    /// Computations in progress in this process, by cache key. A `std::sync::Mutex` held only
    /// to look up or insert an entry (never across the LLM call): contention is one map
    /// operation per miss, negligible next to an LLM call.
    flights: Mutex<HashMap<String, Arc<Flight>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    waits: AtomicU64,
}

impl std::fmt::Debug for LlmCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmCache")
            .field("namespace", &self.store.namespace())
            .field("locks", &self.lock.as_ref().map(|l| &l.locks))
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl LlmCache {
    /// Default lock TTL: 30 s. The holder renews its lock every third of the TTL while the LLM
    /// works, so this bounds only how long waiters wait for a holder that died.
    pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);
    /// Default pause between two polls of a process waiting for another process: 20 ms.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(20);

    /// A cache over `store` (normally the `llm_response_cache` namespace) with in-process
    /// single-flight only. Add [`LlmCache::with_locks`] for processes sharing a store, or use
    /// [`LlmCache::open`], which does both.
    pub fn new(store: Arc<dyn KvStore>) -> LlmCache {
        LlmCache {
            store,
            lock: None,
            fallback: None,
            degraded: AtomicBool::new(false),
            flights: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// The `llm_response_cache` namespace of `storage`, with the locks the storage offers
    /// ([`Storage::locks`]: across processes on Redis, in-process on JSON), and riding out
    /// outages when it has a fallback (`KV_FALLBACK`).
    ///
    /// # Errors
    /// As [`Storage::namespace`].
    pub fn open(storage: &Storage) -> Result<LlmCache> {
        let mut cache =
            LlmCache::new(storage.namespace(LLM_RESPONSE_CACHE)?).with_locks(storage.locks());
        if let Some(fallback) = storage.fallback() {
            cache = cache.with_fallback(fallback.clone());
        }
        Ok(cache)
    }

    /// Declares that the store sits on `fallback` (a [`crate::fallback::FallbackStore`] under
    /// any other wrappers): during a Redis outage, [`LlmCache::get_or_compute`] then degrades
    /// to in-process single-flight with a warning instead of failing. See the [module
    /// docs](self#during-a-redis-outage).
    pub fn with_fallback(mut self, fallback: Arc<Fallback>) -> LlmCache {
        self.fallback = Some(fallback);
        self
    }

    /// Adds single-flight through `locks`, which must be the locks of the storage the store
    /// lives in ([`Storage::locks`]): waiters poll the store for the holder's answer.
    pub fn with_locks(mut self, locks: Arc<dyn Locks>) -> LlmCache {
        self.lock = Some(CacheLock {
            locks,
            ttl: Self::DEFAULT_LOCK_TTL,
            poll: Self::DEFAULT_POLL_INTERVAL,
        });
        self
    }

    /// Sets the TTL of the cross-process lock (no effect without one). Defaults to
    /// [`Self::DEFAULT_LOCK_TTL`]; at least 30 ms.
    pub fn with_lock_ttl(mut self, ttl: Duration) -> LlmCache {
        if let Some(lock) = &mut self.lock {
            lock.ttl = ttl.max(Duration::from_millis(30));
        }
        self
    }

    /// Sets the pause between two polls of a process waiting for another process (no effect
    /// without a cross-process lock). Defaults to [`Self::DEFAULT_POLL_INTERVAL`].
    pub fn with_poll_interval(mut self, poll: Duration) -> LlmCache {
        if let Some(lock) = &mut self.lock {
            lock.poll = poll.max(Duration::from_millis(1));
        }
        self
    }

    /// The lock TTL, or `None` without locks.
    pub fn lock_ttl(&self) -> Option<Duration> {
        self.lock.as_ref().map(|l| l.ttl)
    }

    /// The pause between polls, or `None` without locks.
    pub fn poll_interval(&self) -> Option<Duration> {
        self.lock.as_ref().map(|l| l.poll)
    }

    /// The store answers are kept in.
    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    /// The cache key of a prompt: nano-graphrag's `compute_args_hash(model, messages)`.
    pub fn key(model: &str, messages: &[Message]) -> String {
        compute_args_hash(model, messages)
    }

    /// The key other processes see the lock guarding a prompt under (the Redis key), or
    /// `None` when the locks are in-process only or there are none.
    pub fn lock_key(&self, model: &str, messages: &[Message]) -> Option<String> {
        let lock = self.lock.as_ref()?;
        lock.locks.key(&self.lock_name(&Self::key(model, messages)))
    }

    /// The name of a prompt's lock: `{namespace}:{hash}` (Redis key
    /// `{prefix}::lock:{namespace}:{hash}`).
    fn lock_name(&self, cache_key: &str) -> String {
        format!("{}:{cache_key}", self.store.namespace())
    }

    /// The cached answer to a prompt, if any. Does not touch the counters.
    ///
    /// # Errors
    /// Backend failures; [`Error::Decode`] when the stored value has no string `"return"`.
    pub fn get(&self, model: &str, messages: &[Message]) -> Result<Option<String>> {
        self.get_key(&Self::key(model, messages))
    }

    /// Stores `answer` for a prompt, as `{"return": answer, "model": model}`.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put(&self, model: &str, messages: &[Message], answer: &str) -> Result<()> {
        self.put_key(&Self::key(model, messages), model, answer)
    }

    /// The cached answer to a prompt, or `f`'s answer, stored before it is returned.
    ///
    /// On a miss, callers of the same prompt (threads of this `LlmCache`; processes too with a
    /// Redis lock) are serialised: one calls its `f`, the others wait and return that answer.
    /// A waiter calls its own `f` only when the one computing failed, or (across processes)
    /// when the lock holder's lock expired. `f` runs on the calling thread, with no lock of
    /// this cache held. With a Redis lock, the answer is flushed through the store (write-behind
    /// included) before the lock is released.
    ///
    /// With a fallback ([`LlmCache::with_fallback`]), a Redis outage is not an error: the call
    /// degrades to in-process single-flight (see the [module docs](self#during-a-redis-outage)).
    ///
    /// # Errors
    /// `f`'s error (waiters do not see it: one of them computes instead); backend failures,
    /// including a failure to store `f`'s answer or to flush it to Redis.
    pub fn get_or_compute(
        &self,
        model: &str,
        messages: &[Message],
        f: impl FnOnce() -> Result<String>,
    ) -> Result<String> {
        match self.run(model, messages, Wait::Yes, f)? {
            Some(answer) => Ok(answer),
            None => unreachable!("a call that waits always ends with an answer or an error"),
        }
    }

    /// [`LlmCache::get_or_compute`] without waiting: `Ok(None)` at once when another thread
    /// or process is computing this prompt right now, instead of waiting for its answer.
    ///
    /// A batch job can set such a prompt aside, do other work, and come back to it later
    /// (with `get_or_compute`, by then most likely a hit), so that its workers never sit idle
    /// while there are prompts no one is computing. A `None` is not counted in
    /// [`LlmCache::stats`].
    ///
    /// # Errors
    /// As [`LlmCache::get_or_compute`].
    pub fn try_get_or_compute(
        &self,
        model: &str,
        messages: &[Message],
        f: impl FnOnce() -> Result<String>,
    ) -> Result<Option<String>> {
        self.run(model, messages, Wait::No, f)
    }

    /// [`LlmCache::get_or_compute`] with `llm.complete(model, messages)` as the computation.
    /// With a [`crate::rate_limit::RateLimitedLlm`] as `llm`, only misses wait for budget.
    ///
    /// # Errors
    /// As [`LlmCache::get_or_compute`].
    pub fn complete(
        &self,
        llm: &dyn LlmClient,
        model: &str,
        messages: &[Message],
    ) -> Result<String> {
        self.get_or_compute(model, messages, || llm.complete(model, messages))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LlmCacheStats {
        LlmCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }

    /// Both flavours of `get_or_compute`: `None` only with `Wait::No`.
    fn run(
        &self,
        model: &str,
        messages: &[Message],
        wait: Wait,
        f: impl FnOnce() -> Result<String>,
    ) -> Result<Option<String>> {
        let key = Self::key(model, messages);
        if let Some(answer) = self.lookup(&key)? {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(answer));
        }
        let mut waited = false;
        loop {
            let leader = {
                let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
                match flights.get(&key) {
                    Some(flight) => Err(flight.clone()),
                    None => {
                        let flight = Arc::new(Flight::default());
                        flights.insert(key.clone(), flight.clone());
                        Ok(flight)
                    }
                }
            };
            match leader {
                Err(_) if wait == Wait::No => return Ok(None),
                Err(flight) => {
                    waited = true;
                    if let Some(answer) = flight.wait() {
                        self.waits.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some(answer));
                    }
                    // The leader failed: try to lead.
                }
                Ok(flight) => {
                    // Ends the flight however `lead` returns (or unwinds): waiters are woken
                    // with the answer, or told to take over.
                    let mut guard = FlightGuard {
                        cache: self,
                        key: &key,
                        flight,
                        answer: None,
                    };
                    let result = self.lead(&key, model, waited, wait, f);
                    if let Ok(Some(answer)) = &result {
                        guard.answer = Some(answer.clone());
                    }
                    return result;
                }
            }
        }
    }

    /// The leader's work: re-check the cache, take the cross-process lock if any, compute.
    fn lead(
        &self,
        key: &str,
        model: &str,
        mut waited: bool,
        wait: Wait,
        f: impl FnOnce() -> Result<String>,
    ) -> Result<Option<String>> {
        // A leader that finished just before this one took its place stored its answer first.
        if let Some(answer) = self.lookup(key)? {
            self.count_answered(waited);
            return Ok(Some(answer));
        }
        let Some(lock) = &self.lock else {
            return self.compute(key, model, f).map(Some);
        };
        loop {
            if self.fallback_offline() {
                // Redis is known to be down: the lock cannot be had, and trying would cost a
                // connection timeout per prompt. This thread leads this process's flight.
                self.degrade(&"the fallback journal is taking the writes");
                return self.compute(key, model, f).map(Some);
            }
            let held = match lock.locks.try_lock(&self.lock_name(key), lock.ttl) {
                Ok(held) => held,
                Err(e) if self.rides_out(&e) => {
                    self.degrade(&e);
                    return self.compute(key, model, f).map(Some);
                }
                Err(e) => return Err(e),
            };
            if let Some(held) = held {
                self.recovered();
                // The previous holder may have stored its answer and released the lock between
                // our last look at the cache and our acquisition.
                if let Some(answer) = self.lookup(key)? {
                    drop(held);
                    self.count_answered(waited);
                    return Ok(Some(answer));
                }
                // Flushed before the release: a write-behind queue would otherwise still hold
                // the answer when another process takes the lock and looks in Redis.
                let result = self
                    .compute(key, model, f)
                    .and_then(|answer| self.store.flush().map(|()| answer));
                drop(held); // released after the answer is in Redis: waiters find it
                return result.map(Some);
            }
            if wait == Wait::No {
                return Ok(None);
            }
            waited = true;
            std::thread::sleep(lock.poll);
            if let Some(answer) = self.lookup(key)? {
                self.waits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(answer));
            }
        }
    }

    /// True when `e` is an outage the fallback absorbs: a connection failure or a timeout,
    /// with a fallback under the store.
    fn rides_out(&self, e: &Error) -> bool {
        self.fallback.is_some() && (e.is_connection() || e.is_timeout())
    }

    /// True while the fallback journals the writes because Redis is unreachable.
    fn fallback_offline(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| !f.is_online())
    }

    /// Notes that single-flight is in-process only for now; warns once per outage.
    fn degrade(&self, cause: &dyn std::fmt::Display) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            log::warn!(
                "LLM cache: Redis is unreachable ({cause}); degrading to in-process \
                 single-flight: until Redis answers, other processes may compute the same \
                 prompts (each process at most once per prompt)"
            );
        }
    }

    /// The cross-process lock was taken again after an outage.
    fn recovered(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            log::info!("LLM cache: Redis answers again; single-flight across processes resumes");
        }
    }

    /// `get_key` for `get_or_compute`: with a fallback, an outage reads as a miss
    /// (the prompt is computed, and its answer journaled) rather than failing the call.
    fn lookup(&self, key: &str) -> Result<Option<String>> {
        match self.get_key(key) {
            Err(e) if self.rides_out(&e) => {
                self.degrade(&e);
                Ok(None)
            }
            other => other,
        }
    }

    fn count_answered(&self, waited: bool) {
        let counter = if waited { &self.waits } else { &self.hits };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn compute(
        &self,
        key: &str,
        model: &str,
        f: impl FnOnce() -> Result<String>,
    ) -> Result<String> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        let answer = f()?;
        self.put_key(key, model, &answer)?;
        Ok(answer)
    }

    fn get_key(&self, key: &str) -> Result<Option<String>> {
        let Some(value) = self.store.get_by_id(key)? else {
            return Ok(None);
        };
        match value.get("return") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Decode {
                namespace: self.store.namespace().to_string(),
                key: key.to_string(),
                reason: "an LLM cache entry must be an object with a string \"return\"".into(),
            }),
        }
    }

    fn put_key(&self, key: &str, model: &str, answer: &str) -> Result<()> {
        let value = serde_json::json!({ "return": answer, "model": model });
        self.store.upsert(vec![(key.to_string(), value)])
    }
}

/// The locks of the cache and how it uses them.
struct CacheLock {
    locks: Arc<dyn Locks>,
    ttl: Duration,
    poll: Duration,
}

/// Whether a caller waits for another caller computing the same prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

/// One computation in progress, awaited by the threads that missed the same key meanwhile.
#[derive(Default)]
struct Flight {
    state: Mutex<FlightState>,
    done: Condvar,
}

#[derive(Default)]
enum FlightState {
    #[default]
    Running,
    Done(String),
    Failed,
}

impl Flight {
    /// Blocks until the leader finishes: its answer, or `None` when it failed.
    fn wait(&self) -> Option<String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*state {
                FlightState::Running => {
                    state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                FlightState::Done(answer) => return Some(answer.clone()),
                FlightState::Failed => return None,
            }
        }
    }
}

/// Ends a flight when the leader returns, fails or panics: publishes the outcome, wakes the
/// waiters and removes the flight from the map (a panicking `f` must not leave waiters blocked
/// forever).
struct FlightGuard<'a> {
    cache: &'a LlmCache,
    key: &'a str,
    flight: Arc<Flight>,
    /// Set on success; `None` when dropped means the leader failed.
    answer: Option<String>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        {
            let mut state = self.flight.state.lock().unwrap_or_else(|p| p.into_inner());
            *state = match self.answer.take() {
                Some(answer) => FlightState::Done(answer),
                None => FlightState::Failed,
            };
        }
        self.flight.done.notify_all();
        let mut flights = self.cache.flights.lock().unwrap_or_else(|p| p.into_inner());
        if flights
            .get(self.key)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(self.key);
        }
    }
}
