//! `LlmCache` over every Redis stack a deployment runs (plain, `KV_WRITE_BEHIND=true`,
//! `KV_FALLBACK=json`, both, both with metrics): single-flight between real processes, round
//! after round, through the lock the stack offers (`Storage::locks`); and in-process
//! single-flight with a warning when Redis is down and the fallback journal takes the writes.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use graphrag_kv::llm_cache::LlmCache;
use graphrag_kv::llm_hash::Message;
use graphrag_kv::write_behind::WriteBehindConfig;
use graphrag_kv::{BackendKind, Storage, StoreConfig, LLM_RESPONSE_CACHE};
use support::{unique_prefix, RedisServer};

fn prompt(text: &str) -> Vec<Message> {
    vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", text),
    ]
}

// ---------------------------------------------------------------------------------------------
// Four processes, several rounds

/// Set (to the child's number) in the environment of the child processes of the tests below:
/// the same test then runs the child's part instead of the parent's, so run alone it is the
/// whole test.
const CHILD_ENV: &str = "LLM_CACHE_STACK_CHILD";
/// Set in the children's environment when their storage counts into metrics.
const METRICS_ENV: &str = "LLM_CACHE_STACK_METRICS";
const PROCESSES: usize = 4;
const THREADS_PER_PROCESS: usize = 2;
const ROUNDS: usize = 3;
const PROMPTS_PER_ROUND: usize = 8;
/// How long the stand-in LLM takes to answer.
const LLM_LATENCY: Duration = Duration::from_millis(50);

fn round_prompt(round: usize, i: usize) -> Vec<Message> {
    prompt(&format!(
        "round {round}, prompt {i}: who pays for this answer?"
    ))
}

fn round_answer(round: usize, i: usize) -> String {
    format!("answer to round {round}, prompt {i}")
}

#[test]
fn four_processes_on_plain_redis_pay_once_per_prompt() {
    four_processes("four_processes_on_plain_redis_pay_once_per_prompt", &[]);
}

#[test]
fn four_processes_with_write_behind_pay_once_per_prompt() {
    four_processes(
        "four_processes_with_write_behind_pay_once_per_prompt",
        &[("KV_WRITE_BEHIND", "true")],
    );
}

#[test]
fn four_processes_with_fallback_pay_once_per_prompt() {
    four_processes(
        "four_processes_with_fallback_pay_once_per_prompt",
        &[("KV_FALLBACK", "json")],
    );
}

#[test]
fn four_processes_with_write_behind_and_fallback_pay_once_per_prompt() {
    four_processes(
        "four_processes_with_write_behind_and_fallback_pay_once_per_prompt",
        &[("KV_WRITE_BEHIND", "true"), ("KV_FALLBACK", "json")],
    );
}

#[test]
fn four_processes_with_write_behind_fallback_and_metrics_pay_once_per_prompt() {
    four_processes(
        "four_processes_with_write_behind_fallback_and_metrics_pay_once_per_prompt",
        &[
            ("KV_WRITE_BEHIND", "true"),
            ("KV_FALLBACK", "json"),
            (METRICS_ENV, "1"),
        ],
    );
}

