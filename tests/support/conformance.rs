//! The one conformance suite every [`KvStore`] backend must pass.
//!
//! Each suite function takes `open`: `open(namespace)` returns a store for `namespace` in a
//! fresh, isolated backend (a new temporary directory, a new redis-server or a unique key
//! prefix), shared by every namespace opened through that same `open`, so two namespaces of one
//! backend can be compared. Requirements on `open`:
//! - the backend starts empty;
//! - `store.namespace()` is the namespace asked for (isolation comes from the backend or the
//!   key prefix, not from renaming the namespace);
//! - each suite function opens a namespace at most once, so `open` may take locks.
//!
//! Use [`conformance_tests!`] to turn the suite into `#[test]`s.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Barrier, Mutex};

use graphrag_kv::{Error, KvStore, KvStoreExt, TextChunk, MAX_ID_BYTES};
use serde_json::{json, Value};

/// What the suite functions take: namespace -> store, all in one fresh backend.
pub type Open<'a> = &'a dyn Fn(&str) -> Arc<dyn KvStore>;

/// Generates one `#[test]` per suite function, in a module (`kv_conformance` by default).
///
/// `$open_fn` is an expression callable with no argument (a fn path or a closure) that returns
/// `(guard, open)`: `guard` is anything that must live until the test ends (a `TempDir`, a
/// `RedisServer`, ...), `open` is a closure `Fn(&str) -> Arc<dyn KvStore>` creating stores in
/// that one fresh backend. Each generated test calls `$open_fn` once. Names in `$open_fn`
/// resolve from the including file's root (the generated module does `use super::*`).
///
/// ```ignore
/// mod support;
/// fn json_backend() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) { ... }
/// support::conformance::conformance_tests!(json_backend);
/// // or, to name the module (e.g. two configurations in one file):
/// support::conformance::conformance_tests!(json_compressed, json_backend_compressed);
/// ```
macro_rules! conformance_tests {
    (@tests $module:ident, $open_fn:expr; $($name:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let (_guard, open) = ($open_fn)();
                    $crate::support::conformance::$name(&open);
                    drop(open);
                }
            )*
        }
    };
    ($module:ident, $open_fn:expr $(,)?) => {
        $crate::support::conformance::conformance_tests!(@tests $module, $open_fn;
            upsert_then_read,
            empty_batches,
            duplicate_id_in_batch_last_wins,
            filter_keys_missing_once_in_order,
            field_filtering,
            awkward_ids_round_trip,
            invalid_ids_are_refused,
            values_round_trip_exactly,
            large_values_round_trip,
            overwrite_replaces_whole_value,
            delete_removes_only_named_ids,
            clear_is_scoped_to_namespace,
            all_keys_many_ids,
            typed_round_trip,
            callbacks_keep_data,
            stats_counts,
            concurrent_mixed_operations,
        );
    };
    ($open_fn:expr $(,)?) => {
        $crate::support::conformance::conformance_tests!(kv_conformance, $open_fn);
    };
}
#[allow(unused_imports)]
pub(crate) use conformance_tests;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Owned ids from string literals.
fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// An id shortened for assertion messages.
fn short(id: &str) -> String {
    if id.len() <= 40 {
        format!("{id:?}")
    } else {
        let mut cut = 40;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{:?}... ({} bytes)", &id[..cut], id.len())
    }
}

/// Unwraps with the operation and namespace in the panic message.
fn ok<T>(r: Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e} ({e:?})"))
}

/// Asserts `r` is `Err(Error::InvalidId { .. })`.
fn expect_invalid_id<T: Debug>(r: Result<T, Error>, what: &str) {
    match r {
        Err(Error::InvalidId { .. }) => {}
        Err(e) => panic!("{what}: expected Error::InvalidId, got {e} ({e:?})"),
        Ok(v) => {
            let shown = format!("{v:?}");
            panic!(
                "{what}: expected Error::InvalidId, got Ok({})",
                &shown[..shown.len().min(200)]
            )
        }
    }
}

/// Every id of the store, sorted, asserting each appears once.
fn keys_of(store: &dyn KvStore) -> Vec<String> {
    let keys = ok(store.all_keys(), "all_keys");
    let n = keys.len();
    let set: BTreeSet<String> = keys.into_iter().collect();
    assert_eq!(
        set.len(),
        n,
        "all_keys of {:?} returned an id more than once",
        store.namespace()
    );
    set.into_iter().collect()
}

