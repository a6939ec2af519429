//! The kv_store file itself: reading it (Python's `NaN`/`Infinity` included), writing it as
//! Python's `json.dump(.., indent=2, ensure_ascii=False)` does, atomically.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub(super) fn load(path: &Path) -> Result<Map<String, Value>> {
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
        let Some((fixed, found)) = crate::codec::non_finite::replace_non_finite(bytes) else {
            return Err(e);
        };
        let value = serde_json::from_slice::<Value>(&fixed).map_err(|_| e)?;
        warn_non_finite(path, &found);
        Ok(value)
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
pub(super) fn write_atomically_with(
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

pub(super) fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
