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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
mod files;
use files::{io_error, load};
pub use files::{parse_kv_file, to_python_json, write_atomically};

#[cfg(test)]
mod tests {
    use super::files::write_atomically_with;
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
