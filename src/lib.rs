//! # graphrag-kv
//!
//! The key-value storage layer of a GraphRAG batch indexer: nano-graphrag's four namespaces
//! (`full_docs`, `text_chunks`, `community_reports`, `llm_response_cache`) behind one blocking
//! [`KvStore`] trait, stored either in nano-graphrag's own JSON files or in a Redis server that
//! every thread, process and machine of an indexing fleet shares.
//!
//! ## Overview
//!
//! - [`KvStore`]: nano-graphrag's operations (`get_by_id`, `get_by_ids`, `filter_keys`,
//!   `upsert`, `delete_by_ids`, `all_keys`, `clear`, `index_done_callback`, `stats`), usable from
//!   many threads through `&self`. Every operation returns a [`Result`]: a failure is never
//!   reported as a missing key.
//! - [`KvStoreExt`]: typed conveniences through serde ([`TextChunk`], [`LlmCacheEntry`], yours).
//! - [`Storage`]: opens namespaces from one [`StoreConfig`] (builder or environment) and owns
//!   what they share: one Redis pool or one JSON directory lock, the fallback journal, one
//!   write-behind queue per namespace, the cross-process locks ([`Storage::locks`]).
//!   [`Storage::builder`] chooses metrics before anything is opened; [`Storage::close`]
//!   flushes, checkpoints and reports errors.
//!
//! ## Layout
//!
//! - `store`: the trait, the typed extension, namespace and id rules.
//! - `error`: the error type and its `is_*` helpers.
//! - `config`: configuration, builder, environment variables, redacted `Debug`.
//! - `storage`: `Storage` and its builder; `storage::stack`, the one place layers are composed
//!   (backend, which retries → fallback | dual write → write-behind → metrics); `storage::locks`,
//!   the lock capability (Redis `SET NX PX` through the backend's pool, in-process for JSON).
//! - `codec`: values to bytes for Redis (plain JSON, or lz4 behind a header), with its own
//!   JSON writer and reader (serde_json's `Value` without its per-byte cost).
//! - `backend::json_file`: nano-graphrag's `kv_store_{namespace}.json` files.
//! - `backend::redis`: the Redis backend on an r2d2 pool, with durable checkpoints.
//! - `retry`: the one retry policy (`REDIS_RETRIES`), the level it is applied at, its bound.
//! - `fallback`: `FallbackStore`, a local journal that keeps writes going while Redis is down.
//! - `write_behind`: `WriteBehind<S>`, writes queued and sent in batches by a background
//!   thread, with read-your-writes.
//! - `dual_write`: `DualWrite<P, S>`, one namespace written to two stores during a migration.
//! - `metrics`: Prometheus metrics: the `Metered<S>` wrapper (`metrics::metered`), and what is
//!   read from the layers at scrape time: pool sizes, retries, queue depths, divergences
//!   (`metrics::observe`), server gauges.
//! - `migrate`: copying and comparing namespaces between backends (`migrate`, `verify`).
//! - `llm`: the LLM interface, a deterministic local stand-in, an OpenAI-compatible client.
//! - `llm_cache`: `LlmCache`, the shared response cache with single-flight across processes,
//!   through the stack's locks.
//! - `llm_hash`: nano-graphrag's id and LLM-cache key hashing, byte for byte.
//! - `rate_limit`: a requests- and tokens-per-minute budget shared by a fleet (GCRA in one
//!   Redis script, in-process on JSON) and `RateLimitedLlm`, the wrapper that waits for it.
//! - `bin/graphrag-kv`: the command line.
//!
//! ## Example
//!
//! ```
//! use graphrag_kv::{KvStoreExt, Storage, StoreConfig, TextChunk, TEXT_CHUNKS};
//!
//! # fn main() -> graphrag_kv::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! // STORAGE_KV_BACKEND=redis in the environment would switch this to Redis.
//! let config = StoreConfig::builder().working_dir(dir.path()).build()?;
//! let storage = Storage::open(&config)?;
//! let chunks = storage.namespace(TEXT_CHUNKS)?;
//!
//! let chunk = TextChunk {
//!     tokens: 3,
//!     content: "a small chunk".into(),
//!     chunk_order_index: 0,
//!     full_doc_id: "doc-1".into(),
//! };
//! chunks.upsert_as([("chunk-1".to_string(), &chunk)])?;
//! assert_eq!(chunks.filter_keys(&["chunk-1".into(), "chunk-2".into()])?, ["chunk-2"]);
//! assert_eq!(chunks.get_as::<TextChunk>("chunk-1")?, Some(chunk));
//! chunks.index_done_callback()?; // durable from here on
//! # Ok(())
//! # }
//! ```
//!
//! ## Feature flags
//!
//! The JSON and Redis backends, the wrappers (`FallbackStore`, `WriteBehind`, `DualWrite`),
//! migration, `LlmCache`, the `LlmClient` trait and `LocalLlm`, the rate limit are always
//! built: they need nothing beyond the core dependencies (redis, r2d2, serde_json, lz4_flex,
//! log).
//!
//! - `cli` (default): the `graphrag-kv` binary, with clap, indicatif, env_logger and ctrlc.
//!   Enables `metrics`, which `graphrag-kv stats` reads server figures through. Library users
//!   turn it off with `default-features = false`.
//! - `metrics`: Prometheus metrics on `prometheus` (without its protobuf support): the
//!   `metrics` module, `Metered`, `Metrics`, `StorageBuilder::metrics`,
//!   `rate_limit::RateLimitMetrics`.
//! - `openai`: `llm::OpenAiClient`, an OpenAI-compatible chat-completions client on `ureq`
//!   (synchronous, rustls). Off by default.
//!
//! The library logs through `log` only; the program that links it chooses the logger.

#![deny(missing_docs)]

pub mod backend;
pub mod codec;
pub mod config;
pub mod dual_write;
pub mod error;
pub mod fallback;
pub mod llm;
pub mod llm_cache;
pub mod llm_hash;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod migrate;
pub mod rate_limit;
pub mod retry;
pub mod storage;
pub mod store;
pub mod write_behind;

pub use backend::json_file::{JsonDir, JsonFileStore};
pub use backend::redis::{RedisMode, RedisShared, RedisStore};
pub use config::{
    BackendKind, ClusterMode, Compression, RedisConfig, StoreConfig, StoreConfigBuilder,
};
pub use dual_write::DualWrite;
pub use error::{ConnectFailure, Error, Result};
#[cfg(feature = "metrics")]
pub use metrics::{Metered, Metrics};
pub use storage::{open_from_env, LockGuard, Locks, Storage, StorageBuilder};
pub use store::{
    validate_id, validate_namespace, FullDoc, Item, KvStore, KvStoreExt, LlmCacheEntry,
    NamespaceStats, Stored, TextChunk, COMMUNITY_REPORTS, FULL_DOCS, KEY_PAGE, LLM_RESPONSE_CACHE,
    MAX_ID_BYTES, NAMESPACES, TEXT_CHUNKS,
};
pub use write_behind::{WriteBehind, WriteBehindConfig};
