//! `recompress`: rewrites a Redis namespace's values to the configured compression.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use graphrag_kv::backend::redis::Recompressed;
use graphrag_kv::migrate::Progress;
use graphrag_kv::{BackendKind, Compression, Error, KvStore, Storage, StoreConfig};

use crate::migrate::CliProgress;
use crate::output::{report, stdout};

/// Exit status when some values could not be read (left as they are).
const EXIT_UNREADABLE: u8 = 1;

/// Exit status when interrupted (Ctrl-C) before the end.
const EXIT_INTERRUPTED: u8 = 130;

/// Unreadable keys named on stderr (the count is complete).
const SHOWN_UNREADABLE: usize = 10;

/// Rewrites `namespace` in batches of `batch` ids, with progress on stderr and a summary on
/// stdout. Ctrl-C stops after the batch in flight: every key is either rewritten or untouched,
/// and running the command again finishes the job.
pub(crate) fn run_recompress(
    config: &StoreConfig,
    storage: &Storage,
    namespace: &str,
    batch: usize,
) -> graphrag_kv::Result<ExitCode> {
    if batch == 0 {
        return Err(Error::Config {
            variable: "--batch".into(),
            value: "0".into(),
            expected: "at least 1 id per batch".into(),
        });
    }
    let Some(shared) = storage.redis() else {
        return Err(Error::Config {
            variable: "STORAGE_KV_BACKEND".into(),
            value: BackendKind::Json.as_str().into(),
            expected: "redis (recompress rewrites values stored in Redis; JSON files are not \
                       compressed)"
                .into(),
        });
    };
    let store = shared.namespace(namespace)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Only this command installs a handler; if one cannot be set, Ctrl-C simply ends the
        // process, which is just as safe (each key is rewritten atomically or not at all).
        // ctrlc runs this on a thread of its own, not in the signal handler: printing is safe.
        let _ = ctrlc::set_handler(move || {
            if !stop.swap(true, Ordering::SeqCst) {
                report("interrupted: stopping after the batch in flight");
            }
        });
    }
    // The ids come a SCAN page at a time (memory bounded by a page, not by the namespace);
    // the progress total is the server's count, 0 when it cannot tell.
    let expected = store.stats().map(|s| s.keys).unwrap_or(0);
    let mut progress = CliProgress::new("recompress");
    progress.start(namespace, expected);
    let mut total = Recompressed::default();
    let mut done = 0usize;
    let mut interrupted = false;
    let scanned = store.scan_keys(&mut |mut page| {
        page.sort_unstable();
        for chunk in page.chunks(batch) {
            if stop.load(Ordering::SeqCst) {
                // Ends the scan; told apart from a real error by `interrupted`.
                interrupted = true;
                return Err(Error::Io {
                    action: "recompressing",
                    path: namespace.into(),
                    source: io::Error::from(io::ErrorKind::Interrupted),
                });
            }
            total.add(store.recompress(chunk)?);
            done += chunk.len();
            progress.advance(chunk.len() as u64);
        }
        Ok(())
    });
    if !interrupted {
        scanned?;
    }
    progress.finish();
    let r = &config.redis;
    let codec = match r.compression {
        Compression::Zstd => format!("zstd level {}", r.compression_level),
        other => other.to_string(),
    };
    let mut out = io::stdout().lock();
    stdout(writeln!(
        out,
        "recompress {namespace} to {codec}: {} rewritten, {} already current, {} changed \
         meanwhile (left as written), {} unreadable",
        total.rewritten,
        total.current,
        total.changed,
        total.unreadable.len()
    ))?;
    stdout(out.flush())?;
    for e in total.unreadable.iter().take(SHOWN_UNREADABLE) {
        report(&format!("left as it is: {e}"));
    }
    if total.unreadable.len() > SHOWN_UNREADABLE {
        report(&format!(
            "... and {} more unreadable values",
            total.unreadable.len() - SHOWN_UNREADABLE
        ));
    }
    if interrupted {
        report(&format!(
            "interrupted after {done} of about {expected} ids; run the same command again to \
             finish"
        ));
        return Ok(ExitCode::from(EXIT_INTERRUPTED));
    }
    if !total.unreadable.is_empty() {
        return Ok(ExitCode::from(EXIT_UNREADABLE));
    }
    Ok(ExitCode::SUCCESS)
}
