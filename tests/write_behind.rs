//! The write-behind wrapper over real stores: the conformance suite over Redis and JSON (with
//! the default batching and with tiny batches), a randomized multi-thread model test, a Redis
//! restart in the middle of 100,000 writes, drop without flush, backpressure, flush deadlines,
//! refused writes and the unsent-writes sink.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use graphrag_kv::write_behind::{UnsentSink, UnsentWrite, WriteBehind, WriteBehindConfig};
use graphrag_kv::{
    BackendKind, Error, Item, JsonDir, KvStore, NamespaceStats, RedisShared, StoreConfig,
};
use serde_json::{json, Value};
use support::conformance::Rng;
use support::RedisServer;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A shared store used as a `KvStore` (the JSON backend hands out `Arc<JsonFileStore>`).
struct Shared<T: ?Sized>(Arc<T>);

impl<T: KvStore + ?Sized> KvStore for Shared<T> {
    fn namespace(&self) -> &str {
        self.0.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.0.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        self.0.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        self.0.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.0.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        self.0.upsert(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.0.delete_by_ids(ids)
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.0.clear()
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_start_callback()
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_done_callback()
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        self.0.stats()
    }
}

/// Batches of 3, a queue of 16 and no lingering: every test crosses many batch boundaries and
/// writers often wait for room.
fn tiny_batches() -> WriteBehindConfig {
    WriteBehindConfig::builder()
        .batch_items(3)
        .capacity(16)
        .max_delay(Duration::ZERO)
        .build()
        .unwrap()
}

/// Redis with short timeouts, so a stopped server is noticed quickly.
fn redis_shared(server: &RedisServer, prefix: &str) -> Arc<RedisShared> {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(300))
        .socket_timeout(Duration::from_secs(5))
        .pool_timeout(Duration::from_millis(600))
        .retries(0)
        .max_connections(8)
        .build()
        .unwrap();
    RedisShared::connect(&config.redis).unwrap()
}

fn wb_redis_with(config: WriteBehindConfig) -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "wb");
    (server, move |ns: &str| {
        Arc::new(WriteBehind::new(
            shared.namespace(ns).unwrap(),
            config.clone(),
        )) as Arc<dyn KvStore>
    })
}

fn wb_json_with(
    config: WriteBehindConfig,
) -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    (dir, move |ns: &str| {
        Arc::new(WriteBehind::new(
            Shared(json.namespace(ns).unwrap()),
            config.clone(),
        )) as Arc<dyn KvStore>
    })
}

fn wb_redis() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_redis_with(WriteBehindConfig::default())
}
fn wb_redis_tiny() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_redis_with(tiny_batches())
}
fn wb_json() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_json_with(WriteBehindConfig::default())
}
fn wb_json_tiny() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_json_with(tiny_batches())
}

support::conformance::conformance_tests!(redis_write_behind, wb_redis);
support::conformance::conformance_tests!(redis_write_behind_tiny_batches, wb_redis_tiny);
support::conformance::conformance_tests!(json_write_behind, wb_json);
support::conformance::conformance_tests!(json_write_behind_tiny_batches, wb_json_tiny);
support::conformance_typed::typed_conformance_tests!(redis_write_behind_typed, wb_redis);
support::conformance_typed::typed_conformance_tests!(
    redis_write_behind_tiny_batches_typed,
    wb_redis_tiny
);
support::conformance_typed::typed_conformance_tests!(json_write_behind_typed, wb_json);

fn ids(range: std::ops::Range<usize>, prefix: &str) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Ordering and read-your-writes

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

// ---------------------------------------------------------------------------------------------
// Shutdown

