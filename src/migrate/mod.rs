//! Copying namespaces between backends and checking two backends hold the same data: what
//! `graphrag-kv migrate` and `graphrag-kv verify` run, usable from a program as well.
//!
//! - [`Spec`]: where a backend is, as the command line writes it: `json:DIR`, a Redis URL, or
//!   comma-separated cluster node URLs.
//! - [`migrate`] / [`copy_namespace`]: copy every id in batches; ids already present with an
//!   equal value are skipped, so a copy can be re-run after an interruption (or to catch up
//!   before a switch) and only moves what changed. Between two [`Storage`]s, remaining TTLs of
//!   a Redis source are kept.
//! - [`verify`] / [`compare_namespace`]: the missing, different and extra ids of a target.
//!
//! docs/MIGRATION.md puts them together: JSON → dual-write → migrate → verify → Redis, and back.

mod spec;
mod ttl;

use std::collections::BTreeSet;

use crate::config::BackendKind;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::store::KvStore;

pub use spec::{parse_spec, Spec};
use ttl::{RedisTtl, Ttl, TtlCopy};

/// Ids per read and write batch when none is given: large enough that round trips do not
/// dominate, small enough that a batch of 5 KB chunks stays a few MB.
pub const DEFAULT_BATCH: usize = 1000;

/// Told how a long copy or comparison advances: the CLI draws a progress bar with it.
pub trait Progress {
    /// A namespace of `total` ids starts.
    fn start(&mut self, namespace: &str, total: u64) {
        let _ = (namespace, total);
    }
    /// `ids` more ids of the current namespace are done.
    fn advance(&mut self, ids: u64) {
        let _ = ids;
    }
    /// The current namespace is done.
    fn finish(&mut self) {}
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// What [`migrate`] copies and how.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrateOptions {
    /// Namespaces to copy; empty means every namespace holding data in the source.
    /// Defaults to empty.
    pub namespaces: Vec<String>,
    /// Ids per read and write batch. Defaults to [`DEFAULT_BATCH`].
    pub batch: usize,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            namespaces: Vec::new(),
            batch: DEFAULT_BATCH,
        }
    }
}

impl MigrateOptions {
    /// Copies only `namespaces` (empty: every namespace holding data in the source).
    pub fn namespaces(mut self, namespaces: Vec<String>) -> Self {
        self.namespaces = namespaces;
        self
    }

    /// Reads and writes `batch` ids at a time.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
}

/// What copying one namespace did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyReport {
    /// The namespace.
    pub namespace: String,
    /// Ids the source listed.
    pub source_ids: u64,
    /// Ids written to the target (missing there, or with another value).
    pub copied: u64,
    /// Ids already in the target with an equal value: not written.
    pub skipped: u64,
    /// Ids listed by the source but gone when read (deleted or expired meanwhile).
    pub vanished: u64,
    /// Copied ids whose remaining TTL was set on a Redis target.
    pub ttl_kept: u64,
    /// Copied ids that had a TTL in the source but went to a JSON target, which keeps none.
    pub ttl_dropped: u64,
}

/// What [`migrate`] did, one report per namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrationReport {
    /// Per namespace, in the order copied.
    pub namespaces: Vec<CopyReport>,
}

impl MigrationReport {
    /// Ids copied, over all namespaces.
    pub fn copied(&self) -> u64 {
        self.namespaces.iter().map(|n| n.copied).sum()
    }
    /// Ids skipped as already equal, over all namespaces.
    pub fn skipped(&self) -> u64 {
        self.namespaces.iter().map(|n| n.skipped).sum()
    }
}

/// How a target namespace differs from its source. Id lists are sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NamespaceDiff {
    /// The namespace.
    pub namespace: String,
    /// Ids in the source.
    pub source_ids: u64,
    /// Ids in the target.
    pub target_ids: u64,
    /// In the source, not in the target.
    pub missing: Vec<String>,
    /// In both, with values that are not equal (as JSON values: key order does not matter).
    pub different: Vec<String>,
    /// In the target, not in the source.
    pub extra: Vec<String>,
}

impl NamespaceDiff {
    /// True when nothing is missing, different or extra.
    pub fn is_equal(&self) -> bool {
        self.missing.is_empty() && self.different.is_empty() && self.extra.is_empty()
    }
}

/// What [`verify`] found, one diff per namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Per namespace, sorted by name.
    pub namespaces: Vec<NamespaceDiff>,
}

impl VerifyReport {
    /// True when every namespace is equal.
    pub fn is_equal(&self) -> bool {
        self.namespaces.iter().all(NamespaceDiff::is_equal)
    }
}

