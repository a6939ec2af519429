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
//!   orphans). Each journal's header names the Redis target and key prefix it belongs to; a
//!   journal of another target, or one without a header, is refused with [`Error::Journal`]
//!   (the `graphrag-kv journal` commands settle it), never replayed into the wrong place.
//! - `index_done_callback` offline is an error ([`Error::Unavailable`]): the journal holds the
//!   writes made since the outage, but writes Redis acknowledged before it may be lost with
//!   the server's unsynced tail.
//!
//! `store.rs` holds [`FallbackStore`], the per-namespace `KvStore`; `journal.rs` the file
//! format (entries, torn and failed appends, locks); `target.rs` the header naming the Redis
//! target a journal belongs to; `admin.rs` the functions behind
//! `graphrag-kv journal replay|discard`.
//!
//! Replay writes what this process was told, in order: when other processes wrote the same ids
//! meanwhile, the replayed value wins (last replay wins). A replayed `clear` removes what other
//! processes wrote to that namespace before the replay.

mod admin;
mod journal;
mod store;
mod target;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;

pub use admin::{discard_journals, replay_journals, Discarded, ReplayedJournal};
use journal::{io_error, Entry, Writer};
pub use journal::{list_journals, JournalInfo};
pub use store::FallbackStore;
pub use target::{JournalHeader, JournalTarget};

use crate::error::{Error, Result};
use crate::store::{KvStore, UnsentWrite};

/// Opens the backend's own store of a namespace: the bottom of its stack, with no layer over
/// it. The fallback probes Redis and replays journals (of any namespace) through it.
///
/// [`crate::Storage`] passes the one it builds the bottom of every stack with, so a replayed
/// write takes the path any write to the backend takes (`storage::stack`); a closure
/// `Fn(&str) -> Result<Arc<dyn KvStore>>` is one too (`graphrag-kv journal replay` passes a
/// storage without layers).
pub trait OpenBackend: Send + Sync {
    /// The backend's store of `namespace`.
    ///
    /// # Errors
    /// An invalid namespace; whatever opening a namespace of the backend can fail with.
    fn open(&self, namespace: &str) -> Result<Arc<dyn KvStore>>;
}

impl<F> OpenBackend for F
where
    F: Fn(&str) -> Result<Arc<dyn KvStore>> + Send + Sync,
{
    fn open(&self, namespace: &str) -> Result<Arc<dyn KvStore>> {
        self(namespace)
    }
}

/// The namespace the fallback probes Redis through (`index_start_callback`, a PING) and
/// checkpoints replayed writes through (`index_done_callback`); it writes nothing there.
const PROBE_NAMESPACE: &str = "graphrag_kv_probe";

