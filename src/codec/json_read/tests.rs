//! The reader against serde_json: the same value, or a refusal that hands the text to it.

use super::*;
use serde_json::json;

/// Equal as serde_json sees it, and in what `==` on a map or a number does not see: key
/// order, and the kind of number (`1` and `1.0`, `0.0` and `-0.0` serialize differently).
fn same(a: &Value, b: &Value) -> bool {
    a == b && serde_json::to_string(a).unwrap() == serde_json::to_string(b).unwrap()
}

/// `json` is read here, to exactly serde_json's value.
#[track_caller]
fn read(json: &[u8]) -> Value {
    let ours = parse(json).unwrap_or_else(|| {
        panic!("gave up on {:?}", String::from_utf8_lossy(json));
    });
    let theirs: Value = serde_json::from_slice(json).expect("serde_json reads it");
    assert!(
        same(&ours, &theirs),
        "{:?}: {ours} != {theirs}",
        String::from_utf8_lossy(json)
    );
    ours
}

/// `json` is left to serde_json.
#[track_caller]
fn gives_up(json: &[u8]) {
    assert_eq!(parse(json), None, "{:?}", String::from_utf8_lossy(json));
}

#[test]
fn scalars_and_literals() {
    assert_eq!(read(b"true"), json!(true));
    assert_eq!(read(b"false"), json!(false));
    assert_eq!(read(b"null"), json!(null));
    assert_eq!(read(b"\"\""), json!(""));
    assert_eq!(read(b"\"plain\""), json!("plain"));
    assert_eq!(read(b"[true,false,null]"), json!([true, false, null]));
    for bad in [
        "tru", "nul", "falsey", "nulll", "True", "NaN", "Infinity", "'a'",
    ] {
        gives_up(bad.as_bytes());
    }
}

