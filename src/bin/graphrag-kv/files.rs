//! kv_store files: `import` and `export`.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use graphrag_kv::backend::json_file::{parse_kv_file, to_python_json};
use graphrag_kv::KvStore;
use serde_json::Map;

use crate::output::io_error;

/// How many entries `import` writes per `upsert`, and `export` reads per `get_by_ids`.
const BATCH: usize = 1000;

/// The path shown in errors about standard input (`import NS -`).
const STDIN: &str = "<stdin>";

/// Every id of `store`, sorted.
pub(crate) fn sorted_keys(store: &dyn KvStore) -> graphrag_kv::Result<Vec<String>> {
    let mut keys = store.all_keys()?;
    keys.sort_unstable();
    Ok(keys)
}

/// Upserts every entry of a kv_store file (or stdin for `-`) in batches (the caller
/// checkpoints). Returns the number of entries.
pub(crate) fn import(store: &dyn KvStore, file: &Path) -> graphrag_kv::Result<usize> {
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
pub(crate) fn export(store: &dyn KvStore) -> graphrag_kv::Result<Vec<u8>> {
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
