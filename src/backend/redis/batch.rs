//! The batch paths of a namespace: windowed MGET/SET on a single server, per-node chunks on a
//! cluster, key and value encoding.

use super::*;

impl RedisStore {
    /// The TTL applied to writes, in seconds (0 = none).
    pub fn ttl_seconds(&self) -> u64 {
        self.ttl
    }

    /// The full Redis key of an id.
    pub fn key(&self, id: &str) -> String {
        let mut k = String::with_capacity(self.key_prefix.len() + id.len());
        k.push_str(&self.key_prefix);
        k.push_str(id);
        k
    }

    pub(super) fn decode(&self, id: &str, bytes: &[u8]) -> Result<Json> {
        Codec::decode(bytes).map_err(|reason| Error::Decode {
            namespace: self.namespace.clone(),
            key: self.key(id),
            reason: reason.to_string(),
        })
    }

    /// The error for a per-key failure inside a batch.
    pub(super) fn key_error(&self, operation: &'static str, id: &str, e: RedisError) -> Error {
        if e.code() == Some("WRONGTYPE") {
            return self.wrong_type(id, "non-string value");
        }
        Error::Redis {
            operation,
            namespace: self.namespace.clone(),
            source: e,
        }
    }

    pub(super) fn wrong_type(&self, id: &str, found: &str) -> Error {
        Error::WrongType {
            namespace: self.namespace.clone(),
            key: self.key(id),
            found: found.to_string(),
        }
    }

    /// For ids that MGET reported missing: a key that exists with another type is an error,
    /// never "missing" (MGET answers nil for a hash, a list, ...).
    pub(super) fn check_missing_types(&self, ids: &[&String]) -> Result<()> {
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        let existing: usize = self.shared.with_conn("get_by_ids", &self.namespace, |c| {
            redis::cmd("EXISTS").arg(&keys).query(c)
        })?;
        if existing == 0 {
            return Ok(());
        }
        let cmds: Vec<Cmd> = keys
            .iter()
            .map(|k| redis::cmd("TYPE").arg(k).clone())
            .collect();
        let types = self.shared.batch("get_by_ids", &self.namespace, cmds)?;
        for (id, t) in ids.iter().zip(types) {
            let t: String = t
                .and_then(|v| Ok(redis::from_redis_value(v)?))
                .unwrap_or_default();
            if t != "none" && t != "string" && !t.is_empty() {
                return Err(self.wrong_type(id, &t));
            }
        }
        Ok(())
    }

