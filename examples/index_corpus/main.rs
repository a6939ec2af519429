//! The main job: index a folder of documents as a GraphRAG indexer does, on the storage the
//! environment chooses, asking the LLM once per distinct prompt however many workers run.
//!
//! ```sh
//! cargo run --release --example index_corpus                       # JSON files, no set-up
//! STORAGE_KV_BACKEND=redis REDIS_URL=redis://localhost:6379 \
//!     cargo run --release --example index_corpus                   # one shared Redis
//! ```
//!
//! What it does, in nano-graphrag's order and with its ids:
//!
//! 1. Reads every `.txt` and `.md` file under `--corpus` (default: the sample corpus in the
//!    repository). A document's id is `doc-` + md5 of its stripped text.
//! 2. Skips documents already in `full_docs` (`filter_keys`), splits the others into windows of
//!    1200 whitespace tokens overlapping by 100 (nano-graphrag's `chunking_by_token_size`), ids
//!    `chunk-` + md5 of the chunk text, and skips chunks already in `text_chunks`.
//! 3. `--workers` threads pull chunks from a channel (each process starting at a random point of
//!    the list), ask the LLM for a summary of each through the shared [`LlmCache`] (the local
//!    stand-in by default; `--llm openai` when built with `--features openai`), and store the
//!    chunk in `text_chunks`.
//! 4. When all chunks of a document are done, writes its community report (one per document,
//!    built from the chunk summaries) to `community_reports`, then the document to `full_docs`:
//!    a document in `full_docs` is completely indexed.
//! 5. Calls `index_done_callback` on every namespace and prints a summary, with one line
//!    `LLM calls: N` (the calls this process made).
//!
//! Ctrl-C stops taking new chunks, lets the ones in flight finish, saves every namespace and
//! prints the summary (exit status 130); a second Ctrl-C quits at once. Running again resumes
//! where it stopped. Several processes may run at once against one Redis: each distinct prompt
//! costs one LLM call in total.
//!
//! Storage comes from the environment (`STORAGE_KV_BACKEND`, `STORAGE_WORKING_DIR`, `REDIS_URL`,
//! `REDIS_KEY_PREFIX`, ...); `RUST_LOG` sets the log level (default `warn`).
//!
//! `LLM_RATE_LIMIT_RPM` / `LLM_RATE_LIMIT_TPM` (and `LLM_RATE_LIMIT_BURST`, ...; see
//! `graphrag_kv::rate_limit::RateLimit::from_env`) put the LLM behind a rate limit shared by
//! every process on the same Redis (in-process on JSON); the summary's `rate limit:` line says
//! how many requests it admitted, how long the workers waited, and the 429s seen.
mod corpus;
mod job;
mod report;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::hash::{BuildHasher, Hasher};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use graphrag_kv::config::redact_url;
use graphrag_kv::llm::{LlmClient, LocalLlm};
use graphrag_kv::llm_cache::LlmCache;
use graphrag_kv::llm_hash::compute_mdhash_id;
use graphrag_kv::rate_limit::{RateLimit, RateLimitedLlm};
use graphrag_kv::{
    BackendKind, KvStore, Storage, StoreConfig, TextChunk, COMMUNITY_REPORTS, FULL_DOCS,
    TEXT_CHUNKS,
};
use indicatif::{ProgressBar, ProgressStyle};

use corpus::{chunk_by_tokens, read_corpus, Doc};
use job::{Job, Wait};

/// Any error of the run, reported by `main`.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// The sample corpus shipped with the repository.
const DEFAULT_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");
/// Model name of the local stand-in: its answers must never pass for a real model's in a shared
/// cache, so it has a name of its own.
const LOCAL_MODEL: &str = "graphrag-kv-local";
/// Default model of `--llm openai`.
const OPENAI_MODEL: &str = "gpt-4o-mini";

/// Index a folder of documents into full_docs, text_chunks, community_reports and
/// llm_response_cache, on the storage the environment chooses (STORAGE_KV_BACKEND=json|redis).
#[derive(Debug, Parser)]
#[command(name = "index_corpus")]
struct Args {
    /// Folder of .txt and .md documents (read recursively).
    #[arg(long, default_value = DEFAULT_CORPUS)]
    corpus: PathBuf,

