//! [`DualWrite`]: one namespace written to two stores and read from one, for moving a fleet
//! from JSON files to Redis (or back) without stopping it. docs/MIGRATION.md walks through the
//! whole switch.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use serde_json::Value;

use crate::error::{display_id, Result};
use crate::store::{park_refused, Item, KvStore, NamespaceStats, Stored, UnsentWrite};

/// How many ids a divergence warning names; the rest are counted.
const IDS_IN_WARNING: usize = 5;

/// Writes every change to a primary and a secondary store and reads from the primary only.
///
/// The primary is the store in service: its answer is the caller's answer, its errors are the
/// caller's errors. The secondary follows: when a write succeeded on the primary but failed on
/// the secondary, the call still succeeds, the divergence is counted ([`DualWrite::divergences`],
/// which `redis_dual_write_divergences_total` reads at scrape time, feature `metrics`)
/// and logged at `warn` with the namespace and ids, and `graphrag-kv verify` / `migrate` find and repair it.
/// When the primary fails, the secondary is not written: the caller sees the error exactly as
/// without dual-write, and retries.
///
/// Writes (`upsert`, `delete_by_ids`, `clear`) are serialized per `DualWrite`, so two threads
/// writing the same id leave both stores with the same last value; without that, the two stores
/// could apply the two writes in opposite orders and diverge silently. Reads are not serialized.
/// Every handle that [`crate::Storage::namespace`] returns for one namespace of one
/// `Storage` (and its clones) is the same `DualWrite`, so two handles of a namespace are
/// ordered too. Two `DualWrite`s built by hand, or by two separately opened `Storage`s, are not
/// ordered against each other: open the namespace from one `Storage`.
/// This only orders writes of one process, which is enough while a JSON store is one of the two:
/// its directory lock allows one writing process.
///
/// # Where it goes in a stack
///
/// Directly over the two backends, under every other wrapper:
///
/// ```text
/// right: Metered<DualWrite<JsonFileStore, RedisStore>>
/// wrong: DualWrite<Metered<JsonFileStore>, Metered<RedisStore>>   (times each side, not the caller)
/// wrong: DualWrite<WriteBehind<JsonFileStore>, RedisStore>        (the secondary is written before
///                                                                 the primary has the data)
/// ```
///
/// `P` and `S` are any stores: backends, wrappers, or the `Arc<dyn KvStore>` that
/// [`crate::Storage::namespace`] returns.
///
/// # Examples
/// ```
/// use graphrag_kv::{DualWrite, KvStore, Storage, StoreConfig};
///
/// # fn main() -> graphrag_kv::Result<()> {
/// # let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
/// let old = Storage::open(&StoreConfig::builder().working_dir(a.path()).build()?)?;
/// let new = Storage::open(&StoreConfig::builder().working_dir(b.path()).build()?)?;
/// let docs = DualWrite::new(old.namespace("full_docs")?, new.namespace("full_docs")?)
///     .with_names("json", "redis");
/// docs.upsert(vec![("doc-1".into(), serde_json::json!({"content": "x"}))])?;
/// assert!(new.namespace("full_docs")?.get_by_id("doc-1")?.is_some());
/// assert_eq!(docs.divergences(), 0);
/// # Ok(())
/// # }
/// ```
pub struct DualWrite<P, S> {
    primary: P,
    secondary: S,
    /// Names for log lines (`json`, `redis`, ...).
    primary_name: String,
    secondary_name: String,
    /// Writes that succeeded on the primary only. An `Arc` so that observers (the metrics,
    /// through [`DualWrite::divergences_source`]) read it from outside at scrape time: this
    /// wrapper never pushes into them.
    divergences: Arc<AtomicU64>,
    /// Held across the primary's and the secondary's write so both apply writes in one order.
    /// A `std::sync::Mutex` rather than a channel to a writer thread: the caller must see the
    /// primary's result synchronously, and the lock is uncontended for a single-writer indexer.
    /// `Storage` builds one `DualWrite` per namespace and hands it to every caller: a lock per
    /// handle would let two handles apply the same ids in opposite orders.
    /// Puts this namespace's writes in one order on both stores (a `Storage` gives every
    /// handle of a namespace the same `DualWrite`).
    write_order: Mutex<()>,
}

