//! [`RedisStore`]: one namespace, and its [`KvStore`] implementation.

use super::*;
use crate::store::Stored;
use serde_json::value::RawValue;

/// One namespace in Redis.
#[derive(Debug, Clone)]
pub struct RedisStore {
    pub(super) namespace: String,
    /// `{prefix}:{namespace}:`, built once.
    pub(super) key_prefix: String,
    pub(super) ttl: u64,
    pub(super) shared: Arc<RedisShared>,
}

impl KvStore for RedisStore {
    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for keys in self
            .shared
            .scan_all("all_keys", &self.namespace, &self.pattern())?
        {
            ids.reserve(keys.len());
            for k in keys {
                ids.push(self.id_of(k)?);
            }
        }
        // SCAN may return a key more than once (rehashing, slot migration, a cluster pass
        // repeated).
        dedup_keeping_order(&mut ids);
        Ok(ids)
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Json>> {
        validate_id(&self.namespace, id)?;
        let key = self.key(id);
        let bytes: Option<Vec<u8>> = self
            .shared
            .with_conn("get_by_id", &self.namespace, |c| {
                redis::cmd("GET").arg(&key).query(c)
            })
            .map_err(|e| match e {
                Error::Redis { source, .. } if source.code() == Some("WRONGTYPE") => {
                    self.wrong_type(id, "non-string value")
                }
                other => other,
            })?;
        bytes.map(|b| self.decode(id, &b)).transpose()
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Json>>> {
        validate_ids(&self.namespace, ids)?;
        if let Conns::Single(pool) = &self.shared.conns {
            return self.get_by_ids_single(pool, ids, fields);
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READ_CHUNK) {
            // A cluster gets single-key GETs (never a multi-slot MGET): WRONGTYPE then comes
            // back per key.
            let values: Vec<Option<Vec<u8>>> = self
                .per_key("get_by_ids", "GET", chunk)?
                .into_iter()
                .map(|v| redis::from_redis_value(v).map_err(RedisError::from))
                .collect::<RedisResult<_>>()
                .map_err(|e| redis_error("get_by_ids", &self.namespace, e))?;
            for (id, v) in chunk.iter().zip(values) {
                out.push(match v {
                    None => None,
                    Some(bytes) => Some(project(self.decode(id, &bytes)?, fields)),
                });
            }
        }
        Ok(out)
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        validate_ids(&self.namespace, ids)?;
        let mut present = Vec::with_capacity(ids.len());
        let mut buf = Vec::new();
        for chunk in ids.chunks(READ_CHUNK) {
            let values = match &self.shared.conns {
                // One EXISTS per id (EXISTS with several keys only counts them), packed by hand.
                Conns::Single(_) => {
                    buf.clear();
                    for id in chunk {
                        resp_array(&mut buf, 2);
                        resp_bulk(&mut buf, &[b"EXISTS"]);
                        resp_bulk(&mut buf, &[self.key_prefix.as_bytes(), id.as_bytes()]);
                    }
                    let replies = self.shared.with_conn("filter_keys", &self.namespace, |c| {
                        c.req_packed_commands(&buf, 0, chunk.len())
                    })?;
                    chunk
                        .iter()
                        .zip(replies)
                        .map(|(id, r)| {
                            value_result(r).map_err(|e| self.key_error("filter_keys", id, e))
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                Conns::Cluster(_) => self.per_key("filter_keys", "EXISTS", chunk)?,
            };
            for v in values {
                present.push(matches!(v, Value::Int(n) if n > 0));
            }
        }
        Ok(missing_in_order(ids, |i| present[i]))
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        let refs: Vec<(&str, &Json)> = items.iter().map(|(id, v)| (id.as_str(), v)).collect();
        self.upsert_refs(&refs)
    }

    /// Encodes straight from the references: no copy of the values.
    fn upsert_refs(&self, items: &[(&str, &Json)]) -> Result<()> {
        self.upsert_with(items, |id, v, out| self.encode_into(id, v, out))
    }

    /// Stores each JSON text as it is (compressed as configured): no `Value` is built.
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        self.upsert_with(items, |id, json, out| {
            self.encode_json_into(id, json.get().as_bytes(), out)
        })
    }

    /// Hands over the JSON text read (decompressed in a per-thread buffer when it was
    /// compressed): no `Value` is built.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        validate_ids(&self.namespace, ids)?;
        let mut on_value = |i: usize, id: &String, bytes: &[u8]| -> Result<()> {
            Codec::with_json(bytes, |json| visit(i, Stored::Text(json))).map_err(|reason| {
                Error::Decode {
                    namespace: self.namespace.clone(),
                    key: self.key(id),
                    reason: reason.to_string(),
                }
            })?
        };
        if let Conns::Single(pool) = &self.shared.conns {
            return self.mget_single(pool, ids, &mut on_value);
        }
        let mut first = 0;
        for chunk in ids.chunks(READ_CHUNK) {
            let values: Vec<Option<Vec<u8>>> = self
                .per_key("get_by_ids", "GET", chunk)?
                .into_iter()
                .map(|v| redis::from_redis_value(v).map_err(RedisError::from))
                .collect::<RedisResult<_>>()
                .map_err(|e| redis_error("get_by_ids", &self.namespace, e))?;
            for (j, (id, v)) in chunk.iter().zip(values).enumerate() {
                if let Some(bytes) = v {
                    on_value(first + j, id, &bytes)?;
                }
            }
            first += chunk.len();
        }
        Ok(())
    }

    /// Pages of SCAN handed over as they arrive; no connection is held while `page` runs.
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        self.shared
            .scan_pages("scan_keys", &self.namespace, &self.pattern(), &mut |keys| {
                let ids = keys
                    .into_iter()
                    .map(|k| self.id_of(k))
                    .collect::<Result<Vec<_>>>()?;
                page(ids)
            })
    }
    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        validate_ids(&self.namespace, ids)?;
        for chunk in ids.chunks(READ_CHUNK) {
            match &self.shared.conns {
                Conns::Single(_) => {
                    let keys: Vec<String> = chunk.iter().map(|id| self.key(id)).collect();
                    self.shared
                        .with_conn("delete_by_ids", &self.namespace, |c| {
                            redis::cmd("UNLINK").arg(&keys).query::<()>(c)
                        })?;
                }
                Conns::Cluster(_) => {
                    self.per_key("delete_by_ids", "UNLINK", chunk)?;
                }
            }
        }
        Ok(())
    }

