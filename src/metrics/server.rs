//! Server-wide figures: `INFO` read through a pool ([`server_info`]), parsed ([`ServerInfo`]),
//! and recorded into the server metrics ([`Metrics::sample_server`]).

use crate::backend::redis::RedisShared;
use crate::error::Result;

use super::{clamp_i64, Metrics};

impl Metrics {
    /// Reads the server's INFO text through `info` and updates `redis_evicted_keys_total`,
    /// `redis_server_used_memory_bytes` and `redis_server_maxmemory_bytes`.
    ///
    /// `info` returns the text of `INFO` (or at least `INFO memory` and `INFO stats`) from any
    /// connection the host has; for a cluster, the nodes' texts one after another (each node's
    /// `used_memory`, `maxmemory` and `evicted_keys` are summed). [`server_info`] is the ready
    /// made version for a [`RedisShared`] pool.
    ///
    /// # Errors
    /// Whatever `info` returns; the metrics are then left unchanged.
    ///
    /// # Examples
    /// ```
    /// # let metrics = graphrag_kv::metrics::Metrics::new(&prometheus::Registry::new()).unwrap();
    /// let info = metrics
    ///     .sample_server(|| Ok::<_, std::io::Error>("used_memory:1024\r\nevicted_keys:3\r\n".into()))
    ///     .unwrap();
    /// assert_eq!((info.used_memory, info.evicted_keys), (1024, 3));
    /// ```
    pub fn sample_server<E>(
        &self,
        info: impl FnOnce() -> std::result::Result<String, E>,
    ) -> std::result::Result<ServerInfo, E> {
        let parsed = ServerInfo::parse(&info()?);
        self.record_server(&parsed);
        Ok(parsed)
    }

    /// Updates the server metrics from figures already read (see [`Metrics::sample_server`]).
    pub fn record_server(&self, info: &ServerInfo) {
        self.server_memory.set(clamp_i64(info.used_memory));
        self.server_maxmemory.set(clamp_i64(info.maxmemory));
        let mut last = self.last_evicted.lock().unwrap_or_else(|p| p.into_inner());
        let delta = match *last {
            // Dropped: the server restarted and counts from zero again.
            Some(prev) if info.evicted_keys < prev => info.evicted_keys,
            Some(prev) => info.evicted_keys - prev,
            None => info.evicted_keys,
        };
        self.evicted.inc_by(delta);
        *last = Some(info.evicted_keys);
    }
}

/// Server-wide figures from `INFO`, summed over the masters of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// `used_memory`: bytes the server uses, data and overhead.
    pub used_memory: u64,
    /// `maxmemory`: the limit in bytes, 0 for none.
    pub maxmemory: u64,
    /// `maxmemory_policy` (of the first node), empty when INFO did not say.
    pub maxmemory_policy: String,
    /// `evicted_keys`: keys evicted for maxmemory since the server started.
    pub evicted_keys: u64,
    /// `expired_keys`: keys that expired (TTL) since the server started.
    pub expired_keys: u64,
    /// Keys on the server, every database and every key prefix (`# Keyspace`).
    pub keys: u64,
    /// Nodes whose INFO was read: 1 for a single server.
    pub nodes: usize,
}

impl ServerInfo {
    /// Parses INFO text; several nodes' texts may follow one another (each node's figures are
    /// added). Unknown and missing fields are ignored.
    pub fn parse(text: &str) -> ServerInfo {
        let mut info = ServerInfo::default();
        let mut nodes = 0;
        for line in text.lines().map(str::trim) {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let n = || value.trim().parse::<u64>().unwrap_or(0);
            match key {
                // Every INFO text that has a Server section names its version once per node.
                "redis_version" => nodes += 1,
                "used_memory" => info.used_memory += n(),
                "maxmemory" => info.maxmemory += n(),
                "maxmemory_policy" if info.maxmemory_policy.is_empty() => {
                    info.maxmemory_policy = value.trim().to_string();
                }
                "evicted_keys" => info.evicted_keys += n(),
                "expired_keys" => info.expired_keys += n(),
                db if db.starts_with("db") && db[2..].bytes().all(|b| b.is_ascii_digit()) => {
                    // db0:keys=12,expires=3,avg_ttl=0
                    let keys = value
                        .split(',')
                        .find_map(|kv| kv.strip_prefix("keys="))
                        .and_then(|k| k.parse::<u64>().ok())
                        .unwrap_or(0);
                    info.keys += keys;
                }
                _ => {}
            }
        }
        info.nodes = nodes.max(1);
        info
    }

    /// Parses a reply to `INFO`: a single server's text, or a cluster client's map of node
    /// address to text.
    fn from_reply(reply: redis::Value) -> ServerInfo {
        let text = |v: redis::Value| redis::from_redis_value::<String>(v).unwrap_or_default();
        match reply {
            redis::Value::Map(nodes) => {
                let all: Vec<String> = nodes.into_iter().map(|(_, v)| text(v)).collect();
                let mut info = ServerInfo::parse(&all.join("\n"));
                info.nodes = all.len().max(1);
                info
            }
            other => ServerInfo::parse(&text(other)),
        }
    }
}

/// Reads `INFO` through a Redis pool (every master of a cluster).
///
/// # Errors
/// Redis failures; [`crate::Error::is_permission_denied`] when the ACL user may not run INFO.
pub fn server_info(shared: &RedisShared) -> Result<ServerInfo> {
    let reply: redis::Value =
        shared.with_conn("server_info", "", |c| redis::cmd("INFO").query(c))?;
    Ok(ServerInfo::from_reply(reply))
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;

    use super::ServerInfo;
    use crate::metrics::Metrics;

    #[test]
    fn info_text_is_parsed_and_nodes_summed() {
        let one = "# Server\r\nredis_version:7.0.15\r\n# Memory\r\nused_memory:1000\r\n\
                   maxmemory:2000\r\nmaxmemory_policy:volatile-lru\r\n# Stats\r\n\
                   evicted_keys:5\r\nexpired_keys:7\r\n# Keyspace\r\n\
                   db0:keys=12,expires=3,avg_ttl=0\r\ndb1:keys=1,expires=0,avg_ttl=0\r\n";
        let i = ServerInfo::parse(one);
        assert_eq!(
            i,
            ServerInfo {
                used_memory: 1000,
                maxmemory: 2000,
                maxmemory_policy: "volatile-lru".into(),
                evicted_keys: 5,
                expired_keys: 7,
                keys: 13,
                nodes: 1,
            }
        );
        let two = ServerInfo::parse(&format!("{one}{one}"));
        assert_eq!((two.used_memory, two.keys, two.nodes), (2000, 26, 2));
        let map = redis::Value::Map(vec![
            (
                redis::Value::BulkString(b"a:1".to_vec()),
                redis::Value::BulkString(one.as_bytes().to_vec()),
            ),
            (
                redis::Value::BulkString(b"b:2".to_vec()),
                redis::Value::BulkString(one.as_bytes().to_vec()),
            ),
        ]);
        let cluster = ServerInfo::from_reply(map);
        assert_eq!((cluster.evicted_keys, cluster.nodes), (10, 2));
    }

    #[test]
    fn evictions_counter_follows_the_server_total_across_restarts() {
        let m = Metrics::new(&Registry::new()).unwrap();
        for (total, want) in [(10, 10), (15, 15), (15, 15), (2, 17), (4, 19)] {
            m.record_server(&ServerInfo {
                evicted_keys: total,
                ..ServerInfo::default()
            });
            assert_eq!(m.evicted.get(), want, "after server total {total}");
        }
    }
}
