//! Security against real redis-server processes: a restricted ACL user (standalone and
//! cluster), TLS with a private CA and mutual TLS, secrets kept out of every log record (trace
//! level included), error and `Debug` output, and stored data that is only ever parsed.
//!
//! docs/SECURITY.md states each guarantee and points at the test here that proves it.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Once};
use std::thread::ThreadId;

use graphrag_kv::{
    ClusterMode, Error, KvStore, RedisMode, Storage, StoreConfig, StoreConfigBuilder,
};
use serde_json::json;
use support::cluster::RedisCluster;
use support::conformance::Open;
use support::tls::{ClientAuth, TlsCluster, TlsRedisServer};
use support::{unique_prefix, RedisServer};

// ---------------------------------------------------------------------------------------------
// Log capture: every record of every level, from every thread of this test binary.

/// One captured log record.
struct Captured {
    thread: ThreadId,
    level: log::Level,
    text: String,
}

static RECORDS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let captured = Captured {
            thread: std::thread::current().id(),
            level: record.level(),
            text: format!("{} {}: {}", record.level(), record.target(), record.args()),
        };
        RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(captured);
    }

    fn flush(&self) {}
}

/// Installs the capturing logger at trace level (once per test binary).
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The text of every record captured so far (all threads).
fn all_records() -> Vec<String> {
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|r| r.text.clone())
        .collect()
}

/// Warnings logged by the calling thread that contain `needle`.
fn my_warnings(needle: &str) -> usize {
    let me = std::thread::current().id();
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|r| r.thread == me && r.level == log::Level::Warn && r.text.contains(needle))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A configuration from environment-style variables, as `StoreConfig::from_env` reads them.
fn from_vars(pairs: &[(&str, &str)]) -> graphrag_kv::Result<StoreConfig> {
    StoreConfigBuilder::from_vars(&vars(pairs))?.build()
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// ACL: a user limited to its key prefix and the commands the store sends.

/// The commands every `KvStore` operation needs on a standalone server (or the master that
/// Sentinel names). docs/SECURITY.md gives the same rule.
const STORE_COMMANDS: &str = "+get +mget +set +exists +type +unlink +scan +strlen +ping";

/// Optional: what `index_done_callback` uses to make writes durable. Without them it warns
/// once and returns Ok.
const CHECKPOINT_COMMANDS: &str = "+info +bgsave +config|get";

/// Added for Redis Cluster: the slot map, the masters list for SCAN, and the redirects of a
/// resharding.
const CLUSTER_COMMANDS: &str = "+cluster|slots +cluster|nodes +asking";

/// Added for `LlmCache`'s cross-process lock: its scripts run SET, GET, PEXPIRE and DEL on
/// `{prefix}::lock:...` keys, which the key pattern already covers.
const LLM_LOCK_COMMANDS: &str = "+eval +pexpire +del";

/// Denials a user with only [`STORE_COMMANDS`] causes, by design: the optional checkpoint,
/// cluster-detection and eviction-policy checks, each of which degrades to a log line.
const OPTIONAL_DENIALS: [&str; 3] = ["info", "config|get", "bgsave"];

/// A password with characters that must be percent-encoded in a URL.
const ACL_PASSWORD: &str = "Acl pw/with:odd@chars%";

/// `ACL SETUSER user reset on >password ~prefix:* resetchannels <STORE_COMMANDS> <extra>`.
fn create_acl_user(conn: &mut redis::Connection, user: &str, prefix: &str, extra: &str) {
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{ACL_PASSWORD}"))
        .arg(format!("~{prefix}:*"))
        .arg("resetchannels");
    for rule in STORE_COMMANDS.split_whitespace() {
        cmd.arg(rule);
    }
    for rule in extra.split_whitespace() {
        cmd.arg(rule);
    }
    cmd.query::<()>(conn)
        .unwrap_or_else(|e| panic!("ACL SETUSER {user}: {e}"));
}

/// `ACL LOG` entries as (reason, object, username).
fn acl_denials(conn: &mut redis::Connection) -> Vec<(String, String, String)> {
    let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .arg(1000)
        .query(conn)
        .expect("ACL LOG");
    let field = |e: &HashMap<String, redis::Value>, k: &str| -> String {
        e.get(k)
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .unwrap_or_default()
    };
    entries
        .iter()
        .map(|e| (field(e, "reason"), field(e, "object"), field(e, "username")))
        .collect()
}

/// Keeps the server alive for a conformance test, then checks its `ACL LOG`: the suite must
/// not have been refused anything but the optional commands.
struct AclGuard {
    server: RedisServer,
}

impl Drop for AclGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        check_acl_log(&mut self.server.conn());
    }
}

