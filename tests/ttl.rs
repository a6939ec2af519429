//! TTL expiry observed on a real redis-server: a value written with `REDIS_TTL_<NAME>=1` is
//! gone from `get_by_id`, `all_keys` and `stats` after it, under every naming scheme and through
//! the stacks `Storage` builds; an overwrite sets a fresh TTL.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use graphrag_kv::{KvStore, Storage, StoreConfig, StoreConfigBuilder};
use serde_json::json;
use support::{unique_prefix, RedisServer};

/// How long an expired key may take to disappear before the test fails: far above the 1 s
/// TTL, so a loaded machine does not fail the test, far below "never".
const GONE_WITHIN: Duration = Duration::from_secs(15);

fn vars(server: &RedisServer, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut v: HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis".to_string()),
        ("REDIS_URL", server.url()),
        ("REDIS_KEY_PREFIX", unique_prefix("ttl")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, val) in extra {
        v.insert(k.to_string(), val.to_string());
    }
    v
}

fn storage_from(vars: &HashMap<String, String>) -> Storage {
    let config = StoreConfigBuilder::from_vars(vars)
        .unwrap()
        .build()
        .unwrap();
    Storage::open(&config).unwrap()
}

/// Polls `done` every 50 ms until it is true or `bound` has passed; true when it became true.
fn eventually(bound: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True when `id` is absent from every view of `store`: get_by_id, all_keys, stats.
fn gone_everywhere(store: &dyn KvStore, id: &str) -> bool {
    store.get_by_id(id).unwrap().is_none()
        && !store.all_keys().unwrap().iter().any(|k| k == id)
        && store.stats().unwrap().keys == 0
}

/// Writes `id` into `ns` (TTL 1 s expected) and a control id into `control` (no TTL), and
/// checks the first disappears from every view while the control stays.
fn expires(store: &Arc<dyn KvStore>, control: &Arc<dyn KvStore>, what: &str) {
    assert_eq!(
        store.stats().unwrap().ttl_seconds,
        1,
        "{what}: TTL of {}",
        store.namespace()
    );
    assert_eq!(control.stats().unwrap().ttl_seconds, 0, "{what}: control");
    let start = Instant::now();
    store
        .upsert(vec![("short-lived".into(), json!({"content": "x"}))])
        .unwrap();
    control
        .upsert(vec![("kept".into(), json!({"content": "y"}))])
        .unwrap();
    // Seen while the TTL runs (unless this machine stalled for most of the second).
    let seen = store.get_by_id("short-lived").unwrap().is_some();
    if start.elapsed() < Duration::from_millis(800) {
        assert!(seen, "{what}: value missing right after the write");
        assert_eq!(store.all_keys().unwrap(), ["short-lived"], "{what}");
        assert_eq!(store.stats().unwrap().keys, 1, "{what}");
    }
    assert!(
        eventually(GONE_WITHIN, || gone_everywhere(&**store, "short-lived")),
        "{what}: still visible {:?} after the write (TTL 1 s): get_by_id {:?}, all_keys {:?}, \
         stats {:?}",
        start.elapsed(),
        store.get_by_id("short-lived").unwrap(),
        store.all_keys().unwrap(),
        store.stats().unwrap()
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{what}: gone after {:?}, before its TTL of 1 s",
        start.elapsed()
    );
    assert_eq!(
        control.get_by_id("kept").unwrap(),
        Some(json!({"content": "y"})),
        "{what}: a namespace without TTL lost its value"
    );
    assert_eq!(control.stats().unwrap().keys, 1, "{what}");
}

#[test]
fn documented_variable_names_expire() {
    let server = RedisServer::start();
    let s = storage_from(&vars(
        &server,
        &[
            ("REDIS_TTL_DOCS", "1"),
            ("REDIS_TTL_CHUNKS", "1"),
            ("REDIS_TTL_LLM_CACHE", "1"),
        ],
    ));
    let control = s.namespace("community_reports").unwrap();
    for ns in ["full_docs", "text_chunks", "llm_response_cache"] {
        expires(&s.namespace(ns).unwrap(), &control, ns);
        control.clear().unwrap();
    }
}

#[test]
fn reference_and_per_namespace_variable_names_expire() {
    let server = RedisServer::start();
    let s = storage_from(&vars(
        &server,
        &[
            ("REDIS_TTL_FULL_DOCS", "1"),
            ("REDIS_TTL_COMMUNITY_REPORTS", "1"),
            ("REDIS_TTL_MY_NS_V1", "1"),
        ],
    ));
    let control = s.namespace("text_chunks").unwrap();
    for ns in ["full_docs", "community_reports", "my.ns-v1"] {
        expires(&s.namespace(ns).unwrap(), &control, ns);
        control.clear().unwrap();
    }
}

#[test]
fn builder_ttl_expires() {
    let server = RedisServer::start();
    let config = StoreConfig::builder()
        .backend(graphrag_kv::BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(unique_prefix("ttlb"))
        .ttl("entities", 1)
        .build()
        .unwrap();
    let s = Storage::open(&config).unwrap();
    expires(
        &s.namespace("entities").unwrap(),
        &s.namespace("relations").unwrap(),
        "builder",
    );
}

/// The same through the stacks users run: write-behind, fallback, both, metered, and dual
/// with Redis as the primary (reads come from Redis, where the value expires).
#[test]
fn stacks_expire_too() {
    let server = RedisServer::start();
    let journal = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let journal_dir = journal.path().display().to_string();
    let work_dir = work.path().display().to_string();
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("write-behind", vec![("KV_WRITE_BEHIND", "true")]),
        (
            "fallback",
            vec![("KV_FALLBACK", "json"), ("KV_FALLBACK_DIR", &journal_dir)],
        ),
        (
            "write-behind + fallback",
            vec![
                ("KV_WRITE_BEHIND", "true"),
                ("KV_FALLBACK", "json"),
                ("KV_FALLBACK_DIR", &journal_dir),
            ],
        ),
        (
            "dual, redis primary",
            vec![
                ("STORAGE_KV_BACKEND", "dual"),
                ("KV_DUAL_PRIMARY", "redis"),
                ("STORAGE_WORKING_DIR", &work_dir),
            ],
        ),
    ];
    for (what, extra) in cases {
        let mut extra = extra;
        extra.push(("REDIS_TTL_DOCS", "1"));
        let s = storage_from(&vars(&server, &extra));
        expires(
            &s.namespace("full_docs").unwrap(),
            &s.namespace("text_chunks").unwrap(),
            what,
        );
        // A second writing Storage of the same JSON directory (the dual case) is refused
        // while the first is open, as a second process would be.
        drop(s);
        #[cfg(feature = "metrics")]
        {
            let registry = prometheus::Registry::new();
            let metrics = graphrag_kv::Metrics::new(&registry).unwrap();
            let config = StoreConfigBuilder::from_vars(&vars(&server, &extra))
                .unwrap()
                .build()
                .unwrap();
            let s = Storage::builder(&config).metrics(&metrics).open().unwrap();
            let docs = s.namespace("full_docs").unwrap();
            let chunks = s.namespace("text_chunks").unwrap();
            chunks.clear().unwrap();
            expires(&docs, &chunks, &format!("{what}, metered"));
        }
    }
}

/// An overwrite half-way through the TTL starts a new one: the value is still there after the
/// first write's TTL would have run out, holding the new value, and gone later.
#[test]
fn overwrite_sets_a_fresh_ttl() {
    let server = RedisServer::start();
    let s = storage_from(&vars(&server, &[("REDIS_TTL_DOCS", "1")]));
    let store = s.namespace("full_docs").unwrap();
    // The check is meaningful only when the overwrite came before the first TTL ran out and
    // the read at ~1.2 s came before the second ran out: a machine too loaded for that gets
    // another attempt rather than a wrong verdict.
    let mut meaningful = 0;
    for attempt in 0..5 {
        let t0 = Instant::now();
        store
            .upsert(vec![("doc".into(), json!({"v": 1, "attempt": attempt}))])
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let t1 = Instant::now();
        store
            .upsert(vec![("doc".into(), json!({"v": 2, "attempt": attempt}))])
            .unwrap();
        let overwritten_at = t0.elapsed();
        let check_at = Duration::from_millis(1200);
        std::thread::sleep(check_at.saturating_sub(t0.elapsed()));
        let got = store.get_by_id("doc").unwrap();
        let read_at = t0.elapsed();
        let since_overwrite = t1.elapsed();
        if overwritten_at >= Duration::from_millis(900)
            || since_overwrite >= Duration::from_millis(900)
        {
            eprintln!(
                "attempt {attempt}: too slow to tell (overwrite at {overwritten_at:?}, read at \
                 {read_at:?}), again"
            );
            assert!(eventually(GONE_WITHIN, || gone_everywhere(&*store, "doc")));
            continue;
        }
        assert_eq!(
            got,
            Some(json!({"v": 2, "attempt": attempt})),
            "read {read_at:?} after the first write and {since_overwrite:?} after the \
             overwrite: the overwrite did not set a fresh TTL"
        );
        assert!(
            eventually(GONE_WITHIN, || gone_everywhere(&*store, "doc")),
            "the overwritten value never expired"
        );
        meaningful += 1;
        break;
    }
    assert_eq!(meaningful, 1, "no attempt was fast enough to check");
}
