//! The replicated state and its pure, deterministic transition function [`apply`].
//!
//! `apply` keeps every invariant below for *every* command, including ones no code path
//! produces today: a follower replays whatever the leader committed, and one bad entry must
//! never leave a state that a snapshot could not hold (or a node could not restart from). Each
//! command is validated in full before anything changes; a refused command leaves the state
//! exactly as it was.

use std::collections::BTreeMap;

use imbl::{OrdMap, OrdSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::{NodeRecord, NodeState, SlotMap};
use crate::command::{
    Applied, BlobRef, Command, NodeAck, OwnerMove, Rejection, Reseal, Response, SaUpdate,
    SlotAssignment,
};
use crate::ids::{ClusterId, Epoch, NodeId, SLOT_COUNT, SaId};
use crate::keys::KeyRegistry;
use crate::limits::{self, max_seq};
use crate::sa::{ChildSa, Identity, IkeSa, MessageIds, Role, StoredMessage};
use crate::selectors::{AddrRange, SelectorIndex};
use crate::tombstones::Tombstones;

/// Everything the cluster agrees on.
///
/// Invariant: `child_index` maps exactly the inbound SPIs of all children to their IKE SA.
/// Invariant: `ike_spis` maps exactly every SA's id and its current local IKE SPI to that SA, so
/// no two SAs ever answer to the same SPI.
/// Invariant: `addresses` maps exactly the `virtual_ip` of every SA that has one to that SA.
/// Invariant: `peers` holds exactly every SA's id under its peer identity.
/// Invariant: `owners` holds exactly every SA's id under its owner.
/// Invariant: `selectors` indexes exactly every child's remote selectors, and no two peer
/// identities hold overlapping ranges.
/// Invariant: a slot only ever points at a registered, active node.
/// Invariant: no live SA or child has a tombstone.
/// Invariant: `keys` counts exactly the blobs of all SAs under each key, indexes exactly the SAs
/// with a blob under each key, and every keyed blob is under a live key (see [`KeyRegistry`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    cluster: Option<ClusterId>,
    // The per-SA maps are persistent (imbl): cloning the state for a snapshot is O(1) and
    // shares every record, so `build_snapshot` holds the lock `apply` needs for microseconds,
    // not for a copy of 100,000 records. They serialize exactly as a BTreeMap would.
    sas: OrdMap<SaId, IkeSa>,
    child_index: OrdMap<u32, SaId>,
    ike_spis: OrdMap<u64, SaId>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    slots: SlotMap,
    addresses: OrdMap<IpAddr, SaId>,
    peers: OrdMap<Identity, OrdSet<SaId>>,
    owners: OrdMap<NodeId, OrdSet<SaId>>,
    selectors: SelectorIndex,
    tombstones: Tombstones,
    acks: BTreeMap<NodeId, u64>,
    keys: KeyRegistry,
}

