//! The Redis backend against real redis-server processes: the conformance suite (compressed and
//! plain, on redis-server 7.0 and on valkey-server 8.1), key layout, TTLs under both variable
//! names, interop with other clients, bad stored data, replica confirmation, and durable
//! checkpoints (RDB, AOF everysec on 7.0 and with `WAITAOF` on valkey 8.1).

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::{
    Compression, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder, LLM_RESPONSE_CACHE,
};
use redis::Commands;
use serde_json::{json, Value};
use support::{RedisServer, ServerKind};

fn config_for(server: &RedisServer, prefix: &str) -> graphrag_kv::StoreConfigBuilder {
    StoreConfig::builder()
        .backend(graphrag_kv::BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
}

fn redis_backend() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let storage = Storage::open(&config_for(&server, "nano_graphrag").build().unwrap()).unwrap();
    (server, move |ns: &str| storage.namespace(ns).unwrap())
}

fn redis_backend_plain() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let config = config_for(&server, "plain")
        .compression(Compression::None)
        .max_connections(4)
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    (server, move |ns: &str| storage.namespace(ns).unwrap())
}

fn valkey_backend() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start_valkey();
    let storage = Storage::open(&config_for(&server, "nano_graphrag").build().unwrap()).unwrap();
    (server, move |ns: &str| storage.namespace(ns).unwrap())
}

fn redis_backend_zstd() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let config = config_for(&server, "zstd")
        .compression(Compression::Zstd)
        .compression_min_bytes(0)
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    (server, move |ns: &str| storage.namespace(ns).unwrap())
}

support::conformance::conformance_tests!(redis_lz4, redis_backend);
support::conformance::conformance_tests!(redis_zstd, redis_backend_zstd);
support::conformance::conformance_tests!(redis_plain, redis_backend_plain);
support::conformance::conformance_tests!(valkey_lz4, valkey_backend);
support::conformance_typed::typed_conformance_tests!(redis_lz4_typed, redis_backend);
support::conformance_typed::typed_conformance_tests!(redis_plain_typed, redis_backend_plain);

