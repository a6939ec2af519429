//! The conformance suite over the stacks users run: `FallbackStore` (Redis up, and Redis down
//! with every write journaled), `Metered` over Redis and over JSON, and every stack `Storage`
//! builds from the variables: JSON and Redis alone and with `KV_WRITE_BEHIND`; Redis with
//! `KV_FALLBACK` and with both; `STORAGE_KV_BACKEND=dual` with either primary; each without and
//! with metrics (`Storage::builder(..).metrics(..)`). Then what a `Storage` owns: one
//! write-behind queue per namespace, shared by its handles and not by another `Storage`;
//! `close` reporting a failed flush; a JSON directory reopened at once after a drop.
//!
//! Configurations come from `StoreConfigBuilder::from_vars` (a map), never from the process
//! environment: tests run in parallel threads.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::fallback::Fallback;
use graphrag_kv::migrate::{compare_namespace, NoProgress};
use graphrag_kv::{
    BackendKind, Error, KvStore, Metered, Metrics, NamespaceStats, RedisShared, Storage,
    StoreConfig, StoreConfigBuilder,
};
use serde_json::json;
use support::{free_port, unique_prefix, RedisServer};

// ---------------------------------------------------------------------------------------------
// Helpers

/// Everything a configuration needs to live until its test ends.
#[allow(dead_code)]
struct Guard {
    /// Run when the test passed, before the server goes (dual: both stores hold the same).
    check: Option<Box<dyn FnOnce()>>,
    server: Option<RedisServer>,
    dirs: Vec<tempfile::TempDir>,
    /// Kept so the Prometheus registry outlives the stores counting into it.
    registry: Option<prometheus::Registry>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(check) = self.check.take() {
            if !std::thread::panicking() {
                check();
            }
        }
    }
}

/// A Redis configuration with short timeouts: a stopped server is noticed in about a second
/// instead of the production defaults' ~40 s.
fn redis_config(url: &str) -> StoreConfig {
    StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url)
        .key_prefix(unique_prefix("stacks"))
        .connection_timeout(Duration::from_millis(300))
        .pool_timeout(Duration::from_millis(600))
        .retries(0)
        .build()
        .unwrap()
}

/// A `FallbackStore` directly around the Redis store, as `Storage` builds it.
fn fallback_open(
    url: &str,
    journal: &std::path::Path,
) -> impl Fn(&str) -> Arc<dyn KvStore> + use<> {
    let config = redis_config(url);
    let shared = match RedisShared::connect(&config.redis) {
        Ok(s) => s,
        Err(e) if e.is_connection() || e.is_timeout() => {
            RedisShared::new_unchecked(&config.redis).unwrap()
        }
        Err(e) => panic!("{e}"),
    };
    let for_replay = shared.clone();
    let (fallback, guard) = Fallback::open(
        journal,
        graphrag_kv::fallback::JournalTarget::from_redis(&config.redis),
        Box::new(move |ns: &str| Ok(Arc::new(for_replay.namespace(ns)?) as Arc<dyn KvStore>)),
    )
    .unwrap();
    let guard = Arc::new(guard);
    move |ns: &str| {
        Arc::new(fallback.wrap(shared.namespace(ns).unwrap(), Some(guard.clone())))
            as Arc<dyn KvStore>
    }
}

/// FallbackStore, Redis up.
fn fallback_online() -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let journal = tempfile::tempdir().unwrap();
    let open = fallback_open(&server.url(), journal.path());
    let guard = Guard {
        check: None,
        server: Some(server),
        dirs: vec![journal],
        registry: None,
    };
    (guard, move |ns: &str| {
        let s = open(ns);
        assert!(s.stats().is_ok(), "Redis is up: stats must answer");
        s
    })
}

/// A URL where nothing listens.
fn dead_url() -> String {
    format!("redis://127.0.0.1:{}", free_port())
}

/// The suite's start state offline: the backend is empty, but an offline fallback can only say
/// so once it has journaled a `clear` (otherwise its reads are `Error::Unavailable`, as
/// documented). Clearing an empty namespace changes nothing, so the suite then runs unchanged.
fn start_offline(store: Arc<dyn KvStore>) -> Arc<dyn KvStore> {
    store.clear().unwrap();
    store
}

