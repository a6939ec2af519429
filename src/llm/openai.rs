//! `OpenAiClient` (feature `openai`): an OpenAI-compatible chat-completions client on `ureq`.

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
        .map(|ms| Duration::from_secs_f64(ms.min(MAX_RETRY_AFTER.as_secs_f64() * 1000.0) / 1000.0));
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
