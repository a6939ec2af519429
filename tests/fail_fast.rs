//! Connect failures surface at once, naming their cause: a wrong password, a closed port, a
//! certificate the client does not trust, a server that accepts connections and never answers.
//! They must not wait out the pool timeout, once per retry, at open and again at the first
//! operation (a wrong password used to take ~40 s to be reported, and a write during an outage
//! ~80 s to reach the fallback journal).
//!
//! Every bound here is generous (several times the connection timeout under a loaded machine):
//! the tests tell "within the connect timeout" from "after the pool timeout times the retries".

mod support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use graphrag_kv::{Error, Storage, StoreConfig, StoreConfigBuilder};
use serde_json::json;
use support::cluster::RedisCluster;
use support::sentinel::RedisSentinelSet;
use support::tls::{ClientAuth, TlsRedisServer};
use support::{free_port, unique_prefix, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_graphrag-kv");

/// The connection timeout every test sets, in seconds.
const CONNECT_TIMEOUT: &str = "2";

/// The longest a failure may take to surface: the connection timeout plus a wide margin, far
/// below the pool timeout (10 s by default) times the attempts (4 by default).
const BOUND: Duration = Duration::from_secs(10);

const PASSWORD: &str = "right-pw-8f31";
const WRONG: &str = "wrong-pw-52c7";

/// A configuration with the library's defaults except the connection timeout: the pool timeout
/// (10 s) and the retries (3) stay as a user gets them.
fn config(pairs: &[(&str, &str)]) -> StoreConfig {
    let mut vars: HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_CONNECTION_TIMEOUT", CONNECT_TIMEOUT),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in pairs {
        vars.insert(k.to_string(), v.to_string());
    }
    StoreConfigBuilder::from_vars(&vars)
        .and_then(StoreConfigBuilder::build)
        .unwrap_or_else(|e| panic!("configuration {pairs:?}: {e}"))
}

/// Opens `config`, expecting a failure within [`BOUND`]; returns the error.
#[track_caller]
fn open_fails_quickly(config: &StoreConfig) -> Error {
    let start = Instant::now();
    let result = Storage::open(config);
    let took = start.elapsed();
    let e = match result {
        Ok(_) => panic!("opening {:?} succeeded", config.redis),
        Err(e) => e,
    };
    assert!(
        took < BOUND,
        "the error took {took:?} to surface (bound {BOUND:?}): {e}"
    );
    e
}

/// Asserts an authentication failure: named as such, final, not an outage, no password in it.
#[track_caller]
fn assert_auth_error(e: &Error) {
    let text = format!("{e} | {e:?}");
    let lower = text.to_ascii_lowercase();
    assert!(
        text.contains("WRONGPASS") || lower.contains("authentication"),
        "the error does not name the authentication failure: {text}"
    );
    assert!(!e.is_retryable(), "a wrong password is not retryable: {e}");
    assert!(
        !e.is_connection(),
        "a wrong password is not an outage (the fallback would journal forever): {e}"
    );
    assert!(!text.contains(WRONG) && !text.contains(PASSWORD), "{text}");
}

/// Journal files of a fallback directory and their total size in bytes.
fn journal_bytes(dir: &Path) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut files = 0;
    let mut bytes = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("journal-") && name.ends_with(".jsonl") {
            files += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    (files, bytes)
}

/// A loopback listener that accepts connections and never answers (a hung server): the
/// accepted sockets are kept open until the guard is dropped.
struct SilentServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("binding 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => held.push(sock),
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SilentServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `graphrag-kv put` with the fallback journal on and `url` unreachable: returns how long it
/// took, after checking that it succeeded and the write is in the journal.
fn cli_put_with_fallback(url: &str) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("STORAGE_KV_BACKEND", "redis")
        .env("REDIS_URL", url)
        .env("REDIS_CONNECTION_TIMEOUT", CONNECT_TIMEOUT)
        .env("KV_FALLBACK", "json")
        .env("KV_FALLBACK_DIR", &journal)
        .env("STORAGE_WORKING_DIR", dir.path())
        .args(["put", "full_docs", "doc-1", r#"{"content": "kept"}"#])
        .stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd.output().expect("running graphrag-kv");
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {stderr}");
    // Success, but not silently: the write is in the journal only.
    assert!(
        stderr.contains("written to the fallback journal only") && stderr.contains("1 write is"),
        "no warning that the write is only journaled: {stderr}"
    );
    let text: String = std::fs::read_dir(&journal)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        text.contains("doc-1") && text.contains("kept"),
        "the write is not in the journal: {text:?}"
    );
    took
}

#[test]
fn wrong_password_fails_at_open_naming_the_cause() {
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let url = server.url();
    // In REDIS_PASSWORD, and in the URL.
    for pairs in [
        vec![("REDIS_URL", url.clone()), ("REDIS_PASSWORD", WRONG.into())],
        vec![(
            "REDIS_URL",
            format!("redis://default:{WRONG}@127.0.0.1:{}", server.port()),
        )],
    ] {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let e = open_fails_quickly(&config(&pairs));
        assert_auth_error(&e);
    }
    // No password where one is needed.
    let e = open_fails_quickly(&config(&[("REDIS_URL", &url)]));
    assert!(!e.is_retryable() && !e.is_connection(), "{e}");
    assert!(e.to_string().contains("NOAUTH"), "{e}");
}

#[test]
fn wrong_password_with_the_fallback_fails_instead_of_journaling() {
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal_str = journal.to_str().unwrap().to_string();
    let url = server.url();
    let config = config(&[
        ("REDIS_URL", &url),
        ("REDIS_PASSWORD", WRONG),
        ("KV_FALLBACK", "json"),
        ("KV_FALLBACK_DIR", &journal_str),
    ]);
    let e = open_fails_quickly(&config);
    assert_auth_error(&e);
    assert_eq!(journal_bytes(&journal).1, 0, "nothing may be journaled");
}

#[test]
fn closed_port_fails_at_open_with_connection_refused() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let e = open_fails_quickly(&config(&[("REDIS_URL", &url)]));
    assert!(
        e.to_string().to_ascii_lowercase().contains("refused"),
        "the error does not say the connection was refused: {e}"
    );
    assert!(e.is_connection() && e.is_retryable(), "{e}");
}

