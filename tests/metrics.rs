//! Metrics, scraped over HTTP as Prometheus does: the `metrics_server` example's HTTP code in
//! this process (so the test drives the operations and checks each counter moves), the example
//! itself as a subprocess, and the server-side figures (pool, memory, evictions) against a real
//! redis-server. Requests are plain `std::net::TcpStream` HTTP, no client library.

mod support;

#[path = "../examples/metrics_server.rs"]
#[allow(dead_code)]
mod metrics_server;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graphrag_kv::metrics::{Metered, Metrics};
use graphrag_kv::{BackendKind, KvStore, Storage, StoreConfig};
use prometheus::Registry;
use serde_json::json;
use support::{unique_prefix, RedisServer};

/// `GET path` over a fresh connection; returns the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        // HTTP/1.0: the body comes whole (no chunked encoding) and the server closes.
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    if status == 200 {
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
    }
    (status, body.to_string())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    Scrape(body)
}

/// One scrape's text.
struct Scrape(String);

impl Scrape {
    /// The sum of every series of `name` whose labels include all of `labels`; `None` when
    /// no series matches.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                continue;
            }
            let have: Vec<(&str, &str)> = series_labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("label=value");
                    (k, v.trim_matches('"'))
                })
                .collect();
            if labels.iter().all(|l| have.contains(l)) {
                *found.get_or_insert(0.0) += value.parse::<f64>().expect("a number");
            }
        }
        found
    }

    #[track_caller]
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{}", self.0))
    }
}