    /// Index only the first N documents (in path order).
    #[arg(long, value_name = "N")]
    limit_docs: Option<usize>,

    /// Worker threads asking the LLM.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: u32,

    /// The LLM: the deterministic local stand-in, or an OpenAI-compatible server (needs
    /// `--features openai`; reads OPENAI_API_KEY and OPENAI_BASE_URL).
    #[arg(long, value_enum, default_value_t = LlmKind::Local)]
    llm: LlmKind,

    /// Model name (default: graphrag-kv-local for the stand-in, gpt-4o-mini for openai).
    #[arg(long)]
    model: Option<String>,

    /// Time each call of the local stand-in takes, in milliseconds.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    llm_latency_ms: u64,

    /// Tokens per chunk (nano-graphrag's chunk_token_size).
    #[arg(long, default_value_t = 1200, value_parser = clap::value_parser!(u32).range(1..))]
    chunk_tokens: u32,

    /// Tokens shared by consecutive chunks (nano-graphrag's chunk_overlap_token_size).
    #[arg(long, default_value_t = 100)]
    overlap_tokens: u32,

    /// Never show the progress bar (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LlmKind {
    /// Deterministic local stand-in: no network, answers derived from the prompt.
    Local,
    /// OpenAI-compatible chat completions over HTTP.
    Openai,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("index_corpus: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, BoxError> {
    let (chunk_tokens, overlap) = (args.chunk_tokens as usize, args.overlap_tokens as usize);
    if overlap >= chunk_tokens {
        return Err(format!(
            "--overlap-tokens ({overlap}) must be smaller than --chunk-tokens ({chunk_tokens})"
        )
        .into());
    }
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = if args.no_progress || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    {
        let (stop, progress) = (stop.clone(), progress.clone());
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("index_corpus: interrupted again, quitting without saving");
                std::process::exit(130);
            }
            progress.suspend(|| {
                eprintln!(
                    "index_corpus: stopping: finishing the chunks in flight, then saving \
                     (Ctrl-C again to quit at once)"
                )
            });
        })?;
    }

    let (llm, model, llm_label, endpoint) = make_llm(args)?;
    let rate_limit = RateLimit::from_env()?;
    let config = StoreConfig::from_env()?;
    let backend_label = match config.backend {
        BackendKind::Json => format!(
            "json, working directory {}",
            config.json.working_dir.display()
        ),
        BackendKind::Redis => format!(
            "redis {}, key prefix {}",
            redact_url(&config.redis.url),
            config.redis.key_prefix
        ),
        // BackendKind is non_exhaustive: a backend added later is at least named.
        other => other.as_str().to_string(),
    };
    let storage = Storage::open(&config)?;
    let full_docs = storage.namespace(FULL_DOCS)?;
    let text_chunks = storage.namespace(TEXT_CHUNKS)?;
    let reports = storage.namespace(COMMUNITY_REPORTS)?;
    let cache = LlmCache::open(&storage)?;
    // The limiter sits inside the cache (the job calls it from the cache's computation): a
    // cache hit never waits for budget.
    let (llm, limited): (Box<dyn LlmClient>, _) = match &rate_limit {
        Some(limit) => {
            let limited = Arc::new(
                RateLimitedLlm::new(llm, storage.rate_limiter(), limit.clone())
                    .with_endpoint(&endpoint),
            );
            (Box::new(limited.clone()), Some(limited))
        }
        None => (llm, None),
    };
    for ns in [&full_docs, &text_chunks, &reports, cache.store()] {
        ns.index_start_callback()?;
    }

    // Documents: skip those already indexed.
    let all_docs = read_corpus(&args.corpus, args.limit_docs)?;
    let total_docs = all_docs.len();
    let ids: Vec<String> = all_docs.iter().map(|d| d.id.clone()).collect();
    let new_ids: HashSet<String> = full_docs.filter_keys(&ids)?.into_iter().collect();
    let mut docs: Vec<Doc> = all_docs
        .into_iter()
        .filter(|d| new_ids.contains(&d.id))
        .collect();

    // Chunks of the new documents, as nano-graphrag's get_chunks: the same text in two places
    // is one chunk (the last occurrence's fields win, as in its dict).
    let mut chunks: HashMap<String, TextChunk> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut docs_of_chunk: HashMap<String, Vec<usize>> = HashMap::new();
    for (d, doc) in docs.iter_mut().enumerate() {
        for (i, (content, tokens)) in chunk_by_tokens(&doc.content, chunk_tokens, overlap)
            .into_iter()
            .enumerate()
        {
            let id = compute_mdhash_id(&content, "chunk-");
            let owners = docs_of_chunk.entry(id.clone()).or_default();
            if !owners.contains(&d) {
                owners.push(d);
                doc.chunk_ids.push(id.clone());
            }
            let chunk = TextChunk {
                tokens: tokens as u64,
                content,
                chunk_order_index: i as u64,
                full_doc_id: doc.id.clone(),
            };
            if chunks.insert(id.clone(), chunk).is_none() {
                order.push(id);
            }
        }
    }
    // Chunks already stored (an interrupted run, or another process) are not asked again.
    let mut todo = text_chunks.filter_keys(&order)?;
    // Each process starts at its own random point of the list: processes sharing one cache then
    // work on different prompts at the same time, instead of all waiting on the same few.
    if !todo.is_empty() {
        let offset = RandomState::new().build_hasher().finish() as usize % todo.len();
        todo.rotate_left(offset);
    }
    let already_stored = order.len() - todo.len();
    let to_process = todo.len() as u64;
    let todo_set: HashSet<&String> = todo.iter().collect();
    let remaining: Vec<usize> = docs
        .iter()
        .map(|d| d.chunk_ids.iter().filter(|c| todo_set.contains(c)).count())
        .collect();
    let ready: Vec<usize> = (0..docs.len()).filter(|&d| remaining[d] == 0).collect();

    eprintln!(
        "index_corpus: {} documents to index ({} already indexed), {} chunks to process \
         ({} already stored), {} workers, {llm_label}, {backend_label}",
        docs.len(),
        total_docs - docs.len(),
        todo.len(),
        already_stored,
        args.workers,
    );

    let job = Arc::new(Job {
        chunks,
        docs,
        docs_of_chunk,
        remaining: Mutex::new(remaining),
        answers: Mutex::new(HashMap::new()),
        full_docs,
        text_chunks,
        reports,
        cache,
        llm,
        model,
        llm_calls: AtomicU64::new(0),
        chunks_done: AtomicU64::new(0),
        docs_done: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        first_error: Mutex::new(None),
        stop: stop.clone(),
        progress: progress.clone(),
    });

    // Documents whose chunks were all stored by an earlier run only need their report.
    for d in ready {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        job.record(job.finish_doc(d));
    }

    progress.set_length(todo.len() as u64);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} chunks {per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    // All work is queued up front; workers check the stop flag before taking each chunk, so
    // Ctrl-C leaves the rest in the channel and only the chunks in flight finish.
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    for id in todo {
        tx.send(id)?;
    }
    drop(tx);
    let workers: Vec<_> = (0..args.workers)
        .map(|w| {
            let (job, rx) = (job.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("indexer-{w}"))
                .spawn(move || {
                    // Chunks another process (or thread) is asking the LLM about right now are
                    // set aside and done last, by which time their answers are cached: a worker
                    // never idles while there are chunks nobody is working on.
                    let mut deferred = Vec::new();
                    while !job.stop.load(Ordering::SeqCst) {
                        let Ok(id) = rx.recv() else { break };
                        match job.process_chunk(&id, Wait::No) {
                            Ok(false) => deferred.push(id),
                            done => job.record_chunk(done),
                        }
                    }
                    for id in deferred {
                        if job.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        job.record_chunk(job.process_chunk(&id, Wait::Yes));
                    }
                })
        })
        .collect::<Result<_, _>>()?;
    for w in workers {
        if w.join().is_err() {
            job.record(Err("a worker thread panicked".into()));
        }
    }
    progress.finish_and_clear();

    // Save everything written, whatever happened above. All at once, as nano-graphrag's
    // _insert_done gathers them: on Redis the four calls then share one server checkpoint.
    let namespaces = [
        &job.full_docs,
        &job.text_chunks,
        &job.reports,
        job.cache.store(),
    ];
    let saving = Instant::now();
    let saves: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .iter()
            .map(|ns| s.spawn(move || ns.index_done_callback()))
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    log::debug!(
        "index_done_callback on every namespace took {:?}",
        saving.elapsed()
    );
    let mut saved = true;
    for (ns, result) in namespaces.iter().zip(saves) {
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the saving thread panicked".to_string(),
        };
        eprintln!("index_corpus: saving {}: {error}", ns.namespace());
        saved = false;
    }

    let elapsed = started.elapsed();
    let interrupted = stop.load(Ordering::SeqCst);
    let stats = job.cache.stats();
    let chunks_done = job.chunks_done.load(Ordering::SeqCst);
    let docs_done = job.docs_done.load(Ordering::SeqCst);
    let failures = job.failures.load(Ordering::SeqCst);
    println!("backend: {backend_label}");
    println!("llm: {llm_label}");
    println!(
        "documents: {total_docs} in corpus, {docs_done} indexed now, {} already indexed",
        total_docs - job.docs.len()
    );
    println!(
        "chunks: {} in new documents, {chunks_done} processed now, {already_stored} already \
         stored",
        job.chunks.len(),
    );
    println!("LLM calls: {}", job.llm_calls.load(Ordering::SeqCst));
    println!("cache hits: {}", stats.hits);
    println!("cache waits: {}", stats.waits);
    match (&limited, &rate_limit) {
        (Some(l), Some(limit)) => {
            let r = l.stats();
            println!(
                "rate limit: {} admitted, waited {:.2} s, {} rate-limited, {} cool-downs started \
                 ({})",
                r.admitted,
                r.waited.as_secs_f64(),
                r.rate_limited,
                r.cool_downs,
                describe_limit(limit)
            );
        }
        _ => println!("rate limit: none (LLM_RATE_LIMIT_RPM and LLM_RATE_LIMIT_TPM unset)"),
    }
    println!("time: {:.2} s", elapsed.as_secs_f64());
    println!(
        "chunks/s: {:.1}",
        chunks_done as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    let unfinished = job.docs.len() as u64 - docs_done;
    if failures > 0 {
        let first = job.first_error.lock().unwrap_or_else(|p| p.into_inner());
        println!(
            "failed: {failures} (first: {})",
            first.as_deref().unwrap_or("?")
        );
    }
    if interrupted {
        println!(
            "interrupted: {unfinished} documents and {} chunks left for the next run",
            to_process - chunks_done
        );
        return Ok(ExitCode::from(130));
    }
    if failures > 0 || !saved {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The limits, as the summary shows them.
fn describe_limit(limit: &RateLimit) -> String {
    let period = limit.period.as_secs_f64();
    let mut parts = Vec::new();
    if let Some(n) = limit.requests {
        parts.push(format!(
            "{n} requests per {period} s, burst {}",
            limit.burst
        ));
    }
    if let Some(n) = limit.tokens {
        parts.push(format!(
            "{n} tokens per {period} s, burst {}",
            limit.token_burst
        ));
    }
    parts.join("; ")
}

/// The LLM client, the model name, a label for the summary, and the endpoint (the rate
/// limit's budget is per endpoint and model).
fn make_llm(args: &Args) -> Result<(Box<dyn LlmClient>, String, String, String), BoxError> {
    match args.llm {
        LlmKind::Local => {
            let latency = Duration::from_millis(args.llm_latency_ms);
            let model = args.model.clone().unwrap_or_else(|| LOCAL_MODEL.into());
            let label = format!(
                "local stand-in model {model} ({} ms per call)",
                args.llm_latency_ms
            );
            Ok((
                Box::new(LocalLlm::new().with_latency(latency)),
                model,
                label,
                "local".to_string(),
            ))
        }
        #[cfg(feature = "openai")]
        LlmKind::Openai => {
            let client = graphrag_kv::llm::OpenAiClient::from_env()?;
            let model = args.model.clone().unwrap_or_else(|| OPENAI_MODEL.into());
            let label = format!(
                "openai-compatible model {model} at {}",
                redact_url(client.base_url())
            );
            let endpoint = client.base_url().to_string();
            Ok((Box::new(client), model, label, endpoint))
        }
        #[cfg(not(feature = "openai"))]
        LlmKind::Openai => Err(format!(
            "--llm openai needs the `openai` feature: cargo run --release --features openai \
             --example index_corpus -- --llm openai (model {})",
            args.model.as_deref().unwrap_or(OPENAI_MODEL)
        )
        .into()),
    }
}
