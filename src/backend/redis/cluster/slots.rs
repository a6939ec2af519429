//! Slots and nodes: routing one command to a node, key slots, WAIT on a cluster.

use std::time::Duration;

use redis::cluster::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, RedisResult, Value};

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
}
