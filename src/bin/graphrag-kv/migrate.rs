//! `migrate` and `verify`: SPECs, progress, the verify report.

use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use graphrag_kv::backend::json_file::to_python_json;
use graphrag_kv::migrate::{self, MigrateOptions, Progress, Spec, VerifyReport};
use graphrag_kv::{Error, Storage, StoreConfigBuilder};
use indicatif::{ProgressBar, ProgressStyle};

use crate::output::{count, io_error, stdout};

/// Exit status of `verify` when the two backends differ.
const EXIT_DIFFERENT: u8 = 1;

/// Ids of each kind `verify` prints per namespace without `--json` (the counts are complete).
const SHOWN_IDS: usize = 20;

/// `migrate`: opens the source read-only and the target for writing, copies, prints one line
/// per namespace and a total.
pub(crate) fn run_migrate(
    from: &str,
    to: &str,
    namespaces: Vec<String>,
    batch: usize,
) -> graphrag_kv::Result<ExitCode> {
    let (from_spec, to_spec) = (parse_spec("--from", from)?, parse_spec("--to", to)?);
    let source = open_spec(&from_spec, true)?;
    let target = open_spec(&to_spec, false)?;
    let options = MigrateOptions::default()
        .namespaces(namespaces)
        .batch(batch);
    let mut progress = CliProgress::new("migrate");
    let report = migrate::migrate(&source, &target, &options, &mut progress)?;
    drop(progress);
    let mut out = io::BufWriter::new(io::stdout().lock());
    for r in &report.namespaces {
        let mut line = format!(
            "{}: {} in the source: {} copied, {} already equal",
            r.namespace,
            count(r.source_ids, "id"),
            r.copied,
            r.skipped
        );
        if r.vanished > 0 {
            line.push_str(&format!(", {} gone before they were read", r.vanished));
        }
        if r.ttl_kept > 0 {
            line.push_str(&format!("; remaining TTL kept on {}", r.ttl_kept));
        }
        if r.ttl_dropped > 0 {
            line.push_str(&format!(
                "; TTL dropped on {} (a JSON store keeps no expiry)",
                r.ttl_dropped
            ));
        }
        stdout(writeln!(out, "{line}"))?;
    }
    stdout(writeln!(
        out,
        "migrated {from_spec} -> {to_spec}: {}, {} copied, {} already equal",
        count(report.namespaces.len() as u64, "namespace"),
        count(report.copied(), "id"),
        report.skipped()
    ))?;
    stdout(out.flush())?;
    Ok(ExitCode::SUCCESS)
}

/// `verify`: opens both read-only, compares, prints the differences; exit 1 if any.
pub(crate) fn run_verify(
    from: &str,
    to: &str,
    namespaces: &[String],
    batch: usize,
    json: bool,
) -> graphrag_kv::Result<ExitCode> {
    let (from_spec, to_spec) = (parse_spec("--from", from)?, parse_spec("--to", to)?);
    let source = open_spec(&from_spec, true)?;
    let target = open_spec(&to_spec, true)?;
    let mut progress = CliProgress::new("verify");
    let report = migrate::verify(&source, &target, namespaces, batch, &mut progress)?;
    drop(progress);
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        let mut bytes = to_python_json(&serde_json::json!({
            "equal": report.is_equal(),
            "namespaces": report.namespaces,
        }));
        bytes.push(b'\n');
        stdout(out.write_all(&bytes))?;
    } else {
        stdout(write_verify_report(&mut out, &report))?;
        let verdict = if report.is_equal() {
            "equal".to_string()
        } else {
            let n = report.namespaces.iter().filter(|d| !d.is_equal()).count();
            format!("DIFFERENT in {}", count(n as u64, "namespace"))
        };
        stdout(writeln!(out, "verify {from_spec} -> {to_spec}: {verdict}"))?;
    }
    stdout(out.flush())?;
    Ok(if report.is_equal() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERENT)
    })
}

