//! The retry policy: how often, and at which level, a failing command is sent again.
//!
//! One [`RetryPolicy`], built from `REDIS_RETRIES`, is applied at exactly one level per
//! operation, so the number of commands one failing operation causes has a stated bound:
//!
//! | where | who retries | sends of one failing command per operation |
//! |---|---|---|
//! | single server, Sentinel | the Redis backend | `REDIS_RETRIES + 1` |
//! | cluster, a state the server refuses the write in (`NOREPLICAS`, `MISCONF`, `BUSY`) | the backend | `REDIS_RETRIES + 1` |
//! | cluster, a redirect or a cluster state (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, `MASTERDOWN`, `READONLY`), a timeout | the cluster client | at most [`cluster_sends_bound`]: `max(REDIS_RETRIES, 3) + 2` |
//! | under write-behind | one operation per submission | `REDIS_RETRIES + 1` per submission, at most [`submissions_within`]`(T)` submissions in `T` |
//!
//! ## Why the backend, and not the layers above or the cluster client
//!
//! The backend knows which commands are idempotent (only those are retried), and it discards
//! a broken connection before the next attempt; a layer above sees a `KvStore` call, not a
//! connection. So the backend is the level, and the layers above do not retry around it:
//!
//! - **Write-behind** keeps a batch that failed with a retryable error and submits it again,
//!   as one operation with the policy's attempts, at most once per [`RESUBMIT_INTERVAL`]
//!   until its flush deadline. Its re-submissions are what lets a queue outlast an outage of
//!   any length; spacing them by the interval (rather than a fresh backoff from 10 ms) keeps
//!   them from multiplying the backend's attempts: before, one failing write was sent 36
//!   times in 3 s (9 submissions of 4 sends); now at most 4 submissions of 4 sends.
//! - **The cluster client** (redis-rs) spends one retry budget on following `MOVED`/`ASK`
//!   redirects and on waiting out cluster states; a redirect is not a failure, and the
//!   budget cannot be split, so it keeps `max(REDIS_RETRIES, 3)` (resharding needs it). The
//!   states it waits out itself (and timeouts, which it re-sends at once) are therefore *not*
//!   retried again by the backend on a cluster: before, one write answered `CLUSTERDOWN` was
//!   sent 20 times with `REDIS_RETRIES=3` (4 backend attempts of 1 pipelined send plus 4 by
//!   the client); now 5 (one pipelined send, then the client's 4). Connection errors are still
//!   retried by the backend with a fresh connection (and slot map), which is how a write finds
//!   the promoted replica after a failover; a command that could not reach a server is not
//!   received by one.
//!
//! `tests/retry.rs` counts the commands a failing server received (`INFO commandstats`) and
//! checks each bound.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Retries of a failing command at one level, with exponential backoff and jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Sends of a failing command per operation: the first and its retries. At least 1.
    attempts: u32,
    /// Cap of the pause before the first retry; it doubles per retry.
    base: Duration,
    /// Cap of any pause.
    max_backoff: Duration,
}

impl RetryPolicy {
    /// The backend's policy for `retries` retries (`REDIS_RETRIES`): `retries + 1` attempts,
    /// pauses of 25 ms doubling up to 1 s, each drawn from the upper half of its cap.
    pub fn new(retries: u32) -> RetryPolicy {
        RetryPolicy {
            attempts: retries.saturating_add(1),
            base: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
        }
    }

    /// Sends of a failing command per operation (`REDIS_RETRIES + 1`).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Retries after the first attempt (`REDIS_RETRIES`).
    pub fn retries(&self) -> u32 {
        self.attempts - 1
    }

    /// The shortest pause between two attempts, in milliseconds (the cluster client's
    /// `min_retry_wait`).
    pub(crate) fn min_wait_ms(&self) -> u64 {
        self.base.as_millis() as u64 / 2
    }

    /// The longest pause between two attempts, in milliseconds.
    pub(crate) fn max_wait_ms(&self) -> u64 {
        self.max_backoff.as_millis() as u64
    }

