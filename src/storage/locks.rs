//! The cross-process lock a stack offers: [`Locks`], with one implementation per backend.
//!
//! A lock lives where the data lives, so whoever can read a store's data can see its locks:
//! Redis locks in the backend's own Redis, through its own pool (TLS, Sentinel, cluster and
//! ACL user included), and in-process locks for a JSON directory, which one process writes at a
//! time anyway (its directory lock). [`crate::Storage::locks`] hands out the right one, so a
//! user such as [`crate::llm_cache::LlmCache`] works the same on every stack and never reaches
//! around it to a backend.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::backend::redis::RedisShared;
use crate::error::{Error, Result};

/// Named, expiring, exclusive locks shared by every process that uses the same storage.
///
/// A lock is taken with [`Locks::try_lock`] and held until its [`LockGuard`] is dropped. A
/// holder that dies without dropping its guard loses the lock after `ttl` (Redis), so a lock
/// never blocks others forever; while the guard lives, the lock is kept alive.
pub trait Locks: Send + Sync + fmt::Debug {
    /// Takes the lock `name` for `ttl` (renewed while the guard lives): `Some` when this caller
    /// holds it now, `None` when another holder does. Taking a lock the caller already holds
    /// through another guard is `None` too: holders are guards, not threads.
    ///
    /// # Errors
    /// Backend failures (Redis unreachable, timeout, ACL refusal), as the backend reports them.
    fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockGuard>>;

    /// Where other processes see the lock `name` (the Redis key), or `None` when the lock is
    /// visible to this process only.
    fn key(&self, name: &str) -> Option<String>;
}

/// A held lock: dropping it releases the lock (only if it is still this holder's).
pub struct LockGuard {
    _held: Box<dyn Send>,
}

impl LockGuard {
    /// Wraps whatever releases the lock when dropped: for implementations of [`Locks`] outside
    /// this crate.
    pub fn new(held: impl Send + 'static) -> LockGuard {
        LockGuard {
            _held: Box::new(held),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard").finish_non_exhaustive()
    }
}

/// Locks in this process only: for the JSON backend, whose directory lock already keeps other
/// writing processes out. `ttl` is not needed: a holder in this process releases its lock when
/// its guard drops, even while unwinding.
#[derive(Debug, Default)]
pub struct LocalLocks {
    /// Names held now. A `std::sync::Mutex`: held for one set operation, never across work.
    held: Arc<Mutex<HashSet<String>>>,
}

impl Locks for LocalLocks {
    fn try_lock(&self, name: &str, _ttl: Duration) -> Result<Option<LockGuard>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !held.insert(name.to_string()) {
            return Ok(None);
        }
        Ok(Some(LockGuard::new(LocalHeld {
            held: self.held.clone(),
            name: name.to_string(),
        })))
    }

    fn key(&self, _name: &str) -> Option<String> {
        None
    }
}

