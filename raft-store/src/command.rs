//! Commands: every change to the replicated state, and the typed answers `apply` gives.
//!
//! A command carries everything `apply` needs — SPIs, times, owners, epochs — chosen by the
//! proposing node, so that applying it reads no clock and draws no randomness.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::NodeState;
use crate::ids::{ClusterId, Epoch, KeyId, NodeId, SaId, Slot};
use crate::keys::Fingerprint;
use crate::sa::{ChildSa, IkeSa, SaTimes, SealedKeys, StoredMessage};

/// A change to the replicated state: the payload of one Raft log entry.
///
/// The log format is forever: every variant here is produced by some node code path, and
/// `apply` keeps every invariant for every value of every variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A new IKE SA, just established by `sa.owner`, which must own `sa.slot` in the slot map.
    /// `sa.epoch` must be [`Epoch::FIRST`] and `sa.id` the IKE SPI we chose. Reserves
    /// `sa.virtual_ip` if set.
    CreateSa(Box<IkeSa>),
    /// An SA moved in from another cluster, or back into this one (the paper's transfer across
    /// administrative domains), as it was exported with `--remove`. The proposer picks its
    /// owner — or owner 0: the owner of `sa.slot` at apply time. `apply` bumps its epoch and
    /// starts every child above everything the context (or this cluster's tombstone of it)
    /// could have used, with a first lease of `lease` numbers.
    ImportSa {
        /// The SA as exported, with this cluster's slot and owner.
        sa: Box<IkeSa>,
        /// Sequence numbers granted to the new owner for each child.
        lease: u64,
        /// The proposer's wall clock (ms): a context whose keys expired before it is refused.
        now_ms: u64,
    },
    /// Changes the owner of an SA makes, applied atomically: all of them or none.
    Update {
        /// The SA.
        sa: SaId,
        /// The epoch the proposer owns the SA in.
        epoch: Epoch,
        /// The changes, in order.
        updates: Vec<SaUpdate>,
    },
    /// Remove an SA and its children, releasing its address and leaving tombstones. `epoch:
    /// None` is an operator's delete (or export), which needs no ownership.
    DeleteSa {
        /// The SA.
        sa: SaId,
        /// The owner's epoch, or `None` for an administrative delete.
        epoch: Option<Epoch>,
    },
    /// Give SAs new owners, each in epoch + 1. Each move stands alone: one stale move does not
    /// stop the others (the answer lists each result).
    AssignOwners(Vec<OwnerMove>),
    /// Point slots at nodes (or at nobody).
    SetSlots(Vec<SlotAssignment>),
    /// Record a gateway node's data-plane state.
    SetNodeState {
        /// The node.
        node: NodeId,
        /// Its new state.
        state: NodeState,
        /// Wall-clock ms chosen by the proposer.
        at_ms: u64,
    },
    /// The cluster's identity, drawn by the first leader. Set once; a different one is refused.
    SetClusterId(ClusterId),
    /// How far each node had acknowledged (made durable) the log, as the leader saw it. A node
    /// whose data directory ends below its recorded mark (a restored backup) refuses to start.
    RecordAcks(Vec<NodeAck>),
    /// Remove tombstones whose keys expired before `now_ms` (the leader's wall clock), a bounded
    /// number per command.
    PruneTombstones {
        /// The proposer's wall clock (ms).
        now_ms: u64,
    },
    /// Make `key` the cluster key new blobs are sealed under. The leader commits it only once
    /// every member has written the key to its keyring file. Blobs under older keys stay valid
    /// until they are resealed and their key is retired.
    ActivateKey {
        /// The new key's id: above every id the cluster used before.
        key: KeyId,
        /// Its fingerprint, so every node can check it holds the same key under that id.
        fingerprint: Fingerprint,
    },
    /// Replace sealed blobs with the same secrets sealed under the active key (the leader's
    /// resealer). Each replacement is a compare-and-swap: it applies only if the blob is still
    /// exactly the one the resealer read, so an owner's own update of the blob in the meantime
    /// always wins; the others are skipped, not refused.
    ResealKeys(Vec<Reseal>),
    /// Retire a key no blob is sealed under any more; its id is never used again, and every
    /// node deletes it from its keyring file.
    RetireKey(KeyId),
    /// Several commands in one log entry, applied in order; each stands alone. Batches do not
    /// nest.
    Batch(Vec<Command>),
}

