//! A fleet-wide LLM rate limit: every thread of every process that shares a [`crate::Storage`]
//! draws requests and tokens from one budget per `(endpoint, model)`, so N indexer processes
//! together send at the provider's limit, not N times it.
//!
//! - [`RateLimit`]: the limits (requests and tokens per period, bursts), from a builder or from
//!   `LLM_RATE_LIMIT_*` ([`RateLimit::from_env`]).
//! - [`RateLimiter`]: where the budget lives, from [`crate::Storage::rate_limiter`]: in the
//!   storage's own Redis through its own pool ([`RedisRateLimiter`]: TLS, cluster, ACL user as
//!   configured), or in this process for the JSON backend ([`LocalRateLimiter`]).
//! - [`RateLimitedLlm`]: the wrapper around any [`crate::llm::LlmClient`] that waits for
//!   budget before each request, corrects the token estimate with the usage the answer reports,
//!   and turns a provider's 429 into a cool-down every process honours.
//! - `RateLimitMetrics` (feature `metrics`): time waited, requests admitted, 429s seen, read
//!   from the wrappers at scrape time.
//!
//! # The algorithm: GCRA
//!
//! Each limit is a GCRA (generic cell rate algorithm, as `redis-cell` and go-redis's
//! `redis_rate` use): one number per limit, the *theoretical arrival time* (TAT). A request
//! moves it on by `period / limit` (a token limit: by `period / limit` per token); it is
//! admitted when the new TAT is at most `burst × period / limit` ahead of now, otherwise the
//! caller is told exactly how long to wait. GCRA rather than a sliding window because:
//!
//! - its state is one number per limit, updated in O(1) by one short script, where a sliding
//!   log keeps one entry per request (a sorted set of the last minute's requests);
//! - it spreads requests evenly: after an idle spell at most `burst` go at once, then one per
//!   `period / limit`. A fixed or sliding window lets the whole minute's budget go in the
//!   first second, which is what providers that enforce per-second slices of a per-minute
//!   limit answer with 429s;
//! - the bound is exact: **no window of one period ever admits more than
//!   `limit + burst - 1` requests** (a window of length P holds at most `1 + (P + τ) / T`
//!   conforming requests with `τ = (burst - 1) × T`), so with a burst of 1
//!   (`LLM_RATE_LIMIT_BURST=1`) no period ever admits more than the limit; the default burst
//!   (`requests / 60`, at least 1) allows up to `burst - 1` more.
//!
//! Requests and tokens are decided together, atomically: a request is admitted only when both
//! limits have room, and then both are charged.
//!
//! # Time
//!
//! On Redis, "now" is the server's `TIME`, read inside the script: the machines of a fleet need
//! no synchronised clocks, and a caller told to wait sleeps that duration on its own clock.
//! On JSON, it is this process's monotonic clock.
//!
//! # Tokens
//!
//! A request is charged its estimate before it is sent ([`estimate_tokens`] of the prompt, plus
//! [`RateLimitBuilder::completion_tokens`] for the answer, default 256); when the answer
//! reports its usage ([`crate::llm::Completion::usage`]), the difference is charged or refunded.
//! Clients that report no usage (the default of [`crate::llm::LlmClient::complete_once`]) keep
//! the estimate.
//!
//! # 429s
//!
//! A refusal for the provider's rate limit ([`crate::Error::LlmRateLimited`]) sets a cool-down
//! of the `Retry-After` the provider sent (else [`RateLimitBuilder::cool_down`], default 1 s)
//! in the shared state: every process waits it out before its next request, instead of each
//! finding out by its own refusals. It is set once: refusals that arrive while it runs (the
//! requests that were already in flight) do not extend it. After it, requests resume at the
//! steady rate, one at a time, without a burst. The refused request is then sent again.
//!
//! # Keys
//!
//! One Redis hash per `(endpoint, model)`: `{prefix}::rate:{endpoint}|{model}`, fields `req`,
//! `tok` (the TATs, µs) and `cool` (end of the cool-down, µs), expiring once it no longer
//! matters. A namespace can never be empty, so no namespace's keys (`{prefix}:{namespace}:*`)
//! include it: `all_keys`, `clear`, `stats`, export, migration and `list_namespaces` never see
//! it, as with the `LlmCache` locks (`{prefix}::lock:*`). Being one key, it is in one hash slot
//! on a cluster, so the script touches a single node.

