//! Values: exact round trips (numbers, strings, nesting), large values, whole-value overwrites, typed access.

use graphrag_kv::{Error, KvStoreExt, TextChunk};
use serde_json::{json, Value};

use super::helpers::{ids, keys_of, ok};
use super::{Open, Rng};

/// Values of every JSON shape come back exactly.
pub fn values_round_trip_exactly(open: Open) {
    let store = open("values");
    let mut deep = json!("bottom");
    for i in 0..60 {
        deep = if i % 2 == 0 {
            json!([deep])
        } else {
            json!({ "level": deep })
        };
    }
    let cases: Vec<(&str, Value)> = vec![
        (
            "nested",
            json!({"a": {"b": {"c": [1, {"d": "e"}, [true, false, null]]}}, "empty_obj": {}, "empty_arr": []}),
        ),
        ("array", json!([1, "two", 3.5, null, {"x": [ ]}, [[[]]]])),
        ("i64max", json!(i64::MAX)),
        ("i64min", json!(i64::MIN)),
        ("u64max", json!(u64::MAX)),
        ("zero", json!(0)),
        ("negative", json!(-42)),
        (
            "floats",
            json!([0.5, -1.25, 0.1, 1e-7, 123456.789, -2.5e10, 1.0, 1e300, -0.0]),
        ),
        (
            "unicode",
            json!("héllo wörld — 🦀 中文 Ελληνικά \u{10FFFF} e\u{301}"),
        ),
        ("nul", json!("before\u{0}after\u{0}")),
        (
            "escapes",
            json!("quote\" backslash\\ slash/ \u{1}\u{1f} \t\r\n \u{7f} \u{2028}\u{2029}"),
        ),
        ("empty_string", json!("")),
        ("bool_true", json!(true)),
        ("bool_false", json!(false)),
        ("empty_object", json!({})),
        ("empty_array", json!([])),
        (
            "keys",
            json!({"": 1, "with space": 2, "ключ": 3, "nul\u{0}key": 4, "\"": 5}),
        ),
        ("key_order", json!({"z": 1, "a": 2, "m": {"y": 1, "b": 2}})),
        ("deep", deep),
        (
            "chunk",
            json!({
                "tokens": 1200, "content": "A chunk of text.\n\nWith paragraphs.",
                "chunk_order_index": 3, "full_doc_id": "doc-0123456789abcdef0123456789abcdef"
            }),
        ),
    ];
    ok(
        store.upsert(
            cases
                .iter()
                .map(|(id, v)| (id.to_string(), v.clone()))
                .collect(),
        ),
        "upsert",
    );
    for (id, want) in &cases {
        let got = ok(store.get_by_id(id), "get_by_id");
        assert_eq!(
            got.as_ref(),
            Some(want),
            "value of {id:?} changed in a round trip"
        );
        // Same serialization (key order kept, integers stay integers).
        assert_eq!(
            serde_json::to_string(&got.unwrap()).unwrap(),
            serde_json::to_string(want).unwrap(),
            "serialized value of {id:?} changed in a round trip"
        );
    }
    let all: Vec<String> = cases.iter().map(|(id, _)| id.to_string()).collect();
    let got = ok(store.get_by_ids(&all, None), "get_by_ids");
    assert_eq!(
        got,
        cases
            .iter()
            .map(|(_, v)| Some(v.clone()))
            .collect::<Vec<_>>()
    );
    // Integers stay integers and floats stay floats.
    let i = ok(store.get_by_id("i64max"), "get_by_id").unwrap();
    assert_eq!(i.as_i64(), Some(i64::MAX));
    let u = ok(store.get_by_id("u64max"), "get_by_id").unwrap();
    assert_eq!(u.as_u64(), Some(u64::MAX));
    let f = ok(store.get_by_id("floats"), "get_by_id").unwrap();
    assert!(
        f[6].is_f64() && f[6].as_f64() == Some(1.0),
        "1.0 must stay a float: {}",
        f[6]
    );
}

