//! kv_store files: `import` and `export`.

use std::collections::HashSet;
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

/// Hands every id of `store` to `f`, a page at a time ([`KvStore::scan_keys`]), each page
/// sorted and without repeats: memory is bounded by a page, not by the namespace. A namespace
/// of one page (about a thousand ids on Redis) comes out wholly sorted; across pages an id
/// may, rarely, come twice (SCAN repeats a key whose table was resized or whose slot moved
/// during the listing).
pub(crate) fn for_each_key_page(
    store: &dyn KvStore,
    f: &mut dyn FnMut(&[String]) -> graphrag_kv::Result<()>,
) -> graphrag_kv::Result<()> {
    store.scan_keys(&mut |mut page| {
        page.sort_unstable();
        page.dedup();
        f(&page)
    })
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

/// The namespace as nano-graphrag writes a kv_store file (`json.dump(obj, f, indent=2,
/// ensure_ascii=False)`), ids in the order the key stream gives them, sorted within each page
/// (a namespace of one page wholly sorted). Ids that disappear between listing and reading
/// (deleted or expired meanwhile) are left out. The ids are listed as a stream; only the ids
/// already written are kept (to write each once), and the file itself.
pub(crate) fn export(store: &dyn KvStore) -> graphrag_kv::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut written: HashSet<String> = HashSet::new();
    for_each_key_page(store, &mut |page| {
        for chunk in page.chunks(BATCH) {
            for (id, value) in chunk.iter().zip(store.get_by_ids(chunk, None)?) {
                let Some(v) = value else { continue };
                if !written.insert(id.clone()) {
                    continue;
                }
                out.extend_from_slice(if written.len() == 1 { b"{\n" } else { b",\n" });
                // One entry as Python writes it inside the object: the pretty text of a
                // one-entry object without its braces.
                let mut one = Map::new();
                one.insert(id.clone(), v);
                let text = to_python_json(&one);
                out.extend_from_slice(&text[2..text.len() - 2]);
            }
        }
        Ok(())
    })?;
    out.extend_from_slice(if written.is_empty() { b"{}" } else { b"\n}" });
    Ok(out)
}
