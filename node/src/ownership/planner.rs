//! What the leader proposes to keep placement right: registry, failure takeover, drain,
//! rebalance and slots, as one batch. A pure function of the applied state, the Raft
//! membership and the leader's contact table.
//!
//! In order, within one [`Command::Batch`]:
//! 1. voters missing from the registry are registered active; registered nodes that left the
//!    membership are marked down;
//! 2. voters silent for longer than `failover_ms` are marked down (which frees their slots);
//!    down voters heard again are active again;
//! 3. every SA owned by a node that is down (or gone) moves — all of them, in this batch — to
//!    the active nodes, least loaded first, so each survivor takes about 1/(n−1);
//! 4. SAs of draining nodes, and (when asked) SAs of overloaded nodes, move at most
//!    `moves_per_round` per round, so the cluster stays responsive;
//! 5. the slot map is rebalanced over the active nodes.
//!
//! Unless `leader_serves`, the leader (the node planning) takes no SAs while another active
//! node can: no slots point at it, takeovers and rebalances skip it, and SAs it owns (it owned
//! them before it was elected) move off like a drain's. A leader's death then costs its SAs
//! nothing: they are elsewhere, on owners that keep their data planes through the election
//! (an election comes before any takeover, so a dead leader's SAs would wait ~800 ms for
//! theirs, against ~400 ms for any other node's).
//!
//! Every move carries a first lease for the new owner (`OwnerMove::lease`).

use std::collections::{BTreeMap, BTreeSet};

use evpc_raft_store::{Command, NodeId, NodeState, OwnerMove, SaId, State};

use super::liveness::Liveness;
use super::placement::plan_slots;

/// Planner settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannerConfig {
    /// A voter silent this long is declared down.
    pub failover_ms: u64,
    /// Sequence numbers granted to a new owner per child with each move.
    pub move_lease: u64,
    /// Planned moves (drain, rebalance) per round.
    pub moves_per_round: usize,
    /// Whether the leader owns SAs like any other node (see the module docs).
    pub leader_serves: bool,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            failover_ms: 300,
            move_lease: 4_096,
            moves_per_round: 100,
            leader_serves: false,
        }
    }
}

/// The leader's view this round.
#[derive(Debug)]
pub struct PlanInput<'a> {
    /// The applied state.
    pub state: &'a State,
    /// Raft voters.
    pub voters: &'a BTreeSet<NodeId>,
    /// The leader's contact table.
    pub liveness: &'a Liveness,
    /// Monotonic ms (the contact table's clock).
    pub now_ms: u64,
    /// Wall-clock ms, for the registry's `since_ms`.
    pub wall_ms: u64,
    /// Move SAs from overloaded to underloaded nodes this round.
    pub rebalance: bool,
    /// The node planning: the Raft leader.
    pub leader: NodeId,
}

/// What the planner decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// The batch to propose, if anything is to change.
    pub command: Option<Command>,
    /// Nodes declared down this round.
    pub declared_down: Vec<NodeId>,
    /// SAs moved because their owner is down.
    pub takeovers: usize,
    /// SAs moved for drain or rebalance.
    pub planned_moves: usize,
    /// Whether a rebalance still has work after this round.
    pub rebalance_pending: bool,
}

