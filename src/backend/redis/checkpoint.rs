//! Durable checkpoints: `index_done_callback` returns once what was written before the call is
//! on the server's disk.
//!
//! | server persistence | what a checkpoint does | durable after it returns |
//! |---|---|---|
//! | AOF, `appendfsync always` | nothing: every acknowledged write was fsynced before its reply | every acknowledged write |
//! | AOF, `appendfsync everysec`, Redis ≥ 7.2 / Valkey | writes a marker key, then `WAITAOF 1 0` on the same connection, on every master | every write before the call |
//! | AOF, `appendfsync everysec`, Redis 7.0 | waits out the fsync interval (2 s) | every write before the call |
//! | AOF, `appendfsync no` | warns once; the OS decides when to write | nothing guaranteed |
//! | RDB only | `BGSAVE`, or joins a save that started after the call, and waits for it; a failed save is an error | every write before the call |
//!
//! `WAITAOF` waits only until the *calling connection's* last write is fsynced: on a connection
//! that wrote nothing it returns at once, whatever other connections (write-behind senders,
//! other threads and processes) wrote. So the checkpoint first writes a marker key on the
//! connection it will wait on. The server runs commands one at a time, so every write
//! acknowledged to anyone before the marker sits before it in the AOF, and the fsync that
//! covers the marker covers them. The marker is `{prefix}:checkpoint-marker` (in a cluster with
//! a `{hash tag}` that lands on a slot of the master being checkpointed), expires after an hour,
//! and lies outside every namespace: a namespace's keys are `{prefix}:{namespace}:{id}`, and the
//! marker has no second `:`.
//! | saving not allowed (ACL, renamed commands) | warns once | nothing guaranteed |
//!
//! Concurrent and back-to-back calls, from any namespace or thread of one
//! [`Storage`](crate::Storage), share saves: a caller waits for the first save that *starts*
//! after its call, so N callers arriving together cost one save, not N.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Runs at most one checkpoint at a time and lets callers share them.
#[derive(Debug, Default)]
pub(crate) struct Coalescer {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Checkpoints started so far.
    started: u64,
    /// Checkpoints finished so far (equal to `started` when none runs).
    finished: u64,
    /// Outcome of the last finished checkpoint.
    last: Option<Result<(), String>>,
}

impl Coalescer {
    /// Returns the outcome of a checkpoint that started after this call began: runs `save`
    /// itself when none is running, otherwise waits for the running one and then the next.
    pub(crate) fn run(&self, save: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // A checkpoint running now may have started before this call's writes: only the next
        // one to start is sure to include them.
        let target = st.started + 1;
        loop {
            if st.finished >= target {
                return st.last.clone().unwrap_or(Ok(()));
            }
            if st.started == st.finished {
                st.started += 1;
                let gen = st.started;
                drop(st);
                // Whatever happens in `save`, the generation must finish or waiters hang.
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(save))
                    .unwrap_or_else(|_| Err("checkpoint panicked".to_string()));
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                st.finished = gen;
                st.last = Some(outcome.clone());
                self.done.notify_all();
                return outcome;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What the server's `INFO persistence` says, as far as checkpoints care.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Persistence {
    pub aof_enabled: bool,
    pub rdb_bgsave_in_progress: bool,
    /// Completed RDB saves since the server started (Redis ≥ 7.0), if reported.
    pub rdb_saves: Option<u64>,
    pub rdb_last_bgsave_ok: bool,
    pub aof_last_write_ok: bool,
}

impl Persistence {
    pub(crate) fn parse(info: &str) -> Persistence {
        let mut p = Persistence {
            rdb_last_bgsave_ok: true,
            aof_last_write_ok: true,
            ..Default::default()
        };
        for line in info.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "aof_enabled" => p.aof_enabled = v == "1",
                "rdb_bgsave_in_progress" => p.rdb_bgsave_in_progress = v == "1",
                "rdb_saves" => p.rdb_saves = v.parse().ok(),
                "rdb_last_bgsave_status" => p.rdb_last_bgsave_ok = v == "ok",
                "aof_last_write_status" => p.aof_last_write_ok = v == "ok",
                _ => {}
            }
        }
        p
    }
}

