//! Slot placement: spreading the slot map evenly over the active nodes with as few moves as
//! possible. Pure functions; the leader's reconciler proposes what they plan.

use std::collections::BTreeMap;

use evpc_raft_store::{NodeId, SLOT_COUNT, Slot, SlotAssignment, SlotMap};

/// The slot changes that make `slots` balanced over `active` (each node within one slot of the
/// others), moving only what must move: slots of nodes that are not active, then the excess of
/// nodes above their share. Deterministic for a given input.
pub fn plan_slots(slots: &SlotMap, active: &[NodeId]) -> Vec<SlotAssignment> {
    let mut active: Vec<NodeId> = active.to_vec();
    active.sort_unstable();
    active.dedup();
    if active.is_empty() {
        // Nobody can take new SAs; leave the map alone rather than clear it.
        return Vec::new();
    }

    let mut held: BTreeMap<NodeId, Vec<Slot>> = active.iter().map(|n| (*n, Vec::new())).collect();
    let mut free: Vec<Slot> = Vec::new();
    for (slot, owner) in slots.iter() {
        match owner.and_then(|o| held.get_mut(&o)) {
            Some(list) => list.push(slot),
            None => free.push(slot),
        }
    }

    // Shares: SLOT_COUNT / n each, and one more for the first `remainder` nodes — preferring
    // nodes that already hold more, so fewer slots move.
    let n = active.len();
    let base = usize::from(SLOT_COUNT) / n;
    let remainder = usize::from(SLOT_COUNT) % n;
    let mut by_load = active.clone();
    by_load.sort_by_key(|node| (std::cmp::Reverse(held[node].len()), *node));
    let share: BTreeMap<NodeId, usize> = by_load
        .iter()
        .enumerate()
        .map(|(rank, node)| (*node, base + usize::from(rank < remainder)))
        .collect();

    for node in &active {
        let list = held.get_mut(node).expect("every active node has a list");
        while list.len() > share[node] {
            free.push(list.pop().expect("longer than its share, so not empty"));
        }
    }
    free.sort_unstable();

    let mut changes = Vec::new();
    let mut free = free.into_iter();
    for node in &active {
        let missing = share[node] - held[node].len();
        for slot in free.by_ref().take(missing) {
            if slots.owner(slot) != Some(*node) {
                changes.push(SlotAssignment {
                    slot,
                    node: Some(*node),
                });
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::{Command, NodeState, State, apply};

    fn state_with(nodes: &[NodeId]) -> State {
        let mut state = State::default();
        for node in nodes {
            apply(
                &mut state,
                &Command::SetNodeState {
                    node: *node,
                    state: NodeState::Active,
                    at_ms: 0,
                },
            )
            .unwrap();
        }
        state
    }

    fn balance(state: &mut State, active: &[NodeId]) -> usize {
        let plan = plan_slots(state.slots(), active);
        let moved = plan.len();
        apply(state, &Command::SetSlots(plan)).unwrap();
        moved
    }

    fn counts(state: &State, nodes: &[NodeId]) -> Vec<usize> {
        nodes.iter().map(|n| state.slots().count_for(*n)).collect()
    }

    #[test]
    fn fills_an_empty_map_evenly() {
        let mut state = state_with(&[1, 2, 3]);
        assert_eq!(balance(&mut state, &[1, 2, 3]), 1024);
        let c = counts(&state, &[1, 2, 3]);
        assert_eq!(c.iter().sum::<usize>(), 1024);
        assert!(
            c.iter().max().unwrap() - c.iter().min().unwrap() <= 1,
            "{c:?}"
        );
        assert_eq!(
            balance(&mut state, &[1, 2, 3]),
            0,
            "a balanced map stays put"
        );
    }

    #[test]
    fn a_new_node_takes_only_its_share() {
        let mut state = state_with(&[1, 2, 3]);
        balance(&mut state, &[1, 2, 3]);
        apply(
            &mut state,
            &Command::SetNodeState {
                node: 4,
                state: NodeState::Active,
                at_ms: 0,
            },
        )
        .unwrap();
        let moved = balance(&mut state, &[1, 2, 3, 4]);
        assert_eq!(moved, 256);
        assert_eq!(counts(&state, &[1, 2, 3, 4]), vec![256; 4]);
    }

    #[test]
    fn a_lost_node_s_slots_spread_over_the_survivors() {
        let mut state = state_with(&[1, 2, 3]);
        balance(&mut state, &[1, 2, 3]);
        let before = counts(&state, &[1, 2]);
        apply(
            &mut state,
            &Command::SetNodeState {
                node: 3,
                state: NodeState::Down,
                at_ms: 0,
            },
        )
        .unwrap();
        let moved = balance(&mut state, &[1, 2]);
        let after = counts(&state, &[1, 2]);
        assert_eq!(after, vec![512, 512]);
        assert_eq!(moved, 1024 - before.iter().sum::<usize>());
    }
}
