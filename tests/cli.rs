//! The `graphrag-kv` command, run as a subprocess on both backends: a JSON working directory in
//! a temporary directory, and a real `redis-server` with a unique key prefix.
//!
//! Every run starts from an empty environment (only `PATH` is kept), so variables of the
//! machine running the tests (`REDIS_URL`, `STORAGE_KV_BACKEND`, `RUST_LOG`, ...) never leak in.

// The conformance suite's macro is not used here.
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use graphrag_kv::{Storage, StoreConfig};
use serde_json::{json, Value};
use support::RedisServer;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_graphrag-kv");

/// A kv_store file exactly as Python's `json.dump(obj, f, indent=2, ensure_ascii=False)` writes
/// it (checked with CPython): non-ASCII kept as is, escapes, empty containers, no final newline.
/// Ids are in sorted order, the order `export` writes.
const FIXTURE: &str = r#"{
  "doc-1": {
    "content": "Grüße, 世界 — naïve café"
  },
  "doc-2": {
    "content": "tab\there \"quoted\" back\\slash\nnewline 🦀 \u0001",
    "tokens": 12,
    "score": 0.5,
    "tags": [
      "α",
      "β"
    ],
    "meta": {},
    "empty": [],
    "none": null,
    "ok": true
  },
  "日本": {
    "return": "答え",
    "model": "gpt-4o"
  }
}"#;

/// What a run of the binary produced.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A command for the binary with an empty environment except `PATH`.
fn bare_cmd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to completion.
fn output(cmd: &mut Command) -> Out {
    let o = cmd.output().expect("running graphrag-kv");
    Out {
        code: o.status.code().expect("graphrag-kv was killed by a signal"),
        stdout: String::from_utf8(o.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(o.stderr).expect("stderr is UTF-8"),
    }
}

/// Asserts a successful run with nothing on stderr, and returns its stdout.
#[track_caller]
fn ok(out: Out) -> String {
    assert_eq!(out.code, 0, "expected success: {out:#?}");
    assert_eq!(out.stderr, "", "expected an empty stderr: {out:#?}");
    out.stdout
}

/// Asserts a failed run: exit 2, nothing on stdout, exactly one `graphrag-kv: ` line on stderr
/// containing every one of `needles`, and no panic or backtrace.
#[track_caller]
fn fails(out: Out, needles: &[&str]) -> String {
    assert_eq!(out.code, 2, "expected exit status 2: {out:#?}");
    assert_eq!(out.stdout, "", "expected an empty stdout: {out:#?}");
    assert!(
        out.stderr.starts_with("graphrag-kv: ") && out.stderr.ends_with('\n'),
        "{out:#?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "expected one line: {out:#?}");
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    assert!(!out.stderr.contains("RUST_BACKTRACE"), "{out:#?}");
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "expected {needle:?} in: {out:#?}"
        );
    }
    out.stderr
}

/// Which backend a [`Backend`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Redis,
}

/// One fresh, empty backend plus a scratch directory for files.
struct Backend {
    kind: Kind,
    /// Scratch files; the JSON working directory is its `store` subdirectory.
    dir: tempfile::TempDir,
    redis: Option<RedisServer>,
    prefix: String,
}

impl Backend {
    fn json() -> Backend {
        Backend {
            kind: Kind::Json,
            dir: tempfile::tempdir().unwrap(),
            redis: None,
            prefix: String::new(),
        }
    }

    fn redis() -> Backend {
        Backend {
            kind: Kind::Redis,
            dir: tempfile::tempdir().unwrap(),
            redis: Some(RedisServer::start()),
            prefix: support::unique_prefix("cli"),
        }
    }

    /// The JSON working directory.
    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// A path for a scratch file (outside the working directory).
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> &RedisServer {
        self.redis.as_ref().expect("a redis backend")
    }

    /// A command configured for this backend through the environment.
    fn cmd(&self) -> Command {
        let mut cmd = bare_cmd();
        match self.kind {
            Kind::Json => {
                cmd.env("STORAGE_KV_BACKEND", "json")
                    .env("STORAGE_WORKING_DIR", self.store_dir());
            }
            Kind::Redis => {
                cmd.env("STORAGE_KV_BACKEND", "redis")
                    .env("REDIS_URL", self.server().url())
                    .env("REDIS_KEY_PREFIX", &self.prefix);
            }
        }
        cmd
    }

    /// The global options selecting this backend (the key prefix stays in the environment).
    fn options(&self) -> Vec<String> {
        match self.kind {
            Kind::Json => vec![
                "--backend".into(),
                "json".into(),
                "--working-dir".into(),
                self.store_dir().display().to_string(),
            ],
            Kind::Redis => vec![
                "--backend".into(),
                "redis".into(),
                "--redis-url".into(),
                self.server().url(),
            ],
        }
    }

    fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Out {
        output(self.cmd().args(args))
    }

    /// Opens the backend in this process, as an indexer would.
    fn config(&self) -> StoreConfig {
        let b = StoreConfig::builder();
        match self.kind {
            Kind::Json => b.working_dir(self.store_dir()),
            Kind::Redis => b
                .backend(graphrag_kv::BackendKind::Redis)
                .redis_url(self.server().url())
                .key_prefix(&self.prefix),
        }
        .build()
        .unwrap()
    }
}

/// One `#[test]` per backend for each named function taking `&Backend`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn json() {
                    super::$name(&super::Backend::json());
                }
                #[test]
                fn redis() {
                    super::$name(&super::Backend::redis());
                }
            }
        )*
    };
}

