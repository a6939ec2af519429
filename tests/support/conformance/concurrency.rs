//! Many threads on one store: mixed operations end in the state a serial order gives.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Barrier, Mutex};

use serde_json::{json, Value};

use super::helpers::{keys_of, ok};
use super::{Open, Rng};

/// 32 threads of mixed operations, each checking reads of the ids it owns against its own
/// model, all racing on a shared id set; the final state matches the models.
pub fn concurrent_mixed_operations(open: Open) {
    const THREADS: usize = 32;
    const OWNED: usize = 12;
    const SHARED: usize = 6;
    const OPS: usize = 120;
    let store = open("concurrent");
    let shared_ids: Vec<String> = (0..SHARED).map(|k| format!("shared-{k}")).collect();
    // Every value written to a shared id is recorded here BEFORE it is written, so any value read
    // back must be in the set.
    let written_shared: Mutex<HashSet<String>> = Mutex::new(HashSet::new());
    let barrier = Barrier::new(THREADS);

    let models: Vec<BTreeMap<String, Value>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                let (shared_ids, written_shared, barrier) = (&shared_ids, &written_shared, &barrier);
                scope.spawn(move || {
                    let mut rng = Rng::new(1000 + t as u64);
                    let owned: Vec<String> = (0..OWNED).map(|i| format!("t{t}-{i}")).collect();
                    let mut model: BTreeMap<String, Value> = BTreeMap::new();
                    let mut seq = 0u64;
                    let check_shared = |v: &Value, id: &str| {
                        let key = serde_json::to_string(v).unwrap();
                        assert!(
                            written_shared.lock().unwrap().contains(&key),
                            "thread {t}: shared id {id} holds a value never written: {key}"
                        );
                    };
                    barrier.wait();
                    for op in 0..OPS {
                        let ctx = || format!("thread {t}, op {op}");
                        match rng.below(100) {
                            0..=29 => {
                                let n = 1 + rng.below(4);
                                let mut batch = Vec::new();
                                for _ in 0..n {
                                    let id = owned[rng.below(OWNED)].clone();
                                    seq += 1;
                                    let v = json!({"t": t, "id": id, "seq": seq, "pad": "p".repeat(rng.below(200))});
                                    model.insert(id.clone(), v.clone());
                                    batch.push((id, v));
                                }
                                ok(store.upsert(batch), &ctx());
                            }
                            30..=44 => {
                                let n = 1 + rng.below(3);
                                let mut del: Vec<String> = (0..n).map(|_| owned[rng.below(OWNED)].clone()).collect();
                                del.push(format!("t{t}-never-{op}"));
                                for id in &del {
                                    model.remove(id);
                                }
                                ok(store.delete_by_ids(&del), &ctx());
                            }
                            45..=64 => {
                                let id = &owned[rng.below(OWNED)];
                                let got = ok(store.get_by_id(id), &ctx());
                                assert_eq!(got.as_ref(), model.get(id), "{}: get_by_id({id})", ctx());
                            }
                            65..=79 => {
                                let n = 1 + rng.below(6);
                                let req: Vec<String> = (0..n).map(|_| owned[rng.below(OWNED)].clone()).collect();
                                let got = ok(store.get_by_ids(&req, None), &ctx());
                                let want: Vec<Option<Value>> = req.iter().map(|id| model.get(id).cloned()).collect();
                                assert_eq!(got, want, "{}: get_by_ids({req:?})", ctx());
                            }
                            80..=89 => {
                                let n = 1 + rng.below(6);
                                let req: Vec<String> = (0..n).map(|_| owned[rng.below(OWNED)].clone()).collect();
                                let got = ok(store.filter_keys(&req), &ctx());
                                let mut seen = HashSet::new();
                                let want: Vec<String> = req
                                    .iter()
                                    .filter(|id| !model.contains_key(*id) && seen.insert((*id).clone()))
                                    .cloned()
                                    .collect();
                                assert_eq!(got, want, "{}: filter_keys({req:?})", ctx());
                            }
                            _ => {
                                // Race on the shared ids: write some, read some back.
                                let mut batch = Vec::new();
                                for id in shared_ids.iter().filter(|_| rng.below(2) == 0) {
                                    seq += 1;
                                    let v = json!({"writer": t, "seq": seq, "id": id});
                                    written_shared.lock().unwrap().insert(serde_json::to_string(&v).unwrap());
                                    batch.push((id.clone(), v));
                                }
                                ok(store.upsert(batch), &ctx());
                                let got = ok(store.get_by_ids(shared_ids, None), &ctx());
                                for (id, v) in shared_ids.iter().zip(&got) {
                                    if let Some(v) = v {
                                        check_shared(v, id);
                                    }
                                }
                            }
                        }
                    }
                    // Every thread writes every shared id at least once.
                    let batch: Vec<(String, Value)> = shared_ids
                        .iter()
                        .map(|id| {
                            seq += 1;
                            let v = json!({"writer": t, "seq": seq, "id": id, "final": true});
                            written_shared.lock().unwrap().insert(serde_json::to_string(&v).unwrap());
                            (id.clone(), v)
                        })
                        .collect();
                    ok(store.upsert(batch), &format!("thread {t}: final shared upsert"));
                    model
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });

    // Final state: every owned id as its thread's model says; shared ids hold a written value.
    let mut expected_keys: BTreeSet<String> = shared_ids.iter().cloned().collect();
    for (t, model) in models.iter().enumerate() {
        let owned: Vec<String> = (0..OWNED).map(|i| format!("t{t}-{i}")).collect();
        let got = ok(store.get_by_ids(&owned, None), "final get_by_ids");
        for (id, got) in owned.iter().zip(got) {
            assert_eq!(got.as_ref(), model.get(id), "final value of {id}");
        }
        expected_keys.extend(model.keys().cloned());
    }
    let written = written_shared.lock().unwrap();
    for id in &shared_ids {
        let v = ok(store.get_by_id(id), "final get_by_id shared")
            .unwrap_or_else(|| panic!("shared id {id} missing at the end"));
        assert!(
            written.contains(&serde_json::to_string(&v).unwrap()),
            "shared id {id} holds {v}"
        );
        assert_eq!(
            v["id"],
            json!(id),
            "shared id {id} holds another id's value: {v}"
        );
    }
    let keys = keys_of(&*store);
    assert_eq!(
        keys,
        expected_keys.into_iter().collect::<Vec<_>>(),
        "final all_keys"
    );
    assert_eq!(ok(store.stats(), "final stats").keys, keys.len() as u64);
}