/// Runs `test_name` (the calling test) as `PROCESSES` children over one Redis, with the
/// variables `stack` adds, and checks each prompt of each round cost one LLM call in all.
fn four_processes(test_name: &str, stack: &[(&str, &str)]) {
    if let Ok(child) = std::env::var(CHILD_ENV) {
        return child_process(child.parse().expect("the child's number"));
    }
    let server = RedisServer::start();
    let prefix = unique_prefix("llm-cache-stack");
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let journal = dir.path().join("journal");
    let journal = journal.display().to_string();
    let working = dir.path().display().to_string();
    let mut env = vec![
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("KV_FALLBACK_DIR", journal.as_str()),
        ("STORAGE_WORKING_DIR", working.as_str()),
    ];
    env.extend(stack.iter().copied());
    let children: Vec<_> = (0..PROCESSES)
        .map(|n| {
            let mut cmd = Command::new(std::env::current_exe().unwrap());
            for (k, _) in std::env::vars() {
                if ["STORAGE_", "REDIS_", "KV_"]
                    .iter()
                    .any(|p| k.starts_with(p))
                {
                    cmd.env_remove(k);
                }
            }
            cmd.args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
                .envs(env.iter().copied())
                .env(CHILD_ENV, n.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();

    // round -> LLM calls of each process.
    let mut calls: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "a child failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            out.status
        );
        let mut rounds = 0;
        for line in stdout.lines() {
            // libtest prints its "test ... " prefix on the line of the first report.
            let Some((_, rest)) = line.split_once("LLM-CALLS round=") else {
                continue;
            };
            let (round, n) = rest.split_once(" calls=").expect("a well-formed report");
            calls
                .entry(round.parse().unwrap())
                .or_default()
                .push(n.parse().unwrap());
            rounds += 1;
        }
        assert_eq!(
            rounds, ROUNDS,
            "a child reported {rounds} rounds:\n{stdout}"
        );
        outputs.push(stdout);
    }
    let report: Vec<String> = calls
        .iter()
        .map(|(round, per_process)| {
            format!(
                "round {round}: {} calls for {PROMPTS_PER_ROUND} prompts {per_process:?}",
                per_process.iter().sum::<usize>()
            )
        })
        .collect();
    for per_process in calls.values() {
        assert_eq!(
            per_process.iter().sum::<usize>(),
            PROMPTS_PER_ROUND,
            "each distinct prompt must cost exactly one LLM call per round:\n{}",
            report.join("\n")
        );
    }

    // Every answer is in Redis itself, read without write-behind or fallback.
    let plain = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(&url)
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let storage = Storage::open(&plain).unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    for round in 0..ROUNDS {
        for i in 0..PROMPTS_PER_ROUND {
            assert_eq!(
                cache.get("m", &round_prompt(round, i)).unwrap(),
                Some(round_answer(round, i))
            );
        }
    }
    let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
    assert_eq!(store.all_keys().unwrap().len(), ROUNDS * PROMPTS_PER_ROUND);
}

/// One child process: each round, waits for the other processes at a barrier in Redis, then
/// asks every prompt of the round from `THREADS_PER_PROCESS` threads (each starting at a
/// different prompt), and prints how many LLM calls this process made.
fn child_process(child: usize) {
    let config = StoreConfig::from_env().unwrap();
    let url = config.redis.url.clone();
    let prefix = config.redis.key_prefix.clone();
    #[cfg(feature = "metrics")]
    let registry = prometheus::Registry::new();
    #[allow(unused_mut)]
    let mut builder = Storage::builder(&config);
    #[cfg(feature = "metrics")]
    if std::env::var_os(METRICS_ENV).is_some() {
        builder = builder.metrics(&graphrag_kv::Metrics::new(&registry).unwrap());
    }
    let storage = builder.open().unwrap();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    assert!(
        cache.lock_key("m", &prompt("x")).is_some(),
        "the Redis stack offers cross-process locks"
    );
    let mut barrier = redis::Client::open(url).unwrap().get_connection().unwrap();

    for round in 0..ROUNDS {
        let key = format!("{prefix}::test-barrier:{round}");
        let _: i64 = redis::cmd("INCR").arg(&key).query(&mut barrier).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let arrived: i64 = redis::cmd("GET").arg(&key).query(&mut barrier).unwrap();
            if arrived as usize >= PROCESSES {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: only {arrived} processes came"
            );
            thread::sleep(Duration::from_millis(2));
        }

        let calls = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..THREADS_PER_PROCESS)
            .map(|t| {
                let (cache, calls) = (cache.clone(), calls.clone());
                let start = child * THREADS_PER_PROCESS + t;
                thread::spawn(move || {
                    for k in 0..PROMPTS_PER_ROUND {
                        let i = (start + k) % PROMPTS_PER_ROUND;
                        let answer = cache
                            .get_or_compute("m", &round_prompt(round, i), || {
                                calls.fetch_add(1, Ordering::SeqCst);
                                thread::sleep(LLM_LATENCY);
                                Ok(round_answer(round, i))
                            })
                            .unwrap();
                        assert_eq!(answer, round_answer(round, i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        println!(
            "LLM-CALLS round={round} calls={}",
            calls.load(Ordering::SeqCst)
        );
    }
    if let Some(fallback) = storage.fallback() {
        assert!(fallback.is_online(), "Redis was up all along");
    }
    #[cfg(feature = "metrics")]
    if std::env::var_os(METRICS_ENV).is_some() {
        let text = graphrag_kv::metrics::render(&registry);
        assert!(
            text.contains(
                r#"redis_operations_total{namespace="llm_response_cache",operation="get_by_id"}"#
            ),
            "the metrics saw the cache's calls:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redis down, fallback on

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((record.level(), record.args().to_string()));
    }

    fn flush(&self) {}
}

/// Installs the capturing logger (once per test binary).
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Debug);
    });
}

fn warnings_containing(needle: &str) -> Vec<String> {
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(level, text)| *level == log::Level::Warn && text.contains(needle))
        .map(|(_, text)| text.clone())
        .collect()
}

#[test]
fn redis_down_with_fallback_degrades_to_in_process_single_flight() {
    capture_logs();
    let mut server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(unique_prefix("llm-cache-outage"))
        .connection_timeout(Duration::from_millis(200))
        .pool_timeout(Duration::from_millis(400))
        .retries(0)
        .fallback_dir(dir.path())
        .write_behind(WriteBehindConfig::default())
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    assert!(cache.lock_key("m", &prompt("x")).is_some());
    let before = cache
        .get_or_compute("m", &prompt("asked while Redis is up"), || Ok("up".into()))
        .unwrap();
    assert_eq!(before, "up");

    server.stop();
    const THREADS: usize = 8;
    let computed = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let p = prompt("Asked by eight threads while Redis is down.");
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (cache, computed, barrier, p) =
                (cache.clone(), computed.clone(), barrier.clone(), p.clone());
            thread::spawn(move || {
                barrier.wait();
                cache.get_or_compute("m", &p, || {
                    computed.fetch_add(1, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(300));
                    Ok("computed during the outage".into())
                })
            })
        })
        .collect();
    for h in handles {
        assert_eq!(
            h.join().unwrap().unwrap(),
            "computed during the outage",
            "get_or_compute must not fail while the fallback takes the writes"
        );
    }
    assert_eq!(computed.load(Ordering::SeqCst), 1, "one LLM call");
    assert!(!storage.fallback().unwrap().is_online());
    let warned = warnings_containing("in-process single-flight");
    assert!(
        !warned.is_empty(),
        "the degradation must be logged as a warning; warnings: {:?}",
        warnings_containing("")
    );

    // The journal holds the answer: asked again, it is a hit.
    let again = cache
        .get_or_compute("m", &p, || panic!("the journal holds the answer"))
        .unwrap();
    assert_eq!(again, "computed during the outage");
}