    /// The pause before retry `retry` (0-based): `base` doubling up to `max_backoff`, with
    /// jitter in the upper half so many processes do not hammer a restarted server in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let base = self.base.as_millis() as u64;
        let cap = base
            .saturating_mul(1u64 << retry.min(20))
            .min(self.max_wait_ms());
        Duration::from_millis(cap / 2 + jitter(cap / 2 + 1))
    }

    /// Runs `attempt` up to [`RetryPolicy::attempts`] times: again while it fails with an
    /// error `should_retry` accepts, after `on_retry(&error, retry, pause)` and the pause.
    pub(crate) fn run<T, E>(
        &self,
        mut attempt: impl FnMut() -> Result<T, E>,
        should_retry: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E> {
        let mut retry = 0u32;
        loop {
            let err = match attempt() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if retry + 1 >= self.attempts || !should_retry(&err) {
                return Err(err);
            }
            let pause = self.backoff(retry);
            on_retry(&err, retry, pause);
            std::thread::sleep(pause);
            retry += 1;
        }
    }
}

/// The least time between two submissions of the same failing batch by write-behind. Each
/// submission is one operation under the backend's [`RetryPolicy`] (whose pauses add up to
/// less than this with the default `REDIS_RETRIES`), so a failing write is sent at most
/// `REDIS_RETRIES + 1` times per second.
pub const RESUBMIT_INTERVAL: Duration = Duration::from_secs(1);

/// The pause write-behind takes before submitting a failed batch again: the interval plus up
/// to a quarter of it (jitter only lengthens it, so the bound holds).
pub(crate) fn resubmit_pause() -> Duration {
    let ms = RESUBMIT_INTERVAL.as_millis() as u64;
    Duration::from_millis(ms + jitter(ms / 4 + 1))
}

/// The most submissions write-behind makes of one failing batch within a deadline `T` (its
/// flush, close or drop deadline): `1 + ⌊T / RESUBMIT_INTERVAL⌋`. Multiplied by
/// `REDIS_RETRIES + 1`, the most commands one failing write causes in `T`.
pub fn submissions_within(deadline: Duration) -> u64 {
    1 + (deadline.as_millis() / RESUBMIT_INTERVAL.as_millis()) as u64
}

/// The least retry budget the cluster client keeps: it spends the same budget on following
/// `MOVED`/`ASK` redirects, which a slot migration needs.
pub const CLUSTER_CLIENT_MIN_RETRIES: u32 = 3;

/// The cluster client's retry budget for `REDIS_RETRIES = retries`.
pub(crate) fn cluster_client_retries(retries: u32) -> u32 {
    retries.max(CLUSTER_CLIENT_MIN_RETRIES)
}

/// The most sends of one failing command in one operation on a cluster, for the states the
/// cluster client retries itself: one pipelined send, then the client's own
/// `max(REDIS_RETRIES, 3) + 1`.
pub fn cluster_sends_bound(retries: u32) -> u64 {
    u64::from(cluster_client_retries(retries)) + 2
}

/// A number below `n` (`n > 0`). RandomState is seeded randomly per instance: enough jitter
/// without a rand dependency.
fn jitter(n: u64) -> u64 {
    RandomState::new().build_hasher().finish() % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::new(3);
        for a in 0..40 {
            let d = p.backoff(a);
            assert!(d <= Duration::from_secs(1), "{a}: {d:?}");
        }
        assert!(p.backoff(0) <= Duration::from_millis(25));
        assert!(p.backoff(0) >= Duration::from_millis(12));
        assert!(p.backoff(10) >= Duration::from_millis(500));
    }

    #[test]
    fn run_stops_after_attempts_or_a_final_error() {
        let p = RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
        };
        let mut calls = 0;
        let r: Result<(), u32> = p.run(
            || {
                calls += 1;
                Err(1)
            },
            |_| true,
            |_, _, _| {},
        );
        assert_eq!((r, calls), (Err(1), 4));
        let mut calls = 0;
        let r: Result<(), u32> = p.run(
            || {
                calls += 1;
                Err(2)
            },
            |e| *e != 2,
            |_, _, _| {},
        );
        assert_eq!((r, calls), (Err(2), 1));
        assert_eq!(RetryPolicy::new(0).attempts(), 1);
    }

    #[test]
    fn bounds() {
        assert_eq!(submissions_within(Duration::from_millis(2500)), 3);
        assert_eq!(submissions_within(Duration::ZERO), 1);
        assert_eq!(cluster_sends_bound(0), 5);
        assert_eq!(cluster_sends_bound(5), 7);
        assert!(resubmit_pause() >= RESUBMIT_INTERVAL);
    }
}
