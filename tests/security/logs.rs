//! Log capture: every record of every level, from every thread of this test binary.

use std::sync::{Mutex, Once};
use std::thread::ThreadId;

/// One captured log record.
struct Captured {
    thread: ThreadId,
    level: log::Level,
    text: String,
}

static RECORDS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let captured = Captured {
            thread: std::thread::current().id(),
            level: record.level(),
            text: format!("{} {}: {}", record.level(), record.target(), record.args()),
        };
        RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(captured);
    }

    fn flush(&self) {}
}

/// Installs the capturing logger at trace level (once per test binary).
pub(crate) fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// The text of every record captured so far (all threads).
pub(crate) fn all_records() -> Vec<String> {
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|r| r.text.clone())
        .collect()
}

/// Warnings logged by the calling thread that contain `needle`.
pub(crate) fn my_warnings(needle: &str) -> usize {
    let me = std::thread::current().id();
    RECORDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|r| r.thread == me && r.level == log::Level::Warn && r.text.contains(needle))
        .count()
}