/// FallbackStore, Redis down from the start: every write goes to the journal.
fn fallback_offline() -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let journal = tempfile::tempdir().unwrap();
    let open = fallback_open(&dead_url(), journal.path());
    let guard = Guard {
        check: None,
        server: None,
        dirs: vec![journal],
        registry: None,
    };
    (guard, move |ns: &str| start_offline(open(ns)))
}

/// An offline store for the suite: `stats` must be `Error::Unavailable` (documented: the
/// journal cannot count what Redis holds), and so must `index_done_callback` (it cannot confirm
/// writes Redis took before the outage); that is asserted on every call, and the suite's
/// cross-checks of the key count are then answered from `all_keys` and `get_by_ids`, which
/// offline come from the journal. Every other call is forwarded untouched.
struct OfflineStats(Arc<dyn KvStore>);

impl KvStore for OfflineStats {
    fn namespace(&self) -> &str {
        self.0.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.0.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<serde_json::Value>> {
        self.0.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<serde_json::Value>>> {
        self.0.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.0.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<graphrag_kv::Item>) -> graphrag_kv::Result<()> {
        self.0.upsert(items)
    }
    fn upsert_refs(&self, items: &[(&str, &serde_json::Value)]) -> graphrag_kv::Result<()> {
        self.0.upsert_refs(items)
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
        // Offline a checkpoint cannot confirm what Redis took before the outage: it is
        // documented to be `Error::Unavailable` counting the journaled writes. Asserted on
        // every call; the suite then goes on as if it had returned.
        match self.0.index_done_callback() {
            Err(e @ Error::Unavailable { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("safe in the journal"),
                    "offline checkpoint error of {:?}: {text}",
                    self.namespace()
                );
                Ok(())
            }
            other => panic!(
                "index_done_callback of {:?} offline: expected Error::Unavailable, got {other:?}",
                self.namespace()
            ),
        }
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        match self.0.stats() {
            Err(Error::Unavailable { namespace, .. }) => {
                assert_eq!(
                    namespace,
                    self.namespace(),
                    "Unavailable names the namespace"
                )
            }
            other => panic!(
                "stats of {:?} offline: expected Error::Unavailable, got {other:?}",
                self.namespace()
            ),
        }
        let keys = self.0.all_keys()?;
        let bytes = self
            .0
            .get_by_ids(&keys, None)?
            .iter()
            .flatten()
            .map(|v| serde_json::to_vec(v).unwrap().len() as u64)
            .sum();
        let mut stats = NamespaceStats::new(self.namespace(), BackendKind::Redis);
        stats.keys = keys.len() as u64;
        stats.bytes = bytes;
        Ok(stats)
    }
}

/// [`fallback_offline`] with `stats` checked by [`OfflineStats`].
fn fallback_offline_checked() -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let (guard, open) = fallback_offline();
    (guard, move |ns: &str| {
        Arc::new(OfflineStats(open(ns))) as Arc<dyn KvStore>
    })
}

/// `Storage::open` of `KV_FALLBACK=json` (and write-behind when `write_behind`) while Redis is
/// down from the start, stats checked by [`OfflineStats`].
fn env_offline(write_behind: bool) -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let work = tempfile::tempdir().unwrap();
    let journal = tempfile::tempdir().unwrap();
    let mut vars: Vec<(&str, String)> = vec![
        ("STORAGE_KV_BACKEND", "redis".into()),
        ("STORAGE_WORKING_DIR", work.path().display().to_string()),
        ("REDIS_URL", dead_url()),
        ("REDIS_CONNECTION_TIMEOUT", "0.3".into()),
        ("REDIS_POOL_TIMEOUT", "0.6".into()),
        ("REDIS_RETRIES", "0".into()),
        ("KV_FALLBACK", "json".into()),
        ("KV_FALLBACK_DIR", journal.path().display().to_string()),
    ];
    if write_behind {
        vars.push(("KV_WRITE_BEHIND", "true".into()));
    }
    let vars: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.into(), v)).collect();
    let config = StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let guard = Guard {
        check: None,
        server: None,
        dirs: vec![work, journal],
        registry: None,
    };
    (guard, move |ns: &str| {
        Arc::new(OfflineStats(start_offline(storage.namespace(ns).unwrap()))) as Arc<dyn KvStore>
    })
}

