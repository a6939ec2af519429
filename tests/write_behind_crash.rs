//! Write-behind in a process that dies or runs out of room: child processes (this test binary
//! re-invoked on one of its ignored helper tests) write through a queue, and the parent checks
//! what a SIGKILL leaves in Redis and how much memory an outage costs.
//!
//! The helpers `kill_child_writer` and `rss_child_writer` are `#[ignore]`d and panic when run
//! without the variables their parent sets, so they never report "ok" on their own.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use graphrag_kv::write_behind::{WriteBehind, WriteBehindConfig};
use graphrag_kv::{BackendKind, KvStore, RedisShared, StoreConfig};
use serde_json::{json, Value};
use support::RedisServer;

fn redis_shared(url: &str, unchecked: bool) -> Arc<RedisShared> {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(url.to_string())
        .key_prefix("crash")
        .connection_timeout(Duration::from_millis(200))
        .socket_timeout(Duration::from_secs(5))
        .pool_timeout(Duration::from_millis(400))
        .retries(0)
        .max_connections(8)
        .build()
        .unwrap();
    if unchecked {
        RedisShared::new_unchecked(&config.redis).unwrap()
    } else {
        RedisShared::connect(&config.redis).unwrap()
    }
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this helper runs only as the child of another test in this \
             file, never on its own"
        )
    })
}

