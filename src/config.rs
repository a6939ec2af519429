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
//! | `REDIS_COMPRESSION` | `lz4` | `lz4` or `none` |
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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
use crate::store::{
    is_name_char, validate_namespace, COMMUNITY_REPORTS, FULL_DOCS, LLM_RESPONSE_CACHE, TEXT_CHUNKS,
};

/// `KV_WRITE_BEHIND*`: in its own file, so this module does not depend on `write_behind`.
pub(crate) mod write_behind;
pub use write_behind::{WriteBehindConfig, WriteBehindConfigBuilder};

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
    /// [`Error::Config`] naming `variable` and the accepted values.
    pub fn parse(variable: &str, value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "json" => Ok(BackendKind::Json),
            "redis" => Ok(BackendKind::Redis),
            _ => Err(config_error(variable, value, "json or redis")),
        }
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
    /// reported at once ([`Error::Connect`]); one that times out is not retried, so a server
    /// that never answers is reported after this long. Defaults to 5 s.
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

    /// True when a CA file or a client certificate or key is configured.
    fn has_tls_files(&self) -> bool {
        self.tls_ca_cert.is_some()
            || self.tls_client_cert.is_some()
            || self.tls_client_key.is_some()
    }

    /// Checks the TLS settings: `rediss://` URLs when TLS files are set, both halves of a
    /// client identity, and files that can be read and parsed.
    fn check_tls(&self) -> Result<()> {
        // The redis crate reaches the master found through Sentinel without TLS whatever the
        // sentinels' scheme: a rediss:// Sentinel URL would promise encryption and send the
        // password and the data in clear text.
        if let Some(u) = self.sentinel_urls.iter().find(|u| is_tls_url(u)) {
            return Err(config_error(
                "REDIS_SENTINEL_URLS",
                &redact_url(u),
                "redis:// Sentinel URLs: TLS through Sentinel is not supported (the connection \
                 to the master would not be encrypted)",
            ));
        }
        if !self.has_tls_files() {
            return Ok(());
        }
        if !self.sentinel_urls.is_empty() {
            return Err(config_error(
                "REDIS_SENTINEL_URLS",
                &redact_url(&self.sentinel_urls.join(",")),
                "no Sentinel when REDIS_TLS_CA_CERT, REDIS_TLS_CLIENT_CERT or \
                 REDIS_TLS_CLIENT_KEY is set: TLS through Sentinel is not supported",
            ));
        }
        if let Some(u) = self.urls().into_iter().find(|u| !is_tls_url(u)) {
            return Err(config_error(
                "REDIS_URL",
                &shown_url(&self.url, u),
                "rediss:// URLs when REDIS_TLS_CA_CERT, REDIS_TLS_CLIENT_CERT or \
                 REDIS_TLS_CLIENT_KEY is set (a redis:// URL would send the data and the \
                 password in clear text)",
            ));
        }
        self.tls_certificates().map(|_| ())
    }

    /// The TLS files' contents as the `redis` crate takes them; `None` when no file is set
    /// (a `rediss://` URL then trusts the system's roots).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable and the file: unreadable, not PEM, no certificate
    /// or key in it, or a client certificate without its key (or the reverse).
    pub(crate) fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        if !self.has_tls_files() {
            return Ok(None);
        }
        let root_cert = match &self.tls_ca_cert {
            None => None,
            Some(path) => {
                let pem = read_tls_file("REDIS_TLS_CA_CERT", path, "CA certificates")?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in parse_certificates("REDIS_TLS_CA_CERT", path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        tls_file_error(
                            "REDIS_TLS_CA_CERT",
                            path,
                            &format!("a usable CA certificate in it ({e})"),
                        )
                    })?;
                }
                Some(pem)
            }
        };
        let client_tls = match (&self.tls_client_cert, &self.tls_client_key) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(config_error(
                    "REDIS_TLS_CLIENT_KEY",
                    "",
                    "the private key of REDIS_TLS_CLIENT_CERT (mutual TLS needs both)",
                ))
            }
            (None, Some(_)) => {
                return Err(config_error(
                    "REDIS_TLS_CLIENT_CERT",
                    "",
                    "the certificate of REDIS_TLS_CLIENT_KEY (mutual TLS needs both)",
                ))
            }
            (Some(cert_path), Some(key_path)) => {
                let client_cert =
                    read_tls_file("REDIS_TLS_CLIENT_CERT", cert_path, "a client certificate")?;
                parse_certificates("REDIS_TLS_CLIENT_CERT", cert_path, &client_cert)?;
                let client_key = read_tls_file("REDIS_TLS_CLIENT_KEY", key_path, "a private key")?;
                // The parser's message is left out: it may quote a line of the key file.
                PrivateKeyDer::from_pem_slice(&client_key).map_err(|_| {
                    tls_file_error(
                        "REDIS_TLS_CLIENT_KEY",
                        key_path,
                        "a PEM private key (PKCS#8, PKCS#1 or SEC1) in it; none found",
                    )
                })?;
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// True for a URL with a TLS scheme (`rediss://`, or Valkey's `valkeys://`).
fn is_tls_url(url: &str) -> bool {
    let u = url.trim_start().to_ascii_lowercase();
    u.starts_with("rediss://") || u.starts_with("valkeys://")
}

fn tls_file_error(variable: &str, path: &Path, expected: &str) -> Error {
    Error::Config {
        variable: variable.to_string(),
        value: path.display().to_string(),
        expected: expected.to_string(),
    }
}

fn read_tls_file(variable: &str, path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        tls_file_error(
            variable,
            path,
            &format!("a readable PEM file of {what} (cannot read it: {e})"),
        )
    })
}

