//! Values to bytes and back, for Redis.
//!
//! A value is stored as its plain UTF-8 JSON, so a Python worker doing `json.loads(GET key)`
//! reads it, unless compression is on and the JSON is at least `min_bytes` long and shrinks.
//! A compressed value is a frame:
//!
//! ```text
//! 0xFF 'G' 'K' '1' | u32 LE: length of the JSON | lz4 block
//! ```
//!
//! `0xFF` never occurs in UTF-8, so no JSON text (and no value a Python worker wrote) can be
//! mistaken for a frame. The length is checked against [`MAX_VALUE_BYTES`] before anything is
//! allocated, so a corrupt or hostile header cannot make the reader allocate gigabytes.

use serde_json::Value;

use crate::config::Compression;

/// The first four bytes of a compressed value.
pub const FRAME_MAGIC: [u8; 4] = [0xFF, b'G', b'K', b'1'];

/// The largest value accepted, in bytes of JSON: 512 MiB, Redis's own limit for one value.
pub const MAX_VALUE_BYTES: usize = 512 * 1024 * 1024;

const HEADER_LEN: usize = FRAME_MAGIC.len() + 4;

/// Encodes values as configured.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    compression: Compression,
    min_bytes: usize,
}

impl Codec {
    /// A codec compressing with `compression` values of at least `min_bytes` bytes of JSON.
    pub fn new(compression: Compression, min_bytes: usize) -> Self {
        Codec {
            compression,
            min_bytes,
        }
    }

    /// The bytes to store for `value`.
    ///
    /// # Errors
    /// A message when the JSON is larger than [`MAX_VALUE_BYTES`] (the caller names the key).
    pub fn encode(&self, value: &Value) -> Result<Vec<u8>, String> {
        // serde_json cannot fail on a Value (its map keys are strings).
        let json = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.encode_json(json)
    }

    /// The bytes to store for an already serialized JSON text.
    ///
    /// # Errors
    /// A message when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_json(&self, json: Vec<u8>) -> Result<Vec<u8>, String> {
        if json.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "{} bytes of JSON is above the limit of {MAX_VALUE_BYTES} bytes",
                json.len()
            ));
        }
        if self.compression == Compression::None || json.len() < self.min_bytes {
            return Ok(json);
        }
        let mut out = vec![0u8; HEADER_LEN + lz4_flex::block::get_maximum_output_size(json.len())];
        out[..4].copy_from_slice(&FRAME_MAGIC);
        out[4..8].copy_from_slice(&(json.len() as u32).to_le_bytes());
        match lz4_flex::block::compress_into(&json, &mut out[HEADER_LEN..]) {
            // Keep the plain JSON when compression does not pay: it costs reads nothing and
            // stays readable by every client.
            Ok(n) if HEADER_LEN + n < json.len() => {
                out.truncate(HEADER_LEN + n);
                Ok(out)
            }
            _ => Ok(json),
        }
    }

    /// The value stored as `bytes`.
    ///
    /// # Errors
    /// A message saying what is wrong (bad frame, bad JSON with its position); the caller adds
    /// the namespace and key.
    pub fn decode(bytes: &[u8]) -> Result<Value, String> {
        if bytes.first() == Some(&FRAME_MAGIC[0]) {
            let json = decompress(bytes)?;
            return parse(&json).map_err(|e| format!("compressed frame holds invalid JSON: {e}"));
        }
        parse(bytes)
    }
}

fn parse(json: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(json).map_err(|e| {
        format!(
            "not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        )
    })
}

fn decompress(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.len() < HEADER_LEN || bytes[..4] != FRAME_MAGIC {
        return Err("starts with 0xFF but is not a graphrag-kv lz4 frame".into());
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if len > MAX_VALUE_BYTES {
        return Err(format!(
            "lz4 frame claims {len} bytes, above the limit of {MAX_VALUE_BYTES}"
        ));
    }
    // lz4 expands at most ~255x; a claim far beyond that is corrupt, refuse before allocating.
    let body = &bytes[HEADER_LEN..];
    if len > body.len().saturating_mul(255) + 16 {
        return Err(format!(
            "lz4 frame claims {len} bytes from only {} compressed bytes",
            body.len()
        ));
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(body, &mut out) {
        Ok(n) if n == len => Ok(out),
        Ok(n) => Err(format!(
            "lz4 frame decompressed to {n} bytes, header said {len}"
        )),
        Err(e) => Err(format!("corrupt lz4 frame: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prose(n: usize) -> String {
        let words = [
            "the",
            "index",
            "of",
            "chunks",
            "holds",
            "graph",
            "community",
            "report",
        ];
        (0..n)
            .map(|i| words[(i * 7 + i / 3) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn small_values_stay_plain_json() {
        let c = Codec::new(Compression::Lz4, 1024);
        let v = json!({"a": "b"});
        assert_eq!(c.encode(&v).unwrap(), br#"{"a":"b"}"#);
    }

    #[test]
    fn large_values_round_trip_compressed() {
        let c = Codec::new(Compression::Lz4, 1024);
        let v = json!({"content": prose(2000), "tokens": 2000});
        let bytes = c.encode(&v).unwrap();
        assert_eq!(bytes[..4], FRAME_MAGIC);
        assert!(bytes.len() < serde_json::to_vec(&v).unwrap().len());
        assert_eq!(Codec::decode(&bytes).unwrap(), v);
        let plain = Codec::new(Compression::None, 0).encode(&v).unwrap();
        assert_eq!(plain[0], b'{');
        assert_eq!(Codec::decode(&plain).unwrap(), v);
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let c = Codec::new(Compression::Lz4, 0);
        let good = c.encode(&json!({"content": prose(500)})).unwrap();
        // absurd size claim
        let mut absurd = good.clone();
        absurd[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Codec::decode(&absurd)
            .unwrap_err()
            .contains("above the limit"));
        // claim larger than the body could hold
        let mut big = good.clone();
        big[4..8].copy_from_slice(&(400 * 1024 * 1024u32).to_le_bytes());
        assert!(Codec::decode(&big).is_err());
        // truncated body
        assert!(Codec::decode(&good[..good.len() / 2]).is_err());
        // header only, wrong magic, garbage
        assert!(Codec::decode(&good[..5]).is_err());
        assert!(Codec::decode(&[0xFF, b'X', 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Codec::decode(b"{not json").unwrap_err().contains("line 1"));
        assert!(Codec::decode(b"").is_err());
        // every truncation and a byte flip at every position: never a panic
        for i in 0..good.len() {
            let _ = Codec::decode(&good[..i]);
            let mut flipped = good.clone();
            flipped[i] ^= 0x5A;
            let _ = Codec::decode(&flipped);
        }
    }
}
