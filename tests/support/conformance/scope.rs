//! What a delete, a clear and `all_keys` touch: the named ids, this namespace, every id once.

use std::sync::Arc;

use graphrag_kv::KvStore;
use serde_json::{json, Value};

use super::helpers::{assert_reads, ids, keys_of, ok, sorted};
use super::Open;

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