/// The certificates of a PEM file: at least one.
fn parse_certificates(
    variable: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_file_error(variable, path, &format!("a valid PEM file ({e})")))?;
    if certs.is_empty() {
        return Err(tls_file_error(
            variable,
            path,
            "a PEM file with at least one CERTIFICATE block; none found",
        ));
    }
    Ok(certs)
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

/// Expiry per namespace, in seconds; 0 means keys never expire.
///
/// Defaults: `llm_response_cache` 43200 (12 h); `full_docs`, `text_chunks`, `community_reports`
/// and every other namespace 0. Community reports are index data, not cache: a default expiry
/// would make queries lose them a day after indexing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlTable {
    by_namespace: BTreeMap<String, u64>,
    /// `REDIS_TTL_<NAME>` values for namespaces not known when the config was read, keyed by
    /// `<NAME>`.
    by_env_name: BTreeMap<String, u64>,
}

impl Default for TtlTable {
    fn default() -> Self {
        let mut by_namespace = BTreeMap::new();
        by_namespace.insert(LLM_RESPONSE_CACHE.to_string(), 43_200);
        by_namespace.insert(COMMUNITY_REPORTS.to_string(), 0);
        by_namespace.insert(TEXT_CHUNKS.to_string(), 0);
        by_namespace.insert(FULL_DOCS.to_string(), 0);
        TtlTable {
            by_namespace,
            by_env_name: BTreeMap::new(),
        }
    }
}

/// The documented variable names of the four namespaces, and the reference implementation's
/// `REDIS_TTL_{NAMESPACE}` names, accepted as well.
const TTL_VARIABLES: [(&str, &str, &str); 4] = [
    (
        LLM_RESPONSE_CACHE,
        "REDIS_TTL_LLM_CACHE",
        "REDIS_TTL_LLM_RESPONSE_CACHE",
    ),
    (
        COMMUNITY_REPORTS,
        "REDIS_TTL_COMMUNITY_REPORTS",
        "REDIS_TTL_COMMUNITY_REPORTS",
    ),
    (TEXT_CHUNKS, "REDIS_TTL_CHUNKS", "REDIS_TTL_TEXT_CHUNKS"),
    (FULL_DOCS, "REDIS_TTL_DOCS", "REDIS_TTL_FULL_DOCS"),
];

impl TtlTable {
    /// The TTL applied to new writes in `namespace`, in seconds (0 = none).
    pub fn ttl_for(&self, namespace: &str) -> u64 {
        if let Some(t) = self.by_namespace.get(namespace) {
            return *t;
        }
        let name = env_name(namespace);
        if is_reserved_ttl_name(&name) {
            return 0;
        }
        self.by_env_name.get(&name).copied().unwrap_or(0)
    }

    /// Sets the TTL of one namespace.
    pub fn set(&mut self, namespace: &str, seconds: u64) {
        self.by_namespace.insert(namespace.to_string(), seconds);
    }
}

