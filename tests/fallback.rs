//! The fallback journal (`KV_FALLBACK=json`) against real `redis-server` processes: what
//! `index_done_callback` says offline, torn and failed appends, journals of another target,
//! the clean-up order, and the `graphrag-kv journal` commands.
//!
//! Journals are written the way production writes them: by a `graphrag-kv put` process run
//! while Redis is down (it journals the write and exits, leaving an orphan), or by this test
//! binary re-run as a child process.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graphrag_kv::{BackendKind, KvStore, Storage, StoreConfig, WriteBehindConfig};
use serde_json::{json, Value};
use support::{config_set, RedisServer};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_graphrag-kv");

/// Set in the environment of this binary when it runs as a child process; the value names
/// the child's job.
const CHILD_ENV: &str = "GRAPHRAG_KV_FALLBACK_CHILD";

/// What a run of the binary produced.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A `graphrag-kv` command with an empty environment except `PATH`, configured for Redis at
/// `url` with key prefix `prefix`, the fallback journal in `dir`, and short timeouts (an
/// unreachable server is noticed within about a second).
fn cli(url: &str, prefix: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.stdin(Stdio::null())
        .env("STORAGE_KV_BACKEND", "redis")
        .env("REDIS_URL", url)
        .env("REDIS_KEY_PREFIX", prefix)
        .env("REDIS_RETRIES", "0")
        .env("REDIS_POOL_TIMEOUT", "0.3")
        .env("REDIS_CONNECTION_TIMEOUT", "0.2")
        .env("KV_FALLBACK", "json")
        .env("KV_FALLBACK_DIR", dir);
    cmd
}

fn output(cmd: &mut Command) -> Out {
    let o = cmd.output().expect("running graphrag-kv");
    Out {
        code: o.status.code().expect("graphrag-kv was killed by a signal"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Journals one write from a `graphrag-kv put` process while Redis is down at `url`; the
/// process exits and leaves its journal behind as an orphan.
fn journal_put(url: &str, prefix: &str, dir: &Path, ns: &str, id: &str, value: &str) {
    let before = journal_files(dir).len();
    let out = output(cli(url, prefix, dir).args(["put", ns, id, value]));
    assert!(
        !out.stderr.contains("panicked"),
        "graphrag-kv put panicked: {out:#?}"
    );
    assert_eq!(
        journal_files(dir).len(),
        before + 1,
        "graphrag-kv put while Redis is down leaves one journal: {out:#?}"
    );
}

/// As [`journal_put`], for a key prefix other than that of the journals already in `dir`
/// (a process of that prefix would refuse to open on them): written in a directory of its own,
/// then moved in. Returns the journal's path.
fn foreign_journal_put(
    url: &str,
    prefix: &str,
    dir: &Path,
    ns: &str,
    id: &str,
    value: &str,
) -> PathBuf {
    let own = tempfile::tempdir().unwrap();
    journal_put(url, prefix, own.path(), ns, id, value);
    let from = journal_files(own.path()).pop().unwrap();
    let to = dir.join(from.file_name().unwrap());
    std::fs::rename(&from, &to).unwrap();
    to
}

/// The journal files of `dir`, oldest first.
fn journal_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("journal-") && n.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files
}

fn config(url: &str, prefix: &str) -> graphrag_kv::StoreConfigBuilder {
    StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url)
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(200))
        .pool_timeout(Duration::from_millis(400))
        .retries(0)
}

/// A store reading Redis directly (no fallback): what is really there.
fn direct(server: &RedisServer, prefix: &str, ns: &str) -> Arc<dyn KvStore> {
    Storage::open(&config(&server.url(), prefix).build().unwrap())
        .unwrap()
        .namespace(ns)
        .unwrap()
}

