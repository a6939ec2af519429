//! What the topics share: stores over Redis and JSON with write-behind, a store that keeps what is
//! parked in it, small configurations.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use graphrag_kv::write_behind::{UnsentWrite, WriteBehind, WriteBehindConfig};
use graphrag_kv::{
    BackendKind, Error, Item, JsonDir, KvStore, NamespaceStats, RedisShared, StoreConfig,
};
use serde_json::Value;

use crate::support::RedisServer;

/// A shared store used as a `KvStore` (the JSON backend hands out `Arc<JsonFileStore>`).
pub(crate) struct Shared<T: ?Sized>(pub(crate) Arc<T>);

impl<T: KvStore + ?Sized> KvStore for Shared<T> {
    fn namespace(&self) -> &str {
        self.0.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.0.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        self.0.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        self.0.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.0.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        self.0.upsert(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.0.delete_by_ids(ids)
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.0.clear()
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_start_callback()
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_done_callback()
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        self.0.stats()
    }
}

/// Batches of 3, a queue of 16 and no lingering: every test crosses many batch boundaries and
/// writers often wait for room.
pub(crate) fn tiny_batches() -> WriteBehindConfig {
    WriteBehindConfig::builder()
        .batch_items(3)
        .capacity(16)
        .max_delay(Duration::ZERO)
        .build()
        .unwrap()
}

/// Redis with short timeouts, so a stopped server is noticed quickly.
pub(crate) fn redis_shared(server: &RedisServer, prefix: &str) -> Arc<RedisShared> {
    let config = StoreConfig::builder()
        .backend(BackendKind::Redis)
        .redis_url(server.url())
        .key_prefix(prefix)
        .connection_timeout(Duration::from_millis(300))
        .socket_timeout(Duration::from_secs(5))
        .pool_timeout(Duration::from_millis(600))
        .retries(0)
        .max_connections(8)
        .build()
        .unwrap();
    RedisShared::connect(&config.redis).unwrap()
}

pub(crate) fn wb_redis_with(
    config: WriteBehindConfig,
) -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    let server = RedisServer::start();
    let shared = redis_shared(&server, "wb");
    (server, move |ns: &str| {
        Arc::new(WriteBehind::new(
            shared.namespace(ns).unwrap(),
            config.clone(),
        )) as Arc<dyn KvStore>
    })
}

pub(crate) fn wb_json_with(
    config: WriteBehindConfig,
) -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let json = JsonDir::open(dir.path()).unwrap();
    (dir, move |ns: &str| {
        Arc::new(WriteBehind::new(
            Shared(json.namespace(ns).unwrap()),
            config.clone(),
        )) as Arc<dyn KvStore>
    })
}

pub(crate) fn wb_redis() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_redis_with(WriteBehindConfig::default())
}
pub(crate) fn wb_redis_tiny() -> (RedisServer, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_redis_with(tiny_batches())
}
pub(crate) fn wb_json() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_json_with(WriteBehindConfig::default())
}
pub(crate) fn wb_json_tiny() -> (tempfile::TempDir, impl Fn(&str) -> Arc<dyn KvStore>) {
    wb_json_with(tiny_batches())
}

pub(crate) fn ids(range: std::ops::Range<usize>, prefix: &str) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// A store that keeps what is parked in it (as the fallback's journal does) and forwards
/// everything else.
pub(crate) struct Parks<S> {
    pub(crate) inner: S,
    pub(crate) parked: Mutex<Vec<(String, UnsentWrite)>>,
}

impl<S> Parks<S> {
    pub(crate) fn new(inner: S) -> Arc<Parks<S>> {
        Arc::new(Parks {
            inner,
            parked: Mutex::new(Vec::new()),
        })
    }
}

#[deny(clippy::missing_trait_methods)]
impl<S: KvStore> KvStore for Parks<S> {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.inner.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        self.inner.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        self.inner.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.inner.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        self.inner.upsert(items)
    }
    fn upsert_refs(&self, items: &[(&str, &Value)]) -> graphrag_kv::Result<()> {
        self.inner.upsert_refs(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.inner.delete_by_ids(ids)
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.inner.clear()
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        self.inner.index_start_callback()
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        self.inner.index_done_callback()
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        self.inner.stats()
    }
    fn flush(&self) -> graphrag_kv::Result<()> {
        self.inner.flush()
    }
    fn scan_keys(
        &self,
        page: &mut dyn FnMut(Vec<String>) -> graphrag_kv::Result<()>,
    ) -> graphrag_kv::Result<()> {
        self.inner.scan_keys(page)
    }
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, graphrag_kv::Stored<'_>) -> graphrag_kv::Result<()>,
    ) -> graphrag_kv::Result<()> {
        self.inner.get_json_by_ids(ids, visit)
    }
    fn upsert_json(
        &self,
        items: &[(&str, &serde_json::value::RawValue)],
    ) -> graphrag_kv::Result<()> {
        self.inner.upsert_json(items)
    }
    fn park(&self, writes: Vec<UnsentWrite>) -> graphrag_kv::Result<()> {
        let mut parked = self.parked.lock().unwrap();
        parked.extend(
            writes
                .into_iter()
                .map(|w| (self.namespace().to_string(), w)),
        );
        Ok(())
    }
}

/// Refuses (non-retryably, as for a value too large) upserts of ids starting with "bad".
pub(crate) struct RefusesBadIds<S>(pub(crate) S);

impl<S: KvStore> KvStore for RefusesBadIds<S> {
    fn namespace(&self) -> &str {
        self.0.namespace()
    }
    fn all_keys(&self) -> graphrag_kv::Result<Vec<String>> {
        self.0.all_keys()
    }
    fn get_by_id(&self, id: &str) -> graphrag_kv::Result<Option<Value>> {
        self.0.get_by_id(id)
    }
    fn get_by_ids(
        &self,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> graphrag_kv::Result<Vec<Option<Value>>> {
        self.0.get_by_ids(ids, fields)
    }
    fn filter_keys(&self, ids: &[String]) -> graphrag_kv::Result<Vec<String>> {
        self.0.filter_keys(ids)
    }
    fn upsert(&self, items: Vec<Item>) -> graphrag_kv::Result<()> {
        if let Some((id, _)) = items.iter().find(|(id, _)| id.starts_with("bad")) {
            return Err(Error::Encode {
                namespace: self.namespace().to_string(),
                key: id.clone(),
                reason: "value too large".into(),
            });
        }
        self.0.upsert(items)
    }
    fn delete_by_ids(&self, ids: &[String]) -> graphrag_kv::Result<()> {
        self.0.delete_by_ids(ids)
    }
    fn clear(&self) -> graphrag_kv::Result<()> {
        self.0.clear()
    }
    fn index_start_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_start_callback()
    }
    fn index_done_callback(&self) -> graphrag_kv::Result<()> {
        self.0.index_done_callback()
    }
    fn stats(&self) -> graphrag_kv::Result<NamespaceStats> {
        self.0.stats()
    }
}