/// `REDIS_TTL_` suffix for a namespace: upper-cased, `.` and `-` turned into `_`.
fn env_name(namespace: &str) -> String {
    namespace
        .chars()
        .map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// True when `REDIS_TTL_<name>` is one of the documented or reference names, whose meaning wins
/// over a namespace that happens to map to the same name.
fn is_reserved_ttl_name(name: &str) -> bool {
    TTL_VARIABLES.iter().any(|(_, doc, reference)| {
        doc.strip_prefix("REDIS_TTL_") == Some(name)
            || reference.strip_prefix("REDIS_TTL_") == Some(name)
    })
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
    /// [`Error::Config`] naming the first variable whose value cannot be used.
    pub fn from_env() -> Result<StoreConfig> {
        StoreConfigBuilder::from_env()?.build()
    }
}

/// Builds a [`StoreConfig`]; every setter takes and returns `self`.
#[derive(Debug, Clone)]
pub struct StoreConfigBuilder {
    config: StoreConfig,
}

impl StoreConfigBuilder {
    /// A builder filled from the process environment.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable whose value cannot be used (including a value that
    /// is not valid UTF-8).
    pub fn from_env() -> Result<Self> {
        let mut vars = HashMap::new();
        for (k, v) in std::env::vars_os() {
            let Some(k) = k.to_str() else { continue };
            if !(k.starts_with("REDIS_") || k.starts_with("STORAGE_") || k.starts_with("KV_")) {
                continue;
            }
            match v.into_string() {
                Ok(v) => {
                    vars.insert(k.to_string(), v);
                }
                Err(_) => return Err(config_error(k, "<not UTF-8>", "UTF-8 text")),
            }
        }
        Self::from_vars(&vars)
    }

    /// A builder filled from the given variables, as [`StoreConfigBuilder::from_env`] reads them
    /// from the environment. Useful in tests and for programs that keep settings elsewhere.
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable whose value cannot be used.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| {
            vars.get(k)
                .map(String::as_str)
                .filter(|v| !v.trim().is_empty())
        };
        let mut b = StoreConfig::builder();
        let c = &mut b.config;
        if let Some(v) = get("STORAGE_KV_BACKEND") {
            if v.trim().eq_ignore_ascii_case("dual") {
                let primary = match get("KV_DUAL_PRIMARY") {
                    None => BackendKind::Json,
                    Some(p) => BackendKind::parse("KV_DUAL_PRIMARY", p)?,
                };
                c.dual = Some(DualConfig { primary });
                c.backend = primary;
            } else {
                c.backend = BackendKind::parse("STORAGE_KV_BACKEND", v)
                    .map_err(|_| config_error("STORAGE_KV_BACKEND", v, "json, redis or dual"))?;
            }
        }
        if let Some(v) = get("STORAGE_WORKING_DIR") {
            c.json.working_dir = PathBuf::from(v);
        }
        match get("KV_FALLBACK").map(|v| v.trim().to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "none" || v == "false" || v == "0" || v == "no" => {}
            Some(v) if v == "json" => {
                let dir = get("KV_FALLBACK_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| c.json.working_dir.join("journal"));
                c.fallback = Some(FallbackConfig { dir });
            }
            Some(v) => return Err(config_error("KV_FALLBACK", &v, "json or none")),
        }
        let r = &mut c.redis;
        if let Some(v) = get("REDIS_URL") {
            r.url = v.trim().to_string();
        }
        r.username = get("REDIS_USERNAME").map(str::to_string);
        r.password = vars
            .get("REDIS_PASSWORD")
            .filter(|p| !p.is_empty())
            .cloned();
        if let Some(v) = get("REDIS_MAX_CONNECTIONS") {
            r.max_connections = parse_u64("REDIS_MAX_CONNECTIONS", v, 1, 100_000)? as u32;
        }
        if let Some(v) = get("REDIS_CONNECTION_TIMEOUT") {
            r.connection_timeout = parse_seconds("REDIS_CONNECTION_TIMEOUT", v, false)?;
        }
        if let Some(v) = get("REDIS_SOCKET_TIMEOUT") {
            r.socket_timeout = parse_seconds("REDIS_SOCKET_TIMEOUT", v, false)?;
        }
        if let Some(v) = get("REDIS_POOL_TIMEOUT") {
            r.pool_timeout = parse_seconds("REDIS_POOL_TIMEOUT", v, false)?;
        }
        if let Some(v) = get("REDIS_RETRY_ON_TIMEOUT") {
            r.retry_on_timeout = parse_bool("REDIS_RETRY_ON_TIMEOUT", v)?;
        }
        if let Some(v) = get("REDIS_RETRIES") {
            r.retries = parse_u64("REDIS_RETRIES", v, 0, 100)? as u32;
        }
        if let Some(v) = get("REDIS_HEALTH_CHECK_INTERVAL") {
            r.health_check_interval = parse_seconds("REDIS_HEALTH_CHECK_INTERVAL", v, true)?;
        }
        if let Some(v) = get("REDIS_KEY_PREFIX") {
            r.key_prefix = v.trim().to_string();
        }
        if let Some(v) = get("REDIS_COMPRESSION") {
            r.compression = match v.trim().to_ascii_lowercase().as_str() {
                "lz4" => Compression::Lz4,
                "none" => Compression::None,
                _ => return Err(config_error("REDIS_COMPRESSION", v, "lz4 or none")),
            };
        }
        if let Some(v) = get("REDIS_COMPRESSION_MIN_BYTES") {
            r.compression_min_bytes =
                parse_u64("REDIS_COMPRESSION_MIN_BYTES", v, 0, u32::MAX as u64)? as usize;
        }
        if let Some(v) = get("REDIS_CLUSTER") {
            r.cluster = match v.trim().to_ascii_lowercase().as_str() {
                "auto" => ClusterMode::Auto,
                _ => match parse_bool("REDIS_CLUSTER", v) {
                    Ok(true) => ClusterMode::Cluster,
                    Ok(false) => ClusterMode::Standalone,
                    Err(_) => {
                        return Err(config_error(
                            "REDIS_CLUSTER",
                            v,
                            "auto, or true/false (1/0, yes/no)",
                        ))
                    }
                },
            };
        }
        if let Some(v) = get("REDIS_READ_FROM_REPLICAS") {
            r.read_from_replicas = parse_bool("REDIS_READ_FROM_REPLICAS", v)?;
        }
        if let Some(v) = get("REDIS_WAIT_REPLICAS") {
            r.wait_replicas = parse_u64("REDIS_WAIT_REPLICAS", v, 0, 1000)? as u32;
        }
        if let Some(v) = get("REDIS_WAIT_TIMEOUT") {
            r.wait_timeout = parse_seconds("REDIS_WAIT_TIMEOUT", v, false)?;
        }
        if let Some(v) = get("REDIS_SENTINEL_URLS") {
            // Split as REDIS_URL is: a comma inside a password does not start a URL.
            r.sentinel_urls = split_urls(v)
                .into_iter()
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(v) = get("REDIS_SENTINEL_MASTER") {
            r.sentinel_master = Some(v.trim().to_string());
        }
        if let Some(v) = get("REDIS_TLS_CA_CERT") {
            r.tls_ca_cert = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("REDIS_TLS_CLIENT_CERT") {
            r.tls_client_cert = Some(PathBuf::from(v.trim()));
        }
        if let Some(v) = get("REDIS_TLS_CLIENT_KEY") {
            r.tls_client_key = Some(PathBuf::from(v.trim()));
        }
        for (namespace, documented, reference) in TTL_VARIABLES {
            let a = get(documented)
                .map(|v| parse_ttl(documented, v))
                .transpose()?;
            let b = get(reference)
                .map(|v| parse_ttl(reference, v))
                .transpose()?;
            let ttl = match (a, b) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Error::Config {
                        variable: format!("{documented} and {reference}"),
                        value: format!("{a} and {b}"),
                        expected: format!(
                            "one value for {namespace}: set only {documented}, or both to the same"
                        ),
                    })
                }
                (a, b) => a.or(b),
            };
            if let Some(t) = ttl {
                r.ttl.set(namespace, t);
            }
        }
        for (k, v) in vars {
            let Some(name) = k.strip_prefix("REDIS_TTL_") else {
                continue;
            };
            if is_reserved_ttl_name(name) || v.trim().is_empty() {
                continue;
            }
            r.ttl.by_env_name.insert(name.to_string(), parse_ttl(k, v)?);
        }
        b.config.write_behind = WriteBehindConfig::from_vars(vars)?;
        Ok(b)
    }

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
    pub fn write_behind(mut self, c: WriteBehindConfig) -> Self {
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

/// The [`Error::Config`] for `variable` set to `value`, saying what was `expected`.
pub(crate) fn config_error(variable: &str, value: &str, expected: &str) -> Error {
    Error::Config {
        variable: variable.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// Parses true/false, 1/0, yes/no in any case.
///
/// # Errors
/// [`Error::Config`] naming `variable`.
pub(crate) fn parse_bool(variable: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(config_error(variable, value, "true/false, 1/0 or yes/no")),
    }
}

/// Parses an integer from `min` to `max`.
///
/// # Errors
/// [`Error::Config`] naming `variable`.
pub(crate) fn parse_u64(variable: &str, value: &str, min: u64, max: u64) -> Result<u64> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(config_error(
            variable,
            value,
            &format!("an integer from {min} to {max}"),
        )),
    }
}

fn parse_ttl(variable: &str, value: &str) -> Result<u64> {
    value.trim().parse::<u64>().map_err(|_| {
        config_error(
            variable,
            value,
            "a whole number of seconds, 0 or more (0 = no expiry)",
        )
    })
}

/// Parses seconds, decimals allowed.
fn parse_seconds(variable: &str, value: &str, zero_ok: bool) -> Result<Duration> {
    let expected = if zero_ok {
        "a number of seconds, 0 or more (decimals allowed)"
    } else {
        "a number of seconds above 0 (decimals allowed)"
    };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (s > 0.0 || (zero_ok && s == 0.0)) && s < 1e9 => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(config_error(variable, value, expected)),
    }
}

