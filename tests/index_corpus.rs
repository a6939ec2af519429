//! The `index_corpus` example run as a subprocess, as a user runs it: on the JSON default (a
//! second run makes no LLM call), four processes at once against one real redis-server (one LLM
//! call per distinct prompt in total), and Ctrl-C (stops cleanly, the next run resumes).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use graphrag_kv::llm_hash::compute_mdhash_id;
use graphrag_kv::{
    BackendKind, Storage, StoreConfig, COMMUNITY_REPORTS, FULL_DOCS, LLM_RESPONSE_CACHE,
    TEXT_CHUNKS,
};
use serde_json::Value;
use support::{unique_prefix, RedisServer};

/// The example binary, built once per test run.
fn example_bin() -> PathBuf {
    let features: &[&str] = if cfg!(feature = "openai") {
        &["openai"]
    } else {
        &[]
    };
    support::example_bin("index_corpus", features)
}

/// A command running the example with a clean storage environment plus `env`.
fn example(env: &[(&str, &str)], args: &[&str]) -> Command {
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
        .envs(env.iter().copied())
        .args(args);
    cmd
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

/// The first number of the summary line `{name}: ...`.
fn field(summary: &str, name: &str) -> u64 {
    let prefix = format!("{name}: ");
    let line = summary
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{summary}"));
    line[prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
}

/// `LLM calls: N`, checking the line is exactly that.
fn llm_calls(summary: &str) -> u64 {
    let n = field(summary, "LLM calls");
    assert!(
        summary.lines().any(|l| l == format!("LLM calls: {n}")),
        "{summary}"
    );
    n
}

fn read_kv(dir: &Path, namespace: &str) -> serde_json::Map<String, Value> {
    let path = dir.join(format!("kv_store_{namespace}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    match serde_json::from_str(&text).unwrap() {
        Value::Object(m) => m,
        other => panic!("{} is not an object: {other}", path.display()),
    }
}

/// Small windows make many prompts out of a few documents, so the tests run in seconds.
const SMALL: &[&str] = &[
    "--limit-docs",
    "5",
    "--chunk-tokens",
    "200",
    "--overlap-tokens",
    "20",
];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    SMALL.iter().copied().chain(extra.iter().copied()).collect()
}

/// Distinct prompts of the small corpus: the LLM calls of one run on a fresh JSON directory.
fn distinct_prompts() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let wd = dir.path().to_str().unwrap();
        let out = example(
            &[("STORAGE_WORKING_DIR", wd)],
            &args(&["--llm-latency-ms", "0"]),
        )
        .output()
        .unwrap();
        llm_calls(&stdout_of(&out))
    })
}

#[test]
fn json_default_second_run_makes_no_llm_call() {
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().join("cache");
    let env = [("STORAGE_WORKING_DIR", wd.to_str().unwrap())];

    let first = stdout_of(
        &example(&env, &["--limit-docs", "4", "--llm-latency-ms", "0"])
            .output()
            .unwrap(),
    );
    let calls = llm_calls(&first);
    let chunks = field(&first, "chunks");
    assert_eq!(calls, chunks, "one call per chunk:\n{first}");
    assert!(
        chunks > 4,
        "the sample documents span several chunks:\n{first}"
    );
    assert_eq!(field(&first, "documents"), 4);
    assert!(
        first.contains("documents: 4 in corpus, 4 indexed now, 0 already indexed"),
        "{first}"
    );

    // nano-graphrag's files, ids and shapes.
    let docs = read_kv(&wd, FULL_DOCS);
    let text_chunks = read_kv(&wd, TEXT_CHUNKS);
    let reports = read_kv(&wd, COMMUNITY_REPORTS);
    let cache = read_kv(&wd, LLM_RESPONSE_CACHE);
    assert_eq!(docs.len(), 4);
    assert_eq!(reports.len(), 4);
    assert_eq!(text_chunks.len() as u64, chunks);
    assert_eq!(cache.len() as u64, calls);
    for (id, doc) in &docs {
        let content = doc["content"].as_str().unwrap();
        assert_eq!(*id, compute_mdhash_id(content, "doc-"));
    }
    let mut per_doc: HashMap<&str, Vec<u64>> = HashMap::new();
    for (id, chunk) in &text_chunks {
        let content = chunk["content"].as_str().unwrap();
        assert_eq!(*id, compute_mdhash_id(content, "chunk-"));
        let tokens = chunk["tokens"].as_u64().unwrap();
        assert!((1..=1200).contains(&tokens), "{tokens}");
        assert_eq!(content.split_whitespace().count() as u64, tokens);
        let doc = chunk["full_doc_id"].as_str().unwrap();
        assert!(docs.contains_key(doc), "{doc}");
        per_doc
            .entry(doc)
            .or_default()
            .push(chunk["chunk_order_index"].as_u64().unwrap());
    }
    for (doc, mut order) in per_doc {
        order.sort();
        assert_eq!(order, (0..order.len() as u64).collect::<Vec<_>>(), "{doc}");
    }
    for entry in cache.values() {
        assert_eq!(entry["model"], "graphrag-kv-local");
        assert!(entry["return"].as_str().unwrap().starts_with("SUMMARY: "));
    }
    for report in reports.values() {
        assert!(report["report_string"].as_str().unwrap().starts_with("# "));
        assert!(report["report_json"]["findings"].as_array().unwrap().len() >= 2);
        for c in report["chunk_ids"].as_array().unwrap() {
            assert!(text_chunks.contains_key(c.as_str().unwrap()));
        }
    }

    let second = stdout_of(
        &example(&env, &["--limit-docs", "4", "--llm-latency-ms", "0"])
            .output()
            .unwrap(),
    );
    assert_eq!(llm_calls(&second), 0, "{second}");
    assert!(
        second.contains("documents: 4 in corpus, 0 indexed now, 4 already indexed"),
        "{second}"
    );
    assert_eq!(read_kv(&wd, TEXT_CHUNKS).len() as u64, chunks);

    // One more document: only its chunks cost calls.
    let third = stdout_of(
        &example(&env, &["--limit-docs", "5", "--llm-latency-ms", "0"])
            .output()
            .unwrap(),
    );
    assert!(
        third.contains("documents: 5 in corpus, 1 indexed now, 4 already indexed"),
        "{third}"
    );
    assert_eq!(llm_calls(&third), field(&third, "chunks"));
    assert!(llm_calls(&third) > 0);
}

