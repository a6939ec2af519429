//! The rate-limit capability a stack offers: [`Storage::rate_limiter`].

use std::sync::Arc;

use super::{Backend, Storage};
use crate::rate_limit::{LocalRateLimiter, RateLimiter, RedisRateLimiter};

impl Storage {
    /// The shared LLM budget this stack offers (see [`crate::rate_limit`]): in Redis, through
    /// this storage's own pool, for Redis and dual storages, so every process using the same
    /// Redis and key prefix shares it; in this process for JSON. Every call returns the same
    /// limiter.
    pub fn rate_limiter(&self) -> Arc<dyn RateLimiter> {
        self.shared
            .limiter
            .get_or_init(|| match &self.shared.backend {
                Backend::Json(_) => Arc::new(LocalRateLimiter::default()),
                Backend::Redis { redis, .. } | Backend::Dual { redis, .. } => {
                    Arc::new(RedisRateLimiter::new(redis.clone()))
                }
            })
            .clone()
    }
}