fn prose(words: usize) -> String {
    let vocab = [
        "community",
        "graph",
        "the",
        "report",
        "entity",
        "relation",
        "of",
        "chunk",
        "index",
        "summary",
        "a",
        "language",
        "model",
        "answers",
        "with",
        "text",
    ];
    let mut x = 0x9E37_79B9u64;
    (0..words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            vocab[(x % vocab.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn keys_use_the_python_layout_and_values_are_plain_json() {
    let server = RedisServer::start();
    let config = config_for(&server, "nano_graphrag")
        .compression(Compression::None)
        .build()
        .unwrap();
    let s = Storage::open(&config)
        .unwrap()
        .namespace("text_chunks")
        .unwrap();
    let v = json!({"content": prose(600), "tokens": 600});
    s.upsert(vec![("chunk-abc".into(), v.clone())]).unwrap();
    let mut conn = server.conn();
    let raw: String = conn.get("nano_graphrag:text_chunks:chunk-abc").unwrap();
    assert_eq!(serde_json::from_str::<Value>(&raw).unwrap(), v);

    // A value written by another client (e.g. Python's json.dumps) is read here.
    let _: () = conn
        .set(
            "nano_graphrag:text_chunks:from-python",
            r#"{"content": "hé", "tokens": 1}"#,
        )
        .unwrap();
    assert_eq!(
        s.get_by_id("from-python").unwrap(),
        Some(json!({"content": "hé", "tokens": 1}))
    );
}

#[test]
fn compressed_values_are_smaller_and_marked() {
    let server = RedisServer::start();
    let s = Storage::open(&config_for(&server, "c").build().unwrap())
        .unwrap()
        .namespace("text_chunks")
        .unwrap();
    let big = json!({"content": prose(1000)});
    let small = json!({"content": "short"});
    s.upsert(vec![
        ("big".into(), big.clone()),
        ("small".into(), small.clone()),
    ])
    .unwrap();
    let mut conn = server.conn();
    let raw_big: Vec<u8> = conn.get("c:text_chunks:big").unwrap();
    let raw_small: Vec<u8> = conn.get("c:text_chunks:small").unwrap();
    assert_eq!(&raw_big[..4], &graphrag_kv::codec::FRAME_MAGIC);
    assert!(raw_big.len() < serde_json::to_vec(&big).unwrap().len());
    assert_eq!(raw_small, serde_json::to_vec(&small).unwrap());
    assert_eq!(s.get_by_id("big").unwrap(), Some(big));
}

/// A store switched from one compression to another reads everything written before: each
/// of lz4, zstd and none writes, each of them reads (through `get_by_id` and the batch path),
/// and the stored bytes carry the writer's frame.
#[test]
fn every_compression_reads_what_every_other_wrote() {
    let server = RedisServer::start();
    let compressions = [Compression::Lz4, Compression::Zstd, Compression::None];
    let open = |c: Compression| {
        Storage::open(
            &config_for(&server, "mixed")
                .compression(c)
                .compression_level(5)
                .build()
                .unwrap(),
        )
        .unwrap()
        .namespace("text_chunks")
        .unwrap()
    };
    let mut expected = Vec::new();
    for (i, c) in compressions.into_iter().enumerate() {
        let big = json!({"content": prose(800 + i), "writer": format!("{c:?}")});
        let small = json!({"content": "short", "writer": format!("{c:?}")});
        open(c)
            .upsert(vec![
                (format!("big-{c:?}"), big.clone()),
                (format!("small-{c:?}"), small.clone()),
            ])
            .unwrap();
        expected.push((format!("big-{c:?}"), big));
        expected.push((format!("small-{c:?}"), small));
    }
    let mut conn = server.conn();
    let raw = |conn: &mut redis::Connection, id: &str| -> Vec<u8> {
        conn.get(format!("mixed:text_chunks:{id}")).unwrap()
    };
    assert_eq!(
        raw(&mut conn, "big-Lz4")[..4],
        graphrag_kv::codec::FRAME_MAGIC
    );
    assert_eq!(
        raw(&mut conn, "big-Zstd")[..4],
        graphrag_kv::codec::ZSTD_FRAME_MAGIC
    );
    assert_eq!(raw(&mut conn, "big-None")[0], b'{');
    assert!(raw(&mut conn, "big-Zstd").len() < raw(&mut conn, "big-Lz4").len());
    assert_eq!(raw(&mut conn, "small-Zstd")[0], b'{');
    let ids: Vec<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    let values: Vec<Option<Value>> = expected.iter().map(|(_, v)| Some(v.clone())).collect();
    for c in compressions {
        let reader = open(c);
        for (id, v) in &expected {
            assert_eq!(
                reader.get_by_id(id).unwrap().as_ref(),
                Some(v),
                "{c:?} reads {id}"
            );
        }
        assert_eq!(reader.get_by_ids(&ids, None).unwrap(), values, "{c:?}");
    }
}

#[test]
fn ttl_defaults_and_both_variable_names() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    let ttl_of = |conn: &mut redis::Connection, key: &str| -> i64 { conn.ttl(key).unwrap() };

    // Defaults: 12 h for the LLM cache, none for index data (community reports included).
    let storage = Storage::open(&config_for(&server, "d").build().unwrap()).unwrap();
    for (ns, want) in [
        ("llm_response_cache", 43_200),
        ("community_reports", -1),
        ("text_chunks", -1),
        ("full_docs", -1),
        ("other", -1),
    ] {
        storage
            .namespace(ns)
            .unwrap()
            .upsert(vec![("k".into(), json!(1))])
            .unwrap();
        let ttl = ttl_of(&mut conn, &format!("d:{ns}:k"));
        if want > 0 {
            assert!((want - 5..=want).contains(&ttl), "{ns}: {ttl}");
        } else {
            assert_eq!(ttl, want, "{ns}");
        }
    }

    // Documented names, the reference implementation's names, and any other namespace.
    let vars: HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", server.url().as_str()),
        ("REDIS_KEY_PREFIX", "e"),
        ("REDIS_TTL_LLM_CACHE", "100"),
        ("REDIS_TTL_TEXT_CHUNKS", "200"),
        ("REDIS_TTL_DOCS", "300"),
        ("REDIS_TTL_COMMUNITY_REPORTS", "400"),
        ("REDIS_TTL_MY_NS", "500"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = StoreConfigBuilder::from_vars(&vars)
        .unwrap()
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    for (ns, want) in [
        ("llm_response_cache", 100),
        ("text_chunks", 200),
        ("full_docs", 300),
        ("community_reports", 400),
        ("my-ns", 500),
    ] {
        let s = storage.namespace(ns).unwrap();
        s.upsert(vec![("k".into(), json!(1))]).unwrap();
        assert_eq!(s.stats().unwrap().ttl_seconds, want as u64);
        let ttl = ttl_of(&mut conn, &format!("e:{ns}:k"));
        assert!((want - 5..=want).contains(&ttl), "{ns}: {ttl}");
    }
}

#[test]
fn wrong_type_and_corrupt_values_are_errors_naming_the_key() {
    let server = RedisServer::start();
    let s = Storage::open(&config_for(&server, "w").build().unwrap())
        .unwrap()
        .namespace("ns")
        .unwrap();
    let mut conn = server.conn();
    let _: () = conn.hset("w:ns:hash", "f", "v").unwrap();
    let _: () = conn
        .set("w:ns:garbage", b"\xff\xfe not json".as_slice())
        .unwrap();
    let _: () = conn.set("w:ns:badjson", "{\"a\": ").unwrap();
    let mut frame = graphrag_kv::codec::FRAME_MAGIC.to_vec();
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    frame.extend_from_slice(b"xxxx");
    let _: () = conn.set("w:ns:bigclaim", frame).unwrap();
    s.upsert(vec![("ok".into(), json!(1))]).unwrap();

    let e = s.get_by_id("hash").unwrap_err();
    assert!(matches!(e, Error::WrongType { .. }), "{e}");
    assert!(e.to_string().contains("w:ns:hash"), "{e}");
    let e = s
        .get_by_ids(&["ok".into(), "hash".into()], None)
        .unwrap_err();
    assert!(matches!(e, Error::WrongType { .. }), "{e}");
    assert!(e.to_string().contains("holds a Redis hash"), "{e}");
    for id in ["garbage", "badjson", "bigclaim"] {
        let e = s.get_by_id(id).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{id}: {e}");
        assert!(e.to_string().contains(&format!("w:ns:{id}")), "{e}");
        let e = s.get_by_ids(&["ok".into(), id.into()], None).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{id}: {e}");
    }
    // A missing id next to them is still simply missing, and the good value is readable.
    assert_eq!(
        s.get_by_ids(&["ok".into(), "absent".into()], None).unwrap(),
        vec![Some(json!(1)), None]
    );
}

/// `get_by_ids` keeps several MGETs in flight on one connection: a bad value in the middle of a
/// large call must be reported and leave the connection clean (here the pool's only one), and
/// results must keep the order of the ids across windows.
#[test]
fn large_get_by_ids_over_one_connection_survives_a_bad_value_midway() {
    let server = RedisServer::start();
    let s = Storage::open(&config_for(&server, "m").max_connections(1).build().unwrap())
        .unwrap()
        .namespace("ns")
        .unwrap();
    let ids: Vec<String> = (0..230).map(|i| format!("id-{i:03}")).collect();
    // Every third id present, the others missing.
    s.upsert(
        ids.iter()
            .enumerate()
            .filter(|(i, _)| i % 3 == 0)
            .map(|(i, id)| (id.clone(), json!({"i": i, "text": prose(200)})))
            .collect(),
    )
    .unwrap();
    let expected: Vec<Option<Value>> = ids
        .iter()
        .enumerate()
        .map(|(i, _)| (i % 3 == 0).then(|| json!({"i": i, "text": prose(200)})))
        .collect();
    assert_eq!(s.get_by_ids(&ids, None).unwrap(), expected);

    let mut conn = server.conn();
    let _: () = conn.set("m:ns:id-101", "{\"broken\": ").unwrap();
    for _ in 0..3 {
        let e = s.get_by_ids(&ids, None).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
        assert!(e.to_string().contains("m:ns:id-101"), "{e}");
        // The same (only) connection answers the next call correctly: no reply of the failed
        // exchange was left on it.
        let good: Vec<String> = ids.iter().filter(|id| *id != "id-101").cloned().collect();
        let got = s.get_by_ids(&good, None).unwrap();
        let want: Vec<Option<Value>> = ids
            .iter()
            .zip(&expected)
            .filter(|(id, _)| *id != "id-101")
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(got, want);
    }
    // A key of another type in a late window is still named.
    let _: () = conn.del("m:ns:id-101").unwrap();
    let _: () = conn.hset("m:ns:id-200", "f", "v").unwrap();
    let e = s.get_by_ids(&ids, None).unwrap_err();
    assert!(matches!(e, Error::WrongType { .. }), "{e}");
    assert!(e.to_string().contains("m:ns:id-200"), "{e}");
}

/// `filter_keys` sends its EXISTS commands in windows, two in flight: across chunks and windows
/// the missing ids come back in order, once each, over one connection reused call after call.
#[test]
fn large_filter_keys_over_one_connection_keeps_order() {
    let server = RedisServer::start();
    let s = Storage::open(&config_for(&server, "f").max_connections(1).build().unwrap())
        .unwrap()
        .namespace("ns")
        .unwrap();
    let ids: Vec<String> = (0..4_600).map(|i| format!("id-{i:05}")).collect();
    s.upsert(
        ids.iter()
            .step_by(3)
            .map(|id| (id.clone(), json!(1)))
            .collect(),
    )
    .unwrap();
    let mut asked = ids.clone();
    asked.extend(ids.iter().take(700).cloned()); // repeats: each missing id once
    let expected: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, id)| id.clone())
        .collect();
    for _ in 0..3 {
        assert_eq!(s.filter_keys(&asked).unwrap(), expected);
        assert_eq!(
            s.filter_keys(&ids[..3]).unwrap(),
            vec![ids[1].clone(), ids[2].clone()]
        );
    }
}

/// A standalone master and one replica of it, in sync.
fn master_and_replica(kind: ServerKind) -> (RedisServer, RedisServer) {
    let master = RedisServer::start_kind(kind);
    let port = master.port().to_string();
    let replica = RedisServer::start_kind_with(kind, &["--replicaof", "127.0.0.1", &port]);
    let mut rconn = replica.conn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut rconn)
            .unwrap();
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica never synced: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (master, replica)
}

/// `REDIS_WAIT_REPLICAS` on a single server: an `upsert` spanning several windows and chunks
/// returns once a replica has every value, and is an error naming the shortfall otherwise.
#[test]
fn wait_replicas_on_a_single_server_covers_every_window() {
    let (master, replica) = master_and_replica(ServerKind::Redis);
    let mut rconn = replica.conn();
    let items = |n: usize| -> Vec<(String, Value)> {
        (0..n)
            .map(|i| (format!("r-{i:04}"), json!({"i": i, "text": prose(50)})))
            .collect()
    };
    let one = Storage::open(
        &config_for(&master, "w1")
            .wait_replicas(1, Duration::from_secs(4))
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("ns")
    .unwrap();
    // 1,030 items: two chunks (WRITE_CHUNK is 1,000), each of many windows.
    one.upsert(items(1_030)).unwrap();
    // Acknowledged means on the replica: no waiting here.
    let on_replica: usize = redis::cmd("DBSIZE").query(&mut rconn).unwrap();
    assert_eq!(on_replica, 1_030);
    let last: Option<String> = rconn.get("w1:ns:r-1029").unwrap();
    assert!(last.is_some());

    let two = Storage::open(
        &config_for(&master, "w2")
            .wait_replicas(2, Duration::from_millis(100))
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("ns")
    .unwrap();
    let e = two.upsert(items(60)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Replication {
                wanted: 2,
                confirmed: 1,
                ..
            }
        ),
        "{e}"
    );
    // Written on the master all the same, and readable.
    assert_eq!(two.all_keys().unwrap().len(), 60);
}

#[test]
fn glob_namespaces_own_only_their_keys() {
    let server = RedisServer::start();
    let storage = Storage::open(&config_for(&server, "g").build().unwrap()).unwrap();
    let a = storage.namespace("a.b").unwrap();
    let b = storage.namespace("a").unwrap();
    a.upsert(vec![("x".into(), json!(1))]).unwrap();
    b.upsert(vec![("b:x".into(), json!(2)), ("*".into(), json!(3))])
        .unwrap();
    let mut keys = b.all_keys().unwrap();
    keys.sort();
    assert_eq!(keys, ["*", "b:x"]);
    assert_eq!(a.all_keys().unwrap(), ["x"]);
    b.clear().unwrap();
    assert_eq!(a.get_by_id("x").unwrap(), Some(json!(1)));
    // Refused names never reach Redis.
    for bad in ["a*", "docs[v1]", "a:b", "a b"] {
        assert!(matches!(
            storage.namespace(bad),
            Err(Error::InvalidNamespace { .. })
        ));
    }
    let mut names = storage.list_namespaces().unwrap();
    names.sort();
    assert_eq!(names, ["a.b"]);
}

#[test]
fn unreachable_server_is_an_error_never_missing() {
    let mut server = RedisServer::start();
    let config = config_for(&server, "u")
        .connection_timeout(Duration::from_millis(300))
        .pool_timeout(Duration::from_millis(600))
        .retries(1)
        .build()
        .unwrap();
    let s = Storage::open(&config).unwrap().namespace("ns").unwrap();
    s.upsert(vec![("k".into(), json!(1))]).unwrap();
    server.kill();
    let e = s.get_by_id("k").unwrap_err();
    assert!(e.is_connection() && e.is_retryable(), "{e}");
    assert!(s.get_by_ids(&["k".into()], None).is_err());
    assert!(s.filter_keys(&["k".into()]).is_err());
    assert!(s.all_keys().is_err());
}

#[test]
fn pool_exhaustion_waits_instead_of_failing() {
    // 32 threads share 2 connections: every read waits its turn and finds its value.
    let server = RedisServer::start();
    let config = config_for(&server, "p").max_connections(2).build().unwrap();
    let s = Storage::open(&config)
        .unwrap()
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap();
    let items = (0..100).map(|i| (format!("k{i}"), json!(i))).collect();
    s.upsert(items).unwrap();
    std::thread::scope(|scope| {
        for t in 0..32 {
            let s = &s;
            scope.spawn(move || {
                for i in 0..100 {
                    let id = format!("k{}", (i + t) % 100);
                    assert!(s.get_by_id(&id).unwrap().is_some(), "{id}");
                }
            });
        }
    });
}

#[test]
fn checkpoint_with_rdb_survives_sigkill() {
    // Each key takes 1 ms to save, so the BGSAVE runs for about half a second: a checkpoint
    // that returned before the snapshot was on disk would lose the data below.
    let mut server =
        RedisServer::start_with(&["--dbfilename", "dump.rdb", "--rdb-key-save-delay", "1000"]);
    let storage = Storage::open(&config_for(&server, "r").build().unwrap()).unwrap();
    let s = storage.namespace("text_chunks").unwrap();
    let items: Vec<_> = (0..500)
        .map(|i| (format!("c{i}"), json!({"n": i})))
        .collect();
    s.upsert(items).unwrap();
    // Concurrent callers from several namespaces share saves and all succeed.
    std::thread::scope(|scope| {
        for ns in [
            "text_chunks",
            "full_docs",
            "llm_response_cache",
            "community_reports",
        ] {
            let st = storage.namespace(ns).unwrap();
            scope.spawn(move || st.index_done_callback().unwrap());
        }
    });
    // The snapshot is complete when the checkpoint returns, not merely started. (A SIGKILL
    // alone would not show it: the BGSAVE child keeps the port until it finishes.)
    let info: String = redis::cmd("INFO")
        .arg("persistence")
        .query(&mut server.conn())
        .unwrap();
    assert!(info.contains("rdb_bgsave_in_progress:0"), "{info}");
    assert!(info.contains("rdb_last_bgsave_status:ok"), "{info}");
    server.kill();
    server.restart();
    assert_eq!(s.all_keys().unwrap().len(), 500);
    assert_eq!(s.get_by_id("c499").unwrap(), Some(json!({"n": 499})));
}

/// Redis 7.0 has no `WAITAOF`: the checkpoint waits out everysec's fsync interval (2 s, see
/// RELIABILITY.md). What a test can observe of that is the wait itself: without a checkpoint
/// the call would return at once (a SIGKILL of the server alone cannot tell, since the AOF is
/// in the page cache before the reply). The bound is the documented wait, not a speed.
#[test]
fn checkpoint_with_aof_everysec_on_redis_7_0_waits_out_the_fsync_interval() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let version: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut server.conn())
        .unwrap();
    assert!(
        version.contains("redis_version:7.0."),
        "this test is about Redis 7.0 (no WAITAOF): {}",
        version
            .lines()
            .find(|l| l.starts_with("redis_version"))
            .unwrap_or("?")
    );
    let s = Storage::open(&config_for(&server, "a").build().unwrap())
        .unwrap()
        .namespace("full_docs")
        .unwrap();
    let items: Vec<_> = (0..300)
        .map(|i| (format!("d{i}"), json!({"n": i})))
        .collect();
    s.upsert(items).unwrap();
    let started = std::time::Instant::now();
    s.index_done_callback().unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_990),
        "returned after {waited:?}: before everysec's fsync interval was over"
    );
    server.kill();
    server.restart();
    assert_eq!(s.all_keys().unwrap().len(), 300);
}