/// A fresh Prometheus registry and metrics counting into it.
fn metrics() -> (prometheus::Registry, Metrics) {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    (registry, metrics)
}

/// `Metered` around a Redis store.
fn metered_redis() -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let storage = Storage::open(&redis_config(&server.url())).unwrap();
    let (registry, m) = metrics();
    let guard = Guard {
        check: None,
        server: Some(server),
        dirs: vec![],
        registry: Some(registry),
    };
    (guard, move |ns: &str| {
        Arc::new(Metered::new(storage.namespace(ns).unwrap(), &m)) as Arc<dyn KvStore>
    })
}

/// `Metered` around a JSON store.
fn metered_json() -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let (registry, m) = metrics();
    let guard = Guard {
        check: None,
        server: None,
        dirs: vec![dir],
        registry: Some(registry),
    };
    (guard, move |ns: &str| {
        Arc::new(Metered::new(storage.namespace(ns).unwrap(), &m)) as Arc<dyn KvStore>
    })
}

/// The stack built from the variables: what it adds to a Redis backend, or a JSON one.
#[derive(Clone, Copy)]
enum Stack {
    Json,
    JsonWriteBehind,
    Redis,
    WriteBehind,
    Fallback,
    WriteBehindAndFallback,
    DualJsonPrimary,
    DualRedisPrimary,
}

/// `Storage` of the variables for `stack` over a fresh redis-server (none for JSON) and fresh
/// directories, with metrics when `metered`.
fn from_vars(stack: Stack, metered: bool) -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    from_vars_with(stack, metered, &[])
}

/// [`from_vars`] with more variables (e.g. `REDIS_COMPRESSION`).
fn from_vars_with(
    stack: Stack,
    metered: bool,
    extra: &[(&'static str, &str)],
) -> (Guard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let json = matches!(stack, Stack::Json | Stack::JsonWriteBehind);
    let server = (!json).then(RedisServer::start);
    let work = tempfile::tempdir().unwrap();
    let journal = tempfile::tempdir().unwrap();
    let mut vars: Vec<(&str, String)> = vec![
        (
            "STORAGE_KV_BACKEND",
            if json { "json" } else { "redis" }.into(),
        ),
        ("STORAGE_WORKING_DIR", work.path().display().to_string()),
        ("REDIS_KEY_PREFIX", unique_prefix("stacks")),
    ];
    if let Some(server) = &server {
        vars.push(("REDIS_URL", server.url()));
    }
    let fallback = [
        ("KV_FALLBACK", "json".to_string()),
        ("KV_FALLBACK_DIR", journal.path().display().to_string()),
    ];
    match stack {
        Stack::Json | Stack::Redis => {}
        Stack::WriteBehind | Stack::JsonWriteBehind => {
            vars.push(("KV_WRITE_BEHIND", "true".into()))
        }
        Stack::Fallback => vars.extend(fallback),
        Stack::WriteBehindAndFallback => {
            vars.push(("KV_WRITE_BEHIND", "true".into()));
            vars.extend(fallback);
        }
        Stack::DualJsonPrimary => {
            vars.push(("STORAGE_KV_BACKEND", "dual".into()));
            vars.push(("KV_DUAL_PRIMARY", "json".into()));
        }
        Stack::DualRedisPrimary => {
            vars.push(("STORAGE_KV_BACKEND", "dual".into()));
            vars.push(("KV_DUAL_PRIMARY", "redis".into()));
        }
    }
    vars.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let vars: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.into(), v)).collect();
    let config = StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    if extra.contains(&("REDIS_COMPRESSION", "zstd")) {
        assert_eq!(config.redis.compression, graphrag_kv::Compression::Zstd);
    }
    match stack {
        Stack::DualJsonPrimary | Stack::DualRedisPrimary => assert!(config.dual.is_some()),
        Stack::Fallback | Stack::WriteBehindAndFallback => assert!(config.fallback.is_some()),
        Stack::Json | Stack::JsonWriteBehind | Stack::Redis | Stack::WriteBehind => {
            assert!(config.dual.is_none() && config.fallback.is_none())
        }
    }
    assert_eq!(
        config.write_behind.is_some(),
        matches!(
            stack,
            Stack::WriteBehind | Stack::WriteBehindAndFallback | Stack::JsonWriteBehind
        )
    );
    let mut builder = Storage::builder(&config);
    let mut registry = None;
    if metered {
        let (r, m) = metrics();
        builder = builder.metrics(&m);
        registry = Some(r);
    }
    let storage = builder.open().unwrap();
    let opened: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    // Dual: at the end, the JSON and the Redis store hold the same data in every namespace.
    let check: Option<Box<dyn FnOnce()>> = match stack {
        Stack::DualJsonPrimary | Stack::DualRedisPrimary => {
            let opened = opened.clone();
            let (json_config, mut redis_config) = (config.clone(), config.clone());
            Some(Box::new(move || {
                let mut json_config = json_config;
                json_config.dual = None;
                json_config.backend = BackendKind::Json;
                json_config.write_behind = None;
                redis_config.dual = None;
                redis_config.backend = BackendKind::Redis;
                redis_config.write_behind = None;
                let json = Storage::open(&json_config).unwrap();
                let redis = Storage::open(&redis_config).unwrap();
                for ns in opened.lock().unwrap().iter() {
                    let diff = compare_namespace(
                        &*json.namespace(ns).unwrap(),
                        &*redis.namespace(ns).unwrap(),
                        500,
                        &mut NoProgress,
                    )
                    .unwrap();
                    assert!(diff.is_equal(), "dual: {ns:?} differs: {diff:?}");
                }
            }))
        }
        _ => None,
    };
    let guard = Guard {
        check,
        server,
        dirs: vec![work, journal],
        registry,
    };
    (guard, move |ns: &str| {
        opened.lock().unwrap().push(ns.to_string());
        storage.namespace(ns).unwrap()
    })
}

