//! The [`KvStore`] trait, its typed extension, and namespace and id validation.

use std::collections::HashSet;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::BackendKind;
use crate::error::{display_id, Error, Result};

mod typed;
pub(crate) use typed::parse_items;
pub use typed::{FullDoc, KvStoreExt, LlmCacheEntry, Stored, TextChunk};

/// nano-graphrag's namespace for whole documents.
pub const FULL_DOCS: &str = "full_docs";
/// nano-graphrag's namespace for text chunks.
pub const TEXT_CHUNKS: &str = "text_chunks";
/// nano-graphrag's namespace for community reports.
pub const COMMUNITY_REPORTS: &str = "community_reports";
/// nano-graphrag's namespace for cached LLM answers.
pub const LLM_RESPONSE_CACHE: &str = "llm_response_cache";
/// The four namespaces a nano-graphrag index keeps, in the order it creates them.
pub const NAMESPACES: [&str; 4] = [
    FULL_DOCS,
    TEXT_CHUNKS,
    COMMUNITY_REPORTS,
    LLM_RESPONSE_CACHE,
];

/// Ids per page of the default [`KvStore::scan_keys`]: SCAN's page size on Redis.
pub const KEY_PAGE: usize = 1_000;

/// The longest id accepted, in bytes of UTF-8: 64 KiB.
///
/// Redis keys may be far longer, but an id this long is a bug in the caller (a whole document
/// passed as its own id); refusing it early gives a clear error instead of a slow server.
pub const MAX_ID_BYTES: usize = 64 * 1024;

/// The longest namespace name accepted, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 200;

/// One value to store: its id and the JSON value.
pub type Item = (String, Value);

/// Figures about one namespace, as returned by [`KvStore::stats`].
///
/// A store outside this crate starts from [`NamespaceStats::new`] and sets the figures it has;
/// fields may be added in a minor release.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct NamespaceStats {
    /// The namespace.
    pub namespace: String,
    /// The backend holding the values. Serialized (and displayed) as `json` or `redis`.
    #[serde(serialize_with = "serialize_backend")]
    pub backend: BackendKind,
    /// Number of ids stored.
    pub keys: u64,
    /// Approximate bytes of the stored values (as stored: compressed values count compressed).
    pub bytes: u64,
    /// True when `bytes` was extrapolated from a sample of the keys rather than summed.
    pub bytes_sampled: bool,
    /// Expiry applied to new writes, in seconds; 0 means no expiry.
    pub ttl_seconds: u64,
}

impl NamespaceStats {
    /// Figures of `namespace` on `backend`, all zero until set: no keys, no bytes, no expiry.
    pub fn new(namespace: impl Into<String>, backend: BackendKind) -> Self {
        NamespaceStats {
            namespace: namespace.into(),
            backend,
            keys: 0,
            bytes: 0,
            bytes_sampled: false,
            ttl_seconds: 0,
        }
    }
}

/// The backend's name, as the `&'static str` this field used to be serialized.
fn serialize_backend<S: serde::Serializer>(
    backend: &BackendKind,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_str(backend.as_str())
}

/// A namespace of JSON values addressed by string ids, with nano-graphrag's operations.
///
/// Implementations are shared between threads (`&self` everywhere) and must be usable as
/// `Arc<dyn KvStore>`. Every operation returns a `Result`: a backend failure is never reported
/// as a missing id.
pub trait KvStore: Send + Sync {
    /// The namespace this store holds.
    fn namespace(&self) -> &str;

    /// Every id of the namespace, each once, in no particular order.
    ///
    /// # Errors
    /// Backend failures.
    fn all_keys(&self) -> Result<Vec<String>>;

    /// The value stored under `id`, or `None`.
    ///
    /// # Errors
    /// An invalid id, backend failures, a stored value that cannot be decoded.
    fn get_by_id(&self, id: &str) -> Result<Option<Value>>;

    /// One entry per requested id, in request order, `None` for a missing id.
    ///
    /// With `fields`, each object value keeps only those top-level keys (other values are
    /// returned whole).
    ///
    /// # Errors
    /// An invalid id, backend failures, a stored value that cannot be decoded.
    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>>;

    /// The ids among `ids` that are NOT stored, each once, in request order.
    ///
    /// # Errors
    /// An invalid id, backend failures.
    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>>;

    /// Inserts or replaces whole values, in one batch. When an id appears more than once, the
    /// last value wins.
    ///
    /// # Errors
    /// An invalid id, a value too large to store, backend failures. On error some items of the
    /// batch may have been written (never a partial value).
    fn upsert(&self, items: Vec<Item>) -> Result<()>;

