//! Redis Cluster and Sentinel against real local servers: the conformance suite unchanged,
//! failover with and without `REDIS_WAIT_REPLICAS`, live resharding under load, and Sentinel
//! failover.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graphrag_kv::{BackendKind, ClusterMode, KvStore, Storage, StoreConfig, StoreConfigBuilder};
use serde_json::json;
use support::cluster::RedisCluster;
use support::sentinel::RedisSentinelSet;

fn cluster_config(cluster: &RedisCluster) -> StoreConfigBuilder {
    StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(cluster.url_list())
        .key_prefix(support::unique_prefix("c"))
        // Ride through a failover (node timeout 2 s, election, slot map refresh).
        .retries(14)
        .socket_timeout(Duration::from_secs(2))
        .connection_timeout(Duration::from_millis(500))
}

fn cluster_backend() -> (RedisCluster, impl Fn(&str) -> Arc<dyn KvStore>) {
    let cluster = RedisCluster::start();
    let storage = Storage::open(&cluster_config(&cluster).build().unwrap()).unwrap();
    (cluster, move |ns: &str| storage.namespace(ns).unwrap())
}

support::conformance::conformance_tests!(on_cluster, cluster_backend);
support::conformance_typed::typed_conformance_tests!(on_cluster_typed, cluster_backend);

fn sentinel_backend() -> (RedisSentinelSet, impl Fn(&str) -> Arc<dyn KvStore>) {
    let set = RedisSentinelSet::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .sentinel(set.sentinel_urls(), set.master_name())
        .key_prefix(support::unique_prefix("s"))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    (set, move |ns: &str| storage.namespace(ns).unwrap())
}

support::conformance::conformance_tests!(through_sentinel, sentinel_backend);

