//! `--connections N`: hold N connections from this library and read over all of them.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use graphrag_kv::{Compression, KvStore, RedisStore, LLM_RESPONSE_CACHE};

use crate::args::Args;
use crate::data::Corpus;
use crate::ops::{load, open_store, redis_store, Rng};
use crate::reference::Target;
use crate::report::{percentile, Row};
use crate::{fail, progress};

/// The soft open-file limit of this process, from /proc (std has no getrlimit).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Re-executes this program with the open-file limit raised by the shell, when it is below
/// `need`. Returns when the limit is already enough.
pub fn ensure_open_files(need: u64) {
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

pub fn connections_mode(args: &Args, t: &Target, n: usize) -> Vec<Row> {
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

pub fn connected_clients(c: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(c)
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
