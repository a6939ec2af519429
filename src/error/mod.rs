//! The crate's one error type.
//!
//! Every variant carries what a reader needs to act: the namespace, the id, the file and the
//! position, the environment variable and the values it accepts. Retry and fallback decisions
//! branch on [`Error::is_retryable`], [`Error::is_timeout`] and [`Error::is_connection`], never on
//! message text. No variant ever holds a password or a URL with credentials in it.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `graphrag-kv`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A namespace name outside `[A-Za-z0-9_.-]+`.
    #[error("invalid namespace {namespace:?}: {reason}")]
    InvalidNamespace {
        /// The name as given.
        namespace: String,
        /// Why it was refused.
        reason: String,
    },

    /// An id that is empty or longer than [`crate::MAX_ID_BYTES`].
    #[error("invalid id {id} in namespace {namespace:?}: {reason}")]
    InvalidId {
        /// The namespace the id was used with.
        namespace: String,
        /// The id, shortened for display when it is long.
        id: String,
        /// Why it was refused.
        reason: String,
    },

    /// A configuration value that cannot be used.
    #[error("invalid configuration {variable}={value}: expected {expected}")]
    Config {
        /// The environment variable (or builder setting) that holds the bad value.
        variable: String,
        /// The value as given; `<redacted>` for secrets.
        value: String,
        /// What the setting accepts.
        expected: String,
    },

    /// A file could not be read, written or locked.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`reading`, `writing`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A kv_store JSON file that is not a valid JSON object. The file is left untouched.
    #[error("corrupt kv_store file {} at line {line}, column {column}: {message}", path.display())]
    CorruptFile {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// What is wrong there.
        message: String,
    },

    /// Another process holds the write lock on a JSON working directory.
    #[error(
        "working directory {} is locked for writing by another process or another open Storage (lock file {}); \
         stop that process or use a read-only command",
        dir.display(),
        lock_file.display()
    )]
    Locked {
        /// The working directory.
        dir: PathBuf,
        /// The lock file inside it.
        lock_file: PathBuf,
    },

    /// A write was attempted through a store opened read-only.
    #[error("namespace {namespace:?} was opened read-only; {operation} is not allowed")]
    ReadOnly {
        /// The namespace.
        namespace: String,
        /// The refused operation.
        operation: &'static str,
    },

    /// A stored value that is neither valid JSON nor a valid compressed frame.
    #[error("cannot decode value of {key:?} in namespace {namespace:?}: {reason}")]
    Decode {
        /// The namespace.
        namespace: String,
        /// The id (or full Redis key) of the value.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A value that cannot be stored (too large, not serializable).
    #[error("cannot encode value of {key:?} in namespace {namespace:?}: {reason}")]
    Encode {
        /// The namespace.
        namespace: String,
        /// The id of the value.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A key holding something other than a string value (e.g. a hash written by another program).
    #[error("key {key:?} of namespace {namespace:?} holds a Redis {found}, not a string value")]
    WrongType {
        /// The namespace.
        namespace: String,
        /// The full Redis key.
        key: String,
        /// The Redis type found (`hash`, `list`, ...).
        found: String,
    },

    /// A Redis command failed (after the retries allowed for it).
    #[error("redis {operation} on namespace {namespace:?} failed: {source}")]
    Redis {
        /// The store operation (`get_by_ids`, `upsert`, ...).
        operation: &'static str,
        /// The namespace (empty for server-wide operations).
        namespace: String,
        /// The client's error. redis-rs never puts the password in its messages.
        #[source]
        source: redis::RedisError,
    },

    /// No pooled connection could be had in time: every one of `REDIS_MAX_CONNECTIONS` stayed
    /// busy for `REDIS_POOL_TIMEOUT`. (A server that cannot be reached is reported at once as
    /// [`Error::Connect`].)
    #[error("no redis connection for {operation} on namespace {namespace:?} within the pool timeout: {message}")]
    Pool {
        /// The store operation.
        operation: &'static str,
        /// The namespace.
        namespace: String,
        /// r2d2's explanation (its last connection error, if any).
        message: String,
    },

    /// A Redis Cluster operation that must see every master (`all_keys`, `clear`, `stats`,
    /// `list_namespaces`, a checkpoint) found no stable slot map over any of its attempts:
    /// slots were moving, not served, or served by a master flagged as failing. Its partial
    /// result was thrown away; the same call may succeed once the cluster settles.
    #[error(
        "redis {operation} on namespace {namespace:?}: no stable cluster slot map covering \
         all slots in {attempts} attempts ({reason}); partial results discarded"
    )]
    ClusterUnstable {
        /// The store operation.
        operation: &'static str,
        /// The namespace (empty for server-wide operations).
        namespace: String,
        /// Whole attempts made (each one a full pass over every master).
        attempts: u32,
        /// Why the last attempt was refused, e.g. `slots migrating on 10.0.0.3:7000: [5->-..]`,
        /// `slots 5461-10922 not served by any master` or
        /// `slots of 10.0.0.2:7000 changed during the pass`.
        reason: String,
    },

    /// A new connection to Redis could not be opened. Reported by the connect attempt itself,
    /// as soon as it fails, instead of after the pool timeout: `cause` says whether waiting
    /// can help ([`ConnectFailure::Refused`], [`ConnectFailure::Timeout`],
    /// [`ConnectFailure::Unreachable`]) or not ([`ConnectFailure::Authentication`],
    /// [`ConnectFailure::Tls`], [`ConnectFailure::Other`]).
    #[error("cannot connect to redis at {server}: {cause} ({source})")]
    Connect {
        /// The server (URL, URLs of a cluster's seeds, or Sentinel master) with any password
        /// replaced by `<redacted>`.
        server: String,
        /// Why, as a value to branch on.
        cause: ConnectFailure,
        /// The client's error. redis-rs never puts the password in its messages.
        #[source]
        source: redis::RedisError,
    },

    /// A durability checkpoint (`index_done_callback`) could not be completed.
    #[error("checkpoint failed: {reason}")]
    Checkpoint {
        /// What the server said or what timed out.
        reason: String,
    },

    /// An LLM request failed: transport, HTTP status, or an answer that cannot be read.
    #[error("LLM request failed: {reason}")]
    Llm {
        /// What went wrong. Never holds the API key.
        reason: String,
        /// True when the same request may succeed later: timeouts, connection failures,
        /// HTTP 408, 409, 429 and 5xx.
        retryable: bool,
    },

    /// The LLM provider refused a request for its rate limit (HTTP 429), possibly saying how long
    /// to wait. [`crate::rate_limit::RateLimitedLlm`] turns it into a cool-down every process
    /// sharing the limiter honours; users' own clients return it from
    /// [`crate::llm::LlmClient::complete_once`] to get the same.
    #[error("LLM rate limit reached: {reason}")]
    LlmRateLimited {
        /// What the provider said. Never holds the API key.
        reason: String,
        /// How long the provider asked to wait (`retry-after-ms` or `Retry-After`), if it said.
        retry_after: Option<std::time::Duration>,
    },

    /// Fewer replicas than `REDIS_WAIT_REPLICAS` confirmed a write batch in time. The batch was
    /// written on the master, but a failover now could lose it.
    #[error(
        "namespace {namespace:?}: only {confirmed} of {wanted} replicas confirmed the write \
         within REDIS_WAIT_TIMEOUT"
    )]
    Replication {
        /// The namespace.
        namespace: String,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that confirmed.
        confirmed: u32,
    },

    /// Writes that a write-behind queue had accepted and the backend then refused for good (a
    /// value too large, out of memory after retries, no permission): they were dropped. Reported
    /// by the next `flush` or `index_done_callback` of the thread that wrote them.
    #[error(
        "namespace {namespace:?}: the backend refused {count} queued write(s), which were \
         dropped (ids: {}); first error: {source}",
        list_ids(.ids, *.count)
    )]
    WritesRefused {
        /// The namespace.
        namespace: String,
        /// How many writes were refused since the last report.
        count: u64,
        /// The ids of the first few of them, in the order they were refused.
        ids: Vec<String>,
        /// The backend's error for the first of them.
        #[source]
        source: Box<Error>,
    },

    /// A fallback journal that cannot be replayed here: written for another Redis target or
    /// key prefix, or by a version that did not record its target. It is left untouched.
    #[error("journal {}: {reason}", path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// Why, and the `graphrag-kv journal` command that settles it.
        reason: String,
    },

    /// The backend cannot answer right now and no local copy can either.
    #[error("namespace {namespace:?} is unavailable: {reason}")]
    Unavailable {
        /// The namespace.
        namespace: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// True when the error is a timeout (socket, connect, or waiting for a pooled connection).
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Redis { source, .. } => source.is_timeout(),
            Error::Connect { cause, .. } => *cause == ConnectFailure::Timeout,
            Error::Pool { .. } => true,
            _ => false,
        }
    }

    /// True when the error comes from an unreachable server or a dropped connection.
    ///
    /// A server that answered but refused the client (a wrong password, a certificate the
    /// client does not trust) is not a connection error: waiting does not fix it, so a
    /// fallback must not treat it as an outage and journal writes forever.
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Redis { source, .. } => is_connection_error(source),
            Error::Connect { cause, .. } => cause.may_heal(),
            Error::Pool { .. } | Error::Unavailable { .. } => true,
            _ => false,
        }
    }

    /// True when repeating the same idempotent call later may succeed.
    ///
    /// Connection errors, timeouts, and the server's transient states (LOADING, TRYAGAIN,
    /// CLUSTERDOWN, MASTERDOWN, BUSY) are retryable, as are LLM requests that failed for a
    /// transient reason, and a cluster-wide operation that found no stable slot map
    /// ([`Error::ClusterUnstable`]); bad input, decode errors and refused commands are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Redis { source, .. } => is_retryable_redis(source),
            Error::Connect { cause, .. } => cause.may_heal(),
            Error::Llm { retryable, .. } => *retryable,
            Error::LlmRateLimited { .. }
            | Error::Pool { .. }
            | Error::Unavailable { .. }
            | Error::Replication { .. }
            | Error::ClusterUnstable { .. } => true,
            _ => false,
        }
    }

    /// True when an LLM provider refused a request for its rate limit (HTTP 429); see
    /// [`Error::retry_after`] for how long it asked to wait.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Error::LlmRateLimited { .. })
    }

    /// How long the LLM provider asked to wait before the next request, when it said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::LlmRateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the server refused a write for lack of memory (`OOM`: `maxmemory` reached with
    /// nothing it may evict). Not retryable in general, as it may last; the write-behind queue
    /// retries it a few times before it drops the write.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Redis { source, .. } if server_codes(source).iter().any(|c| c == "OOM"))
    }

    /// True when the server refused a command for lack of permission (ACL `NOPERM`).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Error::Redis { source, .. } if is_noperm(source))
    }
}

