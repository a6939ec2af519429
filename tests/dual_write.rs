//! `DualWrite` over a JSON working directory and a real redis-server: the conformance suite
//! with either store as the primary, both stores left identical, and divergences counted when
//! the secondary fails (and nothing written to it when the primary fails).

mod support;

use std::sync::Arc;

#[cfg(feature = "metrics")]
use graphrag_kv::metrics::{render, Metrics};
use graphrag_kv::migrate::{compare_namespace, NoProgress};
use graphrag_kv::{BackendKind, DualWrite, Error, KvStore, Storage, StoreConfig};
use serde_json::json;
use support::{unique_prefix, RedisServer};

/// A fresh JSON directory and a fresh redis-server, each opened as a `Storage`.
struct Both {
    _dir: tempfile::TempDir,
    server: RedisServer,
    json: Storage,
    redis: Storage,
}

fn both() -> Both {
    both_with(RedisServer::start())
}

fn both_with(server: RedisServer) -> Both {
    let dir = tempfile::tempdir().unwrap();
    let json = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let redis = Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(server.url())
            .key_prefix(unique_prefix("dual"))
            // Fail fast once the server is killed.
            .retries(0)
            .connection_timeout(std::time::Duration::from_millis(500))
            .pool_timeout(std::time::Duration::from_secs(1))
            .build()
            .unwrap(),
    )
    .unwrap();
    Both {
        _dir: dir,
        server,
        json,
        redis,
    }
}

type Dual = DualWrite<Arc<dyn KvStore>, Arc<dyn KvStore>>;

impl Both {
    fn json_primary(&self, ns: &str) -> Dual {
        DualWrite::new(
            self.json.namespace(ns).unwrap(),
            self.redis.namespace(ns).unwrap(),
        )
        .with_names("json", "redis")
    }

    fn redis_primary(&self, ns: &str) -> Dual {
        DualWrite::new(
            self.redis.namespace(ns).unwrap(),
            self.json.namespace(ns).unwrap(),
        )
        .with_names("redis", "json")
    }
}

/// The suite's `open`, plus a check at the end that both stores hold the same data.
struct Checked {
    both: Both,
    opened: std::sync::Mutex<Vec<Arc<Dual>>>,
}

impl Drop for Checked {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for dual in self.opened.lock().unwrap().iter() {
            let diff =
                compare_namespace(&**dual.primary(), &**dual.secondary(), 500, &mut NoProgress)
                    .unwrap();
            assert!(diff.is_equal(), "secondary diverged from primary: {diff:?}");
            assert_eq!(dual.divergences(), 0);
        }
    }
}

fn json_then_redis() -> (Arc<Checked>, impl Fn(&str) -> Arc<dyn KvStore>) {
    dual_backend(true)
}

fn redis_then_json() -> (Arc<Checked>, impl Fn(&str) -> Arc<dyn KvStore>) {
    dual_backend(false)
}

fn dual_backend(json_first: bool) -> (Arc<Checked>, impl Fn(&str) -> Arc<dyn KvStore>) {
    let checked = Arc::new(Checked {
        both: both(),
        opened: std::sync::Mutex::new(Vec::new()),
    });
    let c = checked.clone();
    let open = move |ns: &str| -> Arc<dyn KvStore> {
        let dual = Arc::new(if json_first {
            c.both.json_primary(ns)
        } else {
            c.both.redis_primary(ns)
        });
        c.opened.lock().unwrap().push(dual.clone());
        dual
    };
    (checked, open)
}

support::conformance::conformance_tests!(json_primary_redis_secondary, json_then_redis);
support::conformance::conformance_tests!(redis_primary_json_secondary, redis_then_json);
support::conformance_typed::typed_conformance_tests!(
    json_primary_redis_secondary_typed,
    json_then_redis
);
support::conformance_typed::typed_conformance_tests!(
    redis_primary_json_secondary_typed,
    redis_then_json
);

#[test]
fn reads_come_from_the_primary_only() {
    let b = both();
    let dual = b.json_primary("full_docs");
    b.redis
        .namespace("full_docs")
        .unwrap()
        .upsert(vec![("only-in-redis".into(), json!(1))])
        .unwrap();
    assert_eq!(dual.get_by_id("only-in-redis").unwrap(), None);
    assert_eq!(
        dual.filter_keys(&["only-in-redis".into()]).unwrap().len(),
        1
    );
    assert_eq!(dual.stats().unwrap().backend, BackendKind::Json);
    assert_eq!(
        b.redis_primary("full_docs")
            .get_by_id("only-in-redis")
            .unwrap(),
        Some(json!(1))
    );
}

