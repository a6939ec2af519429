//! How a command reaches the server: pooled connections, the one retry level (see
//! [`crate::retry`]), batches, every master, SCAN.

use super::*;

impl RedisShared {
    /// Runs `f` on a pooled connection (single server, or a cluster connection that routes
    /// single-key commands itself), retrying connection errors (and timeouts when allowed) with
    /// exponential backoff and jitter. Only idempotent commands go through here.
    pub(crate) fn with_conn<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut dyn ConnectionLike) -> RedisResult<T>,
    ) -> Result<T> {
        self.retrying(operation, namespace, || match &self.conns {
            Conns::Single(p) => {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = f(&mut *c);
                if out.is_ok() {
                    pool::touch(&mut c);
                } else if out.as_ref().err().is_some_and(must_discard) || !c.is_open() {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }
            Conns::Cluster(p) => {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = f(&mut *c);
                if out.as_ref().err().is_some_and(must_discard) || !c.is_open() {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }
        })
    }

    /// `with_conn` for a single server, handing `f` the pooled connection itself, for exchanges
    /// that keep several replies in flight (`send_packed_command` / `recv_response`). Any
    /// failure discards the connection: replies of the exchange may still be on its socket.
    pub(super) fn with_single<T>(
        &self,
        pool: &RedisPool,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut PooledConn) -> RedisResult<T>,
    ) -> Result<T> {
        self.retrying(operation, namespace, || {
            let mut c = pool
                .get()
                .map_err(|m| pool_error(operation, namespace, m))?;
            let out = f(&mut c);
            match out {
                Ok(_) => pool::touch(&mut c),
                Err(_) => c.mark_broken(),
            }
            out.map_err(|e| redis_error(operation, namespace, e))
        })
    }

    /// Runs `cmds` as one batch: a pipeline on a single server, per-node pipelines with
    /// redirect handling on a cluster. Returns one result per command; per-command server
    /// errors (e.g. WRONGTYPE) are left for the caller to name the key.
    pub(super) fn batch(
        &self,
        operation: &'static str,
        namespace: &str,
        cmds: Vec<Cmd>,
    ) -> Result<Vec<RedisResult<Value>>> {
        match &self.conns {
            Conns::Single(_) => {
                // Built once: a retry re-sends the same packed pipeline.
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.ignore_errors();
                let values: Vec<Value> = self.with_conn(operation, namespace, |c| p.query(c))?;
                Ok(values.into_iter().map(value_result).collect())
            }
            Conns::Cluster(p) => self.retrying(operation, namespace, || {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = cluster::pipeline(&mut c.conn, &cmds);
                if out.as_ref().err().is_some_and(must_discard) {
                    c.mark_broken();
                }
                out.map_err(|e| redis_error(operation, namespace, e))
            }),
        }
    }

    /// Runs `f` once per master with a connection and the master's address (`None` on a
    /// single server, where the connection is the server's). Every operation that must see
    /// all the data (`stats`, `list_namespaces`, the checkpoint; `all_keys`, `clear` and the key
    /// stream go through `scan_all` / `scan_pages`, under the same checks) goes through here:
    /// on a cluster, [`cluster::on_every_master`] returns only results gathered
    /// under one stable slot map covering all slots, or [`Error::ClusterUnstable`].
    pub(super) fn each_master<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        mut f: impl FnMut(&mut dyn PersistOps, Option<(&str, u16)>) -> RedisResult<T>,
    ) -> Result<Vec<T>> {
        match &self.conns {
            Conns::Single(_) => self
                .with_conn(operation, namespace, |c| f(&mut ConnOps(c), None))
                .map(|v| vec![v]),
            Conns::Cluster(p) => self.retrying(operation, namespace, || {
                let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
                let out = cluster::on_every_master(&mut c.conn, |conn, host, port| {
                    f(&mut NodeOps { conn, host, port }, Some((host, port)))
                });
                out.map_err(|e| every_master_error(&mut c, operation, namespace, e))
            }),
        }
    }

    /// Runs `attempt` under the retry policy: again on retryable failures (see
    /// [`RedisShared::should_retry`]), with exponential backoff and jitter, at most
    /// `REDIS_RETRIES + 1` times in all. This is the one level that retries a command
    /// (see [`crate::retry`]).
    pub(super) fn retrying<T>(
        &self,
        operation: &'static str,
        namespace: &str,
        attempt: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        self.policy.run(
            attempt,
            |err| self.should_retry(err),
            |err, retry, pause| {
                self.retries.fetch_add(1, Ordering::Relaxed);
                *self
                    .retries_by
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((namespace.to_string(), operation))
                    .or_default() += 1;
                log::debug!(
                    "redis {operation} on {namespace:?} failed ({err}); retry {} in {pause:?}",
                    retry + 1
                );
            },
        )
    }

    /// Commands retried so far on these connections, by the backend's retry policy (all
    /// namespaces and operations together). Metrics read it at scrape time.
    pub fn retries_total(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// [`RedisShared::retries_total`] per namespace and operation (`namespace` is empty for
    /// work outside the namespaces: connecting, server figures), for those that retried at
    /// least once. Metrics read it at scrape time (`redis_retries_total{namespace,operation}`).
    pub fn retries_by_operation(&self) -> Vec<OperationRetries> {
        let by = self.retries_by.lock().unwrap_or_else(|p| p.into_inner());
        by.iter()
            .map(|((namespace, operation), count)| OperationRetries {
                namespace: namespace.clone(),
                operation,
                count: *count,
            })
            .collect()
    }

    /// The retry policy of these connections (built from `REDIS_RETRIES`).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.policy
    }

    pub(super) fn should_retry(&self, err: &Error) -> bool {
        match err {
            // The cluster client has already retried these itself, within the same operation
            // (its budget also follows redirects, so it cannot be turned off): retrying them
            // again here would multiply the sends (see `crate::retry`).
            Error::Redis { source, .. }
                if matches!(self.conns, Conns::Cluster(_))
                    && crate::error::is_retried_by_cluster_client(source) =>
            {
                false
            }
            Error::Redis { source, .. } if source.is_timeout() => self.config.retry_on_timeout,
            Error::Redis { source, .. } => is_retryable_redis(source),
            Error::Pool { .. } => self.config.retry_on_timeout,
            // A refused connect costs nothing to repeat (a restarting server comes back within
            // the backoff); one that waited out REDIS_CONNECTION_TIMEOUT is not repeated, or
            // an outage would take (retries + 1) timeouts to be reported; a refused password
            // or certificate never heals.
            Error::Connect { cause, .. } => {
                matches!(cause, ConnectFailure::Refused | ConnectFailure::Unreachable)
            }
            _ => false,
        }
    }

    /// SCANs `pattern` on every master, handing each page of keys to `page`. A key may be
    /// handed over more than once (SCAN's guarantee); callers deduplicate.
    pub(super) fn scan(
        &self,
        operation: &'static str,
        namespace: &str,
        pattern: &str,
        page: &mut dyn FnMut(Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        // Pages are collected per master before being handed over, so a retried attempt
        // (after a failover) never hands a partial page sequence twice to a non-idempotent
        // consumer; consumers still deduplicate.
        let pages = self.each_master(operation, namespace, |ops, _| {
            let mut pages = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(
                    ops.run(
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(SCAN_COUNT),
                    )?,
                )?;
                if !keys.is_empty() {
                    pages.push(keys);
                }
                if next == 0 {
                    return Ok(pages);
                }
                cursor = next;
            }
        })?;
        for keys in pages.into_iter().flatten() {
            page(keys)?;
        }
        Ok(())
    }
}

