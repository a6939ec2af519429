//! Test vectors for `graphrag_kv::llm_hash`, computed once with CPython 3.11.7
//! (Unicode 14.0.0) and pasted here as literals:
//!
//! - `repr(s)` for [`python_str_repr`],
//! - `md5(str((model, [{"role": r, "content": c}, ...])).encode()).hexdigest()`
//!   for [`compute_args_hash`],
//! - `prefix + md5(content.encode()).hexdigest()` for [`compute_mdhash_id`].

use graphrag_kv::llm_hash::{compute_args_hash, compute_mdhash_id, python_str_repr, Message};

fn m(role: &str, content: &str) -> Message {
    Message {
        role: role.to_owned(),
        content: content.to_owned(),
    }
}

/// (case name, input, Python `repr(input)`).
const REPR_VECTORS: &[(&str, &str, &str)] = &[
    ("plain ascii", "hello world", "'hello world'"),
    ("empty", "", "''"),
    ("single quote only", "it's", "\"it's\""),
    ("double quote only", "say \"hi\"", "'say \"hi\"'"),
    (
        "both quotes",
        "both ' and \" here",
        "'both \\' and \" here'",
    ),
    ("only single quotes", "'''", "\"'''\""),
    ("backslash", "back\\slash", "'back\\\\slash'"),
    ("backslash with single quote", "C:\\it's", "\"C:\\\\it's\""),
    ("backslash with both quotes", "\\'\"\\", "'\\\\\\'\"\\\\'"),
    ("newline cr tab", "a\nb\rc\td", "'a\\nb\\rc\\td'"),
    ("crlf line", "line1\r\nline2\n", "'line1\\r\\nline2\\n'"),
    (
        "nul esc del",
        "\u{0}x\u{1b}[0m\u{7f}",
        "'\\x00x\\x1b[0m\\x7f'",
    ),
    ("vt ff", "\u{b}\u{c}", "'\\x0b\\x0c'"),
    (
        "c1 controls and nbsp",
        "\u{80}\u{85}\u{9f}\u{a0}",
        "'\\x80\\x85\\x9f\\xa0'",
    ),
    ("nbsp between words", "a\u{a0}b", "'a\\xa0b'"),
    ("printable latin1", "¡©¿ÿ", "'¡©¿ÿ'"),
    ("soft hyphen", "co\u{ad}op", "'co\\xadop'"),
    ("zero width space", "a\u{200b}b", "'a\\u200bb'"),
    (
        "line and paragraph separators",
        "\u{2028}\u{2029}",
        "'\\u2028\\u2029'",
    ),
    ("bom", "\u{feff}hello", "'\\ufeffhello'"),
    ("private use", "\u{e000}", "'\\ue000'"),
    ("unassigned bmp", "\u{378}", "'\\u0378'"),
    ("noncharacters", "\u{fffe}\u{ffff}", "'\\ufffe\\uffff'"),
    ("replacement char", "�", "'�'"),
    (
        "ideographic and em space",
        "\u{3000}\u{2003}",
        "'\\u3000\\u2003'",
    ),
    ("arabic letter mark", "\u{61c}", "'\\u061c'"),
    (
        "non-ascii letters",
        "café 中文 Привет",
        "'café 中文 Привет'",
    ),
    ("combining acute", "e\u{301}", "'e\u{301}'"),
    ("crab emoji", "🦀 rust", "'🦀 rust'"),
    (
        "zwj family emoji",
        "👨\u{200d}👩\u{200d}👧",
        "'👨\\u200d👩\\u200d👧'",
    ),
    ("flag emoji", "🇫🇷", "'🇫🇷'"),
    ("emoji with vs16", "❤\u{fe0f}", "'❤\u{fe0f}'"),
    ("supplementary language tag", "\u{e0001}", "'\\U000e0001'"),
    (
        "supplementary tag sequence",
        "🏴\u{e0067}\u{e0062}\u{e0065}\u{e006e}\u{e0067}\u{e007f}",
        "'🏴\\U000e0067\\U000e0062\\U000e0065\\U000e006e\\U000e0067\\U000e007f'",
    ),
    (
        "unicode 15 emoji unassigned in 14",
        "\u{1f6dc}",
        "'\\U0001f6dc'",
    ),
    (
        "supplementary private use",
        "\u{f0000}\u{10ffff}",
        "'\\U000f0000\\U0010ffff'",
    ),
    ("variation selector supplement", "\u{e0100}", "'\u{e0100}'"),
    (
        "mixed",
        "He said \"it's\"\n\té\u{0}🦀",
        "'He said \"it\\'s\"\\n\\té\\x00🦀'",
    ),
];