mod gcra;
#[cfg(feature = "metrics")]
mod metrics;
mod redis;
mod wrapper;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::config::{config_error, parse_u64};
use crate::error::Result;
use crate::llm_hash::Message;

pub use gcra::LocalRateLimiter;
#[cfg(feature = "metrics")]
pub use metrics::RateLimitMetrics;
pub use redis::RedisRateLimiter;
pub use wrapper::{RateLimitStats, RateLimitedLlm};

/// What [`RateLimiter::try_acquire`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The request may be sent now; it has been charged.
    Admitted,
    /// Not yet: ask again after `wait`. Nothing was charged.
    Wait {
        /// How long until the budget (or the cool-down) allows it.
        wait: Duration,
        /// True when a shared cool-down after a 429 is what holds it back.
        cooling: bool,
    },
}

/// A request and token budget shared by everyone using the same limiter: across processes on
/// Redis, within the process on JSON. From [`crate::Storage::rate_limiter`].
///
/// `name` identifies one budget (the wrapper uses `{endpoint}|{model}`); every call passes the
/// [`RateLimit`] to apply, and processes sharing a name must use the same one.
pub trait RateLimiter: Send + Sync + fmt::Debug {
    /// Admits one request costing `tokens` now (and charges it), or says how long to wait.
    ///
    /// # Errors
    /// Backend failures (Redis unreachable, timeout, ACL refusal).
    fn try_acquire(&self, name: &str, limit: &RateLimit, tokens: u64) -> Result<Admission>;

    /// Charges (`delta > 0`) or refunds (`delta < 0`) tokens once the real usage is known.
    ///
    /// # Errors
    /// As [`RateLimiter::try_acquire`].
    fn adjust_tokens(&self, name: &str, limit: &RateLimit, delta: i64) -> Result<()>;

    /// Starts a cool-down of `pause` for everyone using `name`, unless one is running: `true`
    /// when this call started it.
    ///
    /// # Errors
    /// As [`RateLimiter::try_acquire`].
    fn cool_down(&self, name: &str, limit: &RateLimit, pause: Duration) -> Result<bool>;

    /// Where other processes see the budget `name` (the Redis key), or `None` when it is kept
    /// in this process only.
    fn key(&self, name: &str) -> Option<String>;
}

/// The limits of one `(endpoint, model)`: requests and/or tokens per period, with bursts.
/// From [`RateLimit::builder`] or [`RateLimit::from_env`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Requests per period; `None` = no request limit.
    pub requests: Option<u64>,
    /// Tokens (prompt + answer) per period; `None` = no token limit.
    pub tokens: Option<u64>,
    /// The period the limits count over. Defaults to one minute, as providers state them.
    pub period: Duration,
    /// Requests that may go at once after an idle spell. Defaults to `requests / 60` (one
    /// second's worth of a per-minute limit), at least 1.
    pub burst: u64,
    /// Tokens that may be spent at once. Defaults to `tokens / 60`, at least 1.
    pub token_burst: u64,
    /// Tokens the answer is estimated to cost before it is known. Defaults to 256.
    pub completion_tokens: u64,
    /// The shared cool-down after a 429 that did not say how long to wait. Defaults to 1 s.
    pub cool_down: Duration,
    /// How many 429s one call sends its request again after. Defaults to 10.
    pub rate_limited_retries: u32,
    /// How many other transient failures (timeouts, connection failures, 5xx) one call retries,
    /// each one drawing from the budget again. Defaults to 3.
    pub retries: u32,
}

