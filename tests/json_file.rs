//! The JSON-file backend: the conformance suite, plus nano-graphrag file compatibility, atomic
//! saves, corrupt files and the directory lock.

mod support;

use std::sync::Arc;

use graphrag_kv::backend::json_file::{file_name, JsonDir, LOCK_FILE};
use graphrag_kv::{Error, KvStore, Storage, StoreConfig};
use serde_json::json;

fn json_backend() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    (dir, move |ns: &str| storage.namespace(ns).unwrap())
}

support::conformance::conformance_tests!(json_backend);
support::conformance_typed::typed_conformance_tests!(json_backend);

/// Written by Python: `json.dump(obj, f, indent=2, ensure_ascii=False)`.
const PYTHON_FILE: &str = "{\n  \"chunk-1\": {\n    \"tokens\": 5,\n    \"content\": \"Grüße, 世界 — naïve café \\\"q\\\" \\\\ tab\\t🦀\",\n    \"chunk_order_index\": 0,\n    \"full_doc_id\": \"doc-1\"\n  },\n  \"chunk-2\": {\n    \"tokens\": 0,\n    \"content\": \"\",\n    \"chunk_order_index\": 1,\n    \"full_doc_id\": \"doc-1\",\n    \"score\": 0.5,\n    \"tags\": [],\n    \"meta\": {}\n  }\n}";

#[test]
fn python_file_loads_and_saves_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name("text_chunks"));
    std::fs::write(&path, PYTHON_FILE).unwrap();
    {
        let d = JsonDir::open(dir.path()).unwrap();
        let s = d.namespace("text_chunks").unwrap();
        let v = s.get_by_id("chunk-1").unwrap().unwrap();
        assert_eq!(v["content"], "Grüße, 世界 — naïve café \"q\" \\ tab\t🦀");
        // Touch the data so a save really happens, restoring the same content.
        s.upsert(vec![(
            "chunk-2".into(),
            s.get_by_id("chunk-2").unwrap().unwrap(),
        )])
        .unwrap();
        s.index_done_callback().unwrap();
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), PYTHON_FILE);
}

#[test]
fn writes_are_saved_by_checkpoint_and_by_drop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name("full_docs"));
    let d = JsonDir::open(dir.path()).unwrap();
    let s = d.namespace("full_docs").unwrap();
    s.upsert(vec![("doc-1".into(), json!({"content": "a"}))])
        .unwrap();
    assert!(!path.exists(), "nothing is written before a checkpoint");
    s.index_done_callback().unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved, json!({"doc-1": {"content": "a"}}));
    s.upsert(vec![("doc-2".into(), json!({"content": "b"}))])
        .unwrap();
    drop(s);
    drop(d);
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(saved["doc-2"], json!({"content": "b"}));
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn corrupt_file_is_refused_with_position_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name("text_chunks"));
    let truncated = &PYTHON_FILE[..PYTHON_FILE.len() / 2];
    std::fs::write(&path, truncated).unwrap();
    let d = JsonDir::open(dir.path()).unwrap();
    let err = d.namespace("text_chunks").unwrap_err();
    match &err {
        Error::CorruptFile { path: p, line, .. } => {
            assert_eq!(p, &path);
            assert!(*line > 1, "{err}");
        }
        other => panic!("expected CorruptFile, got {other}"),
    }
    assert!(
        err.to_string().contains("kv_store_text_chunks.json"),
        "{err}"
    );
    // Other namespaces still open, and nothing overwrites the corrupt file.
    let other = d.namespace("full_docs").unwrap();
    other.upsert(vec![("x".into(), json!(1))]).unwrap();
    other.index_done_callback().unwrap();
    drop(other);
    drop(d);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), truncated);
}

#[test]
fn non_object_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file_name("a")), "[1, 2]").unwrap();
    let err = JsonDir::open(dir.path())
        .unwrap()
        .namespace("a")
        .unwrap_err();
    assert!(err.to_string().contains("expected a JSON object"), "{err}");
}

#[test]
fn second_writer_process_is_locked_out_and_readers_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let writer = JsonDir::open(dir.path()).unwrap();
    let s = writer.namespace("full_docs").unwrap();
    s.upsert(vec![("d".into(), json!({"content": "x"}))])
        .unwrap();
    s.index_done_callback().unwrap();

    // Another process: run this test binary's helper mode in a child.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_probe_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env("LOCK_PROBE_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("WRITE: locked"), "{stdout}");
    assert!(stdout.contains("READ: {\"content\":\"x\"}"), "{stdout}");
    assert!(dir.path().join(LOCK_FILE).exists());
}

/// Run as a child process by the test above (does nothing when run directly).
#[test]
fn lock_probe_child() {
    let Some(dir) = std::env::var_os("LOCK_PROBE_DIR") else {
        return;
    };
    match JsonDir::open(&dir) {
        Err(e @ Error::Locked { .. }) => {
            assert!(e.to_string().contains("locked"));
            println!("WRITE: locked");
        }
        Err(e) => println!("WRITE: other error {e}"),
        Ok(_) => println!("WRITE: opened"),
    }
    let ro = JsonDir::open_read_only(&dir)
        .namespace("full_docs")
        .unwrap();
    println!("READ: {}", ro.get_by_id("d").unwrap().unwrap());
    assert!(matches!(
        ro.upsert(vec![("e".into(), json!(1))]),
        Err(Error::ReadOnly { .. })
    ));
}

