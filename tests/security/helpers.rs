//! Configurations from variables, and the text forms of passwords and paths.

use std::collections::HashMap;
use std::path::Path;

use graphrag_kv::{StoreConfig, StoreConfigBuilder};

use crate::support::conformance::Open;

pub(crate) fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A configuration from environment-style variables, as `StoreConfig::from_env` reads them.
pub(crate) fn from_vars(pairs: &[(&str, &str)]) -> graphrag_kv::Result<StoreConfig> {
    StoreConfigBuilder::from_vars(&vars(pairs))?.build()
}

/// Percent-encodes everything but unreserved URL characters.
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A conformance suite function.
pub(crate) type SuiteFn = fn(Open<'_>);

/// Every conformance suite function, to run one after the other on one cluster.
pub(crate) const SUITE: &[(&str, SuiteFn)] = &[
    (
        "upsert_then_read",
        crate::support::conformance::upsert_then_read,
    ),
    ("empty_batches", crate::support::conformance::empty_batches),
    (
        "duplicate_id_in_batch_last_wins",
        crate::support::conformance::duplicate_id_in_batch_last_wins,
    ),
    (
        "filter_keys_missing_once_in_order",
        crate::support::conformance::filter_keys_missing_once_in_order,
    ),
    (
        "field_filtering",
        crate::support::conformance::field_filtering,
    ),
    (
        "awkward_ids_round_trip",
        crate::support::conformance::awkward_ids_round_trip,
    ),
    (
        "invalid_ids_are_refused",
        crate::support::conformance::invalid_ids_are_refused,
    ),
    (
        "values_round_trip_exactly",
        crate::support::conformance::values_round_trip_exactly,
    ),
    (
        "large_values_round_trip",
        crate::support::conformance::large_values_round_trip,
    ),
    (
        "overwrite_replaces_whole_value",
        crate::support::conformance::overwrite_replaces_whole_value,
    ),
    (
        "delete_removes_only_named_ids",
        crate::support::conformance::delete_removes_only_named_ids,
    ),
    (
        "clear_is_scoped_to_namespace",
        crate::support::conformance::clear_is_scoped_to_namespace,
    ),
    (
        "all_keys_many_ids",
        crate::support::conformance::all_keys_many_ids,
    ),
    (
        "typed_round_trip",
        crate::support::conformance::typed_round_trip,
    ),
    (
        "callbacks_keep_data",
        crate::support::conformance::callbacks_keep_data,
    ),
    ("stats_counts", crate::support::conformance::stats_counts),
    (
        "concurrent_mixed_operations",
        crate::support::conformance::concurrent_mixed_operations,
    ),
];