/// Why a new connection could not be opened (see [`Error::Connect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectFailure {
    /// Nothing listens at the address (the server is down or the port is wrong).
    Refused,
    /// No answer within `REDIS_CONNECTION_TIMEOUT` (a hung or overloaded server, a firewall
    /// that drops packets).
    Timeout,
    /// Another network failure: connection reset, host unreachable, name not resolved, or no
    /// Sentinel that could name the master; also a server that answered an error and closed
    /// the connection (`maxclients` reached), the server's words in the source.
    Unreachable,
    /// The server refused the credentials (`WRONGPASS`, a disabled ACL user). Never retried.
    Authentication,
    /// The TLS handshake failed: an untrusted or expired certificate, a name mismatch, TLS
    /// spoken to a plain-text port. Never retried.
    Tls,
    /// Anything else the server or the client refused (e.g. a database index out of range).
    Other,
}

impl ConnectFailure {
    /// Classifies a connect error of the `redis` crate.
    pub(crate) fn of(e: &redis::RedisError) -> ConnectFailure {
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
        {
            ConnectFailure::Authentication
        } else if is_tls_error(e) {
            ConnectFailure::Tls
        } else if e.is_connection_refusal() {
            ConnectFailure::Refused
        } else if e.is_timeout() {
            ConnectFailure::Timeout
        } else if is_connection_error(e)
            // Every sentinel was unreachable or none knew a healthy master yet (as during a
            // failover): asking again later may succeed.
            || e.kind() == redis::ErrorKind::MasterNameNotFoundBySentinel
        {
            ConnectFailure::Unreachable
        } else {
            ConnectFailure::Other
        }
    }