/// One writing `Storage` per directory: its handles share one map; a second writing
/// `Storage` of the same directory in the same process is refused like a second process
/// (no process-wide registry to share it through), and allowed once the first is gone.
#[test]
fn same_directory_twice_in_one_process_is_one_storage() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    let a = storage.namespace("ns").unwrap();
    let b = storage.namespace("ns").unwrap();
    a.upsert(vec![("k".into(), json!("v"))]).unwrap();
    assert_eq!(b.get_by_id("k").unwrap(), Some(json!("v")));
    assert!(matches!(Storage::open(&config), Err(Error::Locked { .. })));
    drop((a, b, storage));
    let again = Storage::open(&config).unwrap().namespace("ns").unwrap();
    assert_eq!(again.get_by_id("k").unwrap(), Some(json!("v")));
}

#[test]
fn list_namespaces_reads_the_files() {
    let (dir, open) = json_backend();
    for ns in ["full_docs", "text_chunks"] {
        let s = open(ns);
        s.upsert(vec![("a".into(), json!(1))]).unwrap();
        s.index_done_callback().unwrap();
    }
    std::fs::write(dir.path().join("unrelated.json"), "{}").unwrap();
    let storage = Storage::open_read_only(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        storage.list_namespaces().unwrap(),
        ["full_docs", "text_chunks"]
    );
}

/// The mode a file created with `File::create` gets here (0666 less the umask), found by
/// creating one, so the test does not have to change the process-wide umask.
#[cfg(unix)]
fn file_create_mode(dir: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join("probe-file-create-mode");
    std::fs::File::create(&probe).unwrap();
    let mode = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o7777;
    std::fs::remove_file(&probe).unwrap();
    mode
}

#[cfg(unix)]
fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A save keeps the mode of the file it replaces (a query service running as another user in
/// the file's group must still read it), and a new file gets `File::create`'s mode.
#[cfg(unix)]
#[test]
fn save_keeps_the_file_mode_and_new_files_get_file_create_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (ns, mode) in [
        ("full_docs", 0o640),
        ("text_chunks", 0o644),
        ("community_reports", 0o604),
    ] {
        let path = dir.path().join(file_name(ns));
        std::fs::write(&path, "{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let expected_new = file_create_mode(dir.path());
    // The group too, when this process may set it (root may give any group).
    let group_path = dir.path().join(file_name("full_docs"));
    let group_set = std::os::unix::fs::chown(&group_path, None, Some(4242)).is_ok();
    {
        let storage = Storage::open(
            &StoreConfig::builder()
                .working_dir(dir.path())
                .build()
                .unwrap(),
        )
        .unwrap();
        for ns in [
            "full_docs",
            "text_chunks",
            "community_reports",
            "llm_response_cache",
        ] {
            let s = storage.namespace(ns).unwrap();
            for round in 0..2 {
                s.upsert(vec![("k".into(), json!({ "round": round }))])
                    .unwrap();
                s.index_done_callback().unwrap();
            }
        }
    }
    for (ns, mode) in [
        ("full_docs", 0o640),
        ("text_chunks", 0o644),
        ("community_reports", 0o604),
        ("llm_response_cache", expected_new),
    ] {
        let path = dir.path().join(file_name(ns));
        assert_eq!(
            mode_of(&path),
            mode,
            "mode of {} after two saves: {:o}, expected {:o}",
            path.display(),
            mode_of(&path),
            mode
        );
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(saved, json!({"k": {"round": 1}}));
    }
    if group_set {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&group_path).unwrap().gid(), 4242);
    }
}

/// Python's `json.dump` writes `NaN`, `Infinity` and `-Infinity` for non-finite floats (its
/// default `allow_nan=True`). Such a file, written here by python3 itself, loads: each of those
/// numbers reads as null (the text of strings holding the same words is untouched), and the
/// next save writes null, which Python and serde_json both read.
#[test]
fn python_nan_and_infinity_read_as_null() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name("text_chunks"));
    let script = r#"
import json, sys
data = {
    "chunk-1": {"score": float("nan"), "content": "NaN and Infinity in text, -Infinity"},
    "chunk-2": {"vec": [1.5, float("inf"), float("-inf")], "nested": {"x": [float("nan")]}},
    "chunk-3": {"tokens": 3},
    "NaN": float("inf"),
}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
"#;
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains(": NaN") && written.contains("-Infinity"),
        "{written}"
    );
    {
        let d = JsonDir::open(dir.path()).unwrap();
        let s = d.namespace("text_chunks").unwrap();
        assert_eq!(
            s.get_by_id("chunk-1").unwrap(),
            Some(json!({"score": null, "content": "NaN and Infinity in text, -Infinity"}))
        );
        assert_eq!(
            s.get_by_id("chunk-2").unwrap(),
            Some(json!({"vec": [1.5, null, null], "nested": {"x": [null]}}))
        );
        assert_eq!(s.get_by_id("NaN").unwrap(), Some(json!(null)));
        assert_eq!(s.get_by_id("chunk-3").unwrap(), Some(json!({"tokens": 3})));
        s.upsert(vec![("chunk-4".into(), json!({"tokens": 4}))])
            .unwrap();
        s.index_done_callback().unwrap();
    }
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(
        !saved.contains(": NaN") && !saved.contains("Infinity,"),
        "{saved}"
    );
    let reread: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(reread["chunk-2"]["vec"], json!([1.5, null, null]));
    assert_eq!(
        reread["chunk-1"]["content"],
        "NaN and Infinity in text, -Infinity"
    );
}