impl State {
    /// The cluster's identity, once the first leader committed it.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.cluster
    }

    /// An IKE SA by id.
    pub fn sa(&self, id: SaId) -> Option<&IkeSa> {
        self.sas.get(&id)
    }

    /// All IKE SAs in id order.
    pub fn sas(&self) -> impl Iterator<Item = &IkeSa> {
        self.sas.values()
    }

    /// IKE SAs from `start` (inclusive) in id order: for paging.
    pub fn sas_from(&self, start: SaId) -> impl Iterator<Item = &IkeSa> {
        self.sas.range(start..).map(|(_, sa)| sa)
    }

    /// Number of IKE SAs.
    pub fn sa_count(&self) -> usize {
        self.sas.len()
    }

    /// Number of child SAs.
    pub fn child_count(&self) -> usize {
        self.child_index.len()
    }

    /// A child SA by inbound SPI, with its IKE SA.
    pub fn child(&self, in_spi: u32) -> Option<(&IkeSa, &ChildSa)> {
        let sa = self.sas.get(self.child_index.get(&in_spi)?)?;
        Some((sa, sa.children.get(&in_spi)?))
    }

    /// The SA answering to IKE SPI `spi` (its id, or its current local SPI after a rekey).
    pub fn sa_by_ike_spi(&self, spi: u64) -> Option<SaId> {
        self.ike_spis.get(&spi).copied()
    }

    /// The gateway node registry.
    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeRecord> {
        &self.nodes
    }

    /// The placement slot map.
    pub fn slots(&self) -> &SlotMap {
        &self.slots
    }

    /// Which SA holds an inner address.
    pub fn address_holder(&self, addr: IpAddr) -> Option<SaId> {
        self.addresses.get(&addr).copied()
    }

    /// All allocated inner addresses.
    pub fn addresses(&self) -> &OrdMap<IpAddr, SaId> {
        &self.addresses
    }

    /// The SAs `node` owns, in id order: O(log n) plus those SAs.
    pub fn sas_owned_by(&self, node: NodeId) -> impl DoubleEndedIterator<Item = &IkeSa> {
        self.owners
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sas.get(id))
    }

    /// The SAs `node` owns with an id at or above `start`, in id order: O(log n) plus those
    /// SAs (an owner's page of an admin listing).
    pub fn sas_owned_by_from(
        &self,
        node: NodeId,
        start: SaId,
    ) -> impl DoubleEndedIterator<Item = &IkeSa> {
        self.owners
            .get(&node)
            .into_iter()
            .flat_map(move |ids| ids.range(start..))
            .filter_map(|id| self.sas.get(id))
    }

    /// How many SAs `node` owns. O(log nodes).
    pub fn owned_count(&self, node: NodeId) -> usize {
        self.owners.get(&node).map_or(0, OrdSet::len)
    }

    /// Every node that owns at least one SA (registered or not), with how many. O(nodes).
    pub fn owner_counts(&self) -> impl Iterator<Item = (NodeId, usize)> + '_ {
        self.owners.iter().map(|(node, ids)| (*node, ids.len()))
    }

    /// The SAs of the peer with identity `peer`, in id order: O(log n) plus that peer's SAs
    /// (what INITIAL_CONTACT, RFC 7296 §2.4, needs without walking every SA).
    pub fn sas_of_peer(&self, peer: &Identity) -> impl Iterator<Item = &IkeSa> {
        self.peers
            .get(peer)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sas.get(id))
    }

    /// Tombstones of deleted and exported SAs and children.
    pub fn tombstones(&self) -> &Tombstones {
        &self.tombstones
    }

    /// The log index up to which each node had acknowledged entries, as a leader recorded it:
    /// a node whose data directory ends below this lost entries it acknowledged.
    pub fn acknowledged(&self, node: NodeId) -> u64 {
        self.acks.get(&node).copied().unwrap_or(0)
    }

    /// The cluster keys: which is active, which are retired, and the blobs under each.
    pub fn keys(&self) -> &KeyRegistry {
        &self.keys
    }

    /// Every recorded acknowledgement, by node.
    pub fn acks(&self) -> &BTreeMap<NodeId, u64> {
        &self.acks
    }

    /// Whether remote selectors `ts` (of a peer with identity `holder`) would overlap another
    /// identity's, and whose: what the IKE gateway asks before it accepts a child's selectors.
    /// O(log n) plus the asking identity's own ranges.
    pub fn selector_conflict(
        &self,
        holder: &crate::sa::Identity,
        ts: &[crate::sa::TrafficSelector],
    ) -> Option<crate::sa::Identity> {
        ts.iter()
            .filter_map(AddrRange::of)
            .find_map(|range| self.selectors.conflict(&range, holder).cloned())
    }

    /// The canonical encoding of the state: equal states give equal bytes on every replica,
    /// because every collection is ordered.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// SHA-256 of [`State::canonical_bytes`], in hex: compare replicas at the same applied index.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_bytes()))
    }

    /// Checks every invariant listed on [`State`] and every record's own
    /// ([`IkeSa`] and [`ChildSa`] bounds, message-ID consistency, ranges), by recomputing each
    /// index from the records. Run on snapshot load and by the property tests after every
    /// command.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut rebuilt = State {
            cluster: self.cluster,
            nodes: self.nodes.clone(),
            slots: self.slots.clone(),
            tombstones: self.tombstones.clone(),
            acks: self.acks.clone(),
            keys: self.keys.without_counts(),
            ..State::default()
        };
        for (id, sa) in &self.sas {
            if sa.id != *id {
                return Err(format!("SA stored under {id} has id {}", sa.id));
            }
            validate_record(sa).map_err(|r| format!("SA {id}: {r}"))?;
            if self.tombstones.sa(*id).is_some() {
                return Err(format!("SA {id} is alive and has a tombstone"));
            }
            for spi in sa.children.keys() {
                if self.tombstones.spi(*spi).is_some() {
                    return Err(format!("child {spi:08x} is alive and has a tombstone"));
                }
            }
            // Ids are unique as the map's keys; the rebuilt indexes need no copy of the records
            // (copying 100,000 of them was most of what loading a snapshot cost).
            check_indexes_free(&rebuilt, sa).map_err(|r| format!("SA {id}: {r}"))?;
            index_sa(&mut rebuilt, sa);
        }
        if rebuilt.child_index != self.child_index {
            return Err("child index out of sync".into());
        }
        if rebuilt.ike_spis != self.ike_spis {
            return Err("IKE SPI index out of sync".into());
        }
        if rebuilt.addresses != self.addresses {
            return Err("address index out of sync".into());
        }
        if rebuilt.peers != self.peers {
            return Err("peer identity index out of sync".into());
        }
        if rebuilt.owners != self.owners {
            return Err("owner index out of sync".into());
        }
        if rebuilt.selectors != self.selectors {
            return Err("selector index out of sync".into());
        }
        self.keys.check(&rebuilt.keys)?;
        self.tombstones.check()?;
        if self.nodes.len() > limits::MAX_NODES || self.nodes.contains_key(&0) {
            return Err("node registry out of bounds".into());
        }
        for (slot, owner) in self.slots.iter() {
            if let Some(node) = owner
                && self.nodes.get(&node).map(|n| n.state) != Some(NodeState::Active)
            {
                return Err(format!(
                    "slot {slot} points at node {node}, which is not active"
                ));
            }
        }
        for node in self.acks.keys() {
            if !self.nodes.contains_key(node) {
                return Err(format!("acknowledgement recorded for unknown node {node}"));
            }
        }
        Ok(())
    }
}

