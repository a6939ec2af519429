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

use std::cell::RefCell;

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
    /// A message when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_into(&self, value: &Value, out: &mut Vec<u8>) -> Result<usize, String> {
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
        let start = out.len();
        out.resize(
            start + HEADER_LEN + lz4_flex::block::get_maximum_output_size(json.len()),
            0,
        );
        out[start..start + 4].copy_from_slice(&FRAME_MAGIC);
        out[start + 4..start + 8].copy_from_slice(&(json.len() as u32).to_le_bytes());
        match lz4_flex::block::compress_into(json, &mut out[start + HEADER_LEN..]) {
            // Keep the plain JSON when compression does not pay: it costs reads nothing and
            // stays readable by every client.
            Ok(n) if HEADER_LEN + n < json.len() => out.truncate(start + HEADER_LEN + n),
            _ => {
                out.truncate(start);
                out.extend_from_slice(json);
            }
        }
    }

    /// The bytes to store for an already serialized JSON text.
    ///
    /// # Errors
    /// A message when the JSON is larger than [`MAX_VALUE_BYTES`].
    pub fn encode_json(&self, json: Vec<u8>) -> Result<Vec<u8>, String> {
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

    /// The value stored as `bytes`.
    ///
    /// # Errors
    /// A message saying what is wrong (bad frame, bad JSON with its position); the caller adds
    /// the namespace and key.
    pub fn decode(bytes: &[u8]) -> Result<Value, String> {
        if bytes.first() == Some(&FRAME_MAGIC[0]) {
            // The JSON text is only parsed, never kept: decompress into a per-thread buffer
            // instead of a fresh, zeroed Vec per value.
            return with_scratch(&DECODE_SCRATCH, |buf| {
                let len = decompress_into(bytes, buf)?;
                parse(&buf[..len]).map_err(|e| format!("compressed frame holds invalid JSON: {e}"))
            });
        }
        parse(bytes)
    }
}

fn too_large(len: usize) -> String {
    format!("{len} bytes of JSON is above the limit of {MAX_VALUE_BYTES} bytes")
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

fn parse(json: &[u8]) -> Result<Value, String> {
    if let Some(value) = crate::json_read::parse(json) {
        return Ok(value);
    }
    // Everything the fast reader does not take, errors included, is serde_json's to decide.
    serde_json::from_slice(json).map_err(|e| {
        format!(
            "not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        )
    })
}

/// Decompresses the frame `bytes` into `buf` (grown as needed, never shrunk below what it
/// held) and returns the length of the JSON text, `buf[..len]`.
fn decompress_into(bytes: &[u8], buf: &mut Vec<u8>) -> Result<usize, String> {
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
    if buf.len() < len {
        buf.resize(len, 0);
    }
    match lz4_flex::block::decompress_into(body, &mut buf[..len]) {
        Ok(n) if n == len => Ok(len),
        Ok(n) => Err(format!(
            "lz4 frame decompressed to {n} bytes, header said {len}"
        )),
        Err(e) => Err(format!("corrupt lz4 frame: {e}")),
    }
}

/// Writes `value` as compact JSON, byte for byte what `serde_json::to_vec` writes.
///
/// serde_json's string escaping looks up every byte in a table: ~9 instructions a byte, the
/// largest cost of storing an uncompressed 5 KB chunk. Here runs of bytes that need no escape
/// are found many at a time ([`find_escape`]) and copied whole.
pub(crate) fn write_json(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        // Numbers are serde_json's own (itoa / ryu), so they print exactly as before.
        Value::Number(n) => {
            serde_json::to_writer(&mut *out, n).expect("writing a number to a Vec cannot fail")
        }
        Value::String(s) => write_json_str(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(v, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(k, out);
                out.push(b':');
                write_json(v, out);
            }
            out.push(b'}');
        }
    }
}

/// serde_json's escape table: 0 for bytes written as they are, else the letter after the
/// backslash (`u` for `\u00XX`).
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0A] = b'n';
    t[0x0C] = b'f';
    t[0x0D] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// A mask with the high bit set in each byte of `x` (little-endian: byte 0 lowest) that is