fn redis_storage(server: &RedisServer) -> Storage {
    Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(server.url())
            .key_prefix(unique_prefix("metrics"))
            .retries(0)
            .pool_timeout(Duration::from_secs(1))
            .connection_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// The example's HTTP server in this process, over a registry with `Metrics` registered.
fn serve(metrics: &Metrics, registry: Registry, storage: Option<&Storage>) -> SocketAddr {
    let hook = metrics_server::scrape_hook(metrics, storage.and_then(Storage::redis));
    metrics_server::spawn_server("127.0.0.1:0", registry, hook).expect("binding 127.0.0.1:0")
}

#[test]
fn counters_move_with_operations_on_redis() {
    let server = RedisServer::start();
    let storage = redis_storage(&server);
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    metrics.pool().watch_redis(storage.redis().unwrap());
    let addr = serve(&metrics, registry, Some(&storage));
    let docs = Metered::new(storage.namespace("full_docs").unwrap(), &metrics);
    let ns = [("namespace", "full_docs")];
    let op = |o: &'static str| [("namespace", "full_docs"), ("operation", o)];

    let before = scrape(addr);
    // Series exist (at zero) before the first operation, so ratios are defined from the start.
    assert_eq!(before.value("redis_cache_hits_total", &ns), 0.0);
    assert_eq!(before.value("redis_operations_total", &op("upsert")), 0.0);

    docs.upsert(vec![
        ("d1".into(), json!({"content": "one"})),
        ("d2".into(), json!({"content": "two — ✓"})),
    ])
    .unwrap();
    docs.upsert(vec![("d3".into(), json!({"content": "three"}))])
        .unwrap();
    assert!(docs.get_by_id("d1").unwrap().is_some());
    assert!(docs.get_by_id("absent").unwrap().is_none());
    docs.get_by_ids(&["d2".into(), "d3".into(), "nope".into()], None)
        .unwrap();
    docs.filter_keys(&["d1".into(), "zz".into()]).unwrap();
    let stats = docs.stats().unwrap();

    let after = scrape(addr);
    assert_eq!(after.value("redis_operations_total", &op("upsert")), 2.0);
    assert_eq!(after.value("redis_operations_total", &op("get_by_id")), 2.0);
    assert_eq!(
        after.value("redis_operations_total", &op("get_by_ids")),
        1.0
    );
    assert_eq!(
        after.value("redis_operations_total", &op("filter_keys")),
        1.0
    );
    assert_eq!(after.value("redis_cache_hits_total", &ns), 3.0);
    assert_eq!(after.value("redis_cache_misses_total", &ns), 2.0);
    let upserts = op("upsert");
    assert_eq!(
        after.value("redis_operation_duration_seconds_count", &upserts),
        2.0
    );
    assert!(after.value("redis_operation_duration_seconds_sum", &upserts) > 0.0);
    // Bucket bounds from 50 µs to 1 s.
    for le in ["0.00005", "1"] {
        let mut labels = upserts.to_vec();
        labels.push(("le", le));
        assert!(
            after
                .get("redis_operation_duration_seconds_bucket", &labels)
                .is_some(),
            "bucket le={le}:\n{}",
            after.0
        );
    }
    assert_eq!(after.value("redis_namespace_keys", &ns), 3.0);
    assert_eq!(
        after.value("redis_memory_usage_bytes", &ns),
        stats.bytes as f64
    );
    assert!(stats.bytes > 0);
    // The pool was used: at least one connection, read at scrape time.
    let open = after.value("redis_connection_pool_size", &[("status", "idle")])
        + after.value("redis_connection_pool_size", &[("status", "active")]);
    assert!(open >= 1.0, "{}", after.0);
    // The server's INFO, read by the scrape hook.
    assert!(after.value("redis_server_used_memory_bytes", &[]) > 0.0);
    assert_eq!(after.value("redis_evicted_keys_total", &[]), 0.0);
    assert_eq!(after.get("redis_errors_total", &ns), None);

    // A value no decoder can read: a decode error, counted by kind.
    let mut conn = server.conn();
    let key = storage
        .redis()
        .unwrap()
        .namespace("full_docs")
        .unwrap()
        .key("garbage");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&b"\xff\x00not json"[..])
        .query(&mut conn)
        .unwrap();
    assert!(docs.get_by_id("garbage").is_err());
    // The server gone: a connection error.
    drop(conn);
    let mut server = server;
    server.kill();
    assert!(docs.upsert(vec![("d4".into(), json!(4))]).is_err());
    let failed = scrape(addr);
    let decode = [
        ("namespace", "full_docs"),
        ("operation", "get_by_id"),
        ("kind", "decode"),
    ];
    assert_eq!(failed.value("redis_errors_total", &decode), 1.0);
    let upsert_errors = failed.value("redis_errors_total", &op("upsert"));
    let by_kind = failed.get(
        "redis_errors_total",
        &[("operation", "upsert"), ("kind", "connection")],
    );
    let by_timeout = failed.get(
        "redis_errors_total",
        &[("operation", "upsert"), ("kind", "timeout")],
    );
    assert_eq!(upsert_errors, 1.0, "{}", failed.0);
    assert_eq!(by_kind.or(by_timeout), Some(1.0), "{}", failed.0);
    // Failed calls are operations too.
    assert_eq!(failed.value("redis_operations_total", &op("upsert")), 3.0);

    // Anything but /metrics is a 404.
    assert_eq!(http_get(addr, "/").0, 404);
}

