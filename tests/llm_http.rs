//! `OpenAiClient` (feature `openai`) against a local mock of the chat-completions endpoint
//! (tiny_http on 127.0.0.1:0): the request it sends, the answer it reads, retries, errors, the
//! API key kept out of messages, and one call per prompt through `LlmCache`.
//!
//! Run with `cargo test --features openai --test llm_http`.
#![cfg(feature = "openai")]

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use graphrag_kv::llm::{LlmClient, OpenAiClient, Usage};
use graphrag_kv::llm_cache::LlmCache;
use graphrag_kv::llm_hash::Message;
use graphrag_kv::rate_limit::{RateLimit, RateLimitedLlm};
use graphrag_kv::{Error, Storage, StoreConfig};
use serde_json::{json, Value};

const KEY: &str = "sk-test-0123456789abcdef";

/// One scripted reply of the mock.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Waited before answering (to provoke client timeouts).
    delay: Duration,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }
}

fn completion(text: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        }),
    )
}

/// A request as the mock received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    url: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Value,
}

/// A chat-completions endpoint answering the scripted replies in order, one per request.
struct Mock {
    base_url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    fn start(replies: Vec<Reply>) -> Mock {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = server.server_addr().to_ip().expect("an IP address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for reply in replies {
                    let Ok(Some(mut request)) = server.recv_timeout(Duration::from_secs(20)) else {
                        return;
                    };
                    let header = |name: &str| {
                        request
                            .headers()
                            .iter()
                            .find(|h| h.field.to_string().eq_ignore_ascii_case(name))
                            .map(|h| h.value.to_string())
                    };
                    let (authorization, content_type) =
                        (header("Authorization"), header("Content-Type"));
                    let mut body = String::new();
                    request.as_reader().read_to_string(&mut body).unwrap();
                    seen.lock().unwrap().push(Seen {
                        method: request.method().to_string(),
                        url: request.url().to_string(),
                        authorization,
                        content_type,
                        body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                    });
                    std::thread::sleep(reply.delay);
                    let mut response =
                        tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
                    for (k, v) in reply.headers {
                        response = response.with_header(
                            tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap(),
                        );
                    }
                    // The client may have given up already (timeout tests).
                    let _ = request.respond(response);
                }
            })
        };
        Mock {
            base_url: format!("http://{addr}/v1"),
            seen,
            thread: Some(thread),
        }
    }

    fn client(&self) -> OpenAiClient {
        OpenAiClient::new(format!("{}/", self.base_url), KEY).with_timeout(Duration::from_secs(10))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits for the mock to have answered every scripted reply.
    fn finish(mut self) -> Vec<Seen> {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.seen()
    }
}

fn messages() -> Vec<Message> {
    vec![
        Message::new("system", "You summarise passages."),
        Message::new(
            "user",
            "The tide comes in twice a day.\n\"Quoted\" text, ünïcödé.",
        ),
    ]
}

#[test]
fn posts_the_chat_completion_request_and_reads_the_answer() {
    let mock = Mock::start(vec![completion("SUMMARY: tides.\nKEY TERMS: tide")]);
    let client = mock.client().with_temperature(0.0).with_max_tokens(64);
    assert_eq!(client.base_url(), mock.base_url, "trailing slash trimmed");
    let answer = client.complete("gpt-4o-mini", &messages()).unwrap();
    assert_eq!(answer, "SUMMARY: tides.\nKEY TERMS: tide");
    assert_eq!(client.requests(), 1);

    let seen = mock.finish();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.url, "/v1/chat/completions");
    assert_eq!(
        req.authorization.as_deref(),
        Some(&*format!("Bearer {KEY}"))
    );
    assert!(
        req.content_type
            .as_deref()
            .unwrap_or("")
            .starts_with("application/json"),
        "{:?}",
        req.content_type
    );
    assert_eq!(
        req.body,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You summarise passages."},
                {"role": "user", "content": "The tide comes in twice a day.\n\"Quoted\" text, ünïcödé."}
            ],
            "temperature": 0.0,
            "max_tokens": 64
        })
    );
}

#[test]
fn through_the_cache_a_prompt_is_sent_once() {
    let mock = Mock::start(vec![completion("cached answer")]);
    let client = mock.client();
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    for _ in 0..3 {
        assert_eq!(
            cache.complete(&client, "gpt-4o-mini", &messages()).unwrap(),
            "cached answer"
        );
    }
    assert_eq!(client.requests(), 1);
    assert_eq!(cache.stats().hits, 2);
    assert_eq!(mock.finish().len(), 1);
}

#[test]
fn rate_limit_is_retried_after_retry_after() {
    let mut limited = Reply::json(429, json!({"error": {"message": "Rate limit reached"}}));
    limited.headers.push(("Retry-After", "0".into()));
    let mock = Mock::start(vec![limited, completion("second time lucky")]);
    let client = mock.client();
    assert_eq!(
        client.complete("gpt-4o-mini", &messages()).unwrap(),
        "second time lucky"
    );
    assert_eq!(client.requests(), 2);
    let seen = mock.finish();
    assert_eq!(
        seen[0].body, seen[1].body,
        "the retry sends the same request"
    );
}