/// Applies one command to the state. Pure and deterministic: it reads no clock, draws no
/// randomness and does no I/O, so every replica that applies the same log holds the same state.
///
/// A refused command leaves the state exactly as it was and says why; `apply` never panics.
pub fn apply(state: &mut State, command: &Command) -> Response {
    match command {
        Command::CreateSa(sa) => create_sa(state, sa),
        Command::ImportSa { sa, lease, now_ms } => import_sa(state, sa, *lease, *now_ms),
        Command::Update { sa, epoch, updates } => update_sa(state, *sa, *epoch, updates),
        Command::DeleteSa { sa, epoch } => delete_sa(state, *sa, *epoch),
        Command::AssignOwners(moves) => Ok(Applied::Moves(
            moves.iter().map(|m| assign_owner(state, m)).collect(),
        )),
        Command::SetSlots(assignments) => set_slots(state, assignments),
        Command::SetNodeState {
            node,
            state: s,
            at_ms,
        } => set_node_state(state, *node, *s, *at_ms),
        Command::SetClusterId(id) => set_cluster_id(state, *id),
        Command::RecordAcks(acks) => record_acks(state, acks),
        Command::ActivateKey { key, fingerprint } => state
            .keys
            .activate(*key, *fingerprint)
            .map(|()| Applied::Done),
        Command::ResealKeys(reseals) => reseal_keys(state, reseals),
        Command::RetireKey(key) => state.keys.retire(*key).map(|()| Applied::Done),
        Command::PruneTombstones { now_ms } => Ok(Applied::Pruned(
            state
                .tombstones
                .prune(*now_ms, limits::MAX_PRUNED_PER_COMMAND),
        )),
        Command::Batch(commands) => Ok(Applied::Batch(
            commands
                .iter()
                .map(|c| match c {
                    Command::Batch(_) => Err(Rejection::NestedBatch),
                    c => apply(state, c),
                })
                .collect(),
        )),
    }
}

fn too_large(what: &str, limit: usize) -> Rejection {
    Rejection::TooLarge {
        what: what.into(),
        limit: limit as u64,
    }
}

fn check_message(message: &StoredMessage) -> Result<(), Rejection> {
    if message.datagrams.len() > limits::MAX_DATAGRAMS_PER_MESSAGE {
        return Err(too_large(
            "datagrams in a stored message",
            limits::MAX_DATAGRAMS_PER_MESSAGE,
        ));
    }
    if message
        .datagrams
        .iter()
        .any(|d| d.len() > limits::MAX_DATAGRAM_BYTES)
    {
        return Err(too_large(
            "bytes in a stored datagram",
            limits::MAX_DATAGRAM_BYTES,
        ));
    }
    Ok(())
}

/// The record's own invariants, whatever state it goes into: bounded sizes, consistent message
/// IDs, well-formed selectors, counters inside the sequence space, and ranges that make sense.
///
/// Invariant: `1 <= out_start <= out_hwm + 1` and `out_hwm <= max_seq(esn)` for every child
/// (`out_start = out_hwm + 1` is an exhausted counter: the child must be rekeyed).
/// Invariant: an SA with an inner address has children whose remote selectors are exactly that
/// address.
fn validate_record(sa: &IkeSa) -> Result<(), Rejection> {
    if sa.epoch < Epoch::FIRST {
        return Err(Rejection::BadInitialEpoch(sa.epoch));
    }
    if sa.slot >= SLOT_COUNT {
        return Err(Rejection::SlotOutOfRange(sa.slot));
    }
    if sa.local_id.data.len() > limits::MAX_IDENTITY_BYTES
        || sa.peer_id.data.len() > limits::MAX_IDENTITY_BYTES
    {
        return Err(too_large(
            "bytes in an identity",
            limits::MAX_IDENTITY_BYTES,
        ));
    }
    if sa.keys.0.len() > limits::MAX_SEALED_BYTES {
        return Err(too_large("bytes of sealed keys", limits::MAX_SEALED_BYTES));
    }
    if local_spi(sa) == 0 {
        return Err(Rejection::ReservedSpi);
    }
    if let Some(last) = &sa.last_response {
        check_message(last)?;
        if last.msg_id.checked_add(1) != Some(sa.msg.next_peer_request) {
            return Err(Rejection::MessageIdGap {
                expected: sa.msg.next_peer_request.wrapping_sub(1),
                got: last.msg_id,
            });
        }
    }
    if let Some(pending) = &sa.pending_request {
        check_message(pending)?;
        if pending.msg_id != sa.msg.next_local_request {
            return Err(Rejection::MessageIdGap {
                expected: sa.msg.next_local_request,
                got: pending.msg_id,
            });
        }
    }
    if sa.children.len() > limits::MAX_CHILDREN_PER_SA {
        return Err(too_large(
            "child SAs under one IKE SA",
            limits::MAX_CHILDREN_PER_SA,
        ));
    }
    for (spi, child) in &sa.children {
        if child.in_spi != *spi {
            return Err(Rejection::UnknownChild {
                sa: sa.id,
                in_spi: child.in_spi,
            });
        }
        validate_child(sa, child)?;
    }
    Ok(())
}

