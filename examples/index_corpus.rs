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

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::hash::{BuildHasher, Hasher};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use graphrag_kv::config::redact_url;
use graphrag_kv::llm::{LlmClient, LocalLlm};
use graphrag_kv::llm_cache::LlmCache;
use graphrag_kv::llm_hash::{compute_mdhash_id, Message};
use graphrag_kv::{
    BackendKind, FullDoc, KvStore, KvStoreExt, Storage, StoreConfig, TextChunk, COMMUNITY_REPORTS,
    FULL_DOCS, TEXT_CHUNKS,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The sample corpus shipped with the repository.
const DEFAULT_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");
/// Model name of the local stand-in: its answers must never pass for a real model's in a shared
/// cache, so it has a name of its own.
const LOCAL_MODEL: &str = "graphrag-kv-local";
/// Default model of `--llm openai`.
const OPENAI_MODEL: &str = "gpt-4o-mini";
/// The instructions sent with every chunk.
const SYSTEM_PROMPT: &str = "You help build a knowledge graph. Read the passage the user sends \
and answer in exactly two lines. First line: 'SUMMARY: ' followed by a summary of the passage in \
at most three sentences. Second line: 'KEY TERMS: ' followed by up to five key terms from the \
passage, separated by commas.";

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

/// Whether a worker waits for a prompt another thread or process is asking about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LlmKind {
    /// Deterministic local stand-in: no network, answers derived from the prompt.
    Local,
    /// OpenAI-compatible chat completions over HTTP.
    Openai,
}

/// One document of the corpus.
#[derive(Debug)]
struct Doc {
    id: String,
    /// The path relative to the corpus folder, for the report title.
    name: String,
    content: String,
    /// Its chunks in order, each id once.
    chunk_ids: Vec<String>,
}

/// What the workers share.
struct Job {
    chunks: HashMap<String, TextChunk>,
    docs: Vec<Doc>,
    /// Documents each chunk belongs to (indices into `docs`): identical text may occur in two.
    docs_of_chunk: HashMap<String, Vec<usize>>,
    /// Chunks of each document still to process in this run.
    remaining: Mutex<Vec<usize>>,
    /// Answers obtained in this run, by chunk id.
    answers: Mutex<HashMap<String, String>>,
    full_docs: Arc<dyn KvStore>,
    text_chunks: Arc<dyn KvStore>,
    reports: Arc<dyn KvStore>,
    cache: LlmCache,
    llm: Box<dyn LlmClient>,
    model: String,
    llm_calls: AtomicU64,
    chunks_done: AtomicU64,
    docs_done: AtomicU64,
    failures: AtomicU64,
    first_error: Mutex<Option<String>>,
    stop: Arc<AtomicBool>,
    progress: ProgressBar,
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

    let (llm, model, llm_label) = make_llm(args)?;
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

impl Job {
    /// The messages sent for a chunk.
    fn prompt(content: &str) -> [Message; 2] {
        [
            Message::new("system", SYSTEM_PROMPT),
            Message::new("user", content),
        ]
    }

    /// The LLM's answer for a chunk, through the shared cache; with `Wait::No`, `None` when
    /// another thread or process is asking the LLM about it right now.
    fn ask(&self, content: &str, wait: Wait) -> Result<Option<String>, BoxError> {
        let messages = Self::prompt(content);
        let llm = || {
            self.llm_calls.fetch_add(1, Ordering::SeqCst);
            self.llm.complete(&self.model, &messages)
        };
        Ok(match wait {
            Wait::Yes => Some(self.cache.get_or_compute(&self.model, &messages, llm)?),
            Wait::No => self.cache.try_get_or_compute(&self.model, &messages, llm)?,
        })
    }

