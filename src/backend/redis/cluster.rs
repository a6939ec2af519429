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

/// Whole passes over the masters a cluster-wide operation makes before it gives up on a slot
/// map that keeps changing (see [`on_every_master`]).
pub(crate) const TOPOLOGY_ATTEMPTS: u32 = 8;

/// Pause before pass `n + 1` of [`on_every_master`]: 50 ms doubling up to 800 ms, so the
/// seven pauses add up to 3.15 s. Long enough to let one slot migration finish (a few ms per
/// slot) or a cluster settle after a reshard; a failover takes longer (the node timeout plus an
/// election) and ends in [`EveryMasterError::Unstable`], which the caller may retry.
fn topology_backoff(n: u32) -> Duration {
    Duration::from_millis((50u64 << n.min(4)).min(800))
}

/// Why [`on_every_master`] failed.
#[derive(Debug)]
pub(crate) enum EveryMasterError {
    /// A command failed (a node unreachable, a refused command): the caller's own retry
    /// decides.
    Redis(RedisError),
    /// No pass saw one stable slot map; `reason` says what the last pass saw.
    Unstable {
        /// Passes made.
        attempts: u32,
        /// What was moving, uncovered or failing.
        reason: String,
    },
}

impl From<RedisError> for EveryMasterError {
    fn from(e: RedisError) -> Self {
        EveryMasterError::Redis(e)
    }
}

/// Runs `f` once on each master (its host and port), so that together the calls saw every
/// key of the cluster exactly where it lives, or fails.
///
/// A pass reads the slot map, runs `f` on each master in it, and reads the slot map again. The
/// results are returned only when both readings are *stable* and *equal*:
/// - stable: every one of the 16,384 slots is claimed by exactly one master, no master that
///   claims slots is flagged `fail` or `fail?` by the node asked, and no master has a slot in
///   `MIGRATING` or `IMPORTING` state;
/// - equal: each master reports the same node id, config epoch and slots.
///
/// Each master's slots, epoch and migration markers come from its own `myself` line of
/// `CLUSTER NODES` (markers are shown only there; other nodes' views lag behind by gossip);
/// the list of masters to ask comes from one node's view.
///
/// Why this is exact: a key leaves a master only while its slot is `MIGRATING` there. A
/// migration under way at either reading is refused; one that started after the first reading
/// and ended before the second left the slot with another owner (a different map), and a slot
/// that went away and came back made its owner import it, which bumps that master's config
/// epoch (only the master already holding the highest epoch skips the bump, and a round trip
/// needs an import on a master that does not hold it). So when both readings are stable and
/// equal, no key changed master during the pass and each key was on exactly one scanned master
/// for the whole pass (keys written or deleted meanwhile are, as with SCAN, either way).
///
/// Otherwise the whole pass is thrown away and repeated after a pause, up to
/// [`TOPOLOGY_ATTEMPTS`] passes (pauses: [`topology_backoff`]), then
/// [`EveryMasterError::Unstable`]. So `f` must be safe to run again (SCAN, BGSAVE). A master
/// that cannot be reached or whose command fails is an [`EveryMasterError::Redis`], never
/// skipped. During a long reshard every pass overlaps a migration, so cluster-wide operations
/// fail until it ends, rather than return part of the data.
pub(crate) fn on_every_master<T>(
    conn: &mut ClusterConnection,
    mut f: impl FnMut(&mut ClusterConnection, &str, u16) -> RedisResult<T>,
) -> Result<Vec<T>, EveryMasterError> {
    let mut reason = String::new();
    for attempt in 0..TOPOLOGY_ATTEMPTS {
        if attempt > 0 {
            log::debug!(
                "cluster slot map not stable ({reason}); pass {}",
                attempt + 1
            );
            std::thread::sleep(topology_backoff(attempt - 1));
        }
        let before = match read_topology(conn)? {
            Ok(t) => t,
            Err(why) => {
                reason = why;
                continue;
            }
        };
        let mut out = Vec::with_capacity(before.masters.len());
        for m in &before.masters {
            out.push(f(conn, &m.host, m.port)?);
        }
        match read_topology(conn)? {
            Ok(after) if after == before => return Ok(out),
            Ok(after) => reason = before.difference(&after),
            Err(why) => reason = why,
        }
    }
    Err(EveryMasterError::Unstable {
        attempts: TOPOLOGY_ATTEMPTS,
        reason,
    })
}

/// One master as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MasterState {
    host: String,
    port: u16,
    id: String,
    config_epoch: u64,
    /// Inclusive ranges, as listed.
    slots: Vec<(u16, u16)>,
}

/// The masters serving all 16,384 slots, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Topology {
    masters: Vec<MasterState>,
}

