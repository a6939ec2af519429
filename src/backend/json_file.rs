//! nano-graphrag's own storage: one `kv_store_{namespace}.json` file per namespace.
//!
//! The file is one JSON object mapping id to value, UTF-8, non-ASCII kept as is, indented by two
//! spaces, exactly as Python's `json.dump(obj, f, indent=2, ensure_ascii=False)` writes it: files
//! nano-graphrag wrote load unchanged, and files written here load in nano-graphrag.
//!
//! - Loaded whole when the namespace is opened; held in memory; written back whole by
//!   `index_done_callback` (and when the last handle is dropped, if anything changed).
//! - Written atomically: a temporary file in the same directory, fsync, rename, fsync of the
//!   directory. A crash leaves the old file or the new one, never a truncated one. The new
//!   file keeps the old one's mode, so readers running as another user keep their access.
//! - A corrupt or truncated file is refused with its path, line and column, and never
//!   overwritten.
//! - One writer per directory: opening for writing takes an advisory lock on
//!   `.graphrag-kv.lock`; a second process gets [`Error::Locked`]. Read-only opens take no lock
//!   (they see the files as last saved).
//! - TTLs do not apply: values never expire here.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::BackendKind;
use crate::error::{Error, Result};
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, validate_namespace, Item, KvStore,
    NamespaceStats,
};

/// Name of the lock file inside the working directory.
pub const LOCK_FILE: &str = ".graphrag-kv.lock";

/// The file name nano-graphrag gives a namespace.
pub fn file_name(namespace: &str) -> String {
    format!("kv_store_{namespace}.json")
}

/// A working directory of kv_store files, shared by every namespace opened from it.
///
/// Holds the directory's write lock (unless read-only) for as long as it or any of its stores
/// lives, and keeps one in-memory map per namespace, so two handles to the same namespace never
/// hold two copies whose saves would overwrite each other. When the last handle goes, every
/// namespace with unsaved changes is saved.
#[derive(Debug)]
pub struct JsonDir {
    dir: PathBuf,
    read_only: bool,
    /// The locked file; the OS lock is released when it is closed. `None` when read-only.
    _lock: Option<File>,
    /// The namespaces opened so far. Strong references: the maps live as long as the directory
    /// object, and the stores point to the directory (not the other way round), so there is no
    /// reference cycle and dropping the last handle runs the final save.
    namespaces: Mutex<HashMap<String, Arc<Namespace>>>,
}

