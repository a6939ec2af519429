//! Property tests (proptest) of the two parsers that read data other programs may have written:
//! the Redis value decoder ([`Codec::decode`]) and the kv_store JSON file loader
//! ([`parse_kv_file`]).
//!
//! - Arbitrary bytes and mutated valid inputs never panic, and every error says where or what.
//! - Decoding never allocates more than the input can justify: a counting global allocator
//!   records the largest single allocation made while decoding, which must stay within
//!   `min(512 MiB, 255 × input + 16)` plus a small constant for lz4 frames and plain JSON (lz4
//!   cannot expand more than ~255×), `min(512 MiB, 32,768 × input)` for zstd frames (a 128 KiB
//!   block takes at least 4 bytes).
//! - What is encoded decodes to the same value, compressed or not.
//! - Decoding JSON gives exactly what `serde_json::from_slice` gives (the codec reads JSON with
//!   its own reader): the same value, key order and kind of number included, or the same error
//!   message, for valid, reformatted, escaped and damaged texts.
//!
//! The case counts are kept small so the file runs in seconds; `PROPTEST_CASES=N` raises every
//! property's count (docs/SECURITY.md gives the long run that was done).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use graphrag_kv::backend::json_file::{parse_kv_file, to_python_json};
use graphrag_kv::codec::{Codec, FRAME_MAGIC, MAX_VALUE_BYTES, ZSTD_FRAME_MAGIC};
use graphrag_kv::{Compression, Error};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

// ---------------------------------------------------------------------------------------------
// The largest single allocation made by the current thread.

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates, so it is safe to
    // use from inside the allocator.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; `note` only reads and
// writes a thread-local `Cell`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// The most a decode of `len` bytes may allocate at once: the decompressed size it may claim
/// (at most 255× its compressed body, at most 512 MiB), or for plain JSON a few times the
/// input (serde_json's buffers), plus a constant.
fn allocation_bound(len: usize) -> usize {
    (len.saturating_mul(255) + 16).min(MAX_VALUE_BYTES) + 4 * len + 64 * 1024
}

/// The same for `bytes` when it is a zstd frame, which may honestly expand 32,768×.
fn allocation_bound_of(bytes: &[u8]) -> usize {
    if bytes.starts_with(&ZSTD_FRAME_MAGIC) {
        bytes.len().saturating_mul(32 * 1024).min(MAX_VALUE_BYTES) + 64 * 1024
    } else {
        allocation_bound(bytes.len())
    }
}

/// The compressions, drawn by index.
const COMPRESSIONS: [Compression; 3] = [Compression::Lz4, Compression::Zstd, Compression::None];

// ---------------------------------------------------------------------------------------------
// Strategies

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // A shrunk failure is saved under proptest-regressions/ and replayed first next time.
        ..ProptestConfig::default()
    }
}