/// Tiny xorshift64* PRNG, deterministic per seed (in the harness: benches use it too).
pub use graphrag_kv_harness::Rng;

/// Asserts the store's reads of `ids` give exactly `expected` (None = absent), with every read
/// operation.
fn assert_reads(store: &dyn KvStore, expected: &[(String, Option<Value>)], what: &str) {
    for (id, want) in expected {
        let got = ok(store.get_by_id(id), "get_by_id");
        assert!(
            got == *want,
            "{what}: get_by_id({}) = {got:?}, expected {want:?}",
            short(id)
        );
    }
    let all: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    let got = ok(store.get_by_ids(&all, None), "get_by_ids");
    assert_eq!(
        got.len(),
        all.len(),
        "{what}: get_by_ids returned a wrong number of entries"
    );
    for ((id, want), got) in expected.iter().zip(&got) {
        assert!(
            got == want,
            "{what}: get_by_ids entry for {} = {got:?}, expected {want:?}",
            short(id)
        );
    }
    let missing: Vec<String> = {
        let mut seen = HashSet::new();
        expected
            .iter()
            .filter(|(id, v)| v.is_none() && seen.insert(id.clone()))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let got = ok(store.filter_keys(&all), "filter_keys");
    assert!(
        got == missing,
        "{what}: filter_keys = {:?}, expected {:?}",
        got.iter().map(|s| short(s)).collect::<Vec<_>>(),
        missing.iter().map(|s| short(s)).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// The suite

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

/// The ids with glob characters, separators and non-ASCII text used by `awkward_ids_round_trip`.
fn awkward_ids() -> Vec<String> {
    let mut v = ids(&[
        "*",
        "?",
        "[a-z]",
        "a",
        "b",
        "z",
        "\\",
        "\\*",
        "a:b",
        "a:",
        ":b",
        "ab",
        " space ",
        "new\nline",
        "cr\r\nlf",
        "tab\t",
        "🦀",
        "中文",
        "é",
        "e\u{301}",
        "nul\u{0}id",
        "{a}",
        "{}",
        "a{b}c",
        "%s",
        "%",
        "/",
        "../x",
        ".",
        "..",
        "\"quoted\"",
        "'",
        "a*",
        "*a",
        "a?c",
        "[",
        "]",
        "^",
        "$",
        "key with | pipe",
        "x".repeat(200).as_str(),
    ]);
    // The longest ids accepted: MAX_ID_BYTES of ASCII, and of 4-byte characters.
    v.push("L".repeat(MAX_ID_BYTES));
    v.push("🦀".repeat(MAX_ID_BYTES / 4));
    v
}

/// Ids with glob characters, separators, unicode and the maximum length round-trip through every
/// operation and never match each other.
pub fn awkward_ids_round_trip(open: Open) {
    let store = open("awkward");
    let all = awkward_ids();
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        all.len(),
        "test ids must be distinct"
    );
    assert_eq!(all[all.len() - 1].len(), MAX_ID_BYTES);
    assert_eq!(all[all.len() - 2].len(), MAX_ID_BYTES);
    let value = |i: usize, id: &str| json!({"i": i, "id_len": id.len(), "id": id});

    // First store only the pattern-like ids: the plain ids they would match as globs must stay
    // absent.
    let patterns = ids(&["*", "?", "[a-z]", "a*", "*a", "a?c", "\\*", "[", "{}"]);
    ok(
        store.upsert(
            patterns
                .iter()
                .map(|id| (id.clone(), json!({"pattern": id})))
                .collect(),
        ),
        "upsert pattern ids",
    );
    let plain = ids(&["a", "b", "z", "ab", "abc", "x", "\\", "a:b", "{a}", "]"]);
    assert_eq!(
        ok(store.filter_keys(&plain), "filter_keys of plain ids"),
        plain
    );
    for id in &plain {
        assert_eq!(
            ok(store.get_by_id(id), "get_by_id plain"),
            None,
            "{} matched a pattern id",
            short(id)
        );
    }
    assert_eq!(keys_of(&*store), sorted(patterns.clone()));
    ok(store.delete_by_ids(&ids(&["*"])), "delete '*'");
    assert_eq!(
        keys_of(&*store),
        sorted(patterns.iter().filter(|p| *p != "*").cloned().collect())
    );
    ok(store.clear(), "clear");
    assert_eq!(keys_of(&*store), Vec::<String>::new());

    // Now all of them.
    ok(
        store.upsert(
            all.iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), value(i, id)))
                .collect(),
        ),
        "upsert awkward ids",
    );
    let expected: Vec<(String, Option<Value>)> = all
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), Some(value(i, id))))
        .collect();
    assert_reads(&*store, &expected, "awkward ids");
    assert_eq!(
        keys_of(&*store),
        sorted(all.clone()),
        "all_keys must return the ids exactly"
    );
    let stats = ok(store.stats(), "stats");
    assert_eq!(stats.keys, all.len() as u64);

    // Near misses are absent.
    let near = ids(&[
        "x", "aa", "a:bc", "🦀🦀", "中", "space", " space", "new", "nul", "A", "{b}", "\\\\", "**",
    ]);
    assert_eq!(
        ok(store.filter_keys(&near), "filter_keys near misses"),
        near
    );
    let mut near_long = "L".repeat(MAX_ID_BYTES - 1);
    assert_eq!(ok(store.get_by_id(&near_long), "get_by_id MAX-1"), None);
    near_long.push('M');
    assert_eq!(
        ok(store.get_by_id(&near_long), "get_by_id other long id"),
        None
    );

    // Deleting pattern ids removes only themselves.
    let deleted = ids(&["*", "?", "[a-z]", "\\", "a*", "{}"]);
    ok(store.delete_by_ids(&deleted), "delete pattern ids");
    let expected: Vec<(String, Option<Value>)> = all
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), (!deleted.contains(id)).then(|| value(i, id))))
        .collect();
    assert_reads(&*store, &expected, "after deleting pattern ids");
    let remaining: Vec<String> = all
        .iter()
        .filter(|id| !deleted.contains(id))
        .cloned()
        .collect();
    assert_eq!(keys_of(&*store), sorted(remaining.clone()));

    // Field filtering and overwrite with long ids.
    let long = all[all.len() - 1].clone();
    let fields = ids(&["i"]);
    assert_eq!(
        ok(
            store.get_by_ids(std::slice::from_ref(&long), Some(&fields)),
            "get_by_ids long id with fields"
        ),
        vec![Some(json!({"i": all.len() - 1}))]
    );
    ok(
        store.upsert(vec![(long.clone(), json!("replaced"))]),
        "overwrite long id",
    );
    assert_eq!(
        ok(store.get_by_id(&long), "get_by_id long id"),
        Some(json!("replaced"))
    );

    // Delete everything by id: nothing left.
    ok(store.delete_by_ids(&remaining), "delete remaining ids");
    assert_eq!(keys_of(&*store), Vec::<String>::new());
    assert_eq!(ok(store.filter_keys(&all), "filter_keys after delete"), all);
}

