//! The compressed frame: header, compression and decompression.
//!
//! ```text
//! 0xFF 'G' 'K' <codec> | u32 LE: length of the JSON | body
//! ```
//!
//! The fourth byte names the compression of the body: `'1'` is an lz4 block, `'2'` one zstd
//! frame (RFC 8878, with its content size). A new compression takes a byte of its own, a
//! constant here, a branch in [`decompress_into`] and a writer beside [`append_lz4`]; values
//! already stored keep decoding as before, whatever the configured compression: the reader
//! goes by the codec byte, never by the configuration.

use std::cell::RefCell;

use zstd::zstd_safe;

use super::error::{CodecError, MAX_VALUE_BYTES};

/// The first four bytes of an lz4-compressed value.
pub const FRAME_MAGIC: [u8; 4] = [0xFF, b'G', b'K', LZ4];

/// The first four bytes of a zstd-compressed value.
pub const ZSTD_FRAME_MAGIC: [u8; 4] = [0xFF, b'G', b'K', ZSTD];

/// The codec byte of an lz4 block body.
const LZ4: u8 = b'1';

/// The codec byte of a zstd frame body.
const ZSTD: u8 = b'2';

/// The most a zstd body can expand: 128 KiB per block of at least 4 bytes.
pub(super) const ZSTD_MAX_EXPANSION: usize = 32 * 1024;

/// The magic and the length.
pub(super) const HEADER_LEN: usize = FRAME_MAGIC.len() + 4;

/// The lowest and highest zstd levels accepted (`REDIS_COMPRESSION_LEVEL`). Negative "fast"
/// levels compress prose barely better than lz4; 20 to 22 need tens of MB of memory per
/// context for a few % more.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

thread_local! {
    /// A zstd compression context per thread: creating one costs more than compressing a
    /// 5 KB value, and the codec is shared by every thread of a store.
    static ZSTD_CCTX: RefCell<Option<zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
    /// The same for decompression.
    static ZSTD_DCTX: RefCell<Option<zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Writes the header of a frame of codec byte `codec` for `json_len` bytes of JSON.
fn header(codec: u8, json_len: usize, out: &mut [u8]) {
    out[..3].copy_from_slice(&FRAME_MAGIC[..3]);
    out[3] = codec;
    out[4..8].copy_from_slice(&(json_len as u32).to_le_bytes());
}

/// Appends `json` to `out` as an lz4 frame when that is smaller, else the JSON itself.
#[inline]
pub(super) fn append_lz4(json: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(
        start + HEADER_LEN + lz4_flex::block::get_maximum_output_size(json.len()),
        0,
    );
    header(LZ4, json.len(), &mut out[start..]);
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

/// Appends `json` to `out` as a zstd frame compressed at `level` when that is smaller, else
/// the JSON itself.
pub(super) fn append_zstd(json: &[u8], level: i32, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(
        start + HEADER_LEN + zstd_safe::compress_bound(json.len()),
        0,
    );
    header(ZSTD, json.len(), &mut out[start..]);
    let written = with_context(&ZSTD_CCTX, zstd_safe::CCtx::try_create, |cctx| {
        // One-shot compression writes the content size into the zstd frame header, which the
        // reader checks against ours before allocating.
        cctx.compress(&mut out[start + HEADER_LEN..], json, level)
            .ok()
    });
    match written {
        Some(n) if HEADER_LEN + n < json.len() => out.truncate(start + HEADER_LEN + n),
        _ => {
            out.truncate(start);
            out.extend_from_slice(json);
        }
    }
}

/// Runs `f` with this thread's context in `key`, created by `create` on first use (a fresh one
/// if it is in use, which cannot happen as compression does not call back into the codec).
/// `None` when no context can be created (out of memory).
fn with_context<C, T>(
    key: &'static std::thread::LocalKey<RefCell<Option<C>>>,
    create: fn() -> Option<C>,
    f: impl FnOnce(&mut C) -> Option<T>,
) -> Option<T> {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.is_none() {
                *slot = create();
            }
            f(slot.as_mut()?)
        }
        Err(_) => f(&mut create()?),
    })
}

