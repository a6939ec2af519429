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

use std::time::Duration;

use redis::cluster::{cluster_pipe, ClusterClient, ClusterConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Value};

use crate::config::RedisConfig;

/// Pipelines re-sent after redirects before giving up (each round resolves the redirected
/// commands one by one, so more rounds mean the topology changed again meanwhile).
const MAX_REDIRECT_ROUNDS: usize = 8;

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
        let mut builder = ClusterClient::builder(config.urls())
            .connection_timeout(config.connection_timeout)
            .response_timeout(config.socket_timeout)
            // The client's own retries for single commands: redirects and transient states.
            // Connection-level failures are retried above, with a fresh connection.
            .retries(config.retries.max(3))
            .min_retry_wait(25)
            .max_retry_wait(1_000);
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

/// True for server errors that a re-send through the single-command path resolves.
fn is_redirect_or_transient(code: &str) -> bool {
    matches!(
        code,
        "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "READONLY"
    )
}

/// Runs `cmds` as cluster pipelines, re-sending only the commands that came back redirected.
///
/// Returns one result per command, in order: a command that fails for another reason (e.g.
/// WRONGTYPE) is an `Err` at its index, for the caller to name the key. The outer `Err` is for
/// failures of the whole batch (a node unreachable), which the caller retries.
pub(crate) fn pipeline(
    conn: &mut ClusterConnection,
    cmds: &[Cmd],
) -> RedisResult<Vec<RedisResult<Value>>> {
    let mut results: Vec<Option<RedisResult<Value>>> = (0..cmds.len()).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..cmds.len()).collect();
    for _round in 0..MAX_REDIRECT_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let mut pipe = cluster_pipe();
        for &i in &pending {
            pipe.add_command(cmds[i].clone());
        }
        let e = match pipe.query::<Vec<Value>>(conn) {
            Ok(values) => {
                for (&i, v) in pending.iter().zip(values) {
                    results[i] = Some(Ok(v));
                }
                pending.clear();
                break;
            }
            Err(e) => e,
        };
        let failures = match e.clone().into_server_errors() {
            Some(f) => f,
            None => return Err(e),
        };
        // The pipeline's successful values are not returned with its failures: settle the
        // failed commands one by one, then send the others again as a pipeline.
        let mut settled = Vec::with_capacity(failures.len());
        for (pos, err) in failures.iter() {
            let Some(&i) = pending.get(*pos) else {
                continue;
            };
            if is_redirect_or_transient(err.code()) {
                // The single-command path follows MOVED/ASK and refreshes the slot map.
                match conn.req_command(&cmds[i]) {
                    Ok(v) => results[i] = Some(Ok(v)),
                    Err(e)
                        if e.code().is_some()
                            && !is_redirect_or_transient(e.code().unwrap_or("")) =>
                    {
                        results[i] = Some(Err(e))
                    }
                    Err(e) => return Err(e),
                }
            } else {
                results[i] = Some(Err(RedisError::from(err.clone())));
            }
            settled.push(i);
        }
        pending.retain(|i| !settled.contains(i));
    }
    if !pending.is_empty() {
        return Err(RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
            "cluster topology kept changing: batch still redirected after several rounds",
        )));
    }
    Ok(results
        .into_iter()
        .map(|v| v.unwrap_or(Ok(Value::Nil)))
        .collect())
}

/// The masters' addresses, from `CLUSTER NODES` on any node.
pub(crate) fn masters(conn: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let nodes: String = redis::from_redis_value(conn.route_command(
        &redis::cmd("CLUSTER").arg("NODES").to_owned(),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
    )?)?;
    Ok(parse_masters(&nodes))
}

/// Masters that serve slots and are not failed, from `CLUSTER NODES` text.
pub(crate) fn parse_masters(nodes: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = nodes
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 {
                return None; // a master without slots (or a replica) serves no keys
            }
            let flags = f[2];
            if !is_live_master(flags) {
                return None;
            }
            let addr = f[1].split('@').next()?;
            let (host, port) = addr.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Sends one command to the node at `host:port`.
pub(crate) fn on_node(
    conn: &mut ClusterConnection,
    host: &str,
    port: u16,
    cmd: &Cmd,
) -> RedisResult<Value> {
    conn.route_command(
        cmd,
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.to_string(),
            port,
        }),
    )
}