/// Which blob of an SA record, part of [`Reseal`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRef {
    /// The IKE SA's sealed engine state (`IkeSa::keys`).
    Ike,
    /// A child's keys, by its inbound SPI.
    Child(u32),
}

/// One blob resealed under the active key, part of [`Command::ResealKeys`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reseal {
    /// The SA.
    pub sa: SaId,
    /// Which of its blobs.
    pub blob: BlobRef,
    /// SHA-256 of the blob as the resealer read it: the swap applies only if it is unchanged.
    pub expect_sha256: [u8; 32],
    /// The same secret sealed under the active key, for the same SA, child and generation.
    pub sealed: SealedKeys,
}

/// One node's acknowledged log index, part of [`Command::RecordAcks`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAck {
    /// The node.
    pub node: NodeId,
    /// The highest log index it had made durable (its matched index on the leader).
    pub index: u64,
}

/// One change to an IKE SA, part of [`Command::Update`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaUpdate {
    /// We answered the peer's request `msg_id` with `response`: commit before it is sent.
    /// Invariant: `msg_id` is exactly the next request expected from the peer.
    PeerRequestAnswered {
        /// The request's message ID.
        msg_id: u32,
        /// The exact response datagrams.
        response: Vec<Vec<u8>>,
    },
    /// We start a request of our own (DPD, rekey, delete): commit before it is sent.
    /// Invariant: `msg_id` is our next request ID and no other request is in flight.
    LocalRequestStarted(StoredMessage),
    /// The peer answered our request `msg_id`; the next request uses `msg_id + 1`.
    LocalRequestCompleted {
        /// The request's message ID.
        msg_id: u32,
    },
    /// A new child SA (CREATE_CHILD_SA or the first one from IKE_AUTH).
    ChildCreated(Box<ChildSa>),
    /// Child `old_in_spi` was rekeyed into `new`. The old child stays until deleted.
    /// Invariant: `new.rekey_generation > old.rekey_generation`.
    ChildRekeyed {
        /// The child that was rekeyed.
        old_in_spi: u32,
        /// Its successor.
        new: Box<ChildSa>,
    },
    /// A child SA was deleted.
    ChildDeleted {
        /// The child's inbound SPI.
        in_spi: u32,
    },
    /// The IKE SA was rekeyed (RFC 7296 §2.8) and this record follows the new IKE SA *in
    /// place*: id, owner, epoch, slot, children (and their sealed keys, leases and checkpoints)
    /// and inner address stay as they are, so the data plane keeps running the children
    /// untouched; the SPIs become the new IKE SA's and its message IDs start again at 0 (no
    /// stored response, no request in flight). The replaced IKE SA lives on only in the owner's
    /// sealed engine state (`keys`) until its delete exchange.
    /// Invariant: `rekey_generation` grows, and the new local SPI is not another SA's.
    IkeRekeyedInPlace {
        /// The new IKE SA's initiator SPI.
        spi_i: u64,
        /// The new IKE SA's responder SPI.
        spi_r: u64,
        /// The IKE SA lineage's new rekey generation.
        rekey_generation: u32,
    },
    /// New lifetimes (after a rekey, or from configuration).
    Times(SaTimes),
    /// The IKE SA's sealed keys and engine state changed (a rekey, a new pending exchange).
    Keys(SealedKeys),
    /// The peer's address or port changed (NAT rebinding, MOBIKE).
    Peer(std::net::SocketAddr),
    /// We heard from the peer (authenticated) at this time.
    PeerSeen {
        /// Wall-clock ms.
        at_ms: u64,
    },
    /// A sequence-number lease for a child, optionally with an inbound checkpoint.
    /// Invariant: `out_hwm` only grows, and stays within the counter space (32 bits without
    /// ESN, RFC 4303 §3.3.3).
    SeqLease {
        /// The child's inbound SPI.
        in_spi: u32,
        /// The new outbound high-water mark.
        out_hwm: u64,
        /// Highest authenticated inbound sequence number, if it moved.
        in_checkpoint: Option<u64>,
    },
    /// Highest authenticated inbound sequence number of a child. Invariant: only grows.
    ReplayCheckpoint {
        /// The child's inbound SPI.
        in_spi: u32,
        /// The checkpoint.
        in_seq: u64,
    },
}