/// Sends commands to one server (a single server, or one cluster master by address).
pub(crate) trait PersistOps {
    /// Runs one command on that server.
    fn run(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<redis::Value>;
}

impl dyn PersistOps + '_ {
    fn info_persistence(&mut self) -> redis::RedisResult<String> {
        Ok(redis::from_redis_value(
            self.run(redis::cmd("INFO").arg("persistence"))?,
        )?)
    }

    fn appendfsync(&mut self) -> redis::RedisResult<String> {
        let pair: Vec<String> =
            redis::from_redis_value(self.run(redis::cmd("CONFIG").arg("GET").arg("appendfsync"))?)?;
        Ok(pair.get(1).cloned().unwrap_or_else(|| "everysec".into()))
    }

    fn version(&mut self) -> redis::RedisResult<(u32, u32)> {
        let info: String = redis::from_redis_value(self.run(redis::cmd("INFO").arg("server"))?)?;
        Ok(parse_version(&info))
    }

    /// `BGSAVE`: true when started, false when one is already running.
    fn bgsave(&mut self) -> redis::RedisResult<bool> {
        match self.run(&redis::cmd("BGSAVE")) {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("already in progress") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `WAITAOF 1 0 timeout_ms`: number of local fsyncs confirmed.
    fn waitaof(&mut self, timeout: Duration) -> redis::RedisResult<i64> {
        let r: Vec<i64> = redis::from_redis_value(
            self.run(
                redis::cmd("WAITAOF")
                    .arg(1)
                    .arg(0)
                    .arg(timeout.as_millis() as u64),
            )?,
        )?;
        Ok(r.first().copied().unwrap_or(0))
    }
}

/// The marker key's name after `{prefix}:` (see the module doc).
const MARKER: &str = "checkpoint-marker";
/// The marker expires by itself: it is only needed until its `WAITAOF` returns.
const MARKER_TTL_SECS: u64 = 3_600;

/// Writes the marker key on `ops`' connection. Returns false when the server owns no slot (a
/// cluster master without slots receives no writes, so there is nothing to wait for).
fn write_marker(ops: &mut dyn PersistOps, key_prefix: &str) -> redis::RedisResult<bool> {
    let info: String = redis::from_redis_value(ops.run(redis::cmd("INFO").arg("cluster"))?)?;
    let key = if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        let nodes: String = redis::from_redis_value(ops.run(redis::cmd("CLUSTER").arg("NODES"))?)?;
        let slots = own_stable_slots(&nodes);
        if slots.is_empty() {
            return Ok(false);
        }
        marker_in_slots(key_prefix, &slots)
    } else {
        format!("{key_prefix}:{MARKER}")
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ops.run(
        redis::cmd("SET")
            .arg(&key)
            .arg(now_ms)
            .arg("EX")
            .arg(MARKER_TTL_SECS),
    )?;
    Ok(true)
}

/// The slots the answering node (`myself` in `CLUSTER NODES`) serves, less those it is
/// migrating away (a new key there would be redirected with ASK).
fn own_stable_slots(nodes: &str) -> Vec<u16> {
    let Some(line) = nodes.lines().find(|l| {
        l.split_whitespace()
            .nth(2)
            .is_some_and(|flags| flags.split(',').any(|f| f == "myself"))
    }) else {
        return Vec::new();
    };
    let mut slots = Vec::new();
    let mut migrating = Vec::new();
    for range in line.split_whitespace().skip(8) {
        if let Some(m) = range.strip_prefix('[') {
            if let Some((slot, _)) = m.split_once("->-") {
                migrating.extend(slot.parse::<u16>().ok());
            }
            continue;
        }
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
            slots.extend(a..=b.min(16_383));
        }
    }
    slots.retain(|s| !migrating.contains(s));
    slots
}

/// A marker key whose hash tag puts it in one of `slots` (which must not be empty).
fn marker_in_slots(key_prefix: &str, slots: &[u16]) -> String {
    let mut owned = vec![false; 16_384];
    for &s in slots {
        owned[s as usize] = true;
    }
    // Tags 0, 1, 2, ... hash to slots spread over all 16384: a node serving k slots is hit
    // after about 16384 / k tries, microseconds each.
    (0u32..)
        .map(|n| format!("{key_prefix}:{MARKER}{{{n}}}"))
        .find(|k| owned[super::cluster::key_slot(k.as_bytes()) as usize])
        .unwrap_or_default()
}

/// Outcome of one server checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Durable {
    /// What was written before is on disk.
    Yes,
    /// Nothing can be made durable; the reason is worth one warning.
    Unsupported(String),
}