/// Plans one round.
pub fn plan(input: &PlanInput<'_>, config: &PlannerConfig) -> Plan {
    let state = input.state;
    let mut commands = Vec::new();
    let mut effective: BTreeMap<NodeId, NodeState> =
        state.nodes().iter().map(|(id, r)| (*id, r.state)).collect();
    let mut set_state = |commands: &mut Vec<Command>, node: NodeId, s: NodeState| {
        commands.push(Command::SetNodeState {
            node,
            state: s,
            at_ms: input.wall_ms,
        });
        effective.insert(node, s);
    };

    let silent = input
        .liveness
        .silent_voters(input.voters, input.now_ms, config.failover_ms);
    let mut declared_down = Vec::new();
    for voter in input.voters {
        let current = state.nodes().get(voter).map(|r| r.state);
        let is_silent = silent.contains(voter);
        match current {
            None => set_state(
                &mut commands,
                *voter,
                if is_silent {
                    NodeState::Down
                } else {
                    NodeState::Active
                },
            ),
            Some(NodeState::Active | NodeState::Draining) if is_silent => {
                declared_down.push(*voter);
                set_state(&mut commands, *voter, NodeState::Down);
            }
            Some(NodeState::Down) if !is_silent => {
                set_state(&mut commands, *voter, NodeState::Active)
            }
            Some(_) => {}
        }
    }
    for (node, record) in state.nodes() {
        if !input.voters.contains(node) && record.state != NodeState::Down {
            set_state(&mut commands, *node, NodeState::Down);
        }
    }

    let active: Vec<NodeId> = input
        .voters
        .iter()
        .copied()
        .filter(|v| effective.get(v) == Some(&NodeState::Active))
        .collect();
    // Who takes SAs: the active nodes, but the leader only if it is alone (or configured to),
    // and only those whose data plane is open (a node that just joined or restarted is not,
    // for a moment: an SA moved to it would wait) — unless none is.
    let spares_leader = !config.leader_serves && active.iter().any(|n| *n != input.leader);
    let candidates: Vec<NodeId> = active
        .iter()
        .copied()
        .filter(|n| !(spares_leader && *n == input.leader))
        .collect();
    let serving: Vec<NodeId> = candidates
        .iter()
        .copied()
        .filter(|n| input.liveness.serving(*n))
        .collect();
    // An active node that does not serve yet will: a rebalance asked meanwhile waits for it
    // (an operator who restarts a node and asks for a rebalance means that node too).
    let not_serving_yet = !serving.is_empty() && serving.len() < candidates.len();
    let servers = if serving.is_empty() {
        candidates
    } else {
        serving
    };
    // The state's owner index: every step below costs O(nodes) plus the SAs it moves, not
    // O(SAs) — this runs on every heartbeat while the state's read lock is held.
    let mut load: BTreeMap<NodeId, usize> = servers
        .iter()
        .map(|n| (*n, state.owned_count(*n)))
        .collect();

    let mut moves = Vec::new();
    // `handover`: a planned move from a live owner (see `OwnerMove::handover`).
    let mut take = |sa: SaId, from_epoch, load: &mut BTreeMap<NodeId, usize>, handover| -> bool {
        let Some((&to, _)) = load.iter().min_by_key(|(node, count)| (**count, **node)) else {
            return false;
        };
        *load.get_mut(&to).expect("chosen from the map") += 1;
        moves.push(OwnerMove {
            sa,
            from_epoch,
            to,
            lease: config.move_lease,
            handover,
        });
        true
    };

    // Takeover: everything owned by a node that is down or gone, at once.
    let mut takeovers = 0;
    let orphaned: Vec<NodeId> = state
        .owner_counts()
        .map(|(owner, _)| owner)
        .filter(|owner| {
            let owner_state = effective.get(owner).copied();
            !input.voters.contains(owner)
                || owner_state == Some(NodeState::Down)
                || owner_state.is_none()
        })
        .collect();
    for owner in orphaned {
        for sa in state.sas_owned_by(owner) {
            if take(sa.id, sa.epoch, &mut load, false) {
                takeovers += 1;
            }
        }
    }

    // Drain, at a bounded rate: draining nodes, and the leader when it spares itself.
    let mut planned = 0;
    let draining: Vec<NodeId> = state
        .owner_counts()
        .map(|(owner, _)| owner)
        .filter(|owner| {
            (effective.get(owner) == Some(&NodeState::Draining)
                || (spares_leader && *owner == input.leader))
                && input.voters.contains(owner)
        })
        .collect();
    'drain: for owner in draining {
        for sa in state.sas_owned_by(owner) {
            if planned >= config.moves_per_round {
                break 'drain;
            }
            if take(sa.id, sa.epoch, &mut load, true) {
                planned += 1;
            }
        }
    }

    // Rebalance, at a bounded rate: from the most to the least loaded until within one, and
    // still pending while an active node does not serve yet.
    let mut rebalance_pending = input.rebalance && not_serving_yet;
    if input.rebalance && !load.is_empty() {
        // Each active node's SAs, taken from the highest id down, lazily: a round looks at no
        // more SAs than it moves.
        let mut by_owner: BTreeMap<NodeId, _> = load
            .keys()
            .map(|node| (*node, state.sas_owned_by(*node).rev()))
            .collect();
        loop {
            let (&max_node, &max) = load
                .iter()
                .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)))
                .expect("not empty");
            let (&min_node, &min) = load
                .iter()
                .min_by_key(|(n, c)| (**c, **n))
                .expect("not empty");
            if max <= min + 1 {
                break;
            }
            if planned >= config.moves_per_round {
                rebalance_pending = true;
                break;
            }
            let Some(sa) = by_owner.get_mut(&max_node).and_then(|v| v.next()) else {
                break;
            };
            *load.get_mut(&max_node).expect("present") -= 1;
            *load.get_mut(&min_node).expect("present") += 1;
            moves.push(OwnerMove {
                sa: sa.id,
                from_epoch: sa.epoch,
                to: min_node,
                lease: config.move_lease,
                handover: true,
            });
            planned += 1;
        }
    }

    if !moves.is_empty() {
        commands.push(Command::AssignOwners(moves));
    }
    let assignments = plan_slots(state.slots(), &servers);
    if !assignments.is_empty() {
        commands.push(Command::SetSlots(assignments));
    }
    let command = match commands.len() {
        0 => None,
        1 => commands.pop(),
        _ => Some(Command::Batch(commands)),
    };
    Plan {
        command,
        declared_down,
        takeovers,
        planned_moves: planned,
        rebalance_pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::liveness::PeerView;
    use evpc_raft_store::{Applied, Epoch, apply};

    /// A 3-node cluster with `n` SAs spread by slot, as the planner itself would set it up.
    fn cluster(n: u64) -> (State, BTreeSet<NodeId>) {
        let voters = BTreeSet::from([1, 2, 3]);
        let mut state = State::default();
        let liveness = heard_all(0);
        let first = plan(&input(&state, &voters, &liveness, 0, false), &serving());
        apply(&mut state, &first.command.unwrap()).unwrap();
        for id in 1..=n {
            let mut sa = crate::ownership::test_support::sa(id, 0x1000 + id as u32);
            sa.slot = ((id * 337) % 1024) as u16;
            sa.owner = state.slots().owner(sa.slot).unwrap();
            apply(&mut state, &Command::CreateSa(Box::new(sa))).unwrap();
        }
        (state, voters)
    }

    /// The planner with the leader serving like any node: what most tests here look at (the
    /// spreading itself); the leader's sparing has tests of its own below.
    fn serving() -> PlannerConfig {
        PlannerConfig {
            leader_serves: true,
            ..PlannerConfig::default()
        }
    }

    /// What a healthy peer says: its data plane serves.
    fn up() -> PeerView {
        PeerView {
            serving: true,
            ..PeerView::default()
        }
    }

    fn heard_all(now: u64) -> Liveness {
        let mut l = Liveness::new(1, 0);
        for peer in [2, 3] {
            l.heard(peer, now, up());
        }
        l
    }

    fn input<'a>(
        state: &'a State,
        voters: &'a BTreeSet<NodeId>,
        liveness: &'a Liveness,
        now: u64,
        rebalance: bool,
    ) -> PlanInput<'a> {
        PlanInput {
            state,
            voters,
            liveness,
            now_ms: now,
            wall_ms: 1_700_000_000_000 + now,
            rebalance,
            leader: 1,
        }
    }

    fn owned(state: &State) -> BTreeMap<NodeId, usize> {
        let mut m = BTreeMap::new();
        for sa in state.sas() {
            *m.entry(sa.owner).or_default() += 1;
        }
        m
    }

    #[test]
    fn a_silent_node_loses_everything_in_one_batch_spread_over_the_survivors() {
        let (mut state, voters) = cluster(300);
        let before = owned(&state);
        // Node 3 silent since 0; node 2 heard just now.
        let mut l = Liveness::new(1, 0);
        l.heard(2, 1_000, up());
        l.heard(3, 0, up());
        let early = plan(&input(&state, &voters, &l, 250, false), &serving());
        assert!(
            early.declared_down.is_empty() && early.takeovers == 0,
            "{early:?}"
        );
        let p = plan(&input(&state, &voters, &l, 1_000, false), &serving());
        assert_eq!(p.declared_down, vec![3]);
        assert_eq!(p.takeovers, before[&3]);
        let applied = apply(&mut state, &p.command.unwrap()).unwrap();
        let Applied::Batch(results) = applied else {
            panic!()
        };
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
        let after = owned(&state);
        assert_eq!(after.get(&3), None);
        assert!(after[&1].abs_diff(after[&2]) <= 1, "{after:?}");
        assert_eq!(state.slots().count_for(3), 0);
        assert!(
            state
                .sas()
                .all(|sa| sa.owner == 3 || sa.epoch >= Epoch::FIRST)
        );
        // Nothing more to do until node 3 comes back.
        assert!(
            plan(&input(&state, &voters, &l, 1_010, false), &serving())
                .command
                .is_none()
        );
        l.heard(3, 1_020, up());
        let back = plan(&input(&state, &voters, &l, 1_030, false), &serving());
        apply(&mut state, &back.command.unwrap()).unwrap();
        assert_eq!(state.nodes()[&3].state, NodeState::Active);
        assert!(
            state.slots().count_for(3) > 300,
            "slots rebalance to the returning node"
        );
    }

    #[test]
    fn a_rebalance_waits_for_an_active_node_that_does_not_serve_yet() {
        let (mut state, voters) = cluster(300);
        // Node 3 came back: active, heard, but its data plane is not open yet.
        let mut l = Liveness::new(1, 0);
        l.heard(2, 10, up());
        l.heard(3, 10, PeerView::default());
        let p = plan(&input(&state, &voters, &l, 20, true), &serving());
        assert!(p.rebalance_pending, "asked before node 3 serves: {p:?}");
        if let Some(command) = p.command {
            apply(&mut state, &command).unwrap();
        }
        // It serves: the same request now moves SAs to it, and ends once even.
        l.heard(3, 30, up());
        let mut rounds = 0;
        loop {
            let p = plan(&input(&state, &voters, &l, 40, true), &serving());
            if let Some(command) = p.command {
                apply(&mut state, &command).unwrap();
            }
            rounds += 1;
            if !p.rebalance_pending {
                break;
            }
            assert!(rounds < 50, "the rebalance ends");
        }
        let after = owned(&state);
        let (min, max) = (after.values().min().unwrap(), after.values().max().unwrap());
        assert!(max - min <= 1 && after.len() == 3, "{after:?}");
    }

    #[test]
    fn drain_and_rebalance_move_at_a_bounded_rate() {
        let (mut state, voters) = cluster(300);
        let l = heard_all(10);
        apply(
            &mut state,
            &Command::SetNodeState {
                node: 2,
                state: NodeState::Draining,
                at_ms: 0,
            },
        )
        .unwrap();
        let config = PlannerConfig {
            moves_per_round: 40,
            ..serving()
        };
        let mut rounds = 0;
        while owned(&state).get(&2).copied().unwrap_or(0) > 0 {
            let p = plan(&input(&state, &voters, &l, 10, false), &config);
            assert!(p.planned_moves <= 40);
            apply(&mut state, &p.command.unwrap()).unwrap();
            rounds += 1;
        }
        assert!(rounds >= 100 / 40, "{rounds} rounds");
        // Back to active, then rebalance evens it out again, 40 at a time.
        apply(
            &mut state,
            &Command::SetNodeState {
                node: 2,
                state: NodeState::Active,
                at_ms: 0,
            },
        )
        .unwrap();
        loop {
            let p = plan(&input(&state, &voters, &l, 10, true), &config);
            let Some(command) = p.command else { break };
            assert!(p.planned_moves <= 40);
            apply(&mut state, &command).unwrap();
            if !p.rebalance_pending && p.planned_moves == 0 {
                break;
            }
        }
        let counts = owned(&state);
        assert!(
            counts.values().max().unwrap() - counts.values().min().unwrap() <= 1,
            "{counts:?}"
        );
    }

    #[test]
    fn the_leader_takes_no_slots_and_no_takeover_and_hands_its_own_sas_off() {
        // Built with the leader serving, as a cluster that changed leader would be.
        let (mut state, voters) = cluster(300);
        assert!(owned(&state)[&1] > 0);
        let config = PlannerConfig {
            moves_per_round: 40,
            ..PlannerConfig::default()
        };
        let l = heard_all(10);
        let mut rounds = 0;
        loop {
            let p = plan(&input(&state, &voters, &l, 10, false), &config);
            assert!(p.planned_moves <= 40, "{p:?}");
            let Some(command) = p.command else { break };
            apply(&mut state, &command).unwrap();
            state.check_invariants().unwrap();
            rounds += 1;
            assert!(rounds < 100, "the leader's SAs never left");
        }
        let after = owned(&state);
        assert_eq!(after.get(&1), None, "the leader owns nothing: {after:?}");
        assert!(after[&2].abs_diff(after[&3]) <= 1, "{after:?}");
        assert_eq!(
            state.slots().count_for(1),
            0,
            "no slot points at the leader"
        );
        // Node 3 falls silent: everything goes to node 2, none to the leader.
        let mut l = Liveness::new(1, 0);
        l.heard(2, 1_000, up());
        l.heard(3, 0, up());
        let p = plan(&input(&state, &voters, &l, 1_000, false), &config);
        apply(&mut state, &p.command.unwrap()).unwrap();
        let after = owned(&state);
        assert_eq!((after.get(&1), after.get(&3)), (None, None), "{after:?}");
        assert_eq!(after[&2], 300);
    }

    #[test]
    fn a_leader_alone_serves() {
        let (mut state, voters) = cluster(30);
        // Nodes 2 and 3 silent: the leader is the only active node left.
        let mut l = Liveness::new(1, 0);
        l.heard(2, 0, up());
        l.heard(3, 0, up());
        let p = plan(
            &input(&state, &voters, &l, 1_000, false),
            &PlannerConfig::default(),
        );
        apply(&mut state, &p.command.unwrap()).unwrap();
        assert_eq!(owned(&state).get(&1), Some(&30));
        assert_eq!(state.slots().count_for(1), 1024);
    }
}