struct LocalHeld {
    held: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for LocalHeld {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Locks in Redis: `SET {key} {token} NX PX {ttl}` with a random owner token, renewed by a
/// background thread while held, released by a compare-and-delete script (never another
/// owner's lock). Keys are `{prefix}::lock:{name}`: a namespace can never be empty, so no
/// namespace's keys (`{prefix}:{namespace}:*`) include them, and `all_keys`, `clear`, `stats`,
/// export, migration and `list_namespaces` never see a lock.
#[derive(Debug)]
pub struct RedisLocks {
    shared: Arc<RedisShared>,
}

impl RedisLocks {
    /// Locks in the Redis of `shared`, through its pool.
    pub fn new(shared: Arc<RedisShared>) -> RedisLocks {
        RedisLocks { shared }
    }
}

impl Locks for RedisLocks {
    fn try_lock(&self, name: &str, ttl: Duration) -> Result<Option<LockGuard>> {
        let key = self.key_of(name);
        let token = owner_token();
        let ttl_ms = millis(ttl);
        let namespace = namespace_of(name);
        let acquire = eval(ACQUIRE, &key, &token, Some(ttl_ms));
        let owned: i64 = self
            .shared
            .with_conn("lock", &namespace, |c| acquire.query(c))?;
        if owned != 1 {
            return Ok(None);
        }
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let renewer = {
            let shared = self.shared.clone();
            let (key, token, ns) = (key.clone(), token.clone(), namespace.clone());
            let every = ttl / 3;
            std::thread::Builder::new()
                .name("kv-lock-renew".into())
                .spawn(move || {
                    renew_until_stopped(&shared, &ns, &key, &token, ttl_ms, every, stopped)
                })
                .map_err(|e| Error::Unavailable {
                    namespace: namespace.clone(),
                    reason: format!("cannot start the lock renewal thread: {e}"),
                })?
        };
        Ok(Some(LockGuard::new(HeldRedisLock {
            shared: self.shared.clone(),
            namespace,
            key,
            token,
            stop: Some(stop),
            renewer: Some(renewer),
        })))
    }

    fn key(&self, name: &str) -> Option<String> {
        Some(self.key_of(name))
    }
}

impl RedisLocks {
    fn key_of(&self, name: &str) -> String {
        format!("{}::lock:{name}", self.shared.config().key_prefix)
    }
}

/// The namespace a lock name starts with (`{namespace}:{rest}`), for error messages.
fn namespace_of(name: &str) -> String {
    name.split(':').next().unwrap_or(name).to_string()
}

// The lock scripts run with EVAL, not EVALSHA: they are tiny, and EVAL needs no SCRIPT LOAD,
// which a cluster would route to another node than the key's.

/// Takes the lock, or renews it when the caller already owns it (so a retry after a lost reply
/// is harmless): 1 when the caller owns the lock afterwards, 0 when someone else does.
const ACQUIRE: &str =
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end \
     if redis.call('GET', KEYS[1]) == ARGV[1] then \
       redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 \
     end \
     return 0";

/// Extends the lock's TTL only if the caller still owns it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
       return redis.call('PEXPIRE', KEYS[1], ARGV[2]) \
     end \
     return 0";

/// Deletes the lock only if the caller still owns it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
       return redis.call('DEL', KEYS[1]) \
     end \
     return 0";

/// `EVAL script 1 key token [ttl_ms]`.
fn eval(script: &str, key: &str, token: &str, ttl_ms: Option<u64>) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(1).arg(key).arg(token);
    if let Some(ms) = ttl_ms {
        cmd.arg(ms);
    }
    cmd
}

/// Renews the lock every `every` until the sender is dropped. A failed renewal is logged: the
/// lock may then expire while its holder works, and another process may take it (for the LLM
/// cache, a duplicate call, never a wrong answer).
fn renew_until_stopped(
    shared: &RedisShared,
    namespace: &str,
    key: &str,
    token: &str,
    ttl_ms: u64,
    every: Duration,
    stopped: Receiver<()>,
) {
    loop {
        match stopped.recv_timeout(every) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let renew = eval(RENEW, key, token, Some(ttl_ms));
        let renewed: Result<i64> = shared.with_conn("lock", namespace, |c| renew.query(c));
        match renewed {
            Ok(1) => {}
            Ok(_) => {
                log::warn!("lost the lock {key} (it expired); another process may take it");
                return;
            }
            Err(e) => log::warn!("cannot renew the lock {key}: {e}"),
        }
    }
}

/// A Redis lock this process owns. Dropping it stops the renewal thread (and joins it), then
/// releases the lock if it is still ours.
struct HeldRedisLock {
    shared: Arc<RedisShared>,
    namespace: String,
    key: String,
    token: String,
    /// Dropped to stop the renewal thread: a closed channel wakes it at once.
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl Drop for HeldRedisLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let release = eval(RELEASE, &self.key, &self.token, None);
        let released: Result<i64> = self
            .shared
            .with_conn("lock", &self.namespace, |c| release.query(c));
        if let Err(e) = released {
            // Not fatal: the lock expires by itself.
            log::warn!("cannot release the lock {}: {e}", self.key);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A token no other lock owner uses: 128 random bits, the process id and a counter.
fn owner_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per instance: enough randomness without a rand crate.
    let r = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!(
        "{:016x}{:016x}-{}-{}",
        r(),
        r(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens_differ() {
        let a = owner_token();
        let b = owner_token();
        assert_ne!(a, b);
        assert!(a.len() >= 34, "{a}");
    }

    #[test]
    fn local_locks_are_exclusive_until_the_guard_drops() {
        let locks = LocalLocks::default();
        let held = locks.try_lock("ns:a", Duration::from_secs(1)).unwrap();
        assert!(held.is_some());
        assert!(locks
            .try_lock("ns:a", Duration::from_secs(1))
            .unwrap()
            .is_none());
        assert!(locks
            .try_lock("ns:b", Duration::from_secs(1))
            .unwrap()
            .is_some());
        drop(held);
        assert!(locks
            .try_lock("ns:a", Duration::from_secs(1))
            .unwrap()
            .is_some());
        assert_eq!(locks.key("ns:a"), None);
    }
}
