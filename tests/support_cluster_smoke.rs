//! Smoke tests of the `RedisCluster` and `RedisSentinelSet` guards of `tests/support`: they
//! start real processes and check the guards' own claims against the servers.

mod support;

use std::collections::HashSet;
use std::time::Instant;

use support::cluster::{crc16_xmodem, key_slot, RedisCluster, SLOTS};
use support::sentinel::RedisSentinelSet;

fn get(conn: &mut redis::Connection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(conn)
}

fn set(conn: &mut redis::Connection, key: &str, value: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(key).arg(value).query(conn)
}

#[test]
fn key_slot_known_values() {
    // The check value of CRC16/XMODEM, and slots quoted in the Redis Cluster spec and docs.
    assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    assert_eq!(key_slot(b"123456789"), 12739);
    assert_eq!(key_slot(b"foo"), 12182);
    assert_eq!(key_slot(b"bar"), 5061);
    assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
    assert_eq!(key_slot(b"foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % SLOTS);
    assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
}

#[test]
fn cluster_starts_routes_keys_and_moves_slots() {
    let t0 = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("cluster started in {:?}", t0.elapsed());

    assert_eq!(cluster.urls().len(), 6);
    assert_eq!(cluster.url_list().split(',').count(), 6);
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");

    // Every node covers all slots, in agreement with CLUSTER INFO.
    for node in cluster.nodes() {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut node.conn())
            .unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{info}");
        assert!(info.contains("cluster_known_nodes:6"), "{info}");
    }
    // Every master has one live replica, each a different node.
    let replicas: HashSet<u16> = masters
        .iter()
        .map(|(_, port, _)| cluster.replica_of(*port))
        .collect();
    assert_eq!(replicas.len(), 3);
    for (addr, port, id) in &masters {
        assert_eq!(addr, &format!("127.0.0.1:{port}"));
        assert_eq!(&cluster.node_id(*port), id);
        assert!(!replicas.contains(port));
    }

    // key_slot agrees with the server.
    let keys: Vec<&[u8]> = vec![
        b"foo",
        b"bar",
        b"123456789",
        b"{user1000}.following",
        b"{user1000}.followers",
        b"user1000",
        b"{}",
        b"{}user1000",
        b"foo{}{bar}",
        b"foo{{bar}}zap",
        b"foo{bar}{zap}",
        b"a{b",
        b"}{x}",
        "clé-日本語-🦀".as_bytes(),
        "{日本}語".as_bytes(),
        b"",
        b"\xff\x00\xfe",
    ];
    let mut conn = cluster.conn(masters[0].1);
    for key in &keys {
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(*key)
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            key_slot(key),
            server,
            "key {:?}",
            String::from_utf8_lossy(key)
        );
    }

    // A key written on its master is readable there; another master redirects.
    let key = "smoke:hello";
    let owner = cluster.master_for_key(key.as_bytes());
    assert!(masters.iter().any(|m| m.1 == owner));
    set(&mut cluster.conn(owner), key, "world").unwrap();
    assert_eq!(
        get(&mut cluster.conn(owner), key).unwrap().as_deref(),
        Some("world")
    );
    let other = masters.iter().find(|m| m.1 != owner).unwrap().1;
    let err = get(&mut cluster.conn(other), key).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{owner}")),
        "{err}"
    );

    // move_slot: a slot holding 250 keys (several MIGRATE batches) changes master.
    let tagged: Vec<String> = (0..250).map(|i| format!("{{mv}}:{i}")).collect();
    let slot = key_slot(b"mv");
    let from = cluster.master_for_slot(slot);
    let to = masters.iter().find(|m| m.1 != from).unwrap().1;
    let mut c = cluster.conn(from);
    for k in &tagged {
        set(&mut c, k, k).unwrap();
    }
    let t = Instant::now();
    cluster.move_slot(slot, from, to);
    eprintln!("move_slot of 250 keys took {:?}", t.elapsed());
    assert_eq!(cluster.master_for_slot(slot), to);
    let count = |port: u16| -> usize {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut cluster.conn(port))
            .unwrap()
    };
    assert_eq!(count(from), 0);
    assert_eq!(count(to), 250);
    let mut c = cluster.conn(to);
    for k in &tagged {
        assert_eq!(get(&mut c, k).unwrap().as_deref(), Some(k.as_str()));
    }
    let err = get(&mut cluster.conn(from), &tagged[0]).unwrap_err();
    assert_eq!(err.code(), Some("MOVED"), "{err}");
    assert!(
        err.to_string().contains(&format!("{slot} 127.0.0.1:{to}")),
        "{err}"
    );
    // Every master agrees (SETSLOT NODE went to all of them).
    for (_, port, _) in cluster.masters() {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut cluster.conn(port))
            .unwrap();
        let owner = support::cluster::parse_cluster_nodes(&nodes)
            .into_iter()
            .find(|n| n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .unwrap();
        assert_eq!(owner.port, to, "view of :{port}");
    }

    // reshard: 20 more slots, then the slot counts add up.
    let before = cluster.masters();
    let t = Instant::now();
    cluster.reshard(20, to, from);
    eprintln!("reshard of 20 slots took {:?}", t.elapsed());
    let after = cluster.masters();
    let slots_of = |view: &[(String, u16, String)], port: u16| -> usize {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut cluster.conn(view[0].1))
            .unwrap();
        support::cluster::parse_cluster_nodes(&nodes)
            .into_iter()
            .find(|n| n.port == port)
            .unwrap()
            .slot_count()
    };
    assert_eq!(before.len(), after.len());
    let total: usize = after.iter().map(|m| slots_of(&after, m.1)).sum();
    assert_eq!(total, usize::from(SLOTS));
    assert!(slots_of(&after, from) >= 5461 + 20 - 1, "{after:?}");
    assert_eq!(cluster.key_counts().iter().sum::<usize>(), 251);
}

