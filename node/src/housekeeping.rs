//! The leader's housekeeping: what keeps the replicated records that protect counters current.
//! A pure function of the applied state, the leader's replication progress and its clock; the
//! reconciler runs it about once a second and proposes the result.
//!
//! - **cluster id**: drawn once by the first leader (`Command::SetClusterId`), so data
//!   directories and SA contexts can say which cluster they belong to;
//! - **acknowledged marks**: each member's matched index (what it made durable), recorded when it
//!   moved (`Command::RecordAcks`), so a member restarted on an older copy of its data directory
//!   is recognised and refused (see [`crate::data_dir`]). A mark is recorded only if it moved by
//!   more than the recording entry itself adds, so an idle cluster writes nothing;
//! - **tombstones**: expired ones are removed (`Command::PruneTombstones`); finding the next
//!   expiry is O(log n), so nothing here walks the SAs.

use std::collections::BTreeMap;

use evpc_raft_store::{ClusterId, Command, NodeAck, NodeId, State};

/// What the leader knows this round.
#[derive(Debug)]
pub struct HousekeepingInput<'a> {
    /// The applied state.
    pub state: &'a State,
    /// Each member's matched log index (the leader's replication progress, itself included).
    pub matched: &'a BTreeMap<NodeId, u64>,
    /// Wall-clock ms (tombstone expiry is in wall-clock time, like key lifetimes).
    pub wall_ms: u64,
    /// A fresh random id, used if the cluster has none yet.
    pub fresh_cluster_id: ClusterId,
}

/// The commands due this round, as one batch (or nothing).
pub fn plan(input: &HousekeepingInput<'_>) -> Option<Command> {
    let state = input.state;
    let mut commands = Vec::new();
    if state.cluster_id().is_none() {
        commands.push(Command::SetClusterId(input.fresh_cluster_id));
    }
    // Recording writes one entry, which moves every mark by one: a mark counts as moved only
    // beyond that. When one moved, every mark that moved at all is recorded with it, so the
    // marks stay together and the next round finds nothing to do (recording only the moved
    // ones could alternate between nodes forever, one entry a round).
    let registered = |node: &NodeId| state.nodes().contains_key(node);
    let moved = input
        .matched
        .iter()
        .any(|(node, index)| registered(node) && *index > state.acknowledged(*node) + 1);
    if moved {
        let acks: Vec<NodeAck> = input
            .matched
            .iter()
            .filter(|(node, index)| registered(node) && **index > state.acknowledged(**node))
            .map(|(node, index)| NodeAck {
                node: *node,
                index: *index,
            })
            .collect();
        commands.push(Command::RecordAcks(acks));
    }
    if state
        .tombstones()
        .next_expiry()
        .is_some_and(|at| at < input.wall_ms)
    {
        commands.push(Command::PruneTombstones {
            now_ms: input.wall_ms,
        });
    }
    match commands.len() {
        0 => None,
        1 => commands.pop(),
        _ => Some(Command::Batch(commands)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::{Applied, SaId, apply};

    fn input<'a>(state: &'a State, matched: &'a BTreeMap<NodeId, u64>) -> HousekeepingInput<'a> {
        HousekeepingInput {
            state,
            matched,
            wall_ms: 10_000,
            fresh_cluster_id: ClusterId([4; 16]),
        }
    }

    #[test]
    fn a_new_cluster_gets_an_id_and_marks_follow_the_matched_index() {
        let mut sa = crate::ownership::test_support::sa(1, 0x100);
        sa.owner = 1;
        let mut state = crate::ownership::test_support::state_with_sa(&sa);
        let matched = BTreeMap::from([(1, 40), (2, 38), (9, 50)]);
        let first = plan(&input(&state, &matched)).expect("something to do");
        assert!(
            matches!(&first, Command::Batch(c) if c.len() == 2),
            "{first:?}"
        );
        assert!(apply(&mut state, &first).is_ok());
        assert_eq!(state.cluster_id(), Some(ClusterId([4; 16])));
        assert_eq!(state.acknowledged(1), 40);
        assert_eq!(
            state.acknowledged(9),
            0,
            "unregistered nodes are not recorded"
        );
        // Nothing moved beyond the recording entry itself: an idle cluster writes nothing.
        let matched = BTreeMap::from([(1, 41), (2, 38)]);
        assert_eq!(plan(&input(&state, &matched)), None);
    }

    #[test]
    fn marks_are_recorded_together_and_settle() {
        let mut sa = crate::ownership::test_support::sa(1, 0x100);
        sa.owner = 1;
        let mut state = crate::ownership::test_support::state_with_sa(&sa);
        for node in [2, 3] {
            apply(
                &mut state,
                &Command::SetNodeState {
                    node,
                    state: evpc_raft_store::NodeState::Active,
                    at_ms: 0,
                },
            )
            .unwrap();
        }
        apply(&mut state, &Command::SetClusterId(ClusterId([1; 16]))).unwrap();
        // One node a step behind when the marks are read: each round of an idle cluster writes
        // one entry (which every node then acknowledges); it must settle, not alternate.
        let mut last = 100;
        let mut matched = BTreeMap::from([(1, last), (2, last), (3, last - 1)]);
        let mut writes = 0;
        while let Some(command) = plan(&input(&state, &matched)) {
            assert!(apply(&mut state, &command).is_ok());
            writes += 1;
            assert!(writes < 4, "housekeeping does not settle: {command:?}");
            last += 1;
            matched = BTreeMap::from([(1, last), (2, last), (3, last)]);
        }
        assert!(writes <= 2, "{writes}");
    }

    #[test]
    fn expired_tombstones_are_pruned_when_due() {
        let mut sa = crate::ownership::test_support::sa(1, 0x100);
        sa.owner = 1;
        sa.times.expire_at_ms = 5_000;
        let mut state = crate::ownership::test_support::state_with_sa(&sa);
        apply(&mut state, &Command::SetClusterId(ClusterId([1; 16]))).unwrap();
        apply(
            &mut state,
            &Command::DeleteSa {
                sa: SaId(1),
                epoch: None,
            },
        )
        .unwrap();
        let matched = BTreeMap::new();
        let mut early = input(&state, &matched);
        early.wall_ms = 4_000;
        assert_eq!(plan(&early), None);
        let due = plan(&input(&state, &matched)).expect("prune");
        assert_eq!(apply(&mut state, &due), Ok(Applied::Pruned(2)));
        assert_eq!(plan(&input(&state, &matched)), None);
    }
}
