//! The shared LLM rate limit against real servers: one budget for two `Storage`s of one Redis
//! (as two processes), the shared cool-down set once, the token correction, the key outside
//! every namespace, a cluster, and the in-process limiter of the JSON backend through
//! `RateLimitedLlm`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use graphrag_kv::llm::{Completion, LlmClient, LocalLlm, Usage};
use graphrag_kv::llm_hash::Message;
use graphrag_kv::rate_limit::{Admission, RateLimit, RateLimitedLlm};
use graphrag_kv::{BackendKind, Error, Storage, StoreConfig, TEXT_CHUNKS};
use serde_json::json;
use support::cluster::RedisCluster;
use support::{unique_prefix, RedisServer};

fn redis_storage(url: &str, prefix: &str) -> Storage {
    Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(url)
            .key_prefix(prefix)
            .build()
            .unwrap(),
    )
    .unwrap()
}

fn wait_of(a: Admission) -> (Duration, bool) {
    match a {
        Admission::Wait { wait, cooling } => (wait, cooling),
        Admission::Admitted => panic!("admitted, expected a wait"),
    }
}

/// 5 requests per 10 s, burst 2: one request every 2 s.
fn slow_limit() -> RateLimit {
    RateLimit::builder()
        .requests(5)
        .burst(2)
        .period(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn two_storages_of_one_redis_draw_from_one_budget() {
    let server = RedisServer::start();
    let prefix = unique_prefix("rate");
    let (a, b) = (
        redis_storage(&server.url(), &prefix),
        redis_storage(&server.url(), &prefix),
    );
    let (la, lb) = (a.rate_limiter(), b.rate_limiter());
    let limit = slow_limit();
    let name = RateLimit::name("http://u:secret@api.example/v1", "gpt");
    // The burst: one each, then both are told to wait one interval (2 s).
    assert_eq!(
        la.try_acquire(&name, &limit, 0).unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        lb.try_acquire(&name, &limit, 0).unwrap(),
        Admission::Admitted
    );
    for l in [&la, &lb] {
        let (wait, cooling) = wait_of(l.try_acquire(&name, &limit, 0).unwrap());
        assert!(!cooling);
        assert!(
            wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
    }
    // Another model of the same endpoint has its own budget.
    let other = RateLimit::name("http://u:secret@api.example/v1", "other");
    assert_eq!(
        lb.try_acquire(&other, &limit, 0).unwrap(),
        Admission::Admitted
    );

    // One Redis hash, outside every namespace, no secret in its name, expiring.
    let key = la.key(&name).unwrap();
    assert_eq!(
        key,
        format!("{prefix}::rate:http://u:<redacted>@api.example/v1|gpt")
    );
    let mut conn = server.conn();
    let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
    assert_eq!(kind, "hash");
    let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
    assert!(pttl > 0 && pttl <= 20_000, "{pttl}");
    a.namespace(TEXT_CHUNKS)
        .unwrap()
        .upsert(vec![("c1".into(), json!({"content": "x"}))])
        .unwrap();
    assert_eq!(a.list_namespaces().unwrap(), [TEXT_CHUNKS]);
    assert_eq!(
        a.namespace(TEXT_CHUNKS).unwrap().all_keys().unwrap(),
        ["c1"]
    );
    a.namespace(TEXT_CHUNKS).unwrap().clear().unwrap();
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert_eq!(exists, 1, "clear leaves the budget alone");
}

#[test]
fn a_cool_down_is_shared_and_set_once() {
    let server = RedisServer::start();
    let prefix = unique_prefix("cool");
    let (a, b) = (
        redis_storage(&server.url(), &prefix),
        redis_storage(&server.url(), &prefix),
    );
    let (la, lb) = (a.rate_limiter(), b.rate_limiter());
    let limit = RateLimit::builder().requests(1000).build().unwrap();
    assert_eq!(la.try_acquire("n", &limit, 0).unwrap(), Admission::Admitted);
    assert!(la.cool_down("n", &limit, Duration::from_secs(3)).unwrap());
    // The other process's refusal during the cool-down does not extend it.
    assert!(!lb.cool_down("n", &limit, Duration::from_secs(30)).unwrap());
    let (wait, cooling) = wait_of(lb.try_acquire("n", &limit, 0).unwrap());
    assert!(cooling);
    assert!(
        wait > Duration::from_secs(2) && wait <= Duration::from_secs(3),
        "{wait:?}"
    );
}

#[test]
fn tokens_are_charged_on_the_estimate_and_corrected() {
    let server = RedisServer::start();
    let storage = redis_storage(&server.url(), &unique_prefix("tok"));
    let l = storage.rate_limiter();
    // 1000 tokens per 10 s: 10 ms per token; 100 may go at once.
    let limit = RateLimit::builder()
        .tokens(1000)
        .token_burst(100)
        .period(Duration::from_secs(10))
        .build()
        .unwrap();
    // Above the burst: admitted on a whole budget, then 5 s of it are used.
    assert_eq!(
        l.try_acquire("t", &limit, 500).unwrap(),
        Admission::Admitted
    );
    let (wait, _) = wait_of(l.try_acquire("t", &limit, 10).unwrap());
    assert!(wait > Duration::from_secs(3), "{wait:?}");
    // The answer reported 50: 450 refunded, and 10 tokens fit again at once.
    l.adjust_tokens("t", &limit, -450).unwrap();
    assert_eq!(l.try_acquire("t", &limit, 10).unwrap(), Admission::Admitted);
    // Under-estimated by 600: charged, so the next request waits.
    l.adjust_tokens("t", &limit, 600).unwrap();
    let (wait, _) = wait_of(l.try_acquire("t", &limit, 10).unwrap());
    assert!(wait > Duration::from_secs(4), "{wait:?}");
}

#[test]
fn on_a_cluster_the_budget_is_one_key_on_one_node() {
    let cluster = RedisCluster::start();
    let prefix = unique_prefix("crate");
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(cluster.url_list())
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let (a, b) = (
        Storage::open(&config).unwrap(),
        Storage::open(&config).unwrap(),
    );
    let limit = slow_limit();
    let (la, lb) = (a.rate_limiter(), b.rate_limiter());
    for name in ["e|m1", "e|m2", "other|m1"] {
        assert_eq!(
            la.try_acquire(name, &limit, 0).unwrap(),
            Admission::Admitted
        );
        assert_eq!(
            lb.try_acquire(name, &limit, 0).unwrap(),
            Admission::Admitted
        );
        assert!(!wait_of(la.try_acquire(name, &limit, 0).unwrap()).1);
        assert!(la.cool_down(name, &limit, Duration::from_secs(5)).unwrap());
        assert!(wait_of(lb.try_acquire(name, &limit, 0).unwrap()).1);
        let key = la.key(name).unwrap();
        let port = cluster.master_for_key(key.as_bytes());
        let fields: i64 = redis::cmd("HLEN")
            .arg(&key)
            .query(&mut cluster.conn(port))
            .unwrap();
        assert_eq!(fields, 2, "req and cool in {key} on its node");
    }
}

/// A client that reports usage and refuses the first `refusals` requests with a 429.
struct Refusing {
    refusals: std::sync::atomic::AtomicU32,
    calls: std::sync::atomic::AtomicU32,
}

impl LlmClient for Refusing {
    fn complete(&self, _model: &str, _messages: &[Message]) -> graphrag_kv::Result<String> {
        unreachable!("the wrapper calls complete_once")
    }
    fn complete_once(
        &self,
        _model: &str,
        _messages: &[Message],
    ) -> graphrag_kv::Result<Completion> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .refusals
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::LlmRateLimited {
                reason: "HTTP 429: slow down".into(),
                retry_after: Some(Duration::from_millis(300)),
            });
        }
        Ok(Completion::new("fine").with_usage(Usage::new(7, 3)))
    }
}

