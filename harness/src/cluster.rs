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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::RedisServer;

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

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

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16384.
///
/// The hash tag is the part between the first `{` and the first `}` after it, when that part
/// is not empty (`{user1000}.following` hashes `user1000`; `{}x` and `x{` hash the whole key).
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16_xmodem(hashed) % SLOTS
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0, no reflection), as Redis Cluster uses.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

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

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLine {
    pub id: String,
    /// `127.0.0.1:PORT` (without the `@bus-port` and `,hostname` parts).
    pub addr: String,
    pub port: u16,
    /// The flags, e.g. `["myself", "master"]`, `["slave"]`, `["master", "fail"]`.
    pub flags: Vec<String>,
    /// The master's id for a replica, `None` for a master.
    pub master_id: Option<String>,
    /// `connected` or `disconnected`.
    pub link: String,
    /// Slot ranges served (inclusive), without the `[slot->-id]` migration markers.
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    pub fn is_master(&self) -> bool {
        self.has_flag("master")
    }
    pub fn is_replica(&self) -> bool {
        self.has_flag("slave")
    }
    /// Flagged `fail` or `fail?`.
    pub fn is_failing(&self) -> bool {
        self.has_flag("fail") || self.has_flag("fail?")
    }
    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|(a, b)| usize::from(*b) - usize::from(*a) + 1)
            .sum()
    }
}

/// Parses the text of `CLUSTER NODES`.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split(['@', ',']).next().unwrap_or("").to_string();
            let port = addr.rsplit(':').next()?.parse().unwrap_or(0);
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let n = s.parse().ok()?;
                        Some((n, n))
                    }
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                addr,
                port,
                flags: f[2].split(',').map(str::to_string).collect(),
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                link: f[7].to_string(),
                slots,
            })
        })
        .collect()
}