#[test]
fn cluster_is_detected_from_one_url_or_several() {
    let cluster = RedisCluster::start();
    let one = cluster.urls()[0].clone();
    for url in [one, cluster.url_list()] {
        let vars: HashMap<String, String> = [
            ("STORAGE_KV_BACKEND", "redis".to_string()),
            ("REDIS_URL", url),
            ("REDIS_KEY_PREFIX", support::unique_prefix("d")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = StoreConfigBuilder::from_vars(&vars)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(config.redis.cluster, ClusterMode::Auto);
        let storage = Storage::open(&config).unwrap();
        let s = storage.namespace("text_chunks").unwrap();
        // 300 ids spread over all three masters: only a cluster client can write them.
        let items: Vec<_> = (0..300).map(|i| (format!("id-{i}"), json!(i))).collect();
        s.upsert(items).unwrap();
        assert_eq!(s.all_keys().unwrap().len(), 300);
        assert_eq!(s.stats().unwrap().keys, 300);
        let per_master = cluster.key_counts();
        assert!(
            per_master.iter().filter(|n| **n > 0).count() >= 3,
            "{per_master:?}"
        );
        s.clear().unwrap();
    }
}

/// What a failover run saw.
struct FailoverRun {
    /// Ids acknowledged by `upsert`.
    acked: usize,
    /// Acknowledged ids that read back as missing.
    lost: usize,
    /// Acknowledged ids that could be lost at all: their slot was served by the killed master
    /// and they were acknowledged before the failover ended (counted from the acknowledgements,
    /// independently of what was read back).
    at_risk: usize,
    /// Failed `upsert` calls.
    errors: u64,
}

/// Writers run while a master is SIGKILLed. Panics if a write is lost that no failover can
/// explain: one on a master that was not killed, or one acknowledged after the failover.
fn failover_run(wait_replicas: u32) -> FailoverRun {
    let mut cluster = RedisCluster::start();
    let config = cluster_config(&cluster)
        .wait_replicas(wait_replicas, Duration::from_secs(1))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (store, acked, errors, stop) =
                (store.clone(), acked.clone(), errors.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let batch: Vec<_> = (0..5)
                        .map(|j| (format!("w{t}-{i}-{j}"), json!({"t": t, "i": i})))
                        .collect();
                    let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
                    match store.upsert(batch) {
                        Ok(()) => acked.lock().unwrap().extend(ids),
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("writer {t}: {e}");
                        }
                    }
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let victim = cluster.masters()[0].1;
    let victim_slots = cluster.slots_of(victim);
    let on_victim = |id: &str| {
        let slot = support::cluster::key_slot(
            format!("{}:text_chunks:{id}", config.redis.key_prefix).as_bytes(),
        );
        victim_slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    };
    let acked_before_kill: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        !acked_before_kill.is_empty(),
        "no write acknowledged before the kill"
    );
    // `on_victim` agrees with the cluster's own routing (so `at_risk` counts the right ids).
    for id in acked_before_kill.iter().take(20) {
        let key = format!("{}:text_chunks:{id}", config.redis.key_prefix);
        assert_eq!(
            on_victim(id),
            cluster.master_for_key(key.as_bytes()) == victim,
            "{key}"
        );
    }
    cluster.kill_node(victim);
    let t0 = Instant::now();
    cluster.wait_for_failover(victim);
    eprintln!("failover of :{victim} took {:?}", t0.elapsed());
    // The dead master comes back as a replica of the promoted one, so its shard can confirm
    // WAIT again (with no replica left, REDIS_WAIT_REPLICAS=1 rightly refuses to acknowledge).
    // Waiting until it has rejoined also ends the time it could believe it still served its
    // old slots: any write acknowledged after this point went to a master that stays one.
    cluster.restart_node(victim);
    let acked_after_failover = acked.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > acked_after_failover,
        "writers made no progress after the failover"
    );
    let at_risk = acked[..acked_after_failover]
        .iter()
        .filter(|id| on_victim(id))
        .count();
    let mut lost = Vec::new();
    for (n, chunk) in acked.chunks(500).enumerate() {
        let got = store.get_by_ids(chunk, None).unwrap();
        for (i, v) in got.iter().enumerate() {
            if v.is_none() {
                lost.push((n * 500 + i, chunk[i].clone()));
            }
        }
    }
    for (position, id) in &lost {
        assert!(
            on_victim(id),
            "{id} was lost although the master of its slot was never killed"
        );
        assert!(
            *position < acked_after_failover,
            "{id} was lost although acknowledged after the failover ({position} >= \
             {acked_after_failover})"
        );
    }
    FailoverRun {
        acked: acked.len(),
        lost: lost.len(),
        at_risk,
        errors: errors.load(Ordering::Relaxed),
    }
}

#[test]
fn failover_with_wait_replicas_loses_no_acknowledged_write() {
    let run = failover_run(1);
    eprintln!(
        "REDIS_WAIT_REPLICAS=1: {} acknowledged ({} on the killed master before the failover \
         ended), {} lost, {} errors",
        run.acked, run.at_risk, run.lost, run.errors
    );
    assert!(
        run.at_risk > 0,
        "no acknowledged write was exposed to the kill"
    );
    assert_eq!(
        run.lost, 0,
        "{} of {} acknowledged writes lost",
        run.lost, run.acked
    );
}

#[test]
fn failover_without_wait_replicas_keeps_working() {
    let run = failover_run(0);
    // Asynchronous replication may lose writes acknowledged just before the kill, but only
    // those (`failover_run` checks each lost id); the figure goes to the docs. The store itself
    // must keep working.
    eprintln!(
        "REDIS_WAIT_REPLICAS=0: {} acknowledged ({} on the killed master before the failover \
         ended), {} lost, {} errors",
        run.acked, run.at_risk, run.lost, run.errors
    );
    // Each lost id was checked by `failover_run` to be one of the `at_risk` ones, so the loss
    // is bounded by them; here: the run did expose acknowledged writes to the kill.
    assert!(
        run.at_risk > 0,
        "no acknowledged write was exposed to the kill"
    );
}