#[test]
fn a_429_pauses_the_wrapper_for_its_retry_after_then_the_request_goes_again() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let limit = RateLimit::builder().requests(6000).build().unwrap();
    let llm = RateLimitedLlm::new(
        Refusing {
            refusals: 2.into(),
            calls: 0.into(),
        },
        storage.rate_limiter(),
        limit,
    );
    let started = Instant::now();
    assert_eq!(
        llm.complete("m", &[Message::new("user", "hi")]).unwrap(),
        "fine"
    );
    // Two cool-downs of 300 ms, one after the other.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    let s = llm.stats();
    assert_eq!((s.admitted, s.rate_limited, s.cool_downs), (3, 2, 2));
    assert_eq!(
        llm.inner().calls.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    assert!(s.waited >= Duration::from_millis(600), "{s:?}");

    // Out of 429 retries: the refusal is the error.
    let limit = RateLimit::builder()
        .requests(6000)
        .rate_limited_retries(1)
        .build()
        .unwrap();
    let llm = RateLimitedLlm::new(
        Refusing {
            refusals: 5.into(),
            calls: 0.into(),
        },
        storage.rate_limiter(),
        limit,
    );
    let err = llm
        .complete("m", &[Message::new("user", "hi")])
        .unwrap_err();
    assert!(err.is_rate_limited() && err.is_retryable(), "{err}");
    assert_eq!(err.retry_after(), Some(Duration::from_millis(300)));
}

#[test]
fn on_json_the_threads_of_a_process_share_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(storage.rate_limiter().key("x"), None, "in-process only");
    // 10 per second, burst 1: 24 calls from 8 threads take at least 23 intervals (2.3 s).
    let limit = RateLimit::builder()
        .requests(10)
        .burst(1)
        .period(Duration::from_secs(1))
        .build()
        .unwrap();
    let llm = Arc::new(
        RateLimitedLlm::new(LocalLlm::new(), storage.rate_limiter(), limit).with_endpoint("local"),
    );
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let llm = llm.clone();
            std::thread::spawn(move || {
                let mut admitted = Vec::new();
                for i in 0..3 {
                    llm.complete("m", &[Message::new("user", format!("{t}-{i}"))])
                        .unwrap();
                    admitted.push(Instant::now());
                }
                admitted
            })
        })
        .collect();
    let mut times: Vec<Instant> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    times.sort();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(2200), "{elapsed:?}");
    // No window of one second holds more than limit + burst (the limiter admits at most
    // limit + burst - 1; the one more tolerates 100 ms between admission and the time taken).
    for (i, t) in times.iter().enumerate() {
        let n = times[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1))
            .count();
        assert!(n <= 11, "{n} calls within a second");
    }
    assert_eq!(llm.stats().admitted, 24);
    assert_eq!(llm.inner().calls(), 24);
}

#[test]
fn an_unreachable_limiter_lets_requests_through() {
    let server = RedisServer::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(unique_prefix("down"))
        .connection_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let limit = RateLimit::builder().requests(60).build().unwrap();
    let llm = RateLimitedLlm::new(LocalLlm::new(), storage.rate_limiter(), limit);
    llm.complete("m", &[Message::new("user", "before")])
        .unwrap();
    drop(server);
    let started = Instant::now();
    // The budget is spent (burst 1), but the limiter cannot be asked: the call goes through.
    assert!(llm
        .complete("m", &[Message::new("user", "during the outage")])
        .unwrap()
        .starts_with("SUMMARY: during the outage"));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(llm.stats().admitted, 2);
    assert_eq!(llm.inner().calls(), 2);
}