    /// Asks the LLM about one chunk, stores the chunk, and finishes every document whose last
    /// chunk this was. `Ok(false)`: not done, someone else is asking about it (`Wait::No`).
    fn process_chunk(&self, id: &str, wait: Wait) -> Result<bool, BoxError> {
        let chunk = &self.chunks[id];
        let Some(answer) = self
            .ask(&chunk.content, wait)
            .map_err(|e| format!("chunk {id}: {e}"))?
        else {
            return Ok(false);
        };
        self.text_chunks.upsert_as([(id.to_string(), chunk)])?;
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), answer);
        self.chunks_done.fetch_add(1, Ordering::SeqCst);
        let finished: Vec<usize> = {
            let mut remaining = self.remaining.lock().unwrap_or_else(|p| p.into_inner());
            self.docs_of_chunk[id]
                .iter()
                .copied()
                .filter(|&d| {
                    remaining[d] -= 1;
                    remaining[d] == 0
                })
                .collect()
        };
        for d in finished {
            self.finish_doc(d)?;
        }
        Ok(true)
    }

    /// Writes a document's community report, then the document itself: from then on the
    /// document counts as indexed.
    fn finish_doc(&self, d: usize) -> Result<(), BoxError> {
        let doc = &self.docs[d];
        let mut answers = Vec::with_capacity(doc.chunk_ids.len());
        for id in &doc.chunk_ids {
            let known = self
                .answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned();
            // A chunk stored by an earlier run: its answer is in the cache.
            let answer = match known {
                Some(a) => a,
                None => self
                    .ask(&self.chunks[id].content, Wait::Yes)?
                    .unwrap_or_default(),
            };
            answers.push(answer);
        }
        let (report_id, report) = community_report(doc, &answers);
        self.reports.upsert(vec![(report_id, report)])?;
        self.full_docs.upsert_as([(
            doc.id.clone(),
            FullDoc {
                content: doc.content.clone(),
            },
        )])?;
        self.docs_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Records the outcome of a chunk: progress, or a failure.
    fn record_chunk(&self, result: Result<bool, BoxError>) {
        self.progress.inc(1);
        let s = self.cache.stats();
        self.progress
            .set_message(format!("hits {} waits {}", s.hits, s.waits));
        self.record(result.map(|_| ()));
    }

    /// Counts a failure (the first one is kept for the summary); the run goes on.
    fn record(&self, result: Result<(), BoxError>) {
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::SeqCst);
            let msg = e.to_string();
            self.progress.suspend(|| log::error!("index_corpus: {msg}"));
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(msg);
        }
    }
}

