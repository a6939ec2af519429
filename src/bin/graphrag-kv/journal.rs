//! `journal list|replay|discard`, and the warning of read-only commands about journaled writes.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use graphrag_kv::fallback::{self, JournalInfo, JournalTarget};
use graphrag_kv::{BackendKind, Error, Storage, StoreConfig};
use serde_json::Value;

use crate::output::{count, report, stdout};

/// The `journal` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum JournalAction {
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
pub(crate) fn warn_journaled(config: &StoreConfig, namespace: Option<&str>) {
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
pub(crate) fn run_journal(
    config: &StoreConfig,
    action: &JournalAction,
) -> graphrag_kv::Result<ExitCode> {
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
