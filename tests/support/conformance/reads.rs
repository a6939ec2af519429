//! Reads and writes of whole batches: every read after an upsert, empty batches, repeated ids, `filter_keys`, field projection.

use serde_json::{json, Value};

use super::helpers::{ids, keys_of, ok};
use super::Open;

/// upsert, then every read: get_by_id, get_by_ids (order, missing, repeats), filter_keys, all_keys.
pub fn upsert_then_read(open: Open) {
    let store = open("basic");
    assert_eq!(store.namespace(), "basic");
    assert_eq!(
        keys_of(&*store),
        Vec::<String>::new(),
        "a fresh backend must be empty"
    );
    assert_eq!(ok(store.get_by_id("a"), "get_by_id on empty"), None);

    let va = json!({"content": "alpha", "n": 1});
    let vb = json!({"content": "beta", "list": [1, 2, 3]});
    let vc = json!("just a string");
    ok(
        store.upsert(vec![
            ("a".into(), va.clone()),
            ("b".into(), vb.clone()),
            ("c".into(), vc.clone()),
        ]),
        "upsert",
    );

    assert_eq!(ok(store.get_by_id("a"), "get_by_id"), Some(va.clone()));
    assert_eq!(ok(store.get_by_id("b"), "get_by_id"), Some(vb.clone()));
    assert_eq!(ok(store.get_by_id("c"), "get_by_id"), Some(vc.clone()));
    assert_eq!(ok(store.get_by_id("zz"), "get_by_id missing"), None);
    assert_eq!(
        ok(store.get_by_id("A"), "get_by_id is case-sensitive"),
        None
    );

    let got = ok(
        store.get_by_ids(&ids(&["c", "zz", "a", "c", "b", "zz"]), None),
        "get_by_ids",
    );
    assert_eq!(
        got,
        vec![
            Some(vc.clone()),
            None,
            Some(va.clone()),
            Some(vc.clone()),
            Some(vb.clone()),
            None
        ],
        "get_by_ids keeps request order, None for missing, repeats for repeated ids"
    );
    assert_eq!(
        ok(store.get_by_ids(&ids(&["b"]), None), "get_by_ids one"),
        vec![Some(vb)]
    );

    assert_eq!(
        ok(
            store.filter_keys(&ids(&["a", "zz", "b", "yy"])),
            "filter_keys"
        ),
        ids(&["zz", "yy"])
    );
    assert_eq!(
        ok(
            store.filter_keys(&ids(&["a", "b", "c"])),
            "filter_keys all present"
        ),
        Vec::<String>::new()
    );
    assert_eq!(keys_of(&*store), ids(&["a", "b", "c"]));

    // A second batch adds to the first.
    ok(store.upsert(vec![("d".into(), json!(4))]), "second upsert");
    assert_eq!(keys_of(&*store), ids(&["a", "b", "c", "d"]));
    assert_eq!(
        ok(store.get_by_id("a"), "get_by_id after second batch"),
        Some(va)
    );
}

/// Empty batches are valid no-ops.
pub fn empty_batches(open: Open) {
    let store = open("empty");
    assert_eq!(
        ok(store.get_by_ids(&[], None), "get_by_ids([]) on empty"),
        Vec::<Option<Value>>::new()
    );
    assert_eq!(
        ok(store.filter_keys(&[]), "filter_keys([]) on empty"),
        Vec::<String>::new()
    );
    ok(store.upsert(vec![]), "upsert([]) on empty");
    ok(store.delete_by_ids(&[]), "delete_by_ids([]) on empty");
    assert_eq!(keys_of(&*store), Vec::<String>::new());

    ok(store.upsert(vec![("x".into(), json!({"x": 1}))]), "upsert");
    assert_eq!(
        ok(store.get_by_ids(&[], None), "get_by_ids([])"),
        Vec::<Option<Value>>::new()
    );
    let no_fields: &[String] = &[];
    assert_eq!(
        ok(
            store.get_by_ids(&[], Some(no_fields)),
            "get_by_ids([], Some([]))"
        ),
        Vec::<Option<Value>>::new()
    );
    assert_eq!(
        ok(store.filter_keys(&[]), "filter_keys([])"),
        Vec::<String>::new()
    );
    ok(store.upsert(vec![]), "upsert([])");
    ok(store.delete_by_ids(&[]), "delete_by_ids([])");
    assert_eq!(
        keys_of(&*store),
        ids(&["x"]),
        "empty batches must not change anything"
    );
    assert_eq!(ok(store.get_by_id("x"), "get_by_id"), Some(json!({"x": 1})));
}