impl Command {
    /// Whether applying this command can change what a data plane runs: which node owns which
    /// SA (and in which epoch), the child SAs, their keys, peers and leases. IKE bookkeeping —
    /// message IDs and stored datagrams, times, the IKE SA's own sealed state, replay
    /// checkpoints, slots, addresses — cannot. The owner runtime rescans the state only after
    /// commands for which this is true, so a steady stream of IKE exchanges does not make
    /// every node walk every SA (conservative: unknown means true).
    pub fn may_change_data_plane(&self) -> bool {
        match self {
            Command::Update { updates, .. } => updates.iter().any(|u| {
                !matches!(
                    u,
                    SaUpdate::PeerRequestAnswered { .. }
                        | SaUpdate::LocalRequestStarted(_)
                        | SaUpdate::LocalRequestCompleted { .. }
                        | SaUpdate::Times(_)
                        | SaUpdate::Keys(_)
                        | SaUpdate::PeerSeen { .. }
                        | SaUpdate::ReplayCheckpoint { .. }
                )
            }),
            // A resealed blob holds the same keys: nothing a data plane runs changes.
            Command::SetSlots(_)
            | Command::SetClusterId(_)
            | Command::RecordAcks(_)
            | Command::PruneTombstones { .. }
            | Command::ActivateKey { .. }
            | Command::ResealKeys(_)
            | Command::RetireKey(_) => false,
            Command::Batch(commands) => commands.iter().any(Command::may_change_data_plane),
            _ => true,
        }
    }
}

/// Move one SA to a new owner, fenced by the epoch the proposer saw.
///
/// Each child's range restarts above the old owner's mark: `out_start = out_hwm + 1`, and the
/// new owner gets a first lease of `lease` sequence numbers in the same entry, so it can send at
/// once without another commit.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerMove {
    /// The SA.
    pub sa: SaId,
    /// The SA's epoch when the proposer decided the move.
    pub from_epoch: Epoch,
    /// The new owner.
    pub to: NodeId,
    /// Sequence numbers granted to the new owner for each child.
    pub lease: u64,
    /// A planned move (drain, rebalance, transfer): the old owner is alive and hands the SA
    /// over — its successor holds the SA's packets until the old owner's final state arrives
    /// (node to node), so nothing is lost or sent twice. A takeover from a failed node is not.
    /// `apply` treats both alike: the ranges alone keep every sequence number unique.
    pub handover: bool,
}

/// Point one slot at a node (or at nobody).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAssignment {
    /// The slot.
    pub slot: Slot,
    /// Its new owner.
    pub node: Option<NodeId>,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::CreateSa(sa) => write!(f, "create-sa {} owner {}", sa.id, sa.owner),
            Command::ImportSa { sa, .. } => write!(f, "import-sa {} owner {}", sa.id, sa.owner),
            Command::Update { sa, epoch, updates } => {
                write!(f, "update {sa}@{epoch} ({} changes)", updates.len())
            }
            Command::DeleteSa { sa, .. } => write!(f, "delete-sa {sa}"),
            Command::AssignOwners(moves) => write!(f, "assign-owners ({} moves)", moves.len()),
            Command::SetSlots(slots) => write!(f, "set-slots ({} slots)", slots.len()),
            Command::SetNodeState { node, state, .. } => write!(f, "node {node} {state}"),
            Command::SetClusterId(id) => write!(f, "cluster-id {id}"),
            Command::RecordAcks(acks) => write!(f, "record-acks ({} nodes)", acks.len()),
            Command::PruneTombstones { now_ms } => write!(f, "prune-tombstones at {now_ms}"),
            Command::ActivateKey { key, .. } => write!(f, "activate-key {key}"),
            Command::ResealKeys(reseals) => write!(f, "reseal-keys ({} blobs)", reseals.len()),
            Command::RetireKey(key) => write!(f, "retire-key {key}"),
            Command::Batch(commands) => write!(f, "batch ({} commands)", commands.len()),
        }
    }
}