impl JsonDir {
    /// Opens `dir` for reading and writing, creating it if needed and taking its write lock.
    ///
    /// The lock is taken once, without waiting: a second writer, in another process or in
    /// this one, gets [`Error::Locked`]. Within a process, share one object (a
    /// [`crate::Storage`] does) rather than opening the directory twice.
    ///
    /// # Errors
    /// [`Error::Locked`] when another writer holds the lock; [`Error::Io`] when the directory
    /// cannot be created or the lock file opened.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Arc<JsonDir>> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error("creating directory", &dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error("opening lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    dir,
                    lock_file: lock_path,
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_error("locking", &lock_path, e)),
        }
        Ok(Arc::new(JsonDir {
            dir,
            read_only: false,
            _lock: Some(lock),
            namespaces: Mutex::new(HashMap::new()),
        }))
    }

    /// Opens `dir` for reading only: no lock, no directory created, writes refused.
    pub fn open_read_only(dir: impl Into<PathBuf>) -> Arc<JsonDir> {
        Arc::new(JsonDir {
            dir: dir.into(),
            read_only: true,
            _lock: None,
            namespaces: Mutex::new(HashMap::new()),
        })
    }

    /// The working directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The store of `namespace`, loading its file on first use.
    ///
    /// # Errors
    /// [`Error::InvalidNamespace`], [`Error::CorruptFile`] (the file is left untouched),
    /// [`Error::Io`].
    pub fn namespace(self: &Arc<Self>, namespace: &str) -> Result<Arc<JsonFileStore>> {
        validate_namespace(namespace)?;
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|p| p.into_inner());
        let data = match namespaces.get(namespace) {
            Some(d) => d.clone(),
            None => {
                let path = self.dir.join(file_name(namespace));
                let d = Arc::new(Namespace {
                    map: RwLock::new(load(&path)?),
                    path,
                    changes: AtomicU64::new(0),
                    saved: Mutex::new(0),
                });
                namespaces.insert(namespace.to_string(), d.clone());
                d
            }
        };
        Ok(Arc::new(JsonFileStore {
            namespace: namespace.to_string(),
            data,
            read_only: self.read_only,
            _dir: self.clone(),
        }))
    }

    /// Namespaces that have a file in the directory, sorted.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be listed (a missing directory is empty).
    pub fn list_namespaces(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("listing", &self.dir, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let ns = name.strip_prefix("kv_store_")?.strip_suffix(".json")?;
                validate_namespace(ns).ok().map(|_| ns.to_string())
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

impl Drop for JsonDir {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        // Writes not yet checkpointed are saved rather than lost (nano-graphrag would lose them).
        let namespaces = self.namespaces.get_mut().unwrap_or_else(|p| p.into_inner());
        for ns in namespaces.values() {
            if let Err(e) = ns.save() {
                log::error!("unsaved changes to {} are lost: {e}", ns.path.display());
            }
        }
    }
}

/// One namespace's map and its save bookkeeping.
#[derive(Debug)]
struct Namespace {
    path: PathBuf,
    /// The whole namespace. A `RwLock` rather than a sharded map: reads vastly outnumber writes
    /// in an indexer, and saving needs one consistent view of everything.
    map: RwLock<Map<String, Value>>,
    /// Count of changes made; compared with `saved` to skip saves when nothing changed.
    changes: AtomicU64,
    /// The `changes` count written by the last save. The mutex also serialises saves so an
    /// older snapshot never renames over a newer one.
    saved: Mutex<u64>,
}

impl Namespace {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Map<String, Value>> {
        // A panic in another thread while it held the lock cannot leave the map half-updated
        // (every update is a single insert/remove), so a poisoned lock is still consistent.
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map<String, Value>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes the namespace to its file if anything changed since the last save.
    fn save(&self) -> Result<()> {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        let (version, bytes) = {
            let map = self.read();
            let version = self.changes.load(Ordering::SeqCst);
            if version == *saved {
                return Ok(());
            }
            (version, to_python_json(&*map))
        };
        write_atomically(&self.path, &bytes)?;
        *saved = version;
        log::debug!("saved {} ({} bytes)", self.path.display(), bytes.len());
        Ok(())
    }
}

/// One namespace of a [`JsonDir`]: a handle to its in-memory map.
#[derive(Debug)]
pub struct JsonFileStore {
    namespace: String,
    data: Arc<Namespace>,
    read_only: bool,
    /// Keeps the directory (and its lock) alive while this handle lives.
    _dir: Arc<JsonDir>,
}

impl JsonFileStore {
    /// The file this namespace is saved to.
    pub fn path(&self) -> &Path {
        &self.data.path
    }

    /// Writes the namespace to its file if anything changed since the last save.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file; the previous file is then left as it was.
    pub fn save(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.data.save()
    }

    fn check_writable(&self, operation: &'static str) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                namespace: self.namespace.clone(),
                operation,
            });
        }
        Ok(())
    }
}

