//! Every `KvStore` operation on both backends, with values like an indexer's.
//!
//! ```text
//! cargo bench --bench kv                  # everything, about two minutes
//! cargo bench --bench kv -- get_by_ids    # one group
//! ```
//!
//! - `get_by_id`: one ~2 KB LLM cache entry (`{return, model}`), the read an indexer makes per
//!   prompt.
//! - `get_by_ids`: 100 random ~5 KB text chunks (`{tokens, content, chunk_order_index,
//!   full_doc_id}`) of 2,000 stored.
//! - `upsert`: 100 chunks per call (overwriting: the keyspace stays the same size).
//! - `filter_keys`: 1,000 `chunk-<md5>` ids, half of them stored.
//! - `all_keys`: a namespace of 100,000 keys.
//! - `typed`: the same 100 chunks read with `get_many_as::<TextChunk>` and written with
//!   `upsert_as` (straight between the stored JSON text and the struct), against the `Value`
//!   path plus a conversion per chunk.
//! - `codec`: encoding and decoding one chunk and one cache entry for Redis, with and without lz4
//!   (no server): the client's own cost per value; `decode_*/serde_json` is
//!   `serde_json::from_slice` of the same JSON, the reference for `decode_*/none`.
//!
//! Redis is a `redis-server` started for the run (the harness crate, `harness/`), default
//! configuration (lz4 on, pool of 50); `redis_nocompress` repeats the value-heavy groups with
//! `REDIS_COMPRESSION=none`. JSON is nano-graphrag's file backend, which serves from memory and
//! writes at `index_done_callback`. The text is English prose from `corpus/`; the lz4 ratio of
//! the values is printed before the benches run. Throughput is in elements (ids or items) per
//! second.
//!
//! Against `redis-benchmark` in the same run, and for the memory, concurrency and connection
//! figures, use the load tool: `cargo run --release --example loadtest`.

#[path = "data.rs"]
mod data;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use graphrag_kv::codec::Codec;
use graphrag_kv::{
    BackendKind, Compression, Item, KvStore, KvStoreExt, Storage, StoreConfig, TextChunk,
    LLM_RESPONSE_CACHE, TEXT_CHUNKS,
};
use graphrag_kv_harness::RedisServer;

use data::Corpus;

/// Chunks and cache entries stored in each backend.
const STORED: usize = 2_000;
/// Keys of the `all_keys` namespace.
const ALL_KEYS: usize = 100_000;

/// Deterministic indexes.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// One backend under test: its name and the namespaces the benches use, loaded.
struct Backend {
    name: &'static str,
    chunks: Arc<dyn KvStore>,
    cache: Arc<dyn KvStore>,
    /// `None` for the variants that only repeat the value-heavy groups.
    many: Option<Arc<dyn KvStore>>,
}

fn load(store: &dyn KvStore, items: &[Item]) {
    for batch in items.chunks(1_000) {
        store.upsert(batch.to_vec()).expect("loading");
    }
}

fn backend(
    name: &'static str,
    storage: &Storage,
    chunks: &[Item],
    cache: &[Item],
    with_many: bool,
) -> Backend {
    let chunk_ns = storage.namespace(TEXT_CHUNKS).expect("namespace");
    let cache_ns = storage.namespace(LLM_RESPONSE_CACHE).expect("namespace");
    load(&*chunk_ns, chunks);
    load(&*cache_ns, cache);
    let many = with_many.then(|| {
        let ns = storage.namespace("all_keys_100k").expect("namespace");
        for start in (0..ALL_KEYS).step_by(10_000) {
            ns.upsert((start..start + 10_000).map(data::small_item).collect())
                .expect("loading 100,000 keys");
        }
        ns
    });
    Backend {
        name,
        chunks: chunk_ns,
        cache: cache_ns,
        many,
    }
}

fn redis_storage(server: &RedisServer, compression: Compression, prefix: &str) -> Storage {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
        .compression(compression)
        .build()
        .expect("redis configuration");
    Storage::open(&config).expect("opening redis")
}

