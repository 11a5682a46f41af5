//! # evpc-raft-store — the replicated SA database
//!
//! Everything the cluster agrees on, and how it is stored:
//!
//! - the **data model** ([`IkeSa`], [`ChildSa`], the node registry, the placement [`SlotMap`],
//!   the inner-address pool), all in one [`State`];
//! - the **commands** that change it ([`Command`]) and the pure function that applies them
//!   ([`apply`]), which enforces the invariants that keep counters moving forward and answers
//!   a refused command with a typed [`Rejection`];
//! - the **openraft storage**: the log and vote on sled ([`LogStore`]) and the state machine
//!   with its snapshots ([`StateMachineStore`]), which are files written atomically.
//!
//! With the feature `fixture`, `fixture` builds realistic SA records for tests, simulations and
//! load generators; the daemon does not enable it.
//!
//! ```text
//!  node (proposer)                 openraft                       this crate
//!  ───────────────                 ────────                       ──────────
//!  Command { SPIs, times,   ──►  client_write  ──► LogStore::append ─► sled `raft-log`
//!            owner, epoch }        replicate to a quorum            flush before ack
//!                                  commit
//!                                    │
//!                                    ▼
//!                          StateMachineStore::apply ──► apply(&mut State, &Command)
//!                                    │                        │
//!  Response (Applied | Rejection) ◄──┘                        └─► StateReader (node reads)
//!
//!  every N entries: build_snapshot ─► postcard(State) ─► file `state.snapshot`
//! ```
//!
//! `apply` reads no clock, draws no randomness and does no I/O: the proposer puts SPIs, times,
//! owners and epochs into the command, so every replica that applies the same log reaches the
//! same state, byte for byte ([`State::digest`]).

#![forbid(unsafe_code)]

mod changes;
mod cluster;
mod command;
#[cfg(feature = "fixture")]
pub mod fixture;
mod ids;
mod keys;
pub mod limits;
mod log_store;
mod sa;
mod selectors;
mod state;
mod state_machine;
mod tombstones;
mod types;

pub use changes::{ChangeFeed, ChangeKinds, FEED_CAPACITY, Feed, SaChange, changes};
pub use cluster::{NodeRecord, NodeState, SlotMap};
pub use command::{
    Applied, BlobRef, Command, NodeAck, OwnerMove, Rejection, Reseal, Response, SaUpdate,
    SlotAssignment,
};
pub use ids::{
    ClusterId, Epoch, KeyId, NodeId, ParseClusterIdError, ParseSaIdError, SLOT_COUNT, SaId, Slot,
    slot_for_initiator_spi,
};
pub use keys::{
    Fingerprint, KeyRegistry, SEALED_FORMAT, SEALED_HEADER_LEN, SEALED_NONCE_LEN, SEALED_TAG_LEN,
    SealedHeader,
};
pub use log_store::LogStore;
pub use sa::{
    ChildSa, ChildSuite, Identity, IkeSa, IkeSuite, MessageIds, Role, SaContext, SaContextError,
    SaTimes, SealedKeys, StoredMessage, TrafficSelector,
};
pub use selectors::SelectorIndex;
pub use state::{State, apply};
pub use state_machine::{
    SnapshotRecord, SnapshotStats, StateGuard, StateMachineStore, StateReader,
};
pub use tombstones::{NEVER, SaTombstone, SpiTombstone, Tombstones};
pub use types::{Member, TypeConfig, raft};

/// Bytes of the Raft log sled keeps in memory.
const LOG_CACHE_BYTES: u64 = 64 << 20;

/// Opens a node's storage in `dir`: a sled database (`dir/log`) holding the Raft log, the vote
/// and the committed index, and the state machine's snapshot file (`dir/state.snapshot`).
/// Must be called inside a tokio runtime.
pub fn open(dir: &std::path::Path) -> std::io::Result<(LogStore, StateMachineStore)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    let db = sled::Config::new()
        .path(dir.join("log"))
        .mode(sled::Mode::HighThroughput)
        // sled caches 1 GiB by default, all of it log entries no one reads again once applied
        // and replicated: per node that was most of the memory 100,000 SAs took.
        .cache_capacity(LOG_CACHE_BYTES)
        .open()
        .map_err(|e| {
            std::io::Error::other(format!("opening {}: {e}", dir.join("log").display()))
        })?;
    Ok((LogStore::open(&db)?, StateMachineStore::open(dir)?))
}