/// Dropping the wrapper without a flush sends everything: the long delay means nothing would
/// have gone otherwise.
#[test]
fn drop_without_flush_sends_everything() {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "drop");
    let config = WriteBehindConfig::builder()
        .batch_items(100_000)
        .max_delay(Duration::from_secs(600))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let wb = &wb;
            scope.spawn(move || {
                for i in 0..1250 {
                    wb.upsert(vec![(format!("{t}-{i}"), json!({"t": t, "i": i}))])
                        .unwrap();
                }
                wb.delete_by_ids(&[format!("{t}-0")]).unwrap();
            });
        }
    });
    assert_eq!(wb.stats_snapshot().batches_sent, 0, "sent before the drop");
    drop(wb);
    let mut conn = server.conn();
    let n: usize = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, 5000 - 4);
    let store = shared.namespace("ns").unwrap();
    assert_eq!(
        store.get_by_id("3-1249").unwrap(),
        Some(json!({"t": 3, "i": 1249}))
    );
    assert_eq!(store.get_by_id("2-0").unwrap(), None);
}

/// into_inner sends everything and gives the store back.
#[test]
fn into_inner_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    let config = WriteBehindConfig::builder()
        .max_delay(Duration::from_secs(600))
        .build()
        .unwrap();
    let wb = WriteBehind::new(Shared(json.namespace("ns").unwrap()), config);
    wb.upsert(vec![("k".into(), json!("v"))]).unwrap();
    let inner = wb.into_inner();
    assert_eq!(inner.get_by_id("k").unwrap(), Some(json!("v")));
}

/// Keeps what it is handed.
#[derive(Default)]
struct Journal(Mutex<Vec<(String, UnsentWrite)>>);

impl UnsentSink for Journal {
    fn save_unsent(&self, namespace: &str, writes: Vec<UnsentWrite>) -> graphrag_kv::Result<()> {
        let mut j = self.0.lock().unwrap();
        j.extend(writes.into_iter().map(|w| (namespace.to_string(), w)));
        Ok(())
    }
}

/// With the backend down past the deadline, close hands the unsent writes to the sink, in the
/// order accepted, and reports it.
#[test]
fn close_with_backend_down_hands_unsent_writes_to_the_sink() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "sink");
    let journal = Arc::new(Journal::default());
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .flush_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let wb =
        WriteBehind::with_unsent_sink(shared.namespace("ns").unwrap(), config, journal.clone());
    server.kill();
    wb.upsert(vec![("a".into(), json!(1)), ("b".into(), json!(2))])
        .unwrap();
    wb.delete_by_ids(&["a".into()]).unwrap();
    wb.upsert(vec![("c".into(), json!(3))]).unwrap();
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("fallback sink"), "{e}");
    let got = journal.0.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "a".into(),
                    value: json!(1)
                }
            ),
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "b".into(),
                    value: json!(2)
                }
            ),
            ("ns".to_string(), UnsentWrite::Delete { id: "a".into() }),
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "c".into(),
                    value: json!(3)
                }
            ),
        ]
    );
}

/// Without a sink, close says how many writes are lost.
#[test]
fn close_with_backend_down_and_no_sink_reports_the_loss() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "lost");
    let config = WriteBehindConfig::builder()
        .flush_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    server.kill();
    wb.upsert((0..7).map(|i| (format!("k{i}"), json!(i))).collect())
        .unwrap();
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("7 writes are lost"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Backend failures

/// A stopped server: writers fill the queue, then get an error within the enqueue timeout and
/// their write is not taken; after a restart everything accepted arrives, and the refused write
/// does not.
#[test]
fn full_queue_times_out_and_refused_write_is_not_taken() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "full");
    let config = WriteBehindConfig::builder()
        .batch_items(4)
        .capacity(10)
        .max_delay(Duration::ZERO)
        .enqueue_timeout(Duration::from_millis(300))
        .flush_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    server.kill();
    // The flusher takes up to one batch (4) per batch in flight (4 by default) and retries
    // them; 10 more fill the queue.
    let mut accepted = Vec::new();
    let refused = loop {
        let id = format!("k{}", accepted.len());
        match wb.upsert(vec![(id.clone(), json!(accepted.len()))]) {
            Ok(()) => accepted.push(id),
            Err(e) => break (id, e),
        }
        assert!(accepted.len() <= 10 + 4 * 4, "the queue never filled");
    };
    let (refused_id, e) = refused;
    assert!(
        matches!(e, Error::Unavailable { .. }) && e.to_string().contains("not taken"),
        "{e}"
    );
    assert!(accepted.len() >= 10, "only {} accepted", accepted.len());
    let stats = wb.stats_snapshot();
    assert_eq!(stats.pending_ids, accepted.len() as u64, "{stats:?}");
    assert!(stats.queue_depth <= 10 && stats.retries > 0, "{stats:?}");
    // A call of several items is taken whole or not at all.
    assert!(wb
        .upsert(vec![("x1".into(), json!(1)), ("x2".into(), json!(2))])
        .is_err());

    server.restart();
    wb.flush().unwrap();
    let inner = wb.inner();
    let mut keys = inner.all_keys().unwrap();
    keys.sort();
    let mut want = accepted.clone();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(inner.get_by_id(&refused_id).unwrap(), None);
    assert_eq!(wb.get_by_id(&refused_id).unwrap(), None);
}

