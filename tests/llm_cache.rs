//! `LlmCache` on both backends: hits and misses, nano-graphrag's key and value layout,
//! single-flight between threads and between "processes" (separate caches sharing one Redis),
//! waiters taking over from a failed or dead computation, and lock keys staying out of the
//! namespace.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use graphrag_kv::llm::{LlmClient, LocalLlm};
use graphrag_kv::llm_cache::{LlmCache, LlmCacheStats};
use graphrag_kv::llm_hash::Message;
use graphrag_kv::{BackendKind, Error, Storage, StoreConfig, LLM_RESPONSE_CACHE};
use redis::Commands;
use serde_json::json;
use support::{unique_prefix, RedisServer};

fn prompt(text: &str) -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", text),
    ]
}

fn json_storage() -> (tempfile::TempDir, Storage) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    (dir, storage)
}

fn redis_storage(server: &RedisServer) -> (String, Storage) {
    let prefix = unique_prefix("llm-cache");
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(&prefix)
        .build()
        .unwrap();
    (prefix, Storage::open(&config).unwrap())
}

fn llm_error(reason: &str) -> Error {
    Error::Llm {
        reason: reason.into(),
        retryable: true,
    }
}

fn hit_and_miss(storage: &Storage) {
    let cache = LlmCache::open(storage).unwrap();
    let llm = LocalLlm::new();
    let p = prompt("The tide comes in twice a day.");
    assert_eq!(cache.get("m", &p).unwrap(), None);

    let first = cache.complete(&llm, "m", &p).unwrap();
    let second = cache
        .get_or_compute("m", &p, || panic!("must be answered from the cache"))
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(llm.calls(), 1);
    assert_eq!(
        cache.stats(),
        LlmCacheStats {
            hits: 1,
            misses: 1,
            waits: 0
        }
    );
    assert_eq!(cache.get("m", &p).unwrap().as_deref(), Some(first.as_str()));

    // nano-graphrag's layout: id = compute_args_hash(model, messages), value {"return", "model"}.
    let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
    let key = LlmCache::key("m", &p);
    assert_eq!(store.all_keys().unwrap(), [key.as_str()]);
    assert_eq!(
        store.get_by_id(&key).unwrap(),
        Some(json!({"return": first, "model": "m"}))
    );

    // Another model is another prompt.
    assert_eq!(cache.get("other", &p).unwrap(), None);
    cache.put("other", &p, "answer").unwrap();
    assert_eq!(cache.get("other", &p).unwrap().as_deref(), Some("answer"));
}

#[test]
fn json_hit_and_miss() {
    let (_dir, storage) = json_storage();
    hit_and_miss(&storage);
}

#[test]
fn redis_hit_and_miss() {
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    hit_and_miss(&storage);
}

#[test]
fn key_matches_python_compute_args_hash() {
    // Vectors of tests/llm_hash.rs, computed with CPython 3.11.7:
    // md5(str((model, messages)).encode()).hexdigest()
    assert_eq!(
        LlmCache::key("gpt-4o", &[Message::new("user", "hi")]),
        "81afaec8014b3077d4bb03dd968dd4a2"
    );
    let messages = [
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "Extract entities from:\n\"Alice met Bob.\""),
        Message::new("assistant", "(\"entity\"<|>\"ALICE\"<|>\"PERSON\")##"),
    ];
    assert_eq!(
        LlmCache::key("gpt-4o", &messages),
        "c066103ad69c1439624b623088219608"
    );

    // A Python worker's entry is found under that key.
    let (_dir, storage) = json_storage();
    storage
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap()
        .upsert(vec![(
            "c066103ad69c1439624b623088219608".into(),
            json!({"return": "from python", "model": "gpt-4o"}),
        )])
        .unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    let answer = cache
        .get_or_compute("gpt-4o", &messages, || {
            panic!("Python's entry must be a hit")
        })
        .unwrap();
    assert_eq!(answer, "from python");
}

#[test]
fn entry_without_return_is_a_decode_error_not_a_miss() {
    let (_dir, storage) = json_storage();
    let p = prompt("x");
    storage
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap()
        .upsert(vec![(LlmCache::key("m", &p), json!({"model": "m"}))])
        .unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    let err = cache
        .get_or_compute("m", &p, || Ok("never".into()))
        .unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert_eq!(cache.stats().misses, 0);
}

