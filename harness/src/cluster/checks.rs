//! How a cluster is created (redis-cli, or by hand) and the health checks `start`,
//! `wait_for_failover` and `restart_node` poll.

use std::fs::File;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::nodes::{slot_map, SlotMap};
use super::*;

impl RedisCluster {
    pub(super) fn create_with_redis_cli(&self) {
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
    pub(super) fn create_by_hand(&self) {
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
    pub(super) fn check_healthy(&self) -> Result<(), String> {
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

    pub(super) fn check_failed_over(&self, killed_port: u16) -> Result<(), String> {
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
    pub(super) fn check_rejoined(&self, port: u16) -> Result<(), String> {
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
}

/// One command on a fresh connection with short timeouts, the reply as text.
pub(super) fn query_text(node: &RedisServer, args: &[&str]) -> redis::RedisResult<String> {
    let mut conn = quick_conn(node)?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn)
}

/// A connection that fails fast (for polling nodes that may be dead or busy).
pub(super) fn quick_conn(node: &RedisServer) -> redis::RedisResult<redis::Connection> {
    let conn = node
        .client()
        .get_connection_with_timeout(Duration::from_millis(500))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(conn)
}