/// Runs the ignored helper test `name` of this binary as a child process.
fn child(name: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// SIGKILL with writes queued

/// The queue of the killed writer; the loss bound below is computed from these.
const KILL_BATCH: usize = 64;
const KILL_CAPACITY: usize = 1024;
const KILL_IN_FLIGHT: usize = 4;
/// Written and flushed before the kill: all of it must be there.
const FLUSHED: usize = 3000;
/// Written to a second namespace whose batches wait a minute: certainly queued at the kill.
const LINGERING: usize = 100;

/// The value of `id`: ~2 KB, every byte determined by the id, so a truncated or mixed-up
/// value cannot pass for a good one.
fn kill_value(i: usize) -> Value {
    let body: String = (0..2000)
        .map(|k| (b'a' + ((i * 31 + k * 7) % 26) as u8) as char)
        .collect();
    json!({"i": i, "body": body, "tail": format!("end-{i}")})
}

fn kill_config(max_delay: Duration, batch_items: usize) -> WriteBehindConfig {
    WriteBehindConfig::builder()
        .batch_items(batch_items)
        .capacity(KILL_CAPACITY)
        .in_flight(KILL_IN_FLIGHT)
        .max_delay(max_delay)
        .build()
        .unwrap()
}

/// Child: flushes `FLUSHED` writes, then writes on without end in one thread while another
/// leaves `LINGERING` writes queued in a second namespace; it prints its progress and waits to
/// be killed.
#[test]
#[ignore = "child process of sigkill_with_writes_queued_keeps_what_was_flushed"]
fn kill_child_writer() {
    let url = required_env("WB_KILL_CHILD_URL");
    let shared = redis_shared(&url, false);
    let docs = Arc::new(WriteBehind::new(
        shared.namespace("docs").unwrap(),
        kill_config(Duration::from_millis(5), KILL_BATCH),
    ));
    for i in 0..FLUSHED {
        docs.upsert(vec![(format!("d{i}"), kill_value(i))]).unwrap();
    }
    docs.flush().unwrap();
    println!("FLUSHED {FLUSHED}");
    let writer = {
        let docs = docs.clone();
        std::thread::spawn(move || {
            for i in FLUSHED.. {
                docs.upsert(vec![(format!("d{i}"), kill_value(i))]).unwrap();
                if i % 500 == 0 {
                    println!("WROTE {i}");
                }
            }
        })
    };
    let slow = WriteBehind::new(
        shared.namespace("slow").unwrap(),
        kill_config(Duration::from_secs(600), 100_000),
    );
    for i in 0..LINGERING {
        slow.upsert(vec![(format!("s{i}"), kill_value(i))]).unwrap();
    }
    println!("LINGERING {LINGERING}");
    writer.join().unwrap();
    unreachable!("the parent kills this process");
}

/// A writer killed with SIGKILL while writes are queued: everything it flushed is in Redis,
/// every value that is there is whole and right, and what is missing is within the bound the
/// README gives (`capacity` plus the batches in flight, and the one being cut).
#[test]
fn sigkill_with_writes_queued_keeps_what_was_flushed() {
    let server = RedisServer::start();
    let mut proc = child("kill_child_writer", &[("WB_KILL_CHILD_URL", server.url())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(proc.stdout.take().unwrap());
    let (mut flushed, mut wrote, mut lingering) = (0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in stdout.lines() {
        let line = line.unwrap();
        // The first line starts with libtest's "test kill_child_writer ... ".
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let n: usize = pair[1].parse().unwrap_or(0);
            match pair[0] {
                "FLUSHED" => flushed = n,
                "WROTE" => wrote = n,
                "LINGERING" => lingering = n,
                _ => {}
            }
        }
        if lingering > 0 && wrote >= FLUSHED + 5000 {
            break;
        }
        assert!(Instant::now() < deadline, "the child made no progress");
    }
    // Child::kill is SIGKILL on Unix: no drop, no flush, no handler runs.
    proc.kill().unwrap();
    let status = proc.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut proc.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(flushed, FLUSHED, "child output ended early:\n{stderr}");
    assert_eq!(lingering, LINGERING, "{stderr}");
    assert!(wrote >= FLUSHED + 5000, "{stderr}");
    assert!(!status.success(), "killed, not exited");

    let shared = redis_shared(&server.url(), false);
    let docs = shared.namespace("docs").unwrap();
    let keys = docs.all_keys().unwrap();
    let mut present = vec![false; keys.len().max(wrote + 1) + KILL_CAPACITY * 4];
    let got = docs.get_by_ids(&keys, None).unwrap();
    for (id, v) in keys.iter().zip(got) {
        let i: usize = id
            .strip_prefix('d')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected id {id:?}"));
        assert_eq!(v, Some(kill_value(i)), "{id} is whole and right");
        present[i] = true;
    }
    let lost_flushed: Vec<usize> = (0..FLUSHED).filter(|&i| !present[i]).collect();
    assert!(
        lost_flushed.is_empty(),
        "flushed writes lost: {lost_flushed:?}"
    );
    // Written (the child said so) and not there: queued or in flight at the kill.
    let missing = (FLUSHED..=wrote).filter(|&i| !present[i]).count();
    let bound = KILL_CAPACITY + (KILL_IN_FLIGHT + 1) * KILL_BATCH;
    println!(
        "killed after {wrote} writes ({FLUSHED} flushed): {missing} missing, bound {bound}; \
         {} of {LINGERING} lingering writes stored",
        shared.namespace("slow").unwrap().all_keys().unwrap().len()
    );
    assert!(
        missing <= bound,
        "{missing} writes lost, above the bound of {bound}"
    );

    // The other namespace's writes were all still queued: lost, and within its bound.
    let slow = shared.namespace("slow").unwrap();
    let slow_keys = slow.all_keys().unwrap();
    assert!(slow_keys.len() <= LINGERING, "{slow_keys:?}");
    for (id, v) in slow_keys
        .iter()
        .zip(slow.get_by_ids(&slow_keys, None).unwrap())
    {
        let i: usize = id[1..].parse().unwrap();
        assert_eq!(v, Some(kill_value(i)), "{id}");
    }
}

// ---------------------------------------------------------------------------------------------
// Memory during an outage

/// Byte bound given to the child.
const RSS_BOUND: usize = 64 << 20;
/// Values of 1 MiB, more of them than the bound holds: without the byte bound, the item bound
/// (16,384 by default) lets every one of them in.
const RSS_VALUE: usize = 1 << 20;
const RSS_VALUES: usize = 300;

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in /proc/self/status"))
}

/// Child: writes 1 MiB values while Redis is down, with the queue configured from the
/// environment as an application would, until a write is not taken. Prints how many were
/// taken and the peak RSS.
#[test]
#[ignore = "child process of an_outage_holds_the_queue_to_its_byte_bound"]
fn rss_child_writer() {
    let url = required_env("WB_RSS_CHILD_URL");
    let vars: HashMap<String, String> = [
        ("KV_WRITE_BEHIND", "true".to_string()),
        ("KV_WRITE_BEHIND_CAPACITY_BYTES", RSS_BOUND.to_string()),
        ("KV_WRITE_BEHIND_ENQUEUE_TIMEOUT_MS", "1500".into()),
        ("KV_WRITE_BEHIND_FLUSH_TIMEOUT_MS", "500".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = WriteBehindConfig::from_vars(&vars).unwrap().unwrap();
    let shared = redis_shared(&url, true);
    let wb = WriteBehind::new(shared.namespace("full_docs").unwrap(), config);
    let mut taken = 0;
    for i in 0..RSS_VALUES {
        let content: String =
            std::iter::repeat_n((b'a' + (i % 26) as u8) as char, RSS_VALUE).collect();
        match wb.upsert(vec![(format!("doc-{i}"), json!({"content": content}))]) {
            Ok(()) => taken += 1,
            Err(e) => {
                println!("REFUSED {e}");
                break;
            }
        }
    }
    println!("TAKEN {taken}");
    println!("VMHWM_KB {}", status_kb("VmHWM:"));
    // The queue cannot be sent (Redis is down): no need to wait for the final flush.
    std::process::exit(0);
}

/// During an outage, 1 MiB values fill the queue up to `KV_WRITE_BEHIND_CAPACITY_BYTES`, then
/// writers wait and fail: the process's peak RSS stays near the bound instead of growing with
/// every value accepted.
#[test]
fn an_outage_holds_the_queue_to_its_byte_bound() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let out = child("rss_child_writer", &[("WB_RSS_CHILD_URL", url)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            // The first line starts with libtest's "test rss_child_writer ... ".
            .find_map(|l| l.split_once(name).map(|(_, v)| v))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the child's output:\n{stdout}\n{stderr}"))
    };
    let taken = field("TAKEN ") as usize;
    let peak_mib = field("VMHWM_KB ") / 1024;
    let bound_mib = (RSS_BOUND >> 20) as u64;
    println!("queue bound {bound_mib} MiB: {taken} values of 1 MiB taken, peak RSS {peak_mib} MiB");
    // The queue fills to the bound: at least the values that fit, a few more at most (the
    // flusher takes up to one batch plus `in_flight` batches off the queue).
    assert!(
        (RSS_BOUND / RSS_VALUE / 2..RSS_VALUES).contains(&taken),
        "{taken} of {RSS_VALUES} values of 1 MiB taken with a bound of {bound_mib} MiB\n{stdout}"
    );
    assert!(stdout.contains("REFUSED"), "{stdout}");
    // Slack: the test binary itself, the batches taken off the queue (in_flight + 1 batches
    // of at most 4 MiB), allocator overhead. Without the bound the peak is above 300 MiB.
    assert!(
        peak_mib <= bound_mib + 64,
        "peak RSS {peak_mib} MiB with a queue bound of {bound_mib} MiB ({taken} values taken)"
    );
}
