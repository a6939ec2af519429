//! Values to JSON text, byte for byte what serde_json writes, with a faster string escape.

use serde_json::Value;

use super::escape::{find_escape, ESCAPE};

/// Writes `value` as compact JSON, byte for byte what `serde_json::to_vec` writes.
///
/// serde_json's string escaping looks up every byte in a table: ~9 instructions a byte, the
/// largest cost of storing an uncompressed 5 KB chunk. Here runs of bytes that need no escape
/// are found many at a time ([`find_escape`]) and copied whole.
pub(super) fn write_json(value: &Value, out: &mut Vec<u8>) {
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
}
