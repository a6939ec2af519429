use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::error::Result;
use crate::store::{COMMUNITY_REPORTS, FULL_DOCS, LLM_RESPONSE_CACHE, TEXT_CHUNKS};

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn build(pairs: &[(&str, &str)]) -> Result<StoreConfig> {
    StoreConfigBuilder::from_vars(&vars(pairs))?.build()
}

#[test]
fn defaults() {
    let c = build(&[]).unwrap();
    assert_eq!(c.backend, BackendKind::Json);
    assert_eq!(c.json.working_dir, PathBuf::from("./nano_graphrag_cache"));
    assert_eq!(c.redis.max_connections, 50);
    assert_eq!(c.redis.ttl.ttl_for(LLM_RESPONSE_CACHE), 43_200);
    assert_eq!(c.redis.ttl.ttl_for(COMMUNITY_REPORTS), 0);
    assert_eq!(c.redis.ttl.ttl_for("anything"), 0);
    assert_eq!(c.redis.compression, Compression::Lz4);
    assert_eq!(c.redis.compression_min_bytes, 1024);
}

#[test]
fn ttl_names_documented_reference_and_other() {
    let c = build(&[
        ("REDIS_TTL_LLM_CACHE", "60"),
        ("REDIS_TTL_TEXT_CHUNKS", "70"),
        ("REDIS_TTL_DOCS", "80"),
        ("REDIS_TTL_FULL_DOCS", "80"),
        ("REDIS_TTL_MY_NS_V1", "90"),
        ("REDIS_TTL_CHUNKS_EXTRA", "5"),
    ])
    .unwrap();
    let t = &c.redis.ttl;
    assert_eq!(t.ttl_for(LLM_RESPONSE_CACHE), 60);
    assert_eq!(t.ttl_for(TEXT_CHUNKS), 70);
    assert_eq!(t.ttl_for(FULL_DOCS), 80);
    assert_eq!(t.ttl_for("my.ns-v1"), 90);
    assert_eq!(t.ttl_for("chunks_extra"), 5);
    // "chunks" maps to REDIS_TTL_CHUNKS, whose documented meaning is text_chunks.
    let c = build(&[("REDIS_TTL_CHUNKS", "7")]).unwrap();
    assert_eq!(c.redis.ttl.ttl_for("chunks"), 0);
    assert_eq!(c.redis.ttl.ttl_for(TEXT_CHUNKS), 7);
}

