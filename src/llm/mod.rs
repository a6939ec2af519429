//! The LLM interface: "complete these messages with this model", and two implementations.
//!
//! - [`LocalLlm`]: a deterministic stand-in that answers from the prompt itself, with a
//!   configurable latency and a call counter. The default of the `index_corpus` example, so the
//!   main job runs with no network and no API key, and tests can count calls exactly.
//! - `OpenAiClient` (feature `openai`): an OpenAI-compatible chat-completions client on the
//!   blocking `ureq` HTTP crate, for OpenAI itself or any server speaking the same protocol.
//!
//! Put an [`LlmClient`] behind [`crate::llm_cache::LlmCache`] so each distinct prompt is paid for
//! once, however many threads and processes ask it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::Result;
use crate::llm_hash::{compute_args_hash, Message};

/// A chat model: completes a conversation with the model's answer.
///
/// Implementations are shared between worker threads (`&self`, `Send + Sync`) and block until
/// the answer is there.
pub trait LlmClient: Send + Sync {
    /// The model's answer to `messages` (in order: system, user, assistant turns).
    ///
    /// # Errors
    /// [`crate::Error::Llm`] when the request fails; [`crate::Error::is_retryable`] says whether
    /// trying again later may help.
    fn complete(&self, model: &str, messages: &[Message]) -> Result<String>;

    /// One request, without retries of the client's own, with the token usage the answer
    /// reports: what [`crate::rate_limit::RateLimitedLlm`] calls, so that every request sent
    /// (retries included) draws from the shared budget, a rate-limit refusal reaches the
    /// limiter, and the token estimate is corrected with the real count.
    ///
    /// The default calls [`LlmClient::complete`] (with whatever retries it does) and reports no
    /// usage, so existing clients keep working unchanged; a client that overrides it should
    /// return [`crate::Error::LlmRateLimited`] for a rate-limit refusal (HTTP 429).
    ///
    /// # Errors
    /// As [`LlmClient::complete`]; [`crate::Error::LlmRateLimited`] for a rate-limit refusal.
    fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
        Ok(Completion::new(self.complete(model, messages)?))
    }
}

impl<T: LlmClient + ?Sized> LlmClient for std::sync::Arc<T> {
    fn complete(&self, model: &str, messages: &[Message]) -> Result<String> {
        (**self).complete(model, messages)
    }
    fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
        (**self).complete_once(model, messages)
    }
}

impl<T: LlmClient + ?Sized> LlmClient for Box<T> {
    fn complete(&self, model: &str, messages: &[Message]) -> Result<String> {
        (**self).complete(model, messages)
    }
    fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
        (**self).complete_once(model, messages)
    }
}

/// An answer and the token usage the server reported for it, from
/// [`LlmClient::complete_once`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completion {
    /// The model's answer.
    pub text: String,
    /// Tokens the request cost, when the server said (OpenAI's `usage`).
    pub usage: Option<Usage>,
}

impl Completion {
    /// An answer with no usage reported.
    pub fn new(text: impl Into<String>) -> Completion {
        Completion {
            text: text.into(),
            usage: None,
        }
    }

    /// Adds the usage the server reported.
    pub fn with_usage(mut self, usage: Usage) -> Completion {
        self.usage = Some(usage);
        self
    }
}

/// Tokens one request cost, as OpenAI's `usage` object reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Tokens of the answer.
    pub completion_tokens: u64,
}

impl Usage {
    /// Usage of `prompt_tokens` in and `completion_tokens` out.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
        }
    }

    /// Prompt and completion tokens together: what a tokens-per-minute limit counts.
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// A deterministic stand-in for a chat model: no network, same answer for the same prompt.
///
/// The answer summarises the last message (Markdown heading lines left out): its opening
/// sentences and its most frequent content words, in two lines,
///
/// ```text
/// SUMMARY: <the first sentences of the last message, at most about 40 words>
/// KEY TERMS: <up to five frequent words>, ...
/// ```
///
/// followed by a `REF:` line with the first 8 hex digits of the prompt's cache key, so two
/// prompts that differ anywhere (model, system message) get different answers. Each call
/// sleeps for the configured latency first, standing in for the time a real model takes.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use graphrag_kv::llm::{LlmClient, LocalLlm};
/// use graphrag_kv::llm_hash::Message;
///
/// let llm = LocalLlm::new().with_latency(Duration::ZERO);
/// let prompt = [Message::new("user", "Tides rise twice a day. The moon pulls the sea.")];
/// let a = llm.complete("local", &prompt)?;
/// assert!(a.starts_with("SUMMARY: Tides rise twice a day."));
/// assert_eq!(a, llm.complete("local", &prompt)?);
/// assert_eq!(llm.calls(), 2);
/// # Ok::<(), graphrag_kv::Error>(())
/// ```
#[derive(Debug, Default)]
pub struct LocalLlm {
    /// Slept at the start of every call.
    latency: Duration,
    /// Calls made so far; atomic because worker threads share one client.
    calls: AtomicU64,
}

