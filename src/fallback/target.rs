//! Where a journal's writes belong: the Redis target and key prefix, written as the journal's
//! first line and compared before a journal is replayed.

use serde::{Deserialize, Serialize};

use crate::config::{redact_url, RedisConfig};

/// Version of the journal format written in every header.
const FORMAT: u32 = 1;

/// The first line of a journal: where its writes belong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// Version of the journal format (1).
    pub graphrag_kv_journal: u32,
    /// The Redis target as configured, passwords redacted: for people.
    pub target: String,
    /// The target's identity, compared on adoption: see [`JournalTarget`].
    pub nodes: Vec<String>,
    /// The key prefix (`REDIS_KEY_PREFIX`) the writes were made with.
    pub prefix: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// The process that wrote the journal.
    pub pid: u32,
}

/// Where journaled writes belong: a Redis deployment and a key prefix.
///
/// Two targets are the same when their key prefixes are equal and their node lists are equal
/// as sets: each node is `host:port/db` (host lower-cased, port 6379 and database 0 when
/// absent; user names and passwords left out), so the order of cluster URLs and credentials
/// do not matter, but `localhost` and `127.0.0.1` differ. Behind Sentinel the nodes are the
/// sentinels' addresses and the master's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalTarget {
    /// The configured URL(s), passwords redacted.
    pub display: String,
    /// The identity compared with a journal's header, sorted.
    pub nodes: Vec<String>,
    /// The key prefix.
    pub prefix: String,
}

impl JournalTarget {
    /// The target a Redis configuration writes to.
    pub fn from_redis(config: &RedisConfig) -> JournalTarget {
        let (display, mut nodes) = if config.sentinel_urls.is_empty() {
            let urls = config.urls();
            (
                redact_url(&urls.join(",")),
                urls.iter().map(|u| node_identity(u)).collect::<Vec<_>>(),
            )
        } else {
            let master = config.sentinel_master.as_deref().unwrap_or("mymaster");
            let mut nodes: Vec<String> = config
                .sentinel_urls
                .iter()
                .map(|u| format!("sentinel {}", node_identity(u)))
                .collect();
            nodes.push(format!("sentinel master {master}"));
            (
                format!(
                    "master {master} via Sentinel {}",
                    redact_url(&config.sentinel_urls.join(","))
                ),
                nodes,
            )
        };
        nodes.sort();
        nodes.dedup();
        JournalTarget {
            display,
            nodes,
            prefix: config.key_prefix.clone(),
        }
    }

    /// True when `header` names this target and prefix.
    pub fn matches(&self, header: &JournalHeader) -> bool {
        self.nodes == header.nodes && self.prefix == header.prefix
    }

    pub(super) fn header(&self) -> JournalHeader {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        JournalHeader {
            graphrag_kv_journal: FORMAT,
            target: self.display.clone(),
            nodes: self.nodes.clone(),
            prefix: self.prefix.clone(),
            created_unix_ms: ms,
            created: rfc3339(ms),
            pid: std::process::id(),
        }
    }
}

/// `host:port/db` of one URL, without user information (which may hold a password).
fn node_identity(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    if scheme.contains("unix") {
        let path = rest.split(['?', '#']).next().unwrap_or(rest);
        return format!("unix:{path}");
    }
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = hostport.split(['?', '#']).next().unwrap_or(hostport);
    let db: u64 = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .parse()
        .unwrap_or(0);
    let (host, port) = match hostport.rsplit_once(':') {
        // An IPv6 address without a port ends in `]` after its last colon.
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().unwrap_or(6379)),
        _ => (hostport, 6379),
    };
    format!("{}:{port}/{db}", host.to_ascii_lowercase())
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-12-06T08:13:14.123Z`).
fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identity_ignores_credentials_and_order() {
        assert_eq!(node_identity("redis://u:pw@Host:7000/2"), "host:7000/2");
        assert_eq!(node_identity("redis://h"), "h:6379/0");
        assert_eq!(node_identity("rediss://:p@w:d@h:1"), "h:1/0");
        assert_eq!(node_identity("redis://[::1]:7"), "[::1]:7/0");
        assert_eq!(node_identity("redis://[::1]"), "[::1]:6379/0");
        assert_eq!(
            node_identity("redis+unix:///tmp/r.sock?db=1"),
            "unix:/tmp/r.sock"
        );
        let a = RedisConfig {
            url: "redis://x:pw@h1:1,redis://h2:2".into(),
            ..RedisConfig::default()
        };
        let mut b = a.clone();
        b.url = "redis://h2:2, redis://other:pw2@h1:1".into();
        let (ta, tb) = (JournalTarget::from_redis(&a), JournalTarget::from_redis(&b));
        assert_eq!(ta.nodes, tb.nodes);
        assert!(!ta.display.contains("pw"), "{}", ta.display);
        b.key_prefix = "other".into();
        assert!(!JournalTarget::from_redis(&b).matches(&ta.header()));
        assert!(JournalTarget::from_redis(&a).matches(&ta.header()));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_796_545_005_029), "2026-12-06T08:16:45.029Z");
    }
}