/// Any JSON value: every scalar kind (finite floats of every magnitude, the integer extremes,
/// strings of any Unicode including NUL and escapes), nested arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        any::<String>().prop_map(Value::String),
        // Long repetitive text, which the codec compresses.
        (any::<String>(), 1usize..200).prop_map(|(s, n)| Value::String(s.repeat(n))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// How a valid input is damaged.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut at a fraction (per mille) of the length.
    Truncate(u16),
    /// XOR a byte at a fraction of the length.
    Flip(u16, u8),
    /// Insert bytes at a fraction of the length.
    Insert(u16, Vec<u8>),
    /// Remove a run of bytes at a fraction of the length.
    Remove(u16, u8),
    /// Replace the frame's claimed length (bytes 4..8) with any value.
    Claim(u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0u16..1000).prop_map(Mutation::Truncate),
        (0u16..1000, 1u8..=255).prop_map(|(at, x)| Mutation::Flip(at, x)),
        (0u16..1000, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        (0u16..1000, 1u8..64).prop_map(|(at, n)| Mutation::Remove(at, n)),
        any::<u32>().prop_map(Mutation::Claim),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let at = |per_mille: u16, len: usize| len * per_mille as usize / 1000;
    match m {
        Mutation::Truncate(p) => {
            let n = at(*p, bytes.len());
            bytes.truncate(n);
        }
        Mutation::Flip(p, x) => {
            if !bytes.is_empty() {
                let i = at(*p, bytes.len()).min(bytes.len() - 1);
                bytes[i] ^= x;
            }
        }
        Mutation::Insert(p, b) => {
            let i = at(*p, bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Remove(p, n) => {
            let i = at(*p, bytes.len());
            let end = (i + *n as usize).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Claim(c) => {
            if bytes.len() >= 8 {
                bytes[4..8].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
}

/// A decode outcome that is fine: a value, or an error message that says what is wrong.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (out, largest) = largest_allocation(|| Codec::decode(bytes));
    prop_assert!(
        largest <= allocation_bound_of(bytes),
        "decoding {} bytes allocated {largest} bytes at once",
        bytes.len()
    );
    if let Err(reason) = out {
        let reason = reason.to_string();
        prop_assert!(!reason.is_empty());
        if bytes.first() != Some(&FRAME_MAGIC[0]) {
            // Plain JSON errors carry the position.
            prop_assert!(
                reason.contains("line ") && reason.contains("column "),
                "{reason}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The value decoder

proptest! {
    #![proptest_config(cases(1_000))]

    #[test]
    fn decode_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        check_decode(&bytes)?;
    }

    #[test]
    fn decode_arbitrary_bytes_behind_the_frame_magic(
        claim in any::<u32>(),
        body in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut bytes = FRAME_MAGIC.to_vec();
        bytes.extend_from_slice(&claim.to_le_bytes());
        bytes.extend_from_slice(&body);
        check_decode(&bytes)?;
        // A frame claiming more than lz4 could produce from its body is refused at once.
        if claim as usize > body.len() * 255 + 16 {
            prop_assert!(Codec::decode(&bytes).is_err());
        }
    }

    #[test]
    fn decode_arbitrary_bytes_behind_the_zstd_frame_magic(
        claim in any::<u32>(),
        body in prop::collection::vec(any::<u8>(), 0..1024),
        zstd_magic in any::<bool>(),
    ) {
        let mut bytes = ZSTD_FRAME_MAGIC.to_vec();
        bytes.extend_from_slice(&claim.to_le_bytes());
        if zstd_magic {
            // zstd's own magic number, so the body gets as far as its frame header.
            bytes.extend_from_slice(&[0x28, 0xB5, 0x2F, 0xFD]);
        }
        bytes.extend_from_slice(&body);
        check_decode(&bytes)?;
        if claim as usize > (bytes.len() - 8) * 32 * 1024 {
            prop_assert!(Codec::decode(&bytes).is_err());
        }
    }
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn decode_mutated_frames(
        value in json_value(),
        min_bytes in 0usize..256,
        zstd in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let compression = if zstd { Compression::Zstd } else { Compression::Lz4 };
        let mut bytes = Codec::new(compression, min_bytes).encode(&value).unwrap();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check_decode(&bytes)?;
    }

    #[test]
    fn encode_decode_round_trip(
        value in json_value(),
        compression in 0usize..3,
        level in 1i32..=19,
        min_bytes in 0usize..2048,
    ) {
        let compression = COMPRESSIONS[compression];
        let bytes = Codec::new(compression, min_bytes).with_level(level).encode(&value).unwrap();
        if compression == Compression::None {
            prop_assert_eq!(bytes.first().copied(), serde_json::to_vec(&value).unwrap().first().copied());
        }
        // The codec adds nothing to serde_json's own round trip (see the float note in
        // docs/SECURITY.md): the decoded value is what parsing the plain JSON gives.
        let decoded = Codec::decode(&bytes).unwrap();
        let reparsed: Value = serde_json::from_slice(&serde_json::to_vec(&value).unwrap()).unwrap();
        prop_assert_eq!(&decoded, &reparsed);
        if exact_floats() || !has_float(&value) {
            prop_assert_eq!(&decoded, &value);
        }
    }
}

/// True when serde_json parses floats exactly (its `float_roundtrip` feature, which this
/// crate enables): then values holding floats must round-trip exactly too. Without it about
/// one float in ten of [-1, 1] comes back one ULP off, e.g. 0.18017933438838418 is read as
/// 0.18017933438838415. Asked at run time so the test stays right if the feature changes.
fn exact_floats() -> bool {
    let f = 0.180_179_334_388_384_18_f64;
    serde_json::from_str::<f64>(&serde_json::to_string(&f).unwrap()).unwrap() == f
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The decoder's JSON reader against serde_json

/// What `Codec::decode` must give for plain JSON: serde_json's value, or serde_json's error in
/// the codec's words.
fn serde_json_decode(json: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(json).map_err(|e| {
        format!(
            "not valid JSON (line {}, column {}): {e}",
            e.line(),
            e.column()
        )
    })
}

/// Equal as serde_json sees it, and in what `==` on a map or a number does not see: key order,
/// and the kind of number (`1` and `1.0`, `0.0` and `-0.0` serialize differently).
fn same(a: &Value, b: &Value) -> bool {
    a == b && serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

/// `Codec::decode` of the plain JSON `json` gives exactly what serde_json gives.
fn check_same_as_serde_json(json: &[u8]) -> Result<(), TestCaseError> {
    if json.first() == Some(&FRAME_MAGIC[0]) {
        // A frame, not plain JSON (serde_json would refuse it anyway).
        return Ok(());
    }
    match (Codec::decode(json), serde_json_decode(json)) {
        (Ok(ours), Ok(theirs)) => prop_assert!(
            same(&ours, &theirs),
            "{:?}: {} != {}",
            String::from_utf8_lossy(json),
            ours,
            theirs
        ),
        (Err(ours), Err(theirs)) => prop_assert_eq!(ours.to_string(), theirs),
        (ours, theirs) => prop_assert!(
            false,
            "{:?}: {:?} but serde_json {:?}",
            String::from_utf8_lossy(json),
            ours,
            theirs
        ),
    }
    Ok(())
}

/// `json` with every non-ASCII character written as a `\u` escape (a surrogate pair above the
/// BMP), hex digits in upper or lower case: the same value for serde_json, since serde_json's
/// own text has non-ASCII characters only inside strings.
fn escape_non_ascii(json: &[u8], upper: bool) -> Vec<u8> {
    let text = std::str::from_utf8(json).unwrap();
    let mut out = String::with_capacity(json.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            if upper {
                out.push_str(&format!("\\u{unit:04X}"));
            } else {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out.into_bytes()
}

/// One of JSON's whitespace bytes, or a byte that looks like whitespace but is not JSON's.
fn space() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        &b" "[..],
        b"\t",
        b"\n",
        b"\r",
        b"\r\n",
        b"  \t ",
        b"\x0c",
        b"\x0b",
        "\u{a0}".as_bytes(),
    ])
    .prop_map(<[u8]>::to_vec)
}

/// An object's text with repeated keys (serde_json keeps the first place and the last value).
fn object_with_repeated_keys() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        (
            prop::sample::select(vec!["a", "b", "c", "\\u0061", "é"]),
            json_value(),
        ),
        0..8,
    )
    .prop_map(|entries| {
        let body: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("\"{k}\":{}", serde_json::to_string(v).unwrap()))
            .collect();
        format!("{{{}}}", body.join(",")).into_bytes()
    })
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn decode_reads_json_exactly_as_serde_json(
        value in json_value(),
        pretty in any::<bool>(),
        escaped in any::<bool>(),
        upper in any::<bool>(),
        spaces in prop::collection::vec((0u16..1000, space()), 0..3),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        let mut json = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        if escaped {
            json = escape_non_ascii(&json, upper);
        }
        check_same_as_serde_json(&json)?;
        for (at, space) in &spaces {
            apply(&mut json, &Mutation::Insert(*at, space.clone()));
            check_same_as_serde_json(&json)?;
        }
        for m in &mutations {
            apply(&mut json, m);
            check_same_as_serde_json(&json)?;
        }
    }

    #[test]
    fn decode_keeps_serde_json_s_order_for_repeated_keys(
        json in object_with_repeated_keys(),
        mutations in prop::collection::vec(mutation(), 0..2),
    ) {
        let mut json = json;
        check_same_as_serde_json(&json)?;
        for m in &mutations {
            apply(&mut json, m);
            check_same_as_serde_json(&json)?;
        }
    }

    #[test]
    fn compressed_json_is_read_exactly_as_serde_json(
        value in json_value(),
        pretty in any::<bool>(),
        zstd in any::<bool>(),
    ) {
        let json = if pretty {
            serde_json::to_vec_pretty(&value).unwrap()
        } else {
            serde_json::to_vec(&value).unwrap()
        };
        let compression = if zstd { Compression::Zstd } else { Compression::Lz4 };
        let frame = Codec::new(compression, 0).encode_json(json.clone()).unwrap();
        let theirs: Value = serde_json::from_slice(&json).unwrap();
        let ours = Codec::decode(&frame).unwrap();
        prop_assert!(same(&ours, &theirs), "{} != {}", ours, theirs);
    }
}

proptest! {
    #![proptest_config(cases(1_000))]

    /// Short texts of JSON's own bytes: the structural characters, escapes, digits and signs in
    /// every order, where every give-up and error of the reader lives.
    #[test]
    fn decode_json_like_bytes_exactly_as_serde_json(
        parts in prop::collection::vec(
            prop::sample::select(vec![
                "{", "}", "[", "]", ",", ":", "\"", "\"a\"", "\\", "\\n", "\\u", "\\uD83E",
                "\\uDD80", "00", "0", "1", "-", "+", ".", "e", "E", "9223372036854775808",
                "18446744073709551616", "true", "null", " ", "\n", "\t", "\u{1}", "é",
                r#""\b\f\/\r\t\"""#, "-0", "-0.0", "1.5e3",
            ]),
            0..24,
        ),
    ) {
        check_same_as_serde_json(parts.concat().as_bytes())?;
    }
}

#[test]
fn frames_claiming_huge_sizes_fail_fast_without_allocating() {
    for (claim, body_len) in [
        (u32::MAX, 16usize),
        (MAX_VALUE_BYTES as u32 + 1, 4096),
        (MAX_VALUE_BYTES as u32, 64),
        (400 << 20, 1024),
        (100 << 20, 1),
    ] {
        let mut bytes = FRAME_MAGIC.to_vec();
        bytes.extend_from_slice(&claim.to_le_bytes());
        bytes.extend(std::iter::repeat_n(0x11u8, body_len));
        let (out, largest) = largest_allocation(|| Codec::decode(&bytes));
        let reason = out.unwrap_err().to_string();
        assert!(
            reason.contains("above the limit") || reason.contains("from only"),
            "{claim}: {reason}"
        );
        assert!(
            largest < 64 * 1024,
            "a frame claiming {claim} bytes allocated {largest} bytes"
        );
    }
}

#[test]
fn zstd_frames_claiming_huge_sizes_fail_fast_without_allocating() {
    // A genuine zstd frame of 1 MiB of one byte: a few dozen bytes that honestly expand
    // 30,000 times. Any other claim than its content size is refused before allocating.
    let json = [b"\"", &[b'a'; 1 << 20][..], b"\""].concat();
    let honest = Codec::new(Compression::Zstd, 0)
        .encode_json(json.clone())
        .unwrap();
    assert!(
        honest.starts_with(&ZSTD_FRAME_MAGIC) && honest.len() < 256,
        "{}",
        honest.len()
    );
    assert_eq!(
        Codec::decode(&honest).unwrap().as_str().unwrap().len(),
        1 << 20
    );
    for claim in [
        u32::MAX,
        MAX_VALUE_BYTES as u32,
        100 << 20,
        json.len() as u32 + 1,
        1,
    ] {
        let mut bytes = honest.clone();
        bytes[4..8].copy_from_slice(&claim.to_le_bytes());
        let (out, largest) = largest_allocation(|| Codec::decode(&bytes));
        let reason = out.unwrap_err().to_string();
        assert!(
            reason.contains("above the limit")
                || reason.contains("from only")
                || reason.contains("its body says"),
            "{claim}: {reason}"
        );
        assert!(
            largest < 64 * 1024,
            "a zstd frame claiming {claim} bytes allocated {largest} bytes"
        );
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    for depth in [1_000usize, 100_000] {
        for open in [b'[', b'{'] {
            let bytes = if open == b'[' {
                vec![b'['; depth]
            } else {
                b"{\"a\":".repeat(depth)
            };
            let reason = Codec::decode(&bytes).unwrap_err().to_string();
            assert!(reason.contains("recursion limit"), "{reason}");
            let e = parse_kv_file(Path::new("deep.json"), &bytes).unwrap_err();
            assert!(e.to_string().contains("recursion limit"), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The kv_store file loader

/// A kv_store file's contents: id -> value.
fn kv_map() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec((any::<String>(), json_value()), 0..6)
        .prop_map(|kv| kv.into_iter().collect())
}

/// An error of `parse_kv_file` must be `CorruptFile` naming the file, with a position inside it.
fn check_kv_error(e: Error, bytes: &[u8]) -> Result<(), TestCaseError> {
    match &e {
        Error::CorruptFile {
            path, line, column, ..
        } => {
            prop_assert_eq!(path.as_path(), Path::new("kv_store_x.json"));
            let lines = bytes.split(|b| *b == b'\n').count();
            prop_assert!(
                *line >= 1 && *line <= lines,
                "line {} of {}: {}",
                line,
                lines,
                e
            );
            let longest = bytes
                .split(|b| *b == b'\n')
                .map(<[u8]>::len)
                .max()
                .unwrap_or(0);
            prop_assert!(
                *column <= longest + 1,
                "column {} of {}: {}",
                column,
                longest,
                e
            );
            let text = e.to_string();
            let position = format!("line {line}, column {column}");
            prop_assert!(
                text.contains("kv_store_x.json") && text.contains(&position),
                "{}",
                text
            );
        }
        other => prop_assert!(false, "expected CorruptFile, got {other:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(1_000))]

    #[test]
    fn kv_file_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        if let Err(e) = parse_kv_file(Path::new("kv_store_x.json"), &bytes) {
            check_kv_error(e, &bytes)?;
        }
    }
}

proptest! {
    #![proptest_config(cases(150))]

    #[test]
    fn kv_file_mutated(
        map in kv_map(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bytes = to_python_json(&map);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        match parse_kv_file(Path::new("kv_store_x.json"), &bytes) {
            Ok(parsed) => {
                // A mutation may leave valid JSON; then it is an object, as required.
                let _ = parsed;
            }
            Err(e) => check_kv_error(e, &bytes)?,
        }
    }

    #[test]
    fn kv_file_round_trip(map in kv_map(), bom in any::<bool>()) {
        let mut bytes = to_python_json(&map);
        if bom {
            bytes.splice(0..0, *b"\xEF\xBB\xBF");
        }
        let parsed = parse_kv_file(Path::new("kv_store_x.json"), &bytes).unwrap();
        let reparsed: Map<String, Value> =
            serde_json::from_slice(&serde_json::to_vec(&map).unwrap()).unwrap();
        prop_assert_eq!(&parsed, &reparsed);
        prop_assert_eq!(parsed.len(), map.len());
    }
}
