//! `graphrag-kv`: inspect and edit the key-value namespaces of a GraphRAG index from the shell.
//!
//! Reads the same environment as the library (`STORAGE_KV_BACKEND`, `STORAGE_WORKING_DIR`,
//! `REDIS_*`); `--backend`, `--working-dir` and `--redis-url` override it. Read-only commands
//! (`get`, `keys`, `export`, `stats`) take no write lock on a JSON directory, so they work while
//! an indexer is running; writing commands take it and checkpoint before exiting.
//!
//! `migrate` and `verify` take their two backends from `--from` and `--to` SPECs (`json:DIR`, a
//! Redis URL, or comma-separated cluster node URLs); the rest of the environment (key prefix,
//! compression, TTLs, timeouts, `REDIS_PASSWORD` for URLs without credentials) applies to both.
//!
//! `journal list|replay|discard` show and settle the fallback journals (`KV_FALLBACK=json`) of
//! `--dir`, `KV_FALLBACK_DIR` or `STORAGE_WORKING_DIR/journal`. Read-only commands on Redis warn
//! on stderr when journals hold writes of the namespace that are not in Redis yet.
//!
//! Exit status: 0 on success, 1 when `get` finds no value or `verify` finds differences, 2 on
//! any error (one line on stderr, `graphrag-kv: <error>`).

