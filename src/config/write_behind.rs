//! The write-behind queue's configuration: [`WriteBehindConfig`], its builder and its
//! environment variables (`KV_WRITE_BEHIND*`).
//!
//! It lives with the rest of the configuration, not with the queue, so `config` does not
//! depend on `write_behind` (the queue depends on its configuration, not the other way).

use std::collections::HashMap;
use std::time::Duration;

use super::{config_error, parse_bool, parse_u64};
use crate::error::Result;

/// Default of [`WriteBehindConfig::batch_items`].
pub const DEFAULT_BATCH_ITEMS: usize = 256;
/// Default of [`WriteBehindConfig::batch_bytes`]: 4 MiB.
pub const DEFAULT_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Default of [`WriteBehindConfig::max_delay`].
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(5);
/// Default of [`WriteBehindConfig::capacity`].
pub const DEFAULT_CAPACITY: usize = 16_384;
/// Default of [`WriteBehindConfig::capacity_bytes`]: 256 MiB.
pub const DEFAULT_CAPACITY_BYTES: usize = 256 * 1024 * 1024;
/// Default of [`WriteBehindConfig::enqueue_timeout`].
pub const DEFAULT_ENQUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`WriteBehindConfig::flush_timeout`].
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`WriteBehindConfig::in_flight`].
pub const DEFAULT_IN_FLIGHT: usize = 4;

/// How the write-behind queue (`write_behind::WriteBehind`) batches and bounds itself. Build it
/// with [`WriteBehindConfig::builder`], [`WriteBehindConfig::from_env`] or
/// [`WriteBehindConfig::from_vars`].
///
/// The defaults were chosen by measurement: see `docs/BENCHMARKS.md` and the bench
/// `benches/write_behind.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteBehindConfig {
    /// Most writes per batch. Defaults to 256.
    ///
    /// Measured with 8 threads of single 2 KB upserts into Redis: batches of 32 to 512 gave the
    /// same throughput within noise, while 1024 was slower (the client encodes a whole batch
    /// before Redis sees any of it, so the two stop overlapping). 256 is in the flat part. It
    /// stays one pipeline of the Redis backend (its chunk is 1000), and it keeps small what one
    /// retry re-sends.
    pub batch_items: usize,
    /// Most bytes of JSON per batch, estimated without serializing. Defaults to 4 MiB.
    ///
    /// This bounds one batch when values are large: 256 documents of 100 KB would otherwise
    /// make a 25 MB pipeline.
    pub batch_bytes: usize,
    /// Most time a write waits for its batch to fill before the batch is sent anyway. Defaults
    /// to 5 ms.
    ///
    /// Under load, batches fill by count long before this: 0 and 5 ms measured the same. At a
    /// trickle of writes, it trades a few milliseconds for far fewer round trips.
    pub max_delay: Duration,
    /// Most writes queued (accepted and not yet taken by the flusher) before writers block.
    /// Defaults to 16384 (64 batches: about 32 MB of 2 KB values).
    ///
    /// It bounds memory and what a crash can lose. 64 batches let writers run on while one
    /// batch is in flight, and they absorb short stalls: at the ~50k writes/s measured here,
    /// about 0.3 s of writes. A longer outage makes writers wait (backpressure, not loss).
    /// A single call larger than this is accepted when the queue is empty.
    pub capacity: usize,
    /// Most bytes of queued values (accepted and not yet taken by the flusher) before writers
    /// block, whichever of this and [`WriteBehindConfig::capacity`] is reached first. Defaults
    /// to 256 MiB.
    ///
    /// The item bound alone does not bound memory: 16,384 queued documents of 1 MB are 16 GB
    /// during an outage. A value counts as its estimated JSON length (the id's length plus the
    /// value's, escapes not counted; the same estimate as [`WriteBehindConfig::batch_bytes`]),
    /// computed once when it is queued; the count is released when the flusher takes the
    /// value off the queue. The flusher holds at most `in_flight` batches and one being cut
    /// besides, each at most `batch_bytes` (or one value), so the values held by the queue stay
    /// below about `capacity_bytes + (in_flight + 1) * batch_bytes`. A single call larger than
    /// this is accepted when the queue is empty, as for `capacity`: refusing it would make a
    /// large document impossible to write at all.
    pub capacity_bytes: usize,
    /// How long a writer waits for room in a full queue before its call fails (the write is
    /// then not taken). Defaults to 30 s.
    ///
    /// That is long enough to ride out a Redis restart or failover. A write that cannot get in
    /// after that much time means the backend is down, which the caller must hear about.
    pub enqueue_timeout: Duration,
    /// Deadline of [`WriteBehind::flush`] (and of `index_done_callback`, `clear` and `stats`,
    /// which flush first), and of the final flush at [`WriteBehind::close`] and drop. Defaults
    /// to 30 s.
    ///
    /// [`WriteBehind::flush`]: crate::write_behind::WriteBehind::flush
    /// [`WriteBehind::close`]: crate::write_behind::WriteBehind::close
    pub flush_timeout: Duration,
    /// Most batches taken from the queue and not yet acknowledged, each sent by its own sender
    /// thread (on its own pooled connection). Defaults to 4.
    ///
    /// With one, the next batch waits for the previous one's round trip; with more, it is
    /// encoded and sent meanwhile, and batches are encoded on several cores. Measured with 8
    /// threads of single 2 KB upserts into a local Redis on 2 cores (medians of 3 interleaved
    /// runs, items/s): 1, 2, 3, 4 in flight gave 52.6k, 61.7k, 64.3k, 68.3k with lz4 and 74k,
    /// 86k, 89k, 94k without compression. Batches in flight never share an id (a
    /// batch ends before a write whose id is still being sent), so per-id order and retries
    /// are as with one. Each costs a thread and, while it sends, a connection; and a crash can
    /// lose that many batches besides the queue.
    pub in_flight: usize,
}

