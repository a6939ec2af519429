//! Values to bytes and back, for Redis.
//!
//! A value is stored as its plain UTF-8 JSON, so a Python worker doing `json.loads(GET key)`
//! reads it, unless compression is on and the JSON is at least `min_bytes` long and shrinks.
//! A compressed value is a frame:
//!
//! ```text
//! 0xFF 'G' 'K' '1' | u32 LE: length of the JSON | lz4 block
//! 0xFF 'G' 'K' '2' | u32 LE: length of the JSON | zstd frame
//! ```
//!
//! The reader goes by the fourth byte, never by the configured compression: a store switched
//! from lz4 to zstd or to none reads every value written before (`graphrag-kv recompress`
//! rewrites them when wanted).
//!
//! `0xFF` never occurs in UTF-8, so no JSON text (and no value a Python worker wrote) can be
//! mistaken for a frame. The length is checked against [`MAX_VALUE_BYTES`] before anything is
//! allocated, so a corrupt or hostile header cannot make the reader allocate gigabytes.
//!
//! The parts, each used only by the ones above it (no module uses this one):
//!
//! - `error`: [`CodecError`] and [`MAX_VALUE_BYTES`].
//! - `frame`: the frame's header, lz4 and zstd compression and decompression.
//! - `escape`: finding the bytes a JSON string must escape, many at a time.
//! - `json_write`: values to JSON text, byte for byte serde_json's.
//! - `json_read`: JSON text to serde_json's `Value`, faster, giving up to serde_json on
//!   anything it does not read exactly as serde_json does.
//! - `non_finite`: Python's `NaN`/`Infinity` in a kv_store file, read as null (used by the
//!   JSON-file backend).

mod error;
mod escape;
mod frame;
mod json_read;
mod json_write;
pub(crate) mod non_finite;

use std::cell::RefCell;

use serde_json::Value;

use crate::config::Compression;

pub use error::{CodecError, MAX_VALUE_BYTES};
pub use frame::{FRAME_MAGIC, ZSTD_FRAME_MAGIC, ZSTD_LEVELS};

/// The zstd level used unless one is configured (`REDIS_COMPRESSION_LEVEL`). Measured with the
/// load tool on 5 KB chunks of prose (docs/BENCHMARKS.md): level 3 holds 1.7% less Redis memory
/// than level 1 (`memory_ratio` 0.574 against 0.584) but writes a third slower (`upsert_100`
/// 0.17x against 0.31x of redis-benchmark), so the fastest level is the default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
use json_write::write_json;

/// Encodes values as configured.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    compression: Compression,
    min_bytes: usize,
    /// The zstd level; unused by the other compressions.
    level: i32,
}

impl Codec {
    /// A codec compressing with `compression` values of at least `min_bytes` bytes of JSON
    /// (zstd at [`DEFAULT_ZSTD_LEVEL`]).
    pub fn new(compression: Compression, min_bytes: usize) -> Self {
        Codec {
            compression,
            min_bytes,
            level: DEFAULT_ZSTD_LEVEL,
        }
    }

    /// The same codec compressing at zstd `level` (clamped to [`ZSTD_LEVELS`]; the
    /// configuration refuses levels outside it). Other compressions have no levels.
    pub fn with_level(mut self, level: i32) -> Self {
        self.level = level.clamp(*ZSTD_LEVELS.start(), *ZSTD_LEVELS.end());
        self
    }