    /// Each SCAN page is unlinked as it comes: memory is bounded by a page, not by the
    /// namespace (deleting during a SCAN is safe: keys present throughout are still returned).
    fn clear(&self) -> Result<()> {
        self.shared
            .scan_pages("clear", &self.namespace, &self.pattern(), &mut |page| {
                let cmds: Vec<Cmd> = page
                    .iter()
                    .map(|k| redis::cmd("UNLINK").arg(k.as_slice()).clone())
                    .collect();
                for r in self.shared.batch("clear", &self.namespace, cmds)? {
                    r.map_err(|e| redis_error("clear", &self.namespace, e))?;
                }
                Ok(())
            })
    }

    fn index_start_callback(&self) -> Result<()> {
        self.shared
            .with_conn("index_start_callback", &self.namespace, |c| {
                redis::cmd("PING").query::<()>(c)
            })
    }

    fn index_done_callback(&self) -> Result<()> {
        self.shared.checkpoint()
    }

    fn stats(&self) -> Result<NamespaceStats> {
        let mut count = 0u64;
        let mut sample: Vec<Vec<u8>> = Vec::new();
        self.shared
            .scan("stats", &self.namespace, &self.pattern(), &mut |keys| {
                count += keys.len() as u64;
                let room = STATS_SAMPLE.saturating_sub(sample.len());
                sample.extend(keys.into_iter().take(room));
                Ok(())
            })?;
        let bytes = if sample.is_empty() {
            0
        } else {
            let cmds: Vec<Cmd> = sample
                .iter()
                .map(|k| redis::cmd("STRLEN").arg(k.as_slice()).clone())
                .collect();
            let total: u64 = self
                .shared
                .batch("stats", &self.namespace, cmds)?
                .into_iter()
                .map(|r| match r {
                    Ok(Value::Int(n)) => n.max(0) as u64,
                    _ => 0,
                })
                .sum();
            total * count / sample.len() as u64
        };
        Ok(NamespaceStats {
            namespace: self.namespace.clone(),
            backend: BackendKind::Redis,
            keys: count,
            bytes,
            bytes_sampled: count > sample.len() as u64,
            ttl_seconds: self.ttl,
        })
    }
}

