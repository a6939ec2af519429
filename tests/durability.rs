//! Durability proved with real processes: Redis killed with SIGKILL under AOF `always`, a
//! graceful restart in the middle of a write stream, and the fallback journal through an outage
//! and through the death of the writing process. Each runs on redis-server 7.0 (module `redis7`)
//! and on valkey-server 8.1 (module `valkey8`, the API of Redis 7.2+). (RDB and AOF `everysec`
//! checkpoints are in tests/redis.rs.)

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::{BackendKind, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder};
use serde_json::json;
use support::{RedisServer, ServerKind};

fn config(server: &RedisServer) -> StoreConfigBuilder {
    StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix("dur")
        .connection_timeout(Duration::from_millis(300))
        .socket_timeout(Duration::from_secs(1))
        .pool_timeout(Duration::from_secs(1))
}

/// Writes batches of 10 until stopped or until a write fails; returns the acknowledged ids.
fn write_stream(
    store: Arc<dyn KvStore>,
    stop: Arc<AtomicBool>,
    stop_on_error: bool,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut errors = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<_> = (0..10)
                .map(|j| (format!("s-{i}-{j}"), json!({"i": i, "j": j})))
                .collect();
            let ids: Vec<String> = batch.iter().map(|(id, _)| id.clone()).collect();
            match store.upsert(batch) {
                Ok(()) => acked.extend(ids),
                Err(e) => {
                    errors += 1;
                    if stop_on_error {
                        break;
                    }
                    eprintln!("write failed: {e}");
                }
            }
            i += 1;
        }
        (acked, errors)
    })
}

fn assert_all_present(store: &dyn KvStore, ids: &[String]) {
    for chunk in ids.chunks(1000) {
        let missing = store.filter_keys(chunk).unwrap();
        assert!(
            missing.is_empty(),
            "{} acknowledged writes lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
    }
}

fn aof_always_sigkill_mid_stream_keeps_every_acknowledged_write(kind: ServerKind) {
    let mut server =
        RedisServer::start_kind_with(kind, &["--appendonly", "yes", "--appendfsync", "always"]);
    let storage = Storage::open(&config(&server).retries(0).build().unwrap()).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_stream(store.clone(), stop.clone(), true);
    // A moment that varies from run to run.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_millis(300 + (nanos % 500) as u64));
    server.kill();
    let (acked, _) = writer.join().unwrap();
    assert!(
        acked.len() > 100,
        "too few writes before the kill: {}",
        acked.len()
    );
    server.restart();
    assert_all_present(&*store, &acked);
}

fn graceful_restart_mid_stream_is_ridden_through(kind: ServerKind) {
    let mut server =
        RedisServer::start_kind_with(kind, &["--appendonly", "yes", "--appendfsync", "always"]);
    let storage = Storage::open(&config(&server).retries(12).build().unwrap()).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_stream(store.clone(), stop.clone(), false);
    std::thread::sleep(Duration::from_millis(400));
    // SHUTDOWN, then start again on the same port and directory.
    server.restart();
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let (acked, errors) = writer.join().unwrap();
    assert_eq!(errors, 0, "the retries should ride through a restart");
    assert!(acked.len() > 100);
    assert_all_present(&*store, &acked);
}

fn fallback_config(server: &RedisServer, dir: &std::path::Path) -> StoreConfig {
    config(server).retries(1).fallback_dir(dir).build().unwrap()
}

fn fallback_journals_an_outage_and_replays_it(kind: ServerKind) {
    let mut server = RedisServer::start_kind_with(kind, &["--appendonly", "yes"]);
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&fallback_config(&server, dir.path())).unwrap();
    let store = storage.namespace("llm_response_cache").unwrap();
    let fallback = storage.fallback().unwrap().clone();
    store
        .upsert(vec![("before".into(), json!(1)), ("gone".into(), json!(2))])
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writer = write_stream(store.clone(), stop.clone(), false);
    std::thread::sleep(Duration::from_millis(300));
    server.stop();
    // Detection takes the retry budget: REDIS_POOL_TIMEOUT per attempt when nothing listens.
    for _ in 0..100 {
        if !fallback.is_online() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!fallback.is_online(), "the outage went unnoticed");
    std::thread::sleep(Duration::from_millis(300));
    // Offline: the journal answers what it knows, and nothing else is reported missing.
    store.upsert(vec![("during".into(), json!(3))]).unwrap();
    store.delete_by_ids(&["gone".into()]).unwrap();
    assert_eq!(store.get_by_id("during").unwrap(), Some(json!(3)));
    assert_eq!(store.get_by_id("gone").unwrap(), None);
    assert_eq!(
        store.filter_keys(&["during".into()]).unwrap(),
        Vec::<String>::new()
    );
    let e = store.get_by_id("before").unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert!(store.all_keys().is_err());
    assert!(fallback.pending_writes() > 0);

    server.restart();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (acked, errors) = writer.join().unwrap();
    assert_eq!(errors, 0, "writes during the outage must be accepted");
    // Wait for the replay.
    for _ in 0..100 {
        if fallback.is_online() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fallback.is_online());
    assert_eq!(fallback.pending_writes(), 0);
    // Everything is in Redis itself, read without the fallback.
    let plain = Storage::open(&config(&server).build().unwrap()).unwrap();
    let direct = plain.namespace("llm_response_cache").unwrap();
    assert_all_present(&*direct, &acked);
    assert_eq!(direct.get_by_id("during").unwrap(), Some(json!(3)));
    assert_eq!(direct.get_by_id("gone").unwrap(), None);
    assert_eq!(direct.get_by_id("before").unwrap(), Some(json!(1)));
    let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(leftovers, 0, "the journal is removed after its replay");
}