/// An empty id and an id longer than MAX_ID_BYTES are refused with Error::InvalidId by every
/// operation taking ids; data already stored is untouched.
pub fn invalid_ids_are_refused(open: Open) {
    let store = open("invalid");
    ok(
        store.upsert(vec![("keep".into(), json!({"kept": true}))]),
        "upsert",
    );
    let too_long_ascii = "x".repeat(MAX_ID_BYTES + 1);
    let too_long_multibyte = "é".repeat(MAX_ID_BYTES / 2 + 1); // 65538 bytes, 32769 chars
    assert!(
        too_long_multibyte.len() > MAX_ID_BYTES
            && too_long_multibyte.chars().count() < MAX_ID_BYTES
    );
    for bad in [String::new(), too_long_ascii, too_long_multibyte] {
        let what = |op: &str| format!("{op}({})", short(&bad));
        expect_invalid_id(store.get_by_id(&bad), &what("get_by_id"));
        expect_invalid_id(
            store.get_by_ids(std::slice::from_ref(&bad), None),
            &what("get_by_ids"),
        );
        expect_invalid_id(
            store.get_by_ids(&[String::from("keep"), bad.clone()], None),
            &what("get_by_ids mixed"),
        );
        expect_invalid_id(store.upsert(vec![(bad.clone(), json!(1))]), &what("upsert"));
        expect_invalid_id(
            store.delete_by_ids(std::slice::from_ref(&bad)),
            &what("delete_by_ids"),
        );
        expect_invalid_id(
            store.delete_by_ids(&[String::from("keep"), bad.clone()]),
            &what("delete_by_ids mixed"),
        );
        expect_invalid_id(
            store.filter_keys(std::slice::from_ref(&bad)),
            &what("filter_keys"),
        );
        expect_invalid_id(
            store.filter_keys(&[String::from("nope"), bad.clone()]),
            &what("filter_keys mixed"),
        );
        expect_invalid_id(store.get_as::<Value>(&bad), &what("get_as"));
    }
    assert_eq!(
        keys_of(&*store),
        ids(&["keep"]),
        "refused calls must not change the store"
    );
    assert_eq!(
        ok(store.get_by_id("keep"), "get_by_id"),
        Some(json!({"kept": true}))
    );

    // A batch mixing valid and invalid ids is refused too (some items may have been written).
    expect_invalid_id(
        store.upsert(vec![("fine".into(), json!(1)), (String::new(), json!(2))]),
        "upsert mixed batch",
    );
    assert_eq!(
        ok(store.get_by_id("keep"), "get_by_id"),
        Some(json!({"kept": true}))
    );
}

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