impl RedisShared {
    /// SCANs `pattern` on every master, handing each page of keys to `page` as it arrives:
    /// memory is bounded by a page, not by the keyspace. A key may be handed over more than
    /// once (SCAN's guarantee, and on a cluster a pass repeated because the slot map moved);
    /// an error of `page` stops the scan and is returned as it is.
    ///
    /// On a single server each page is fetched on its own checkout (a failed SCAN is retried
    /// from the same cursor), so no connection is held while `page` runs and `page` may use
    /// the store. On a cluster the pass runs under [`RedisShared::each_master`]'s stable slot
    /// map, holding one pooled connection while `page` runs.
    pub(super) fn scan_pages(
        &self,
        operation: &'static str,
        namespace: &str,
        pattern: &str,
        page: &mut dyn FnMut(Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        let scan = |ops: &mut dyn PersistOps, cursor: u64| -> RedisResult<(u64, Vec<Vec<u8>>)> {
            redis::from_redis_value(
                ops.run(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT),
                )?,
            )
            .map_err(RedisError::from)
        };
        if let Conns::Single(_) = &self.conns {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) =
                    self.with_conn(operation, namespace, |c| scan(&mut ConnOps(c), cursor))?;
                if !keys.is_empty() {
                    page(keys)?;
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        }
        // The consumer's error, carried out of the cluster pass (which only knows Redis
        // errors) by a client-side error that is neither retried nor a reason to drop the
        // connection.
        let mut stopped: Option<Error> = None;
        let out = self.each_master(operation, namespace, |ops, _| {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = scan(ops, cursor)?;
                if !keys.is_empty() {
                    if let Err(e) = page(keys) {
                        stopped = Some(e);
                        return Err(RedisError::from((
                            redis::ErrorKind::Client,
                            "key listing stopped by its consumer",
                        )));
                    }
                }
                if next == 0 {
                    return Ok(());
                }
                cursor = next;
            }
        });
        match stopped {
            Some(e) => Err(e),
            None => out.map(|_| ()),
        }
    }
}

