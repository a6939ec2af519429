//! Untrusted stored data: a value another program wrote is only ever parsed, never run.

use graphrag_kv::{Error, Storage, StoreConfig};
use serde_json::json;

use crate::support::RedisServer;

/// The reference design unpickled whatever it found in Redis; here a stored value is only ever
/// parsed as JSON (or an lz4 frame holding JSON), so a pickle is a decode error naming the key.
#[test]
fn stored_pickles_are_refused_never_run() {
    let server = RedisServer::start();
    let storage = Storage::open(
        &StoreConfig::builder()
            .backend(graphrag_kv::BackendKind::Redis)
            .redis_url(server.url())
            .key_prefix("pk")
            .build()
            .unwrap(),
    )
    .unwrap();
    let s = storage.namespace("llm_response_cache").unwrap();
    s.upsert(vec![("good".into(), json!({"return": "ok"}))])
        .unwrap();
    let marker = tempfile::tempdir().unwrap();
    let target = marker.path().join("pwned");
    let command = format!("touch {}", target.display());
    // Protocol 0 (text) and protocol 4 (binary) pickles of os.system(command).
    let text_pickle = format!("cos\nsystem\n(V{command}\ntR.").into_bytes();
    let mut binary_pickle = vec![0x80, 0x04, 0x95, 0, 0, 0, 0, 0, 0, 0, 0];
    binary_pickle.extend_from_slice(b"\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c");
    binary_pickle.push(command.len() as u8);
    binary_pickle.extend_from_slice(command.as_bytes());
    binary_pickle.extend_from_slice(b"\x94\x85\x94R\x94.");
    let mut admin = server.conn();
    for (id, bytes) in [("text", &text_pickle), ("binary", &binary_pickle)] {
        redis::cmd("SET")
            .arg(format!("pk:llm_response_cache:{id}"))
            .arg(bytes.as_slice())
            .query::<()>(&mut admin)
            .unwrap();
        let e = s.get_by_id(id).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pk:llm_response_cache:{id}")),
            "{e}"
        );
    }
    assert!(!target.exists());
    assert_eq!(s.get_by_id("good").unwrap(), Some(json!({"return": "ok"})));
    // Reading never rewrote or removed the hostile values.
    let raw: Vec<u8> = redis::cmd("GET")
        .arg("pk:llm_response_cache:binary")
        .query(&mut admin)
        .unwrap();
    assert_eq!(raw, binary_pickle);
}
