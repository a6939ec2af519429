//! [`StoreConfigBuilder`]: the setters and the checks of `build()`.

use std::path::PathBuf;
use std::time::Duration;

use super::parse::config_error;
use super::redact::{redact_url, shown_url};
use super::{BackendKind, ClusterMode, Compression, DualConfig, FallbackConfig, StoreConfig};
use crate::error::{Error, Result};
use crate::store::{is_name_char, validate_namespace};

/// Builds a [`StoreConfig`]; every setter takes and returns `self`.
#[derive(Debug, Clone)]
pub struct StoreConfigBuilder {
    pub(super) config: StoreConfig,
}

impl StoreConfigBuilder {
    /// Sets the one backend to use; turns dual-write (see [`StoreConfigBuilder::dual`]) off, so
    /// `graphrag-kv --backend json` means the JSON files alone even under
    /// `STORAGE_KV_BACKEND=dual`.
    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.config.backend = backend;
        self.config.dual = None;
        self
    }
    /// Sets the JSON working directory.
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.json.working_dir = dir.into();
        self
    }
    /// Sets the Redis URL.
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.config.redis.url = url.into();
        self
    }
    /// Sets the ACL user name.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.config.redis.username = Some(username.into());
        self
    }
    /// Sets the password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.config.redis.password = Some(password.into());
        self
    }
    /// Sets the pool size.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.config.redis.max_connections = n;
        self
    }
    /// Sets the connect timeout.
    pub fn connection_timeout(mut self, d: Duration) -> Self {
        self.config.redis.connection_timeout = d;
        self
    }
    /// Sets the reply timeout.
    pub fn socket_timeout(mut self, d: Duration) -> Self {
        self.config.redis.socket_timeout = d;
        self
    }
    /// Sets how long to wait for a free pooled connection.
    pub fn pool_timeout(mut self, d: Duration) -> Self {
        self.config.redis.pool_timeout = d;
        self
    }
    /// Sets whether timeouts are retried.
    pub fn retry_on_timeout(mut self, yes: bool) -> Self {
        self.config.redis.retry_on_timeout = yes;
        self
    }
    /// Sets the number of retries after connection errors and timeouts.
    pub fn retries(mut self, n: u32) -> Self {
        self.config.redis.retries = n;
        self
    }
    /// Sets the idle time after which a pooled connection is PINGed before use.
    pub fn health_check_interval(mut self, d: Duration) -> Self {
        self.config.redis.health_check_interval = d;
        self
    }
    /// Sets the key prefix.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.redis.key_prefix = prefix.into();
        self
    }
    /// Sets the compression.
    pub fn compression(mut self, c: Compression) -> Self {
        self.config.redis.compression = c;
        self
    }
    /// Sets the zstd level (`REDIS_COMPRESSION_LEVEL`); `build()` refuses one outside
    /// [`ZSTD_LEVELS`](crate::codec::ZSTD_LEVELS).
    pub fn compression_level(mut self, level: i32) -> Self {
        self.config.redis.compression_level = level;
        self
    }
    /// Sets the size from which values are compressed.
    pub fn compression_min_bytes(mut self, n: usize) -> Self {
        self.config.redis.compression_min_bytes = n;
        self
    }
    /// Sets standalone, cluster or auto-detection.
    pub fn cluster(mut self, mode: ClusterMode) -> Self {
        self.config.redis.cluster = mode;
        self
    }
    /// Sets whether cluster reads may go to replicas.
    pub fn read_from_replicas(mut self, yes: bool) -> Self {
        self.config.redis.read_from_replicas = yes;
        self
    }
    /// Sets how many replicas must confirm each write batch, and for how long to wait.
    pub fn wait_replicas(mut self, n: u32, timeout: Duration) -> Self {
        self.config.redis.wait_replicas = n;
        self.config.redis.wait_timeout = timeout;
        self
    }
    /// Uses Sentinel: the sentinels' URLs and the master's name.
    pub fn sentinel(mut self, urls: Vec<String>, master: impl Into<String>) -> Self {
        self.config.redis.sentinel_urls = urls;
        self.config.redis.sentinel_master = Some(master.into());
        self
    }
    /// Writes to both JSON and Redis, reading from `primary`.
    pub fn dual(mut self, primary: BackendKind) -> Self {
        self.config.dual = Some(DualConfig { primary });
        self.config.backend = primary;
        self
    }
    /// Queues writes and sends them in batches from a background thread.
    pub fn write_behind(mut self, c: super::WriteBehindConfig) -> Self {
        self.config.write_behind = Some(c);
        self
    }
    /// Journals writes in `dir` while Redis is unreachable.
    pub fn fallback_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.fallback = Some(FallbackConfig { dir: dir.into() });
        self
    }
    /// Trusts the CAs of this PEM file for `rediss://` connections instead of the system's.
    pub fn tls_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.redis.tls_ca_cert = Some(path.into());
        self
    }
    /// Presents this PEM certificate (chain) to the server, for mutual TLS; needs
    /// [`StoreConfigBuilder::tls_client_key`].
    pub fn tls_client_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.redis.tls_client_cert = Some(path.into());
        self
    }
    /// The PEM private key of [`StoreConfigBuilder::tls_client_cert`].
    pub fn tls_client_key(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.redis.tls_client_key = Some(path.into());
        self
    }
    /// Sets the TTL of one namespace, in seconds (0 = no expiry).
    pub fn ttl(mut self, namespace: &str, seconds: u64) -> Self {
        self.config.redis.ttl.set(namespace, seconds);
        self
    }

    /// Checks the settings and returns the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting that cannot be used.
    pub fn build(self) -> Result<StoreConfig> {
        let r = &self.config.redis;
        if r.max_connections == 0 {
            return Err(config_error(
                "REDIS_MAX_CONNECTIONS",
                "0",
                "an integer of at least 1",
            ));
        }
        for (name, d) in [
            ("REDIS_CONNECTION_TIMEOUT", r.connection_timeout),
            ("REDIS_SOCKET_TIMEOUT", r.socket_timeout),
            ("REDIS_POOL_TIMEOUT", r.pool_timeout),
        ] {
            if d.is_zero() {
                return Err(config_error(name, "0", "a number of seconds above 0"));
            }
        }
        // A WAIT blocks for up to `wait_timeout` before its reply; one that may outlast the
        // socket timeout would turn a missing replica into a client-side timeout (a broken
        // connection, retried) instead of `Error::Replication`.
        if r.wait_replicas > 0 && r.wait_timeout >= r.socket_timeout {
            return Err(config_error(
                "REDIS_WAIT_TIMEOUT",
                &format!("{}", r.wait_timeout.as_secs_f64()),
                &format!(
                    "fewer seconds than REDIS_SOCKET_TIMEOUT ({}) when REDIS_WAIT_REPLICAS is \
                     set, leaving room for the round trip: a WAIT reply later than the socket \
                     timeout is a timeout, not a replication error",
                    r.socket_timeout.as_secs_f64()
                ),
            ));
        }
        if !crate::codec::ZSTD_LEVELS.contains(&r.compression_level) {
            return Err(config_error(
                "REDIS_COMPRESSION_LEVEL",
                &r.compression_level.to_string(),
                &level_expected(),
            ));
        }
        if r.key_prefix.is_empty() || !r.key_prefix.chars().all(is_name_char) {
            return Err(config_error(
                "REDIS_KEY_PREFIX",
                &r.key_prefix,
                "a non-empty name of A-Z a-z 0-9 _ . - (a ':' would make key ownership ambiguous)",
            ));
        }
        for ns in r.ttl.by_namespace.keys() {
            validate_namespace(ns)?;
        }
        if self.config.backend == BackendKind::Redis || self.config.dual.is_some() {
            // Parse now so a bad URL is reported at build time, not at first use. The URL may
            // hold a password: only the redacted form goes into the error.
            let urls = r.urls();
            if urls.is_empty() {
                return Err(config_error(
                    "REDIS_URL",
                    "",
                    "a redis:// URL, or several separated by commas",
                ));
            }
            for u in &urls {
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(*u) {
                    return Err(Error::Config {
                        variable: "REDIS_URL".into(),
                        value: shown_url(&r.url, u),
                        expected: format!(
                            "redis:// URLs separated by commas ({})",
                            e.kind_description()
                        ),
                    });
                }
            }
            for u in &r.sentinel_urls {
                if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
                    return Err(Error::Config {
                        variable: "REDIS_SENTINEL_URLS".into(),
                        value: redact_url(u),
                        expected: format!(
                            "redis:// URLs separated by commas ({})",
                            e.kind_description()
                        ),
                    });
                }
            }
            r.check_tls()?;
            if !r.sentinel_urls.is_empty() && r.cluster == ClusterMode::Cluster {
                return Err(config_error(
                    "REDIS_CLUSTER",
                    "true",
                    "auto or false when REDIS_SENTINEL_URLS is set (Sentinel serves one master)",
                ));
            }
        }
        Ok(self.config)
    }
}

/// What `REDIS_COMPRESSION_LEVEL` accepts.
pub(super) fn level_expected() -> String {
    let levels = crate::codec::ZSTD_LEVELS;
    format!(
        "an integer from {} to {} (the zstd level; default {})",
        levels.start(),
        levels.end(),
        crate::codec::DEFAULT_ZSTD_LEVEL
    )
}

/// Small extension so a URL parse error can be described without its (possibly secret) detail.
trait KindDescription {
    fn kind_description(&self) -> String;
}

impl KindDescription for redis::RedisError {
    fn kind_description(&self) -> String {
        // redis-rs's URL errors name the problem ("Redis URL did not parse", "invalid port")
        // without repeating the URL; still, keep only the category text.
        self.category().to_string()
    }
}
