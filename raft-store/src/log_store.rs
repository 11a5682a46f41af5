//! The Raft log and vote on sled.
//!
//! Layout in the node's sled database:
//! - tree `raft-log`: one record per append: key = index of the *last* entry in it (u64,
//!   big-endian, so sled's order is log order), value = the postcard-encoded entries, which
//!   are contiguous. One sled insert per append rather than per entry keeps sled's per-key
//!   work (node copies, page consolidation) off the commit path; the entry containing index
//!   `i` is in the first record whose key is `>= i`.
//! - tree `raft-meta`: `vote`, `committed`, `last-purged`.
//!
//! Durability: an append is acknowledged to openraft (through its callback) only after a flush
//! has made it durable, and a vote only once flushed, so a node that crashes never forgets an
//! entry it helped commit or a vote it cast. Appends share flushes (group commit).

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::TypeConfig;
use crate::types::raft::{Entry, LogId, Vote};

const LOG_TREE: &str = "raft-log";
const META_TREE: &str = "raft-meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last-purged";

/// The Raft log storage. Cheap to clone: clones share the same sled trees and threads.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: std::sync::mpsc::Sender<IOFlushed<TypeConfig>>,
    purger: std::sync::mpsc::Sender<u64>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("records", &self.log.len())
            .finish()
    }
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| io_err(format!("encoding: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt record in the data directory: {e}"),
        )
    })
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Decodes a log record: a non-empty run of contiguous entries.
fn decode_record(bytes: &[u8]) -> io::Result<Vec<Entry>> {
    let entries: Vec<Entry> = decode(bytes)?;
    if entries.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "corrupt record in the data directory: empty log record",
        ));
    }
    Ok(entries)
}

/// Makes appended entries durable, one flush at a time, on a thread of its own (fsync blocks):
/// each flush covers every append written before it started, so all callbacks waiting at that
/// moment complete together (group commit). Ends when every [`LogStore`] clone is dropped.
fn flush_appends(db: sled::Db, pending: std::sync::mpsc::Receiver<IOFlushed<TypeConfig>>) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        batch.extend(pending.try_iter());
        let flushed = db.flush().map(|_| ()).map_err(io_err);
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "flushing the Raft log failed");
        }
        for callback in batch {
            let result = match &flushed {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            callback.io_completed(result);
        }
    }
}

/// Deletes purged records in the background, in small batches, so a purge never holds up
/// appends. Records wholly at or below the recorded purge point are never read again, so they
/// may linger a while (after a crash, until the next purge, which removes everything below its
/// point).
fn remove_purged(log: sled::Tree, requests: std::sync::mpsc::Receiver<u64>) {
    const CHUNK: usize = 256;
    while let Ok(first) = requests.recv() {
        let upto = requests.try_iter().fold(first, u64::max);
        loop {
            let keys: Result<Vec<_>, _> =
                log.range(..=index_key(upto)).keys().take(CHUNK).collect();
            let keys = match keys {
                Ok(keys) if keys.is_empty() => break,
                Ok(keys) => keys,
                Err(e) => {
                    tracing::error!(error = %e, "reading purged log records failed");
                    break;
                }
            };
            let mut batch = sled::Batch::default();
            for key in keys {
                batch.remove(key);
            }
            if let Err(e) = log.apply_batch(batch) {
                tracing::error!(error = %e, "removing purged log records failed");
                break;
            }
        }
    }
}

impl LogStore {
    /// Opens (or creates) the log in `db`, starting the threads that flush appends and remove
    /// purged records.
    pub fn open(db: &sled::Db) -> io::Result<Self> {
        let log = db.open_tree(LOG_TREE).map_err(io_err)?;
        let (flusher, pending) = std::sync::mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_appends(flush_db, pending))?;
        let (purger, purges) = std::sync::mpsc::channel();
        let purge_log = log.clone();
        std::thread::Builder::new()
            .name("raft-log-purge".into())
            .spawn(move || remove_purged(purge_log, purges))?;
        Ok(LogStore {
            db: db.clone(),
            log,
            meta: db.open_tree(META_TREE).map_err(io_err)?,
            flusher,
            purger,
        })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        self.meta
            .get(key)
            .map_err(io_err)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        self.meta.insert(key, encode(value)?).map_err(io_err)?;
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.db.flush_async().await.map_err(io_err)?;
        Ok(())
    }

    fn last_purged(&self) -> io::Result<Option<LogId>> {
        self.get_meta(KEY_LAST_PURGED)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        // Entries at or below the purge point may still sit in a record being removed; they
        // are gone as far as openraft is concerned.
        let floor = self.last_purged()?.map_or(0, |p| p.index() + 1);
        let start = start.max(floor);
        let mut entries = Vec::new();
        for record in self.log.range(index_key(start)..) {
            let (_, value) = record.map_err(io_err)?;
            let mut past_end = false;
            for entry in decode_record(&value)? {
                let index = entry.index();
                if index < start {
                    continue;
                }
                if !range.contains(&index) {
                    past_end = true;
                    break;
                }
                entries.push(entry);
            }
            if past_end {
                break;
            }
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.last_purged()?;
        let last_in_log = match self.log.last().map_err(io_err)? {
            Some((_, value)) => decode_record(&value)?.last().map(|e| e.log_id()),
            None => None,
        };
        // A record wholly below the purge point may linger; the purge point then wins.
        let last_log_id = match (last_in_log, &last_purged_log_id) {
            (Some(last), Some(purged)) if last.index() <= purged.index() => Some(*purged),
            (Some(last), _) => Some(last),
            (None, purged) => *purged,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, vote)?;
        self.flush().await
    }

    /// The committed index lets a restarted node re-apply its log up to where it was without
    /// waiting for a quorum. It is not flushed on its own (the next append's flush, or sled's
    /// periodic one, carries it): losing the latest value only means re-applying a little less
    /// at start-up, never more than was committed.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    /// Writes the entries as one record and hands the callback to the flusher: openraft
    /// replicates them to followers while the local flush runs, and counts this node's copy
    /// only once the callback reports it durable.
    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            if let Some(gap) = entries
                .windows(2)
                .find(|w| w[1].index() != w[0].index() + 1)
            {
                return Err(io_err(format!(
                    "append of non-contiguous entries {} and {}",
                    gap[0].index(),
                    gap[1].index()
                )));
            }
            self.log
                .insert(index_key(last.index()), encode(&entries)?)
                .map_err(io_err)?;
        }
        self.flusher
            .send(callback)
            .map_err(|_| io_err("the log flusher has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let keep = last_log_id.map(|id| id.index());
        let first_removed = keep.map_or(0, |k| k + 1);
        let mut batch = sled::Batch::default();
        for record in self.log.range(index_key(first_removed)..) {
            let (key, value) = record.map_err(io_err)?;
            batch.remove(key);
            // The record straddling the cut keeps its head under a new key.
            if let Some(keep) = keep {
                let head: Vec<Entry> = decode_record(&value)?
                    .into_iter()
                    .filter(|e| e.index() <= keep)
                    .collect();
                if !head.is_empty() {
                    batch.insert(&index_key(keep)[..], encode(&head)?);
                }
            }
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point durably first: from then on openraft never reads the purged
        // prefix, and the background removal of its records may take its time.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.flush().await?;
        self.purger
            .send(log_id.index())
            .map_err(|_| io_err("the log purger has stopped"))
    }
}
