//! The r2d2 pool of single-node connections, with a cheap health check.
//!
//! r2d2's own `test_on_check_out` PINGs on every checkout: one extra round trip per operation,
//! which doubles the latency of a single get. Here the pool does not test on checkout; instead
//! [`RedisPool::get`] PINGs only a connection that sat idle longer than the health-check interval
//! (the reference design's `health_check_interval`), and a connection that failed with an I/O
//! error or timeout is marked broken so r2d2 drops it instead of handing it out again.
//!
//! A checkout never waits out the pool timeout to learn that the server cannot be reached: r2d2
//! opens connections in its own threads and reports their errors only when the pool timeout
//! expires, and every retry waits again (a wrong password took ~40 s to surface, a write
//! during an outage ~80 s to reach the fallback journal). So when the pool has no idle
//! connection and room for a new one, [`ProbingPool::checkout`] opens that connection itself,
//! on the caller's thread, bounded by `REDIS_CONNECTION_TIMEOUT`: a failure is returned at
//! once with its real cause ([`NoConnection::Connect`]), a success is handed to the pool, which
//! gives it out without opening another. Only an exhausted pool (every connection busy) still
//! waits up to `REDIS_POOL_TIMEOUT`.
//!
//! The pool never has more than `REDIS_MAX_CONNECTIONS` connections open, those being opened
//! included: a connection takes a slot before it is opened, whether by a checkout or by r2d2,
//! and gives it back when it is closed (see `probing.rs`). Without that, threads that all found
//! the pool empty each opened one: 48 threads on a pool of 8 opened 38 connections, and a
//! server whose `maxclients` left room for the pool refused the surplus.
//!
//! A new connection counts as open once it answered a PING (see [`answered`]): a server that
//! accepts the connection and then refuses it (`maxclients` reached) is a connect error with
//! the server's words, retried like an outage, not a "connection reset" on the first command.
//!
//! TLS (`rediss://`) uses the `redis` crate's rustls support: the files of `REDIS_TLS_CA_CERT`,
//! `REDIS_TLS_CLIENT_CERT` and `REDIS_TLS_CLIENT_KEY` are read here, when the pool is created,
//! and handed to the client; see [`tls_client`] and [`ensure_crypto_provider`].

use std::sync::Once;
use std::time::{Duration, Instant};

use redis::{Client, Connection, ConnectionAddr, ConnectionInfo, ConnectionLike, RedisError};

use crate::config::{redact_url, RedisConfig};
use crate::error::ConnectFailure;

mod probing;
pub(crate) use probing::{NoConnection, Probing, ProbingPool};

/// Opens connections with a connect timeout and sets the socket timeouts on them.
pub(crate) struct Manager {
    connector: Connector,
    connection_timeout: Duration,
    socket_timeout: Duration,
}

/// Where new connections go: a fixed server, or the master that Sentinel names at that moment.
enum Connector {
    Direct(Client),
    /// Asked again for every new connection, so after a failover new connections reach the new
    /// master; connections to the old one fail (or answer READONLY) and are discarded.
    Sentinel(redis::sentinel::LockedSentinelClient),
}

/// A pooled connection with the bookkeeping the health check needs.
pub(crate) struct PooledConn {
    pub(crate) conn: Connection,
    last_used: Instant,
    /// Set after an I/O error or timeout: a reply may still be in flight on this socket, so it
    /// must never be reused.
    broken: bool,
}

impl PooledConn {
    /// Marks the connection as unusable; r2d2 discards it when it is returned.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl r2d2::ManageConnection for Manager {
    type Connection = PooledConn;
    type Error = RedisError;

    fn connect(&self) -> Result<PooledConn, RedisError> {
        let start = Instant::now();
        let conn = match &self.connector {
            Connector::Direct(client) => {
                client.get_connection_with_timeout(self.connection_timeout)?
            }
            Connector::Sentinel(sentinel) => sentinel.get_connection()?,
        };
        let deadline = start + self.connection_timeout;
        let conn = answered(conn, deadline)?;
        conn.set_read_timeout(Some(self.socket_timeout))?;
        conn.set_write_timeout(Some(self.socket_timeout))?;
        Ok(PooledConn {
            conn,
            last_used: Instant::now(),
            broken: false,
        })
    }

    fn is_valid(&self, c: &mut PooledConn) -> Result<(), RedisError> {
        redis::cmd("PING").query::<()>(&mut c.conn)
    }

    fn has_broken(&self, c: &mut PooledConn) -> bool {
        c.broken || !c.conn.is_open()
    }
}