/// The keys of `MONITOR` lines that write (the commands this crate and the tests send).
fn is_write(command: &str) -> bool {
    matches!(
        command,
        "set" | "mset" | "del" | "unlink" | "incr" | "expire"
    )
}

/// On Redis 7.2+ (valkey 8.1 here) the everysec checkpoint is `WAITAOF`, which waits only for
/// the calling connection's own last write. Another connection (here a plain client, as a
/// write-behind sender, another thread or another process would be) writes the batch; the
/// connection that sends `WAITAOF` must have written after the batch's last write, or its
/// `WAITAOF` confirms nothing about the batch.
#[test]
fn waitaof_checkpoint_writes_on_its_own_connection_after_the_batch() {
    let mut server =
        RedisServer::start_valkey_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let storage = Storage::open(&config_for(&server, "wa").build().unwrap()).unwrap();
    let s = storage.namespace("full_docs").unwrap();
    let mut monitor = server.monitor();
    let mut other = server.conn();
    for i in 0..300 {
        let _: () = other
            .set(format!("wa:full_docs:d{i}"), format!("{{\"n\":{i}}}"))
            .unwrap();
    }
    s.index_done_callback().unwrap();
    let seen = monitor.read_until(Duration::from_secs(30), |m| m.command == "waitaof");
    let waitaof = seen.last().unwrap();
    let last_batch_write = seen
        .iter()
        .rposition(|m| m.command == "set" && m.args[0] == "wa:full_docs:d299")
        .expect("the batch's last write");
    let own_write = seen
        .iter()
        .rposition(|m| m.client == waitaof.client && is_write(&m.command));
    assert!(
        own_write.is_some_and(|i| i > last_batch_write),
        "the WAITAOF connection ({}) wrote nothing after the batch's last write: {:#?}",
        waitaof.client,
        &seen[last_batch_write..]
    );
    // That write touched no namespace: no store lists or returns it.
    let marker = &seen[own_write.unwrap()];
    assert!(
        !marker.args[0].starts_with("wa:full_docs:"),
        "marker {:?}",
        marker.args
    );
    assert_eq!(storage.list_namespaces().unwrap(), ["full_docs"]);
    assert_eq!(s.all_keys().unwrap().len(), 300);
    // And the batch survives a crash of the server.
    server.kill();
    server.restart();
    assert_eq!(s.all_keys().unwrap().len(), 300);
}