fn validate_child(sa: &IkeSa, child: &ChildSa) -> Result<(), Rejection> {
    if child.in_spi == 0 {
        return Err(Rejection::ReservedSpi);
    }
    if child.keys.0.len() > limits::MAX_SEALED_BYTES {
        return Err(too_large("bytes of sealed keys", limits::MAX_SEALED_BYTES));
    }
    if child.ts_local.len() > limits::MAX_SELECTORS_PER_CHILD
        || child.ts_remote.len() > limits::MAX_SELECTORS_PER_CHILD
    {
        return Err(too_large(
            "traffic selectors on one side of a child SA",
            limits::MAX_SELECTORS_PER_CHILD,
        ));
    }
    for ts in child.ts_local.iter().chain(&child.ts_remote) {
        if AddrRange::of(ts).is_none() {
            return Err(Rejection::BadSelector {
                in_spi: child.in_spi,
            });
        }
    }
    if let Some(addr) = sa.virtual_ip
        && !child
            .ts_remote
            .iter()
            .filter_map(AddrRange::of)
            .all(|r| r.is_host(addr))
    {
        return Err(Rejection::SelectorOutsideAddress {
            in_spi: child.in_spi,
            addr,
        });
    }
    check_lease_bounds(child, child.out_hwm)?;
    if child.out_start == 0 || child.out_start > child.out_hwm.saturating_add(1) {
        return Err(Rejection::BadRange {
            in_spi: child.in_spi,
            out_start: child.out_start,
            out_hwm: child.out_hwm,
        });
    }
    Ok(())
}

/// Our own IKE SPI of the SA (the one this cluster chose).
fn local_spi(sa: &IkeSa) -> u64 {
    sa.local_spi()
}

impl IkeSa {
    /// Our own IKE SPI of the SA's current generation (the one this cluster chose): the SA id
    /// until the first IKE rekey, the new IKE SA's after each.
    pub fn local_spi(&self) -> u64 {
        match self.role {
            Role::Responder => self.spi_r,
            Role::Initiator => self.spi_i,
        }
    }
}

/// Invariant: a new SA starts in epoch 1 on the node that owns its slot, which is active, and
/// its id is the IKE SPI we chose.
fn create_sa(state: &mut State, sa: &IkeSa) -> Response {
    if sa.epoch != Epoch::FIRST {
        return Err(Rejection::BadInitialEpoch(sa.epoch));
    }
    if sa.slot >= SLOT_COUNT {
        return Err(Rejection::SlotOutOfRange(sa.slot));
    }
    if local_spi(sa) != sa.id.0 {
        return Err(Rejection::IdIsNotLocalSpi(sa.id));
    }
    let owner = state.slots.owner(sa.slot);
    if owner != Some(sa.owner) {
        return Err(Rejection::NotSlotOwner {
            slot: sa.slot,
            owner,
            claimed: sa.owner,
        });
    }
    if let Some(stone) = state.tombstones.sa(sa.id) {
        return Err(Rejection::SaTombstoned {
            sa: sa.id,
            epoch: stone.epoch,
        });
    }
    for spi in sa.children.keys() {
        check_spi_not_buried(state, *spi)?;
    }
    insert_new_sa(state, sa)
}

fn check_spi_not_buried(state: &State, spi: u32) -> Result<(), Rejection> {
    match state.tombstones.spi(spi) {
        Some(stone) => Err(Rejection::ChildSpiTombstoned {
            in_spi: spi,
            sa: stone.sa,
        }),
        None => Ok(()),
    }
}

/// An SA moved in from another cluster, or back into this one (the paper's transfer across
/// administrative domains).
///
/// Invariant: an imported child never starts at or below any number the context could have
/// used: every child starts at `max(out_hwm, its tombstone's out_hwm) + 1`, with a first lease
/// of `lease` in the same entry, like an owner move.
/// Invariant: an SA that was deleted or exported here comes back only from a context at least
/// as new as what this cluster last had of it: its epoch must not be below the tombstone's. The
/// import bumps the epoch, so the same context is imported here at most once (a second time it
/// is older than the SA's next tombstone).
/// Invariant: a context whose keys expired (by the proposer's clock, `now_ms`) is refused.
fn import_sa(state: &mut State, sa: &IkeSa, lease: u64, now_ms: u64) -> Response {
    validate_record(sa)?;
    if sa.epoch.0 > limits::MAX_IMPORTED_EPOCH {
        return Err(Rejection::EpochTooHigh(sa.epoch));
    }
    let expired = std::iter::once(sa.times.expire_at_ms)
        .chain(sa.children.values().map(|c| c.times.expire_at_ms))
        .find(|at| *at != 0 && *at <= now_ms);
    if let Some(at) = expired {
        return Err(Rejection::ContextExpired {
            sa: sa.id,
            expired_at_ms: at,
        });
    }
    if let Some(stone) = state.tombstones.sa(sa.id)
        && sa.epoch < stone.epoch
    {
        return Err(Rejection::StaleContext {
            sa: sa.id,
            context_epoch: sa.epoch,
            tombstone_epoch: stone.epoch,
        });
    }
    let mut placed = sa.clone();
    placed.epoch = sa
        .epoch
        .checked_next()
        .ok_or(Rejection::EpochExhausted(sa.id))?;
    if sa.owner == 0 {
        // Owner 0: whoever owns the slot when the command applies (the leader's view, not a
        // possibly stale follower's).
        placed.owner = state.slots.owner(sa.slot).ok_or(Rejection::NotSlotOwner {
            slot: sa.slot,
            owner: None,
            claimed: 0,
        })?;
    }
    for child in placed.children.values_mut() {
        let mut floor = child.out_hwm;
        if let Some(stone) = state.tombstones.spi(child.in_spi) {
            if stone.sa != sa.id {
                return Err(Rejection::ChildSpiTombstoned {
                    in_spi: child.in_spi,
                    sa: stone.sa,
                });
            }
            floor = floor.max(stone.out_hwm);
        }
        start_above(child, floor, lease);
    }
    let response = insert_new_sa(state, &placed)?;
    state
        .tombstones
        .revive(sa.id, placed.children.keys().copied());
    Ok(response)
}

