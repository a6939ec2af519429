//! Remaining TTLs for [`super::migrate`]: read with PTTL on a Redis source, set with PEXPIRE
//! on a Redis target.

use std::sync::Arc;

use redis::Cmd;

use crate::backend::redis::{RedisShared, RedisStore};
use crate::error::{Error, Result};
use crate::store::KvStore;

/// TTL access for a copy: the source's PTTL and the target's PEXPIRE, when they are Redis.
#[derive(Default)]
pub(super) struct TtlCopy {
    pub(super) from: Option<RedisTtl>,
    pub(super) to: Option<RedisTtl>,
}

/// What PTTL said about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ttl {
    /// No expiry.
    Persistent,
    /// Milliseconds left.
    Remaining(i64),
    /// The key no longer exists.
    Gone,
}

/// Reads and sets TTLs of one namespace's keys on a Redis server or cluster.
///
/// The store API has no TTL operations (JSON has no expiry to offer), so these commands are
/// sent with the store's own key names through the backend's batch path
/// ([`RedisShared::run_batch`]): the same pool, TLS files (CA, client certificate), credentials,
/// cluster routing and retries as every other batch of the store, never a connection of its own.
pub(super) struct RedisTtl {
    shared: Arc<RedisShared>,
    store: RedisStore,
}

impl RedisTtl {
    pub(super) fn open(shared: &Arc<RedisShared>, namespace: &str) -> Result<RedisTtl> {
        Ok(RedisTtl {
            store: shared.namespace(namespace)?,
            shared: shared.clone(),
        })
    }

    /// Runs single-key, idempotent commands as one batch, one reply per command.
    fn run(&self, cmds: Vec<Cmd>) -> Result<Vec<redis::Value>> {
        const OPERATION: &str = "migrate";
        let namespace = self.store.namespace();
        self.shared
            .run_batch(OPERATION, namespace, cmds)?
            .into_iter()
            .map(|r| {
                r.map_err(|source| Error::Redis {
                    operation: OPERATION,
                    namespace: namespace.to_string(),
                    source,
                })
            })
            .collect()
    }

    pub(super) fn pttl(&self, ids: &[String]) -> Result<Vec<Ttl>> {
        let cmds = ids
            .iter()
            .map(|id| redis::cmd("PTTL").arg(self.store.key(id)).clone())
            .collect();
        let replies = self.run(cmds)?;
        Ok(replies
            .into_iter()
            .map(|v| match redis::from_redis_value::<i64>(v) {
                Ok(-2) => Ttl::Gone,
                Ok(ms) if ms > 0 => Ttl::Remaining(ms),
                // -1 (no expiry), or 0 ms left: the key is about to go; let the target's own
                // TTL apply rather than writing an already-expired key.
                _ => Ttl::Persistent,
            })
            .collect())
    }

    /// Sets each key's remaining TTL. Sent again after a connection failure, a PEXPIRE sets
    /// the same remaining time once more: the key outlives its source by at most the retry
    /// delay.
    pub(super) fn pexpire(&self, expiries: &[(String, i64)]) -> Result<()> {
        let cmds = expiries
            .iter()
            .map(|(id, ms)| {
                redis::cmd("PEXPIRE")
                    .arg(self.store.key(id))
                    .arg(*ms)
                    .clone()
            })
            .collect();
        self.run(cmds).map(|_| ())
    }
}
