//! A JSON reader for the values the codec decodes, producing the `serde_json::Value` that
//! `serde_json::from_slice` would, faster.
//!
//! Why: reading values from Redis was dominated by `serde_json::from_slice::<Value>`. For a
//! 4.6 KB text chunk (`{tokens, content: <4.5 KB of prose>, chunk_order_index, full_doc_id}`)
//! it took ~3.7–4.6 µs, while `std::str::from_utf8` over the same bytes takes ~0.25 µs:
//! about half of serde_json's instructions are its string scan (`skip_to_escape`, ~2.6 a byte),
//! much of the rest copying escaped text through a growing scratch buffer and allocating.
//! Here the input is checked as UTF-8 once, strings are scanned a block at a time with the
//! writer's own scanner ([`find_escape`]), a string is copied once into a `String` of its final
//! size, and arrays and objects are built once at their final size.
//!
//! The rule: the result is always exactly serde_json's. [`parse`] returns `None` on anything it
//! does not handle exactly as serde_json does, and the caller then runs serde_json itself, so
//! every error (and its line and column) and every rare shape comes from serde_json. It gives up
//! on: invalid UTF-8; a control character inside a string; an escape other than serde_json's
//! (`\" \\ \/ \b \f \n \r \t \uXXXX`), a lone surrogate; any syntax error; trailing
//! non-whitespace; nesting deeper than [`MAX_DEPTH`] (serde_json's limit is 128). Plain integers
//! that fit a `u64` (or an `i64` when negative) are read here; every other number (fraction,
//! exponent, `-0`, beyond 64 bits) is handed to serde_json alone, see [`Reader::number`].
//! Objects are filled with `Map::insert`, as serde_json does: a repeated key keeps its first
//! position and takes the last value.

use serde_json::{Map, Value};

use super::escape::find_escape;

/// Arrays and objects nested deeper than this are left to serde_json (which refuses 128).
const MAX_DEPTH: usize = 64;

/// The value of the JSON text `json`, or `None` when serde_json must decide.
pub(crate) fn parse(json: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(json).ok()?;
    let mut r = Reader {
        text,
        bytes: json,
        pos: 0,
        // Enough for a long text's escapes without growing in steps.
        escapes: Vec::with_capacity(64),
        items: Vec::new(),
        entries: Vec::new(),
    };
    let value = r.value(0)?;
    r.skip_whitespace();
    (r.pos == json.len()).then_some(value)
}

