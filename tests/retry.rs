//! The retry bound, counted by the server: one `upsert` of one item that the server keeps
//! refusing with a passing state causes at most the number of `SET`s docs/RELIABILITY.md
//! ("Retries") states, on a single server, under write-behind, and on a cluster. The counts
//! are the server's own (`INFO commandstats`: `calls` + `rejected_calls`), not the client's.

mod support;

use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{BackendKind, KvStore, RedisShared, StoreConfig};
use serde_json::json;
use support::{config_set, RedisServer};

/// REDIS_RETRIES of every store here: a failing command is sent RETRIES + 1 times.
const RETRIES: u32 = 3;

fn redis_shared(url: String, prefix: &str) -> Arc<RedisShared> {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url)
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(500))
        .socket_timeout(Duration::from_secs(5))
        .pool_timeout(Duration::from_secs(2))
        .retries(RETRIES)
        .max_connections(4)
        .build()
        .unwrap();
    RedisShared::connect(&config.redis).unwrap()
}

fn reset_stats(conn: &mut redis::Connection) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(conn)
        .unwrap();
}

/// `SET`s the server received since the last reset: executed plus rejected before execution
/// (NOREPLICAS, CLUSTERDOWN are rejections).
fn sets_received(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    let Some(line) = info.lines().find(|l| l.starts_with("cmdstat_set:")) else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map_or(0, |v| v.parse().unwrap())
    };
    field("calls") + field("rejected_calls")
}

/// Direct store: one failing upsert is sent exactly REDIS_RETRIES + 1 times.
#[test]
fn direct_store_sends_a_failing_write_retries_plus_one_times() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    let shared = redis_shared(server.url(), "rdirect");
    let store = shared.namespace("ns").unwrap();
    store.upsert(vec![("warm".into(), json!(1))]).unwrap();
    config_set(&mut admin, "min-replicas-to-write", "1");
    reset_stats(&mut admin);
    let err = store
        .upsert(vec![("a".into(), json!({"x": 1}))])
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let sent = sets_received(&mut admin);
    eprintln!("direct store: {sent} SETs for one failing upsert (REDIS_RETRIES={RETRIES})");
    assert_eq!(sent, u64::from(RETRIES) + 1, "{err}");
    assert_eq!(shared.retries_total(), u64::from(RETRIES));
}

/// Write-behind: each submission of the failing batch is one operation of RETRIES + 1 sends,
/// and submissions come at most once per resubmit interval until the close deadline.
#[test]
fn write_behind_submissions_are_bounded_per_deadline() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    let shared = redis_shared(server.url(), "rwb");
    let store = shared.namespace("ns").unwrap();
    store.upsert(vec![("warm".into(), json!(1))]).unwrap();
    let deadline = Duration::from_millis(2500);
    let wb = WriteBehind::new(
        store,
        WriteBehindConfig::builder()
            .flush_timeout(deadline)
            .build()
            .unwrap(),
    );
    config_set(&mut admin, "min-replicas-to-write", "1");
    reset_stats(&mut admin);
    wb.upsert(vec![("a".into(), json!({"x": 1}))]).unwrap();
    let err = wb.close().unwrap_err();
    let sent = sets_received(&mut admin);
    let per_submission = u64::from(RETRIES) + 1;
    let submissions = sent / per_submission;
    eprintln!(
        "write-behind: {sent} SETs for one failing write within a {deadline:?} close deadline \
         ({submissions} submissions; REDIS_RETRIES={RETRIES}): {err}"
    );
    // Every submission is whole: RETRIES + 1 sends.
    assert_eq!(sent % per_submission, 0, "{sent} SETs");
    let bound = graphrag_kv::retry::submissions_within(deadline);
    assert!(
        submissions <= bound,
        "{submissions} submissions ({sent} SETs) within {deadline:?}; the documented bound is \
         {bound} submissions of {per_submission} sends"
    );
    assert!(submissions >= 1);
}

/// Cluster: a write the cluster answers CLUSTERDOWN for (a state the cluster client retries
/// itself) is not retried again by the backend on top.
#[test]
fn cluster_sends_a_failing_write_a_bounded_number_of_times() {
    let cluster = support::cluster::RedisCluster::start_with(1, 0, &[]);
    let node = &cluster.nodes()[0];
    let mut admin = node.conn();
    let shared = redis_shared(cluster.url_list(), "rcl");
    assert_eq!(shared.mode(), graphrag_kv::RedisMode::Cluster);
    let store = shared.namespace("ns").unwrap();
    // Connections (and their slot maps) are made while every slot is served.
    store.upsert(vec![("warm".into(), json!(1))]).unwrap();
    // Without slot 0 the node's cluster state turns to fail: every keyed command is
    // answered CLUSTERDOWN, while the pooled connections still route to the node.
    let _: () = redis::cmd("CLUSTER")
        .arg("DELSLOTSRANGE")
        .arg(0)
        .arg(0)
        .query(&mut admin)
        .unwrap();
    let probe = redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query::<()>(&mut admin);
    let code = probe.err().and_then(|e| e.code().map(str::to_string));
    assert_eq!(code.as_deref(), Some("CLUSTERDOWN"));
    reset_stats(&mut admin);
    let err = store
        .upsert(vec![("a".into(), json!({"x": 1}))])
        .unwrap_err();
    let sent = sets_received(&mut admin);
    let bound = graphrag_kv::retry::cluster_sends_bound(RETRIES);
    eprintln!(
        "cluster: {sent} SETs for one failing upsert (REDIS_RETRIES={RETRIES}, bound {bound}): \
         {err}"
    );
    assert!(sent >= 2, "{sent} SETs: the cluster client did not retry");
    assert!(
        sent <= bound,
        "{sent} SETs; the documented bound is {bound}"
    );
}

/// Cluster, a state the cluster client does not retry (`NOREPLICAS`): the backend's policy
/// sends it exactly REDIS_RETRIES + 1 times.
#[test]
fn cluster_sends_a_refused_write_retries_plus_one_times() {
    let cluster = support::cluster::RedisCluster::start_with(1, 0, &[]);
    let mut admin = cluster.nodes()[0].conn();
    let shared = redis_shared(cluster.url_list(), "rcn");
    let store = shared.namespace("ns").unwrap();
    store.upsert(vec![("warm".into(), json!(1))]).unwrap();
    config_set(&mut admin, "min-replicas-to-write", "1");
    reset_stats(&mut admin);
    let err = store
        .upsert(vec![("a".into(), json!({"x": 1}))])
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let sent = sets_received(&mut admin);
    eprintln!("cluster NOREPLICAS: {sent} SETs for one failing upsert (REDIS_RETRIES={RETRIES})");
    assert_eq!(sent, u64::from(RETRIES) + 1, "{err}");
    assert_eq!(shared.retries_total(), u64::from(RETRIES));
}
