//! The callbacks and `stats`: checkpoints keep data, counts follow writes.

use serde_json::{json, Value};

use super::helpers::{assert_reads, ids, keys_of, ok};
use super::{Open, Rng};

/// index_start_callback and index_done_callback succeed and keep the data.
pub fn callbacks_keep_data(open: Open) {
    let store = open("callbacks");
    ok(
        store.index_start_callback(),
        "index_start_callback on empty",
    );
    ok(store.index_done_callback(), "index_done_callback on empty");
    assert_eq!(keys_of(&*store), Vec::<String>::new());

    ok(store.index_start_callback(), "index_start_callback");
    ok(
        store.upsert(vec![
            ("a".into(), json!({"v": 1})),
            ("b".into(), json!([2])),
        ]),
        "upsert",
    );
    ok(store.index_done_callback(), "index_done_callback");
    assert_eq!(ok(store.get_by_id("a"), "get_by_id"), Some(json!({"v": 1})));

    ok(
        store.upsert(vec![("c".into(), json!("three"))]),
        "upsert after done",
    );
    ok(store.delete_by_ids(&ids(&["b"])), "delete after done");
    ok(store.index_done_callback(), "index_done_callback again");
    ok(
        store.index_done_callback(),
        "index_done_callback twice in a row",
    );
    assert_reads(
        &*store,
        &[
            ("a".into(), Some(json!({"v": 1}))),
            ("b".into(), None),
            ("c".into(), Some(json!("three"))),
        ],
        "after callbacks",
    );
    assert_eq!(keys_of(&*store), ids(&["a", "c"]));
}

/// stats: key count, namespace, backend name, bytes.
pub fn stats_counts(open: Open) {
    let store = open("stats");
    let s = ok(store.stats(), "stats of empty");
    assert_eq!(s.namespace, store.namespace());
    assert_eq!(s.namespace, "stats");
    assert!(
        matches!(
            s.backend,
            graphrag_kv::BackendKind::Json | graphrag_kv::BackendKind::Redis
        ),
        "unknown backend {:?}",
        s.backend
    );
    assert_eq!(s.keys, 0);

    let mut rng = Rng::new(42);
    let mut items: Vec<(String, Value)> = (0..10)
        .map(|i| (format!("k{i}"), json!({"i": i})))
        .collect();
    items.push(("random".into(), json!(rng.text(100_000))));
    ok(store.upsert(items), "upsert");
    let s = ok(store.stats(), "stats");
    assert_eq!(s.namespace, "stats");
    assert_eq!(s.keys, 11);
    assert!(s.bytes > 0, "bytes must be > 0 with values stored: {s:?}");
    if !s.bytes_sampled {
        // 100 000 random letters compress little; whatever the encoding, most of it is stored.
        assert!(
            s.bytes >= 50_000,
            "bytes far below the stored values' size: {s:?}"
        );
    }

    ok(store.delete_by_ids(&ids(&["k0", "k1", "random"])), "delete");
    let after = ok(store.stats(), "stats after delete");
    assert_eq!(after.keys, 8);
    assert!(
        after.bytes > 0 && after.bytes < s.bytes,
        "bytes must drop after deletes: {s:?} -> {after:?}"
    );

    // Another namespace of the same backend is counted apart.
    let other = open("stats2");
    ok(other.upsert(vec![("x".into(), json!(1))]), "upsert other");
    assert_eq!(ok(other.stats(), "stats other").keys, 1);
    assert_eq!(ok(store.stats(), "stats").keys, 8);

    ok(store.clear(), "clear");
    assert_eq!(ok(store.stats(), "stats after clear").keys, 0);
    assert_eq!(ok(other.stats(), "stats other").keys, 1);
}
