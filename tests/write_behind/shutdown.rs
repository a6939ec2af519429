//! Shutdown: drop and `into_inner` send everything; past the deadline, close parks the unsent
//! writes in the store below, or reports them lost.

use std::time::Duration;

use graphrag_kv::write_behind::{UnsentWrite, WriteBehind, WriteBehindConfig};
use graphrag_kv::{JsonDir, KvStore};
use serde_json::json;

use crate::helpers::{redis_shared, Parks, Shared};
use crate::support::RedisServer;

/// Dropping the wrapper without a flush sends everything: the long delay means nothing would
/// have gone otherwise.
#[test]
fn drop_without_flush_sends_everything() {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "drop");
    let config = WriteBehindConfig::builder()
        .batch_items(100_000)
        .max_delay(Duration::from_secs(600))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    std::thread::scope(|scope| {
        for t in 0..4 {
            let wb = &wb;
            scope.spawn(move || {
                for i in 0..1250 {
                    wb.upsert(vec![(format!("{t}-{i}"), json!({"t": t, "i": i}))])
                        .unwrap();
                }
                wb.delete_by_ids(&[format!("{t}-0")]).unwrap();
            });
        }
    });
    assert_eq!(wb.stats_snapshot().batches_sent, 0, "sent before the drop");
    drop(wb);
    let mut conn = server.conn();
    let n: usize = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(n, 5000 - 4);
    let store = shared.namespace("ns").unwrap();
    assert_eq!(
        store.get_by_id("3-1249").unwrap(),
        Some(json!({"t": 3, "i": 1249}))
    );
    assert_eq!(store.get_by_id("2-0").unwrap(), None);
}

/// into_inner sends everything and gives the store back.
#[test]
fn into_inner_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    let config = WriteBehindConfig::builder()
        .max_delay(Duration::from_secs(600))
        .build()
        .unwrap();
    let wb = WriteBehind::new(Shared(json.namespace("ns").unwrap()), config);
    wb.upsert(vec![("k".into(), json!("v"))]).unwrap();
    let inner = wb.into_inner();
    assert_eq!(inner.get_by_id("k").unwrap(), Some(json!("v")));
}

/// With the backend down past the deadline, close parks the unsent writes in the store below,
/// in the order accepted, and reports it.
#[test]
fn close_with_backend_down_parks_unsent_writes_in_the_store_below() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "sink");
    let journal = Parks::new(shared.namespace("ns").unwrap());
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .flush_timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let wb = WriteBehind::new(journal.clone(), config);
    server.kill();
    wb.upsert(vec![("a".into(), json!(1)), ("b".into(), json!(2))])
        .unwrap();
    wb.delete_by_ids(&["a".into()]).unwrap();
    wb.upsert(vec![("c".into(), json!(3))]).unwrap();
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("parked in the store below"), "{e}");
    let got = journal.parked.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "a".into(),
                    value: json!(1)
                }
            ),
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "b".into(),
                    value: json!(2)
                }
            ),
            ("ns".to_string(), UnsentWrite::Delete { id: "a".into() }),
            (
                "ns".to_string(),
                UnsentWrite::Upsert {
                    id: "c".into(),
                    value: json!(3)
                }
            ),
        ]
    );
}

/// Over a store that cannot park writes (the default), close says how many writes are lost.
#[test]
fn close_with_backend_down_and_nowhere_to_park_reports_the_loss() {
    let mut server = RedisServer::start();
    let shared = redis_shared(&server, "lost");
    let config = WriteBehindConfig::builder()
        .flush_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let wb = WriteBehind::new(shared.namespace("ns").unwrap(), config);
    server.kill();
    wb.upsert((0..7).map(|i| (format!("k{i}"), json!(i))).collect())
        .unwrap();
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("7 writes are lost"), "{e}");
}
