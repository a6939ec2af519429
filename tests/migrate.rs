//! Migration between backends, as an operator runs it: `graphrag-kv migrate` and `verify` as
//! subprocesses between a JSON working directory, a real redis-server and a local cluster, plus
//! the library functions they are built on.
//!
//! The big one, `json_to_redis_verify_modify_and_roll_back`, is the acceptance test:
//! all four namespaces (non-ASCII values included) from JSON to Redis, verified equal, a value
//! changed in Redis found by verify (exit 1, the id named), then rolled back to a fresh JSON
//! directory and verified equal again.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use graphrag_kv::migrate::{
    compare_namespace, copy_namespace, migrate, parse_spec, verify, MigrateOptions, NoProgress,
    Progress,
};
use graphrag_kv::{
    BackendKind, KvStore, Storage, StoreConfig, COMMUNITY_REPORTS, FULL_DOCS, LLM_RESPONSE_CACHE,
    NAMESPACES, TEXT_CHUNKS,
};
use serde_json::{json, Value};
use support::cluster::RedisCluster;
use support::tls::{ClientAuth, TestCerts, TlsCluster, TlsRedisServer};
use support::{unique_prefix, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_graphrag-kv");

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with only `PATH` and `env` in its environment.
fn run(env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env.iter().copied()).args(args);
    let o = cmd.output().expect("running graphrag-kv");
    Out {
        code: o.status.code().expect("graphrag-kv was killed by a signal"),
        stdout: String::from_utf8(o.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(o.stderr).expect("UTF-8 stderr"),
    }
}

#[track_caller]
fn code(out: &Out, want: i32) {
    assert_eq!(out.code, want, "{out:#?}");
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
}

fn json_spec(dir: &Path) -> String {
    format!("json:{}", dir.display())
}

/// A nano-graphrag index of all four namespaces: non-ASCII ids and values, escapes, nested
/// objects, values large enough to be lz4-compressed in Redis.
fn index() -> BTreeMap<&'static str, Vec<(String, Value)>> {
    let long = "Grüße aus Köln, 世界の果て, naïve café — ".repeat(60);
    let mut data = BTreeMap::new();
    data.insert(
        FULL_DOCS,
        (0..30)
            .map(|i| {
                let id = if i == 0 {
                    "doc-日本語".to_string()
                } else {
                    format!("doc-{i:032x}")
                };
                (
                    id,
                    json!({"content": format!("{long} #{i} 🦀 \"q\" \\ \t\n")}),
                )
            })
            .collect(),
    );
    data.insert(
        TEXT_CHUNKS,
        (0..120)
            .map(|i| {
                (
                    format!("chunk-{i:032x}"),
                    json!({
                        "tokens": 12 + i,
                        "content": format!("Ωμέγα {i}: {}", if i % 7 == 0 { &long[..] } else { "短い" }),
                        "chunk_order_index": i % 10,
                        "full_doc_id": format!("doc-{:032x}", i / 4),
                    }),
                )
            })
            .collect(),
    );
    data.insert(
        COMMUNITY_REPORTS,
        (0..10)
            .map(|i| {
                (
                    format!("{i}"),
                    json!({
                        "report_string": format!("# Gemeinschaft {i}\n\nZusammenfassung — ✓"),
                        "report_json": {"title": "Überblick", "rating": 7.5, "findings": [
                            {"summary": "α", "explanation": "β"}, {"summary": null}
                        ]},
                        "data": {"level": 0, "nodes": ["A", "B"], "sub_communities": [], "ok": true},
                    }),
                )
            })
            .collect(),
    );
    data.insert(
        LLM_RESPONSE_CACHE,
        (0..50)
            .map(|i| {
                (
                    format!("{i:032x}"),
                    json!({"return": format!("答え {i} — réponse"), "model": "gpt-4o-mini"}),
                )
            })
            .collect(),
    );
    data
}

