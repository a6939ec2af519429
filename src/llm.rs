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
mod openai {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use serde_json::{json, Value};

    use super::{Completion, LlmClient, Usage};
    use crate::config::redact_url;
    use crate::error::{Error, Result};
    use crate::llm_hash::Message;

    /// Longest part of an error response body quoted in an error message.
    const MAX_ERROR_BODY: usize = 500;
    /// Longest pause honoured from a `Retry-After` header.
    const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

    /// An OpenAI-compatible chat-completions client (feature `openai`): `POST
    /// {base_url}/chat/completions` with a bearer API key, on the blocking `ureq` crate.
    ///
    /// Works with OpenAI and with servers that speak its protocol (vLLM, llama.cpp's server,
    /// Ollama's `/v1`, LiteLLM, ...). Retries timeouts, connection failures, HTTP 408, 409, 429
    /// and 5xx a few times with exponential backoff (honouring `retry-after-ms` and
    /// `Retry-After`), as nano-graphrag retries rate limits and connection errors.
    /// [`LlmClient::complete_once`] sends one request without retries and reports the answer's
    /// `usage`, for [`crate::rate_limit::RateLimitedLlm`].
    ///
    /// The API key is sent only in the `Authorization` header: `Debug` leaves it out and error
    /// messages never contain it (a server echoing it back is redacted).
    ///
    /// The crate's `ureq` is built without a TLS stack, so `https://` base URLs need the
    /// application to enable one (e.g. `ureq = { version = "3", features = ["rustls"] }` in its
    /// own `Cargo.toml`); plain `http://` servers work as is.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use graphrag_kv::llm::{LlmClient, OpenAiClient};
    /// use graphrag_kv::llm_hash::Message;
    ///
    /// let llm = OpenAiClient::from_env()?; // OPENAI_API_KEY, OPENAI_BASE_URL
    /// let answer = llm.complete("gpt-4o-mini", &[Message::new("user", "Say hi")])?;
    /// # Ok::<(), graphrag_kv::Error>(())
    /// ```
    pub struct OpenAiClient {
        /// Without a trailing `/`.
        base_url: String,
        api_key: String,
        timeout: Duration,
        retries: u32,
        temperature: Option<f64>,
        max_tokens: Option<u32>,
        /// Holds the keep-alive connection pool; rebuilt when the timeout changes.
        agent: ureq::Agent,
        /// HTTP requests sent (retries included).
        requests: AtomicU64,
    }