/// The LLM client, the model name, and a label for the summary.
fn make_llm(args: &Args) -> Result<(Box<dyn LlmClient>, String, String), BoxError> {
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
            Ok((Box::new(client), model, label))
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

/// Every `.txt` and `.md` file under `dir`, in path order, as documents (stripped, empty ones
/// and duplicates of an earlier one left out), at most `limit` of them.
fn read_corpus(dir: &Path, limit: Option<usize>) -> Result<Vec<Doc>, BoxError> {
    let mut paths = Vec::new();
    collect_files(dir, &mut paths)
        .map_err(|e| format!("reading the corpus folder {}: {e}", dir.display()))?;
    paths.sort();
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    for path in paths {
        if limit.is_some_and(|n| docs.len() >= n) {
            break;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        // Python's str.strip(): nano-graphrag hashes and stores the stripped text.
        let content = text.trim().to_string();
        if content.is_empty() {
            continue;
        }
        let id = compute_mdhash_id(&content, "doc-");
        if !seen.insert(id.clone()) {
            continue;
        }
        let name = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        docs.push(Doc {
            id,
            name,
            content,
            chunk_ids: Vec::new(),
        });
    }
    Ok(docs)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("txt") || e.eq_ignore_ascii_case("md"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// nano-graphrag's `chunking_by_token_size` on whitespace tokens: a window of `max_tokens`
/// tokens starts every `max_tokens - overlap` tokens (the last windows may be short, even
/// contained in the previous one, as there). A chunk's text runs from its first token to its
/// last with the document's own spacing kept, as decoding tiktoken tokens keeps it; its
/// `tokens` is the window's length.
fn chunk_by_tokens(text: &str, max_tokens: usize, overlap: usize) -> Vec<(String, usize)> {
    let base = text.as_ptr() as usize;
    let spans: Vec<(usize, usize)> = text
        .split_whitespace()
        .map(|w| {
            let start = w.as_ptr() as usize - base;
            (start, start + w.len())
        })
        .collect();
    (0..spans.len())
        .step_by(max_tokens - overlap)
        .map(|start| {
            let end = (start + max_tokens).min(spans.len());
            let content = text[spans[start].0..spans[end - 1].1].trim().to_string();
            (content, end - start)
        })
        .collect()
}

/// One community report per document, in nano-graphrag's shape (`report_string`, `report_json`
/// with title, summary, rating and findings), built from the chunk answers.
fn community_report(doc: &Doc, answers: &[String]) -> (String, Value) {
    let title = doc_title(doc);
    let parsed: Vec<(String, Vec<String>)> = answers.iter().map(|a| parse_answer(a)).collect();
    let summary = parsed.first().map(|(s, _)| s.clone()).unwrap_or_default();
    let mut terms: Vec<String> = Vec::new();
    for (_, ts) in &parsed {
        for t in ts {
            if !terms.iter().any(|x| x.eq_ignore_ascii_case(t)) {
                terms.push(t.clone());
            }
        }
    }
    let findings: Vec<Value> = parsed
        .iter()
        .enumerate()
        .map(|(i, (s, ts))| {
            json!({
                "summary": format!("Part {} of {}: {}", i + 1, parsed.len(), ts.join(", ")),
                "explanation": s,
            })
        })
        .collect();
    let mut report_string = format!("# {title}\n\n{summary}\n");
    if !terms.is_empty() {
        report_string.push_str(&format!("\nKey terms: {}\n", terms.join(", ")));
    }
    for f in &findings {
        report_string.push_str(&format!(
            "\n## {}\n\n{}\n",
            f["summary"].as_str().unwrap_or(""),
            f["explanation"].as_str().unwrap_or("")
        ));
    }
    let report = json!({
        "report_string": report_string,
        "report_json": {
            "title": title,
            "summary": summary,
            "rating": (terms.len() as f64).min(10.0),
            "rating_explanation": "number of distinct key terms, at most 10",
            "findings": findings,
        },
        "level": 0,
        "title": title,
        "source": doc.name,
        "full_doc_id": doc.id,
        "chunk_ids": doc.chunk_ids,
        "occurrence": 1.0,
        "sub_communities": [],
    });
    let id = compute_mdhash_id(&doc.id, "report-");
    (id, report)
}

/// The document's first line when it looks like a title (a Markdown heading or a short line),
/// else its file name.
fn doc_title(doc: &Doc) -> String {
    let first = doc.content.lines().next().unwrap_or("").trim();
    let heading = first.trim_start_matches('#').trim();
    if !heading.is_empty() && heading.len() <= 120 && !heading.ends_with('.') {
        heading.to_string()
    } else {
        doc.name.clone()
    }
}

/// The `SUMMARY:` and `KEY TERMS:` lines of an answer; an answer without them is all summary.
fn parse_answer(answer: &str) -> (String, Vec<String>) {
    let mut summary = None;
    let mut terms = Vec::new();
    for line in answer.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix("SUMMARY:") {
            summary = Some(s.trim().to_string());
        } else if let Some(t) = line.strip_prefix("KEY TERMS:") {
            terms = t
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
        }
    }
    (summary.unwrap_or_else(|| answer.trim().to_string()), terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_like_nano_graphrag() {
        let text = (0..25)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join("  ");
        let chunks = chunk_by_tokens(&text, 10, 2);
        let starts: Vec<&str> = chunks
            .iter()
            .map(|(c, _)| c.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(starts, ["w0", "w8", "w16", "w24"]);
        let lens: Vec<usize> = chunks.iter().map(|(_, n)| *n).collect();
        assert_eq!(lens, [10, 10, 9, 1]);
        assert!(chunks[0].0.contains("w0  w1"), "spacing kept");
    }
}