/// Copies namespaces from `from` to `to` (see the module doc), then checkpoints the target
/// (`index_done_callback`: once for Redis, once per namespace file for JSON), so the copy is
/// durable when this returns.
///
/// When both are Redis, each copied id that has a TTL in the source gets its remaining TTL on
/// the target (read with PTTL just after the value); ids without one get the target's configured
/// TTL for the namespace, as any write does. A JSON target keeps no TTL: those ids are counted
/// in [`CopyReport::ttl_dropped`]. Ids only in the target are left alone ([`verify`] reports
/// them).
///
/// Open `from` with [`Storage::open_read_only`]: a JSON source then needs no lock and can be
/// copied while its indexer runs (as last saved).
///
/// # Errors
/// [`Error::Config`] for a batch of 0; the first backend failure (the copy stops there; running
/// it again resumes, skipping what was copied).
pub fn migrate(
    from: &Storage,
    to: &Storage,
    options: &MigrateOptions,
    progress: &mut dyn Progress,
) -> Result<MigrationReport> {
    check_batch(options.batch)?;
    let namespaces = if options.namespaces.is_empty() {
        from.list_namespaces()?
    } else {
        options.namespaces.clone()
    };
    // One Redis checkpoint covers every namespace of the server and, on Redis 7.0 with
    // `appendfsync everysec`, waits out the fsync interval: take it once at the end rather than
    // once per namespace. A JSON namespace is its own file and is saved by its own callback.
    let checkpoint_each = to.backend() == BackendKind::Json;
    let mut last_target = None;
    let mut report = MigrationReport::default();
    for namespace in &namespaces {
        let source = from.namespace(namespace)?;
        let target = to.namespace(namespace)?;
        let ttl = TtlCopy {
            from: from
                .redis()
                .map(|s| RedisTtl::open(s, namespace))
                .transpose()?,
            to: to
                .redis()
                .map(|s| RedisTtl::open(s, namespace))
                .transpose()?,
        };
        let r = copy(
            &*source,
            &*target,
            options.batch,
            &ttl,
            checkpoint_each,
            progress,
        )?;
        report.namespaces.push(r);
        last_target = Some(target);
    }
    if let (false, Some(target)) = (checkpoint_each, last_target) {
        target.index_done_callback()?;
    }
    Ok(report)
}

