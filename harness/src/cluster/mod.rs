//! `RedisCluster`: a real Redis Cluster of local `redis-server` processes (3 masters + 3
//! replicas by default), created with `redis-cli --cluster create`, plus the operations the
//! cluster tests need: slot lookups, SIGKILL + failover, and live slot migration.
//!
//! Everything is done through plain per-node connections (`redis::Connection`) and
//! `redis-cli`; the cluster client of redis-rs is never used here, so a bug in it cannot hide
//! behind the guard.
//!
//! ```ignore
//! let mut cluster = RedisCluster::start();
//! let url = cluster.url_list(); // "redis://127.0.0.1:P1,redis://127.0.0.1:P2,..."
//! let victim = cluster.masters()[0].1;
//! cluster.kill_node(victim);
//! cluster.wait_for_failover(victim);
//! ```

mod checks;
mod migrate;
mod nodes;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use crate::RedisServer;
use checks::query_text;
use migrate::SlotMover;
pub use nodes::{crc16_xmodem, info_field, key_slot, parse_cluster_nodes, NodeLine, SLOTS};

/// How long `start` waits for a healthy cluster, and `wait_for_failover` for a promotion.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `redis-cli --cluster create` may run.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Polling interval while waiting for the cluster to settle.
const POLL: Duration = Duration::from_millis(50);

/// Keys moved per MIGRATE during a slot migration.
const MIGRATE_BATCH: usize = 100;

/// Environment variable naming the `redis-cli` binary (default: next to `$REDIS_SERVER_BIN`
/// when that is a path, else `redis-cli` on `PATH`).
pub const REDIS_CLI_BIN_ENV: &str = "REDIS_CLI_BIN";

/// The arguments every cluster node gets (before the caller's extra arguments).
const NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
    "--appendonly",
    "no",
    "--save",
    "",
    // Replicas start syncing at once instead of waiting 5 s for other replicas to join.
    "--repl-diskless-sync-delay",
    "0",
];
/// The `redis-cli` binary to run.
pub fn redis_cli_bin() -> String {
    if let Some(bin) = std::env::var(REDIS_CLI_BIN_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return bin;
    }
    let server = crate::redis_server_bin();
    let server = std::path::Path::new(&server);
    if server.components().count() > 1 {
        if let Some(dir) = server.parent() {
            let cli = dir.join("redis-cli");
            if cli.exists() {
                return cli.to_string_lossy().into_owned();
            }
        }
    }
    "redis-cli".to_string()
}
/// A Redis Cluster of local `redis-server` processes. Dropping it kills every node.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
    replicas_per_master: usize,
}