/// Checks a server's `ACL LOG`: the restricted user was refused only optional commands, and
/// was refused at least the eviction-policy check every connect makes (so the rule really was
/// in force).
fn check_acl_log(conn: &mut redis::Connection) {
    let denials = acl_denials(conn);
    let unexpected: Vec<_> = denials
        .iter()
        .filter(|(reason, object, _)| {
            !(reason == "command" && OPTIONAL_DENIALS.contains(&object.as_str()))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "the ACL user was refused something the store needs: {unexpected:?}"
    );
    assert!(
        denials.iter().any(|(_, object, _)| object == "config|get"),
        "the restricted user was never refused anything: {denials:?}"
    );
}

fn acl_backend(credentials_in_url: bool) -> (AclGuard, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let prefix = unique_prefix("acl");
    create_acl_user(&mut server.conn(), "graphrag", &prefix, "");
    let url = if credentials_in_url {
        format!(
            "redis://graphrag:{}@127.0.0.1:{}",
            percent_encode(ACL_PASSWORD),
            server.port()
        )
    } else {
        server.url()
    };
    let mut pairs = vec![
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
    ];
    if !credentials_in_url {
        pairs.push(("REDIS_USERNAME", "graphrag"));
        pairs.push(("REDIS_PASSWORD", ACL_PASSWORD));
    }
    let storage = Storage::open(&from_vars(&pairs).unwrap()).unwrap();
    (AclGuard { server }, move |ns: &str| {
        storage.namespace(ns).unwrap()
    })
}

fn acl_backend_env() -> (AclGuard, impl Fn(&str) -> Arc<dyn KvStore>) {
    acl_backend(false)
}

fn acl_backend_url() -> (AclGuard, impl Fn(&str) -> Arc<dyn KvStore>) {
    acl_backend(true)
}

// The whole conformance suite as the restricted user, credentials from REDIS_USERNAME /
// REDIS_PASSWORD, then from the URL; each test ends by checking the server's ACL LOG.
support::conformance::conformance_tests!(acl_env_credentials, acl_backend_env);
support::conformance::conformance_tests!(acl_url_credentials, acl_backend_url);

#[test]
fn acl_user_is_refused_outside_its_prefix_and_admin_commands() {
    // DEBUG enabled, so that it is the ACL that refuses it.
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let mut admin = server.conn();
    create_acl_user(&mut admin, "graphrag", "mine", "");
    for (key, value) in [
        ("theirs:ns:k", "their data"),
        ("mineX:ns:k", "a neighbour's data"),
    ] {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query::<()>(&mut admin)
            .unwrap();
    }
    let user_url = format!(
        "redis://graphrag:{}@127.0.0.1:{}",
        percent_encode(ACL_PASSWORD),
        server.port()
    );
    let mut user = redis::Client::open(user_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    // The user's own keys work.
    redis::cmd("SET")
        .arg("mine:ns:k")
        .arg("1")
        .query::<()>(&mut user)
        .unwrap();

    // Keys outside `mine:*` (`mineX:` included) and every command outside the rule are refused
    // by the server itself.
    let refused: Vec<Vec<&str>> = vec![
        vec!["GET", "theirs:ns:k"],
        vec!["SET", "theirs:ns:k", "x"],
        vec!["UNLINK", "theirs:ns:k"],
        vec!["EXISTS", "theirs:ns:k"],
        vec!["MGET", "mine:ns:k", "theirs:ns:k"],
        vec!["GET", "mineX:ns:k"],
        vec!["DEL", "mine:ns:k"],
        vec!["FLUSHALL"],
        vec!["FLUSHDB"],
        vec!["KEYS", "*"],
        vec!["CONFIG", "SET", "maxmemory", "1"],
        vec!["CONFIG", "GET", "requirepass"],
        vec!["ACL", "LIST"],
        vec!["DEBUG", "SLEEP", "0"],
        vec!["EVAL", "return redis.call('GET', 'theirs:ns:k')", "0"],
        vec!["SELECT", "1"],
        vec!["SHUTDOWN", "NOSAVE"],
        vec!["BGSAVE"],
        vec!["INFO"],
    ];
    for args in &refused {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let e = cmd
            .query::<redis::Value>(&mut user)
            .expect_err(&format!("{args:?} must be refused"));
        assert_eq!(e.code(), Some("NOPERM"), "{args:?}: {e}");
    }

    // Through the store: a prefix the user does not own is an error (permission denied),
    // never "missing", and nothing is written or deleted.
    let config = from_vars(&[
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", &user_url),
        ("REDIS_KEY_PREFIX", "theirs"),
        ("REDIS_RETRIES", "0"),
    ])
    .unwrap();
    let foreign = Storage::open(&config).unwrap().namespace("ns").unwrap();
    let e = foreign.get_by_id("k").unwrap_err();
    assert!(e.is_permission_denied(), "{e}");
    let e = foreign
        .upsert(vec![("k".into(), json!("overwritten"))])
        .unwrap_err();
    assert!(e.is_permission_denied(), "{e}");
    let e = foreign.filter_keys(&["k".into()]).unwrap_err();
    assert!(e.is_permission_denied(), "{e}");
    // Also when the refusals span several windows of one exchange, call after call.
    let many: Vec<String> = (0..900).map(|i| format!("k{i}")).collect();
    for _ in 0..2 {
        let e = foreign.filter_keys(&many).unwrap_err();
        assert!(e.is_permission_denied(), "{e}");
    }
    let e = foreign.delete_by_ids(&["k".into()]).unwrap_err();
    assert!(e.is_permission_denied(), "{e}");
    // SCAN takes no key argument, so Redis ACLs cannot filter it: the user may list the NAMES
    // of other keys (not read them). docs/SECURITY.md says so; full isolation needs a separate
    // database or server.
    assert_eq!(foreign.all_keys().unwrap(), ["k"]);
    let e = foreign.clear().unwrap_err();
    assert!(e.is_permission_denied(), "{e}");

    let theirs: String = redis::cmd("GET")
        .arg("theirs:ns:k")
        .query(&mut admin)
        .unwrap();
    assert_eq!(theirs, "their data");
    let neighbour: String = redis::cmd("GET")
        .arg("mineX:ns:k")
        .query(&mut admin)
        .unwrap();
    assert_eq!(neighbour, "a neighbour's data");
}

#[test]
fn checkpoint_warns_once_when_saving_is_denied_and_saves_when_allowed() {
    capture_logs();
    let server = RedisServer::start();
    let mut admin = server.conn();
    create_acl_user(&mut admin, "graphrag", "p", "");
    let storage = Storage::open(
        &from_vars(&[
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", &server.url()),
            ("REDIS_USERNAME", "graphrag"),
            ("REDIS_PASSWORD", ACL_PASSWORD),
            ("REDIS_KEY_PREFIX", "p"),
        ])
        .unwrap(),
    )
    .unwrap();
    let a = storage.namespace("a").unwrap();
    let b = storage.namespace("b").unwrap();
    a.upsert(vec![("k".into(), json!(1))]).unwrap();
    const WARNING: &str = "index_done_callback cannot make writes durable";
    for store in [&a, &b, &a] {
        store.index_done_callback().unwrap();
    }
    assert_eq!(
        my_warnings(WARNING),
        1,
        "one warning for three denied checkpoints"
    );
    assert_eq!(a.get_by_id("k").unwrap(), Some(json!(1)));

    // With the optional checkpoint commands the same call makes a real save, and says nothing.
    create_acl_user(&mut admin, "durable", "p", CHECKPOINT_COMMANDS);
    let durable = Storage::open(
        &from_vars(&[
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", &server.url()),
            ("REDIS_USERNAME", "durable"),
            ("REDIS_PASSWORD", ACL_PASSWORD),
            ("REDIS_KEY_PREFIX", "p"),
        ])
        .unwrap(),
    )
    .unwrap()
    .namespace("a")
    .unwrap();
    let saves = |admin: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("persistence").query(admin).unwrap();
        info.lines()
            .find_map(|l| l.trim().strip_prefix("rdb_saves:"))
            .and_then(|v| v.parse().ok())
            .expect("rdb_saves in INFO persistence")
    };
    let before = saves(&mut admin);
    durable.index_done_callback().unwrap();
    assert!(saves(&mut admin) > before, "a BGSAVE ran and completed");
    assert_eq!(
        my_warnings(WARNING),
        1,
        "no new warning when saving is allowed"
    );
}

#[test]
fn acl_rule_for_the_llm_cache_lock() {
    use graphrag_kv::llm_cache::LlmCache;
    use graphrag_kv::llm_hash::Message;
    let server = RedisServer::start();
    create_acl_user(&mut server.conn(), "graphrag", "lc", LLM_LOCK_COMMANDS);
    let storage = Storage::open(
        &from_vars(&[
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", &server.url()),
            ("REDIS_USERNAME", "graphrag"),
            ("REDIS_PASSWORD", ACL_PASSWORD),
            ("REDIS_KEY_PREFIX", "lc"),
        ])
        .unwrap(),
    )
    .unwrap();
    let cache = LlmCache::open(&storage).unwrap();
    assert!(cache.lock_ttl().is_some(), "the Redis lock is in use");
    let prompt = [Message::new(
        "user",
        "Extract entities from: Alice met Bob.",
    )];
    let calls = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let answer = cache
                    .get_or_compute("model", &prompt, || {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        Ok("Alice; Bob".to_string())
                    })
                    .unwrap();
                assert_eq!(answer, "Alice; Bob");
            });
        }
    });
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The lock really went through Redis (its scripts ran), as the restricted user.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.conn())
        .unwrap();
    assert!(stats.contains("cmdstat_eval:calls="), "{stats}");
    check_acl_log(&mut server.conn());
}