impl Default for WriteBehindConfig {
    fn default() -> Self {
        WriteBehindConfig {
            batch_items: DEFAULT_BATCH_ITEMS,
            batch_bytes: DEFAULT_BATCH_BYTES,
            max_delay: DEFAULT_MAX_DELAY,
            capacity: DEFAULT_CAPACITY,
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            enqueue_timeout: DEFAULT_ENQUEUE_TIMEOUT,
            flush_timeout: DEFAULT_FLUSH_TIMEOUT,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// The variable that turns write-behind on.
pub const ENV_ENABLED: &str = "KV_WRITE_BEHIND";
/// Variable of [`WriteBehindConfig::batch_items`].
pub const ENV_BATCH: &str = "KV_WRITE_BEHIND_BATCH";
/// Variable of [`WriteBehindConfig::batch_bytes`].
pub const ENV_BATCH_BYTES: &str = "KV_WRITE_BEHIND_BATCH_BYTES";
/// Variable of [`WriteBehindConfig::max_delay`], in milliseconds.
pub const ENV_DELAY_MS: &str = "KV_WRITE_BEHIND_DELAY_MS";
/// Variable of [`WriteBehindConfig::capacity`].
pub const ENV_CAPACITY: &str = "KV_WRITE_BEHIND_CAPACITY";
/// Variable of [`WriteBehindConfig::capacity_bytes`].
pub const ENV_CAPACITY_BYTES: &str = "KV_WRITE_BEHIND_CAPACITY_BYTES";
/// Variable of [`WriteBehindConfig::enqueue_timeout`], in milliseconds.
pub const ENV_ENQUEUE_TIMEOUT_MS: &str = "KV_WRITE_BEHIND_ENQUEUE_TIMEOUT_MS";
/// Variable of [`WriteBehindConfig::flush_timeout`], in milliseconds.
pub const ENV_FLUSH_TIMEOUT_MS: &str = "KV_WRITE_BEHIND_FLUSH_TIMEOUT_MS";
/// Variable of [`WriteBehindConfig::in_flight`].
pub const ENV_IN_FLIGHT: &str = "KV_WRITE_BEHIND_IN_FLIGHT";

/// Most batches in flight accepted: each is a thread.
const MAX_IN_FLIGHT: usize = 64;

/// Accepted ranges: (variable, min, max).
const LIMITS: [(&str, u64, u64); 8] = [
    (ENV_BATCH, 1, 1_000_000),
    (ENV_BATCH_BYTES, 1, 1 << 30),
    (ENV_DELAY_MS, 0, 3_600_000),
    (ENV_CAPACITY, 1, 100_000_000),
    (ENV_CAPACITY_BYTES, 1, 1 << 40),
    (ENV_ENQUEUE_TIMEOUT_MS, 0, 86_400_000),
    (ENV_FLUSH_TIMEOUT_MS, 1, 86_400_000),
    (ENV_IN_FLIGHT, 1, MAX_IN_FLIGHT as u64),
];

impl WriteBehindConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> WriteBehindConfigBuilder {
        WriteBehindConfigBuilder {
            config: WriteBehindConfig::default(),
        }
    }

    /// The configuration from the process environment: `None` unless `KV_WRITE_BEHIND` is true
    /// (see the module docs for the variables).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the first variable whose value cannot be used (including one
    /// that is not valid UTF-8).
    pub fn from_env() -> Result<Option<WriteBehindConfig>> {
        let mut vars = HashMap::new();
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str() else { continue };
            if !k.starts_with(ENV_ENABLED) {
                continue;
            }
            match v.into_string() {
                Ok(v) => {
                    vars.insert(k.to_string(), v);
                }
                Err(_) => return Err(config_error(k, "<not UTF-8>", "UTF-8 text")),
            }
        }
        Self::from_vars(&vars)
    }

    /// The configuration from the given variables, as [`WriteBehindConfig::from_env`] reads
    /// them from the environment.
    ///
    /// Returns `None` when `KV_WRITE_BEHIND` is unset, empty or false. The other variables are
    /// checked even then, so a typo is reported before the day it is switched on.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the variable whose value cannot be used.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<WriteBehindConfig>> {
        let get = |k: &str| {
            vars.get(k)
                .map(String::as_str)
                .filter(|v| !v.trim().is_empty())
        };
        let enabled = match get(ENV_ENABLED) {
            Some(v) => parse_bool(ENV_ENABLED, v)?,
            None => false,
        };
        let mut b = WriteBehindConfig::builder();
        for (variable, min, max) in LIMITS {
            let Some(v) = get(variable) else { continue };
            let n = parse_u64(variable, v, min, max)?;
            b = match variable {
                ENV_BATCH => b.batch_items(n as usize),
                ENV_BATCH_BYTES => b.batch_bytes(n as usize),
                ENV_DELAY_MS => b.max_delay(Duration::from_millis(n)),
                ENV_CAPACITY => b.capacity(n as usize),
                ENV_CAPACITY_BYTES => b.capacity_bytes(n as usize),
                ENV_ENQUEUE_TIMEOUT_MS => b.enqueue_timeout(Duration::from_millis(n)),
                ENV_IN_FLIGHT => b.in_flight(n as usize),
                _ => b.flush_timeout(Duration::from_millis(n)),
            };
        }
        let config = b.build()?;
        Ok(enabled.then_some(config))
    }
}

