//! The load tool: every operation of the Redis backend measured side by side with
//! `redis-benchmark` against the same server, in the same run, with the same value size and
//! pipeline depth.
//!
//! ```sh
//! cargo run --release --example loadtest                 # own redis-server, table
//! cargo run --release --example loadtest -- --json       # one JSON object on stdout
//! cargo run --release --example loadtest -- --redis-url redis://127.0.0.1:6379
//! cargo run --release --example loadtest -- --connections 10000
//! ```
//!
//! With no `--redis-url` it starts its own `redis-server` (free port, temporary directory, killed
//! at the end). With `--redis-url` every key it writes is under a prefix of its own
//! (`loadtest-<pid>`), deleted at the end; `used_memory` figures are then only as good as the
//! server is quiet.
//!
//! Values come from `benches/data.rs`: ~5 KB text chunks of the English prose in `corpus/` and
//! ~2 KB LLM cache entries. Single gets, concurrent gets and write-behind use cache entries (an
//! indexer's single reads and writes are cache lookups and stores); batches use chunks. The
//! store runs with the default configuration (lz4 on, pool of 50); `_nocompress` rows repeat a
//! measure with `REDIS_COMPRESSION=none`.
//!
//! Each measure runs `--rounds` times (ours then the reference, alternately, ~`--seconds` each)
//! and the median of each side is reported. The reference's `-n` is sized from its previous run
//! to take about `--seconds`.
//!
//! `--connections N` holds N connections from this library (pools of ~100, one reader thread per
//! connection) to one redis-server, raises `maxclients` (CONFIG SET) and the process's open-file
//! limit (re-executing itself under `sh -c 'ulimit -n ...'`, since std cannot call setrlimit),
//! runs reads over all of them and reports errors and latencies.
//!
//! `--quick` is a smoke run of everything in seconds. For profiling, `--no-reference
//! --iterations N --only <measure>` runs a fixed amount of work (see docs/BENCHMARKS.md).

#[path = "../benches/data.rs"]
mod data;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{
    BackendKind, Compression, Item, KvStore, RedisStore, Storage, StoreConfig, LLM_RESPONSE_CACHE,
    TEXT_CHUNKS,
};
use serde_json::{json, Map, Value};

use data::Corpus;

// ---------------------------------------------------------------------------------------------
// Allocation counting: on only while the allocation figure is measured (one relaxed load per
// allocation otherwise, so the other measures are not slowed by a shared counter).

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);
static ALLOC_CALLS: AtomicU64 = AtomicU64::new(0);
/// `--iterations`, 0 when unset.
static ITERATIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            // A growth counts as the bytes added (a realloc that grows in place copies nothing).
            let grown = new_size.saturating_sub(layout.size()) as u64;
            ALLOC_BYTES.fetch_add(grown, Ordering::Relaxed);
            ALLOC_CALLS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Parser, Debug, Clone)]