#![deny(missing_docs)]

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use graphrag_kv::backend::json_file::{parse_kv_file, to_python_json, write_atomically};
use graphrag_kv::fallback::{self, JournalInfo, JournalTarget};
use graphrag_kv::metrics::{server_info, ServerInfo};
use graphrag_kv::migrate::{self, MigrateOptions, Progress, Spec, VerifyReport};
use graphrag_kv::{BackendKind, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

/// How many entries `import` writes per `upsert`, and `export` reads per `get_by_ids`.
const BATCH: usize = 1000;

/// The path shown in errors about standard output (and recognised for a closed pipe).
const STDOUT: &str = "<stdout>";

/// The path shown in errors about standard input (`import NS -`).
const STDIN: &str = "<stdin>";

/// Exit status of a failed command.
const EXIT_ERROR: u8 = 2;

/// Exit status of `get` when the id holds no value.
const EXIT_NOT_FOUND: u8 = 1;

/// Exit status of `verify` when the two backends differ.
const EXIT_DIFFERENT: u8 = 1;

/// Ids of each kind `verify` prints per namespace without `--json` (the counts are complete).
const SHOWN_IDS: usize = 20;

/// Key-value storage of a GraphRAG index: nano-graphrag's kv_store JSON files or Redis.
///
/// Configuration comes from the environment (STORAGE_KV_BACKEND, STORAGE_WORKING_DIR,
/// REDIS_URL, REDIS_PASSWORD, REDIS_KEY_PREFIX, ...); the options below override it.
/// Exit status: 0 success, 1 `get` found nothing or `verify` found differences, 2 error.
#[derive(Debug, Parser)]
#[command(name = "graphrag-kv", version)]
struct Cli {
    /// Backend: json or redis [env: STORAGE_KV_BACKEND; default: json].
    #[arg(long, global = true, value_name = "json|redis", value_parser = parse_backend)]
    backend: Option<BackendKind>,

    /// Directory of the kv_store_{namespace}.json files [env: STORAGE_WORKING_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    working_dir: Option<PathBuf>,

    /// Redis server URL [env: REDIS_URL]. Prefer REDIS_PASSWORD for the password: command
    /// lines are visible to other users.
    #[arg(long, global = true, value_name = "URL")]
    redis_url: Option<String>,

    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Store one value (JSON) under an id, then checkpoint.
    Put {
        /// Namespace, e.g. full_docs.
        namespace: String,
        /// Id of the value.
        id: String,
        /// The value, as JSON text (e.g. '{"content": "..."}').
        json: String,
    },
    /// Print the value of an id as JSON; exit 1 when there is none.
    Get {
        /// Namespace.
        namespace: String,
        /// Id of the value.
        id: String,
        /// Keep only these top-level fields of an object value (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "FIELD,...")]
        fields: Option<Vec<String>>,
    },
    /// Print every id of a namespace, sorted, one per line.
    Keys {
        /// Namespace.
        namespace: String,
        /// Print one JSON array instead (safe for ids holding newlines).
        #[arg(long)]
        json: bool,
    },
    /// Delete ids (missing ones are ignored), then checkpoint.
    Delete {
        /// Namespace.
        namespace: String,
        /// Ids to delete.
        #[arg(required = true, num_args = 1..)]
        ids: Vec<String>,
    },
    /// Delete every id of a namespace (and nothing else), then checkpoint.
    Clear {
        /// Namespace.
        namespace: String,
    },
    /// Store every entry of a nano-graphrag kv_store JSON file ('-' for stdin), then
    /// checkpoint.
    Import {
        /// Namespace.
        namespace: String,
        /// The kv_store_{namespace}.json file to read, or '-'.
        file: PathBuf,
    },
    /// Write a namespace as a nano-graphrag kv_store JSON file (ids sorted), to FILE
    /// (replaced atomically) or stdout.
    Export {
        /// Namespace.
        namespace: String,
        /// File to write; stdout when absent.
        file: Option<PathBuf>,
    },
    /// Show key count, approximate size and TTL of namespaces, and for Redis the server's
    /// memory, limit, eviction policy and evictions.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this namespace (repeatable); default: every namespace holding data.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
    },
    /// Copy namespaces from one backend to another, in batches; ids already there with an
    /// equal value are skipped, so it can be re-run. Keeps remaining TTLs between Redis servers.
    Migrate {
        /// Source: json:DIR, a redis:// URL, or comma-separated cluster node URLs.
        #[arg(long, value_name = "SPEC")]
        from: String,
        /// Target, written as the source is: json:DIR, a redis:// URL, or cluster node URLs.
        #[arg(long, value_name = "SPEC")]
        to: String,
        /// Only this namespace (repeatable); default: every namespace holding data in the source.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Ids per read and write batch.
        #[arg(long, value_name = "N", default_value_t = migrate::DEFAULT_BATCH)]
        batch: usize,
    },
    /// Compare two backends: list missing, different and extra ids of the target per
    /// namespace; exit 1 when anything differs.
    Verify {
        /// The reference: json:DIR, a redis:// URL, or comma-separated cluster node URLs.
        #[arg(long, value_name = "SPEC")]
        from: String,
        /// The copy to check, written as the source is.
        #[arg(long, value_name = "SPEC")]
        to: String,
        /// Only this namespace (repeatable); default: every namespace holding data in either.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
        /// Ids per read batch.
        #[arg(long, value_name = "N", default_value_t = migrate::DEFAULT_BATCH)]
        batch: usize,
        /// Print one JSON document with every differing id instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Show, replay or delete the fallback journals (KV_FALLBACK=json): writes made while
    /// Redis was unreachable, not in Redis yet.
    Journal {
        /// What to do with the journals.
        #[command(subcommand)]
        action: JournalAction,
    },
}

/// The `journal` subcommands.
#[derive(Debug, Subcommand)]
enum JournalAction {
    /// Show each journal: path, owner process alive or gone, target, key prefix, creation
    /// time, writes per namespace.
    List {
        /// Journal directory [env: KV_FALLBACK_DIR; default: STORAGE_WORKING_DIR/journal].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Print a JSON array instead.
        #[arg(long)]
        json: bool,
    },
    /// Replay the orphaned journals (no live process holds them) into the configured Redis,
    /// oldest first; checkpoint; remove them. Journals of another target or key prefix, or
    /// without a header, are refused unless --force.
    Replay {
        /// Journal directory [env: KV_FALLBACK_DIR; default: STORAGE_WORKING_DIR/journal].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Replay journals written for another target or prefix, or without a header, into
        /// the configured one.
        #[arg(long)]
        force: bool,
    },
    /// Delete orphaned journals (all, or the FILEs named): their writes are lost. Journals
    /// of live processes are kept.
    Discard {
        /// Journal directory [env: KV_FALLBACK_DIR; default: STORAGE_WORKING_DIR/journal].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
        /// Only these journal files (names or paths).
        files: Vec<PathBuf>,
    },
}

impl Command {
    /// True for commands that only read, opened without the JSON directory's write lock.
    fn is_read_only(&self) -> bool {
        matches!(
            self,
            Command::Get { .. }
                | Command::Keys { .. }
                | Command::Export { .. }
                | Command::Stats { .. }
        )
    }
}

/// Parses `--backend`, with the library's message.
fn parse_backend(value: &str) -> Result<BackendKind, String> {
    BackendKind::parse("--backend", value).map_err(|_| "expected json or redis".to_string())
}

/// Parses the command line, runs it, and turns the outcome into an exit status.
fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) if is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e.to_string());
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Help and version go to stdout with status 0; any other parse error is one line on stderr
/// with status 2.
fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let names: Vec<String> = Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            report(&format!(
                "no command given; expected one of: {} (see 'graphrag-kv --help')",
                names.join(", ")
            ));
            ExitCode::from(EXIT_ERROR)
        }
        _ => {
            report(&one_line_clap_error(&e.render().to_string()));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Folds clap's multi-line error text into one line: the message, its details (missing
/// arguments, tips) and the usage line.
fn one_line_clap_error(rendered: &str) -> String {
    let mut message = String::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
            break;
        }
        if line.starts_with("For more information") {
            break;
        }
        if message.is_empty() {
            message.push_str(line.strip_prefix("error:").unwrap_or(line).trim());
        } else if message.ends_with(':') {
            message.push(' ');
            message.push_str(line);
        } else {
            message.push_str(if line.starts_with("tip:") { "; " } else { ", " });
            message.push_str(line);
        }
    }
    if message.is_empty() {
        message.push_str("invalid arguments");
    }
    match usage {
        Some(u) => format!("{message} (usage: {u}; see 'graphrag-kv --help')"),
        None => format!("{message} (see 'graphrag-kv --help')"),
    }
}

