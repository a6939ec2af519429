//! The single-node connection pool against a real redis-server: it never opens more than
//! `REDIS_MAX_CONNECTIONS` connections, however many threads ask at once, and a server that
//! accepts a connection and then refuses it (`maxclients` reached) is a connect error naming
//! that cause, not a "connection reset" on the first command.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use graphrag_kv::{ConnectFailure, Error, KvStore, RedisShared, StoreConfigBuilder};
use serde_json::json;
use support::{unique_prefix, RedisServer};

/// The pool size of these tests.
const POOL: u32 = 8;

/// Threads reading at once: many more than the pool holds, so most checkouts find it empty.
const THREADS: usize = 48;

/// A configuration for `server` with a pool of `max_connections`.
fn redis_config(
    server: &RedisServer,
    prefix: &str,
    max_connections: u32,
) -> graphrag_kv::RedisConfig {
    let vars: HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis".to_string()),
        ("REDIS_URL", server.url()),
        ("REDIS_KEY_PREFIX", prefix.to_string()),
        ("REDIS_MAX_CONNECTIONS", max_connections.to_string()),
        ("REDIS_CONNECTION_TIMEOUT", "5".to_string()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    StoreConfigBuilder::from_vars(&vars)
        .and_then(StoreConfigBuilder::build)
        .unwrap_or_else(|e| panic!("configuration: {e}"))
        .redis
}

/// One field of `INFO`, as a number.
fn info_number(conn: &mut redis::Connection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(conn).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}: {info}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{field} in INFO {section}: {e}"))
}

/// What [`read_hard`] saw.
struct Outcome {
    /// Reads that failed, with the first few errors.
    errors: u64,
    first_errors: Vec<String>,
    /// The most clients the server reported at once while the threads ran (admin included).
    peak_clients: u64,
}

/// `THREADS` threads each read `key` of `store`'s namespace `reads` times, pausing a moment
/// between reads (so a connection just returned goes to another thread, and the next checkout
/// finds the pool empty), while `admin` samples the server's client count.
fn read_hard(shared: &Arc<RedisShared>, admin: &mut redis::Connection, reads: usize) -> Outcome {
    let store = shared.namespace("llm_response_cache").expect("namespace");
    store
        .upsert_refs(&[("k", &json!({"v": 1}))])
        .expect("upsert");
    let errors = Arc::new(AtomicU64::new(0));
    let first_errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (store, errors, first_errors, start) = (
                store.clone(),
                errors.clone(),
                first_errors.clone(),
                start.clone(),
            );
            thread::spawn(move || {
                start.wait();
                for _ in 0..reads {
                    match store.get_by_id("k") {
                        Ok(Some(_)) => {}
                        other => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = first_errors.lock().unwrap();
                            if first.len() < 5 {
                                first.push(format!("{other:?}"));
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let mut peak_clients = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        peak_clients = peak_clients.max(info_number(admin, "clients", "connected_clients"));
        thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        h.join().expect("reader thread");
    }
    let first_errors = first_errors.lock().unwrap().clone();
    Outcome {
        errors: errors.load(Ordering::Relaxed),
        first_errors,
        peak_clients,
    }
}

/// Many threads on an empty pool: every connection the pool opens is one of its
/// `REDIS_MAX_CONNECTIONS`, none is opened and thrown away, none is refused.
#[test]
fn many_threads_never_open_more_connections_than_the_pool_size() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    let prefix = unique_prefix("pool-count");
    let received_before = info_number(&mut admin, "stats", "total_connections_received");
    let shared = RedisShared::connect(&redis_config(&server, &prefix, POOL)).expect("connect");
    let outcome = read_hard(&shared, &mut admin, 40);
    let opened = info_number(&mut admin, "stats", "total_connections_received") - received_before;
    assert_eq!(
        outcome.errors, 0,
        "reads failed on a healthy server: {:?}",
        outcome.first_errors
    );
    assert!(
        opened <= u64::from(POOL),
        "the pool of {POOL} opened {opened} connections to the server (peak {} clients \
         including this test's own)",
        outcome.peak_clients
    );
    assert!(
        outcome.peak_clients <= u64::from(POOL) + 1,
        "the server saw {} clients at once for a pool of {POOL} plus this test's connection",
        outcome.peak_clients
    );
    let (open, _) = shared.pool_state();
    assert!(open <= POOL, "the pool holds {open} connections");
}

/// A server whose `maxclients` leaves room for exactly the pool and this test's connection:
/// reads from many threads all succeed and the server refuses no connection.
#[test]
fn a_pool_that_fits_under_maxclients_reads_without_errors_from_many_threads() {
    let maxclients = (POOL + 1).to_string();
    let server = RedisServer::start_with(&["--maxclients", &maxclients]);
    let mut admin = server.conn();
    let prefix = unique_prefix("pool-fits");
    let shared = RedisShared::connect(&redis_config(&server, &prefix, POOL)).expect("connect");
    let outcome = read_hard(&shared, &mut admin, 40);
    let rejected = info_number(&mut admin, "stats", "rejected_connections");
    assert_eq!(
        (outcome.errors, rejected),
        (0, 0),
        "(failed reads, connections the server refused at maxclients {maxclients}) for a pool \
         of {POOL}; first errors: {:?}",
        outcome.first_errors
    );
}

/// A server at `maxclients` accepts the TCP connection, answers `-ERR max number of clients
/// reached` and closes it: opening a store is a connect error that says so, retryable (the
/// server is there and may have room later), not a reset on the first command.
#[test]
fn a_server_at_maxclients_is_a_connect_error_naming_the_cause() {
    let server = RedisServer::start_with(&["--maxclients", "1"]);
    // Takes the only slot.
    let mut admin = server.conn();
    let prefix = unique_prefix("pool-full");
    let e = match RedisShared::connect(&redis_config(&server, &prefix, POOL)) {
        Ok(_) => panic!("connecting to a server at maxclients succeeded"),
        Err(e) => e,
    };
    let text = e.to_string();
    match &e {
        // The server is there but has no room now: waiting may help, as for an outage.
        Error::Connect { cause, .. } => assert_eq!(*cause, ConnectFailure::Unreachable, "{text}"),
        other => panic!("not a connect error: {other:?}"),
    }
    assert!(text.contains("max number of clients"), "{text}");
    assert!(e.is_connection() && e.is_retryable(), "{text}");
    assert!(
        info_number(&mut admin, "stats", "rejected_connections") > 0,
        "the server refused no connection: the test did not fill it"
    );
}