#[test]
fn hung_server_fails_at_open_within_the_connection_timeout() {
    let silent = SilentServer::start();
    let e = open_fails_quickly(&config(&[("REDIS_URL", &silent.url())]));
    assert!(e.is_connection() && e.is_timeout(), "{e}");
}

#[test]
fn server_killed_after_open_first_operation_fails_quickly() {
    let mut server = RedisServer::start();
    let storage = Storage::open(&config(&[("REDIS_URL", &server.url())])).unwrap();
    let store = storage.namespace(&unique_prefix("killed")).unwrap();
    store.upsert(vec![("a".into(), json!(1))]).unwrap();
    server.kill();
    let start = Instant::now();
    let e = store.get_by_id("a").unwrap_err();
    let took = start.elapsed();
    assert!(took < BOUND, "took {took:?}: {e}");
    assert!(e.is_connection(), "{e}");
}

#[test]
fn cli_put_with_fallback_journals_at_once_when_the_port_is_closed() {
    let took = cli_put_with_fallback(&format!("redis://127.0.0.1:{}", free_port()));
    assert!(took < BOUND, "the write was journaled after {took:?}");
}

#[test]
fn cli_put_with_fallback_journals_within_the_timeout_when_the_server_hangs() {
    let silent = SilentServer::start();
    let took = cli_put_with_fallback(&silent.url());
    assert!(took < BOUND, "the write was journaled after {took:?}");
}

#[test]
fn untrusted_certificate_fails_at_open_naming_tls() {
    let server = TlsRedisServer::start(ClientAuth::No, &[]);
    let ca = server.certs().other_ca_cert();
    let e = open_fails_quickly(&config(&[
        ("REDIS_URL", &server.tls_url()),
        ("REDIS_TLS_CA_CERT", ca.to_str().unwrap()),
    ]));
    let text = e.to_string();
    assert!(
        text.contains("certificate") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(!e.is_retryable() && !e.is_connection(), "{e}");
}

#[test]
fn cluster_wrong_password_and_closed_ports_fail_at_open() {
    let cluster = RedisCluster::start_with(1, 0, &["--requirepass", PASSWORD]);
    let port = cluster.nodes()[0].port();
    let e = open_fails_quickly(&config(&[
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}")),
        ("REDIS_CLUSTER", "true"),
        ("REDIS_PASSWORD", WRONG),
    ]));
    assert_auth_error(&e);

    let closed = format!(
        "redis://127.0.0.1:{},redis://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let e = open_fails_quickly(&config(&[("REDIS_URL", &closed)]));
    assert!(e.is_connection(), "{e}");
}

#[test]
fn cluster_seed_that_never_answers_is_a_connect_timeout() {
    let silent = SilentServer::start();
    let e = open_fails_quickly(&config(&[
        ("REDIS_URL", &silent.url()),
        ("REDIS_CLUSTER", "true"),
    ]));
    // A timeout, named as such (not retried), rather than a generic I/O error.
    assert!(e.is_connection() && e.is_timeout(), "{e}");
}

#[test]
fn sentinel_wrong_password_and_closed_sentinels_fail_at_open() {
    let set = RedisSentinelSet::start();
    // The master starts asking for a password the client does not have.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query::<()>(&mut set.servers()[0].conn())
        .unwrap();
    let e = open_fails_quickly(&config(&[
        ("REDIS_SENTINEL_URLS", &set.sentinel_url_list()),
        ("REDIS_PASSWORD", WRONG),
    ]));
    assert_auth_error(&e);

    let closed = format!(
        "redis://127.0.0.1:{},redis://127.0.0.1:{}",
        free_port(),
        free_port()
    );
    let e = open_fails_quickly(&config(&[("REDIS_SENTINEL_URLS", &closed)]));
    assert!(e.is_connection(), "{e}");
}
