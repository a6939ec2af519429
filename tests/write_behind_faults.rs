//! Write-behind against a real server in a temporary state: writes the server turns away for a
//! while (`NOREPLICAS`, `MISCONF`) are retried until it takes them, a write it refuses for good
//! is reported to the thread that wrote it, and reads answered `BUSY` are retried.

mod support;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{BackendKind, Error, KvStore, RedisShared, StoreConfig};
use serde_json::{json, Value};
use support::{config_set, RedisServer};

/// Redis with short timeouts and `retries` retries of its own.
fn redis_shared(url: String, prefix: &str, retries: u32) -> Arc<RedisShared> {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url)
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(500))
        .socket_timeout(Duration::from_secs(5))
        .pool_timeout(Duration::from_secs(2))
        .retries(retries)
        .max_connections(8)
        .build()
        .unwrap();
    RedisShared::connect(&config.redis).unwrap()
}

/// The error code a plain SET gets from the server now (`None` when it succeeds).
fn set_error_code(conn: &mut redis::Connection) -> Option<String> {
    redis::cmd("SET")
        .arg("probe")
        .arg("1")
        .query::<()>(conn)
        .err()
        .map(|e| e.code().unwrap_or("<no code>").to_string())
}

fn items(n: usize) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| {
            (
                format!("doc-{i}"),
                json!({"i": i, "content": format!("text {i}")}),
            )
        })
        .collect()
}

/// Writes `n` items through `wb` while the server refuses writes with `code`, checks that they
/// are kept and retried (not dropped), then lifts the condition with `clear` and checks that
/// the next flush stores every one of them.
fn retried_until_the_condition_clears(
    wb: &WriteBehind<graphrag_kv::RedisStore>,
    admin: &mut redis::Connection,
    code: &str,
    clear: impl FnOnce(&mut redis::Connection),
) {
    let n = 40;
    for (id, v) in items(n) {
        wb.upsert(vec![(id, v)]).unwrap();
    }
    // Long enough for the old behaviour (drop at the first refusal) to show, well within the
    // flush deadline.
    let e = wb
        .flush_timeout(Duration::from_millis(800))
        .expect_err("the server refuses writes: the flush cannot complete yet");
    assert!(
        e.is_retryable(),
        "a {code} reply must be retried, not reported as a refusal: {e}"
    );
    assert_eq!(
        wb.stats_snapshot().failed_writes,
        0,
        "nothing dropped while the server answers {code}"
    );
    assert!(wb.stats_snapshot().retries > 0);
    assert_eq!(
        wb.get_by_id("doc-7").unwrap(),
        Some(json!({"i": 7, "content": "text 7"})),
        "still visible while retried"
    );
    clear(admin);
    assert_eq!(set_error_code(admin), None, "the condition was lifted");
    wb.flush().unwrap();
    let stored = wb
        .inner()
        .get_by_ids(
            &items(n).into_iter().map(|(id, _)| id).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
    for ((id, want), got) in items(n).into_iter().zip(stored) {
        assert_eq!(got, Some(want), "{id} reached the server");
    }
    assert_eq!(wb.stats_snapshot().failed_writes, 0);
}

fn write_behind(shared: &Arc<RedisShared>) -> WriteBehind<graphrag_kv::RedisStore> {
    WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::builder()
            .batch_items(8)
            .max_delay(Duration::ZERO)
            .flush_timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
    )
}

/// `min-replicas-to-write 1` with no replica: every write gets `NOREPLICAS` until it is lifted.
#[test]
fn noreplicas_writes_are_retried_until_the_server_takes_them() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    let shared = redis_shared(server.url(), "norep", 0);
    let wb = write_behind(&shared);
    config_set(&mut admin, "min-replicas-to-write", "1");
    assert_eq!(set_error_code(&mut admin).as_deref(), Some("NOREPLICAS"));
    retried_until_the_condition_clears(&wb, &mut admin, "NOREPLICAS", |admin| {
        config_set(admin, "min-replicas-to-write", "0")
    });
    wb.close().unwrap();
}

fn persistence_info(conn: &mut redis::Connection) -> String {
    redis::cmd("INFO").arg("persistence").query(conn).unwrap()
}