/// Three valkey masters (no replicas) joined by hand, AOF everysec: the harness's
/// `RedisCluster` runs redis-server 7.0, which has no `WAITAOF`.
fn valkey_cluster() -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_kind_with_port_filter(
                ServerKind::Valkey,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                ],
                |p| p <= 55_534 && RedisServer::port_is_free(p + 10_000),
            )
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let (lo, hi) = (i * 5_462, ((i + 1) * 5_462 - 1).min(16_383));
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(lo)
            .arg(hi)
            .query(&mut node.conn())
            .unwrap();
    }
    let mut first = nodes[0].conn();
    for node in &nodes[1..] {
        let _: () = redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(node.port())
            .query(&mut first)
            .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let mut conn = node.conn();
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).unwrap();
            if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the valkey cluster never became ok: {info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nodes
}

/// The same as above on a cluster: every master gets its own marker write (a key of a slot it
/// serves) before its `WAITAOF`, on the connection that sends it.
#[test]
fn waitaof_checkpoint_on_a_valkey_cluster_writes_on_every_master() {
    let nodes = valkey_cluster();
    let urls: Vec<String> = nodes.iter().map(RedisServer::url).collect();
    let storage = Storage::open(
        &StoreConfig::builder()
            .backend(graphrag_kv::BackendKind::Redis)
            .redis_url(urls.join(","))
            .key_prefix("wc")
            .build()
            .unwrap(),
    )
    .unwrap();
    let s = storage.namespace("full_docs").unwrap();
    let mut monitors: Vec<_> = nodes.iter().map(RedisServer::monitor).collect();
    // Another client writes the batch.
    let mut other = redis::cluster::ClusterClient::new(urls)
        .unwrap()
        .get_connection()
        .unwrap();
    for i in 0..300 {
        let _: () = other
            .set(format!("wc:full_docs:d{i}"), format!("{{\"n\":{i}}}"))
            .unwrap();
    }
    s.index_done_callback().unwrap();
    for (node, monitor) in nodes.iter().zip(&mut monitors) {
        let seen = monitor.read_until(Duration::from_secs(30), |m| m.command == "waitaof");
        let waitaof = seen.last().unwrap();
        let last_batch_write = seen
            .iter()
            .rposition(|m| m.command == "set" && m.args[0].starts_with("wc:full_docs:"))
            .unwrap_or_else(|| panic!("no batch write on {}: {seen:#?}", node.port()));
        let own_write = seen
            .iter()
            .rposition(|m| m.client == waitaof.client && is_write(&m.command));
        assert!(
            own_write.is_some_and(|i| i > last_batch_write),
            "on {}, the WAITAOF connection ({}) wrote nothing after the batch's last write: {:#?}",
            node.port(),
            waitaof.client,
            &seen[last_batch_write..]
        );
        let marker = &seen[own_write.unwrap()].args[0];
        assert!(marker.starts_with("wc:checkpoint-marker{"), "{marker}");
    }
    assert_eq!(storage.list_namespaces().unwrap(), ["full_docs"]);
    assert_eq!(s.all_keys().unwrap().len(), 300);
}