/// `groups` caches (stand-ins for processes when the store is Redis), each with
/// `threads_per_group` threads, all missing the same prompt at once. Returns the number of
/// computations and the summed stats.
fn stampede(storage: &Storage, groups: usize, threads_per_group: usize) -> (usize, LlmCacheStats) {
    let caches: Vec<Arc<LlmCache>> = (0..groups)
        .map(|_| Arc::new(LlmCache::open(storage).unwrap()))
        .collect();
    let computed = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(groups * threads_per_group));
    let p = prompt("Sixteen workers ask the same thing at the same moment.");
    let handles: Vec<_> = caches
        .iter()
        .flat_map(|cache| (0..threads_per_group).map(move |_| cache.clone()))
        .map(|cache| {
            let (computed, barrier, p) = (computed.clone(), barrier.clone(), p.clone());
            thread::spawn(move || {
                barrier.wait();
                cache
                    .get_or_compute("m", &p, || {
                        computed.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(200));
                        Ok("the one answer".into())
                    })
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), "the one answer");
    }
    let mut total = LlmCacheStats::default();
    for c in &caches {
        let s = c.stats();
        total.hits += s.hits;
        total.misses += s.misses;
        total.waits += s.waits;
    }
    assert_eq!(
        total.hits + total.misses + total.waits,
        (groups * threads_per_group) as u64,
        "{total:?}"
    );
    (computed.load(Ordering::SeqCst), total)
}

#[test]
fn json_sixteen_threads_one_computation() {
    let (_dir, storage) = json_storage();
    let (computed, stats) = stampede(&storage, 1, 16);
    assert_eq!(computed, 1);
    assert_eq!(stats.misses, 1);
    assert!(stats.waits >= 1, "{stats:?}");
}

#[test]
fn redis_sixteen_threads_one_computation() {
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let (computed, stats) = stampede(&storage, 1, 16);
    assert_eq!(computed, 1);
    assert_eq!(stats.misses, 1);
    assert!(stats.waits >= 1, "{stats:?}");
}

#[test]
fn redis_four_caches_of_four_threads_one_computation() {
    // Four caches share nothing but the Redis server: only the Redis lock serialises them.
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let (computed, stats) = stampede(&storage, 4, 4);
    assert_eq!(computed, 1);
    assert_eq!(stats.misses, 1);
    assert!(stats.waits >= 1, "{stats:?}");
}

/// The first computation fails after a while; the callers waiting for it must not see its
/// error: one of them computes instead.
fn failure_lets_a_waiter_compute(caches: Vec<Arc<LlmCache>>) {
    let n = caches.len();
    let computed = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(n));
    let p = prompt("The first one to try this fails.");
    let handles: Vec<_> = caches
        .into_iter()
        .map(|cache| {
            let (computed, barrier, p) = (computed.clone(), barrier.clone(), p.clone());
            thread::spawn(move || {
                barrier.wait();
                cache.get_or_compute("m", &p, || {
                    let nth = computed.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(200));
                    if nth == 0 {
                        Err(llm_error("rate limited"))
                    } else {
                        Ok("second try".into())
                    }
                })
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "{results:?}");
    assert!(
        errors[0].to_string().contains("rate limited"),
        "{}",
        errors[0]
    );
    assert!(errors[0].is_retryable());
    for r in results.iter().filter_map(|r| r.as_ref().ok()) {
        assert_eq!(r, "second try");
    }
    assert_eq!(computed.load(Ordering::SeqCst), 2);
}

#[test]
fn json_failure_of_the_computing_thread_lets_a_waiter_compute() {
    let (_dir, storage) = json_storage();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    failure_lets_a_waiter_compute(vec![cache; 8]);
}

#[test]
fn redis_failure_of_the_computing_process_lets_another_compute() {
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let caches = (0..4)
        .map(|_| Arc::new(LlmCache::open(&storage).unwrap()))
        .collect();
    failure_lets_a_waiter_compute(caches);
}

#[test]
fn panic_of_the_computing_thread_lets_a_waiter_compute() {
    let (_dir, storage) = json_storage();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    let p = prompt("panics");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let panicking = {
        let (cache, p) = (cache.clone(), p.clone());
        thread::spawn(move || {
            cache.get_or_compute("m", &p, || {
                started_tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(200));
                panic!("the LLM client panicked");
            })
        })
    };
    started_rx.recv().unwrap();
    let answer = cache.get_or_compute("m", &p, || Ok("recovered".into()));
    assert!(panicking.join().is_err());
    assert_eq!(answer.unwrap(), "recovered");
    assert_eq!(cache.stats().misses, 2);
}

