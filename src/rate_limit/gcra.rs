//! The GCRA arithmetic, and the in-process limiter built on it ([`LocalRateLimiter`]). The Redis
//! script in `redis.rs` is a line-by-line transcription of [`Gcra`], so both backends admit the
//! same sequence of requests.
//!
//! Times are microseconds as `f64`: Redis's `TIME` since the epoch (~1.8e15 µs, exact in a
//! double up to 2^53 ≈ 9e15) or an `Instant` of this process. A limit's state is its
//! *theoretical arrival time* (TAT): when the budget would be whole again if nothing more were
//! admitted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Admission, RateLimit, RateLimiter};
use crate::error::Result;

/// The state of one limiter name: one TAT per limit, and the end of the cool-down.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Gcra {
    /// TAT of the request limit; 0 = never used.
    pub(crate) requests: f64,
    /// TAT of the token limit; 0 = never used.
    pub(crate) tokens: f64,
    /// End of the shared cool-down; 0 = none.
    pub(crate) cool: f64,
}

/// `(new TAT, wait)` of admitting `cost` units of a limit whose state is `tat`: the cost moves
/// the TAT on by `cost × interval`; it is admitted when the new TAT is at most `capacity` (the
/// burst, in µs) ahead of `now`. A single cost above the burst is admitted once the budget is
/// whole, so it is never refused for ever.
pub(crate) fn step(tat: f64, now: f64, interval: f64, capacity: f64, cost: f64) -> (f64, f64) {
    let base = tat.max(now);
    let new = base + interval * cost;
    let allowed_at = new - capacity.max(interval * cost);
    (new, (allowed_at - now).max(0.0))
}

impl Gcra {
    /// Admits one request of `tokens` at `now`, or says how long to wait (nothing changes then).
    pub(crate) fn acquire(&mut self, now: f64, q: &Quota, tokens: u64) -> Admission {
        if self.cool > now {
            return Admission::Wait {
                wait: micros(self.cool - now),
                cooling: true,
            };
        }
        let mut wait: f64 = 0.0;
        let mut requests = None;
        let mut tok = None;
        if q.request_interval > 0.0 {
            let (new, w) = step(
                self.requests,
                now,
                q.request_interval,
                q.request_capacity,
                1.0,
            );
            requests = Some(new);
            wait = wait.max(w);
        }
        if q.token_interval > 0.0 && tokens > 0 {
            let (new, w) = step(
                self.tokens,
                now,
                q.token_interval,
                q.token_capacity,
                tokens as f64,
            );
            tok = Some(new);
            wait = wait.max(w);
        }
        if wait > 0.0 {
            return Admission::Wait {
                wait: micros(wait),
                cooling: false,
            };
        }
        if let Some(r) = requests {
            self.requests = r.ceil();
        }
        if let Some(t) = tok {
            self.tokens = t.ceil();
        }
        Admission::Admitted
    }

    /// Charges (`delta > 0`) or refunds (`delta < 0`) tokens after the answer reported its
    /// usage. A refund never makes the budget more than whole.
    pub(crate) fn adjust(&mut self, now: f64, q: &Quota, delta: i64) {
        if q.token_interval > 0.0 && delta != 0 {
            self.tokens = (self.tokens.max(now) + q.token_interval * delta as f64)
                .max(now)
                .ceil();
        }
    }

    /// Starts a cool-down of `pause` unless one is running: `true` when this call set it. After
    /// it, requests resume at the steady rate, one at a time, not with a burst.
    pub(crate) fn cool_down(&mut self, now: f64, q: &Quota, pause: Duration) -> bool {
        if self.cool > now {
            return false;
        }
        let until = now + pause.as_micros() as f64;
        self.cool = until;
        if q.request_interval > 0.0 {
            self.requests = self
                .requests
                .max(until + q.request_capacity - q.request_interval)
                .ceil();
        }
        true
    }
}

/// The numbers of a [`RateLimit`] the arithmetic uses, in µs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Quota {
    /// µs of budget one request uses (period / limit); 0 = no request limit.
    pub(crate) request_interval: f64,
    /// µs of budget that may be used at once: burst × interval.
    pub(crate) request_capacity: f64,
    /// µs of budget one token uses; 0 = no token limit.
    pub(crate) token_interval: f64,
    /// token burst × token interval.
    pub(crate) token_capacity: f64,
}

impl Quota {
    pub(crate) fn of(limit: &RateLimit) -> Quota {
        let period = limit.period.as_micros() as f64;
        let (request_interval, request_capacity) = match limit.requests {
            Some(n) => (period / n as f64, period / n as f64 * limit.burst as f64),
            None => (0.0, 0.0),
        };
        let (token_interval, token_capacity) = match limit.tokens {
            Some(n) => (
                period / n as f64,
                period / n as f64 * limit.token_burst as f64,
            ),
            None => (0.0, 0.0),
        };
        Quota {
            request_interval,
            request_capacity,
            token_interval,
            token_capacity,
        }
    }
}

fn micros(us: f64) -> Duration {
    Duration::from_micros(us.ceil().max(0.0) as u64)
}