#[test]
fn index_done_callback_offline_is_an_error_counting_journaled_writes() {
    let mut server = RedisServer::start();
    let tmp = tempfile::tempdir().unwrap();
    // Created with its missing parents on the first open.
    let dir = tmp.path().join("a").join("journal");
    let storage = Storage::open(
        &config(&server.url(), "idc")
            .fallback_dir(dir.as_path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    store.upsert(vec![("acked".into(), json!(1))]).unwrap();
    server.stop();
    // The outage is noticed by this write, which goes to the journal.
    store.upsert(vec![("a".into(), json!(2))]).unwrap();
    store.delete_by_ids(&["b".into()]).unwrap();
    assert!(!storage.fallback().unwrap().is_online());
    let e = store.index_done_callback().unwrap_err();
    assert!(e.is_connection(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("Redis is unreachable"), "{text}");
    assert!(text.contains("2 writes"), "{text}");
    assert!(
        text.contains(&dir.as_path().display().to_string()),
        "the message names the journal directory: {text}"
    );
}

#[test]
fn index_done_callback_that_finds_redis_down_goes_offline_with_the_same_error() {
    let mut server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &config(&server.url(), "idc2")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    store.upsert(vec![("acked".into(), json!(1))]).unwrap();
    server.stop();
    let e = store.index_done_callback().unwrap_err();
    assert!(e.is_connection(), "{e:?}");
    assert!(e.to_string().contains("Redis is unreachable"), "{e}");
    assert!(e.to_string().contains("0 writes"), "{e}");
    assert!(!storage.fallback().unwrap().is_online());
}

/// Write-behind over the fallback, as `Storage` stacks them: writes the queue could not send
/// before its close deadline (Redis refuses them with NOREPLICAS, a passing state and not an
/// outage, so the fallback did not journal them as it sent them) are parked in the store below
/// it, the fallback, which journals them; the next open replays them once Redis takes writes.
#[test]
fn write_behind_parks_unsent_writes_in_the_journal_at_close() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&server.url(), "park")
        .fallback_dir(dir.path())
        .write_behind(
            WriteBehindConfig::builder()
                .flush_timeout(Duration::from_millis(700))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let mut admin = server.conn();
    {
        let storage = Storage::open(&cfg).unwrap();
        let store = storage.namespace("text_chunks").unwrap();
        store.upsert(vec![("old".into(), json!(0))]).unwrap();
        store.flush().unwrap();
        config_set(&mut admin, "min-replicas-to-write", "1");
        store
            .upsert(vec![("a".into(), json!(1)), ("b".into(), json!(2))])
            .unwrap();
        store.delete_by_ids(&["old".into()]).unwrap();
        let e = storage.close().unwrap_err();
        assert!(e.is_retryable(), "{e}");
        // The last handle: the queue's final flush gives up at its deadline and parks.
        drop(store);
    }
    assert_eq!(
        journal_files(dir.path()).len(),
        1,
        "the parked writes' journal"
    );
    let redis = direct(&server, "park", "text_chunks");
    assert_eq!(redis.get_by_id("a").unwrap(), None, "not in Redis yet");
    assert_eq!(redis.get_by_id("old").unwrap(), Some(json!(0)));

    config_set(&mut admin, "min-replicas-to-write", "0");
    let storage = Storage::open(&cfg).unwrap();
    assert_eq!(
        storage.fallback().unwrap().pending_writes(),
        0,
        "replayed at open"
    );
    assert!(journal_files(dir.path()).is_empty());
    assert_eq!(redis.get_by_id("a").unwrap(), Some(json!(1)));
    assert_eq!(redis.get_by_id("b").unwrap(), Some(json!(2)));
    assert_eq!(
        redis.get_by_id("old").unwrap(),
        None,
        "the parked delete replayed"
    );
}

/// A journal whose last line was cut inside a multi-byte character (a crash in the middle of
/// an append) still opens; every whole line is replayed and the torn tail is cut off.
#[test]
fn journal_torn_inside_a_utf8_character_opens_and_replays() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    journal_put(
        &url,
        "torn",
        dir.path(),
        "full_docs",
        "d1",
        r#"{"content": "Grüße"}"#,
    );
    let journal = journal_files(dir.path()).pop().unwrap();
    let whole = std::fs::read(&journal).unwrap();
    // Half of an append: the start of an entry ending in the first byte of "ü".
    let torn = "{\"op\":\"upsert\",\"ns\":\"full_docs\",\"items\":[[\"d2\",\"Gr\u{fc}\"]]}\n";
    let cut = torn.find('\u{fc}').unwrap() + 1;
    let mut bytes = whole.clone();
    bytes.extend_from_slice(&torn.as_bytes()[..cut]);
    std::fs::write(&journal, &bytes).unwrap();

    server.restart();
    let storage = Storage::open(
        &config(&url, "torn")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .expect("a torn last line must not make the store impossible to open");
    assert!(storage.fallback().unwrap().is_online());
    let store = direct(&server, "torn", "full_docs");
    assert_eq!(
        store.get_by_id("d1").unwrap(),
        Some(json!({"content": "Grüße"}))
    );
    assert_eq!(store.get_by_id("d2").unwrap(), None);
    assert!(journal_files(dir.path()).is_empty(), "replayed and removed");
}

/// The same torn journal, adopted while Redis is still down: the torn tail is cut off at open
/// (the file ends with its last whole line), and `journal list` reads it.
#[test]
fn torn_tail_is_truncated_when_the_journal_is_adopted() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    journal_put(&url, "torn2", dir.path(), "full_docs", "d1", r#""é""#);
    let journal = journal_files(dir.path()).pop().unwrap();
    let whole = std::fs::read(&journal).unwrap();
    let mut bytes = whole.clone();
    // Cut inside the two bytes of "é".
    bytes.extend_from_slice(&"{\"op\":\"clear\",\"ns\":\"é".as_bytes()[..21]);
    std::fs::write(&journal, &bytes).unwrap();
    let storage = Storage::open(
        &config(&url, "torn2")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(!storage.fallback().unwrap().is_online());
    assert_eq!(storage.fallback().unwrap().pending_writes(), 1);
    assert_eq!(std::fs::read(&journal).unwrap(), whole);
}

/// The child half of `failed_append_on_a_full_disk_is_cut_off_and_later_writes_survive`:
/// writes a small entry, one too large for the file size limit its shell set, and another
/// small one; prints what each returned, then dies without clean-up.
fn full_disk_child() {
    let url = std::env::var("CHILD_URL").unwrap();
    let dir = std::env::var("CHILD_DIR").unwrap();
    let storage = Storage::open(&config(&url, "efbig").fallback_dir(dir).build().unwrap()).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    let r1 = store.upsert(vec![("small-1".into(), json!("x"))]);
    let big = "y".repeat(64 * 1024);
    let r2 = store.upsert(vec![("big".into(), json!(big))]);
    let r3 = store.upsert(vec![("small-2".into(), json!("z"))]);
    let r4 = store.upsert(vec![("small-3".into(), json!("w"))]);
    println!("CHILD r1={:?}", r1.is_ok());
    println!(
        "CHILD r2={}",
        r2.as_ref()
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string())
    );
    println!(
        "CHILD r3={:?} {:?}",
        r3.is_ok(),
        r3.err().map(|e| e.to_string())
    );
    println!("CHILD r4={:?}", r4.is_ok());
    std::process::abort();
}

/// A write that fails half-way on a full disk (here: `ulimit -f`, with SIGXFSZ ignored so the
/// write returns EFBIG) is cut back off the journal: the next writes are appended after the
/// last whole line, not glued onto the fragment, and every acknowledged write is replayed.
#[test]
fn failed_append_on_a_full_disk_is_cut_off_and_later_writes_survive() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("full_disk") {
        full_disk_child();
        return;
    }
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // 16 blocks: 8 KiB (512-byte blocks) or 16 KiB; the big entry is 64 KiB.
    let out = Command::new("sh")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 16; exec \"$0\" --exact \"$1\" --nocapture --test-threads 1",
        ])
        .arg(&exe)
        .arg("failed_append_on_a_full_disk_is_cut_off_and_later_writes_survive")
        .env(CHILD_ENV, "full_disk")
        .env("CHILD_URL", &url)
        .env("CHILD_DIR", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("CHILD r1=true"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD r2=") && !stdout.contains("CHILD r2=ok"),
        "the big write must fail: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("CHILD r3=true"),
        "the write after a failed append must succeed: {stdout}\n{stderr}"
    );
    assert!(stdout.contains("CHILD r4=true"), "{stdout}\n{stderr}");
    let journal = journal_files(dir.path())
        .pop()
        .expect("the child's journal");
    let bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.ends_with(b"\n"), "the journal ends with a whole line");
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        if !line.is_empty() {
            serde_json::from_slice::<Value>(line)
                .unwrap_or_else(|e| panic!("line {} of the journal: {e}", n + 1));
        }
    }

    server.restart();
    let storage = Storage::open(
        &config(&url, "efbig")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .expect("the journal opens");
    assert!(storage.fallback().unwrap().is_online());
    let store = direct(&server, "efbig", "text_chunks");
    assert_eq!(store.get_by_id("small-1").unwrap(), Some(json!("x")));
    assert_eq!(store.get_by_id("big").unwrap(), None);
    assert_eq!(store.get_by_id("small-2").unwrap(), Some(json!("z")));
    assert_eq!(store.get_by_id("small-3").unwrap(), Some(json!("w")));
}

