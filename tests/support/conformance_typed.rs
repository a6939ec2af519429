//! The conformance suite of the typed path (`KvStoreExt::get_as`, `get_many_as`, `upsert_as`,
//! over `KvStore::get_json_by_ids` and `upsert_json`) and of the key stream
//! (`KvStore::scan_keys`), run by every backend and every stack as the main suite is.
//!
//! Same contract for `open` as [`super::conformance`]. Use [`typed_conformance_tests!`] to turn
//! the suite into `#[test]`s.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use graphrag_kv::{Error, KvStore, KvStoreExt, Stored, TextChunk};
use serde_json::{json, Value};

/// What the suite functions take: namespace -> store, all in one fresh backend.
pub type Open<'a> = &'a dyn Fn(&str) -> Arc<dyn KvStore>;

/// Generates one `#[test]` per suite function, in a module (`kv_typed_conformance` by
/// default); arguments as for `conformance_tests!`.
macro_rules! typed_conformance_tests {
    (@tests $module:ident, $open_fn:expr; $($name:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $name() {
                    let (_guard, open) = ($open_fn)();
                    $crate::support::conformance_typed::$name(&open);
                    drop(open);
                }
            )*
        }
    };
    ($module:ident, $open_fn:expr $(,)?) => {
        $crate::support::conformance_typed::typed_conformance_tests!(@tests $module, $open_fn;
            typed_and_untyped_read_each_other,
            typed_reads_keep_request_order,
            typed_errors_name_namespace_and_key,
            typed_calls_check_ids,
            scan_keys_lists_what_all_keys_lists,
            scan_keys_consumer_may_use_the_store,
            scan_keys_stops_at_consumer_error,
        );
    };
    ($open_fn:expr $(,)?) => {
        $crate::support::conformance_typed::typed_conformance_tests!(kv_typed_conformance, $open_fn);
    };
}
#[allow(unused_imports)]
pub(crate) use typed_conformance_tests;

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn ok<T>(r: Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn chunk(i: u64) -> TextChunk {
    TextChunk {
        tokens: 100 + i,
        content: format!(
            "chunk {i}: \"quoted\" Ünïcödé text 🦀\tand a tab\nsecond line\\ {}",
            "prose ".repeat(300 + i as usize)
        ),
        chunk_order_index: i,
        full_doc_id: "doc-5d41402abc4b2a76b9719d911017c592".to_string(),
    }
}

/// Every id `scan_keys` hands over, and the pages' sizes.
fn scanned(store: &dyn KvStore) -> (BTreeSet<String>, Vec<usize>) {
    let mut seen = BTreeSet::new();
    let mut pages = Vec::new();
    ok(
        store.scan_keys(&mut |page| {
            pages.push(page.len());
            seen.extend(page);
            Ok(())
        }),
        "scan_keys",
    );
    (seen, pages)
}

/// A typed write is read back by an untyped read as the same value, an untyped write by a
/// typed read, and the JSON text handed to the typed path parses to what `get_by_ids` returns.
pub fn typed_and_untyped_read_each_other(open: Open) {
    let store = open("text_chunks");
    ok(
        store.upsert_as((0..20).map(|i| (format!("typed-{i}"), chunk(i)))),
        "upsert_as",
    );
    ok(
        store.upsert(
            (20..40)
                .map(|i| {
                    (
                        format!("plain-{i}"),
                        serde_json::to_value(chunk(i)).unwrap(),
                    )
                })
                .collect(),
        ),
        "upsert",
    );
    let all: Vec<String> = (0..20)
        .map(|i| format!("typed-{i}"))
        .chain((20..40).map(|i| format!("plain-{i}")))
        .collect();
    let untyped = ok(store.get_by_ids(&all, None), "get_by_ids");
    let typed = ok(store.get_many_as::<TextChunk>(&all), "get_many_as");
    assert_eq!((untyped.len(), typed.len()), (all.len(), all.len()));
    for (i, (u, t)) in untyped.iter().zip(&typed).enumerate() {
        let want = chunk(i as u64);
        assert_eq!(
            u.as_ref(),
            Some(&serde_json::to_value(&want).unwrap()),
            "untyped read of {}",
            all[i]
        );
        assert_eq!(t.as_ref(), Some(&want), "typed read of {}", all[i]);
    }
    assert_eq!(
        ok(store.get_as::<TextChunk>("typed-7"), "get_as"),
        Some(chunk(7))
    );
    assert_eq!(
        ok(store.get_as::<TextChunk>("plain-27"), "get_as"),
        Some(chunk(27))
    );
    // Any JSON value, not only objects, through the typed path: untyped reads see the same.
    let odd: Vec<(String, Value)> = vec![
        ("n".into(), json!(null)),
        ("s".into(), json!("a \"string\"\n")),
        ("a".into(), json!([1, -2.5, true, {"k": []}])),
        ("big".into(), json!(u64::MAX)),
    ];
    ok(store.upsert_as(odd.clone()), "upsert_as of Values");
    for (id, v) in &odd {
        assert_eq!(ok(store.get_by_id(id), id).as_ref(), Some(v), "{id}");
        assert_eq!(ok(store.get_as::<Value>(id), id).as_ref(), Some(v), "{id}");
    }
    // What is handed to the typed path is the value, as text or as a Value.
    let mut texts: HashMap<usize, Value> = HashMap::new();
    ok(
        store.get_json_by_ids(&ids(&["a", "nope", "typed-3"]), &mut |i, stored| {
            let v: Value = match stored {
                Stored::Text(json) => serde_json::from_slice(json).expect("JSON text"),
                Stored::Value(v) => v.clone(),
                Stored::Owned(v) => v,
                _ => panic!("an unknown form"),
            };
            assert!(texts.insert(i, v).is_none(), "index {i} visited twice");
            Ok(())
        }),
        "get_json_by_ids",
    );
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[&0], odd[2].1);
    assert_eq!(texts[&2], serde_json::to_value(chunk(3)).unwrap());
    // A typed overwrite replaces an untyped value and the other way round.
    ok(
        store.upsert_as([("plain-20".to_string(), chunk(99))]),
        "overwrite",
    );
    assert_eq!(
        ok(store.get_by_id("plain-20"), "get_by_id"),
        Some(serde_json::to_value(chunk(99)).unwrap())
    );
    ok(
        store.upsert(vec![(
            "typed-0".into(),
            serde_json::to_value(chunk(98)).unwrap(),
        )]),
        "overwrite",
    );
    assert_eq!(
        ok(store.get_as::<TextChunk>("typed-0"), "get_as"),
        Some(chunk(98))
    );
    // Deleted ids are gone for typed reads too.
    ok(
        store.delete_by_ids(&ids(&["typed-1", "plain-21"])),
        "delete",
    );
    assert_eq!(
        ok(
            store.get_many_as::<TextChunk>(&ids(&["typed-1", "plain-21", "typed-2"])),
            "get_many_as after delete"
        ),
        vec![None, None, Some(chunk(2))]
    );
}

