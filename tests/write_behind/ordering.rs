//! Ordering and read-your-writes: the last call wins within and across batches, queued values are
//! read back (projected too), a randomized multi-thread model over Redis and JSON, readers never go
//! back, `clear` orders with queued writes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::Duration;

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{Item, JsonDir, KvStore};
use serde_json::{json, Value};

use crate::helpers::{redis_shared, tiny_batches, wb_json_with, Shared};
use crate::support::conformance::Rng;
use crate::support::RedisServer;

/// Upserts and deletes of the same ids in one batch end as the last call says, including an
/// upsert after a delete.
#[test]
fn mixed_ops_in_one_batch_end_as_the_last_call() {
    let server = RedisServer::start();
    let inner = redis_shared(&server, "mix").namespace("ns").unwrap();
    inner
        .upsert(vec![
            ("y".into(), json!("old y")),
            ("z".into(), json!("old z")),
        ])
        .unwrap();
    // One big batch: nothing is sent until flush.
    let config = WriteBehindConfig::builder()
        .max_delay(Duration::from_secs(60))
        .build()
        .unwrap();
    let wb = WriteBehind::new(inner, config);
    let s: &dyn KvStore = &wb;
    s.upsert(vec![("x".into(), json!(1))]).unwrap();
    s.delete_by_ids(&["x".into(), "y".into()]).unwrap();
    s.upsert(vec![("x".into(), json!(2)), ("y".into(), json!("new y"))])
        .unwrap();
    s.delete_by_ids(&["y".into()]).unwrap();
    s.upsert(vec![("w".into(), json!("w1")), ("w".into(), json!("w2"))])
        .unwrap();
    s.delete_by_ids(&["z".into()]).unwrap();
    s.upsert(vec![("z".into(), json!("new z"))]).unwrap();

    let expect = |store: &dyn KvStore, what: &str| {
        assert_eq!(store.get_by_id("x").unwrap(), Some(json!(2)), "{what}");
        assert_eq!(store.get_by_id("y").unwrap(), None, "{what}");
        assert_eq!(
            store.get_by_id("z").unwrap(),
            Some(json!("new z")),
            "{what}"
        );
        assert_eq!(store.get_by_id("w").unwrap(), Some(json!("w2")), "{what}");
        let mut keys = store.all_keys().unwrap();
        keys.sort();
        assert_eq!(keys, ["w", "x", "z"], "{what}");
        assert_eq!(
            store
                .filter_keys(&["x".into(), "y".into(), "z".into(), "q".into()])
                .unwrap(),
            ["y", "q"],
            "{what}"
        );
    };
    // Before the flush, the inner store still has the old state; reads see the new one.
    assert_eq!(wb.inner().get_by_id("y").unwrap(), Some(json!("old y")));
    assert_eq!(wb.stats_snapshot().batches_sent, 0);
    expect(s, "through the overlay");
    wb.flush().unwrap();
    let stats = wb.stats_snapshot();
    assert_eq!((stats.batches_sent, stats.items_sent), (1, 10), "{stats:?}");
    assert_eq!(stats.pending_ids, 0);
    expect(wb.inner(), "in Redis after flush");
    expect(s, "through the wrapper after flush");
}