/// Prints `graphrag-kv: <message>` as one line on stderr.
fn report(message: &str) {
    let one_line: String = message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let _ = writeln!(io::stderr(), "graphrag-kv: {one_line}");
}

/// True when writing to stdout failed because the reader went away (`... | head -1`).
fn is_closed_stdout(e: &Error) -> bool {
    matches!(e, Error::Io { path, source, .. }
        if path == Path::new(STDOUT) && source.kind() == io::ErrorKind::BrokenPipe)
}

/// The configuration: the environment, then the command-line overrides.
fn config(cli: &Cli) -> graphrag_kv::Result<StoreConfig> {
    let mut builder = StoreConfigBuilder::from_env()?;
    if let Some(backend) = cli.backend {
        builder = builder.backend(backend);
    }
    if let Some(dir) = &cli.working_dir {
        builder = builder.working_dir(dir);
    }
    if let Some(url) = &cli.redis_url {
        builder = builder.redis_url(url.trim());
    }
    builder.build()
}

/// Runs one command. `Ok` carries the exit status (0, or 1 for `get` of a missing id and for
/// `verify` finding differences).
fn run(cli: Cli) -> graphrag_kv::Result<ExitCode> {
    match cli.command {
        Command::Migrate {
            from,
            to,
            namespaces,
            batch,
        } => return run_migrate(&from, &to, namespaces, batch),
        Command::Verify {
            from,
            to,
            namespaces,
            batch,
            json,
        } => return run_verify(&from, &to, &namespaces, batch, json),
        Command::Journal { ref action } => return run_journal(&config(&cli)?, action),
        _ => {}
    }
    let config = config(&cli)?;
    let storage = if cli.command.is_read_only() {
        Storage::open_read_only(&config)?
    } else {
        Storage::open(&config)?
    };
    // Whether Redis was already unreachable before this command wrote anything: then every
    // write of the command went to the fallback journal (see `checkpoint`).
    let offline_at_start = storage.fallback().is_some_and(|f| !f.is_online());
    let checkpoint = |store: &dyn KvStore| finish_writes(&storage, store, offline_at_start);
    let mut out = io::BufWriter::new(io::stdout().lock());
    let code = match cli.command {
        Command::Put {
            namespace,
            id,
            json,
        } => {
            let store = storage.namespace(&namespace)?;
            let value = serde_json::from_str::<Value>(&json).map_err(|e| Error::Encode {
                namespace: namespace.clone(),
                key: id.clone(),
                reason: format!("the value argument is not valid JSON: {e}"),
            })?;
            store.upsert(vec![(id, value)])?;
            checkpoint(&*store)?;
            ExitCode::SUCCESS
        }
        Command::Get {
            namespace,
            id,
            fields,
        } => {
            let store = storage.namespace(&namespace)?;
            warn_journaled(&config, Some(&namespace));
            let value = match &fields {
                None => store.get_by_id(&id)?,
                Some(fields) => store
                    .get_by_ids(std::slice::from_ref(&id), Some(fields))?
                    .pop()
                    .flatten(),
            };
            match value {
                Some(v) => {
                    let mut bytes = to_python_json(&v);
                    bytes.push(b'\n');
                    stdout(out.write_all(&bytes))?;
                    ExitCode::SUCCESS
                }
                None => {
                    report(&format!(
                        "no value for id {id:?} in namespace {namespace:?}"
                    ));
                    ExitCode::from(EXIT_NOT_FOUND)
                }
            }
        }
        Command::Keys { namespace, json } => {
            let keys = sorted_keys(&*storage.namespace(&namespace)?)?;
            warn_journaled(&config, Some(&namespace));
            if json {
                let text = serde_json::to_string(&keys).expect("serializing strings");
                stdout(writeln!(out, "{text}"))?;
            } else {
                for k in &keys {
                    stdout(writeln!(out, "{k}"))?;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Delete { namespace, ids } => {
            let store = storage.namespace(&namespace)?;
            store.delete_by_ids(&ids)?;
            checkpoint(&*store)?;
            ExitCode::SUCCESS
        }
        Command::Clear { namespace } => {
            let store = storage.namespace(&namespace)?;
            store.clear()?;
            checkpoint(&*store)?;
            ExitCode::SUCCESS
        }
        Command::Import { namespace, file } => {
            let store = storage.namespace(&namespace)?;
            let count = import(&*store, &file)?;
            checkpoint(&*store)?;
            let _ = writeln!(
                io::stderr(),
                "imported {count} entries into namespace {namespace:?}"
            );
            ExitCode::SUCCESS
        }
        Command::Export { namespace, file } => {
            let bytes = export(&*storage.namespace(&namespace)?)?;
            warn_journaled(&config, Some(&namespace));
            match file {
                Some(path) => write_atomically(&path, &bytes)?,
                None => stdout(out.write_all(&bytes))?,
            }
            ExitCode::SUCCESS
        }
        Command::Migrate { .. } | Command::Verify { .. } | Command::Journal { .. } => {
            unreachable!("handled above")
        }
        Command::Stats { json, namespaces } => {
            let names = if namespaces.is_empty() {
                storage.list_namespaces()?
            } else {
                namespaces
            };
            let stats = names
                .iter()
                .map(|ns| storage.namespace(ns)?.stats())
                .collect::<graphrag_kv::Result<Vec<_>>>()?;
            warn_journaled(&config, None);
            if json {
                let mut per_ns = Map::new();
                for s in &stats {
                    per_ns.insert(
                        s.namespace.clone(),
                        serde_json::json!({
                            "keys": s.keys,
                            "bytes": s.bytes,
                            "ttl_seconds": s.ttl_seconds,
                            "bytes_sampled": s.bytes_sampled,
                        }),
                    );
                }
                let mut doc = serde_json::json!({
                    "backend": storage.backend().as_str(),
                    "namespaces": per_ns,
                });
                if let Some(server) = server_figures(&storage)? {
                    doc["server"] = match server {
                        Ok(info) => serde_json::json!({
                            "used_memory": info.used_memory,
                            "maxmemory": info.maxmemory,
                            "maxmemory_policy": info.maxmemory_policy,
                            "evicted_keys": info.evicted_keys,
                            "expired_keys": info.expired_keys,
                            "keys": info.keys,
                            "nodes": info.nodes,
                        }),
                        Err(why) => serde_json::json!({ "unavailable": why }),
                    };
                }
                let mut bytes = to_python_json(&doc);
                bytes.push(b'\n');
                stdout(out.write_all(&bytes))?;
            } else {
                let server = server_figures(&storage)?;
                stdout(write_stats_table(
                    &mut out,
                    storage.backend(),
                    &stats,
                    server.as_ref(),
                ))?;
            }
            ExitCode::SUCCESS
        }
    };
    stdout(out.flush())?;
    Ok(code)
}

/// The checkpoint that ends a writing command. With the fallback, a command that found Redis
/// unreachable before its first write and still finds it so has put every write of its own in
/// the fsynced journal: they are safe and will be replayed, so it succeeds with a warning
/// rather than failing as `index_done_callback` does (which cannot confirm writes Redis took
/// before the outage, and says so). Any other checkpoint failure is the command's error.
fn finish_writes(
    storage: &Storage,
    store: &dyn KvStore,
    offline_at_start: bool,
) -> graphrag_kv::Result<()> {
    match store.index_done_callback() {
        Err(e) if offline_at_start && storage.fallback().is_some_and(|f| !f.is_online()) => {
            report(&format!(
                "warning: written to the fallback journal only, to be replayed when Redis \
                 answers: {e}"
            ));
            Ok(())
        }
        other => other,
    }
}

/// The journal directory: `--dir`, else `KV_FALLBACK_DIR`, else the working directory's
/// `journal` (after `--working-dir`).
fn journal_dir(config: &StoreConfig, dir: Option<&Path>) -> PathBuf {
    match (dir, std::env::var_os("KV_FALLBACK_DIR")) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(d)) if !d.is_empty() => PathBuf::from(d),
        _ => config.json.working_dir.join("journal"),
    }
}

/// Warns on stderr when journals of the configured Redis target (or without a header) hold
/// writes of `namespace` (of any namespace for `None`): read-only commands do not replay them,
/// so what they print may be incomplete or stale.
fn warn_journaled(config: &StoreConfig, namespace: Option<&str>) {
    if config.backend != BackendKind::Redis {
        return;
    }
    let dir = journal_dir(config, None);
    let target = JournalTarget::from_redis(&config.redis);
    let journals = match fallback::list_journals(&dir) {
        Ok(j) => j,
        Err(e) => {
            report(&format!(
                "warning: cannot look for pending journal writes: {e}"
            ));
            return;
        }
    };
    let (mut writes, mut files) = (0, 0);
    for j in &journals {
        if j.header.as_ref().is_some_and(|h| !target.matches(h)) {
            continue;
        }
        let n = match namespace {
            Some(ns) => j.writes.get(ns).copied().unwrap_or(0),
            None => j.total_writes(),
        };
        if n > 0 {
            writes += n;
            files += 1;
        }
    }
    if writes == 0 {
        return;
    }
    let what = match namespace {
        Some(ns) => format!("to namespace {ns:?} "),
        None => String::new(),
    };
    report(&format!(
        "warning: {writes} journaled {} {what}{} not in Redis yet ({} in {}); this output may be \
         incomplete or stale: see 'graphrag-kv journal list'",
        if writes == 1 { "write" } else { "writes" },
        if writes == 1 { "is" } else { "are" },
        count(files as u64, "journal"),
        dir.display()
    ));
}

/// Runs `journal list|replay|discard`.
fn run_journal(config: &StoreConfig, action: &JournalAction) -> graphrag_kv::Result<ExitCode> {
    let target = JournalTarget::from_redis(&config.redis);
    let mut out = io::BufWriter::new(io::stdout().lock());
    match action {
        JournalAction::List { dir, json } => {
            let dir = journal_dir(config, dir.as_deref());
            let journals = fallback::list_journals(&dir)?;
            if *json {
                let doc: Vec<Value> = journals.iter().map(|j| journal_json(j, &target)).collect();
                let text = serde_json::to_string_pretty(&doc).expect("serializing JSON");
                stdout(writeln!(out, "{text}"))?;
            } else if journals.is_empty() {
                stdout(writeln!(out, "no journals in {}", dir.display()))?;
            } else {
                for j in &journals {
                    stdout(write_journal(&mut out, j, &target))?;
                }
            }
        }
        JournalAction::Replay { dir, force } => {
            let dir = journal_dir(config, dir.as_deref());
            let mut redis = config.clone();
            redis.backend = BackendKind::Redis;
            redis.fallback = None;
            redis.write_behind = None;
            redis.dual = None;
            let storage = Storage::open(&redis)?;
            let open = move |ns: &str| storage.namespace(ns);
            let replayed = fallback::replay_journals(&dir, &target, &open, *force)?;
            if replayed.is_empty() {
                stdout(writeln!(out, "no orphaned journals in {}", dir.display()))?;
            }
            for r in &replayed {
                stdout(writeln!(
                    out,
                    "replayed {} ({}) into {} (prefix {:?}); removed",
                    r.path.display(),
                    count(r.writes as u64, "write"),
                    target.display,
                    target.prefix
                ))?;
            }
        }
        JournalAction::Discard { dir, yes, files } => {
            let dir = journal_dir(config, dir.as_deref());
            if !*yes {
                let journals = fallback::list_journals(&dir)?;
                let chosen: Vec<&JournalInfo> = journals
                    .iter()
                    .filter(|j| {
                        !j.in_use
                            && (files.is_empty()
                                || files.iter().any(|f| f.file_name() == j.path.file_name()))
                    })
                    .collect();
                let writes: usize = chosen.iter().map(|j| j.total_writes()).sum();
                return Err(Error::Journal {
                    path: dir,
                    reason: format!(
                        "refusing to delete {} holding {} without --yes (they are lost; see \
                         'graphrag-kv journal list')",
                        count(chosen.len() as u64, "orphaned journal"),
                        count(writes as u64, "write")
                    ),
                });
            }
            let done = fallback::discard_journals(&dir, files)?;
            if done.removed.is_empty() && done.in_use.is_empty() {
                stdout(writeln!(out, "no orphaned journals in {}", dir.display()))?;
            }
            for (path, writes) in &done.removed {
                stdout(writeln!(
                    out,
                    "discarded {} ({} lost)",
                    path.display(),
                    count(*writes as u64, "write")
                ))?;
            }
            for path in &done.in_use {
                stdout(writeln!(
                    out,
                    "kept {}: a live process holds it",
                    path.display()
                ))?;
            }
        }
    }
    stdout(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// One journal as text, for `journal list`.
fn write_journal(out: &mut impl Write, j: &JournalInfo, target: &JournalTarget) -> io::Result<()> {
    writeln!(out, "{}", j.path.display())?;
    let pid = j
        .pid
        .map_or("pid unknown".to_string(), |p| format!("pid {p}"));
    if j.in_use {
        writeln!(out, "  owner: {pid}, alive (holds the journal's lock)")?;
    } else {
        writeln!(out, "  owner: {pid}, gone (orphaned: replayed by the next store opened on this directory, or by 'journal replay')")?;
    }
    match &j.header {
        Some(h) => {
            let mark = if target.matches(h) {
                "the configured target"
            } else {
                "NOT the configured target"
            };
            writeln!(
                out,
                "  target: {} (prefix {:?}): {mark}",
                h.target, h.prefix
            )?;
            writeln!(out, "  created: {}", h.created)?;
        }
        None => writeln!(
            out,
            "  target: unknown (no header: written by an older version)"
        )?,
    }
    if let Some(e) = &j.error {
        writeln!(out, "  unreadable: {e}")?;
    } else if j.writes.is_empty() {
        writeln!(out, "  writes: none")?;
    } else {
        let per_ns: Vec<String> = j.writes.iter().map(|(ns, n)| format!("{ns} {n}")).collect();
        writeln!(out, "  writes: {}", per_ns.join(", "))?;
    }
    if j.torn_bytes > 0 {
        writeln!(
            out,
            "  torn last line: {} bytes (never acknowledged; ignored)",
            j.torn_bytes
        )?;
    }
    Ok(())
}

/// One journal as JSON, for `journal list --json`.
fn journal_json(j: &JournalInfo, target: &JournalTarget) -> Value {
    serde_json::json!({
        "path": j.path.display().to_string(),
        "pid": j.pid,
        "owner_alive": j.in_use,
        "target": j.header.as_ref().map(|h| h.target.clone()),
        "prefix": j.header.as_ref().map(|h| h.prefix.clone()),
        "created": j.header.as_ref().map(|h| h.created.clone()),
        "matches_configured_target": j.header.as_ref().map(|h| target.matches(h)),
        "writes": j.writes,
        "total_writes": j.total_writes(),
        "torn_bytes": j.torn_bytes,
        "error": j.error,
    })
}

/// Every id of `store`, sorted.
fn sorted_keys(store: &dyn KvStore) -> graphrag_kv::Result<Vec<String>> {
    let mut keys = store.all_keys()?;
    keys.sort_unstable();
    Ok(keys)
}

/// Upserts every entry of a kv_store file (or stdin for `-`) in batches (the caller
/// checkpoints). Returns the number of entries.
fn import(store: &dyn KvStore, file: &Path) -> graphrag_kv::Result<usize> {
    let (shown, bytes) = if file == Path::new("-") {
        let mut bytes = Vec::new();
        io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| io_error("reading", STDIN, e))?;
        (PathBuf::from(STDIN), bytes)
    } else {
        let bytes = std::fs::read(file).map_err(|e| io_error("reading", file, e))?;
        (file.to_path_buf(), bytes)
    };
    let map = parse_kv_file(&shown, &bytes)?;
    let count = map.len();
    let mut entries = map.into_iter().peekable();
    while entries.peek().is_some() {
        store.upsert(entries.by_ref().take(BATCH).collect())?;
    }
    Ok(count)
}

/// The namespace as nano-graphrag writes a kv_store file, ids sorted. Ids that disappear
/// between listing and reading (deleted or expired meanwhile) are left out.
fn export(store: &dyn KvStore) -> graphrag_kv::Result<Vec<u8>> {
    let keys = sorted_keys(store)?;
    let mut map = Map::new();
    for chunk in keys.chunks(BATCH) {
        for (id, value) in chunk.iter().zip(store.get_by_ids(chunk, None)?) {
            if let Some(v) = value {
                map.insert(id.clone(), v);
            }
        }
    }
    Ok(to_python_json(&map))
}

/// The server's INFO figures for a Redis backend (`None` for JSON). An ACL user that may not
/// run INFO gets `Some(Err(why))`: the namespace figures are still worth printing.
fn server_figures(storage: &Storage) -> graphrag_kv::Result<Option<Result<ServerInfo, String>>> {
    let Some(shared) = storage.redis() else {
        return Ok(None);
    };
    match server_info(shared) {
        Ok(info) => Ok(Some(Ok(info))),
        Err(e) if e.is_permission_denied() => {
            Ok(Some(Err(format!("the Redis user may not run INFO ({e})"))))
        }
        Err(e) => Err(e),
    }
}

/// Bytes as `123456789 (117.7 MiB)`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{n} ({v:.1} {unit})")
}

/// Writes the stats as an aligned table; `~` marks sizes estimated from a sample. For Redis,
/// the server's figures follow the table.
fn write_stats_table(
    out: &mut impl Write,
    backend: BackendKind,
    stats: &[graphrag_kv::NamespaceStats],
    server: Option<&Result<ServerInfo, String>>,
) -> io::Result<()> {
    writeln!(out, "backend: {}", backend.as_str())?;
    let rows: Vec<[String; 4]> = stats
        .iter()
        .map(|s| {
            [
                s.namespace.clone(),
                s.keys.to_string(),
                format!("{}{}", if s.bytes_sampled { "~" } else { "" }, s.bytes),
                if s.ttl_seconds == 0 {
                    "none".to_string()
                } else {
                    format!("{}s", s.ttl_seconds)
                },
            ]
        })
        .collect();
    let header = ["NAMESPACE", "KEYS", "BYTES", "TTL"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )?;
    }
    if stats.iter().any(|s| s.bytes_sampled) {
        writeln!(
            out,
            "~ sampled: value bytes of a sample of keys, scaled to the key count"
        )?;
    }
    match server {
        None => {}
        Some(Err(why)) => writeln!(out, "server: figures unavailable: {why}")?,
        Some(Ok(info)) => {
            let nodes = if info.nodes > 1 {
                format!(" (sum of {} masters)", info.nodes)
            } else {
                String::new()
            };
            writeln!(out, "server{nodes}:")?;
            writeln!(out, "  used_memory       {}", human_bytes(info.used_memory))?;
            let limit = if info.maxmemory == 0 {
                "0 (no limit)".to_string()
            } else {
                human_bytes(info.maxmemory)
            };
            writeln!(out, "  maxmemory         {limit}")?;
            writeln!(out, "  maxmemory-policy  {}", info.maxmemory_policy)?;
            writeln!(
                out,
                "  evicted_keys      {} (since the server started, all namespaces)",
                info.evicted_keys
            )?;
            writeln!(
                out,
                "  keys              {} (all prefixes and databases)",
                info.keys
            )?;
        }
    }
    Ok(())
}

