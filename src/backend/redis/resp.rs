//! Hand-packed RESP for the single-server windows (`send_packed_command` / `recv_response`).

use super::*;

/// Appends a RESP array header, `*n\r\n`.
///
/// The batch paths of a single server pack their commands by hand into one buffer: building a
/// `redis::Cmd` per item allocates for the command and every argument and copies each value
/// twice more (into the command, then into the packed pipeline).
pub(super) fn resp_array(buf: &mut Vec<u8>, n: usize) {
    buf.push(b'*');
    push_decimal(buf, n as u64);
    buf.extend_from_slice(b"\r\n");
}

/// Appends one bulk string made of `parts` concatenated (a key is written as prefix and id,
/// without building it first).
pub(super) fn resp_bulk(buf: &mut Vec<u8>, parts: &[&[u8]]) {
    buf.push(b'$');
    push_decimal(buf, parts.iter().map(|p| p.len() as u64).sum());
    buf.extend_from_slice(b"\r\n");
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"\r\n");
}

pub(super) fn push_decimal(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// The replies of a hand-packed pipeline, or the error redis-rs's `Pipeline::query` gives for
/// them when some are server errors (the same error value as before the commands were packed
/// by hand: redis-rs builds it internally, so the replies are handed to a real pipeline).
pub(super) fn pipeline_replies(replies: Vec<Value>) -> RedisResult<Vec<Value>> {
    if !replies.iter().any(|v| matches!(v, Value::ServerError(_))) {
        return Ok(replies);
    }
    /// A "connection" that answers with replies already received.
    struct Received(Option<Vec<Value>>);
    impl ConnectionLike for Received {
        fn req_packed_command(&mut self, _: &[u8]) -> RedisResult<Value> {
            Ok(Value::Nil)
        }
        fn req_packed_commands(&mut self, _: &[u8], _: usize, _: usize) -> RedisResult<Vec<Value>> {
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
    let mut p = redis::pipe();
    for _ in 0..replies.len() {
        p.cmd("PING");
    }
    p.query(&mut Received(Some(replies)))
}
