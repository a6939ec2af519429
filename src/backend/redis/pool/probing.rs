//! The probing pool: an r2d2 pool whose checkout opens a missing connection on the caller's
//! thread, so a connect failure is reported at once with its cause, and which never holds or
//! opens more connections than its size (see the parent module's docs).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use r2d2::ManageConnection;
use redis::RedisError;

use crate::error::{ConnectFailure, Error};

/// A connection opened by a checkout's own connect attempt is handed out by the pool only if
/// it is younger than this; an older one is closed (the server may have dropped it meanwhile).
const PROBED_MAX_AGE: Duration = Duration::from_secs(10);

/// Why a checkout got no connection.
#[derive(Debug)]
pub(crate) enum NoConnection {
    /// A new connection failed: the client's own error, at once.
    Connect {
        /// The server, redacted.
        server: String,
        /// The connect error.
        source: RedisError,
    },
    /// No connection within the pool timeout, or every idle one failed its health check.
    Pool(String),
}

impl NoConnection {
    /// The crate error for a checkout that `operation` on `namespace` needed.
    pub(crate) fn into_error(self, operation: &'static str, namespace: &str) -> Error {
        match self {
            NoConnection::Connect { server, source } => Error::Connect {
                server,
                cause: ConnectFailure::of(&source),
                source,
            },
            NoConnection::Pool(message) => Error::Pool {
                operation,
                namespace: namespace.to_string(),
                message,
            },
        }
    }
}

/// An r2d2 manager that first hands out the connections [`ProbingPool::checkout`] opened, and
/// never opens a connection beyond the pool's size (see [`Slots`]).
pub(crate) struct Probing<M: ManageConnection> {
    shared: Arc<Probed<M>>,
}

/// The wrapped manager and the count of every connection the pool has open.
struct Probed<M: ManageConnection> {
    inner: M,
    slots: Mutex<Slots<M::Connection>>,
    /// Signalled when a connection joins `ready` or a slot is freed: r2d2's connect may be
    /// waiting for either.
    changed: Condvar,
    /// How long r2d2's connect waits for a slot or a ready connection (the pool timeout).
    wait: Duration,
}

/// Every connection of the pool, wherever it is, holds one of `max` slots.
///
/// r2d2 keeps its own count below the pool size, but it cannot see connections opened outside
/// it: when every checkout on an empty pool opened one ahead, 48 threads on a pool of 8 opened
/// 38 connections, and 3 pools of 100 under `maxclients` 428 had the server refuse hundreds
/// (handed out anyway, they failed their first command with "connection reset"). So a slot is
/// taken before any connection is opened, by a checkout or by r2d2's connect, and freed only
/// when that connection is closed (a failed open, a stale ready one, or r2d2 releasing it).
struct Slots<C> {
    /// Connections open or being opened: in `ready`, idle or in use in r2d2, or connecting.
    open: u32,
    /// The pool size.
    max: u32,
    /// Few and short-lived: a checkout pushes one and the pool's connect, triggered right
    /// after by the same checkout, pops it. A `Mutex<Vec>` is plenty.
    ready: Vec<(Instant, C)>,
}

impl<M: ManageConnection> Probed<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots<M::Connection>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back `n` slots of connections that were closed (or never opened).
    fn free(&self, n: u32) {
        if n > 0 {
            let mut slots = self.lock();
            slots.open = slots.open.saturating_sub(n);
            drop(slots);
            self.changed.notify_all();
        }
    }
}

impl<C> Slots<C> {
    /// Removes the ready connections older than [`PROBED_MAX_AGE`] and frees their slots; the
    /// caller closes them by dropping them.
    fn take_stale(&mut self) -> Vec<(Instant, C)> {
        let (stale, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ready)
            .into_iter()
            .partition(|(at, _)| at.elapsed() >= PROBED_MAX_AGE);
        self.ready = fresh;
        self.open = self.open.saturating_sub(stale.len() as u32);
        stale
    }
}

impl<M: ManageConnection<Error = RedisError>> ManageConnection for Probing<M> {
    type Connection = M::Connection;
    type Error = RedisError;

