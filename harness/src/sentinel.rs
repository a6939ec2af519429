//! `RedisSentinelSet`: a real Sentinel deployment on local processes: one master, one replica
//! (`--replicaof`) and three sentinels (`redis-server sentinel.conf --sentinel`, quorum 2)
//! monitoring the master as `mymaster`.
//!
//! ```ignore
//! let mut set = RedisSentinelSet::start();
//! let old = set.master_port();
//! set.kill_master();
//! set.wait_for_failover(old);
//! assert_ne!(set.master_port(), old);
//! ```

use std::fs::OpenOptions;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{free_port, is_address_in_use, redis_server_bin, RedisServer, REDIS_SERVER_BIN_ENV};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "mymaster";

/// How long `start` waits for the set to settle, and `wait_for_failover` for a promotion.
const SET_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a sentinel gets to answer PING after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(50);

/// Arguments of the data nodes (master and replica).
const DATA_NODE_ARGS: &[&str] = &[
    "--appendonly",
    "no",
    "--save",
    "",
    // The replica syncs at once instead of waiting 5 s for other replicas.
    "--repl-diskless-sync-delay",
    "0",
];

/// One sentinel process with its own directory (its config file is rewritten by sentinel).
pub struct Sentinel {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Sentinel {
    /// Starts a sentinel monitoring 127.0.0.1:`master_port`; retries on another port when
    /// the chosen one is taken; panics with the log otherwise.
    fn start(master_port: u16) -> Sentinel {
        let dir = tempfile::Builder::new()
            .prefix("graphrag-kv-sentinel-")
            .tempdir()
            .expect("creating a temporary directory for a sentinel");
        let mut sentinel = Sentinel {
            port: 0,
            dir,
            child: None,
        };
        let mut last_failure = String::new();
        for _attempt in 0..8 {
            sentinel.port = free_port();
            match sentinel.spawn_and_wait(master_port) {
                Ok(()) => return sentinel,
                Err(log) if is_address_in_use(&log) => {
                    last_failure = format!("port {} was taken", sentinel.port);
                }
                Err(log) => panic!(
                    "sentinel failed to start on port {}: {log}\n--- sentinel log ---\n{}",
                    sentinel.port,
                    sentinel.log()
                ),
            }
        }
        panic!(
            "sentinel could not bind a free port: {last_failure}\n--- sentinel log ---\n{}",
            sentinel.log()
        );
    }