// ---------------------------------------------------------------------------------------------
// The suite on each stack

support::conformance::conformance_tests!(fallback_store_online, fallback_online);

/// Offline (Redis down from the start, every write journaled), each case reads back through
/// the journal. Every case applies except `stats_counts`: offline `stats` is documented to be
/// `Error::Unavailable` (asserted by `fallback_offline_stats_is_unavailable`, and on each of
/// the suite's `stats` calls by `OfflineStats`).
macro_rules! offline_suite {
    ($module:ident, $open_fn:expr) => {
        support::conformance::conformance_tests!(@tests $module, $open_fn;
            upsert_then_read,
            empty_batches,
            duplicate_id_in_batch_last_wins,
            filter_keys_missing_once_in_order,
            field_filtering,
            awkward_ids_round_trip,
            values_round_trip_exactly,
            large_values_round_trip,
            overwrite_replaces_whole_value,
            delete_removes_only_named_ids,
            clear_is_scoped_to_namespace,
            all_keys_many_ids,
            typed_round_trip,
            callbacks_keep_data,
            concurrent_mixed_operations,
        );
    };
}
offline_suite!(fallback_store_offline, fallback_offline_checked);
offline_suite!(env_fallback_offline, || env_offline(false));
offline_suite!(env_write_behind_and_fallback_offline, || env_offline(true));

/// `invalid_ids_are_refused` offline, apart from the suite above: `FallbackStore::get_by_id`
/// answered an invalid id from the journal with `Ok(None)` until it validated ids itself
/// (write-behind validates before the fallback sees them, so that stack always passed).
mod offline_invalid_ids {
    use super::*;

    #[test]
    fn fallback_store_offline() {
        let (_guard, open) = fallback_offline_checked();
        support::conformance::invalid_ids_are_refused(&open);
    }

    #[test]
    fn env_fallback_offline() {
        let (_guard, open) = env_offline(false);
        support::conformance::invalid_ids_are_refused(&open);
    }

