//! The state machine: [`State`] in memory, snapshots in a file beside the log.
//!
//! The state lives in memory behind a lock that the node reads through [`StateReader`]. It is made
//! durable by the Raft log (on sled) plus periodic snapshots: after a restart the store loads the
//! last snapshot and openraft re-applies the log from there up to the persisted committed index.
//! Snapshots are the postcard encoding of [`State`] — the same canonical bytes whose hash is the
//! state digest — written to `state.snapshot` atomically (temporary file, fsync, rename, fsync
//! of the directory). They are kept out of sled on purpose: writing several megabytes through
//! sled every few thousand entries stalled the log's group commit behind it (measured ~100 ms).

use std::io::{self, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::changes::{ChangeFeed, ChangeKinds, FEED_CAPACITY, Feed, SaChange, changes};
use crate::command::Applied;
use crate::ids::SaId;
use crate::log_store::{decode, encode, io_err};
use crate::state::{State, apply};
use crate::types::TypeConfig;
use crate::types::raft::{LogId, Snapshot, SnapshotMeta, StoredMembership};

const SNAPSHOT_FILE: &str = "state.snapshot";
/// Bytes of a snapshot written between two flushes to disk.
const SNAPSHOT_FLUSH_CHUNK: usize = 1 << 20;

/// The state with the Raft bookkeeping that travels with it.
#[derive(Debug, Default)]
struct AppliedState {
    state: State,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// How long the state's lock was held, longest first: what `apply` may have waited for.
#[derive(Debug, Default)]
struct LockHolds {
    /// Longest read hold (µs) since the last [`StateReader::take_longest_holds`].
    read_us: AtomicU64,
    /// Longest write hold by `apply` (µs), likewise.
    write_us: AtomicU64,
}

/// One snapshot this node loaded, built or installed: what an operator (and the scale
/// benchmark) reads to see what a snapshot costs at the current number of SAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The log index the snapshot holds the state at.
    pub index: u64,
    /// IKE SAs in it.
    pub sas: u64,
    /// Its encoded size.
    pub bytes: u64,
    /// How long it took, end to end: built (copied, encoded, written, fsynced); installed
    /// (decoded, checked, swapped in, written); loaded at start (read, decoded, checked).
    pub ms: u64,
    /// How long the state's lock was held for it: the copy (built) or the swap (installed).
    pub lock_ms: u64,
}

/// The last snapshot of each kind, since this process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Read from the data directory when the state machine opened.
    pub loaded: Option<SnapshotRecord>,
    /// Built by this node (its periodic snapshot, or one an operator asked for).
    pub built: Option<SnapshotRecord>,
    /// Received from the leader and installed (this node lagged behind the kept log).
    pub installed: Option<SnapshotRecord>,
}

/// Read access to the applied state, for the node's services. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StateReader {
    shared: Arc<RwLock<AppliedState>>,
    applied_rx: watch::Receiver<u64>,
    data_plane: Arc<AtomicU64>,
    feed: Arc<Mutex<ChangeFeed>>,
    holds: Arc<LockHolds>,
    snapshots: Arc<Mutex<SnapshotStats>>,
}

/// A read guard on the applied state. Dropping it records how long it was held.
#[derive(Debug)]
pub struct StateGuard<'a> {
    guard: RwLockReadGuard<'a, AppliedState>,
    since: Instant,
    holds: &'a LockHolds,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard.state
    }
}

impl StateGuard<'_> {
    /// The log index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        self.guard.last_applied.as_ref().map_or(0, |id| id.index)
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed().as_micros() as u64;
        self.holds.read_us.fetch_max(held, Ordering::Relaxed);
    }
}