#[test]
fn containers_empty_and_nested() {
    assert_eq!(read(b"{}"), json!({}));
    assert_eq!(read(b"[]"), json!([]));
    assert_eq!(read(b"[[]]"), json!([[]]));
    assert_eq!(read(b"[{}]"), json!([{}]));
    assert_eq!(read(b"{\"a\":{}}"), json!({"a": {}}));
    assert_eq!(read(b"{ }"), json!({}));
    assert_eq!(read(b"[ ]"), json!([]));
    let nested = br#"{"a":{"b":[[],[1,[2,{"c":"d\n"}]]],"e":[{"f":null}]},"g":[[[[]]]]}"#;
    assert_eq!(
        read(nested),
        json!({"a": {"b": [[], [1, [2, {"c": "d\n"}]]], "e": [{"f": null}]}, "g": [[[[]]]]})
    );
    // Sibling containers after a nested one: the shared item and entry stacks unwind.
    assert_eq!(
        read(br#"[[1,2],[3],{"a":[4,{"b":5}],"c":6},7]"#),
        json!([[1, 2], [3], {"a": [4, {"b": 5}], "c": 6}, 7])
    );
}

#[test]
fn keys_keep_their_order_and_a_repeated_key_its_first_place_with_the_last_value() {
    let v = read(br#"{"z":1,"a":2,"m":3}"#);
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["z", "a", "m"]
    );
    let v = read(br#"{"a":1,"b":2,"a":3}"#);
    let map = v.as_object().unwrap();
    assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(map["a"], json!(3));
    let v = read(br#"{"k":{"x":1},"j":0,"k":[2],"k":"last"}"#);
    assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"k":"last","j":0}"#);
    // Escaped and plain spellings of one key are one key.
    let v = read(br#"{"a\u0062":1,"ab":2}"#);
    assert_eq!(serde_json::to_string(&v).unwrap(), r#"{"ab":2}"#);
}

#[test]
fn integers_at_the_limits() {
    assert!(read(b"0").is_u64());
    assert_eq!(read(b"18446744073709551615"), json!(u64::MAX));
    assert!(read(b"18446744073709551615").is_u64());
    assert_eq!(read(b"9223372036854775807"), json!(i64::MAX));
    assert!(read(b"-1").is_i64());
    assert_eq!(read(b"-9223372036854775808"), json!(i64::MIN));
    assert!(read(b"-9223372036854775808").is_i64());
    // Beyond 64 bits, -0, fractions and exponents are floats, as serde_json reads them.
    for float in [
        "18446744073709551616",
        "-9223372036854775809",
        "-18446744073709551615",
        "123456789012345678901234567890",
        "-0",
        "-0.0",
        "0.0",
        "1.5",
        "-1.5",
        "1e5",
        "1E5",
        "1e+5",
        "1e-5",
        "0.1",
        "0.18017933438838418",
        "1.7976931348623157e308",
        "5e-324",
        "1e-400",
        "2.2250738585072011e-308",
    ] {
        let v = read(float.as_bytes());
        assert!(v.is_f64(), "{float}: {v}");
    }
    assert_eq!(
        serde_json::to_string(&read(b"-0")).unwrap(),
        "-0.0",
        "-0 is the float -0.0"
    );
    assert_eq!(
        read(br#"{"a":[1.5,-2,3e2,18446744073709551616],"b":-0}"#),
        json!({"a": [1.5, -2, 300.0, 18446744073709551616.0], "b": -0.0})
    );
    for bad in [
        "01", "-01", "00", "-", "--1", "+1", "1.", ".5", "1e", "1e+", "1.e5", "-a", "1-", "1e400",
        "-1e400", "0x10", "1.5.3", "1ee5",
    ] {
        gives_up(bad.as_bytes());
        gives_up(format!("[{bad}]").as_bytes());
    }
}

#[test]
fn escapes() {
    assert_eq!(
        read(br#""\" \\ \/ \b \f \n \r \t""#),
        json!("\" \\ / \u{8} \u{c} \n \r \t")
    );
    assert_eq!(read(br#""\u0041\u00e9\u00E9\u20AC""#), json!("Aéé€"));
    assert_eq!(read(br#""\u0000\u001f\u007f""#), json!("\0\u{1f}\u{7f}"));
    assert_eq!(read(br#""\uD83E\uDD80 \ud83e\udd80""#), json!("🦀 🦀"));
    assert_eq!(read(br#""\uDBFF\uDFFF""#), json!("\u{10FFFF}"));
    assert_eq!(read(br#""\uD800\uDC00""#), json!("\u{10000}"));
    assert_eq!(
        read(br#""\uFFFF\uE000\uD7FF""#),
        json!("\u{FFFF}\u{E000}\u{D7FF}")
    );
    // An escape at every offset within an 8-byte word, and runs before and after it.
    for pad in 0..20 {
        for esc in [r"\n", r#"\""#, r"\\", r"\u00e9", r"\uD83E\uDD80"] {
            let text = format!("\"{}{esc}{}{esc}\"", "x".repeat(pad), "y".repeat(pad % 9));
            read(text.as_bytes());
        }
    }
}

#[test]
fn bad_escapes_and_lone_surrogates_are_left_to_serde_json() {
    for bad in [
        r#""\x""#,
        r#""\a""#,
        r#""\'""#,
        r#""\U0041""#,
        r#""\u12""#,
        r#""\u12"#,
        r#""\uZZZZ""#,
        r#""\u+123""#,
        r#""\u 123""#,
        r#""\uD800""#,
        r#""\uDBFF""#,
        r#""\uDC00""#,
        r#""\uDFFF\uD800""#,
        r#""\uD800\u0041""#,
        r#""\uD800\uD800""#,
        r#""\uD800x""#,
        r#""\uD800\n""#,
        r#""\uD800\"#,
        r#""\uD800\u""#,
        r#""\uD800\uDC0""#,
        r#""\"#,
        r#""abc\"#,
    ] {
        gives_up(bad.as_bytes());
        assert!(
            serde_json::from_slice::<Value>(bad.as_bytes()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn control_characters_and_invalid_utf8_are_left_to_serde_json() {
    for c in (0u8..0x20).chain([0x7f]) {
        let text = [b'"', b'a', c, b'b', b'"'];
        // The same after an escape, where the string is decoded rather than sliced.
        let escaped = [b'"', b'\\', b'n', b'a', c, b'b', b'"'];
        if c == 0x7f {
            // DEL is not a control character to JSON.
            read(&text);
            read(&escaped);
        } else {
            gives_up(&text);
            gives_up(&escaped);
        }
    }
    for bad in [
        &b"\"\xff\""[..],
        b"\"\xc3\"",
        b"\"\xc3\x28\"",
        b"[\"a\"]\xc3",
        b"\xef\xbb\xbf{}",
        b"\"\xed\xa0\x80\"",
        b"{\"\xf0\x9f\x80\":1}",
    ] {
        gives_up(bad);
    }
}

#[test]
fn unicode_text() {
    assert_eq!(
        read("\"héllo wörld 🦀 \u{2028} 日本語 \u{10FFFF}\"".as_bytes()),
        json!("héllo wörld 🦀 \u{2028} 日本語 \u{10FFFF}")
    );
    assert_eq!(
        read("{\"ключ\":\"значение\"}".as_bytes()),
        json!({"ключ": "значение"})
    );
}

#[test]
fn whitespace() {
    let text = b" \t\n\r{ \"a\" \t:\n[ 1 ,\r\n2 ,\t\"x\" ] , \"b\":{ \"c\" : null } }\r\n\t ";
    assert_eq!(read(text), json!({"a": [1, 2, "x"], "b": {"c": null}}));
    // Form feed, vertical tab, NBSP and other Unicode spaces are not JSON whitespace.
    for bad in [
        &b"\x0c1"[..],
        b"1\x0c",
        b"[1,\x0b2]",
        "\u{a0}1".as_bytes(),
        "[1,\u{2003}2]".as_bytes(),
    ] {
        gives_up(bad);
    }
}

#[test]
fn syntax_errors_and_trailing_text_are_left_to_serde_json() {
    for bad in [
        "",
        " ",
        "[",
        "{",
        "]",
        "}",
        "[1,]",
        "[,]",
        "[,1]",
        "[1 2]",
        "[1;2]",
        "{\"a\":1,}",
        "{,}",
        "{a:1}",
        "{\"a\" 1}",
        "{\"a\":}",
        "{\"a\"}",
        "{\"a\":1 \"b\":2}",
        "{1:2}",
        "[1}",
        "{\"a\":1]",
        "\"abc",
        "1 2",
        "{} x",
        "[]]",
        "{}}",
        "[] []",
        "null,",
        "\"a\"\"b\"",
    ] {
        gives_up(bad.as_bytes());
        assert!(
            serde_json::from_slice::<Value>(bad.as_bytes()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn deep_nesting_is_left_to_serde_json() {
    for depth in [1, 2, 63, 64] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        read(arrays.as_bytes());
        let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        read(objects.as_bytes());
    }
    for depth in [65, 127, 128, 1000] {
        gives_up(format!("{}{}", "[".repeat(depth), "]".repeat(depth)).as_bytes());
        gives_up(format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth)).as_bytes());
    }
}

#[test]
fn values_like_the_stored_ones() {
    let content = "The index holds \"chunks\" of text.\nEach one is ~1,200 tokens \
                   (a C:\\path, a tab\there) — and ünïcödé.\n\n"
        .repeat(40);
    let chunk = json!({
        "tokens": 1100,
        "content": content,
        "chunk_order_index": 3,
        "full_doc_id": "doc-0123456789abcdef0123456789abcdef",
    });
    let text = serde_json::to_vec(&chunk).unwrap();
    assert_eq!(read(&text), chunk);
    let pretty = serde_json::to_vec_pretty(&chunk).unwrap();
    assert_eq!(read(&pretty), chunk);
    let entry = json!({"return": content, "model": "gpt-4o-mini"});
    assert_eq!(read(&serde_json::to_vec(&entry).unwrap()), entry);
}

/// `s` as a JSON string literal, each character written one of the ways JSON allows, chosen
/// by `how`: as itself (when allowed), a short escape, or `\u` (a surrogate pair above the
/// BMP), hex digits in either case.
fn spell(s: &str, how: &[u8]) -> String {
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        let pick = how.get(i % how.len().max(1)).copied().unwrap_or(0);
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '/' => Some("\\/"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            _ => None,
        };
        let must_escape = c < ' ' || c == '"' || c == '\\';
        match (pick % 3, short) {
            (0, _) if !must_escape => out.push(c),
            (1, Some(short)) => out.push_str(short),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let hex = format!("\\u{:04x}", unit);
                    if pick & 4 != 0 {
                        out.push_str(&hex.to_uppercase().replace("\\U", "\\u"));
                    } else {
                        out.push_str(&hex);
                    }
                }
            }
        }
    }
    out.push('"');
    out
}

proptest::proptest! {
    #[test]
    fn any_string_spelled_any_way_reads_as_serde_json_reads_it(
        s in "(?s).{0,60}",
        how in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16),
    ) {
        let text = spell(&s, &how);
        let v = read(text.as_bytes());
        proptest::prop_assert_eq!(v, Value::String(s.clone()));
        // As a key too, twice: one entry, the last value.
        let obj = format!("{{{text}:1,\"k\":2,{text}:3}}");
        read(obj.as_bytes());
    }
}
