//! Secrets: passwords and URLs holding them never reach a log record (trace level included), an
//! error, `Debug` output or the command line's output.

use std::collections::HashMap;

use graphrag_kv::{Error, Storage, StoreConfigBuilder};
use serde_json::json;

use crate::helpers::{from_vars, path_str, percent_encode};
use crate::logs::{all_records, capture_logs};
use crate::support::tls::{ClientAuth, TlsRedisServer};
use crate::support::RedisServer;

/// Every way the secrets could leak: log records of every level from every thread, and the
/// errors' and configurations' Display and Debug forms.
#[test]
fn secrets_never_reach_logs_errors_or_debug_output() {
    capture_logs();
    const PASSWORD: &str = "Sekr1t-pw-9c41e7";
    const WRONG_IN_ENV: &str = "Wr0ng-env-pw-5d2a";
    const WRONG_IN_URL: &str = "Wr0ng-url-pw-77b0";
    const UNREACHABLE_PW: &str = "Unre4ch-pw-3e19";
    const ACL_PW: &str = "Acl-user-pw-c0ffee";
    let secrets = [PASSWORD, WRONG_IN_ENV, WRONG_IN_URL, UNREACHABLE_PW, ACL_PW];
    let mut shown: Vec<String> = Vec::new();
    let mut show_err = |e: &Error| shown.push(format!("{e} | {e:?}"));

    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let port = server.port();
    let quick = [
        ("REDIS_CONNECTION_TIMEOUT", "1"),
        ("REDIS_POOL_TIMEOUT", "1.5"),
        ("REDIS_RETRIES", "1"),
    ];
    let with = |pairs: &[(&str, &str)]| {
        let mut all = pairs.to_vec();
        all.push(("STORAGE_KV_BACKEND", "redis"));
        all.extend_from_slice(&quick);
        all.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>()
    };
    let mut debug_outputs: Vec<String> = Vec::new();

    // The right password, from REDIS_PASSWORD and from the URL.
    let url_with_password = format!("redis://:{PASSWORD}@127.0.0.1:{port}/0");
    let plain_url = server.url();
    for pairs in [
        with(&[("REDIS_URL", &plain_url), ("REDIS_PASSWORD", PASSWORD)]),
        with(&[("REDIS_URL", &url_with_password)]),
    ] {
        let builder = StoreConfigBuilder::from_vars(&pairs).unwrap();
        debug_outputs.push(format!("{builder:?}"));
        let config = builder.build().unwrap();
        debug_outputs.push(format!("{config:?} {:?}", config.redis));
        let storage = Storage::open(&config).unwrap();
        let store = storage.namespace("ns").unwrap();
        store.upsert(vec![("k".into(), json!({"v": 1}))]).unwrap();
        assert_eq!(store.get_by_id("k").unwrap(), Some(json!({"v": 1})));
        store.all_keys().unwrap();
        store.stats().unwrap();
        store.index_done_callback().unwrap();
        let redis_store = storage.redis().unwrap().namespace("ns").unwrap();
        debug_outputs.push(format!("{storage:?} {redis_store:?} {:?}", storage.redis()));
    }

    // Wrong passwords: in REDIS_PASSWORD, and in the URL.
    for pairs in [
        with(&[("REDIS_URL", &plain_url), ("REDIS_PASSWORD", WRONG_IN_ENV)]),
        with(&[(
            "REDIS_URL",
            &format!("redis://default:{WRONG_IN_URL}@127.0.0.1:{port}"),
        )]),
    ] {
        let config = StoreConfigBuilder::from_vars(&pairs)
            .unwrap()
            .build()
            .unwrap();
        debug_outputs.push(format!("{config:?}"));
        let e = Storage::open(&config).unwrap_err();
        show_err(&e);
    }

    // No password where one is needed: an error after connecting (NOAUTH).
    let config = StoreConfigBuilder::from_vars(&with(&[("REDIS_URL", &plain_url)]))
        .unwrap()
        .build()
        .unwrap();
    show_err(&Storage::open(&config).unwrap_err());

    // An unreachable server, password in the URL.
    let closed = crate::support::free_port();
    let config = StoreConfigBuilder::from_vars(&with(&[(
        "REDIS_URL",
        &format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:{closed}"),
    )]))
    .unwrap()
    .build()
    .unwrap();
    debug_outputs.push(format!("{config:?}"));
    show_err(&Storage::open(&config).unwrap_err());

    // A URL that does not parse, with a password in it.
    for bad in [
        format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:notaport"),
        format!("redis://user:{UNREACHABLE_PW}@127.0.0.1:{closed}/notadb"),
        format!("http://user:{UNREACHABLE_PW}@127.0.0.1:{closed}"),
    ] {
        let e = StoreConfigBuilder::from_vars(&with(&[("REDIS_URL", &bad)]))
            .unwrap()
            .build()
            .unwrap_err();
        show_err(&e);
    }

    // An ACL user over TLS: username shown, password not.
    let tls = TlsRedisServer::start(ClientAuth::No, &[]);
    let mut admin = tls.server().conn();
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("tlsuser")
        .arg("on")
        .arg(format!(">{ACL_PW}"))
        .arg("~*")
        .arg("+@all")
        .query::<()>(&mut admin)
        .unwrap();
    let ca = path_str(&tls.certs().ca_cert()).to_string();
    for (password, works) in [(ACL_PW, true), (WRONG_IN_ENV, false)] {
        let config = StoreConfigBuilder::from_vars(&with(&[
            ("REDIS_URL", &tls.tls_url()),
            ("REDIS_TLS_CA_CERT", &ca),
            ("REDIS_USERNAME", "tlsuser"),
            ("REDIS_PASSWORD", password),
        ]))
        .unwrap()
        .build()
        .unwrap();
        debug_outputs.push(format!("{config:?}"));
        match Storage::open(&config) {
            Ok(storage) => {
                assert!(works);
                let s = storage.namespace("ns").unwrap();
                s.upsert(vec![("k".into(), json!(2))]).unwrap();
                let redis_store = storage.redis().unwrap().namespace("ns").unwrap();
                debug_outputs.push(format!("{storage:?} {redis_store:?}"));
            }
            Err(e) => {
                assert!(!works, "{e}");
                show_err(&e);
            }
        }
    }

    // The capture works: the pool's debug line about failed connections was recorded.
    let records = all_records();
    assert!(
        records.iter().any(|r| r.starts_with("DEBUG")),
        "the capturing logger recorded nothing at debug level"
    );
    assert!(debug_outputs.iter().any(|d| d.contains("<redacted>")));
    assert!(shown.len() >= 8, "{shown:?}");
    for secret in secrets {
        let encoded = percent_encode(secret);
        for (what, texts) in [
            ("a log record", &records),
            ("an error", &shown),
            ("a Debug output", &debug_outputs),
        ] {
            if let Some(t) = texts
                .iter()
                .find(|t| t.contains(secret) || t.contains(&encoded))
            {
                panic!("{secret} leaked in {what}: {t}");
            }
        }
    }
}

