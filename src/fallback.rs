//! [`FallbackStore`]: keeps an indexer writing while Redis is down, and loses nothing.
//!
//! ## Where it belongs in a stack
//!
//! ```text
//! Metered -> WriteBehind -> FallbackStore -> RedisStore      right
//! Metered -> FallbackStore -> WriteBehind -> RedisStore      wrong
//! ```
//!
//! Directly around the Redis store: the write-behind flusher then writes into the fallback, so
//! an outage fills the journal instead of stalling the queue. The other way round, the journal
//! would only see writes the queue had already given up on.
//!
//! ## What it does
//!
//! - While Redis answers, every call goes straight to it.
//! - When a call fails with a connection error or timeout after the Redis store's own retries,
//!   the fallback switches to *offline* (logged once per switch). Writes (`upsert`,
//!   `delete_by_ids`, `clear`) are then appended to a local journal and fsynced before the call
//!   returns: they are as durable as a JSON checkpoint.
//! - Offline reads are answered from the journal's writes when it knows the answer (an id it
//!   wrote or deleted, a namespace it cleared); any other read returns [`Error::Unavailable`],
//!   never a false "missing".
//! - A background thread probes Redis; when it answers, the journal is replayed in order before
//!   any read or write reaches Redis again, then removed, and the fallback is *online* again.
//! - One journal file per process (`journal-{pid}-{nanos}.jsonl` in the journal directory), so
//!   several processes can fall back at once. A process that dies offline leaves its journal;
//!   the next fallback opened on that directory replays it (locks tell live journals from
//!   orphans).
//!
//! Replay writes what this process was told, in order: when other processes wrote the same ids
//! meanwhile, the replayed value wins (last replay wins). A replayed `clear` removes what other
//! processes wrote to that namespace before the replay.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{
    missing_in_order, project, validate_id, validate_ids, Item, KvStore, NamespaceStats,
};

/// Opens the inner store of a namespace (for replaying journals of any namespace).
pub type OpenInner = dyn Fn(&str) -> Result<Arc<dyn KvStore>> + Send + Sync;

/// How often an offline fallback asks Redis whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// One journaled write.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Entry {
    Upsert { ns: String, items: Vec<Item> },
    Delete { ns: String, ids: Vec<String> },
    Clear { ns: String },
}

impl Entry {
    fn namespace(&self) -> &str {
        match self {
            Entry::Upsert { ns, .. } | Entry::Delete { ns, .. } | Entry::Clear { ns } => ns,
        }
    }
}

/// What the journal says about one namespace.
#[derive(Debug, Default)]
struct Overlay {
    /// Latest write per id: `Some` upserted, `None` deleted.
    ids: HashMap<String, Option<Value>>,
    /// The namespace was cleared: ids not in `ids` are known missing.
    cleared: bool,
}

#[derive(Debug, Default)]
struct State {
    online: bool,
    /// Writes not yet in Redis, in order (orphaned journals first).
    pending: Vec<Entry>,
    overlay: HashMap<String, Overlay>,
    /// This process's journal, created on the first offline write. Holds an exclusive lock.
    journal: Option<(PathBuf, File)>,
    /// Orphaned journals being replayed; locked by us, removed after replay.
    orphans: Vec<(PathBuf, File)>,
}

impl State {
    fn apply_overlay(&mut self, e: &Entry) {
        let o = self.overlay.entry(e.namespace().to_string()).or_default();
        match e {
            Entry::Upsert { items, .. } => {
                for (id, v) in items {
                    o.ids.insert(id.clone(), Some(v.clone()));
                }
            }
            Entry::Delete { ids, .. } => {
                for id in ids {
                    o.ids.insert(id.clone(), None);
                }
            }
            Entry::Clear { .. } => {
                o.ids.clear();
                o.cleared = true;
            }
        }
    }
}