impl StateReader {
    /// Locks the applied state for reading. Keep the guard short: `apply` waits for it.
    pub fn read(&self) -> StateGuard<'_> {
        // A poisoned lock means a panic while applying, which `apply` never does; recover the
        // data rather than take the node down with a second panic.
        let guard = self.shared.read().unwrap_or_else(|e| e.into_inner());
        StateGuard {
            guard,
            since: Instant::now(),
            holds: &self.holds,
        }
    }

    /// Appends the changes of every entry applied after `cursor` whose kinds intersect
    /// `interest` (O(changes), never O(SAs)), or says the reader must walk the whole state.
    /// A state read after this call holds at least everything up to the returned cursor.
    pub fn changes_since(
        &self,
        cursor: u64,
        interest: ChangeKinds,
        out: &mut Vec<SaChange>,
    ) -> Feed {
        self.feed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .since(cursor, interest, out)
    }

    /// The last applied index that changed the slot map or the node registry (or replaced the
    /// whole state).
    pub fn placement_changed_at(&self) -> u64 {
        self.feed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .placement_changed_at()
    }

    /// The snapshots this node loaded, built and installed last.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        *self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest read and write holds of the state's lock (µs) since the last call: how long
    /// `apply` (or a reader) may have waited. Resets both.
    pub fn take_longest_holds(&self) -> (u64, u64) {
        (
            self.holds.read_us.swap(0, Ordering::Relaxed),
            self.holds.write_us.swap(0, Ordering::Relaxed),
        )
    }

    /// A watch of the last applied log index: wakes whoever waits for the state to change.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_rx.clone()
    }

    /// The index of the last applied entry that may have changed what a data plane runs
    /// ([`crate::Command::may_change_data_plane`]; a snapshot counts). It is updated before the
    /// applied-index watch, so a reader woken by that watch at index N sees every such entry
    /// up to N.
    pub fn data_plane_changed_at(&self) -> u64 {
        self.data_plane.load(Ordering::Acquire)
    }
}

/// The openraft state machine for evpc. Cheap to clone.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<RwLock<AppliedState>>,
    applied_tx: Arc<watch::Sender<u64>>,
    applied_rx: watch::Receiver<u64>,
    data_plane: Arc<AtomicU64>,
    feed: Arc<Mutex<ChangeFeed>>,
    holds: Arc<LockHolds>,
    snapshots: Arc<Mutex<SnapshotStats>>,
    snapshot_path: PathBuf,
    /// Run first on the threads that encode, write and decode snapshots (the node lowers their
    /// scheduling priority with it).
    background_hook: Option<BackgroundHook>,
}

/// What a snapshot thread calls before its work: see [`StateMachineStore::set_background_hook`].
pub type BackgroundHook = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("applied", &*self.applied_rx.borrow())
            .finish()
    }
}

impl StateMachineStore {
    /// Opens the state machine kept in `dir`, loading the last snapshot if there is one.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let started = Instant::now();
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let mut applied = AppliedState::default();
        let mut stats = SnapshotStats::default();
        if let Some(stored) = read_snapshot(&snapshot_path)? {
            applied = restore(&stored.meta, &stored.data)?;
            stats.loaded = Some(SnapshotRecord {
                index: applied.last_applied.as_ref().map_or(0, |id| id.index),
                sas: applied.state.sa_count() as u64,
                bytes: stored.data.len() as u64,
                ms: started.elapsed().as_millis() as u64,
                lock_ms: 0,
            });
        }
        let index = applied.last_applied.as_ref().map_or(0, |id| id.index);
        let (applied_tx, applied_rx) = watch::channel(index);
        Ok(StateMachineStore {
            shared: Arc::new(RwLock::new(applied)),
            applied_tx: Arc::new(applied_tx),
            applied_rx,
            data_plane: Arc::new(AtomicU64::new(index)),
            feed: Arc::new(Mutex::new(ChangeFeed::new(index, FEED_CAPACITY))),
            holds: Arc::default(),
            snapshots: Arc::new(Mutex::new(stats)),
            snapshot_path,
            background_hook: None,
        })
    }

    /// Has every snapshot thread call `hook` first. Encoding 100,000 SAs takes about a second
    /// of CPU on every node at once (they snapshot at the same index): at the node's own
    /// priority it took that CPU from the commits and heartbeats it must never delay.
    pub fn set_background_hook(&mut self, hook: BackgroundHook) {
        self.background_hook = Some(hook);
    }

    /// Runs `job` on a thread of its own (after the background hook) and waits for it.
    async fn in_background<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        let hook = self.background_hook.clone();
        std::thread::Builder::new()
            .name("evpc-snapshot".into())
            .spawn(move || {
                if let Some(hook) = hook {
                    hook();
                }
                let _ = done.send(job());
            })?;
        result
            .await
            .map_err(|_| io_err("the snapshot thread panicked"))?
    }

    /// A read handle on the applied state.
    pub fn reader(&self) -> StateReader {
        StateReader {
            shared: self.shared.clone(),
            applied_rx: self.applied_rx.clone(),
            data_plane: self.data_plane.clone(),
            feed: self.feed.clone(),
            holds: self.holds.clone(),
            snapshots: self.snapshots.clone(),
        }
    }

    fn record_snapshot(&self, update: impl FnOnce(&mut SnapshotStats)) {
        update(&mut self.snapshots.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
        self.shared.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.shared.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_snapshot(path: &Path) -> io::Result<Option<StoredSnapshot>> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("reading {}: {e}", path.display()),
        )),
    }
}