/// `WAIT n timeout` on each master that owns one of `keys`' slots: the fewest replicas that
/// confirmed this connection's writes on any of them. Masters that got none of the writes are
/// not asked (their shard may legitimately have no replica at the moment).
pub(crate) fn wait_for_keys(
    conn: &mut ClusterConnection,
    keys: &[String],
    replicas: u32,
    timeout: Duration,
) -> RedisResult<i64> {
    let nodes: String = redis::from_redis_value(conn.route_command(
        &redis::cmd("CLUSTER").arg("NODES").to_owned(),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
    )?)?;
    let owners = slot_owners(&nodes);
    let mut involved: Vec<&(String, u16)> = Vec::with_capacity(keys.len());
    for k in keys {
        match owners
            .get(key_slot(k.as_bytes()) as usize)
            .and_then(Option::as_ref)
        {
            Some(owner) => involved.push(owner),
            // No live master serves the key's slot (mid-failover): nothing can confirm it.
            None => return Ok(0),
        }
    }
    involved.sort();
    involved.dedup();
    let mut fewest = i64::MAX;
    for (host, port) in involved {
        let n: i64 = redis::from_redis_value(on_node(
            conn,
            host,
            *port,
            redis::cmd("WAIT")
                .arg(replicas)
                .arg(timeout.as_millis() as u64),
        )?)?;
        fewest = fewest.min(n);
    }
    Ok(if fewest == i64::MAX {
        replicas as i64
    } else {
        fewest
    })
}

/// True for the flags of a master that is neither failed (`fail`) nor suspected (`fail?`).
/// Whole flags are compared: `nofailover` (a master that will not be failed over) is live.
fn is_live_master(flags: &str) -> bool {
    let has = |flag: &str| flags.split(',').any(|f| f == flag);
    has("master") && !has("fail") && !has("fail?")
}

/// For each of the 16384 slots, the master serving it, from `CLUSTER NODES` text.
fn slot_owners(nodes: &str) -> Vec<Option<(String, u16)>> {
    let mut owners = vec![None; 16384];
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !is_live_master(f[2]) {
            continue;
        }
        let Some((host, port)) = f[1]
            .split('@')
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        else {
            continue;
        };
        for range in &f[8..] {
            if range.starts_with('[') {
                continue; // a slot being imported or migrated: still served by its owner
            }
            let (a, b) = match range.split_once('-') {
                Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
                None => (range.parse::<usize>(), range.parse::<usize>()),
            };
            if let (Ok(a), Ok(b)) = (a, b) {
                for slot in owners.iter_mut().take(b.min(16383) + 1).skip(a) {
                    *slot = Some((host.clone(), port));
                }
            }
        }
    }
    owners
}

/// The cluster slot of a key: CRC16 (XMODEM) of the key, or of its `{hash tag}`, mod 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_masters_by_whole_flags() {
        assert!(is_live_master("master"));
        assert!(is_live_master("myself,master"));
        assert!(is_live_master("master,nofailover"));
        assert!(!is_live_master("master,fail?"));
        assert!(!is_live_master("master,fail"));
        assert!(!is_live_master("slave"));
        assert!(!is_live_master("myself,slave,nofailover"));
    }

    #[test]
    fn key_slots_match_redis() {
        // Values from CLUSTER KEYSLOT on Redis 7.0.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{}x"), key_slot(b"{}x"));
        assert_eq!(key_slot(b"123456789"), 0x31C3);
    }

    #[test]
    fn slot_owners_from_cluster_nodes() {
        let text = "a1 127.0.0.1:7000@17000 master - 0 0 1 connected 0-5460 [5461->-b2]\n\
                    b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-16383\n";
        let owners = slot_owners(text);
        assert_eq!(owners[0], Some(("127.0.0.1".to_string(), 7000)));
        assert_eq!(owners[5461], Some(("127.0.0.1".to_string(), 7001)));
        assert_eq!(owners[16383], Some(("127.0.0.1".to_string(), 7001)));
    }

    #[test]
    fn masters_from_cluster_nodes() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail - 0 1 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 1 1 connected
e5 127.0.0.1:7004@17004 master - 0 1 5 connected
";
        assert_eq!(
            parse_masters(text),
            vec![
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7001)
            ]
        );
    }
}
