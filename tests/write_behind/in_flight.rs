//! Batches in flight: a scripted store holds, fails and refuses chosen batches; ids and
//! acknowledgements keep queue order, and a close hands off everything unsent in order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use graphrag_kv::write_behind::{UnsentWrite, WriteBehind, WriteBehindConfig};
use graphrag_kv::{Error, Item, KvStore, NamespaceStats};
use serde_json::{json, Value};

use crate::helpers::{redis_shared, Parks, RefusesBadIds};
use crate::support::RedisServer;

/// One write call as the store saw it: (id, value, or None for a delete).
type Call = Vec<(String, Option<Value>)>;

/// An in-memory store that records every write call, can hold the calls that write one id until
/// released, and can fail them: it puts batches in flight at chosen moments. It also checks,
/// on every call, that no other call in progress writes one of its ids.
#[derive(Default)]
struct Scripted {
    data: Mutex<BTreeMap<String, Value>>,
    /// Each write call as it began: (id, value, or None for a delete).
    calls: Mutex<Vec<Call>>,
    /// Ids of the calls in progress, and how often a call found one of its ids there.
    active: Mutex<Vec<String>>,
    overlaps: AtomicUsize,
    /// Write calls in progress, and the most seen at once.
    in_progress: AtomicUsize,
    peak: AtomicUsize,
    /// Calls writing this id wait until it is cleared.
    hold: Mutex<Option<String>>,
    released: Condvar,
    /// Calls writing this id fail (retryably) this many more times.
    fail: Mutex<Option<(String, usize)>>,
}

impl Scripted {
    fn hold(&self, id: &str) {
        *self.hold.lock().unwrap() = Some(id.to_string());
    }

    fn release(&self) {
        *self.hold.lock().unwrap() = None;
        self.released.notify_all();
    }