#[test]
fn cluster_failover_promotes_the_replica() {
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start();
    eprintln!("cluster started in {:?}", t0.elapsed());
    let key = "smoke:survivor";
    let victim = cluster.master_for_key(key.as_bytes());
    let replica = cluster.replica_of(victim);
    let mut c = cluster.conn(victim);
    set(&mut c, key, "still here").unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(1000).query(&mut c).unwrap();
    assert_eq!(acked, 1, "the replica did not acknowledge the write");
    drop(c);

    cluster.kill_node(victim);
    assert!(!cluster.live_ports().contains(&victim));
    let t = Instant::now();
    cluster.wait_for_failover(victim);
    eprintln!("cluster failover took {:?}", t.elapsed());

    let new_master = cluster.master_for_key(key.as_bytes());
    assert_ne!(new_master, victim);
    assert_eq!(new_master, replica, "the victim's own replica takes over");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert!(masters.iter().all(|m| m.1 != victim));
    let mut c = cluster.conn(new_master);
    assert_eq!(get(&mut c, key).unwrap().as_deref(), Some("still here"));
    set(&mut c, key, "written after the failover").unwrap();
    let role: String = redis::cmd("INFO").arg("replication").query(&mut c).unwrap();
    assert!(role.contains("role:master"), "{role}");

    // The promoted master has no replica until the old master comes back as one.
    let t = Instant::now();
    cluster.restart_node(victim);
    eprintln!("restart_node took {:?}", t.elapsed());
    assert_eq!(cluster.replica_of(new_master), victim);
    set(&mut c, key, "replicated again").unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(2000).query(&mut c).unwrap();
    assert_eq!(
        acked, 1,
        "the restarted node does not replicate the new master"
    );
    let mut r = cluster.conn(victim);
    let _: () = redis::cmd("READONLY").query(&mut r).unwrap();
    assert_eq!(
        get(&mut r, key).unwrap().as_deref(),
        Some("replicated again")
    );
}

