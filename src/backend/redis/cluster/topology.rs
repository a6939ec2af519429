//! Operations over every master under one stable slot map ([`on_every_master`]).

use std::time::Duration;

use redis::cluster::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisError, RedisResult};

use super::slots::on_node;

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
    on_all_masters(conn, |conn, masters| {
        masters
            .iter()
            .map(|(host, port)| f(conn, host, *port))
            .collect()
    })
}

/// [`on_every_master`] with every master's address handed to `f` at once, so that `f` may work
/// on them in parallel (on connections of its own); the same stable-slot-map checks around it.
pub(crate) fn on_all_masters<T>(
    conn: &mut ClusterConnection,
    mut f: impl FnMut(&mut ClusterConnection, &[(String, u16)]) -> RedisResult<Vec<T>>,
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
        let masters: Vec<(String, u16)> = before
            .masters
            .iter()
            .map(|m| (m.host.clone(), m.port))
            .collect();
        let out = f(conn, &masters)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
