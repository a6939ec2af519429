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
//! `recompress NAMESPACE` rewrites a Redis namespace to the configured compression, one
//! compare-and-set per key (see `RedisStore::recompress`).
//!
//! Exit status: 0 on success, 1 when `get` finds no value, `verify` finds differences or
//! `recompress` finds unreadable values, 2 on any error (one line on stderr,
//! `graphrag-kv: <error>`), 130 when `recompress` is interrupted.
//!
//! This file holds the command line and the dispatch; `files` has `import`/`export`, `journal`
//! the `journal` commands, `migrate` `migrate`/`verify`, `stats` the `stats` table, and
//! `output` what goes to stderr and the stdout errors.

#![deny(missing_docs)]

mod files;
mod journal;
mod migrate;
mod output;
mod recompress;
mod stats;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use graphrag_kv::backend::json_file::{to_python_json, write_atomically};
use graphrag_kv::{BackendKind, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder};
use serde_json::{Map, Value};

use files::{export, for_each_key_page, import};
use journal::{run_journal, warn_journaled, JournalAction};
use migrate::{run_migrate, run_verify};
use output::{is_closed_stdout, one_line_clap_error, report, stdout, EXIT_ERROR};
use recompress::run_recompress;
use stats::{server_figures, write_stats_table};

/// Exit status of `get` when the id holds no value.
const EXIT_NOT_FOUND: u8 = 1;

/// Key-value storage of a GraphRAG index: nano-graphrag's kv_store JSON files or Redis.
///
/// Configuration comes from the environment (STORAGE_KV_BACKEND, STORAGE_WORKING_DIR,
/// REDIS_URL, REDIS_PASSWORD, REDIS_KEY_PREFIX, ...); the options below override it.
/// Exit status: 0 success, 1 `get` found nothing, `verify` found differences or `recompress`
/// found unreadable values, 2 error, 130 `recompress` interrupted.
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
        #[arg(long, value_name = "N", default_value_t = graphrag_kv::migrate::DEFAULT_BATCH)]
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
        #[arg(long, value_name = "N", default_value_t = graphrag_kv::migrate::DEFAULT_BATCH)]
        batch: usize,
        /// Print one JSON document with every differing id instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite a Redis namespace's values to the configured compression (REDIS_COMPRESSION,
    /// REDIS_COMPRESSION_LEVEL), key by key: a value written meanwhile is never overwritten,
    /// TTLs are kept, and an interrupted run is finished by running it again. Prints what was
    /// rewritten, already current, or changed meanwhile; exit 1 when some values cannot be read.
    Recompress {
        /// Namespace.
        namespace: String,
        /// Ids per read and rewrite batch.
        #[arg(long, value_name = "N", default_value_t = graphrag_kv::migrate::DEFAULT_BATCH)]
        batch: usize,
    },
    /// Show, replay or delete the fallback journals (KV_FALLBACK=json): writes made while
    /// Redis was unreachable, not in Redis yet.
    Journal {
        /// What to do with the journals.
        #[command(subcommand)]
        action: JournalAction,
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
            // Printed as the pages come: the listing never holds the namespace's ids.
            let store = storage.namespace(&namespace)?;
            let mut first = true;
            if json {
                stdout(write!(out, "["))?;
            }
            for_each_key_page(&*store, &mut |page| {
                for k in page {
                    if json {
                        let text = serde_json::to_string(k).expect("serializing a string");
                        stdout(write!(out, "{}{text}", if first { "" } else { "," }))?;
                    } else {
                        stdout(writeln!(out, "{k}"))?;
                    }
                    first = false;
                }
                Ok(())
            })?;
            if json {
                stdout(writeln!(out, "]"))?;
            }
            warn_journaled(&config, Some(&namespace));
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
        Command::Recompress { namespace, batch } => {
            run_recompress(&config, &storage, &namespace, batch)?
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