#[test]
fn resharding_under_load_is_invisible_to_callers() {
    let cluster = RedisCluster::start();
    let storage = Storage::open(&cluster_config(&cluster).build().unwrap()).unwrap();
    let store = storage.namespace("full_docs").unwrap();
    let seed: Vec<_> = (0..2000).map(|i| (format!("seed-{i}"), json!(i))).collect();
    let seed_ids: Vec<String> = seed.iter().map(|(id, _)| id.clone()).collect();
    store.upsert(seed).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for t in 0..2 {
        let (store, stop, written) = (store.clone(), stop.clone(), written.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<_> = (0..20)
                    .map(|j| (format!("r{t}-{i}-{j}"), json!(j)))
                    .collect();
                let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
                store.upsert(batch).expect("write during resharding");
                written.lock().unwrap().extend(ids);
                i += 1;
            }
        }));
    }
    for _ in 0..2 {
        let (store, stop, ids) = (store.clone(), stop.clone(), seed_ids.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for chunk in ids.chunks(200) {
                    let got = store
                        .get_by_ids(chunk, None)
                        .expect("read during resharding");
                    assert!(got.iter().all(Option::is_some), "a seeded id went missing");
                    assert!(store.filter_keys(chunk).expect("filter").is_empty());
                }
            }
        }));
    }
    let masters = cluster.masters();
    let (from, to) = (masters[0].1, masters[1].1);
    cluster.reshard(200, from, to);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let written = written.lock().unwrap().clone();
    assert!(!written.is_empty());
    for chunk in written.chunks(500) {
        assert!(
            store.filter_keys(chunk).unwrap().is_empty(),
            "a write was lost"
        );
    }
    let mut all = store.all_keys().unwrap();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 2000 + written.len());
}

/// `all_keys` in a loop while slots move back and forth between two masters: every `Ok` holds
/// exactly the stored ids, never a part of them; the rest are errors naming the moving slot map.
#[test]
fn all_keys_during_a_live_reshard_is_complete_or_an_error() {
    const N: usize = 10_000;
    /// Slots moved per direction per round, then the cluster is left alone for `IDLE` so some
    /// scans can see a stable slot map (without the pauses every scan would overlap a move).
    const SLOTS_PER_MOVE: usize = 40;
    const ROUNDS: usize = 10;
    const IDLE: Duration = Duration::from_millis(300);
    let cluster = RedisCluster::start();
    let storage = Storage::open(&cluster_config(&cluster).build().unwrap()).unwrap();
    let store = storage.namespace("full_docs").unwrap();
    let items: Vec<_> = (0..N).map(|i| (format!("doc-{i}"), json!(i))).collect();
    let expected: HashSet<String> = items.iter().map(|(id, _)| id.clone()).collect();
    store.upsert(items).unwrap();
    assert_eq!(store.all_keys().unwrap().len(), N);

    let masters = cluster.masters();
    let (a, b) = (masters[0].1, masters[1].1);
    let stop = AtomicBool::new(false);
    let (mut oks, mut errors, mut partial) = (0u32, 0u32, Vec::new());
    std::thread::scope(|scope| {
        let resharder = scope.spawn(|| {
            for _ in 0..ROUNDS {
                // `reshard` moves the lowest slots of the source: the same slots go to `b`
                // and come back to `a` (they are then `b`'s lowest).
                cluster.reshard(SLOTS_PER_MOVE, a, b);
                std::thread::sleep(IDLE);
                cluster.reshard(SLOTS_PER_MOVE, b, a);
                std::thread::sleep(IDLE);
            }
            stop.store(true, Ordering::Relaxed);
        });
        while !stop.load(Ordering::Relaxed) {
            match store.all_keys() {
                Ok(ids) => {
                    let got: HashSet<String> = ids.iter().cloned().collect();
                    if ids.len() == N && got == expected {
                        oks += 1;
                    } else {
                        partial.push((ids.len(), expected.difference(&got).count()));
                    }
                }
                Err(e) => {
                    errors += 1;
                    assert!(
                        matches!(e, graphrag_kv::Error::ClusterUnstable { .. }),
                        "unexpected error: {e}"
                    );
                }
            }
        }
        resharder.join().unwrap();
    });
    eprintln!(
        "all_keys during resharding: {oks} complete, {errors} errors, {} partial {partial:?}",
        partial.len()
    );
    assert!(
        partial.is_empty(),
        "all_keys returned Ok with a partial or wrong set (ids returned, ids missing):          {partial:?}; {oks} complete, {errors} errors"
    );
    assert!(oks > 0, "no scan completed: the test proved nothing");
    let mut all = store.all_keys().unwrap();
    all.sort();
    assert_eq!(all.len(), N);
}

