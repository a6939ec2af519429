//! `RateLimitMetrics` (feature `metrics`): the wrappers' counters, read at scrape time.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, IntCounter, Opts, Registry};

use super::wrapper::{Counters, RateLimitStats};
use super::RateLimitedLlm;
use crate::llm::LlmClient;

/// Prometheus metrics of [`RateLimitedLlm`] wrappers, read from them when the registry is
/// gathered (the wrappers never push):
///
/// | metric | type | meaning |
/// |---|---|---|
/// | `llm_rate_limit_wait_seconds_total` | counter | time callers waited for budget or a cool-down, summed over threads |
/// | `llm_rate_limit_admitted_total` | counter | requests the limiter admitted (sent to the provider) |
/// | `llm_rate_limited_total` | counter | 429s the provider answered |
///
/// Several wrappers are summed; a wrapper that is dropped stays counted.
///
/// [`crate::metrics::Metrics`] registers these too ([`crate::metrics::Metrics::watch_rate_limit`]):
/// create a `RateLimitMetrics` of its own only in a registry without `Metrics`.
#[derive(Clone)]
pub struct RateLimitMetrics {
    waited: Counter,
    admitted: IntCounter,
    rate_limited: IntCounter,
    /// `std::sync::Mutex`: taken at scrape time and when a wrapper is attached only.
    sources: Arc<Mutex<Vec<Source>>>,
}

struct Source {
    counters: Weak<Counters>,
    /// The counters at the last scrape.
    last: RateLimitStats,
}

impl fmt::Debug for RateLimitMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sources.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("RateLimitMetrics")
            .field("sources", &n)
            .finish()
    }
}

impl RateLimitMetrics {
    /// Creates the metrics and registers them in `registry`.
    ///
    /// # Errors
    /// The registry's error when they are registered there already.
    pub fn new(registry: &Registry) -> prometheus::Result<RateLimitMetrics> {
        let m = RateLimitMetrics {
            waited: Counter::with_opts(Opts::new(
                "llm_rate_limit_wait_seconds_total",
                "Time LLM callers waited for the shared rate limit's budget or cool-down, summed over threads.",
            ))?,
            admitted: IntCounter::with_opts(Opts::new(
                "llm_rate_limit_admitted_total",
                "LLM requests the shared rate limit admitted.",
            ))?,
            rate_limited: IntCounter::with_opts(Opts::new(
                "llm_rate_limited_total",
                "Rate-limit refusals (HTTP 429) the LLM provider answered.",
            ))?,
            sources: Arc::new(Mutex::new(Vec::new())),
        };
        registry.register(Box::new(m.clone()))?;
        Ok(m)
    }

    /// Reads `llm`'s counters at every scrape, weakly: the metrics never keep it alive.
    pub fn watch<C: LlmClient>(&self, llm: &RateLimitedLlm<C>) {
        let counters = llm.counters();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources
            .iter()
            .any(|s| std::ptr::eq(s.counters.as_ptr(), Arc::as_ptr(counters)))
        {
            return;
        }
        sources.push(Source {
            counters: Arc::downgrade(counters),
            last: RateLimitStats::default(),
        });
    }

    fn refresh(&self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.retain_mut(|s| {
            let Some(c) = s.counters.upgrade() else {
                return false;
            };
            let now = c.snapshot();
            self.admitted
                .inc_by(now.admitted.saturating_sub(s.last.admitted));
            self.rate_limited
                .inc_by(now.rate_limited.saturating_sub(s.last.rate_limited));
            let waited = now.waited.saturating_sub(s.last.waited).as_secs_f64();
            if waited > 0.0 {
                self.waited.inc_by(waited);
            }
            s.last = now;
            true
        });
    }
}

impl Collector for RateLimitMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.waited.desc();
        d.extend(self.admitted.desc());
        d.extend(self.rate_limited.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut m = self.waited.collect();
        m.extend(self.admitted.collect());
        m.extend(self.rate_limited.collect());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::LocalLlm;
    use crate::llm_hash::Message;
    use crate::rate_limit::{LocalRateLimiter, RateLimit};

    #[test]
    fn counters_are_read_at_scrape_time() {
        let registry = Registry::new();
        let metrics = RateLimitMetrics::new(&registry).unwrap();
        let limit = RateLimit::builder().requests(60).build().unwrap();
        let llm = RateLimitedLlm::new(
            LocalLlm::new(),
            Arc::new(LocalRateLimiter::default()),
            limit,
        );
        metrics.watch(&llm);
        metrics.watch(&llm);
        llm.complete("m", &[Message::new("user", "one")]).unwrap();
        let text = crate::metrics::render(&registry);
        assert!(text.contains("llm_rate_limit_admitted_total 1"), "{text}");
        assert!(text.contains("llm_rate_limited_total 0"), "{text}");
        assert!(text.contains("llm_rate_limit_wait_seconds_total"), "{text}");
    }

    #[test]
    fn metrics_registers_and_reads_them_too() {
        let registry = Registry::new();
        let metrics = crate::metrics::Metrics::new(&registry).unwrap();
        let limit = RateLimit::builder().requests(60).build().unwrap();
        let llm = RateLimitedLlm::new(
            LocalLlm::new(),
            Arc::new(LocalRateLimiter::default()),
            limit,
        );
        metrics.watch_rate_limit(&llm);
        llm.complete("m", &[Message::new("user", "one")]).unwrap();
        llm.complete("m", &[Message::new("user", "two")]).unwrap();
        let text = crate::metrics::render(&registry);
        assert!(text.contains("llm_rate_limit_admitted_total 2"), "{text}");
    }
}