impl Topology {
    /// What changed from `self` to `after`, for the error message.
    fn difference(&self, after: &Topology) -> String {
        for m in &self.masters {
            match after
                .masters
                .iter()
                .find(|a| a.host == m.host && a.port == m.port)
            {
                None => return format!("{}:{} no longer serves slots", m.host, m.port),
                Some(a) if a.slots != m.slots => {
                    return format!("slots of {}:{} changed during the pass", m.host, m.port)
                }
                Some(a) if a != m => {
                    return format!(
                        "{}:{} changed (config epoch {} -> {}) during the pass",
                        m.host, m.port, m.config_epoch, a.config_epoch
                    )
                }
                Some(_) => {}
            }
        }
        "a master joined during the pass".to_string()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine<'a> {
    id: &'a str,
    /// `None` for a node without an address (`:0`, `noaddr`).
    addr: Option<(String, u16)>,
    flags: Vec<&'a str>,
    config_epoch: u64,
    slots: Vec<(u16, u16)>,
    /// `[slot->-id]` / `[slot-<-id]` entries: slots migrating out or being imported.
    migrations: Vec<&'a str>,
}

impl NodeLine<'_> {
    fn has(&self, flag: &str) -> bool {
        self.flags.contains(&flag)
    }
}

/// Parses `CLUSTER NODES` text; lines that do not parse are skipped.
fn parse_nodes(text: &str) -> Vec<NodeLine<'_>> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1]
                .split(['@', ','])
                .next()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p != 0);
            let mut slots = Vec::new();
            let mut migrations = Vec::new();
            for range in &f[8..] {
                if range.starts_with('[') {
                    migrations.push(*range);
                    continue;
                }
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
                    None => (range.parse::<u16>(), range.parse::<u16>()),
                };
                if let (Ok(a), Ok(b)) = (a, b) {
                    if a <= b && b < SLOTS {
                        slots.push((a, b));
                    }
                }
            }
            Some(NodeLine {
                id: f[0],
                addr,
                flags: f[2].split(',').collect(),
                config_epoch: f[6].parse().unwrap_or(0),
                slots,
                migrations,
            })
        })
        .collect()
}

/// Number of hash slots.
const SLOTS: u16 = 16384;

/// Reads the slot map: `Ok(Err(why))` when it is not stable (see [`on_every_master`]).
fn read_topology(conn: &mut ClusterConnection) -> RedisResult<Result<Topology, String>> {
    let view: String = redis::from_redis_value(conn.route_command(
        &redis::cmd("CLUSTER").arg("NODES").to_owned(),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
    )?)?;
    let view = parse_nodes(&view);
    let mut masters = Vec::new();
    for n in view
        .iter()
        .filter(|n| n.has("master") && !n.slots.is_empty())
    {
        let Some((host, port)) = &n.addr else {
            return Ok(Err(format!(
                "master {} serves slots but has no address",
                n.id
            )));
        };
        if n.has("fail") || n.has("fail?") {
            return Ok(Err(format!(
                "master {host}:{port} serves slots but is flagged {}",
                n.flags.join(",")
            )));
        }
        let own: String = redis::from_redis_value(on_node(
            conn,
            host,
            *port,
            &redis::cmd("CLUSTER").arg("NODES").to_owned(),
        )?)?;
        let own = parse_nodes(&own);
        let Some(me) = own.iter().find(|m| m.has("myself")) else {
            return Ok(Err(format!("{host}:{port} did not describe itself")));
        };
        if !me.has("master") {
            return Ok(Err(format!("{host}:{port} is no longer a master")));
        }
        if !me.migrations.is_empty() {
            return Ok(Err(format!(
                "slots migrating on {host}:{port}: {}",
                abbreviate(&me.migrations, 5)
            )));
        }
        masters.push(MasterState {
            host: host.clone(),
            port: *port,
            id: me.id.to_string(),
            config_epoch: me.config_epoch,
            slots: me.slots.clone(),
        });
    }
    masters.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    masters.dedup_by(|a, b| a.host == b.host && a.port == b.port);
    Ok(coverage(&masters).map(|()| Topology { masters }))
}

/// `Err` naming the slots that no master or more than one master claims.
fn coverage(masters: &[MasterState]) -> Result<(), String> {
    let mut claims = vec![0u8; usize::from(SLOTS)];
    for m in masters {
        for &(a, b) in &m.slots {
            for c in &mut claims[usize::from(a)..=usize::from(b)] {
                *c = c.saturating_add(1);
            }
        }
    }
    let ranges = |want: fn(u8) -> bool| -> Vec<String> {
        let mut out = Vec::new();
        let mut slot = 0;
        while slot < claims.len() {
            if !want(claims[slot]) {
                slot += 1;
                continue;
            }
            let start = slot;
            while slot < claims.len() && want(claims[slot]) {
                slot += 1;
            }
            out.push(if slot - 1 == start {
                start.to_string()
            } else {
                format!("{start}-{}", slot - 1)
            });
        }
        out
    };
    let uncovered = ranges(|c| c == 0);
    if !uncovered.is_empty() {
        return Err(format!(
            "slots {} not served by any master",
            abbreviate(&uncovered, 5)
        ));
    }
    let doubled = ranges(|c| c > 1);
    if !doubled.is_empty() {
        return Err(format!(
            "slots {} claimed by more than one master",
            abbreviate(&doubled, 5)
        ));
    }
    Ok(())
}