/// Makes everything written before the call durable on one server. `key_prefix` names the
/// marker key written before `WAITAOF` (see the module doc).
pub(crate) fn checkpoint_server(
    ops: &mut dyn PersistOps,
    timeout: Duration,
    key_prefix: &str,
) -> redis::RedisResult<Durable> {
    let deadline = Instant::now() + timeout;
    let p = Persistence::parse(&ops.info_persistence()?);
    if p.aof_enabled {
        let policy = match ops.appendfsync() {
            Ok(p) => p,
            // CONFIG is often denied by ACL: assume the default policy, which is the one that
            // needs waiting.
            Err(e) if crate::error::is_noperm(&e) => "everysec".to_string(),
            Err(e) => return Err(e),
        };
        return match policy.as_str() {
            "always" => Ok(Durable::Yes),
            "no" => Ok(Durable::Unsupported(
                "the server runs AOF with appendfsync no: the OS decides when writes reach disk"
                    .into(),
            )),
            _ => {
                if ops.version().map(|v| v >= (7, 2)).unwrap_or(false) {
                    match write_marker(ops, key_prefix) {
                        Ok(true) => return waitaof_checkpoint(ops, timeout),
                        Ok(false) => return Ok(Durable::Yes),
                        // A user whose ACL forbids the marker key, or a full server with
                        // `noeviction`: the WAITAOF would prove nothing, so fall back to waiting
                        // out the fsync interval as on 7.0.
                        Err(e) if crate::error::is_noperm(&e) || e.code() == Some("OOM") => {
                            log::debug!(
                                "checkpoint marker refused ({e}); waiting out the AOF fsync \
                                 interval instead of WAITAOF"
                            );
                        }
                        Err(e) => return Err(e),
                    }
                }
                // Redis 7.0 has no WAITAOF: everysec fsyncs at least once a second, and delays
                // writes once an fsync is late by 2 s, so 2 s covers every write made before.
                std::thread::sleep(Duration::from_secs(2));
                let p = Persistence::parse(&ops.info_persistence()?);
                if !p.aof_last_write_ok {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "the server reports a failed AOF write (aof_last_write_status:err)",
                    )));
                }
                Ok(Durable::Yes)
            }
        };
    }
    rdb_checkpoint(ops, p, deadline)
}

/// `WAITAOF 1 0` right after this connection's marker write: returns once the local AOF is
/// fsynced up to the marker, hence up to every write acknowledged before it.
fn waitaof_checkpoint(ops: &mut dyn PersistOps, timeout: Duration) -> redis::RedisResult<Durable> {
    if ops.waitaof(timeout)? >= 1 {
        return Ok(Durable::Yes);
    }
    // A client-side kind, not Io: the connection is fine and the outcome is final, so it must
    // neither discard the connection nor be retried.
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "WAITAOF timed out before the local AOF fsync",
    )))
}

/// RDB: wait for a save that started after this call to complete.
fn rdb_checkpoint(
    ops: &mut dyn PersistOps,
    first: Persistence,
    deadline: Instant,
) -> redis::RedisResult<Durable> {
    let Some(saves0) = first.rdb_saves else {
        return legacy_rdb_checkpoint(ops, first, deadline);
    };
    // Redis counts a save in `rdb_saves` when it *starts* (failed ones included), and saves
    // run one at a time. Whether or not one runs now (it may predate our writes), the save we
    // need is the next to start: number saves0 + 1. Any save numbered from there on covers our
    // writes; `rdb_last_bgsave_status` is the outcome of the newest finished one, which is
    // number `rdb_saves`, or `rdb_saves - 1` while another runs. So once that number reaches
    // the target, the status answers for a save that covers this call.
    let target = saves0 + 1;
    let mut p = first;
    let mut pause = Duration::from_millis(5);
    loop {
        let saves = p.rdb_saves.unwrap_or(0);
        let newest_finished = if p.rdb_bgsave_in_progress {
            saves.saturating_sub(1)
        } else {
            saves
        };
        if newest_finished >= target {
            if p.rdb_last_bgsave_ok {
                return Ok(Durable::Yes);
            }
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the RDB save covering this checkpoint failed on the server \
                 (rdb_last_bgsave_status:err): the writes are not on disk; see the server log \
                 (e.g. its `dir` missing or not writable, or the disk full)",
            )));
        }
        if !p.rdb_bgsave_in_progress {
            // Started, or found one already running (started after our INFO, so it counts).
            ops.bgsave()?;
        }
        if Instant::now() >= deadline {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "timed out waiting for BGSAVE to finish",
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
        p = Persistence::parse(&ops.info_persistence()?);
    }
}