impl RedisCluster {
    /// 3 masters with one replica each.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(3, 1, &[])
    }

    /// `masters` masters (at least 1) with `replicas_per_master` replicas each; `extra_args`
    /// go to every node after the cluster arguments. With 3 masters or more the cluster is
    /// created with `redis-cli --cluster create`; with fewer (which redis-cli refuses) it is
    /// assembled with CLUSTER ADDSLOTSRANGE / MEET / REPLICATE.
    ///
    /// Returns once every node reports `cluster_state:ok`, all nodes agree on who serves each
    /// of the 16384 slots, every replica is attached and in sync. Panics with diagnostics
    /// (redis-cli output, CLUSTER NODES / INFO, node logs) after ~30 s otherwise.
    pub fn start_with(
        masters: usize,
        replicas_per_master: usize,
        extra_args: &[&str],
    ) -> RedisCluster {
        assert!(masters >= 1, "a cluster needs at least one master");
        let mut args: Vec<&str> = NODE_ARGS.to_vec();
        // Replicas must authenticate to their master when the nodes require a password.
        let password = extra_args
            .windows(2)
            .filter(|w| w[0].eq_ignore_ascii_case("--requirepass"))
            .map(|w| w[1])
            .next_back()
            .filter(|p| !p.is_empty());
        if let Some(p) = password {
            args.extend(["--masterauth", p]);
        }
        args.extend_from_slice(extra_args);
        let total = masters * (1 + replicas_per_master);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                RedisServer::start_with_port_filter(&args, |p| {
                    p <= u16::MAX - 10000 && RedisServer::port_is_free(p + 10000)
                })
            })
            .collect();
        let cluster = RedisCluster {
            nodes,
            masters,
            replicas_per_master,
        };
        if masters >= 3 {
            cluster.create_with_redis_cli();
        } else {
            cluster.create_by_hand();
        }
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let last = match cluster.check_healthy() {
                Ok(()) => return cluster,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                cluster.fail(&format!(
                    "the cluster did not become healthy within {CLUSTER_TIMEOUT:?}: {last}"
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Every node's URL (`redis://127.0.0.1:PORT`, with the password when the nodes have one),
    /// killed nodes included.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(RedisServer::url_with_password)
            .collect()
    }

    /// The URLs comma-separated, as `REDIS_URL` takes a cluster's seed nodes.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// The node guards (killed nodes included; `pid()` is `None` for those).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node guards, mutable (e.g. to `restart` a killed node).
    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// The node listening on `port`; panics when there is none.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The ports of the nodes not killed through this guard.
    pub fn live_ports(&self) -> Vec<u16> {
        self.live_nodes().map(RedisServer::port).collect()
    }

    /// The masters serving slots, read live from `CLUSTER NODES` of a live node, in slot
    /// order: `(addr "127.0.0.1:PORT", port, node id)`.
    pub fn masters(&self) -> Vec<(String, u16, String)> {
        let mut masters: Vec<NodeLine> = self
            .view()
            .into_iter()
            .filter(|n| n.is_master() && !n.is_failing() && !n.slots.is_empty())
            .collect();
        masters.sort_by_key(|n| n.slots.iter().map(|s| s.0).min());
        masters
            .into_iter()
            .map(|n| (n.addr, n.port, n.id))
            .collect()
    }

    /// The port of the master serving `slot`, according to a live master.
    pub fn master_for_slot(&self, slot: u16) -> u16 {
        assert!(slot < SLOTS, "slot {slot} out of range");
        self.view()
            .into_iter()
            .find(|n| n.is_master() && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}\n{}", self.diagnostics()))
    }

    /// The port of the master serving `key`.
    pub fn master_for_key(&self, key: &[u8]) -> u16 {
        self.master_for_slot(key_slot(key))
    }

    /// The port of a live, connected replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let view = self.view();
        let master = view
            .iter()
            .find(|n| n.port == master_port)
            .unwrap_or_else(|| panic!("no node on port {master_port} in CLUSTER NODES"));
        view.iter()
            .filter(|n| n.master_id.as_deref() == Some(master.id.as_str()) && !n.is_failing())
            .map(|n| n.port)
            .find(|p| self.is_live(*p))
            .unwrap_or_else(|| {
                panic!(
                    "the master on port {master_port} has no live replica\n{}",
                    self.diagnostics()
                )
            })
    }

    /// The number of keys on each master (DBSIZE), in the order of `masters()`.
    pub fn key_counts(&self) -> Vec<usize> {
        self.masters()
            .iter()
            .map(|(_, port, _)| {
                let mut conn = self.conn(*port);
                redis::cmd("DBSIZE")
                    .query::<usize>(&mut conn)
                    .unwrap_or_else(|e| panic!("DBSIZE on :{port}: {e}"))
            })
            .collect()
    }

    /// A raw connection to the node on `port` (not a cluster connection: it gets MOVED
    /// errors for keys the node does not serve).
    pub fn conn(&self, port: u16) -> redis::Connection {
        self.node(port).conn()
    }

    /// The node id of the node on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        let mut conn = self.conn(port);
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("CLUSTER MYID on :{port}: {e}"))
    }

    /// SIGKILLs the node on `port` (a crash); the others are left to notice.
    pub fn kill_node(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"));
        node.kill();
    }

    /// Waits until the slots of the killed node `killed_port` are served by a promoted
    /// replica: every live node reports `cluster_state:ok`, sees the killed node as failed and
    /// agrees on a slot map where all 16384 slots are served by live masters, and every live
    /// replica follows a live master in sync. Panics with diagnostics after ~30 s.
    ///
    /// With one replica per master the promoted node has no replica left (WAIT 1 on it times
    /// out) until `restart_node(killed_port)` brings the old master back as its replica;
    /// `start_with(3, 2, ..)` keeps one replica through a failover.
    pub fn wait_for_failover(&self, killed_port: u16) {
        assert!(
            !self.is_live(killed_port),
            "wait_for_failover({killed_port}): that node was not killed"
        );
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let last = match self.check_failed_over(killed_port) {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "no failover of :{killed_port} within {CLUSTER_TIMEOUT:?}: {last}"
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until every live node flags the killed node on `killed_port` as `fail` (the
    /// cluster agreed it is down; no promotion is waited for, so with no replica its slots stay
    /// unserved). Panics with diagnostics after ~30 s.
    pub fn wait_for_fail_flag(&self, killed_port: u16) {
        assert!(
            !self.is_live(killed_port),
            "wait_for_fail_flag({killed_port}): that node was not killed"
        );
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let pending: Vec<u16> = self
                .live_nodes()
                .map(RedisServer::port)
                .filter(|&p| {
                    self.node_view(p).map_or(true, |view| {
                        !view
                            .iter()
                            .any(|n| n.port == killed_port && n.has_flag("fail"))
                    })
                })
                .collect();
            if pending.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{pending:?} did not flag :{killed_port} as failed within {CLUSTER_TIMEOUT:?}"
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// The slot ranges the master on `port` says it serves (its own `CLUSTER NODES` line).
    pub fn slots_of(&self, port: u16) -> Vec<(u16, u16)> {
        self.node_view(port)
            .unwrap_or_else(|e| panic!("CLUSTER NODES on :{port}: {e}"))
            .into_iter()
            .find(|n| n.has_flag("myself"))
            .map(|n| n.slots)
            .unwrap_or_default()
    }

    /// Restarts the node on `port` after `kill_node` (same port, same directory, so the same
    /// `nodes.conf` and node id) and waits (~30 s at most) until it is back in the cluster:
    /// `cluster_state:ok`, in sync when it is a replica (a killed master whose slots were
    /// failed over comes back as a replica of the promoted node, which gives that master a
    /// replica again, e.g. for WAIT), and no longer flagged as failing by any live node.
    pub fn restart_node(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
            .restart();
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let last = match self.check_rejoined(port) {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                self.fail(&format!(
                    ":{port} did not rejoin within {CLUSTER_TIMEOUT:?}: {last}"
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Moves `slot` from the master on `from_port` to the master on `to_port` with a live
    /// migration, as `redis-cli --cluster reshard` does: SETSLOT IMPORTING on the target,
    /// MIGRATING on the source, GETKEYSINSLOT + MIGRATE in batches until the source holds no
    /// key of the slot, then SETSLOT NODE on the target, the source and every other master.
    /// Clients keep working meanwhile (ASK / MOVED redirections).
    pub fn move_slot(&self, slot: u16, from_port: u16, to_port: u16) {
        let mut mover = SlotMover::new(self, from_port, to_port);
        mover.move_slot(slot);
    }

    /// Moves the `count` lowest slots of the master on `from_port` to the master on
    /// `to_port`, one `move_slot` at a time (so readers and writers can run meanwhile).
    /// Panics when the source serves fewer slots.
    pub fn reshard(&self, count: usize, from_port: u16, to_port: u16) {
        let from_id = self.node_id(from_port);
        let owned: Vec<u16> = self
            .node_view(from_port)
            .unwrap_or_else(|e| panic!("CLUSTER NODES on :{from_port}: {e}"))
            .into_iter()
            .find(|n| n.id == from_id)
            .map(|n| n.slots.iter().flat_map(|&(a, b)| a..=b).collect())
            .unwrap_or_default();
        assert!(
            owned.len() >= count,
            "reshard: :{from_port} serves {} slots, {count} asked",
            owned.len()
        );
        let mut mover = SlotMover::new(self, from_port, to_port);
        for &slot in &owned[..count] {
            mover.move_slot(slot);
        }
    }

    /// CLUSTER NODES, CLUSTER INFO (state lines) and the log tail of every node.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let port = node.port();
            if node.pid().is_none() {
                out.push_str(&format!("=== node :{port} (killed)\n"));
            } else {
                out.push_str(&format!("=== node :{port}\n"));
                match query_text(node, &["CLUSTER", "NODES"]) {
                    Ok(t) => out.push_str(&format!("--- CLUSTER NODES\n{t}")),
                    Err(e) => out.push_str(&format!("--- CLUSTER NODES failed: {e}\n")),
                }
                match query_text(node, &["CLUSTER", "INFO"]) {
                    Ok(t) => {
                        let lines: Vec<&str> = t
                            .lines()
                            .filter(|l| {
                                l.starts_with("cluster_state")
                                    || l.starts_with("cluster_slots")
                                    || l.starts_with("cluster_known_nodes")
                                    || l.starts_with("cluster_current_epoch")
                            })
                            .collect();
                        out.push_str(&format!("--- CLUSTER INFO\n{}\n", lines.join("\n")));
                    }
                    Err(e) => out.push_str(&format!("--- CLUSTER INFO failed: {e}\n")),
                }
            }
            out.push_str(&format!(
                "--- log tail ({})\n{}\n",
                node.log_path().display(),
                node.log_tail(30)
            ));
        }
        out
    }

    // ---------------------------------------------------------------------------------------

    fn live_nodes(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|n| n.pid().is_some())
    }

    fn is_live(&self, port: u16) -> bool {
        self.live_nodes().any(|n| n.port() == port)
    }

    fn node_view(&self, port: u16) -> redis::RedisResult<Vec<NodeLine>> {
        query_text(self.node(port), &["CLUSTER", "NODES"]).map(|t| parse_cluster_nodes(&t))
    }

    /// CLUSTER NODES of the first live node that answers, preferring masters (they are the
    /// first to learn about slot moves made by `move_slot`).
    fn view(&self) -> Vec<NodeLine> {
        let mut fallback = None;
        let mut errors = Vec::new();
        for node in self.live_nodes() {
            match self.node_view(node.port()) {
                Ok(view) => {
                    let me_master = view.iter().any(|n| n.has_flag("myself") && n.is_master());
                    if me_master {
                        return view;
                    }
                    fallback.get_or_insert(view);
                }
                Err(e) => errors.push(format!(":{} {e}", node.port())),
            }
        }
        fallback.unwrap_or_else(|| {
            panic!(
                "no live cluster node answers CLUSTER NODES: {errors:?}\n{}",
                self.diagnostics()
            )
        })
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "RedisCluster: {why}\nnodes: {:?}\n{}",
            self.nodes.iter().map(RedisServer::port).collect::<Vec<_>>(),
            self.diagnostics()
        )
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