/// `1 id`, `2 ids`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `migrate`: opens the source read-only and the target for writing, copies, prints one line
/// per namespace and a total.
fn run_migrate(
    from: &str,
    to: &str,
    namespaces: Vec<String>,
    batch: usize,
) -> graphrag_kv::Result<ExitCode> {
    let (from_spec, to_spec) = (parse_spec("--from", from)?, parse_spec("--to", to)?);
    let source = open_spec(&from_spec, true)?;
    let target = open_spec(&to_spec, false)?;
    let options = MigrateOptions::default()
        .namespaces(namespaces)
        .batch(batch);
    let mut progress = CliProgress::new("migrate");
    let report = migrate::migrate(&source, &target, &options, &mut progress)?;
    drop(progress);
    let mut out = io::BufWriter::new(io::stdout().lock());
    for r in &report.namespaces {
        let mut line = format!(
            "{}: {} in the source: {} copied, {} already equal",
            r.namespace,
            count(r.source_ids, "id"),
            r.copied,
            r.skipped
        );
        if r.vanished > 0 {
            line.push_str(&format!(", {} gone before they were read", r.vanished));
        }
        if r.ttl_kept > 0 {
            line.push_str(&format!("; remaining TTL kept on {}", r.ttl_kept));
        }
        if r.ttl_dropped > 0 {
            line.push_str(&format!(
                "; TTL dropped on {} (a JSON store keeps no expiry)",
                r.ttl_dropped
            ));
        }
        stdout(writeln!(out, "{line}"))?;
    }
    stdout(writeln!(
        out,
        "migrated {from_spec} -> {to_spec}: {}, {} copied, {} already equal",
        count(report.namespaces.len() as u64, "namespace"),
        count(report.copied(), "id"),
        report.skipped()
    ))?;
    stdout(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// `verify`: opens both read-only, compares, prints the differences; exit 1 if any.
fn run_verify(
    from: &str,
    to: &str,
    namespaces: &[String],
    batch: usize,
    json: bool,
) -> graphrag_kv::Result<ExitCode> {
    let (from_spec, to_spec) = (parse_spec("--from", from)?, parse_spec("--to", to)?);
    let source = open_spec(&from_spec, true)?;
    let target = open_spec(&to_spec, true)?;
    let mut progress = CliProgress::new("verify");
    let report = migrate::verify(&source, &target, namespaces, batch, &mut progress)?;
    drop(progress);
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        let mut bytes = to_python_json(&serde_json::json!({
            "equal": report.is_equal(),
            "namespaces": report.namespaces,
        }));
        bytes.push(b'\n');
        stdout(out.write_all(&bytes))?;
    } else {
        stdout(write_verify_report(&mut out, &report))?;
        let verdict = if report.is_equal() {
            "equal".to_string()
        } else {
            let n = report.namespaces.iter().filter(|d| !d.is_equal()).count();
            format!("DIFFERENT in {}", count(n as u64, "namespace"))
        };
        stdout(writeln!(out, "verify {from_spec} -> {to_spec}: {verdict}"))?;
    }
    stdout(out.flush())?;
    Ok(if report.is_equal() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    })
}