/// The value of `field` in INFO-style text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == field).then(|| v.trim())
    })
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

    fn create_with_redis_cli(&self) {
        let out_dir = tempfile::tempdir().expect("temporary directory for redis-cli output");
        let out_path = out_dir.path().join("redis-cli.out");
        let out = File::create(&out_path).expect("creating the redis-cli output file");
        let err = out.try_clone().expect("cloning the output file handle");
        let bin = redis_cli_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port()));
        }
        cmd.arg("--cluster-replicas")
            .arg(self.replicas_per_master.to_string())
            .arg("--cluster-yes");
        if let Some(p) = self.nodes[0].password() {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {bin:?} (install redis-tools, or set {REDIS_CLI_BIN_ENV}): {e}")
        });
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for redis-cli") {
                break Some(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        match status {
            Some(s) if s.success() && output.contains("All 16384 slots covered") => {}
            Some(s) => self.fail(&format!(
                "`redis-cli --cluster create` failed ({s})\n--- redis-cli output ---\n{output}"
            )),
            None => self.fail(&format!(
                "`redis-cli --cluster create` did not finish within {CREATE_TIMEOUT:?}\n\
                 --- redis-cli output ---\n{output}"
            )),
        }
    }

    /// ADDSLOTSRANGE on each master, MEET, then REPLICATE (for fewer than 3 masters).
    fn create_by_hand(&self) {
        let ids: Vec<String> = self.nodes.iter().map(|n| self.node_id(n.port())).collect();
        let per = usize::from(SLOTS) / self.masters;
        for (i, master) in self.nodes[..self.masters].iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == self.masters {
                usize::from(SLOTS) - 1
            } else {
                (i + 1) * per - 1
            };
            let mut conn = master.conn();
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query::<()>(&mut conn)
                .unwrap_or_else(|e| self.fail(&format!("CLUSTER ADDSLOTSRANGE: {e}")));
            let _ = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query::<()>(&mut conn);
        }
        let first_port = self.nodes[0].port();
        for node in &self.nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(first_port)
                .query::<()>(&mut node.conn())
                .unwrap_or_else(|e| self.fail(&format!("CLUSTER MEET: {e}")));
        }
        // A replica can only REPLICATE a master it knows.
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for (r, replica) in self.nodes[self.masters..].iter().enumerate() {
            let master_id = &ids[r % self.masters];
            loop {
                let res = redis::cmd("CLUSTER")
                    .arg("REPLICATE")
                    .arg(master_id)
                    .query::<()>(&mut replica.conn());
                match res {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => {
                        self.fail(&format!("CLUSTER REPLICATE on :{}: {e}", replica.port()))
                    }
                    Err(_) => thread::sleep(POLL),
                }
            }
        }
    }

    /// `Ok` when every node is up, `cluster_state:ok`, agrees on a full slot map, sees all
    /// masters and replicas connected, and every replica is in sync.
    fn check_healthy(&self) -> Result<(), String> {
        let total = self.nodes.len();
        let mut reference: Option<(u16, SlotMap)> = None;
        for node in &self.nodes {
            let port = node.port();
            let info = query_text(node, &["CLUSTER", "INFO"])
                .map_err(|e| format!(":{port} CLUSTER INFO: {e}"))?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!(":{port} is not cluster_state:ok yet"));
            }
            let view = parse_cluster_nodes(
                &query_text(node, &["CLUSTER", "NODES"])
                    .map_err(|e| format!(":{port} CLUSTER NODES: {e}"))?,
            );
            if view.len() != total {
                return Err(format!(":{port} knows {} of {total} nodes", view.len()));
            }
            if let Some(bad) = view.iter().find(|n| {
                n.link != "connected"
                    || n.is_failing()
                    || n.has_flag("handshake")
                    || n.has_flag("noaddr")
            }) {
                return Err(format!(":{port} sees {bad:?}"));
            }
            let masters = view.iter().filter(|n| n.is_master()).count();
            let replicas = view.iter().filter(|n| n.is_replica()).count();
            if masters != self.masters || replicas != self.masters * self.replicas_per_master {
                return Err(format!(
                    ":{port} sees {masters} masters and {replicas} replicas"
                ));
            }
            let map = slot_map(&view)?;
            match &reference {
                None => reference = Some((port, map)),
                Some((ref_port, ref_map)) if *ref_map != map => {
                    return Err(format!(":{port} and :{ref_port} disagree on the slot map"));
                }
                Some(_) => {}
            }
            let me = view.iter().find(|n| n.has_flag("myself"));
            if me.is_some_and(NodeLine::is_replica) {
                let repl = query_text(node, &["INFO", "replication"])
                    .map_err(|e| format!(":{port} INFO replication: {e}"))?;
                if info_field(&repl, "master_link_status") != Some("up") {
                    return Err(format!(":{port} replica not in sync yet"));
                }
            }
        }
        Ok(())
    }

    fn check_failed_over(&self, killed_port: u16) -> Result<(), String> {
        let mut reference: Option<(u16, SlotMap)> = None;
        for node in self.live_nodes() {
            let port = node.port();
            let info = query_text(node, &["CLUSTER", "INFO"])
                .map_err(|e| format!(":{port} CLUSTER INFO: {e}"))?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!(":{port} is not cluster_state:ok"));
            }
            let view = parse_cluster_nodes(
                &query_text(node, &["CLUSTER", "NODES"])
                    .map_err(|e| format!(":{port} CLUSTER NODES: {e}"))?,
            );
            let by_id: HashMap<&str, &NodeLine> = view.iter().map(|n| (n.id.as_str(), n)).collect();
            if let Some(dead) = view.iter().find(|n| n.port == killed_port) {
                if !dead.has_flag("fail") {
                    return Err(format!(
                        ":{port} does not flag :{killed_port} as failed yet"
                    ));
                }
            }
            let map = slot_map(&view)?;
            for ((a, b), id) in &map {
                let owner = by_id[id.as_str()];
                if owner.port == killed_port || owner.is_failing() || !self.is_live(owner.port) {
                    return Err(format!(
                        ":{port} still maps slots {a}-{b} to :{} ({:?})",
                        owner.port, owner.flags
                    ));
                }
            }
            match &reference {
                None => reference = Some((port, map)),
                Some((ref_port, ref_map)) if *ref_map != map => {
                    return Err(format!(":{port} and :{ref_port} disagree on the slot map"));
                }
                Some(_) => {}
            }
            // The other replicas of the killed master follow the promoted one, in sync.
            let me = view.iter().find(|n| n.has_flag("myself"));
            if let Some(me) = me.filter(|m| m.is_replica()) {
                let master = me.master_id.as_deref().and_then(|id| by_id.get(id));
                if master.is_none_or(|m| m.port == killed_port || !self.is_live(m.port)) {
                    return Err(format!(":{port} still replicates a dead master"));
                }
                let repl = query_text(node, &["INFO", "replication"])
                    .map_err(|e| format!(":{port} INFO replication: {e}"))?;
                if info_field(&repl, "master_link_status") != Some("up") {
                    return Err(format!(":{port} replica not in sync with its new master"));
                }
            }
        }
        Ok(())
    }

    /// `Ok` when the restarted node `port` is back: every live node (it included) reports
    /// `cluster_state:ok` and holds the same picture of the live nodes (roles, masters, slot
    /// map, none failing or disconnected), and every live replica is in sync. A restarted
    /// master whose slots were failed over must have turned into a replica for the pictures
    /// to agree.
    fn check_rejoined(&self, port: u16) -> Result<(), String> {
        let mut reference: Option<(u16, String)> = None;
        for node in self.live_nodes() {
            let p = node.port();
            let info = query_text(node, &["CLUSTER", "INFO"])
                .map_err(|e| format!(":{p} CLUSTER INFO: {e}"))?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!(":{p} is not cluster_state:ok"));
            }
            let view = self
                .node_view(p)
                .map_err(|e| format!(":{p} CLUSTER NODES: {e}"))?;
            if !view.iter().any(|n| n.port == port) {
                return Err(format!(":{p} does not list :{port}"));
            }
            let port_of: HashMap<&str, u16> =
                view.iter().map(|n| (n.id.as_str(), n.port)).collect();
            let mut picture = Vec::new();
            for n in view.iter().filter(|n| self.is_live(n.port)) {
                if n.is_failing() || n.link != "connected" {
                    return Err(format!(":{p} sees :{} as {:?}", n.port, n.flags));
                }
                let master = n.master_id.as_deref().and_then(|id| port_of.get(id));
                picture.push(format!("{} {} {master:?}", n.port, n.is_master()));
            }
            picture.sort();
            let map = slot_map(&view)?;
            let picture = format!("{picture:?} {map:?}");
            match &reference {
                None => reference = Some((p, picture)),
                Some((ref_port, ref_picture)) if *ref_picture != picture => {
                    return Err(format!(":{p} and :{ref_port} disagree on the cluster"));
                }
                Some(_) => {}
            }
            let me = view.iter().find(|n| n.has_flag("myself"));
            if me.is_some_and(NodeLine::is_replica) {
                let repl = query_text(node, &["INFO", "replication"])
                    .map_err(|e| format!(":{p} INFO replication: {e}"))?;
                if info_field(&repl, "master_link_status") != Some("up") {
                    return Err(format!(":{p} replica not in sync yet"));
                }
            }
        }
        Ok(())
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

