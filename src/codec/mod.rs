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
//!
//! The parts, each used only by the ones above it (no module uses this one):
//!
//! - `error`: [`CodecError`] and [`MAX_VALUE_BYTES`].
//! - `frame`: the frame's header, lz4 compression and decompression.
//! - `escape`: finding the bytes a JSON string must escape, many at a time.
//! - `json_write`: values to JSON text, byte for byte serde_json's.
//! - `json_read`: JSON text to serde_json's `Value`, faster, giving up to serde_json on
//!   anything it does not read exactly as serde_json does.

mod error;
mod escape;
mod frame;
mod json_read;
mod json_write;

use std::cell::RefCell;

use serde_json::Value;

use crate::config::Compression;

pub use error::{CodecError, MAX_VALUE_BYTES};
pub use frame::FRAME_MAGIC;
use json_write::write_json;

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
    /// [`CodecError::TooLarge`] when the JSON is larger than [`MAX_VALUE_BYTES`] (the caller
    /// names the key).
    pub fn encode(&self, value: &Value) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        self.encode_into(value, &mut out)?;
        Ok(out)
    }

    /// Appends the bytes to store for `value` to `out` (the same bytes as [`Codec::encode`]),
    /// and returns how many were appended. On error `out` is left as it was.
    ///
    /// The batch write path packs many values into one buffer this way: no `Vec` per value, and
    /// the JSON text of a compressed value lives only in a per-thread scratch buffer.
    ///
    /// # Errors
    /// [`CodecError::TooLarge`] when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_into(&self, value: &Value, out: &mut Vec<u8>) -> Result<usize, CodecError> {
        let start = out.len();
        if self.compression == Compression::None {
            write_json(value, out);
            let len = out.len() - start;
            if len > MAX_VALUE_BYTES {
                out.truncate(start);
                return Err(too_large(len));
            }
            return Ok(len);
        }
        with_scratch(&ENCODE_SCRATCH, |json| {
            json.clear();
            write_json(value, json);
            if json.len() > MAX_VALUE_BYTES {
                return Err(too_large(json.len()));
            }
            self.compress_or_copy(json, out);
            Ok(out.len() - start)
        })
    }

    /// Appends `json` to `out` as a frame when compression is on, the JSON is long enough and
    /// the frame is smaller; else the JSON itself.
    fn compress_or_copy(&self, json: &[u8], out: &mut Vec<u8>) {
        if self.compression == Compression::None || json.len() < self.min_bytes {
            out.extend_from_slice(json);
            return;
        }
        frame::append_lz4(json, out);
    }

    /// The bytes to store for an already serialized JSON text.
    ///
    /// # Errors
    /// [`CodecError::TooLarge`] when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_json(&self, json: Vec<u8>) -> Result<Vec<u8>, CodecError> {
        if json.len() > MAX_VALUE_BYTES {
            return Err(too_large(json.len()));
        }
        if self.compression == Compression::None || json.len() < self.min_bytes {
            return Ok(json);
        }
        let mut out = Vec::new();
        self.compress_or_copy(&json, &mut out);
        Ok(out)
    }

    /// Appends the bytes to store for the JSON text `json` to `out` (the same bytes as
    /// [`Codec::encode_into`] of the value the text parses to, when the text is what
    /// serde_json writes for it), and returns how many were appended: the typed write path,
    /// which serializes a caller's type straight to text. On error `out` is left as it was.
    ///
    /// # Errors
    /// [`CodecError::TooLarge`] when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_json_into(&self, json: &[u8], out: &mut Vec<u8>) -> Result<usize, CodecError> {
        if json.len() > MAX_VALUE_BYTES {
            return Err(too_large(json.len()));
        }
        let start = out.len();
        self.compress_or_copy(json, out);
        Ok(out.len() - start)
    }

    /// Runs `f` on the JSON text stored as `bytes` (decompressed into a per-thread buffer when
    /// it is a frame): the typed read path, which deserializes the caller's type straight from
    /// the text. The text is not checked here; `f` parses it.
    ///
    /// # Errors
    /// A [`CodecError`] for a frame that cannot be decompressed; the caller adds the namespace
    /// and key.
    pub fn with_json<R>(bytes: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<R, CodecError> {
        if bytes.first() == Some(&FRAME_MAGIC[0]) {
            return with_scratch(&DECODE_SCRATCH, |buf| {
                let len = frame::decompress_into(bytes, buf)?;
                Ok(f(&buf[..len]))
            });
        }
        Ok(f(bytes))
    }

    /// The value stored as `bytes`.
    ///
    /// # Errors
    /// A [`CodecError`] saying what is wrong (bad frame, bad JSON with its position); the
    /// caller adds the namespace and key.
    pub fn decode(bytes: &[u8]) -> Result<Value, CodecError> {
        if bytes.first() == Some(&FRAME_MAGIC[0]) {
            // The JSON text is only parsed, never kept: decompress into a per-thread buffer
            // instead of a fresh, zeroed Vec per value.
            return with_scratch(&DECODE_SCRATCH, |buf| {
                let len = frame::decompress_into(bytes, buf)?;
                parse(&buf[..len], true)
            });
        }
        parse(bytes, false)
    }
}