    /// True when waiting may fix it: the server is down, hung or unreachable, not refusing us.
    pub fn may_heal(self) -> bool {
        matches!(
            self,
            ConnectFailure::Refused | ConnectFailure::Timeout | ConnectFailure::Unreachable
        )
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectFailure::Refused => "connection refused (is the server running?)",
            ConnectFailure::Timeout => "no answer within REDIS_CONNECTION_TIMEOUT",
            ConnectFailure::Unreachable => "server unreachable",
            ConnectFailure::Authentication => {
                "authentication failed (check REDIS_USERNAME / REDIS_PASSWORD or the URL's)"
            }
            ConnectFailure::Tls => {
                "TLS handshake failed (check the server's certificate, REDIS_TLS_CA_CERT, \
                 REDIS_TLS_CLIENT_CERT and REDIS_TLS_CLIENT_KEY)"
            }
            ConnectFailure::Other => "the server refused the connection",
        })
    }
}

/// True when a connect error comes from the TLS layer (rustls), reported by redis-rs as an I/O
/// error wrapping it. Found by type, not by message text.
fn is_tls_error(e: &redis::RedisError) -> bool {
    let Some(source) = std::error::Error::source(e) else {
        return false;
    };
    // redis-rs keeps the cause as an `Arc<dyn Error>`: look through it.
    let source: &(dyn std::error::Error + 'static) =
        match source.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
            Some(inner) => &**inner,
            None => source,
        };
    if source.is::<rustls::Error>() || source.is::<rustls::pki_types::InvalidDnsNameError>() {
        return true;
    }
    source
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        .is_some_and(|inner| inner.is::<rustls::Error>())
}

