//! Configuration: one plain struct with documented defaults, filled by a builder or from the
//! environment, validated once at `build()`.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `STORAGE_KV_BACKEND` | `json` | `json`, `redis`, or `dual` (both, during a migration) |
//! | `KV_DUAL_PRIMARY` | `json` | with `dual`: the store reads come from |
//! | `STORAGE_WORKING_DIR` | `./nano_graphrag_cache` | directory of the JSON files |
//! | `REDIS_URL` | `redis://localhost:6379` | server URL; `rediss://` for TLS |
//! | `REDIS_USERNAME`, `REDIS_PASSWORD` | none | ACL credentials; override the URL's |
//! | `REDIS_MAX_CONNECTIONS` | 50 | connection pool size |
//! | `REDIS_CONNECTION_TIMEOUT` | 5.0 | seconds to open a connection and get its first answer |
//! | `REDIS_SOCKET_TIMEOUT` | 5.0 | seconds to wait for a reply |
//! | `REDIS_POOL_TIMEOUT` | 10.0 | seconds to wait for a free pooled connection when all are busy |
//! | `REDIS_RETRY_ON_TIMEOUT` | true | retry idempotent commands after a timeout |
//! | `REDIS_RETRIES` | 3 | retries after a connection error or timeout |
//! | `REDIS_HEALTH_CHECK_INTERVAL` | 30 | PING a pooled connection idle longer than this (s) |
//! | `REDIS_KEY_PREFIX` | `nano_graphrag` | keys are `{prefix}:{namespace}:{id}` |
//! | `REDIS_COMPRESSION` | `lz4` | `lz4`, `zstd` or `none` (values of any of them stay readable) |
//! | `REDIS_COMPRESSION_LEVEL` | 1 | zstd level, 1 to 19 (unused by lz4) |
//! | `REDIS_COMPRESSION_MIN_BYTES` | 1024 | compress JSON values at least this long |
//! | `REDIS_TTL_LLM_CACHE` | 43200 | TTL of `llm_response_cache` (s, 0 = none) |
//! | `REDIS_TTL_COMMUNITY_REPORTS` | 0 | TTL of `community_reports` |
//! | `REDIS_TTL_CHUNKS` | 0 | TTL of `text_chunks` |
//! | `REDIS_TTL_DOCS` | 0 | TTL of `full_docs` |
//! | `REDIS_TTL_<NAME>` | 0 | TTL of any other namespace |
//! | `KV_FALLBACK` | `none` | `json`: journal writes locally while Redis is unreachable |
//! | `KV_FALLBACK_DIR` | `STORAGE_WORKING_DIR/journal` | directory of the journals |
//! | `KV_WRITE_BEHIND` | false | queue writes, send them in batches (see `write_behind`) |
//! | `KV_WRITE_BEHIND_BATCH` | 256 | items per batch |
//! | `KV_WRITE_BEHIND_BATCH_BYTES` | 4194304 | bytes per batch |
//! | `KV_WRITE_BEHIND_DELAY_MS` | 5 | longest a queued write waits before it is sent |
//! | `KV_WRITE_BEHIND_CAPACITY` | 16384 | queued items before producers block |
//! | `KV_WRITE_BEHIND_CAPACITY_BYTES` | 268435456 | queued bytes of values before producers block |
//! | `KV_WRITE_BEHIND_ENQUEUE_TIMEOUT_MS` | 30000 | how long a producer blocks on a full queue |
//! | `KV_WRITE_BEHIND_FLUSH_TIMEOUT_MS` | 30000 | deadline of flush, close and drop |
//! | `KV_WRITE_BEHIND_IN_FLIGHT` | 4 | batches being sent at once (one thread each) |
//! | `REDIS_CLUSTER` | `auto` | `auto`, `true` or `false` |
//! | `REDIS_READ_FROM_REPLICAS` | false | cluster reads from replicas (may be stale) |
//! | `REDIS_WAIT_REPLICAS` | 0 | replicas that must confirm each write batch |
//! | `REDIS_WAIT_TIMEOUT` | 2.0 | seconds to wait for those confirmations |
//! | `REDIS_SENTINEL_URLS` | none | sentinel URLs, comma-separated |
//! | `REDIS_SENTINEL_MASTER` | `mymaster` | the master's name for Sentinel |
//! | `REDIS_TLS_CA_CERT` | none | PEM file of the CA(s) to trust for `rediss://` instead of the system's |
//! | `REDIS_TLS_CLIENT_CERT` | none | PEM certificate (chain) for mutual TLS; needs `REDIS_TLS_CLIENT_KEY` |
//! | `REDIS_TLS_CLIENT_KEY` | none | PEM private key (PKCS#8, PKCS#1 or SEC1) of that certificate |
//!
//! The TLS files are read when the configuration is built (so a missing or malformed file is
//! reported there, naming the variable and the file) and again when the connections are
//! created. Setting any of them requires `rediss://` URLs: a plain `redis://` URL would send
//! everything, the password included, in clear text.
//!
//! The types are here; the builder, the environment parsing, the TLS files, the TTL table and
//! URL redaction each have their own file.