/// `redis_retries_total` counts the backend's own retries, read from the pool at scrape time:
/// a pooled connection the server dropped fails once, the call is retried on a new one and
/// succeeds. The retry is counted under the namespace and operation that made it.
#[test]
fn retries_of_the_backend_are_counted() {
    let server = RedisServer::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(unique_prefix("retry"))
        .retries(3)
        .build()
        .unwrap();
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let storage = Storage::builder(&config).metrics(&metrics).open().unwrap();
    // Watched again from outside: still counted once per retry.
    metrics.watch_retries(storage.redis().unwrap());
    let docs = storage.namespace("full_docs").unwrap();
    let retries = |registry: &Registry| {
        Scrape(graphrag_kv::metrics::render(registry))
            .get("redis_retries_total", &[])
            .unwrap_or(0.0)
    };
    docs.upsert(vec![("d1".into(), json!({"content": "one"}))])
        .unwrap();
    assert_eq!(retries(&registry), 0.0);
    // The server closes every connection but the admin's own; the pooled one is now dead.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut server.conn())
        .unwrap();
    assert!(killed >= 1, "no pooled connection to kill");
    assert_eq!(
        docs.get_by_id("d1").unwrap(),
        Some(json!({"content": "one"}))
    );
    assert_eq!(retries(&registry), 1.0);
    assert_eq!(storage.redis().unwrap().retries_total(), 1);
    let scraped = Scrape(graphrag_kv::metrics::render(&registry));
    assert_eq!(
        scraped.value(
            "redis_retries_total",
            &[("namespace", "full_docs"), ("operation", "get_by_id")]
        ),
        1.0
    );
    assert_eq!(
        scraped.get(
            "redis_retries_total",
            &[("namespace", "full_docs"), ("operation", "upsert")]
        ),
        None,
        "a series per namespace and operation that retried, no other"
    );
    // The pool gone, what it counted stays counted.
    drop(docs);
    drop(storage);
    assert_eq!(retries(&registry), 1.0);
}

#[test]
fn evictions_and_server_memory_come_from_info() {
    // A small server that evicts keys with a TTL (the LLM cache's) when full.
    let server =
        RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "volatile-lru"]);
    let storage = redis_storage(&server);
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let addr = serve(&metrics, registry, Some(&storage));
    assert_eq!(scrape(addr).value("redis_evicted_keys_total", &[]), 0.0);

    let cache = Metered::new(storage.namespace("llm_response_cache").unwrap(), &metrics);
    // Letters from a xorshift: lz4 cannot shrink them much, so the server really fills up.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut text = |len: usize| -> String {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (b'a' + (x % 26) as u8) as char
            })
            .collect()
    };
    for batch in 0..40 {
        let items = (0..100)
            .map(|i| {
                (
                    format!("h{batch}-{i}"),
                    json!({"return": text(2_000), "model": "m"}),
                )
            })
            .collect();
        cache.upsert(items).unwrap();
    }
    let s = scrape(addr);
    let evicted = s.value("redis_evicted_keys_total", &[]);
    assert!(evicted > 0.0, "8 MB into 3 MB must evict:\n{}", s.0);
    assert_eq!(
        s.value("redis_server_maxmemory_bytes", &[]),
        3.0 * 1024.0 * 1024.0
    );
    assert!(s.value("redis_server_used_memory_bytes", &[]) > 1_000_000.0);
    // The counter only moves forward between scrapes.
    assert!(scrape(addr).value("redis_evicted_keys_total", &[]) >= evicted);
}

#[test]
fn json_backend_and_hooks_for_other_layers() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let addr = serve(&metrics, registry.clone(), Some(&storage));
    // Any store: here a JSON namespace behind an Arc<dyn KvStore>, itself shared.
    let chunks = Arc::new(Metered::new(
        storage.namespace("text_chunks").unwrap(),
        &metrics,
    ));
    chunks.upsert(vec![("c".into(), json!("v"))]).unwrap();
    chunks.index_done_callback().unwrap();
    metrics.set_write_behind_queue_depth("text_chunks", 17);
    let s = scrape(addr);
    let ns = [("namespace", "text_chunks")];
    assert_eq!(
        s.value(
            "redis_operations_total",
            &[
                ("namespace", "text_chunks"),
                ("operation", "index_done_callback")
            ]
        ),
        1.0
    );
    assert_eq!(s.value("redis_write_behind_queue_depth", &ns), 17.0);
    // No Redis: no retries to read.
    assert_eq!(s.get("redis_retries_total", &[]).unwrap_or(0.0), 0.0);
    // No Redis: no pool and no server figures move.
    assert_eq!(
        s.value("redis_connection_pool_size", &[("status", "idle")]),
        0.0
    );
    assert_eq!(s.value("redis_server_used_memory_bytes", &[]), 0.0);
    // Registering twice in one registry is refused, not silently duplicated.
    assert!(Metrics::new(&registry).is_err());
}