impl<P, S> fmt::Debug for DualWrite<P, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DualWrite")
            .field("primary", &self.primary_name)
            .field("secondary", &self.secondary_name)
            .field("divergences", &self.divergences.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<P: KvStore, S: KvStore> DualWrite<P, S> {
    /// Writes to `primary` and `secondary`, reads from `primary`.
    ///
    /// # Panics
    /// When the two stores hold different namespaces: pairing `full_docs` with `text_chunks`
    /// is a bug in the caller, and would copy documents into the wrong namespace.
    pub fn new(primary: P, secondary: S) -> DualWrite<P, S> {
        assert_eq!(
            primary.namespace(),
            secondary.namespace(),
            "DualWrite pairs two stores of the same namespace"
        );
        DualWrite {
            primary,
            secondary,
            primary_name: "primary".into(),
            secondary_name: "secondary".into(),
            divergences: Arc::default(),
            write_order: Mutex::new(()),
        }
    }

    /// Names the two stores in log lines (e.g. `json` and `redis`). Defaults to `primary` and
    /// `secondary`.
    pub fn with_names(mut self, primary: impl Into<String>, secondary: impl Into<String>) -> Self {
        self.primary_name = primary.into();
        self.secondary_name = secondary.into();
        self
    }

    /// A reader of [`DualWrite::divergences`] for observers outside the stack, such as
    /// `Metrics::watch_divergences` (feature `metrics`), which call it at scrape time. It keeps
    /// nothing alive: once this store is dropped it answers `None`, and the observer retires
    /// it (a `Storage` builds a new `DualWrite` each time it reopens a namespace).
    pub fn divergences_source(&self) -> impl Fn() -> Option<u64> + Send + Sync + 'static {
        let counter = Arc::downgrade(&self.divergences);
        move || counter.upgrade().map(|c| c.load(Ordering::Relaxed))
    }

    /// Writes (and checkpoints) that succeeded on the primary and failed on the secondary since
    /// this store was created.
    pub fn divergences(&self) -> u64 {
        self.divergences.load(Ordering::Relaxed)
    }

    /// The store reads come from.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The store that follows.
    pub fn secondary(&self) -> &S {
        &self.secondary
    }

    /// The two stores, primary first.
    pub fn into_inner(self) -> (P, S) {
        (self.primary, self.secondary)
    }

    /// Runs a write on the primary, then (if it succeeded) on the secondary, in one order for
    /// every writer. A secondary failure is counted and logged, not returned.
    fn write(
        &self,
        operation: &str,
        ids: &[&str],
        on_primary: impl FnOnce() -> Result<()>,
        on_secondary: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let _order = self
            .write_order
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        on_primary()?;
        if let Err(e) = on_secondary() {
            self.diverged(operation, ids, &e.to_string());
        }
        Ok(())
    }

    fn diverged(&self, operation: &str, ids: &[&str], error: &str) {
        self.divergences.fetch_add(1, Ordering::Relaxed);
        let mut named: Vec<String> = ids
            .iter()
            .take(IDS_IN_WARNING)
            .map(|id| display_id(id))
            .collect();
        if ids.len() > IDS_IN_WARNING {
            named.push(format!("and {} more", ids.len() - IDS_IN_WARNING));
        }
        let what = if named.is_empty() {
            String::new()
        } else {
            format!(" of ids {}", named.join(", "))
        };
        log::warn!(
            "dual-write divergence in namespace {:?}: {operation}{what} succeeded on {} but \
             failed on {}: {error}; `graphrag-kv verify` lists what differs and `graphrag-kv \
             migrate` copies it over",
            self.primary.namespace(),
            self.primary_name,
            self.secondary_name,
        );
    }
}

#[deny(clippy::missing_trait_methods)]
impl<P: KvStore, S: KvStore> KvStore for DualWrite<P, S> {
    fn namespace(&self) -> &str {
        self.primary.namespace()
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        self.primary.all_keys()
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        self.primary.get_by_id(id)
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        self.primary.get_by_ids(ids, fields)
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        self.primary.filter_keys(ids)
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        // One copy of the batch is unavoidable: each store takes its items by value. The ids
        // are copied apart for the warning, since both batches are consumed.
        let copy = items.clone();
        let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
        let named: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.write(
            "upsert",
            &named,
            || self.primary.upsert(items),
            || self.secondary.upsert(copy),
        )
    }

    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        // Borrowed, so neither store needs a copy.
        let named: Vec<&str> = items.iter().map(|(id, _)| *id).collect();
        self.write(
            "upsert",
            &named,
            || self.primary.upsert_refs(items),
            || self.secondary.upsert_refs(items),
        )
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        let named: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.write(
            "delete_by_ids",
            &named,
            || self.primary.delete_by_ids(ids),
            || self.secondary.delete_by_ids(ids),
        )
    }

    fn clear(&self) -> Result<()> {
        self.write(
            "clear",
            &[],
            || self.primary.clear(),
            || self.secondary.clear(),
        )
    }

    fn index_start_callback(&self) -> Result<()> {
        self.primary.index_start_callback()?;
        if let Err(e) = self.secondary.index_start_callback() {
            // Not a divergence (nothing was written), but the next writes will likely be.
            log::warn!(
                "dual-write: the {} store of namespace {:?} is not reachable: {e}",
                self.secondary_name,
                self.primary.namespace()
            );
        }
        Ok(())
    }

    fn index_done_callback(&self) -> Result<()> {
        self.primary.index_done_callback()?;
        if let Err(e) = self.secondary.index_done_callback() {
            // The secondary may not have made earlier writes durable (a JSON save that failed):
            // a restart could lose them there only.
            self.diverged("index_done_callback", &[], &e.to_string());
        }
        Ok(())
    }

    fn stats(&self) -> Result<NamespaceStats> {
        self.primary.stats()
    }

    /// Both stores' flush. The secondary's failure is a divergence (logged), not an error, as
    /// for writes.
    fn flush(&self) -> Result<()> {
        self.primary.flush()?;
        if let Err(e) = self.secondary.flush() {
            self.diverged("flush", &[], &e.to_string());
        }
        Ok(())
    }

    /// Refused, as by default: neither store keeps writes aside, and parking them in one
    /// store only would make the two diverge where no log line says so.
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        Err(park_refused(self.namespace(), writes.len()))
    }

    /// The primary's keys, as for `all_keys`.
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        self.primary.scan_keys(page)
    }

    /// Read from the primary, as every read.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        self.primary.get_json_by_ids(ids, visit)
    }

    /// Borrowed, so neither store needs a copy; as `upsert` otherwise.
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        let named: Vec<&str> = items.iter().map(|(id, _)| *id).collect();
        self.write(
            "upsert",
            &named,
            || self.primary.upsert_json(items),
            || self.secondary.upsert_json(items),
        )
    }
}
