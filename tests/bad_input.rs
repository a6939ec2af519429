//! The bad-input matrix: each case expects a clear error naming what was wrong, no panic, and
//! every value stored before it still there, byte for byte. Real redis-server processes and
//! real files; nothing is mocked.
//!
//! docs/SECURITY.md ("Untrusted data") points at these tests.

mod support;

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::codec::{Codec, FRAME_MAGIC, MAX_VALUE_BYTES, ZSTD_FRAME_MAGIC};
use graphrag_kv::{
    BackendKind, Compression, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder,
};
use serde_json::{json, Value};
use support::RedisServer;

fn redis_config(server: &RedisServer, prefix: &str) -> StoreConfigBuilder {
    StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
}

fn redis_store(server: &RedisServer, prefix: &str, ns: &str) -> Arc<dyn KvStore> {
    Storage::open(&redis_config(server, prefix).build().unwrap())
        .unwrap()
        .namespace(ns)
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Text that does not compress much (letters from the noise above).
fn noisy_text(len: usize, seed: u64) -> String {
    noise(len, seed)
        .into_iter()
        .map(|b| (b'a' + b % 26) as char)
        .collect()
}

fn raw_get(conn: &mut redis::Connection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query(conn).unwrap()
}

fn raw_set(conn: &mut redis::Connection, key: &str, bytes: &[u8]) {
    redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .query::<()>(conn)
        .unwrap();
}

/// Some values stored first, to check after each bad input that they are all still there.
fn seed_values() -> Vec<(String, Value)> {
    (0..20)
        .map(|i| {
            (
                format!("keep-{i}"),
                json!({"n": i, "content": noisy_text(50 + i * 300, i as u64 + 1)}),
            )
        })
        .collect()
}

/// The error of opening `ns` (a store is not `Debug`, so `unwrap_err` is not available).
fn namespace_error(storage: &Storage, ns: &str) -> Error {
    match storage.namespace(ns) {
        Ok(_) => panic!("namespace {ns:?} must be refused"),
        Err(e) => e,
    }
}

fn assert_intact(store: &dyn KvStore, seeded: &[(String, Value)]) {
    let ids: Vec<String> = seeded.iter().map(|(id, _)| id.clone()).collect();
    let got = store.get_by_ids(&ids, None).unwrap();
    for ((id, want), got) in seeded.iter().zip(got) {
        assert_eq!(got.as_ref(), Some(want), "{id} changed or disappeared");
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn invalid_env_values_name_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    let store = storage.namespace("docs").unwrap();
    let seeded = seed_values();
    store.upsert(seeded.clone()).unwrap();

    // (variable, value, text the error must contain besides the variable and the value)
    let cases: &[(&str, &str, &str)] = &[
        ("STORAGE_KV_BACKEND", "mongo", "json, redis or dual"),
        ("STORAGE_KV_BACKEND", "jsonl", "json, redis or dual"),
        ("REDIS_MAX_CONNECTIONS", "0", "an integer from 1"),
        ("REDIS_MAX_CONNECTIONS", "-3", "an integer from 1"),
        ("REDIS_MAX_CONNECTIONS", "ten", "an integer from 1"),
        (
            "REDIS_MAX_CONNECTIONS",
            "99999999999999999999999",
            "an integer",
        ),
        ("REDIS_CONNECTION_TIMEOUT", "-1", "above 0"),
        ("REDIS_SOCKET_TIMEOUT", "5s", "above 0"),
        ("REDIS_SOCKET_TIMEOUT", "inf", "above 0"),
        ("REDIS_SOCKET_TIMEOUT", "NaN", "above 0"),
        ("REDIS_SOCKET_TIMEOUT", "1e400", "above 0"),
        ("REDIS_POOL_TIMEOUT", "0", "above 0"),
        ("REDIS_RETRIES", "101", "from 0 to 100"),
        ("REDIS_RETRY_ON_TIMEOUT", "sometimes", "yes/no"),
        ("REDIS_HEALTH_CHECK_INTERVAL", "-1", "0 or more"),
        ("REDIS_KEY_PREFIX", "a:b", "ambiguous"),
        ("REDIS_KEY_PREFIX", "a*", "A-Z a-z 0-9"),
        ("REDIS_KEY_PREFIX", "nano graphrag", "A-Z a-z 0-9"),
        ("REDIS_COMPRESSION", "gzip", "lz4, zstd or none"),
        ("REDIS_COMPRESSION_LEVEL", "99", "from 1 to 19"),
        ("REDIS_COMPRESSION_MIN_BYTES", "-1", "an integer"),
        ("REDIS_CLUSTER", "maybe", "auto, or true/false"),
        ("REDIS_READ_FROM_REPLICAS", "2", "yes/no"),
        ("REDIS_WAIT_REPLICAS", "x", "an integer"),
        ("REDIS_WAIT_TIMEOUT", "0", "above 0"),
        ("REDIS_TTL_LLM_CACHE", "-1", "0 or more"),
        ("REDIS_TTL_DOCS", "1.5", "0 or more"),
        ("REDIS_TTL_MY_NAMESPACE", "forever", "0 or more"),
        ("REDIS_URL", "http://localhost:6379", "redis:// URLs"),
        ("REDIS_URL", "localhost:6379", "redis:// URLs"),
        ("REDIS_URL", "redis://localhost:99999", "redis:// URLs"),
        (
            "REDIS_URL",
            "redis://localhost:6379/notadb",
            "redis:// URLs",
        ),
        // Of several URLs, the one at fault is shown.
        (
            "REDIS_URL",
            "redis://localhost:6379,ftp://x",
            "redis:// URLs",
        ),
        ("REDIS_SENTINEL_URLS", "sentinel-1:26379", "redis:// URLs"),
        // TLS through Sentinel would reach the master in clear text: refused.
        (
            "REDIS_SENTINEL_URLS",
            "rediss://sentinel-1:26379",
            "TLS through Sentinel is not supported",
        ),
    ];
    for (variable, value, expected) in cases {
        let mut vars: HashMap<String, String> = HashMap::new();
        if *variable != "STORAGE_KV_BACKEND" {
            // So that the URLs are checked too.
            vars.insert("STORAGE_KV_BACKEND".into(), "redis".into());
        }
        vars.insert(variable.to_string(), value.to_string());
        let result = StoreConfigBuilder::from_vars(&vars).and_then(|b| b.build());
        let e = result.expect_err(&format!("{variable}={value} must be refused"));
        let text = e.to_string();
        match &e {
            Error::Config {
                variable: v,
                value: shown,
                ..
            } => {
                assert_eq!(v, variable, "{text}");
                let value = value.rsplit(',').next().unwrap();
                assert_eq!(shown, value, "{text}");
            }
            other => panic!("{variable}={value}: expected Error::Config, got {other:?}"),
        }
        assert!(
            text.contains(&format!("{variable}={}", value.rsplit(',').next().unwrap()))
                && text.contains(expected),
            "{variable}={value}: {text}"
        );
    }

    // The two names of one TTL with different values: both named.
    let vars: HashMap<String, String> = [("REDIS_TTL_DOCS", "10"), ("REDIS_TTL_FULL_DOCS", "20")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let text = StoreConfigBuilder::from_vars(&vars)
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("REDIS_TTL_DOCS and REDIS_TTL_FULL_DOCS"),
        "{text}"
    );

    // A value that is not UTF-8, read from the real environment. The variable is removed again
    // before anything else could read it; no other test of this binary reads the environment.
    {
        use std::os::unix::ffi::OsStringExt;
        std::env::set_var(
            "REDIS_KEY_PREFIX",
            std::ffi::OsString::from_vec(vec![b'n', 0xFF, 0xFE]),
        );
        let result = StoreConfig::from_env();
        std::env::remove_var("REDIS_KEY_PREFIX");
        let text = result.unwrap_err().to_string();
        assert!(
            text.contains("REDIS_KEY_PREFIX") && text.contains("UTF-8"),
            "{text}"
        );
    }

    assert_intact(&*store, &seeded);
}

#[test]
fn invalid_namespace_names_are_refused_before_touching_anything() {
    let bad: Vec<String> = vec![
        String::new(),
        "a:b".into(),
        "a*".into(),
        "docs[v1]".into(),
        "a b".into(),
        "../escape".into(),
        "a/b".into(),
        "x".repeat(201),
        "é".into(),
        "a\0b".into(),
        "line\nbreak".into(),
    ];
    let check = |storage: &Storage| {
        for ns in &bad {
            let e = namespace_error(storage, ns);
            assert!(matches!(e, Error::InvalidNamespace { .. }), "{ns:?}: {e}");
            let text = e.to_string();
            assert!(text.starts_with("invalid namespace"), "{text}");
            if ns.len() < 100 {
                assert!(text.contains(&format!("{ns:?}")), "{text}");
            }
        }
    };

    // JSON: no file appears anywhere, inside the directory or next to it.
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("work");
    let storage =
        Storage::open(&StoreConfig::builder().working_dir(&dir).build().unwrap()).unwrap();
    let docs = storage.namespace("docs").unwrap();
    let seeded = seed_values();
    docs.upsert(seeded.clone()).unwrap();
    docs.index_done_callback().unwrap();
    let listing = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (inside, beside) = (listing(&dir), listing(parent.path()));
    check(&storage);
    assert_eq!(listing(&dir), inside);
    assert_eq!(listing(parent.path()), beside);
    assert_intact(&*docs, &seeded);

    // Redis: no key is written.
    let server = RedisServer::start();
    let storage = Storage::open(&redis_config(&server, "ns").build().unwrap()).unwrap();
    let docs = storage.namespace("docs").unwrap();
    docs.upsert(seeded.clone()).unwrap();
    check(&storage);
    let n: usize = redis::cmd("DBSIZE").query(&mut server.conn()).unwrap();
    assert_eq!(n, seeded.len());
    assert_intact(&*docs, &seeded);
}

// ---------------------------------------------------------------------------------------------
// Ids and values

fn ids_checks(store: &dyn KvStore) {
    let seeded = seed_values();
    store.upsert(seeded.clone()).unwrap();
    let one_mib = "i".repeat(1 << 20);
    for (bad, reason) in [
        (String::new(), "an id must not be empty".to_string()),
        (
            one_mib.clone(),
            format!("longer than the maximum of 65536 bytes ({} bytes)", 1 << 20),
        ),
    ] {
        let keep = String::from("keep-0");
        let results: Vec<(&str, graphrag_kv::Result<()>)> = vec![
            ("get_by_id", store.get_by_id(&bad).map(drop)),
            (
                "get_by_ids",
                store
                    .get_by_ids(&[keep.clone(), bad.clone()], None)
                    .map(drop),
            ),
            (
                "filter_keys",
                store.filter_keys(&[keep.clone(), bad.clone()]).map(drop),
            ),
            (
                // The valid item of the batch is not written either: ids are checked first.
                "upsert",
                store.upsert(vec![
                    ("new-valid".into(), json!(1)),
                    (bad.clone(), json!(2)),
                ]),
            ),
            (
                // Nor is the valid id deleted.
                "delete_by_ids",
                store.delete_by_ids(&[keep.clone(), bad.clone()]),
            ),
        ];
        for (op, r) in results {
            let e = r.expect_err(op);
            assert!(matches!(e, Error::InvalidId { .. }), "{op}: {e}");
            let text = e.to_string();
            assert!(text.contains(&reason), "{op}: {text}");
            // The message shows a shortened id, never the whole megabyte.
            assert!(text.len() < 400, "{op}: a {} byte message", text.len());
        }
    }
    assert_eq!(store.get_by_id("new-valid").unwrap(), None);
    assert_intact(store, &seeded);
}

#[test]
fn empty_and_one_mib_ids_are_refused_json() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(
        &StoreConfig::builder()
            .working_dir(dir.path())
            .build()
            .unwrap(),
    )
    .unwrap();
    ids_checks(&*storage.namespace("ids").unwrap());
}

#[test]
fn empty_and_one_mib_ids_are_refused_redis() {
    let server = RedisServer::start();
    ids_checks(&*redis_store(&server, "ids", "ids"));
    // Nothing beyond the seeded values reached the server.
    let n: usize = redis::cmd("DBSIZE").query(&mut server.conn()).unwrap();
    assert_eq!(n, seed_values().len());
}

#[test]
fn values_over_512_mib_are_refused_before_sending() {
    // The codec's limit, directly: one byte over is refused before compressing.
    let codec = Codec::new(Compression::Lz4, 1024);
    let e = codec
        .encode_json(vec![b' '; MAX_VALUE_BYTES + 1])
        .unwrap_err();
    assert!(
        e.to_string().contains("above the limit of 536870912 bytes"),
        "{e}"
    );

    // Through a store: a JSON string of 513 MiB, after a value of normal size in the same batch.
    let server = RedisServer::start();
    let store = Storage::open(
        &redis_config(&server, "big")
            .compression(Compression::None)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("full_docs")
    .unwrap();
    let seeded = seed_values();
    store.upsert(seeded.clone()).unwrap();
    let mut admin = server.conn();
    let received = |admin: &mut redis::Connection| -> u64 {
        let info: String = redis::cmd("INFO").arg("stats").query(admin).unwrap();
        info.lines()
            .find_map(|l| l.trim().strip_prefix("total_net_input_bytes:"))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let before = received(&mut admin);
    // 90 MiB of a control character, which JSON escapes as six bytes (`\u0001`): 540 MiB of
    // JSON from a sixth of the memory and serialization time of a plain 513 MiB string.
    let huge = Value::String("\u{1}".repeat(90 << 20));
    let e = store
        .upsert(vec![
            ("small-batch-mate".into(), json!({"n": 1})),
            ("huge".into(), huge),
        ])
        .unwrap_err();
    assert!(matches!(e, Error::Encode { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("huge") && text.contains("above the limit of 536870912 bytes"),
        "{text}"
    );
    // Refused before sending: the server received no more than the INFO calls themselves.
    let sent = received(&mut admin) - before;
    assert!(sent < 64 * 1024, "{sent} bytes reached the server");
    assert_eq!(raw_get(&mut admin, "big:full_docs:huge"), None);
    assert_eq!(raw_get(&mut admin, "big:full_docs:small-batch-mate"), None);
    assert_intact(&*store, &seeded);
}

// ---------------------------------------------------------------------------------------------
// Corrupt and foreign data in Redis

#[test]
fn corrupt_stored_values_are_decode_errors_and_nothing_is_lost() {
    let server = RedisServer::start();
    let store = redis_store(&server, "cor", "text_chunks");
    let seeded = seed_values();
    store.upsert(seeded.clone()).unwrap();
    let mut admin = server.conn();

    let frame = Codec::new(Compression::Lz4, 0)
        .encode(&json!({"content": "community graph report ".repeat(400)}))
        .unwrap();
    assert_eq!(frame[..4], FRAME_MAGIC);
    let with_claim = |claim: u32, body_len: usize| -> Vec<u8> {
        let mut f = frame[..8 + body_len.min(frame.len() - 8)].to_vec();
        f[4..8].copy_from_slice(&claim.to_le_bytes());
        f
    };
    let true_len = u32::from_le_bytes(frame[4..8].try_into().unwrap());
    let mut random = noise(4096, 42);
    random[0] = b'#'; // neither '{' nor 0xFF: certainly not a value
    let mut wrong_header = frame.clone();
    wrong_header[3] = b'9';
    let zstd = Codec::new(Compression::Zstd, 0)
        .encode(&json!({"content": "community graph report ".repeat(400)}))
        .unwrap();
    assert_eq!(zstd[..4], ZSTD_FRAME_MAGIC);
    let zstd_with_claim = |claim: u32| -> Vec<u8> {
        let mut f = zstd.clone();
        f[4..8].copy_from_slice(&claim.to_le_bytes());
        f
    };
    let zstd_true_len = u32::from_le_bytes(zstd[4..8].try_into().unwrap());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random-bytes", random, "not valid JSON"),
        (
            "truncated-frame",
            frame[..frame.len() / 2].to_vec(),
            "header said",
        ),
        ("header-only", frame[..8].to_vec(), "frame"),
        (
            "short-header",
            frame[..5].to_vec(),
            "not a graphrag-kv frame",
        ),
        ("wrong-header", wrong_header, "unknown codec byte 0x39"),
        (
            "absurd-size",
            with_claim(u32::MAX, usize::MAX),
            "above the limit",
        ),
        (
            "claims-511-mib",
            with_claim(511 << 20, 100),
            "frame claims 535822336 bytes from only",
        ),
        (
            "claims-one-more",
            with_claim(true_len + 1, usize::MAX),
            "header said",
        ),
        (
            "zstd-truncated",
            zstd[..zstd.len() - 4].to_vec(),
            "corrupt frame: zstd",
        ),
        (
            "zstd-claims-one-more",
            zstd_with_claim(zstd_true_len + 1),
            "its body says",
        ),
        (
            "zstd-claims-511-mib",
            zstd_with_claim(511 << 20),
            "frame claims 535822336 bytes from only",
        ),
        (
            "zstd-header-only",
            zstd[..8].to_vec(),
            "from only 0 compressed",
        ),
        (
            "zstd-cut-in-its-header",
            zstd[..10].to_vec(),
            "its body says nothing",
        ),
        ("empty", Vec::new(), "line 1, column 0"),
        ("nul-bytes", vec![0, 0, 0], "line 1, column 1"),
        ("half-json", br#"{"content": "abc"#.to_vec(), "line 1"),
        ("not-utf8", b"\"caf\xe9\"".to_vec(), "line 1"),
        ("deep-nesting", vec![b'['; 100_000], "recursion limit"),
    ];
    for (id, bytes, _) in &cases {
        raw_set(&mut admin, &format!("cor:text_chunks:{id}"), bytes);
    }
    for (id, bytes, reason) in &cases {
        let key = format!("cor:text_chunks:{id}");
        let e = store.get_by_id(id).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Decode { .. }), "{id}: {text}");
        assert!(
            text.contains(&format!("{key:?}")) && text.contains(reason),
            "{id}: {text}"
        );
        let e = store
            .get_by_ids(&["keep-1".into(), id.to_string()], None)
            .unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{id}: {e}");
        // Present for filter_keys (so an indexer does not re-insert over it blindly without
        // seeing the error on read), and reading changed nothing.
        assert_eq!(
            store.filter_keys(&[id.to_string()]).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(raw_get(&mut admin, &key).as_ref(), Some(bytes), "{id}");
    }
    let mut keys = store.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys.len(), seeded.len() + cases.len());
    assert_eq!(store.stats().unwrap().keys as usize, keys.len());
    assert_intact(&*store, &seeded);

    // The way out: overwrite or delete the bad values.
    store
        .upsert(vec![("random-bytes".into(), json!("repaired"))])
        .unwrap();
    assert_eq!(
        store.get_by_id("random-bytes").unwrap(),
        Some(json!("repaired"))
    );
    let bad: Vec<String> = cases
        .iter()
        .skip(1)
        .map(|(id, _, _)| id.to_string())
        .collect();
    store.delete_by_ids(&bad).unwrap();
    assert_eq!(store.get_by_ids(&bad, None).unwrap(), vec![None; bad.len()]);
    assert_intact(&*store, &seeded);
}

#[test]
fn keys_of_other_types_under_the_prefix() {
    let server = RedisServer::start();
    let store = redis_store(&server, "wt", "ns");
    let seeded = seed_values();
    store.upsert(seeded.clone()).unwrap();
    let mut admin = server.conn();
    for cmd in [
        redis::cmd("HSET")
            .arg("wt:ns:hash")
            .arg("f")
            .arg("v")
            .clone(),
        redis::cmd("RPUSH").arg("wt:ns:list").arg("a").clone(),
        redis::cmd("SADD").arg("wt:ns:set").arg("a").clone(),
        redis::cmd("ZADD").arg("wt:ns:zset").arg(1).arg("a").clone(),
        redis::cmd("XADD")
            .arg("wt:ns:stream")
            .arg("*")
            .arg("f")
            .arg("v")
            .clone(),
    ] {
        cmd.query::<redis::Value>(&mut admin).unwrap();
    }
    for (id, found) in [
        ("hash", "hash"),
        ("list", "list"),
        ("set", "set"),
        ("zset", "zset"),
        ("stream", "stream"),
    ] {
        // A single read: the key and "not a string value", never "missing".
        let e = store.get_by_id(id).unwrap_err();
        assert!(matches!(e, Error::WrongType { .. }), "{id}: {e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("\"wt:ns:{id}\"")) && text.contains("not a string value"),
            "{text}"
        );
        // A batch read names the type.
        let e = store
            .get_by_ids(&["keep-0".into(), id.into(), "absent".into()], None)
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!("holds a Redis {found}")),
            "{e}"
        );
    }
    // Listing and existence see them as ids of the namespace (they are keys under it), and the
    // key count includes them.
    let mut keys = store.all_keys().unwrap();
    keys.sort();
    let mut want: Vec<String> = seeded.iter().map(|(id, _)| id.clone()).collect();
    want.extend(["hash", "list", "set", "stream", "zset"].map(String::from));
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(
        store
            .filter_keys(&["hash".into(), "new".into(), "zset".into()])
            .unwrap(),
        ["new"]
    );
    assert_eq!(store.stats().unwrap().keys as usize, want.len());
    assert_intact(&*store, &seeded);
    // An upsert replaces the key whatever its type (SET does); a delete removes it.
    store
        .upsert(vec![("hash".into(), json!({"now": "a string"}))])
        .unwrap();
    assert_eq!(
        store.get_by_id("hash").unwrap(),
        Some(json!({"now": "a string"}))
    );
    store.delete_by_ids(&["list".into()]).unwrap();
    assert_eq!(store.get_by_id("list").unwrap(), None);
    // Clearing the namespace removes the others too, and nothing outside it.
    raw_set(&mut admin, "wt:other:k", b"1");
    store.clear().unwrap();
    assert_eq!(store.all_keys().unwrap(), Vec::<String>::new());
    assert_eq!(raw_get(&mut admin, "wt:other:k"), Some(b"1".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// A server in trouble

#[test]
fn redis_out_of_memory_is_an_error_and_earlier_data_stays() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let store = Storage::open(
        &redis_config(&server, "oom")
            .compression(Compression::None)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("full_docs")
    .unwrap();
    let mut acknowledged: Vec<(String, Value)> = Vec::new();
    let mut failed_batch: Vec<(String, Value)> = Vec::new();
    let mut error = None;
    for batch in 0..2000u64 {
        let items: Vec<(String, Value)> = (0..20)
            .map(|i| {
                (
                    format!("d{batch}-{i}"),
                    json!({"content": noisy_text(8 * 1024, batch * 100 + i + 1)}),
                )
            })
            .collect();
        match store.upsert(items.clone()) {
            Ok(()) => acknowledged.extend(items),
            Err(e) => {
                failed_batch = items;
                error = Some(e);
                break;
            }
        }
    }
    let e = error.expect("2 MB of maxmemory must run out");
    let text = e.to_string();
    assert!(matches!(e, Error::Redis { .. }), "{text}");
    assert!(text.contains("OOM") && text.contains("maxmemory"), "{text}");
    assert!(!acknowledged.is_empty());
    // Every acknowledged write is there; of the refused batch, each item is whole or absent.
    assert_intact(&*store, &acknowledged);
    let ids: Vec<String> = failed_batch.iter().map(|(id, _)| id.clone()).collect();
    for ((id, want), got) in failed_batch
        .iter()
        .zip(store.get_by_ids(&ids, None).unwrap())
    {
        assert!(got.is_none() || got.as_ref() == Some(want), "{id}");
    }
    // Reads, listing and deletes work while the server is full; then writes work again.
    assert!(store.all_keys().unwrap().len() >= acknowledged.len());
    let freed: Vec<String> = acknowledged
        .iter()
        .take(acknowledged.len() / 2)
        .map(|(id, _)| id.clone())
        .collect();
    store.delete_by_ids(&freed).unwrap();
    store.upsert(vec![("after".into(), json!("ok"))]).unwrap();
    assert_eq!(store.get_by_id("after").unwrap(), Some(json!("ok")));
    assert_intact(&*store, &acknowledged[freed.len()..]);
}

#[test]
fn a_server_slower_than_the_socket_timeout() {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let seeded = seed_values();
    // Starts `DEBUG SLEEP seconds` from another connection and returns once the server is
    // seen stalled (a PING on a third connection goes unanswered for 100 ms).
    let stall = |seconds: &'static str| {
        let mut admin = server.conn();
        let mut probe = server.conn();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let t = std::thread::spawn(move || {
            redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query::<()>(&mut admin)
                .unwrap();
        });
        loop {
            match redis::cmd("PING").query::<String>(&mut probe) {
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) if e.is_timeout() => break,
                Err(e) => panic!("probing the server: {e}"),
            }
        }
        t
    };

    // No retries, and no patience for new connections either: the read fails with a timeout...
    let impatient = Storage::open(
        &redis_config(&server, "slow")
            .socket_timeout(Duration::from_millis(500))
            .connection_timeout(Duration::from_millis(500))
            .pool_timeout(Duration::from_millis(500))
            .retries(0)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("ns")
    .unwrap();
    impatient.upsert(seeded.clone()).unwrap();
    let t = stall("3");
    let e = impatient.get_by_id("keep-3").unwrap_err();
    assert!(e.is_timeout() && e.is_retryable(), "{e}");
    // ...and so does a write (its new connection cannot finish its handshake in time).
    let e = impatient
        .upsert(vec![("during-stall".into(), json!("new"))])
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    t.join().unwrap();
    // ...and once the server answers again every reply matches its request: the connection
    // that timed out (its late reply still in flight) was thrown away, not reused.
    for (id, want) in &seeded {
        assert_eq!(
            impatient.get_by_id(id).unwrap().as_ref(),
            Some(want),
            "{id}"
        );
    }
    assert_intact(&*impatient, &seeded);
    // The timed-out write either landed whole or not at all.
    let during = impatient.get_by_id("during-stall").unwrap();
    assert!(
        during.is_none() || during == Some(json!("new")),
        "{during:?}"
    );

    // With retries (the default policy retries timeouts) the same stall is ridden through.
    let patient = Storage::open(
        &redis_config(&server, "slow")
            .socket_timeout(Duration::from_millis(500))
            .retries(10)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("ns")
    .unwrap();
    let t = stall("1");
    let ids: Vec<String> = seeded.iter().map(|(id, _)| id.clone()).collect();
    let got = patient.get_by_ids(&ids, None).unwrap();
    t.join().unwrap();
    assert_eq!(
        got,
        seeded
            .iter()
            .map(|(_, v)| Some(v.clone()))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// JSON files

#[test]
fn corrupt_json_files_are_refused_with_their_position_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let valid = graphrag_kv::backend::json_file::to_python_json(&json!({
        "a": {"content": "first", "tokens": 1},
        "b": {"content": "second", "tokens": 2},
    }));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            valid[..valid.len() / 2].to_vec(),
            "EOF while parsing",
        ),
        ("garbage", noise(3000, 7), "line 1"),
        ("array", b"[1, 2, 3]".to_vec(), "found an array"),
        ("string", b"\"text\"".to_vec(), "found a string"),
        ("null", b"null".to_vec(), "found null"),
        ("number", b"42".to_vec(), "found a number"),
        ("empty", Vec::new(), "line 1, column 0"),
        ("trailing", b"{\"a\": 1}\n}".to_vec(), "trailing characters"),
        ("nul", b"{\"a\": 1}\0".to_vec(), "trailing characters"),
        (
            "deep",
            [b"{\"a\": ".as_slice(), &[b'['; 50_000]].concat(),
            "recursion limit",
        ),
        ("bad-utf8", b"{\"a\": \"caf\xe9\"}".to_vec(), "line 1"),
    ];
    for (ns, bytes, _) in &cases {
        fs::write(dir.path().join(format!("kv_store_{ns}.json")), bytes).unwrap();
    }
    fs::create_dir(dir.path().join("kv_store_dir.json")).unwrap();
    let config = StoreConfig::builder()
        .working_dir(dir.path())
        .build()
        .unwrap();
    {
        let storage = Storage::open(&config).unwrap();
        for (ns, bytes, reason) in &cases {
            let path = dir.path().join(format!("kv_store_{ns}.json"));
            let e = namespace_error(&storage, ns);
            let text = e.to_string();
            match &e {
                Error::CorruptFile {
                    path: p,
                    line,
                    column,
                    ..
                } => {
                    assert_eq!(p, &path);
                    assert!(*line >= 1, "{text}");
                    assert!(
                        text.contains(&format!("at line {line}, column {column}")),
                        "{text}"
                    );
                    // The position lies inside the file.
                    let lines = bytes.split(|b| *b == b'\n').count();
                    assert!(*line <= lines, "{ns}: line {line} of {lines}");
                }
                other => panic!("{ns}: expected CorruptFile, got {other}"),
            }
            assert!(
                text.contains(&path.display().to_string()) && text.contains(reason),
                "{ns}: {text}"
            );
        }
        let e = namespace_error(&storage, "dir");
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("kv_store_dir.json"), "{e}");

        // The rest of the directory works; saving it leaves the bad files alone.
        let good = storage.namespace("good").unwrap();
        good.upsert(seed_values()).unwrap();
        good.index_done_callback().unwrap();
    }
    for (ns, bytes, _) in &cases {
        let now = fs::read(dir.path().join(format!("kv_store_{ns}.json"))).unwrap();
        assert_eq!(&now, bytes, "{ns} was modified");
    }
    let storage = Storage::open(&config).unwrap();
    assert_intact(&*storage.namespace("good").unwrap(), &seed_values());
}

