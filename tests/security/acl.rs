//! ACL: a user limited to its key prefix and the commands the store sends, on a server and on a
//! cluster; checkpoints and the LLM cache's lock under the same rule.

use std::collections::HashMap;
use std::sync::Arc;

use graphrag_kv::{ClusterMode, KvStore, Storage};
use serde_json::json;

use crate::helpers::{from_vars, percent_encode, SUITE};
use crate::logs::{capture_logs, my_warnings};
use crate::support::cluster::RedisCluster;
use crate::support::{unique_prefix, RedisServer};

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

/// Added for the fleet-wide LLM rate limit: its script runs TIME, HMGET, HGET, HSET and
/// PEXPIRE on the `{prefix}::rate:...` key, which the key pattern already covers.
const RATE_LIMIT_COMMANDS: &str = "+eval +time +hget +hmget +hset +pexpire";

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
pub(crate) struct AclGuard {
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

pub(crate) fn acl_backend_env() -> (AclGuard, impl Fn(&str) -> Arc<dyn KvStore>) {
    acl_backend(false)
}

pub(crate) fn acl_backend_url() -> (AclGuard, impl Fn(&str) -> Arc<dyn KvStore>) {
    acl_backend(true)
}

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

#[test]
fn acl_rule_for_the_rate_limit() {
    use graphrag_kv::rate_limit::{Admission, RateLimit};
    let server = RedisServer::start();
    create_acl_user(&mut server.conn(), "graphrag", "rl", RATE_LIMIT_COMMANDS);
    let storage = Storage::open(
        &from_vars(&[
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", &server.url()),
            ("REDIS_USERNAME", "graphrag"),
            ("REDIS_PASSWORD", ACL_PASSWORD),
            ("REDIS_KEY_PREFIX", "rl"),
        ])
        .unwrap(),
    )
    .unwrap();
    let limiter = storage.rate_limiter();
    let limit = RateLimit::builder()
        .requests(5)
        .burst(2)
        .period(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let name = RateLimit::name("http://api.example/v1", "gpt");
    // The burst of 2, then a wait: the budget is kept (and read back) in Redis.
    assert_eq!(
        limiter.try_acquire(&name, &limit, 0).unwrap(),
        Admission::Admitted
    );
    assert_eq!(
        limiter.try_acquire(&name, &limit, 0).unwrap(),
        Admission::Admitted
    );
    assert!(matches!(
        limiter.try_acquire(&name, &limit, 0).unwrap(),
        Admission::Wait { .. }
    ));
    check_acl_log(&mut server.conn());
}