#[test]
fn sentinel_failover_elects_the_replica() {
    let t0 = Instant::now();
    let mut set_ = RedisSentinelSet::start();
    eprintln!("sentinel set started in {:?}", t0.elapsed());
    assert_eq!(set_.master_name(), "mymaster");
    assert_eq!(set_.sentinel_urls().len(), 3);
    assert_eq!(set_.sentinel_url_list().split(',').count(), 3);
    let old = set_.master_port();
    assert_eq!(old, set_.servers()[0].port());

    let mut c = set_.server(old).conn();
    set(&mut c, "sentinel:before", "1").unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(1000).query(&mut c).unwrap();
    assert_eq!(acked, 1);
    drop(c);

    assert_eq!(set_.kill_master(), old);
    let t = Instant::now();
    set_.wait_for_failover(old);
    eprintln!("sentinel failover took {:?}", t.elapsed());
    let new = set_.master_port();
    assert_ne!(new, old);
    assert_eq!(new, set_.servers()[1].port());
    for s in set_.sentinels() {
        assert_eq!(s.master_port().unwrap(), new, "sentinel :{}", s.port());
    }
    let mut c = set_.server(new).conn();
    assert_eq!(
        get(&mut c, "sentinel:before").unwrap().as_deref(),
        Some("1")
    );
    set(&mut c, "sentinel:after", "2").unwrap();
    assert_eq!(get(&mut c, "sentinel:after").unwrap().as_deref(), Some("2"));

    // The old master comes back as a replica of the new one.
    let t = Instant::now();
    set_.restart_as_replica(old);
    eprintln!("restart_as_replica took {:?}", t.elapsed());
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(2000).query(&mut c).unwrap();
    assert_eq!(acked, 1);
    let mut r = set_.server(old).conn();
    assert_eq!(get(&mut r, "sentinel:after").unwrap().as_deref(), Some("2"));
    assert_eq!(set_.master_port(), new);
}

#[test]
fn sentinel_with_two_replicas_keeps_one_through_a_failover() {
    let mut set_ = RedisSentinelSet::start_with_replicas(2);
    assert_eq!(set_.servers().len(), 3);
    let old = set_.kill_master();
    let t = Instant::now();
    set_.wait_for_failover(old);
    eprintln!("sentinel failover with 2 replicas took {:?}", t.elapsed());
    let new = set_.master_port();
    assert_ne!(new, old);
    let mut c = set_.server(new).conn();
    set(&mut c, "k", "v").unwrap();
    let acked: i64 = redis::cmd("WAIT").arg(1).arg(2000).query(&mut c).unwrap();
    assert_eq!(acked, 1, "the other replica does not follow the new master");
}

#[test]
fn cluster_variant_two_masters_with_password() {
    // Fewer than 3 masters: assembled by hand (redis-cli refuses); the password must reach
    // the replicas (masterauth) and MIGRATE (AUTH).
    let t0 = Instant::now();
    let cluster = RedisCluster::start_with(2, 1, &["--requirepass", "s3cret"]);
    eprintln!("2 masters + 2 replicas started in {:?}", t0.elapsed());
    assert_eq!(cluster.nodes().len(), 4);
    assert!(cluster.urls().iter().all(|u| u.contains(":s3cret@")));
    let masters = cluster.masters();
    assert_eq!(masters.len(), 2, "{masters:?}");
    for (_, port, _) in &masters {
        let replica = cluster.replica_of(*port);
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut cluster.conn(replica))
            .unwrap();
        assert!(info.contains("master_link_status:up"), "{info}");
    }
    let slot = key_slot(b"pw");
    let from = cluster.master_for_slot(slot);
    let to = masters.iter().find(|m| m.1 != from).unwrap().1;
    let mut c = cluster.conn(from);
    for i in 0..120 {
        set(&mut c, &format!("{{pw}}{i}"), "v").unwrap();
    }
    cluster.move_slot(slot, from, to);
    assert_eq!(cluster.master_for_slot(slot), to);
    let moved: usize = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query(&mut cluster.conn(to))
        .unwrap();
    assert_eq!(moved, 120);
}