/// The command line, run with `RUST_LOG=trace`, prints neither a password from REDIS_PASSWORD
/// nor one from the URL, whether the server refuses it or cannot be reached.
#[cfg(feature = "cli")]
#[test]
fn command_line_never_prints_the_password() {
    const PASSWORD: &str = "Cli-Sekr1t-4af2";
    const WRONG: &str = "Cli-Wr0ng-81c3";
    let server = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let closed = crate::support::free_port();
    let runs: Vec<(Vec<(&str, String)>, bool)> = vec![
        (vec![("REDIS_PASSWORD", PASSWORD.into())], true),
        (vec![("REDIS_PASSWORD", WRONG.into())], false),
        (
            vec![(
                "REDIS_URL",
                format!("redis://:{WRONG}@127.0.0.1:{}", server.port()),
            )],
            false,
        ),
        (
            vec![(
                "REDIS_URL",
                format!("redis://:{PASSWORD}@127.0.0.1:{closed}"),
            )],
            false,
        ),
    ];
    for (env, works) in runs {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_graphrag-kv"));
        cmd.args(["get", "ns", "some-id"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_URL", server.url())
            .env("REDIS_CONNECTION_TIMEOUT", "1")
            .env("REDIS_POOL_TIMEOUT", "1.5")
            .env("REDIS_RETRIES", "0");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("running graphrag-kv");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // `get` of a missing id exits 1; an error exits 2.
        assert_eq!(out.status.code(), Some(if works { 1 } else { 2 }), "{text}");
        for secret in [PASSWORD, WRONG] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// Passwords holding the URL's own separators (`,` `@` `:` `/` `%`), raw and percent-encoded,
/// in `REDIS_URL` (one server or a cluster list) and `REDIS_SENTINEL_URLS`: no part of them
/// reaches an error, a `Debug` output or a log record, whether the URL parses or not. A raw
/// comma no longer splits the URL (it used to be cut there before redaction, printing the
/// part before the comma), so such a password also works.
#[test]
fn passwords_with_url_separators_never_leak() {
    capture_logs();
    const PASSWORDS: [&str; 5] = [
        "Kp3q,Wd7z",
        "Mv2x@Tn5y",
        "Hb4c:Jf6g/Qs8r",
        "Rs1t%41Yu2v%Lm",
        "Ae9w,Bx3k@Cz4n:Dp5m/Ef6h%Gk7j",
    ];
    /// The password and every part of it between separators longer than 1 character.
    fn pieces(pw: &str) -> Vec<String> {
        let mut out = vec![pw.to_string(), percent_encode(pw)];
        for p in pw.split([',', '@', ':', '/', '%']) {
            if p.len() > 1 {
                out.push(p.to_string());
            }
        }
        out
    }
    let closed = crate::support::free_port();
    let closed2 = crate::support::free_port();
    let quick = [
        ("STORAGE_KV_BACKEND", "redis"),
        ("REDIS_CONNECTION_TIMEOUT", "1"),
        ("REDIS_POOL_TIMEOUT", "1"),
        ("REDIS_RETRIES", "0"),
    ];
    let mut shown: Vec<(String, String)> = Vec::new();
    for pw in PASSWORDS {
        for form in [pw.to_string(), percent_encode(pw)] {
            let one = format!("redis://user:{form}@127.0.0.1:{closed}/0");
            let list = format!(
                "redis://user:{form}@127.0.0.1:{closed},redis://user:{form}@127.0.0.1:{closed2}"
            );
            for (variable, value) in [
                ("REDIS_URL", one.clone()),
                ("REDIS_URL", list),
                ("REDIS_SENTINEL_URLS", one),
            ] {
                let mut pairs = quick.to_vec();
                pairs.push((variable, &value));
                let config = match from_vars(&pairs) {
                    Err(e) => {
                        let text = format!("{e} | {e:?}");
                        assert!(text.contains(variable), "{text}");
                        shown.push((pw.to_string(), text));
                        continue;
                    }
                    Ok(c) => c,
                };
                shown.push((pw.to_string(), format!("{config:?}")));
                match Storage::open(&config) {
                    Ok(_) => panic!("{variable}: nothing listens on port {closed}"),
                    Err(e) => shown.push((pw.to_string(), format!("{e} | {e:?}"))),
                }
            }
        }
    }
    let records = all_records();
    for (pw, text) in &shown {
        for piece in pieces(pw) {
            assert!(!text.contains(&piece), "{piece:?} of {pw:?} leaked: {text}");
        }
    }
    for pw in PASSWORDS {
        for piece in pieces(pw) {
            if let Some(r) = records.iter().find(|r| r.contains(&piece)) {
                panic!("{piece:?} of {pw:?} leaked in a log record: {r}");
            }
        }
    }

    // A raw comma in the password is part of the password, not a second URL.
    const COMMA_PW: &str = "Np6v,Qw8e";
    let server = RedisServer::start_with(&["--requirepass", COMMA_PW]);
    let url = format!("redis://:{COMMA_PW}@127.0.0.1:{}", server.port());
    let config = from_vars(&[("STORAGE_KV_BACKEND", "redis"), ("REDIS_URL", &url)]).unwrap();
    assert_eq!(config.redis.urls(), vec![url.as_str()]);
    let store = Storage::open(&config).unwrap().namespace("ns").unwrap();
    store.upsert(vec![("k".into(), json!(1))]).unwrap();
    assert_eq!(store.get_by_id("k").unwrap(), Some(json!(1)));
}
