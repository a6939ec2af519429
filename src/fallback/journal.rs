//! The journal file: its header, its entries, and the rules that keep it readable after a
//! crash or a full disk.
//!
//! A journal is JSON lines: a header line naming the Redis target, the key prefix and the
//! creation time, then one line per write. A write is acknowledged only after its whole line,
//! newline included, is fsynced, so bytes after the last newline are a torn append that was
//! never acknowledged: they are ignored when read and cut off when the journal is adopted. A
//! failed append is cut back off at once, so the next write never lands glued to a fragment.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::target::{JournalHeader, JournalTarget};
use crate::error::{Error, Result};
use crate::store::Item;

/// One journaled write.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Entry {
    Upsert { ns: String, items: Vec<Item> },
    Delete { ns: String, ids: Vec<String> },
    Clear { ns: String },
}

impl Entry {
    pub(crate) fn namespace(&self) -> &str {
        match self {
            Entry::Upsert { ns, .. } | Entry::Delete { ns, .. } | Entry::Clear { ns } => ns,
        }
    }
}

/// What a journal file holds.
#[derive(Debug, Default)]
pub(crate) struct Contents {
    /// `None` for journals written before headers existed.
    pub header: Option<JournalHeader>,
    pub entries: Vec<Entry>,
    /// Length up to and including the last newline: everything after it is a torn append.
    pub whole_len: u64,
    /// Bytes after the last newline.
    pub torn_bytes: u64,
}

/// Reads a journal from its start. Bytes after the last newline (a torn append, never
/// acknowledged) are ignored; any whole line that is not a header (first line only) or an
/// entry is an error naming the file and line.
pub(crate) fn read(path: &Path, mut file: &File) -> Result<Contents> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| io_error("reading journal", path, e))?;
    let whole_len = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut contents = Contents {
        whole_len: whole_len as u64,
        torn_bytes: (bytes.len() - whole_len) as u64,
        ..Contents::default()
    };
    if contents.torn_bytes > 0 {
        log::warn!(
            "{}: ignoring {} bytes after the last whole line (an append cut short, never \
             acknowledged)",
            path.display(),
            contents.torn_bytes
        );
    }
    for (n, line) in bytes[..whole_len].split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let corrupt = |column: usize, message: String| Error::CorruptFile {
            path: path.to_path_buf(),
            line: n + 1,
            column,
            message,
        };
        if let Err(e) = std::str::from_utf8(line) {
            return Err(corrupt(
                e.valid_up_to() + 1,
                "not valid UTF-8 (a journal line is JSON text)".into(),
            ));
        }
        if n == 0 {
            if let Ok(h) = serde_json::from_slice::<JournalHeader>(line) {
                contents.header = Some(h);
                continue;
            }
        }
        match serde_json::from_slice::<Entry>(line) {
            Ok(e) => contents.entries.push(e),
            Err(e) => return Err(corrupt(e.column(), e.to_string())),
        }
    }
    Ok(contents)
}

/// The journal this process appends to. Holds its exclusive lock.
#[derive(Debug)]
pub(crate) struct Writer {
    pub path: PathBuf,
    pub file: File,
    /// Length of the whole lines written so far: where a failed append is cut back to.
    len: u64,
    /// A failed append could not be cut off: append to a new journal instead.
    pub broken: bool,
}