/// The codec name of a frame's codec byte, for messages.
fn codec_name(byte: u8) -> &'static str {
    match byte {
        LZ4 => "lz4",
        ZSTD => "zstd",
        _ => "unknown",
    }
}

/// True when `bytes` is a frame of a codec this version writes (lz4 or zstd), by its header.
pub(super) fn is_frame(bytes: &[u8]) -> bool {
    bytes.len() >= HEADER_LEN && bytes[..3] == FRAME_MAGIC[..3] && matches!(bytes[3], LZ4 | ZSTD)
}

/// Decompresses the frame `bytes` into `buf` (grown as needed, never shrunk below what it
/// held) and returns the length of the JSON text, `buf[..len]`.
///
/// Every size claim is checked before `buf` grows: the header's against [`MAX_VALUE_BYTES`]
/// and against what the body could expand to (lz4), or against the zstd frame's own content
/// size (zstd), so a corrupt or hostile value cannot make the reader allocate more than the
/// limit, nor more than the body honestly holds.
pub(super) fn decompress_into(bytes: &[u8], buf: &mut Vec<u8>) -> Result<usize, CodecError> {
    if bytes.len() < HEADER_LEN || bytes[..3] != FRAME_MAGIC[..3] {
        return Err(CodecError::NotAFrame);
    }
    let codec = bytes[3];
    if !matches!(codec, LZ4 | ZSTD) {
        return Err(CodecError::UnknownCodec { byte: codec });
    }
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if len > MAX_VALUE_BYTES {
        return Err(CodecError::ClaimAboveLimit { claimed: len });
    }
    let body = &bytes[HEADER_LEN..];
    // lz4 expands at most ~255x. zstd at most 32,768x: a block holds at most 128 KiB and
    // takes at least 4 bytes (an RLE block: 3 bytes of header, the byte). A claim beyond that
    // is corrupt: refused before allocating, so a small value can never claim 512 MiB.
    let most = if codec == LZ4 {
        body.len().saturating_mul(255) + 16
    } else {
        body.len().saturating_mul(ZSTD_MAX_EXPANSION)
    };
    if len > most {
        return Err(CodecError::ClaimTooLarge {
            claimed: len,
            compressed: body.len(),
        });
    }
    if codec == ZSTD {
        // zstd can expand far more than lz4 (a run of one byte), so the body's own claim is
        // what bounds the allocation: it must be present and equal ours.
        let content = zstd_safe::get_frame_content_size(body);
        if !matches!(content, Ok(Some(n)) if n == len as u64) {
            return Err(CodecError::ContentSizeMismatch {
                claimed: len,
                content_size: content.ok().flatten(),
            });
        }
    }
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let out = &mut buf[..len];
    let decompressed = if codec == LZ4 {
        lz4_flex::block::decompress_into(body, out).map_err(|e| e.to_string())
    } else {
        with_context(&ZSTD_DCTX, zstd_safe::DCtx::try_create, |dctx| {
            // Decompressing into a flat buffer of the claimed size: the decoder allocates no
            // window of its own, and a body holding more than one frame's worth fails here
            // rather than writing past `len`.
            Some(
                dctx.decompress(out, body)
                    .map_err(|code| zstd_safe::get_error_name(code).to_string()),
            )
        })
        .unwrap_or_else(|| Err("cannot allocate a zstd decompression context".into()))
    };
    match decompressed {
        Ok(n) if n == len => Ok(len),
        Ok(n) => Err(CodecError::LengthMismatch {
            claimed: len,
            actual: n,
        }),
        Err(reason) => Err(CodecError::CorruptFrame {
            reason: format!("{}: {reason}", codec_name(codec)),
        }),
    }
}
