//! The command line.

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(about = "graphrag-kv load tool: the Redis backend against redis-benchmark")]
pub struct Args {
    /// Print one JSON object (measure -> {ours, reference, ratio}) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Use this server instead of starting one (keys go under a prefix of their own).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Runs of each measure (ours and reference alternately); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per run of a measure.
    #[arg(long, default_value_t = 1.5)]
    pub seconds: f64,
    /// Text chunks and cache entries loaded (each).
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// A smoke run (one short round of everything, 500 items): checks the tool end to end in
    /// seconds; the figures mean little.
    #[arg(long)]
    pub quick: bool,
    /// Skip the `_nocompress` measures.
    #[arg(long)]
    pub no_nocompress: bool,
    /// Run only the `_nocompress` variants of the measures that have one.
    #[arg(long)]
    pub only_nocompress: bool,
    /// Skip the `_zstd` measures (memory, get latency, get_by_ids, upsert with
    /// `REDIS_COMPRESSION=zstd`).
    #[arg(long)]
    pub no_zstd: bool,
    /// Run only the `_zstd` variants of the measures that have one.
    #[arg(long)]
    pub only_zstd: bool,
    /// The zstd level of the `_zstd` measures (`REDIS_COMPRESSION_LEVEL`).
    #[arg(long, default_value_t = graphrag_kv::codec::DEFAULT_ZSTD_LEVEL)]
    pub zstd_level: i32,
    /// Instead of the measures: hold this many connections and read over all of them.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Run only these measures (comma-separated prefixes: get, get_by_ids, upsert, filter_keys,
    /// concurrent_get, write_behind, all_keys); the load and memory figures always run.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(MEASURES))]
    pub only: Vec<String>,
    /// Skip redis-benchmark (for profiling the client alone).
    #[arg(long)]
    pub no_reference: bool,
    /// Run each batch measure for exactly this many calls instead of `--seconds` (for
    /// profiling, e.g. under valgrind's callgrind).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Pool size of the stores measured. Default 64: one connection per reader thread of
    /// `concurrent_get_64`, as docs/DEPLOYMENT.md advises (`REDIS_MAX_CONNECTIONS` at least the
    /// worker threads); the library's own default is 50. Only `concurrent_get_64` uses more
    /// than one connection at a time.
    #[arg(long, default_value_t = 64)]
    pub pool_size: u32,
    /// Take the text of the values from the files of this directory instead of `corpus/`
    /// (e.g. to see how `memory_ratio` depends on how well the text compresses).
    #[arg(long)]
    pub corpus: Option<std::path::PathBuf>,
    /// Pools in `--connections` mode (default: one per 100 connections).
    #[arg(long)]
    pub pools: Option<usize>,
    /// Reads per connection in `--connections` mode.
    #[arg(long, default_value_t = 20)]
    pub reads_per_connection: usize,
}

/// The names `--only` accepts.
pub const MEASURES: [&str; 7] = [
    "get",
    "get_by_ids",
    "upsert",
    "filter_keys",
    "concurrent_get",
    "write_behind",
    "all_keys",
];