/// A failed save is an error, also when a later save has already started by the time the
/// checkpoint looks (here another client keeps asking for saves; `save` rules or an operator
/// do the same). The server's `dir` is removed, so every BGSAVE fails (root ignores
/// permissions; a missing directory stops it).
#[test]
fn checkpoint_reports_a_failed_rdb_save_even_after_a_later_save_started() {
    let server = RedisServer::start_with(&["--dbfilename", "dump.rdb"]);
    let storage = Storage::open(&config_for(&server, "fs").build().unwrap()).unwrap();
    let s = storage.namespace("full_docs").unwrap();
    s.upsert(vec![("d1".into(), json!({"n": 1}))]).unwrap();
    s.index_done_callback().unwrap();
    std::fs::remove_dir_all(server.dir()).unwrap();
    s.upsert(vec![("d2".into(), json!({"n": 2}))]).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut conn = server.conn();
        let stop = &stop;
        scope.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // "already in progress" most of the time; that is the point.
                let _: redis::RedisResult<redis::Value> = redis::cmd("BGSAVE").query(&mut conn);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let outcome = s.index_done_callback();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = outcome.expect_err("a checkpoint whose save failed reported success");
        assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
        assert!(e.to_string().contains("rdb_last_bgsave_status:err"), "{e}");
    });
}

