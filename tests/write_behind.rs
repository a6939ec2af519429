//! The write-behind wrapper over real stores: the conformance suite over Redis and JSON (with
//! the default batching and with tiny batches), a randomized multi-thread model test, a Redis
//! restart in the middle of 100,000 writes, drop without flush, backpressure, flush deadlines,
//! refused writes and the unsent-writes sink.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
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
    // The flusher takes up to one batch (4) and retries it; 10 more fill the queue.
    let mut accepted = Vec::new();
    let refused = loop {
        let id = format!("k{}", accepted.len());
        match wb.upsert(vec![(id.clone(), json!(accepted.len()))]) {
            Ok(()) => accepted.push(id),
            Err(e) => break (id, e),
        }
        assert!(accepted.len() <= 14, "the queue never filled");
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
        matches!(&e, Error::Encode { key, .. } if key == "bad1"),
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
    assert!(matches!(e, Error::ReadOnly { .. }), "{e:?}");
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
