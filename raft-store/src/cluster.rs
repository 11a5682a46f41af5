//! Replicated cluster records: the gateway node registry and the placement slot map.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, SLOT_COUNT, Slot};

/// A gateway node's role in the data plane (distinct from its Raft role).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes new SAs through its slots and processes the SAs it owns.
    Active,
    /// Keeps processing what it owns while its SAs move away; takes no new slots.
    Draining,
    /// Declared failed (or removed): owns nothing.
    Down,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        })
    }
}

/// A gateway node as the data plane sees it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Current state.
    pub state: NodeState,
    /// When (wall clock ms, chosen by the proposer) it entered that state.
    pub since_ms: u64,
}

/// Which node answers new SAs in each slot. `None` until a node is assigned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotMap {
    owners: Vec<Option<NodeId>>,
}

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            owners: vec![None; usize::from(SLOT_COUNT)],
        }
    }
}

impl SlotMap {
    /// The node that owns `slot`, if any.
    pub fn owner(&self, slot: Slot) -> Option<NodeId> {
        self.owners.get(usize::from(slot)).copied().flatten()
    }

    /// Every slot with its owner, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, Option<NodeId>)> + '_ {
        (0..SLOT_COUNT).zip(self.owners.iter().copied())
    }

    /// How many slots `node` owns.
    pub fn count_for(&self, node: NodeId) -> usize {
        self.owners.iter().filter(|o| **o == Some(node)).count()
    }

    pub(crate) fn set(&mut self, slot: Slot, node: Option<NodeId>) {
        if let Some(entry) = self.owners.get_mut(usize::from(slot)) {
            *entry = node;
        }
    }
}