/// A journal written for one key prefix is not replayed into another: opening with a
/// different prefix (or server) is an error naming both, and nothing is written.
#[test]
fn journal_of_another_prefix_is_refused_not_replayed() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    journal_put(&url, "old-prefix", dir.path(), "full_docs", "d1", "1");
    server.restart();
    let e = Storage::open(
        &config(&url, "new-prefix")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .expect_err("a journal of another prefix must not be replayed here");
    let text = e.to_string();
    assert!(
        text.contains("old-prefix") && text.contains("new-prefix"),
        "{text}"
    );
    assert!(text.contains("graphrag-kv journal"), "{text}");
    assert_eq!(
        direct(&server, "new-prefix", "full_docs")
            .get_by_id("d1")
            .unwrap(),
        None
    );
    assert_eq!(journal_files(dir.path()).len(), 1, "the journal is kept");
    // The right configuration replays it.
    let storage = Storage::open(
        &config(&url, "old-prefix")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(storage.fallback().unwrap().is_online());
    assert_eq!(
        direct(&server, "old-prefix", "full_docs")
            .get_by_id("d1")
            .unwrap(),
        Some(json!(1))
    );
    assert!(journal_files(dir.path()).is_empty());
}

/// A journal is removed before its lock is released: whoever gets the lock of a replayed
/// journal finds the file gone, so nobody can adopt it and replay it again over newer writes.
/// Watchers wait for the locks of many journals while they are replayed and removed.
#[test]
fn replayed_journal_is_removed_before_its_lock_is_released() {
    const JOURNALS: usize = 20;
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    std::thread::scope(|s| {
        for i in 0..JOURNALS {
            let (url, dir) = (url.clone(), dir.path());
            s.spawn(move || {
                let out = output(cli(&url, "race", dir).args([
                    "put",
                    "text_chunks",
                    &format!("c{i}"),
                    "1",
                ]));
                assert!(!out.stderr.contains("panicked"), "{out:#?}");
            });
        }
    });
    let files = journal_files(dir.path());
    assert_eq!(files.len(), JOURNALS);
    // Adopted while Redis is down: this store holds every journal's lock.
    let storage = Storage::open(
        &config(&url, "race")
            .fallback_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let fallback = storage.fallback().unwrap().clone();
    assert!(!fallback.is_online());
    // Each watcher waits for a journal's lock and, the moment it has it, looks whether the
    // file is still there to be adopted.
    let watchers: Vec<_> = files
        .iter()
        .map(|path| {
            let path = path.clone();
            let file = std::fs::File::open(&path).unwrap();
            std::thread::spawn(move || {
                file.lock().unwrap();
                path.exists()
            })
        })
        .collect();
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fallback.is_online() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(fallback.is_online(), "the journals were replayed");
    let seen: Vec<bool> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
    let still_there = seen.iter().filter(|s| **s).count();
    assert_eq!(
        still_there, 0,
        "{still_there} of {JOURNALS} journals could be locked while still in the directory"
    );
    assert!(journal_files(dir.path()).is_empty());
}
/// `keys` says how many journaled writes of the namespace are not in Redis yet.
#[test]
fn keys_warns_about_journaled_writes_not_in_redis() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    journal_put(&url, "kw", dir.path(), "text_chunks", "journaled-1", "2");
    journal_put(&url, "kw", dir.path(), "text_chunks", "journaled-2", "3");
    journal_put(&url, "kw", dir.path(), "full_docs", "other", "4");
    server.restart();
    let out = output(cli(&url, "kw", dir.path()).args(["keys", "text_chunks"]));
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr.contains("2 journaled writes") && out.stderr.contains("journal list"),
        "{out:#?}"
    );
}

