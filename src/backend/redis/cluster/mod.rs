//! Redis Cluster: an r2d2 pool of the `redis` crate's sync `ClusterConnection`s, and the batch
//! path that makes pipelines survive slot moves.
//!
//! Single-key commands go through the client, which follows MOVED (refreshing its slot map),
//! ASK (with ASKING) and retries TRYAGAIN/CLUSTERDOWN/LOADING. Batches do not: in redis 1.8 a
//! cluster pipeline returns redirects as error values and never refreshes its slot map, and the
//! client's multi-slot MGET/DEL can panic on a stale map. So batches here are cluster pipelines of
//! single-key commands (never MGET/DEL with several keys), and [`pipeline`] re-sends only the
//! commands that came back redirected, one by one through the single-command path (which follows
//! the redirect and refreshes the map), then the rest again as a pipeline, within a bounded number
//! of rounds. Every command sent this way is idempotent (GET, EXISTS, SET, UNLINK, STRLEN, TYPE).
//!
//! Operations over all keys (SCAN, checkpoints) run on every master through
//! [`on_every_master`], which returns only what was gathered under one stable slot map covering
//! all 16,384 slots, or an error: never the keys of some masters as if they were all.

use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Value};

use crate::config::RedisConfig;

mod pipeline;
mod slots;
mod topology;

pub(crate) use pipeline::pipeline;
pub(crate) use slots::{key_slot, on_node, wait_for_keys};
pub(crate) use topology::{on_all_masters, on_every_master, EveryMasterError};

/// Opens cluster connections.
#[derive(Debug)]
pub(crate) struct ClusterManager {
    client: ClusterClient,
    /// To learn the typed cause when the client cannot connect (see [`super::pool::Seeds`]).
    seeds: super::pool::Seeds,
}

/// A pooled cluster connection; marked broken after an I/O error so the pool replaces it (a new
/// connection starts from the seed nodes with a fresh slot map).
pub(crate) struct ClusterConn {
    pub(crate) conn: ClusterConnection,
    broken: bool,
}

impl ClusterConn {
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl r2d2::ManageConnection for ClusterManager {
    type Connection = ClusterConn;
    type Error = RedisError;

    fn connect(&self) -> RedisResult<ClusterConn> {
        Ok(ClusterConn {
            conn: self
                .client
                .get_connection()
                .map_err(|e| self.seeds.explain(e))?,
            broken: false,
        })
    }

    fn is_valid(&self, c: &mut ClusterConn) -> RedisResult<()> {
        redis::cmd("PING").query::<()>(&mut c.conn)
    }

    fn has_broken(&self, c: &mut ClusterConn) -> bool {
        c.broken || !c.conn.is_open()
    }
}

impl ConnectionLike for ClusterConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> RedisResult<Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        self.conn.req_packed_commands(cmd, offset, count)
    }

    fn req_command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        self.conn.req_command(cmd)
    }

    fn get_db(&self) -> i64 {
        0
    }

    fn check_connection(&mut self) -> bool {
        self.conn.check_connection()
    }

    fn is_open(&self) -> bool {
        self.conn.is_open()
    }
}

/// The pool of cluster connections.
pub(crate) struct ClusterPool {
    pool: super::pool::ProbingPool<ClusterManager>,
}

impl ClusterPool {
    /// A pool over the cluster seeded by `config`'s URLs. Connects lazily.
    pub(crate) fn new(config: &RedisConfig) -> RedisResult<ClusterPool> {
        let policy = crate::retry::RetryPolicy::new(config.retries);
        let mut builder = ClusterClient::builder(config.urls())
            .connection_timeout(config.connection_timeout)
            .response_timeout(config.socket_timeout)
            // The client's own retries for single commands: one budget for following
            // redirects and for waiting out cluster states (TRYAGAIN, CLUSTERDOWN, LOADING,
            // MASTERDOWN, READONLY) and timeouts. The backend does not retry those again
            // (`RedisShared::should_retry`), so they are retried at this one level; it keeps
            // at least 3 for redirects. Connection failures are retried by the backend, with a
            // fresh connection. See `crate::retry` for the bound.
            .retries(crate::retry::cluster_client_retries(config.retries))
            .min_retry_wait(policy.min_wait_ms())
            .max_retry_wait(policy.max_wait_ms());
        if let Some(u) = &config.username {
            builder = builder.username(u);
        }
        if let Some(p) = &config.password {
            builder = builder.password(p);
        }
        if config.read_from_replicas {
            builder =
                builder.read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy);
        }
        if config.uses_tls() {
            super::pool::ensure_crypto_provider();
        }
        // The same CA and client identity for every node: the client also opens connections to
        // nodes it learns from CLUSTER SLOTS, over TLS when the seeds use `rediss://`.
        if let Some(certs) = config
            .tls_certificates()
            .map_err(super::pool::tls_config_error)?
        {
            builder = builder.certs(certs);
        }
        let client = builder.build()?;
        let builder = r2d2::Pool::builder()
            .max_size(config.max_connections)
            .min_idle(Some(0))
            // A pooled cluster connection's PING goes to every master: far too costly per
            // checkout. Broken connections are detected by the command that fails.
            .test_on_check_out(false)
            .connection_timeout(config.pool_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .error_handler(Box::new(super::pool::QuietErrors));
        Ok(ClusterPool {
            pool: super::pool::ProbingPool::new(
                builder,
                ClusterManager {
                    client,
                    seeds: super::pool::Seeds::new(config)?,
                },
                config.pool_timeout,
                crate::config::redact_url(&config.url),
            ),
        })
    }

    /// A connection; a connect failure is reported at once (see
    /// [`super::pool::ProbingPool::checkout`]).
    pub(crate) fn get(
        &self,
    ) -> Result<
        r2d2::PooledConnection<super::pool::Probing<ClusterManager>>,
        super::pool::NoConnection,
    > {
        self.pool.checkout()
    }

    pub(crate) fn state(&self) -> (u32, u32) {
        self.pool.state()
    }
}