/// Field projection applies to queued values too.
#[test]
fn projection_of_queued_values() {
    let (_dir, open) = wb_json_with(
        WriteBehindConfig::builder()
            .max_delay(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    let s = open("ns");
    s.upsert(vec![
        ("a".into(), json!({"k": 1, "drop": 2})),
        ("n".into(), json!(5)),
    ])
    .unwrap();
    let fields = vec!["k".to_string()];
    assert_eq!(
        s.get_by_ids(&["a".into(), "missing".into(), "n".into()], Some(&fields))
            .unwrap(),
        vec![Some(json!({"k": 1})), None, Some(json!(5))]
    );
}

/// Several threads run seeded random upserts, deletes, gets, filters and all_keys on their own
/// ids and on shared ids, each checking every read of its own ids against its model. Each shared
/// id has one writer, and every thread checks that no version it reads ever goes back. Returns
/// what the store must hold after the flush this function ends with.
fn model_test(store: &dyn KvStore, seed: u64) -> BTreeMap<String, Value> {
    const THREADS: usize = 6;
    const OWN: usize = 20;
    const OPS: usize = 1500;
    let shared_ids: Vec<String> = (0..THREADS).map(|t| format!("mono-{t}")).collect();
    let barrier = Barrier::new(THREADS);
    let results: Vec<(BTreeMap<String, Value>, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (shared_ids, barrier) = (&shared_ids, &barrier);
                scope.spawn(move || model_thread(store, seed, t, shared_ids, barrier, OWN, OPS))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    store.index_done_callback().unwrap();
    let mut expected = BTreeMap::new();
    for (t, (model, version)) in results.into_iter().enumerate() {
        expected.extend(model);
        if version > 0 {
            expected.insert(shared_ids[t].clone(), json!({"v": version}));
        }
    }
    expected
}

fn model_thread(
    store: &dyn KvStore,
    seed: u64,
    t: usize,
    shared_ids: &[String],
    barrier: &Barrier,
    own_count: usize,
    ops: usize,
) -> (BTreeMap<String, Value>, u64) {
    let mut rng = Rng::new(seed * 100 + t as u64);
    let own: Vec<String> = (0..own_count).map(|i| format!("t{t}-{i}")).collect();
    let pick = |rng: &mut Rng, n: usize| -> Vec<String> {
        (0..1 + rng.below(n))
            .map(|_| own[rng.below(own_count)].clone())
            .collect()
    };
    let mut model: BTreeMap<String, Value> = BTreeMap::new();
    let mut seen_version = vec![0u64; shared_ids.len()];
    let mut my_version = 0u64;
    let mut seq = 0u64;
    barrier.wait();
    for op in 0..ops {
        let ctx = format!("seed {seed}, thread {t}, op {op}");
        match rng.below(100) {
            0..=29 => {
                let batch: Vec<Item> = pick(&mut rng, 4)
                    .into_iter()
                    .map(|id| {
                        seq += 1;
                        (id, json!({"t": t, "seq": seq}))
                    })
                    .collect();
                for (id, v) in &batch {
                    model.insert(id.clone(), v.clone());
                }
                store.upsert(batch).unwrap();
            }
            30..=44 => {
                let del = pick(&mut rng, 3);
                for id in &del {
                    model.remove(id);
                }
                store.delete_by_ids(&del).unwrap();
            }
            45..=59 => {
                let id = &own[rng.below(own_count)];
                assert_eq!(
                    store.get_by_id(id).unwrap().as_ref(),
                    model.get(id),
                    "{ctx}: get_by_id({id})"
                );
            }
            60..=69 => {
                let req = pick(&mut rng, 6);
                let want: Vec<Option<Value>> =
                    req.iter().map(|id| model.get(id).cloned()).collect();
                assert_eq!(
                    store.get_by_ids(&req, None).unwrap(),
                    want,
                    "{ctx}: get_by_ids"
                );
            }
            70..=79 => {
                let req = pick(&mut rng, 6);
                let mut seen = HashSet::new();
                let want: Vec<String> = req
                    .iter()
                    .filter(|id| !model.contains_key(*id) && seen.insert((*id).clone()))
                    .cloned()
                    .collect();
                assert_eq!(store.filter_keys(&req).unwrap(), want, "{ctx}: filter_keys");
            }
            80..=84 => {
                let keys: HashSet<String> = store.all_keys().unwrap().into_iter().collect();
                for id in &own {
                    assert_eq!(
                        keys.contains(id),
                        model.contains_key(id),
                        "{ctx}: all_keys and {id}"
                    );
                }
            }
            85..=92 => {
                // This thread is the only writer of its shared id.
                my_version += 1;
                store
                    .upsert(vec![(shared_ids[t].clone(), json!({"v": my_version}))])
                    .unwrap();
            }
            _ => {
                // Read every shared id: no version ever goes back, and one's own is the last
                // one written.
                let got = store.get_by_ids(shared_ids, None).unwrap();
                for (k, v) in got.iter().enumerate() {
                    let v = v.as_ref().map_or(0, |v| v["v"].as_u64().unwrap());
                    assert!(
                        v >= seen_version[k],
                        "{ctx}: {} went back from version {} to {v}",
                        shared_ids[k],
                        seen_version[k]
                    );
                    seen_version[k] = v;
                }
                assert_eq!(seen_version[t], my_version, "{ctx}: own shared id");
            }
        }
    }
    (model, my_version)
}

/// Every id and value of a store.
fn snapshot(store: &dyn KvStore) -> BTreeMap<String, Value> {
    let keys = store.all_keys().unwrap();
    let values = store.get_by_ids(&keys, None).unwrap();
    keys.into_iter()
        .zip(values)
        .map(|(k, v)| (k, v.expect("all_keys listed an id get_by_ids cannot find")))
        .collect()
}

#[test]
fn randomized_model_over_redis() {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "model");
    for (seed, config) in [
        (1, tiny_batches()),
        (2, WriteBehindConfig::default()),
        (
            3,
            WriteBehindConfig::builder()
                .batch_items(7)
                .max_delay(Duration::from_millis(2))
                .capacity(50)
                .build()
                .unwrap(),
        ),
        // One batch at a time, and many: per-id order must not depend on it.
        (
            4,
            WriteBehindConfig::builder()
                .batch_items(3)
                .capacity(16)
                .max_delay(Duration::ZERO)
                .in_flight(1)
                .build()
                .unwrap(),
        ),
        (
            5,
            WriteBehindConfig::builder()
                .batch_items(2)
                .capacity(16)
                .max_delay(Duration::ZERO)
                .in_flight(6)
                .build()
                .unwrap(),
        ),
    ] {
        let ns = format!("model{seed}");
        let wb = WriteBehind::new(shared.namespace(&ns).unwrap(), config);
        let expected = model_test(&wb, seed);
        assert_eq!(snapshot(wb.inner()), expected, "seed {seed}: Redis itself");
        assert_eq!(snapshot(&wb), expected, "seed {seed}: through the wrapper");
        let stats = wb.stats_snapshot();
        assert!(
            stats.batches_sent > 0 && stats.pending_ids == 0,
            "{stats:?}"
        );
        wb.close().unwrap();
    }
}

#[test]
fn randomized_model_over_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    for seed in [11, 12] {
        let inner = Shared(json.namespace(&format!("model{seed}")).unwrap());
        let wb = WriteBehind::new(inner, tiny_batches());
        let expected = model_test(&wb, seed);
        assert_eq!(
            snapshot(wb.inner()),
            expected,
            "seed {seed}: the JSON store itself"
        );
        wb.close().unwrap();
    }
}

/// Readers on other threads never see a value older than one they saw before, while a writer
/// keeps replacing it and the flusher keeps moving ids from the overlay to the store.
#[test]
fn readers_never_go_back_across_acknowledgements() {
    let server = RedisServer::start();
    let inner = redis_shared(&server, "mono").namespace("ns").unwrap();
    let wb = WriteBehind::new(
        inner,
        WriteBehindConfig::builder()
            .batch_items(2)
            .max_delay(Duration::ZERO)
            .build()
            .unwrap(),
    );
    const VERSIONS: u64 = 3000;
    let done = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for r in 0..3 {
            let (wb, done) = (&wb, &done);
            scope.spawn(move || {
                let mut last = 0u64;
                let id = vec!["k".to_string()];
                while done.load(Ordering::Acquire) == 0 {
                    let v = match r {
                        0 => wb.get_by_id("k").unwrap(),
                        1 => wb.get_by_ids(&id, None).unwrap().pop().unwrap(),
                        _ => {
                            // Absent after present would be going back too.
                            let missing = wb.filter_keys(&id).unwrap();
                            assert!(last == 0 || missing.is_empty(), "k vanished");
                            if missing.is_empty() {
                                Some(json!({"v": last.max(1)}))
                            } else {
                                None
                            }
                        }
                    };
                    let v = v.map_or(0, |v| v["v"].as_u64().unwrap());
                    assert!(v >= last, "reader {r}: version {v} after {last}");
                    last = v;
                }
            });
        }
        for v in 1..=VERSIONS {
            wb.upsert(vec![("k".into(), json!({"v": v}))]).unwrap();
            if v % 7 == 0 {
                // Another id in between, so batches hold different mixes.
                wb.upsert(vec![(format!("other{v}"), json!(v))]).unwrap();
            }
        }
        done.store(1, Ordering::Release);
    });
    wb.flush().unwrap();
    assert_eq!(
        wb.inner().get_by_id("k").unwrap(),
        Some(json!({"v": VERSIONS}))
    );
    assert!(wb.stats_snapshot().batches_sent > 10);
}

/// clear orders with queued writes: nothing queued before it resurfaces, writes after it stay.
#[test]
fn clear_orders_with_queued_writes() {
    let server = RedisServer::start();
    let inner = redis_shared(&server, "clear").namespace("ns").unwrap();
    let wb = WriteBehind::new(
        inner,
        WriteBehindConfig::builder()
            .max_delay(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    wb.upsert((0..500).map(|i| (format!("a{i}"), json!(i))).collect())
        .unwrap();
    wb.clear().unwrap();
    wb.upsert(vec![("after".into(), json!(1))]).unwrap();
    assert_eq!(wb.all_keys().unwrap(), ["after"]);
    wb.flush().unwrap();
    assert_eq!(wb.inner().all_keys().unwrap(), ["after"]);
}