/// Inclusive slot ranges, each with the id of the master serving it.
type SlotMap = BTreeMap<(u16, u16), String>;

/// The slot ranges of a `CLUSTER NODES` view, each with its owner's id; `Err` unless all
/// 16384 slots are assigned exactly once.
fn slot_map(view: &[NodeLine]) -> Result<SlotMap, String> {
    let mut map = BTreeMap::new();
    for n in view.iter().filter(|n| n.is_master()) {
        for &range in &n.slots {
            map.insert(range, n.id.clone());
        }
    }
    let mut next = 0u32;
    for &(a, b) in map.keys() {
        if u32::from(a) != next {
            return Err(format!("slots {next}..{a} unassigned or doubly assigned"));
        }
        next = u32::from(b) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(format!("slots {next}..16383 unassigned"));
    }
    // Ranges are normalized (adjacent ranges of one owner merged) so that views listing the
    // same assignment differently compare equal.
    let mut merged = SlotMap::new();
    let mut current: Option<((u16, u16), String)> = None;
    for ((a, b), id) in map {
        current = match current {
            Some(((ca, cb), cid)) if cid == id && cb + 1 == a => Some(((ca, b), cid)),
            Some((range, cid)) => {
                merged.insert(range, cid);
                Some(((a, b), id))
            }
            None => Some(((a, b), id)),
        };
    }
    if let Some((range, id)) = current {
        merged.insert(range, id);
    }
    Ok(merged)
}