    /// The compression new values are written with.
    pub fn compression(&self) -> Compression {
        self.compression
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
        if json.len() < self.min_bytes {
            out.extend_from_slice(json);
            return;
        }
        match self.compression {
            Compression::Lz4 => frame::append_lz4(json, out),
            Compression::Zstd => frame::append_zstd(json, self.level, out),
            Compression::None => out.extend_from_slice(json),
        }
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

impl Codec {
    /// The bytes this codec would store for a value stored as `stored` (written by any
    /// version or configuration), or `None` when `stored` is already what it writes.
    ///
    /// The JSON text is kept byte for byte (only its compression changes), so a value written
    /// by another client comes back exactly as it was. Plain JSON that this codec would also
    /// store plain is left alone whatever its spacing.
    ///
    /// # Errors
    /// A [`CodecError`] when `stored` does not decode (a corrupt frame, invalid JSON): such a
    /// value is never rewritten.
    pub fn recode(&self, stored: &[u8]) -> Result<Option<Vec<u8>>, CodecError> {
        let json = if stored.first() == Some(&FRAME_MAGIC[0]) {
            let mut buf = Vec::new();
            let len = frame::decompress_into(stored, &mut buf)?;
            buf.truncate(len);
            buf
        } else {
            stored.to_vec()
        };
        // Checked, so a value that cannot be read is reported rather than compressed.
        parse(&json, stored.first() == Some(&FRAME_MAGIC[0]))?;
        let fresh = self.encode_json(json)?;
        let unchanged = fresh == stored || (!frame::is_frame(stored) && !frame::is_frame(&fresh));
        Ok((!unchanged).then_some(fresh))
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
    fn zstd_round_trips_smaller_than_lz4() {
        let v = json!({"content": prose(2000), "tokens": 2000});
        let zstd = Codec::new(Compression::Zstd, 1024).encode(&v).unwrap();
        let lz4 = Codec::new(Compression::Lz4, 1024).encode(&v).unwrap();
        assert_eq!(zstd[..4], ZSTD_FRAME_MAGIC);
        assert!(zstd.len() < lz4.len(), "{} vs {}", zstd.len(), lz4.len());
        assert_eq!(Codec::decode(&zstd).unwrap(), v);
        // Levels change the bytes, never what they decode to.
        for level in [1, 19] {
            let c = Codec::new(Compression::Zstd, 0).with_level(level);
            assert_eq!(Codec::decode(&c.encode(&v).unwrap()).unwrap(), v);
        }
        // Small values stay plain JSON.
        let small = Codec::new(Compression::Zstd, 1024)
            .encode(&json!({"a": 1}))
            .unwrap();
        assert_eq!(small, br#"{"a":1}"#);
    }

    #[test]
    fn every_codec_reads_every_frame() {
        let v = json!({"content": prose(3000)});
        let written: Vec<Vec<u8>> = [Compression::Lz4, Compression::Zstd, Compression::None]
            .into_iter()
            .map(|c| Codec::new(c, 0).encode(&v).unwrap())
            .collect();
        assert_eq!(written[0][..4], FRAME_MAGIC);
        assert_eq!(written[1][..4], ZSTD_FRAME_MAGIC);
        assert_eq!(written[2][0], b'{');
        for bytes in &written {
            assert_eq!(Codec::decode(bytes).unwrap(), v);
        }
    }

    #[test]
    fn recode_changes_only_the_compression() {
        let v = json!({"content": prose(3000)});
        let lz4 = Codec::new(Compression::Lz4, 1024);
        let zstd = Codec::new(Compression::Zstd, 1024);
        let none = Codec::new(Compression::None, 1024);
        let stored = lz4.encode(&v).unwrap();
        let fresh = zstd.recode(&stored).unwrap().expect("lz4 becomes zstd");
        assert_eq!(fresh, zstd.encode(&v).unwrap());
        assert_eq!(zstd.recode(&fresh).unwrap(), None, "already current");
        assert_eq!(lz4.recode(&stored).unwrap(), None);
        // Back to plain JSON, and plain JSON (any spacing) is left alone by `none`.
        assert_eq!(
            none.recode(&fresh).unwrap().unwrap(),
            none.encode(&v).unwrap()
        );
        let spaced = b"{\"content\": \"a b\"}".to_vec();
        assert_eq!(none.recode(&spaced).unwrap(), None);
        assert_eq!(zstd.recode(&spaced).unwrap(), None, "too small to compress");
        // Text another client wrote keeps its exact bytes inside the new frame.
        let python = serde_json::to_string_pretty(&v).unwrap().into_bytes();
        let framed = zstd.recode(&python).unwrap().unwrap();
        let mut buf = Vec::new();
        let n = frame::decompress_into(&framed, &mut buf).unwrap();
        assert_eq!(buf[..n], python[..]);
        // A level change rewrites; garbage is an error, never rewritten.
        assert!(zstd.with_level(19).recode(&fresh).unwrap().is_some());
        assert!(zstd.recode(b"{not json").is_err());
        assert!(zstd.recode(&fresh[..fresh.len() - 3]).is_err());
    }

    #[test]
    fn zstd_size_claims_are_checked_before_allocating() {
        let c = Codec::new(Compression::Zstd, 0);
        let good = c.encode(&json!({"content": prose(500)})).unwrap();
        // A header claim that disagrees with the zstd frame's own content size, either way.
        let true_len = u32::from_le_bytes(good[4..8].try_into().unwrap());
        for claim in [1u32, true_len - 1, true_len + 1] {
            let mut bad = good.clone();
            bad[4..8].copy_from_slice(&claim.to_le_bytes());
            assert!(
                matches!(
                    Codec::decode(&bad).unwrap_err(),
                    CodecError::ContentSizeMismatch { claimed, content_size: Some(_) }
                        if claimed == claim as usize
                ),
                "{claim}"
            );
        }
        // A claim beyond what the body could expand to, before its content size is looked at.
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&(200u32 << 20).to_le_bytes());
        assert!(
            matches!(
                Codec::decode(&huge).unwrap_err(),
                CodecError::ClaimTooLarge { .. }
            ),
            "{:?}",
            Codec::decode(&huge)
        );
        // A zstd frame without a content size (streamed) is refused before decompression.
        let streamed = {
            let json = serde_json::to_vec(&json!({"content": prose(500)})).unwrap();
            let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            std::io::Write::write_all(&mut enc, &json).unwrap();
            let body = enc.finish().unwrap();
            let mut f = ZSTD_FRAME_MAGIC.to_vec();
            f.extend_from_slice(&(json.len() as u32).to_le_bytes());
            f.extend_from_slice(&body);
            f
        };
        assert!(
            matches!(
                Codec::decode(&streamed).unwrap_err(),
                CodecError::ContentSizeMismatch {
                    content_size: None,
                    ..
                }
            ),
            "{:?}",
            Codec::decode(&streamed)
        );
        // An unknown codec byte names itself.
        let mut unknown = good.clone();
        unknown[3] = b'9';
        let e = Codec::decode(&unknown).unwrap_err();
        assert!(
            matches!(e, CodecError::UnknownCodec { byte: b'9' }),
            "{e:?}"
        );
        assert!(e.to_string().contains("0x39"), "{e}");
        for i in 0..good.len() {
            let _ = Codec::decode(&good[..i]);
            let mut flipped = good.clone();
            flipped[i] ^= 0x5A;
            let _ = Codec::decode(&flipped);
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