    /// [`KvStore::upsert`] of borrowed items, for a caller that must keep its values (the
    /// write-behind queue keeps each one for readers and for retries until it is acknowledged).
    ///
    /// The default copies the items and calls `upsert`. Redis overrides it to encode straight
    /// from the references: a deep copy of a 2 KB value costs about as much as encoding it
    /// without compression.
    ///
    /// # Errors
    /// As [`KvStore::upsert`].
    // Hidden, not the one upsert path: owned items are what most stores want (the JSON store
    // keeps them, `WriteBehind` moves them into its queue), borrowed ones only a caller that
    // must keep its values over a store that only encodes them (write-behind over Redis).
    // Either as the sole required method would force a deep copy on the other. The default is
    // correct for every store; wrappers in this crate forward it so that the optimisation
    // reaches Redis through every layer.
    #[doc(hidden)]
    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        self.upsert(
            items
                .iter()
                .map(|(id, v)| ((*id).to_string(), (*v).clone()))
                .collect(),
        )
    }

    /// Deletes the given ids; ids that are not stored are ignored, an empty list does nothing.
    ///
    /// # Errors
    /// An invalid id, backend failures.
    fn delete_by_ids(&self, ids: &[String]) -> Result<()>;

    /// Removes every id of this namespace and nothing else (nano-graphrag's `drop`).
    ///
    /// # Errors
    /// Backend failures.
    fn clear(&self) -> Result<()>;

    /// Called when an indexing run starts. Checks the backend is reachable.
    ///
    /// # Errors
    /// Backend failures.
    fn index_start_callback(&self) -> Result<()>;

    /// Called when an indexing run (or any unit of work) is done: returns once everything
    /// written before the call is durable, as far as the backend can make it so.
    ///
    /// # Errors
    /// Backend failures, or a durable save that failed.
    fn index_done_callback(&self) -> Result<()>;

    /// Key count, approximate bytes, TTL and backend of this namespace.
    ///
    /// # Errors
    /// Backend failures.
    fn stats(&self) -> Result<NamespaceStats>;

    /// Hands every id of the namespace to `page`, a page at a time, so that memory is bounded
    /// by a page (on Redis one SCAN reply, about a thousand keys), not by the namespace.
    ///
    /// Every id stored for the whole call is handed over at least once; an id may be handed
    /// over more than once (SCAN's own guarantee, and a page read again after a retried
    /// failure), and ids written or deleted during the call may or may not be. A consumer that
    /// must see each id once deduplicates (as [`KvStore::all_keys`] does). An error returned by
    /// `page` stops the listing and is returned as it is.
    ///
    /// `page` may call this store (read values, delete ids): on Redis no connection is held
    /// while it runs.
    ///
    /// The default hands over [`KvStore::all_keys`] in pages of [`KEY_PAGE`] ids: right for a
    /// store that holds its namespace in memory anyway. Every store of this crate that does not
    /// (Redis, and every wrapper, which forwards) overrides it.
    ///
    /// # Errors
    /// Backend failures, and the first error `page` returned.
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        let mut keys = self.all_keys()?;
        while !keys.is_empty() {
            let rest = keys.split_off(keys.len().saturating_sub(KEY_PAGE));
            page(rest)?;
        }
        Ok(())
    }

    /// Hands the stored value of each requested id that is stored to `visit`, with the id's
    /// index in `ids`, in the form the store holds it ([`Stored`]), for the typed read path
    /// ([`KvStoreExt::get_as`], [`KvStoreExt::get_many_as`]) and for a caller that wants the
    /// JSON text itself. Redis hands over the JSON text it read (decompressed), without
    /// building a [`Value`]; a store that keeps [`Value`]s hands those over, so no text is
    /// written and parsed again. Ids that are not stored are not visited. Each index is
    /// visited at most once, in no particular order. Text is not checked: `visit` reports
    /// what does not parse.
    ///
    /// An error returned by `visit` stops the call (on Redis after the replies in flight are
    /// read, so the connection stays usable) and is returned as it is.
    ///
    /// The default reads [`KvStore::get_by_ids`] and hands over each [`Value`]: right for a
    /// store that keeps [`Value`]s (the JSON file). Redis overrides it; every wrapper
    /// forwards it.
    ///
    /// # Errors
    /// As [`KvStore::get_by_ids`], and the first error `visit` returned.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        let values = self.get_by_ids(ids, None)?;
        for (i, v) in values.into_iter().enumerate() {
            if let Some(v) = v {
                visit(i, Stored::Owned(v))?;
            }
        }
        Ok(())
    }

    /// [`KvStore::upsert`] of values given as JSON text (checked JSON: a [`RawValue`]), for a
    /// caller that has the text already (a file, another store): Redis stores the text as it
    /// is (compressed as configured) instead of building a [`Value`] and writing it out again. The stored
    /// bytes are the same as for the [`Value`] the text parses to, whenever the text is
    /// compact JSON with an object's keys in the order the [`Value`] keeps (what
    /// `serde_json::to_string` writes for a struct); any reader of untyped values reads them.
    ///
    /// The default parses each text into a [`Value`] and calls [`KvStore::upsert`]: right for
    /// a store that keeps [`Value`]s. Wrappers forward it, except write-behind, whose queue keeps
    /// values: it parses, as the default does.
    ///
    /// # Errors
    /// As [`KvStore::upsert`].
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        self.upsert(parse_items(self.namespace(), items)?)
    }

    /// Returns once every write this store accepted before the call has reached the backend:
    /// on Redis, readable by other processes. Unlike [`KvStore::index_done_callback`], it asks
    /// for no durable save, so it costs no more than the writes still held back.
    ///
    /// The backends write through, so the default does nothing. Every wrapper forwards the
    /// call, and the write-behind queue first waits until the writes it holds are sent. While
    /// the fallback is offline, the writes are in its journal (fsynced) and reach Redis only
    /// when it answers again: other processes cannot see them until then. The JSON backend
    /// keeps writes in this process until `index_done_callback` saves them.
    ///
    /// # Errors
    /// Those of the write-behind queue's flush: the backend kept failing until the flush
    /// deadline, writes refused by the backend since the last report, a stopped flusher.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Takes writes that a layer above accepted and can no longer deliver, so that they are
    /// not lost: the write-behind queue calls it on the store below it at close or drop, with
    /// the writes still unsent when its final flush reached its deadline, in the order they
    /// were accepted (applying them in that order gives the state its callers expected).
    ///
    /// A store that can keep writes without the backend keeps them and returns `Ok`: the
    /// fallback ([`crate::fallback::FallbackStore`]) appends them to its journal (fsynced) and
    /// goes offline, so they are replayed when Redis answers, by this process or the next one
    /// to open the journal directory. Wrappers forward the call to their inner store.
    ///
    /// The default refuses them ([`Error::Unavailable`], naming the namespace and the count),
    /// and the caller reports them lost. It does not write them through `upsert` and
    /// `delete_by_ids`: the layer above has been sending them until its deadline, and one more
    /// attempt would outlast that deadline and break the bound on the commands one failing
    /// write causes (`crate::retry`).
    ///
    /// # Errors
    /// When the writes cannot be kept; they are then lost, and the caller says so.
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        Err(park_refused(self.namespace(), writes.len()))
    }
}

