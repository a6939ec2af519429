//! The write-behind wrapper over real stores: the conformance suite over Redis and JSON (with
//! the default batching and with tiny batches), then by topic: ordering and read-your-writes
//! (a randomized multi-thread model test among them), shutdown (drop without flush, writes
//! parked in the store below at close), backend failures (a Redis restart in the middle of
//! 100,000 writes, backpressure, flush deadlines, refused writes) and batches in flight.

#[path = "../support/mod.rs"]
mod support;

mod failures;
mod helpers;
mod in_flight;
mod ordering;
mod shutdown;

use helpers::{wb_json, wb_json_tiny, wb_redis, wb_redis_tiny};

support::conformance::conformance_tests!(redis_write_behind, wb_redis);
support::conformance::conformance_tests!(redis_write_behind_tiny_batches, wb_redis_tiny);
support::conformance::conformance_tests!(json_write_behind, wb_json);
support::conformance::conformance_tests!(json_write_behind_tiny_batches, wb_json_tiny);
support::conformance_typed::typed_conformance_tests!(redis_write_behind_typed, wb_redis);
support::conformance_typed::typed_conformance_tests!(
    redis_write_behind_tiny_batches_typed,
    wb_redis_tiny
);
support::conformance_typed::typed_conformance_tests!(json_write_behind_typed, wb_json);