/// Starts `child`'s range above `floor` with a lease of `lease` numbers. An exhausted counter
/// stays exhausted (`out_start > out_hwm`): the child must be rekeyed.
fn start_above(child: &mut ChildSa, floor: u64, lease: u64) {
    let max = max_seq(child.suite.esn);
    let floor = floor.min(max);
    child.out_start = floor + 1;
    child.out_hwm = floor.saturating_add(lease).min(max);
}

/// Whether `sa`'s ids, SPIs, address and selectors are free in `state`.
fn check_indexes_free(state: &State, sa: &IkeSa) -> Result<(), Rejection> {
    state.keys.check_record(sa)?;
    if state.sas.contains_key(&sa.id) {
        return Err(Rejection::SaExists(sa.id));
    }
    for spi in [sa.id.0, local_spi(sa)] {
        if let Some(by) = state.ike_spis.get(&spi) {
            return Err(Rejection::IkeSpiInUse { spi, by: *by });
        }
    }
    for spi in sa.children.keys() {
        if let Some(by) = state.child_index.get(spi) {
            return Err(Rejection::ChildSpiInUse {
                in_spi: *spi,
                by: *by,
            });
        }
    }
    if let Some(addr) = sa.virtual_ip
        && let Some(holder) = state.addresses.get(&addr)
    {
        return Err(Rejection::AddressInUse {
            addr,
            holder: *holder,
        });
    }
    for child in sa.children.values() {
        check_selectors_free(state, sa, child)?;
    }
    Ok(())
}

fn check_selectors_free(state: &State, sa: &IkeSa, child: &ChildSa) -> Result<(), Rejection> {
    match state.selector_conflict(&sa.peer_id, &child.ts_remote) {
        Some(holder) => Err(Rejection::SelectorOverlap {
            in_spi: child.in_spi,
            holder: holder.to_string(),
        }),
        None => Ok(()),
    }
}

fn index_child(state: &mut State, sa: &IkeSa, child: &ChildSa) {
    state.child_index.insert(child.in_spi, sa.id);
    for range in child.ts_remote.iter().filter_map(AddrRange::of) {
        state.selectors.add(&range, &sa.peer_id);
    }
}

fn unindex_child(state: &mut State, child: &ChildSa) {
    state.child_index.remove(&child.in_spi);
    for range in child.ts_remote.iter().filter_map(AddrRange::of) {
        state.selectors.remove(&range);
    }
}

/// Adds `sa` to every index (the caller checked they are free).
fn index_sa(state: &mut State, sa: &IkeSa) {
    state.keys.add(sa);
    state.ike_spis.insert(sa.id.0, sa.id);
    state.ike_spis.insert(local_spi(sa), sa.id);
    for child in sa.children.values() {
        index_child(state, sa, child);
    }
    state
        .peers
        .entry(sa.peer_id.clone())
        .or_default()
        .insert(sa.id);
    state.owners.entry(sa.owner).or_default().insert(sa.id);
    if let Some(addr) = sa.virtual_ip {
        state.addresses.insert(addr, sa.id);
    }
}

/// Invariant: SA ids, IKE SPIs, inbound child SPIs, inner addresses and (across identities)
/// remote selectors are each unique in the cluster.
fn insert_new_sa(state: &mut State, sa: &IkeSa) -> Response {
    validate_record(sa)?;
    check_active(state, sa.owner)?;
    check_indexes_free(state, sa)?;
    index_sa(state, sa);
    state.sas.insert(sa.id, sa.clone());
    Ok(Applied::Placed {
        owner: sa.owner,
        epoch: sa.epoch,
    })
}

fn check_active(state: &State, node: NodeId) -> Result<(), Rejection> {
    match state.nodes.get(&node) {
        None => Err(Rejection::UnknownNode(node)),
        Some(record) if record.state != NodeState::Active => Err(Rejection::NodeNotActive {
            node,
            state: record.state,
        }),
        Some(_) => Ok(()),
    }
}

/// Invariant: only the SA's current epoch may act for it.
fn check_epoch(sa: &IkeSa, given: Epoch) -> Result<(), Rejection> {
    if sa.epoch == given {
        Ok(())
    } else {
        Err(Rejection::StaleEpoch {
            sa: sa.id,
            current: sa.epoch,
            given,
        })
    }
}