    /// Writes a fresh config for the current port, spawns, waits for PONG. `Err(log)` when
    /// the process exits or does not answer.
    fn spawn_and_wait(&mut self, master_port: u16) -> Result<(), String> {
        let conf = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             daemonize no\n\
             dir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = self.port,
            dir = self.dir.path().display(),
        );
        std::fs::write(self.conf_path(), conf).expect("writing sentinel.conf");
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the sentinel log file");
        let log_err = log.try_clone().expect("cloning the log file handle");
        let bin = redis_server_bin();
        let child = Command::new(&bin)
            .arg(self.conf_path())
            .arg("--sentinel")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin:?} --sentinel (install redis-server, or set \
                     {REDIS_SERVER_BIN_ENV}): {e}"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                thread::sleep(Duration::from_millis(20));
                self.child = None;
                let log = std::fs::read(self.log_path()).unwrap_or_default();
                let start = usize::try_from(log_start).unwrap_or(0).min(log.len());
                return Err(String::from_utf8_lossy(&log[start..]).into_owned());
            }
            if let Ok(mut conn) = self.quick_conn() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("no answer to PING within {READY_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conf_path(&self) -> std::path::PathBuf {
        self.dir.path().join("sentinel.conf")
    }

    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("sentinel.log")
    }

    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path().display()))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A connection to the sentinel that fails fast.
    pub fn quick_conn(&self) -> redis::RedisResult<redis::Connection> {
        let conn = redis::Client::open(self.url())?
            .get_connection_with_timeout(Duration::from_millis(500))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(conn)
    }

    /// `SENTINEL get-master-addr-by-name mymaster` → the master's port.
    pub fn master_port(&self) -> redis::RedisResult<u16> {
        let mut conn = self.quick_conn()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query(&mut conn)?;
        addr.get(1).and_then(|p| p.parse().ok()).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "unexpected get-master-addr-by-name reply",
                format!("{addr:?}"),
            ))
        })
    }

    /// A `SENTINEL <what> mymaster` listing (`replicas`, `sentinels`), each entry as pairs.
    pub fn list(&self, what: &str) -> redis::RedisResult<Vec<Vec<(String, String)>>> {
        let mut conn = self.quick_conn()?;
        let raw: Vec<Vec<String>> = redis::cmd("SENTINEL")
            .arg(what)
            .arg(MASTER_NAME)
            .query(&mut conn)?;
        Ok(raw
            .into_iter()
            .map(|flat| {
                flat.chunks(2)
                    .filter(|c| c.len() == 2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect()
            })
            .collect())
    }

    /// SIGKILLs the sentinel.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field<'a>(entry: &'a [(String, String)], name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// One master, one replica (or more: `start_with_replicas`) and three sentinels. Dropping it
/// kills every process.
pub struct RedisSentinelSet {
    /// The data nodes: the initial master first, then the replicas.
    servers: Vec<RedisServer>,
    sentinels: Vec<Sentinel>,
}

impl RedisSentinelSet {
    /// Starts the set and waits (~30 s at most) until the replica is in sync and every
    /// sentinel knows the replica and the two other sentinels; panics with diagnostics
    /// otherwise.
    pub fn start() -> RedisSentinelSet {
        RedisSentinelSet::start_with_replicas(1)
    }

    /// Like `start`, with `replicas` replicas (at least 1). With 2 or more, the promoted
    /// replica still has replicas after a failover (the sentinels repoint the others to it).
    pub fn start_with_replicas(replicas: usize) -> RedisSentinelSet {
        assert!(
            replicas >= 1,
            "a sentinel set needs a replica to fail over to"
        );
        let master = RedisServer::start_with(DATA_NODE_ARGS);
        let master_port = master.port().to_string();
        let mut replica_args = DATA_NODE_ARGS.to_vec();
        replica_args.extend(["--replicaof", "127.0.0.1", master_port.as_str()]);
        let mut servers = vec![master];
        servers.extend((0..replicas).map(|_| RedisServer::start_with(&replica_args)));
        let mut set = RedisSentinelSet {
            servers,
            sentinels: Vec::new(),
        };
        // The replica must be listed by the master before the sentinels start: a sentinel
        // learns replicas from the master's INFO, which it reads at once and then every 10 s.
        set.wait_until("the replica to sync", |s| s.check_replication());
        let master_port = set.servers[0].port();
        set.sentinels = (0..3).map(|_| Sentinel::start(master_port)).collect();
        set.wait_until("the sentinels to discover each other", |s| {
            s.check_sentinels(true)
        });
        set
    }

    /// The monitored master's name, `mymaster`.
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The sentinels' URLs (`redis://127.0.0.1:PORT`).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::url).collect()
    }

    /// The sentinels' URLs comma-separated.
    pub fn sentinel_url_list(&self) -> String {
        self.sentinel_urls().join(",")
    }

    /// The sentinel guards.
    pub fn sentinels(&self) -> &[Sentinel] {
        &self.sentinels
    }

    /// The sentinel guards, mutable (e.g. to kill one).
    pub fn sentinels_mut(&mut self) -> &mut [Sentinel] {
        &mut self.sentinels
    }

    /// The data nodes: the initial master, then the initial replicas (killed ones included).
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// The data node on `port`; panics when there is none.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers
            .iter()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// The master's port according to the first sentinel that answers
    /// (`SENTINEL get-master-addr-by-name mymaster`).
    pub fn master_port(&self) -> u16 {
        let mut errors = Vec::new();
        for s in self.sentinels.iter().filter(|s| s.is_running()) {
            match s.master_port() {
                Ok(port) => return port,
                Err(e) => errors.push(format!(":{} {e}", s.port())),
            }
        }
        panic!(
            "no sentinel answers get-master-addr-by-name: {errors:?}\n{}",
            self.diagnostics()
        )
    }

    /// The current master's URL.
    pub fn master_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.master_port())
    }

    /// SIGKILLs the current master (as the sentinels name it); returns its port.
    pub fn kill_master(&mut self) -> u16 {
        let port = self.master_port();
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("the sentinels name :{port}, which is not in the set"))
            .kill();
        port
    }

    /// Waits (~30 s at most) until every live sentinel names the same master, other than
    /// `old_port`, that node reports `role:master`, and every other live data node replicates
    /// it in sync. Panics with diagnostics otherwise.
    ///
    /// With one replica the new master has no replica left (WAIT 1 on it times out) until
    /// `restart_as_replica(old_port)`; `start_with_replicas(2)` keeps one through a failover.
    pub fn wait_for_failover(&self, old_port: u16) {
        self.wait_until("the failover", |s| s.check_failed_over(old_port));
    }

    /// Restarts the data node on `port` after it was killed (same port and directory) as a
    /// replica of the current master (`REPLICAOF`), and waits (~30 s at most) until it is in
    /// sync and every sentinel lists it as a healthy replica. After a failover this gives
    /// the promoted master a replica again (e.g. for WAIT).
    pub fn restart_as_replica(&mut self, port: u16) {
        let master = self.master_port();
        assert_ne!(
            port, master,
            "restart_as_replica: :{port} is the current master"
        );
        let server = self
            .servers
            .iter_mut()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"));
        server.restart();
        let mut conn = server.conn();
        redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master)
            .query::<()>(&mut conn)
            .unwrap_or_else(|e| panic!("REPLICAOF on :{port}: {e}"));
        self.wait_until("the restarted node to rejoin as a replica", |s| {
            s.check_replicas_of(master)?;
            s.check_sentinels(false)
        });
    }

    /// Every sentinel's view of the master, replicas and sentinels, INFO replication of the
    /// data nodes and all log tails.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for s in &self.sentinels {
            out.push_str(&format!("=== sentinel :{}\n", s.port()));
            if s.is_running() {
                out.push_str(&format!("master: {:?}\n", s.master_port()));
                for what in ["replicas", "sentinels"] {
                    match s.list(what) {
                        Ok(list) => {
                            for e in list {
                                out.push_str(&format!(
                                    "{what}: {}:{} flags={}\n",
                                    field(&e, "ip").unwrap_or("?"),
                                    field(&e, "port").unwrap_or("?"),
                                    field(&e, "flags").unwrap_or("?")
                                ));
                            }
                        }
                        Err(e) => out.push_str(&format!("{what}: error {e}\n")),
                    }
                }
            } else {
                out.push_str("(killed)\n");
            }
            out.push_str(&format!("--- log tail\n{}\n", tail(&s.log(), 30)));
        }
        for server in &self.servers {
            out.push_str(&format!("=== data node :{}\n", server.port()));
            if server.pid().is_some() {
                match info_replication(server) {
                    Ok(info) => out.push_str(&format!("{}\n", info.trim_end())),
                    Err(e) => out.push_str(&format!("INFO replication failed: {e}\n")),
                }
            } else {
                out.push_str("(killed)\n");
            }
            out.push_str(&format!("--- log tail\n{}\n", server.log_tail(30)));
        }
        out
    }

    // ---------------------------------------------------------------------------------------

    fn wait_until(&self, what: &str, check: impl Fn(&Self) -> Result<(), String>) {
        let deadline = Instant::now() + SET_TIMEOUT;
        loop {
            let last = match check(self) {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                panic!(
                    "RedisSentinelSet: timed out after {SET_TIMEOUT:?} waiting for {what}: \
                     {last}\n{}",
                    self.diagnostics()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `Ok` when every live data node but the one on `master_port` replicates it in sync,
    /// and the master lists them all as online.
    fn check_replicas_of(&self, master_port: u16) -> Result<(), String> {
        let mut expected = 0;
        for replica in self.servers.iter().filter(|s| s.pid().is_some()) {
            if replica.port() == master_port {
                continue;
            }
            expected += 1;
            let port = replica.port();
            let info = info_replication(replica).map_err(|e| format!(":{port} {e}"))?;
            let master = crate::cluster::info_field(&info, "master_port");
            if master != Some(master_port.to_string().as_str()) {
                return Err(format!(":{port} replicates {master:?}, not :{master_port}"));
            }
            if crate::cluster::info_field(&info, "master_link_status") != Some("up") {
                return Err(format!(":{port} master_link_status not up"));
            }
        }
        let info = info_replication(self.server(master_port))
            .map_err(|e| format!(":{master_port} {e}"))?;
        let online = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online < expected {
            return Err(format!(
                ":{master_port} lists {online} of {expected} replicas online"
            ));
        }
        Ok(())
    }

    fn check_replication(&self) -> Result<(), String> {
        self.check_replicas_of(self.servers[0].port())
    }

    /// `Ok` when every live sentinel knows each live replica of the current master (flags
    /// `slave`; with `link_ok`, also `master-link-status` ok, which a sentinel only refreshes
    /// from the replica's INFO every 10 s) and the other sentinels.
    fn check_sentinels(&self, link_ok: bool) -> Result<(), String> {
        let master = self
            .sentinels
            .iter()
            .find(|s| s.is_running())
            .ok_or("no sentinel is running")?
            .master_port()
            .map_err(|e| e.to_string())?;
        let replica_ports: Vec<String> = self
            .servers
            .iter()
            .filter(|s| s.pid().is_some() && s.port() != master)
            .map(|s| s.port().to_string())
            .collect();
        for s in self.sentinels.iter().filter(|s| s.is_running()) {
            let replicas = s
                .list("replicas")
                .map_err(|e| format!(":{} {e}", s.port()))?;
            let known = replica_ports.iter().all(|port| {
                replicas.iter().any(|r| {
                    field(r, "port") == Some(port.as_str())
                        && field(r, "flags") == Some("slave")
                        && (!link_ok || field(r, "master-link-status") == Some("ok"))
                })
            });
            if !known {
                return Err(format!(
                    "sentinel :{} does not know every replica yet ({replicas:?})",
                    s.port()
                ));
            }
            let others = s
                .list("sentinels")
                .map_err(|e| format!(":{} {e}", s.port()))?
                .len();
            if others + 1 < self.sentinels.len() {
                return Err(format!(
                    "sentinel :{} knows {others} other sentinels",
                    s.port()
                ));
            }
        }
        Ok(())
    }

    fn check_failed_over(&self, old_port: u16) -> Result<(), String> {
        let mut named = None;
        for s in self.sentinels.iter().filter(|s| s.is_running()) {
            let port = s.master_port().map_err(|e| format!(":{} {e}", s.port()))?;
            if port == old_port {
                return Err(format!("sentinel :{} still names :{old_port}", s.port()));
            }
            match named {
                None => named = Some(port),
                Some(p) if p != port => {
                    return Err(format!("sentinels name both :{p} and :{port}"));
                }
                Some(_) => {}
            }
        }
        let port = named.ok_or("no sentinel is running")?;
        let server = self
            .servers
            .iter()
            .find(|s| s.port() == port)
            .ok_or_else(|| format!("the sentinels name :{port}, not in the set"))?;
        let info = info_replication(server).map_err(|e| format!(":{port} {e}"))?;
        if crate::cluster::info_field(&info, "role") != Some("master") {
            return Err(format!(":{port} does not report role:master yet"));
        }
        // The other replicas were repointed to the new master and are in sync.
        self.check_replicas_of(port)
    }
}

impl Drop for RedisSentinelSet {
    fn drop(&mut self) {
        for s in &mut self.sentinels {
            s.kill();
        }
        for server in &mut self.servers {
            server.kill();
        }
    }
}

fn info_replication(server: &RedisServer) -> redis::RedisResult<String> {
    let conn = server
        .client()
        .get_connection_with_timeout(Duration::from_millis(500))?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut conn = conn;
    redis::cmd("INFO").arg("replication").query(&mut conn)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