    #[test]
    fn env_write_behind_and_fallback_offline() {
        let (_guard, open) = env_offline(true);
        support::conformance::invalid_ids_are_refused(&open);
    }
}

support::conformance::conformance_tests!(metered_over_redis, metered_redis);
support::conformance::conformance_tests!(metered_over_json, metered_json);

support::conformance::conformance_tests!(env_json, || from_vars(Stack::Json, false));
support::conformance::conformance_tests!(env_json_metered, || from_vars(Stack::Json, true));
support::conformance::conformance_tests!(env_json_write_behind, || from_vars(
    Stack::JsonWriteBehind,
    false
));
support::conformance::conformance_tests!(env_json_write_behind_metered, || from_vars(
    Stack::JsonWriteBehind,
    true
));
support::conformance::conformance_tests!(env_redis, || from_vars(Stack::Redis, false));
support::conformance::conformance_tests!(env_redis_metered, || from_vars(Stack::Redis, true));
support::conformance::conformance_tests!(env_write_behind, || from_vars(Stack::WriteBehind, false));
support::conformance::conformance_tests!(env_write_behind_metered, || from_vars(
    Stack::WriteBehind,
    true
));
support::conformance::conformance_tests!(env_fallback, || from_vars(Stack::Fallback, false));
support::conformance::conformance_tests!(env_fallback_metered, || from_vars(Stack::Fallback, true));
support::conformance::conformance_tests!(env_write_behind_and_fallback, || from_vars(
    Stack::WriteBehindAndFallback,
    false
));
support::conformance::conformance_tests!(env_write_behind_and_fallback_metered, || {
    from_vars(Stack::WriteBehindAndFallback, true)
});
support::conformance::conformance_tests!(env_dual_json_primary, || from_vars(
    Stack::DualJsonPrimary,
    false
));
support::conformance::conformance_tests!(env_dual_json_primary_metered, || from_vars(
    Stack::DualJsonPrimary,
    true
));
support::conformance::conformance_tests!(env_dual_redis_primary, || from_vars(
    Stack::DualRedisPrimary,
    false
));
support::conformance::conformance_tests!(env_dual_redis_primary_metered, || from_vars(
    Stack::DualRedisPrimary,
    true
));

/// zstd frames through every Redis stack (values of any size compressed when they shrink).
const ZSTD: &[(&str, &str)] = &[
    ("REDIS_COMPRESSION", "zstd"),
    ("REDIS_COMPRESSION_MIN_BYTES", "0"),
];
support::conformance::conformance_tests!(env_redis_zstd, || from_vars_with(
    Stack::Redis,
    true,
    ZSTD
));
support::conformance::conformance_tests!(env_write_behind_zstd, || from_vars_with(
    Stack::WriteBehind,
    true,
    ZSTD
));
support::conformance::conformance_tests!(env_fallback_zstd, || from_vars_with(
    Stack::Fallback,
    true,
    ZSTD
));
support::conformance::conformance_tests!(env_write_behind_and_fallback_zstd, || {
    from_vars_with(Stack::WriteBehindAndFallback, true, ZSTD)
});
support::conformance::conformance_tests!(env_dual_json_primary_zstd, || from_vars_with(
    Stack::DualJsonPrimary,
    true,
    ZSTD
));
support::conformance::conformance_tests!(env_dual_redis_primary_zstd, || from_vars_with(
    Stack::DualRedisPrimary,
    true,
    ZSTD
));