/// A limiter for the threads of this process only: for the JSON backend, whose working
/// directory has one writing process at a time anyway. Same arithmetic as the Redis limiter,
/// on this process's monotonic clock.
#[derive(Debug)]
pub struct LocalRateLimiter {
    start: Instant,
    /// State per name. A `std::sync::Mutex` held for a few float operations, never across a
    /// wait or an LLM call.
    states: Mutex<HashMap<String, Gcra>>,
}

impl Default for LocalRateLimiter {
    fn default() -> Self {
        LocalRateLimiter {
            start: Instant::now(),
            states: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalRateLimiter {
    fn with_state<T>(&self, name: &str, f: impl FnOnce(&mut Gcra, f64) -> T) -> T {
        // 1 s past the start, so that 0 can mean "never used".
        let now = self.start.elapsed().as_micros() as f64 + 1e6;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        f(states.entry(name.to_string()).or_default(), now)
    }
}

impl RateLimiter for LocalRateLimiter {
    fn try_acquire(&self, name: &str, limit: &RateLimit, tokens: u64) -> Result<Admission> {
        let q = Quota::of(limit);
        Ok(self.with_state(name, |s, now| s.acquire(now, &q, tokens)))
    }

    fn adjust_tokens(&self, name: &str, limit: &RateLimit, delta: i64) -> Result<()> {
        let q = Quota::of(limit);
        self.with_state(name, |s, now| s.adjust(now, &q, delta));
        Ok(())
    }

    fn cool_down(&self, name: &str, limit: &RateLimit, pause: Duration) -> Result<bool> {
        let q = Quota::of(limit);
        Ok(self.with_state(name, |s, now| s.cool_down(now, &q, pause)))
    }

    fn key(&self, _name: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(per_second: u64, burst: u64) -> Quota {
        Quota::of(
            &RateLimit::builder()
                .requests(per_second)
                .burst(burst)
                .period(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
    }

    /// Requests admitted in every window of one period, when callers ask every 1 ms.
    fn admitted_times(q: &Quota, until_us: f64) -> Vec<f64> {
        let mut g = Gcra::default();
        let mut times = Vec::new();
        let mut now = 1e6;
        while now < until_us {
            if g.acquire(now, q, 0) == Admission::Admitted {
                times.push(now);
            } else {
                now += 1000.0;
            }
        }
        times
    }

    #[test]
    fn no_window_of_a_period_holds_more_than_limit_plus_burst_minus_one() {
        for (limit, burst) in [(10, 1), (10, 2), (20, 5), (7, 3)] {
            let q = quota(limit, burst);
            let times = admitted_times(&q, 6e6);
            let mut most = 0;
            for (i, t) in times.iter().enumerate() {
                let n = times[i..].iter().take_while(|&&u| u < t + 1e6).count();
                most = most.max(n);
            }
            assert_eq!(
                most as u64,
                limit + burst - 1,
                "limit {limit} burst {burst}"
            );
            // Steady state: the limit per period.
            let last = times.iter().filter(|&&t| (4e6..5e6).contains(&t)).count() as u64;
            assert!(last == limit || last == limit + 1, "{last}");
        }
    }

    #[test]
    fn burst_goes_at_once_after_idle_then_waits_one_interval() {
        let q = quota(10, 3);
        let mut g = Gcra::default();
        for _ in 0..3 {
            assert_eq!(g.acquire(1e6, &q, 0), Admission::Admitted);
        }
        match g.acquire(1e6, &q, 0) {
            Admission::Wait { wait, cooling } => {
                assert_eq!(wait, Duration::from_millis(100));
                assert!(!cooling);
            }
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn tokens_are_charged_refunded_and_a_big_request_still_passes() {
        let limit = RateLimit::builder()
            .tokens(1000)
            .token_burst(100)
            .period(Duration::from_secs(1))
            .build()
            .unwrap();
        let q = Quota::of(&limit);
        let mut g = Gcra::default();
        // 500 tokens > burst: admitted on a whole budget, then 0.5 s of budget is used.
        assert_eq!(g.acquire(1e6, &q, 500), Admission::Admitted);
        assert!(matches!(g.acquire(1e6, &q, 10), Admission::Wait { .. }));
        // The answer reported 100 tokens: 400 refunded, 0.1 s ahead only: 10 tokens fit.
        g.adjust(1e6, &q, -400);
        assert_eq!(g.acquire(1e6, &q, 0), Admission::Admitted);
        assert_eq!(
            g.acquire(1e6, &q, 1),
            Admission::Wait {
                wait: Duration::from_millis(1),
                cooling: false
            }
        );
    }

    #[test]
    fn cool_down_is_set_once_and_resumes_without_a_burst() {
        let q = quota(10, 5);
        let mut g = Gcra::default();
        assert!(g.cool_down(1e6, &q, Duration::from_secs(1)));
        assert!(!g.cool_down(1.5e6, &q, Duration::from_secs(1)), "set once");
        assert_eq!(
            g.acquire(1.5e6, &q, 0),
            Admission::Wait {
                wait: Duration::from_millis(500),
                cooling: true
            }
        );
        assert_eq!(g.acquire(2e6, &q, 0), Admission::Admitted);
        assert!(matches!(
            g.acquire(2e6, &q, 0),
            Admission::Wait { cooling: false, .. }
        ));
    }
}
