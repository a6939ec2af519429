//! How a `RedisShared` reaches its server: the answer to "which Redis is this?".

use std::fmt;

/// How the connections of a [`super::RedisShared`] reach Redis, decided when it is opened.
///
/// `Display` writes the lowercase name (`standalone`, `sentinel`, `cluster`), as logs and
/// reports show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RedisMode {
    /// One server at a fixed address.
    Standalone,
    /// The master that Sentinel names, found again after a failover.
    Sentinel,
    /// A Redis Cluster: keys spread over every master by slot.
    Cluster,
}

impl RedisMode {
    /// `standalone`, `sentinel` or `cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisMode::Standalone => "standalone",
            RedisMode::Sentinel => "sentinel",
            RedisMode::Cluster => "cluster",
        }
    }
}

impl fmt::Display for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