/// Run as a child process by the test below: writes while Redis is down, then dies without
/// any cleanup (as a crash would).
#[test]
fn fallback_child_writer() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("FALLBACK_CHILD_URL"),
        std::env::var("FALLBACK_CHILD_DIR"),
    ) else {
        return;
    };
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url)
        .key_prefix("dur")
        .connection_timeout(Duration::from_millis(200))
        .pool_timeout(Duration::from_millis(400))
        .retries(0)
        .fallback_dir(dir)
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    for i in 0..50 {
        store
            .upsert(vec![(format!("orphan-{i}"), json!({"i": i}))])
            .unwrap();
    }
    store.delete_by_ids(&["orphan-0".into()]).unwrap();
    println!("WROTE");
    std::process::abort();
}

fn journal_of_a_dead_process_is_replayed_by_the_next_open(kind: ServerKind) {
    let mut server = RedisServer::start_kind(kind);
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "fallback_child_writer", "--nocapture"])
        .env("FALLBACK_CHILD_URL", &url)
        .env("FALLBACK_CHILD_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("WROTE"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the child was meant to die");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "one orphaned journal"
    );

    server.restart();
    let storage = Storage::open(&fallback_config(&server, dir.path())).unwrap();
    let fallback = storage.fallback().unwrap();
    assert!(
        fallback.is_online(),
        "the orphan is replayed at open when Redis answers"
    );
    let store = storage.namespace("text_chunks").unwrap();
    assert_eq!(store.get_by_id("orphan-0").unwrap(), None);
    let ids: Vec<String> = (1..50).map(|i| format!("orphan-{i}")).collect();
    assert_all_present(&*store, &ids);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn store_opens_while_redis_is_down(kind: ServerKind) {
    let mut server = RedisServer::start_kind(kind);
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&fallback_config(&server, dir.path())).unwrap();
    let store = storage.namespace("full_docs").unwrap();
    store
        .upsert(vec![("d".into(), json!({"content": "x"}))])
        .unwrap();
    // Journaled, but not a durable checkpoint: Redis is unreachable.
    let e = store.index_done_callback().unwrap_err();
    assert!(e.is_connection(), "{e}");
    assert!(!storage.fallback().unwrap().is_online());
}

fn write_behind_over_fallback_loses_nothing_through_an_outage(kind: ServerKind) {
    let mut server = RedisServer::start_kind_with(kind, &["--appendonly", "yes"]);
    let dir = tempfile::tempdir().unwrap();
    let vars: std::collections::HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis".to_string()),
        ("REDIS_URL", server.url()),
        ("REDIS_KEY_PREFIX", "wbf".into()),
        ("REDIS_RETRIES", "1".into()),
        ("REDIS_POOL_TIMEOUT", "0.5".into()),
        ("REDIS_CONNECTION_TIMEOUT", "0.3".into()),
        ("KV_FALLBACK", "json".into()),
        ("KV_FALLBACK_DIR", dir.path().display().to_string()),
        ("KV_WRITE_BEHIND", "true".into()),
        ("KV_WRITE_BEHIND_FLUSH_TIMEOUT_MS", "3000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let wb_config = StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    let ids: Vec<String> = (0..3000).map(|i| format!("q-{i}")).collect();
    {
        let storage = Storage::open(&wb_config).unwrap();
        let store = storage.namespace("text_chunks").unwrap();
        // Same namespace, same queue: a second handle sees the first one's queued writes.
        let again = storage.namespace("text_chunks").unwrap();
        for (n, id) in ids.iter().enumerate() {
            store.upsert(vec![(id.clone(), json!({"n": n}))]).unwrap();
            if n == 1000 {
                server.stop();
            }
        }
        assert_eq!(again.get_by_id("q-2999").unwrap(), Some(json!({"n": 2999})));
        // Dropping flushes into the fallback, which journals what Redis cannot take.
    }
    server.restart();
    let storage = Storage::open(&wb_config).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    store.index_done_callback().unwrap();
    let plain = Storage::open(&config(&server).key_prefix("wbf").build().unwrap()).unwrap();
    assert_all_present(&*plain.namespace("text_chunks").unwrap(), &ids);
}

/// Each scenario on both servers.
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {
        mod redis7 {
            $(#[test]
            fn $name() {
                super::$name(super::ServerKind::Redis);
            })*
        }
        mod valkey8 {
            $(#[test]
            fn $name() {
                super::$name(super::ServerKind::Valkey);
            })*
        }
    };
}

on_both_servers!(
    aof_always_sigkill_mid_stream_keeps_every_acknowledged_write,
    graceful_restart_mid_stream_is_ridden_through,
    fallback_journals_an_outage_and_replays_it,
    journal_of_a_dead_process_is_replayed_by_the_next_open,
    store_opens_while_redis_is_down,
    write_behind_over_fallback_loses_nothing_through_an_outage
);