/// Servers without `rdb_saves` (before 7.0): BGSAVE, then wait until no save runs.
fn legacy_rdb_checkpoint(
    ops: &mut dyn PersistOps,
    first: Persistence,
    deadline: Instant,
) -> redis::RedisResult<Durable> {
    let mut p = first;
    while p.rdb_bgsave_in_progress {
        if Instant::now() >= deadline {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "timed out waiting for a running BGSAVE",
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
        p = Persistence::parse(&ops.info_persistence()?);
    }
    ops.bgsave()?;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        p = Persistence::parse(&ops.info_persistence()?);
        if !p.rdb_bgsave_in_progress {
            return if p.rdb_last_bgsave_ok {
                Ok(Durable::Yes)
            } else {
                Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "BGSAVE failed on the server",
                )))
            };
        }
        if Instant::now() >= deadline {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "timed out waiting for BGSAVE to finish",
            )));
        }
    }
}

/// (major, minor) from `INFO server`'s `redis_version:7.0.15`.
pub(crate) fn parse_version(info: &str) -> (u32, u32) {
    info.lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))
        .map(|v| {
            let mut it = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
            (it.next().unwrap_or(0), it.next().unwrap_or(0))
        })
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn concurrent_callers_share_saves() {
        let c = Arc::new(Coalescer::default());
        let runs = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (c, runs) = (c.clone(), runs.clone());
                std::thread::spawn(move || {
                    c.run(|| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        // The first caller runs one save; everyone who arrived during it shares the next.
        let n = runs.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} saves for 16 callers");
    }

    #[test]
    fn errors_reach_every_waiter() {
        let c = Coalescer::default();
        assert_eq!(c.run(|| Err("boom".into())), Err("boom".into()));
        assert_eq!(c.run(|| Ok(())), Ok(()));
    }

    #[test]
    fn marker_lands_on_an_own_stable_slot() {
        let nodes = "\
a1 127.0.0.1:7000@17000 master - 0 0 1 connected 0-5460\n\
b2 127.0.0.1:7001@17001 myself,master - 0 0 2 connected 5461-5470 5480 [5461->-a1] [5462-<-a1]\n\
c3 127.0.0.1:7002@17002 slave b2 0 0 2 connected\n";
        let slots = own_stable_slots(nodes);
        assert_eq!(slots.len(), 10);
        assert!(!slots.contains(&5461) && slots.contains(&5480));
        let key = marker_in_slots("p", &slots);
        assert!(key.starts_with("p:checkpoint-marker{"), "{key}");
        assert!(slots.contains(&super::super::cluster::key_slot(key.as_bytes())));
        // A namespace's keys are `p:{ns}:{id}`: the marker has a single `:`.
        assert_eq!(key.matches(':').count(), 1);
        assert!(own_stable_slots("x 1:1@2 master - 0 0 1 connected 0-10\n").is_empty());
    }

    #[test]
    fn parses_info() {
        let p = Persistence::parse(
            "# Persistence\r\nrdb_bgsave_in_progress:1\r\nrdb_saves:4\r\naof_enabled:1\r\nrdb_last_bgsave_status:err\r\n",
        );
        assert!(p.aof_enabled && p.rdb_bgsave_in_progress && !p.rdb_last_bgsave_ok);
        assert_eq!(p.rdb_saves, Some(4));
        assert_eq!(
            parse_version("# Server\r\nredis_version:7.0.15\r\n"),
            (7, 0)
        );
    }
}