/// flush gives up at its deadline with the backend's retryable error while the flusher keeps
/// retrying; once the server is back, the same writes arrive.
#[test]
fn flush_returns_the_backend_error_past_its_deadline() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes"]);
    let shared = redis_shared(&server, "fl");
    let wb = WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::default(),
    );
    wb.upsert(vec![("before".into(), json!(0))]).unwrap();
    wb.flush().unwrap();
    server.stop();
    wb.upsert(vec![("during".into(), json!(1))]).unwrap();
    let e = wb.flush_timeout(Duration::from_millis(800)).unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(
        wb.get_by_id("during").unwrap(),
        Some(json!(1)),
        "still visible"
    );
    server.restart();
    wb.flush().unwrap();
    assert_eq!(wb.inner().get_by_id("during").unwrap(), Some(json!(1)));
    assert_eq!(wb.inner().get_by_id("before").unwrap(), Some(json!(0)));
    assert!(wb.stats_snapshot().retries > 0);
}

/// A Redis restart in the middle of a 100,000-write stream from several threads: every write
/// arrives. The server keeps its data across the graceful restart (append-only file), so what
/// was sent before the stop stays, and what was queued during the outage is retried.
#[test]
fn redis_restart_mid_stream_loses_nothing() {
    const TOTAL: usize = 100_000;
    const PRODUCERS: usize = 4;
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let shared = redis_shared(&server, "restart");
    let wb = WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::builder()
            .enqueue_timeout(Duration::from_secs(60))
            .flush_timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..PRODUCERS {
            let (wb, accepted) = (&wb, &accepted);
            scope.spawn(move || {
                for i in (t..TOTAL).step_by(PRODUCERS) {
                    wb.upsert(vec![(
                        format!("k{i}"),
                        json!({"i": i, "pad": "xxxxxxxxxxxxxxxx"}),
                    )])
                    .unwrap_or_else(|e| panic!("write {i}: {e}"));
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while accepted.load(Ordering::Relaxed) < TOTAL / 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        server.stop();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
    });
    wb.flush().unwrap();
    let stats = wb.stats_snapshot();
    assert!(stats.retries > 0, "the outage was never seen: {stats:?}");
    assert_eq!(stats.failed_writes, 0, "{stats:?}");
    let mut conn = server.conn();
    let n: usize = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, TOTAL);
    let all = ids(0..TOTAL, "k");
    let got = wb.inner().get_by_ids(&all, None).unwrap();
    for (i, v) in got.into_iter().enumerate() {
        assert_eq!(v.map(|v| v["i"].clone()), Some(json!(i)), "k{i}");
    }
}

/// Refuses (non-retryably, as for a value too large) upserts of ids starting with "bad".
struct RefusesBadIds<S>(S);

impl<S: KvStore> KvStore for RefusesBadIds<S> {
    fn namespace(&self) -> &str {
        self.0.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.0.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        self.0.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        self.0.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.0.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        if let Some((id, _)) = items.iter().find(|(id, _)| id.starts_with("bad")) {
            return Err(Error::Encode {
                namespace: self.namespace().to_string(),
                key: id.clone(),
                reason: "value too large".into(),
            });
        }
        self.0.upsert(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.0.delete_by_ids(ids)
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.0.clear()
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_start_callback()
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_done_callback()
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        self.0.stats()
    }
}

/// A refused write does not block the queue: the rest of its batch is stored, the refused one
/// leaves the overlay, and the next flush (once) reports the error naming the key.
#[test]
fn refused_writes_are_dropped_and_reported_by_the_next_flush() {
    let server = RedisServer::start();
    let inner = RefusesBadIds(redis_shared(&server, "refuse").namespace("ns").unwrap());
    let wb = WriteBehind::new(
        inner,
        WriteBehindConfig::builder()
            .max_delay(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    wb.upsert(vec![
        ("good1".into(), json!(1)),
        ("bad1".into(), json!("huge")),
        ("good2".into(), json!(2)),
    ])
    .unwrap();
    wb.upsert(vec![("bad2".into(), json!("huge"))]).unwrap();
    assert_eq!(
        wb.get_by_id("bad1").unwrap(),
        Some(json!("huge")),
        "visible while queued"
    );
    let e = wb.index_done_callback().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 2, ids, source, .. }
            if ids == &["bad1", "bad2"]
                && matches!(&**source, Error::Encode { key, .. } if key == "bad1")),
        "{e:?}"
    );
    assert_eq!(wb.stats_snapshot().failed_writes, 2);
    // Reported once; the queue goes on.
    wb.upsert(vec![("good3".into(), json!(3))]).unwrap();
    wb.flush().unwrap();
    let mut keys = wb.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["good1", "good2", "good3"]);
    assert_eq!(wb.get_by_id("bad1").unwrap(), None);
    let mut inner_keys = wb.inner().all_keys().unwrap();
    inner_keys.sort();
    assert_eq!(inner_keys, keys);
}