/// The first `max` items joined, and how many more.
fn abbreviate<S: AsRef<str>>(items: &[S], max: usize) -> String {
    let shown: Vec<&str> = items.iter().take(max).map(AsRef::as_ref).collect();
    match items.len().saturating_sub(max) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
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
        // CRC16/XMODEM's check value: "123456789" -> 0x31C3, which is below 16384.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        // The rest from CLUSTER KEYSLOT on Redis 7.0.15.
        let known: [(&[u8], u16); 11] = [
            (b"foo", 12182),
            (b"bar", 5061),
            (b"123456789", 12739),
            (b"user1000", 3443),
            (b"{user1000}.following", 3443),
            (b"{user1000}.followers", 3443),
            (b"{}x", 10595),
            (b"x{", 3596),
            (b"foo{}{bar}", 8363),
            (b"foo{{bar}}zap", 4015),
            (b"foo{bar}{zap}", 5061),
        ];
        for (key, slot) in known {
            assert_eq!(key_slot(key), slot, "{}", String::from_utf8_lossy(key));
        }
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

    fn master(port: u16, epoch: u64, slots: &[(u16, u16)]) -> MasterState {
        MasterState {
            host: "127.0.0.1".to_string(),
            port,
            id: format!("id{port}"),
            config_epoch: epoch,
            slots: slots.to_vec(),
        }
    }

    #[test]
    fn cluster_nodes_lines_with_markers_and_epochs() {
        let text = "\
a1 127.0.0.1:7000@17000,host-a myself,master - 0 0 4 connected 0-5460 [5461->-b2]
b2 127.0.0.1:7001@17001 master,fail? - 0 1 2 connected 5461-10922 [5461-<-a1]
d4 127.0.0.1:7003@17003 slave a1 0 1 4 connected
e5 :0@0 master,noaddr - 0 1 0 disconnected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert_eq!(nodes[0].addr, Some(("127.0.0.1".to_string(), 7000)));
        assert!(nodes[0].has("myself") && nodes[0].has("master"));
        assert_eq!(nodes[0].config_epoch, 4);
        assert_eq!(nodes[0].slots, vec![(0, 5460)]);
        assert_eq!(nodes[0].migrations, vec!["[5461->-b2]"]);
        assert!(nodes[1].has("fail?") && !nodes[1].has("fail"));
        assert_eq!(nodes[1].migrations, vec!["[5461-<-a1]"]);
        assert!(nodes[2].slots.is_empty() && nodes[2].has("slave"));
        assert_eq!(nodes[3].addr, None);
    }

    #[test]
    fn coverage_names_uncovered_and_doubly_claimed_slots() {
        let full = [
            master(7000, 1, &[(0, 5460)]),
            master(7001, 2, &[(5461, 10922)]),
            master(7002, 3, &[(10923, 16383)]),
        ];
        assert_eq!(coverage(&full), Ok(()));
        let gap = [
            master(7000, 1, &[(0, 5460)]),
            master(7002, 3, &[(10923, 16382)]),
        ];
        assert_eq!(
            coverage(&gap),
            Err("slots 5461-10922, 16383 not served by any master".to_string())
        );
        let twice = [
            master(7000, 1, &[(0, 5461)]),
            master(7001, 2, &[(5461, 16383)]),
        ];
        assert_eq!(
            coverage(&twice),
            Err("slots 5461 claimed by more than one master".to_string())
        );
        assert_eq!(
            coverage(&[]),
            Err("slots 0-16383 not served by any master".to_string())
        );
    }

    #[test]
    fn a_round_trip_of_a_slot_is_a_different_topology() {
        let before = Topology {
            masters: vec![
                master(7000, 1, &[(0, 8191)]),
                master(7001, 2, &[(8192, 16383)]),
            ],
        };
        // Slot 0 went to 7001 and came back: same slots, but 7000 imported it (epoch bump).
        let after = Topology {
            masters: vec![
                master(7000, 4, &[(0, 8191)]),
                master(7001, 3, &[(8192, 16383)]),
            ],
        };
        assert_ne!(before, after);
        assert_eq!(
            before.difference(&after),
            "127.0.0.1:7000 changed (config epoch 1 -> 4) during the pass"
        );
        let moved = Topology {
            masters: vec![
                master(7000, 1, &[(1, 8191)]),
                master(7001, 3, &[(0, 0), (8192, 16383)]),
            ],
        };
        assert_eq!(
            before.difference(&moved),
            "slots of 127.0.0.1:7000 changed during the pass"
        );
        assert_eq!(
            before.difference(&before.clone()),
            "a master joined during the pass"
        );
    }

    #[test]
    fn backoff_between_passes_is_bounded() {
        let total: Duration = (0..TOPOLOGY_ATTEMPTS - 1).map(topology_backoff).sum();
        assert_eq!(total, Duration::from_millis(3_150));
    }
}
