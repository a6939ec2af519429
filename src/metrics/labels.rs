//! What the per-call series are labelled with: the `operation` names, the `kind` of an error,
//! and the duration histogram's buckets.

use crate::error::Error;

/// Upper bounds of `redis_operation_duration_seconds`, from 50 µs (a pipelined GET on a local
/// server) to 1 s (a SCAN of a large namespace, or a retry after a failover). Slower calls land
/// in `+Inf`.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// The store operations, as the `operation` label spells them (nano-graphrag's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    AllKeys,
    GetById,
    GetByIds,
    FilterKeys,
    Upsert,
    DeleteByIds,
    Clear,
    IndexStartCallback,
    IndexDoneCallback,
    Stats,
}

impl Op {
    pub(super) const ALL: [Op; 10] = [
        Op::AllKeys,
        Op::GetById,
        Op::GetByIds,
        Op::FilterKeys,
        Op::Upsert,
        Op::DeleteByIds,
        Op::Clear,
        Op::IndexStartCallback,
        Op::IndexDoneCallback,
        Op::Stats,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Op::AllKeys => "all_keys",
            Op::GetById => "get_by_id",
            Op::GetByIds => "get_by_ids",
            Op::FilterKeys => "filter_keys",
            Op::Upsert => "upsert",
            Op::DeleteByIds => "delete_by_ids",
            Op::Clear => "clear",
            Op::IndexStartCallback => "index_start_callback",
            Op::IndexDoneCallback => "index_done_callback",
            Op::Stats => "stats",
        }
    }
}

/// The `kind` label of `redis_errors_total` for an error: `timeout`, `connection`, `decode` or
/// `other`.
///
/// Decided by [`Error::is_timeout`], [`Error::is_connection`] and the variant, never by message
/// text. A pool timeout counts as `timeout` (it is both; the timeout is what an operator tunes).
pub(crate) fn error_kind(e: &Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connection() {
        "connection"
    } else if matches!(
        e,
        Error::Decode { .. } | Error::WrongType { .. } | Error::CorruptFile { .. }
    ) {
        "decode"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::error_kind;
    use crate::error::Error;

    #[test]
    fn error_kinds() {
        let decode = Error::Decode {
            namespace: "n".into(),
            key: "k".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&decode), "decode");
        let pool = Error::Pool {
            operation: "get_by_id",
            namespace: "n".into(),
            message: "m".into(),
        };
        assert_eq!(error_kind(&pool), "timeout");
        let down = Error::Unavailable {
            namespace: "n".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&down), "connection");
        let refused = Error::Redis {
            operation: "get_by_id",
            namespace: "n".into(),
            source: redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )),
        };
        assert_eq!(error_kind(&refused), "connection");
        let bad = Error::InvalidId {
            namespace: "n".into(),
            id: "".into(),
            reason: "r".into(),
        };
        assert_eq!(error_kind(&bad), "other");
    }
}