#[command(about = "graphrag-kv load tool: the Redis backend against redis-benchmark")]
struct Args {
    /// Print one JSON object (measure -> {ours, reference, ratio}) instead of the table.
    #[arg(long)]
    json: bool,
    /// Use this server instead of starting one (keys go under a prefix of their own).
    #[arg(long)]
    redis_url: Option<String>,
    /// Runs of each measure (ours and reference alternately); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per run of a measure.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Text chunks and cache entries loaded (each).
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// A smoke run (one short round of everything, 500 items): checks the tool end to end in
    /// seconds; the figures mean little.
    #[arg(long)]
    quick: bool,
    /// Skip the `_nocompress` measures.
    #[arg(long)]
    no_nocompress: bool,
    /// Run only the `_nocompress` variants of the measures that have one.
    #[arg(long)]
    only_nocompress: bool,
    /// Instead of the measures: hold this many connections and read over all of them.
    #[arg(long)]
    connections: Option<usize>,
    /// Run only these measures (comma-separated prefixes: get, get_by_ids, upsert, filter_keys,
    /// concurrent_get, write_behind, all_keys); the load and memory figures always run.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(MEASURES))]
    only: Vec<String>,
    /// Skip redis-benchmark (for profiling the client alone).
    #[arg(long)]
    no_reference: bool,
    /// Run each batch measure for exactly this many calls instead of `--seconds` (for
    /// profiling, e.g. under valgrind's callgrind).
    #[arg(long)]
    iterations: Option<usize>,
    /// Pool size of the stores measured. Default 64: one connection per reader thread of
    /// `concurrent_get_64`, as docs/DEPLOYMENT.md advises (`REDIS_MAX_CONNECTIONS` at least the
    /// worker threads); the library's own default is 50. Only `concurrent_get_64` uses more
    /// than one connection at a time.
    #[arg(long, default_value_t = 64)]
    pool_size: u32,
    /// Take the text of the values from the files of this directory instead of `corpus/`
    /// (e.g. to see how `memory_ratio` depends on how well the text compresses).
    #[arg(long)]
    corpus: Option<std::path::PathBuf>,
    /// Pools in `--connections` mode (default: one per 100 connections).
    #[arg(long)]
    pools: Option<usize>,
    /// Reads per connection in `--connections` mode.
    #[arg(long, default_value_t = 20)]
    reads_per_connection: usize,
}

// ---------------------------------------------------------------------------------------------
// A redis-server of our own

struct OwnServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    fn start() -> OwnServer {
        let dir = tempfile::Builder::new()
            .prefix("graphrag-kv-loadtest-")
            .tempdir()
            .expect("creating a temporary directory");
        let mut last = String::new();
        for _ in 0..8 {
            let port = {
                let l = TcpListener::bind(("127.0.0.1", 0)).expect("binding 127.0.0.1:0");
                l.local_addr().expect("local address").port()
            };
            let log = dir.path().join("redis.log");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let mut child = match child {
                Ok(c) => c,
                Err(e) => fail(&format!(
                    "cannot run redis-server ({e}); install it (Debian: apt-get install \
                     redis-server redis-tools) or pass --redis-url"
                )),
            };
            let url = format!("redis://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "redis-server exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                let ok = redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok();
                if ok {
                    return OwnServer {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        fail(&format!("redis-server did not start: {last}"))
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names `--only` accepts.
const MEASURES: [&str; 7] = [
    "get",
    "get_by_ids",
    "upsert",
    "filter_keys",
    "concurrent_get",
    "write_behind",
    "all_keys",
];

fn fail(msg: &str) -> ! {
    eprintln!("loadtest: {msg}");
    std::process::exit(2)
}

/// Host, port and password of a `redis://[user:pass@]host:port[/db]` URL, for redis-benchmark.
#[derive(Clone, Debug)]
struct Target {
    url: String,
    host: String,
    port: u16,
    password: Option<String>,
    no_reference: bool,
}

impl Target {
    fn parse(url: &str) -> Target {
        let rest = url
            .strip_prefix("redis://")
            .unwrap_or_else(|| fail("--redis-url must be a redis:// URL"));
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let hostport = hostport.split('/').next().unwrap_or("");
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(6379)),
            None => (hostport.to_string(), 6379),
        };
        let password = auth
            .map(|a| a.rsplit_once(':').map_or(a, |(_, p)| p).to_string())
            .filter(|p| !p.is_empty());
        Target {
            url: url.to_string(),
            host: if host.is_empty() {
                "127.0.0.1".into()
            } else {
                host
            },
            port,
            password,
            no_reference: false,
        }
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| fail(&format!("cannot connect to {}: {e}", self.host)))
    }
}

// ---------------------------------------------------------------------------------------------
// redis-benchmark

/// One redis-benchmark run's figures.
#[derive(Clone, Copy, Debug)]
struct Bench {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs redis-benchmark and parses its `--csv` line. `n` requests.
fn redis_benchmark(t: &Target, clients: usize, pipeline: usize, n: u64, rest: &[String]) -> Bench {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", &t.host, "-p", &t.port.to_string()]);
    if let Some(p) = &t.password {
        cmd.args(["-a", p]);
    }
    cmd.args(["--csv", "-q"]);
    cmd.args(["-c", &clients.to_string(), "-P", &pipeline.to_string()]);
    cmd.args(["-n", &n.to_string()]);
    cmd.args(rest);
    let out = cmd.stderr(Stdio::null()).output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run redis-benchmark ({e}): install redis-tools"
        ))
    });
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find(|l| l.starts_with('"'))
        .unwrap_or_else(|| fail(&format!("redis-benchmark printed no CSV line: {text}")));
    let fields: Vec<f64> = line
        .rsplit("\",\"")
        .take(7)
        .map(|f| f.trim_matches('"').parse::<f64>().unwrap_or(f64::NAN))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    // fields: rps, avg, min, p50, p95, p99, max
    Bench {
        rps: fields[0],
        p50_us: fields[3] * 1000.0,
        p99_us: fields[5] * 1000.0,
    }
}