#[test]
fn server_errors_are_retryable_when_retries_run_out() {
    let mock = Mock::start(vec![
        Reply::json(503, json!({"error": {"message": "overloaded"}})),
        Reply::json(503, json!({"error": {"message": "overloaded"}})),
    ]);
    let client = mock.client().with_retries(1);
    let err = client.complete("gpt-4o-mini", &messages()).unwrap_err();
    assert!(matches!(err, Error::Llm { .. }), "{err:?}");
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("HTTP 503") && msg.contains("overloaded"),
        "{msg}"
    );
    assert!(msg.contains("after 2 attempts"), "{msg}");
    assert_eq!(mock.finish().len(), 2);
}

#[test]
fn auth_failure_is_final_and_never_shows_the_key() {
    // Some servers echo the key back in their error message.
    let mock = Mock::start(vec![Reply::json(
        401,
        json!({"error": {"message": format!("Incorrect API key provided: {KEY}."), "type": "invalid_request_error"}}),
    )]);
    let client = mock.client();
    let err = client.complete("gpt-4o-mini", &messages()).unwrap_err();
    assert!(!err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("HTTP 401") && msg.contains("Incorrect API key"),
        "{msg}"
    );
    assert!(!msg.contains(KEY), "{msg}");
    assert!(!format!("{err:?}").contains(KEY));
    assert!(!format!("{client:?}").contains(KEY));
    assert_eq!(client.requests(), 1, "a 401 is not retried");
    mock.finish();
}

#[test]
fn unexpected_response_is_an_error_not_an_answer() {
    let mock = Mock::start(vec![
        Reply::json(200, json!({"choices": []})),
        Reply {
            status: 200,
            headers: vec![],
            body: "<html>proxy error</html>".into(),
            delay: Duration::ZERO,
        },
    ]);
    let client = mock.client();
    for expected in ["choices[0].message.content", "not JSON"] {
        let err = client.complete("gpt-4o-mini", &messages()).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains(expected), "{err}");
    }
    mock.finish();
}

#[test]
fn timeout_is_a_retryable_error() {
    let mut slow = completion("too late");
    slow.delay = Duration::from_secs(2);
    let mock = Mock::start(vec![slow]);
    let client = mock
        .client()
        .with_timeout(Duration::from_millis(300))
        .with_retries(0);
    let err = client.complete("gpt-4o-mini", &messages()).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("timeout"), "{err}");
    mock.finish();
}

#[test]
fn unreachable_server_is_a_retryable_error() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Credentials in the base URL are not shown either.
    let client =
        OpenAiClient::new(format!("http://proxy:hunter2@127.0.0.1:{port}/v1"), KEY).with_retries(0);
    let err = client.complete("gpt-4o-mini", &messages()).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(!msg.contains(KEY) && !msg.contains("hunter2"), "{msg}");
    assert!(!format!("{client:?}").contains("hunter2"));
}

#[test]
fn from_env_requires_a_key() {
    // Only this test touches these variables in this binary.
    std::env::remove_var("OPENAI_API_KEY");
    let err = OpenAiClient::from_env().unwrap_err();
    assert!(err.to_string().contains("OPENAI_API_KEY"), "{err}");
    std::env::set_var("OPENAI_API_KEY", KEY);
    std::env::set_var("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/");
    let client = OpenAiClient::from_env().unwrap();
    assert_eq!(client.base_url(), "http://127.0.0.1:9/v1");
    std::env::remove_var("OPENAI_API_KEY");
    std::env::remove_var("OPENAI_BASE_URL");
}

#[test]
fn complete_once_reports_usage_and_a_429_with_its_wait() {
    let mut limited = Reply::json(429, json!({"error": {"message": "Rate limit reached"}}));
    limited.headers.push(("retry-after-ms", "250".into()));
    limited.headers.push(("Retry-After", "1".into()));
    let mut seconds_only = Reply::json(429, json!({"error": {"message": "Rate limit reached"}}));
    seconds_only.headers.push(("Retry-After", "2".into()));
    let mock = Mock::start(vec![limited, seconds_only, completion("once")]);
    let client = mock.client();
    let err = client
        .complete_once("gpt-4o-mini", &messages())
        .unwrap_err();
    assert!(err.is_rate_limited() && err.is_retryable(), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
    assert!(err.to_string().contains("HTTP 429"), "{err}");
    let err = client
        .complete_once("gpt-4o-mini", &messages())
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    let answer = client.complete_once("gpt-4o-mini", &messages()).unwrap();
    assert_eq!(answer.text, "once");
    assert_eq!(answer.usage, Some(Usage::new(10, 3)));
    assert_eq!(client.requests(), 3, "no retries of its own");
    mock.finish();
}

#[test]
fn rate_limited_through_the_cache_a_429_pauses_then_the_prompt_is_sent_again_once() {
    let mut limited = Reply::json(429, json!({"error": {"message": "Rate limit reached"}}));
    limited.headers.push(("retry-after-ms", "400".into()));
    let mock = Mock::start(vec![limited, completion("after the pause")]);
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    let limit = RateLimit::builder().requests(600).build().unwrap();
    let llm = RateLimitedLlm::new(mock.client(), storage.rate_limiter(), limit)
        .with_endpoint(&mock.base_url);
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(
            cache.complete(&llm, "gpt-4o-mini", &messages()).unwrap(),
            "after the pause"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the cool-down was honoured: {:?}",
        started.elapsed()
    );
    let s = llm.stats();
    assert_eq!(
        (s.admitted, s.rate_limited, s.cool_downs),
        (2, 1, 1),
        "hits do not wait: {s:?}"
    );
    assert_eq!(llm.inner().requests(), 2);
    let seen = mock.finish();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body);
}
