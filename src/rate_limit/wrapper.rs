//! [`RateLimitedLlm`]: waits for the shared budget before each request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Admission, RateLimit, RateLimiter};
use crate::error::Result;
use crate::llm::{Completion, LlmClient};
use crate::llm_hash::Message;

/// Longest sleep between two asks of the limiter.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Counters of a [`RateLimitedLlm`], as [`RateLimitedLlm::stats`] returns them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RateLimitStats {
    /// Requests the limiter admitted (each one sent to the provider, retries included).
    pub admitted: u64,
    /// Time callers spent waiting for budget or for a cool-down, summed over threads.
    pub waited: Duration,
    /// Rate-limit refusals (429s) the provider answered.
    pub rate_limited: u64,
    /// Cool-downs this process started (at most one per refusal; refusals during a running
    /// cool-down start none).
    pub cool_downs: u64,
}

/// The wrapper's counters, shared with the metrics (which hold them weakly).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) admitted: AtomicU64,
    pub(crate) waited_us: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) cool_downs: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> RateLimitStats {
        RateLimitStats {
            admitted: self.admitted.load(Ordering::Relaxed),
            waited: Duration::from_micros(self.waited_us.load(Ordering::Relaxed)),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            cool_downs: self.cool_downs.load(Ordering::Relaxed),
        }
    }
}

/// An [`LlmClient`] that sends each request only when the shared budget allows it: one
/// [`RateLimiter`] acquisition per request sent (retries included), the token estimate
/// corrected with the reported usage, a 429 turned into a cool-down every process honours and
/// the request sent again. See the [module docs](super).
///
/// Requests go through the inner client's [`LlmClient::complete_once`], so its own retries do
/// not bypass the budget: this wrapper retries instead (429s up to
/// [`RateLimit::rate_limited_retries`] times, other transient failures up to
/// [`RateLimit::retries`] times with exponential backoff).
///
/// # Where it goes
///
/// Inside the cache: `cache.complete(&limited, model, messages)` (or the `f` of
/// [`crate::llm_cache::LlmCache::get_or_compute`]), so a cache hit never waits for budget, and
/// only the process that computes a prompt spends it. Wrapping the cache's caller instead would
/// charge hits too.
///
/// # If Redis fails
///
/// A limiter that cannot be reached (connection error or timeout) lets requests through
/// unlimited, with a warning once per outage: the provider's own 429s still slow the client
/// down, and an outage of the store does not stop the indexing. Other limiter errors (an ACL
/// refusal) fail the call.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use graphrag_kv::llm::{LlmClient, LocalLlm};
/// use graphrag_kv::llm_hash::Message;
/// use graphrag_kv::rate_limit::{LocalRateLimiter, RateLimit, RateLimitedLlm};
/// use std::sync::Arc;
///
/// let limit = RateLimit::builder().requests(600).build()?; // per minute, burst 10
/// let llm = RateLimitedLlm::new(LocalLlm::new(), Arc::new(LocalRateLimiter::default()), limit)
///     .with_endpoint("local");
/// llm.complete("m", &[Message::new("user", "Hello.")])?;
/// assert_eq!(llm.stats().admitted, 1);
/// # Ok::<(), graphrag_kv::Error>(())
/// ```
#[derive(Debug)]
pub struct RateLimitedLlm<C> {
    inner: C,
    limiter: Arc<dyn RateLimiter>,
    limit: RateLimit,
    /// The endpoint part of the budget name (credentials removed).
    endpoint: String,
    counters: Arc<Counters>,
    /// True while the limiter is unreachable: the warning is logged once per outage.
    unreachable: AtomicBool,
}

impl<C: LlmClient> RateLimitedLlm<C> {
    /// Wraps `inner`, drawing from `limiter` (normally [`crate::Storage::rate_limiter`]) under
    /// `limit`. The budget is per model, for the endpoint `default` until
    /// [`RateLimitedLlm::with_endpoint`] names it.
    pub fn new(inner: C, limiter: Arc<dyn RateLimiter>, limit: RateLimit) -> RateLimitedLlm<C> {
        RateLimitedLlm {
            inner,
            limiter,
            limit,
            endpoint: "default".into(),
            counters: Arc::default(),
            unreachable: AtomicBool::new(false),
        }
    }

    /// Names the endpoint (e.g. the base URL): clients of the same endpoint and model share a
    /// budget, others do not. Credentials in a URL are left out of the name.
    pub fn with_endpoint(mut self, endpoint: &str) -> RateLimitedLlm<C> {
        self.endpoint = crate::config::redact_url(endpoint);
        self
    }