/// A URL (or comma-separated URLs) with any password replaced by `<redacted>`.
///
/// Written for URLs that do not parse too (that is when one lands in an error message): a raw
/// `/`, `?`, `@` or `,` inside a password must not leave part of it visible, so the user
/// information runs to the last `@` of its URL, and a comma starts a new URL only when a scheme
/// (`name://`) follows it.
pub fn redact_url(url: &str) -> String {
    split_urls(url)
        .iter()
        .map(|one| {
            let Some(scheme_end) = one.find("://") else {
                return one.to_string();
            };
            let rest = &one[scheme_end + 3..];
            let Some(at) = rest.rfind('@') else {
                return one.to_string();
            };
            let userinfo = &rest[..at];
            let redacted = match userinfo.find(':') {
                Some(colon) => format!("{}:<redacted>", &userinfo[..colon]),
                None => "<redacted>".to_string(),
            };
            format!("{}{}{}", &one[..scheme_end + 3], redacted, &rest[at..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL `one` of `value` (one of [`RedisConfig::urls`]) as errors show it: `value` is
/// redacted whole and then split, so a password is never cut apart from its URL's `@` (cut at
/// a comma, `redis://u:pa,ss@h` used to print `redis://u:pa`).
fn shown_url(value: &str, one: &str) -> String {
    let redacted = redact_url(value);
    let index = split_urls(value)
        .into_iter()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .position(|u| std::ptr::eq(u, one));
    let pieces: Vec<&str> = split_urls(&redacted)
        .into_iter()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    match index.and_then(|i| pieces.get(i)) {
        Some(piece) => piece.to_string(),
        None => redacted,
    }
}

/// `url` split at the commas that are followed by a scheme (`redis://`, `rediss://`, ...).
fn split_urls(url: &str) -> Vec<&str> {
    let starts_url = |s: &str| {
        s.trim_start().find("://").is_some_and(|i| {
            let scheme = &s.trim_start()[..i];
            !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
    };
    let mut out: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, _) in url.match_indices(',') {
        if starts_url(&url[i + 1..]) {
            out.push(&url[start..i]);
            start = i + 1;
        }
    }
    out.push(&url[start..]);
    out
}

/// True when `url` carries user information (a name or a password before an `@`).
pub(crate) fn has_userinfo(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(_, rest)| rest.contains('@'))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            ("REDIS_COMPRESSION", "zstd", "lz4 or none"),
            ("REDIS_KEY_PREFIX", "a:b", "ambiguous"),
        ] {
            let e = build(&[(k, v)]).unwrap_err().to_string();
            assert!(e.contains(k) && e.contains(needle), "{k}={v}: {e}");
        }
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
}
