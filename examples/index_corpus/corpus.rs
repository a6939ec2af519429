//! The documents: reading the corpus folder and cutting documents into chunks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use graphrag_kv::llm_hash::compute_mdhash_id;

use crate::BoxError;

/// One document of the corpus.
#[derive(Debug)]
pub(crate) struct Doc {
    pub(crate) id: String,
    /// The path relative to the corpus folder, for the report title.
    pub(crate) name: String,
    pub(crate) content: String,
    /// Its chunks in order, each id once.
    pub(crate) chunk_ids: Vec<String>,
}

/// Every `.txt` and `.md` file under `dir`, in path order, as documents (stripped, empty ones
/// and duplicates of an earlier one left out), at most `limit` of them.
pub(crate) fn read_corpus(dir: &Path, limit: Option<usize>) -> Result<Vec<Doc>, BoxError> {
    let mut paths = Vec::new();
    collect_files(dir, &mut paths)
        .map_err(|e| format!("reading the corpus folder {}: {e}", dir.display()))?;
    paths.sort();
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    for path in paths {
        if limit.is_some_and(|n| docs.len() >= n) {
            break;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        // Python's str.strip(): nano-graphrag hashes and stores the stripped text.
        let content = text.trim().to_string();
        if content.is_empty() {
            continue;
        }
        let id = compute_mdhash_id(&content, "doc-");
        if !seen.insert(id.clone()) {
            continue;
        }
        let name = path
            .strip_prefix(dir)
            .unwrap_or(&path)
            .display()
            .to_string();
        docs.push(Doc {
            id,
            name,
            content,
            chunk_ids: Vec::new(),
        });
    }
    Ok(docs)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("txt") || e.eq_ignore_ascii_case("md"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// nano-graphrag's `chunking_by_token_size` on whitespace tokens: a window of `max_tokens`
/// tokens starts every `max_tokens - overlap` tokens (the last windows may be short, even
/// contained in the previous one, as there). A chunk's text runs from its first token to its
/// last with the document's own spacing kept, as decoding tiktoken tokens keeps it; its
/// `tokens` is the window's length.
pub(crate) fn chunk_by_tokens(
    text: &str,
    max_tokens: usize,
    overlap: usize,
) -> Vec<(String, usize)> {
    let base = text.as_ptr() as usize;
    let spans: Vec<(usize, usize)> = text
        .split_whitespace()
        .map(|w| {
            let start = w.as_ptr() as usize - base;
            (start, start + w.len())
        })
        .collect();
    (0..spans.len())
        .step_by(max_tokens - overlap)
        .map(|start| {
            let end = (start + max_tokens).min(spans.len());
            let content = text[spans[start].0..spans[end - 1].1].trim().to_string();
            (content, end - start)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_overlap_like_nano_graphrag() {
        let text = (0..25)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join("  ");
        let chunks = chunk_by_tokens(&text, 10, 2);
        let starts: Vec<&str> = chunks
            .iter()
            .map(|(c, _)| c.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(starts, ["w0", "w8", "w16", "w24"]);
        let lens: Vec<usize> = chunks.iter().map(|(_, n)| *n).collect();
        assert_eq!(lens, [10, 10, 9, 1]);
        assert!(chunks[0].0.contains("w0  w1"), "spacing kept");
    }
}
