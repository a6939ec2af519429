//! The typed side of the store: [`KvStoreExt`] (serde in and out), what a store hands over
//! for it ([`Stored`]), and the value structs of nano-graphrag's namespaces.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Item, KvStore};
use crate::error::{Error, Result};

/// Typed conveniences over any [`KvStore`]: values go through serde, so a struct such as
/// [`TextChunk`] round-trips without hand conversion.
///
/// Implemented for every `KvStore` (sized or not); backends never re-implement it.
pub trait KvStoreExt: KvStore {
    /// [`KvStore::get_by_id`], deserialized into `T`.
    ///
    /// One GET on Redis (a batch of one would cost a second round trip for a missing id, to
    /// tell it from a key of another type), its value converted with its strings moved.
    ///
    /// # Errors
    /// As `get_by_id`, plus [`Error::Decode`] naming the namespace and id when the value does
    /// not fit `T`.
    fn get_as<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        match self.get_by_id(id)? {
            None => Ok(None),
            Some(v) => from_stored(self.namespace(), id, Stored::Owned(v)).map(Some),
        }
    }

    /// [`KvStore::get_by_ids`] without field filtering, deserialized into `T` from what the
    /// store holds ([`KvStore::get_json_by_ids`]: on Redis the text read, no [`Value`] built
    /// by the backend).
    ///
    /// # Errors
    /// As `get_by_ids`, plus [`Error::Decode`] naming the namespace and the first id whose
    /// stored text is not JSON or does not fit `T`.
    fn get_many_as<T: DeserializeOwned>(&self, ids: &[String]) -> Result<Vec<Option<T>>> {
        let mut out: Vec<Option<T>> = Vec::with_capacity(ids.len());
        out.resize_with(ids.len(), || None);
        let namespace = self.namespace();
        self.get_json_by_ids(ids, &mut |i, stored| {
            let slot = out.get_mut(i).ok_or_else(|| Error::Unavailable {
                namespace: namespace.to_string(),
                reason: format!("the store answered for index {i} of {} ids", ids.len()),
            })?;
            *slot = Some(from_stored(namespace, &ids[i], stored)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`KvStore::upsert`] of serializable values.
    ///
    /// Each value is built as a [`Value`] and written by the store's own writer: for a 5 KB
    /// `TextChunk` that took 1.43 µs against 4.60 µs for `serde_json` writing the struct
    /// straight to text (its string escape goes a byte at a time; criterion,
    /// `codec/encode_chunk_5KB`, docs/BENCHMARKS.md). [`KvStore::upsert_json`] takes JSON text
    /// for a caller that already has it.
    ///
    /// # Errors
    /// As `upsert`, plus [`Error::Encode`] naming the id when a value cannot be serialized.
    fn upsert_as<T: Serialize>(&self, items: impl IntoIterator<Item = (String, T)>) -> Result<()> {
        let items = items
            .into_iter()
            .map(|(id, v)| match serde_json::to_value(&v) {
                Ok(v) => Ok((id, v)),
                Err(e) => Err(Error::Encode {
                    namespace: self.namespace().to_string(),
                    key: id,
                    reason: e.to_string(),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        self.upsert(items)
    }
}

impl<S: KvStore + ?Sized> KvStoreExt for S {}

/// A stored value as [`KvStore::get_json_by_ids`] hands it over: the form the store holds.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Stored<'a> {
    /// The value's JSON text, as read (decompressed); not checked.
    Text(&'a [u8]),
    /// The value itself, for a store that keeps [`Value`]s.
    Value(&'a Value),
    /// A value of the store's own, handed over (its strings are moved, not copied).
    Owned(Value),
}

/// `T` from the stored value of `id`.
///
/// Text is read into a [`Value`] by the codec's reader, then converted with its strings moved:
/// for a 5 KB `TextChunk` that took 1.55 µs against 2.28 µs for `serde_json::from_slice`
/// straight into the struct, whose string scan goes a byte at a time (criterion,
/// `codec/decode_chunk_5KB`, docs/BENCHMARKS.md).
fn from_stored<T: DeserializeOwned>(namespace: &str, id: &str, stored: Stored<'_>) -> Result<T> {
    let decode_error = |reason: String| Error::Decode {
        namespace: namespace.to_string(),
        key: id.to_string(),
        reason,
    };
    let mismatch =
        |e: serde_json::Error| decode_error(format!("does not match the requested type: {e}"));
    match stored {
        Stored::Text(json) => {
            let value =
                crate::codec::Codec::decode(json).map_err(|e| decode_error(e.to_string()))?;
            serde_json::from_value(value).map_err(mismatch)
        }
        // `&Value` is a serde Deserializer: no clone of the whole value.
        Stored::Value(v) => T::deserialize(v).map_err(mismatch),
        Stored::Owned(v) => serde_json::from_value(v).map_err(mismatch),
    }
}

/// The [`Value`] of a checked JSON text (a `RawValue` always parses; the error is kept for a
/// text serde_json would refuse to read back, such as a number beyond `f64`).
fn parse_raw(namespace: &str, id: &str, json: &RawValue) -> Result<Value> {
    serde_json::from_str(json.get()).map_err(|e| Error::Encode {
        namespace: namespace.to_string(),
        key: id.to_string(),
        reason: e.to_string(),
    })
}

/// The items of an [`KvStore::upsert_json`] as values, for a store that keeps [`Value`]s.
pub(crate) fn parse_items(namespace: &str, items: &[(&str, &RawValue)]) -> Result<Vec<Item>> {
    items
        .iter()
        .map(|(id, json)| Ok(((*id).to_string(), parse_raw(namespace, id, json)?)))
        .collect()
}

/// A text chunk as nano-graphrag stores it in `text_chunks`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextChunk {
    /// Number of tokens in `content`.
    pub tokens: u64,
    /// The chunk's text.
    pub content: String,
    /// Position of the chunk within its document, from 0.
    pub chunk_order_index: u64,
    /// Id of the document (`doc-<md5>`) the chunk comes from.
    pub full_doc_id: String,
}

/// A whole document as nano-graphrag stores it in `full_docs`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FullDoc {
    /// The document's text.
    pub content: String,
}

/// A cached LLM answer as nano-graphrag stores it in `llm_response_cache`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LlmCacheEntry {
    /// The model's answer.
    #[serde(rename = "return")]
    pub answer: String,
    /// The model that gave it.
    pub model: String,
}