/// One line per namespace, then up to [`SHOWN_IDS`] ids of each kind of difference.
fn write_verify_report(out: &mut impl Write, report: &VerifyReport) -> io::Result<()> {
    for d in &report.namespaces {
        if d.is_equal() {
            writeln!(
                out,
                "{}: equal ({})",
                d.namespace,
                count(d.source_ids, "id")
            )?;
            continue;
        }
        writeln!(
            out,
            "{}: {} in the source, {} in the target: {} missing, {} different, {} extra",
            d.namespace,
            count(d.source_ids, "id"),
            d.target_ids,
            d.missing.len(),
            d.different.len(),
            d.extra.len()
        )?;
        for (kind, ids) in [
            ("missing", &d.missing),
            ("different", &d.different),
            ("extra", &d.extra),
        ] {
            for id in ids.iter().take(SHOWN_IDS) {
                writeln!(out, "  {kind} {id:?}")?;
            }
            if ids.len() > SHOWN_IDS {
                writeln!(
                    out,
                    "  ... and {} more {kind} (all of them with --json)",
                    ids.len() - SHOWN_IDS
                )?;
            }
        }
    }
    Ok(())
}

/// Parses a SPEC option, naming the option in the error.
fn parse_spec(option: &str, spec: &str) -> graphrag_kv::Result<Spec> {
    Spec::parse(spec).map_err(|e| match e {
        Error::Config {
            value, expected, ..
        } => Error::Config {
            variable: option.to_string(),
            value,
            expected,
        },
        other => other,
    })
}