both_backends!(
    put_get_keys_delete_clear,
    get_missing_exits_1,
    get_fields,
    options_before_and_after_the_subcommand,
    keys_json_with_newline_in_id,
    import_then_export_is_byte_identical,
    import_in_batches,
    stats_json_shape,
    stats_table,
    input_errors,
    migrate_and_verify_against_the_other_backend,
);

fn put_get_keys_delete_clear(b: &Backend) {
    ok(b.run(&["put", "ns", "b", r#"{"content": "B", "n": 2}"#]));
    ok(b.run(&["put", "ns", "a", r#"{"content": "Grüße", "n": 1}"#]));
    ok(b.run(&["put", "ns", "scalar", "42"]));
    ok(b.run(&["put", "other", "a", r#""kept""#]));

    assert_eq!(
        ok(b.run(&["get", "ns", "a"])),
        "{\n  \"content\": \"Grüße\",\n  \"n\": 1\n}\n"
    );
    assert_eq!(ok(b.run(&["get", "ns", "scalar"])), "42\n");
    assert_eq!(ok(b.run(&["keys", "ns"])), "a\nb\nscalar\n");

    // Overwrite replaces the whole value.
    ok(b.run(&["put", "ns", "a", r#"{"content": "new"}"#]));
    assert_eq!(
        ok(b.run(&["get", "ns", "a"])),
        "{\n  \"content\": \"new\"\n}\n"
    );

    // Several ids at once; missing ones are ignored.
    ok(b.run(&["delete", "ns", "a", "scalar", "never-stored"]));
    assert_eq!(ok(b.run(&["keys", "ns"])), "b\n");

    ok(b.run(&["clear", "ns"]));
    assert_eq!(ok(b.run(&["keys", "ns"])), "");
    // Clear is scoped to its namespace.
    assert_eq!(ok(b.run(&["get", "other", "a"])), "\"kept\"\n");

    match b.kind {
        // Writing commands checkpoint: the file is on disk in nano-graphrag's format.
        Kind::Json => assert_eq!(
            std::fs::read_to_string(b.store_dir().join("kv_store_other.json")).unwrap(),
            "{\n  \"a\": \"kept\"\n}"
        ),
        // Keys live under the configured prefix.
        Kind::Redis => {
            let mut conn = b.server().conn();
            let key = format!("{}:other:a", b.prefix);
            let n: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
            assert_eq!(n, 1, "{key}");
        }
    }
}

fn get_missing_exits_1(b: &Backend) {
    ok(b.run(&["put", "ns", "present", "1"]));
    let out = b.run(&["get", "ns", "absent"]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(out.stdout, "", "{out:#?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");
    assert!(out.stderr.contains("absent"), "{out:#?}");
    // A namespace that was never written is empty, not an error.
    assert_eq!(b.run(&["get", "never_written", "x"]).code, 1);
}

fn get_fields(b: &Backend) {
    ok(b.run(&[
        "put",
        "text_chunks",
        "chunk-1",
        r#"{"tokens": 3, "content": "abc", "chunk_order_index": 0, "full_doc_id": "doc-1"}"#,
    ]));
    assert_eq!(
        ok(b.run(&[
            "get",
            "text_chunks",
            "chunk-1",
            "--fields",
            "content,tokens,nope"
        ])),
        "{\n  \"tokens\": 3,\n  \"content\": \"abc\"\n}\n"
    );
    assert_eq!(
        ok(b.run(&["get", "--fields", "full_doc_id", "text_chunks", "chunk-1"])),
        "{\n  \"full_doc_id\": \"doc-1\"\n}\n"
    );
    assert_eq!(
        b.run(&["get", "text_chunks", "missing", "--fields", "content"])
            .code,
        1
    );
}

fn options_before_and_after_the_subcommand(b: &Backend) {
    // Only the key prefix comes from the environment: the options select the backend.
    let cmd = || {
        let mut c = bare_cmd();
        c.env("REDIS_KEY_PREFIX", &b.prefix)
            .env("REDIS_RETRIES", "0");
        c
    };
    let opts = b.options();
    let put = output(cmd().args(&opts).args(["put", "ns", "id", r#"{"v": 1}"#]));
    ok(put);
    let get = output(cmd().args(["get", "ns", "id"]).args(&opts));
    assert_eq!(ok(get), "{\n  \"v\": 1\n}\n");
    // Mixed: one option before, the other after.
    let keys = output(cmd().args(&opts[..2]).args(["keys", "ns"]).args(&opts[2..]));
    assert_eq!(ok(keys), "id\n");
    // The same data through the environment.
    assert_eq!(ok(b.run(&["keys", "ns"])), "id\n");

    // Options override the environment.
    let mut env_says_other = b.cmd();
    env_says_other
        .env("STORAGE_WORKING_DIR", b.file("elsewhere"))
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .args(["keys", "ns"])
        .args(&opts);
    assert_eq!(ok(output(&mut env_says_other)), "id\n");
}

fn keys_json_with_newline_in_id(b: &Backend) {
    ok(b.run(&["put", "ns", "line1\nline2", "1"]));
    ok(b.run(&["put", "ns", "a", "2"]));
    ok(b.run(&["put", "ns", "ü \"q\"", "3"]));
    let text = ok(b.run(&["keys", "ns", "--json"]));
    assert!(
        text.ends_with('\n') && text.trim_end().lines().count() == 1,
        "{text:?}"
    );
    let keys: Vec<String> = serde_json::from_str(&text).unwrap();
    assert_eq!(keys, ["a", "line1\nline2", "ü \"q\""]);
    // The plain listing prints ids as they are.
    assert_eq!(ok(b.run(&["keys", "ns"])), "a\nline1\nline2\nü \"q\"\n");
    assert_eq!(ok(b.run(&["get", "ns", "line1\nline2"])), "1\n");
    assert_eq!(ok(b.run(&["keys", "empty", "--json"])), "[]\n");
}

fn import_then_export_is_byte_identical(b: &Backend) {
    let fixture = b.file("kv_store_full_docs.json");
    std::fs::write(&fixture, FIXTURE).unwrap();
    let out = b.run(&[Path::new("import"), Path::new("full_docs"), &fixture]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains('3'),
        "import should report its count: {out:#?}"
    );

    let exported = ok(b.run(&["export", "full_docs"]));
    assert_eq!(exported, FIXTURE);
    let parsed: Value = serde_json::from_str(&exported).unwrap();
    assert_eq!(parsed, serde_json::from_str::<Value>(FIXTURE).unwrap());
    assert_eq!(
        parsed["doc-1"]["content"],
        json!("Grüße, 世界 — naïve café")
    );
    assert_eq!(
        ok(b.run(&["get", "full_docs", "doc-1"])),
        "{\n  \"content\": \"Grüße, 世界 — naïve café\"\n}\n"
    );

    // To a file (replaced if present).
    let target = b.file("export.json");
    std::fs::write(&target, "old contents").unwrap();
    assert_eq!(
        ok(b.run(&[Path::new("export"), Path::new("full_docs"), &target])),
        ""
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), FIXTURE);

    // The exported file imports again into another namespace unchanged.
    ok_import(b, "copy", &target);
    assert_eq!(ok(b.run(&["export", "copy"])), FIXTURE);

    if b.kind == Kind::Json {
        // The indexer's own file is nano-graphrag's format too.
        assert_eq!(
            std::fs::read_to_string(b.store_dir().join("kv_store_full_docs.json")).unwrap(),
            FIXTURE
        );
    }

    // Export of an empty namespace is an empty object.
    assert_eq!(ok(b.run(&["export", "nothing_here"])), "{}");
}

/// Imports `file` into `namespace`, expecting success.
fn ok_import(b: &Backend, namespace: &str, file: &Path) {
    let out = b.run(&[Path::new("import"), Path::new(namespace), file]);
    assert_eq!(out.code, 0, "{out:#?}");
}

fn import_in_batches(b: &Backend) {
    let mut map = serde_json::Map::new();
    for i in 0..2500 {
        map.insert(
            format!("id-{i:05}"),
            json!({"n": i, "text": "é".repeat(i % 7)}),
        );
    }
    let file = b.file("big.json");
    std::fs::write(&file, graphrag_kv::backend::json_file::to_python_json(&map)).unwrap();
    let out = b.run(&[Path::new("import"), Path::new("big"), &file]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("2500"), "{out:#?}");
    let keys = ok(b.run(&["keys", "big"]));
    // Listed as a stream, sorted within each page only: every id once.
    let mut listed: Vec<&str> = keys.lines().collect();
    listed.sort_unstable();
    let expected: Vec<String> = (0..2500).map(|i| format!("id-{i:05}")).collect();
    assert_eq!(listed, expected);
    assert_eq!(
        ok(b.run(&["get", "big", "id-02498"])),
        "{\n  \"n\": 2498,\n  \"text\": \"éééééé\"\n}\n"
    );
    let exported: Value = serde_json::from_str(&ok(b.run(&["export", "big"]))).unwrap();
    assert_eq!(exported, Value::Object(map));
}

fn stats_json_shape(b: &Backend) {
    ok(b.run(&["put", "full_docs", "d1", r#"{"content": "one"}"#]));
    ok(b.run(&["put", "full_docs", "d2", r#"{"content": "two"}"#]));
    ok(b.run(&[
        "put",
        "llm_response_cache",
        "h",
        r#"{"return": "x", "model": "m"}"#,
    ]));

    let all: Value = serde_json::from_str(&ok(b.run(&["stats", "--json"]))).unwrap();
    let top = all.as_object().unwrap();
    // Redis adds the server's figures (INFO); JSON has no server.
    let expected_top: &[&str] = match b.kind {
        Kind::Json => &["backend", "namespaces"],
        Kind::Redis => &["backend", "namespaces", "server"],
    };
    assert_eq!(top.keys().collect::<Vec<_>>(), expected_top, "{all}");
    if b.kind == Kind::Redis {
        let server = &all["server"];
        assert!(server["used_memory"].as_u64().unwrap() > 0, "{server}");
        assert_eq!(server["evicted_keys"], json!(0), "{server}");
        assert_eq!(server["maxmemory_policy"], json!("noeviction"), "{server}");
        assert!(server["keys"].as_u64().unwrap() >= 3, "{server}");
    }
    let backend = match b.kind {
        Kind::Json => "json",
        Kind::Redis => "redis",
    };
    assert_eq!(all["backend"], json!(backend));
    let namespaces = all["namespaces"].as_object().unwrap();
    let mut names: Vec<_> = namespaces.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["full_docs", "llm_response_cache"], "{all}");
    for (name, s) in namespaces {
        let fields: Vec<_> = s.as_object().unwrap().keys().cloned().collect();
        for f in ["keys", "bytes", "ttl_seconds"] {
            assert!(fields.iter().any(|k| k == f), "{name}: {s}");
        }
        for f in &fields {
            assert!(
                ["keys", "bytes", "ttl_seconds", "bytes_sampled"].contains(&f.as_str()),
                "unexpected field {f} in {s}"
            );
        }
        assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
    }
    assert_eq!(namespaces["full_docs"]["keys"], json!(2));
    assert_eq!(namespaces["llm_response_cache"]["keys"], json!(1));
    assert_eq!(namespaces["full_docs"]["ttl_seconds"], json!(0));
    let llm_ttl = match b.kind {
        Kind::Json => 0,
        Kind::Redis => 43_200,
    };
    assert_eq!(
        namespaces["llm_response_cache"]["ttl_seconds"],
        json!(llm_ttl)
    );

    // Named namespaces only, including one without data.
    let some: Value = serde_json::from_str(&ok(b.run(&[
        "stats",
        "--json",
        "--namespace",
        "full_docs",
        "--namespace",
        "empty_ns",
    ])))
    .unwrap();
    let names: Vec<_> = some["namespaces"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(names, ["full_docs", "empty_ns"]);
    assert_eq!(some["namespaces"]["empty_ns"]["keys"], json!(0));
    assert_eq!(some["namespaces"]["empty_ns"]["bytes"], json!(0));
}

fn stats_table(b: &Backend) {
    ok(b.run(&["put", "text_chunks", "c1", r#"{"content": "abc"}"#]));
    let table = ok(b.run(&["stats"]));
    let row = table
        .lines()
        .find(|l| l.starts_with("text_chunks"))
        .unwrap_or_else(|| panic!("no text_chunks row in:\n{table}"));
    let cells: Vec<_> = row.split_whitespace().collect();
    assert_eq!(cells[1], "1", "{table}");
    // Redis: the server's memory, limit, policy and evictions follow the table.
    let server_lines = [
        "used_memory",
        "maxmemory ",
        "maxmemory-policy  noeviction",
        "evicted_keys      0",
    ];
    for needle in server_lines {
        assert_eq!(
            table.contains(needle),
            b.kind == Kind::Redis,
            "{needle:?} in:\n{table}"
        );
    }
}

fn input_errors(b: &Backend) {
    // Bad JSON: the position is named.
    fails(
        b.run(&["put", "ns", "id", r#"{"a": tru}"#]),
        &["JSON", "line 1 column"],
    );
    fails(b.run(&["put", "ns", "id", ""]), &["JSON"]);
    // Invalid namespace.
    fails(b.run(&["put", "a:b", "id", "1"]), &["a:b"]);
    fails(b.run(&["get", "a:b", "id"]), &["a:b"]);
    fails(b.run(&["keys", "a:b"]), &["a:b"]);
    // Invalid id.
    fails(b.run(&["put", "ns", "", "1"]), &["id"]);
    // Corrupt import file: file and line named; nothing imported.
    let corrupt = b.file("corrupt.json");
    std::fs::write(&corrupt, "{\n  \"a\": 1,\n  \"b\": tru").unwrap();
    let msg = fails(
        b.run(&[Path::new("import"), Path::new("ns2"), &corrupt]),
        &["corrupt.json", "line 3"],
    );
    assert!(msg.contains("column 10"), "{msg}");
    assert_eq!(ok(b.run(&["keys", "ns2"])), "");
    fails(
        b.run(&[
            Path::new("import"),
            Path::new("ns2"),
            &b.file("absent.json"),
        ]),
        &["absent.json"],
    );
    // A value that is not an object of ids.
    std::fs::write(b.file("array.json"), "[1, 2]").unwrap();
    fails(
        b.run(&[Path::new("import"), Path::new("ns2"), &b.file("array.json")]),
        &["array.json"],
    );
    // Export into a directory that does not exist.
    fails(
        b.run(&[
            Path::new("export"),
            Path::new("ns"),
            &b.file("no/such/dir/out.json"),
        ]),
        &["no/such/dir"],
    );
    // Usage errors.
    fails(b.run(&["frobnicate"]), &["frobnicate"]);
    fails(b.run(&["put", "ns"]), &["<ID>"]);
    fails(b.run(&["delete", "ns"]), &["<IDS>"]);
    fails(b.run(&["keys", "ns", "--bogus"]), &["--bogus"]);
    fails(b.run(&["--backend", "mongo", "keys", "ns"]), &["mongo"]);
    fails(b.run::<&str>(&[]), &["command"]);
}

/// The SPEC naming this backend on the command line.
fn spec(b: &Backend) -> String {
    match b.kind {
        Kind::Json => format!("json:{}", b.store_dir().display()),
        Kind::Redis => b.server().url(),
    }
}

/// `migrate` from this backend to a JSON directory and back into a second namespace set,
/// `verify` both ways, exit 1 on a difference; the environment's key prefix applies to SPECs.
fn migrate_and_verify_against_the_other_backend(b: &Backend) {
    ok(b.run(&["put", "full_docs", "d1", r#"{"content": "Grüße"}"#]));
    ok(b.run(&["put", "text_chunks", "c1", r#"{"content": "世界"}"#]));
    let copy = format!("json:{}", b.file("copy").display());
    let out = b.run(&["migrate", "--from", &spec(b), "--to", &copy]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stdout
            .contains("full_docs: 1 id in the source: 1 copied"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("2 ids copied, 0 already equal"),
        "{out:#?}"
    );

    let out = b.run(&["verify", "--from", &spec(b), "--to", &copy]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(out.stdout.contains("full_docs: equal (1 id)"), "{out:#?}");

    ok(b.run(&["put", "full_docs", "d1", r#"{"content": "changed"}"#]));
    let out = b.run(&[
        "verify",
        "--from",
        &spec(b),
        "--to",
        &copy,
        "--namespace",
        "full_docs",
    ]);
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stdout.contains("  different \"d1\""), "{out:#?}");
    assert!(
        !out.stdout.contains("text_chunks"),
        "only the namespace asked for: {out:#?}"
    );
    assert!(out.stdout.contains("DIFFERENT in 1 namespace"), "{out:#?}");

    // Re-running copies only the changed id.
    let out = b.run(&["migrate", "--from", &spec(b), "--to", &copy]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stdout.contains("1 id copied, 1 already equal"),
        "{out:#?}"
    );
    assert_eq!(
        b.run(&["verify", "--from", &spec(b), "--to", &copy]).code,
        0
    );
}

#[test]
fn help_lists_migrate_and_verify() {
    let help = ok(output(bare_cmd().arg("--help")));
    for needle in ["migrate", "verify", "stats"] {
        assert!(help.contains(needle), "{help}");
    }
    let help = ok(output(bare_cmd().args(["migrate", "--help"])));
    for needle in [
        "--from <SPEC>",
        "--to <SPEC>",
        "--namespace <NS>",
        "--batch <N>",
    ] {
        assert!(help.contains(needle), "{help}");
    }
}

#[test]
fn unknown_backend_in_environment_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = output(
        bare_cmd()
            .env("STORAGE_KV_BACKEND", "mongo")
            .env("STORAGE_WORKING_DIR", dir.path())
            .args(["keys", "ns"]),
    );
    fails(out, &["STORAGE_KV_BACKEND", "mongo"]);
    let out = output(
        bare_cmd()
            .env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_POOL_TIMEOUT", "soon")
            .args(["keys", "ns"]),
    );
    fails(out, &["REDIS_POOL_TIMEOUT"]);
}

#[test]
fn help_and_version_exit_0() {
    let help = output(bare_cmd().arg("--help"));
    assert_eq!(help.code, 0, "{help:#?}");
    for word in [
        "put",
        "get",
        "keys",
        "delete",
        "clear",
        "import",
        "export",
        "stats",
        "--backend",
    ] {
        assert!(help.stdout.contains(word), "{word}: {}", help.stdout);
    }
    let sub = output(bare_cmd().args(["get", "--help"]));
    assert_eq!(sub.code, 0, "{sub:#?}");
    assert!(sub.stdout.contains("--fields"), "{}", sub.stdout);
    let version = output(bare_cmd().arg("--version"));
    assert_eq!(version.code, 0, "{version:#?}");
    assert!(
        version.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{version:#?}"
    );
}

#[test]
fn read_only_commands_work_while_a_writer_holds_the_lock() {
    let b = Backend::json();
    ok(b.run(&["put", "full_docs", "before", r#"{"content": "saved"}"#]));

    let storage = Storage::open(&b.config()).unwrap();
    let docs = storage.namespace("full_docs").unwrap();
    docs.upsert(vec![("during".into(), json!({"content": "checkpointed"}))])
        .unwrap();
    docs.index_done_callback().unwrap();

    assert_eq!(
        ok(b.run(&["get", "full_docs", "during"])),
        "{\n  \"content\": \"checkpointed\"\n}\n"
    );
    assert_eq!(ok(b.run(&["keys", "full_docs"])), "before\nduring\n");
    assert!(ok(b.run(&["export", "full_docs"])).contains("checkpointed"));
    assert!(ok(b.run(&["stats", "--json"])).contains("full_docs"));

    for args in [
        &["put", "full_docs", "x", "1"][..],
        &["delete", "full_docs", "before"],
        &["clear", "full_docs"],
    ] {
        fails(b.run(args), &["locked"]);
    }
    let fixture = b.file("in.json");
    std::fs::write(&fixture, FIXTURE).unwrap();
    fails(
        b.run(&[Path::new("import"), Path::new("full_docs"), &fixture]),
        &["locked"],
    );

    // Nothing was changed by the refused commands; once the writer is gone, writes work.
    drop(docs);
    drop(storage);
    ok(b.run(&["put", "full_docs", "after", "1"]));
    assert_eq!(ok(b.run(&["keys", "full_docs"])), "after\nbefore\nduring\n");
}

#[test]
fn redis_password_is_never_printed() {
    let unreachable = |cmd: &mut Command| {
        cmd.env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_CONNECTION_TIMEOUT", "0.5")
            .env("REDIS_POOL_TIMEOUT", "1")
            .env("REDIS_RETRIES", "0");
    };
    let runs: Vec<Box<dyn Fn() -> Command>> = vec![
        // Password in the URL from the environment.
        Box::new(move || {
            let mut c = bare_cmd();
            unreachable(&mut c);
            c.env("REDIS_URL", "redis://:hunter2@127.0.0.1:1");
            c
        }),
        // Password in REDIS_PASSWORD.
        Box::new(move || {
            let mut c = bare_cmd();
            unreachable(&mut c);
            c.env("REDIS_URL", "redis://127.0.0.1:1")
                .env("REDIS_PASSWORD", "hunter2");
            c
        }),
        // Password in the --redis-url option.
        Box::new(move || {
            let mut c = bare_cmd();
            unreachable(&mut c);
            c.args(["--redis-url", "redis://user:hunter2@127.0.0.1:1"]);
            c
        }),
    ];
    for make in &runs {
        for args in [
            &["put", "ns", "a", "1"][..],
            &["get", "ns", "a"],
            &["stats"],
        ] {
            let out = output(make().args(args));
            let msg = fails(out, &[]);
            assert!(!msg.contains("hunter2"), "{msg}");
        }
        // Not in debug logs either.
        let out = output(make().env("RUST_LOG", "trace").args(["get", "ns", "a"]));
        assert_eq!(out.code, 2, "{out:#?}");
        assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    // A URL that does not parse is reported without its password.
    let out = output(
        bare_cmd()
            .env("STORAGE_KV_BACKEND", "redis")
            .env("REDIS_URL", "redis://:hunter2@127.0.0.1:notaport")
            .args(["keys", "ns"]),
    );
    let msg = fails(out, &["REDIS_URL"]);
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[test]
fn closed_stdout_pipe_is_a_clean_exit() {
    let b = Backend::json();
    let mut map = serde_json::Map::new();
    for i in 0..50_000 {
        map.insert(format!("key-{i:06}"), json!(i));
    }
    let file = b.file("many.json");
    std::fs::write(&file, graphrag_kv::backend::json_file::to_python_json(&map)).unwrap();
    ok_import(&b, "many", &file);

    for args in [&["keys", "many"][..], &["export", "many"]] {
        let mut child = b
            .cmd()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
        // The reader is gone (like `| head -1`): the rest of the output hits a closed pipe.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn import_from_stdin() {
    let b = Backend::json();
    let mut child = b
        .cmd()
        .args(["import", "full_docs", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(FIXTURE.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(ok(b.run(&["export", "full_docs"])), FIXTURE);
}

/// A kv_store file holding Python's `NaN`/`Infinity` (written by python3's `json.dump`) is read,
/// with those numbers as null and one warning naming the file, the namespace and the keys, and
/// saying what the next save does.
#[test]
fn python_nan_reads_as_null_with_a_warning() {
    let b = Backend::json();
    std::fs::create_dir_all(b.store_dir()).unwrap();
    let path = b.store_dir().join("kv_store_text_chunks.json");
    let script = r#"
import json, sys
data = {"chunk-1": {"score": float("nan")}, "chunk-2": {"vec": [float("inf"), 2.5]}, "ok": {"n": 1}}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .status()
        .expect("python3 runs");
    assert!(status.success());
    let out = b.run(&["get", "text_chunks", "chunk-2"]);
    assert_eq!(out.code, 0, "{out:#?}");
    let value: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(value, json!({"vec": [null, 2.5]}));
    assert_eq!(out.stderr.lines().count(), 1, "one warning: {out:#?}");
    for needle in [
        "kv_store_text_chunks.json",
        "namespace \"text_chunks\"",
        "\"chunk-1\" (NaN at line 3",
        "\"chunk-2\" (Infinity at line 7",
        "2 NaN/Infinity numbers",
        "the next save of this namespace writes null",
    ] {
        assert!(out.stderr.contains(needle), "{needle:?} in {out:#?}");
    }
    assert!(!out.stderr.contains("\"ok\""), "{out:#?}");
}

// ---------------------------------------------------------------------------------------------
// recompress

/// A chunk of prose long enough to be compressed, different per `i`.
fn chunk_text(i: usize) -> Value {
    let words = [
        "graph",
        "community",
        "report",
        "entity",
        "the",
        "of",
        "chunk",
        "river",
    ];
    let content: Vec<&str> = (0..700)
        .map(|w| words[(w * 7 + i + w / 5) % words.len()])
        .collect();
    json!({"content": content.join(" "), "tokens": 700, "chunk_order_index": i})
}

/// `n` chunks `c-000`.. written through the library with `config` (lz4 by default).
fn seed_chunks(config: &StoreConfig, n: usize) -> Vec<(String, Value)> {
    let items: Vec<(String, Value)> = (0..n)
        .map(|i| (format!("c-{i:03}"), chunk_text(i)))
        .collect();
    let storage = Storage::open(config).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    store.upsert(items.clone()).unwrap();
    items
}

/// The first four bytes of each stored value of `ids`.
fn magics(conn: &mut redis::Connection, prefix: &str, ids: &[&str]) -> Vec<Vec<u8>> {
    ids.iter()
        .map(|id| {
            let v: Vec<u8> = redis::cmd("GET")
                .arg(format!("{prefix}:text_chunks:{id}"))
                .query(conn)
                .unwrap();
            v[..4].to_vec()
        })
        .collect()
}

/// The summary line's counts: rewritten, already current, changed meanwhile, unreadable.
fn summary(stdout: &str) -> (u64, u64, u64, u64) {
    let n = |what: &str| -> u64 {
        let before = stdout.split(what).next().unwrap();
        before
            .rsplit([' ', ','])
            .find(|w| !w.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        n(" rewritten"),
        n(" already current"),
        n(" changed meanwhile"),
        n(" unreadable"),
    )
}

#[test]
fn recompress_rewrites_to_the_configured_codec_keeping_values_and_ttls() {
    let b = Backend::redis();
    let items = seed_chunks(&b.config(), 40);
    let mut conn = b.server().conn();
    let key = |id: &str| format!("{}:text_chunks:{id}", b.prefix);
    // A TTL to keep, a small value that stays plain, and a value another client wrote as
    // spaced JSON (its text must survive byte for byte).
    let _: () = redis::cmd("PEXPIRE")
        .arg(key("c-007"))
        .arg(600_000)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(key("small"))
        .arg(r#"{"a": 1}"#)
        .query(&mut conn)
        .unwrap();
    let spaced = serde_json::to_string_pretty(&chunk_text(99)).unwrap();
    let _: () = redis::cmd("SET")
        .arg(key("python"))
        .arg(&spaced)
        .query(&mut conn)
        .unwrap();
    let ids = ["c-000", "c-007", "c-039"];
    assert!(magics(&mut conn, &b.prefix, &ids)
        .iter()
        .all(|m| m[..] == graphrag_kv::codec::FRAME_MAGIC));

    let out = output(
        b.cmd()
            .env("REDIS_COMPRESSION", "zstd")
            .args(["recompress", "text_chunks"]),
    );
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stdout
            .starts_with("recompress text_chunks to zstd level 1: "),
        "{out:#?}"
    );
    assert_eq!(summary(&out.stdout), (41, 1, 0, 0), "{out:#?}");
    // Progress on stderr (a line per step when stderr is not a terminal).
    assert!(
        out.stderr.contains("recompress text_chunks: 42 ids")
            && out
                .stderr
                .contains("recompress text_chunks: 42/42 ids, done"),
        "{out:#?}"
    );
    assert!(magics(&mut conn, &b.prefix, &ids)
        .iter()
        .all(|m| m[..] == graphrag_kv::codec::ZSTD_FRAME_MAGIC));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key("c-007"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 500_000 && ttl <= 600_000, "TTL kept: {ttl}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key("c-000"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(ttl, -1, "no TTL added");
    // Read back through an lz4-configured store: every value as it was.
    let storage = Storage::open(&b.config()).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    for (id, v) in &items {
        assert_eq!(store.get_by_id(id).unwrap().as_ref(), Some(v), "{id}");
    }
    let small: Vec<u8> = redis::cmd("GET")
        .arg(key("small"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(small, br#"{"a": 1}"#);

    // Again: nothing left to do.
    let out = output(
        b.cmd()
            .env("REDIS_COMPRESSION", "zstd")
            .args(["recompress", "text_chunks"]),
    );
    assert_eq!(summary(&out.stdout), (0, 42, 0, 0), "{out:#?}");

    // Back to plain JSON: the spaced text comes back exactly as it was written.
    let out = output(
        b.cmd()
            .env("REDIS_COMPRESSION", "none")
            .args(["recompress", "text_chunks"]),
    );
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(summary(&out.stdout), (41, 1, 0, 0), "{out:#?}");
    let python: Vec<u8> = redis::cmd("GET")
        .arg(key("python"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(python, spaced.as_bytes());
    assert_eq!(magics(&mut conn, &b.prefix, &["c-000"])[0][0], b'{');
    for (id, v) in &items {
        assert_eq!(store.get_by_id(id).unwrap().as_ref(), Some(v), "{id}");
    }
}

#[test]
fn recompress_leaves_unreadable_values_and_refuses_json() {
    let b = Backend::redis();
    seed_chunks(&b.config(), 3);
    let mut conn = b.server().conn();
    let bad = format!("{}:text_chunks:bad", b.prefix);
    let _: () = redis::cmd("SET")
        .arg(&bad)
        .arg(b"\xFFGK1garbage".as_slice())
        .query(&mut conn)
        .unwrap();
    let out = output(
        b.cmd()
            .env("REDIS_COMPRESSION", "zstd")
            .args(["recompress", "text_chunks"]),
    );
    assert_eq!(out.code, 1, "{out:#?}");
    assert_eq!(summary(&out.stdout), (3, 0, 0, 1), "{out:#?}");
    assert!(out.stderr.contains(&format!("{bad:?}")), "{out:#?}");
    let still: Vec<u8> = redis::cmd("GET").arg(&bad).query(&mut conn).unwrap();
    assert_eq!(still, b"\xFFGK1garbage");

    let j = Backend::json();
    fails(
        j.run(&["recompress", "text_chunks"]),
        &["STORAGE_KV_BACKEND", "redis"],
    );
    let help = ok(output(bare_cmd().arg("--help")));
    assert!(help.contains("recompress"), "{help}");
    fails(
        b.run(&["recompress", "text_chunks", "--batch", "0"]),
        &["--batch"],
    );
    fails(
        output(
            b.cmd()
                .env("REDIS_COMPRESSION", "zstd")
                .env("REDIS_COMPRESSION_LEVEL", "40")
                .args(["recompress", "text_chunks"]),
        ),
        &["REDIS_COMPRESSION_LEVEL", "40", "from 1 to 19"],
    );
}

/// Waits until the server holds `n` clients blocked (a `CLIENT PAUSE WRITE` postpones a
/// client's write command this way).
fn wait_blocked(conn: &mut redis::Connection, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let info: String = redis::cmd("INFO").arg("clients").query(conn).unwrap();
        let blocked: usize = info
            .lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if blocked >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} blocked clients never came: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A write made between recompress's read and its rewrite is kept: the server is paused for
/// writes, another client's SET of `c-005` is queued, recompress reads the old bytes and
/// queues its rewrites behind that SET; on unpause the SET runs first and the rewrite of
/// `c-005` must see the new bytes and leave them.
#[test]
fn recompress_never_overwrites_a_concurrent_write() {
    let b = Backend::redis();
    seed_chunks(&b.config(), 10);
    let mut admin = b.server().conn();
    let key = format!("{}:text_chunks:c-005", b.prefix);
    let newer = graphrag_kv::codec::Codec::new(graphrag_kv::Compression::Lz4, 1024)
        .encode(&json!({"content": "written meanwhile ".repeat(100)}))
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let writer = {
        let (mut conn, key, newer) = (b.server().conn(), key.clone(), newer.clone());
        std::thread::spawn(move || {
            let _: () = redis::cmd("SET")
                .arg(&key)
                .arg(newer)
                .query(&mut conn)
                .unwrap();
        })
    };
    wait_blocked(&mut admin, 1);
    let child = b
        .cmd()
        .env("REDIS_COMPRESSION", "zstd")
        .args(["recompress", "text_chunks"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked(&mut admin, 2);
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .unwrap();
    writer.join().unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary(&stdout), (9, 0, 1, 0), "{stdout}");
    let now: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut admin).unwrap();
    assert_eq!(now, newer, "the concurrent write was overwritten");
    // A second run brings that one to zstd too.
    let out = output(
        b.cmd()
            .env("REDIS_COMPRESSION", "zstd")
            .args(["recompress", "text_chunks"]),
    );
    assert_eq!(summary(&out.stdout), (1, 9, 0, 0), "{out:#?}");
}

/// Ctrl-C stops recompress after the batch in flight, and running it again finishes: the
/// first batch is held at its rewrite by a write pause while the interrupt arrives.
#[test]
fn recompress_interrupted_then_rerun_finishes() {
    let b = Backend::redis();
    let items = seed_chunks(&b.config(), 30);
    let mut admin = b.server().conn();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query(&mut admin)
        .unwrap();
    let mut child = b
        .cmd()
        .env("REDIS_COMPRESSION", "zstd")
        .args(["recompress", "text_chunks", "--batch", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_blocked(&mut admin, 1);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Unpause only once the command says it took the interrupt: the first batch, held at its
    // rewrite, is then the last.
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    for line in stderr_lines.by_ref() {
        let line = line.unwrap();
        stderr.push_str(&line);
        stderr.push('\n');
        if line.contains("interrupted: stopping after the batch in flight") {
            break;
        }
    }
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query(&mut admin)
        .unwrap();
    for line in stderr_lines {
        stderr.push_str(&line.unwrap());
        stderr.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(130), "{stdout} {stderr}");
    let (rewritten, current, changed, unreadable) = summary(&stdout);
    assert_eq!(rewritten, 10, "{stdout}");
    assert_eq!((current, changed, unreadable), (0, 0, 0), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "interrupted after {rewritten} of about 30 ids; run the same command again"
        )),
        "{stderr}"
    );
    let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
    let zstd = magics(&mut admin, &b.prefix, &ids)
        .iter()
        .filter(|m| m[..] == graphrag_kv::codec::ZSTD_FRAME_MAGIC)
        .count() as u64;
    assert_eq!(zstd, rewritten);

    let out = output(b.cmd().env("REDIS_COMPRESSION", "zstd").args([
        "recompress",
        "text_chunks",
        "--batch",
        "10",
    ]));
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(
        summary(&out.stdout),
        (30 - rewritten, rewritten, 0, 0),
        "{out:#?}"
    );
    assert!(magics(&mut admin, &b.prefix, &ids)
        .iter()
        .all(|m| m[..] == graphrag_kv::codec::ZSTD_FRAME_MAGIC));
    let storage = Storage::open(&b.config()).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    for (id, v) in &items {
        assert_eq!(store.get_by_id(id).unwrap().as_ref(), Some(v), "{id}");
    }
}

#[test]
fn recompress_on_a_cluster() {
    let cluster = support::cluster::RedisCluster::start();
    let prefix = support::unique_prefix("rc");
    let config = StoreConfig::builder()
        .backend(graphrag_kv::BackendKind::Redis)
        .redis_url(cluster.url_list())
        .key_prefix(&prefix)
        .build()
        .unwrap();
    let items = seed_chunks(&config, 60);
    let run = || {
        output(
            bare_cmd()
                .env("STORAGE_KV_BACKEND", "redis")
                .env("REDIS_URL", cluster.url_list())
                .env("REDIS_KEY_PREFIX", &prefix)
                .env("REDIS_COMPRESSION", "zstd")
                .env("REDIS_COMPRESSION_LEVEL", "3")
                .args(["recompress", "text_chunks", "--batch", "25"]),
        )
    };
    let out = run();
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(out.stdout.contains("to zstd level 3"), "{out:#?}");
    assert_eq!(summary(&out.stdout), (60, 0, 0, 0), "{out:#?}");
    // Every key, on whichever master holds it, is a zstd frame now.
    let mut masters = std::collections::HashSet::new();
    for (id, _) in &items {
        let key = format!("{prefix}:text_chunks:{id}");
        let port = cluster.master_for_key(key.as_bytes());
        masters.insert(port);
        let v: Vec<u8> = redis::cmd("GET")
            .arg(&key)
            .query(&mut cluster.conn(port))
            .unwrap();
        assert_eq!(v[..4], graphrag_kv::codec::ZSTD_FRAME_MAGIC, "{key}");
    }
    assert!(masters.len() > 1, "the keys spread over several masters");
    let out = run();
    assert_eq!(summary(&out.stdout), (0, 60, 0, 0), "{out:#?}");
    let storage = Storage::open(&config).unwrap();
    let store = storage.namespace("text_chunks").unwrap();
    for (id, v) in &items {
        assert_eq!(store.get_by_id(id).unwrap().as_ref(), Some(v), "{id}");
    }
}