    /// Waits (up to a minute: an event, not a timing) until `f` holds for the recorded calls.
    fn wait_calls(&self, what: &str, f: impl Fn(&[Call]) -> bool) {
        for _ in 0..6000 {
            if f(&self.calls.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "never happened: {what}; calls: {:?}",
            self.calls.lock().unwrap()
        );
    }

    /// The values each id was written with, in the order the calls began.
    fn history(&self, id: &str) -> Vec<Option<Value>> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .flatten()
            .filter(|(i, _)| i == id)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn write(&self, writes: Call) -> graphrag_kv::Result<()> {
        let now = self.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        {
            let mut active = self.active.lock().unwrap();
            if writes.iter().any(|(id, _)| active.contains(id)) {
                self.overlaps.fetch_add(1, Ordering::SeqCst);
            }
            active.extend(writes.iter().map(|(id, _)| id.clone()));
        }
        self.calls.lock().unwrap().push(writes.clone());
        // Bounded, so that a test failing while it holds a write still ends (the store's drop
        // waits for the flusher).
        let held = self.hold.lock().unwrap();
        let (held, _) = self
            .released
            .wait_timeout_while(held, Duration::from_secs(30), |h| {
                h.as_ref()
                    .is_some_and(|h| writes.iter().any(|(id, _)| id == h))
            })
            .unwrap();
        drop(held);
        let result = {
            let mut fail = self.fail.lock().unwrap();
            match &mut *fail {
                Some((id, n)) if *n > 0 && writes.iter().any(|(i, _)| i == id) => {
                    *n -= 1;
                    Err(Error::Unavailable {
                        namespace: "scripted".into(),
                        reason: "scripted outage".into(),
                    })
                }
                _ => Ok(()),
            }
        };
        if result.is_ok() {
            let mut data = self.data.lock().unwrap();
            for (id, v) in &writes {
                match v {
                    Some(v) => data.insert(id.clone(), v.clone()),
                    None => data.remove(id),
                };
            }
        }
        let mut active = self.active.lock().unwrap();
        for (id, _) in &writes {
            if let Some(i) = active.iter().position(|a| a == id) {
                active.swap_remove(i);
            }
        }
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

impl KvStore for Scripted {
    fn namespace(&self) -> &str {
        "scripted"
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        Ok(self.data.lock().unwrap().keys().cloned().collect())
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        Ok(self.data.lock().unwrap().get(id).cloned())
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        _fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        let data = self.data.lock().unwrap();
        Ok(ids.iter().map(|id| data.get(id).cloned()).collect())
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        let data = self.data.lock().unwrap();
        Ok(ids
            .iter()
            .filter(|id| !data.contains_key(*id))
            .cloned()
            .collect())
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        self.write(items.into_iter().map(|(id, v)| (id, Some(v))).collect())
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.write(ids.iter().map(|id| (id.clone(), None)).collect())
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.data.lock().unwrap().clear();
        Ok(())
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        Ok(())
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        Ok(())
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        unimplemented!("not used")
    }
}

/// One write per batch, no lingering, `n` batches in flight.
fn one_per_batch(n: usize) -> WriteBehindConfig {
    WriteBehindConfig::builder()
        .batch_items(1)
        .max_delay(Duration::ZERO)
        .in_flight(n)
        .flush_timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// While a batch writing `a` is held, a batch of another id goes through, but it is not
/// acknowledged before the held one (acknowledgements follow queue order), and a newer write
/// of `a` is not sent until the held one is done (per-id order), although a third batch could
/// be in flight.
#[test]
fn a_held_batch_lets_others_through_but_keeps_id_and_ack_order() {
    let inner = Arc::new(Scripted::default());
    inner.hold("a");
    let wb = WriteBehind::new(inner.clone(), one_per_batch(3));
    wb.upsert(vec![("a".into(), json!(1))]).unwrap();
    inner.wait_calls("a=1 is held", |c| c.len() == 1);
    wb.upsert(vec![("b".into(), json!(1))]).unwrap();
    inner.wait_calls("b=1 went around the held batch", |c| c.len() == 2);
    wb.upsert(vec![("a".into(), json!(2))]).unwrap();
    wb.upsert(vec![("c".into(), json!(1))]).unwrap();
    // b is in the store, yet still pending: a's batch came first and is not done.
    inner.wait_calls("b=1 stored", |_| inner.get_by_id("b").unwrap().is_some());
    std::thread::sleep(Duration::from_millis(100));
    let stats = wb.stats_snapshot();
    assert_eq!(stats.pending_ids, 3, "{stats:?}");
    assert_eq!(
        inner.calls.lock().unwrap().len(),
        2,
        "a=2 must wait for a=1"
    );
    assert_eq!(wb.get_by_id("a").unwrap(), Some(json!(2)));
    assert!(wb.flush_timeout(Duration::from_millis(50)).is_err());

    inner.release();
    wb.flush().unwrap();
    assert_eq!(inner.history("a"), vec![Some(json!(1)), Some(json!(2))]);
    assert_eq!(inner.get_by_id("a").unwrap(), Some(json!(2)));
    assert_eq!(inner.get_by_id("c").unwrap(), Some(json!(1)));
    assert_eq!(wb.stats_snapshot().pending_ids, 0);
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
    wb.close().unwrap();
}

/// flush returns only once every batch in flight is done, the held one included.
#[test]
fn flush_waits_for_every_batch_in_flight() {
    let inner = Arc::new(Scripted::default());
    inner.hold("slow");
    let wb = Arc::new(WriteBehind::new(inner.clone(), one_per_batch(3)));
    wb.upsert(vec![("slow".into(), json!(1))]).unwrap();
    wb.upsert(vec![("fast".into(), json!(1))]).unwrap();
    inner.wait_calls("both in flight", |c| c.len() == 2);
    let flushed = Arc::new(AtomicUsize::new(0));
    let flusher = {
        let (wb, flushed) = (wb.clone(), flushed.clone());
        std::thread::spawn(move || {
            let r = wb.flush();
            flushed.store(1, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(flushed.load(Ordering::SeqCst), 0, "flush returned early");
    inner.release();
    flusher.join().unwrap().unwrap();
    assert_eq!(inner.get_by_id("slow").unwrap(), Some(json!(1)));
    assert_eq!(inner.get_by_id("fast").unwrap(), Some(json!(1)));
}

/// A batch that keeps failing is retried while others go through; a newer write of its id
/// waits, and lands after it.
#[test]
fn a_failing_batch_retries_while_others_go_through_in_order() {
    let inner = Arc::new(Scripted::default());
    *inner.fail.lock().unwrap() = Some(("a".into(), 4));
    let wb = WriteBehind::new(inner.clone(), one_per_batch(3));
    wb.upsert(vec![("a".into(), json!(1))]).unwrap();
    wb.upsert(vec![("b".into(), json!(1))]).unwrap();
    wb.upsert(vec![("a".into(), json!(2))]).unwrap();
    wb.delete_by_ids(&["b".into()]).unwrap();
    wb.upsert(vec![("a".into(), json!(3))]).unwrap();
    wb.flush().unwrap();
    let history = inner.history("a");
    assert_eq!(
        history,
        vec![
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(1)),
            Some(json!(2)),
            Some(json!(3))
        ]
    );
    assert_eq!(inner.history("b"), vec![Some(json!(1)), None]);
    assert_eq!(inner.get_by_id("a").unwrap(), Some(json!(3)));
    assert_eq!(inner.get_by_id("b").unwrap(), None);
    let stats = wb.stats_snapshot();
    assert_eq!((stats.retries, stats.pending_ids), (4, 0), "{stats:?}");
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
}

/// A refusal in one batch in flight drops only its write; the others, before and after it,
/// arrive, and the next flush reports it.
#[test]
fn a_refusal_in_one_batch_in_flight_drops_only_that_write() {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "refused-in-flight");
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .max_delay(Duration::ZERO)
        .in_flight(3)
        .build()
        .unwrap();
    let wb = WriteBehind::new(RefusesBadIds(shared.namespace("ns").unwrap()), config);
    for i in 0..40 {
        let id = if i % 7 == 3 {
            format!("bad-{i}")
        } else {
            format!("k{}", i % 5)
        };
        wb.upsert(vec![(id, json!(i))]).unwrap();
    }
    let e = wb.flush().unwrap_err();
    assert!(e.to_string().contains("value too large"), "{e}");
    wb.flush().unwrap();
    for k in 0..5 {
        let last = (0..40).filter(|i| i % 7 != 3 && i % 5 == k).max().unwrap();
        assert_eq!(
            wb.inner().get_by_id(&format!("k{k}")).unwrap(),
            Some(json!(last)),
            "k{k}"
        );
    }
    let stats = wb.stats_snapshot();
    assert_eq!(
        (stats.failed_writes, stats.pending_ids),
        (6, 0),
        "{stats:?}"
    );
}

/// Many writers hammering a few ids with several batches in flight: no two calls in progress
/// ever share an id, and each id ends with its last write.
#[test]
fn hot_ids_are_never_in_two_batches_in_flight() {
    const THREADS: usize = 4;
    const WRITES: usize = 2000;
    let inner = Arc::new(Scripted::default());
    let config = WriteBehindConfig::builder()
        .batch_items(3)
        .capacity(32)
        .max_delay(Duration::ZERO)
        .in_flight(4)
        .build()
        .unwrap();
    let wb = WriteBehind::new(inner.clone(), config);
    // A write of an id no one writes again is parked in the store until another batch has been
    // sent past it: batches are then provably in flight together, not one after another.
    inner.hold("parked");
    wb.upsert(vec![("parked".into(), json!(0))]).unwrap();
    // In flight alone (a batch holding writers' ids would stop the queue at their next write).
    inner.wait_calls("the parked batch sent", |calls| {
        calls.iter().any(|c| c.iter().any(|(id, _)| id == "parked"))
    });
    std::thread::scope(|s| {
        s.spawn(|| {
            inner.wait_calls("a batch sent while the parked one waits", |calls| {
                calls
                    .iter()
                    .position(|c| c.iter().any(|(id, _)| id == "parked"))
                    .is_some_and(|p| !calls[p + 1..].is_empty())
            });
            inner.release();
        });
        for t in 0..THREADS {
            let wb = &wb;
            s.spawn(move || {
                for i in 0..WRITES {
                    // hot-{t}: only this thread writes it, so its last value is known.
                    let id = if i % 2 == 0 {
                        format!("hot-{t}")
                    } else {
                        format!("cold-{t}-{}", i % 50)
                    };
                    wb.upsert(vec![(id, json!(i))]).unwrap();
                }
            });
        }
    });
    wb.flush().unwrap();
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
    assert!(
        inner.peak.load(Ordering::SeqCst) >= 2,
        "never two batches in flight"
    );
    for t in 0..THREADS {
        assert_eq!(
            inner.get_by_id(&format!("hot-{t}")).unwrap(),
            Some(json!(WRITES - 2))
        );
        // Every value of an id arrives in the order written (a batch may skip superseded ones).
        let seen: Vec<u64> = inner
            .history(&format!("hot-{t}"))
            .into_iter()
            .map(|v| v.unwrap().as_u64().unwrap())
            .collect();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "hot-{t}: {seen:?}");
    }
    assert_eq!(wb.stats_snapshot().pending_ids, 0);
}

/// Shutdown with the backend failing and several batches in flight: everything accepted and
/// not stored is parked in the store below, in the order accepted, and store plus parked
/// writes replayed give the state the writers expected.
#[test]
fn close_with_batches_in_flight_hands_off_everything_unsent_in_order() {
    let inner = Arc::new(Scripted::default());
    // Batches writing "x" fail until the deadline; the others get through.
    *inner.fail.lock().unwrap() = Some(("x".into(), usize::MAX));
    let journal = Parks::new(inner.clone());
    let config = WriteBehindConfig::builder()
        .batch_items(2)
        .max_delay(Duration::ZERO)
        .in_flight(3)
        .flush_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let wb = WriteBehind::new(journal.clone(), config);
    let mut expected = BTreeMap::new();
    let mut accepted = Vec::new();
    for i in 0..30u64 {
        let id = match i % 4 {
            0 => "x".to_string(),
            1 => format!("y{}", i % 3),
            _ => format!("z{i}"),
        };
        if i % 9 == 8 {
            wb.delete_by_ids(std::slice::from_ref(&id)).unwrap();
            expected.remove(&id);
            accepted.push((id, None));
        } else {
            wb.upsert(vec![(id.clone(), json!(i))]).unwrap();
            expected.insert(id.clone(), json!(i));
            accepted.push((id, Some(json!(i))));
        }
    }
    let e = wb.close().unwrap_err();
    assert!(e.to_string().contains("parked in the store below"), "{e}");
    let unsent: Vec<(String, Option<Value>)> = journal
        .parked
        .lock()
        .unwrap()
        .iter()
        .map(|(_, w)| match w {
            UnsentWrite::Upsert { id, value } => (id.clone(), Some(value.clone())),
            UnsentWrite::Delete { id } => (id.clone(), None),
            other => panic!("an unsent write of a kind this test does not make: {other:?}"),
        })
        .collect();
    // The first write of x never got through, so it and everything after it is unsent...
    assert_eq!(unsent.first(), accepted.first());
    // ...in the order accepted: the unsent writes are a subsequence of the accepted ones.
    let mut rest = accepted.iter();
    for w in &unsent {
        assert!(rest.any(|a| a == w), "{w:?} out of order in {unsent:?}");
    }
    // Replaying the parked writes over the store gives what the writers expected.
    let mut state = inner.data.lock().unwrap().clone();
    for (id, v) in unsent {
        match v {
            Some(v) => state.insert(id, v),
            None => state.remove(&id),
        };
    }
    assert_eq!(state, expected);
    assert_eq!(inner.overlaps.load(Ordering::SeqCst), 0);
}

#[test]
fn in_flight_is_read_and_checked() {
    let vars = |v: &str| {
        [
            ("KV_WRITE_BEHIND", "true"),
            ("KV_WRITE_BEHIND_IN_FLIGHT", v),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<std::collections::HashMap<_, _>>()
    };
    let c = WriteBehindConfig::from_vars(&vars("5")).unwrap().unwrap();
    assert_eq!(c.in_flight, 5);
    assert_eq!(WriteBehindConfig::default().in_flight, 4);
    for bad in ["0", "65", "two"] {
        let e = WriteBehindConfig::from_vars(&vars(bad)).unwrap_err();
        assert!(
            e.to_string().contains("KV_WRITE_BEHIND_IN_FLIGHT"),
            "{bad}: {e}"
        );
    }
    let e = WriteBehindConfig::builder()
        .in_flight(100)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("KV_WRITE_BEHIND_IN_FLIGHT"), "{e}");
}