/// A conformance suite function.
type SuiteFn = fn(Open<'_>);

/// Every conformance suite function, to run one after the other on one cluster.
const SUITE: &[(&str, SuiteFn)] = &[
    ("upsert_then_read", support::conformance::upsert_then_read),
    ("empty_batches", support::conformance::empty_batches),
    (
        "duplicate_id_in_batch_last_wins",
        support::conformance::duplicate_id_in_batch_last_wins,
    ),
    (
        "filter_keys_missing_once_in_order",
        support::conformance::filter_keys_missing_once_in_order,
    ),
    ("field_filtering", support::conformance::field_filtering),
    (
        "awkward_ids_round_trip",
        support::conformance::awkward_ids_round_trip,
    ),
    (
        "invalid_ids_are_refused",
        support::conformance::invalid_ids_are_refused,
    ),
    (
        "values_round_trip_exactly",
        support::conformance::values_round_trip_exactly,
    ),
    (
        "large_values_round_trip",
        support::conformance::large_values_round_trip,
    ),
    (
        "overwrite_replaces_whole_value",
        support::conformance::overwrite_replaces_whole_value,
    ),
    (
        "delete_removes_only_named_ids",
        support::conformance::delete_removes_only_named_ids,
    ),
    (
        "clear_is_scoped_to_namespace",
        support::conformance::clear_is_scoped_to_namespace,
    ),
    ("all_keys_many_ids", support::conformance::all_keys_many_ids),
    ("typed_round_trip", support::conformance::typed_round_trip),
    (
        "callbacks_keep_data",
        support::conformance::callbacks_keep_data,
    ),
    ("stats_counts", support::conformance::stats_counts),
    (
        "concurrent_mixed_operations",
        support::conformance::concurrent_mixed_operations,
    ),
];

#[test]
fn acl_rule_for_a_cluster() {
    let cluster = RedisCluster::start_with(3, 0, &[]);
    for (i, (name, suite_fn)) in SUITE.iter().enumerate() {
        // A user and a prefix per suite function: each starts from an empty namespace.
        let (user, prefix) = (format!("u{i}"), format!("c{i}"));
        for node in cluster.nodes() {
            create_acl_user(&mut node.conn(), &user, &prefix, CLUSTER_COMMANDS);
        }
        let config = from_vars(&[
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", &cluster.url_list()),
            ("REDIS_CLUSTER", "true"),
            ("REDIS_USERNAME", &user),
            ("REDIS_PASSWORD", ACL_PASSWORD),
            ("REDIS_KEY_PREFIX", &prefix),
        ])
        .unwrap();
        assert_eq!(config.redis.cluster, ClusterMode::Cluster);
        let storage = Storage::open(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
        let open = |ns: &str| storage.namespace(ns).unwrap();
        suite_fn(&open);
    }
    // Each connect asks one node for the eviction policy: check every node's log, and that
    // at least one of them refused it.
    let mut refused_config = false;
    for node in cluster.nodes() {
        let denials = acl_denials(&mut node.conn());
        let unexpected: Vec<_> = denials
            .iter()
            .filter(|(reason, object, _)| {
                !(reason == "command" && OPTIONAL_DENIALS.contains(&object.as_str()))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "node {}: the ACL user was refused something the store needs: {unexpected:?}",
            node.port()
        );
        refused_config |= denials.iter().any(|(_, object, _)| object == "config|get");
    }
    assert!(
        refused_config,
        "the restricted users were never refused anything"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS

fn tls_vars(server: &TlsRedisServer, prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        ("STORAGE_KV_BACKEND", "redis".to_string()),
        ("REDIS_URL", server.tls_url()),
        ("REDIS_KEY_PREFIX", prefix.to_string()),
        (
            "REDIS_TLS_CA_CERT",
            path_str(&server.certs().ca_cert()).to_string(),
        ),
    ]
}

fn build(pairs: &[(&'static str, String)]) -> graphrag_kv::Result<StoreConfig> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    StoreConfigBuilder::from_vars(&map)?.build()
}

fn tls_backend() -> (TlsRedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = TlsRedisServer::start(ClientAuth::No, &[]);
    let storage = Storage::open(&build(&tls_vars(&server, "tls")).unwrap()).unwrap();
    (server, move |ns: &str| storage.namespace(ns).unwrap())
}

// The whole conformance suite over `rediss://`, trusting only the test CA.
support::conformance::conformance_tests!(tls_private_ca, tls_backend);

/// Writes, reads, lists and checkpoints through `storage`.
fn exercise(storage: &Storage) {
    let s = storage.namespace("text_chunks").unwrap();
    let big = json!({"content": "graph ".repeat(2000)});
    s.upsert(vec![
        ("a".into(), json!({"n": 1})),
        ("big".into(), big.clone()),
    ])
    .unwrap();
    assert_eq!(s.get_by_id("a").unwrap(), Some(json!({"n": 1})));
    assert_eq!(
        s.get_by_ids(&["big".into(), "zz".into()], None).unwrap(),
        vec![Some(big), None]
    );
    let mut keys = s.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["a", "big"]);
    s.index_done_callback().unwrap();
}

#[test]
fn tls_checks_the_server_name_in_the_certificate() {
    let server = TlsRedisServer::start(ClientAuth::No, &[]);
    // The certificate names both 127.0.0.1 and localhost.
    let mut pairs = tls_vars(&server, "names");
    pairs[1].1 = server.tls_url_localhost();
    exercise(&Storage::open(&build(&pairs).unwrap()).unwrap());
    // The data really went over the TLS port into that server.
    let n: u64 = redis::cmd("DBSIZE")
        .query(&mut server.server().conn())
        .unwrap();
    assert_eq!(n, 2);
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let server = TlsRedisServer::start(ClientAuth::Required, &[]);
    let certs = server.certs();
    let quick = |mut pairs: Vec<(&'static str, String)>| {
        pairs.push(("REDIS_CONNECTION_TIMEOUT", "2".into()));
        pairs.push(("REDIS_POOL_TIMEOUT", "3".into()));
        pairs.push(("REDIS_RETRIES", "0".into()));
        pairs
    };
    // Without a client certificate the server refuses the handshake: an error, no panic.
    let e = Storage::open(&build(&quick(tls_vars(&server, "m"))).unwrap()).unwrap_err();
    // Not an outage (waiting does not help) but a TLS failure, named as one.
    assert!(!e.is_connection() && !e.is_retryable(), "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");

    let mut pairs = quick(tls_vars(&server, "m"));
    pairs.push((
        "REDIS_TLS_CLIENT_CERT",
        path_str(&certs.client_cert()).into(),
    ));
    pairs.push(("REDIS_TLS_CLIENT_KEY", path_str(&certs.client_key()).into()));
    exercise(&Storage::open(&build(&pairs).unwrap()).unwrap());

    // The same through the builder setters.
    let config = StoreConfig::builder()
        .backend(graphrag_kv::BackendKind::Redis)
        .redis_url(server.tls_url())
        .key_prefix("m2")
        .tls_ca_cert(certs.ca_cert())
        .tls_client_cert(certs.client_cert())
        .tls_client_key(certs.client_key())
        .build()
        .unwrap();
    exercise(&Storage::open(&config).unwrap());
}

#[test]
fn tls_optional_client_auth_accepts_both() {
    let server = TlsRedisServer::start(ClientAuth::Optional, &[]);
    exercise(&Storage::open(&build(&tls_vars(&server, "o1")).unwrap()).unwrap());
    let mut pairs = tls_vars(&server, "o2");
    pairs.push((
        "REDIS_TLS_CLIENT_CERT",
        path_str(&server.certs().client_cert()).into(),
    ));
    pairs.push((
        "REDIS_TLS_CLIENT_KEY",
        path_str(&server.certs().client_key()).into(),
    ));
    exercise(&Storage::open(&build(&pairs).unwrap()).unwrap());
}

#[test]
fn wrong_ca_or_plain_text_is_a_clear_error_never_a_panic_or_a_hang() {
    let server = TlsRedisServer::start(ClientAuth::No, &[]);
    let quick = |mut pairs: Vec<(&'static str, String)>| {
        pairs.push(("REDIS_CONNECTION_TIMEOUT", "2".into()));
        pairs.push(("REDIS_SOCKET_TIMEOUT", "2".into()));
        pairs.push(("REDIS_POOL_TIMEOUT", "3".into()));
        pairs.push(("REDIS_RETRIES", "0".into()));
        pairs
    };
    // A CA that did not sign the server's certificate.
    let mut pairs = quick(tls_vars(&server, "w"));
    pairs[3].1 = path_str(&server.certs().other_ca_cert()).into();
    let e = Storage::open(&build(&pairs).unwrap()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("certificate") && text.contains("UnknownIssuer"),
        "{text}"
    );
    // Not an outage: waiting does not make the certificate trusted (tests/fail_fast.rs).
    assert!(!e.is_connection() && !e.is_retryable(), "{e}");

    // No CA file: the system's roots, which do not know the test CA.
    let pairs: Vec<_> = quick(tls_vars(&server, "w"))
        .into_iter()
        .filter(|(k, _)| *k != "REDIS_TLS_CA_CERT")
        .collect();
    let e = Storage::open(&build(&pairs).unwrap()).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // `#insecure` (no verification at all) is not compiled in: refused, not honoured.
    let mut pairs = quick(tls_vars(&server, "w"));
    pairs.retain(|(k, _)| *k != "REDIS_TLS_CA_CERT");
    pairs[1].1 = format!("{}#insecure", server.tls_url());
    let e = Storage::open(&build(&pairs).unwrap()).unwrap_err();
    assert!(e.to_string().contains("insecure"), "{e}");

    // Plain text to the TLS port, and TLS to the plain port: errors within the timeouts.
    let mut pairs = quick(tls_vars(&server, "w"));
    pairs.retain(|(k, _)| *k != "REDIS_TLS_CA_CERT");
    pairs[1].1 = format!("redis://127.0.0.1:{}", server.tls_port());
    assert!(Storage::open(&build(&pairs).unwrap()).is_err());
    let mut pairs = quick(tls_vars(&server, "w"));
    pairs[1].1 = format!("rediss://127.0.0.1:{}", server.server().port());
    assert!(Storage::open(&build(&pairs).unwrap()).is_err());

    // The server is unharmed and its data untouched.
    let pong: String = redis::cmd("PING")
        .query(&mut server.server().conn())
        .unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
fn tls_to_a_cluster_with_a_private_ca() {
    let cluster = TlsCluster::start(3);
    let ca = path_str(&cluster.certs().ca_cert()).to_string();
    // The suite, each function under its own prefix; seeds given as a list, cluster forced.
    // Large values over TLS are covered on a single server (tls_private_ca): skipped here, where
    // they would cost seconds of unoptimised encryption.
    for (i, (name, suite_fn)) in SUITE
        .iter()
        .enumerate()
        .filter(|(_, (name, _))| *name != "large_values_round_trip")
    {
        let config = build(&[
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_URL", cluster.tls_url_list()),
            ("REDIS_CLUSTER", "true".into()),
            ("REDIS_TLS_CA_CERT", ca.clone()),
            ("REDIS_KEY_PREFIX", format!("t{i}")),
        ])
        .unwrap();
        let storage = Storage::open(&config).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(storage.redis().unwrap().mode(), RedisMode::Cluster);
        let open = |ns: &str| storage.namespace(ns).unwrap();
        suite_fn(&open);
    }
    // One seed, cluster mode detected (INFO over TLS), then the cluster client over TLS.
    let one_seed = cluster.nodes()[1].tls_url();
    let storage = Storage::open(
        &build(&[
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_URL", one_seed.clone()),
            ("REDIS_TLS_CA_CERT", ca.clone()),
            ("REDIS_KEY_PREFIX", "auto".into()),
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(storage.redis().unwrap().mode(), RedisMode::Cluster);
    let s = storage.namespace("ns").unwrap();
    let items: Vec<_> = (0..300).map(|i| (format!("k{i}"), json!(i))).collect();
    s.upsert(items).unwrap();
    assert_eq!(s.all_keys().unwrap().len(), 300);
    // The keys really are spread over the three masters.
    for node in cluster.nodes() {
        let n: u64 = redis::cmd("DBSIZE")
            .query(&mut node.server().conn())
            .unwrap();
        assert!(n > 0, "node {} holds no key", node.tls_port());
    }
    // Trusting another CA: a clear error, no panic.
    let e = Storage::open(
        &build(&[
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_URL", cluster.tls_url_list()),
            ("REDIS_CLUSTER", "true".into()),
            (
                "REDIS_TLS_CA_CERT",
                path_str(&cluster.certs().other_ca_cert()).into(),
            ),
            ("REDIS_CONNECTION_TIMEOUT", "2".into()),
            ("REDIS_POOL_TIMEOUT", "3".into()),
            ("REDIS_RETRIES", "0".into()),
        ])
        .unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

#[test]
fn tls_files_are_checked_when_the_configuration_is_built() {
    let certs = support::tls::TestCerts::generate();
    let dir = certs.dir();
    let key_text = std::fs::read_to_string(certs.client_key()).unwrap();
    let key_body: Vec<&str> = key_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        dir.join("broken.pem"),
        "-----BEGIN CERTIFICATE-----\n@@@@ not base64 @@@@\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = dir.join("missing.crt");
    let p = |path: &Path| path_str(path).to_string();
    let base = |url: &str| -> Vec<(&'static str, String)> {
        vec![
            ("STORAGE_KV_BACKEND", "redis".into()),
            ("REDIS_URL", url.into()),
        ]
    };
    let url = "rediss://127.0.0.1:6390";
    // (extra variables, variable the error names, file it names, text it contains)
    type Case = (
        Vec<(&'static str, String)>,
        &'static str,
        Option<String>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            vec![("REDIS_TLS_CA_CERT", p(&missing))],
            "REDIS_TLS_CA_CERT",
            Some(p(&missing)),
            "cannot read it",
        ),
        (
            vec![("REDIS_TLS_CA_CERT", p(&dir.join("garbage.pem")))],
            "REDIS_TLS_CA_CERT",
            Some(p(&dir.join("garbage.pem"))),
            "none found",
        ),
        (
            vec![("REDIS_TLS_CA_CERT", p(&dir.join("broken.pem")))],
            "REDIS_TLS_CA_CERT",
            Some(p(&dir.join("broken.pem"))),
            "valid PEM",
        ),
        (
            // A key where the CA should be.
            vec![("REDIS_TLS_CA_CERT", p(&certs.client_key()))],
            "REDIS_TLS_CA_CERT",
            Some(p(&certs.client_key())),
            "none found",
        ),
        (
            vec![("REDIS_TLS_CLIENT_CERT", p(&certs.client_cert()))],
            "REDIS_TLS_CLIENT_KEY",
            None,
            "needs both",
        ),
        (
            vec![("REDIS_TLS_CLIENT_KEY", p(&certs.client_key()))],
            "REDIS_TLS_CLIENT_CERT",
            None,
            "needs both",
        ),
        (
            // The certificate where the key should be.
            vec![
                ("REDIS_TLS_CLIENT_CERT", p(&certs.client_cert())),
                ("REDIS_TLS_CLIENT_KEY", p(&certs.client_cert())),
            ],
            "REDIS_TLS_CLIENT_KEY",
            Some(p(&certs.client_cert())),
            "private key",
        ),
        (
            // The key where the certificate should be.
            vec![
                ("REDIS_TLS_CLIENT_CERT", p(&certs.client_key())),
                ("REDIS_TLS_CLIENT_KEY", p(&certs.client_key())),
            ],
            "REDIS_TLS_CLIENT_CERT",
            Some(p(&certs.client_key())),
            "none found",
        ),
    ];
    for (extra, variable, file, needle) in cases {
        let mut pairs = base(url);
        pairs.extend(extra.clone());
        let e = build(&pairs).expect_err(&format!("{extra:?} must be refused"));
        let text = e.to_string();
        assert!(matches!(e, Error::Config { .. }), "{text}");
        assert!(text.contains(variable), "{variable}: {text}");
        if let Some(file) = file {
            assert!(text.contains(&file), "{file}: {text}");
        }
        assert!(text.contains(needle), "{needle}: {text}");
        for line in &key_body {
            assert!(!text.contains(line), "key material in an error: {text}");
        }
    }

    // TLS files with a plain-text URL would be silently ignored: refused instead.
    let mut pairs = base("redis://:pw@127.0.0.1:6390");
    pairs.push(("REDIS_TLS_CA_CERT", p(&certs.ca_cert())));
    let text = build(&pairs).unwrap_err().to_string();
    assert!(
        text.contains("REDIS_URL") && text.contains("rediss://"),
        "{text}"
    );
    assert!(!text.contains(":pw@"), "{text}");
    // And through Sentinel, which this crate does not connect over TLS.
    let mut pairs = base(url);
    pairs.push(("REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379".into()));
    pairs.push(("REDIS_TLS_CA_CERT", p(&certs.ca_cert())));
    let text = build(&pairs).unwrap_err().to_string();
    assert!(text.contains("REDIS_SENTINEL_URLS"), "{text}");

    // The valid set builds, and its Debug shows paths, never file contents.
    let mut pairs = base(url);
    pairs.push(("REDIS_TLS_CA_CERT", p(&certs.ca_cert())));
    pairs.push(("REDIS_TLS_CLIENT_CERT", p(&certs.client_cert())));
    pairs.push(("REDIS_TLS_CLIENT_KEY", p(&certs.client_key())));
    let config = build(&pairs).unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("client.key"), "{debug}");
    for line in &key_body {
        assert!(!debug.contains(line), "{debug}");
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

/// Every way the secrets could leak: log records of every level from every thread, and the
/// errors' and configurations' Display and Debug forms.
#[test]
fn secrets_never_reach_logs_errors_or_debug_output() {
    capture_logs();
    const PASSWORD: &str = "Sekr1t-pw-9c41e7";
    const WRONG_IN_ENV: &str = "Wr0ng-env-pw-5d2a";
    const WRONG_IN_URL: &str = "Wr0ng-url-pw-77b0";
    const UNREACHABLE_PW: &str = "Unre4ch-pw-3e19";
    const ACL_PW: &str = "Acl-user-pw-c0ffee";
    let secrets = [PASSWORD, WRONG_IN_ENV, WRONG_IN_URL, UNREACHABLE_PW, ACL_PW];
    let mut shown: Vec<String> = Vec::new();
    let mut show_err = |e: &Error| shown.push(format!("{e} | {e:?}"));

    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let port = server.port();
    let quick = [
        ("REDIS_CONNECTION_TIMEOUT", "1"),
        ("REDIS_POOL_TIMEOUT", "1.5"),
        ("REDIS_RETRIES", "1"),
    ];
    let with = |pairs: &[(&str, &str)]| {
        let mut all = pairs.to_vec();
        all.push(("STORAGE_KV_BACKEND", "redis"));
        all.extend_from_slice(&quick);
        all.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>()
    };
    let mut debug_outputs: Vec<String> = Vec::new();

    // The right password, from REDIS_PASSWORD and from the URL.
    let url_with_password = format!("redis://:{PASSWORD}@127.0.0.1:{port}/0");
    let plain_url = server.url();
    for pairs in [
        with(&[("REDIS_URL", &plain_url), ("REDIS_PASSWORD", PASSWORD)]),
        with(&[("REDIS_URL", &url_with_password)]),
    ] {
        let builder = StoreConfigBuilder::from_vars(&pairs).unwrap();
        debug_outputs.push(format!("{builder:?}"));
        let config = builder.build().unwrap();
        debug_outputs.push(format!("{config:?} {:?}", config.redis));
        let storage = Storage::open(&config).unwrap();
        let store = storage.namespace("ns").unwrap();
        store.upsert(vec![("k".into(), json!({"v": 1}))]).unwrap();
        assert_eq!(store.get_by_id("k").unwrap(), Some(json!({"v": 1})));
        store.all_keys().unwrap();
        store.stats().unwrap();
        store.index_done_callback().unwrap();
        let redis_store = storage.redis().unwrap().namespace("ns").unwrap();
        debug_outputs.push(format!("{storage:?} {redis_store:?} {:?}", storage.redis()));
    }

    // Wrong passwords: in REDIS_PASSWORD, and in the URL.
    for pairs in [
        with(&[("REDIS_URL", &plain_url), ("REDIS_PASSWORD", WRONG_IN_ENV)]),
        with(&[(
            "REDIS_URL",
            &format!("redis://default:{WRONG_IN_URL}@127.0.0.1:{port}"),
        )]),
    ] {
        let config = StoreConfigBuilder::from_vars(&pairs)
            .unwrap()
            .build()
            .unwrap();
        debug_outputs.push(format!("{config:?}"));
        let e = Storage::open(&config).unwrap_err();
        show_err(&e);
    }

    // No password where one is needed: an error after connecting (NOAUTH).
    let config = StoreConfigBuilder::from_vars(&with(&[("REDIS_URL", &plain_url)]))
        .unwrap()
        .build()
        .unwrap();
    show_err(&Storage::open(&config).unwrap_err());

    // An unreachable server, password in the URL.
    let closed = support::free_port();
    let config = StoreConfigBuilder::from_vars(&with(&[(
        "REDIS_URL",
        &format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:{closed}"),
    )]))
    .unwrap()
    .build()
    .unwrap();
    debug_outputs.push(format!("{config:?}"));
    show_err(&Storage::open(&config).unwrap_err());

    // A URL that does not parse, with a password in it.
    for bad in [
        format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:notaport"),
        format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:{closed}/notadb"),
        format!("http://user:{UNREACHABLE_PW}@127.0.0.1:{closed}"),
    ] {
        let e = StoreConfigBuilder::from_vars(&with(&[("REDIS_URL", &bad)]))
            .unwrap()
            .build()
            .unwrap_err();
        show_err(&e);
    }

    // An ACL user over TLS: username shown, password not.
    let tls = TlsRedisServer::start(ClientAuth::No, &[]);
    let mut admin = tls.server().conn();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("tlsuser")
        .arg("on")
        .arg(format!(">{ACL_PW}"))
        .arg("~*")
        .arg("+@all")
        .query::<()>(&mut admin)
        .unwrap();
    let ca = path_str(&tls.certs().ca_cert()).to_string();
    for (password, works) in [(ACL_PW, true), (WRONG_IN_ENV, false)] {
        let config = StoreConfigBuilder::from_vars(&with(&[
            ("REDIS_URL", &tls.tls_url()),
            ("REDIS_TLS_CA_CERT", &ca),
            ("REDIS_USERNAME", "tlsuser"),
            ("REDIS_PASSWORD", password),
        ]))
        .unwrap()
        .build()
        .unwrap();
        debug_outputs.push(format!("{config:?}"));
        match Storage::open(&config) {
            Ok(storage) => {
                assert!(works);
                let s = storage.namespace("ns").unwrap();
                s.upsert(vec![("k".into(), json!(2))]).unwrap();
                let redis_store = storage.redis().unwrap().namespace("ns").unwrap();
                debug_outputs.push(format!("{storage:?} {redis_store:?}"));
            }
            Err(e) => {
                assert!(!works, "{e}");
                show_err(&e);
            }
        }
    }

    // The capture works: the pool's debug line about failed connections was recorded.
    let records = all_records();
    assert!(
        records.iter().any(|r| r.starts_with("DEBUG")),
        "the capturing logger recorded nothing at debug level"
    );
    assert!(debug_outputs.iter().any(|d| d.contains("<redacted>")));
    assert!(shown.len() >= 8, "{shown:?}");
    for secret in secrets {
        let encoded = percent_encode(secret);
        for (what, texts) in [
            ("a log record", &records),
            ("an error", &shown),
            ("a Debug output", &debug_outputs),
        ] {
            if let Some(t) = texts
                .iter()
                .find(|t| t.contains(secret) || t.contains(&encoded))
            {
                panic!("{secret} leaked in {what}: {t}");
            }
        }
    }
}

/// The command line, run with `RUST_LOG=trace`, prints neither a password from REDIS_PASSWORD
/// nor one from the URL, whether the server refuses it or cannot be reached.
#[cfg(feature = "cli")]
#[test]
fn command_line_never_prints_the_password() {
    const PASSWORD: &str = "Cli-Sekr1t-4af2";
    const WRONG: &str = "Cli-Wr0ng-81c3";
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let closed = support::free_port();
    let runs: Vec<(Vec<(&str, String)>, bool)> = vec![
        (vec![("REDIS_PASSWORD", PASSWORD.into())], true),
        (vec![("REDIS_PASSWORD", WRONG.into())], false),
        (
            vec![(
                "REDIS_URL",
                format!("redis://:{WRONG}@127.0.0.1:{}", server.port()),
            )],
            false,
        ),
        (
            vec![(
                "REDIS_URL",
                format!("redis://:{PASSWORD}@127.0.0.1:{closed}"),
            )],
            false,
        ),
    ];
    for (env, works) in runs {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_graphrag-kv"));
        cmd.args(["get", "ns", "some-id"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_URL", server.url())
            .env("REDIS_CONNECTION_TIMEOUT", "1")
            .env("REDIS_POOL_TIMEOUT", "1.5")
            .env("REDIS_RETRIES", "0");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("running graphrag-kv");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // `get` of a missing id exits 1; an error exits 2.
        assert_eq!(out.status.code(), Some(if works { 1 } else { 2 }), "{text}");
        for secret in [PASSWORD, WRONG] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Untrusted stored data

/// The reference design unpickled whatever it found in Redis; here a stored value is only ever
/// parsed as JSON (or an lz4 frame holding JSON), so a pickle is a decode error naming the key.
#[test]
fn stored_pickles_are_refused_never_run() {
    let server = RedisServer::start();
    let storage = Storage::open(
        &StoreConfig::builder()
            .backend(graphrag_kv::BackendKind::Redis)
            .redis_url(server.url())
            .key_prefix("pk")
            .build()
            .unwrap(),
    )
    .unwrap();
    let s = storage.namespace("llm_response_cache").unwrap();
    s.upsert(vec![("good".into(), json!({"return": "ok"}))])
        .unwrap();
    let marker = tempfile::tempdir().unwrap();
    let target = marker.path().join("pwned");
    let command = format!("touch {}", target.display());
    // Protocol 0 (text) and protocol 4 (binary) pickles of os.system(command).
    let text_pickle = format!("cos\nsystem\n(V{command}\ntR.").into_bytes();
    let mut binary_pickle = vec![0x80, 0x04, 0x95, 0, 0, 0, 0, 0, 0, 0, 0];
    binary_pickle.extend_from_slice(b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c");
    binary_pickle.push(command.len() as u8);
    binary_pickle.extend_from_slice(command.as_bytes());
    binary_pickle.extend_from_slice(b"\x94\x85\x94R\x94.");
    let mut admin = server.conn();
    for (id, bytes) in [("text", &text_pickle), ("binary", &binary_pickle)] {
        redis::cmd("SET")
            .arg(format!("pk:llm_response_cache:{id}"))
            .arg(bytes.as_slice())
            .query::<()>(&mut admin)
            .unwrap();
        let e = s.get_by_id(id).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pk:llm_response_cache:{id}")),
            "{e}"
        );
    }
    assert!(!target.exists());
    assert_eq!(s.get_by_id("good").unwrap(), Some(json!({"return": "ok"})));
    // Reading never rewrote or removed the hostile values.
    let raw: Vec<u8> = redis::cmd("GET")
        .arg("pk:llm_response_cache:binary")
        .query(&mut admin)
        .unwrap();
    assert_eq!(raw, binary_pickle);
}

/// Passwords holding the URL's own separators (`,` `@` `:` `/` `%`), raw and percent-encoded,
/// in `REDIS_URL` (one server or a cluster list) and `REDIS_SENTINEL_URLS`: no part of them
/// reaches an error, a `Debug` output or a log record, whether the URL parses or not. A raw
/// comma no longer splits the URL (it used to be cut there before redaction, printing the
/// part before the comma), so such a password also works.
#[test]
fn passwords_with_url_separators_never_leak() {
    capture_logs();
    const PASSWORDS: [&str; 5] = [
        "Kp3q,Wd7z",
        "Mv2x@Tn5y",
        "Hb4c:Jf6g/Qs8r",
        "Rs1t%41Yu2v%Lm",
        "Ae9w,Bx3k@Cz4n:Dp5m/Ef6h%Gk7j",
    ];
    /// The password and every part of it between separators longer than 1 character.
    fn pieces(pw: &str) -> Vec<String> {
        let mut out = vec![pw.to_string(), percent_encode(pw)];
        for p in pw.split([',', '@', ':', '/', '%']) {
            if p.len() > 1 {
                out.push(p.to_string());
            }
        }
        out
    }
    let closed = support::free_port();
    let closed2 = support::free_port();
    let quick = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_CONNECTION_TIMEOUT", "1"),
        ("REDIS_POOL_TIMEOUT", "1"),
        ("REDIS_RETRIES", "0"),
    ];
    let mut shown: Vec<(String, String)> = Vec::new();
    for pw in PASSWORDS {
        for form in [pw.to_string(), percent_encode(pw)] {
            let one = format!("redis://user:{form}@127.0.0.1:{closed}/0");
            let list = format!(
                "redis://user:{form}@127.0.0.1:{closed},redis://user:{form}@127.0.0.1:{closed2}"
            );
            for (variable, value) in [
                ("REDIS_URL", one.clone()),
                ("REDIS_URL", list),
                ("REDIS_SENTINEL_URLS", one),
            ] {
                let mut pairs = quick.to_vec();
                pairs.push((variable, &value));
                let config = match from_vars(&pairs) {
                    Err(e) => {
                        let text = format!("{e} | {e:?}");
                        assert!(text.contains(variable), "{text}");
                        shown.push((pw.to_string(), text));
                        continue;
                    }
                    Ok(c) => c,
                };
                shown.push((pw.to_string(), format!("{config:?}")));
                match Storage::open(&config) {
                    Ok(_) => panic!("{variable}: nothing listens on port {closed}"),
                    Err(e) => shown.push((pw.to_string(), format!("{e} | {e:?}"))),
                }
            }
        }
    }
    let records = all_records();
    for (pw, text) in &shown {
        for piece in pieces(pw) {
            assert!(!text.contains(&piece), "{piece:?} of {pw:?} leaked: {text}");
        }
    }
    for pw in PASSWORDS {
        for piece in pieces(pw) {
            if let Some(r) = records.iter().find(|r| r.contains(&piece)) {
                panic!("{piece:?} of {pw:?} leaked in a log record: {r}");
            }
        }
    }

    // A raw comma in the password is part of the password, not a second URL.
    const COMMA_PW: &str = "Np6v,Qw8e";
    let server = RedisServer::start_with(&["--requirepass", COMMA_PW]);
    let url = format!("redis://:{COMMA_PW}@127.0.0.1:{}", server.port());
    let config = from_vars(&[("STORAGE_KV_BACKEND", "redis"), ("REDIS_URL", &url)]).unwrap();
    assert_eq!(config.redis.urls(), vec![url.as_str()]);
    let store = Storage::open(&config).unwrap().namespace("ns").unwrap();
    store.upsert(vec![("k".into(), json!(1))]).unwrap();
    assert_eq!(store.get_by_id("k").unwrap(), Some(json!(1)));
}
