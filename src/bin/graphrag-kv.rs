//! `graphrag-kv`: inspect and edit the key-value namespaces of a GraphRAG index from the shell.
//!
//! Reads the same environment as the library (`STORAGE_KV_BACKEND`, `STORAGE_WORKING_DIR`,
//! `REDIS_*`); `--backend`, `--working-dir` and `--redis-url` override it. Read-only commands
//! (`get`, `keys`, `export`, `stats`) take no write lock on a JSON directory, so they work while
//! an indexer is running; writing commands take it and checkpoint before exiting.
//!
//! Exit status: 0 on success, 1 when `get` finds no value, 2 on any error (one line on stderr,
//! `graphrag-kv: <error>`).

#![deny(missing_docs)]

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use graphrag_kv::backend::json_file::{parse_kv_file, to_python_json, write_atomically};
use graphrag_kv::{BackendKind, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder};
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

/// Key-value storage of a GraphRAG index: nano-graphrag's kv_store JSON files or Redis.
///
/// Configuration comes from the environment (STORAGE_KV_BACKEND, STORAGE_WORKING_DIR,
/// REDIS_URL, REDIS_PASSWORD, REDIS_KEY_PREFIX, ...); the options below override it.
/// Exit status: 0 success, 1 `get` found nothing, 2 error.
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
    /// Show key count, approximate size and TTL of namespaces.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this namespace (repeatable); default: every namespace holding data.
        #[arg(long = "namespace", value_name = "NS")]
        namespaces: Vec<String>,
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

/// Runs one command. `Ok` carries the exit status (0, or 1 for `get` of a missing id).
fn run(cli: Cli) -> graphrag_kv::Result<ExitCode> {
    let config = config(&cli)?;
    let storage = if cli.command.is_read_only() {
        Storage::open_read_only(&config)?
    } else {
        Storage::open(&config)?
    };
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
            store.index_done_callback()?;
            ExitCode::SUCCESS
        }
        Command::Get {
            namespace,
            id,
            fields,
        } => {
            let store = storage.namespace(&namespace)?;
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
            store.index_done_callback()?;
            ExitCode::SUCCESS
        }
        Command::Clear { namespace } => {
            let store = storage.namespace(&namespace)?;
            store.clear()?;
            store.index_done_callback()?;
            ExitCode::SUCCESS
        }
        Command::Import { namespace, file } => {
            let store = storage.namespace(&namespace)?;
            let count = import(&*store, &file)?;
            let _ = writeln!(
                io::stderr(),
                "imported {count} entries into namespace {namespace:?}"
            );
            ExitCode::SUCCESS
        }
        Command::Export { namespace, file } => {
            let bytes = export(&*storage.namespace(&namespace)?)?;
            match file {
                Some(path) => write_atomically(&path, &bytes)?,
                None => stdout(out.write_all(&bytes))?,
            }
            ExitCode::SUCCESS
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
                let doc = serde_json::json!({
                    "backend": storage.backend().as_str(),
                    "namespaces": per_ns,
                });
                let mut bytes = to_python_json(&doc);
                bytes.push(b'\n');
                stdout(out.write_all(&bytes))?;
            } else {
                stdout(write_stats_table(&mut out, storage.backend(), &stats))?;
            }
            ExitCode::SUCCESS
        }
    };
    stdout(out.flush())?;
    Ok(code)
}

/// Every id of `store`, sorted.
fn sorted_keys(store: &dyn KvStore) -> graphrag_kv::Result<Vec<String>> {
    let mut keys = store.all_keys()?;
    keys.sort_unstable();
    Ok(keys)
}

/// Upserts every entry of a kv_store file (or stdin for `-`) in batches, then checkpoints.
/// Returns the number of entries.
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
    store.index_done_callback()?;
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

/// Writes the stats as an aligned table; `~` marks sizes estimated from a sample.
fn write_stats_table(
    out: &mut impl Write,
    backend: BackendKind,
    stats: &[graphrag_kv::NamespaceStats],
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
    Ok(())
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
