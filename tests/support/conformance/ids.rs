//! Ids: awkward ones round-trip byte for byte, invalid ones are refused by every operation.

use std::collections::HashSet;

use graphrag_kv::{KvStoreExt, MAX_ID_BYTES};
use serde_json::{json, Value};

use super::helpers::{assert_reads, expect_invalid_id, ids, keys_of, ok, short, sorted};
use super::Open;

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
