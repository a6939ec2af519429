//! Settling journals by hand (`graphrag-kv journal replay|discard`): orphans only, never the
//! journal of a live process.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::{self, Contents, Entry};
use super::target::JournalTarget;
use super::{OpenBackend, PROBE_NAMESPACE};
use crate::error::{Error, Result};
use crate::store::KvStore;

/// A journal [`replay_journals`] replayed and removed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplayedJournal {
    /// The file (now removed).
    pub path: PathBuf,
    /// Writes replayed from it.
    pub writes: usize,
}

/// Replays every orphaned journal of `dir` (journals no live process holds) into `target`
/// through `backend` (the backend's own stores, see [`OpenBackend`]), oldest first; after each journal, checkpoints Redis
/// (`index_done_callback`) and removes the journal before releasing its lock.
///
/// Every orphan is checked before anything is written: a journal written for another target
/// or key prefix, or without a header, makes the call fail with nothing replayed, unless
/// `force` (the operator has checked it belongs to `target`).
///
/// # Errors
/// [`Error::Journal`] for a refused journal or a write the target refused (that journal and
/// the later ones are kept; replaying again is safe, writes replay in order);
/// [`Error::CorruptFile`] for an unreadable line; [`Error::Io`].
pub fn replay_journals(
    dir: &Path,
    target: &JournalTarget,
    backend: &dyn OpenBackend,
    force: bool,
) -> Result<Vec<ReplayedJournal>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut adopted: Vec<(PathBuf, File, Contents)> = Vec::new();
    for path in journal::journal_paths(dir)? {
        let Some(file) = journal::lock_orphan(&path) else {
            continue;
        };
        let contents = journal::read(&path, &file)?;
        if !force && !contents.entries.is_empty() {
            if let Some(refused) = journal::refusal(&path, &contents, target) {
                return Err(refused);
            }
        }
        adopted.push((path, file, contents));
    }
    let mut stores: HashMap<String, Arc<dyn KvStore>> = HashMap::new();
    let mut replayed = Vec::new();
    for (path, file, contents) in adopted {
        let total = contents.entries.len();
        for (n, e) in contents.entries.iter().enumerate() {
            let stopped = |err: Error| Error::Journal {
                path: path.clone(),
                reason: format!(
                    "replay stopped at write {} of {total} ({:?}): {err}; the journal is kept \
                     and can be replayed again",
                    n + 1,
                    e.namespace()
                ),
            };
            let store = match stores.get(e.namespace()) {
                Some(s) => s.clone(),
                None => {
                    let s = backend.open(e.namespace()).map_err(stopped)?;
                    stores.insert(e.namespace().to_string(), s.clone());
                    s
                }
            };
            match e {
                Entry::Upsert { items, .. } => store.upsert(items.clone()),
                Entry::Delete { ids, .. } => store.delete_by_ids(ids),
                Entry::Clear { .. } => store.clear(),
            }
            .map_err(stopped)?;
        }
        if total > 0 {
            // The journal goes only once Redis has its writes on disk.
            backend
                .open(PROBE_NAMESPACE)
                .and_then(|s| s.index_done_callback())
                .map_err(|err| Error::Journal {
                    path: path.clone(),
                    reason: format!(
                        "{total} writes replayed, but the checkpoint that makes them durable \
                         failed: {err}; the journal is kept"
                    ),
                })?;
        }
        journal::remove_locked(&path, file)?;
        replayed.push(ReplayedJournal {
            path,
            writes: total,
        });
    }
    Ok(replayed)
}

/// What [`discard_journals`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Discarded {
    /// Orphaned journals removed, with the writes they held.
    pub removed: Vec<(PathBuf, usize)>,
    /// Journals kept because a live process holds them.
    pub in_use: Vec<PathBuf>,
}

/// Deletes orphaned journals of `dir`: all of them, or only those named in `only` (file names
/// or paths). Journals a live process holds are never deleted; they are reported in
/// [`Discarded::in_use`]. The writes they held are lost.
///
/// # Errors
/// [`Error::Journal`] when a name in `only` is no journal of `dir`; [`Error::Io`].
pub fn discard_journals(dir: &Path, only: &[PathBuf]) -> Result<Discarded> {
    let paths = if dir.exists() {
        journal::journal_paths(dir)?
    } else {
        Vec::new()
    };
    let name = |p: &Path| -> OsString { p.file_name().unwrap_or_default().to_os_string() };
    if let Some(unknown) = only
        .iter()
        .find(|o| !paths.iter().any(|p| name(p) == name(o)))
    {
        return Err(Error::Journal {
            path: unknown.clone(),
            reason: format!(
                "no such journal in {} (see `graphrag-kv journal list`)",
                dir.display()
            ),
        });
    }
    let mut out = Discarded::default();
    for path in paths {
        if !only.is_empty() && !only.iter().any(|o| name(o) == name(&path)) {
            continue;
        }
        let Some(file) = journal::lock_orphan(&path) else {
            if path.exists() {
                out.in_use.push(path);
            }
            continue;
        };
        // Counted for the report; an unreadable journal is deleted all the same.
        let writes = journal::read(&path, &file).map_or(0, |c| c.entries.len());
        journal::remove_locked(&path, file)?;
        out.removed.push((path, writes));
    }
    Ok(out)
}
