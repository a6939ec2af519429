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
//!
//! The functions live by topic, and are all re-exported here (`support::conformance::NAME`):
//! `reads` (every read after an upsert, batches, projection), `ids` (awkward and invalid ids),
//! `values` (exact, large, overwritten, typed), `scope` (delete, clear, `all_keys`),
//! `lifecycle` (callbacks, stats), `concurrency`; `helpers` holds what they share.

use std::sync::Arc;

use graphrag_kv::KvStore;

mod concurrency;
mod helpers;
mod ids;
mod lifecycle;
mod reads;
mod scope;
mod values;

pub use concurrency::concurrent_mixed_operations;
pub use ids::{awkward_ids_round_trip, invalid_ids_are_refused};
pub use lifecycle::{callbacks_keep_data, stats_counts};
pub use reads::{
    duplicate_id_in_batch_last_wins, empty_batches, field_filtering,
    filter_keys_missing_once_in_order, upsert_then_read,
};
pub use scope::{all_keys_many_ids, clear_is_scoped_to_namespace, delete_removes_only_named_ids};
pub use values::{
    large_values_round_trip, overwrite_replaces_whole_value, typed_round_trip,
    values_round_trip_exactly,
};

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

/// Tiny xorshift64* PRNG, deterministic per seed (in the harness: benches use it too).
pub use graphrag_kv_harness::Rng;