impl RateLimit {
    /// Default period: one minute.
    pub const DEFAULT_PERIOD: Duration = Duration::from_secs(60);
    /// Default estimate of an answer's tokens: 256.
    pub const DEFAULT_COMPLETION_TOKENS: u64 = 256;
    /// Default cool-down after a 429 without `Retry-After`: 1 s.
    pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);
    /// Default 429s one call retries after: 10.
    pub const DEFAULT_RATE_LIMITED_RETRIES: u32 = 10;
    /// Default retries of other transient failures: 3.
    pub const DEFAULT_RETRIES: u32 = 3;

    /// A builder with no limit set.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder::default()
    }

    /// The limits in the environment, or `None` when neither `LLM_RATE_LIMIT_RPM` nor
    /// `LLM_RATE_LIMIT_TPM` is set (no limit):
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `LLM_RATE_LIMIT_RPM` | requests per period (per minute unless the period is changed) | no limit |
    /// | `LLM_RATE_LIMIT_TPM` | tokens per period | no limit |
    /// | `LLM_RATE_LIMIT_BURST` | requests that may go at once | RPM / 60, at least 1 |
    /// | `LLM_RATE_LIMIT_TOKEN_BURST` | tokens that may be spent at once | TPM / 60, at least 1 |
    /// | `LLM_RATE_LIMIT_PERIOD_MS` | the period, in milliseconds (tests shrink it) | 60000 |
    ///
    /// An empty value counts as unset.
    ///
    /// # Errors
    /// [`crate::Error::Config`] naming the variable whose value is not a whole number in range,
    /// or a burst set without its limit.
    pub fn from_env() -> Result<Option<RateLimit>> {
        let mut vars = HashMap::new();
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str() else { continue };
            if !k.starts_with("LLM_RATE_LIMIT_") {
                continue;
            }
            match v.into_string() {
                Ok(v) => {
                    vars.insert(k.to_string(), v);
                }
                Err(_) => return Err(config_error(k, "<not UTF-8>", "UTF-8 text")),
            }
        }
        RateLimit::from_vars(&vars)
    }

    /// [`RateLimit::from_env`] from the given variables.
    ///
    /// # Errors
    /// As [`RateLimit::from_env`].
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<RateLimit>> {
        let get = |k: &str| {
            vars.get(k)
                .map(String::as_str)
                .filter(|v| !v.trim().is_empty())
        };
        let number = |k: &str| -> Result<Option<u64>> {
            get(k)
                .map(|v| parse_u64(k, v, 1, 1_000_000_000_000))
                .transpose()
        };
        let rpm = number("LLM_RATE_LIMIT_RPM")?;
        let tpm = number("LLM_RATE_LIMIT_TPM")?;
        let burst = number("LLM_RATE_LIMIT_BURST")?;
        let token_burst = number("LLM_RATE_LIMIT_TOKEN_BURST")?;
        let period = number("LLM_RATE_LIMIT_PERIOD_MS")?;
        if rpm.is_none() && tpm.is_none() {
            for (k, set) in [
                ("LLM_RATE_LIMIT_BURST", burst.is_some()),
                ("LLM_RATE_LIMIT_TOKEN_BURST", token_burst.is_some()),
                ("LLM_RATE_LIMIT_PERIOD_MS", period.is_some()),
            ] {
                if set {
                    return Err(config_error(
                        k,
                        get(k).unwrap_or(""),
                        "to be set with LLM_RATE_LIMIT_RPM or LLM_RATE_LIMIT_TPM (alone it limits nothing)",
                    ));
                }
            }
            return Ok(None);
        }
        let mut b = RateLimit::builder();
        b.requests = rpm;
        b.tokens = tpm;
        b.burst = burst;
        b.token_burst = token_burst;
        if let Some(ms) = period {
            b = b.period(Duration::from_millis(ms));
        }
        b.build().map(Some)
    }

    /// The budget name of `(endpoint, model)`: `{endpoint}|{model}`, with any credentials in
    /// the endpoint URL left out.
    pub fn name(endpoint: &str, model: &str) -> String {
        format!("{}|{model}", crate::config::redact_url(endpoint))
    }

    /// Tokens a request is charged before it is sent: [`estimate_tokens`] of the prompt plus
    /// [`RateLimit::completion_tokens`].
    pub fn estimate(&self, messages: &[Message]) -> u64 {
        estimate_tokens(messages).saturating_add(self.completion_tokens)
    }
}