#[test]
fn python_str_repr_matches_cpython() {
    assert_eq!(REPR_VECTORS.len(), 38);
    let mut failures = Vec::new();
    for &(name, input, expected) in REPR_VECTORS {
        let got = python_str_repr(input);
        if got != expected {
            failures.push(format!(
                "{name}: input {input:?}: got {got:?}, want {expected:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn compute_args_hash_matches_nano_graphrag() {
    // (model, messages, md5 hex of Python's str((model, messages)))
    let vectors: Vec<(&str, Vec<Message>, &str)> = vec![
        ("gpt-4o", vec![], "6a418105c0188af9116f906cbf15c130"),
        (
            "gpt-4o",
            vec![m("user", "hi")],
            "81afaec8014b3077d4bb03dd968dd4a2",
        ),
        (
            "gpt-4o-mini",
            vec![m("user", "It's a \"test\"\nwith newline")],
            "3bdfe4a2983a7586fd56716f356f90c7",
        ),
        (
            "gpt-4o",
            vec![
                m("system", "You are a helpful assistant."),
                m("user", "Extract entities from:\n\"Alice met Bob.\""),
                m("assistant", "(\"entity\"<|>\"ALICE\"<|>\"PERSON\")##"),
            ],
            "c066103ad69c1439624b623088219608",
        ),
        (
            "gpt-4o-mini",
            vec![
                m("system", "Réponds en français, s'il te plaît."),
                m("user", "中文 🦀 \u{200b}\u{feff}\\path\t"),
                m("assistant", "ok\r\n"),
            ],
            "a4840f356dddea5bd37d9697e748e0d3",
        ),
        (
            "it's-model",
            vec![m("user", "")],
            "ad9fd49992802c11358a2ff4e3538b3f",
        ),
        (
            "",
            vec![m("user", "\u{0}\u{7f}\u{a0}\u{ad}\u{e0001}")],
            "63e76fcfed3132c2288cca11b6e8568c",
        ),
    ];
    assert_eq!(vectors.len(), 7);
    for (model, messages, expected) in &vectors {
        assert_eq!(
            compute_args_hash(model, messages),
            *expected,
            "model {model:?}, messages {messages:?}"
        );
    }
}

#[test]
fn compute_mdhash_id_matches_nano_graphrag() {
    // (content, prefix, prefix + md5(content.encode()).hexdigest())
    let vectors: &[(&str, &str, &str)] = &[
        ("hello", "doc-", "doc-5d41402abc4b2a76b9719d911017c592"),
        ("", "doc-", "doc-d41d8cd98f00b204e9800998ecf8427e"),
        ("", "", "d41d8cd98f00b204e9800998ecf8427e"),
        (
            "The quick brown fox jumps over the lazy dog",
            "chunk-",
            "chunk-9e107d9d372bb6826bd81d3542a419d6",
        ),
        (
            "中文 text with 🦀\n",
            "chunk-",
            "chunk-5207ce7f6bac2496704156390abea6c8",
        ),
        ("x", "", "9dd4e461268c8034f5c8564e155c67a6"),
        (
            "line1\r\nline2\u{0}",
            "ent-",
            "ent-ecffaa6ced9c0a6cdf008660a48a74a2",
        ),
    ];
    for &(content, prefix, expected) in vectors {
        assert_eq!(compute_mdhash_id(content, prefix), expected, "{content:?}");
    }
}

#[test]
fn args_hash_depends_on_order_role_and_model() {
    let a = [m("user", "x"), m("assistant", "y")];
    let b = [m("assistant", "y"), m("user", "x")];
    assert_ne!(
        compute_args_hash("gpt-4o", &a),
        compute_args_hash("gpt-4o", &b)
    );
    assert_ne!(
        compute_args_hash("gpt-4o", &a),
        compute_args_hash("gpt-4o-mini", &a)
    );
    assert_ne!(
        compute_args_hash("gpt-4o", &[m("user", "x")]),
        compute_args_hash("gpt-4o", &[m("system", "x")])
    );
}

#[test]
fn message_serde_shape() {
    let msg = m("user", "hi");
    let json = serde_json::to_string(&msg).unwrap();
    assert_eq!(json, r#"{"role":"user","content":"hi"}"#);
    let back: Message = serde_json::from_str(&json).unwrap();
    assert_eq!(back, msg);
}