mod builder;
mod env;
mod parse;
mod redact;
#[cfg(test)]
mod tests;
mod tls;
mod ttl;
/// `KV_WRITE_BEHIND*`: in its own file, so this module does not depend on `write_behind`.
pub(crate) mod write_behind;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;

pub use builder::StoreConfigBuilder;
pub(crate) use parse::{config_error, parse_bool, parse_u64};
pub(crate) use redact::has_userinfo;
pub use redact::redact_url;
pub use ttl::TtlTable;
pub use write_behind::{WriteBehindConfig, WriteBehindConfigBuilder};

use redact::split_urls;
use tls::is_tls_url;

/// Which backend stores the namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// nano-graphrag's `kv_store_{namespace}.json` files in a working directory.
    Json,
    /// A Redis server shared by every process that points at it.
    Redis,
}

impl BackendKind {
    /// The name used in `STORAGE_KV_BACKEND` and in stats.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Json => "json",
            BackendKind::Redis => "redis",
        }
    }

    /// Parses `json` or `redis` (any case).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming `variable` and the accepted values.
    pub fn parse(variable: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(BackendKind::Json),
            "redis" => Ok(BackendKind::Redis),
            _ => Err(config_error(variable, value, "json or redis")),
        }
    }
}

impl Compression {
    /// The name used in `REDIS_COMPRESSION`: `lz4`, `zstd` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// Parses `lz4`, `zstd` or `none` (any case).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming `variable` and the accepted values.
    pub fn parse(variable: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(config_error(variable, value, "lz4, zstd or none")),
        }
    }
}

impl std::fmt::Display for Compression {
    /// The name, as [`Compression::as_str`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for BackendKind {
    /// The name, as [`BackendKind::as_str`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How values are compressed in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// lz4 for values of at least `compression_min_bytes`, behind a header no JSON text starts
    /// with. Values that do not shrink are stored as plain JSON.
    Lz4,
    /// zstd at `compression_level`, the same way: a third less Redis memory than lz4 on prose
    /// (`memory_ratio` 0.58 against 0.86) for slower writes and batch reads (docs/BENCHMARKS.md).
    /// Readers of a version without zstd cannot read its values: upgrade them first.
    Zstd,
    /// Plain JSON always, for clients that read the values themselves.
    None,
}

/// Where the JSON backend keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JsonConfig {
    /// Directory of the `kv_store_{namespace}.json` files. Defaults to `./nano_graphrag_cache`.
    pub working_dir: PathBuf,
}

