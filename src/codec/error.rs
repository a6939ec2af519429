//! What can be wrong with a value's bytes, and the size limit they are held to.

/// The largest value accepted, in bytes of JSON: 512 MiB, Redis's own limit for one value.
pub const MAX_VALUE_BYTES: usize = 512 * 1024 * 1024;

/// Why a value could not be encoded or its stored bytes decoded.
///
/// Says what is wrong with the bytes; the store that read them adds the namespace and the key
/// (`Error::Decode`, `Error::Encode`). The messages name the limit, the frame's claim and the
/// JSON position, so a reader can tell a corrupt frame from a value another program wrote.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The JSON text of a value is longer than [`MAX_VALUE_BYTES`] (refused before sending).
    #[error("{len} bytes of JSON is above the limit of {MAX_VALUE_BYTES} bytes")]
    TooLarge {
        /// The length of the JSON text.
        len: usize,
    },

    /// The bytes start with `0xFF` (which no JSON text does) but not with a frame header this
    /// version reads.
    #[error("starts with 0xFF but is not a graphrag-kv frame")]
    NotAFrame,

    /// A graphrag-kv frame whose codec byte this version does not know (written by a newer
    /// version, or corrupt).
    #[error(
        "graphrag-kv frame of unknown codec byte 0x{byte:02x} (this version reads lz4 and zstd frames)"
    )]
    UnknownCodec {
        /// The frame's fourth byte.
        byte: u8,
    },

    /// A frame whose header claims more than [`MAX_VALUE_BYTES`] of JSON; refused before
    /// anything is allocated.
    #[error("frame claims {claimed} bytes, above the limit of {MAX_VALUE_BYTES}")]
    ClaimAboveLimit {
        /// The length the header claims.
        claimed: usize,
    },

    /// A frame whose header claims far more JSON than its body could hold (lz4 expands at most
    /// ~255 times, zstd 32,768 times); refused before anything is allocated.
    #[error("frame claims {claimed} bytes from only {compressed} compressed bytes")]
    ClaimTooLarge {
        /// The length the header claims.
        claimed: usize,
        /// The length of the compressed body.
        compressed: usize,
    },

    /// A frame that decompressed to another length than its header says.
    #[error("frame decompressed to {actual} bytes, header said {claimed}")]
    LengthMismatch {
        /// The length the header claims.
        claimed: usize,
        /// The length it decompressed to.
        actual: usize,
    },

    /// A zstd frame whose own content size is missing or differs from the header's claim;
    /// refused before anything is allocated.
    #[error(
        "zstd frame claims {claimed} bytes but its body says {}",
        match .content_size { Some(n) => format!("{n}"), None => "nothing".to_string() }
    )]
    ContentSizeMismatch {
        /// The length the header claims.
        claimed: usize,
        /// The content size in the zstd frame's header, if it has a readable one.
        content_size: Option<u64>,
    },

    /// A frame whose body is not valid for its codec.
    #[error("corrupt frame: {reason}")]
    CorruptFrame {
        /// The codec and the decompressor's message (`lz4: ...`, `zstd: ...`).
        reason: String,
    },

    /// Text that is not valid JSON, plain or inside a frame.
    #[error(
        "{}not valid JSON (line {}, column {}): {source}",
        if *.compressed { "compressed frame holds invalid JSON: " } else { "" },
        .source.line(),
        .source.column()
    )]
    InvalidJson {
        /// The JSON came out of a frame (its line and column are in the decompressed text).
        compressed: bool,
        /// serde_json's error, with the line and column.
        #[source]
        source: serde_json::Error,
    },
}