#[test]
fn unwritable_working_directory() {
    let root = tempfile::tempdir().unwrap();
    // A working directory that is an existing regular file, or lies under one: fails even for
    // root (tests often run as root, for whom permission bits do not stop writes).
    let file = root.path().join("a-file");
    fs::write(&file, b"precious").unwrap();
    for dir in [file.clone(), file.join("sub")] {
        let config = StoreConfig::builder().working_dir(&dir).build().unwrap();
        let e = Storage::open(&config).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
    }
    assert_eq!(fs::read(&file).unwrap(), b"precious");

    // Permission bits, where they apply (not as root).
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = root.path().join("read-only");
        fs::create_dir(&locked).unwrap();
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
        let privileged = fs::File::create(locked.join("probe")).is_ok();
        if !privileged {
            let config = StoreConfig::builder().working_dir(&locked).build().unwrap();
            let e = Storage::open(&config).unwrap_err();
            assert!(matches!(e, Error::Io { .. }), "{e}");
            assert!(e.to_string().contains(".graphrag-kv.lock"), "{e}");
        }
        fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
    }

    // A save that cannot land (a directory where the file goes, which the rename cannot
    // replace, as root or not): an error naming the file, the values still held in memory,
    // and the save succeeds once the obstacle is gone. No temporary file is left behind.
    let dir = root.path().join("work");
    let config = StoreConfig::builder().working_dir(&dir).build().unwrap();
    let storage = Storage::open(&config).unwrap();
    let docs = storage.namespace("docs").unwrap();
    let seeded = seed_values();
    docs.upsert(seeded.clone()).unwrap();
    let target = dir.join("kv_store_docs.json");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("blocker"), b"x").unwrap();
    let e = docs.index_done_callback().unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains(&target.display().to_string()), "{e}");
    assert_intact(&*docs, &seeded);
    let leftovers: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    fs::remove_dir_all(&target).unwrap();
    docs.index_done_callback().unwrap();
    let saved =
        graphrag_kv::backend::json_file::parse_kv_file(&target, &fs::read(&target).unwrap())
            .unwrap();
    assert_eq!(saved.len(), seeded.len());
    for (id, v) in &seeded {
        assert_eq!(saved.get(id), Some(v), "{id}");
    }
}
