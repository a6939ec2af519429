//! Batches on a cluster: pipelines of single-key commands that survive slot moves.

use redis::cluster::{cluster_pipe, ClusterConnection};
use redis::{Cmd, ConnectionLike, RedisError, RedisResult, Value};

/// Pipelines re-sent after redirects before giving up (each round resolves the redirected
/// commands one by one, so more rounds mean the topology changed again meanwhile).
const MAX_REDIRECT_ROUNDS: usize = 8;

/// True for server errors that a re-send through the single-command path resolves.
fn is_redirect_or_transient(code: &str) -> bool {
    matches!(
        code,
        "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN" | "READONLY"
    )
}

/// Runs `cmds` as cluster pipelines, re-sending only the commands that came back redirected.
///
/// Returns one result per command, in order: a command that fails for another reason (e.g.
/// WRONGTYPE) is an `Err` at its index, for the caller to name the key. The outer `Err` is for
/// failures of the whole batch (a node unreachable), which the caller retries.
pub(crate) fn pipeline(
    conn: &mut ClusterConnection,
    cmds: &[Cmd],
) -> RedisResult<Vec<RedisResult<Value>>> {
    let mut results: Vec<Option<RedisResult<Value>>> = (0..cmds.len()).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..cmds.len()).collect();
    for _round in 0..MAX_REDIRECT_ROUNDS {
        if pending.is_empty() {
            break;
        }
        let mut pipe = cluster_pipe();
        for &i in &pending {
            pipe.add_command(cmds[i].clone());
        }
        let e = match pipe.query::<Vec<Value>>(conn) {
            Ok(values) => {
                for (&i, v) in pending.iter().zip(values) {
                    results[i] = Some(Ok(v));
                }
                pending.clear();
                break;
            }
            Err(e) => e,
        };
        let failures = match e.clone().into_server_errors() {
            Some(f) => f,
            None => return Err(e),
        };
        // The pipeline's successful values are not returned with its failures: settle the
        // failed commands one by one, then send the others again as a pipeline.
        let mut settled = Vec::with_capacity(failures.len());
        for (pos, err) in failures.iter() {
            let Some(&i) = pending.get(*pos) else {
                continue;
            };
            if is_redirect_or_transient(err.code()) {
                // The single-command path follows MOVED/ASK and refreshes the slot map.
                match conn.req_command(&cmds[i]) {
                    Ok(v) => results[i] = Some(Ok(v)),
                    Err(e)
                        if e.code().is_some()
                            && !is_redirect_or_transient(e.code().unwrap_or("")) =>
                    {
                        results[i] = Some(Err(e))
                    }
                    Err(e) => return Err(e),
                }
            } else {
                results[i] = Some(Err(RedisError::from(err.clone())));
            }
            settled.push(i);
        }
        pending.retain(|i| !settled.contains(i));
    }
    if !pending.is_empty() {
        return Err(RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain),
            "cluster topology kept changing: batch still redirected after several rounds",
        )));
    }
    Ok(results
        .into_iter()
        .map(|v| v.unwrap_or(Ok(Value::Nil)))
        .collect())
}
