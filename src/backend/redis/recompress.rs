//! Rewriting stored values to the configured compression (`graphrag-kv recompress`), one
//! compare-and-set per key so that a concurrent write is never overwritten.

use super::*;

/// Sets `KEYS[1]` to `ARGV[2]` only while it still holds `ARGV[1]` (the bytes read), keeping
/// its remaining TTL (PTTL and PX rather than KEEPTTL, which servers before 6.0 lack).
/// Returns 1 when set, 2 when it already holds `ARGV[2]` (a retry of a batch that was applied,
/// or another recompress), 0 when it changed or went meanwhile. One key, so a cluster routes it
/// by that key's slot.
const COMPARE_AND_SET: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[2] then return 2 end
if cur ~= ARGV[1] then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"#;

/// What [`RedisStore::recompress`] did with the keys it was given.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Recompressed {
    /// Keys rewritten to the configured compression.
    pub rewritten: u64,
    /// Keys already stored as the configured compression writes them (left alone).
    pub current: u64,
    /// Keys written or deleted by someone else between the read and the rewrite (left as
    /// that writer left them, which is already in its own codec).
    pub changed: u64,
    /// Keys whose value cannot be decoded or is not a string (left alone), with the error
    /// naming each.
    pub unreadable: Vec<Error>,
}

impl Recompressed {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: Recompressed) {
        self.rewritten += other.rewritten;
        self.current += other.current;
        self.changed += other.changed;
        self.unreadable.extend(other.unreadable);
    }
}

impl RedisStore {
    /// Rewrites the values of `ids` in the configured compression (`REDIS_COMPRESSION`,
    /// `REDIS_COMPRESSION_LEVEL`), keeping each JSON text byte for byte.
    ///
    /// Each key is read, re-encoded and then set by a compare-and-set script only if it still
    /// holds the bytes read, keeping its TTL: a value written meanwhile (by an indexer, in any
    /// codec) is never overwritten, only counted as changed. Ids that are missing count as
    /// changed too. Running it again over the same ids is safe and finds them current, so an
    /// interrupted pass is finished by running it again.
    ///
    /// # Errors
    /// Redis failures of the batch as a whole. A value that cannot be decoded is not an error
    /// of the call: it is left as it is and reported in [`Recompressed::unreadable`].
    pub fn recompress(&self, ids: &[String]) -> Result<Recompressed> {
        const OPERATION: &str = "recompress";
        validate_ids(&self.namespace, ids)?;
        let mut out = Recompressed::default();
        for chunk in ids.chunks(READ_CHUNK) {
            let gets: Vec<Cmd> = chunk
                .iter()
                .map(|id| redis::cmd("GET").arg(self.key(id)).clone())
                .collect();
            let stored = self.shared.batch(OPERATION, &self.namespace, gets)?;
            let mut cas = Vec::new();
            for (id, reply) in chunk.iter().zip(stored) {
                let bytes: Option<Vec<u8>> = match reply
                    .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
                {
                    Ok(b) => b,
                    Err(e) if e.code() == Some("WRONGTYPE") => {
                        out.unreadable.push(self.key_error(OPERATION, id, e));
                        continue;
                    }
                    Err(e) => return Err(self.key_error(OPERATION, id, e)),
                };
                let Some(bytes) = bytes else {
                    out.changed += 1;
                    continue;
                };
                match self.shared.codec.recode(&bytes) {
                    Ok(None) => out.current += 1,
                    Ok(Some(fresh)) => {
                        let mut c = redis::cmd("EVAL");
                        c.arg(COMPARE_AND_SET)
                            .arg(1)
                            .arg(self.key(id))
                            .arg(bytes)
                            .arg(fresh);
                        cas.push((id, c));
                    }
                    Err(reason) => out.unreadable.push(Error::Decode {
                        namespace: self.namespace.clone(),
                        key: self.key(id),
                        reason: reason.to_string(),
                    }),
                }
            }
            if cas.is_empty() {
                continue;
            }
            let (cas_ids, cmds): (Vec<&String>, Vec<Cmd>) = cas.into_iter().unzip();
            // Safe to send again after a lost reply: a script that already ran finds the new
            // bytes and answers 2.
            let replies = self.shared.batch(OPERATION, &self.namespace, cmds)?;
            for (id, reply) in cas_ids.into_iter().zip(replies) {
                match reply
                    .and_then(|v| redis::from_redis_value::<i64>(v).map_err(RedisError::from))
                {
                    Ok(1) | Ok(2) => out.rewritten += 1,
                    Ok(_) => out.changed += 1,
                    Err(e) => return Err(self.key_error(OPERATION, id, e)),
                }
            }
        }
        Ok(out)
    }
}