impl RedisStore {
    /// `upsert` of values of any form `encode_into` knows how to store: values encoded on the
    /// caller's thread, one window or chunk at a time.
    fn upsert_with<V: Copy>(
        &self,
        items: &[(&str, V)],
        encode_into: impl Fn(&str, V, &mut Vec<u8>) -> Result<usize>,
    ) -> Result<()> {
        for (id, _) in items {
            validate_id(&self.namespace, id)?;
        }
        let pool = match &self.shared.conns {
            Conns::Single(pool) => return self.upsert_single(pool, items, encode_into),
            Conns::Cluster(pool) => pool,
        };
        let mut start = 0;
        while start < items.len() {
            // Encode (and compress) on the caller's thread, before holding a connection.
            let mut end = start;
            let mut bytes = 0usize;
            let mut values = Vec::new();
            while end < items.len() && end - start < WRITE_CHUNK && bytes < WRITE_CHUNK_BYTES {
                let mut v = Vec::new();
                bytes += encode_into(items[end].0, items[end].1, &mut v)?;
                values.push(v);
                end += 1;
            }
            let keys: Vec<String> = items[start..end]
                .iter()
                .map(|(id, _)| self.key(id))
                .collect();
            self.write_chunk(pool, &keys, &values)?;
            start = end;
        }
        Ok(())
    }
}

/// Drops the repeats of `ids`, keeping the first of each, in place. Repeats are rare (SCAN
/// repeats a key only when the table is resized or a slot moves during the scan), so each
/// id is looked up by a 64-bit hash of its bytes in a table of hashes, and its text compared
/// only when a hash was seen before; two different ids with one hash (never seen in
/// practice) send the whole list through sort-and-dedup instead. For 100,000 ids this costs
/// a few milliseconds, where sorting them cost 23-26 ms and a `HashSet<String>` 34-47 ms.
pub(crate) fn dedup_keeping_order(ids: &mut Vec<String>) {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    let mut first: HashMap<u64, usize, BuildIdentity> =
        HashMap::with_capacity_and_hasher(ids.len(), BuildIdentity);
    let mut kept = 0;
    for i in 0..ids.len() {
        match first.entry(id_hash(ids[i].as_bytes())) {
            Entry::Vacant(v) => {
                v.insert(kept);
                ids.swap(kept, i);
                kept += 1;
            }
            Entry::Occupied(o) if ids[*o.get()] == ids[i] => {}
            Entry::Occupied(_) => {
                ids.sort_unstable();
                ids.dedup();
                return;
            }
        }
    }
    ids.truncate(kept);
}

/// A fast, non-cryptographic 64-bit hash, eight bytes at a time, each word mixed in by a
/// multiply and a shift, the length and a final avalanche (murmur3's `fmix64`) at the end.
fn id_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = (h ^ w).wrapping_mul(K);
        h ^= h >> 32;
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^= bytes.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A hasher for keys that are hashes already.
#[derive(Default, Clone, Copy)]
struct BuildIdentity;

impl std::hash::BuildHasher for BuildIdentity {
    type Hasher = Identity;
    fn build_hasher(&self) -> Identity {
        Identity(0)
    }
}

struct Identity(u64);

impl std::hash::Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod dedup_tests {
    use super::dedup_keeping_order;

    #[test]
    fn repeats_are_dropped_and_the_first_order_kept() {
        let mut ids: Vec<String> = ["c", "a", "c", "b", "a", "d", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        dedup_keeping_order(&mut ids);
        assert_eq!(ids, ["c", "a", "b", "d"]);
    }

    #[test]
    fn many_ids_of_every_length_keep_one_each() {
        let mut ids: Vec<String> = (0..20_000).map(|i| format!("chunk-{i:x}")).collect();
        ids.extend((0..20_000).step_by(7).map(|i| format!("chunk-{i:x}")));
        ids.extend((0..300).map(|i| "x".repeat(i)));
        ids.extend((0..300).map(|i| "x".repeat(i)));
        dedup_keeping_order(&mut ids);
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        assert_eq!(ids.len(), 20_000 + 300);
        assert_eq!(ids[0], "chunk-0");
        assert_eq!(ids[19_999], "chunk-4e1f");
    }
}