/// `get_many_as` answers in request order, `None` for missing ids, repeated ids each time,
/// over batches larger than one server round trip.
pub fn typed_reads_keep_request_order(open: Open) {
    let store = open("text_chunks");
    ok(
        store.upsert_as((0..300).step_by(2).map(|i| (format!("c{i}"), chunk(i)))),
        "upsert_as",
    );
    let asked: Vec<String> = (0..300)
        .rev()
        .map(|i| format!("c{i}"))
        .chain(["c4".into()])
        .collect();
    let got = ok(store.get_many_as::<TextChunk>(&asked), "get_many_as");
    assert_eq!(got.len(), asked.len());
    for (id, v) in asked.iter().zip(&got) {
        let i: u64 = id[1..].parse().unwrap();
        let want = i.is_multiple_of(2).then(|| chunk(i));
        assert_eq!(v.as_ref(), want.as_ref(), "{id}");
    }
    assert_eq!(ok(store.get_many_as::<TextChunk>(&[]), "empty"), vec![]);
    ok(
        store.upsert_as(Vec::<(String, TextChunk)>::new()),
        "empty upsert_as",
    );
}

/// A stored value that does not fit the type is an error naming the namespace and the id,
/// never a missing value; the other values are untouched.
pub fn typed_errors_name_namespace_and_key(open: Open) {
    let store = open("text_chunks");
    ok(
        store.upsert_as([("good".to_string(), chunk(1))]),
        "upsert_as",
    );
    ok(
        store.upsert(vec![(
            "bad".into(),
            json!({"tokens": "many", "content": 3}),
        )]),
        "upsert",
    );
    for r in [
        store.get_as::<TextChunk>("bad").map(|_| ()),
        store
            .get_many_as::<TextChunk>(&ids(&["good", "bad", "good"]))
            .map(|_| ()),
    ] {
        match r {
            Err(e @ Error::Decode { .. }) => {
                let Error::Decode { namespace, key, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(namespace, "text_chunks", "{e}");
                assert!(key.ends_with("bad"), "{e}");
                assert!(e.to_string().contains("requested type"), "{e}");
            }
            other => panic!("expected Error::Decode, got {other:?}"),
        }
    }
    assert_eq!(
        ok(store.get_as::<TextChunk>("good"), "good"),
        Some(chunk(1))
    );
    assert_eq!(
        ok(store.get_by_id("bad"), "untyped read of bad"),
        Some(json!({"tokens": "many", "content": 3}))
    );
}

/// Invalid ids are refused by the typed calls as by the untyped ones, and nothing is written.
pub fn typed_calls_check_ids(open: Open) {
    let store = open("text_chunks");
    let too_long = "x".repeat(graphrag_kv::MAX_ID_BYTES + 1);
    for bad in ["", too_long.as_str()] {
        assert!(
            matches!(store.get_as::<TextChunk>(bad), Err(Error::InvalidId { .. })),
            "get_as({:.10})",
            bad
        );
        assert!(
            matches!(
                store.get_many_as::<TextChunk>(&[bad.to_string()]),
                Err(Error::InvalidId { .. })
            ),
            "get_many_as"
        );
        assert!(
            matches!(
                store.upsert_as([("ok".to_string(), chunk(0)), (bad.to_string(), chunk(1))]),
                Err(Error::InvalidId { .. })
            ),
            "upsert_as"
        );
    }
    assert_eq!(ok(store.get_as::<TextChunk>("ok"), "ok"), None);
}

/// `scan_keys` hands over, as a set, what `all_keys` returns, in pages bounded by the page
/// size rather than by the namespace, after upserts, deletes and overwrites of both kinds,
/// and does not list another namespace's keys.
pub fn scan_keys_lists_what_all_keys_lists(open: Open) {
    let store = open("full_docs");
    let other = open("full_docs_v2");
    let (empty, pages) = scanned(&*store);
    assert!(
        empty.is_empty() && pages.iter().all(|n| *n == 0),
        "{pages:?}"
    );
    let n = 4_500usize;
    for part in (0..n).collect::<Vec<_>>().chunks(1_000) {
        ok(
            store.upsert(
                part.iter()
                    .map(|i| (format!("doc-{i}"), json!({"content": i})))
                    .collect(),
            ),
            "upsert",
        );
    }
    ok(
        other.upsert(vec![
            ("doc-1".into(), json!(1)),
            ("only-v2".into(), json!(2)),
        ]),
        "upsert other",
    );
    ok(
        store.upsert_as([
            ("typed-new".to_string(), chunk(0)),
            ("doc-3".to_string(), chunk(3)),
        ]),
        "upsert_as",
    );
    ok(
        store.delete_by_ids(&ids(&["doc-0", "doc-10", "never"])),
        "delete",
    );
    let (seen, pages) = scanned(&*store);
    let all: BTreeSet<String> = ok(store.all_keys(), "all_keys").into_iter().collect();
    assert_eq!(seen, all);
    assert_eq!(all.len(), n - 2 + 1);
    assert!(seen.contains("typed-new") && !seen.contains("doc-0") && !seen.contains("only-v2"));
    let largest = pages.iter().copied().max().unwrap_or(0);
    // `largest < n` alone could not fail (the namespace holds fewer than `n` ids): at least
    // two non-empty pages, none above half of the namespace.
    let filled = pages.iter().filter(|p| **p > 0).count();
    assert!(
        filled > 1 && largest <= all.len() / 2,
        "{} ids came in {} pages, the largest {largest}: not a stream",
        seen.len(),
        pages.len()
    );
}

/// The page consumer may read and delete through the same store while the listing runs (what
/// `graphrag-kv export` and `clear` do); deleting each page as it comes empties the namespace.
pub fn scan_keys_consumer_may_use_the_store(open: Open) {
    let store = open("text_chunks");
    ok(
        store.upsert_as((0..2_500).map(|i| (format!("k{i}"), chunk(i % 7)))),
        "upsert_as",
    );
    let mut read = 0usize;
    ok(
        store.scan_keys(&mut |page| {
            let values = store.get_many_as::<TextChunk>(&page)?;
            read += values.iter().filter(|v| v.is_some()).count();
            Ok(())
        }),
        "scan_keys reading",
    );
    assert!(read >= 2_500, "read {read} values");
    ok(
        store.scan_keys(&mut |page| store.delete_by_ids(&page)),
        "scan_keys deleting",
    );
    assert_eq!(ok(store.all_keys(), "all_keys after"), Vec::<String>::new());
}

/// An error returned by the consumer stops the listing and comes back unchanged.
pub fn scan_keys_stops_at_consumer_error(open: Open) {
    let store = open("text_chunks");
    ok(
        store.upsert((0..3_000).map(|i| (format!("k{i}"), json!(i))).collect()),
        "upsert",
    );
    let mut calls = 0;
    let r = store.scan_keys(&mut |_| {
        calls += 1;
        Err(Error::Unavailable {
            namespace: "consumer".into(),
            reason: "stop here".into(),
        })
    });
    match r {
        Err(Error::Unavailable { namespace, reason }) => {
            assert_eq!(
                (namespace.as_str(), reason.as_str()),
                ("consumer", "stop here")
            )
        }
        other => panic!("expected the consumer's error, got {other:?}"),
    }
    assert_eq!(calls, 1);
    assert_eq!(ok(store.all_keys(), "all_keys").len(), 3_000);
}