/// One write accepted by a layer and not sent to the backend, handed to [`KvStore::park`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum UnsentWrite {
    /// An upsert of one id.
    Upsert {
        /// The id.
        id: String,
        /// The value.
        value: Value,
    },
    /// A delete of one id.
    Delete {
        /// The id.
        id: String,
    },
}

/// What [`KvStore::park`] answers when a store cannot keep writes aside.
pub(crate) fn park_refused(namespace: &str, count: usize) -> Error {
    Error::Unavailable {
        namespace: namespace.to_string(),
        reason: format!(
            "{count} unsent writes cannot be kept: no layer below keeps writes while the \
             backend is unreachable (KV_FALLBACK=json does)"
        ),
    }
}

/// A shared store is a store, so wrappers can hold the `Arc<dyn KvStore>` that
/// [`crate::Storage`] returns. Every method forwards: a batch never decays into single calls.
#[deny(clippy::missing_trait_methods)]
impl<S: KvStore + ?Sized> KvStore for std::sync::Arc<S> {
    fn namespace(&self) -> &str {
        (**self).namespace()
    }
    fn all_keys(&self) -> Result<Vec<String>> {
        (**self).all_keys()
    }
    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        (**self).get_by_id(id)
    }
    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        (**self).get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        (**self).filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        (**self).upsert(items)
    }
    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        (**self).upsert_refs(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        (**self).delete_by_ids(ids)
    }
    fn clear(&self) -> Result<()> {
        (**self).clear()
    }
    fn index_start_callback(&self) -> Result<()> {
        (**self).index_start_callback()
    }
    fn index_done_callback(&self) -> Result<()> {
        (**self).index_done_callback()
    }
    fn stats(&self) -> Result<NamespaceStats> {
        (**self).stats()
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        (**self).park(writes)
    }

    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        (**self).scan_keys(page)
    }
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        (**self).get_json_by_ids(ids, visit)
    }
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        (**self).upsert_json(items)
    }
}