/// One command on a fresh connection with short timeouts, the reply as text.
fn query_text(node: &RedisServer, args: &[&str]) -> redis::RedisResult<String> {
    let mut conn = quick_conn(node)?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

/// A connection that fails fast (for polling nodes that may be dead or busy).
fn quick_conn(node: &RedisServer) -> redis::RedisResult<redis::Connection> {
    let conn = node
        .client()
        .get_connection_with_timeout(Duration::from_millis(500))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}

/// Connections to the masters involved in a migration, kept across the slots of a reshard.
struct SlotMover<'a> {
    cluster: &'a RedisCluster,
    from_port: u16,
    to_port: u16,
    from_id: String,
    to_id: String,
    from: redis::Connection,
    to: redis::Connection,
    /// Every other live master.
    others: Vec<(u16, redis::Connection)>,
}

impl<'a> SlotMover<'a> {
    fn new(cluster: &'a RedisCluster, from_port: u16, to_port: u16) -> SlotMover<'a> {
        assert_ne!(from_port, to_port, "moving slots from a node to itself");
        let from_id = cluster.node_id(from_port);
        let to_id = cluster.node_id(to_port);
        let others = cluster
            .masters()
            .into_iter()
            .map(|(_, port, _)| port)
            .filter(|p| *p != from_port && *p != to_port)
            .map(|p| (p, cluster.conn(p)))
            .collect();
        SlotMover {
            cluster,
            from_port,
            to_port,
            from_id,
            to_id,
            from: cluster.conn(from_port),
            to: cluster.conn(to_port),
            others,
        }
    }

    fn fail(&self, slot: u16, why: String) -> ! {
        self.cluster.fail(&format!(
            "moving slot {slot} from :{} to :{}: {why}",
            self.from_port, self.to_port
        ))
    }

    fn move_slot(&mut self, slot: u16) {
        let (from_port, to_port) = (self.from_port, self.to_port);
        if let Err(e) = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&self.from_id)
            .query::<()>(&mut self.to)
        {
            self.fail(slot, format!("SETSLOT IMPORTING on :{to_port}: {e}"));
        }
        if let Err(e) = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&self.to_id)
            .query::<()>(&mut self.from)
        {
            self.fail(slot, format!("SETSLOT MIGRATING on :{from_port}: {e}"));
        }
        let mut io_errors = 0;
        loop {
            let keys: Vec<Vec<u8>> = match redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(MIGRATE_BATCH)
                .query(&mut self.from)
            {
                Ok(keys) => keys,
                Err(e) => self.fail(slot, format!("GETKEYSINSLOT on :{from_port}: {e}")),
            };
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(5000);
            if let Some(p) = self.cluster.node(to_port).password() {
                migrate.arg("AUTH").arg(p);
            }
            migrate.arg("KEYS");
            for k in &keys {
                migrate.arg(k.as_slice());
            }
            match migrate.query::<String>(&mut self.from) {
                // NOKEY: the keys were deleted meanwhile.
                Ok(_) => {}
                Err(e) if e.code() == Some("IOERR") && io_errors < 5 => {
                    io_errors += 1;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => self.fail(slot, format!("MIGRATE of {} keys: {e}", keys.len())),
            }
        }
        // The target first (it bumps its config epoch), then the source, then the others.
        let mut targets: Vec<(u16, &mut redis::Connection)> =
            vec![(to_port, &mut self.to), (from_port, &mut self.from)];
        targets.extend(self.others.iter_mut().map(|(p, c)| (*p, c)));
        let mut failures = Vec::new();
        for (port, conn) in targets {
            if let Err(e) = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&self.to_id)
                .query::<()>(conn)
            {
                failures.push(format!("SETSLOT NODE on :{port}: {e}"));
            }
        }
        if !failures.is_empty() {
            self.fail(slot, failures.join("; "));
        }
    }
}