/// An 8 MiB string value and a 9 MiB object value round-trip exactly.
pub fn large_values_round_trip(open: Open) {
    let store = open("large");
    let mut rng = Rng::new(8);
    let big_string = json!(rng.text(8 << 20));
    let mut obj = serde_json::Map::new();
    for i in 0..9 {
        obj.insert(format!("part{i}"), json!(rng.text(1 << 20)));
    }
    obj.insert(
        "small".into(),
        json!({"n": 1, "list": (0..1000).collect::<Vec<u32>>()}),
    );
    obj.insert("repetitive".into(), json!("ab".repeat(64 * 1024)));
    let big_object = Value::Object(obj);
    let object_bytes = serde_json::to_vec(&big_object).unwrap().len();
    assert!(
        object_bytes > 9 << 20,
        "test object is {object_bytes} bytes"
    );

    ok(
        store.upsert(vec![
            ("big-string".into(), big_string.clone()),
            ("big-object".into(), big_object.clone()),
            ("small".into(), json!({"s": 1})),
        ]),
        "upsert large values",
    );
    let same = |got: Option<Value>, want: &Value, what: &str| {
        let got = got.unwrap_or_else(|| panic!("{what}: value missing"));
        assert!(
            got == *want,
            "{what}: large value differs after a round trip ({} bytes back, {} expected)",
            serde_json::to_vec(&got).unwrap().len(),
            serde_json::to_vec(want).unwrap().len()
        );
    };
    same(
        ok(store.get_by_id("big-string"), "get_by_id"),
        &big_string,
        "8 MiB string",
    );
    same(
        ok(store.get_by_id("big-object"), "get_by_id"),
        &big_object,
        "9 MiB object",
    );
    let mut got = ok(
        store.get_by_ids(&ids(&["big-object", "small", "big-string"]), None),
        "get_by_ids",
    );
    assert_eq!(got.len(), 3);
    same(got.remove(2), &big_string, "8 MiB string via get_by_ids");
    assert_eq!(got.remove(1), Some(json!({"s": 1})));
    same(got.remove(0), &big_object, "9 MiB object via get_by_ids");

    let fields = ids(&["small", "part3"]);
    let projected = ok(
        store.get_by_ids(&ids(&["big-object"]), Some(&fields)),
        "get_by_ids with fields",
    );
    let want = json!({"small": big_object["small"].clone(), "part3": big_object["part3"].clone()});
    same(
        projected.into_iter().next().flatten(),
        &want,
        "projection of the 9 MiB object",
    );

    // Replace a large value with a small one: nothing of the old value remains.
    ok(
        store.upsert(vec![("big-string".into(), json!("tiny"))]),
        "overwrite large value",
    );
    assert_eq!(
        ok(store.get_by_id("big-string"), "get_by_id"),
        Some(json!("tiny"))
    );
    assert_eq!(
        keys_of(&*store),
        ids(&["big-object", "big-string", "small"])
    );
}

/// An upsert replaces the whole value: no merge of object keys, any shape over any other.
pub fn overwrite_replaces_whole_value(open: Open) {
    let store = open("overwrite");
    ok(
        store.upsert(vec![(
            "k".into(),
            json!({"a": 1, "b": 2, "nested": {"x": 1, "y": 2}}),
        )]),
        "upsert",
    );
    ok(
        store.upsert(vec![("k".into(), json!({"c": 3, "nested": {"z": 3}}))]),
        "overwrite",
    );
    assert_eq!(
        ok(store.get_by_id("k"), "get_by_id"),
        Some(json!({"c": 3, "nested": {"z": 3}}))
    );
    let fields = ids(&["a", "c"]);
    assert_eq!(
        ok(store.get_by_ids(&ids(&["k"]), Some(&fields)), "get_by_ids"),
        vec![Some(json!({"c": 3}))]
    );

    let long = "y".repeat(100_000);
    let steps = [
        json!([1, 2, 3]),
        json!("a string now"),
        json!({"back": "to an object"}),
        json!(long),
        json!("short"),
        json!(7),
        json!({}),
    ];
    for v in steps {
        ok(store.upsert(vec![("k".into(), v.clone())]), "overwrite");
        assert_eq!(ok(store.get_by_id("k"), "get_by_id"), Some(v));
    }
    assert_eq!(keys_of(&*store), ids(&["k"]));
    assert_eq!(ok(store.stats(), "stats").keys, 1);
}

/// KvStoreExt: upsert_as / get_as / get_many_as of TextChunk.
pub fn typed_round_trip(open: Open) {
    let store = open("text_chunks");
    let chunk = |i: u64| TextChunk {
        tokens: 100 + i,
        content: format!("chunk {i}: Ünïcödé text 🦀\nsecond line"),
        chunk_order_index: i,
        full_doc_id: "doc-5d41402abc4b2a76b9719d911017c592".to_string(),
    };
    ok(
        store.upsert_as((0..5).map(|i| (format!("chunk-{i}"), chunk(i)))),
        "upsert_as",
    );
    assert_eq!(
        ok(store.get_as::<TextChunk>("chunk-3"), "get_as"),
        Some(chunk(3))
    );
    assert_eq!(
        ok(store.get_as::<TextChunk>("chunk-9"), "get_as missing"),
        None
    );
    assert_eq!(
        ok(
            store.get_many_as::<TextChunk>(&ids(&["chunk-4", "nope", "chunk-0", "chunk-4"])),
            "get_many_as"
        ),
        vec![Some(chunk(4)), None, Some(chunk(0)), Some(chunk(4))]
    );
    // Stored as nano-graphrag's plain JSON object.
    assert_eq!(
        ok(store.get_by_id("chunk-1"), "get_by_id"),
        Some(json!({
            "tokens": 101,
            "content": "chunk 1: Ünïcödé text 🦀\nsecond line",
            "chunk_order_index": 1,
            "full_doc_id": "doc-5d41402abc4b2a76b9719d911017c592"
        }))
    );
    // A value of another shape is a decode error naming the id, not a missing value.
    ok(
        store.upsert(vec![("bad".into(), json!({"tokens": "many"}))]),
        "upsert",
    );
    match store.get_as::<TextChunk>("bad") {
        Err(Error::Decode { key, .. }) => assert_eq!(key, "bad"),
        other => panic!("get_as of a mismatched value: expected Error::Decode, got {other:?}"),
    }
    assert!(matches!(
        store.get_many_as::<TextChunk>(&ids(&["chunk-0", "bad"])),
        Err(Error::Decode { .. })
    ));
    assert_eq!(keys_of(&*store).len(), 6);
}