/// The fallback state shared by every namespace of one storage: mode, journal, prober.
pub struct Fallback {
    dir: PathBuf,
    open_inner: Box<OpenInner>,
    state: RwLock<State>,
    /// Wakes the prober early (on shutdown, or when going offline).
    wake: (Mutex<bool>, Condvar),
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Owns the prober thread: dropping it stops and joins the thread.
#[derive(Debug)]
pub struct FallbackGuard {
    fallback: Arc<Fallback>,
    prober: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FallbackGuard {
    fn drop(&mut self) {
        {
            let (m, cv) = &self.fallback.wake;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.prober.take() {
            let _ = t.join();
        }
    }
}

impl Fallback {
    /// Opens the journal directory, adopts orphaned journals of dead processes (they are
    /// replayed as soon as Redis answers), and starts the prober.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created or read.
    pub fn open(
        dir: impl Into<PathBuf>,
        open_inner: Box<OpenInner>,
    ) -> Result<(Arc<Fallback>, FallbackGuard)> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error("creating journal directory", &dir, e))?;
        let mut state = State {
            online: true,
            ..State::default()
        };
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| io_error("listing journal directory", &dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("journal-") && n.ends_with(".jsonl"))
            })
            .collect();
        // Names hold the creation time after the pid: replay older journals first.
        files.sort_by_key(|p| journal_time(p));
        for path in files {
            let Ok(file) = File::options().read(true).append(true).open(&path) else {
                continue;
            };
            // A live process holds its journal's lock: only orphans can be locked here.
            if file.try_lock().is_err() {
                continue;
            }
            let entries = read_journal(&path, &file)?;
            log::warn!(
                "found the journal {} of a process that stopped while Redis was down: {} \
                 writes will be replayed when Redis answers",
                path.display(),
                entries.len()
            );
            for e in &entries {
                state.apply_overlay(e);
            }
            state.pending.extend(entries);
            state.orphans.push((path, file));
        }
        if !state.pending.is_empty() {
            state.online = false;
        }
        let fallback = Arc::new(Fallback {
            dir,
            open_inner,
            state: RwLock::new(state),
            wake: (Mutex::new(false), Condvar::new()),
        });
        let f = fallback.clone();
        let prober = std::thread::Builder::new()
            .name("graphrag-kv-fallback".into())
            .spawn(move || f.probe_loop())
            .map_err(|e| io_error("starting the fallback thread for", Path::new("."), e))?;
        let guard = FallbackGuard {
            fallback: fallback.clone(),
            prober: Some(prober),
        };
        // Replay orphans right away when Redis is up.
        if !fallback.is_online() {
            fallback.try_recover();
        }
        Ok((fallback, guard))
    }

    /// True while calls go straight to Redis.
    pub fn is_online(&self) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).online
    }

    /// Writes journaled and not yet replayed.
    pub fn pending_writes(&self) -> usize {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .len()
    }

    /// Wraps one namespace's inner store. `guard` (from [`Fallback::open`]) keeps the prober
    /// running while the store lives; without it, recovery stops when the guard is dropped.
    pub fn wrap<S: KvStore>(
        self: &Arc<Self>,
        inner: S,
        guard: Option<Arc<FallbackGuard>>,
    ) -> FallbackStore<S> {
        FallbackStore {
            inner,
            fallback: self.clone(),
            _guard: guard,
        }
    }

    fn probe_loop(&self) {
        let (m, cv) = &self.wake;
        loop {
            {
                let stop = m.lock().unwrap_or_else(|p| p.into_inner());
                let (stop, _) = cv
                    .wait_timeout(stop, PROBE_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner());
                if *stop {
                    return;
                }
            }
            if !self.is_online() {
                self.try_recover();
            }
        }
    }

    /// Probes Redis; when it answers, replays the journal in order and goes online.
    fn try_recover(&self) {
        let probe = (self.open_inner)("graphrag_kv_probe").and_then(|s| s.index_start_callback());
        if probe.is_err() {
            return;
        }
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.online {
            return;
        }
        let total = st.pending.len();
        let mut stores: HashMap<String, Arc<dyn KvStore>> = HashMap::new();
        let mut done = 0;
        for e in &st.pending {
            let ns = e.namespace().to_string();
            let store = match stores.get(&ns) {
                Some(s) => s.clone(),
                None => match (self.open_inner)(&ns) {
                    Ok(s) => {
                        stores.insert(ns.clone(), s.clone());
                        s
                    }
                    Err(err) => {
                        log::warn!("replaying the journal: cannot open {ns:?}: {err}");
                        break;
                    }
                },
            };
            let r = match e {
                Entry::Upsert { items, .. } => store.upsert(items.clone()),
                Entry::Delete { ids, .. } => store.delete_by_ids(ids),
                Entry::Clear { .. } => store.clear(),
            };
            if let Err(err) = r {
                log::warn!("replaying the journal stopped at write {done} of {total}: {err}");
                break;
            }
            done += 1;
        }
        // Replayed entries are idempotent in order, so a crash now (before the files go)
        // replays them again harmlessly; keep only what is left in memory.
        st.pending.drain(..done);
        if !st.pending.is_empty() {
            return;
        }
        let mut files: Vec<(PathBuf, File)> = st.orphans.drain(..).collect();
        files.extend(st.journal.take());
        for (path, file) in files {
            drop(file);
            if let Err(e) = fs::remove_file(&path) {
                log::error!("journal {} replayed but not removed: {e}", path.display());
            }
        }
        st.overlay.clear();
        st.online = true;
        log::warn!("Redis answers again: {total} journaled writes replayed; back online");
    }

    /// Records a write offline: appended to this process's journal and fsynced.
    fn journal(&self, st: &mut State, entry: Entry) -> Result<()> {
        if st.journal.is_none() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = self
                .dir
                .join(format!("journal-{}-{nanos}.jsonl", std::process::id()));
            let file = File::options()
                .create(true)
                .append(true)
                .read(true)
                .open(&path)
                .map_err(|e| io_error("creating journal", &path, e))?;
            file.try_lock().map_err(|e| {
                io_error(
                    "locking journal",
                    &path,
                    std::io::Error::other(e.to_string()),
                )
            })?;
            st.journal = Some((path, file));
        }
        let (path, file) = st.journal.as_mut().expect("journal opened above");
        let mut line = serde_json::to_vec(&entry).expect("serializing a journal entry");
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|_| file.sync_data())
            .map_err(|e| io_error("appending to journal", path, e))?;
        st.apply_overlay(&entry);
        st.pending.push(entry);
        Ok(())
    }

    /// Starts offline, before any call failed: for a storage opened while Redis did not answer,
    /// so that its first write is journaled at once instead of waiting for another connect
    /// attempt to fail. The prober goes online as soon as Redis answers.
    pub(crate) fn start_offline(&self, cause: &Error) {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        self.go_offline(&mut st, cause);
    }

    fn go_offline(&self, st: &mut State, cause: &Error) {
        if st.online {
            st.online = false;
            log::warn!(
                "Redis is unreachable ({cause}): writes go to the journal in {} until it \
                 answers again",
                self.dir.display()
            );
        }
    }

    /// A write: straight to Redis when online; journaled when Redis is unreachable. `entry`
    /// builds the journal's record only when it is needed (a borrowed batch is copied then).
    fn write(
        &self,
        entry: impl FnOnce() -> Entry,
        direct: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        {
            let st = self.state.read().unwrap_or_else(|p| p.into_inner());
            if st.online {
                drop(st);
                match direct() {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_connection() || e.is_timeout() => {
                        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                        self.go_offline(&mut st, &e);
                        return self.journal(&mut st, entry());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.online {
            // Recovered meanwhile: the journal is replayed, go straight to Redis.
            drop(st);
            return self.write(entry, direct);
        }
        self.journal(&mut st, entry())
    }

    /// A read: from Redis when online (a connection failure switches to offline and reports
    /// unavailable); from the journal when it knows, otherwise unavailable.
    fn read<T>(
        &self,
        namespace: &str,
        direct: impl FnOnce() -> Result<T>,
        from_journal: impl FnOnce(Option<&Overlay>) -> Option<T>,
    ) -> Result<T> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        if st.online {
            drop(st);
            return match direct() {
                Err(e) if e.is_connection() || e.is_timeout() => {
                    let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                    self.go_offline(&mut st, &e);
                    Err(unavailable(namespace, &e.to_string()))
                }
                other => other,
            };
        }
        from_journal(st.overlay.get(namespace)).ok_or_else(|| {
            unavailable(
                namespace,
                "Redis is unreachable and the journal does not hold the answer",
            )
        })
    }
}

/// Writes a write-behind queue could not send before its shutdown deadline: journaled like any
/// offline write, and replayed when Redis answers (by this process, or by the next one to open
/// the journal directory).
impl crate::write_behind::UnsentSink for Fallback {
    fn save_unsent(
        &self,
        namespace: &str,
        writes: Vec<crate::write_behind::UnsentWrite>,
    ) -> Result<()> {
        use crate::write_behind::UnsentWrite;
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.online {
            st.online = false;
            log::warn!(
                "{} writes of {namespace:?} could not reach Redis before shutdown: journaled in {}",
                writes.len(),
                self.dir.display()
            );
        }
        // Consecutive writes of one kind become one journal entry; order is kept.
        let mut entries: Vec<Entry> = Vec::new();
        for w in writes {
            match (w, entries.last_mut()) {
                (UnsentWrite::Upsert { id, value }, Some(Entry::Upsert { items, .. })) => {
                    items.push((id, value))
                }
                (UnsentWrite::Delete { id }, Some(Entry::Delete { ids, .. })) => ids.push(id),
                (UnsentWrite::Upsert { id, value }, _) => entries.push(Entry::Upsert {
                    ns: namespace.to_string(),
                    items: vec![(id, value)],
                }),
                (UnsentWrite::Delete { id }, _) => entries.push(Entry::Delete {
                    ns: namespace.to_string(),
                    ids: vec![id],
                }),
            }
        }
        for e in entries {
            self.journal(&mut st, e)?;
        }
        Ok(())
    }
}

fn unavailable(namespace: &str, reason: &str) -> Error {
    Error::Unavailable {
        namespace: namespace.to_string(),
        reason: reason.to_string(),
    }
}

fn io_error(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The creation time in a journal's name (`journal-{pid}-{nanos}.jsonl`).
fn journal_time(path: &Path) -> u128 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.rsplit('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads a journal; a torn last line (a crash mid-append, before the write was acknowledged)
/// is ignored, a bad line elsewhere is an error naming the file and line.
fn read_journal(path: &Path, file: &File) -> Result<Vec<Entry>> {
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<std::io::Result<_>>()
        .map_err(|e| io_error("reading journal", path, e))?;
    let mut entries = Vec::with_capacity(lines.len());
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Entry>(line) {
            Ok(e) => entries.push(e),
            Err(_) if n + 1 == lines.len() => {
                log::warn!(
                    "{}: ignoring a torn last line (never acknowledged)",
                    path.display()
                );
            }
            Err(e) => {
                return Err(Error::CorruptFile {
                    path: path.to_path_buf(),
                    line: n + 1,
                    column: e.column(),
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(entries)
}

/// One namespace behind a [`Fallback`].
#[derive(Debug)]
pub struct FallbackStore<S> {
    inner: S,
    fallback: Arc<Fallback>,
    /// Keeps the prober thread alive as long as any store needs it.
    _guard: Option<Arc<FallbackGuard>>,
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
            .write(|| journaled, || self.inner.upsert(items))
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
        let journaled = || Entry::Upsert {
            ns: self.namespace().to_string(),
            items: items
                .iter()
                .map(|(id, v)| ((*id).to_string(), (*v).clone()))
                .collect(),
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
            .write(|| entry, || self.inner.delete_by_ids(ids))
    }

    fn clear(&self) -> Result<()> {
        let entry = Entry::Clear {
            ns: self.namespace().to_string(),
        };
        self.fallback.write(|| entry, || self.inner.clear())
    }

    fn index_start_callback(&self) -> Result<()> {
        if !self.fallback.is_online() {
            // The journal takes writes; the indexer may start.
            return Ok(());
        }
        self.inner.index_start_callback()
    }

    fn index_done_callback(&self) -> Result<()> {
        if !self.fallback.is_online() {
            // Journaled writes were fsynced when they were accepted.
            return Ok(());
        }
        match self.inner.index_done_callback() {
            Err(e) if e.is_connection() || e.is_timeout() => {
                // Writes made before the outage were acknowledged by Redis but may not be on
                // its disk: that is not something the journal can fix, so say so.
                Err(e)
            }
            other => other,
        }
    }

    fn stats(&self) -> Result<NamespaceStats> {
        self.fallback
            .read(self.namespace(), || self.inner.stats(), |_| None)
    }
}