    fn connect(&self) -> Result<M::Connection, RedisError> {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.wait;
        let mut slots = shared.lock();
        loop {
            let stale = slots.take_stale();
            if !stale.is_empty() {
                shared.changed.notify_all();
            }
            if let Some((_, c)) = slots.ready.pop() {
                return Ok(c);
            }
            if slots.open < slots.max {
                slots.open += 1;
                drop(slots);
                drop(stale);
                return shared.inner.connect().inspect_err(|_| shared.free(1));
            }
            // Every slot is held, some by a checkout that is opening a connection (r2d2 asks
            // only while its own count is below the size): that connection is handed over
            // through `ready`, or its slot freed, within the connect timeout.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "no connection slot",
                    format!("all {} connections of the pool are open", slots.max),
                )));
            }
            slots = shared
                .changed
                .wait_timeout(slots, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn is_valid(&self, c: &mut M::Connection) -> Result<(), RedisError> {
        self.shared.inner.is_valid(c)
    }

    fn has_broken(&self, c: &mut M::Connection) -> bool {
        self.shared.inner.has_broken(c)
    }
}

/// Frees a connection's slot when r2d2 closes it (broken, or idle past the idle timeout).
struct Release<M: ManageConnection> {
    shared: Arc<Probed<M>>,
}

impl<M: ManageConnection> std::fmt::Debug for Release<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Release")
    }
}

impl<M: ManageConnection<Error = RedisError>> r2d2::CustomizeConnection<M::Connection, RedisError>
    for Release<M>
{
    fn on_release(&self, conn: M::Connection) {
        drop(conn);
        self.shared.free(1);
    }
}

/// An r2d2 pool whose checkout reports a connect failure at once (see the module docs).
pub(crate) struct ProbingPool<M: ManageConnection<Error = RedisError>> {
    pool: r2d2::Pool<Probing<M>>,
    shared: Arc<Probed<M>>,
    pool_timeout: Duration,
    /// The server as named in errors, with any password redacted.
    server: String,
}

impl<M: ManageConnection<Error = RedisError>> ProbingPool<M> {
    /// Builds the pool from `builder` (its settings; its connection customizer is replaced)
    /// around `manager`; opens no connection.
    pub(crate) fn new(
        builder: r2d2::Builder<Probing<M>>,
        manager: M,
        pool_timeout: Duration,
        server: String,
    ) -> ProbingPool<M> {
        let shared = Arc::new(Probed {
            inner: manager,
            slots: Mutex::new(Slots {
                open: 0,
                // Set below, once the builder has told the pool's size.
                max: 0,
                ready: Vec::new(),
            }),
            changed: Condvar::new(),
            wait: pool_timeout,
        });
        let pool = builder
            .connection_customizer(Box::new(Release {
                shared: shared.clone(),
            }))
            .build_unchecked(Probing {
                shared: shared.clone(),
            });
        shared.lock().max = pool.max_size();
        ProbingPool {
            pool,
            shared,
            pool_timeout,
            server,
        }
    }

    /// An idle connection, or a new one; waits up to the pool timeout only when every
    /// connection the pool may open is open already.
    ///
    /// # Errors
    /// [`NoConnection::Connect`] at once when a new connection fails (refused, timed out
    /// after `REDIS_CONNECTION_TIMEOUT`, wrong password, TLS, the server's `maxclients`
    /// reached); [`NoConnection::Pool`] when the pool stays exhausted for the pool timeout.
    pub(crate) fn checkout(&self) -> Result<r2d2::PooledConnection<Probing<M>>, NoConnection> {
        if let Some(c) = self.pool.try_get() {
            return Ok(c);
        }
        let probe = {
            let mut slots = self.shared.lock();
            // A ready connection is already on its way into the pool: r2d2's next connect
            // takes it, so opening another would only hold a second slot.
            let probe = slots.ready.is_empty() && slots.open < slots.max;
            if probe {
                slots.open += 1;
            }
            probe
        };
        if probe {
            // The pool would open a connection in its own thread and report a failure only
            // when the pool timeout expires: open it here instead, to learn the outcome now.
            match self.shared.inner.connect() {
                Ok(c) => {
                    self.shared.lock().ready.push((Instant::now(), c));
                    self.shared.changed.notify_all();
                }
                Err(source) => {
                    self.shared.free(1);
                    return Err(NoConnection::Connect {
                        server: self.server.clone(),
                        source,
                    });
                }
            }
        }
        self.pool
            .get_timeout(self.pool_timeout)
            .map_err(|e| NoConnection::Pool(e.to_string()))
    }

    /// Open and idle connection counts.
    pub(crate) fn state(&self) -> (u32, u32) {
        let s = self.pool.state();
        (s.connections, s.idle_connections)
    }
}