#[test]
fn four_processes_on_one_redis_make_one_call_per_distinct_prompt() {
    let expected = distinct_prompts();
    assert!(expected >= 20, "want a real contest: {expected} prompts");

    let server = RedisServer::start();
    let prefix = unique_prefix("index-corpus");
    let url = server.url();
    let env = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
    ];
    let children: Vec<_> = (0..4)
        .map(|_| {
            example(&env, &args(&["--llm-latency-ms", "20"]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let summaries: Vec<String> = children
        .into_iter()
        .map(|c| stdout_of(&c.wait_with_output().unwrap()))
        .collect();
    let calls: Vec<u64> = summaries.iter().map(|s| llm_calls(s)).collect();
    assert_eq!(
        calls.iter().sum::<u64>(),
        expected,
        "calls per process {calls:?}\n{}",
        summaries.join("\n---\n")
    );

    // Everything is in Redis, once.
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(&url)
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let count = |ns: &str| storage.namespace(ns).unwrap().all_keys().unwrap().len() as u64;
    assert_eq!(count(FULL_DOCS), 5);
    assert_eq!(count(COMMUNITY_REPORTS), 5);
    assert_eq!(count(TEXT_CHUNKS), expected);
    assert_eq!(count(LLM_RESPONSE_CACHE), expected);
    let mut names = storage.list_namespaces().unwrap();
    names.sort();
    assert_eq!(
        names,
        [
            COMMUNITY_REPORTS,
            FULL_DOCS,
            LLM_RESPONSE_CACHE,
            TEXT_CHUNKS
        ]
    );

    // A fifth run finds everything done.
    let again = stdout_of(
        &example(&env, &args(&["--llm-latency-ms", "20"]))
            .output()
            .unwrap(),
    );
    assert_eq!(llm_calls(&again), 0, "{again}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_resumes() {
    use std::io::{BufRead, BufReader};

    let total = distinct_prompts();
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().to_str().unwrap().to_string();
    let env = [("STORAGE_WORKING_DIR", wd.as_str())];
    let mut child = example(&env, &args(&["--workers", "1", "--llm-latency-ms", "300"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has started work, let it process a chunk or two, then interrupt it.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("chunks to process"), "{line}");
    std::thread::sleep(std::time::Duration::from_millis(450));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(130), "{summary}");
    assert!(summary.contains("interrupted: "), "{summary}");
    let done = llm_calls(&summary);
    assert!(done >= 1 && done < total, "{done} of {total}:\n{summary}");

    // What was done is saved: every answered chunk is stored, with its answer.
    let path = Path::new(&wd);
    assert_eq!(read_kv(path, TEXT_CHUNKS).len() as u64, done);
    assert_eq!(read_kv(path, LLM_RESPONSE_CACHE).len() as u64, done);

    // The next run does the rest, and only the rest.
    let rest = stdout_of(
        &example(&env, &args(&["--llm-latency-ms", "0"]))
            .output()
            .unwrap(),
    );
    assert_eq!(llm_calls(&rest), total - done, "{rest}");
    assert_eq!(read_kv(path, TEXT_CHUNKS).len() as u64, total);
    assert_eq!(read_kv(path, FULL_DOCS).len(), 5);
}

#[test]
fn rate_limit_from_the_environment_is_used_and_reported() {
    // JSON: the limiter is in-process. 1000 requests per second, burst 1: no visible delay.
    let dir = tempfile::tempdir().unwrap();
    let wd = dir.path().to_str().unwrap();
    let out = stdout_of(
        &example(
            &[
                ("STORAGE_WORKING_DIR", wd),
                ("LLM_RATE_LIMIT_RPM", "1000"),
                ("LLM_RATE_LIMIT_PERIOD_MS", "1000"),
                ("LLM_RATE_LIMIT_BURST", "1"),
            ],
            &args(&["--llm-latency-ms", "0"]),
        )
        .output()
        .unwrap(),
    );
    let calls = llm_calls(&out);
    assert!(calls > 0, "{out}");
    assert_eq!(
        field(&out, "rate limit"),
        calls,
        "one admission per call:\n{out}"
    );
    assert!(out.contains("(1000 requests per 1 s, burst 1)"), "{out}");

    // Unset: said so.
    let again = stdout_of(
        &example(
            &[("STORAGE_WORKING_DIR", wd)],
            &args(&["--llm-latency-ms", "0"]),
        )
        .output()
        .unwrap(),
    );
    assert!(again.contains("rate limit: none"), "{again}");

    // A bad value: an error naming the variable, nothing written.
    let bad_dir = tempfile::tempdir().unwrap();
    let out = example(
        &[
            ("STORAGE_WORKING_DIR", bad_dir.path().to_str().unwrap()),
            ("LLM_RATE_LIMIT_RPM", "lots"),
        ],
        &args(&["--llm-latency-ms", "0"]),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LLM_RATE_LIMIT_RPM") && stderr.contains("lots"),
        "{stderr}"
    );
    assert!(!bad_dir.path().join("kv_store_text_chunks.json").exists());
}