/// `conn`, once it answered a PING before `deadline` (the connect deadline).
///
/// Without credentials redis-rs sends nothing while connecting, so a server that accepts
/// connections and never answers would only be found out by the first command, after
/// REDIS_SOCKET_TIMEOUT and as a command error. One PING within what is left of the connect
/// deadline makes "connected" mean "answered" (the client's CLIENT SETINFO calls, which doubled
/// that wait, are skipped: see `node_settings`).
///
/// A server at `maxclients` accepts the connection, writes `-ERR max number of clients
/// reached` and closes it, without reading anything: that error is the PING's "answer", and
/// the first real command used to fail with "connection reset by peer". So after an error
/// answer a second PING tells a server that refused us and hung up (reported as the I/O error
/// it is, with the server's words) from one that answered and stays (LOADING, a PING refused
/// by ACL), without reading the server's message text.
///
/// # Errors
/// An I/O error or timeout, or a refused authentication (NOAUTH), or an error answer after
/// which the server closed the connection (`maxclients` reached, protected mode). Other
/// answers mean the server is there: commands handle those states.
fn answered(mut conn: Connection, deadline: Instant) -> Result<Connection, RedisError> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(50));
    conn.set_read_timeout(Some(left))?;
    conn.set_write_timeout(Some(left))?;
    if let Err(e) = redis::cmd("PING").query::<()>(&mut conn) {
        if crate::error::is_connection_error(&e)
            || ConnectFailure::of(&e) == ConnectFailure::Authentication
        {
            return Err(e);
        }
        match redis::cmd("PING").query::<()>(&mut conn) {
            Err(closed) if crate::error::is_connection_error(&closed) => {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!("the server answered \"{e}\" and closed the connection ({closed})"),
                )));
            }
            _ => log::debug!("PING on a new redis connection answered: {e}"),
        }
    }
    Ok(conn)
}

/// Logs pool-level connection failures at debug level: the operation that waited for the
/// connection reports the failure itself, once, with context.
#[derive(Debug)]
pub(crate) struct QuietErrors;

impl r2d2::HandleError<RedisError> for QuietErrors {
    fn handle_error(&self, error: RedisError) {
        log::debug!("redis pool could not open a connection: {error}");
    }
}

/// The pool plus the health-check interval.
pub(crate) struct RedisPool {
    pool: ProbingPool<Manager>,
    health_check_interval: Duration,
}

impl RedisPool {
    /// A pool for `config`. Opens no connection yet (`build_unchecked`), so a store can be
    /// created while the server is down; the first operation reports the failure.
    pub(crate) fn new(config: &RedisConfig) -> Result<RedisPool, RedisError> {
        let server;
        let connector = if config.sentinel_urls.is_empty() {
            let url = config
                .urls()
                .first()
                .copied()
                .unwrap_or(config.url.as_str());
            server = redact_url(url);
            let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
            let settings = node_settings(info.redis_settings().clone(), config);
            info = info.set_redis_settings(settings);
            Connector::Direct(tls_client(info, config)?)
        } else {
            if config.sentinel_urls.iter().any(|u| {
                u.trim_start()
                    .get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
            }) {
                ensure_crypto_provider();
            }
            server = format!(
                "the master {:?} named by Sentinel {}",
                config.sentinel_master.as_deref().unwrap_or("mymaster"),
                redact_url(&config.sentinel_urls.join(","))
            );
            // Credentials apply to the data nodes; the sentinels' own come from their URLs.
            let node =
                redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(
                    node_settings(redis::RedisConnectionInfo::default(), config),
                );
            let client = redis::sentinel::SentinelClient::build(
                config.sentinel_urls.iter().map(String::as_str).collect(),
                config
                    .sentinel_master
                    .clone()
                    .unwrap_or_else(|| "mymaster".to_string()),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )?;
            Connector::Sentinel(redis::sentinel::LockedSentinelClient::new(client))
        };
        let manager = Manager {
            connector,
            connection_timeout: config.connection_timeout,
            socket_timeout: config.socket_timeout,
        };
        let builder = r2d2::Pool::builder()
            .max_size(config.max_connections)
            // Connections are opened on demand: a batch indexer with 4 threads should not hold
            // 50 sockets, and opening must not block on an unreachable server.
            .min_idle(Some(0))
            .test_on_check_out(false)
            .connection_timeout(config.pool_timeout)
            .idle_timeout(Some(Duration::from_secs(300)))
            .max_lifetime(None)
            .error_handler(Box::new(QuietErrors));
        Ok(RedisPool {
            pool: ProbingPool::new(builder, manager, config.pool_timeout, server),
            health_check_interval: config.health_check_interval,
        })
    }

    /// A healthy connection: one used within the health-check interval, or one that just
    /// answered PING.
    ///
    /// # Errors
    /// A new connection's error at once, or the pool's message when every connection stayed
    /// busy for the pool timeout (see [`ProbingPool::checkout`]).
    pub(crate) fn get(&self) -> Result<r2d2::PooledConnection<Probing<Manager>>, NoConnection> {
        // Bounded: each failed PING discards one stale connection; after a few the server is
        // evidently gone and the caller's retry policy takes over.
        for _ in 0..3 {
            let mut c = self.pool.checkout()?;
            if c.last_used.elapsed() <= self.health_check_interval {
                return Ok(c);
            }
            match redis::cmd("PING").query::<()>(&mut c.conn) {
                Ok(()) => {
                    c.last_used = Instant::now();
                    return Ok(c);
                }
                Err(e) => {
                    log::debug!("discarding an idle redis connection that failed PING: {e}");
                    c.mark_broken();
                }
            }
        }
        Err(NoConnection::Pool(
            "every pooled connection failed its health check".into(),
        ))
    }