fn too_large(len: usize) -> CodecError {
    CodecError::TooLarge { len }
}

/// Scratch buffers above this capacity are freed after use, so one huge value does not pin its
/// size for the life of the thread.
const SCRATCH_KEEP_BYTES: usize = 1024 * 1024;

thread_local! {
    /// The JSON text of a value being compressed.
    static ENCODE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The JSON text of a compressed value being parsed. Its length only grows (to the largest
    /// value seen, up to `SCRATCH_KEEP_BYTES`), so it is zeroed once, not per value.
    static DECODE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a thread's scratch buffer (a fresh one if the thread's is in use, which cannot
/// happen today since neither JSON writing nor parsing calls back into the codec).
fn with_scratch<T>(
    key: &'static std::thread::LocalKey<RefCell<Vec<u8>>>,
    f: impl FnOnce(&mut Vec<u8>) -> T,
) -> T {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            let out = f(&mut buf);
            if buf.capacity() > SCRATCH_KEEP_BYTES {
                *buf = Vec::new();
            }
            out
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// The value of the JSON text `json`; `compressed` when it came out of a frame.
fn parse(json: &[u8], compressed: bool) -> Result<Value, CodecError> {
    if let Some(value) = json_read::parse(json) {
        return Ok(value);
    }
    // Everything the fast reader does not take, errors included, is serde_json's to decide.
    serde_json::from_slice(json).map_err(|source| CodecError::InvalidJson { compressed, source })
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
    fn encode_into_appends_what_encode_returns() {
        for c in [
            Codec::new(Compression::Lz4, 1024),
            Codec::new(Compression::Lz4, 0),
            Codec::new(Compression::None, 0),
        ] {
            for v in [
                json!({"content": prose(2000)}),
                json!({"a": "b"}),
                json!("tiny"),
            ] {
                let mut out = b"prefix".to_vec();
                let n = c.encode_into(&v, &mut out).unwrap();
                assert_eq!(&out[..6], b"prefix");
                assert_eq!(out.len(), 6 + n);
                assert_eq!(out[6..], c.encode(&v).unwrap()[..]);
                assert_eq!(Codec::decode(&out[6..]).unwrap(), v);
            }
        }
        // A value that does not shrink stays plain JSON even with compression on.
        let c = Codec::new(Compression::Lz4, 0);
        let v = json!("ab");
        assert_eq!(c.encode(&v).unwrap(), b"\"ab\"");
    }

    #[test]
    fn decoding_reuses_its_buffer_across_sizes() {
        let c = Codec::new(Compression::Lz4, 0);
        // Large, then small, then large again: a stale tail must never leak into a value.
        for n in [3000, 200, 5000, 50, 3000] {
            let v = json!({"content": prose(n)});
            assert_eq!(Codec::decode(&c.encode(&v).unwrap()).unwrap(), v);
        }
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let c = Codec::new(Compression::Lz4, 0);
        let good = c.encode(&json!({"content": prose(500)})).unwrap();
        // absurd size claim
        let mut absurd = good.clone();
        absurd[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Codec::decode(&absurd).unwrap_err(),
            CodecError::ClaimAboveLimit { claimed } if claimed == u32::MAX as usize
        ));
        // claim larger than the body could hold
        let mut big = good.clone();
        big[4..8].copy_from_slice(&(400 * 1024 * 1024u32).to_le_bytes());
        assert!(Codec::decode(&big).is_err());
        // truncated body
        assert!(Codec::decode(&good[..good.len() / 2]).is_err());
        // header only, wrong magic, garbage
        assert!(Codec::decode(&good[..5]).is_err());
        assert!(Codec::decode(&[0xFF, b'X', 0, 0, 0, 0, 0, 0]).is_err());
        let e = Codec::decode(b"{not json").unwrap_err();
        assert!(
            matches!(
                e,
                CodecError::InvalidJson {
                    compressed: false,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("line 1"), "{e}");
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