impl RedisShared {
    /// Every key matching `pattern`, as pages, for `all_keys` (which keeps them all anyway). On
    /// a cluster the masters are scanned at the same time, each on a pooled connection of its
    /// own (the first on the pass's connection), under the same stable-slot-map checks as
    /// [`RedisShared::each_master`]; when the pool is smaller than the masters plus one they
    /// are scanned one after the other. On a single server, [`RedisShared::scan_pages`].
    pub(super) fn scan_all(
        &self,
        operation: &'static str,
        namespace: &str,
        pattern: &str,
    ) -> Result<Vec<Vec<Vec<u8>>>> {
        let p = match &self.conns {
            Conns::Cluster(p) if self.config.max_connections > 1 => p,
            _ => {
                let mut pages = Vec::new();
                self.scan_pages(operation, namespace, pattern, &mut |page| {
                    pages.push(page);
                    Ok(())
                })?;
                return Ok(pages);
            }
        };
        self.retrying(operation, namespace, || {
            let mut c = p.get().map_err(|m| pool_error(operation, namespace, m))?;
            // A checkout that failed inside the pass, carried out of it (the pass only knows
            // Redis errors) as it is, so that its retry decision is the pool's.
            let mut no_conn: Option<Error> = None;
            let out = cluster::on_all_masters(&mut c.conn, |conn, masters| {
                let Some((first_host, first_port)) = masters.first() else {
                    return Ok(Vec::new());
                };
                let room = (self.config.max_connections as usize).saturating_sub(1);
                let mut own = Vec::new();
                for _ in 1..masters.len().min(room + 1) {
                    match p.get() {
                        Ok(c) => own.push(c),
                        Err(m) => {
                            no_conn = Some(pool_error(operation, namespace, m));
                            return Err(RedisError::from((
                                redis::ErrorKind::Client,
                                "no pooled connection for a parallel SCAN",
                            )));
                        }
                    }
                }
                std::thread::scope(|scope| {
                    // Masters 1.. on their own connections, in threads; the rest (master 0,
                    // and any beyond the pool's room) on the pass's connection meanwhile.
                    let threads: Vec<_> = masters[1..]
                        .iter()
                        .zip(own.iter_mut())
                        .map(|((host, port), c)| {
                            scope.spawn(move || {
                                let out = scan_node(&mut c.conn, host, *port, pattern);
                                if out.as_ref().err().is_some_and(must_discard) {
                                    c.mark_broken();
                                }
                                out
                            })
                        })
                        .collect();
                    let threaded = threads.len();
                    let mut out = vec![scan_node(conn, first_host, *first_port, pattern)];
                    for (host, port) in &masters[1 + threaded..] {
                        out.push(scan_node(conn, host, *port, pattern));
                    }
                    for t in threads {
                        out.push(t.join().unwrap_or_else(|_| {
                            Err(RedisError::from((
                                redis::ErrorKind::Client,
                                "a SCAN thread panicked",
                            )))
                        }));
                    }
                    out.into_iter().collect::<RedisResult<Vec<_>>>()
                })
            });
            if let Some(e) = no_conn.take() {
                return Err(e);
            }
            out.map(|per_master| per_master.into_iter().flatten().collect())
                .map_err(|e| every_master_error(&mut c, operation, namespace, e))
        })
    }
}

