//! Commands: every change to the replicated state, and the typed answers `apply` gives.
//!
//! A command carries everything `apply` needs — SPIs, times, owners, epochs — chosen by the
//! proposing node, so that applying it reads no clock and draws no randomness.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::NodeState;
use crate::ids::{Epoch, NodeId, SaId, Slot};
use crate::sa::{ChildSa, IkeSa, SaTimes, SealedKeys, StoredMessage};

/// A change to the replicated state: the payload of one Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A new IKE SA, just established by `sa.owner`, which must own `sa.slot` in the slot map.
    /// `sa.epoch` must be [`Epoch::FIRST`]. Reserves `sa.virtual_ip` if set.
    CreateSa(Box<IkeSa>),
    /// An SA moved in from another cluster (transfer across administrative domains). The
    /// proposer picks its epoch and owner — or owner 0: the owner of `sa.slot` at apply time.
    ImportSa(Box<IkeSa>),
    /// Changes the owner of an SA makes, applied atomically: all of them or none.
    Update {
        /// The SA.
        sa: SaId,
        /// The epoch the proposer owns the SA in.
        epoch: Epoch,
        /// The changes, in order.
        updates: Vec<SaUpdate>,
    },
    /// Remove an SA and its children, releasing its address. `epoch: None` is an operator's
    /// delete, which needs no ownership.
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
    /// Reserve an inner address for an existing SA.
    AllocateAddress {
        /// The SA.
        sa: SaId,
        /// The owner's epoch.
        epoch: Epoch,
        /// The address.
        addr: IpAddr,
    },
    /// Free an inner address (operator action, or an SA that no longer needs it).
    ReleaseAddress {
        /// The address.
        addr: IpAddr,
    },
    /// Several commands in one log entry, applied in order; each stands alone. Batches do not
    /// nest.
    Batch(Vec<Command>),
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
    /// The IKE SA was rekeyed (RFC 7296 §2.8): `new` takes over every child and continues with
    /// fresh message IDs. The old SA stays (childless) until its own delete exchange.
    /// Invariant: `new.rekey_generation > old.rekey_generation`; `new.id` is unused.
    IkeRekeyed(Box<IkeSa>),
    /// The IKE SA was rekeyed (RFC 7296 §2.8) and this record follows the new IKE SA *in
    /// place*: id, owner, epoch, slot, children (and their sealed keys, leases and checkpoints)
    /// and inner address stay as they are, so the data plane keeps running the children
    /// untouched; the SPIs become the new IKE SA's and its message IDs start again at 0 (no
    /// stored response, no request in flight). The replaced IKE SA lives on only in the owner's
    /// sealed engine state (`keys`) until its delete exchange. The IKE gateway uses this rather
    /// than [`SaUpdate::IkeRekeyed`], whose new record would move the children to another SA id.
    /// Invariant: `rekey_generation` grows.
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
            Command::SetSlots(_)
            | Command::AllocateAddress { .. }
            | Command::ReleaseAddress { .. } => false,
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
            Command::ImportSa(sa) => write!(f, "import-sa {} owner {}", sa.id, sa.owner),
            Command::Update { sa, epoch, updates } => {
                write!(f, "update {sa}@{epoch} ({} changes)", updates.len())
            }
            Command::DeleteSa { sa, .. } => write!(f, "delete-sa {sa}"),
            Command::AssignOwners(moves) => write!(f, "assign-owners ({} moves)", moves.len()),
            Command::SetSlots(slots) => write!(f, "set-slots ({} slots)", slots.len()),
            Command::SetNodeState { node, state, .. } => write!(f, "node {node} {state}"),
            Command::AllocateAddress { sa, addr, .. } => write!(f, "allocate {addr} to {sa}"),
            Command::ReleaseAddress { addr } => write!(f, "release {addr}"),
            Command::Batch(commands) => write!(f, "batch ({} commands)", commands.len()),
        }
    }
}

/// What an accepted command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Done; nothing more to report.
    Done,
    /// A new or imported SA was stored, owned by this node.
    Placed {
        /// The owner.
        owner: NodeId,
    },
    /// The SA as it was when this command removed it (an export that fences the SA reads it
    /// here, at its exact place in the log, so no later lease can be missed).
    Removed(Box<IkeSa>),
    /// Owner moves: for each move in order, the new epoch or why it was refused.
    Moves(Vec<Result<Epoch, Rejection>>),
    /// A batch: each command's answer in order.
    Batch(Vec<Response>),
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
    /// The IKE SA's children move with it; a rekeyed SA must not bring its own.
    #[error("the rekeyed IKE SA must not carry children of its own")]
    RekeyWithChildren,
    /// An inner address is never given to two SAs.
    #[error("address {addr} is already allocated to IKE SA {holder}")]
    AddressInUse {
        /// The address.
        addr: IpAddr,
        /// The SA that has it.
        holder: SaId,
    },
    /// Releasing an address nobody holds.
    #[error("address {0} is not allocated")]
    AddressNotAllocated(IpAddr),
    /// The SA already has an inner address.
    #[error("IKE SA {sa} already has address {addr}")]
    SaHasAddress {
        /// The SA.
        sa: SaId,
        /// Its address.
        addr: IpAddr,
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