/// Applies the owner's updates to a copy of the SA and stores it only if every update is
/// accepted and the result is a valid record, so a command is all or nothing.
fn update_sa(state: &mut State, id: SaId, epoch: Epoch, updates: &[SaUpdate]) -> Response {
    if updates.is_empty() {
        return Err(Rejection::EmptyUpdate);
    }
    let current = state.sas.get(&id).ok_or(Rejection::UnknownSa(id))?;
    check_epoch(current, epoch)?;
    let mut sa = current.clone();
    for update in updates {
        apply_update(state, &mut sa, update)?;
    }
    validate_record(&sa)?;
    let old_spi = local_spi(current);
    let new_spi = local_spi(&sa);
    if new_spi != old_spi
        && let Some(by) = state.ike_spis.get(&new_spi)
    {
        return Err(Rejection::IkeSpiInUse {
            spi: new_spi,
            by: *by,
        });
    }
    let removed: Vec<ChildSa> = current
        .children
        .values()
        .filter(|c| !sa.children.contains_key(&c.in_spi))
        .cloned()
        .collect();
    let added: Vec<u32> = sa
        .children
        .keys()
        .filter(|spi| !current.children.contains_key(spi))
        .copied()
        .collect();
    for spi in &added {
        check_selectors_free(state, &sa, &sa.children[spi])?;
    }
    state.keys.check_record(&sa)?;

    // Everything was accepted: bring the indexes in line.
    for child in &removed {
        unindex_child(state, child);
        state.tombstones.bury_child(&sa, child);
    }
    for spi in &added {
        index_child(state, &sa, &sa.children[spi]);
    }
    if new_spi != old_spi {
        if old_spi != id.0 {
            state.ike_spis.remove(&old_spi);
        }
        state.ike_spis.insert(new_spi, id);
    }
    // Uncount the old record before counting the new one: both may have blobs under one key.
    if let Some(old) = state.sas.get(&id) {
        state.keys.remove(old);
    }
    state.keys.add(&sa);
    state.sas.insert(id, sa);
    Ok(Applied::Done)
}

impl IkeSa {
    /// The record as `apply` would store it after `updates`, checked against the record's own
    /// invariants only (message IDs, leases, bounds, ranges — not the cluster-wide uniqueness of
    /// SPIs, addresses and selectors, which only the replicated state can judge). The IKE
    /// gateway uses it to know the record it is about to commit.
    pub fn with_updates(&self, updates: &[SaUpdate]) -> Result<IkeSa, Rejection> {
        if updates.is_empty() {
            return Err(Rejection::EmptyUpdate);
        }
        let alone = State::default();
        let mut sa = self.clone();
        for update in updates {
            apply_update(&alone, &mut sa, update)?;
        }
        validate_record(&sa)?;
        Ok(sa)
    }
}

/// A new child's inbound SPI: free in the cluster (not in use by any SA, this one included,
/// nor by a child created earlier in the same update) and never used by a deleted child
/// whose keys may still be alive.
fn check_spi_free(state: &State, sa: &IkeSa, in_spi: u32) -> Result<(), Rejection> {
    if sa.children.contains_key(&in_spi) {
        return Err(Rejection::ChildSpiInUse { in_spi, by: sa.id });
    }
    if let Some(by) = state.child_index.get(&in_spi) {
        return Err(Rejection::ChildSpiInUse { in_spi, by: *by });
    }
    check_spi_not_buried(state, in_spi)
}

/// Invariant: without ESN the lease stays within 32 bits (RFC 4303 §3.3.3: the counter must not
/// cycle); with ESN within 64 bits.
fn check_lease_bounds(child: &ChildSa, out_hwm: u64) -> Result<(), Rejection> {
    let max = max_seq(child.suite.esn);
    if out_hwm > max {
        Err(Rejection::HwmBeyondCounterSpace {
            proposed: out_hwm,
            max,
        })
    } else {
        Ok(())
    }
}

fn child_mut(sa: &mut IkeSa, in_spi: u32) -> Result<&mut ChildSa, Rejection> {
    let id = sa.id;
    sa.children
        .get_mut(&in_spi)
        .ok_or(Rejection::UnknownChild { sa: id, in_spi })
}

/// Invariant: message IDs only move forward, one at a time (window of one, RFC 7296 §2.3).
fn check_next_message_id(expected: u32, got: u32) -> Result<u32, Rejection> {
    match got.cmp(&expected) {
        std::cmp::Ordering::Less => Err(Rejection::MessageIdRegression { expected, got }),
        std::cmp::Ordering::Greater => Err(Rejection::MessageIdGap { expected, got }),
        std::cmp::Ordering::Equal => got.checked_add(1).ok_or(Rejection::MessageIdExhausted),
    }
}

