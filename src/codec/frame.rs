//! The compressed frame: header, compression and decompression.
//!
//! ```text
//! 0xFF 'G' 'K' <codec> | u32 LE: length of the JSON | body
//! ```
//!
//! The fourth byte names the compression of the body: `'1'` is an lz4 block, the only one
//! today. A new compression takes a byte of its own, a constant here, a branch in
//! [`decompress_into`] and a writer beside [`append_lz4`]; values already stored keep
//! decoding as before.

use super::error::{CodecError, MAX_VALUE_BYTES};

/// The first four bytes of an lz4-compressed value.
pub const FRAME_MAGIC: [u8; 4] = [0xFF, b'G', b'K', LZ4];

/// The codec byte of an lz4 block body.
const LZ4: u8 = b'1';

/// The magic and the length.
pub(super) const HEADER_LEN: usize = FRAME_MAGIC.len() + 4;

/// Appends `json` to `out` as an lz4 frame when that is smaller, else the JSON itself.
#[inline]
pub(super) fn append_lz4(json: &[u8], out: &mut Vec<u8>) {
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

/// Decompresses the frame `bytes` into `buf` (grown as needed, never shrunk below what it
/// held) and returns the length of the JSON text, `buf[..len]`.
pub(super) fn decompress_into(bytes: &[u8], buf: &mut Vec<u8>) -> Result<usize, CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..4] != FRAME_MAGIC {
        return Err(CodecError::NotAFrame);
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if len > MAX_VALUE_BYTES {
        return Err(CodecError::ClaimAboveLimit { claimed: len });
    }
    // lz4 expands at most ~255x; a claim far beyond that is corrupt, refuse before allocating.
    let body = &bytes[HEADER_LEN..];
    if len > body.len().saturating_mul(255) + 16 {
        return Err(CodecError::ClaimTooLarge {
            claimed: len,
            compressed: body.len(),
        });
    }
    if buf.len() < len {
        buf.resize(len, 0);
    }
    match lz4_flex::block::decompress_into(body, &mut buf[..len]) {
        Ok(n) if n == len => Ok(len),
        Ok(n) => Err(CodecError::LengthMismatch {
            claimed: len,
            actual: n,
        }),
        Err(e) => Err(CodecError::CorruptFrame {
            reason: e.to_string(),
        }),
    }
}
