//! Durable checkpoints: `index_done_callback` returns once what was written before the call is
//! on the server's disk.
//!
//! | server persistence | what a checkpoint does | durable after it returns |
//! |---|---|---|
//! | AOF, `appendfsync always` | nothing: every acknowledged write was fsynced before its reply | every acknowledged write |
//! | AOF, `appendfsync everysec`, Redis ≥ 7.2 | `WAITAOF 1 0` | every write before the call |
//! | AOF, `appendfsync everysec`, Redis 7.0 | waits out the fsync interval (2 s) | every write before the call |
//! | AOF, `appendfsync no` | warns once; the OS decides when to write | nothing guaranteed |
//! | RDB only | `BGSAVE`, or joins a save that started after the call, and waits for it | every write before the call |
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

/// Outcome of one server checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Durable {
    /// What was written before is on disk.
    Yes,
    /// Nothing can be made durable; the reason is worth one warning.
    Unsupported(String),
}

/// Makes everything written before the call durable on one server.
pub(crate) fn checkpoint_server(
    ops: &mut dyn PersistOps,
    timeout: Duration,
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
                    let n = ops.waitaof(timeout)?;
                    if n >= 1 {
                        return Ok(Durable::Yes);
                    }
                    // A client-side kind, not Io: the connection is fine and the outcome is
                    // final, so it must neither discard the connection nor be retried.
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "WAITAOF timed out before the local AOF fsync",
                    )));
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

/// RDB: wait for a save that started after this call to complete.
fn rdb_checkpoint(
    ops: &mut dyn PersistOps,
    first: Persistence,
    deadline: Instant,
) -> redis::RedisResult<Durable> {
    let Some(saves0) = first.rdb_saves else {
        return legacy_rdb_checkpoint(ops, first, deadline);
    };
    // Redis counts a save in `rdb_saves` when it *starts*. Whether or not one runs now (it
    // may predate our writes), the save we need is the next to start: number saves0 + 1. It
    // has finished once no save runs while the count reached it, or once a later one started.
    let target = saves0 + 1;
    let mut p = first;
    let mut asked = false;
    let mut pause = Duration::from_millis(5);
    loop {
        let saves = p.rdb_saves.unwrap_or(0);
        if (saves >= target && !p.rdb_bgsave_in_progress) || saves > target {
            if !p.rdb_last_bgsave_ok && saves == target {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "BGSAVE failed on the server (rdb_last_bgsave_status:err; see its log)",
                )));
            }
            return Ok(Durable::Yes);
        }
        if !p.rdb_bgsave_in_progress {
            if asked && !p.rdb_last_bgsave_ok {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "BGSAVE failed on the server (rdb_last_bgsave_status:err; see its log)",
                )));
            }
            // Started, or found one already running (started after our INFO, so it counts).
            ops.bgsave()?;
            asked = true;
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