/// `index_done_callback` whose flush reports a refused write still checkpoints the writes that
/// went through: on the JSON backend they are in the file afterwards.
#[test]
fn checkpoint_runs_even_when_the_flush_reports_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    let wb = WriteBehind::new(
        RefusesBadIds(json.namespace("ns").unwrap()),
        WriteBehindConfig::default(),
    );
    wb.upsert(vec![("good".into(), json!(1)), ("bad".into(), json!(2))])
        .unwrap();
    let e = wb.index_done_callback().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 1, source, .. }
            if matches!(&**source, Error::Encode { key, .. } if key == "bad")),
        "{e:?}"
    );
    let file = std::fs::read_to_string(dir.path().join("kv_store_ns.json")).unwrap();
    let saved: Value = serde_json::from_str(&file).unwrap();
    assert_eq!(saved, json!({"good": 1}));
}

/// A read-only JSON store refuses every write: each is reported, none blocks the queue.
#[test]
fn read_only_inner_store_errors_surface_at_flush() {
    let dir = tempfile::tempdir().unwrap();
    let ro = JsonDir::open_read_only(dir.path());
    let wb = WriteBehind::new(Shared(ro.namespace("ns").unwrap()), tiny_batches());
    for i in 0..10 {
        wb.upsert(vec![(format!("k{i}"), json!(i))]).unwrap();
    }
    let e = wb.flush().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 10, ids, source, .. }
            if ids.len() == 5 && matches!(&**source, Error::ReadOnly { .. })),
        "{e:?}"
    );
    assert!(wb.flush().is_ok(), "reported once");
    assert_eq!(wb.all_keys().unwrap(), Vec::<String>::new());
    assert_eq!(wb.stats_snapshot().failed_writes, 10);
}

/// Ids are checked when the call is made, not later by the flusher.
#[test]
fn invalid_ids_are_refused_at_the_call() {
    let (_dir, open) = wb_json();
    let s = open("ns");
    assert!(matches!(
        s.upsert(vec![("ok".into(), json!(1)), (String::new(), json!(2))]),
        Err(Error::InvalidId { .. })
    ));
    assert_eq!(
        s.get_by_id("ok").unwrap(),
        None,
        "nothing of a refused call is taken"
    );
}

