//! `docker/redis.conf` keeps its promises: no Docker engine runs here, so the test starts a real
//! `redis-server` with that file (as the compose files do, password on the command line) and
//! checks with CONFIG GET the settings the deployment guide relies on, then that graphrag-kv's
//! `index_done_callback` succeeds against it and the data comes back after a crash (SIGKILL,
//! restart, AOF replay).
//!
//! A killed process does not lose what it wrote to the OS page cache, so the crash test proves
//! the AOF is on and replayed, not the fsync itself (that would take a power cut); the fsync
//! policy is checked by CONFIG GET, and the callback's wait for it by the checkpoint tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use graphrag_kv::{BackendKind, Storage, StoreConfig, NAMESPACES};
use serde_json::json;

const PASSWORD: &str = "compose-secret";

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

/// redis-server started as the compose file starts it: `redis-server redis.conf --requirepass`,
/// plus what a container provides by itself (its own port, data directory, loopback only).
struct ConfServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl ConfServer {
    fn start() -> ConfServer {
        let mut s = ConfServer {
            child: None,
            port: support::free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .unwrap();
        let child = Command::new(support::redis_server_bin())
            .arg(docker_dir().join("redis.conf"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--requirepass", PASSWORD])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting redis-server (apt-get install redis-server)");
        self.child = Some(child);
        self.wait_ready();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}", self.port))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    }

    /// Waits until the server answers PING (not LOADING while it replays the AOF).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("redis-server exited ({status}):\n{}", self.log());
            }
            let ping = redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{}", self.port))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(300)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not ready: {ping:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A crash: SIGKILL, nothing flushed by the server on the way out.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn config_get(&self, name: &str) -> String {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query(&mut self.conn())
            .unwrap();
        assert_eq!(pair.len(), 2, "CONFIG GET {name}: {pair:?}");
        pair[1].clone()
    }
}

impl Drop for ConfServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn redis_conf_sets_what_the_deployment_guide_promises() {
    let server = ConfServer::start();
    // Durability: AOF on, fsynced every second.
    assert_eq!(server.config_get("appendonly"), "yes");
    assert_eq!(server.config_get("appendfsync"), "everysec");
    // Memory: a limit, and eviction only of keys with a TTL (the LLM cache), never of
    // documents, chunks or reports.
    assert_eq!(server.config_get("maxmemory-policy"), "volatile-lru");
    let maxmemory: u64 = server.config_get("maxmemory").parse().unwrap();
    assert_eq!(maxmemory, 2 * 1024 * 1024 * 1024, "maxmemory 2gb");
    // RDB snapshots as well, for backups.
    assert_eq!(server.config_get("save"), "900 1 300 100 60 10000");
    assert_eq!(server.config_get("tcp-keepalive"), "60");
    assert_eq!(server.config_get("protected-mode"), "yes");
    // The password given on the command line is required.
    let anonymous = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    let e = anonymous.expect_err("PING without the password must be refused");
    assert_eq!(e.code(), Some("NOAUTH"), "{e:?}");
}

#[test]
fn index_done_callback_makes_writes_survive_a_crash() {
    let mut server = ConfServer::start();
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .password(PASSWORD)
        .key_prefix(support::unique_prefix("docker"))
        .build()
        .unwrap();
    let storage = Storage::open(&config).unwrap();
    for ns in NAMESPACES {
        let store = storage.namespace(ns).unwrap();
        store
            .upsert(
                (0..50)
                    .map(|i| {
                        (
                            format!("{ns}-{i}"),
                            json!({"content": format!("Grüße {i}")}),
                        )
                    })
                    .collect(),
            )
            .unwrap();
    }
    storage
        .namespace(NAMESPACES[0])
        .unwrap()
        .index_done_callback()
        .unwrap();
    drop(storage);

    server.kill();
    server.spawn();

    let storage = Storage::open(&config).unwrap();
    for ns in NAMESPACES {
        let store = storage.namespace(ns).unwrap();
        assert_eq!(store.all_keys().unwrap().len(), 50, "{ns} after the crash");
        assert_eq!(
            store.get_by_id(&format!("{ns}-7")).unwrap(),
            Some(json!({"content": "Grüße 7"}))
        );
    }
    // The LLM cache kept its TTL through the AOF; the index data has none.
    let ttl: i64 = redis::cmd("TTL")
        .arg(
            storage
                .redis()
                .unwrap()
                .namespace("llm_response_cache")
                .unwrap()
                .key("llm_response_cache-1"),
        )
        .query(&mut server.conn())
        .unwrap();
    assert!(ttl > 0, "llm_response_cache TTL {ttl}");
    let ttl: i64 = redis::cmd("TTL")
        .arg(
            storage
                .redis()
                .unwrap()
                .namespace("full_docs")
                .unwrap()
                .key("full_docs-1"),
        )
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(
        ttl, -1,
        "documents never expire, so volatile-lru never evicts them"
    );
}

#[test]
fn compose_files_use_the_conf_a_password_from_the_environment_and_a_healthcheck() {
    let read = |name: &str| std::fs::read_to_string(docker_dir().join(name)).unwrap();
    let compose = read("docker-compose.yml");
    for needle in [
        "image: redis:7",
        "redis.conf:/usr/local/etc/redis/redis.conf",
        "--requirepass",
        "${REDIS_PASSWORD",
        "healthcheck:",
        "condition: service_healthy",
        "STORAGE_KV_BACKEND: redis",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml lacks {needle:?}"
        );
    }
    let cluster = read("docker-compose.cluster.yml");
    for needle in [
        "redis.conf:/usr/local/etc/redis/redis.conf",
        "--cluster-enabled yes",
        "healthcheck:",
    ] {
        assert!(
            cluster.contains(needle),
            "docker-compose.cluster.yml lacks {needle:?}"
        );
    }
    // No password is committed in the conf.
    let conf = read("redis.conf");
    assert!(
        !conf
            .lines()
            .any(|l| l.trim_start().starts_with("requirepass")),
        "redis.conf must not hold a password"
    );
}