/// Builds a [`RateLimit`]; setters take and return the builder, [`RateLimitBuilder::build`]
/// checks.
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct RateLimitBuilder {
    requests: Option<u64>,
    tokens: Option<u64>,
    period: Option<Duration>,
    burst: Option<u64>,
    token_burst: Option<u64>,
    completion_tokens: Option<u64>,
    cool_down: Option<Duration>,
    rate_limited_retries: Option<u32>,
    retries: Option<u32>,
}

impl RateLimitBuilder {
    /// Requests per period (per minute by default). No request limit unless set.
    pub fn requests(mut self, n: u64) -> Self {
        self.requests = Some(n);
        self
    }

    /// Tokens per period (per minute by default). No token limit unless set.
    pub fn tokens(mut self, n: u64) -> Self {
        self.tokens = Some(n);
        self
    }

    /// The period the limits count over. Defaults to [`RateLimit::DEFAULT_PERIOD`].
    pub fn period(mut self, period: Duration) -> Self {
        self.period = Some(period);
        self
    }

    /// Requests that may go at once. Defaults to `requests / 60`, at least 1.
    pub fn burst(mut self, n: u64) -> Self {
        self.burst = Some(n);
        self
    }

    /// Tokens that may be spent at once. Defaults to `tokens / 60`, at least 1.
    pub fn token_burst(mut self, n: u64) -> Self {
        self.token_burst = Some(n);
        self
    }

    /// Tokens an answer is estimated to cost before it is known. Defaults to
    /// [`RateLimit::DEFAULT_COMPLETION_TOKENS`].
    pub fn completion_tokens(mut self, n: u64) -> Self {
        self.completion_tokens = Some(n);
        self
    }

    /// The cool-down after a 429 without `Retry-After`. Defaults to
    /// [`RateLimit::DEFAULT_COOL_DOWN`].
    pub fn cool_down(mut self, pause: Duration) -> Self {
        self.cool_down = Some(pause);
        self
    }

    /// How many 429s one call retries after. Defaults to
    /// [`RateLimit::DEFAULT_RATE_LIMITED_RETRIES`].
    pub fn rate_limited_retries(mut self, n: u32) -> Self {
        self.rate_limited_retries = Some(n);
        self
    }

    /// How many other transient failures one call retries. Defaults to
    /// [`RateLimit::DEFAULT_RETRIES`].
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = Some(n);
        self
    }

    /// Checks and builds.
    ///
    /// # Errors
    /// [`crate::Error::Config`] when no limit is set, a limit or burst is 0, or the period is
    /// shorter than 1 ms. Names the environment variable of the setting.
    pub fn build(self) -> Result<RateLimit> {
        let zero = |variable: &str, n: Option<u64>| -> Result<()> {
            match n {
                Some(0) => Err(config_error(variable, "0", "a whole number above 0")),
                _ => Ok(()),
            }
        };
        zero("LLM_RATE_LIMIT_RPM", self.requests)?;
        zero("LLM_RATE_LIMIT_TPM", self.tokens)?;
        zero("LLM_RATE_LIMIT_BURST", self.burst)?;
        zero("LLM_RATE_LIMIT_TOKEN_BURST", self.token_burst)?;
        if self.requests.is_none() && self.tokens.is_none() {
            return Err(config_error(
                "LLM_RATE_LIMIT_RPM",
                "",
                "a requests or tokens limit (LLM_RATE_LIMIT_RPM or LLM_RATE_LIMIT_TPM)",
            ));
        }
        let period = self.period.unwrap_or(RateLimit::DEFAULT_PERIOD);
        if period < Duration::from_millis(1) {
            return Err(config_error(
                "LLM_RATE_LIMIT_PERIOD_MS",
                &format!("{period:?}"),
                "a period of at least 1 ms",
            ));
        }
        Ok(RateLimit {
            requests: self.requests,
            tokens: self.tokens,
            period,
            burst: self
                .burst
                .unwrap_or_else(|| (self.requests.unwrap_or(0) / 60).max(1)),
            token_burst: self
                .token_burst
                .unwrap_or_else(|| (self.tokens.unwrap_or(0) / 60).max(1)),
            completion_tokens: self
                .completion_tokens
                .unwrap_or(RateLimit::DEFAULT_COMPLETION_TOKENS),
            cool_down: self.cool_down.unwrap_or(RateLimit::DEFAULT_COOL_DOWN),
            rate_limited_retries: self
                .rate_limited_retries
                .unwrap_or(RateLimit::DEFAULT_RATE_LIMITED_RETRIES),
            retries: self.retries.unwrap_or(RateLimit::DEFAULT_RETRIES),
        })
    }
}

