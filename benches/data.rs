//! Values like an indexer's, shared by `benches/kv.rs` and `examples/loadtest.rs` (each includes
//! this file with `#[path]`).
//!
//! The text comes from the English prose of `corpus/` (30 articles, ~270 KB), cut into windows at
//! word boundaries, so a value compresses like real text (lz4 1.37x for a 5 KB chunk, 1.66x for
//! the whole corpus as one block) and not like a small vocabulary repeated (which lz4 shrinks
//! far more and would flatter the memory figures).
//!
//! - text chunks, `text_chunks`: `{tokens, content, chunk_order_index, full_doc_id}`, ~5 KB of
//!   JSON, id `chunk-<md5 of content>` (nano-graphrag's `compute_mdhash_id`);
//! - LLM cache entries, `llm_response_cache`: `{return, model}`, ~2 KB of JSON, id the md5 hex of
//!   the prompt (nano-graphrag's `compute_args_hash` shape).
//!
//! Everything is deterministic: value `i` is the same on every run and machine.
#![allow(dead_code)]

use graphrag_kv::llm_hash::compute_mdhash_id;
use graphrag_kv::Item;
use serde_json::json;

/// Characters of chunk text: with the other fields and JSON escapes, ~5,000 bytes of JSON.
pub const CHUNK_TEXT_BYTES: usize = 4_850;
/// Characters of a cached answer: ~2,000 bytes of JSON with the model name.
pub const CACHE_TEXT_BYTES: usize = 1_950;

/// The corpus, concatenated, and where its words start.
pub struct Corpus {
    text: String,
    /// Byte offsets of word starts (after whitespace), the possible window starts.
    starts: Vec<usize>,
}

impl Corpus {
    /// Reads every file of `corpus/` (sorted by name) under the crate root.
    ///
    /// # Panics
    /// When the directory is missing or empty (a broken checkout).
    pub fn load() -> Corpus {
        Corpus::load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"))
    }

    /// Reads every file of `dir` (sorted by name; each must be UTF-8 text).
    ///
    /// # Panics
    /// When the directory is missing or holds no file, or a file is not UTF-8.
    pub fn load_dir(dir: &std::path::Path) -> Corpus {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no text", dir.display());
        let mut text = String::new();
        for f in files {
            text.push_str(
                &std::fs::read_to_string(&f)
                    .unwrap_or_else(|e| panic!("reading {} as UTF-8 text: {e}", f.display())),
            );
            text.push_str("\n\n");
        }
        let bytes = text.as_bytes();
        let starts = (1..bytes.len())
            .filter(|&i| bytes[i - 1].is_ascii_whitespace() && !bytes[i].is_ascii_whitespace())
            .collect();
        Corpus { text, starts }
    }

    /// About `len` bytes of prose: the window starting at the `i`-th word start of a fixed
    /// permutation, ended at a word boundary. Distinct for `i` below the number of word starts
    /// (~45,000); above that a counter is appended so ids stay distinct.
    pub fn window(&self, i: usize, len: usize) -> String {
        let n = self.starts.len();
        // A stride coprime with n walks all starts in a scattered order.
        let mut stride = 7_919 % n;
        while gcd(stride, n) != 1 {
            stride += 1;
        }
        let mut start = self.starts[(i % n) * stride % n];
        if start + len + 64 > self.text.len() {
            start = self.text.len() - len - 64;
            while !self.text.is_char_boundary(start) {
                start -= 1;
            }
        }
        let mut end = start + len;
        while !self.text.is_char_boundary(end) {
            end += 1;
        }
        let mut s = self.text[start..end].to_string();
        if let Some(cut) = s.rfind(' ') {
            s.truncate(cut);
        }
        if i >= n {
            s.push_str(&format!(" ({})", i / n));
        }
        s
    }

    /// Text chunk `i`: id and value.
    pub fn chunk(&self, i: usize) -> Item {
        let content = self.window(i, CHUNK_TEXT_BYTES);
        let doc = compute_mdhash_id(&format!("document {}", i / 12), "doc-");
        let value = json!({
            "tokens": content.len() as u64 / 4,
            "content": content,
            "chunk_order_index": i % 12,
            "full_doc_id": doc,
        });
        (compute_mdhash_id(&content, "chunk-"), value)
    }

    /// LLM cache entry `i`: id (md5 hex of the prompt) and value.
    pub fn cache_entry(&self, i: usize) -> Item {
        let answer = self.window(i.wrapping_mul(31).wrapping_add(17), CACHE_TEXT_BYTES);
        let id = compute_mdhash_id(&format!("prompt {i}"), "");
        (id, json!({"return": answer, "model": "gpt-4o-mini"}))
    }

    /// `n` chunks, `0..n`.
    pub fn chunks(&self, n: usize) -> Vec<Item> {
        (0..n).map(|i| self.chunk(i)).collect()
    }

    /// `n` cache entries, `0..n`.
    pub fn cache_entries(&self, n: usize) -> Vec<Item> {
        (0..n).map(|i| self.cache_entry(i)).collect()
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Ids that are never stored (`chunk-<md5>` of a text no chunk has).
pub fn absent_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| compute_mdhash_id(&format!("absent {i}"), "chunk-"))
        .collect()
}

/// A small value for the 100,000-key namespace of `all_keys` (SCAN cost does not depend on value
/// size; small values keep the load short).
pub fn small_item(i: usize) -> Item {
    (
        compute_mdhash_id(&format!("key {i}"), "chunk-"),
        json!({"tokens": i, "chunk_order_index": 0}),
    )
}

/// Bytes of the values as JSON (what `upsert` receives), summed.
pub fn raw_json_bytes(items: &[Item]) -> usize {
    items
        .iter()
        .map(|(_, v)| serde_json::to_vec(v).expect("a Value serializes").len())
        .sum()
}

/// lz4 ratio of the values' JSON (raw bytes / compressed bytes, block format as the codec).
pub fn lz4_ratio(items: &[Item]) -> f64 {
    let (raw, packed) = items.iter().fold((0usize, 0usize), |(r, p), (_, v)| {
        let json = serde_json::to_vec(v).expect("a Value serializes");
        (r + json.len(), p + lz4_flex::block::compress(&json).len())
    });
    raw as f64 / packed as f64
}
