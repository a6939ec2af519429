//! The server under test as redis-benchmark sees it, and the redis-benchmark runs (the
//! reference figures).

use std::process::{Command, Stdio};

use crate::fail;

/// Host, port and password of a `redis://[user:pass@]host:port[/db]` URL, for redis-benchmark.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub password: Option<String>,
    pub no_reference: bool,
}

impl Target {
    pub fn parse(url: &str) -> Target {
        let rest = url
            .strip_prefix("redis://")
            .unwrap_or_else(|| fail("--redis-url must be a redis:// URL"));
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let hostport = hostport.split('/').next().unwrap_or("");
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(6379)),
            None => (hostport.to_string(), 6379),
        };
        let password = auth
            .map(|a| a.rsplit_once(':').map_or(a, |(_, p)| p).to_string())
            .filter(|p| !p.is_empty());
        Target {
            url: url.to_string(),
            host: if host.is_empty() {
                "127.0.0.1".into()
            } else {
                host
            },
            port,
            password,
            no_reference: false,
        }
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| fail(&format!("cannot connect to {}: {e}", self.host)))
    }
}

// ---------------------------------------------------------------------------------------------
// redis-benchmark

/// One redis-benchmark run's figures.
#[derive(Clone, Copy, Debug)]
pub struct Bench {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Runs redis-benchmark and parses its `--csv` line. `n` requests.
pub fn redis_benchmark(
    t: &Target,
    clients: usize,
    pipeline: usize,
    n: u64,
    rest: &[String],
) -> Bench {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", &t.host, "-p", &t.port.to_string()]);
    if let Some(p) = &t.password {
        cmd.args(["-a", p]);
    }
    cmd.args(["--csv", "-q"]);
    cmd.args(["-c", &clients.to_string(), "-P", &pipeline.to_string()]);
    cmd.args(["-n", &n.to_string()]);
    cmd.args(rest);
    let out = cmd.stderr(Stdio::null()).output().unwrap_or_else(|e| {
        fail(&format!(
            "cannot run redis-benchmark ({e}): install redis-tools"
        ))
    });
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let line = text
        .lines()
        .filter(|l| !l.starts_with("\"test\""))
        .find(|l| l.starts_with('"'))
        .unwrap_or_else(|| fail(&format!("redis-benchmark printed no CSV line: {text}")));
    let fields: Vec<f64> = line
        .rsplit("\",\"")
        .take(7)
        .map(|f| f.trim_matches('"').parse::<f64>().unwrap_or(f64::NAN))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    // fields: rps, avg, min, p50, p95, p99, max
    Bench {
        rps: fields[0],
        p50_us: fields[3] * 1000.0,
        p99_us: fields[5] * 1000.0,
    }
}

/// A redis-benchmark invocation whose `-n` is sized from the previous run to take `seconds`.
pub struct RefRun {
    pub clients: usize,
    pub pipeline: usize,
    pub rest: Vec<String>,
    pub rate_guess: f64,
}

impl RefRun {
    pub fn run(&mut self, t: &Target, seconds: f64) -> Bench {
        if t.no_reference {
            return Bench {
                rps: f64::NAN,
                p50_us: f64::NAN,
                p99_us: f64::NAN,
            };
        }
        loop {
            let n = ((self.rate_guess * seconds) as u64).max(1_000);
            let b = redis_benchmark(t, self.clients, self.pipeline, n, &self.rest);
            let took = n as f64 / b.rps;
            self.rate_guess = b.rps;
            // A run far shorter than asked (the guess was low) is repeated at the right size.
            if took >= seconds * 0.4 || !b.rps.is_finite() {
                return b;
            }
        }
    }
}