/// The same id twice in one upsert batch: the last value wins.
pub fn duplicate_id_in_batch_last_wins(open: Open) {
    let store = open("dups");
    ok(
        store.upsert(vec![
            ("k".into(), json!({"v": 1, "only_first": true})),
            ("other".into(), json!("o")),
            ("k".into(), json!({"v": 2})),
            ("k".into(), json!({"v": 3, "final": true})),
        ]),
        "upsert with a repeated id",
    );
    assert_eq!(
        ok(store.get_by_id("k"), "get_by_id"),
        Some(json!({"v": 3, "final": true}))
    );
    assert_eq!(ok(store.get_by_id("other"), "get_by_id"), Some(json!("o")));
    assert_eq!(keys_of(&*store), ids(&["k", "other"]));
    assert_eq!(ok(store.stats(), "stats").keys, 2);

    // And the last one wins over a value stored by an earlier batch.
    ok(
        store.upsert(vec![("other".into(), json!(1)), ("other".into(), json!(2))]),
        "upsert",
    );
    assert_eq!(ok(store.get_by_id("other"), "get_by_id"), Some(json!(2)));

    // The borrowed form stores the same thing (the write-behind queue sends through it).
    let (v1, v2, v3) = (json!({"r": 1}), json!({"r": 2}), json!(["x"]));
    ok(
        store.upsert_refs(&[("r", &v1), ("other", &v3), ("r", &v2)]),
        "upsert_refs with a repeated id",
    );
    assert_eq!(ok(store.get_by_id("r"), "get_by_id"), Some(v2));
    assert_eq!(ok(store.get_by_id("other"), "get_by_id"), Some(v3));
    assert_eq!(keys_of(&*store), ids(&["k", "other", "r"]));
    ok(store.upsert_refs(&[]), "upsert_refs([])");
    assert!(
        store.upsert_refs(&[("ok", &v1), ("", &v1)]).is_err(),
        "upsert_refs must refuse an empty id"
    );
    assert_eq!(
        ok(store.get_by_id("ok"), "get_by_id"),
        None,
        "nothing of a refused upsert_refs batch is written"
    );
}

/// filter_keys returns each missing id once, in the order of first request.
pub fn filter_keys_missing_once_in_order(open: Open) {
    let store = open("filter");
    ok(
        store.upsert(vec![("a".into(), json!(1)), ("b".into(), json!(2))]),
        "upsert",
    );
    assert_eq!(
        ok(
            store.filter_keys(&ids(&["x", "a", "y", "x", "b", "y", "z", "a", "x"])),
            "filter_keys"
        ),
        ids(&["x", "y", "z"])
    );
    assert_eq!(
        ok(
            store.filter_keys(&ids(&["q", "p", "o"])),
            "filter_keys none present"
        ),
        ids(&["q", "p", "o"])
    );
    assert_eq!(
        ok(
            store.filter_keys(&ids(&["b", "a", "b"])),
            "filter_keys all present"
        ),
        Vec::<String>::new()
    );
    // Many ids in one call (more than one pipeline batch in backends that split).
    let many: Vec<String> = (0..1500).map(|i| format!("m{i}")).collect();
    ok(
        store.upsert(
            many.iter()
                .step_by(2)
                .map(|id| (id.clone(), json!(id)))
                .collect(),
        ),
        "upsert many",
    );
    let mut request = many.clone();
    request.extend(many.iter().rev().cloned());
    let expected: Vec<String> = many.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(
        ok(store.filter_keys(&request), "filter_keys many"),
        expected
    );
}

/// get_by_ids with fields keeps only those top-level keys of object values.
pub fn field_filtering(open: Open) {
    let store = open("fields");
    let obj = json!({"a": 1, "b": {"c": 2, "a": 9}, "d": [1, {"a": 3}], "e": null, "long": "x".repeat(1000)});
    ok(
        store.upsert(vec![
            ("obj".into(), obj.clone()),
            ("arr".into(), json!([{"a": 1}, 2])),
            ("str".into(), json!("a string")),
            ("num".into(), json!(5)),
            ("bool".into(), json!(false)),
            ("other".into(), json!({"zz": 1, "b": "bee"})),
        ]),
        "upsert",
    );
    let request = ids(&[
        "obj", "arr", "str", "missing", "num", "bool", "other", "obj",
    ]);

    let fields = ids(&["a", "d", "zz", "e"]);
    assert_eq!(
        ok(
            store.get_by_ids(&request, Some(&fields)),
            "get_by_ids with fields"
        ),
        vec![
            Some(json!({"a": 1, "d": [1, {"a": 3}], "e": null})),
            Some(json!([{"a": 1}, 2])),
            Some(json!("a string")),
            None,
            Some(json!(5)),
            Some(json!(false)),
            Some(json!({"zz": 1})),
            Some(json!({"a": 1, "d": [1, {"a": 3}], "e": null})),
        ]
    );

    // Only top-level keys: "b.c" is a key name, not a path; a missing field is simply absent.
    let fields = ids(&["b.c", "nope"]);
    assert_eq!(
        ok(
            store.get_by_ids(&ids(&["obj", "other"]), Some(&fields)),
            "get_by_ids with absent fields"
        ),
        vec![Some(json!({})), Some(json!({}))]
    );
    let fields = ids(&["b"]);
    assert_eq!(
        ok(
            store.get_by_ids(&ids(&["obj", "other"]), Some(&fields)),
            "get_by_ids nested value kept whole"
        ),
        vec![
            Some(json!({"b": {"c": 2, "a": 9}})),
            Some(json!({"b": "bee"}))
        ]
    );
    let none: &[String] = &[];
    assert_eq!(
        ok(
            store.get_by_ids(&ids(&["obj", "num"]), Some(none)),
            "get_by_ids with no fields"
        ),
        vec![Some(json!({})), Some(json!(5))]
    );

    // Without fields, values come back whole; the stored value is not changed by a projection.
    assert_eq!(
        ok(store.get_by_ids(&ids(&["obj"]), None), "get_by_ids"),
        vec![Some(obj.clone())]
    );
    assert_eq!(
        ok(store.get_by_id("obj"), "get_by_id after projections"),
        Some(obj)
    );
}