/// The tokens of a prompt as this crate estimates them without a tokenizer: for each message,
/// [`estimate_text_tokens`] of its content plus 4 (role and separators, as OpenAI counts chat
/// messages), plus 3 for the reply's priming. English prose comes out within about 20% of
/// OpenAI's tokenizers; the correction with the reported usage removes the error afterwards.
pub fn estimate_tokens(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| estimate_text_tokens(&m.content) + 4)
        .sum::<u64>()
        + 3
}

/// One token per 4 bytes of text, rounded up (OpenAI's rule of thumb for English).
pub fn estimate_text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
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
    fn unset_is_no_limit_and_defaults_are_documented() {
        assert_eq!(RateLimit::from_vars(&vars(&[])).unwrap(), None);
        assert_eq!(
            RateLimit::from_vars(&vars(&[("LLM_RATE_LIMIT_RPM", " ")])).unwrap(),
            None
        );
        let l = RateLimit::from_vars(&vars(&[("LLM_RATE_LIMIT_RPM", "600")]))
            .unwrap()
            .unwrap();
        assert_eq!(l.requests, Some(600));
        assert_eq!(l.tokens, None);
        assert_eq!(l.burst, 10);
        assert_eq!(l.period, Duration::from_secs(60));
        let l = RateLimit::from_vars(&vars(&[
            ("LLM_RATE_LIMIT_TPM", "30"),
            ("LLM_RATE_LIMIT_PERIOD_MS", "1000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((l.requests, l.tokens, l.token_burst), (None, Some(30), 1));
        assert_eq!(l.period, Duration::from_secs(1));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("LLM_RATE_LIMIT_RPM", "lots"),
            ("LLM_RATE_LIMIT_RPM", "0"),
            ("LLM_RATE_LIMIT_RPM", "-5"),
            ("LLM_RATE_LIMIT_TPM", "1.5"),
            ("LLM_RATE_LIMIT_BURST", "0"),
            ("LLM_RATE_LIMIT_TOKEN_BURST", "x"),
            ("LLM_RATE_LIMIT_PERIOD_MS", "0"),
        ] {
            let err = RateLimit::from_vars(&vars(&[("LLM_RATE_LIMIT_RPM", "60"), (k, v)]))
                .map(|_| ())
                .err();
            let err = err.unwrap_or_else(|| panic!("{k}={v} accepted"));
            assert!(err.to_string().contains(k), "{k}={v}: {err}");
        }
        // A burst alone limits nothing: said, not ignored.
        let err = RateLimit::from_vars(&vars(&[("LLM_RATE_LIMIT_BURST", "5")])).unwrap_err();
        assert!(err.to_string().contains("LLM_RATE_LIMIT_BURST"), "{err}");
    }

    #[test]
    fn names_leave_credentials_out_and_estimates_count_every_message() {
        let name = RateLimit::name("http://u:secret@host/v1", "gpt");
        assert!(!name.contains("secret") && name.ends_with("|gpt"), "{name}");
        let m = [
            Message::new("system", "abcd"),
            Message::new("user", "abcde"),
        ];
        assert_eq!(estimate_tokens(&m), (1 + 4) + (2 + 4) + 3);
    }
}