/// Words never chosen as key terms.
const STOPWORDS: &[&str] = &[
    "about", "above", "after", "again", "against", "also", "although", "among", "another",
    "because", "been", "before", "being", "below", "between", "both", "could", "does", "doing",
    "down", "during", "each", "either", "enough", "even", "every", "from", "further", "have",
    "having", "here", "into", "itself", "just", "less", "like", "made", "make", "many", "more",
    "most", "much", "must", "neither", "never", "once", "only", "other", "ought", "over", "same",
    "shall", "should", "since", "some", "still", "such", "than", "that", "their", "theirs", "them",
    "then", "there", "these", "they", "this", "those", "though", "through", "thus", "under",
    "until", "upon", "very", "were", "what", "when", "where", "whether", "which", "while", "whom",
    "whose", "will", "with", "within", "without", "would", "your", "yours",
];

/// Most words of the opening taken into the summary.
const SUMMARY_WORDS: usize = 40;
/// Key terms listed.
const KEY_TERMS: usize = 5;

impl LocalLlm {
    /// A stand-in with no latency.
    pub fn new() -> LocalLlm {
        LocalLlm::default()
    }

    /// Sets the time each call takes. Defaults to zero.
    pub fn with_latency(mut self, latency: Duration) -> LocalLlm {
        self.latency = latency;
        self
    }

    /// The time each call takes.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Calls made so far (successful or not), from every thread.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The answer to `messages`, without the latency and without counting a call.
    pub fn answer(model: &str, messages: &[Message]) -> String {
        let last = messages.last().map(|m| m.content.as_str()).unwrap_or("");
        // Markdown headings are titles, not sentences of the passage.
        let text: String = last
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let reference = &compute_args_hash(model, messages)[..8];
        format!(
            "SUMMARY: {}\nKEY TERMS: {}\nREF: {reference}",
            opening(&text),
            key_terms(&text).join(", ")
        )
    }
}

impl LlmClient for LocalLlm {
    fn complete(&self, model: &str, messages: &[Message]) -> Result<String> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
        Ok(LocalLlm::answer(model, messages))
    }

    /// As `complete`, reporting as usage the crate's token estimate of the prompt and of the
    /// answer ([`crate::rate_limit::estimate_tokens`]): there is no tokenizer to ask.
    fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
        let text = self.complete(model, messages)?;
        let prompt = crate::rate_limit::estimate_tokens(messages);
        let answer = crate::rate_limit::estimate_text_tokens(&text);
        Ok(Completion::new(text).with_usage(Usage::new(prompt, answer)))
    }
}

/// Whole sentences from the start of `text` up to about [`SUMMARY_WORDS`] words; a first
/// sentence longer than that is cut at a word and ends with `...`.
fn opening(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return "(empty passage)".into();
    }
    let mut end = 0;
    for (i, w) in words.iter().enumerate().take(SUMMARY_WORDS) {
        if w.ends_with(['.', '!', '?']) || w.ends_with(".\"") || w.ends_with(".'") {
            end = i + 1;
        }
    }
    if end == 0 {
        let cut = words.len().min(SUMMARY_WORDS);
        let mut s = words[..cut].join(" ");
        if cut < words.len() {
            s.push_str("...");
        }
        return s;
    }
    words[..end].join(" ")
}

/// The [`KEY_TERMS`] most frequent words of `text` of at least five letters, not stopwords;
/// ties go to the word seen first.
fn key_terms(text: &str) -> Vec<String> {
    let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
    let words = text
        .split(|c: char| !c.is_alphabetic() && c != '\'' && c != '-')
        .map(|w| w.trim_matches(|c: char| !c.is_alphabetic()).to_lowercase())
        .filter(|w| w.chars().count() >= 5 && !STOPWORDS.contains(&w.as_str()));
    for (i, w) in words.enumerate() {
        counts.entry(w).or_insert((0, i)).0 += 1;
    }
    let mut ranked: Vec<(String, (usize, usize))> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.1 .1.cmp(&b.1 .1)));
    ranked.into_iter().take(KEY_TERMS).map(|(w, _)| w).collect()
}

#[cfg(feature = "openai")]
pub use openai::OpenAiClient;

#[cfg(feature = "openai")]
mod openai;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_takes_whole_sentences() {
        assert_eq!(opening("One. Two three. "), "One. Two three.");
        let long = "word ".repeat(100);
        let s = opening(&long);
        assert!(s.ends_with("..."), "{s}");
        assert_eq!(s.split_whitespace().count(), SUMMARY_WORDS);
        assert_eq!(opening("  "), "(empty passage)");
    }

    #[test]
    fn key_terms_rank_by_frequency_then_position() {
        let t = "Lighthouse keepers trimmed wicks. The lighthouse keepers polished lenses; \
                 lenses matter. Lighthouse!";
        assert_eq!(
            key_terms(t),
            ["lighthouse", "keepers", "lenses", "trimmed", "wicks"]
        );
    }

    #[test]
    fn local_answers_depend_on_the_whole_prompt() {
        let user = Message::new("user", "Salt was money once.");
        let a = LocalLlm::answer("m1", std::slice::from_ref(&user));
        let b = LocalLlm::answer("m2", std::slice::from_ref(&user));
        assert_ne!(a, b);
        assert_eq!(a, LocalLlm::answer("m1", &[user]));
    }
}
