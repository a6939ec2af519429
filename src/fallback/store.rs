//! [`FallbackStore`]: one namespace behind a [`Fallback`], the `KvStore` calls routed to Redis
//! or to the journal by the fallback's mode.

use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use super::journal::Entry;
use super::{Fallback, FallbackGuard};
use crate::error::{Error, Result};
use crate::store::{
    missing_in_order, parse_items, project, validate_id, validate_ids, Item, KvStore,
    NamespaceStats, Stored, UnsentWrite,
};

/// One namespace behind a [`Fallback`].
#[derive(Debug)]
pub struct FallbackStore<S> {
    pub(super) inner: S,
    pub(super) fallback: Arc<Fallback>,
    /// Keeps the prober thread alive as long as any store needs it.
    pub(super) _guard: Option<Arc<FallbackGuard>>,
}

impl<S: KvStore> FallbackStore<S> {
    /// The wrapped store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The shared fallback state (mode, pending writes).
    pub fn fallback(&self) -> &Arc<Fallback> {
        &self.fallback
    }
}

#[deny(clippy::missing_trait_methods)]
impl<S: KvStore> KvStore for FallbackStore<S> {
    fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    fn all_keys(&self) -> Result<Vec<String>> {
        self.fallback.read(
            self.namespace(),
            || self.inner.all_keys(),
            |o| {
                let o = o?;
                o.cleared.then(|| {
                    o.ids
                        .iter()
                        .filter(|(_, v)| v.is_some())
                        .map(|(k, _)| k.clone())
                        .collect()
                })
            },
        )
    }

    fn get_by_id(&self, id: &str) -> Result<Option<Value>> {
        // Offline the journal answers, and it has no rule for ids: check them here as every
        // backend does, so an invalid id is refused whether Redis is up or not.
        validate_id(self.namespace(), id)?;
        self.fallback.read(
            self.namespace(),
            || self.inner.get_by_id(id),
            |o| {
                let o = o?;
                match o.ids.get(id) {
                    Some(v) => Some(v.clone()),
                    None if o.cleared => Some(None),
                    None => None,
                }
            },
        )
    }

    fn get_by_ids(&self, ids: &[String], fields: Option<&[String]>) -> Result<Vec<Option<Value>>> {
        validate_ids(self.namespace(), ids)?;
        self.fallback.read(
            self.namespace(),
            || self.inner.get_by_ids(ids, fields),
            |o| {
                let o = o?;
                ids.iter()
                    .map(|id| match o.ids.get(id) {
                        Some(v) => Some(v.clone().map(|v| project(v, fields))),
                        None if o.cleared => Some(None),
                        None => None,
                    })
                    .collect()
            },
        )
    }

