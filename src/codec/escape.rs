//! Finding the bytes a JSON string must escape, many bytes at a time: the scan shared by the
//! writer (`json_write`) and the reader (`json_read`), the largest per-byte cost of both.

/// serde_json's escape table: 0 for bytes written as they are, else the letter after the
/// backslash (`u` for `\u00XX`).
pub(super) const ESCAPE: [u8; 256] = {
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
pub(super) fn find_escape(bytes: &[u8], from: usize) -> usize {
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
