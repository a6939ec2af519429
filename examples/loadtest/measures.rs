//! The measures: every operation of the store against redis-benchmark, side by side.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use graphrag_kv::{Compression, KvStore, KvStoreExt, RedisStore, LLM_RESPONSE_CACHE, TEXT_CHUNKS};

use crate::alloc::{ALLOC_BYTES, ALLOC_CALLS, COUNTING};
use crate::args::Args;
use crate::data::{self, Corpus};
use crate::ops::{
    batches, concurrent_gets, load, load_reference, open_store, open_store_at, redis_store,
    single_gets, write_behind, Rng,
};
use crate::reference::{RefRun, Target};
use crate::report::{median, percentile, row, versus, Better, Row};
use crate::{fail, progress};

/// The database index `all_keys_100k` runs in, apart from the other measures' keys.
const ALL_KEYS_DB: u32 = 9;

/// `url` pointing at database `db` (any database it named replaced), and `db`.
fn url_with_db(url: &str, db: u32) -> (String, u32) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    (format!("{scheme}://{authority}/{db}"), db)
}

/// Everything one storage (compressed or not) needs for the measures.
pub struct Side {
    pub chunks: RedisStore,
    pub cache: RedisStore,
}

/// Loads the values, then runs every measure `--only` selects (ours, then redis-benchmark,
/// `--rounds` times), and removes what it wrote: the rows of the table, in order.
pub fn measure_all(args: &Args, t: &Target) -> Vec<Row> {
    let prefix = format!("loadtest-{}", std::process::id());
    let corpus = match &args.corpus {
        Some(dir) if !dir.is_dir() => fail(&format!("--corpus {}: not a directory", dir.display())),
        Some(dir) => Corpus::load_dir(dir),
        None => Corpus::load(),
    };
    let chunks = data::Corpus::chunks(&corpus, args.items);
    let cache = corpus.cache_entries(args.items);
    let chunk_bytes = data::raw_json_bytes(&chunks);
    let cache_bytes = data::raw_json_bytes(&cache);
    let chunk_size = chunk_bytes / chunks.len();
    let cache_size = cache_bytes / cache.len();
    let chunk_ids: Arc<Vec<String>> = Arc::new(chunks.iter().map(|(id, _)| id.clone()).collect());
    let cache_ids: Arc<Vec<String>> = Arc::new(cache.iter().map(|(id, _)| id.clone()).collect());
    let absent = data::absent_ids(args.items);
    let mut c = t.conn();
    let mut rows = Vec::new();
    // Exact names, so `get` does not select `get_by_ids`.
    let want = |m: &str| args.only.is_empty() || args.only.iter().any(|o| o == m);
    rows.push(row("value_bytes_chunk", "B", chunk_size as f64, None, None));
    rows.push(row("value_bytes_cache", "B", cache_size as f64, None, None));
    rows.push(row(
        "lz4_ratio_chunk",
        "x",
        data::lz4_ratio(&chunks),
        None,
        None,
    ));
    rows.push(row(
        "lz4_ratio_cache",
        "x",
        data::lz4_ratio(&cache),
        None,
        None,
    ));
    rows.push(row(
        "zstd_ratio_chunk",
        "x",
        zstd_ratio(&chunks, args.zstd_level),
        None,
        None,
    ));
    rows.push(row(
        "zstd_ratio_cache",
        "x",
        zstd_ratio(&cache, args.zstd_level),
        None,
        None,
    ));

    // --- load, memory
    progress(
        args,
        &format!(
            "loading {} chunks and {} cache entries (lz4)",
            chunks.len(),
            cache.len()
        ),
    );
    let lz4 = open_store(
        t,
        &format!("{prefix}-lz4"),
        Compression::Lz4,
        args.pool_size,
    );
    let pool_size = lz4.redis().expect("redis").config().max_connections;
    let sides_lz4 = Side {
        chunks: redis_store(&lz4, TEXT_CHUNKS),
        cache: redis_store(&lz4, LLM_RESPONSE_CACHE),
    };
    let grown = load(&sides_lz4.chunks, &chunks, &mut c) + load(&sides_lz4.cache, &cache, &mut c);
    rows.push(row(
        "memory_ratio",
        "x",
        grown / (chunk_bytes + cache_bytes) as f64,
        None,
        Some((Better::Lower, 0.7)),
    ));
    let plain = open_store(
        t,
        &format!("{prefix}-plain"),
        Compression::None,
        args.pool_size,
    );
    let sides_plain = Side {
        chunks: redis_store(&plain, TEXT_CHUNKS),
        cache: redis_store(&plain, LLM_RESPONSE_CACHE),
    };
    if !args.no_nocompress && !args.only_zstd {
        progress(args, "loading the same values uncompressed");
        let grown =
            load(&sides_plain.chunks, &chunks, &mut c) + load(&sides_plain.cache, &cache, &mut c);
        rows.push(row(
            "memory_ratio_nocompress",
            "x",
            grown / (chunk_bytes + cache_bytes) as f64,
            None,
            None,
        ));
    }
    let zstd = open_store_at(
        t,
        &format!("{prefix}-zstd"),
        Compression::Zstd,
        args.zstd_level,
        args.pool_size,
    );
    let sides_zstd = Side {
        chunks: redis_store(&zstd, TEXT_CHUNKS),
        cache: redis_store(&zstd, LLM_RESPONSE_CACHE),
    };
    if !args.no_zstd {
        progress(
            args,
            &format!(
                "loading the same values with zstd level {}",
                args.zstd_level
            ),
        );
        let grown =
            load(&sides_zstd.chunks, &chunks, &mut c) + load(&sides_zstd.cache, &cache, &mut c);
        rows.push(row(
            "memory_ratio_zstd",
            "x",
            grown / (chunk_bytes + cache_bytes) as f64,
            None,
            Some((Better::Lower, 0.6)),
        ));
    }
    progress(args, "loading reference keys for redis-benchmark");
    let ref2k = format!("{prefix}:ref2k");
    let ref5k = format!("{prefix}:ref5k");
    load_reference(&mut c, &ref2k, args.items, cache_size);
    load_reference(&mut c, &ref5k, args.items, chunk_size);
    let rand = |name: &str| format!("{name}:__rand_int__");
    let r = args.items.to_string();
    let secs = args.seconds;
    let rounds = args.rounds.max(1);
    // The stores a measure with a `_nocompress` variant runs on, with the suffix of its name.
    let sides: Vec<(&Side, &str)> = [
        (&sides_lz4, ""),
        (&sides_plain, "_nocompress"),
        (&sides_zstd, "_zstd"),
    ]
    .into_iter()
    .filter(|(_, suffix)| match *suffix {
        "" => !args.only_nocompress && !args.only_zstd,
        "_nocompress" => !args.no_nocompress && !args.only_zstd,
        _ => !args.no_zstd && !args.only_nocompress,
    })
    .collect();
    // Concurrent gets and write-behind measure the pool and the queue more than the codec:
    // lz4 and none only, which keeps the run as long as it was.
    let pool_sides: Vec<(&Side, &str)> = sides
        .iter()
        .copied()
        .filter(|(_, suffix)| *suffix != "_zstd")
        .collect();

    // Sanity: what the measures read is there.
    let got = sides_lz4
        .chunks
        .get_by_ids(&chunk_ids[..100], None)
        .unwrap_or_else(|e| fail(&e.to_string()));
    assert!(
        got.iter().all(Option::is_some),
        "loaded chunks are readable"
    );

    // --- single get latency (cache entries)
    let mut ref_get = RefRun {
        clients: 1,
        pipeline: 1,
        rest: vec!["-r".into(), r.clone(), "GET".into(), rand(&ref2k)],
        rate_guess: 20_000.0,
    };
    for &(side, suffix) in &sides {
        if !want("get") {
            continue;
        }
        progress(args, &format!("single get latency{suffix}"));
        let (mut p50, mut p99, mut r50, mut r99) = (vec![], vec![], vec![], vec![]);
        for round in 0..rounds {
            let lat = single_gets(&side.cache, &cache_ids, secs, round as u64 + 7);
            p50.push(percentile(&lat, 0.50) / 1000.0);
            p99.push(percentile(&lat, 0.99) / 1000.0);
            let b = ref_get.run(t, secs);
            r50.push(b.p50_us);
            r99.push(b.p99_us);
        }
        rows.push(row(
            &format!("get_p50{suffix}"),
            "µs",
            median(p50),
            Some(median(r50)),
            Some((Better::Lower, 1.5)),
        ));
        rows.push(row(
            &format!("get_p99{suffix}"),
            "µs",
            median(p99),
            Some(median(r99)),
            Some((Better::Lower, 3.0)),
        ));
    }

    // --- get_by_ids, 100 chunks per call
    let mut ref_mget = RefRun {
        clients: 1,
        pipeline: 100,
        rest: vec!["-r".into(), r.clone(), "GET".into(), rand(&ref5k)],
        rate_guess: 100_000.0,
    };
    let id_batches: Vec<Vec<String>> = {
        let mut rng = Rng(42);
        (0..256)
            .map(|_| {
                (0..100)
                    .map(|_| chunk_ids[rng.below(chunk_ids.len())].clone())
                    .collect()
            })
            .collect()
    };
    for &(side, suffix) in &sides {
        if !want("get_by_ids") {
            continue;
        }
        progress(args, &format!("get_by_ids 100{suffix}"));
        rows.push(versus(
            &format!("get_by_ids_100{suffix}"),
            "items/s",
            0.8,
            rounds,
            || {
                batches(
                    secs,
                    100,
                    |i| &id_batches[i % id_batches.len()],
                    |b| {
                        let v = side
                            .chunks
                            .get_by_ids(b, None)
                            .unwrap_or_else(|e| fail(&e.to_string()));
                        drop(std::hint::black_box(v));
                    },
                )
            },
            || ref_mget.run(t, secs).rps,
        ));
    }

    // --- get_by_ids, 100 chunks per call, read as TextChunk (get_many_as)
    if want("get_by_ids") {
        progress(args, "get_by_ids 100, typed");
        let store = &sides_lz4.chunks;
        rows.push(versus(
            "get_by_ids_100_typed",
            "items/s",
            0.8,
            rounds,
            || {
                batches(
                    secs,
                    100,
                    |i| &id_batches[i % id_batches.len()],
                    |b| {
                        let v = store
                            .get_many_as::<graphrag_kv::TextChunk>(b)
                            .unwrap_or_else(|e| fail(&e.to_string()));
                        drop(std::hint::black_box(v));
                    },
                )
            },
            || ref_mget.run(t, secs).rps,
        ));
    }

    // --- allocation per get_by_ids item
    if want("get_by_ids") {
        let store = &sides_lz4.chunks;
        let _ = store.get_by_ids(&id_batches[0], None);
        ALLOC_BYTES.store(0, Ordering::Relaxed);
        ALLOC_CALLS.store(0, Ordering::Relaxed);
        COUNTING.store(true, Ordering::SeqCst);
        let calls = 50;
        for b in id_batches.iter().take(calls) {
            drop(std::hint::black_box(store.get_by_ids(b, None)));
        }
        COUNTING.store(false, Ordering::SeqCst);
        let items = (calls * 100) as f64;
        rows.push(row(
            "alloc_bytes_per_get_by_ids_item",
            "B",
            ALLOC_BYTES.load(Ordering::Relaxed) as f64 / items,
            None,
            None,
        ));
        rows.push(row(
            "allocs_per_get_by_ids_item",
            "",
            ALLOC_CALLS.load(Ordering::Relaxed) as f64 / items,
            None,
            None,
        ));
    }

    // --- upsert, 100 chunks per call
    let mut ref_set = RefRun {
        clients: 1,
        pipeline: 100,
        rest: vec![
            "-r".into(),
            r.clone(),
            "SET".into(),
            rand(&format!("{prefix}:refset5k")),
            "x".repeat(chunk_size),
        ],
        rate_guess: 90_000.0,
    };
    for &(side, suffix) in &sides {
        if !want("upsert") {
            continue;
        }
        progress(args, &format!("upsert 100{suffix}"));
        let n = chunks.len() / 100;
        rows.push(versus(
            &format!("upsert_100{suffix}"),
            "items/s",
            0.8,
            rounds,
            || {
                batches(
                    secs,
                    100,
                    |i| chunks[(i % n) * 100..(i % n) * 100 + 100].to_vec(),
                    |b| {
                        side.chunks
                            .upsert(b)
                            .unwrap_or_else(|e| fail(&e.to_string()));
                    },
                )
            },
            || ref_set.run(t, secs).rps,
        ));
    }

    // --- filter_keys, 1,000 ids, half present
    if want("filter_keys") {
        progress(args, "filter_keys 1000");
        let id_batches: Vec<Vec<String>> = {
            let mut rng = Rng(4242);
            (0..64)
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
                .collect()
        };
        let missing = sides_lz4
            .chunks
            .filter_keys(&id_batches[0])
            .unwrap_or_else(|e| fail(&e.to_string()));
        let want: std::collections::HashSet<_> = id_batches[0].iter().skip(1).step_by(2).collect();
        assert_eq!(
            missing.len(),
            want.len(),
            "filter_keys returns the absent half"
        );
        // Reference: half the keyspace exists.
        let mut ref_exists = RefRun {
            clients: 1,
            pipeline: 1_000,
            rest: vec![
                "-r".into(),
                (args.items * 2).to_string(),
                "EXISTS".into(),
                rand(&ref5k),
            ],
            rate_guess: 600_000.0,
        };
        rows.push(versus(
            "filter_keys_1000",
            "ids/s",
            0.8,
            rounds,
            || {
                batches(
                    secs,
                    1_000,
                    |i| &id_batches[i % id_batches.len()],
                    |b| {
                        drop(std::hint::black_box(
                            sides_lz4
                                .chunks
                                .filter_keys(b)
                                .unwrap_or_else(|e| fail(&e.to_string())),
                        ));
                    },
                )
            },
            || ref_exists.run(t, secs).rps,
        ));
    }

    // --- 64 threads of single gets through the pool
    let mut ref_conc = RefRun {
        clients: 64,
        pipeline: 1,
        rest: vec!["-r".into(), r.clone(), "GET".into(), rand(&ref2k)],
        rate_guess: 30_000.0,
    };
    for &(side, suffix) in &pool_sides {
        if !want("concurrent_get") {
            continue;
        }
        progress(
            args,
            &format!("64 concurrent readers, pool of {pool_size}{suffix}"),
        );
        rows.push(versus(
            &format!("concurrent_get_64{suffix}"),
            "ops/s",
            0.8,
            rounds,
            || concurrent_gets(&side.cache, &cache_ids, 64, secs),
            || ref_conc.run(t, secs).rps,
        ));
    }

    // --- write-behind, 8 threads of single upserts
    let mut ref_wb = RefRun {
        clients: 8,
        pipeline: 64,
        rest: vec![
            "-r".into(),
            r.clone(),
            "SET".into(),
            rand(&format!("{prefix}:refset2k")),
            "x".repeat(cache_size),
        ],
        rate_guess: 140_000.0,
    };
    let cache_arc = Arc::new(cache.clone());
    for &(side, suffix) in &pool_sides {
        if !want("write_behind") {
            continue;
        }
        progress(args, &format!("write-behind, 8 writers{suffix}"));
        rows.push(versus(
            &format!("write_behind_8{suffix}"),
            "items/s",
            0.5,
            rounds,
            || write_behind(side.cache.clone(), &cache_arc, 8, secs),
            || ref_wb.run(t, secs).rps,
        ));
    }

    // --- all_keys over 100,000 keys
    if want("all_keys") {
        progress(args, "all_keys over 100,000 keys");
        // In a database of its own (as the Python reference's 0.19 s was measured): SCAN
        // walks the whole database, so the other measures' keys would be paid for too.
        let (db_url, db) = url_with_db(&t.url, ALL_KEYS_DB);
        let mut db_conn = redis::Client::open(db_url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| fail(&format!("database {db}: {e}")));
        let held: u64 = redis::cmd("DBSIZE")
            .query(&mut db_conn)
            .unwrap_or_else(|e| fail(&format!("DBSIZE: {e}")));
        if held > 0 {
            fail(&format!(
                "database {db} holds {held} keys: all_keys_100k needs a database of its own"
            ));
        }
        let own = open_store(
            &Target::parse(&db_url),
            &format!("{prefix}-keys"),
            Compression::Lz4,
            args.pool_size,
        );
        let store = redis_store(&own, "all_keys_100k");
        for start in (0..100_000).step_by(1_000) {
            store
                .upsert((start..start + 1_000).map(data::small_item).collect())
                .unwrap_or_else(|e| fail(&e.to_string()));
        }
        let mut took = vec![];
        for _ in 0..rounds {
            let t0 = Instant::now();
            let keys = store.all_keys().unwrap_or_else(|e| fail(&e.to_string()));
            took.push(t0.elapsed().as_secs_f64());
            assert_eq!(keys.len(), 100_000, "all_keys lists every key once");
        }
        rows.push(row(
            "all_keys_100k",
            "s",
            median(took),
            None,
            // The Python reference's figure (../shared/REDIS_NOTES.md).
            Some((Better::Lower, 0.19)),
        ));
        let mut took = vec![];
        for _ in 0..rounds {
            let t0 = Instant::now();
            let mut n = 0usize;
            store
                .scan_keys(&mut |page| {
                    n += page.len();
                    Ok(())
                })
                .unwrap_or_else(|e| fail(&e.to_string()));
            took.push(t0.elapsed().as_secs_f64());
            assert!(n >= 100_000, "scan_keys lists every key");
        }
        rows.push(row("scan_keys_100k", "s", median(took), None, None));
        let _ = store.clear();
    }

    // --- clean up what we wrote (matters with --redis-url)
    for s in [&sides_lz4, &sides_plain, &sides_zstd] {
        let _ = s.chunks.clear();
        let _ = s.cache.clear();
    }
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query(&mut c)
            .unwrap_or((0, vec![]));
        if !keys.is_empty() {
            let _ = redis::cmd("UNLINK").arg(&keys).query::<()>(&mut c);
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    rows.push(row("pool_size", "", pool_size as f64, None, None));
    rows
}

/// zstd ratio of the values' JSON at `level` (raw bytes / compressed bytes, one zstd frame per
/// value as the codec writes it, without the codec's 8-byte header, as `lz4_ratio`).
fn zstd_ratio(items: &[graphrag_kv::Item], level: i32) -> f64 {
    let (raw, packed) = items.iter().fold((0usize, 0usize), |(r, p), (_, v)| {
        let json = serde_json::to_vec(v).expect("a Value serializes");
        let frame = zstd::bulk::compress(&json, level).expect("zstd compresses in memory");
        (r + json.len(), p + frame.len())
    });
    raw as f64 / packed as f64
}
