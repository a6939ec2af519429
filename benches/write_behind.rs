//! Write-behind against direct writes: 8 threads each upserting one ~2 KB LLM-cache entry per
//! call into a real redis-server (lz4 on, as by default).
//!
//! - `upsert_single_8_threads/direct`: each call is a round trip.
//! - `upsert_single_8_threads/write_behind`: each call is queued; the measured time ends when
//!   `flush` returns, so every write counted has been acknowledged by Redis.
//! - `.../direct_plain`, `.../write_behind_plain`: the same without compression, as
//!   redis-benchmark sends its values.
//! - `write_behind_batch_items/N` and `write_behind_delay_ms/N`: the sweeps behind the defaults.
//!
//! Before the benches, `redis-benchmark -c 8 -P 64 -t set -d 2048` runs against the same server
//! (when installed) and its figure is printed, so the ratio is taken in the same run.
//!
//! ```text
//! cargo bench --bench write_behind
//! ```

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{BackendKind, Compression, KvStore, RedisShared, StoreConfig};
use graphrag_kv_harness::{RedisServer, Rng};
use serde_json::{json, Value};

const THREADS: usize = 8;
/// Writes per thread per iteration.
const PER_THREAD: usize = 1_000;

/// English-like text of about `len` bytes (lz4 shrinks it as it shrinks real answers).
fn prose(rng: &mut Rng, len: usize) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "community",
        "report",
        "entity",
        "relation",
        "graph",
        "of",
        "a",
        "summary",
        "language",
        "model",
        "answers",
        "question",
        "document",
        "chunk",
        "index",
        "and",
        "in",
        "describes",
        "between",
        "organization",
        "person",
        "event",
        "source",
    ];
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(WORDS[rng.below(WORDS.len())]);
        s.push(if rng.below(12) == 0 { '.' } else { ' ' });
    }
    s
}

/// ~2 KB LLM-cache entries, one per (thread, i).
fn values() -> Vec<Vec<(String, Value)>> {
    let mut rng = Rng::new(7);
    (0..THREADS)
        .map(|t| {
            (0..PER_THREAD)
                .map(|i| {
                    let v = json!({"return": prose(&mut rng, 1950), "model": "gpt-4o-mini"});
                    (format!("cache-{t}-{i}"), v)
                })
                .collect()
        })
        .collect()
}

/// 8 threads write their items one call each; returns the time until `done` returns.
fn run(store: &dyn KvStore, items: &[Vec<(String, Value)>], done: impl Fn()) -> Duration {
    let barrier = Barrier::new(THREADS + 1);
    let start = std::thread::scope(|scope| {
        for part in items {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                for (id, v) in part {
                    store.upsert(vec![(id.clone(), v.clone())]).unwrap();
                }
            });
        }
        barrier.wait();
        Instant::now()
    });
    done();
    start.elapsed()
}

fn redis_benchmark(port: u16) {
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "8",
            "-P",
            "64",
            "-t",
            "set",
            "-d",
            "2048",
        ])
        .args(["-n", "200000", "-q"])
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            // -q prints progress lines ending in \r, then the final "SET: N requests per second".
            let last = text
                .split(['\r', '\n'])
                .rfind(|l| l.contains("requests per second"))
                .unwrap_or("no figure");
            eprintln!(
                "redis-benchmark -c 8 -P 64 -t set -d 2048 -n 200000: {}",
                last.trim()
            );
        }
        Err(e) => eprintln!("redis-benchmark not run ({e}); install redis-tools for the reference"),
    }
}

fn bench(c: &mut Criterion) {
    let server = RedisServer::start();
    redis_benchmark(server.port());
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix("bench")
        .build()
        .unwrap();
    let shared: Arc<RedisShared> = RedisShared::connect(&config.redis).unwrap();
    let items = values();
    let n = (THREADS * PER_THREAD) as u64;

    let mut g = c.benchmark_group("upsert_single_8_threads");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    let direct = shared.namespace("direct").unwrap();
    g.bench_function("direct", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run(&direct, &items, || ())).sum())
    });
    let wb = WriteBehind::new(
        shared.namespace("wb").unwrap(),
        WriteBehindConfig::default(),
    );
    g.bench_function("write_behind", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| run(&wb, &items, || wb.flush().unwrap()))
                .sum()
        })
    });
    // Uncompressed, as redis-benchmark sends its values: the like-for-like comparison.
    let plain = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix("plain")
        .compression(Compression::None)
        .build()
        .unwrap();
    let plain = RedisShared::connect(&plain.redis).unwrap();
    let direct_plain = plain.namespace("direct").unwrap();
    g.bench_function("direct_plain", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run(&direct_plain, &items, || ())).sum())
    });
    let wb_plain = WriteBehind::new(plain.namespace("wb").unwrap(), WriteBehindConfig::default());
    g.bench_function("write_behind_plain", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| run(&wb_plain, &items, || wb_plain.flush().unwrap()))
                .sum()
        })
    });
    drop(wb_plain);
    g.finish();
    eprintln!("write_behind figures: {:?}", wb.stats_snapshot());
    drop(wb);

    let mut g = c.benchmark_group("write_behind_batch_items");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    for batch in [32, 64, 256, 1024] {
        let config = WriteBehindConfig::builder()
            .batch_items(batch)
            .build()
            .unwrap();
        let wb = WriteBehind::new(shared.namespace("sweep").unwrap(), config);
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, _| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| run(&wb, &items, || wb.flush().unwrap()))
                    .sum()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("write_behind_delay_ms");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    for ms in [0, 5, 50] {
        let config = WriteBehindConfig::builder()
            .max_delay(Duration::from_millis(ms))
            .build()
            .unwrap();
        let wb = WriteBehind::new(shared.namespace("sweep").unwrap(), config);
        g.bench_with_input(BenchmarkId::from_parameter(ms), &ms, |b, _| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| run(&wb, &items, || wb.flush().unwrap()))
                    .sum()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