/// Builds a [`WriteBehindConfig`]; every setter takes and returns `self`.
#[derive(Debug, Clone)]
pub struct WriteBehindConfigBuilder {
    config: WriteBehindConfig,
}

impl WriteBehindConfigBuilder {
    /// Sets the most writes per batch.
    pub fn batch_items(mut self, n: usize) -> Self {
        self.config.batch_items = n;
        self
    }
    /// Sets the most bytes of JSON per batch.
    pub fn batch_bytes(mut self, n: usize) -> Self {
        self.config.batch_bytes = n;
        self
    }
    /// Sets the most time a write waits for its batch to fill.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.config.max_delay = d;
        self
    }
    /// Sets the most writes queued before writers block.
    pub fn capacity(mut self, n: usize) -> Self {
        self.config.capacity = n;
        self
    }
    /// Sets the most bytes of values queued before writers block.
    pub fn capacity_bytes(mut self, n: usize) -> Self {
        self.config.capacity_bytes = n;
        self
    }
    /// Sets how long a writer waits on a full queue.
    pub fn enqueue_timeout(mut self, d: Duration) -> Self {
        self.config.enqueue_timeout = d;
        self
    }
    /// Sets the deadline of `flush`, `close` and drop.
    pub fn flush_timeout(mut self, d: Duration) -> Self {
        self.config.flush_timeout = d;
        self
    }
    /// Sets the most batches being sent at once.
    pub fn in_flight(mut self, n: usize) -> Self {
        self.config.in_flight = n;
        self
    }

    /// Checks the settings and returns the configuration.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the variable of a setting that is 0 (all but the delay and the
    /// enqueue timeout must be above 0), or of `in_flight` above 64.
    pub fn build(self) -> Result<WriteBehindConfig> {
        let c = &self.config;
        for (variable, zero) in [
            (ENV_BATCH, c.batch_items == 0),
            (ENV_BATCH_BYTES, c.batch_bytes == 0),
            (ENV_CAPACITY, c.capacity == 0),
            (ENV_CAPACITY_BYTES, c.capacity_bytes == 0),
            (ENV_FLUSH_TIMEOUT_MS, c.flush_timeout.is_zero()),
            (ENV_IN_FLIGHT, c.in_flight == 0),
        ] {
            if zero {
                return Err(config_error(variable, "0", "a whole number above 0"));
            }
        }
        if c.in_flight > MAX_IN_FLIGHT {
            return Err(config_error(
                ENV_IN_FLIGHT,
                &c.in_flight.to_string(),
                &format!("an integer from 1 to {MAX_IN_FLIGHT}"),
            ));
        }
        Ok(self.config)
    }
}