/// Checks a namespace name: one to [`MAX_NAMESPACE_BYTES`] characters of `[A-Za-z0-9_.-]`.
///
/// Anything else (`:`, `*`, `?`, `[`, a space, ...) would make key ownership ambiguous in Redis
/// (`docs` would own `docs:v2`'s keys) or break key scans.
///
/// # Errors
/// [`Error::InvalidNamespace`] saying which character is not allowed.
pub fn validate_namespace(namespace: &str) -> Result<()> {
    let invalid = |reason: String| {
        Err(Error::InvalidNamespace {
            namespace: namespace.to_string(),
            reason,
        })
    };
    if namespace.is_empty() {
        return invalid("a namespace must not be empty".into());
    }
    if namespace.len() > MAX_NAMESPACE_BYTES {
        return invalid(format!(
            "longer than {MAX_NAMESPACE_BYTES} bytes ({})",
            namespace.len()
        ));
    }
    if let Some(c) = namespace.chars().find(|c| !is_name_char(*c)) {
        return invalid(format!(
            "character {c:?} is not allowed; use only A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(())
}

/// True for the characters allowed in namespace names and key prefixes.
pub(crate) fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Checks an id: non-empty, at most [`MAX_ID_BYTES`] bytes. Any other UTF-8 is fine.
///
/// # Errors
/// [`Error::InvalidId`] naming the namespace and the id.
pub fn validate_id(namespace: &str, id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        "an id must not be empty".to_string()
    } else if id.len() > MAX_ID_BYTES {
        format!(
            "longer than the maximum of {MAX_ID_BYTES} bytes ({} bytes)",
            id.len()
        )
    } else {
        return Ok(());
    };
    Err(Error::InvalidId {
        namespace: namespace.to_string(),
        id: display_id(id),
        reason,
    })
}

/// Checks every id of a batch.
pub(crate) fn validate_ids<'a>(
    namespace: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> Result<()> {
    ids.into_iter()
        .try_for_each(|id| validate_id(namespace, id))
}

/// Keeps only `fields` of an object value; other values are returned whole.
pub(crate) fn project(value: Value, fields: Option<&[String]>) -> Value {
    match (value, fields) {
        (Value::Object(map), Some(fields)) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| fields.iter().any(|f| f == k))
                .collect(),
        ),
        (v, _) => v,
    }
}

/// The ids not in `present`, each once, in request order.
pub(crate) fn missing_in_order(ids: &[String], is_present: impl Fn(usize) -> bool) -> Vec<String> {
    let mut seen = HashSet::new();
    ids.iter()
        .enumerate()
        .filter(|(i, id)| !is_present(*i) && seen.insert(id.as_str()))
        .map(|(_, id)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_name_their_backend_as_the_strings_they_replaced() {
        let mut stats = NamespaceStats::new("text_chunks", BackendKind::Redis);
        stats.keys = 2;
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["backend"], "redis");
        assert_eq!(json["keys"], 2);
        assert_eq!(BackendKind::Json.to_string(), "json");
        assert_eq!(BackendKind::Redis.to_string(), "redis");
        assert_eq!(
            crate::RedisMode::Standalone.to_string()
                + crate::RedisMode::Sentinel.as_str()
                + &crate::RedisMode::Cluster.to_string(),
            "standalonesentinelcluster"
        );
    }

    #[test]
    fn namespaces_are_checked() {
        for ok in NAMESPACES.iter().copied().chain(["a", "v1.2-x_Y"]) {
            assert!(validate_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a:b", "a*", "docs[v1]", "a b", "a?", "é"] {
            let err = validate_namespace(bad).unwrap_err().to_string();
            assert!(err.contains("invalid namespace"), "{bad}: {err}");
        }
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("ns", "a:b*[c]? \n🦀").is_ok());
        assert!(validate_id("ns", &"x".repeat(MAX_ID_BYTES)).is_ok());
        let long = validate_id("ns", &"x".repeat(MAX_ID_BYTES + 1)).unwrap_err();
        assert!(long.to_string().contains("65537 bytes"), "{long}");
        assert!(validate_id("ns", "")
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn projection_keeps_only_named_fields() {
        let v = serde_json::json!({"a": 1, "b": 2, "c": 3});
        let f = vec!["a".to_string(), "c".to_string(), "zz".to_string()];
        assert_eq!(project(v, Some(&f)), serde_json::json!({"a": 1, "c": 3}));
        assert_eq!(
            project(serde_json::json!([1]), Some(&f)),
            serde_json::json!([1])
        );
    }
}