    /// Appends the stored bytes of the JSON text `json` to `out`; see
    /// [`Codec::encode_json_into`].
    pub(super) fn encode_json_into(
        &self,
        id: &str,
        json: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize> {
        self.shared
            .codec
            .encode_json_into(json, out)
            .map_err(|reason| Error::Encode {
                namespace: self.namespace.clone(),
                key: self.key(id),
                reason: reason.to_string(),
            })
    }

    /// Appends the stored bytes of `v` to `out`; see [`Codec::encode_into`].
    pub(super) fn encode_into(&self, id: &str, v: &Json, out: &mut Vec<u8>) -> Result<usize> {
        self.shared
            .codec
            .encode_into(v, out)
            .map_err(|reason| Error::Encode {
                namespace: self.namespace.clone(),
                key: self.key(id),
                reason: reason.to_string(),
            })
    }

    /// `upsert` on a single server: each chunk's SETs (and WAIT) packed by hand, window by
    /// window (each value encoded into a reused buffer, then copied in).
    pub(super) fn upsert_single<V: Copy>(
        &self,
        pool: &RedisPool,
        items: &[(&str, V)],
        encode_into: impl Fn(&str, V, &mut Vec<u8>) -> Result<usize>,
    ) -> Result<()> {
        let ttl = self.ttl.to_string();
        let want = self.shared.config.wait_replicas;
        let wait_ms = (self.shared.config.wait_timeout.as_millis() as u64).to_string();
        let mut value = Vec::new();
        let mut start = 0;
        while start < items.len() {
            // One chunk: at most WRITE_CHUNK items or WRITE_CHUNK_BYTES of values, sent as
            // windows of SET commands (the last followed by WAIT when replicas are awaited). The
            // packed windows are kept until the chunk is acknowledged: a retry re-sends the same
            // bytes without encoding again.
            let mut windows: Vec<(Vec<u8>, usize)> = Vec::new();
            let mut next = start;
            let mut bytes = 0usize;
            let mut chunk_done = false;
            // Encodes (and compresses) the next window on the caller's thread. Returns false
            // when the chunk has no more items.
            let mut encode_window = |windows: &mut Vec<(Vec<u8>, usize)>| -> Result<bool> {
                if chunk_done {
                    return Ok(false);
                }
                let mut buf = Vec::new();
                let first = next;
                while next < items.len()
                    && next - first < UPSERT_WINDOW
                    && next - start < WRITE_CHUNK
                    && bytes < WRITE_CHUNK_BYTES
                {
                    let (id, v) = &items[next];
                    value.clear();
                    bytes += encode_into(id, *v, &mut value)?;
                    resp_array(&mut buf, if self.ttl > 0 { 5 } else { 3 });
                    resp_bulk(&mut buf, &[b"SET"]);
                    resp_bulk(&mut buf, &[self.key_prefix.as_bytes(), id.as_bytes()]);
                    resp_bulk(&mut buf, &[&value]);
                    if self.ttl > 0 {
                        resp_bulk(&mut buf, &[b"EX"]);
                        resp_bulk(&mut buf, &[ttl.as_bytes()]);
                    }
                    next += 1;
                }
                let mut count = next - first;
                chunk_done = next == items.len()
                    || next - start >= WRITE_CHUNK
                    || bytes >= WRITE_CHUNK_BYTES;
                if chunk_done && want > 0 {
                    // WAIT counts the replicas that have every write of this connection.
                    resp_array(&mut buf, 3);
                    resp_bulk(&mut buf, &[b"WAIT"]);
                    resp_bulk(&mut buf, &[want.to_string().as_bytes()]);
                    resp_bulk(&mut buf, &[wait_ms.as_bytes()]);
                    count += 1;
                }
                if count > 0 {
                    windows.push((buf, count));
                }
                Ok(count > 0)
            };
            // The first value that failed to encode: the windows before it are still sent (as
            // a whole chunk was before), then the error is returned.
            let mut failed: Option<Error> = None;
            let confirmed = self
                .shared
                .with_single(pool, "upsert", &self.namespace, |c| {
                    let (mut sent, mut received) = (0, 0);
                    let mut last = Value::Nil;
                    loop {
                        // Two windows in flight: the server stores one while the next is encoded.
                        while sent - received < 2 {
                            if sent == windows.len() {
                                if failed.is_some() {
                                    break;
                                }
                                match encode_window(&mut windows) {
                                    Ok(true) => {}
                                    Ok(false) => break,
                                    Err(e) => {
                                        failed = Some(e);
                                        break;
                                    }
                                }
                            }
                            c.conn.send_packed_command(&windows[sent].0)?;
                            sent += 1;
                        }
                        if received == sent {
                            break;
                        }
                        let count = windows[received].1;
                        let mut replies = Vec::with_capacity(count);
                        for _ in 0..count {
                            replies.push(c.conn.recv_response()?);
                        }
                        received += 1;
                        let mut replies = pipeline_replies(replies)?;
                        if let Some(v) = replies.pop() {
                            last = v;
                        }
                    }
                    if want > 0 && failed.is_none() {
                        redis::from_redis_value::<i64>(last).map_err(RedisError::from)
                    } else {
                        Ok(0)
                    }
                })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if want > 0 {
                check_replicas(&self.namespace, want, confirmed)?;
            }
            start = next;
        }
        Ok(())
    }

    pub(super) fn pattern(&self) -> String {
        format!("{}*", glob_escape(&self.key_prefix))
    }

    pub(super) fn id_of(&self, key: Vec<u8>) -> Result<String> {
        let prefix = self.key_prefix.len();
        match String::from_utf8(key) {
            // Moves the id to the front of the key's own buffer: no allocation per key.
            Ok(mut k) if k.len() > prefix => {
                k.drain(..prefix);
                Ok(k)
            }
            Ok(k) => Err(Error::Decode {
                namespace: self.namespace.clone(),
                key: k,
                reason: "key has no id after the namespace".into(),
            }),
            Err(e) => Err(Error::Decode {
                namespace: self.namespace.clone(),
                key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
                reason: "key is not valid UTF-8".into(),
            }),
        }
    }

    /// `get_by_ids` on a single server: MGETs of [`MGET_WINDOW`] ids, two in flight, each
    /// window decoded while the server answers the next.
    pub(super) fn get_by_ids_single(
        &self,
        pool: &RedisPool,
        ids: &[String],
        fields: Option<&[String]>,
    ) -> Result<Vec<Option<Json>>> {
        let mut out: Vec<Option<Json>> = Vec::with_capacity(ids.len());
        out.resize_with(ids.len(), || None);
        self.mget_single(pool, ids, &mut |i, id, bytes| {
            out[i] = Some(project(self.decode(id, bytes)?, fields));
            Ok(())
        })?;
        Ok(out)
    }

    /// MGETs of [`MGET_WINDOW`] ids, two in flight, handing each stored value to `on_value`
    /// with its index while the server answers the next window. The first error of
    /// `on_value` is returned once the exchange has ended. Ids MGET reports missing are
    /// checked for another type (an error, never "missing").
    pub(super) fn mget_single(
        &self,
        pool: &RedisPool,
        ids: &[String],
        on_value: &mut OnValue<'_>,
    ) -> Result<()> {
        let windows: Vec<&[String]> = ids.chunks(MGET_WINDOW).collect();
        // Packed once: a retry re-sends the same bytes.
        let mut key = String::with_capacity(self.key_prefix.len() + 64);
        let packed: Vec<Vec<u8>> = windows
            .iter()
            .map(|window| {
                let mut cmd = redis::cmd("MGET");
                for id in *window {
                    key.clear();
                    key.push_str(&self.key_prefix);
                    key.push_str(id);
                    cmd.arg(key.as_str());
                }
                cmd.get_packed_command()
            })
            .collect();
        let (missing, failed) =
            self.shared
                .with_single(pool, "get_by_ids", &self.namespace, |c| {
                    let mut missing: Vec<&String> = Vec::new();
                    // The first value that does not decode. The exchange still runs to its end, so
                    // the connection goes back to the pool with nothing left on its socket.
                    let mut failed: Option<Error> = None;
                    let mut sent = 0;
                    while sent < packed.len().min(2) {
                        c.conn.send_packed_command(&packed[sent])?;
                        sent += 1;
                    }
                    let mut index = 0;
                    for window in &windows {
                        let reply = c.conn.recv_response()?;
                        if sent < packed.len() {
                            c.conn.send_packed_command(&packed[sent])?;
                            sent += 1;
                        }
                        // An error reply (BUSY, LOADING ...) as a server error, with its code:
                        // converting it to values would make it a type error, never retried.
                        if let Value::ServerError(e) = reply {
                            return Err(e.into());
                        }
                        let values = mget_values(reply, window.len())?;
                        let first = index;
                        index += window.len();
                        if failed.is_some() {
                            continue;
                        }
                        for (j, (id, v)) in window.iter().zip(values).enumerate() {
                            match v {
                                None => missing.push(id),
                                Some(bytes) => {
                                    if let Err(e) = on_value(first + j, id, &bytes) {
                                        failed = Some(e);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Ok((missing, failed))
                })?;
        if let Some(e) = failed {
            return Err(e);
        }
        // MGET answers nil for a key holding another type: only a missing key may be None.
        for part in missing.chunks(READ_CHUNK) {
            self.check_missing_types(part)?;
        }
        Ok(())
    }

    /// One single-key command per id, as a batch; per-key failures name the id.
    pub(super) fn per_key(
        &self,
        operation: &'static str,
        command: &str,
        ids: &[String],
    ) -> Result<Vec<Value>> {
        let mut key = String::with_capacity(self.key_prefix.len() + 64);
        let cmds: Vec<Cmd> = ids
            .iter()
            .map(|id| {
                key.clear();
                key.push_str(&self.key_prefix);
                key.push_str(id);
                let mut c = redis::cmd(command);
                c.arg(key.as_str());
                c
            })
            .collect();
        let results = self.shared.batch(operation, &self.namespace, cmds)?;
        ids.iter()
            .zip(results)
            .map(|(id, r)| r.map_err(|e| self.key_error(operation, id, e)))
            .collect()
    }

    /// One chunk of a cluster `upsert` (single servers go through [`RedisStore::upsert_single`]).
    pub(super) fn write_chunk(
        &self,
        pool: &ClusterPool,
        keys: &[String],
        values: &[Vec<u8>],
    ) -> Result<()> {
        let ttl = self.ttl;
        let set = |k: &String, v: &Vec<u8>| {
            let mut c = redis::cmd("SET");
            c.arg(k).arg(v.as_slice());
            if ttl > 0 {
                c.arg("EX").arg(ttl);
            }
            c
        };
        let cmds: Vec<Cmd> = keys.iter().zip(values).map(|(k, v)| set(k, v)).collect();
        self.shared.retrying("upsert", &self.namespace, || {
            let mut c = pool
                .get()
                .map_err(|m| pool_error("upsert", &self.namespace, m))?;
            let out = cluster::pipeline(&mut c.conn, &cmds);
            if out.as_ref().err().is_some_and(must_discard) {
                c.mark_broken();
            }
            let results = out.map_err(|e| redis_error("upsert", &self.namespace, e))?;
            if let Some((i, e)) = results
                .into_iter()
                .enumerate()
                .find_map(|(i, r)| r.err().map(|e| (i, e)))
            {
                // Rebuilt to name the key, keeping the server's code: retry decisions
                // (MISCONF, NOREPLICAS, OOM ...) are taken on it.
                return Err(Error::Redis {
                    operation: "upsert",
                    namespace: self.namespace.clone(),
                    source: redis::make_extension_error(
                        e.code().unwrap_or("ERR").to_string(),
                        Some(format!(
                            "SET {} failed: {}",
                            display_id(&keys[i]),
                            e.detail().unwrap_or_default()
                        )),
                    ),
                });
            }
            self.shared
                .wait_for_replicas_cluster(&self.namespace, &mut c.conn, keys)
        })
    }
}

/// The values of an MGET reply of `expected` keys.
fn mget_values(reply: Value, expected: usize) -> RedisResult<Vec<Option<Vec<u8>>>> {
    let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(reply)?;
    if values.len() != expected {
        return Err(RedisError::from((
            redis::ErrorKind::Parse,
            "MGET returned a different number of values than keys asked",
        )));
    }
    Ok(values)
}

/// What [`RedisStore::mget_single`] hands each stored value to: its index, id and bytes.
pub(super) type OnValue<'a> = dyn FnMut(usize, &String, &[u8]) -> Result<()> + 'a;