/// How to reach and use Redis.
///
/// `Debug` leaves out the password and any password inside the URL.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server URL. Defaults to `redis://localhost:6379`.
    pub url: String,
    /// ACL user name; overrides one in the URL. Defaults to none.
    pub username: Option<String>,
    /// Password; overrides one in the URL. Defaults to none.
    pub password: Option<String>,
    /// Most pooled connections open at once. Defaults to 50.
    pub max_connections: u32,
    /// Deadline to open a connection and get its first answer. A connect that fails is
    /// reported at once ([`Error::Connect`](crate::Error::Connect)); one that times out is not
    /// retried, so a server that never answers is reported after this long. Defaults to 5 s.
    pub connection_timeout: Duration,
    /// Deadline for each reply. Defaults to 5 s.
    pub socket_timeout: Duration,
    /// Deadline to get a free connection from the pool while every one of `max_connections`
    /// is busy (a server that cannot be reached is reported at once, not after this).
    /// Defaults to 10 s.
    pub pool_timeout: Duration,
    /// Whether an idempotent command is retried after a timeout (connection errors always are,
    /// up to `retries`). Defaults to true.
    pub retry_on_timeout: bool,
    /// Retries after a connection error or timeout, with exponential backoff and jitter.
    /// Defaults to 3.
    pub retries: u32,
    /// A pooled connection idle longer than this is PINGed before use; a recently used one is
    /// not. Defaults to 30 s.
    pub health_check_interval: Duration,
    /// First part of every key: `{prefix}:{namespace}:{id}`. Defaults to `nano_graphrag`, the
    /// Python implementation's layout.
    pub key_prefix: String,
    /// Value compression. Defaults to [`Compression::Lz4`].
    pub compression: Compression,
    /// The zstd level, from 1 (fastest) to 19 (smallest); other compressions have no levels.
    /// Defaults to 1 ([`crate::codec::DEFAULT_ZSTD_LEVEL`], see docs/BENCHMARKS.md).
    pub compression_level: i32,
    /// Values whose JSON is shorter than this are never compressed. Defaults to 1024.
    pub compression_min_bytes: usize,
    /// TTLs per namespace in seconds (0 = no expiry).
    pub ttl: TtlTable,
    /// Standalone or cluster. Defaults to [`ClusterMode::Auto`].
    pub cluster: ClusterMode,
    /// Read from replicas in cluster mode (reads may be stale by the replication lag).
    /// Defaults to false.
    pub read_from_replicas: bool,
    /// Replicas that must confirm every write batch (`WAIT`) before it returns. Defaults to 0.
    pub wait_replicas: u32,
    /// How long a write batch waits for `wait_replicas` confirmations. Defaults to 2 s. Must be
    /// below `socket_timeout` when `wait_replicas` is set.
    pub wait_timeout: Duration,
    /// Sentinel URLs; when set, the master named `sentinel_master` is found through them.
    /// Defaults to none.
    pub sentinel_urls: Vec<String>,
    /// The master's name for Sentinel. Defaults to none (`mymaster` when `sentinel_urls` is set).
    pub sentinel_master: Option<String>,
    /// PEM file of the certificate authorities trusted for `rediss://` connections, replacing
    /// the system's trust store. Defaults to none (the system's roots).
    pub tls_ca_cert: Option<PathBuf>,
    /// PEM certificate (or chain) presented to the server for mutual TLS. Defaults to none.
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`. Defaults to none. Only the path is kept here: the
    /// key is read when connections are created and never printed.
    pub tls_client_key: Option<PathBuf>,
}

/// How the Redis backend finds its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterMode {
    /// Cluster when `REDIS_URL` names several nodes or the server says `cluster_enabled:1`
    /// (`INFO cluster`); standalone otherwise, including when the user may not run INFO.
    Auto,
    /// A single server (or the master Sentinel names).
    Standalone,
    /// Redis Cluster: keys spread over every master by slot.
    Cluster,
}

impl RedisConfig {
    /// The node URLs of `url`: one for a single server, several for a cluster.
    ///
    /// A comma separates two URLs only when a scheme (`redis://`, `rediss://`, ...) follows
    /// it: a comma inside a password (`redis://u:pa,ss@host`) stays part of its URL.
    pub fn urls(&self) -> Vec<&str> {
        split_urls(&self.url)
            .into_iter()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// True when the URLs use TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        self.urls().iter().any(|u| is_tls_url(u))
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("max_connections", &self.max_connections)
            .field("connection_timeout", &self.connection_timeout)
            .field("socket_timeout", &self.socket_timeout)
            .field("pool_timeout", &self.pool_timeout)
            .field("retry_on_timeout", &self.retry_on_timeout)
            .field("retries", &self.retries)
            .field("health_check_interval", &self.health_check_interval)
            .field("key_prefix", &self.key_prefix)
            .field("compression", &self.compression)
            .field("compression_level", &self.compression_level)
            .field("compression_min_bytes", &self.compression_min_bytes)
            .field("ttl", &self.ttl)
            .field("cluster", &self.cluster)
            .field("read_from_replicas", &self.read_from_replicas)
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout", &self.wait_timeout)
            .field(
                "sentinel_urls",
                &self
                    .sentinel_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("sentinel_master", &self.sentinel_master)
            // Paths only: the files' contents (a private key) are never held here.
            .field("tls_ca_cert", &self.tls_ca_cert)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://localhost:6379".into(),
            username: None,
            password: None,
            max_connections: 50,
            connection_timeout: Duration::from_secs(5),
            socket_timeout: Duration::from_secs(5),
            pool_timeout: Duration::from_secs(10),
            retry_on_timeout: true,
            retries: 3,
            health_check_interval: Duration::from_secs(30),
            key_prefix: "nano_graphrag".into(),
            compression: Compression::Lz4,
            compression_level: crate::codec::DEFAULT_ZSTD_LEVEL,
            compression_min_bytes: 1024,
            ttl: TtlTable::default(),
            cluster: ClusterMode::Auto,
            read_from_replicas: false,
            wait_replicas: 0,
            wait_timeout: Duration::from_secs(2),
            sentinel_urls: Vec::new(),
            sentinel_master: None,
            tls_ca_cert: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

/// Dual-write during a migration (`STORAGE_KV_BACKEND=dual`): writes go to the JSON files and
/// to Redis, reads come from the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DualConfig {
    /// The store reads come from and whose failures fail a write (`KV_DUAL_PRIMARY`).
    /// Defaults to [`BackendKind::Json`], the data in service when a migration starts.
    pub primary: BackendKind,
}

/// Where writes go while Redis is unreachable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FallbackConfig {
    /// Directory of the journals. Defaults to `STORAGE_WORKING_DIR/journal`.
    pub dir: PathBuf,
}

