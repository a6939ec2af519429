//! [`Spec`]: where a backend is, as the command line of `migrate` and `verify` writes it.

use std::fmt;
use std::path::PathBuf;

use crate::config::{
    has_userinfo, redact_url, BackendKind, RedisConfig, StoreConfig, StoreConfigBuilder,
};
use crate::error::{Error, Result};

/// Where a backend is, as written on the command line.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Spec {
    /// `json:DIR`: a working directory of nano-graphrag `kv_store_*.json` files.
    Json(PathBuf),
    /// A Redis URL, or several comma-separated for a cluster (`redis://h1:7001,redis://h2:7002`).
    Redis(String),
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `json:DIR`, or the URL with any password replaced by `<redacted>`.
impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Json(dir) => write!(f, "json:{}", dir.display()),
            Spec::Redis(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl Spec {
    /// Parses `json:DIR`, `redis://...` (any scheme redis-rs accepts) or comma-separated URLs.
    ///
    /// # Errors
    /// [`Error::Config`] naming `SPEC` (the password of a URL is redacted).
    ///
    /// # Examples
    /// ```
    /// use graphrag_kv::migrate::Spec;
    /// assert_eq!(Spec::parse("json:./cache").unwrap(), Spec::Json("./cache".into()));
    /// assert!(matches!(Spec::parse("redis://h1:7001,redis://h2:7002"), Ok(Spec::Redis(_))));
    /// assert!(Spec::parse("./cache").is_err());
    /// ```
    pub fn parse(spec: &str) -> Result<Spec> {
        let spec = spec.trim();
        let bad = |why: &str| Error::Config {
            variable: "SPEC".into(),
            value: redact_url(spec),
            expected: format!(
                "json:DIR, a redis:// URL, or comma-separated redis:// URLs of cluster nodes{why}"
            ),
        };
        if let Some(dir) = spec.strip_prefix("json:") {
            if dir.is_empty() {
                return Err(bad(" (json: needs a directory)"));
            }
            return Ok(Spec::Json(PathBuf::from(dir)));
        }
        // The rule of REDIS_URL, by the same code: a comma starts a new URL only when a scheme
        // follows it, so a comma inside a password stays part of its URL.
        let config = RedisConfig {
            url: spec.to_string(),
            ..RedisConfig::default()
        };
        let urls = config.urls();
        // `urls` drops empty pieces; a stray comma sticks to the URL before it.
        if urls.is_empty() || spec.starts_with(',') || urls.iter().any(|u| u.ends_with(',')) {
            return Err(bad(" (an empty URL between commas)"));
        }
        for u in &urls {
            if !u.contains("://") {
                return Err(bad(""));
            }
            // Checked now so a typo is reported before anything is opened; the error of the
            // client never contains the URL.
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(*u) {
                return Err(bad(&format!(" ({})", e.category())));
            }
        }
        Ok(Spec::Redis(urls.join(",")))
    }

    /// The configuration of this backend: `base` (usually [`StoreConfigBuilder::from_env`], for
    /// the key prefix, compression, TTLs, timeouts) with the backend and its location replaced.
    ///
    /// For a Redis spec, the URL replaces `REDIS_URL` and Sentinel settings are dropped (the
    /// spec names the server); credentials inside the URL win over `REDIS_USERNAME` and
    /// `REDIS_PASSWORD`, which apply only to URLs without any, so a source and a target with
    /// different passwords can be given in one command.
    ///
    /// The spec names one store and nothing else: dual-write, write-behind and the fallback
    /// journal of the environment are dropped, so a copy goes straight to the target (and a TTL
    /// set after it finds the key), and a comparison reads the store it names.
    ///
    /// # Errors
    /// As [`StoreConfigBuilder::build`].
    pub fn config(&self, base: StoreConfigBuilder) -> Result<StoreConfig> {
        // `backend` also turns dual-write off.
        let mut config = match self {
            Spec::Json(dir) => base.backend(BackendKind::Json).working_dir(dir).build()?,
            Spec::Redis(url) => {
                let mut config = base.backend(BackendKind::Redis).redis_url(url).build()?;
                config.redis.sentinel_urls.clear();
                config.redis.sentinel_master = None;
                if has_userinfo(url) {
                    config.redis.username = None;
                    config.redis.password = None;
                }
                config
            }
        };
        config.write_behind = None;
        config.fallback = None;
        Ok(config)
    }
}

/// [`Spec::parse`] then [`Spec::config`] over the defaults (no environment).
///
/// # Errors
/// As those two.
pub fn parse_spec(spec: &str) -> Result<StoreConfig> {
    Spec::parse(spec)?.config(StoreConfig::builder())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_drops_the_environment_s_dual_write_write_behind_and_fallback() {
        let vars: std::collections::HashMap<String, String> = [
            ("STORAGE_KV_BACKEND", "dual"),
            ("KV_DUAL_PRIMARY", "redis"),
            ("KV_WRITE_BEHIND", "true"),
            ("KV_FALLBACK", "json"),
            ("REDIS_KEY_PREFIX", "kept"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for spec in ["json:/tmp/x", "redis://h:1"] {
            let base = StoreConfigBuilder::from_vars(&vars).unwrap();
            assert!(base.clone().build().unwrap().dual.is_some());
            let c = Spec::parse(spec).unwrap().config(base).unwrap();
            assert!(c.dual.is_none(), "{spec}");
            assert!(c.write_behind.is_none(), "{spec}");
            assert!(c.fallback.is_none(), "{spec}");
            assert_eq!(c.redis.key_prefix, "kept", "{spec}");
        }
    }

    #[test]
    fn specs() {
        assert_eq!(
            Spec::parse(" json:/a b ").unwrap(),
            Spec::Json("/a b".into())
        );
        assert_eq!(
            Spec::parse("redis://h:1, redis://h:2").unwrap(),
            Spec::Redis("redis://h:1,redis://h:2".into())
        );
        for bad in [
            "json:",
            "",
            "/tmp/x",
            "redis://h:1,,redis://h:2",
            "redis://h:1, ,redis://h:2",
            ",redis://h:1",
            "redis://h:1,",
            ",",
            "redis://h:notaport",
        ] {
            let e = Spec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("SPEC") && e.contains("json:DIR"), "{bad}: {e}");
        }
        let e = Spec::parse("redis://u:hunter2@h:x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        let shown = Spec::parse("redis://u:hunter2@h:1").unwrap().to_string();
        assert_eq!(shown, "redis://u:<redacted>@h:1");
        // A comma inside a password stays in its URL (the rule of REDIS_URL); one followed by
        // a scheme starts the next node's URL.
        let one = Spec::parse("redis://:pa,ss@h:1").unwrap();
        assert_eq!(one, Spec::Redis("redis://:pa,ss@h:1".into()));
        assert_eq!(one.to_string(), "redis://:<redacted>@h:1");
        let c = one.config(StoreConfig::builder()).unwrap();
        assert_eq!(c.redis.urls(), ["redis://:pa,ss@h:1"]);
        let nodes = Spec::parse("redis://:p,w@h:1, rediss://:p,w@h:2").unwrap();
        assert_eq!(
            nodes,
            Spec::Redis("redis://:p,w@h:1,rediss://:p,w@h:2".into())
        );
        assert_eq!(
            nodes.to_string(),
            "redis://:<redacted>@h:1,rediss://:<redacted>@h:2"
        );
    }

    #[test]
    fn url_credentials_win_over_the_environment() {
        let base = || {
            StoreConfig::builder()
                .password("from-env")
                .sentinel(vec!["redis://s:26379".into()], "m")
        };
        let c = Spec::parse("redis://:pw@h:1")
            .unwrap()
            .config(base())
            .unwrap();
        assert_eq!(c.redis.password, None);
        assert!(c.redis.sentinel_urls.is_empty());
        let c = Spec::parse("redis://h:1").unwrap().config(base()).unwrap();
        assert_eq!(c.redis.password.as_deref(), Some("from-env"));
        let c = parse_spec("json:d").unwrap();
        assert_eq!(
            (c.backend, c.json.working_dir),
            (BackendKind::Json, "d".into())
        );
    }
}