/// A redis-benchmark invocation whose `-n` is sized from the previous run to take `seconds`.
struct RefRun {
    clients: usize,
    pipeline: usize,
    rest: Vec<String>,
    rate_guess: f64,
}

impl RefRun {
    fn run(&mut self, t: &Target, seconds: f64) -> Bench {
        if t.no_reference {
            return Bench {
                rps: f64::NAN,
                p50_us: f64::NAN,
                p99_us: f64::NAN,
            };
        }
        loop {
            let n = ((self.rate_guess * seconds) as u64).max(1_000);
            let b = redis_benchmark(t, self.clients, self.pipeline, n, &self.rest);
            let took = n as f64 / b.rps;
            self.rate_guess = b.rps;
            // A run far shorter than asked (the guess was low) is repeated at the right size.
            if took >= seconds * 0.4 || !b.rps.is_finite() {
                return b;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

struct Row {
    name: String,
    unit: &'static str,
    ours: f64,
    reference: Option<f64>,
    target: Option<(Better, f64)>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.reference.map(|r| self.ours / r)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A row; a reference that is not a finite number (a failed parse) is left out.
fn row(
    name: &str,
    unit: &'static str,
    ours: f64,
    reference: Option<f64>,
    target: Option<(Better, f64)>,
) -> Row {
    Row {
        name: name.to_string(),
        unit,
        ours,
        reference: reference.filter(|r| r.is_finite()),
        target,
    }
}

/// Runs ours and the reference alternately `rounds` times and returns the row of the medians,
/// for a throughput that must reach `target` times the reference.
fn versus(
    name: &str,
    unit: &'static str,
    target: f64,
    rounds: usize,
    mut ours: impl FnMut() -> f64,
    mut reference: impl FnMut() -> f64,
) -> Row {
    let (mut o, mut r) = (vec![], vec![]);
    for _ in 0..rounds {
        o.push(ours());
        r.push(reference());
    }
    row(
        name,
        unit,
        median(o),
        Some(median(r)),
        Some((Better::Higher, target)),
    )
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64
}

fn progress(args: &Args, msg: &str) {
    let _ = args;
    eprintln!("loadtest: {msg}");
}

// ---------------------------------------------------------------------------------------------
// The measures

/// Deterministic pseudo-random indexes.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn open_store(t: &Target, prefix: &str, compression: Compression, pool: u32) -> Storage {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(t.url.as_str())
        .key_prefix(prefix)
        .compression(compression)
        .max_connections(pool)
        .pool_timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| fail(&format!("configuration: {e}")));
    Storage::open(&config).unwrap_or_else(|e| fail(&format!("opening the store: {e}")))
}

fn redis_store(s: &Storage, ns: &str) -> RedisStore {
    s.redis()
        .expect("a Redis storage")
        .namespace(ns)
        .unwrap_or_else(|e| fail(&e.to_string()))
}

fn used_memory(c: &mut redis::Connection) -> f64 {
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
fn load(store: &dyn KvStore, items: &[Item], c: &mut redis::Connection) -> f64 {
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
fn load_reference(c: &mut redis::Connection, name: &str, count: usize, size: usize) {
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
fn single_gets(store: &dyn KvStore, ids: &[String], seconds: f64, seed: u64) -> Vec<u64> {
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
fn batches<B>(
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
fn concurrent_gets(
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
fn write_behind(store: RedisStore, entries: &Arc<Vec<Item>>, threads: usize, seconds: f64) -> f64 {
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

/// Everything one storage (compressed or not) needs for the measures.
struct Side {
    chunks: RedisStore,
    cache: RedisStore,
}

fn measure_all(args: &Args, t: &Target) -> Vec<Row> {
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
    if !args.no_nocompress {
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
    let sides: Vec<(&Side, &str)> = [(&sides_lz4, ""), (&sides_plain, "_nocompress")]
        .into_iter()
        .filter(|(_, suffix)| match suffix.is_empty() {
            true => !args.only_nocompress,
            false => !args.no_nocompress,
        })
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
    for &(side, suffix) in &sides {
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
    for &(side, suffix) in &sides {
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
        let store = redis_store(&lz4, "all_keys_100k");
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
        rows.push(row("all_keys_100k", "s", median(took), None, None));
        let _ = store.clear();
    }

    // --- clean up what we wrote (matters with --redis-url)
    for s in [&sides_lz4, &sides_plain] {
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

// ---------------------------------------------------------------------------------------------
// --connections N

/// The soft open-file limit of this process, from /proc (std has no getrlimit).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Re-executes this program with the open-file limit raised by the shell, when it is below
/// `need`. Returns when the limit is already enough.
fn ensure_open_files(need: u64) {
    if open_file_limit().is_some_and(|l| l >= need) {
        return;
    }
    if std::env::var_os("LOADTEST_ULIMIT_RAISED").is_some() {
        fail(&format!(
            "the open-file limit is {:?}, {need} are needed and it could not be raised \
             (hard limit too low? raise it with `ulimit -Hn` as root)",
            open_file_limit()
        ));
    }
    let exe = std::env::current_exe().expect("current executable");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {need} 2>/dev/null || {{ echo \"loadtest: cannot raise the open-file \
             limit to {need} (hard limit $(ulimit -Hn)); raise it as root\" >&2; exit 2; }}; \
             exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("LOADTEST_ULIMIT_RAISED", "1")
        .status()
        .expect("running sh");
    std::process::exit(status.code().unwrap_or(1));
}

fn connections_mode(args: &Args, t: &Target, n: usize) -> Vec<Row> {
    let mut c = t.conn();
    let maxclients = (n + 128).to_string();
    if let Err(e) = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(&maxclients)
        .query::<()>(&mut c)
    {
        fail(&format!("CONFIG SET maxclients {maxclients}: {e}"));
    }
    let prefix = format!("loadtest-{}", std::process::id());
    let corpus = Corpus::load();
    let cache = corpus.cache_entries(args.items.min(10_000));
    let ids: Arc<Vec<String>> = Arc::new(cache.iter().map(|(id, _)| id.clone()).collect());
    let storage = open_store(t, &prefix, Compression::Lz4, 50);
    let store = redis_store(&storage, LLM_RESPONSE_CACHE);
    load(&store, &cache, &mut c);
    let clients_before = connected_clients(&mut c);
    // Several pools: r2d2 opens a pool's connections on 3 helper threads, and under this load
    // each handshake waits its turn on the server for a few hundred milliseconds, so one pool of
    // 10,000 would take minutes to fill. Pools of ~100 open in parallel.
    let pools = args.pools.unwrap_or(n.div_ceil(100)).clamp(1, n);
    let per_pool = n.div_ceil(pools) as u32;
    let config = storage.redis().expect("redis").config().clone();
    let shareds: Vec<Arc<graphrag_kv::RedisShared>> = (0..pools)
        .map(|_| {
            let mut config = config.clone();
            config.max_connections = per_pool;
            graphrag_kv::RedisShared::connect(&config)
                .unwrap_or_else(|e| fail(&format!("opening a pool: {e}")))
        })
        .collect();
    let stores: Vec<RedisStore> = shareds
        .iter()
        .map(|s| {
            s.namespace(LLM_RESPONSE_CACHE)
                .unwrap_or_else(|e| fail(&e.to_string()))
        })
        .collect();
    let held_now = || -> usize { shareds.iter().map(|s| s.pool_state().0 as usize).sum() };

    progress(args, &format!("opening {n} connections (one thread each)"));
    let errors = Arc::new(AtomicU64::new(0));
    // Opening: every thread reads in a loop until the pool holds `n` connections (a thread that
    // finds no idle connection makes the pool open one more, up to its size; r2d2 opens them
    // on demand, there is no warm-up call). Then all wait at
    // `read_b`, and the measured reads start together.
    let opening = Arc::new(AtomicBool::new(true));
    let read_b = Arc::new(Barrier::new(n + 1));
    let done_b = Arc::new(Barrier::new(n + 1));
    let reads = args.reads_per_connection;
    let t_open = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (store, ids, errors, opening, read_b, done_b) = (
                stores[i % pools].clone(),
                ids.clone(),
                errors.clone(),
                opening.clone(),
                read_b.clone(),
                done_b.clone(),
            );
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut rng = Rng(i as u64 * 0x9E37_79B9 + 1);
                    let mut read = |lat: Option<&mut Vec<u32>>| {
                        let t0 = Instant::now();
                        let ok = matches!(store.get_by_id(&ids[rng.below(ids.len())]), Ok(Some(_)));
                        if let Some(lat) = lat {
                            lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                        if !ok {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    };
                    while opening.load(Ordering::Relaxed) {
                        read(None);
                        // Off the CPU for a moment: the connection just returned goes to a
                        // waiting thread instead of back to this one, so this thread's next
                        // read finds the pool empty and has it open another connection.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    read_b.wait();
                    let mut lat = Vec::with_capacity(reads);
                    for _ in 0..reads {
                        read(Some(&mut lat));
                    }
                    done_b.wait();
                    lat
                })
                .expect("spawning a reader thread")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while held_now() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    opening.store(false, Ordering::Relaxed);
    let open_secs = t_open.elapsed().as_secs_f64();
    let held = held_now();
    let server_clients = connected_clients(&mut c);
    progress(
        args,
        &format!(
            "{held} pooled connections open after {open_secs:.1} s, server reports \
             {server_clients} clients ({clients_before} before); {reads} reads per thread"
        ),
    );
    read_b.wait();
    let t0 = Instant::now();
    done_b.wait();
    let read_secs = t0.elapsed().as_secs_f64();
    let mut lat: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("reader thread"))
        .map(u64::from)
        .collect();
    lat.sort_unstable();
    let held_after = held_now();
    // Clients whose last command was a GET: connections that served reads.
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut c)
        .unwrap_or_default();
    let served = list.lines().filter(|l| l.contains(" cmd=get ")).count();
    let _ = store.clear();
    let row = |name: &str, unit, ours: f64| Row {
        name: name.to_string(),
        unit,
        ours,
        reference: None,
        target: None,
    };
    vec![
        row("connections_requested", "", n as f64),
        row("pools", "", pools as f64),
        row("connections_held", "", held as f64),
        row("connections_held_after_reads", "", held_after as f64),
        row("server_connected_clients", "", server_clients as f64),
        row("connections_that_served_gets", "", served as f64),
        row("open_seconds", "s", open_secs),
        row("reads", "", lat.len() as f64),
        row("errors", "", errors.load(Ordering::Relaxed) as f64),
        row("reads_per_second", "ops/s", lat.len() as f64 / read_secs),
        row("get_p50", "µs", percentile(&lat, 0.50)),
        row("get_p90", "µs", percentile(&lat, 0.90)),
        row("get_p99", "µs", percentile(&lat, 0.99)),
        row("get_p999", "µs", percentile(&lat, 0.999)),
        row("get_max", "µs", lat.last().copied().unwrap_or(0) as f64),
    ]
}

fn connected_clients(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(c)
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_json(rows: &[Row]) {
    let mut out = Map::new();
    for r in rows {
        out.insert(
            r.name.clone(),
            json!({"ours": num(r.ours), "reference": r.reference.map(num), "ratio": r.ratio().map(num)}),
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(out)).expect("JSON")
    );
}

fn num(x: f64) -> Value {
    if !x.is_finite() {
        return Value::Null;
    }
    // Three significant decimals are plenty for every figure.
    let r = if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 1000.0).round() / 1000.0
    };
    json!(r)
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn print_table(rows: &[Row]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| {:<32} | {:>16} | {:>12} | {:>7} | {:>7} | {:<4} |",
        "measure", "ours", "reference", "ratio", "target", "met"
    );
    let _ = writeln!(
        out,
        "|{:-<34}|{:->18}|{:->14}|{:->9}|{:->9}|{:-<6}|",
        "", "", "", "", "", ""
    );
    for r in rows {
        let (target, met) = match (r.target, r.ratio(), r.reference) {
            (Some((Better::Lower, x)), Some(ratio), _) => {
                (format!("≤{x}x"), if ratio <= x { "yes" } else { "NO" })
            }
            (Some((Better::Higher, x)), Some(ratio), _) => {
                (format!("≥{x}x"), if ratio >= x { "yes" } else { "NO" })
            }
            (Some((Better::Lower, x)), None, None) if r.name.starts_with("memory_ratio") => {
                (format!("≤{x}"), if r.ours <= x { "yes" } else { "NO" })
            }
            (Some((Better::Higher, x)), None, None) if r.name.starts_with("memory_ratio") => {
                (format!("≥{x}"), if r.ours >= x { "yes" } else { "NO" })
            }
            _ => (String::new(), ""),
        };
        let ours = format!("{} {}", fmt(r.ours), r.unit);
        let _ = writeln!(
            out,
            "| {:<32} | {:>16} | {:>12} | {:>7} | {:>7} | {:<4} |",
            r.name,
            ours.trim(),
            r.reference.map(fmt).unwrap_or_else(|| "-".into()),
            r.ratio()
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            target,
            met
        );
    }
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.seconds = 0.2;
        args.items = args.items.min(500);
    }
    ITERATIONS.store(args.iterations.unwrap_or(0), Ordering::Relaxed);
    if let Some(n) = args.connections {
        // Our sockets; the server we start inherits the limit and needs as many.
        ensure_open_files(n as u64 + 1_024);
    }
    let server = args.redis_url.is_none().then(OwnServer::start);
    let url = match (&args.redis_url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => format!("redis://127.0.0.1:{}", s.port),
        _ => unreachable!(),
    };
    let mut t = Target::parse(&url);
    t.no_reference = args.no_reference;
    let started = Instant::now();
    let mut rows = match args.connections {
        Some(n) => connections_mode(&args, &t, n),
        None => measure_all(&args, &t),
    };
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query::<String>(&mut t.conn())
        .ok()
        .and_then(|i| {
            i.lines()
                .find_map(|l| l.strip_prefix("redis_version:").map(str::to_string))
        })
        .unwrap_or_default();
    rows.push(Row {
        name: "run_seconds".into(),
        unit: "s",
        ours: started.elapsed().as_secs_f64(),
        reference: None,
        target: None,
    });
    drop(server);
    if args.json {
        print_json(&rows);
    } else {
        println!(
            "graphrag-kv loadtest: redis {version}, {} cores, rounds {}, {} s per run",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            args.rounds,
            args.seconds
        );
        print_table(&rows);
    }
}