    /// Open and idle connection counts.
    pub(crate) fn state(&self) -> (u32, u32) {
        self.pool.state()
    }
}

/// Stamps the connection as used; called after a successful command.
pub(crate) fn touch(c: &mut PooledConn) {
    c.last_used = Instant::now();
}

impl ConnectionLike for PooledConn {
    fn req_packed_command(&mut self, cmd: &[u8]) -> redis::RedisResult<redis::Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands(
        &mut self,
        cmd: &[u8],
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<redis::Value>> {
        self.conn.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }

    fn check_connection(&mut self) -> bool {
        self.conn.check_connection()
    }

    fn is_open(&self) -> bool {
        self.conn.is_open()
    }
}

/// A client for `info`: with the configured CA and client identity when TLS files are set,
/// with the system's trust store for a plain `rediss://` URL, without TLS for `redis://`.
///
/// # Errors
/// A TLS file that cannot be read or parsed (normally caught earlier, by
/// [`crate::StoreConfigBuilder::build`]); a client certificate with a non-TLS URL.
pub(crate) fn tls_client(info: ConnectionInfo, config: &RedisConfig) -> redis::RedisResult<Client> {
    if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        ensure_crypto_provider();
    }
    match config.tls_certificates().map_err(tls_config_error)? {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
}

/// A configuration error about TLS files, as the `RedisError` the pool constructors return. The
/// text names the variable and the file (never their contents).
pub(crate) fn tls_config_error(e: crate::Error) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "TLS configuration",
        e.to_string(),
    ))
}

/// Installs rustls's `ring` provider as the process default, once, unless the application has
/// installed one already.
///
/// redis 1.8 builds each TLS connection's config with `rustls::ClientConfig::builder()`, which
/// uses the process-default provider and panics when there is none and rustls's crate features
/// do not name exactly one (as soon as anything else in the application enables `aws-lc-rs`
/// too). Called only when a `rediss://` connection is configured, so an application that never
/// uses TLS keeps its freedom to pick its own provider later.
pub(crate) fn ensure_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing a race with another thread installing one is fine: that one is used.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// Direct clients of a cluster's seed nodes, to learn why the cluster client could not connect.
///
/// redis-rs's cluster client reports a failure to reach its seeds as one generic I/O error
/// whose text holds the nodes' errors: a wrong password or an untrusted certificate would look
/// like an outage (retried, and journaled by the fallback forever). A direct connection to the
/// seeds gives the typed error back.
pub(crate) struct Seeds {
    clients: Vec<Client>,
    connection_timeout: Duration,
}

impl std::fmt::Debug for Seeds {
    // Clients hold the password: only their number is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Seeds({})", self.clients.len())
    }
}

impl Seeds {
    /// Clients of `config`'s URLs with its credentials and TLS files.
    ///
    /// # Errors
    /// A URL or TLS file that cannot be used (normally caught by the configuration's build).
    pub(crate) fn new(config: &RedisConfig) -> redis::RedisResult<Seeds> {
        let clients = config
            .urls()
            .into_iter()
            .map(|url| {
                let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
                let settings = node_settings(info.redis_settings().clone(), config);
                info = info.set_redis_settings(settings);
                tls_client(info, config)
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        Ok(Seeds {
            clients,
            connection_timeout: config.connection_timeout,
        })
    }

    /// The error to report for the cluster client's `error`: the typed error of a direct
    /// connection to a seed when that one cannot heal (authentication, TLS), or the last seed's
    /// when none answers (refused, timed out); `error` itself when a seed answers or time runs
    /// out first. Spends at most one connection timeout in all.
    pub(crate) fn explain(&self, error: RedisError) -> RedisError {
        let deadline = Instant::now() + self.connection_timeout;
        let mut last = None;
        for client in &self.clients {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return error;
            };
            if left.is_zero() {
                return error;
            }
            match client
                .get_connection_with_timeout(left)
                .and_then(|c| answered(c, deadline))
            {
                Ok(_) => return error,
                Err(e) if !ConnectFailure::of(&e).may_heal() => return e,
                Err(e) => last = Some(e),
            }
        }
        last.unwrap_or(error)
    }
}

/// Applies `REDIS_USERNAME` / `REDIS_PASSWORD`, which override credentials in the URL, and
/// skips the client's `CLIENT SETINFO` calls on connect.
///
/// redis-rs sends two `CLIENT SETINFO` (library name and version, informational only) with the
/// connection's setup and reads every reply with the connect timeout: a server that accepts
/// connections and never answers took twice `REDIS_CONNECTION_TIMEOUT` to be reported.
fn node_settings(
    settings: redis::RedisConnectionInfo,
    config: &RedisConfig,
) -> redis::RedisConnectionInfo {
    with_credentials(settings, config).set_skip_set_lib_name()
}

/// Applies `REDIS_USERNAME` / `REDIS_PASSWORD`, which override credentials in the URL.
fn with_credentials(
    mut settings: redis::RedisConnectionInfo,
    config: &RedisConfig,
) -> redis::RedisConnectionInfo {
    if let Some(u) = &config.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &config.password {
        settings = settings.set_password(p);
    }
    settings
}