/// Opens the backend a SPEC names, over the environment's other settings. A JSON source must
/// exist: a typo must not read as an empty backend.
fn open_spec(spec: &Spec, read_only: bool) -> graphrag_kv::Result<Storage> {
    if let (Spec::Json(dir), true) = (spec, read_only) {
        if !dir.is_dir() {
            return Err(io_error(
                "reading directory",
                dir,
                io::Error::new(io::ErrorKind::NotFound, "no such directory"),
            ));
        }
    }
    let config = spec.config(StoreConfigBuilder::from_env()?)?;
    if read_only {
        Storage::open_read_only(&config)
    } else {
        Storage::open(&config)
    }
}

/// Progress on stderr: a bar on a terminal, a line per tenth otherwise (logs, CI).
struct CliProgress {
    verb: &'static str,
    bar: Option<ProgressBar>,
    terminal: bool,
    namespace: String,
    total: u64,
    done: u64,
    next_line: u64,
}

impl CliProgress {
    fn new(verb: &'static str) -> CliProgress {
        CliProgress {
            verb,
            bar: None,
            terminal: io::stderr().is_terminal(),
            namespace: String::new(),
            total: 0,
            done: 0,
            next_line: 0,
        }
    }
}

impl Progress for CliProgress {
    fn start(&mut self, namespace: &str, total: u64) {
        self.namespace = namespace.to_string();
        self.total = total;
        self.done = 0;
        if self.terminal {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} ids ({per_sec}, {eta} left)",
                )
                .expect("a valid progress template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("{} {namespace}", self.verb));
            self.bar = Some(bar);
        } else {
            let _ = writeln!(
                io::stderr(),
                "{} {namespace}: {}",
                self.verb,
                count(total, "id")
            );
            self.next_line = total / 10;
        }
    }

    fn advance(&mut self, ids: u64) {
        self.done += ids;
        if let Some(bar) = &self.bar {
            bar.inc(ids);
        } else if self.total >= 10 && self.done >= self.next_line && self.done < self.total {
            let _ = writeln!(
                io::stderr(),
                "{} {}: {}/{} ids",
                self.verb,
                self.namespace,
                self.done,
                self.total
            );
            self.next_line = self.done + self.total / 10;
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        } else {
            let _ = writeln!(
                io::stderr(),
                "{} {}: {}/{} ids, done",
                self.verb,
                self.namespace,
                self.done,
                self.total
            );
        }
    }
}

/// Maps a failed write to standard output to the library's error type.
fn stdout<T>(result: io::Result<T>) -> graphrag_kv::Result<T> {
    result.map_err(|e| io_error("writing", STDOUT, e))
}

/// An [`Error::Io`] for `path`.
fn io_error(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.as_ref().to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_after_subcommand() {
        let cli = Cli::try_parse_from([
            "graphrag-kv",
            "keys",
            "ns",
            "--backend",
            "redis",
            "--working-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(cli.backend, Some(BackendKind::Redis));
        assert_eq!(cli.working_dir, Some(PathBuf::from("/tmp/x")));
    }
}