/// How often an offline fallback asks Redis whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

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
    journal: Option<Writer>,
    /// Orphaned journals being replayed, and journals of ours retired after an append that
    /// could not be cut off; locked by us, removed after replay.
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
    /// Written in every journal's header; journals of another target are refused.
    target: JournalTarget,
    /// The backend's stores, from the function that builds the bottom of every stack.
    backend: Box<dyn OpenBackend>,
    state: RwLock<State>,
    /// Wakes the prober early (on shutdown, or when going offline).
    wake: (Mutex<bool>, Condvar),
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fallback")
            .field("dir", &self.dir)
            .field("target", &self.target.display)
            .field("prefix", &self.target.prefix)
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
    /// Opens the journal directory, adopts orphaned journals of dead processes written for
    /// `target` (they are replayed as soon as Redis answers), and starts the prober.
    ///
    /// A torn last line of an orphan (a crash mid-append, never acknowledged) is cut off.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created or read; [`Error::Journal`] for an
    /// orphan written for another target or key prefix, or without a header (older versions):
    /// it is left untouched for `graphrag-kv journal replay` or `discard`;
    /// [`Error::CorruptFile`] for an orphan with an unreadable whole line.
    pub fn open(
        dir: impl Into<PathBuf>,
        target: JournalTarget,
        backend: Box<dyn OpenBackend>,
    ) -> Result<(Arc<Fallback>, FallbackGuard)> {
        let dir = dir.into();
        journal::create_dir(&dir)?;
        let mut state = State {
            online: true,
            ..State::default()
        };
        // Oldest first: replay in the order the writes were accepted.
        for path in journal::journal_paths(&dir)? {
            // A live process holds its journal's lock: only orphans can be locked here.
            let Some(file) = journal::lock_orphan(&path) else {
                continue;
            };
            let contents = journal::read(&path, &file)?;
            if contents.entries.is_empty() {
                // Nothing to replay (a process that died before its first write was taken).
                journal::remove_locked(&path, file)?;
                continue;
            }
            if let Some(refused) = journal::refusal(&path, &contents, &target) {
                return Err(refused);
            }
            journal::truncate_torn(&path, &file, &contents)?;
            log::warn!(
                "found the journal {} of a process that stopped while Redis was down: {} \
                 writes will be replayed when Redis answers",
                path.display(),
                contents.entries.len()
            );
            for e in &contents.entries {
                state.apply_overlay(e);
            }
            state.pending.extend(contents.entries);
            state.orphans.push((path, file));
        }
        if !state.pending.is_empty() {
            state.online = false;
        }
        let fallback = Arc::new(Fallback {
            dir,
            target,
            backend,
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
        let probe = self
            .backend
            .open(PROBE_NAMESPACE)
            .and_then(|s| s.index_start_callback());
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
                None => match self.backend.open(&ns) {
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
        if done == total {
            // The journal goes only once Redis has the replayed writes on its disk; until then
            // they stay pending and are replayed again (idempotent in order) at the next probe.
            let durable = self
                .backend
                .open(PROBE_NAMESPACE)
                .and_then(|s| s.index_done_callback());
            if let Err(err) = durable {
                log::warn!(
                    "replayed {total} journaled writes but Redis could not make them durable \
                     ({err}); the journal is kept and replayed again"
                );
                return;
            }
        }
        // Replayed entries are idempotent in order, so a crash now (before the files go)
        // replays them again harmlessly; keep only what is left in memory.
        st.pending.drain(..done);
        if !st.pending.is_empty() {
            return;
        }
        let mut files: Vec<(PathBuf, File)> = st.orphans.drain(..).collect();
        files.extend(st.journal.take().map(|w| (w.path, w.file)));
        for (path, file) in files {
            if let Err(e) = journal::remove_locked(&path, file) {
                log::error!("journal {} replayed but not removed: {e}", path.display());
            }
        }
        st.overlay.clear();
        st.online = true;
        log::warn!("Redis answers again: {total} journaled writes replayed; back online");
    }

    /// Records a write offline: appended to this process's journal and fsynced. A failed
    /// append is cut back off the journal (the write is not taken).
    fn journal(&self, st: &mut State, entry: Entry) -> Result<()> {
        if let Some(w) = st.journal.take_if(|w| w.broken) {
            st.orphans.push((w.path, w.file));
        }
        let writer = match &mut st.journal {
            Some(w) => w,
            None => st.journal.insert(Writer::create(&self.dir, &self.target)?),
        };
        writer.append(&entry)?;
        st.apply_overlay(&entry);
        st.pending.push(entry);
        Ok(())
    }

    /// The error of a checkpoint while Redis is unreachable: what the journal holds, and why
    /// that is not "durable".
    fn not_durable(&self, namespace: &str, cause: Option<&Error>) -> Error {
        let n = self.pending_writes();
        let cause = cause.map(|e| format!(" ({e})")).unwrap_or_default();
        unavailable(
            namespace,
            &format!(
                "Redis is unreachable{cause}: {n} {} safe in the journal in {} and replayed when \
                 it answers, but writes Redis acknowledged before the outage may not be on its \
                 disk, so the checkpoint cannot confirm them",
                if n == 1 { "write is" } else { "writes are" },
                self.dir.display()
            ),
        )
    }

    /// True when Redis answers a PING.
    fn redis_answers(&self) -> bool {
        self.backend
            .open(PROBE_NAMESPACE)
            .and_then(|s| s.index_start_callback())
            .is_ok()
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
    /// builds the journal's record only when it is needed (a borrowed batch is copied then,
    /// JSON text parsed then); its error is returned and nothing is journaled.
    fn write(
        &self,
        entry: impl FnOnce() -> Result<Entry>,
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
                        return self.journal(&mut st, entry()?);
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
        self.journal(&mut st, entry()?)
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

impl Fallback {
    /// Keeps writes a layer above could not send (see [`KvStore::park`]): journaled like any
    /// offline write whatever the mode (the layer above has been failing to send them until
    /// its deadline), and replayed when Redis answers, by this process or the next one to open
    /// the journal directory. Goes offline, so reads see them and the prober replays them.
    fn park(&self, namespace: &str, writes: Vec<UnsentWrite>) -> Result<()> {
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