// The typed path and the key stream on each stack (tests/support/conformance_typed.rs).
support::conformance_typed::typed_conformance_tests!(fallback_store_online_typed, fallback_online);
support::conformance_typed::typed_conformance_tests!(@tests fallback_store_offline_typed, fallback_offline_checked;
    typed_and_untyped_read_each_other,
    typed_reads_keep_request_order,
    typed_errors_name_namespace_and_key,
    typed_calls_check_ids,
);
support::conformance_typed::typed_conformance_tests!(@tests env_write_behind_and_fallback_offline_typed, || env_offline(true);
    typed_and_untyped_read_each_other,
    typed_reads_keep_request_order,
    typed_errors_name_namespace_and_key,
    typed_calls_check_ids,
);
support::conformance_typed::typed_conformance_tests!(metered_over_redis_typed, metered_redis);
support::conformance_typed::typed_conformance_tests!(metered_over_json_typed, metered_json);
support::conformance_typed::typed_conformance_tests!(env_json_write_behind_typed, || from_vars(
    Stack::JsonWriteBehind,
    false
));
support::conformance_typed::typed_conformance_tests!(env_write_behind_metered_typed, || from_vars(
    Stack::WriteBehind,
    true
));
support::conformance_typed::typed_conformance_tests!(
    env_write_behind_and_fallback_metered_typed,
    || { from_vars(Stack::WriteBehindAndFallback, true) }
);
support::conformance_typed::typed_conformance_tests!(env_dual_json_primary_typed, || from_vars(
    Stack::DualJsonPrimary,
    false
));
support::conformance_typed::typed_conformance_tests!(env_dual_redis_primary_metered_typed, || {
    from_vars(Stack::DualRedisPrimary, true)
});

