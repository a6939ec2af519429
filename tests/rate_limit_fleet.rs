//! The proof of the fleet-wide rate limit: 4 `index_corpus` processes × 4 workers against one
//! redis-server (started here) and one OpenAI-compatible mock (tiny_http) that records the
//! arrival time of every request and, in the second run, answers 429 with `retry-after-ms` at
//! random. The limit is scaled down to a one-second period (`LLM_RATE_LIMIT_PERIOD_MS=1000`)
//! so the run takes seconds; the workers could send ~150 times the limit.
//!
//! Asserted: no one-second window receives more than the limit plus the burst; the fleet's
//! throughput over the run is at least 90% of the limit; every prompt is answered exactly once;
//! with random 429s nothing is lost.
//!
//! Run with `cargo test --features openai --test rate_limit_fleet`.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use graphrag_kv::llm_hash::compute_mdhash_id;
use graphrag_kv::{BackendKind, Storage, StoreConfig, LLM_RESPONSE_CACHE, TEXT_CHUNKS};
use serde_json::{json, Value};
use support::{unique_prefix, RedisServer, Rng};

/// Requests per period (one second) in these runs. One request's share of the period (200 ms)
/// is also the arrival jitter the bound tolerates: the limiter admits at most `LIMIT + BURST -
/// 1` per window (in Redis time); the mock sees the requests a little later each, by varying
/// amounts (a process's first request opens its connection).
const LIMIT: u64 = 5;
/// The burst set for these runs (`LLM_RATE_LIMIT_BURST`).
const BURST: u64 = 2;
/// The period.
const PERIOD: Duration = Duration::from_secs(1);
const PROCESSES: usize = 4;
const WORKERS: &str = "4";
/// Time the mock takes to answer: the 16 workers could send 16 / 20 ms = 800 requests per
/// second, 160 times the limit.
const LATENCY: Duration = Duration::from_millis(20);
/// The wait a refusal asks for: longer than a request's share of the period (200 ms), so a
/// cool-down honoured by one process only would show as arrivals from the others within it.
const RETRY_AFTER_MS: u64 = 500;

fn example_bin() -> PathBuf {
    support::example_bin("index_corpus", &["openai"])
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
struct Arrival {
    /// Since the mock started.
    at: Duration,
    /// The chunk text (the user message).
    prompt: String,
    status: u16,
}

/// An OpenAI-compatible chat-completions endpoint that records every request, answering 429
/// with probability `refuse_per_mille / 1000`.
struct Mock {
    base_url: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Mock {
    fn start(refuse_per_mille: usize, seed: u64) -> Mock {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("binding 127.0.0.1:0"));
        let addr = server.server_addr().to_ip().expect("an IP address");
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        // More handler threads than workers: a request never queues behind another.
        let threads = (0..24)
            .map(|_| {
                let (server, arrivals, stop, rng) =
                    (server.clone(), arrivals.clone(), stop.clone(), rng.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(Some(mut request)) =
                            server.recv_timeout(Duration::from_millis(100))
                        else {
                            continue;
                        };
                        let at = started.elapsed();
                        let mut body = String::new();
                        request.as_reader().read_to_string(&mut body).unwrap();
                        let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                        let prompt = body["messages"][1]["content"]
                            .as_str()
                            .unwrap_or("")
                            .to_string();
                        let refuse = rng.lock().unwrap().below(1000) < refuse_per_mille;
                        let status = if refuse { 429 } else { 200 };
                        arrivals.lock().unwrap().push(Arrival {
                            at,
                            prompt: prompt.clone(),
                            status,
                        });
                        std::thread::sleep(LATENCY);
                        let response = if refuse {
                            tiny_http::Response::from_string(
                                json!({"error": {"message": "Rate limit reached", "type": "requests"}})
                                    .to_string(),
                            )
                            .with_status_code(429)
                            .with_header(header("retry-after-ms", &RETRY_AFTER_MS.to_string()))
                            .with_header(header("Retry-After", "1"))
                        } else {
                            let answer = format!("SUMMARY: {} words.\nKEY TERMS: mock", prompt.split_whitespace().count());
                            tiny_http::Response::from_string(
                                json!({
                                    "id": "chatcmpl-1",
                                    "object": "chat.completion",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                                    "usage": {"prompt_tokens": prompt.len() / 4, "completion_tokens": 8, "total_tokens": prompt.len() / 4 + 8}
                                })
                                .to_string(),
                            )
                        };
                        let _ = request
                            .respond(response.with_header(header("Content-Type", "application/json")));
                    }
                })
            })
            .collect();
        Mock {
            base_url: format!("http://{addr}/v1"),
            arrivals,
            stop,
            threads,
        }
    }

    fn finish(mut self) -> Vec<Arrival> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        let mut a = self.arrivals.lock().unwrap().clone();
        a.sort_by_key(|a| a.at);
        a
    }
}