impl KvStore for JsonFileStore {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        Ok(self.data.read().keys().cloned().collect())
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        validate_id(&self.namespace, id)?;
        Ok(self.data.read().get(id).cloned())
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        validate_ids(&self.namespace, ids)?;
        let map = self.data.read();
        Ok(ids
            .iter()
            .map(|id| match (map.get(id.as_str()), fields) {
                (None, _) => None,
                (Some(Value::Object(m)), Some(fields)) => Some(Value::Object(
                    // Copy only the kept fields instead of cloning the whole value.
                    m.iter()
                        .filter(|(k, _)| fields.iter().any(|f| f == *k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )),
                (Some(v), f) => Some(project(v.clone(), f)),
            })
            .collect())
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        validate_ids(&self.namespace, ids)?;
        let map = self.data.read();
        Ok(missing_in_order(ids, |i| map.contains_key(ids[i].as_str())))
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        self.check_writable("upsert")?;
        validate_ids(&self.namespace, items.iter().map(|(id, _)| id))?;
        if items.is_empty() {
            return Ok(());
        }
        let mut map = self.data.write();
        for (id, value) in items {
            map.insert(id, value);
        }
        self.data.changed();
        Ok(())
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        self.check_writable("delete_by_ids")?;
        validate_ids(&self.namespace, ids)?;
        if ids.is_empty() {
            return Ok(());
        }
        let mut map = self.data.write();
        for id in ids {
            map.shift_remove(id.as_str());
        }
        self.data.changed();
        Ok(())
    }

    fn clear(&self) -> Result<()> {
        self.check_writable("clear")?;
        self.data.write().clear();
        self.data.changed();
        Ok(())
    }

    fn index_start_callback(&self) -> Result<()> {
        Ok(())
    }

    fn index_done_callback(&self) -> Result<()> {
        self.save()
    }

    fn stats(&self) -> Result<NamespaceStats> {
        let map = self.data.read();
        let bytes = map
            .values()
            .map(|v| serde_json::to_vec(v).map(|b| b.len() as u64).unwrap_or(0))
            .sum();
        Ok(NamespaceStats {
            namespace: self.namespace.clone(),
            backend: BackendKind::Json,
            keys: map.len() as u64,
            bytes,
            bytes_sampled: false,
            ttl_seconds: 0,
        })
    }
}

/// Reads a kv_store file; a missing file is an empty namespace.
fn load(path: &Path) -> Result<Map<String, Value>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Map::new()),
        Err(e) => return Err(io_error("reading", path, e)),
    };
    parse_kv_file(path, &bytes)
}

/// Parses the contents of a kv_store file: one JSON object.
///
/// # Errors
/// [`Error::CorruptFile`] with the line and column of the problem.
pub fn parse_kv_file(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>> {
    // A UTF-8 byte order mark, as some editors add, is not part of the JSON.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let parsed = serde_json::from_slice::<Value>(bytes).or_else(|e| {
        // Python's json.dump writes NaN/Infinity/-Infinity by default: read them as null
        // rather than refusing a file nano-graphrag wrote. Only tried once serde_json refused
        // the text, so a valid file costs nothing more; if the text still does not parse,
        // the error is the original one, with positions in the file as it is.
        let (fixed, found) = crate::codec::non_finite::replace_non_finite(bytes).ok_or(e)?;
        let e = match serde_json::from_slice::<Value>(&fixed) {
            Ok(value) => {
                warn_non_finite(path, &found);
                return Ok(value);
            }
            Err(_) => serde_json::from_slice::<Value>(bytes).unwrap_err(),
        };
        Err(e)
    });
    match parsed {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::CorruptFile {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: format!(
                "expected a JSON object of id -> value, found {}",
                json_kind(&other)
            ),
        }),
        Err(e) => Err(Error::CorruptFile {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }),
    }
}

/// Warns once per file that its non-finite numbers were read as null, naming the file, the
/// namespace (from the file's name) and the keys holding them, and that the next save
/// writes null.
fn warn_non_finite(path: &Path, found: &[crate::codec::non_finite::NonFinite]) {
    const SHOWN: usize = 5;
    let namespace = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("kv_store_")?.strip_suffix(".json"))
        .map_or_else(String::new, |ns| format!(" (namespace {ns:?})"));
    let mut keys: Vec<String> = Vec::new();
    for f in found {
        let key = match &f.key {
            Some(k) => crate::error::display_id(k),
            None => "the top-level value".to_string(),
        };
        let entry = format!(
            "{key} ({} at line {}, column {})",
            f.token, f.line, f.column
        );
        if !keys.iter().any(|k| k.starts_with(&key)) {
            keys.push(entry);
        }
    }
    let more = keys.len().saturating_sub(SHOWN);
    keys.truncate(SHOWN);
    log::warn!(
        "{}{namespace}: {} NaN/Infinity number{} (written by Python's json.dump) read as null, \
         in key{} {}{}; the next save of this namespace writes null",
        path.display(),
        found.len(),
        if found.len() == 1 { "" } else { "s" },
        if keys.len() + more == 1 { "" } else { "s" },
        keys.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
    );
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// JSON as Python's `json.dump(obj, f, indent=2, ensure_ascii=False)` writes it.
pub fn to_python_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"  ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serializing a Value (string keys) into memory cannot fail.
    value
        .serialize(&mut ser)
        .expect("serializing JSON into memory");
    out
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file.
///
/// The new file keeps the mode of the file it replaces (and its group, where the process may
/// set it), so a reader running as another user keeps its access; a new file gets the mode
/// `File::create` gives (0666 less the umask), not the 0600 of a temporary file.
///
/// # Errors
/// [`Error::Io`] naming `path` and the step that failed. When the fsync of the directory
/// after the rename fails, the new file is in place but its rename may not survive a crash:
/// that is an error too, since the caller asked for a durable save.
// Public only for the `graphrag-kv` binary's `export` (a separate crate); not part of the
// supported API, so hidden from the docs.
#[doc(hidden)]
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, bytes, sync_dir)
}

