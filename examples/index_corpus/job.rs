//! What the workers share, and one chunk's and one document's work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use graphrag_kv::llm::LlmClient;
use graphrag_kv::llm_cache::LlmCache;
use graphrag_kv::llm_hash::Message;
use graphrag_kv::{FullDoc, KvStore, KvStoreExt, TextChunk};
use indicatif::ProgressBar;

use crate::corpus::Doc;
use crate::report::community_report;
use crate::BoxError;

/// The instructions sent with every chunk.
const SYSTEM_PROMPT: &str = "You help build a knowledge graph. Read the passage the user sends \
and answer in exactly two lines. First line: 'SUMMARY: ' followed by a summary of the passage in \
at most three sentences. Second line: 'KEY TERMS: ' followed by up to five key terms from the \
passage, separated by commas.";

/// Whether a worker waits for a prompt another thread or process is asking about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    Yes,
    No,
}

/// What the workers share.
pub(crate) struct Job {
    pub(crate) chunks: HashMap<String, TextChunk>,
    pub(crate) docs: Vec<Doc>,
    /// Documents each chunk belongs to (indices into `docs`): identical text may occur in two.
    pub(crate) docs_of_chunk: HashMap<String, Vec<usize>>,
    /// Chunks of each document still to process in this run.
    pub(crate) remaining: Mutex<Vec<usize>>,
    /// Answers obtained in this run, by chunk id.
    pub(crate) answers: Mutex<HashMap<String, String>>,
    pub(crate) full_docs: Arc<dyn KvStore>,
    pub(crate) text_chunks: Arc<dyn KvStore>,
    pub(crate) reports: Arc<dyn KvStore>,
    pub(crate) cache: LlmCache,
    pub(crate) llm: Box<dyn LlmClient>,
    pub(crate) model: String,
    pub(crate) llm_calls: AtomicU64,
    pub(crate) chunks_done: AtomicU64,
    pub(crate) docs_done: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) first_error: Mutex<Option<String>>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) progress: ProgressBar,
}

impl Job {
    /// The messages sent for a chunk.
    fn prompt(content: &str) -> [Message; 2] {
        [
            Message::new("system", SYSTEM_PROMPT),
            Message::new("user", content),
        ]
    }

    /// The LLM's answer for a chunk, through the shared cache; with `Wait::No`, `None` when
    /// another thread or process is asking the LLM about it right now.
    fn ask(&self, content: &str, wait: Wait) -> Result<Option<String>, BoxError> {
        let messages = Self::prompt(content);
        let llm = || {
            self.llm_calls.fetch_add(1, Ordering::SeqCst);
            self.llm.complete(&self.model, &messages)
        };
        Ok(match wait {
            Wait::Yes => Some(self.cache.get_or_compute(&self.model, &messages, llm)?),
            Wait::No => self.cache.try_get_or_compute(&self.model, &messages, llm)?,
        })
    }

    /// Asks the LLM about one chunk, stores the chunk, and finishes every document whose last
    /// chunk this was. `Ok(false)`: not done, someone else is asking about it (`Wait::No`).
    pub(crate) fn process_chunk(&self, id: &str, wait: Wait) -> Result<bool, BoxError> {
        let chunk = &self.chunks[id];
        let Some(answer) = self
            .ask(&chunk.content, wait)
            .map_err(|e| format!("chunk {id}: {e}"))?
        else {
            return Ok(false);
        };
        self.text_chunks.upsert_as([(id.to_string(), chunk)])?;
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), answer);
        self.chunks_done.fetch_add(1, Ordering::SeqCst);
        let finished: Vec<usize> = {
            let mut remaining = self.remaining.lock().unwrap_or_else(|p| p.into_inner());
            self.docs_of_chunk[id]
                .iter()
                .copied()
                .filter(|&d| {
                    remaining[d] -= 1;
                    remaining[d] == 0
                })
                .collect()
        };
        for d in finished {
            self.finish_doc(d)?;
        }
        Ok(true)
    }

    /// Writes a document's community report, then the document itself: from then on the
    /// document counts as indexed.
    pub(crate) fn finish_doc(&self, d: usize) -> Result<(), BoxError> {
        let doc = &self.docs[d];
        let mut answers = Vec::with_capacity(doc.chunk_ids.len());
        for id in &doc.chunk_ids {
            let known = self
                .answers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned();
            // A chunk stored by an earlier run: its answer is in the cache.
            let answer = match known {
                Some(a) => a,
                None => self
                    .ask(&self.chunks[id].content, Wait::Yes)?
                    .unwrap_or_default(),
            };
            answers.push(answer);
        }
        let (report_id, report) = community_report(doc, &answers);
        self.reports.upsert(vec![(report_id, report)])?;
        self.full_docs.upsert_as([(
            doc.id.clone(),
            FullDoc {
                content: doc.content.clone(),
            },
        )])?;
        self.docs_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Records the outcome of a chunk: progress, or a failure.
    pub(crate) fn record_chunk(&self, result: Result<bool, BoxError>) {
        self.progress.inc(1);
        let s = self.cache.stats();
        self.progress
            .set_message(format!("hits {} waits {}", s.hits, s.waits));
        self.record(result.map(|_| ()));
    }

    /// Counts a failure (the first one is kept for the summary); the run goes on.
    pub(crate) fn record(&self, result: Result<(), BoxError>) {
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::SeqCst);
            let msg = e.to_string();
            self.progress.suspend(|| log::error!("index_corpus: {msg}"));
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(msg);
        }
    }
}
