//! The operations the measures time: store set-up, loading, and the timed loops.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{BackendKind, Compression, Item, KvStore, RedisStore, Storage, StoreConfig};

use crate::fail;
use crate::reference::Target;

/// `--iterations`, 0 when unset.
pub static ITERATIONS: AtomicUsize = AtomicUsize::new(0);

/// Deterministic pseudo-random indexes.
pub struct Rng(pub u64);
impl Rng {
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

pub fn open_store(t: &Target, prefix: &str, compression: Compression, pool: u32) -> Storage {
    open_store_at(
        t,
        prefix,
        compression,
        graphrag_kv::codec::DEFAULT_ZSTD_LEVEL,
        pool,
    )
}

/// [`open_store`] with a zstd level.
pub fn open_store_at(
    t: &Target,
    prefix: &str,
    compression: Compression,
    level: i32,
    pool: u32,
) -> Storage {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(t.url.as_str())
        .key_prefix(prefix)
        .compression(compression)
        .compression_level(level)
        .max_connections(pool)
        .pool_timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| fail(&format!("configuration: {e}")));
    Storage::open(&config).unwrap_or_else(|e| fail(&format!("opening the store: {e}")))
}

pub fn redis_store(s: &Storage, ns: &str) -> RedisStore {
    s.redis()
        .expect("a Redis storage")
        .namespace(ns)
        .unwrap_or_else(|e| fail(&e.to_string()))
}

pub fn used_memory(c: &mut redis::Connection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(c)
        .expect("INFO memory");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO")
}

/// Loads `items` in batches of 1,000 and returns the server's `used_memory` growth.
pub fn load(store: &dyn KvStore, items: &[Item], c: &mut redis::Connection) -> f64 {
    let before = used_memory(c);
    for chunk in items.chunks(1_000) {
        store
            .upsert(chunk.to_vec())
            .unwrap_or_else(|e| fail(&format!("loading: {e}")));
    }
    used_memory(c) - before
}

/// Sets `count` reference keys `{name}:%012d` (redis-benchmark's `__rand_int__` form) to values of
/// `size` bytes.
pub fn load_reference(c: &mut redis::Connection, name: &str, count: usize, size: usize) {
    let value = vec![b'x'; size];
    for start in (0..count).step_by(1_000) {
        let mut p = redis::pipe();
        for i in start..(start + 1_000).min(count) {
            p.cmd("SET")
                .arg(format!("{name}:{i:012}"))
                .arg(value.as_slice())
                .ignore();
        }
        p.query::<()>(c).expect("loading reference keys");
    }
}

/// Single gets on one thread for `seconds`: sorted latencies in nanoseconds.
pub fn single_gets(store: &dyn KvStore, ids: &[String], seconds: f64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed | 1);
    let mut lat = Vec::with_capacity(100_000);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let id = &ids[rng.below(ids.len())];
        let t0 = Instant::now();
        let v = store.get_by_id(id);
        lat.push(t0.elapsed().as_nanos() as u64);
        match v {
            Ok(Some(v)) => drop(std::hint::black_box(v)),
            Ok(None) => fail(&format!("get_by_id({id}) found nothing")),
            Err(e) => fail(&format!("get_by_id: {e}")),
        }
    }
    lat.sort_unstable();
    lat
}

/// Calls `op` on batches for `seconds`; returns items per second of time spent inside `op`.
pub fn batches<B>(
    seconds: f64,
    per_batch: usize,
    mut make: impl FnMut(usize) -> B,
    mut op: impl FnMut(B),
) -> f64 {
    let mut inside = Duration::ZERO;
    let mut items = 0usize;
    let mut i = 0;
    let calls = ITERATIONS.load(Ordering::Relaxed);
    while if calls > 0 {
        i < calls
    } else {
        inside.as_secs_f64() < seconds
    } {
        let b = make(i);
        let t0 = Instant::now();
        op(b);
        inside += t0.elapsed();
        items += per_batch;
        i += 1;
    }
    items as f64 / inside.as_secs_f64()
}

/// `threads` threads doing single gets for `seconds`: operations per second.
pub fn concurrent_gets(
    store: &RedisStore,
    ids: &Arc<Vec<String>>,
    threads: usize,
    seconds: f64,
) -> f64 {
    let barrier = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (store, ids, barrier, stop) =
                (store.clone(), ids.clone(), barrier.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9 ^ ((t as u64 + 1) * 0x1000_0001));
                barrier.wait();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match store.get_by_id(&ids[rng.below(ids.len())]) {
                        Ok(Some(v)) => drop(std::hint::black_box(v)),
                        Ok(None) => fail("a concurrent get found nothing"),
                        Err(e) => fail(&format!("concurrent get: {e}")),
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().expect("reader")).sum();
    total as f64 / t0.elapsed().as_secs_f64()
}

/// `threads` threads each upserting single cache entries through one WriteBehind for
/// `seconds`, then `flush`: items per second until the flush returned.
pub fn write_behind(
    store: RedisStore,
    entries: &Arc<Vec<Item>>,
    threads: usize,
    seconds: f64,
) -> f64 {
    let wb = Arc::new(WriteBehind::new(store, WriteBehindConfig::default()));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (wb, entries, barrier, stop) =
                (wb.clone(), entries.clone(), barrier.clone(), stop.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let item = entries[(t * 7_919 + n) % entries.len()].clone();
                    wb.upsert(vec![item])
                        .unwrap_or_else(|e| fail(&format!("write-behind upsert: {e}")));
                    n += 1;
                }
                n
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let total: usize = handles.into_iter().map(|h| h.join().expect("writer")).sum();
    wb.flush()
        .unwrap_or_else(|e| fail(&format!("write-behind flush: {e}")));
    total as f64 / t0.elapsed().as_secs_f64()
}