    /// The limits applied.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// The inner client.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The inner client, unwrapped.
    pub fn into_inner(self) -> C {
        self.inner
    }

    /// Where other processes see the budget of `model` (the Redis key), or `None` when it is
    /// kept in this process only.
    pub fn key(&self, model: &str) -> Option<String> {
        self.limiter.key(&RateLimit::name(&self.endpoint, model))
    }

    /// A snapshot of the counters of this wrapper (all threads).
    pub fn stats(&self) -> RateLimitStats {
        self.counters.snapshot()
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Waits until the budget `name` admits a request of `tokens`.
    fn acquire(&self, name: &str, tokens: u64) -> Result<()> {
        let started = Instant::now();
        let outcome = loop {
            match self.limiter.try_acquire(name, &self.limit, tokens) {
                Ok(Admission::Admitted) => {
                    if self.unreachable.swap(false, Ordering::Relaxed) {
                        log::warn!("the LLM rate limiter answers again; limiting resumes");
                    }
                    break Ok(());
                }
                // At most a second at a time: a token refund by another caller may open the
                // budget sooner than said.
                Ok(Admission::Wait { wait, .. }) => std::thread::sleep(wait.min(MAX_SLEEP)),
                Err(e) if e.is_connection() || e.is_timeout() => {
                    if !self.unreachable.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "the LLM rate limiter is unreachable ({e}); sending without a \
                             shared limit until it answers"
                        );
                    }
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        let waited = started.elapsed();
        self.counters
            .waited_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        if outcome.is_ok() {
            self.counters.admitted.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// Corrects the estimate with the reported usage; a failure only costs accuracy.
    fn correct(&self, name: &str, estimate: u64, completion: &Completion) {
        let (Some(_), Some(usage)) = (self.limit.tokens, completion.usage) else {
            return;
        };
        let delta = usage.total() as i64 - estimate as i64;
        if delta != 0 {
            if let Err(e) = self.limiter.adjust_tokens(name, &self.limit, delta) {
                log::warn!("cannot correct the LLM token budget by {delta}: {e}");
            }
        }
    }
}

impl<C: LlmClient> LlmClient for RateLimitedLlm<C> {
    fn complete(&self, model: &str, messages: &[Message]) -> Result<String> {
        let name = RateLimit::name(&self.endpoint, model);
        let estimate = self.limit.estimate(messages);
        let (mut refused, mut failed) = (0u32, 0u32);
        loop {
            self.acquire(&name, estimate)?;
            match self.inner.complete_once(model, messages) {
                Ok(completion) => {
                    self.correct(&name, estimate, &completion);
                    return Ok(completion.text);
                }
                Err(e) if e.is_rate_limited() => {
                    self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    let pause = e.retry_after().unwrap_or(self.limit.cool_down);
                    match self.limiter.cool_down(&name, &self.limit, pause) {
                        Ok(true) => {
                            self.counters.cool_downs.fetch_add(1, Ordering::Relaxed);
                            log::info!("{e}: every process pauses {pause:?}");
                        }
                        Ok(false) => {}
                        // Unreachable limiter: at least this thread pauses.
                        Err(_) => std::thread::sleep(pause),
                    }
                    if refused >= self.limit.rate_limited_retries {
                        return Err(e);
                    }
                    refused += 1;
                }
                Err(e) if e.is_retryable() && failed < self.limit.retries => {
                    let pause = Duration::from_millis(500 << failed.min(6));
                    log::warn!(
                        "{e} (retry {} of {} in {pause:?})",
                        failed + 1,
                        self.limit.retries
                    );
                    std::thread::sleep(pause);
                    failed += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One acquisition, one request: a 429 still starts the shared cool-down, and is returned.
    fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
        let name = RateLimit::name(&self.endpoint, model);
        let estimate = self.limit.estimate(messages);
        self.acquire(&name, estimate)?;
        let result = self.inner.complete_once(model, messages);
        match &result {
            Ok(c) => self.correct(&name, estimate, c),
            Err(e) if e.is_rate_limited() => {
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                let pause = e.retry_after().unwrap_or(self.limit.cool_down);
                if let Ok(true) = self.limiter.cool_down(&name, &self.limit, pause) {
                    self.counters.cool_downs.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {}
        }
        result
    }
}
