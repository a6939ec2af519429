//! What the suite's functions share: id lists, unwrapping with context, and the reads every
//! check goes through.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Debug;

use graphrag_kv::{Error, KvStore};
use serde_json::Value;

/// Owned ids from string literals.
pub(super) fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub(super) fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// An id shortened for assertion messages.
pub(super) fn short(id: &str) -> String {
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
pub(super) fn ok<T>(r: Result<T, Error>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e} ({e:?})"))
}

/// Asserts `r` is `Err(Error::InvalidId { .. })`.
pub(super) fn expect_invalid_id<T: Debug>(r: Result<T, Error>, what: &str) {
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
pub(super) fn keys_of(store: &dyn KvStore) -> Vec<String> {
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

/// Asserts the store's reads of `ids` give exactly `expected` (None = absent), with every read
/// operation.
pub(super) fn assert_reads(store: &dyn KvStore, expected: &[(String, Option<Value>)], what: &str) {
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