/// Asserts a failed run: exit 2, one `graphrag-kv: ` line on stderr holding every needle.
#[track_caller]
fn fails(out: Out, needles: &[&str]) {
    assert_eq!(out.code, 2, "expected exit status 2: {out:#?}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out:#?}");
    assert!(out.stderr.starts_with("graphrag-kv: "), "{out:#?}");
    for n in needles {
        assert!(out.stderr.contains(n), "expected {n:?} in: {out:#?}");
    }
}

/// Asserts a successful run and returns its stdout.
#[track_caller]
fn ok(out: Out) -> String {
    assert_eq!(out.code, 0, "expected success: {out:#?}");
    assert!(!out.stderr.contains("graphrag-kv: "), "{out:#?}");
    out.stdout
}

/// A store of this process writing offline: its journal is live (locked) while it exists.
fn live_journal(url: &str, prefix: &str, dir: &Path) -> (Storage, Arc<dyn KvStore>) {
    let storage = Storage::open(&config(url, prefix).fallback_dir(dir).build().unwrap()).unwrap();
    let store = storage.namespace("full_docs").unwrap();
    store.upsert(vec![("live".into(), json!(1))]).unwrap();
    assert!(!storage.fallback().unwrap().is_online());
    (storage, store)
}

#[test]
fn journal_list_shows_owner_target_and_writes_never_the_password() {
    let mut server = RedisServer::start();
    let port = server.port();
    server.stop();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    // The live store first: opened later, it would adopt the orphan.
    let (_storage, _store) = live_journal(&url, "jl", dir.path());
    journal_put(&url, "jl", dir.path(), "full_docs", "d1", "1");
    foreign_journal_put(&url, "other", dir.path(), "text_chunks", "c1", "2");
    let files = journal_files(dir.path());
    assert_eq!(files.len(), 3);
    for f in &files {
        let bytes = String::from_utf8(std::fs::read(f).unwrap()).unwrap();
        assert!(
            !bytes.contains("s3cret"),
            "the password is in {}",
            f.display()
        );
        assert!(bytes.contains("<redacted>"), "{bytes}");
    }

    let text = ok(output(
        cli(&url, "jl", dir.path()).args(["journal", "list"]),
    ));
    assert!(!text.contains("s3cret"), "{text}");
    for f in &files {
        assert!(text.contains(&f.display().to_string()), "{text}");
    }
    assert_eq!(text.matches("gone (orphaned").count(), 2, "{text}");
    assert_eq!(text.matches("alive (holds").count(), 1, "{text}");
    assert!(
        text.contains(&format!(
            "redis://:<redacted>@127.0.0.1:{port} (prefix \"jl\"): the configured target"
        )),
        "{text}"
    );
    assert!(
        text.contains("(prefix \"other\"): NOT the configured target"),
        "{text}"
    );
    assert!(text.contains("writes: full_docs 1"), "{text}");
    assert!(text.contains("writes: text_chunks 1"), "{text}");
    assert!(text.contains("created: 20"), "{text}");

    // --dir instead of KV_FALLBACK_DIR, and JSON.
    let mut cmd = cli(&url, "jl", dir.path());
    cmd.env_remove("KV_FALLBACK_DIR");
    let text = ok(output(
        cmd.args(["journal", "list", "--json", "--dir"])
            .arg(dir.path()),
    ));
    assert!(!text.contains("s3cret"), "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    let list = doc.as_array().unwrap();
    assert_eq!(list.len(), 3);
    let alive: Vec<bool> = list
        .iter()
        .map(|j| j["owner_alive"].as_bool().unwrap())
        .collect();
    assert_eq!(alive.iter().filter(|a| **a).count(), 1, "{text}");
    let other = list.iter().find(|j| j["prefix"] == "other").unwrap();
    assert_eq!(other["matches_configured_target"], json!(false));
    assert_eq!(other["writes"], json!({"text_chunks": 1}));
    assert!(other["pid"].as_u64().is_some(), "{text}");

    let empty = tempfile::tempdir().unwrap();
    let text = ok(output(
        cli(&url, "jl", empty.path()).args(["journal", "list"]),
    ));
    assert!(text.starts_with("no journals in"), "{text}");
}

#[test]
fn journal_replay_refuses_other_targets_and_replays_orphans() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    journal_put(&url, "rp", dir.path(), "full_docs", "d1", "1");
    journal_put(&url, "rp", dir.path(), "full_docs", "d1", "2");
    let foreign = foreign_journal_put(&url, "rp-other", dir.path(), "full_docs", "x", "3");
    server.restart();

    // Refused: one journal belongs to another prefix; nothing is replayed.
    fails(
        output(cli(&url, "rp", dir.path()).args(["journal", "replay"])),
        &["rp-other", "--force", &foreign.display().to_string()],
    );
    assert_eq!(
        direct(&server, "rp", "full_docs").get_by_id("d1").unwrap(),
        None
    );
    assert_eq!(journal_files(dir.path()).len(), 3);

    // Every orphan is checked before anything is written: the other prefix is refused too.
    fails(
        output(cli(&url, "rp-other", dir.path()).args(["journal", "replay"])),
        &["\"rp\"", "--force"],
    );
    assert_eq!(
        direct(&server, "rp-other", "full_docs")
            .get_by_id("x")
            .unwrap(),
        None
    );
    assert_eq!(journal_files(dir.path()).len(), 3);

    // Settled: the foreign journal discarded by name, then ours replayed.
    ok(output(
        cli(&url, "rp", dir.path())
            .args(["journal", "discard", "--yes"])
            .arg(&foreign),
    ));
    assert_eq!(journal_files(dir.path()).len(), 2);
    let text = ok(output(
        cli(&url, "rp", dir.path()).args(["journal", "replay"]),
    ));
    assert_eq!(text.matches("replayed ").count(), 2, "{text}");
    // In order: the later write wins.
    assert_eq!(
        direct(&server, "rp", "full_docs").get_by_id("d1").unwrap(),
        Some(json!(2))
    );
    assert!(journal_files(dir.path()).is_empty());
    let text = ok(output(
        cli(&url, "rp", dir.path()).args(["journal", "replay"]),
    ));
    assert!(text.starts_with("no orphaned journals"), "{text}");
}