/// Replaces the snapshot file atomically: a crash leaves either the old or the new snapshot.
fn write_snapshot(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let temporary = write_temporary(path, meta, data)?;
    replace_snapshot(&temporary, path)
}

/// Writes the snapshot file's next content beside it, durably, for [`replace_snapshot`]. The
/// file is `postcard(StoredSnapshot { meta, data })`, written from its parts so `data` (the
/// encoded state, 125 MB at 100,000 SAs) is not copied into a second buffer.
fn write_temporary(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> io::Result<PathBuf> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    // postcard: the fields in order; a byte sequence is its length as a varint, then the
    // bytes (`a_snapshot_file_is_the_postcard_encoding_of_its_parts` checks it).
    let mut head = encode(meta)?;
    head.extend_from_slice(&encode(&(data.len() as u64))?);
    file.write_all(&head)?;
    // Flushed a chunk at a time: with ext4's ordered data, the Raft log's own fsyncs (every
    // commit waits for one) wait for the snapshot's dirty pages; one fsync of 100+ MB at the
    // end held them for seconds, 4 MiB chunks for tens of milliseconds.
    for chunk in data.chunks(SNAPSHOT_FLUSH_CHUNK) {
        file.write_all(chunk)?;
        file.sync_data()?;
    }
    file.sync_all()?;
    Ok(temporary)
}