#[test]
fn lock_keys_stay_outside_the_namespace() {
    let server = RedisServer::start();
    let (prefix, storage) = redis_storage(&server);
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    let p = prompt("Where does the lock live?");
    let lock_key = cache.lock_key("m", &p).unwrap();
    let hash = LlmCache::key("m", &p);
    assert_eq!(
        lock_key,
        format!("{prefix}::lock:{LLM_RESPONSE_CACHE}:{hash}")
    );

    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
    let computing = {
        let (cache, p) = (cache.clone(), p.clone());
        thread::spawn(move || {
            cache.get_or_compute("m", &p, || {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                Ok("done".into())
            })
        })
    };
    started_rx.recv().unwrap();

    // The lock is held while the LLM works...
    let mut conn = server.conn();
    assert!(conn.exists::<_, bool>(&lock_key).unwrap());
    let ttl: i64 = conn.pttl(&lock_key).unwrap();
    assert!(ttl > 0, "the lock must expire on its own: pttl {ttl}");
    // ...and no namespace operation sees it.
    let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
    assert_eq!(store.all_keys().unwrap(), Vec::<String>::new());
    assert_eq!(store.stats().unwrap().keys, 0);
    assert_eq!(storage.list_namespaces().unwrap(), Vec::<String>::new());
    store.clear().unwrap();
    assert!(conn.exists::<_, bool>(&lock_key).unwrap());

    finish_tx.send(()).unwrap();
    assert_eq!(computing.join().unwrap().unwrap(), "done");
    // Released by its owner once the answer is stored.
    assert!(!conn.exists::<_, bool>(&lock_key).unwrap());
    assert_eq!(store.all_keys().unwrap(), [hash]);
    assert_eq!(storage.list_namespaces().unwrap(), [LLM_RESPONSE_CACHE]);
}

#[test]
fn lock_of_a_dead_holder_is_taken_over_after_it_expires() {
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let cache = LlmCache::open(&storage).unwrap();
    let p = prompt("The process that took this lock was killed.");
    let lock_key = cache.lock_key("m", &p).unwrap();
    let mut conn = server.conn();
    let start = Instant::now();
    // A holder that will never renew nor release.
    let _: () = redis::cmd("SET")
        .arg(&lock_key)
        .arg("dead-process-token")
        .arg("NX")
        .arg("PX")
        .arg(400)
        .query(&mut conn)
        .unwrap();

    let answer = cache
        .get_or_compute("m", &p, || Ok("taken over".into()))
        .unwrap();
    assert_eq!(answer, "taken over");
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "computed while another owner held the lock ({:?})",
        start.elapsed()
    );
    assert_eq!(cache.stats().misses, 1);
    assert!(!conn.exists::<_, bool>(&lock_key).unwrap());
}

#[test]
fn waiter_returns_the_answer_another_process_stores() {
    // Another process (Python or Rust) holds the lock and stores its answer: the waiter returns
    // that answer without computing.
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let cache = LlmCache::open(&storage).unwrap();
    let p = prompt("Someone else is already on it.");
    let lock_key = cache.lock_key("m", &p).unwrap();
    let mut conn = server.conn();
    let _: () = conn.set_ex(&lock_key, "other-process", 30).unwrap();

    let other = {
        let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
        let key = LlmCache::key("m", &p);
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            store
                .upsert(vec![(key, json!({"return": "theirs", "model": "m"}))])
                .unwrap();
        })
    };
    let answer = cache
        .get_or_compute("m", &p, || panic!("the other process is computing it"))
        .unwrap();
    other.join().unwrap();
    assert_eq!(answer, "theirs");
    assert_eq!(
        cache.stats(),
        LlmCacheStats {
            hits: 0,
            misses: 0,
            waits: 1
        }
    );
    // Not ours: left alone.
    assert_eq!(conn.get::<_, String>(&lock_key).unwrap(), "other-process");
}

#[test]
fn holder_renews_its_lock_while_the_llm_is_slow() {
    // A 600 ms computation under a 90 ms lock TTL: without renewal the second cache would take
    // the lock over and compute again.
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let caches: Vec<Arc<LlmCache>> = (0..2)
        .map(|_| {
            Arc::new(
                LlmCache::open(&storage)
                    .unwrap()
                    .with_lock_ttl(Duration::from_millis(90)),
            )
        })
        .collect();
    assert_eq!(caches[0].lock_ttl(), Some(Duration::from_millis(90)));
    let computed = Arc::new(AtomicUsize::new(0));
    let p = prompt("slow");
    let handles: Vec<_> = caches
        .iter()
        .enumerate()
        .map(|(i, cache)| {
            let (cache, computed, p) = (cache.clone(), computed.clone(), p.clone());
            thread::spawn(move || {
                // The second starts once the first holds the lock.
                thread::sleep(Duration::from_millis(100 * i as u64));
                cache.get_or_compute("m", &p, || {
                    computed.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(600));
                    Ok("slow answer".into())
                })
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), "slow answer");
    }
    assert_eq!(computed.load(Ordering::SeqCst), 1);
}

