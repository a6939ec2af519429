//! [`StoreConfigBuilder::from_env`] and [`StoreConfigBuilder::from_vars`]: the environment
//! variables of the module docs, read into a builder.

use std::collections::HashMap;
use std::path::PathBuf;

use super::builder::level_expected;
use super::parse::{config_error, parse_bool, parse_seconds, parse_ttl, parse_u64};
use super::redact::split_urls;
use super::ttl::{is_reserved_ttl_name, TTL_VARIABLES};
use super::{
    BackendKind, ClusterMode, Compression, DualConfig, FallbackConfig, StoreConfig,
    StoreConfigBuilder,
};
use crate::error::{Error, Result};

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
            r.compression = Compression::parse("REDIS_COMPRESSION", v)?;
        }
        if let Some(v) = get("REDIS_COMPRESSION_LEVEL") {
            // Range-checked by `build()`, which names the variable, as for the builder's setter.
            r.compression_level = v
                .trim()
                .parse::<i32>()
                .map_err(|_| config_error("REDIS_COMPRESSION_LEVEL", v, &level_expected()))?;
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
        b.config.write_behind = super::WriteBehindConfig::from_vars(vars)?;
        Ok(b)
    }
}