/// Puts a snapshot written by [`write_temporary`] in place: rename, then fsync the directory.
fn replace_snapshot(temporary: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Decodes a snapshot and checks its invariants before anything trusts it.
fn restore(meta: &SnapshotMeta, data: &[u8]) -> io::Result<AppliedState> {
    let state: State = decode(data)?;
    state.check_invariants().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snapshot breaks an invariant: {e}"),
        )
    })?;
    Ok(AppliedState {
        state,
        last_applied: meta.last_log_id,
        membership: meta.last_membership.clone(),
    })
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let started = std::time::Instant::now();
        // Copy under the lock (O(1) for the per-SA maps, which are persistent), then encode and
        // write on a blocking thread: encoding 100,000 SAs takes a few hundred milliseconds of
        // CPU, which on a runtime worker held up Raft heartbeats on every node at once (they
        // all snapshot at the same index) until the cluster declared itself down.
        let (state, meta) = {
            let applied = self.read();
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
            };
            (applied.state.clone(), meta)
        };
        let copied_ms = started.elapsed().as_millis() as u64;
        let path = self.snapshot_path.clone();
        let sas = state.sa_count();
        let index = meta.last_log_id.as_ref().map_or(0, |id| id.index);
        let stored = self
            .in_background(move || {
                let stored = StoredSnapshot {
                    meta,
                    data: state.canonical_bytes(),
                };
                drop(state);
                write_snapshot(&path, &stored.meta, &stored.data).map(|()| stored)
            })
            .await?;
        let record = SnapshotRecord {
            index,
            sas: sas as u64,
            bytes: stored.data.len() as u64,
            ms: started.elapsed().as_millis() as u64,
            lock_ms: copied_ms,
        };
        self.record_snapshot(|stats| stats.built = Some(record));
        tracing::info!(
            last_log_id = ?stored.meta.last_log_id,
            bytes = record.bytes,
            sas,
            copied_ms,
            ms = record.ms,
            "built snapshot"
        );
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last_index = None;
        let mut changed: Vec<(SaId, ChangeKinds)> = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let response = {
                let mut applied = self.write();
                let since = Instant::now();
                applied.last_applied = Some(entry.log_id);
                changed.clear();
                let mut placement = false;
                let response = match &entry.payload {
                    EntryPayload::Blank => Ok(Applied::Done),
                    EntryPayload::Normal(command) => {
                        if command.may_change_data_plane() {
                            self.data_plane.store(index, Ordering::Release);
                        }
                        let response = apply(&mut applied.state, command);
                        placement = changes(command, &response, &mut changed);
                        response
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership =
                            StoredMembership::new(Some(entry.log_id), membership.clone());
                        Ok(Applied::Done)
                    }
                };
                // Pushed before the write lock goes: a reader that sees the state at this
                // index finds its changes in the feed.
                self.feed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(index, &changed, placement);
                let held = since.elapsed().as_micros() as u64;
                self.holds.write_us.fetch_max(held, Ordering::Relaxed);
                response
            };
            last_index = Some(entry.log_id.index);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        if let Some(index) = last_index {
            self.applied_tx.send_replace(index);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Cursor<Vec<u8>>,
    ) -> Result<(), io::Error> {
        let started = std::time::Instant::now();
        let data = Arc::new(snapshot.into_inner());
        let bytes = data.len() as u64;
        // Written to disk while it is decoded and checked (the write mostly waits for the disk,
        // the check is CPU), both off the runtime's workers; put in place only once the check
        // passed, so a snapshot that breaks an invariant never replaces the one on disk.
        let written = {
            let (path, meta, data) = (self.snapshot_path.clone(), meta.clone(), data.clone());
            self.in_background(move || write_temporary(&path, &meta, &data))
        };
        let restored = {
            let (meta, data) = (meta.clone(), data.clone());
            self.in_background(move || restore(&meta, &data))
        };
        let (written, restored) = tokio::join!(written, restored);
        let restored = match restored {
            Ok(restored) => restored,
            Err(e) => {
                if let Ok(temporary) = written {
                    let _ = std::fs::remove_file(temporary);
                }
                return Err(e);
            }
        };
        let temporary = written?;
        let path = self.snapshot_path.clone();
        self.in_background(move || replace_snapshot(&temporary, &path))
            .await?;
        drop(data);
        let index = restored.last_applied.as_ref().map_or(0, |id| id.index);
        let sas = restored.state.sa_count();
        let swap_started = Instant::now();
        let replaced = {
            let mut applied = self.write();
            let replaced = std::mem::replace(&mut *applied, restored);
            self.feed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reset(index);
            replaced
        };
        // Freeing the old state's records is not free either: not under the lock.
        let lock_ms = swap_started.elapsed().as_millis() as u64;
        tokio::task::spawn_blocking(move || drop(replaced));
        self.data_plane.store(index, Ordering::Release);
        self.applied_tx.send_replace(index);
        let record = SnapshotRecord {
            index,
            sas: sas as u64,
            bytes,
            ms: started.elapsed().as_millis() as u64,
            lock_ms,
        };
        self.record_snapshot(|stats| stats.installed = Some(record));
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            sas,
            bytes,
            lock_ms,
            ms = record.ms,
            "installed snapshot"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let path = self.snapshot_path.clone();
        let stored = tokio::task::spawn_blocking(move || read_snapshot(&path))
            .await
            .map_err(io_err)??;
        Ok(stored.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_file_is_the_postcard_encoding_of_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SNAPSHOT_FILE);
        let meta = SnapshotMeta::default();
        // across a chunk boundary, and lengths whose varint takes one, two and three bytes
        for len in [0, 1, 127, 128, 300, 20_000, SNAPSHOT_FLUSH_CHUNK + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            write_snapshot(&path, &meta, &data).unwrap();
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data,
            };
            assert_eq!(std::fs::read(&path).unwrap(), encode(&stored).unwrap());
            let read = read_snapshot(&path).unwrap().unwrap();
            assert_eq!(read.data, stored.data);
        }
    }
}