/// A journal of an older version (no header) is refused at open, and `journal replay`
/// replays it only with `--force`.
#[test]
fn journal_without_header_is_refused_until_replayed_with_force() {
    let server = RedisServer::start();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("journal-999999-1.jsonl");
    std::fs::write(
        &legacy,
        "{\"op\":\"upsert\",\"ns\":\"full_docs\",\"items\":[[\"legacy\",5]]}\n",
    )
    .unwrap();
    let e = Storage::open(&config(&url, "lg").fallback_dir(dir.path()).build().unwrap())
        .expect_err("a journal without a header must not be replayed blindly");
    assert!(matches!(e, graphrag_kv::Error::Journal { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("no header"), "{text}");
    assert!(
        text.contains("graphrag-kv journal replay --force"),
        "{text}"
    );
    assert!(text.contains("graphrag-kv journal discard --yes"), "{text}");
    assert!(legacy.exists());

    fails(
        output(cli(&url, "lg", dir.path()).args(["journal", "replay"])),
        &["no header", "--force"],
    );
    assert_eq!(
        direct(&server, "lg", "full_docs")
            .get_by_id("legacy")
            .unwrap(),
        None
    );
    let text = ok(output(
        cli(&url, "lg", dir.path()).args(["journal", "replay", "--force"]),
    ));
    assert!(text.contains("journal-999999-1.jsonl (1 write)"), "{text}");
    assert_eq!(
        direct(&server, "lg", "full_docs")
            .get_by_id("legacy")
            .unwrap(),
        Some(json!(5))
    );
    assert!(!legacy.exists());
    Storage::open(&config(&url, "lg").fallback_dir(dir.path()).build().unwrap()).unwrap();
}

/// `journal discard` deletes nothing without `--yes`, and never a live process's journal.
#[test]
fn journal_discard_needs_yes_and_keeps_live_journals() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let dir = tempfile::tempdir().unwrap();
    let (_storage, _store) = live_journal(&url, "dc", dir.path());
    let live = journal_files(dir.path()).pop().unwrap();
    journal_put(&url, "dc", dir.path(), "full_docs", "d1", "1");
    let orphan = journal_files(dir.path())
        .into_iter()
        .find(|p| *p != live)
        .unwrap();
    assert_eq!(journal_files(dir.path()).len(), 2);

    fails(
        output(cli(&url, "dc", dir.path()).args(["journal", "discard"])),
        &["--yes", "1 orphaned journal holding 1 write"],
    );
    assert_eq!(journal_files(dir.path()).len(), 2);
    fails(
        output(cli(&url, "dc", dir.path()).args([
            "journal",
            "discard",
            "--yes",
            "journal-1-2.jsonl",
        ])),
        &["no such journal", "journal-1-2.jsonl"],
    );
    let text = ok(output(
        cli(&url, "dc", dir.path()).args(["journal", "discard", "--yes"]),
    ));
    assert!(
        text.contains(&format!("discarded {} (1 write lost)", orphan.display())),
        "{text}"
    );
    assert!(text.contains("a live process holds it"), "{text}");
    assert_eq!(journal_files(dir.path()), vec![live]);
}