/// A master is down and, with no replica, nobody serves its slots (the cluster allows that with
/// `cluster-require-full-coverage no`): every operation that must see all keys fails instead of
/// answering from the two masters left.
#[test]
fn operations_over_all_keys_fail_while_a_master_is_down() {
    let mut cluster = RedisCluster::start_with(3, 0, &["--cluster-require-full-coverage", "no"]);
    let config = cluster_config(&cluster).retries(2).build().unwrap();
    let storage = Storage::open(&config).unwrap();
    let store = storage.namespace("full_docs").unwrap();
    let items: Vec<_> = (0..3000).map(|i| (format!("doc-{i}"), json!(i))).collect();
    store.upsert(items).unwrap();
    assert_eq!(store.all_keys().unwrap().len(), 3000);
    let victim = cluster.masters()[1].1;
    cluster.kill_node(victim);
    cluster.wait_for_fail_flag(victim);

    use graphrag_kv::Error;
    let expect_error = |what: &str, r: Result<String, Error>| match r {
        Ok(answer) => panic!("{what} answered Ok with a master down: {answer}"),
        Err(e) => {
            eprintln!("{what}: {e}");
            // The checkpoint reports its failures as `Checkpoint`, with the reason in text.
            assert!(
                matches!(e, Error::ClusterUnstable { .. } | Error::Checkpoint { .. })
                    || e.is_connection(),
                "{what}: unexpected error {e}"
            );
        }
    };
    expect_error(
        "all_keys",
        store.all_keys().map(|k| format!("{} keys", k.len())),
    );
    expect_error("stats", store.stats().map(|s| format!("{} keys", s.keys)));
    expect_error(
        "list_namespaces",
        storage.list_namespaces().map(|n| format!("{n:?}")),
    );
    expect_error(
        "index_done_callback",
        store.index_done_callback().map(|()| String::new()),
    );
    // A refused clear deleted nothing: the keys on the live masters are all still there.
    expect_error("clear", store.clear().map(|()| String::new()));
    let alive: Vec<String> = (0..3000)
        .map(|i| format!("doc-{i}"))
        .filter(|id| {
            cluster.master_for_key(format!("{}:full_docs:{id}", config.redis.key_prefix).as_bytes())
                != victim
        })
        .collect();
    assert!(!alive.is_empty());
    assert!(
        store.filter_keys(&alive).unwrap().is_empty(),
        "clear deleted keys"
    );
}

#[test]
fn sentinel_failover_keeps_writes_going() {
    let mut set = RedisSentinelSet::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .sentinel(set.sentinel_urls(), set.master_name())
        .retries(14)
        .socket_timeout(Duration::from_secs(2))
        .connection_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let s = storage.namespace("llm_response_cache").unwrap();
    // The first writes wait for the replica, so the failover cannot lose them.
    let mut waiting = config.clone();
    waiting.redis.wait_replicas = 1;
    let before: Vec<_> = (0..200).map(|i| (format!("b{i}"), json!(i))).collect();
    Storage::open(&waiting)
        .unwrap()
        .namespace("llm_response_cache")
        .unwrap()
        .upsert(before)
        .unwrap();
    assert_eq!(s.get_by_id("b0").unwrap(), Some(json!(0)));
    let old = set.master_port();
    set.kill_master();
    set.wait_for_failover(old);
    assert_ne!(set.master_port(), old);
    // The same store, no reopening: its retries replace the dead connections with new ones
    // to the master Sentinel now names.
    let after: Vec<_> = (0..200).map(|i| (format!("a{i}"), json!(i))).collect();
    s.upsert(after)
        .expect("writes resume through the same store after the failover");
    let ids: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
    assert!(
        s.filter_keys(&ids).unwrap().is_empty(),
        "writes made before the failover lost"
    );
    let ids: Vec<String> = (0..200).map(|i| format!("a{i}")).collect();
    assert!(s.filter_keys(&ids).unwrap().is_empty());
}