/// Every page of a SCAN of `pattern` on the master at `host:port`.
fn scan_node(
    conn: &mut redis::cluster::ClusterConnection,
    host: &str,
    port: u16,
    pattern: &str,
) -> RedisResult<Vec<Vec<Vec<u8>>>> {
    let mut pages = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(cluster::on_node(
            conn,
            host,
            port,
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT),
        )?)?;
        if !keys.is_empty() {
            pages.push(keys);
        }
        if next == 0 {
            return Ok(pages);
        }
        cursor = next;
    }
}

/// The error of a pass over every master: a Redis error discards the connection when it must
/// (as [`must_discard`] says); a slot map that never held still is [`Error::ClusterUnstable`].
fn every_master_error(
    c: &mut cluster::ClusterConn,
    operation: &'static str,
    namespace: &str,
    e: cluster::EveryMasterError,
) -> Error {
    match e {
        cluster::EveryMasterError::Redis(e) => {
            if must_discard(&e) {
                c.mark_broken();
            }
            redis_error(operation, namespace, e)
        }
        cluster::EveryMasterError::Unstable { attempts, reason } => Error::ClusterUnstable {
            operation,
            namespace: namespace.to_string(),
            attempts,
            reason,
        },
    }
}

/// True when the connection cannot be reused: a reply may still be in flight, or it points at
/// a server that is no longer the master.
pub(super) fn must_discard(e: &RedisError) -> bool {
    crate::error::is_connection_error(e) || e.code() == Some("READONLY")
}

pub(super) fn pool_error(operation: &'static str, namespace: &str, e: pool::NoConnection) -> Error {
    e.into_error(operation, namespace)
}

pub(super) fn redis_error(operation: &'static str, namespace: &str, source: RedisError) -> Error {
    Error::Redis {
        operation,
        namespace: namespace.to_string(),
        source,
    }
}

/// A pipeline reply item as a result: server errors become `Err`.
pub(super) fn value_result(v: Value) -> RedisResult<Value> {
    match v {
        Value::ServerError(e) => Err(e.into()),
        v => Ok(v),
    }
}

/// Persistence commands over a single-server connection.
pub(super) struct ConnOps<'a>(&'a mut dyn ConnectionLike);

/// Persistence commands routed to one cluster node by address.
pub(super) struct NodeOps<'a> {
    conn: &'a mut redis::cluster::ClusterConnection,
    host: &'a str,
    port: u16,
}

impl PersistOps for ConnOps<'_> {
    fn run(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        self.0.req_command(cmd)
    }
}

impl PersistOps for NodeOps<'_> {
    fn run(&mut self, cmd: &Cmd) -> RedisResult<Value> {
        cluster::on_node(self.conn, self.host, self.port, cmd)
    }
}

/// Escapes Redis glob characters so the string matches only itself in SCAN MATCH.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Retries of one namespace and operation, from [`RedisShared::retries_by_operation`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OperationRetries {
    /// The namespace; empty for work outside the namespaces (connecting, server figures).
    pub namespace: String,
    /// The operation, as errors and `redis_operations_total` name it (`get_by_ids`, `upsert`).
    pub operation: &'static str,
    /// Commands retried so far.
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escaping() {
        assert_eq!(glob_escape("a*b?[c]\\d"), "a\\*b\\?\\[c\\]\\\\d");
        assert_eq!(glob_escape("nano_graphrag:docs:"), "nano_graphrag:docs:");
    }
}