/// Runs BGSAVE and waits for it to end; returns whether it succeeded.
fn bgsave(conn: &mut redis::Connection) -> bool {
    let _: String = redis::cmd("BGSAVE").query(conn).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = persistence_info(conn);
        if info.contains("rdb_bgsave_in_progress:0") {
            return info.contains("rdb_last_bgsave_status:ok");
        }
        assert!(Instant::now() < deadline, "BGSAVE did not end: {info}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// `stop-writes-on-bgsave-error yes` (the default) and a BGSAVE that failed because the
/// server's directory is gone: every write gets `MISCONF` until a BGSAVE succeeds again.
#[test]
fn misconf_writes_are_retried_until_the_server_takes_them() {
    // Writes are refused after a failed BGSAVE only when save points are configured; `dir`
    // can be changed at run time only with protected configs enabled.
    let server = RedisServer::start_with(&[
        "--save",
        "3600 1",
        "--stop-writes-on-bgsave-error",
        "yes",
        "--enable-protected-configs",
        "yes",
    ]);
    let mut admin = server.conn();
    // Connected first: PING answers MISCONF too, so a connect check would fail.
    let shared = redis_shared(server.url(), "misconf", 0);
    let wb = write_behind(&shared);
    let rdb_dir = server.dir().join("rdb");
    std::fs::create_dir(&rdb_dir).unwrap();
    config_set(&mut admin, "dir", rdb_dir.to_str().unwrap());
    std::fs::remove_dir(&rdb_dir).unwrap();
    assert!(!bgsave(&mut admin), "BGSAVE into a removed directory fails");
    assert_eq!(set_error_code(&mut admin).as_deref(), Some("MISCONF"));
    retried_until_the_condition_clears(&wb, &mut admin, "MISCONF", |admin| {
        std::fs::create_dir(&rdb_dir).unwrap();
        // The server's working directory is the removed one: point it at the new one.
        config_set(admin, "dir", rdb_dir.to_str().unwrap());
        assert!(bgsave(admin), "BGSAVE succeeds again");
    });
    wb.close().unwrap();
}

/// A user that may write only `wb:ns:good*` keys: a write of any other id is refused for good
/// (`NOPERM`), one key at a time, by the real server.
fn restricted_user(server: &RedisServer) -> String {
    let mut admin = server.conn();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("writer")
        .arg("reset")
        .arg("on")
        .arg(">writer-pw")
        .arg("~wb:ns:good*")
        .arg("+@all")
        .query::<()>(&mut admin)
        .unwrap();
    format!("redis://writer:writer-pw@127.0.0.1:{}", server.port())
}

/// Two threads write through one queue; the server refuses some of thread A's writes. Thread
/// B's flush is not A's business and succeeds; A's own next flush (or `index_done_callback`)
/// reports its refused ids and their count.
#[test]
fn a_refusal_is_reported_to_the_thread_that_wrote_it() {
    let server = RedisServer::start();
    let shared = redis_shared(restricted_user(&server), "wb", 0);
    let wb = Arc::new(WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::builder()
            .max_delay(Duration::from_millis(50))
            .build()
            .unwrap(),
    ));
    let written = Arc::new(Barrier::new(2));
    let b_flushed = Arc::new(Barrier::new(2));
    let a = {
        let (wb, written, b_flushed) = (wb.clone(), written.clone(), b_flushed.clone());
        thread::spawn(move || {
            let mut batch = vec![("good-a".to_string(), json!("a"))];
            for i in 0..7 {
                batch.push((format!("bad-{i}"), json!(i)));
            }
            wb.upsert(batch).unwrap();
            written.wait();
            b_flushed.wait();
            let first = wb.index_done_callback();
            let second = wb.flush();
            (first, second)
        })
    };
    wb.upsert(vec![("good-b".into(), json!("b"))]).unwrap();
    written.wait();
    // B flushes first: before, the refusal went to whoever flushed next.
    let b_result = wb.flush();
    let b_second = wb.index_done_callback();
    b_flushed.wait();
    let (a_first, a_second) = a.join().unwrap();
    assert!(
        b_result.is_ok() && b_second.is_ok(),
        "thread B wrote nothing refused: {b_result:?} {b_second:?}"
    );
    let e = a_first.expect_err("thread A's refused writes are reported to thread A");
    assert!(!e.is_retryable(), "{e}");
    match &e {
        Error::WritesRefused {
            namespace,
            count,
            ids,
            source,
        } => {
            assert_eq!(namespace, "ns");
            assert_eq!(*count, 7);
            assert!(
                !ids.is_empty() && ids.len() <= 5,
                "the first few ids: {ids:?}"
            );
            for id in ids {
                assert!(id.starts_with("bad-"), "{ids:?}");
            }
            assert!(source.is_permission_denied(), "{source}");
        }
        other => panic!("expected WritesRefused, got {other:?}"),
    }
    let text = e.to_string();
    assert!(text.contains("7") && text.contains("\"bad-0\""), "{text}");
    assert!(a_second.is_ok(), "reported once: {a_second:?}");
    assert_eq!(wb.stats_snapshot().failed_writes, 7);
    let mut keys = wb.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["good-a", "good-b"]);
}