fn apply_update(state: &State, sa: &mut IkeSa, update: &SaUpdate) -> Result<(), Rejection> {
    match update {
        SaUpdate::PeerRequestAnswered { msg_id, response } => {
            sa.msg.next_peer_request = check_next_message_id(sa.msg.next_peer_request, *msg_id)?;
            sa.last_response = Some(StoredMessage {
                msg_id: *msg_id,
                datagrams: response.clone(),
            });
        }
        SaUpdate::LocalRequestStarted(request) => {
            if let Some(pending) = &sa.pending_request {
                return Err(Rejection::RequestInFlight {
                    in_flight: pending.msg_id,
                });
            }
            check_next_message_id(sa.msg.next_local_request, request.msg_id)?;
            sa.pending_request = Some(request.clone());
        }
        SaUpdate::LocalRequestCompleted { msg_id } => {
            match &sa.pending_request {
                Some(pending) if pending.msg_id == *msg_id => {}
                _ => return Err(Rejection::NoRequestInFlight { msg_id: *msg_id }),
            }
            sa.msg.next_local_request = check_next_message_id(sa.msg.next_local_request, *msg_id)?;
            sa.pending_request = None;
        }
        SaUpdate::ChildCreated(child) => {
            check_spi_free(state, sa, child.in_spi)?;
            validate_child(sa, child)?;
            sa.children.insert(child.in_spi, (**child).clone());
        }
        SaUpdate::ChildRekeyed { old_in_spi, new } => {
            let old_generation = child_mut(sa, *old_in_spi)?.rekey_generation;
            if new.rekey_generation <= old_generation {
                return Err(Rejection::RekeyGenerationRegression {
                    current: old_generation,
                    proposed: new.rekey_generation,
                });
            }
            check_spi_free(state, sa, new.in_spi)?;
            validate_child(sa, new)?;
            sa.children.insert(new.in_spi, (**new).clone());
        }
        SaUpdate::ChildDeleted { in_spi } => {
            child_mut(sa, *in_spi)?;
            sa.children.remove(in_spi);
        }
        SaUpdate::IkeRekeyedInPlace {
            spi_i,
            spi_r,
            rekey_generation,
        } => {
            if *rekey_generation <= sa.rekey_generation {
                return Err(Rejection::RekeyGenerationRegression {
                    current: sa.rekey_generation,
                    proposed: *rekey_generation,
                });
            }
            sa.spi_i = *spi_i;
            sa.spi_r = *spi_r;
            sa.rekey_generation = *rekey_generation;
            sa.msg = MessageIds::default();
            sa.last_response = None;
            sa.pending_request = None;
        }
        SaUpdate::Times(times) => sa.times = *times,
        SaUpdate::Keys(keys) => sa.keys = keys.clone(),
        SaUpdate::Peer(peer) => sa.peer = *peer,
        SaUpdate::PeerSeen { at_ms } => {
            // Owners' clocks differ a little; keeping the maximum makes the field monotonic.
            sa.last_peer_activity_ms = sa.last_peer_activity_ms.max(*at_ms);
        }
        SaUpdate::SeqLease {
            in_spi,
            out_hwm,
            in_checkpoint,
        } => {
            let child = child_mut(sa, *in_spi)?;
            if *out_hwm <= child.out_hwm {
                return Err(Rejection::HwmRegression {
                    current: child.out_hwm,
                    proposed: *out_hwm,
                });
            }
            check_lease_bounds(child, *out_hwm)?;
            if let Some(checkpoint) = in_checkpoint {
                advance_checkpoint(child, *checkpoint)?;
            }
            child.out_hwm = *out_hwm;
        }
        SaUpdate::ReplayCheckpoint { in_spi, in_seq } => {
            advance_checkpoint(child_mut(sa, *in_spi)?, *in_seq)?;
        }
    }
    Ok(())
}

/// Invariant: the inbound replay checkpoint only grows.
fn advance_checkpoint(child: &mut ChildSa, checkpoint: u64) -> Result<(), Rejection> {
    if checkpoint < child.in_checkpoint {
        return Err(Rejection::CheckpointRegression {
            current: child.in_checkpoint,
            proposed: checkpoint,
        });
    }
    child.in_checkpoint = checkpoint;
    Ok(())
}

/// Invariant: a deleted SA leaves tombstones (its epoch, its children's SPIs and final marks)
/// until its keys expire.
fn delete_sa(state: &mut State, id: SaId, epoch: Option<Epoch>) -> Response {
    let sa = state.sas.get(&id).ok_or(Rejection::UnknownSa(id))?;
    if let Some(epoch) = epoch {
        check_epoch(sa, epoch)?;
    }
    let sa = state.sas.remove(&id).ok_or(Rejection::UnknownSa(id))?;
    for child in sa.children.values() {
        unindex_child(state, child);
    }
    state.ike_spis.remove(&sa.id.0);
    state.ike_spis.remove(&local_spi(&sa));
    if let Some(addr) = sa.virtual_ip {
        state.addresses.remove(&addr);
    }
    if let Some(ids) = state.peers.get_mut(&sa.peer_id) {
        ids.remove(&sa.id);
        if ids.is_empty() {
            state.peers.remove(&sa.peer_id);
        }
    }
    unindex_owner(state, sa.owner, sa.id);
    state.keys.remove(&sa);
    state.tombstones.bury_sa(&sa);
    Ok(Applied::Removed(Box::new(sa)))
}

/// Invariant: ownership only moves to an active node, and each move bumps the epoch by one
/// (never wrapping: an exhausted epoch refuses the move).
/// Invariant: the new owner's range starts above everything the old owner could have used.
fn assign_owner(state: &mut State, m: &OwnerMove) -> Result<Epoch, Rejection> {
    check_active(state, m.to)?;
    let sa = state.sas.get_mut(&m.sa).ok_or(Rejection::UnknownSa(m.sa))?;
    check_epoch(sa, m.from_epoch)?;
    let epoch = sa
        .epoch
        .checked_next()
        .ok_or(Rejection::EpochExhausted(m.sa))?;
    let from = std::mem::replace(&mut sa.owner, m.to);
    sa.epoch = epoch;
    for child in sa.children.values_mut() {
        let floor = child.out_hwm;
        start_above(child, floor, m.lease);
    }
    unindex_owner(state, from, m.sa);
    state.owners.entry(m.to).or_default().insert(m.sa);
    Ok(epoch)
}