/// delete_by_ids removes exactly the named ids; missing ids are ignored.
pub fn delete_removes_only_named_ids(open: Open) {
    let store = open("delete");
    let all = ids(&["a", "b", "c", "d", "e", "b1", "ab"]);
    ok(
        store.upsert(
            all.iter()
                .map(|id| (id.clone(), json!({"id": id})))
                .collect(),
        ),
        "upsert",
    );

    ok(
        store.delete_by_ids(&ids(&["b", "d", "missing1", "b"])),
        "delete with a missing id and a repeat",
    );
    assert_eq!(keys_of(&*store), ids(&["a", "ab", "b1", "c", "e"]));
    assert_eq!(ok(store.get_by_id("b"), "get_by_id deleted"), None);
    assert_eq!(
        ok(store.get_by_id("b1"), "get_by_id kept"),
        Some(json!({"id": "b1"}))
    );
    assert_eq!(
        ok(
            store.get_by_ids(&ids(&["a", "b", "c", "d"]), None),
            "get_by_ids"
        ),
        vec![
            Some(json!({"id": "a"})),
            None,
            Some(json!({"id": "c"})),
            None
        ]
    );
    assert_eq!(
        ok(
            store.filter_keys(&ids(&["a", "b", "d", "e"])),
            "filter_keys"
        ),
        ids(&["b", "d"])
    );

    ok(
        store.delete_by_ids(&ids(&["missing1", "missing2"])),
        "delete only missing ids",
    );
    ok(
        store.delete_by_ids(&ids(&["b"])),
        "delete an already deleted id",
    );
    assert_eq!(keys_of(&*store), ids(&["a", "ab", "b1", "c", "e"]));
    assert_eq!(ok(store.stats(), "stats").keys, 5);

    // A deleted id can be stored again.
    ok(
        store.upsert(vec![("b".into(), json!("again"))]),
        "upsert after delete",
    );
    assert_eq!(ok(store.get_by_id("b"), "get_by_id"), Some(json!("again")));

    ok(
        store.delete_by_ids(&ids(&["a", "ab", "b", "b1", "c", "e"])),
        "delete all",
    );
    assert_eq!(keys_of(&*store), Vec::<String>::new());
    assert_eq!(ok(store.stats(), "stats").keys, 0);
}