/// Writes `data` into a JSON working directory, as an indexer leaves it.
fn write_json_dir(dir: &Path, data: &BTreeMap<&'static str, Vec<(String, Value)>>) {
    let storage = Storage::open(&StoreConfig::builder().working_dir(dir).build().unwrap()).unwrap();
    for (ns, items) in data {
        let store = storage.namespace(ns).unwrap();
        store.upsert(items.clone()).unwrap();
        store.index_done_callback().unwrap();
    }
}

fn redis_storage(url: &str, prefix: &str) -> Storage {
    Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(url)
            .key_prefix(prefix)
            .build()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn json_to_redis_verify_modify_and_roll_back() {
    let work = tempfile::tempdir().unwrap();
    let original = work.path().join("original");
    let rolled_back = work.path().join("rolled-back");
    let data = index();
    write_json_dir(&original, &data);
    let server = RedisServer::start();
    let prefix = unique_prefix("migrate");
    let env = [("REDIS_KEY_PREFIX", prefix.as_str())];
    let (json_src, redis) = (json_spec(&original), server.url());

    // 1. JSON -> Redis, in batches of 16.
    let out = run(
        &env,
        &[
            "migrate", "--from", &json_src, "--to", &redis, "--batch", "16",
        ],
    );
    code(&out, 0);
    for (ns, items) in &data {
        let line = format!(
            "{ns}: {n} ids in the source: {n} copied, 0 already equal",
            n = items.len()
        );
        assert!(out.stdout.contains(&line), "{line:?} in {out:#?}");
    }
    assert!(
        out.stdout.contains("210 ids copied, 0 already equal"),
        "{out:#?}"
    );
    // Not a terminal: plain progress lines, one summary per namespace.
    assert!(
        out.stderr.contains("migrate text_chunks: 120 ids"),
        "{out:#?}"
    );
    assert!(
        out.stderr
            .contains("migrate text_chunks: 120/120 ids, done"),
        "{out:#?}"
    );

    // The values arrived intact, read through the library.
    let in_redis = redis_storage(&redis, &prefix);
    for (ns, items) in &data {
        let store = in_redis.namespace(ns).unwrap();
        let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
        let got = store.get_by_ids(&ids, None).unwrap();
        for ((id, want), got) in items.iter().zip(got) {
            assert_eq!(got.as_ref(), Some(want), "{ns}/{id}");
        }
    }

    // 2. Verify: equal, exit 0.
    let out = run(&env, &["verify", "--from", &json_src, "--to", &redis]);
    code(&out, 0);
    for ns in NAMESPACES {
        assert!(out.stdout.contains(&format!("{ns}: equal (")), "{out:#?}");
    }
    assert!(out.stdout.trim_end().ends_with(": equal"), "{out:#?}");

    // 3. Re-run: everything is already there and equal, nothing is written.
    let out = run(&env, &["migrate", "--from", &json_src, "--to", &redis]);
    code(&out, 0);
    assert!(
        out.stdout.contains("0 ids copied, 210 already equal"),
        "{out:#?}"
    );

    // 4. One value changed in Redis (as a dual-write divergence would leave it), one id added
    //    and one removed: verify names each, exit 1.
    let chunks = in_redis.namespace(TEXT_CHUNKS).unwrap();
    let changed = data[TEXT_CHUNKS][5].0.clone();
    chunks
        .upsert(vec![(
            changed.clone(),
            json!({"content": "edited in redis — ✎"}),
        )])
        .unwrap();
    let docs = in_redis.namespace(FULL_DOCS).unwrap();
    docs.upsert(vec![(
        "doc-extra".into(),
        json!({"content": "only in redis"}),
    )])
    .unwrap();
    docs.delete_by_ids(&["doc-日本語".to_string()]).unwrap();
    let out = run(&env, &["verify", "--from", &json_src, "--to", &redis]);
    code(&out, 1);
    assert!(
        out.stdout.contains(
            "text_chunks: 120 ids in the source, 120 in the target: 0 missing, 1 different, 0 extra"
        ),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(&format!("  different {changed:?}")),
        "{out:#?}"
    );
    assert!(out.stdout.contains("  missing \"doc-日本語\""), "{out:#?}");
    assert!(out.stdout.contains("  extra \"doc-extra\""), "{out:#?}");
    assert!(
        out.stdout.contains("community_reports: equal (10 ids)"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("DIFFERENT in 2 namespaces"), "{out:#?}");
    // The same as JSON, with every id.
    let out = run(
        &env,
        &["verify", "--from", &json_src, "--to", &redis, "--json"],
    );
    code(&out, 1);
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["equal"], json!(false));
    let text_chunks = doc["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["namespace"] == TEXT_CHUNKS)
        .unwrap();
    assert_eq!(text_chunks["different"], json!([changed]));

    // 5. Roll back: Redis -> a fresh JSON directory, then verify that pair equal.
    let rolled = json_spec(&rolled_back);
    let out = run(&env, &["migrate", "--from", &redis, "--to", &rolled]);
    code(&out, 0);
    assert!(out.stdout.contains("210 ids copied"), "{out:#?}");
    let out = run(&env, &["verify", "--from", &redis, "--to", &rolled]);
    code(&out, 0);
    assert!(out.stdout.trim_end().ends_with(": equal"), "{out:#?}");
    // The files are nano-graphrag's, and hold Redis's state (the edit included).
    for ns in NAMESPACES {
        assert!(
            rolled_back.join(format!("kv_store_{ns}.json")).is_file(),
            "{ns}"
        );
    }
    let file: Value = serde_json::from_slice(
        &std::fs::read(rolled_back.join("kv_store_text_chunks.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(file[&changed], json!({"content": "edited in redis — ✎"}));
    // Against the original directory, exactly the three changes show.
    let out = run(&env, &["verify", "--from", &json_src, "--to", &rolled]);
    code(&out, 1);
    assert!(
        out.stdout.contains("1 missing, 0 different, 1 extra"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("0 missing, 1 different, 0 extra"),
        "{out:#?}"
    );
}

#[test]
fn redis_to_redis_keeps_remaining_ttls_and_json_drops_them() {
    let (a, b) = (RedisServer::start(), RedisServer::start());
    let prefix = unique_prefix("ttl");
    let env = [("REDIS_KEY_PREFIX", prefix.as_str())];
    let source = redis_storage(&a.url(), &prefix);
    source
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap()
        .upsert(
            (0..20)
                .map(|i| (format!("h{i}"), json!({"return": i})))
                .collect(),
        )
        .unwrap();
    source
        .namespace(FULL_DOCS)
        .unwrap()
        .upsert(vec![("d".into(), json!({"content": "kept forever"}))])
        .unwrap();
    let key = |ns: &str, id: &str| format!("{prefix}:{ns}:{id}");
    let mut conn = a.conn();
    let _: () = redis::cmd("PEXPIRE")
        .arg(key(LLM_RESPONSE_CACHE, "h3"))
        .arg(100_000)
        .query(&mut conn)
        .unwrap();

    let out = run(&env, &["migrate", "--from", &a.url(), "--to", &b.url()]);
    code(&out, 0);
    assert!(
        out.stdout
            .contains("llm_response_cache: 20 ids in the source: 20 copied, 0 already equal; remaining TTL kept on 20"),
        "{out:#?}"
    );
    let mut target = b.conn();
    let pttl = |conn: &mut redis::Connection, k: String| -> i64 {
        redis::cmd("PTTL").arg(k).query(conn).unwrap()
    };
    let short = pttl(&mut target, key(LLM_RESPONSE_CACHE, "h3"));
    assert!(
        (1..=100_000).contains(&short),
        "h3 kept ~100 s, got {short} ms"
    );
    let default = pttl(&mut target, key(LLM_RESPONSE_CACHE, "h4"));
    assert!(
        (100_000..=43_200_000).contains(&default),
        "h4 kept the source's remaining 12 h, got {default} ms"
    );
    assert_eq!(
        pttl(&mut target, key(FULL_DOCS, "d")),
        -1,
        "no TTL stays none"
    );

    // A JSON target cannot keep them, and says so.
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &env,
        &[
            "migrate",
            "--from",
            &a.url(),
            "--to",
            &json_spec(dir.path()),
        ],
    );
    code(&out, 0);
    assert!(
        out.stdout
            .contains("TTL dropped on 20 (a JSON store keeps no expiry)"),
        "{out:#?}"
    );
    let out = run(
        &env,
        &["verify", "--from", &a.url(), "--to", &json_spec(dir.path())],
    );
    code(&out, 0);
}

#[test]
fn json_to_cluster_and_back_with_ttls() {
    let cluster = RedisCluster::start();
    let single = RedisServer::start();
    let prefix = unique_prefix("cl");
    let env = [("REDIS_KEY_PREFIX", prefix.as_str())];
    let work = tempfile::tempdir().unwrap();
    let data = index();
    write_json_dir(work.path(), &data);
    let nodes = cluster.url_list();
    assert!(
        nodes.contains(','),
        "a cluster SPEC is comma-separated: {nodes}"
    );

    let out = run(
        &env,
        &[
            "migrate",
            "--from",
            &json_spec(work.path()),
            "--to",
            &nodes,
            "--batch",
            "64",
        ],
    );
    code(&out, 0);
    assert!(out.stdout.contains("210 ids copied"), "{out:#?}");
    let out = run(
        &env,
        &["verify", "--from", &json_spec(work.path()), "--to", &nodes],
    );
    code(&out, 0);
    // stats on the cluster: every namespace counted over all masters, INFO summed over them.
    let out = run(
        &[
            ("REDIS_KEY_PREFIX", prefix.as_str()),
            ("STORAGE_KV_BACKEND", "redis"),
            ("REDIS_URL", nodes.as_str()),
        ],
        &["stats", "--json"],
    );
    code(&out, 0);
    let stats: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        stats["namespaces"][TEXT_CHUNKS]["keys"],
        json!(120),
        "{stats}"
    );
    assert_eq!(stats["server"]["nodes"], json!(3), "three masters: {stats}");
    assert!(stats["server"]["keys"].as_u64().unwrap() >= 210, "{stats}");

    // Standalone with TTLs -> cluster: TTLs are set on whichever node owns each key.
    let source = redis_storage(&single.url(), &prefix);
    source
        .namespace(LLM_RESPONSE_CACHE)
        .unwrap()
        .upsert((0..40).map(|i| (format!("t{i}"), json!(i))).collect())
        .unwrap();
    let out = run(
        &env,
        &[
            "migrate",
            "--from",
            &single.url(),
            "--to",
            &nodes,
            "--namespace",
            LLM_RESPONSE_CACHE,
        ],
    );
    code(&out, 0);
    assert!(out.stdout.contains("40 copied"), "{out:#?}");
    assert!(out.stdout.contains("remaining TTL kept on 40"), "{out:#?}");
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for i in 0..40 {
        let k = format!("{prefix}:{LLM_RESPONSE_CACHE}:t{i}");
        let ms: i64 = redis::cmd("PTTL").arg(&k).query(&mut conn).unwrap();
        assert!((1..=43_200_000).contains(&ms), "{k}: {ms}");
    }
    // Cluster -> fresh JSON directory (the rollback path) is equal to the cluster.
    let back = tempfile::tempdir().unwrap();
    let out = run(
        &env,
        &["migrate", "--from", &nodes, "--to", &json_spec(back.path())],
    );
    code(&out, 0);
    let out = run(
        &env,
        &["verify", "--from", &nodes, "--to", &json_spec(back.path())],
    );
    code(&out, 0);
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Puts `n` ids into `namespace` of a TLS server or cluster through the library, with the same
/// TLS settings the command gets from its environment.
fn fill_over_tls(url: &str, ca: &Path, prefix: &str, namespace: &str, n: usize) {
    let storage = Storage::open(
        &StoreConfig::builder()
            .backend(BackendKind::Redis)
            .redis_url(url)
            .key_prefix(prefix)
            .tls_ca_cert(ca)
            .build()
            .unwrap(),
    )
    .unwrap();
    storage
        .namespace(namespace)
        .unwrap()
        .upsert((0..n).map(|i| (format!("t{i}"), json!({"n": i}))).collect())
        .unwrap();
}

#[test]
fn json_to_tls_with_a_private_ca_and_with_mutual_tls() {
    let work = tempfile::tempdir().unwrap();
    let data = index();
    write_json_dir(work.path(), &data);
    let src = json_spec(work.path());
    let certs = Arc::new(TestCerts::generate());
    let ca = path_str(&certs.ca_cert()).to_string();
    let (client_cert, client_key) = (
        path_str(&certs.client_cert()).to_string(),
        path_str(&certs.client_key()).to_string(),
    );

    // Server authentication only: the CA of REDIS_TLS_CA_CERT, nothing from the system.
    let server = TlsRedisServer::start_with_certs(certs.clone(), ClientAuth::No, &[]);
    let prefix = unique_prefix("tls");
    let env = [
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("REDIS_TLS_CA_CERT", ca.as_str()),
    ];
    let to = server.tls_url();
    let out = run(&env, &["migrate", "--from", &src, "--to", &to]);
    code(&out, 0);
    assert!(out.stdout.contains("210 ids copied"), "{out:#?}");
    let out = run(&env, &["verify", "--from", &src, "--to", &to]);
    code(&out, 0);
    assert!(out.stdout.trim_end().ends_with(": equal"), "{out:#?}");
    // Remaining TTLs from one TLS server to another (both read and set over TLS).
    let other = TlsRedisServer::start_with_certs(certs.clone(), ClientAuth::No, &[]);
    let out = run(
        &env,
        &[
            "migrate",
            "--from",
            &to,
            "--to",
            &other.tls_url(),
            "--namespace",
            LLM_RESPONSE_CACHE,
        ],
    );
    code(&out, 0);
    assert!(
        out.stdout
            .contains("50 copied, 0 already equal; remaining TTL kept on 50"),
        "{out:#?}"
    );

    // Mutual TLS: the server refuses a client without a certificate signed by the CA.
    let mutual = TlsRedisServer::start_with_certs(certs.clone(), ClientAuth::Required, &[]);
    let to = mutual.tls_url();
    let env = [
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("REDIS_TLS_CA_CERT", ca.as_str()),
        ("REDIS_TLS_CLIENT_CERT", client_cert.as_str()),
        ("REDIS_TLS_CLIENT_KEY", client_key.as_str()),
    ];
    let out = run(&env, &["migrate", "--from", &src, "--to", &to]);
    code(&out, 0);
    assert!(out.stdout.contains("210 ids copied"), "{out:#?}");
    let out = run(&env, &["verify", "--from", &src, "--to", &to]);
    code(&out, 0);
    assert!(out.stdout.trim_end().ends_with(": equal"), "{out:#?}");
    // Without the client certificate the same command fails (exit 2), so the one above really
    // presented it.
    let out = run(&env[..2], &["verify", "--from", &src, "--to", &to]);
    code(&out, 2);
}

#[test]
fn tls_cluster_with_a_private_ca_keeps_ttls_both_ways() {
    let cluster = TlsCluster::start(3);
    // A single TLS server of another CA: REDIS_TLS_CA_CERT holds both CAs, as a bundle.
    let single = TlsRedisServer::start(ClientAuth::No, &[]);
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("cas.pem");
    let mut pem = std::fs::read(cluster.certs().ca_cert()).unwrap();
    pem.extend(std::fs::read(single.certs().ca_cert()).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let prefix = unique_prefix("tlscl");
    let ca = path_str(&bundle).to_string();
    let env = [
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("REDIS_TLS_CA_CERT", ca.as_str()),
    ];
    let nodes = cluster.tls_url_list();

    // TLS server with TTLs -> TLS cluster: the TTLs are set on the nodes owning the keys.
    fill_over_tls(&single.tls_url(), &bundle, &prefix, LLM_RESPONSE_CACHE, 40);
    let out = run(
        &env,
        &["migrate", "--from", &single.tls_url(), "--to", &nodes],
    );
    code(&out, 0);
    assert!(
        out.stdout
            .contains("40 copied, 0 already equal; remaining TTL kept on 40"),
        "{out:#?}"
    );
    let mut spread = 0;
    for node in cluster.nodes() {
        let mut conn = node.server().conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:{LLM_RESPONSE_CACHE}:*"))
            .query(&mut conn)
            .unwrap();
        spread += usize::from(!keys.is_empty());
        for k in keys {
            let ms: i64 = redis::cmd("PTTL").arg(&k).query(&mut conn).unwrap();
            assert!((1..=43_200_000).contains(&ms), "{k}: {ms}");
        }
    }
    assert!(spread > 1, "the keys are on several masters");
    let out = run(
        &env,
        &["verify", "--from", &single.tls_url(), "--to", &nodes],
    );
    code(&out, 0);
    // Re-run: nothing to copy.
    let out = run(
        &env,
        &["migrate", "--from", &single.tls_url(), "--to", &nodes],
    );
    code(&out, 0);
    assert!(
        out.stdout.contains("0 ids copied, 40 already equal"),
        "{out:#?}"
    );

    // TLS cluster -> JSON: TTLs are read from the cluster (and dropped, as JSON keeps none).
    let back = json_spec(&work.path().join("back"));
    let out = run(&env, &["migrate", "--from", &nodes, "--to", &back]);
    code(&out, 0);
    assert!(
        out.stdout
            .contains("TTL dropped on 40 (a JSON store keeps no expiry)"),
        "{out:#?}"
    );
    let out = run(&env, &["verify", "--from", &nodes, "--to", &back]);
    code(&out, 0);
}

#[test]
fn a_password_with_a_comma_in_a_spec() {
    let password = "pa,ss";
    let server = RedisServer::start_with(&["--requirepass", password]);
    let work = tempfile::tempdir().unwrap();
    let data = index();
    write_json_dir(work.path(), &data);
    let prefix = unique_prefix("comma");
    let env = [("REDIS_KEY_PREFIX", prefix.as_str())];
    let src = json_spec(work.path());
    let to = format!("redis://:{password}@127.0.0.1:{}", server.port());
    let out = run(&env, &["migrate", "--from", &src, "--to", &to]);
    code(&out, 0);
    assert!(out.stdout.contains("210 ids copied"), "{out:#?}");
    let out = run(&env, &["verify", "--from", &src, "--to", &to]);
    code(&out, 0);
    // The password shows nowhere, not even its part after the comma.
    for shown in [&out.stdout, &out.stderr] {
        assert!(!shown.contains("pa,ss"), "{out:#?}");
        assert!(!shown.contains(",ss@"), "{out:#?}");
    }
    // A wrong password is an error naming the option, without the password.
    let wrong = format!("redis://:pa,sx@127.0.0.1:{}", server.port());
    let out = run(
        &[("REDIS_RETRIES", "0")],
        &["verify", "--from", &src, "--to", &wrong],
    );
    code(&out, 2);
    assert!(!out.stderr.contains("pa,sx"), "{out:#?}");
}

#[test]
fn bad_specs_and_options_exit_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let existing = json_spec(dir.path());
    let missing = json_spec(&dir.path().join("absent"));
    for (args, needle) in [
        (
            vec!["migrate", "--from", "./dir", "--to", &existing],
            "--from",
        ),
        (
            vec!["migrate", "--from", &existing, "--to", "json:"],
            "--to",
        ),
        (
            vec!["verify", "--from", &missing, "--to", &existing],
            "absent",
        ),
        (
            vec![
                "migrate", "--from", &existing, "--to", &existing, "--batch", "0",
            ],
            "--batch",
        ),
        (vec!["migrate", "--from", &existing], "--to"),
        (
            vec![
                "verify",
                "--from",
                "redis://:hunter2@127.0.0.1:notaport",
                "--to",
                &existing,
            ],
            "--from",
        ),
    ] {
        let out = run(&[], &args);
        code(&out, 2);
        assert_eq!(out.stdout, "", "{out:#?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");
        assert!(out.stderr.contains(needle), "{needle:?} in {out:#?}");
        assert!(!out.stderr.contains("hunter2"), "{out:#?}");
    }
    // An unreachable server is an error (2), not "different" (1).
    let port = support::free_port();
    let out = run(
        &[
            ("REDIS_CONNECTION_TIMEOUT", "0.5"),
            ("REDIS_RETRIES", "0"),
            ("REDIS_POOL_TIMEOUT", "1"),
        ],
        &[
            "verify",
            "--from",
            &existing,
            "--to",
            &format!("redis://127.0.0.1:{port}"),
        ],
    );
    code(&out, 2);
}

/// Counts what a [`Progress`] is told.
#[derive(Default)]
struct Recorder {
    started: Vec<(String, u64)>,
    advanced: u64,
    finished: usize,
}

impl Progress for Recorder {
    fn start(&mut self, namespace: &str, total: u64) {
        self.started.push((namespace.to_string(), total));
    }
    fn advance(&mut self, ids: u64) {
        self.advanced += ids;
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
}

#[test]
fn library_functions_over_storages_and_store_pairs() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let data = index();
    write_json_dir(a.path(), &data);
    let from = Storage::open_read_only(&parse_spec(&json_spec(a.path())).unwrap()).unwrap();
    let to = Storage::open(&parse_spec(&json_spec(b.path())).unwrap()).unwrap();

    // Only the namespaces asked for.
    let mut progress = Recorder::default();
    let options = MigrateOptions::default()
        .namespaces(vec![FULL_DOCS.into(), COMMUNITY_REPORTS.into()])
        .batch(7);
    let report = migrate(&from, &to, &options, &mut progress).unwrap();
    assert_eq!(report.copied(), 40);
    assert_eq!(
        progress.started,
        [
            (FULL_DOCS.to_string(), 30),
            (COMMUNITY_REPORTS.to_string(), 10)
        ]
    );
    assert_eq!((progress.advanced, progress.finished), (40, 2));
    assert!(to
        .namespace(TEXT_CHUNKS)
        .unwrap()
        .all_keys()
        .unwrap()
        .is_empty());

    let diff = verify(&from, &to, &[], 100, &mut NoProgress).unwrap();
    assert!(!diff.is_equal());
    let chunks = diff
        .namespaces
        .iter()
        .find(|d| d.namespace == TEXT_CHUNKS)
        .unwrap();
    assert_eq!(chunks.missing.len(), 120);

    // Store pairs: a single namespace, any two stores.
    let src: Arc<dyn KvStore> = from.namespace(TEXT_CHUNKS).unwrap();
    let dst: Arc<dyn KvStore> = to.namespace(TEXT_CHUNKS).unwrap();
    let r = copy_namespace(&*src, &*dst, 50, &mut NoProgress).unwrap();
    assert_eq!((r.source_ids, r.copied, r.skipped), (120, 120, 0));
    dst.upsert(vec![(data[TEXT_CHUNKS][0].0.clone(), json!("changed"))])
        .unwrap();
    let r = copy_namespace(&*src, &*dst, 50, &mut NoProgress).unwrap();
    assert_eq!(
        (r.copied, r.skipped),
        (1, 119),
        "only the changed id is copied again"
    );
    assert!(compare_namespace(&*src, &*dst, 9, &mut NoProgress)
        .unwrap()
        .is_equal());
    assert!(verify(&from, &to, &[], 100, &mut NoProgress)
        .unwrap()
        .namespaces
        .iter()
        .filter(|d| d.namespace != LLM_RESPONSE_CACHE)
        .all(|d| d.is_equal()));
}