fn unindex_owner(state: &mut State, owner: NodeId, id: SaId) {
    if let Some(ids) = state.owners.get_mut(&owner) {
        ids.remove(&id);
        if ids.is_empty() {
            state.owners.remove(&owner);
        }
    }
}

fn set_slots(state: &mut State, assignments: &[SlotAssignment]) -> Response {
    for a in assignments {
        if a.slot >= SLOT_COUNT {
            return Err(Rejection::SlotOutOfRange(a.slot));
        }
        if let Some(node) = a.node {
            check_active(state, node)?;
        }
    }
    for a in assignments {
        state.slots.set(a.slot, a.node);
    }
    Ok(Applied::Done)
}

/// A node that stops being active gives up its slots at once (they become unassigned), so a slot
/// never points at a node that must not take new SAs.
///
/// Invariant: node 0 is never registered and the registry stays within `MAX_NODES`.
fn set_node_state(state: &mut State, node: NodeId, new_state: NodeState, at_ms: u64) -> Response {
    if node == 0 {
        return Err(Rejection::UnknownNode(0));
    }
    if !state.nodes.contains_key(&node) && state.nodes.len() >= limits::MAX_NODES {
        return Err(too_large("registered nodes", limits::MAX_NODES));
    }
    state.nodes.insert(
        node,
        NodeRecord {
            state: new_state,
            since_ms: at_ms,
        },
    );
    if new_state != NodeState::Active {
        let held: Vec<_> = state
            .slots
            .iter()
            .filter(|(_, owner)| *owner == Some(node))
            .map(|(slot, _)| slot)
            .collect();
        for slot in held {
            state.slots.set(slot, None);
        }
    }
    Ok(Applied::Done)
}

/// Invariant: the cluster id is set once and never changes.
fn set_cluster_id(state: &mut State, id: ClusterId) -> Response {
    match state.cluster {
        None => {
            state.cluster = Some(id);
            Ok(Applied::Done)
        }
        Some(current) if current == id => Ok(Applied::Done),
        Some(current) => Err(Rejection::ClusterIdMismatch {
            current,
            proposed: id,
        }),
    }
}

/// Invariant: a node's recorded acknowledgement only grows, and only registered nodes have one.
fn record_acks(state: &mut State, acks: &[NodeAck]) -> Response {
    if let Some(ack) = acks.iter().find(|a| !state.nodes.contains_key(&a.node)) {
        return Err(Rejection::UnknownNode(ack.node));
    }
    for ack in acks {
        let entry = state.acks.entry(ack.node).or_default();
        *entry = (*entry).max(ack.index);
    }
    Ok(Applied::Done)
}

/// Replaces blobs with their resealed copies, each only if it is still exactly the blob the
/// resealer read (and the copy is bound to the blob's own generation, in an epoch not after
/// the SA's), so nothing an owner committed meanwhile is ever overwritten with older state.
///
/// Invariant: a resealed blob is under the active key; a malformed command is refused whole,
/// while a blob that changed or went since it was read is skipped (a race, not an error).
/// Invariant: the key counts and the index of SAs per key follow every replaced blob.
fn reseal_keys(state: &mut State, reseals: &[Reseal]) -> Response {
    if reseals.len() > limits::MAX_RESEALS_PER_COMMAND {
        return Err(too_large(
            "resealed blobs in one command",
            limits::MAX_RESEALS_PER_COMMAND,
        ));
    }
    let active = state.keys.active();
    for r in reseals {
        if r.sealed.0.len() > limits::MAX_SEALED_BYTES {
            return Err(too_large("bytes of sealed keys", limits::MAX_SEALED_BYTES));
        }
        let given = r.sealed.key_id();
        if given != Some(active) {
            return Err(Rejection::NotActiveKey { given, active });
        }
    }
    let (mut replaced, mut stale) = (0u32, 0u32);
    for r in reseals {
        let Some(sa) = state.sas.get_mut(&r.sa) else {
            stale += 1;
            continue;
        };
        let (current, generation) = match r.blob {
            BlobRef::Ike => (&sa.keys, sa.rekey_generation),
            BlobRef::Child(spi) => match sa.children.get(&spi) {
                Some(child) => (&child.keys, child.rekey_generation),
                None => {
                    stale += 1;
                    continue;
                }
            },
        };
        let fits = r
            .sealed
            .header()
            .is_some_and(|h| h.generation == generation && h.epoch <= sa.epoch);
        if !fits || <[u8; 32]>::from(Sha256::digest(&current.0)) != r.expect_sha256 {
            stale += 1;
            continue;
        }
        state.keys.remove(sa);
        match r.blob {
            BlobRef::Ike => sa.keys = r.sealed.clone(),
            BlobRef::Child(spi) => {
                if let Some(child) = sa.children.get_mut(&spi) {
                    child.keys = r.sealed.clone();
                }
            }
        }
        state.keys.add(sa);
        replaced += 1;
    }
    Ok(Applied::Resealed { replaced, stale })
}
