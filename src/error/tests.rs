//! Unit tests of the error type: classification of server replies, messages.
use super::*;

/// An error as redis-rs builds it from a server's error reply.
fn server_error(reply: &str) -> redis::RedisError {
    let mut parser = redis::Parser::new();
    match parser
        .parse_value(format!("-{reply}\r\n").as_bytes())
        .unwrap()
    {
        redis::Value::ServerError(e) => e.into(),
        other => panic!("not an error reply: {other:?}"),
    }
}

/// A pipeline's error, as redis-rs builds it from its replies.
fn pipeline_error(replies: &[&str]) -> redis::RedisError {
    let mut input = Vec::new();
    for r in replies {
        input.extend_from_slice(format!("{r}\r\n").as_bytes());
    }
    let mut parser = redis::Parser::new();
    let mut reader = &input[..];
    let values: Vec<redis::Value> = (0..replies.len())
        .map(|_| parser.parse_value(&mut reader).unwrap())
        .collect();
    let mut p = redis::pipe();
    for _ in replies {
        p.cmd("SET");
    }
    struct Replies(Option<Vec<redis::Value>>);
    impl redis::ConnectionLike for Replies {
        fn req_packed_command(&mut self, _: &[u8]) -> redis::RedisResult<redis::Value> {
            Ok(redis::Value::Nil)
        }
        fn req_packed_commands(
            &mut self,
            _: &[u8],
            _: usize,
            _: usize,
        ) -> redis::RedisResult<Vec<redis::Value>> {
            Ok(self.0.take().unwrap_or_default())
        }
        fn get_db(&self) -> i64 {
            0
        }
        fn check_connection(&mut self) -> bool {
            true
        }
        fn is_open(&self) -> bool {
            true
        }
    }
    p.query::<Vec<redis::Value>>(&mut Replies(Some(values)))
        .unwrap_err()
}

fn wrapped(source: redis::RedisError) -> Error {
    Error::Redis {
        operation: "upsert",
        namespace: "ns".into(),
        source,
    }
}

#[test]
fn transient_server_states_are_retryable() {
    for reply in [
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk",
        "NOREPLICAS Not enough good replicas to write.",
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "READONLY You can't write against a read only replica.",
    ] {
        let e = wrapped(server_error(reply));
        assert!(e.is_retryable(), "{reply}");
        let e = wrapped(pipeline_error(&["+OK", &format!("-{reply}"), "+OK"]));
        assert!(e.is_retryable(), "in a pipeline: {reply}");
    }
}

#[test]
fn refusals_are_not_retryable() {
    for reply in [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "ERR Protocol error: invalid bulk length",
        "NOPERM this user has no permissions to access one of the keys",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
    ] {
        let e = wrapped(server_error(reply));
        assert!(!e.is_retryable(), "{reply}");
        let e = wrapped(pipeline_error(&["+OK", &format!("-{reply}")]));
        assert!(!e.is_retryable(), "in a pipeline: {reply}");
    }
    // One refusal among transient errors makes the pipeline a refusal.
    let e = wrapped(pipeline_error(&[
        "-MISCONF no disk",
        "-OOM command not allowed",
    ]));
    assert!(!e.is_retryable());
    assert!(e.is_out_of_memory());
    assert!(wrapped(server_error("OOM command not allowed")).is_out_of_memory());
    assert!(!wrapped(server_error("MISCONF no disk")).is_out_of_memory());
}

#[test]
fn writes_refused_names_the_first_ids_and_the_count() {
    let e = Error::WritesRefused {
        namespace: "docs".into(),
        count: 9,
        ids: vec!["a".into(), "b".into()],
        source: Box::new(wrapped(server_error("OOM command not allowed"))),
    };
    let text = e.to_string();
    assert!(
        text.contains("\"a\", \"b\", ... (9 in all)") && text.contains("OOM"),
        "{text}"
    );
    assert!(!e.is_retryable());
}

#[test]
fn connect_failures_are_classified_by_type() {
    let io = |kind, text: &str| redis::RedisError::from(std::io::Error::new(kind, text));
    let tls = redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
    ));
    let auth = redis::RedisError::from((
        redis::ErrorKind::AuthenticationFailed,
        "Password authentication failed",
    ));
    for (e, want) in [
        (
            io(std::io::ErrorKind::ConnectionRefused, "refused"),
            ConnectFailure::Refused,
        ),
        (
            io(std::io::ErrorKind::TimedOut, "slow"),
            ConnectFailure::Timeout,
        ),
        (
            io(std::io::ErrorKind::ConnectionReset, "reset"),
            ConnectFailure::Unreachable,
        ),
        (tls, ConnectFailure::Tls),
        (auth, ConnectFailure::Authentication),
    ] {
        assert_eq!(ConnectFailure::of(&e), want, "{e}");
        let err = Error::Connect {
            server: "redis://h:1".into(),
            cause: want,
            source: e,
        };
        assert_eq!(err.is_connection(), want.may_heal(), "{err}");
        assert_eq!(err.is_retryable(), want.may_heal(), "{err}");
        assert_eq!(err.is_timeout(), want == ConnectFailure::Timeout, "{err}");
    }
}
