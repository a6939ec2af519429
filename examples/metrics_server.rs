//! Serves graphrag-kv's Prometheus metrics on `/metrics`, over the backend configured in the
//! environment (`STORAGE_KV_BACKEND`, `REDIS_URL`, ...), with a small synchronous HTTP server
//! (tiny_http): no async runtime.
//!
//! ```text
//! cargo run --example metrics_server -- [--addr 127.0.0.1:9464] [--demo-interval-ms 0]
//!                                       [--sample-interval-s 60]
//! curl -s http://127.0.0.1:9464/metrics
//! ```
//!
//! The four nano-graphrag namespaces are opened and wrapped in [`Metered`]; an indexer embedding
//! this would hand those stores to its pipeline. With `--demo-interval-ms N` (N > 0) a thread
//! plays a tiny indexer every N ms (one upsert, a read that hits, a read that misses) so the
//! counters move without one.
//!
//! What is read when:
//! - operation counters, latencies, hits and misses: as the stores are used;
//! - connection pool: at every scrape ([`PoolGauge`](graphrag_kv::metrics::PoolGauge));
//! - server memory and evictions (`INFO`, one cheap command): at every scrape;
//! - per-namespace key counts and memory (`stats()`, a SCAN of the keyspace on Redis): every
//!   `--sample-interval-s` seconds in a background thread, because on a server with millions of
//!   keys a SCAN takes seconds and must not run on every scrape.
//!
//! The first line on stdout is `serving http://ADDR/metrics`, with the port actually bound
//! (so `--addr 127.0.0.1:0` picks a free one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::metrics::{render, server_info, Metered, Metrics};
use graphrag_kv::{KvStore, RedisShared, Storage, NAMESPACES, TEXT_CHUNKS};
use prometheus::Registry;
use serde_json::json;

/// Called before each scrape is answered, to refresh figures that are read on demand.
pub type OnScrape = Box<dyn Fn() + Send + 'static>;

/// Binds `addr` and answers `GET /metrics` with `registry` in the text format (404 for other
/// paths) on a background thread, calling `on_scrape` first. Returns the bound address.
///
/// # Errors
/// When `addr` cannot be bound.
pub fn spawn_server(
    addr: &str,
    registry: Registry,
    on_scrape: OnScrape,
) -> Result<SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    let server = tiny_http::Server::http(addr)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or("the server is not listening on an IP address")?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                answer(request, &registry, &on_scrape);
            }
        })?;
    Ok(bound)
}

/// Answers one request.
fn answer(request: tiny_http::Request, registry: &Registry, on_scrape: &OnScrape) {
    let path = request.url().split('?').next().unwrap_or("");
    let response = if path == "/metrics" {
        on_scrape();
        let content_type =
            tiny_http::Header::from_bytes(&b"Content-Type"[..], prometheus::TEXT_FORMAT.as_bytes())
                .expect("a valid header");
        tiny_http::Response::from_string(render(registry)).with_header(content_type)
    } else {
        tiny_http::Response::from_string("not found: try /metrics\n").with_status_code(404)
    };
    if let Err(e) = request.respond(response) {
        log::debug!("metrics client went away: {e}");
    }
}

/// The refresh done at each scrape: the server's INFO (memory, evictions), when on Redis.
pub fn scrape_hook(metrics: &Metrics, shared: Option<&Arc<RedisShared>>) -> OnScrape {
    let metrics = metrics.clone();
    let shared = shared.cloned();
    Box::new(move || {
        if let Some(shared) = &shared {
            match server_info(shared) {
                Ok(info) => metrics.record_server(&info),
                Err(e) => log::warn!("cannot read the server's INFO: {e}"),
            }
        }
    })
}

/// Command-line options.
struct Options {
    addr: String,
    demo_interval: Option<Duration>,
    sample_interval: Duration,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        addr: "127.0.0.1:9464".into(),
        demo_interval: None,
        sample_interval: Duration::from_secs(60),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--addr" => o.addr = value()?,
            "--demo-interval-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|_| "--demo-interval-ms: a number")?;
                o.demo_interval = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "--sample-interval-s" => {
                let s: u64 = value()?
                    .parse()
                    .map_err(|_| "--sample-interval-s: a number")?;
                o.sample_interval = Duration::from_secs(s.max(1));
            }
            "-h" | "--help" => {
                println!(
                    "usage: metrics_server [--addr HOST:PORT] [--demo-interval-ms N] \
                     [--sample-interval-s S]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(o)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(e) = run() {
        eprintln!("metrics_server: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let options = options()?;
    let registry = Registry::new();
    let metrics = Metrics::new(&registry)?;
    let storage = Storage::from_env()?;
    // The stores are metered by hand below (the example samples their memory); the pool's
    // size and the backend's retries are read from it at scrape time.
    if let Some(shared) = storage.redis() {
        metrics.pool().watch_redis(shared);
        metrics.watch_retries(shared);
    }
    let stores: Vec<Arc<Metered<Arc<dyn KvStore>>>> = NAMESPACES
        .iter()
        .map(|ns| Ok(Arc::new(Metered::new(storage.namespace(ns)?, &metrics))))
        .collect::<graphrag_kv::Result<_>>()?;

    // Key counts and memory: a SCAN per namespace on Redis, so on a timer, not per scrape.
    let sampled = stores.clone();
    let every = options.sample_interval;
    std::thread::Builder::new()
        .name("metrics-sampler".into())
        .spawn(move || loop {
            for s in &sampled {
                if let Err(e) = s.sample_memory() {
                    log::warn!("stats of {:?} failed: {e}", s.namespace());
                }
            }
            std::thread::sleep(every);
        })?;

    if let Some(every) = options.demo_interval {
        let chunks = stores
            .iter()
            .find(|s| s.namespace() == TEXT_CHUNKS)
            .cloned()
            .expect("text_chunks is one of NAMESPACES");
        std::thread::Builder::new()
            .name("demo-indexer".into())
            .spawn(move || demo_indexer(&*chunks, every))?;
    }

    let bound = spawn_server(
        &options.addr,
        registry,
        scrape_hook(&metrics, storage.redis()),
    )?;
    println!("serving http://{bound}/metrics");
    // Everything runs on the threads above; the process lives until it is killed.
    loop {
        std::thread::park();
    }
}

/// A stand-in for an indexer: one chunk written, read back, and a read that misses, per tick.
fn demo_indexer(chunks: &dyn KvStore, every: Duration) {
    for i in 0u64.. {
        let id = format!("demo-chunk-{}", i % 100);
        let chunk = json!({
            "tokens": 3,
            "content": format!("demo chunk {i}"),
            "chunk_order_index": i,
            "full_doc_id": "demo-doc",
        });
        let outcome = chunks
            .upsert(vec![(id.clone(), chunk)])
            .and_then(|()| chunks.get_by_id(&id))
            .and_then(|_| chunks.get_by_id("demo-absent"));
        if let Err(e) = outcome {
            log::warn!("demo indexer: {e}");
        }
        std::thread::sleep(every);
    }
}