fn bench(c: &mut Criterion) {
    let corpus = Corpus::load();
    let chunks = corpus.chunks(STORED);
    let cache = corpus.cache_entries(STORED);
    eprintln!(
        "values: text chunks {} B of JSON (lz4 ratio {:.2}), cache entries {} B (lz4 ratio {:.2})",
        data::raw_json_bytes(&chunks) / chunks.len(),
        data::lz4_ratio(&chunks),
        data::raw_json_bytes(&cache) / cache.len(),
        data::lz4_ratio(&cache),
    );
    let chunk_ids: Vec<String> = chunks.iter().map(|(id, _)| id.clone()).collect();
    let cache_ids: Vec<String> = cache.iter().map(|(id, _)| id.clone()).collect();

    let dir = tempfile::tempdir().expect("temporary directory");
    let json = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .expect("json configuration"),
    )
    .expect("opening the JSON directory");
    let server = RedisServer::start();
    let redis = redis_storage(&server, Compression::Lz4, "bench");
    let plain = redis_storage(&server, Compression::None, "bench_plain");
    let backends = [
        backend("json", &json, &chunks, &cache, true),
        backend("redis", &redis, &chunks, &cache, true),
        backend("redis_nocompress", &plain, &chunks, &cache, false),
    ];

    let mut rng = Rng(0x5EED);
    let id_batches: Vec<Vec<String>> = (0..64)
        .map(|_| {
            (0..100)
                .map(|_| chunk_ids[rng.below(chunk_ids.len())].clone())
                .collect()
        })
        .collect();
    let absent = data::absent_ids(STORED);
    let filter_batches: Vec<Vec<String>> = (0..16)
        .map(|_| {
            (0..1_000)
                .map(|j| {
                    if j % 2 == 0 {
                        chunk_ids[rng.below(chunk_ids.len())].clone()
                    } else {
                        absent[rng.below(absent.len())].clone()
                    }
                })
                .collect()
        })
        .collect();

    {
        let mut g = c.benchmark_group("get_by_id");
        g.throughput(Throughput::Elements(1));
        for b in &backends {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(b.name, "cache_entry_2KB"), |bench| {
                bench.iter(|| {
                    i += 1;
                    let v = b.cache.get_by_id(&cache_ids[i % cache_ids.len()]);
                    black_box(v.expect("get_by_id").expect("stored"))
                })
            });
        }
    }
    {
        let mut g = c.benchmark_group("get_by_ids");
        g.throughput(Throughput::Elements(100));
        for b in &backends {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(b.name, "100_chunks_5KB"), |bench| {
                bench.iter(|| {
                    i += 1;
                    let ids = &id_batches[i % id_batches.len()];
                    black_box(b.chunks.get_by_ids(ids, None).expect("get_by_ids"))
                })
            });
        }
    }
    {
        let mut g = c.benchmark_group("upsert");
        g.throughput(Throughput::Elements(100));
        for b in &backends {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(b.name, "100_chunks_5KB"), |bench| {
                bench.iter_batched(
                    || {
                        i = (i + 1) % (chunks.len() / 100);
                        chunks[i * 100..i * 100 + 100].to_vec()
                    },
                    |batch| b.chunks.upsert(batch).expect("upsert"),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    {
        let mut g = c.benchmark_group("filter_keys");
        g.throughput(Throughput::Elements(1_000));
        for b in backends.iter().filter(|b| b.many.is_some()) {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(b.name, "1000_ids_half_present"), |bench| {
                bench.iter(|| {
                    i += 1;
                    let ids = &filter_batches[i % filter_batches.len()];
                    black_box(b.chunks.filter_keys(ids).expect("filter_keys"))
                })
            });
        }
    }
    {
        let mut g = c.benchmark_group("all_keys");
        g.throughput(Throughput::Elements(ALL_KEYS as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(4));
        for b in &backends {
            let Some(many) = &b.many else { continue };
            g.bench_function(BenchmarkId::new(b.name, "100k_keys"), |bench| {
                bench.iter(|| {
                    let keys = many.all_keys().expect("all_keys");
                    assert_eq!(keys.len(), ALL_KEYS);
                    black_box(keys)
                })
            });
        }
    }
    {
        // The typed path (KvStoreExt) against the Value path, for the same batch of 100
        // TextChunks: `value` reads Values and converts each into a TextChunk (what get_many_as
        // did before), `typed` decodes the stored text straight into TextChunk; on writes,
        // `value` builds a Value per chunk and upserts it, `typed` serializes the chunk to text.
        let mut g = c.benchmark_group("typed");
        g.throughput(Throughput::Elements(100));
        let typed_chunks: Vec<(String, TextChunk)> = chunks
            .iter()
            .map(|(id, v)| {
                let chunk: TextChunk = serde_json::from_value(v.clone()).expect("a TextChunk");
                (id.clone(), chunk)
            })
            .collect();
        for b in &backends {
            let mut i = 0;
            g.bench_function(BenchmarkId::new(b.name, "get_100_chunks/value"), |bench| {
                bench.iter(|| {
                    i += 1;
                    let ids = &id_batches[i % id_batches.len()];
                    let values = b.chunks.get_by_ids(ids, None).expect("get_by_ids");
                    let chunks: Vec<Option<TextChunk>> = values
                        .into_iter()
                        .map(|v| v.map(|v| serde_json::from_value(v).expect("a TextChunk")))
                        .collect();
                    black_box(chunks)
                })
            });
            g.bench_function(BenchmarkId::new(b.name, "get_100_chunks/typed"), |bench| {
                bench.iter(|| {
                    i += 1;
                    let ids = &id_batches[i % id_batches.len()];
                    black_box(b.chunks.get_many_as::<TextChunk>(ids).expect("get_many_as"))
                })
            });
            g.bench_function(
                BenchmarkId::new(b.name, "upsert_100_chunks/value"),
                |bench| {
                    bench.iter_batched(
                        || {
                            i = (i + 1) % (typed_chunks.len() / 100);
                            typed_chunks[i * 100..i * 100 + 100].to_vec()
                        },
                        |batch| {
                            let items: Vec<Item> = batch
                                .into_iter()
                                .map(|(id, c)| (id, serde_json::to_value(c).expect("a Value")))
                                .collect();
                            b.chunks.upsert(items).expect("upsert")
                        },
                        BatchSize::SmallInput,
                    )
                },
            );
            g.bench_function(
                BenchmarkId::new(b.name, "upsert_100_chunks/typed"),
                |bench| {
                    bench.iter_batched(
                        || {
                            i = (i + 1) % (typed_chunks.len() / 100);
                            typed_chunks[i * 100..i * 100 + 100].to_vec()
                        },
                        |batch| b.chunks.upsert_as(batch).expect("upsert_as"),
                        BatchSize::SmallInput,
                    )
                },
            );
        }
    }
    {
        // The client's own cost per value, without a server: where get_by_ids and upsert spend
        // their time beyond the network.
        let mut g = c.benchmark_group("codec");
        g.throughput(Throughput::Elements(1));
        for (what, value) in [
            ("chunk_5KB", &chunks[0].1),
            ("cache_entry_2KB", &cache[0].1),
        ] {
            for (name, compression) in [("lz4", Compression::Lz4), ("none", Compression::None)] {
                let codec = Codec::new(compression, 1024);
                let bytes = codec.encode(value).expect("encode");
                g.bench_function(BenchmarkId::new(format!("encode_{what}"), name), |bench| {
                    let mut out = Vec::new();
                    bench.iter(|| {
                        out.clear();
                        black_box(codec.encode_into(value, &mut out).expect("encode"))
                    })
                });
                g.bench_function(BenchmarkId::new(format!("decode_{what}"), name), |bench| {
                    bench.iter(|| black_box(Codec::decode(&bytes).expect("decode")))
                });
            }
            if what == "chunk_5KB" {
                // The typed read of the same text: serde_json straight into TextChunk, against
                // the Value reader followed by a conversion (moving the strings).
                let json = serde_json::to_vec(value).expect("a Value serializes");
                g.bench_function(BenchmarkId::new("decode_chunk_5KB", "typed"), |bench| {
                    bench.iter(|| {
                        black_box(serde_json::from_slice::<TextChunk>(&json).expect("a chunk"))
                    })
                });
                g.bench_function(
                    BenchmarkId::new("decode_chunk_5KB", "value_then_typed"),
                    |bench| {
                        bench.iter(|| {
                            let v = Codec::decode(&json).expect("decode");
                            black_box(serde_json::from_value::<TextChunk>(v).expect("a chunk"))
                        })
                    },
                );
                let chunk: TextChunk = serde_json::from_value((*value).clone()).expect("a chunk");
                g.bench_function(BenchmarkId::new("encode_chunk_5KB", "typed"), |bench| {
                    bench.iter(|| {
                        black_box(serde_json::value::to_raw_value(&chunk).expect("serializes"))
                    })
                });
                let codec = Codec::new(Compression::None, 1024);
                g.bench_function(
                    BenchmarkId::new("encode_chunk_5KB", "value_then_json"),
                    |bench| {
                        let mut out = Vec::new();
                        bench.iter(|| {
                            out.clear();
                            let v = serde_json::to_value(&chunk).expect("a Value");
                            black_box(codec.encode_into(&v, &mut out).expect("encode"))
                        })
                    },
                );
            }
            // The reference for decode_*/none: serde_json's own parse of the same JSON text.
            let json = serde_json::to_vec(value).expect("a Value serializes");
            g.bench_function(
                BenchmarkId::new(format!("decode_{what}"), "serde_json"),
                |bench| {
                    bench.iter(|| {
                        black_box(serde_json::from_slice::<serde_json::Value>(&json).expect("JSON"))
                    })
                },
            );
        }
    }
    drop(backends);
    drop(server);
}

criterion_group! {
    name = benches;
    // Short runs: the whole file takes about two minutes. Raise them for a figure to publish.
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