#[test]
fn config_from_vars_switches_it_on() {
    let vars = [("KV_WRITE_BEHIND", "1"), ("KV_WRITE_BEHIND_BATCH", "32")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let c = WriteBehindConfig::from_vars(&vars).unwrap().unwrap();
    assert_eq!(c.batch_items, 32);
}

// ---------------------------------------------------------------------------------------------
// Batches in flight

/// One write call as the store saw it: (id, value, or None for a delete).
type Call = Vec<(String, Option<Value>)>;

/// An in-memory store that records every write call, can hold the calls that write one id until
/// released, and can fail them: it puts batches in flight at chosen moments. It also checks,
/// on every call, that no other call in progress writes one of its ids.
#[derive(Default)]
struct Scripted {
    data: Mutex<BTreeMap<String, Value>>,
    /// Each write call as it began: (id, value, or None for a delete).
    calls: Mutex<Vec<Call>>,
    /// Ids of the calls in progress, and how often a call found one of its ids there.
    active: Mutex<Vec<String>>,
    overlaps: AtomicUsize,
    /// Write calls in progress, and the most seen at once.
    in_progress: AtomicUsize,
    peak: AtomicUsize,
    /// Calls writing this id wait until it is cleared.
    hold: Mutex<Option<String>>,
    released: Condvar,
    /// Calls writing this id fail (retryably) this many more times.
    fail: Mutex<Option<(String, usize)>>,
}

impl Scripted {
    fn hold(&self, id: &str) {
        *self.hold.lock().unwrap() = Some(id.to_string());
    }

    fn release(&self) {
        *self.hold.lock().unwrap() = None;
        self.released.notify_all();
    }

    /// Waits (up to a minute: an event, not a timing) until `f` holds for the recorded calls.
    fn wait_calls(&self, what: &str, f: impl Fn(&[Call]) -> bool) {
        for _ in 0..6000 {
            if f(&self.calls.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "never happened: {what}; calls: {:?}",
            self.calls.lock().unwrap()
        );
    }

    /// The values each id was written with, in the order the calls began.
    fn history(&self, id: &str) -> Vec<Option<Value>> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .flatten()
            .filter(|(i, _)| i == id)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn write(&self, writes: Call) -> graphrag_kv::Result<()> {
        let now = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        {
            let mut active = self.active.lock().unwrap();
            if writes.iter().any(|(id, _)| active.contains(id)) {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            active.extend(writes.iter().map(|(id, _)| id.clone()));
        }
        self.calls.lock().unwrap().push(writes.clone());
        // Bounded, so that a test failing while it holds a write still ends (the store's drop
        // waits for the flusher).
        let held = self.hold.lock().unwrap();
        let (held, _) = self
            .released
            .wait_timeout_while(held, Duration::from_secs(30), |h| {
                h.as_ref()
                    .is_some_and(|h| writes.iter().any(|(id, _)| id == h))
            })
            .unwrap();
        drop(held);
        let result = {
            let mut fail = self.fail.lock().unwrap();
            match &mut *fail {
                Some((id, n)) if *n > 0 && writes.iter().any(|(i, _)| i == id) => {
                    *n -= 1;
                    Err(Error::Unavailable {
                        namespace: "scripted".into(),
                        reason: "scripted outage".into(),
                    })
                }
                _ => Ok(()),
            }
        };
        if result.is_ok() {
            let mut data = self.data.lock().unwrap();
            for (id, v) in &writes {
                match v {
                    Some(v) => data.insert(id.clone(), v.clone()),
                    None => data.remove(id),
                };
            }
        }
        let mut active = self.active.lock().unwrap();
        for (id, _) in &writes {
            if let Some(i) = active.iter().position(|a| a == id) {
                active.swap_remove(i);
            }
        }
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl KvStore for Scripted {
    fn namespace(&self) -> &str {
        "scripted"
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        Ok(self.data.lock().unwrap().keys().cloned().collect())
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        Ok(self.data.lock().unwrap().get(id).cloned())
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        _fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        let data = self.data.lock().unwrap();
        Ok(ids.iter().map(|id| data.get(id).cloned()).collect())
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        let data = self.data.lock().unwrap();
        Ok(ids
            .iter()
            .filter(|id| !data.contains_key(*id))
            .cloned()
            .collect())
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        self.write(items.into_iter().map(|(id, v)| (id, Some(v))).collect())
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.write(ids.iter().map(|id| (id.clone(), None)).collect())
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.data.lock().unwrap().clear();
        Ok(())
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        Ok(())
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        Ok(())
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        unimplemented!("not used")
    }
}

/// One write per batch, no lingering, `n` batches in flight.
fn one_per_batch(n: usize) -> WriteBehindConfig {
    WriteBehindConfig::builder()
        .batch_items(1)
        .max_delay(Duration::ZERO)
        .in_flight(n)
        .flush_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// While a batch writing `a` is held, a batch of another id goes through, but it is not
/// acknowledged before the held one (acknowledgements follow queue order), and a newer write
/// of `a` is not sent until the held one is done (per-id order), although a third batch could
/// be in flight.
#[test]
fn a_held_batch_lets_others_through_but_keeps_id_and_ack_order() {
    let inner = Arc::new(Scripted::default());
    inner.hold("a");
    let wb = WriteBehind::new(inner.clone(), one_per_batch(3));
    wb.upsert(vec![("a".into(), json!(1))]).unwrap();
    inner.wait_calls("a=1 is held", |c| c.len() == 1);
    wb.upsert(vec![("b".into(), json!(1))]).unwrap();
    inner.wait_calls("b=1 went around the held batch", |c| c.len() == 2);
    wb.upsert(vec![("a".into(), json!(2))]).unwrap();
    wb.upsert(vec![("c".into(), json!(1))]).unwrap();
    // b is in the store, yet still pending: a's batch came first and is not done.
    inner.wait_calls("b=1 stored", |_| inner.get_by_id("b").unwrap().is_some());
    std::thread::sleep(Duration::from_millis(100));
    let stats = wb.stats_snapshot();
    assert_eq!(stats.pending_ids, 3, "{stats:?}");
    assert_eq!(
        inner.calls.lock().unwrap().len(),
        2,
        "a=2 must wait for a=1"
    );
    assert_eq!(wb.get_by_id("a").unwrap(), Some(json!(2)));
    assert!(wb.flush_timeout(Duration::from_millis(50)).is_err());

    inner.release();
    wb.flush().unwrap();
    assert_eq!(inner.history("a"), vec![Some(json!(1)), Some(json!(2))]);
    assert_eq!(inner.get_by_id("a").unwrap(), Some(json!(2)));
    assert_eq!(inner.get_by_id("c").unwrap(), Some(json!(1)));
    assert_eq!(wb.stats_snapshot().pending_ids, 0);
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
    wb.close().unwrap();
}

/// flush returns only once every batch in flight is done, the held one included.
#[test]
fn flush_waits_for_every_batch_in_flight() {
    let inner = Arc::new(Scripted::default());
    inner.hold("slow");
    let wb = Arc::new(WriteBehind::new(inner.clone(), one_per_batch(3)));
    wb.upsert(vec![("slow".into(), json!(1))]).unwrap();
    wb.upsert(vec![("fast".into(), json!(1))]).unwrap();
    inner.wait_calls("both in flight", |c| c.len() == 2);
    let flushed = Arc::new(AtomicUsize::new(0));
    let flusher = {
        let (wb, flushed) = (wb.clone(), flushed.clone());
        std::thread::spawn(move || {
            let r = wb.flush();
            flushed.store(1, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(flushed.load(Ordering::SeqCst), 0, "flush returned early");
    inner.release();
    flusher.join().unwrap().unwrap();
    assert_eq!(inner.get_by_id("slow").unwrap(), Some(json!(1)));
    assert_eq!(inner.get_by_id("fast").unwrap(), Some(json!(1)));
}

/// A batch that keeps failing is retried while others go through; a newer write of its id
/// waits, and lands after it.
#[test]
fn a_failing_batch_retries_while_others_go_through_in_order() {
    let inner = Arc::new(Scripted::default());
    *inner.fail.lock().unwrap() = Some(("a".into(), 4));
    let wb = WriteBehind::new(inner.clone(), one_per_batch(3));
    wb.upsert(vec![("a".into(), json!(1))]).unwrap();
    wb.upsert(vec![("b".into(), json!(1))]).unwrap();
    wb.upsert(vec![("a".into(), json!(2))]).unwrap();
    wb.delete_by_ids(&["b".into()]).unwrap();
    wb.upsert(vec![("a".into(), json!(3))]).unwrap();
    wb.flush().unwrap();
    let history = inner.history("a");
    assert_eq!(
        history,
        vec![
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(2)),
            Some(json!(3))
        ]
    );
    assert_eq!(inner.history("b"), vec![Some(json!(1)), None]);
    assert_eq!(inner.get_by_id("a").unwrap(), Some(json!(3)));
    assert_eq!(inner.get_by_id("b").unwrap(), None);
    let stats = wb.stats_snapshot();
    assert_eq!((stats.retries, stats.pending_ids), (4, 0), "{stats:?}");
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
}

/// A refusal in one batch in flight drops only its write; the others, before and after it,
/// arrive, and the next flush reports it.
#[test]
fn a_refusal_in_one_batch_in_flight_drops_only_that_write() {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "refused-in-flight");
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .max_delay(Duration::ZERO)
        .in_flight(3)
        .build()
        .unwrap();
    let wb = WriteBehind::new(RefusesBadIds(shared.namespace("ns").unwrap()), config);
    for i in 0..40 {
        let id = if i % 7 == 3 {
            format!("bad-{i}")
        } else {
            format!("k{}", i % 5)
        };
        wb.upsert(vec![(id, json!(i))]).unwrap();
    }
    let e = wb.flush().unwrap_err();
    assert!(e.to_string().contains("value too large"), "{e}");
    wb.flush().unwrap();
    for k in 0..5 {
        let last = (0..40).filter(|i| i % 7 != 3 && i % 5 == k).max().unwrap();
        assert_eq!(
            wb.inner().get_by_id(&format!("k{k}")).unwrap(),
            Some(json!(last)),
            "k{k}"
        );
    }
    let stats = wb.stats_snapshot();
    assert_eq!(
        (stats.failed_writes, stats.pending_ids),
        (6, 0),
        "{stats:?}"
    );
}

/// Many writers hammering a few ids with several batches in flight: no two calls in progress
/// ever share an id, and each id ends with its last write.
#[test]
fn hot_ids_are_never_in_two_batches_in_flight() {
    const THREADS: usize = 4;
    const WRITES: usize = 2000;
    let inner = Arc::new(Scripted::default());
    let config = WriteBehindConfig::builder()
        .batch_items(3)
        .capacity(32)
        .max_delay(Duration::ZERO)
        .in_flight(4)
        .build()
        .unwrap();
    let wb = WriteBehind::new(inner.clone(), config);
    // A write of an id no one writes again is parked in the store until another batch has been
    // sent past it: batches are then provably in flight together, not one after another.
    inner.hold("parked");
    wb.upsert(vec![("parked".into(), json!(0))]).unwrap();
    // In flight alone (a batch holding writers' ids would stop the queue at their next write).
    inner.wait_calls("the parked batch sent", |calls| {
        calls.iter().any(|c| c.iter().any(|(id, _)| id == "parked"))
    });
    std::thread::scope(|s| {
        s.spawn(|| {
            inner.wait_calls("a batch sent while the parked one waits", |calls| {
                calls
                    .iter()
                    .position(|c| c.iter().any(|(id, _)| id == "parked"))
                    .is_some_and(|p| !calls[p + 1..].is_empty())
            });
            inner.release();
        });
        for t in 0..THREADS {
            let wb = &wb;
            s.spawn(move || {
                for i in 0..WRITES {
                    // hot-{t}: only this thread writes it, so its last value is known.
                    let id = if i % 2 == 0 {
                        format!("hot-{t}")
                    } else {
                        format!("cold-{t}-{}", i % 50)
                    };
                    wb.upsert(vec![(id, json!(i))]).unwrap();
                }
            });
        }
    });
    wb.flush().unwrap();
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
    assert!(
        inner.peak.load(Ordering::SeqCst) >= 2,
        "never two batches in flight"
    );
    for t in 0..THREADS {
        assert_eq!(
            inner.get_by_id(&format!("hot-{t}")).unwrap(),
            Some(json!(WRITES - 2))
        );
        // Every value of an id arrives in the order written (a batch may skip superseded ones).
        let seen: Vec<u64> = inner
            .history(&format!("hot-{t}"))
            .into_iter()
            .map(|v| v.unwrap().as_u64().unwrap())
            .collect();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "hot-{t}: {seen:?}");
    }
    assert_eq!(wb.stats_snapshot().pending_ids, 0);
}

/// Shutdown with the backend failing and several batches in flight: everything accepted and
/// not stored reaches the sink, in the order accepted, and store plus sink replayed give the
/// state the writers expected.
#[test]
fn close_with_batches_in_flight_hands_off_everything_unsent_in_order() {
    let inner = Arc::new(Scripted::default());
    // Batches writing "x" fail until the deadline; the others get through.
    *inner.fail.lock().unwrap() = Some(("x".into(), usize::MAX));
    let journal = Arc::new(Journal::default());
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .max_delay(Duration::ZERO)
        .in_flight(3)
        .flush_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let wb = WriteBehind::with_unsent_sink(inner.clone(), config, journal.clone());
    let mut expected = BTreeMap::new();
    let mut accepted = Vec::new();
    for i in 0..30u64 {
        let id = match i % 4 {
            0 => "x".to_string(),
            1 => format!("y{}", i % 3),
            _ => format!("z{i}"),
        };
        if i % 9 == 8 {
            wb.delete_by_ids(std::slice::from_ref(&id)).unwrap();
            expected.remove(&id);
            accepted.push((id, None));
        } else {
            wb.upsert(vec![(id.clone(), json!(i))]).unwrap();
            expected.insert(id.clone(), json!(i));
            accepted.push((id, Some(json!(i))));
        }
    }
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("fallback sink"), "{e}");
    let unsent: Vec<(String, Option<Value>)> = journal
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, w)| match w {
            UnsentWrite::Upsert { id, value } => (id.clone(), Some(value.clone())),
            UnsentWrite::Delete { id } => (id.clone(), None),
            other => panic!("an unsent write of a kind this test does not make: {other:?}"),
        })
        .collect();
    // The first write of x never got through, so it and everything after it is unsent...
    assert_eq!(unsent.first(), accepted.first());
    // ...in the order accepted: the unsent writes are a subsequence of the accepted ones.
    let mut rest = accepted.iter();
    for w in &unsent {
        assert!(rest.any(|a| a == w), "{w:?} out of order in {unsent:?}");
    }
    // Replaying the sink over the store gives what the writers expected.
    let mut state = inner.data.lock().unwrap().clone();
    for (id, v) in unsent {
        match v {
            Some(v) => state.insert(id, v),
            None => state.remove(&id),
        };
    }
    assert_eq!(state, expected);
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
}

#[test]
fn in_flight_is_read_and_checked() {
    let vars = |v: &str| {
        [
            ("KV_WRITE_BEHIND", "true"),
            ("KV_WRITE_BEHIND_IN_FLIGHT", v),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<std::collections::HashMap<_, _>>()
    };
    let c = WriteBehindConfig::from_vars(&vars("5")).unwrap().unwrap();
    assert_eq!(c.in_flight, 5);
    assert_eq!(WriteBehindConfig::default().in_flight, 4);
    for bad in ["0", "65", "two"] {
        let e = WriteBehindConfig::from_vars(&vars(bad)).unwrap_err();
        assert!(
            e.to_string().contains("KV_WRITE_BEHIND_IN_FLIGHT"),
            "{bad}: {e}"
        );
    }
    let e = WriteBehindConfig::builder()
        .in_flight(100)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("KV_WRITE_BEHIND_IN_FLIGHT"), "{e}");
}
