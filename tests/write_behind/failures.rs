//! Backend failures: a full queue, flush deadlines, a Redis restart mid-stream, refused writes and
//! where they are reported, invalid ids, the environment switch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{Error, JsonDir, KvStore};
use serde_json::{json, Value};

use crate::helpers::{ids, redis_shared, tiny_batches, wb_json, RefusesBadIds, Shared};
use crate::support::RedisServer;

/// A stopped server: writers fill the queue, then get an error within the enqueue timeout and
/// their write is not taken; after a restart everything accepted arrives, and the refused write
/// does not.
#[test]
fn full_queue_times_out_and_refused_write_is_not_taken() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "full");
    let config = WriteBehindConfig::builder()
        .batch_items(4)
        .capacity(10)
        .max_delay(Duration::ZERO)
        .enqueue_timeout(Duration::from_millis(300))
        .flush_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    server.kill();
    // The flusher takes up to one batch (4) per batch in flight (4 by default) and retries
    // them; 10 more fill the queue.
    let mut accepted = Vec::new();
    let refused = loop {
        let id = format!("k{}", accepted.len());
        match wb.upsert(vec![(id.clone(), json!(accepted.len()))]) {
            Ok(()) => accepted.push(id),
            Err(e) => break (id, e),
        }
        assert!(accepted.len() <= 10 + 4 * 4, "the queue never filled");
    };
    let (refused_id, e) = refused;
    assert!(
        matches!(e, Error::Unavailable { .. }) && e.to_string().contains("not taken"),
        "{e}"
    );
    assert!(accepted.len() >= 10, "only {} accepted", accepted.len());
    let stats = wb.stats_snapshot();
    assert_eq!(stats.pending_ids, accepted.len() as u64, "{stats:?}");
    assert!(stats.queue_depth <= 10 && stats.retries > 0, "{stats:?}");
    // A call of several items is taken whole or not at all.
    assert!(wb
        .upsert(vec![("x1".into(), json!(1)), ("x2".into(), json!(2))])
        .is_err());

    server.restart();
    wb.flush().unwrap();
    let inner = wb.inner();
    let mut keys = inner.all_keys().unwrap();
    keys.sort();
    let mut want = accepted.clone();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(inner.get_by_id(&refused_id).unwrap(), None);
    assert_eq!(wb.get_by_id(&refused_id).unwrap(), None);
}

/// flush gives up at its deadline with the backend's retryable error while the flusher keeps
/// retrying; once the server is back, the same writes arrive.
#[test]
fn flush_returns_the_backend_error_past_its_deadline() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes"]);
    let shared = redis_shared(&server, "fl");
    let wb = WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::default(),
    );
    wb.upsert(vec![("before".into(), json!(0))]).unwrap();
    wb.flush().unwrap();
    server.stop();
    wb.upsert(vec![("during".into(), json!(1))]).unwrap();
    let e = wb.flush_timeout(Duration::from_millis(800)).unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(
        wb.get_by_id("during").unwrap(),
        Some(json!(1)),
        "still visible"
    );
    server.restart();
    wb.flush().unwrap();
    assert_eq!(wb.inner().get_by_id("during").unwrap(), Some(json!(1)));
    assert_eq!(wb.inner().get_by_id("before").unwrap(), Some(json!(0)));
    assert!(wb.stats_snapshot().retries > 0);
}