/// Everything needed to open stores. Build it with [`StoreConfig::builder`] or
/// [`StoreConfig::from_env`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// The backend. Defaults to [`BackendKind::Json`].
    pub backend: BackendKind,
    /// JSON backend settings.
    pub json: JsonConfig,
    /// Redis backend settings.
    pub redis: RedisConfig,
    /// Journal writes locally while Redis is unreachable (`KV_FALLBACK=json`). Defaults to
    /// none: a Redis outage is an error for the caller.
    pub fallback: Option<FallbackConfig>,
    /// Write-behind queue (`KV_WRITE_BEHIND=true`). Defaults to none: writes are synchronous.
    pub write_behind: Option<WriteBehindConfig>,
    /// Dual-write to JSON and Redis (`STORAGE_KV_BACKEND=dual`). Defaults to none.
    pub dual: Option<DualConfig>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: BackendKind::Json,
            json: JsonConfig {
                working_dir: PathBuf::from("./nano_graphrag_cache"),
            },
            redis: RedisConfig::default(),
            fallback: None,
            write_behind: None,
            dual: None,
        }
    }
}

impl StoreConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> StoreConfigBuilder {
        StoreConfigBuilder {
            config: StoreConfig::default(),
        }
    }

    /// The configuration from the process environment (see the module docs for the variables).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the first variable whose value cannot be used.
    pub fn from_env() -> Result<StoreConfig> {
        StoreConfigBuilder::from_env()?.build()
    }
}
