//! The load tool (`examples/loadtest/`) run as a subprocess, so it cannot rot: its quick mode
//! must produce every measure of docs/BENCHMARKS.md with a redis-benchmark reference where the
//! table has one, and its connections mode must hold and read over every connection without an
//! error. Figures are checked for shape (present, finite, ratio = ours / reference), never for
//! speed: speed is the tool's output, not a test's assertion.

mod support;

use std::process::Command;

use serde_json::{Map, Value};

/// Runs the tool with `args` (plus `--json`) and returns its JSON object.
fn run(args: &[&str]) -> Map<String, Value> {
    let out = Command::new(support::example_bin("loadtest", &[]))
        .args(args)
        .arg("--json")
        .output()
        .expect("running the loadtest example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadtest {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_str(&stdout) {
        Ok(Value::Object(m)) => m,
        other => panic!("loadtest --json printed no JSON object ({other:?}):\n{stdout}"),
    }
}

/// The `(ours, reference, ratio)` of `measure`, checked for shape.
fn figure(m: &Map<String, Value>, measure: &str) -> (f64, Option<f64>) {
    let entry = m
        .get(measure)
        .unwrap_or_else(|| panic!("measure {measure} missing from {m:?}"));
    let ours = entry["ours"]
        .as_f64()
        .unwrap_or_else(|| panic!("{measure}: ours is not a number: {entry}"));
    assert!(ours.is_finite() && ours >= 0.0, "{measure}: ours = {ours}");
    let reference = entry["reference"].as_f64();
    match (reference, entry["ratio"].as_f64()) {
        (Some(r), Some(ratio)) => {
            assert!(r > 0.0, "{measure}: reference = {r}");
            let expected = ours / r;
            assert!(
                (ratio - expected).abs() <= 0.001 + expected * 0.01,
                "{measure}: ratio {ratio} is not ours / reference = {expected}"
            );
        }
        (None, None) => {}
        _ => panic!("{measure}: reference and ratio must both be null or both numbers: {entry}"),
    }
    (ours, reference)
}

#[test]
fn quick_run_reports_every_measure_against_redis_benchmark() {
    let m = run(&["--quick"]);
    // Measured side by side with redis-benchmark: each must carry a reference.
    for base in [
        "get_p50",
        "get_p99",
        "get_by_ids_100",
        "upsert_100",
        "filter_keys_1000",
        "concurrent_get_64",
        "write_behind_8",
    ] {
        for measure in [base.to_string(), format!("{base}_nocompress")] {
            if measure == "filter_keys_1000_nocompress" {
                continue; // filter_keys never reads a value: compression cannot change it
            }
            let (ours, reference) = figure(&m, &measure);
            assert!(ours > 0.0, "{measure}: ours = {ours}");
            assert!(reference.is_some(), "{measure}: no redis-benchmark figure");
        }
    }
    // What the codec changes, with zstd too.
    for measure in [
        "get_p50_zstd",
        "get_p99_zstd",
        "get_by_ids_100_zstd",
        "upsert_100_zstd",
    ] {
        let (ours, reference) = figure(&m, measure);
        assert!(ours > 0.0, "{measure}: ours = {ours}");
        assert!(reference.is_some(), "{measure}: no redis-benchmark figure");
    }
    // Reported without a reference.
    for measure in [
        "all_keys_100k",
        "memory_ratio",
        "memory_ratio_nocompress",
        "memory_ratio_zstd",
        "lz4_ratio_chunk",
        "lz4_ratio_cache",
        "zstd_ratio_chunk",
        "zstd_ratio_cache",
        "alloc_bytes_per_get_by_ids_item",
        "pool_size",
    ] {
        let (ours, reference) = figure(&m, measure);
        assert!(ours > 0.0, "{measure}: ours = {ours}");
        assert_eq!(reference, None, "{measure} has no reference");
    }
    // The text must compress like prose, not like a small vocabulary (which would flatter
    // memory_ratio), and compression must shrink what Redis holds.
    let (lz4, _) = figure(&m, "lz4_ratio_chunk");
    assert!((1.1..2.6).contains(&lz4), "lz4 ratio of the chunks: {lz4}");
    let (compressed, _) = figure(&m, "memory_ratio");
    let (plain, _) = figure(&m, "memory_ratio_nocompress");
    assert!(
        compressed < plain,
        "memory ratio with lz4 {compressed} not below {plain} without"
    );
    let (zstd, _) = figure(&m, "memory_ratio_zstd");
    assert!(
        zstd < compressed,
        "memory ratio with zstd {zstd} not below lz4's {compressed}"
    );
    let (zstd_chunk, _) = figure(&m, "zstd_ratio_chunk");
    assert!(
        zstd_chunk > lz4,
        "zstd ratio {zstd_chunk} not above lz4's {lz4}"
    );
}

/// `--only-zstd` runs the zstd variants alone, at `--zstd-level` (3, not the default), on the
/// text of `--corpus`.
#[test]
fn only_zstd_at_a_level_on_a_corpus() {
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");
    let m = run(&[
        "--quick",
        "--only-zstd",
        "--zstd-level",
        "3",
        "--corpus",
        corpus,
        "--only",
        "upsert",
    ]);
    let (ours, reference) = figure(&m, "upsert_100_zstd");
    assert!(ours > 0.0 && reference.is_some(), "{m:?}");
    figure(&m, "memory_ratio_zstd");
    for absent in [
        "upsert_100",
        "upsert_100_nocompress",
        "memory_ratio_nocompress",
        "get_p50_zstd",
    ] {
        assert!(!m.contains_key(absent), "{absent} in {m:?}");
    }
    let (z3, _) = figure(&m, "zstd_ratio_chunk");
    let (lz4, _) = figure(&m, "lz4_ratio_chunk");
    assert!(z3 > lz4, "zstd level 3 {z3} vs lz4 {lz4}");
}

#[test]
fn connections_mode_reads_over_every_connection_without_error() {
    let m = run(&["--quick", "--connections", "300"]);
    assert_eq!(figure(&m, "connections_held").0, 300.0);
    assert_eq!(figure(&m, "connections_that_served_gets").0, 300.0);
    assert_eq!(figure(&m, "errors").0, 0.0);
    let (reads, _) = figure(&m, "reads");
    assert!(reads >= 300.0, "reads = {reads}");
    let (p50, _) = figure(&m, "get_p50");
    let (p99, _) = figure(&m, "get_p99");
    assert!(p50 > 0.0 && p50 <= p99, "p50 {p50}, p99 {p99}");
}

#[test]
fn unknown_measure_is_refused_by_name() {
    let out = Command::new(support::example_bin("loadtest", &[]))
        .args(["--only", "get,no_such_measure"])
        .output()
        .expect("running the loadtest example");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no_such_measure"), "{stderr}");
}
