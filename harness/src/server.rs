//! [`RedisServer`]: one `redis-server` or `valkey-server` process and its directory.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::monitor::Monitor;
use crate::{
    free_port, is_address_in_use, percent_encode, resp_array, valkey_howto, ServerKind, LOG_FILE,
    READY_TIMEOUT, REDIS_SERVER_BIN_ENV,
};

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
    /// The program could not be run (not installed, not executable): what to do about it.
    Spawn(String),
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
    /// (see [`RedisServer::start_with_port_filter`]). Every panicking constructor ends here.
    pub fn start_kind_with_port_filter(
        kind: ServerKind,
        extra_args: &[&str],
        accept: impl Fn(u16) -> bool,
    ) -> RedisServer {
        RedisServer::try_start_kind_with_port_filter(kind, extra_args, accept)
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Like [`RedisServer::start_with`], but returns why the server did not start (not
    /// installed, exited, no answer; with its log) instead of panicking: for a program such as
    /// the load tool, which reports it and exits.
    pub fn try_start_with(extra_args: &[&str]) -> Result<RedisServer, String> {
        RedisServer::try_start_kind_with_port_filter(ServerKind::Redis, extra_args, |_| true)
    }

    /// The constructor every other one ends in: `Err` with the whole story when the server
    /// does not start. (A missing `valkey-server` still panics, in [`ServerKind::bin`].)
    pub fn try_start_kind_with_port_filter(
        kind: ServerKind,
        extra_args: &[&str],
        accept: impl Fn(u16) -> bool,
    ) -> Result<RedisServer, String> {
        let bin = kind.bin();
        let dir = tempfile::Builder::new()
            .prefix("graphrag-kv-redis-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory for {}: {e}", kind.name()))?;
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
                Ok(()) => return Ok(server),
                Err(NotReady::Exited(status, log)) if is_address_in_use(&log) => {
                    last_failure = format!("port {} was taken ({status})", server.port);
                }
                Err(failure) => return Err(server.failure("start", failure)),
            }
        }
        Err(format!(
            "{} could not bind a free port after several attempts: {last_failure}\n\
             --- server log ({}) ---\n{}",
            kind.name(),
            server.log_path().display(),
            server.log()
        ))
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
        Monitor::new(reader)
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
                return Err(NotReady::Spawn(format!(
                    "valkey-server not found (tried {bin:?}: {e}); {}",
                    valkey_howto()
                )));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(NotReady::Spawn(format!(
                    "redis-server not found: install redis-server (apt-get install redis-server \
                     redis-tools), or set {REDIS_SERVER_BIN_ENV} to its path (tried {bin:?}: {e})"
                )));
            }
            Err(e) => {
                return Err(NotReady::Spawn(format!(
                    "cannot run {} ({bin:?}): {e}",
                    self.kind.name()
                )));
            }
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
        let why = self.failure(what, failure);
        panic!("{why}");
    }

    /// Kills the server and says why `what` (start, restart) failed, with its log.
    fn failure(&mut self, what: &str, failure: NotReady) -> String {
        self.kill();
        let why = match failure {
            // The program could not be run at all: there is no log to show.
            NotReady::Spawn(why) => return why,
            NotReady::Exited(status, _) => format!("the server exited ({status})"),
            NotReady::Timeout(why) => why,
        };
        format!(
            "{} {what} failed on port {}: {why}\nbinary: {}\nextra args: {:?}\n\
             --- server log ({}) ---\n{}",
            self.kind.name(),
            self.port,
            self.bin,
            self.extra_args,
            self.log_path().display(),
            self.log()
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