#[cfg(feature = "metrics")]
#[test]
fn secondary_failure_is_a_counted_divergence_not_an_error() {
    let mut b = both();
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let dual = b.json_primary("text_chunks");
    metrics.watch_divergences("text_chunks", dual.divergences_source());
    dual.upsert(vec![("before".into(), json!("both"))]).unwrap();
    assert_eq!(dual.divergences(), 0);

    b.server.kill();
    // The primary (JSON) takes the writes; the caller sees success.
    dual.upsert(vec![
        ("during-1".into(), json!("json only")),
        ("during-2".into(), json!(2)),
    ])
    .unwrap();
    dual.delete_by_ids(&["before".into()]).unwrap();
    dual.index_done_callback().unwrap();
    assert_eq!(
        dual.divergences(),
        3,
        "upsert, delete and checkpoint each diverged once"
    );
    assert_eq!(
        dual.get_by_id("during-1").unwrap(),
        Some(json!("json only"))
    );
    let text = render(&registry);
    assert!(
        text.contains(r#"redis_dual_write_divergences_total{namespace="text_chunks"} 3"#),
        "{text}"
    );
    // index_start_callback only warns about an unreachable secondary.
    dual.index_start_callback().unwrap();
    assert_eq!(dual.divergences(), 3);

    // Once Redis is back, the difference is what verify reports and migrate repairs.
    b.server.restart();
    let redis = b.redis.namespace("text_chunks").unwrap();
    let diff = compare_namespace(&**dual.primary(), &*redis, 100, &mut NoProgress).unwrap();
    assert_eq!(diff.missing, ["during-1", "during-2"]);
}

/// The metrics call the source at every scrape and retire it when it answers `None`: a source
/// that outlives its store would be kept (and walked at each scrape) forever, one more each
/// time a `Storage` rebuilds a namespace's stack.
#[test]
fn divergences_source_ends_with_its_store() {
    let b = both();
    let dual = b.json_primary("text_chunks");
    let source = dual.divergences_source();
    assert_eq!(source(), Some(0));
    drop(dual);
    assert_eq!(source(), None);
}

#[test]
fn primary_failure_is_the_callers_error_and_the_secondary_is_not_written() {
    let mut b = both();
    let dual = b.redis_primary("full_docs");
    b.server.kill();
    let err = dual
        .upsert(vec![("x".into(), json!({"content": "never"}))])
        .unwrap_err();
    assert!(err.is_connection(), "{err:?}");
    assert!(matches!(
        dual.get_by_id("x"),
        Err(Error::Redis { .. } | Error::Pool { .. } | Error::Connect { .. })
    ));
    assert!(dual.clear().is_err());
    assert!(dual.index_done_callback().is_err());
    assert_eq!(dual.divergences(), 0);
    assert_eq!(
        b.json
            .namespace("full_docs")
            .unwrap()
            .get_by_id("x")
            .unwrap(),
        None
    );
}

#[test]
fn concurrent_writers_of_the_same_ids_leave_both_stores_identical() {
    let b = both();
    let dual = Arc::new(b.json_primary("llm_response_cache"));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dual = dual.clone();
            std::thread::spawn(move || {
                for round in 0..50 {
                    let items = (0..10)
                        .map(|i| (format!("shared-{i}"), json!({"thread": t, "round": round})))
                        .collect();
                    dual.upsert(items).unwrap();
                    if round % 7 == t {
                        dual.delete_by_ids(&[format!("shared-{t}")]).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let diff =
        compare_namespace(&**dual.primary(), &**dual.secondary(), 100, &mut NoProgress).unwrap();
    assert!(diff.is_equal(), "{diff:?}");
    assert_eq!(dual.divergences(), 0);
}

#[test]
#[should_panic(expected = "same namespace")]
fn pairing_two_namespaces_is_refused() {
    let b = both();
    let _ = DualWrite::new(
        b.json.namespace("full_docs").unwrap(),
        b.redis.namespace("text_chunks").unwrap(),
    );
}

#[test]
fn storage_from_env_dual_writes_both_and_reads_the_primary() {
    let server = support::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let vars: std::collections::HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "dual".to_string()),
        ("STORAGE_WORKING_DIR", dir.path().display().to_string()),
        ("REDIS_URL", server.url()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = graphrag_kv::StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(config.dual.unwrap().primary, graphrag_kv::BackendKind::Json);
    let storage = graphrag_kv::Storage::open(&config).unwrap();
    let s = storage.namespace("full_docs").unwrap();
    s.upsert(vec![("d1".into(), serde_json::json!({"content": "x"}))])
        .unwrap();
    s.index_done_callback().unwrap();
    let mut conn = server.conn();
    let raw: String = redis::Commands::get(&mut conn, "nano_graphrag:full_docs:d1").unwrap();
    assert_eq!(raw, r#"{"content":"x"}"#);
    let file = std::fs::read_to_string(dir.path().join("kv_store_full_docs.json")).unwrap();
    assert!(file.contains("\"d1\""), "{file}");
    // Reads come from the primary (JSON): a value only Redis holds is not seen.
    let _: () = redis::Commands::set(&mut conn, "nano_graphrag:full_docs:only-redis", "1").unwrap();
    assert_eq!(s.get_by_id("only-redis").unwrap(), None);
    let bad: std::collections::HashMap<String, String> =
        [("STORAGE_KV_BACKEND", "dual"), ("KV_DUAL_PRIMARY", "mongo")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let e = graphrag_kv::StoreConfigBuilder::from_vars(&bad).unwrap_err();
    assert!(e.to_string().contains("KV_DUAL_PRIMARY"), "{e}");
}

#[cfg(feature = "metrics")]
#[test]
fn storage_with_metrics_counts_calls() {
    let dir = tempfile::tempdir().unwrap();
    let registry = prometheus::Registry::new();
    let metrics = graphrag_kv::Metrics::new(&registry).unwrap();
    let config = graphrag_kv::StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    let storage = graphrag_kv::Storage::builder(&config)
        .metrics(&metrics)
        .open()
        .unwrap();
    let s = storage.namespace("text_chunks").unwrap();
    s.upsert(vec![("a".into(), serde_json::json!(1))]).unwrap();
    s.get_by_id("a").unwrap();
    s.get_by_id("b").unwrap();
    let text = graphrag_kv::metrics::render(&registry);
    assert!(
        text.contains(r#"redis_operations_total{namespace="text_chunks",operation="get_by_id"} 2"#),
        "{text}"
    );
}

/// Two handles of one namespace from one dual `Storage` (as two parts of an application get
/// them), threads of each racing upserts of the same ids: after every round the JSON and the
/// Redis store hold the same values. Each `storage.namespace()` call builds its own
/// `DualWrite`, so the write order must be shared per namespace, not per handle.
#[test]
fn two_handles_racing_on_the_same_ids_leave_both_stores_identical() {
    const ROUNDS: usize = 500;
    const HANDLES: usize = 4;
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("dualrace");
    let vars: std::collections::HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "dual".to_string()),
        ("STORAGE_WORKING_DIR", dir.path().display().to_string()),
        ("REDIS_URL", server.url()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = graphrag_kv::StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    assert!(config.dual.is_some());
    let storage = Storage::open(&config).unwrap();
    let handles: Vec<_> = (0..HANDLES)
        .map(|_| storage.namespace("full_docs").unwrap())
        .collect();
    // The two stores underneath: the JSON side through the dual storage itself (reads come
    // from the primary, JSON by default; the directory has one writing Storage), Redis
    // directly under the same prefix.
    assert_eq!(storage.backend(), BackendKind::Json);
    let json = storage.namespace("full_docs").unwrap();
    let redis = Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(server.url())
            .key_prefix(prefix)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("full_docs")
    .unwrap();
    let ids: Vec<String> = (0..4).map(|i| format!("shared-{i}")).collect();
    let barrier = std::sync::Barrier::new(HANDLES);
    let diverged: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for (t, handle) in handles.iter().enumerate() {
            let handle = handle.clone();
            // Uneven values: a writer with big values takes longer between its JSON and its
            // Redis write, so a writer with small ones can overtake it in between.
            let pad = if t % 2 == 0 {
                "p".repeat(32 * 1024)
            } else {
                String::new()
            };
            let (ids, barrier, diverged, json, redis) = (&ids, &barrier, &diverged, &json, &redis);
            scope.spawn(move || {
                for round in 0..ROUNDS {
                    barrier.wait();
                    let items = ids
                        .iter()
                        .map(|id| (id.clone(), json!({"thread": t, "round": round, "pad": pad})))
                        .collect();
                    handle.upsert(items).unwrap();
                    barrier.wait();
                    if t == 0 {
                        let j = json.get_by_ids(ids, None).unwrap();
                        let r = redis.get_by_ids(ids, None).unwrap();
                        if j != r {
                            let who = |v: &[Option<serde_json::Value>]| -> Vec<String> {
                                v.iter()
                                    .map(|v| {
                                        format!(
                                            "{}",
                                            v.as_ref().map_or(json!(null), |v| v["thread"].clone())
                                        )
                                    })
                                    .collect()
                            };
                            *diverged.lock().unwrap() = Some(format!(
                                "round {round}: last writer per id in json {:?}, in redis {:?}",
                                who(&j),
                                who(&r)
                            ));
                        }
                    }
                    barrier.wait();
                    if diverged.lock().unwrap().is_some() {
                        return;
                    }
                }
            });
        }
    });
    if let Some(d) = diverged.into_inner().unwrap() {
        panic!("the two stores diverged: {d}");
    }
    let diff = compare_namespace(&*json, &*redis, 100, &mut NoProgress).unwrap();
    assert!(diff.is_equal(), "{diff:?}");
}