/// Runs the `graphrag-kv` command with only the given variables set.
#[cfg(feature = "cli")]
fn cli(vars: &[(&str, String)], args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_graphrag-kv"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.args(args).output().unwrap()
}

#[cfg(feature = "cli")]
#[test]
fn command_line_works_on_cluster_and_through_sentinel() {
    let cluster = RedisCluster::start();
    let set = RedisSentinelSet::start();
    let setups: Vec<Vec<(&str, String)>> = vec![
        vec![
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_URL", cluster.url_list()),
        ],
        vec![
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_SENTINEL_URLS", set.sentinel_url_list()),
            ("REDIS_SENTINEL_MASTER", set.master_name().to_string()),
        ],
    ];
    for vars in setups {
        for i in 0..20 {
            let out = cli(
                &vars,
                &[
                    "put",
                    "text_chunks",
                    &format!("id-{i}"),
                    &format!("{{\"n\": {i}}}"),
                ],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = cli(&vars, &["get", "text_chunks", "id-7"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
            json!({"n": 7})
        );
        let out = cli(&vars, &["keys", "text_chunks"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 20);
        let out = cli(&vars, &["stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(stats["namespaces"]["text_chunks"]["keys"], 20, "{stats}");
        let out = cli(&vars, &["clear", "text_chunks"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = cli(&vars, &["get", "text_chunks", "id-7"]);
        assert_eq!(out.status.code(), Some(1));
    }
}

/// Over 100,000 keys spread on every master, `all_keys` (masters scanned at the same time) and
/// the key stream (masters in turn, a page at a time) list the same ids, and a pool too small
/// for the parallel scan still lists them all. Prints both durations (`--nocapture`): the
/// figures of docs/BENCHMARKS.md come from
/// `cargo test --release --test cluster -- all_keys_100k --nocapture`.
#[test]
fn all_keys_100k_in_parallel_equals_the_key_stream() {
    let cluster = RedisCluster::start();
    let prefix = support::unique_prefix("k");
    let storage = Storage::open(
        &cluster_config(&cluster)
            .key_prefix(&prefix)
            .build()
            .unwrap(),
    )
    .unwrap();
    let s = storage.namespace("all_keys_100k").unwrap();
    for start in (0..100_000).step_by(5_000) {
        s.upsert(
            (start..start + 5_000)
                .map(|i| (format!("key-{i:06}"), json!({"n": i})))
                .collect(),
        )
        .unwrap();
    }
    for _ in 0..3 {
        let t = Instant::now();
        let all = s.all_keys().unwrap();
        let parallel = t.elapsed();
        let t = Instant::now();
        let mut streamed = HashSet::new();
        let mut largest = 0;
        s.scan_keys(&mut |page| {
            largest = largest.max(page.len());
            streamed.extend(page);
            Ok(())
        })
        .unwrap();
        let in_turn = t.elapsed();
        eprintln!("all_keys (masters in parallel) {parallel:?}; scan_keys (in turn) {in_turn:?}");
        assert_eq!(all.len(), 100_000);
        assert_eq!(all.iter().cloned().collect::<HashSet<_>>(), streamed);
        assert!(largest < 20_000, "a page of {largest} ids");
    }
    let one = Storage::open(
        &cluster_config(&cluster)
            .key_prefix(&prefix)
            .max_connections(1)
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        one.namespace("all_keys_100k")
            .unwrap()
            .all_keys()
            .unwrap()
            .len(),
        100_000
    );
}
