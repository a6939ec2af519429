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
    #[error("starts with 0xFF but is not a graphrag-kv lz4 frame")]
    NotAFrame,

    /// A frame whose header claims more than [`MAX_VALUE_BYTES`] of JSON; refused before
    /// anything is allocated.
    #[error("lz4 frame claims {claimed} bytes, above the limit of {MAX_VALUE_BYTES}")]
    ClaimAboveLimit {
        /// The length the header claims.
        claimed: usize,
    },

    /// A frame whose header claims far more JSON than its body could hold (lz4 expands at most
    /// ~255 times); refused before anything is allocated.
    #[error("lz4 frame claims {claimed} bytes from only {compressed} compressed bytes")]
    ClaimTooLarge {
        /// The length the header claims.
        claimed: usize,
        /// The length of the compressed body.
        compressed: usize,
    },

    /// A frame that decompressed to another length than its header says.
    #[error("lz4 frame decompressed to {actual} bytes, header said {claimed}")]
    LengthMismatch {
        /// The length the header claims.
        claimed: usize,
        /// The length it decompressed to.
        actual: usize,
    },

    /// A frame whose body is not a valid lz4 block.
    #[error("corrupt lz4 frame: {reason}")]
    CorruptFrame {
        /// The decompressor's message.
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
