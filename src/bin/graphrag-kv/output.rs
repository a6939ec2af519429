//! What the command prints besides its results: errors on stderr, stdout failures, counts.

use std::io::{self, Write};
use std::path::Path;

use graphrag_kv::Error;

/// The path shown in errors about standard output (and recognised for a closed pipe).
const STDOUT: &str = "<stdout>";

/// Exit status of a failed command.
pub(crate) const EXIT_ERROR: u8 = 2;

/// Folds clap's multi-line error text into one line: the message, its details (missing
/// arguments, tips) and the usage line.
pub(crate) fn one_line_clap_error(rendered: &str) -> String {
    let mut message = String::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage:") {
            usage = Some(u.trim().to_string());
            break;
        }
        if line.starts_with("For more information") {
            break;
        }
        if message.is_empty() {
            message.push_str(line.strip_prefix("error:").unwrap_or(line).trim());
        } else if message.ends_with(':') {
            message.push(' ');
            message.push_str(line);
        } else {
            message.push_str(if line.starts_with("tip:") { "; " } else { ", " });
            message.push_str(line);
        }
    }
    if message.is_empty() {
        message.push_str("invalid arguments");
    }
    match usage {
        Some(u) => format!("{message} (usage: {u}; see 'graphrag-kv --help')"),
        None => format!("{message} (see 'graphrag-kv --help')"),
    }
}

/// Prints `graphrag-kv: <message>` as one line on stderr.
pub(crate) fn report(message: &str) {
    let one_line: String = message
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let _ = writeln!(io::stderr(), "graphrag-kv: {one_line}");
}

/// True when writing to stdout failed because the reader went away (`... | head -1`).
pub(crate) fn is_closed_stdout(e: &Error) -> bool {
    matches!(e, Error::Io { path, source, .. }
        if path == Path::new(STDOUT) && source.kind() == io::ErrorKind::BrokenPipe)
}

/// `1 id`, `2 ids`.
pub(crate) fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Maps a failed write to standard output to the library's error type.
pub(crate) fn stdout<T>(result: io::Result<T>) -> graphrag_kv::Result<T> {
    result.map_err(|e| io_error("writing", STDOUT, e))
}

/// An [`Error::Io`] for `path`.
pub(crate) fn io_error(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.as_ref().to_path_buf(),
        source,
    }
}
