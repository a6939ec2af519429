//! Unit tests: configuration from the environment, the OOM backoff.

use super::*;

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn off_unless_enabled() {
    assert_eq!(WriteBehindConfig::from_vars(&vars(&[])).unwrap(), None);
    for off in ["false", "0", "no", "NO", " "] {
        let v = vars(&[(ENV_ENABLED, off), (ENV_BATCH, "10")]);
        assert_eq!(WriteBehindConfig::from_vars(&v).unwrap(), None, "{off:?}");
    }
    for on in ["true", "1", "yes", "TRUE"] {
        let c = WriteBehindConfig::from_vars(&vars(&[(ENV_ENABLED, on)]))
            .unwrap()
            .unwrap();
        assert_eq!(c, WriteBehindConfig::default(), "{on}");
    }
}

#[test]
fn every_variable_is_read() {
    let c = WriteBehindConfig::from_vars(&vars(&[
        (ENV_ENABLED, "yes"),
        (ENV_BATCH, "64"),
        (ENV_BATCH_BYTES, "1048576"),
        (ENV_DELAY_MS, "0"),
        (ENV_CAPACITY, "100"),
        (ENV_CAPACITY_BYTES, "1000000"),
        (ENV_ENQUEUE_TIMEOUT_MS, "250"),
        (ENV_FLUSH_TIMEOUT_MS, "1500"),
        (ENV_IN_FLIGHT, "3"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        c,
        WriteBehindConfig {
            batch_items: 64,
            batch_bytes: 1 << 20,
            max_delay: Duration::ZERO,
            capacity: 100,
            capacity_bytes: 1_000_000,
            enqueue_timeout: Duration::from_millis(250),
            flush_timeout: Duration::from_millis(1500),
            in_flight: 3,
        }
    );
}

#[test]
fn bad_values_name_the_variable() {
    for (k, v, needle) in [
        (ENV_ENABLED, "maybe", "yes/no"),
        (ENV_BATCH, "0", "from 1"),
        (ENV_BATCH, "-3", "an integer"),
        (ENV_BATCH_BYTES, "4MB", "an integer"),
        (ENV_DELAY_MS, "1.5", "an integer"),
        (ENV_CAPACITY, "0", "from 1"),
        (ENV_CAPACITY_BYTES, "0", "from 1"),
        (ENV_CAPACITY_BYTES, "256MiB", "an integer"),
        (ENV_ENQUEUE_TIMEOUT_MS, "x", "an integer"),
        (ENV_FLUSH_TIMEOUT_MS, "0", "from 1"),
        (ENV_IN_FLIGHT, "0", "from 1"),
        (ENV_IN_FLIGHT, "65", "to 64"),
    ] {
        // Checked even when write-behind is off.
        for enabled in ["true", "false"] {
            let e = WriteBehindConfig::from_vars(&vars(&[(ENV_ENABLED, enabled), (k, v)]));
            if k == ENV_ENABLED && enabled == "false" {
                continue;
            }
            let e = e.unwrap_err();
            assert!(matches!(e, Error::Config { .. }), "{e:?}");
            let text = e.to_string();
            assert!(text.contains(k) && text.contains(needle), "{k}={v}: {text}");
        }
    }
    let e = WriteBehindConfig::builder()
        .capacity(0)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains(ENV_CAPACITY), "{e}");
    let e = WriteBehindConfig::builder()
        .capacity_bytes(0)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains(ENV_CAPACITY_BYTES), "{e}");
}

#[test]
fn json_size_is_close() {
    let v = serde_json::json!({"content": "x".repeat(2000), "tokens": 12, "tags": ["a", "b"], "ok": true, "n": null});
    let real = serde_json::to_vec(&v).unwrap().len();
    let est = json_size(&v);
    assert!(
        est >= real * 9 / 10 && est <= real * 11 / 10,
        "{est} vs {real}"
    );
}

#[test]
fn backoff_is_capped() {
    for a in 0..40 {
        assert!(backoff(a) <= Duration::from_secs(1));
    }
    assert!(backoff(0) <= Duration::from_millis(10));
}