/// The same failure without anyone else saving: the checkpoint's own BGSAVE fails.
#[test]
fn checkpoint_reports_its_own_failed_rdb_save() {
    let server = RedisServer::start_with(&["--dbfilename", "dump.rdb"]);
    let s = Storage::open(&config_for(&server, "fo").build().unwrap())
        .unwrap()
        .namespace("full_docs")
        .unwrap();
    s.upsert(vec![("d1".into(), json!({"n": 1}))]).unwrap();
    std::fs::remove_dir_all(server.dir()).unwrap();
    let e = s.index_done_callback().unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    assert!(e.to_string().contains("rdb_last_bgsave_status:err"), "{e}");
}

/// `graphrag-kv import` checkpoints after its writes: when the save fails, the command fails
/// (non-zero exit) and says why on stderr, instead of reporting the entries as imported.
#[cfg(feature = "cli")]
#[test]
fn cli_import_fails_clearly_when_the_save_fails() {
    let server = RedisServer::start_with(&["--dbfilename", "dump.rdb"]);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("kv_store_full_docs.json");
    std::fs::write(&file, r#"{"d1": {"content": "x"}, "d2": {"content": "y"}}"#).unwrap();
    std::fs::remove_dir_all(server.dir()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_graphrag-kv"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("STORAGE_KV_BACKEND", "redis")
        .env("REDIS_URL", server.url())
        .args(["import", "full_docs"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "import succeeded: {stderr}");
    assert!(stderr.contains("checkpoint failed"), "{stderr}");
    assert!(stderr.contains("rdb_last_bgsave_status:err"), "{stderr}");
    assert!(!stderr.contains("imported 2 entries"), "{stderr}");
}

/// `REDIS_WAIT_REPLICAS=1` with the only replica frozen (SIGSTOP): the write is applied on the
/// master but reported as [`Error::Replication`], neither success nor a socket timeout.
#[test]
fn stopped_replica_makes_the_write_a_replication_error() {
    let (master, replica) = master_and_replica(ServerKind::Redis);
    let s = Storage::open(
        &config_for(&master, "sr")
            .wait_replicas(1, Duration::from_millis(500))
            .socket_timeout(Duration::from_secs(5))
            .retries(0)
            .build()
            .unwrap(),
    )
    .unwrap()
    .namespace("ns")
    .unwrap();
    s.upsert(vec![("before".into(), json!(1))]).unwrap();
    replica.pause();
    let e = s.upsert(vec![("during".into(), json!(2))]).unwrap_err();
    replica.resume();
    assert!(
        matches!(
            e,
            Error::Replication {
                wanted: 1,
                confirmed: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable() && !e.is_timeout(), "{e}");
    assert_eq!(s.get_by_id("during").unwrap(), Some(json!(2)));
}

/// A `WAIT` may block for `REDIS_WAIT_TIMEOUT`; a reply later than `REDIS_SOCKET_TIMEOUT` is a
/// client-side timeout, so a replica that stopped answering would read as a dead master. Such
/// a configuration is refused when built, naming the variable.
#[test]
fn wait_timeout_not_below_the_socket_timeout_is_refused() {
    let (master, replica) = master_and_replica(ServerKind::Redis);
    for (wait, socket) in [(3_000, 1_000), (1_000, 1_000)] {
        let built = config_for(&master, "wt")
            .wait_replicas(1, Duration::from_millis(wait))
            .socket_timeout(Duration::from_millis(socket))
            .retries(0)
            .build();
        match built {
            Err(e) => {
                assert!(matches!(e, Error::Config { .. }), "{e}");
                assert!(e.to_string().contains("REDIS_WAIT_TIMEOUT"), "{e}");
                assert!(e.to_string().contains("REDIS_SOCKET_TIMEOUT"), "{e}");
            }
            Ok(config) => {
                let s = Storage::open(&config).unwrap().namespace("ns").unwrap();
                replica.pause();
                let outcome = s.upsert(vec![("k".into(), json!(1))]);
                replica.resume();
                panic!(
                    "REDIS_WAIT_TIMEOUT {wait} ms with REDIS_SOCKET_TIMEOUT {socket} ms was \
                     accepted; with the replica stopped the write gave {outcome:?}"
                );
            }
        }
    }
    // The same through the environment.
    let vars: HashMap<String, String> = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", master.url().as_str()),
        ("REDIS_WAIT_REPLICAS", "1"),
        ("REDIS_WAIT_TIMEOUT", "5"),
        ("REDIS_SOCKET_TIMEOUT", "5"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let e = StoreConfigBuilder::from_vars(&vars)
        .and_then(StoreConfigBuilder::build)
        .unwrap_err();
    assert!(e.to_string().contains("REDIS_WAIT_TIMEOUT"), "{e}");
    // Without replicas to wait for, the WAIT timeout does not matter.
    let mut no_wait = vars.clone();
    no_wait.insert("REDIS_WAIT_REPLICAS".into(), "0".into());
    StoreConfigBuilder::from_vars(&no_wait)
        .unwrap()
        .build()
        .unwrap();
}

#[test]
fn secrets_stay_out_of_errors_and_debug() {
    let server = RedisServer::start_with(&["--requirepass", "hunter2"]);
    let config = config_for(&server, "s")
        .password("hunter2")
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    storage
        .namespace("ns")
        .unwrap()
        .upsert(vec![("k".into(), json!(1))])
        .unwrap();
    assert!(!format!("{config:?}{storage:?}").contains("hunter2"));

    let wrong = config_for(&server, "s")
        .redis_url(format!("redis://:wrongpass@127.0.0.1:{}", server.port()))
        .retries(0)
        .build()
        .unwrap();
    let e = Storage::open(&wrong).unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains("wrongpass") && !text.contains("hunter2"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// The typed path and the key stream (issue 14)

/// A typed write stores exactly the bytes an untyped write of the same value stores, plain and
/// compressed: whatever reads untyped values (another process, a Python worker's
/// `json.loads(GET key)`) reads typed ones.
#[test]
fn typed_writes_store_the_bytes_of_untyped_writes() {
    let server = RedisServer::start();
    let mut raw = server.client().get_connection().unwrap();
    for (prefix, compression) in [("tp", Compression::None), ("tz", Compression::Lz4)] {
        let config = config_for(&server, prefix)
            .compression(compression)
            .build()
            .unwrap();
        let storage = Storage::open(&config).unwrap();
        let s = storage.namespace("text_chunks").unwrap();
        let chunk = |i: u64| graphrag_kv::TextChunk {
            tokens: i,
            content: format!("{} \"q\" é 🦀\n\t\\ {i}", prose(800)),
            chunk_order_index: i,
            full_doc_id: format!("doc-{i}"),
        };
        use graphrag_kv::KvStoreExt;
        s.upsert_as((0..3).map(|i| (format!("typed-{i}"), chunk(i))))
            .unwrap();
        s.upsert(
            (0..3)
                .map(|i| {
                    (
                        format!("plain-{i}"),
                        serde_json::to_value(chunk(i)).unwrap(),
                    )
                })
                .collect(),
        )
        .unwrap();
        for i in 0..3 {
            let typed: Vec<u8> = raw.get(format!("{prefix}:text_chunks:typed-{i}")).unwrap();
            let plain: Vec<u8> = raw.get(format!("{prefix}:text_chunks:plain-{i}")).unwrap();
            assert_eq!(typed, plain, "{compression:?} value {i}");
            if compression == Compression::None {
                let v: Value = serde_json::from_slice(&typed).unwrap();
                assert_eq!(v, serde_json::to_value(chunk(i)).unwrap());
            } else {
                assert_eq!(typed[..4], graphrag_kv::codec::FRAME_MAGIC, "compressed");
            }
        }
    }
}

/// A stored value that is not valid JSON (written by another client) is a decode error naming
/// the key on the typed path, as on the untyped one, and a corrupt frame too.
#[test]
fn typed_reads_of_corrupt_values_name_the_key() {
    let server = RedisServer::start();
    let mut raw = server.client().get_connection().unwrap();
    let storage = Storage::open(&config_for(&server, "cv").build().unwrap()).unwrap();
    let s = storage.namespace("text_chunks").unwrap();
    let _: () = raw
        .set("cv:text_chunks:notjson", "{\"tokens\": 1,")
        .unwrap();
    let _: () = raw
        .set(
            "cv:text_chunks:badframe",
            &[0xFFu8, b'G', b'K', b'1', 9, 9, 9, 9, 1][..],
        )
        .unwrap();
    use graphrag_kv::KvStoreExt;
    for id in ["notjson", "badframe"] {
        for r in [
            s.get_as::<graphrag_kv::TextChunk>(id).map(|_| ()),
            s.get_many_as::<graphrag_kv::TextChunk>(&[id.to_string()])
                .map(|_| ()),
        ] {
            match r {
                Err(e @ Error::Decode { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(id) && msg.contains("text_chunks"), "{msg}");
                }
                other => panic!("{id}: expected Error::Decode, got {other:?}"),
            }
        }
    }
}

/// `scan_keys` over 30,000 keys hands them over in SCAN pages, none near the namespace's size,
/// and the union equals `all_keys`.
#[test]
fn scan_keys_pages_are_bounded_by_scan_not_by_the_namespace() {
    let server = RedisServer::start();
    let storage = Storage::open(&config_for(&server, "sk").build().unwrap()).unwrap();
    let s = storage.namespace("full_docs").unwrap();
    let n = 30_000;
    for part in (0..n).collect::<Vec<_>>().chunks(5_000) {
        s.upsert(part.iter().map(|i| (format!("d{i}"), json!(i))).collect())
            .unwrap();
    }
    let mut pages = Vec::new();
    let mut seen = std::collections::HashSet::new();
    s.scan_keys(&mut |page| {
        pages.push(page.len());
        seen.extend(page);
        Ok(())
    })
    .unwrap();
    let all: std::collections::HashSet<String> = s.all_keys().unwrap().into_iter().collect();
    assert_eq!(seen, all);
    assert_eq!(all.len(), n);
    let largest = *pages.iter().max().unwrap();
    assert!(
        pages.len() >= 3 && largest <= n / 3,
        "{} pages, largest {largest} of {n} keys",
        pages.len()
    );
}