/// below 0x20, a quote or a backslash, or in a byte above such a one. The lowest set bit is
/// always exact (a borrow only spreads upwards), so `trailing_zeros() / 8` is the index of the
/// first byte to escape; zero means none of the 8 needs one.
#[inline(always)]
fn escape_mask(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x;
    let q = x ^ (ONES * b'"' as u64);
    let quote = q.wrapping_sub(ONES) & !q;
    let b = x ^ (ONES * b'\\' as u64);
    let backslash = b.wrapping_sub(ONES) & !b;
    (below_space | quote | backslash) & HIGH
}

/// Bytes checked at once by [`find_escape`] before it looks closer. 32 measured better than 64
/// for prose, which has an escape (`\n`, a quote) every ~200 bytes.
const BLOCK: usize = 32;

/// The index of the first byte of `bytes[from..]` that is below 0x20, a quote or a backslash
/// (the bytes a JSON string must escape, and the only ones a string reader must stop at), or
/// `bytes.len()` when there is none.
///
/// Text is long runs of plain bytes, so they are skipped a block at a time (with SSE2 on
/// x86_64, in safe code), then the block that holds the byte is searched eight bytes a step
/// ([`escape_mask`]). Shared by the writer and by `json_read`.
#[inline]
pub(crate) fn find_escape(bytes: &[u8], from: usize) -> usize {
    let mut i = from;
    while let Some(block) = bytes.get(i..i + BLOCK) {
        let block: &[u8; BLOCK] = block.try_into().expect("BLOCK bytes");
        // No early exit, so that LLVM checks the whole block with vector instructions.
        let found = block.iter().fold(0u8, |found, &b| {
            found | u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\')
        });
        if found != 0 {
            break;
        }
        i += BLOCK;
    }
    while let Some(word) = bytes.get(i..i + 8) {
        let mask = escape_mask(u64::from_le_bytes(word.try_into().expect("8 bytes")));
        if mask != 0 {
            return i + (mask.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && ESCAPE[bytes[i] as usize] == 0 {
        i += 1;
    }
    i
}

fn write_json_str(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0;
    loop {
        let i = find_escape(bytes, run);
        out.extend_from_slice(&bytes[run..i]);
        let Some(&c) = bytes.get(i) else { break };
        let escape = ESCAPE[c as usize];
        if escape == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(c >> 4) as usize]);
            out.push(HEX[(c & 0xF) as usize]);
        } else {
            out.extend_from_slice(&[b'\\', escape]);
        }
        run = i + 1;
    }
    out.push(b'"');
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

    /// Strings with every kind of byte serde_json escapes, at every offset within an 8-byte
    /// word, and multi-byte UTF-8 around them.
    fn awkward_strings() -> Vec<String> {
        let mut out = vec![String::new(), "plain".into(), prose(300)];
        let specials: Vec<char> = (0u8..0x20)
            .map(char::from)
            .chain(['"', '\\', '/', '\u{7f}', 'é', '🦀', '\u{2028}'])
            .collect();
        for (i, c) in specials.iter().enumerate() {
            for pad in 0..10 {
                let mut s = "x".repeat(pad);
                s.push(*c);
                s.push_str(&"y".repeat(i % 9));
                s.push(*c);
                out.push(s);
            }
        }
        out.push(specials.iter().collect());
        out
    }

    #[test]
    fn json_is_written_exactly_as_serde_json_writes_it() {
        for s in awkward_strings() {
            let v =
                json!({"content": s, s.clone(): [s, 1, -2, 3.5, 1e300, null, true, false, {}, []]});
            let mut ours = Vec::new();
            write_json(&v, &mut ours);
            assert_eq!(ours, serde_json::to_vec(&v).unwrap(), "{v}");
        }
        let nested = json!({"a": {"b": [[], [1, [2, {"c": "d\n"}]]], "e": 0.1}, "u": u64::MAX, "i": i64::MIN});
        let mut ours = Vec::new();
        write_json(&nested, &mut ours);
        assert_eq!(ours, serde_json::to_vec(&nested).unwrap());
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(s in "(?s).{0,80}", raw in proptest::collection::vec(0u8..0x80, 0..64)) {
            let ascii = String::from_utf8(raw).unwrap();
            for s in [s, ascii] {
                let v = Value::String(s);
                let mut ours = Vec::new();
                write_json(&v, &mut ours);
                proptest::prop_assert_eq!(ours, serde_json::to_vec(&v).unwrap());
            }
        }
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