/// Makes the directory entries of `dir` durable (the rename into place).
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// [`write_atomically`] with the directory fsync passed in, so the error path can be tested.
fn write_atomically_with(
    path: &Path,
    bytes: &[u8],
    sync_dir: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let existing = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("reading the permissions of", path, e)),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".kv_store_").suffix(".tmp");
    // Created as `File::create` would (the umask applies), instead of tempfile's 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| io_error("creating a temporary file to write", path, e))?;
    if let Some(old) = &existing {
        keep_owner_group(tmp.as_file(), old, path);
        // Exactly the old mode, whatever the umask: set after creation, not at open.
        tmp.as_file()
            .set_permissions(old.permissions())
            .map_err(|e| io_error("setting the permissions of", path, e))?;
    }
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        w.write_all(bytes)
            .and_then(|_| w.flush())
            .map_err(|e| io_error("writing", path, e))?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| io_error("syncing", path, e))?;
    tmp.persist(path)
        .map_err(|e| io_error("renaming into place", path, e.error))?;
    // The rename is durable only once the directory entry is.
    sync_dir(dir).map_err(|e| io_error("syncing the directory after replacing", path, e))
}

/// Gives the new file the old file's group, so group readers keep their access. Only the
/// owner or root may change a group, and only to one of its own groups: when that is not
/// allowed the save goes on (the data matters more) and says so.
#[cfg(unix)]
fn keep_owner_group(new: &File, old: &fs::Metadata, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = new.metadata() else { return };
    if now.gid() == old.gid() {
        return;
    }
    if let Err(e) = std::os::unix::fs::fchown(new, None, Some(old.gid())) {
        log::warn!(
            "{}: the saved file's group cannot be kept ({} instead of {}): {e}",
            path.display(),
            now.gid(),
            old.gid()
        );
    }
}

#[cfg(not(unix))]
fn keep_owner_group(_new: &File, _old: &fs::Metadata, _path: &Path) {}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_format() {
        let v: Value =
            serde_json::from_str(r#"{"a": {"x": [1, 2.5, "é中"]}, "b": {}, "c": []}"#).unwrap();
        let s = String::from_utf8(to_python_json(&v)).unwrap();
        assert_eq!(
            s,
            "{\n  \"a\": {\n    \"x\": [\n      1,\n      2.5,\n      \"é中\"\n    ]\n  },\n  \"b\": {},\n  \"c\": []\n}"
        );
    }

    #[test]
    fn corrupt_file_names_position() {
        let e = parse_kv_file(Path::new("f.json"), b"{\n  \"a\": 1,\n  \"b\": tru").unwrap_err();
        match e {
            Error::CorruptFile { line, column, .. } => assert_eq!((line, column), (3, 10)),
            other => panic!("{other}"),
        }
        let e = parse_kv_file(Path::new("f.json"), b"[1]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.json") && e.contains("an array"), "{e}");
        assert!(parse_kv_file(Path::new("f.json"), b"").is_err());
    }

    /// A failed fsync of the directory after the rename is the save's error, not ignored:
    /// the caller asked for a durable save and did not get one. (No real file system here
    /// makes a directory fsync fail on demand, hence the injected failure.)
    #[test]
    fn directory_fsync_error_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv_store_x.json");
        let e = write_atomically_with(&path, b"{}", |_| Err(io::Error::other("injected EIO")))
            .unwrap_err();
        match &e {
            Error::Io {
                action, path: p, ..
            } => {
                assert!(action.contains("directory"), "{e}");
                assert_eq!(p, &path);
            }
            other => panic!("expected Error::Io, got {other:?}"),
        }
        assert!(e.to_string().contains("injected EIO"), "{e}");
        // The real one succeeds.
        write_atomically(&path, b"{}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{}");
    }
}