struct Reader<'a> {
    /// The input, known to be UTF-8: strings are sliced from it without checking again.
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    /// Where the escapes of the string being read start.
    escapes: Vec<usize>,
    /// The items of the arrays being read, innermost last: each array is allocated once, at its
    /// final length, instead of growing.
    items: Vec<Value>,
    /// The same for objects' entries.
    entries: Vec<(String, Value)>,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        // JSON's whitespace, exactly serde_json's set (no form feed, no Unicode spaces).
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8], value: Value) -> Option<Value> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Some(value)
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        self.skip_whitespace();
        match self.peek()? {
            b'"' => self.string().map(Value::String),
            b'{' if depth < MAX_DEPTH => self.object(depth + 1),
            b'[' if depth < MAX_DEPTH => self.array(depth + 1),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal(b"true", Value::Bool(true)),
            b'f' => self.literal(b"false", Value::Bool(false)),
            b'n' => self.literal(b"null", Value::Null),
            _ => None,
        }
    }

    /// After the value of an array or object: true at `,`, false at `close`.
    fn separator(&mut self, close: u8) -> Option<bool> {
        self.skip_whitespace();
        let b = self.peek()?;
        self.pos += 1;
        match b {
            b',' => Some(true),
            _ if b == close => Some(false),
            _ => None,
        }
    }

    fn array(&mut self, depth: usize) -> Option<Value> {
        self.pos += 1;
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Some(Value::Array(Vec::new()));
        }
        let mark = self.items.len();
        loop {
            // A `]` after a `,` is not a value: the trailing comma is left to serde_json.
            let item = self.value(depth)?;
            self.items.push(item);
            if !self.separator(b']')? {
                break;
            }
        }
        Some(Value::Array(self.items.drain(mark..).collect()))
    }

    fn object(&mut self, depth: usize) -> Option<Value> {
        self.pos += 1;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(Value::Object(Map::new()));
        }
        let mark = self.entries.len();
        loop {
            self.skip_whitespace();
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            let value = self.value(depth)?;
            self.entries.push((key, value));
            if !self.separator(b'}')? {
                break;
            }
        }
        let mut map = Map::with_capacity(self.entries.len() - mark);
        for (key, value) in self.entries.drain(mark..) {
            // serde_json's own way: a repeated key keeps its place and takes the last value.
            map.insert(key, value);
        }
        Some(Value::Object(map))
    }

    /// The string whose opening quote is at `pos`.
    ///
    /// Two steps, so that the text is copied once, into a `String` allocated at its final size
    /// (escapes only shrink text): find the closing quote, noting where escapes start; then copy
    /// the runs between escapes and decode each escape.
    fn string(&mut self) -> Option<String> {
        let start = self.pos + 1;
        self.escapes.clear();
        let mut i = start;
        let end = loop {
            i = find_escape(self.bytes, i);
            match self.peek_at(i)? {
                b'"' => break i,
                b'\\' => {
                    self.escapes.push(i);
                    // Past the escaped byte, which may be a quote. The decoding step checks
                    // every byte skipped here.
                    i += 2;
                }
                _ => return None,
            }
        };
        self.pos = end + 1;
        if self.escapes.is_empty() {
            return Some(self.text[start..end].to_owned());
        }
        let mut out = String::with_capacity(end - start);
        let mut run = start;
        for &e in &self.escapes {
            if e < run {
                // The second half of a surrogate pair, decoded with the first.
                continue;
            }
            out.push_str(self.text.get(run..e)?);
            let (c, len) = self.escape(e)?;
            out.push(c);
            run = e + len;
        }
        out.push_str(self.text.get(run..end)?);
        Some(out)
    }

    fn peek_at(&self, i: usize) -> Option<u8> {
        self.bytes.get(i).copied()
    }

    /// The character of the escape whose backslash is at `i`, and the escape's length.
    fn escape(&self, i: usize) -> Option<(char, usize)> {
        let c = match self.peek_at(i + 1)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\x08',
            b'f' => '\x0c',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => return self.unicode_escape(i),
            _ => return None,
        };
        Some((c, 2))
    }

    /// `\uXXXX`, or a surrogate pair `\uD8xx\uDCxx`, at `i`. serde_json refuses a lone
    /// surrogate of either kind; so is it left to serde_json here.
    fn unicode_escape(&self, i: usize) -> Option<(char, usize)> {
        let n = self.hex4(i + 2)?;
        match n {
            0xD800..=0xDBFF => {
                if self.bytes.get(i + 6..i + 8)? != b"\\u" {
                    return None;
                }
                let low = self.hex4(i + 8)?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return None;
                }
                let c = 0x1_0000 + ((n - 0xD800) << 10) + (low - 0xDC00);
                Some((char::from_u32(c)?, 12))
            }
            0xDC00..=0xDFFF => None,
            _ => Some((char::from_u32(n)?, 6)),
        }
    }

    /// The four hex digits (either case, as serde_json accepts) at `i`.
    fn hex4(&self, i: usize) -> Option<u32> {
        let digits = self.bytes.get(i..i + 4)?;
        digits.iter().try_fold(0u32, |n, &d| {
            let v = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return None,
            };
            Some(n << 4 | u32::from(v))
        })
    }

    /// The number at `pos`.
    ///
    /// An integer that fits is read here, as serde_json reads it: `u64` when non-negative,
    /// `i64` when negative. Anything else (`-0`, which serde_json makes the float -0.0; a
    /// fraction or exponent, parsed with `float_roundtrip`; an integer beyond 64 bits, which
    /// becomes a float) is parsed by serde_json alone: the longest run of number bytes is given
    /// to `serde_json::from_str`. When that succeeds, serde_json reading the whole text consumes
    /// exactly the same bytes (a number ends at the first byte that cannot continue it, and the
    /// run ends at such a byte) and so yields the same number; when it fails, the whole text is
    /// left to serde_json.
    fn number(&mut self) -> Option<Value> {
        let start = self.pos;
        let negative = self.bytes[start] == b'-';
        let mut i = start + usize::from(negative);
        let mut n: Option<u64> = Some(0);
        while let Some(d @ b'0'..=b'9') = self.peek_at(i) {
            n = n.and_then(|n| n.checked_mul(10)?.checked_add(u64::from(d - b'0')));
            i += 1;
        }
        let digits = i - start - usize::from(negative);
        let plain = digits > 0
            && (digits == 1 || self.bytes[start + usize::from(negative)] != b'0')
            && !matches!(self.peek_at(i), Some(b'.' | b'e' | b'E' | b'+' | b'-'));
        let number = match (n, negative) {
            (Some(n), false) if plain => Some(Value::Number(n.into())),
            // -(2^63) is i64::MIN; below it serde_json makes a float, and -0 is the float -0.0.
            (Some(n @ 1..), true) if plain => 0i64
                .checked_sub_unsigned(n)
                .map(|n| Value::Number(n.into())),
            _ => None,
        };
        match number {
            Some(number) => {
                self.pos = i;
                Some(number)
            }
            None => self.number_by_serde_json(start),
        }
    }

    fn number_by_serde_json(&mut self, start: usize) -> Option<Value> {
        let len = self.bytes[start..]
            .iter()
            .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
            .unwrap_or(self.bytes.len() - start);
        let token = &self.text[start..start + len];
        match serde_json::from_str::<Value>(token) {
            Ok(number @ Value::Number(_)) => {
                self.pos = start + len;
                Some(number)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
