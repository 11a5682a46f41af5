//! The replicated state and its pure, deterministic transition function [`apply`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::{NodeRecord, NodeState, SlotMap};
use crate::command::{Applied, Command, OwnerMove, Rejection, Response, SaUpdate, SlotAssignment};
use crate::ids::{Epoch, NodeId, SLOT_COUNT, SaId};
use crate::sa::{ChildSa, IkeSa, MessageIds, StoredMessage};

/// Everything the cluster agrees on.
///
/// Invariant: `child_index` maps exactly the inbound SPIs of all children to their IKE SA.
/// Invariant: `addresses` maps exactly the `virtual_ip` of every SA that has one to that SA.
/// Invariant: a slot only ever points at a registered, active node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    sas: BTreeMap<SaId, IkeSa>,
    child_index: BTreeMap<u32, SaId>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    slots: SlotMap,
    addresses: BTreeMap<IpAddr, SaId>,
}

impl State {
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
    pub fn addresses(&self) -> &BTreeMap<IpAddr, SaId> {
        &self.addresses
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

    /// Checks the structural invariants listed on [`State`]; used by tests and on snapshot load.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut children = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        for (id, sa) in &self.sas {
            if sa.id != *id {
                return Err(format!("SA stored under {id} has id {}", sa.id));
            }
            if sa.epoch < Epoch::FIRST {
                return Err(format!("SA {id} has epoch {}", sa.epoch));
            }
            for (spi, child) in &sa.children {
                if child.in_spi != *spi {
                    return Err(format!(
                        "child stored under {spi:08x} has SPI {:08x}",
                        child.in_spi
                    ));
                }
                if children.insert(*spi, *id).is_some() {
                    return Err(format!("inbound SPI {spi:08x} used twice"));
                }
            }
            if let Some(addr) = sa.virtual_ip
                && addresses.insert(addr, *id).is_some()
            {
                return Err(format!("address {addr} held twice"));
            }
            if let Some(last) = &sa.last_response
                && last.msg_id.checked_add(1) != Some(sa.msg.next_peer_request)
            {
                return Err(format!(
                    "SA {id}: stored response is not for the last request"
                ));
            }
            if let Some(pending) = &sa.pending_request
                && pending.msg_id != sa.msg.next_local_request
            {
                return Err(format!("SA {id}: pending request has the wrong message ID"));
            }
        }
        if children != self.child_index {
            return Err("child index out of sync".into());
        }
        if addresses != self.addresses {
            return Err("address index out of sync".into());
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
        Command::ImportSa(sa) => import_sa(state, sa),
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
        } => {
            set_node_state(state, *node, *s, *at_ms);
            Ok(Applied::Done)
        }
        Command::AllocateAddress { sa, epoch, addr } => allocate_address(state, *sa, *epoch, *addr),
        Command::ReleaseAddress { addr } => release_address(state, *addr),
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

/// Invariant: a new SA starts in epoch 1 on the node that owns its slot, which is active.
fn create_sa(state: &mut State, sa: &IkeSa) -> Response {
    if sa.epoch != Epoch::FIRST {
        return Err(Rejection::BadInitialEpoch(sa.epoch));
    }
    if sa.slot >= SLOT_COUNT {
        return Err(Rejection::SlotOutOfRange(sa.slot));
    }
    let owner = state.slots.owner(sa.slot);
    if owner != Some(sa.owner) {
        return Err(Rejection::NotSlotOwner {
            slot: sa.slot,
            owner,
            claimed: sa.owner,
        });
    }
    insert_new_sa(state, sa)
}

/// An imported SA with owner 0 goes to whoever owns its slot when the command applies (the
/// leader's view, not a possibly stale follower's).
fn import_sa(state: &mut State, sa: &IkeSa) -> Response {
    if sa.epoch < Epoch::FIRST {
        return Err(Rejection::BadInitialEpoch(sa.epoch));
    }
    if sa.slot >= SLOT_COUNT {
        return Err(Rejection::SlotOutOfRange(sa.slot));
    }
    if sa.owner == 0 {
        let owner = state.slots.owner(sa.slot).ok_or(Rejection::NotSlotOwner {
            slot: sa.slot,
            owner: None,
            claimed: 0,
        })?;
        let mut placed = sa.clone();
        placed.owner = owner;
        return insert_new_sa(state, &placed);
    }
    insert_new_sa(state, sa)
}

/// Invariant: SA ids, inbound child SPIs and inner addresses are each unique in the cluster.
fn insert_new_sa(state: &mut State, sa: &IkeSa) -> Response {
    check_active(state, sa.owner)?;
    if state.sas.contains_key(&sa.id) {
        return Err(Rejection::SaExists(sa.id));
    }
    for (spi, child) in &sa.children {
        if child.in_spi != *spi {
            return Err(Rejection::UnknownChild {
                sa: sa.id,
                in_spi: child.in_spi,
            });
        }
        if let Some(by) = state.child_index.get(spi) {
            return Err(Rejection::ChildSpiInUse {
                in_spi: *spi,
                by: *by,
            });
        }
        check_lease_bounds(child, child.out_hwm)?;
    }
    if let Some(addr) = sa.virtual_ip
        && let Some(holder) = state.addresses.get(&addr)
    {
        return Err(Rejection::AddressInUse {
            addr,
            holder: *holder,
        });
    }
    if let Some(last) = &sa.last_response
        && last.msg_id.checked_add(1) != Some(sa.msg.next_peer_request)
    {
        return Err(Rejection::MessageIdGap {
            expected: sa.msg.next_peer_request.wrapping_sub(1),
            got: last.msg_id,
        });
    }
    if let Some(pending) = &sa.pending_request
        && pending.msg_id != sa.msg.next_local_request
    {
        return Err(Rejection::MessageIdGap {
            expected: sa.msg.next_local_request,
            got: pending.msg_id,
        });
    }
    for spi in sa.children.keys() {
        state.child_index.insert(*spi, sa.id);
    }
    if let Some(addr) = sa.virtual_ip {
        state.addresses.insert(addr, sa.id);
    }
    state.sas.insert(sa.id, sa.clone());
    Ok(Applied::Placed { owner: sa.owner })
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
/// accepted, so a command is all or nothing.
fn update_sa(state: &mut State, id: SaId, epoch: Epoch, updates: &[SaUpdate]) -> Response {
    if updates.is_empty() {
        return Err(Rejection::EmptyUpdate);
    }
    let current = state.sas.get(&id).ok_or(Rejection::UnknownSa(id))?;
    check_epoch(current, epoch)?;
    let mut sa = current.clone();
    let mut successor: Option<IkeSa> = None;
    for update in updates {
        apply_update(state, &mut sa, &mut successor, update)?;
    }

    // Everything was accepted: bring the indexes in line with the new children.
    let old_children: Vec<u32> = current.children.keys().copied().collect();
    for spi in old_children {
        state.child_index.remove(&spi);
    }
    for spi in sa.children.keys() {
        state.child_index.insert(*spi, id);
    }
    if let Some(new) = successor {
        for spi in new.children.keys() {
            state.child_index.insert(*spi, new.id);
        }
        if let Some(addr) = new.virtual_ip {
            state.addresses.insert(addr, new.id);
        }
        state.sas.insert(new.id, new);
    }
    state.sas.insert(id, sa);
    Ok(Applied::Done)
}

/// The inbound SPI is free in the cluster, or held by a child of this SA that this very update
/// has already deleted.
fn check_spi_free(state: &State, sa: &IkeSa, in_spi: u32) -> Result<(), Rejection> {
    if sa.children.contains_key(&in_spi) {
        return Err(Rejection::ChildSpiInUse { in_spi, by: sa.id });
    }
    match state.child_index.get(&in_spi) {
        Some(by) if *by != sa.id => Err(Rejection::ChildSpiInUse { in_spi, by: *by }),
        _ => Ok(()),
    }
}

/// Invariant: without ESN the lease stays within 32 bits (RFC 4303 §3.3.3: the counter must not
/// cycle); with ESN within 64 bits.
fn check_lease_bounds(child: &ChildSa, out_hwm: u64) -> Result<(), Rejection> {
    let max = if child.suite.esn {
        u64::MAX
    } else {
        u64::from(u32::MAX)
    };
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

fn apply_update(
    state: &State,
    sa: &mut IkeSa,
    successor: &mut Option<IkeSa>,
    update: &SaUpdate,
) -> Result<(), Rejection> {
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
            check_lease_bounds(child, child.out_hwm)?;
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
            check_lease_bounds(new, new.out_hwm)?;
            sa.children.insert(new.in_spi, (**new).clone());
        }
        SaUpdate::ChildDeleted { in_spi } => {
            child_mut(sa, *in_spi)?;
            sa.children.remove(in_spi);
        }
        SaUpdate::IkeRekeyed(new) => rekey_ike(state, sa, successor, new)?,
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

/// The successor inherits owner, epoch, slot, children and inner address; the old SA keeps its
/// message-ID state so its delete exchange can still run.
///
/// Invariant: the successor's rekey generation is higher and its id is new.
fn rekey_ike(
    state: &State,
    sa: &mut IkeSa,
    successor: &mut Option<IkeSa>,
    new: &IkeSa,
) -> Result<(), Rejection> {
    if successor.is_some() || new.id == sa.id || state.sas.contains_key(&new.id) {
        return Err(Rejection::SaExists(new.id));
    }
    if new.rekey_generation <= sa.rekey_generation {
        return Err(Rejection::RekeyGenerationRegression {
            current: sa.rekey_generation,
            proposed: new.rekey_generation,
        });
    }
    if !new.children.is_empty() {
        return Err(Rejection::RekeyWithChildren);
    }
    let mut new = new.clone();
    new.owner = sa.owner;
    new.epoch = sa.epoch;
    new.slot = sa.slot;
    new.children = std::mem::take(&mut sa.children);
    new.virtual_ip = sa.virtual_ip.take();
    *successor = Some(new);
    Ok(())
}

fn delete_sa(state: &mut State, id: SaId, epoch: Option<Epoch>) -> Response {
    let sa = state.sas.get(&id).ok_or(Rejection::UnknownSa(id))?;
    if let Some(epoch) = epoch {
        check_epoch(sa, epoch)?;
    }
    let sa = state.sas.remove(&id).ok_or(Rejection::UnknownSa(id))?;
    for spi in sa.children.keys() {
        state.child_index.remove(spi);
    }
    if let Some(addr) = sa.virtual_ip {
        state.addresses.remove(&addr);
    }
    Ok(Applied::Removed(Box::new(sa)))
}

/// Invariant: ownership only moves to an active node, and each move bumps the epoch by one.
/// Invariant: the new owner's range starts above everything the old owner could have used.
fn assign_owner(state: &mut State, m: &OwnerMove) -> Result<Epoch, Rejection> {
    check_active(state, m.to)?;
    let sa = state.sas.get_mut(&m.sa).ok_or(Rejection::UnknownSa(m.sa))?;
    check_epoch(sa, m.from_epoch)?;
    sa.owner = m.to;
    sa.epoch = sa.epoch.next();
    for child in sa.children.values_mut() {
        let max = if child.suite.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        // An exhausted counter stays exhausted (out_start > out_hwm): the child must be rekeyed.
        child.out_start = child.out_hwm.saturating_add(1);
        child.out_hwm = child.out_hwm.saturating_add(m.lease).min(max);
    }
    Ok(sa.epoch)
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
fn set_node_state(state: &mut State, node: NodeId, new_state: NodeState, at_ms: u64) {
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
}

fn allocate_address(state: &mut State, id: SaId, epoch: Epoch, addr: IpAddr) -> Response {
    let sa = state.sas.get(&id).ok_or(Rejection::UnknownSa(id))?;
    check_epoch(sa, epoch)?;
    if let Some(current) = sa.virtual_ip {
        return Err(Rejection::SaHasAddress {
            sa: id,
            addr: current,
        });
    }
    if let Some(holder) = state.addresses.get(&addr) {
        return Err(Rejection::AddressInUse {
            addr,
            holder: *holder,
        });
    }
    state.addresses.insert(addr, id);
    if let Some(sa) = state.sas.get_mut(&id) {
        sa.virtual_ip = Some(addr);
    }
    Ok(Applied::Done)
}

fn release_address(state: &mut State, addr: IpAddr) -> Response {
    let holder = state
        .addresses
        .remove(&addr)
        .ok_or(Rejection::AddressNotAllocated(addr))?;
    if let Some(sa) = state.sas.get_mut(&holder) {
        sa.virtual_ip = None;
    }
    Ok(Applied::Done)
}
