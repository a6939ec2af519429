//! `NaN`, `Infinity` and `-Infinity` in JSON text, as Python's `json.dump` writes non-finite
//! floats by default (`allow_nan=True`). JSON has no such numbers and serde_json refuses them;
//! nano-graphrag's kv_store files may hold them (a score or an embedding that overflowed), so
//! the JSON-file backend reads them as null instead of refusing the whole file.

/// One non-finite number found in a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NonFinite {
    /// The key of the top-level object entry holding it (`None` when the text is not an object
    /// or the number is the top-level value itself).
    pub(crate) key: Option<String>,
    /// `NaN`, `Infinity` or `-Infinity`.
    pub(crate) token: &'static str,
    /// 1-based line of the number.
    pub(crate) line: usize,
    /// 1-based byte column of the number.
    pub(crate) column: usize,
}

/// The tokens, `-Infinity` before `Infinity` is irrelevant (they start differently), `NaN`.
const TOKENS: [&str; 3] = ["NaN", "-Infinity", "Infinity"];

/// `json` with every `NaN`, `Infinity` and `-Infinity` outside strings replaced by `null`, and
/// where each was; `None` when there is none. Text inside strings is never touched. The result
/// is not checked: the caller parses it (and reports the original text's error if that fails).
pub(crate) fn replace_non_finite(json: &[u8]) -> Option<(Vec<u8>, Vec<NonFinite>)> {
    let mut out = Vec::with_capacity(json.len());
    let mut found = Vec::new();
    let mut depth = 0usize;
    let mut key: Option<String> = None;
    let (mut line, mut line_start) = (1usize, 0usize);
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    // An escape covers the next byte (`\"` does not end the string).
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                let end = (i + 1).min(json.len());
                out.extend_from_slice(&json[start..end]);
                if depth == 1 {
                    // A string followed by ':' at the top level is an entry's key.
                    let rest = &json[end..];
                    let colon = rest.iter().position(|b| !b.is_ascii_whitespace());
                    if colon.is_some_and(|p| rest[p] == b':') {
                        key = serde_json::from_slice::<String>(&json[start..end]).ok();
                    }
                }
                i = end;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'\n' => (line, line_start) = (line + 1, i + 1),
            _ => {}
        }
        if let Some(token) = TOKENS.iter().find(|t| json[i..].starts_with(t.as_bytes())) {
            found.push(NonFinite {
                key: if depth >= 1 { key.clone() } else { None },
                token,
                line,
                column: i - line_start + 1,
            });
            out.extend_from_slice(b"null");
            i += token.len();
            continue;
        }
        out.push(json[i]);
        i += 1;
    }
    (!found.is_empty()).then_some((out, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_numbers_outside_strings() {
        let text = b"{\n  \"a\": NaN,\n  \"b\": [1, -Infinity, {\"c\": Infinity}],\n  \"NaN\": \"NaN \\\" Infinity\"\n}";
        let (fixed, found) = replace_non_finite(text).unwrap();
        assert_eq!(
            String::from_utf8(fixed).unwrap(),
            "{\n  \"a\": null,\n  \"b\": [1, null, {\"c\": null}],\n  \"NaN\": \"NaN \\\" Infinity\"\n}"
        );
        let summary: Vec<_> = found
            .iter()
            .map(|f| (f.key.as_deref().unwrap(), f.token, f.line, f.column))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "NaN", 2, 8),
                ("b", "-Infinity", 3, 12),
                ("b", "Infinity", 3, 29)
            ]
        );
        assert_eq!(replace_non_finite(b"{\"a\": 1.5}"), None);
        assert_eq!(replace_non_finite(b"\"NaN\""), None);
        // Unterminated strings and stray escapes never read past the end.
        assert_eq!(replace_non_finite(b"\"abc\\"), None);
        assert_eq!(replace_non_finite(b"NaN").unwrap().1[0].key, None);
    }
}