/// A Redis restart in the middle of a 100,000-write stream from several threads: every write
/// arrives. The server keeps its data across the graceful restart (append-only file), so what
/// was sent before the stop stays, and what was queued during the outage is retried.
#[test]
fn redis_restart_mid_stream_loses_nothing() {
    const TOTAL: usize = 100_000;
    const PRODUCERS: usize = 4;
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let shared = redis_shared(&server, "restart");
    let wb = WriteBehind::new(
        shared.namespace("ns").unwrap(),
        WriteBehindConfig::builder()
            .enqueue_timeout(Duration::from_secs(60))
            .flush_timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..PRODUCERS {
            let (wb, accepted) = (&wb, &accepted);
            scope.spawn(move || {
                for i in (t..TOTAL).step_by(PRODUCERS) {
                    wb.upsert(vec![(
                        format!("k{i}"),
                        json!({"i": i, "pad": "xxxxxxxxxxxxxxxx"}),
                    )])
                    .unwrap_or_else(|e| panic!("write {i}: {e}"));
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while accepted.load(Ordering::Relaxed) < TOTAL / 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        server.stop();
        std::thread::sleep(Duration::from_millis(300));
        server.restart();
    });
    wb.flush().unwrap();
    let stats = wb.stats_snapshot();
    assert!(stats.retries > 0, "the outage was never seen: {stats:?}");
    assert_eq!(stats.failed_writes, 0, "{stats:?}");
    let mut conn = server.conn();
    let n: usize = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, TOTAL);
    let all = ids(0..TOTAL, "k");
    let got = wb.inner().get_by_ids(&all, None).unwrap();
    for (i, v) in got.into_iter().enumerate() {
        assert_eq!(v.map(|v| v["i"].clone()), Some(json!(i)), "k{i}");
    }
}

/// A refused write does not block the queue: the rest of its batch is stored, the refused one
/// leaves the overlay, and the next flush (once) reports the error naming the key.
#[test]
fn refused_writes_are_dropped_and_reported_by_the_next_flush() {
    let server = RedisServer::start();
    let inner = RefusesBadIds(redis_shared(&server, "refuse").namespace("ns").unwrap());
    let wb = WriteBehind::new(
        inner,
        WriteBehindConfig::builder()
            .max_delay(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    wb.upsert(vec![
        ("good1".into(), json!(1)),
        ("bad1".into(), json!("huge")),
        ("good2".into(), json!(2)),
    ])
    .unwrap();
    wb.upsert(vec![("bad2".into(), json!("huge"))]).unwrap();
    assert_eq!(
        wb.get_by_id("bad1").unwrap(),
        Some(json!("huge")),
        "visible while queued"
    );
    let e = wb.index_done_callback().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 2, ids, source, .. }
            if ids == &["bad1", "bad2"]
                && matches!(&**source, Error::Encode { key, .. } if key == "bad1")),
        "{e:?}"
    );
    assert_eq!(wb.stats_snapshot().failed_writes, 2);
    // Reported once; the queue goes on.
    wb.upsert(vec![("good3".into(), json!(3))]).unwrap();
    wb.flush().unwrap();
    let mut keys = wb.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["good1", "good2", "good3"]);
    assert_eq!(wb.get_by_id("bad1").unwrap(), None);
    let mut inner_keys = wb.inner().all_keys().unwrap();
    inner_keys.sort();
    assert_eq!(inner_keys, keys);
}

/// `index_done_callback` whose flush reports a refused write still checkpoints the writes that
/// went through: on the JSON backend they are in the file afterwards.
#[test]
fn checkpoint_runs_even_when_the_flush_reports_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    let wb = WriteBehind::new(
        RefusesBadIds(json.namespace("ns").unwrap()),
        WriteBehindConfig::default(),
    );
    wb.upsert(vec![("good".into(), json!(1)), ("bad".into(), json!(2))])
        .unwrap();
    let e = wb.index_done_callback().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 1, source, .. }
            if matches!(&**source, Error::Encode { key, .. } if key == "bad")),
        "{e:?}"
    );
    let file = std::fs::read_to_string(dir.path().join("kv_store_ns.json")).unwrap();
    let saved: Value = serde_json::from_str(&file).unwrap();
    assert_eq!(saved, json!({"good": 1}));
}

/// A read-only JSON store refuses every write: each is reported, none blocks the queue.
#[test]
fn read_only_inner_store_errors_surface_at_flush() {
    let dir = tempfile::tempdir().unwrap();
    let ro = JsonDir::open_read_only(dir.path());
    let wb = WriteBehind::new(Shared(ro.namespace("ns").unwrap()), tiny_batches());
    for i in 0..10 {
        wb.upsert(vec![(format!("k{i}"), json!(i))]).unwrap();
    }
    let e = wb.flush().unwrap_err();
    assert!(
        matches!(&e, Error::WritesRefused { count: 10, ids, source, .. }
            if ids.len() == 5 && matches!(&**source, Error::ReadOnly { .. })),
        "{e:?}"
    );
    assert!(wb.flush().is_ok(), "reported once");
    assert_eq!(wb.all_keys().unwrap(), Vec::<String>::new());
    assert_eq!(wb.stats_snapshot().failed_writes, 10);
}

/// Ids are checked when the call is made, not later by the flusher.
#[test]
fn invalid_ids_are_refused_at_the_call() {
    let (_dir, open) = wb_json();
    let s = open("ns");
    assert!(matches!(
        s.upsert(vec![("ok".into(), json!(1)), (String::new(), json!(2))]),
        Err(Error::InvalidId { .. })
    ));
    assert_eq!(
        s.get_by_id("ok").unwrap(),
        None,
        "nothing of a refused call is taken"
    );
}

#[test]
fn config_from_vars_switches_it_on() {
    let vars = [("KV_WRITE_BEHIND", "1"), ("KV_WRITE_BEHIND_BATCH", "32")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let c = WriteBehindConfig::from_vars(&vars).unwrap().unwrap();
    assert_eq!(c.batch_items, 32);
}