/// clear removes every id of its namespace and nothing of the others, including namespaces whose
/// name is a prefix of it or has it as a prefix.
pub fn clear_is_scoped_to_namespace(open: Open) {
    let names = ["docs", "docs2", "a", "a.b", "a-b", "a_b", "A"];
    let stores: Vec<Arc<dyn KvStore>> = names.iter().map(|n| open(n)).collect();
    for (ns, store) in names.iter().zip(&stores) {
        assert_eq!(store.namespace(), *ns);
    }
    let ids_of = |ns: &str| ids(&["k1", "k2", "b:k1", ".b:k1", ns, "shared*"]);
    let value = |ns: &str, id: &str| json!({"ns": ns, "id": id});
    for (ns, store) in names.iter().zip(&stores) {
        ok(
            store.upsert(
                ids_of(ns)
                    .iter()
                    .map(|id| (id.clone(), value(ns, id)))
                    .collect(),
            ),
            "upsert",
        );
    }
    // Namespaces do not see each other's values for the same id.
    for (ns, store) in names.iter().zip(&stores) {
        assert_eq!(keys_of(&**store), sorted(ids_of(ns)), "all_keys of {ns:?}");
        assert_eq!(
            ok(store.get_by_id("k1"), "get_by_id"),
            Some(value(ns, "k1")),
            "k1 of {ns:?}"
        );
        for other in names.iter().filter(|o| *o != ns) {
            if !ids_of(ns).contains(&other.to_string()) {
                assert_eq!(
                    ok(store.get_by_id(other), "get_by_id"),
                    None,
                    "{ns:?} sees id {other:?}"
                );
            }
        }
    }

    let check = |cleared: &[&str]| {
        for (ns, store) in names.iter().zip(&stores) {
            if cleared.contains(ns) {
                assert_eq!(
                    keys_of(&**store),
                    Vec::<String>::new(),
                    "{ns:?} was cleared"
                );
                assert_eq!(
                    ok(store.get_by_id("k1"), "get_by_id"),
                    None,
                    "{ns:?} was cleared"
                );
                assert_eq!(
                    ok(store.stats(), "stats").keys,
                    0,
                    "stats of cleared {ns:?}"
                );
            } else {
                let expected: Vec<(String, Option<Value>)> = ids_of(ns)
                    .iter()
                    .map(|id| (id.clone(), Some(value(ns, id))))
                    .collect();
                assert_reads(
                    &**store,
                    &expected,
                    &format!("{ns:?} after clearing {cleared:?}"),
                );
                assert_eq!(
                    keys_of(&**store),
                    sorted(ids_of(ns)),
                    "{ns:?} after clearing {cleared:?}"
                );
            }
        }
    };
    let by_name = |n: &str| stores[names.iter().position(|x| *x == n).unwrap()].clone();

    ok(by_name("docs").clear(), "clear docs");
    check(&["docs"]);
    ok(by_name("a.b").clear(), "clear a.b");
    check(&["docs", "a.b"]);
    ok(by_name("a").clear(), "clear a");
    check(&["docs", "a.b", "a"]);
    ok(by_name("docs").clear(), "clear an empty namespace");
    check(&["docs", "a.b", "a"]);

    // A cleared namespace is usable again.
    let docs = by_name("docs");
    ok(
        docs.upsert(vec![("new".into(), json!(1))]),
        "upsert after clear",
    );
    assert_eq!(keys_of(&*docs), ids(&["new"]));
    assert_eq!(keys_of(&*by_name("docs2")), sorted(ids_of("docs2")));
}

/// all_keys returns every id exactly once with more ids than one SCAN page.
pub fn all_keys_many_ids(open: Open) {
    let store = open("many");
    let all: Vec<String> = (0..2500).map(|i| format!("id-{i:05}")).collect();
    for chunk in all.chunks(1000) {
        ok(
            store.upsert(
                chunk
                    .iter()
                    .map(|id| (id.clone(), json!({"id": id})))
                    .collect(),
            ),
            "upsert",
        );
    }
    let keys = ok(store.all_keys(), "all_keys");
    assert_eq!(
        keys.len(),
        2500,
        "all_keys must return each of the 2500 ids once"
    );
    assert_eq!(sorted(keys), all);
    assert_eq!(ok(store.stats(), "stats").keys, 2500);
    assert_eq!(
        ok(store.filter_keys(&all), "filter_keys"),
        Vec::<String>::new()
    );
    let got = ok(store.get_by_ids(&all, None), "get_by_ids 2500");
    assert!(
        got.iter()
            .zip(&all)
            .all(|(v, id)| *v == Some(json!({"id": id}))),
        "get_by_ids of 2500 ids"
    );

    let odd: Vec<String> = all.iter().skip(1).step_by(2).cloned().collect();
    ok(store.delete_by_ids(&odd), "delete half");
    let even: Vec<String> = all.iter().step_by(2).cloned().collect();
    assert_eq!(keys_of(&*store), even);
    assert_eq!(ok(store.stats(), "stats").keys, 1250);
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