#[test]
fn json_cache_has_in_process_locks_only() {
    let (_dir, storage) = json_storage();
    let cache = LlmCache::open(&storage).unwrap();
    // The JSON stack offers locks too (the same code path as Redis), seen by no other process.
    assert_eq!(cache.lock_key("m", &prompt("x")), None);
    assert_eq!(cache.lock_ttl(), Some(LlmCache::DEFAULT_LOCK_TTL));
    assert_eq!(
        cache
            .get_or_compute("m", &prompt("x"), || Ok("a".into()))
            .unwrap(),
        "a"
    );
    assert_eq!(storage.locks().key("llm_response_cache:k"), None);
}

/// Two caches over one JSON storage (two parts of one program) share its in-process locks:
/// while one computes a prompt, the other waits for its answer instead of paying again.
#[test]
fn two_json_caches_of_one_storage_pay_once() {
    let (_dir, storage) = json_storage();
    let caches = [
        LlmCache::open(&storage).unwrap(),
        LlmCache::open(&storage).unwrap(),
    ];
    let calls = AtomicUsize::new(0);
    let started = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        for cache in &caches {
            let (calls, started) = (&calls, &started);
            scope.spawn(move || {
                started.wait();
                let answer = cache
                    .get_or_compute("m", &prompt("shared"), || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Ok("once".into())
                    })
                    .unwrap();
                assert_eq!(answer, "once");
            });
        }
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn local_llm_counts_calls_from_every_thread() {
    let llm = Arc::new(LocalLlm::new());
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let llm = llm.clone();
            thread::spawn(move || llm.complete("m", &prompt(&format!("prompt {i}"))).unwrap())
        })
        .collect();
    let answers: std::collections::HashSet<String> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(answers.len(), 8);
    assert_eq!(llm.calls(), 8);
}

#[test]
fn redis_cluster_four_caches_of_four_threads_one_computation() {
    // The lock key and the cache key live in different slots: each script names its one key, so
    // the cluster connection routes it to the key's node.
    let cluster = support::cluster::RedisCluster::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(cluster.url_list())
        .key_prefix(unique_prefix("llm-cache-cluster"))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let (computed, stats) = stampede(&storage, 4, 4);
    assert_eq!(computed, 1);
    assert_eq!(stats.misses, 1);
    let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
    assert_eq!(
        store.all_keys().unwrap().len(),
        1,
        "no lock key among the ids"
    );
}

#[test]
fn try_get_or_compute_does_not_wait_for_another_thread() {
    let (_dir, storage) = json_storage();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    let p = prompt("busy elsewhere");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
    let computing = {
        let (cache, p) = (cache.clone(), p.clone());
        thread::spawn(move || {
            cache.get_or_compute("m", &p, || {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                Ok("theirs".into())
            })
        })
    };
    started_rx.recv().unwrap();
    let busy = cache
        .try_get_or_compute("m", &p, || {
            panic!("must not compute while another thread does")
        })
        .unwrap();
    assert_eq!(busy, None);
    finish_tx.send(()).unwrap();
    assert_eq!(computing.join().unwrap().unwrap(), "theirs");
    assert_eq!(
        cache
            .try_get_or_compute("m", &p, || panic!("cached"))
            .unwrap()
            .as_deref(),
        Some("theirs")
    );
    // Nothing cached and nobody computing: it computes.
    assert_eq!(
        cache
            .try_get_or_compute("m", &prompt("free"), || Ok("mine".into()))
            .unwrap()
            .as_deref(),
        Some("mine")
    );
    assert_eq!(
        cache.stats(),
        LlmCacheStats {
            hits: 1,
            misses: 2,
            waits: 0
        }
    );
}

#[test]
fn try_get_or_compute_does_not_wait_for_another_process() {
    let server = RedisServer::start();
    let (_, storage) = redis_storage(&server);
    let cache = LlmCache::open(&storage).unwrap();
    let p = prompt("locked by another process");
    let lock_key = cache.lock_key("m", &p).unwrap();
    let mut conn = server.conn();
    let _: () = conn.set_ex(&lock_key, "other-process", 30).unwrap();
    let busy = cache
        .try_get_or_compute("m", &p, || panic!("another process holds the lock"))
        .unwrap();
    assert_eq!(busy, None);
    let _: () = conn.del(&lock_key).unwrap();
    let answer = cache
        .try_get_or_compute("m", &p, || Ok("now mine".into()))
        .unwrap();
    assert_eq!(answer.as_deref(), Some("now mine"));
}