/// The example binary, built once per test run.
fn example_bin() -> PathBuf {
    support::example_bin("metrics_server", &[])
}

/// Kills the example when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_example_serves_metrics_that_move() {
    let server = RedisServer::start();
    let prefix = unique_prefix("example");
    let mut cmd = Command::new(example_bin());
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let mut child = KillOnDrop(
        cmd.env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_URL", server.url())
            .env("REDIS_KEY_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .args([
                "--addr",
                "127.0.0.1:0",
                "--demo-interval-ms",
                "20",
                "--sample-interval-s",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the metrics_server example"),
    );
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr: SocketAddr = first
        .trim()
        .strip_prefix("serving http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
        .parse()
        .unwrap();

    // The demo indexer writes every 20 ms and the sampler counts keys every second: poll until
    // both show (a deadline, not a timing assertion).
    let upserts = [("namespace", "text_chunks"), ("operation", "upsert")];
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_scrape = scrape(addr);
    let start = first_scrape.value("redis_operations_total", &upserts);
    loop {
        let s = scrape(addr);
        let moved = s.value("redis_operations_total", &upserts) > start;
        let hits = s.value("redis_cache_hits_total", &[("namespace", "text_chunks")]);
        let misses = s.value("redis_cache_misses_total", &[("namespace", "text_chunks")]);
        let keys = s.value("redis_namespace_keys", &[("namespace", "text_chunks")]);
        if moved && hits > 0.0 && misses > 0.0 && keys > 0.0 {
            assert!(
                s.value("redis_connection_pool_size", &[("status", "idle")])
                    + s.value("redis_connection_pool_size", &[("status", "active")])
                    >= 1.0
            );
            assert!(s.value("redis_server_used_memory_bytes", &[]) > 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics did not move within 30 s:\n{}",
            s.0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The keys are the example's, under its prefix, in the server.
    let mut conn = server.conn();
    let n: usize = redis::cmd("EXISTS")
        .arg(format!("{prefix}:text_chunks:demo-chunk-0"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(n, 1);
    let (status, _) = http_get(addr, "/nothing");
    assert_eq!(status, 404);
}

/// A `Storage` built with metrics reports its write-behind queues' depth at scrape time: the
/// layer keeps its own count, the metrics read it from outside.
#[test]
fn write_behind_depth_of_a_metered_storage_is_read_at_scrape_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    config.write_behind = Some(
        graphrag_kv::WriteBehindConfig::builder()
            .max_delay(std::time::Duration::from_secs(60))
            .batch_items(100_000)
            .build()
            .unwrap(),
    );
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let storage = Storage::builder(&config).metrics(&metrics).open().unwrap();
    let docs = storage.namespace("full_docs").unwrap();
    let depth = |namespace: &str| {
        Scrape(graphrag_kv::metrics::render(&registry)).value(
            "redis_write_behind_queue_depth",
            &[("namespace", namespace)],
        )
    };
    for i in 0..3 {
        docs.upsert(vec![(format!("d{i}"), json!(i))]).unwrap();
    }
    assert_eq!(depth("full_docs"), 3.0);
    docs.flush().unwrap();
    assert_eq!(depth("full_docs"), 0.0);
    // Another namespace's queue, never flushed yet: its one write waits for max_delay (60 s).
    // (Not `docs` again: a flush request left in its channel may send the next write at once.)
    let chunks = storage.namespace("text_chunks").unwrap();
    chunks.upsert(vec![("c9".into(), json!(9))]).unwrap();
    assert_eq!(depth("text_chunks"), 1.0);
    assert_eq!(depth("full_docs"), 0.0);
    drop(docs);
    drop(chunks);
    storage.close().unwrap();
}