#[test]
fn ttl_conflict_names_both_variables() {
    let e = build(&[
        ("REDIS_TTL_LLM_CACHE", "1"),
        ("REDIS_TTL_LLM_RESPONSE_CACHE", "2"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("REDIS_TTL_LLM_CACHE and REDIS_TTL_LLM_RESPONSE_CACHE"),
        "{e}"
    );
}

#[test]
fn bad_values_name_the_variable() {
    for (k, v, needle) in [
        ("REDIS_MAX_CONNECTIONS", "abc", "an integer"),
        ("REDIS_TTL_CHUNKS", "-5", "0 or more"),
        ("REDIS_TTL_OTHER", "x", "0 or more"),
        ("STORAGE_KV_BACKEND", "mongo", "json, redis or dual"),
        ("REDIS_RETRY_ON_TIMEOUT", "maybe", "yes/no"),
        ("REDIS_SOCKET_TIMEOUT", "0", "above 0"),
        ("REDIS_CONNECTION_TIMEOUT", "nan", "above 0"),
        ("REDIS_COMPRESSION", "brotli", "lz4, zstd or none"),
        ("REDIS_COMPRESSION_LEVEL", "0", "from 1 to 19"),
        ("REDIS_COMPRESSION_LEVEL", "20", "from 1 to 19"),
        ("REDIS_COMPRESSION_LEVEL", "-3", "from 1 to 19"),
        ("REDIS_COMPRESSION_LEVEL", "fast", "from 1 to 19"),
        ("REDIS_KEY_PREFIX", "a:b", "ambiguous"),
    ] {
        let e = build(&[(k, v)]).unwrap_err().to_string();
        assert!(e.contains(k) && e.contains(needle), "{k}={v}: {e}");
    }
}

#[test]
fn zstd_and_its_level() {
    let c = build(&[("REDIS_COMPRESSION", " ZSTD ")]).unwrap();
    assert_eq!(c.redis.compression, Compression::Zstd);
    assert_eq!(c.redis.compression_level, crate::codec::DEFAULT_ZSTD_LEVEL);
    let c = build(&[
        ("REDIS_COMPRESSION", "zstd"),
        ("REDIS_COMPRESSION_LEVEL", "19"),
    ])
    .unwrap();
    assert_eq!(c.redis.compression_level, 19);
    assert_eq!(
        build(&[("REDIS_COMPRESSION", "none")])
            .unwrap()
            .redis
            .compression,
        Compression::None
    );
    // The builder's setter is held to the same range, at build(), naming the variable.
    let e = StoreConfig::builder()
        .compression(Compression::Zstd)
        .compression_level(23)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("REDIS_COMPRESSION_LEVEL") && e.contains("23"),
        "{e}"
    );
    assert_eq!(Compression::Zstd.to_string(), "zstd");
}

#[test]
fn booleans_and_durations() {
    for (v, want) in [
        ("TRUE", true),
        ("1", true),
        ("Yes", true),
        ("no", false),
        ("0", false),
    ] {
        assert_eq!(parse_bool("X", v).unwrap(), want);
    }
    let c = build(&[
        ("REDIS_SOCKET_TIMEOUT", "0.25"),
        ("REDIS_HEALTH_CHECK_INTERVAL", "0"),
    ])
    .unwrap();
    assert_eq!(c.redis.socket_timeout, Duration::from_millis(250));
    assert_eq!(c.redis.health_check_interval, Duration::ZERO);
}

#[test]
fn secrets_never_in_debug_or_errors() {
    let c = build(&[
        ("REDIS_URL", "redis://user:hunter2@host:1/0"),
        ("REDIS_PASSWORD", "s3cret"),
    ])
    .unwrap();
    let d = format!("{c:?}");
    assert!(!d.contains("hunter2") && !d.contains("s3cret"), "{d}");
    assert!(d.contains("redis://user:<redacted>@host:1/0"), "{d}");
    let e = build(&[
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", "redis://u:hunter2@host:notaport"),
    ])
    .unwrap_err()
    .to_string();
    assert!(!e.contains("hunter2") && e.contains("REDIS_URL"), "{e}");
}

#[test]
fn redaction_forms() {
    assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    assert_eq!(redact_url("redis://:pw@h:1"), "redis://:<redacted>@h:1");
    assert_eq!(redact_url("redis://pw@h"), "redis://<redacted>@h");
    assert_eq!(
        redact_url("redis://a:b@h1:1,redis://a:c@h2:2"),
        "redis://a:<redacted>@h1:1,redis://a:<redacted>@h2:2"
    );
    // Raw separators inside a password (such URLs do not parse, and end up in errors).
    for (url, secret) in [
        ("redis://:p/ss@h:6379", "p/ss"),
        ("redis://u:p?ss@h", "p?ss"),
        ("redis://u:p@ss@h/0", "p@ss"),
        ("redis://u:pa,ss@h1:1,redis://u:x,y@h2:2", "pa,ss"),
    ] {
        let r = redact_url(url);
        assert!(!r.contains(secret) && !r.contains("ss@"), "{url} -> {r}");
        assert!(r.contains("<redacted>@h"), "{url} -> {r}");
    }
    assert_eq!(
        redact_url("redis://u:pa,ss@h1:1,redis://u:x,y@h2:2"),
        "redis://u:<redacted>@h1:1,redis://u:<redacted>@h2:2"
    );
    assert!(has_userinfo("redis://:p/ss@h") && !has_userinfo("redis://h:1/0"));
}

#[test]
fn a_comma_in_a_password_does_not_split_the_url() {
    // The JSON backend: the URLs are kept, not checked.
    let c = build(&[
        ("REDIS_URL", "redis://u:pa,ss@h1:1, rediss://u:x,y@h2:2"),
        ("REDIS_SENTINEL_URLS", "redis://:s,1@h3:3,redis://h4:4"),
    ])
    .unwrap();
    assert_eq!(
        c.redis.urls(),
        vec!["redis://u:pa,ss@h1:1", "rediss://u:x,y@h2:2"]
    );
    assert_eq!(
        c.redis.sentinel_urls,
        vec!["redis://:s,1@h3:3".to_string(), "redis://h4:4".to_string()]
    );
    // A URL that does not parse is shown whole and redacted, never cut at a comma.
    let e = build(&[
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_URL", "redis://u:pa,ss@h1:notaport"),
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("redis://u:<redacted>@h1:notaport"), "{e}");
    assert!(!e.contains("pa,") && !e.contains("ss@"), "{e}");
}