/// True for errors that mean "the server could not be reached or the connection broke".
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Server replies that mean "not now": the server or the cluster is in a state that passes
/// (loading its data, a script running, a failover, a failed BGSAVE with
/// `stop-writes-on-bgsave-error`, too few replicas for `min-replicas-to-write`), and the same
/// command succeeds once it has.
const TRANSIENT_CODES: [&str; 8] = [
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "BUSY",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
];

/// Server codes the redis-rs cluster client waits out and re-sends itself (its
/// `RetryMethod::WaitAndRetry` and `RefreshSlotsAndRetry`), within the budget it shares with
/// redirects.
const CLUSTER_CLIENT_RETRIED_CODES: [&str; 5] = [
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "MASTERDOWN",
    "READONLY",
];

/// True for cluster errors the cluster client has already retried within the same operation:
/// the states in [`CLUSTER_CLIENT_RETRIED_CODES`] (for a pipeline: when every failed command
/// failed with one) and timeouts (which it re-sends at once). The backend does not retry these
/// again on a cluster, so a failing command is retried at one level only (`crate::retry`).
pub(crate) fn is_retried_by_cluster_client(e: &redis::RedisError) -> bool {
    if e.is_timeout() {
        return true;
    }
    let codes = server_codes(e);
    !codes.is_empty()
        && codes
            .iter()
            .all(|c| CLUSTER_CLIENT_RETRIED_CODES.contains(&c.as_str()))
}

/// True for errors worth retrying an idempotent command on: connection errors, and server
/// replies with a [`TRANSIENT_CODES`] code. A pipeline's error is retryable when every failed
/// command in it failed with such a code (redis-rs reports the code of an unknown one, such
/// as `MISCONF`, only per command).
pub(crate) fn is_retryable_redis(e: &redis::RedisError) -> bool {
    if is_connection_error(e) {
        return true;
    }
    let codes = server_codes(e);
    !codes.is_empty() && codes.iter().all(|c| TRANSIENT_CODES.contains(&c.as_str()))
}

/// The error codes the server answered: one for a command, one per failed command of a
/// pipeline; none for a client-side error.
fn server_codes(e: &redis::RedisError) -> Vec<String> {
    // A clone of a RedisError is a reference count: it holds its parts in `Arc`s.
    match e.clone().into_server_errors() {
        Some(errors) => errors.iter().map(|(_, s)| s.code().to_string()).collect(),
        None => e.code().map(str::to_string).into_iter().collect(),
    }
}

/// The ids of a [`Error::WritesRefused`] for its message: `"a", "b", ... (n in all)`.
fn list_ids(ids: &[String], count: u64) -> String {
    let mut out: Vec<String> = ids.iter().map(|id| display_id(id)).collect();
    if count > ids.len() as u64 {
        out.push(format!("... ({count} in all)"));
    }
    out.join(", ")
}

/// True when the server answered NOPERM (ACL).
pub(crate) fn is_noperm(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM") || e.to_string().contains("NOPERM")
}

/// Shortens an id for messages: long ids would flood a log line.
pub(crate) fn display_id(id: &str) -> String {
    const MAX: usize = 80;
    if id.len() <= MAX {
        return format!("{id:?}");
    }
    let mut cut = MAX;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}... ({} bytes)", &id[..cut], id.len())
}

#[cfg(test)]
mod tests;
