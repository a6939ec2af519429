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
//! With no `--redis-url` it starts its own `redis-server` with the test harness
//! (`graphrag_kv_harness::RedisServer`: free port, temporary directory, killed at the end;
//! `REDIS_SERVER_BIN` names another binary). With `--redis-url` every key it writes is under a prefix of its own
//! (`loadtest-<pid>`), deleted at the end; `used_memory` figures are then only as good as the
//! server is quiet.
//!
//! Values come from `benches/data.rs`: ~5 KB text chunks of the English prose in `corpus/` and
//! ~2 KB LLM cache entries. Single gets, concurrent gets and write-behind use cache entries (an
//! indexer's single reads and writes are cache lookups and stores); batches use chunks. The
//! store runs with the default configuration (lz4 on, pool of 50); `_nocompress` rows repeat a
//! measure with `REDIS_COMPRESSION=none`, `_zstd` rows with `REDIS_COMPRESSION=zstd` at
//! `--zstd-level` (memory, single get latency, `get_by_ids`, `upsert`: what the codec changes;
//! `--no-zstd` and `--only-zstd` as for `_nocompress`). `--corpus DIR` takes the values' text
//! from the files of DIR instead of `corpus/`.
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
//!
//! Files: `args` (the command line), `measures` (the measures, in the order of the table) over
//! `ops` (store set-up and the timed loops) and `reference` (redis-benchmark), `connections`
//! (`--connections N`), `report` (rows, table, JSON), `alloc` (the counting allocator).

#[path = "../../benches/data.rs"]
mod data;

mod alloc;
mod args;
mod connections;
mod measures;
mod ops;
mod reference;
mod report;

use std::sync::atomic::Ordering;
use std::time::Instant;

use clap::Parser;
use graphrag_kv_harness::RedisServer;

use args::Args;
use reference::Target;
use report::{print_json, print_table, Row};

fn fail(msg: &str) -> ! {
    eprintln!("loadtest: {msg}");
    std::process::exit(2)
}

fn progress(args: &Args, msg: &str) {
    let _ = args;
    eprintln!("loadtest: {msg}");
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.seconds = 0.2;
        args.items = args.items.min(500);
    }
    ops::ITERATIONS.store(args.iterations.unwrap_or(0), Ordering::Relaxed);
    if let Some(n) = args.connections {
        // Our sockets; the server we start inherits the limit and needs as many.
        connections::ensure_open_files(n as u64 + 1_024);
    }
    let server = args.redis_url.is_none().then(|| {
        RedisServer::try_start_with(&[]).unwrap_or_else(|why| {
            fail(&format!(
                "redis-server did not start (or pass --redis-url): {why}"
            ))
        })
    });
    let url = match (&args.redis_url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => s.url(),
        _ => unreachable!(),
    };
    let mut t = Target::parse(&url);
    t.no_reference = args.no_reference;
    let started = Instant::now();
    let mut rows = match args.connections {
        Some(n) => connections::connections_mode(&args, &t, n),
        None => measures::measure_all(&args, &t),
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