    fn filter_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        validate_ids(self.namespace(), ids)?;
        self.fallback.read(
            self.namespace(),
            || self.inner.filter_keys(ids),
            |o| {
                let o = o?;
                let known: Option<Vec<bool>> = ids
                    .iter()
                    .map(|id| match o.ids.get(id) {
                        Some(v) => Some(v.is_some()),
                        None if o.cleared => Some(false),
                        None => None,
                    })
                    .collect();
                known.map(|present| missing_in_order(ids, |i| present[i]))
            },
        )
    }

    fn upsert(&self, items: Vec<Item>) -> Result<()> {
        validate_ids(self.namespace(), items.iter().map(|(id, _)| id))?;
        if items.is_empty() {
            return Ok(());
        }
        // The inner store consumes its batch; the copy is what the journal keeps if Redis
        // turns out to be unreachable.
        let journaled = Entry::Upsert {
            ns: self.namespace().to_string(),
            items: items.clone(),
        };
        self.fallback
            .write(|| Ok(journaled), || self.inner.upsert(items))
    }

    fn upsert_refs(&self, items: &[(&str, &Value)]) -> Result<()> {
        for (id, _) in items {
            validate_id(self.namespace(), id)?;
        }
        if items.is_empty() {
            return Ok(());
        }
        // Borrowed items can be copied for the journal only when Redis is found unreachable,
        // so the usual path costs no copy.
        let journaled = || {
            Ok(Entry::Upsert {
                ns: self.namespace().to_string(),
                items: items
                    .iter()
                    .map(|(id, v)| ((*id).to_string(), (*v).clone()))
                    .collect(),
            })
        };
        self.fallback
            .write(journaled, || self.inner.upsert_refs(items))
    }

    fn delete_by_ids(&self, ids: &[String]) -> Result<()> {
        validate_ids(self.namespace(), ids)?;
        if ids.is_empty() {
            return Ok(());
        }
        let entry = Entry::Delete {
            ns: self.namespace().to_string(),
            ids: ids.to_vec(),
        };
        self.fallback
            .write(|| Ok(entry), || self.inner.delete_by_ids(ids))
    }

    fn clear(&self) -> Result<()> {
        let entry = Entry::Clear {
            ns: self.namespace().to_string(),
        };
        self.fallback.write(|| Ok(entry), || self.inner.clear())
    }

    fn index_start_callback(&self) -> Result<()> {
        if !self.fallback.is_online() {
            // The journal takes writes; the indexer may start.
            return Ok(());
        }
        self.inner.index_start_callback()
    }

    fn index_done_callback(&self) -> Result<()> {
        // Offline, the journal holds the writes since the outage (fsynced when accepted), but
        // writes Redis acknowledged before it may be lost with the server's unsynced tail:
        // that is not something the journal can fix, so a checkpoint cannot succeed.
        if !self.fallback.is_online() {
            return Err(self.fallback.not_durable(self.namespace(), None));
        }
        match self.inner.index_done_callback() {
            Ok(()) => Ok(()),
            // A checkpoint error does not say whether the server went away (a broken
            // connection is reported as a failed checkpoint): a PING tells.
            Err(e) if e.is_connection() || e.is_timeout() || !self.fallback.redis_answers() => {
                let mut st = self
                    .fallback
                    .state
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                self.fallback.go_offline(&mut st, &e);
                drop(st);
                Err(self.fallback.not_durable(self.namespace(), Some(&e)))
            }
            Err(e) => Err(e),
        }
    }

    fn stats(&self) -> Result<NamespaceStats> {
        self.fallback
            .read(self.namespace(), || self.inner.stats(), |_| None)
    }

    /// Offline, there is nothing to wait for: the journal was fsynced when it took each write,
    /// and the writes reach Redis at the replay.
    fn flush(&self) -> Result<()> {
        if !self.fallback.is_online() {
            return Ok(());
        }
        self.inner.flush()
    }

    /// Journals the writes (fsynced) and goes offline, whether Redis answered lately or not:
    /// the layer above has been failing to send them until its deadline. They are replayed
    /// when Redis answers, by this process or the next one to open the journal directory.
    ///
    /// # Errors
    /// [`crate::Error::Io`] when the journal cannot be written (the writes are then lost, and
    /// the caller says so).
    fn park(&self, writes: Vec<UnsentWrite>) -> Result<()> {
        validate_ids(self.namespace(), writes.iter().map(unsent_id))?;
        self.fallback.park(self.namespace(), writes)
    }

    /// Online, Redis's pages as they come. Offline, as `all_keys`: the journal's ids when it
    /// cleared the namespace (then it knows them all), else unavailable.
    fn scan_keys(&self, page: &mut dyn FnMut(Vec<String>) -> Result<()>) -> Result<()> {
        let mut stopped = None;
        let from_journal = self.fallback.read(
            self.namespace(),
            || {
                self.inner
                    .scan_keys(&mut |ids| consumer(&mut stopped, page(ids)))
                    .map(|()| None)
            },
            |o| {
                let o = o?;
                o.cleared.then(|| {
                    Some(
                        o.ids
                            .iter()
                            .filter(|(_, v)| v.is_some())
                            .map(|(k, _)| k.clone())
                            .collect::<Vec<_>>(),
                    )
                })
            },
        );
        let from_journal = match stopped {
            Some(e) => return Err(e),
            None => from_journal?,
        };
        if let Some(mut ids) = from_journal {
            while !ids.is_empty() {
                let rest = ids.split_off(ids.len().saturating_sub(crate::store::KEY_PAGE));
                page(rest)?;
            }
        }
        Ok(())
    }

    /// Online, what Redis read. Offline, as `get_by_ids`: the journal's values when it
    /// knows every id asked, else unavailable.
    fn get_json_by_ids(
        &self,
        ids: &[String],
        visit: &mut dyn FnMut(usize, Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        validate_ids(self.namespace(), ids)?;
        let mut stopped = None;
        let from_journal: Result<Option<Vec<Option<Value>>>> = self.fallback.read(
            self.namespace(),
            || {
                self.inner
                    .get_json_by_ids(ids, &mut |i, stored| {
                        consumer(&mut stopped, visit(i, stored))
                    })
                    .map(|()| None)
            },
            |o| {
                let o = o?;
                let known: Option<Vec<Option<Value>>> = ids
                    .iter()
                    .map(|id| match o.ids.get(id) {
                        Some(v) => Some(v.clone()),
                        None if o.cleared => Some(None),
                        None => None,
                    })
                    .collect();
                known.map(Some)
            },
        );
        let from_journal = match stopped {
            Some(e) => return Err(e),
            None => from_journal?,
        };
        for (i, v) in from_journal.into_iter().flatten().enumerate() {
            if let Some(v) = v {
                visit(i, Stored::Owned(v))?;
            }
        }
        Ok(())
    }

    /// Online, the text goes to Redis as it is; the journal (offline) keeps parsed values.
    fn upsert_json(&self, items: &[(&str, &RawValue)]) -> Result<()> {
        for (id, _) in items {
            validate_id(self.namespace(), id)?;
        }
        if items.is_empty() {
            return Ok(());
        }
        let journaled = || {
            Ok(Entry::Upsert {
                ns: self.namespace().to_string(),
                items: parse_items(self.namespace(), items)?,
            })
        };
        self.fallback
            .write(journaled, || self.inner.upsert_json(items))
    }
}

/// Keeps the error of the caller's page or value consumer apart from the backend's, so that
/// the fallback's read never takes it for an outage (a consumer's own `Unavailable` or
/// connection error must not switch the fallback offline): the consumer's error is put in
/// `stopped`, returned after the read, and the read sees a placeholder that is neither a
/// connection error nor a timeout.
fn consumer(stopped: &mut Option<Error>, outcome: Result<()>) -> Result<()> {
    outcome.map_err(|e| {
        *stopped = Some(e);
        Error::Decode {
            namespace: String::new(),
            key: String::new(),
            reason: "stopped by the consumer".into(),
        }
    })
}

fn unsent_id(w: &UnsentWrite) -> &String {
    match w {
        UnsentWrite::Upsert { id, .. } | UnsentWrite::Delete { id } => id,
    }
}