/// One line per namespace, then up to [`SHOWN_IDS`] ids of each kind of difference.
fn write_verify_report(out: &mut impl Write, report: &VerifyReport) -> io::Result<()> {
    for d in &report.namespaces {
        if d.is_equal() {
            writeln!(
                out,
                "{}: equal ({})",
                d.namespace,
                count(d.source_ids, "id")
            )?;
            continue;
        }
        writeln!(
            out,
            "{}: {} in the source, {} in the target: {} missing, {} different, {} extra",
            d.namespace,
            count(d.source_ids, "id"),
            d.target_ids,
            d.missing.len(),
            d.different.len(),
            d.extra.len()
        )?;
        for (kind, ids) in [
            ("missing", &d.missing),
            ("different", &d.different),
            ("extra", &d.extra),
        ] {
            for id in ids.iter().take(SHOWN_IDS) {
                writeln!(out, "  {kind} {id:?}")?;
            }
            if ids.len() > SHOWN_IDS {
                writeln!(
                    out,
                    "  ... and {} more {kind} (all of them with --json)",
                    ids.len() - SHOWN_IDS
                )?;
            }
        }
    }
    Ok(())
}

/// Parses a SPEC option, naming the option in the error.
fn parse_spec(option: &str, spec: &str) -> graphrag_kv::Result<Spec> {
    Spec::parse(spec).map_err(|e| match e {
        Error::Config {
            value, expected, ..
        } => Error::Config {
            variable: option.to_string(),
            value,
            expected,
        },
        other => other,
    })
}

/// Opens the backend a SPEC names, over the environment's other settings. A JSON source must
/// exist: a typo must not read as an empty backend.
fn open_spec(spec: &Spec, read_only: bool) -> graphrag_kv::Result<Storage> {
    if let (Spec::Json(dir), true) = (spec, read_only) {
        if !dir.is_dir() {
            return Err(io_error(
                "reading directory",
                dir,
                io::Error::new(io::ErrorKind::NotFound, "no such directory"),
            ));
        }
    }
    let config = spec.config(StoreConfigBuilder::from_env()?)?;
    if read_only {
        Storage::open_read_only(&config)
    } else {
        Storage::open(&config)
    }
}

/// Progress on stderr: a bar on a terminal, a line per tenth otherwise (logs, CI).
pub(crate) struct CliProgress {
    verb: &'static str,
    bar: Option<ProgressBar>,
    terminal: bool,
    namespace: String,
    total: u64,
    done: u64,
    next_line: u64,
}

impl CliProgress {
    pub(crate) fn new(verb: &'static str) -> CliProgress {
        CliProgress {
            verb,
            bar: None,
            terminal: io::stderr().is_terminal(),
            namespace: String::new(),
            total: 0,
            done: 0,
            next_line: 0,
        }
    }
}

impl Progress for CliProgress {
    fn start(&mut self, namespace: &str, total: u64) {
        self.namespace = namespace.to_string();
        self.total = total;
        self.done = 0;
        if self.terminal {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} ids ({per_sec}, {eta} left)",
                )
                .expect("a valid progress template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("{} {namespace}", self.verb));
            self.bar = Some(bar);
        } else {
            let _ = writeln!(
                io::stderr(),
                "{} {namespace}: {}",
                self.verb,
                count(total, "id")
            );
            self.next_line = total / 10;
        }
    }

    fn advance(&mut self, ids: u64) {
        self.done += ids;
        if let Some(bar) = &self.bar {
            bar.inc(ids);
        } else if self.total >= 10 && self.done >= self.next_line && self.done < self.total {
            let _ = writeln!(
                io::stderr(),
                "{} {}: {}/{} ids",
                self.verb,
                self.namespace,
                self.done,
                self.total
            );
            self.next_line = self.done + self.total / 10;
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        } else {
            let _ = writeln!(
                io::stderr(),
                "{} {}: {}/{} ids, done",
                self.verb,
                self.namespace,
                self.done,
                self.total
            );
        }
    }
}
