//! The Redis backend against real redis-server processes: the conformance suite (compressed and
//! plain), key layout, TTLs under both variable names, interop with other clients, bad stored
//! data, and durable checkpoints.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use graphrag_kv::{
    Compression, Error, KvStore, Storage, StoreConfig, StoreConfigBuilder, LLM_RESPONSE_CACHE,
};
use redis::Commands;
use serde_json::{json, Value};
use support::RedisServer;

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

support::conformance::conformance_tests!(redis_lz4, redis_backend);
support::conformance::conformance_tests!(redis_plain, redis_backend_plain);

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

/// `REDIS_WAIT_REPLICAS` on a single server: an `upsert` spanning several windows and chunks
/// returns once a replica has every value, and is an error naming the shortfall otherwise.
#[test]
fn wait_replicas_on_a_single_server_covers_every_window() {
    let master = RedisServer::start();
    let port = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
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
    let items = |n: usize| -> Vec<(String, Value)> {
        (0..n)
            .map(|i| (format!("r-{i:04}"), json!({"i": i, "text": prose(50)})))
            .collect()
    };
    let one = Storage::open(
        &config_for(&master, "w1")
            .wait_replicas(1, Duration::from_secs(5))
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

#[test]
fn checkpoint_with_aof_everysec_survives_sigkill() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let s = Storage::open(&config_for(&server, "a").build().unwrap())
        .unwrap()
        .namespace("full_docs")
        .unwrap();
    let items: Vec<_> = (0..300)
        .map(|i| (format!("d{i}"), json!({"n": i})))
        .collect();
    s.upsert(items).unwrap();
    s.index_done_callback().unwrap();
    server.kill();
    server.restart();
    assert_eq!(s.all_keys().unwrap().len(), 300);
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