#[test]
fn redis_back_after_the_outage_replays_the_answer_and_locks_again() {
    capture_logs();
    let mut server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("llm-cache-back");
    let url = server.url();
    let builder = || {
        StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(&url)
            .key_prefix(&prefix)
            .connection_timeout(Duration::from_millis(200))
            .pool_timeout(Duration::from_millis(400))
            .retries(0)
    };
    let storage = Storage::open(
        &builder()
            .fallback_dir(dir.path())
            .write_behind(WriteBehindConfig::default())
            .build()
            .unwrap(),
    )
    .unwrap();
    let cache = Arc::new(LlmCache::open(&storage).unwrap());
    server.stop();
    let during = prompt("asked during the outage");
    let answer = cache
        .get_or_compute("m", &during, || Ok("journaled".into()))
        .unwrap();
    assert_eq!(answer, "journaled");
    let fallback = storage.fallback().unwrap().clone();
    assert!(!fallback.is_online());

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fallback.is_online() {
        assert!(Instant::now() < deadline, "the journal was not replayed");
        thread::sleep(Duration::from_millis(50));
    }
    // The journaled answer reached Redis: another process (no fallback here) reads it.
    let plain = Storage::open(&builder().build().unwrap()).unwrap();
    let other = LlmCache::open(&plain).unwrap();
    assert_eq!(
        other.get("m", &during).unwrap().as_deref(),
        Some("journaled")
    );

    // And the cross-process lock is taken again: it is held in Redis while the LLM works.
    let after = prompt("asked once Redis is back");
    let lock_key = cache.lock_key("m", &after).unwrap();
    let mut conn = server.conn();
    let answer = cache
        .get_or_compute("m", &after, || {
            let held: bool = redis::cmd("EXISTS")
                .arg(&lock_key)
                .query(&mut conn)
                .unwrap();
            assert!(held, "computed without the cross-process lock");
            Ok("locked".into())
        })
        .unwrap();
    assert_eq!(answer, "locked");
    assert_eq!(other.get("m", &after).unwrap().as_deref(), Some("locked"));
}

#[test]
fn redis_down_without_fallback_fails_get_or_compute() {
    let mut server = RedisServer::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(unique_prefix("llm-cache-no-fallback"))
        .connection_timeout(Duration::from_millis(200))
        .pool_timeout(Duration::from_millis(400))
        .retries(0)
        .write_behind(WriteBehindConfig::default())
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    server.stop();
    let e = cache
        .get_or_compute("m", &prompt("nobody can store this"), || {
            panic!("the cache cannot be read: no LLM call")
        })
        .unwrap_err();
    assert!(e.is_connection() || e.is_timeout(), "{e}");
}

#[cfg(feature = "metrics")]
#[test]
fn flush_sends_queued_writes_through_every_layer() {
    // Metered<WriteBehind<FallbackStore<RedisStore>>>, with a queue that would otherwise hold
    // the write for a minute: `flush` on the outermost layer must reach Redis.
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("llm-cache-flush");
    let queue = WriteBehindConfig::builder()
        .max_delay(Duration::from_secs(60))
        .build()
        .unwrap();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(&prefix)
        .fallback_dir(dir.path())
        .write_behind(queue)
        .build()
        .unwrap();
    let metrics = graphrag_kv::Metrics::new(&prometheus::Registry::new()).unwrap();
    let storage = Storage::builder(&config).metrics(&metrics).open().unwrap();
    let store = storage.namespace(LLM_RESPONSE_CACHE).unwrap();
    let plain = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let direct = Storage::open(&plain)
        .unwrap()
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap();

    let value = serde_json::json!({"return": "queued", "model": "m"});
    store.upsert(vec![("k".into(), value.clone())]).unwrap();
    assert_eq!(direct.get_by_id("k").unwrap(), None, "still in the queue");
    store.flush().unwrap();
    assert_eq!(direct.get_by_id("k").unwrap(), Some(value));
}