fn header(k: &str, v: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap()
}

/// Runs the fleet against `mock` and one fresh key prefix of `server`; returns the summaries.
fn run_fleet(server: &RedisServer, mock: &Mock, prefix: &str) -> Vec<String> {
    let url = server.url();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            let mut cmd = Command::new(example_bin());
            for (k, _) in std::env::vars() {
                if ["STORAGE_", "REDIS_", "KV_", "OPENAI_", "LLM_"]
                    .iter()
                    .any(|p| k.starts_with(p))
                {
                    cmd.env_remove(k);
                }
            }
            cmd.env("RUST_LOG", "warn")
                .env("STORAGE_KV_BACKEND", "redis")
                .env("REDIS_URL", &url)
                .env("REDIS_KEY_PREFIX", prefix)
                .env("OPENAI_API_KEY", "sk-fleet-test")
                .env("OPENAI_BASE_URL", &mock.base_url)
                .env("LLM_RATE_LIMIT_RPM", LIMIT.to_string())
                .env("LLM_RATE_LIMIT_BURST", BURST.to_string())
                .env("LLM_RATE_LIMIT_PERIOD_MS", PERIOD.as_millis().to_string())
                .args([
                    "--llm",
                    "openai",
                    "--model",
                    "mock-model",
                    "--workers",
                    WORKERS,
                    "--limit-docs",
                    "3",
                    "--chunk-tokens",
                    "150",
                    "--overlap-tokens",
                    "20",
                    "--no-progress",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| stdout_of(&c.wait_with_output().unwrap()))
        .collect()
}

fn stdout_of(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "index_corpus failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The most arrivals in any window `[t, t + PERIOD)` starting at an arrival.
fn busiest_window(arrivals: &[Arrival]) -> (usize, Duration) {
    let mut most = (0, Duration::ZERO);
    for (i, a) in arrivals.iter().enumerate() {
        let n = arrivals[i..]
            .iter()
            .take_while(|b| b.at < a.at + PERIOD)
            .count();
        if n > most.0 {
            most = (n, a.at);
        }
    }
    most
}

/// Arrivals per whole second of the run, for the failure message and the benchmark table.
fn per_second(arrivals: &[Arrival]) -> Vec<usize> {
    let first = arrivals.first().map(|a| a.at).unwrap_or_default();
    let mut counts = Vec::new();
    for a in arrivals {
        let s = (a.at - first).as_secs() as usize;
        if counts.len() <= s {
            counts.resize(s + 1, 0);
        }
        counts[s] += 1;
    }
    counts
}

/// The numbers of the summary line `rate limit: A admitted, waited W s, R refused (429), C
/// cool-downs started, ...`.
fn rate_line(summary: &str) -> (u64, f64, u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.starts_with("rate limit: "))
        .unwrap_or_else(|| panic!("no `rate limit:` line in:\n{summary}"));
    let nums: Vec<f64> = line["rate limit: ".len()..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|t| t.parse().ok())
        .collect();
    assert!(nums.len() >= 4, "{line}");
    (nums[0] as u64, nums[1], nums[2] as u64, nums[3] as u64)
}

/// Every stored chunk was answered with a 200 exactly once, and nothing else was.
fn each_prompt_answered_once(server: &RedisServer, prefix: &str, arrivals: &[Arrival]) -> usize {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let chunks = storage.namespace(TEXT_CHUNKS).unwrap();
    let ids = chunks.all_keys().unwrap();
    let mut answered: HashMap<String, usize> = HashMap::new();
    for a in arrivals.iter().filter(|a| a.status == 200) {
        *answered
            .entry(compute_mdhash_id(&a.prompt, "chunk-"))
            .or_default() += 1;
    }
    let twice: Vec<_> = answered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    let mut stored = ids.clone();
    stored.sort();
    let mut sent: Vec<String> = answered.keys().cloned().collect();
    sent.sort();
    assert_eq!(stored, sent, "stored chunks and answered prompts differ");
    assert_eq!(
        storage
            .namespace(LLM_RESPONSE_CACHE)
            .unwrap()
            .all_keys()
            .unwrap()
            .len(),
        ids.len()
    );
    // The limiter's key is outside every namespace.
    let mut names = storage.list_namespaces().unwrap();
    names.sort();
    assert!(names.iter().all(|n| !n.contains("rate")), "{names:?}");
    ids.len()
}

#[test]
fn four_processes_stay_within_the_limit_use_it_and_lose_nothing_to_429s() {
    let server = RedisServer::start();
    let bound = (LIMIT + BURST) as usize;

    // 1. No refusals: the bound and the utilisation.
    let mock = Mock::start(0, 1);
    let prefix = unique_prefix("fleet");
    let summaries = run_fleet(&server, &mock, &prefix);
    let arrivals = mock.finish();
    let prompts = each_prompt_answered_once(&server, &prefix, &arrivals);
    assert!(
        prompts >= 30,
        "want a run of several seconds: {prompts} prompts"
    );
    assert_eq!(
        arrivals.len(),
        prompts,
        "no refusals, one request per prompt"
    );
    let (most, at) = busiest_window(&arrivals);
    let seconds = per_second(&arrivals);
    assert!(
        most <= bound,
        "{most} requests in the window starting at {at:?} (bound {bound}); per second: {seconds:?}"
    );
    let span = (arrivals.last().unwrap().at - arrivals[0].at).as_secs_f64();
    let rate = (arrivals.len() - 1) as f64 / span;
    let utilisation = rate / LIMIT as f64;
    assert!(
        utilisation >= 0.9,
        "utilisation {utilisation:.3} ({rate:.2}/s over {span:.2} s); per second: {seconds:?}"
    );
    let admitted: u64 = summaries.iter().map(|s| rate_line(s).0).sum();
    assert_eq!(admitted as usize, arrivals.len(), "{summaries:?}");
    let waited: f64 = summaries.iter().map(|s| rate_line(s).1).sum();
    assert!(waited > 1.0, "the workers waited for budget: {summaries:?}");
    let first: Vec<u128> = arrivals
        .iter()
        .take(12)
        .map(|a| (a.at - arrivals[0].at).as_millis())
        .collect();
    eprintln!("FLEET first arrivals (ms after the first): {first:?}");
    eprintln!(
        "FLEET no-429 run: {prompts} prompts, busiest window {most}, per second {seconds:?}, \
         {rate:.2}/s over {span:.2} s = {:.1}% of {LIMIT}/s, waited {waited:.1} s in total",
        utilisation * 100.0
    );

    // 2. One request in five refused at random: nothing is lost, the bound still holds.
    let mock = Mock::start(200, 7);
    let prefix = unique_prefix("fleet-429");
    let summaries = run_fleet(&server, &mock, &prefix);
    let arrivals = mock.finish();
    let refused = arrivals.iter().filter(|a| a.status == 429).count();
    assert!(refused >= 3, "want refusals: {refused}");
    assert_eq!(
        each_prompt_answered_once(&server, &prefix, &arrivals),
        prompts
    );
    let (most, at) = busiest_window(&arrivals);
    assert!(
        most <= bound,
        "{most} requests in the window starting at {at:?} (bound {bound}); per second: {:?}",
        per_second(&arrivals)
    );
    // Every process honours each cool-down: after a refusal at `t` (answered at t + 20 ms,
    // the cool-down set then, ending at about t + 520 ms), no request arrives in
    // (t + 100 ms, t + 400 ms), where without the shared cool-down the other processes would
    // have sent one or two.
    for r in arrivals.iter().filter(|a| a.status == 429) {
        let inside: Vec<_> = arrivals
            .iter()
            .filter(|a| {
                a.at > r.at + Duration::from_millis(100) && a.at < r.at + Duration::from_millis(400)
            })
            .map(|a| (a.at - r.at).as_millis())
            .collect();
        assert!(
            inside.is_empty(),
            "requests arrived {inside:?} ms after a refusal, during the cool-down"
        );
    }
    let seen: u64 = summaries.iter().map(|s| rate_line(s).2).sum();
    let cool_downs: u64 = summaries.iter().map(|s| rate_line(s).3).sum();
    assert_eq!(seen as usize, refused, "{summaries:?}");
    assert!(
        (1..=seen).contains(&cool_downs),
        "cool-downs {cool_downs} for {seen} refusals"
    );
    eprintln!(
        "FLEET random-429 run: {} requests, {refused} refused, {cool_downs} cool-downs, \
         busiest window {most}, per second {:?}",
        arrivals.len(),
        per_second(&arrivals)
    );
}
