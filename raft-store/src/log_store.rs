//! The Raft log and vote on sled.
//!
//! Layout in the node's sled database:
//! - tree `raft-log`: key = log index (u64, big-endian, so sled's order is log order),
//!   value = postcard-encoded entry;
//! - tree `raft-meta`: `vote`, `committed`, `last-purged`.
//!
//! Durability: an append or a vote is acknowledged to openraft only after `flush_async` has
//! made it durable, so a node that crashes never forgets an entry it helped commit or a vote
//! it cast.

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

/// The Raft log storage. Cheap to clone: clones share the same sled trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    flusher: std::sync::mpsc::Sender<IOFlushed<TypeConfig>>,
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

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("entries", &self.log.len())
            .finish()
    }
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
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

impl LogStore {
    /// Opens (or creates) the log in `db`, starting the thread that flushes appends.
    pub fn open(db: &sled::Db) -> io::Result<Self> {
        let (flusher, pending) = std::sync::mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || flush_appends(flush_db, pending))?;
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree(LOG_TREE).map_err(io_err)?,
            meta: db.open_tree(META_TREE).map_err(io_err)?,
            flusher,
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

    /// Removes entries with index in `range` (a half-open range of indexes).
    fn remove_range(&self, from: Bound<u64>, to: Bound<u64>) -> io::Result<()> {
        let keys = self
            .log
            .range(key_range(from, to))
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err)?;
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(io_err)
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_range(from: Bound<u64>, to: Bound<u64>) -> (Bound<[u8; 8]>, Bound<[u8; 8]>) {
    (from.map(index_key), to.map(index_key))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let range = key_range(range.start_bound().cloned(), range.end_bound().cloned());
        self.log
            .range(range)
            .values()
            .map(|value| decode(&value.map_err(io_err)?))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        let last_log_id = match self.log.last().map_err(io_err)? {
            Some((_, value)) => Some(decode::<Entry>(&value)?.log_id().clone()),
            None => last_purged_log_id.clone(),
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
    /// waiting for a quorum. It is not flushed on its own: losing the latest value only means
    /// re-applying a little less at start-up, never more than was committed.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    /// Writes the entries and hands the callback to the flusher: openraft replicates the entries
    /// to followers while the local flush runs, and counts this node's copy only once the
    /// callback reports it durable.
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(&index_key(entry.index())[..], encode(&entry)?);
        }
        self.log.apply_batch(batch).map_err(io_err)?;
        self.flusher
            .send(callback)
            .map_err(|_| io_err("the log flusher has stopped"))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = match &last_log_id {
            Some(log_id) => Bound::Excluded(log_id.index()),
            None => Bound::Unbounded,
        };
        self.remove_range(from, Bound::Unbounded)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: if we crash halfway, the log state still says the
        // purged prefix is gone and openraft never reads the half-removed entries.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.flush().await?;
        self.remove_range(Bound::Unbounded, Bound::Included(log_id.index()))
    }
}