/// Offline, `stats` is documented to be `Error::Unavailable` (the journal cannot count what
/// Redis holds), for a namespace the journal knows and one it does not.
#[test]
fn fallback_offline_stats_is_unavailable() {
    let (_guard, open) = fallback_offline();
    let known = open("stats");
    known.upsert(vec![("k".into(), json!(1))]).unwrap();
    assert_eq!(known.get_by_id("k").unwrap(), Some(json!(1)));
    for s in [known.stats(), open("stats2").stats()] {
        match s {
            Err(e @ Error::Unavailable { .. }) => assert!(!e.to_string().is_empty()),
            other => panic!("stats offline: expected Error::Unavailable, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What a `Storage` owns

/// Write-behind that holds writes for a minute: what is read elsewhere before a flush came
/// through the queue's overlay, not from Redis.
fn slow_write_behind() -> graphrag_kv::WriteBehindConfig {
    graphrag_kv::WriteBehindConfig::builder()
        .max_delay(Duration::from_secs(60))
        .batch_items(100_000)
        .flush_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// Two `namespace()` handles of one `Storage` are one stack: a write queued through one is
/// read back through the other (one read-your-writes overlay). Another `Storage` has its own
/// queue: it sees the write only once the first one's queue is flushed.
#[test]
fn handles_of_one_storage_share_one_write_behind_queue_and_storages_do_not() {
    let server = RedisServer::start();
    let mut config = redis_config(&server.url());
    config.write_behind = Some(slow_write_behind());
    let storage = Storage::open(&config).unwrap();
    let other = Storage::open(&config).unwrap();
    let a = storage.namespace("full_docs").unwrap();
    let b = storage.clone().namespace("full_docs").unwrap();
    assert!(Arc::ptr_eq(&a, &b), "one stack per namespace per storage");
    let c = other.namespace("full_docs").unwrap();
    assert!(!Arc::ptr_eq(&a, &c), "two storages share nothing");

    a.upsert(vec![("d1".into(), json!("queued"))]).unwrap();
    assert_eq!(b.get_by_id("d1").unwrap(), Some(json!("queued")));
    assert_eq!(
        c.get_by_id("d1").unwrap(),
        None,
        "the other storage's queue is its own"
    );
    b.flush().unwrap();
    assert_eq!(c.get_by_id("d1").unwrap(), Some(json!("queued")));

    // A handle dropped and opened again while another lives: still the same queue.
    drop(b);
    a.upsert(vec![("d2".into(), json!("queued"))]).unwrap();
    let again = storage.namespace("full_docs").unwrap();
    assert_eq!(again.get_by_id("d2").unwrap(), Some(json!("queued")));
    storage.close().unwrap();
    other.close().unwrap();
}

/// `close` flushes the queues and reports what failed: here the server is gone with a write
/// still queued, so the flush fails with the connection error, instead of the write vanishing
/// into a log line at drop.
#[test]
fn close_reports_a_failed_flush() {
    let mut server = RedisServer::start();
    let mut config = redis_config(&server.url());
    config.write_behind = Some(slow_write_behind());
    let storage = Storage::open(&config).unwrap();
    let docs = storage.namespace("full_docs").unwrap();
    docs.upsert(vec![("d1".into(), json!("never sent"))])
        .unwrap();
    server.kill();
    let err = storage.close().expect_err("the flush cannot succeed");
    assert!(
        err.is_connection() || err.is_timeout(),
        "a connection failure, got {err:?}"
    );
}

/// `close` of a healthy storage saves everything: the JSON file holds the writes at once.
#[test]
fn close_saves_json_and_flushes_write_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    config.write_behind = Some(slow_write_behind());
    let storage = Storage::open(&config).unwrap();
    let docs = storage.namespace("full_docs").unwrap();
    docs.upsert(vec![("d1".into(), json!("saved"))]).unwrap();
    storage.close().unwrap();
    let text = std::fs::read_to_string(dir.path().join("kv_store_full_docs.json")).unwrap();
    assert!(text.contains("saved"), "{text}");
}

/// Opening, dropping and reopening a JSON storage in a loop never meets its own lock: the
/// last handle's drop flushes the queue, saves and releases the lock before it returns, so
/// no retry or pause is needed (a process-wide registry used to race with that drop).
#[test]
fn json_storage_reopens_at_once_after_drop() {
    let dir = tempfile::tempdir().unwrap();
    for write_behind in [false, true] {
        let mut config = StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap();
        if write_behind {
            config.write_behind = Some(slow_write_behind());
        }
        for i in 0..40 {
            let storage = Storage::open(&config).unwrap();
            let docs = storage.namespace("full_docs").unwrap();
            if i > 0 {
                assert_eq!(docs.get_by_id("n").unwrap(), Some(json!(i - 1)));
            }
            docs.upsert(vec![("n".into(), json!(i))]).unwrap();
            // Dropped from another thread half of the time: the drop is over when `join`
            // returns, so the next open finds the lock free.
            if i % 2 == 0 {
                std::thread::spawn(move || drop((docs, storage)))
                    .join()
                    .unwrap();
            } else {
                drop((docs, storage));
            }
        }
        let storage = Storage::open(&config).unwrap();
        assert_eq!(
            storage
                .namespace("full_docs")
                .unwrap()
                .get_by_id("n")
                .unwrap(),
            Some(json!(39))
        );
        // A second writing storage of the same directory in this process is refused, as a
        // second process would be.
        match Storage::open(&config) {
            Err(e @ Error::Locked { .. }) => assert!(e.to_string().contains("lock")),
            other => panic!("expected Error::Locked, got {other:?}"),
        }
    }
}

/// `open_from_env` calls share one process-wide `Storage` while the environment's configuration
/// is unchanged and a handle lives: one directory lock (no `Error::Locked` between two calls),
/// one stack per namespace; released with the last handle. The only test of this binary that
/// sets the environment; the others build configurations from maps.
#[test]
fn open_from_env_shares_one_storage() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("STORAGE_KV_BACKEND", "json");
    std::env::set_var("STORAGE_WORKING_DIR", dir.path());
    let a = graphrag_kv::open_from_env("full_docs").unwrap();
    let b = graphrag_kv::open_from_env("full_docs").unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let chunks = graphrag_kv::open_from_env("text_chunks").unwrap();
    a.upsert(vec![("d".into(), json!(1))]).unwrap();
    chunks.upsert(vec![("c".into(), json!(2))]).unwrap();
    drop((a, b, chunks));
    // All handles gone: saved, lock released; a plain `Storage` opens the directory.
    let storage = Storage::from_env().unwrap();
    assert_eq!(
        storage
            .namespace("full_docs")
            .unwrap()
            .get_by_id("d")
            .unwrap(),
        Some(json!(1))
    );
    drop(storage);
    let again = graphrag_kv::open_from_env("text_chunks").unwrap();
    assert_eq!(again.get_by_id("c").unwrap(), Some(json!(2)));
    drop(again);
    std::env::remove_var("STORAGE_KV_BACKEND");
    std::env::remove_var("STORAGE_WORKING_DIR");
}