impl Writer {
    /// Creates a journal in `dir` for `target`. It is written under a temporary name, locked,
    /// given its header and fsynced before it is renamed into place, so a journal other
    /// processes can see is always locked or complete; then the directory is fsynced, so the
    /// journal survives a crash as soon as a write is acknowledged.
    pub(crate) fn create(dir: &Path, target: &JournalTarget) -> Result<Writer> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("journal-{}-{nanos}.jsonl", std::process::id());
        let tmp = dir.join(format!(".{name}.tmp"));
        let path = dir.join(&name);
        let result = (|| {
            let mut file = File::options()
                .create_new(true)
                .append(true)
                .read(true)
                .open(&tmp)
                .map_err(|e| io_error("creating journal", &tmp, e))?;
            file.try_lock().map_err(|e| {
                io_error(
                    "locking journal",
                    &tmp,
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let mut line =
                serde_json::to_vec(&target.header()).expect("serializing a journal header");
            line.push(b'\n');
            file.write_all(&line)
                .and_then(|_| file.sync_data())
                .map_err(|e| io_error("writing the header of journal", &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_error("naming journal", &path, e))?;
            sync_dir(dir)?;
            Ok(Writer {
                path: path.clone(),
                file,
                len: line.len() as u64,
                broken: false,
            })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Appends one entry and fsyncs it. On failure the partial line is cut off (the write was
    /// not taken); when even that fails the writer is marked broken.
    pub(crate) fn append(&mut self, entry: &Entry) -> Result<()> {
        let mut line = serde_json::to_vec(entry).expect("serializing a journal entry");
        line.push(b'\n');
        match self
            .file
            .write_all(&line)
            .and_then(|_| self.file.sync_data())
        {
            Ok(()) => {
                self.len += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self
                    .file
                    .set_len(self.len)
                    .and_then(|_| self.file.sync_data())
                {
                    log::error!(
                        "journal {}: an append failed and its partial line could not be cut \
                         off ({cut}); later writes go to a new journal",
                        self.path.display()
                    );
                    self.broken = true;
                }
                Err(io_error("appending to journal", &self.path, e))
            }
        }
    }
}

/// Locks the journal at `path` if no live process holds it. `None` when it is in use, or when
/// it was removed between opening and locking (its owner replayed and removed it).
pub(crate) fn lock_orphan(path: &Path) -> Option<File> {
    let file = File::options().read(true).append(true).open(path).ok()?;
    file.try_lock().ok()?;
    // The lock may be that of a file its owner has just unlinked: only the file still at
    // `path` counts.
    let (Ok(held), Ok(named)) = (file.metadata(), fs::metadata(path)) else {
        return None;
    };
    (held.dev() == named.dev() && held.ino() == named.ino()).then_some(file)
}

/// Cuts a torn tail off a locked journal.
pub(crate) fn truncate_torn(path: &Path, file: &File, contents: &Contents) -> Result<()> {
    if contents.torn_bytes == 0 {
        return Ok(());
    }
    file.set_len(contents.whole_len)
        .and_then(|_| file.sync_data())
        .map_err(|e| io_error("cutting the torn last line off journal", path, e))
}

/// Removes a journal whose lock `file` holds, then fsyncs the directory, then releases the
/// lock: a journal that can be locked is never one already replayed.
pub(crate) fn remove_locked(path: &Path, file: File) -> Result<()> {
    if let Err(e) = fs::remove_file(path) {
        // Left in place, it must not be replayed again over newer writes: empty it first (an
        // empty journal is removed by whoever adopts it next).
        let _ = file.set_len(0).and_then(|_| file.sync_data());
        return Err(io_error("removing journal", path, e));
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    drop(file);
    Ok(())
}

/// fsyncs a directory, so a file created, renamed or removed in it stays so after a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing journal directory", dir, e))
}

/// Creates the journal directory (and missing parents) and fsyncs the parent of each
/// directory created, so the directory itself survives a crash like the journals in it.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && !p.exists() {
        missing.push(p);
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    fs::create_dir_all(dir).map_err(|e| io_error("creating journal directory", dir, e))?;
    for created in missing {
        let parent = created
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(parent)?;
    }
    Ok(())
}

/// The journal files of `dir`, oldest first (their names hold the creation time).
pub(crate) fn journal_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| io_error("listing journal directory", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort_by_key(|p| (journal_time(p), p.clone()));
    Ok(files)
}

/// The creation time in a journal's name (`journal-{pid}-{nanos}.jsonl`).
fn journal_time(path: &Path) -> u128 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The pid in a journal's name.
fn journal_pid(path: &Path) -> Option<u32> {
    path.file_stem()?
        .to_str()?
        .strip_prefix("journal-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Why a journal found in the directory may not be replayed into `target`, or `None`.
pub(crate) fn refusal(path: &Path, contents: &Contents, target: &JournalTarget) -> Option<Error> {
    let reason = match &contents.header {
        None => format!(
            "it has no header (written by an older version), so the Redis server and key \
             prefix its {} belong to are unknown; replay it into the configured Redis \
             ({}, prefix {:?}) with `graphrag-kv journal replay --force`, or delete it with \
             `graphrag-kv journal discard --yes`",
            writes(contents.entries.len()),
            target.display,
            target.prefix
        ),
        Some(h) if !target.matches(h) => format!(
            "its {} belong to {} with key prefix {:?}, not to the configured {} with \
             prefix {:?}; replay it with its own configuration (`graphrag-kv journal replay`), \
             into this one with `graphrag-kv journal replay --force`, or delete it with \
             `graphrag-kv journal discard --yes`",
            writes(contents.entries.len()),
            h.target,
            h.prefix,
            target.display,
            target.prefix
        ),
        Some(_) => return None,
    };
    Some(Error::Journal {
        path: path.to_path_buf(),
        reason,
    })
}

/// `1 write`, `2 writes`.
fn writes(n: usize) -> String {
    if n == 1 {
        "1 write".to_string()
    } else {
        format!("{n} writes")
    }
}

/// One journal file as `graphrag-kv journal list` shows it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JournalInfo {
    /// The file.
    pub path: PathBuf,
    /// The pid in its name: the process that wrote it.
    pub pid: Option<u32>,
    /// True while a live process holds its lock (it is writing it or replaying it).
    pub in_use: bool,
    /// Its header; `None` for journals written before headers existed.
    pub header: Option<JournalHeader>,
    /// Writes (one per `upsert`, `delete_by_ids` or `clear` call) per namespace.
    pub writes: BTreeMap<String, usize>,
    /// Bytes of a torn last line, ignored on replay.
    pub torn_bytes: u64,
    /// Why the file cannot be read, if it cannot.
    pub error: Option<String>,
}

impl JournalInfo {
    /// Writes of all namespaces.
    pub fn total_writes(&self) -> usize {
        self.writes.values().sum()
    }
}

/// Describes every journal in `dir` (none when it does not exist), oldest first. Tells live
/// journals from orphans by the locks listed in `/proc/locks`, so it takes none itself (a lock
/// taken to look could make a store opening at that instant pass an orphan by); where that
/// file cannot be read it takes each journal's lock for an instant.
///
/// # Errors
/// [`Error::Io`] when the directory cannot be listed.
pub fn list_journals(dir: &Path) -> Result<Vec<JournalInfo>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let locked = locked_files();
    let mut out = Vec::new();
    for path in journal_paths(dir)? {
        let mut info = JournalInfo {
            pid: journal_pid(&path),
            path: path.clone(),
            in_use: false,
            header: None,
            writes: BTreeMap::new(),
            torn_bytes: 0,
            error: None,
        };
        match File::open(&path) {
            Err(e) => info.error = Some(e.to_string()),
            Ok(file) => {
                info.in_use = match (&locked, file.metadata()) {
                    (Some(locked), Ok(m)) => locked.contains(&file_id(&m)),
                    _ => file.try_lock_shared().is_err(),
                };
                match read(&path, &file) {
                    Err(e) => info.error = Some(e.to_string()),
                    Ok(c) => {
                        for e in &c.entries {
                            *info.writes.entry(e.namespace().to_string()).or_default() += 1;
                        }
                        info.header = c.header;
                        info.torn_bytes = c.torn_bytes;
                    }
                }
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// A file's identity as `/proc/locks` prints it: device major, minor, inode.
fn file_id(m: &fs::Metadata) -> (u64, u64, u64) {
    let dev = m.dev();
    // glibc's gnu_dev_major / gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor, m.ino())
}

/// Files holding a `flock` lock, from `/proc/locks` (`1: FLOCK ADVISORY WRITE 42 08:01:1234 0
/// EOF`, device numbers in hex); `None` when it cannot be read.
fn locked_files() -> Option<std::collections::HashSet<(u64, u64, u64)>> {
    let text = fs::read_to_string("/proc/locks").ok()?;
    let mut out = std::collections::HashSet::new();
    for line in text.lines().filter(|l| l.contains("FLOCK")) {
        let Some(id) = line
            .split_whitespace()
            .find(|f| f.matches(':').count() == 2)
        else {
            continue;
        };
        let mut parts = id.split(':');
        let (Some(major), Some(minor), Some(ino)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let (Ok(major), Ok(minor), Ok(ino)) = (
            u64::from_str_radix(major, 16),
            u64::from_str_radix(minor, 16),
            ino.parse::<u64>(),
        ) {
            out.insert((major, minor, ino));
        }
    }
    Some(out)
}

/// An [`Error::Io`].
pub(crate) fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