    impl std::fmt::Debug for OpenAiClient {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("OpenAiClient")
                .field("base_url", &redact_url(&self.base_url))
                .field("timeout", &self.timeout)
                .field("retries", &self.retries)
                .field("temperature", &self.temperature)
                .field("max_tokens", &self.max_tokens)
                .finish_non_exhaustive()
        }
    }

    impl OpenAiClient {
        /// OpenAI's own endpoint, the default base URL.
        pub const DEFAULT_BASE_URL: &'static str = "https://api.openai.com/v1";
        /// Default timeout of one request: 120 s.
        pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
        /// Default number of retries after a transient failure: 3.
        pub const DEFAULT_RETRIES: u32 = 3;

        /// A client for `base_url` (e.g. `https://api.openai.com/v1`, `http://localhost:8000/v1`)
        /// with `api_key` (may be empty for local servers that need none).
        pub fn new(base_url: impl Into<String>, api_key: impl Into<String>) -> OpenAiClient {
            let base_url = base_url.into().trim_end_matches('/').to_string();
            OpenAiClient {
                base_url,
                api_key: api_key.into(),
                timeout: Self::DEFAULT_TIMEOUT,
                retries: Self::DEFAULT_RETRIES,
                temperature: None,
                max_tokens: None,
                agent: agent(Self::DEFAULT_TIMEOUT),
                requests: AtomicU64::new(0),
            }
        }

        /// A client from `OPENAI_API_KEY` (required) and `OPENAI_BASE_URL` (defaults to
        /// [`Self::DEFAULT_BASE_URL`]).
        ///
        /// # Errors
        /// [`Error::Config`] when `OPENAI_API_KEY` is unset or empty.
        pub fn from_env() -> Result<OpenAiClient> {
            let key = std::env::var("OPENAI_API_KEY").unwrap_or_default();
            if key.trim().is_empty() {
                return Err(Error::Config {
                    variable: "OPENAI_API_KEY".into(),
                    value: String::new(),
                    expected: "an API key for the chat-completions endpoint".into(),
                });
            }
            let base = std::env::var("OPENAI_BASE_URL")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| Self::DEFAULT_BASE_URL.to_string());
            Ok(OpenAiClient::new(base.trim(), key.trim()))
        }

        /// Sets the timeout of one request, connection to last byte. Defaults to 120 s.
        pub fn with_timeout(mut self, timeout: Duration) -> OpenAiClient {
            self.timeout = timeout;
            self.agent = agent(timeout);
            self
        }

        /// Sets how many times a transient failure is retried. Defaults to 3.
        pub fn with_retries(mut self, retries: u32) -> OpenAiClient {
            self.retries = retries;
            self
        }

        /// Sends `temperature` with every request. Defaults to the server's own default.
        pub fn with_temperature(mut self, temperature: f64) -> OpenAiClient {
            self.temperature = Some(temperature);
            self
        }

        /// Sends `max_tokens` with every request. Defaults to the server's own default.
        pub fn with_max_tokens(mut self, max_tokens: u32) -> OpenAiClient {
            self.max_tokens = Some(max_tokens);
            self
        }

        /// The base URL requests go to (without a trailing `/`).
        pub fn base_url(&self) -> &str {
            &self.base_url
        }

        /// HTTP requests sent so far, retries included.
        pub fn requests(&self) -> u64 {
            self.requests.load(Ordering::Relaxed)
        }

        /// The JSON body of a request.
        fn body(&self, model: &str, messages: &[Message]) -> Value {
            let mut body = json!({ "model": model, "messages": messages });
            if let Some(t) = self.temperature {
                body["temperature"] = json!(t);
            }
            if let Some(n) = self.max_tokens {
                body["max_tokens"] = json!(n);
            }
            body
        }

        /// One request: the answer, or the error and how long to wait before a retry. `shown`
        /// is the URL for messages (credentials in it redacted).
        fn attempt(
            &self,
            url: &str,
            shown: &str,
            body: &Value,
        ) -> std::result::Result<Completion, Failure> {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut request = self.agent.post(url);
            if !self.api_key.is_empty() {
                request = request.header("Authorization", format!("Bearer {}", self.api_key));
            }
            let mut response = request.send_json(body).map_err(|e| Failure {
                reason: format!("POST {shown}: {}", describe_transport(&e)),
                retryable: is_transient_transport(&e),
                retry_after: None,
                rate_limited: false,
            })?;
            let status = response.status().as_u16();
            let text = response
                .body_mut()
                .with_config()
                .limit(64 * 1024 * 1024)
                .read_to_string()
                .map_err(|e| Failure {
                    reason: format!("POST {shown}: reading the HTTP {status} response: {e}"),
                    retryable: is_transient_transport(&e),
                    retry_after: None,
                    rate_limited: false,
                })?;
            if !(200..300).contains(&status) {
                return Err(Failure {
                    reason: format!("POST {shown}: HTTP {status}: {}", error_message(&text)),
                    retryable: matches!(status, 408 | 409 | 429 | 500..=599),
                    retry_after: retry_after(response.headers()),
                    rate_limited: status == 429,
                });
            }
            parse_answer(&text).map_err(|why| Failure {
                reason: format!("POST {shown}: unexpected response ({why}): {}", clip(&text)),
                retryable: false,
                retry_after: None,
                rate_limited: false,
            })
        }

        /// Removes the API key from a message, in case a server echoed it.
        fn redact(&self, mut reason: String) -> String {
            if self.api_key.len() >= 4 {
                reason = reason.replace(&self.api_key, "<redacted>");
            }
            reason
        }
    }

    impl LlmClient for OpenAiClient {
        fn complete(&self, model: &str, messages: &[Message]) -> Result<String> {
            let url = format!("{}/chat/completions", self.base_url);
            let shown = redact_url(&url);
            let body = self.body(model, messages);
            let mut attempt = 0u32;
            loop {
                match self.attempt(&url, &shown, &body) {
                    Ok(answer) => return Ok(answer.text),
                    Err(f) if f.retryable && attempt < self.retries => {
                        let pause = f
                            .retry_after
                            .unwrap_or_else(|| Duration::from_millis(500 << attempt.min(6)));
                        log::warn!(
                            "{} (retry {} of {} in {pause:?})",
                            self.redact(f.reason),
                            attempt + 1,
                            self.retries
                        );
                        std::thread::sleep(pause);
                        attempt += 1;
                    }
                    Err(f) => {
                        let tries = if attempt > 0 {
                            format!(" (after {} attempts)", attempt + 1)
                        } else {
                            String::new()
                        };
                        return Err(Error::Llm {
                            reason: self.redact(format!("{}{tries}", f.reason)),
                            retryable: f.retryable,
                        });
                    }
                }
            }
        }

        /// One request, no retry: a 429 is [`Error::LlmRateLimited`] with the wait the server
        /// asked for, so a [`crate::rate_limit::RateLimitedLlm`] around this client turns it
        /// into a cool-down shared by every process; the usage is the response's `usage`.
        fn complete_once(&self, model: &str, messages: &[Message]) -> Result<Completion> {
            let url = format!("{}/chat/completions", self.base_url);
            let shown = redact_url(&url);
            match self.attempt(&url, &shown, &self.body(model, messages)) {
                Ok(answer) => Ok(answer),
                Err(f) if f.rate_limited => Err(Error::LlmRateLimited {
                    reason: self.redact(f.reason),
                    retry_after: f.retry_after,
                }),
                Err(f) => Err(Error::Llm {
                    reason: self.redact(f.reason),
                    retryable: f.retryable,
                }),
            }
        }
    }

    /// Why one request failed.
    struct Failure {
        reason: String,
        retryable: bool,
        retry_after: Option<Duration>,
        /// HTTP 429.
        rate_limited: bool,
    }

    /// The wait a refusal asks for: OpenAI's `retry-after-ms` (milliseconds) when present, else
    /// `Retry-After` in whole seconds; at most [`MAX_RETRY_AFTER`].
    fn retry_after(headers: &ureq::http::HeaderMap) -> Option<Duration> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_string())
        };
        let ms = header("retry-after-ms")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|ms| {
                Duration::from_secs_f64(ms.min(MAX_RETRY_AFTER.as_secs_f64() * 1000.0) / 1000.0)
            });
        ms.or_else(|| {
            header("retry-after")
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
        })
        .map(|d| d.min(MAX_RETRY_AFTER))
    }

    fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // Error statuses are read as responses so their body can be quoted.
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn is_transient_transport(e: &ureq::Error) -> bool {
        matches!(
            e,
            ureq::Error::Io(_)
                | ureq::Error::Timeout(_)
                | ureq::Error::HostNotFound
                | ureq::Error::ConnectionFailed
                | ureq::Error::Protocol(_)
        )
    }

    fn describe_transport(e: &ureq::Error) -> String {
        match e {
            ureq::Error::Tls(_) | ureq::Error::TlsRequired => format!(
                "{e} (this build of ureq has no TLS stack: use an http:// base URL, or enable \
                 ureq's `rustls` feature in your application)"
            ),
            _ => e.to_string(),
        }
    }

    /// `choices[0].message.content` of a chat-completions response, and its `usage` when it
    /// has one.
    fn parse_answer(text: &str) -> std::result::Result<Completion, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let answer = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| "no string at choices[0].message.content".to_string())?;
        let mut completion = Completion::new(answer);
        let tokens = |name: &str| v.pointer(&format!("/usage/{name}")).and_then(Value::as_u64);
        if let (Some(p), Some(c)) = (tokens("prompt_tokens"), tokens("completion_tokens")) {
            completion = completion.with_usage(Usage::new(p, c));
        }
        Ok(completion)
    }

    /// The `error.message` of an error body, or the body itself, shortened.
    fn error_message(text: &str) -> String {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .map(|m| clip(&m))
            .unwrap_or_else(|| clip(text))
    }

    fn clip(text: &str) -> String {
        let text = text.trim();
        if text.len() <= MAX_ERROR_BODY {
            return text.to_string();
        }
        let mut cut = MAX_ERROR_BODY;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}... ({} bytes)", &text[..cut], text.len())
    }
}

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