/// MGET answered `BUSY` (a script runs past `busy-reply-threshold`) is retried like a
/// connection error, and `get_by_ids` returns the values once the script is killed.
#[test]
fn mget_answered_busy_is_retried() {
    let server = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let shared = redis_shared(server.url(), "busy", 12);
    let store = shared.namespace("ns").unwrap();
    let all = items(20);
    store.upsert(all.clone()).unwrap();
    let ids: Vec<String> = all.iter().map(|(id, _)| id.clone()).collect();

    let script = {
        let mut conn = server.conn();
        thread::spawn(move || {
            // Ends with an error when SCRIPT KILL stops it.
            let _ = redis::cmd("EVAL")
                .arg("local i = 0 while true do i = i + 1 end")
                .arg(0)
                .query::<()>(&mut conn);
        })
    };
    let mut probe = server.conn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match redis::cmd("PING").query::<String>(&mut probe) {
            Err(e) if e.code() == Some("BUSY") => break,
            other => {
                assert!(Instant::now() < deadline, "no BUSY reply: {other:?}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let killer = {
        let mut conn = server.conn();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(400));
            redis::cmd("SCRIPT").arg("KILL").query::<()>(&mut conn)
        })
    };
    let got = store.get_by_ids(&ids, None);
    killer.join().unwrap().unwrap();
    script.join().unwrap();
    let got = got.expect("MGET answered BUSY is retried until the script is gone");
    for ((id, want), got) in all.into_iter().zip(got) {
        assert_eq!(got, Some(want), "{id}");
    }
}

/// `maxmemory` reached with `noeviction`: a write answered `OOM` is retried a few times, then
/// dropped as refused and reported (the server may stay full for good: the queue must not
/// stall on it until the flush deadline).
#[test]
fn oom_is_retried_a_few_times_then_reported_as_refused() {
    let server = RedisServer::start();
    let mut admin = server.conn();
    let shared = redis_shared(server.url(), "oom", 0);
    let wb = write_behind(&shared);
    config_set(&mut admin, "maxmemory-policy", "noeviction");
    config_set(&mut admin, "maxmemory", "1");
    assert_eq!(set_error_code(&mut admin).as_deref(), Some("OOM"));
    // Batches of 8: each batch is retried, then its writes are tried once each (not retried
    // again one by one, which would stall the queue for as many times as it has writes).
    wb.upsert(items(20)).unwrap();
    let e = wb.flush().expect_err("refused");
    match &e {
        Error::WritesRefused {
            count, ids, source, ..
        } => {
            assert_eq!((*count, ids.len()), (20, 5));
            assert!(source.is_out_of_memory(), "{source}");
        }
        other => panic!("expected WritesRefused, got {other:?}"),
    }
    let stats = wb.stats_snapshot();
    assert_eq!(stats.failed_writes, 20);
    assert!(stats.retries >= 8, "retried first: {stats:?}");
    config_set(&mut admin, "maxmemory", "0");
    wb.upsert(vec![("doc-1".into(), json!("y"))]).unwrap();
    wb.flush().unwrap();
    assert_eq!(wb.inner().get_by_id("doc-1").unwrap(), Some(json!("y")));
}

/// The same on a cluster, whose upsert path reports each key's error itself: a one-master
/// cluster with `min-replicas-to-write 1` answers `NOREPLICAS` per SET, and the key's error
/// keeps that code, so the writes are retried until it is lifted.
#[test]
fn cluster_noreplicas_writes_are_retried_until_the_server_takes_them() {
    let cluster = support::cluster::RedisCluster::start_with(1, 0, &[]);
    let node = &cluster.nodes()[0];
    let mut admin = node.conn();
    let shared = redis_shared(cluster.url_list(), "cnorep", 0);
    assert_eq!(shared.mode(), graphrag_kv::RedisMode::Cluster);
    let wb = write_behind(&shared);
    config_set(&mut admin, "min-replicas-to-write", "1");
    retried_until_the_condition_clears(&wb, &mut admin, "NOREPLICAS", |admin| {
        config_set(admin, "min-replicas-to-write", "0")
    });
    wb.close().unwrap();
}

/// A worker that ended without flushing does not take its refusals with it: the next flush of
/// any thread (here the main thread's `index_done_callback`) reports them.
#[test]
fn refusals_of_an_ended_thread_go_to_the_next_flush() {
    let server = RedisServer::start();
    let shared = redis_shared(restricted_user(&server), "wb", 0);
    let wb = Arc::new(WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::default(),
    ));
    let worker = {
        let wb = wb.clone();
        thread::spawn(move || {
            wb.upsert(vec![
                ("good-w".into(), json!(1)),
                ("bad-w".into(), json!(2)),
            ])
            .unwrap();
        })
    };
    worker.join().unwrap();
    let e = wb.index_done_callback().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 1, ids, .. } if ids == &["bad-w"]),
        "{e:?}"
    );
    wb.flush().unwrap();
    assert_eq!(wb.get_by_id("good-w").unwrap(), Some(json!(1)));
}