/// What an accepted command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Done; nothing more to report.
    Done,
    /// A new or imported SA was stored.
    Placed {
        /// The owner.
        owner: NodeId,
        /// Its epoch (1 for a new SA; one above the context's for an import).
        epoch: Epoch,
    },
    /// The SA as it was when this command removed it (an export that fences the SA reads it
    /// here, at its exact place in the log, so no later lease can be missed).
    Removed(Box<IkeSa>),
    /// Owner moves: for each move in order, the new epoch or why it was refused.
    Moves(Vec<Result<Epoch, Rejection>>),
    /// Tombstones removed.
    Pruned(usize),
    /// A batch: each command's answer in order.
    Batch(Vec<Response>),
    /// Blobs resealed, and those skipped because they changed (or went) since they were read.
    Resealed {
        /// Blobs replaced.
        replaced: u32,
        /// Blobs skipped.
        stale: u32,
    },
}

/// The answer to a command: `apply` never panics on a bad command, it refuses it with a reason.
pub type Response = Result<Applied, Rejection>;

/// Why `apply` refused a command. The state is unchanged when a command is refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// No such IKE SA.
    #[error("no IKE SA {0}")]
    UnknownSa(SaId),
    /// An IKE SA with this id already exists.
    #[error("IKE SA {0} already exists")]
    SaExists(SaId),
    /// No such child SA under this IKE SA.
    #[error("IKE SA {sa} has no child SA with inbound SPI {in_spi:08x}")]
    UnknownChild {
        /// The IKE SA.
        sa: SaId,
        /// The inbound SPI asked for.
        in_spi: u32,
    },
    /// Inbound child SPIs are unique in the cluster.
    #[error("inbound SPI {in_spi:08x} is already used by IKE SA {by}")]
    ChildSpiInUse {
        /// The SPI.
        in_spi: u32,
        /// The SA using it.
        by: SaId,
    },
    /// The proposer acted in an epoch that is not the SA's current one (it was fenced off).
    #[error("IKE SA {sa} is in epoch {current}, command was for epoch {given}")]
    StaleEpoch {
        /// The SA.
        sa: SaId,
        /// Its current epoch.
        current: Epoch,
        /// The epoch in the command.
        given: Epoch,
    },
    /// A new SA must start in epoch 1.
    #[error("a new IKE SA must start in epoch 1, not {0}")]
    BadInitialEpoch(Epoch),
    /// A message ID older than expected: message IDs only move forward.
    #[error("message ID {got} is behind the expected {expected}")]
    MessageIdRegression {
        /// The expected message ID.
        expected: u32,
        /// The one in the command.
        got: u32,
    },
    /// A message ID beyond the window of one.
    #[error("message ID {got} skips ahead of the expected {expected}")]
    MessageIdGap {
        /// The expected message ID.
        expected: u32,
        /// The one in the command.
        got: u32,
    },
    /// The message-ID space is used up (RFC 7296 §2.2: the SA must be rekeyed instead).
    #[error("message IDs are exhausted; the IKE SA must be rekeyed")]
    MessageIdExhausted,
    /// A local request is already in flight (window of one).
    #[error("request {in_flight} is still in flight")]
    RequestInFlight {
        /// Its message ID.
        in_flight: u32,
    },
    /// No local request with this message ID is in flight.
    #[error("no request {msg_id} is in flight")]
    NoRequestInFlight {
        /// The message ID in the command.
        msg_id: u32,
    },
    /// `out_hwm` only grows.
    #[error("out_hwm {proposed} does not exceed the committed {current}")]
    HwmRegression {
        /// The committed mark.
        current: u64,
        /// The proposed mark.
        proposed: u64,
    },
    /// The lease would reach past the counter space (2^32 - 1 without ESN, RFC 4303 §3.3.3).
    #[error("out_hwm {proposed} is beyond the sequence space (max {max})")]
    HwmBeyondCounterSpace {
        /// The proposed mark.
        proposed: u64,
        /// The largest allowed.
        max: u64,
    },
    /// The inbound replay checkpoint only grows.
    #[error("replay checkpoint {proposed} is behind the committed {current}")]
    CheckpointRegression {
        /// The committed checkpoint.
        current: u64,
        /// The proposed one.
        proposed: u64,
    },
    /// Rekey generations only grow.
    #[error("rekey generation {proposed} does not exceed {current}")]
    RekeyGenerationRegression {
        /// The generation being replaced.
        current: u32,
        /// The proposed one.
        proposed: u32,
    },
    /// An inner address is never given to two SAs.
    #[error("address {addr} is already allocated to IKE SA {holder}")]
    AddressInUse {
        /// The address.
        addr: IpAddr,
        /// The SA that has it.
        holder: SaId,
    },
    /// A slot number at or beyond [`crate::SLOT_COUNT`].
    #[error("slot {0} is out of range")]
    SlotOutOfRange(Slot),
    /// A new SA was created by a node that does not own its slot (the slot moved meanwhile).
    #[error("slot {slot} belongs to {owner:?}, not to node {claimed}")]
    NotSlotOwner {
        /// The slot.
        slot: Slot,
        /// Its owner.
        owner: Option<NodeId>,
        /// The node that claimed it.
        claimed: NodeId,
    },
    /// A node that is not in the registry.
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    /// Slots and SAs only go to active nodes.
    #[error("node {node} is {state}, not active")]
    NodeNotActive {
        /// The node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// Batches do not nest.
    #[error("a batch cannot contain a batch")]
    NestedBatch,
    /// An update list must not be empty.
    #[error("an update must change something")]
    EmptyUpdate,
    /// A command carries more than `apply` accepts (see `limits`).
    #[error("too many {what} (at most {limit})")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// SPI 0 is reserved (RFC 7296 §3.1 for IKE, RFC 4303 §2.1 for ESP).
    #[error("SPI 0 is reserved")]
    ReservedSpi,
    /// A new SA's id must be the IKE SPI this cluster chose for it.
    #[error("IKE SA {0}: the id is not the SA's local IKE SPI")]
    IdIsNotLocalSpi(SaId),
    /// Another SA already answers to this IKE SPI.
    #[error("IKE SPI {spi:016x} is already used by IKE SA {by}")]
    IkeSpiInUse {
        /// The SPI.
        spi: u64,
        /// The SA using it.
        by: SaId,
    },
    /// The SA was deleted or exported here; only an import of a context at least as new may
    /// bring it back.
    #[error("IKE SA {sa} was deleted or exported (in epoch {epoch}); it cannot be created again")]
    SaTombstoned {
        /// The SA.
        sa: SaId,
        /// Its epoch when it was deleted.
        epoch: Epoch,
    },
    /// The inbound SPI belonged to a deleted child whose keys may still be alive.
    #[error("inbound SPI {in_spi:08x} belonged to a deleted child of IKE SA {sa}")]
    ChildSpiTombstoned {
        /// The SPI.
        in_spi: u32,
        /// The SA it belonged to.
        sa: SaId,
    },
    /// An import of a context older than what this cluster last had of the SA: it was
    /// imported here before, or an export older than one already used.
    #[error(
        "IKE SA {sa}: the context is from epoch {context_epoch}, but this cluster deleted or \
         exported the SA in epoch {tombstone_epoch}; it was imported before or is older than \
         one already used, and importing it would send sequence numbers again"
    )]
    StaleContext {
        /// The SA.
        sa: SaId,
        /// The context's epoch.
        context_epoch: Epoch,
        /// The tombstone's epoch.
        tombstone_epoch: Epoch,
    },
    /// The context's keys expired: no peer accepts them any more, and nothing may be sent
    /// under them again.
    #[error("IKE SA {sa}: the context's keys expired at {expired_at_ms} ms")]
    ContextExpired {
        /// The SA.
        sa: SaId,
        /// When its (earliest) lifetime ended.
        expired_at_ms: u64,
    },
    /// An imported epoch so high it could only exhaust the epoch space.
    #[error("epoch {0} is beyond any real SA's history")]
    EpochTooHigh(Epoch),
    /// The SA's epoch cannot grow any more.
    #[error("IKE SA {0} has used up its epochs")]
    EpochExhausted(SaId),
    /// A selector with ends of different families or reversed bounds.
    #[error("child {in_spi:08x} has a malformed traffic selector")]
    BadSelector {
        /// The child.
        in_spi: u32,
    },
    /// The child's remote selectors overlap another peer's: one user would get another's
    /// traffic.
    #[error("child {in_spi:08x}: its remote selectors overlap those of peer {holder}")]
    SelectorOverlap {
        /// The child.
        in_spi: u32,
        /// The identity holding them.
        holder: String,
    },
    /// An SA with an inner address must narrow its children's remote selectors to it.
    #[error("child {in_spi:08x}: remote selectors go beyond the inner address {addr}")]
    SelectorOutsideAddress {
        /// The child.
        in_spi: u32,
        /// The SA's inner address.
        addr: IpAddr,
    },
    /// A sequence-number range that cannot be: `out_start` must be in `1..=out_hwm + 1`.
    #[error("child {in_spi:08x}: range {out_start}..={out_hwm} is not valid")]
    BadRange {
        /// The child.
        in_spi: u32,
        /// First number of the range.
        out_start: u64,
        /// The mark.
        out_hwm: u64,
    },
    /// A blob names a key the cluster never activated.
    #[error("cluster key {0} was never activated in this cluster")]
    UnknownKey(KeyId),
    /// A blob names a retired key: no node holds it any more.
    #[error("cluster key {0} is retired")]
    KeyRetired(KeyId),
    /// A new key's id must be above every id used before.
    #[error("cluster key id {key} is not new (the highest used is {highest})")]
    KeyIdNotNew {
        /// The proposed id.
        key: KeyId,
        /// The highest id used so far.
        highest: KeyId,
    },
    /// The active key cannot be retired.
    #[error("cluster key {0} is the active key and cannot be retired")]
    KeyIsActive(KeyId),
    /// A key with blobs still under it cannot be retired.
    #[error("cluster key {key} still seals {blobs} blobs and cannot be retired")]
    KeyInUse {
        /// The key.
        key: KeyId,
        /// Blobs still under it.
        blobs: u64,
    },
    /// A resealed blob must be sealed under the active key.
    #[error("a resealed blob must be under the active key {active}, not {given:?}")]
    NotActiveKey {
        /// The key the blob names, if any.
        given: Option<KeyId>,
        /// The active key.
        active: KeyId,
    },
    /// The cluster id is set once.
    #[error("this cluster is {current}, not {proposed}")]
    ClusterIdMismatch {
        /// The committed id.
        current: ClusterId,
        /// The proposed one.
        proposed: ClusterId,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(updates: Vec<SaUpdate>) -> Command {
        Command::Update {
            sa: SaId(7),
            epoch: Epoch::FIRST,
            updates,
        }
    }

    #[test]
    fn ike_bookkeeping_does_not_change_the_data_plane() {
        let exchange = update(vec![
            SaUpdate::PeerRequestAnswered {
                msg_id: 3,
                response: vec![vec![0; 80]],
            },
            SaUpdate::PeerSeen { at_ms: 1 },
            SaUpdate::ReplayCheckpoint {
                in_spi: 9,
                in_seq: 100,
            },
        ]);
        assert!(!exchange.may_change_data_plane());
        // A resealed blob holds the same keys; key activation and retirement change no owner.
        for keys in [
            Command::ActivateKey {
                key: KeyId(2),
                fingerprint: [0; 16],
            },
            Command::ResealKeys(vec![]),
            Command::RetireKey(KeyId(1)),
        ] {
            assert!(!keys.may_change_data_plane(), "{keys}");
        }
        assert!(
            !Command::Batch(vec![exchange.clone(), Command::SetSlots(vec![])])
                .may_change_data_plane()
        );
    }

    #[test]
    fn owners_children_and_leases_change_the_data_plane() {
        let lease = update(vec![SaUpdate::SeqLease {
            in_spi: 9,
            out_hwm: 4096,
            in_checkpoint: None,
        }]);
        assert!(lease.may_change_data_plane());
        let mixed = update(vec![
            SaUpdate::PeerSeen { at_ms: 1 },
            SaUpdate::ChildDeleted { in_spi: 9 },
        ]);
        assert!(mixed.may_change_data_plane());
        let moved = Command::AssignOwners(vec![OwnerMove {
            sa: SaId(7),
            from_epoch: Epoch::FIRST,
            to: 2,
            lease: 1024,
            handover: false,
        }]);
        assert!(moved.may_change_data_plane());
        assert!(Command::Batch(vec![Command::SetSlots(vec![]), moved]).may_change_data_plane());
        assert!(
            Command::DeleteSa {
                sa: SaId(7),
                epoch: None
            }
            .may_change_data_plane()
        );
    }
}