/// Copies one namespace between any two stores, then checkpoints the target. Ids already
/// present with an equal value are skipped. TTLs are not carried over (the stores do not expose
/// them): use [`migrate`] between two [`Storage`]s for that.
///
/// # Errors
/// [`Error::Config`] for a batch of 0; the first backend failure.
pub fn copy_namespace(
    from: &dyn KvStore,
    to: &dyn KvStore,
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<CopyReport> {
    check_batch(batch)?;
    copy(from, to, batch, &TtlCopy::default(), true, progress)
}

/// Compares namespaces of `to` against `from`: those named, or every namespace holding data in
/// either.
///
/// # Errors
/// [`Error::Config`] for a batch of 0; backend failures.
pub fn verify(
    from: &Storage,
    to: &Storage,
    namespaces: &[String],
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<VerifyReport> {
    check_batch(batch)?;
    let namespaces: Vec<String> = if namespaces.is_empty() {
        let mut all: BTreeSet<String> = from.list_namespaces()?.into_iter().collect();
        all.extend(to.list_namespaces()?);
        all.into_iter().collect()
    } else {
        namespaces.to_vec()
    };
    let mut report = VerifyReport::default();
    for namespace in &namespaces {
        let source = from.namespace(namespace)?;
        let target = to.namespace(namespace)?;
        report
            .namespaces
            .push(compare(&*source, &*target, batch, progress)?);
    }
    Ok(report)
}

/// Compares one namespace of two stores.
///
/// # Errors
/// [`Error::Config`] for a batch of 0; backend failures.
pub fn compare_namespace(
    from: &dyn KvStore,
    to: &dyn KvStore,
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<NamespaceDiff> {
    check_batch(batch)?;
    compare(from, to, batch, progress)
}

fn check_batch(batch: usize) -> Result<()> {
    if batch == 0 {
        return Err(Error::Config {
            variable: "--batch".into(),
            value: "0".into(),
            expected: "a number of ids of at least 1".into(),
        });
    }
    Ok(())
}

/// The ids of `store` a page at a time ([`KvStore::scan_keys`]), each page sorted, in chunks of
/// at most `batch`: memory is bounded by a page, not by the namespace.
fn for_each_chunk(
    store: &dyn KvStore,
    batch: usize,
    f: &mut dyn FnMut(&[String]) -> Result<()>,
) -> Result<()> {
    store.scan_keys(&mut |mut page| {
        page.sort_unstable();
        page.dedup();
        page.chunks(batch).try_for_each(&mut *f)
    })
}

/// How many ids `store` holds, for a progress bar: `stats`' count, or 0 (unknown) when the
/// store cannot tell (a fallback offline).
fn estimated_ids(store: &dyn KvStore) -> u64 {
    store.stats().map(|s| s.keys).unwrap_or(0)
}

fn copy(
    from: &dyn KvStore,
    to: &dyn KvStore,
    batch: usize,
    ttl: &TtlCopy,
    checkpoint: bool,
    progress: &mut dyn Progress,
) -> Result<CopyReport> {
    let mut report = CopyReport {
        namespace: from.namespace().to_string(),
        ..CopyReport::default()
    };
    progress.start(from.namespace(), estimated_ids(from));
    for_each_chunk(from, batch, &mut |chunk| {
        report.source_ids += chunk.len() as u64;
        let values = from.get_by_ids(chunk, None)?;
        // Read after the values: a key that expired in between reads as gone and is not
        // copied, and the TTL set on the target is never longer than the source's.
        let ttls = match &ttl.from {
            Some(r) => r.pttl(chunk)?,
            None => vec![Ttl::Persistent; chunk.len()],
        };
        let existing = to.get_by_ids(chunk, None)?;
        let mut items = Vec::new();
        let mut expiries = Vec::new();
        for (((id, value), t), there) in chunk.iter().zip(values).zip(ttls).zip(existing) {
            let Some(value) = value.filter(|_| t != Ttl::Gone) else {
                report.vanished += 1;
                continue;
            };
            if there.as_ref() == Some(&value) {
                report.skipped += 1;
                continue;
            }
            if let Ttl::Remaining(ms) = t {
                expiries.push((id.clone(), ms));
            }
            items.push((id.clone(), value));
        }
        report.copied += items.len() as u64;
        if !items.is_empty() {
            to.upsert(items)?;
        }
        if !expiries.is_empty() {
            match &ttl.to {
                Some(r) => {
                    r.pexpire(&expiries)?;
                    report.ttl_kept += expiries.len() as u64;
                }
                None => report.ttl_dropped += expiries.len() as u64,
            }
        }
        progress.advance(chunk.len() as u64);
        Ok(())
    })?;
    if checkpoint {
        to.index_done_callback()?;
    }
    progress.finish();
    Ok(report)
}

/// Both namespaces are listed as streams: the source's ids are read on both sides (missing,
/// different), the target's are looked up in the source with `filter_keys` (extra). Memory
/// is bounded by a page and by the differences found, not by the namespaces.
fn compare(
    from: &dyn KvStore,
    to: &dyn KvStore,
    batch: usize,
    progress: &mut dyn Progress,
) -> Result<NamespaceDiff> {
    let mut diff = NamespaceDiff {
        namespace: from.namespace().to_string(),
        source_ids: 0,
        target_ids: 0,
        missing: Vec::new(),
        different: Vec::new(),
        extra: Vec::new(),
    };
    progress.start(from.namespace(), estimated_ids(from));
    for_each_chunk(from, batch, &mut |chunk| {
        diff.source_ids += chunk.len() as u64;
        let a = from.get_by_ids(chunk, None)?;
        let b = to.get_by_ids(chunk, None)?;
        for ((id, a), b) in chunk.iter().zip(a).zip(b) {
            match (a, b) {
                // Deleted or expired since the listing (on both sides, or on the source and
                // never in the target).
                (None, None) => {}
                (Some(_), None) => diff.missing.push(id.clone()),
                (None, Some(_)) => diff.extra.push(id.clone()),
                (Some(a), Some(b)) if a != b => diff.different.push(id.clone()),
                (Some(_), Some(_)) => {}
            }
        }
        progress.advance(chunk.len() as u64);
        Ok(())
    })?;
    for_each_chunk(to, batch, &mut |chunk| {
        diff.target_ids += chunk.len() as u64;
        diff.extra.extend(from.filter_keys(chunk)?);
        Ok(())
    })?;
    progress.finish();
    // An id listed twice (SCAN may repeat one) or found extra from both sides is reported once.
    for list in [&mut diff.missing, &mut diff.different, &mut diff.extra] {
        list.sort_unstable();
        list.dedup();
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_batch_is_refused() {
        let e = check_batch(0).unwrap_err().to_string();
        assert!(e.contains("--batch"), "{e}");
    }
}
