//! The leader's reconciler: keeps the replicated node registry and slot map in line with the
//! Raft membership. Every node runs it; only the leader acts.
//!
//! - a voter that is not in the registry is registered as active;
//! - a registered node that left the membership is marked down;
//! - the slot map is kept balanced over the active voters.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use evpc_raft_store::{Command, NodeId, NodeState};
use openraft::rt::WatchReceiver;
use tokio::sync::watch;

use crate::node::{Node, now_ms};
use crate::placement::plan_slots;

/// How often the reconciler looks. Membership changes are rare and a new SA can wait this long
/// for its slot's first owner, so there is no need to react to every metrics update (under load
/// those arrive thousands of times a second).
const PERIOD: Duration = Duration::from_millis(200);

/// Runs until `shutdown` turns true.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tick.tick() => {}
        }
        if node.is_leader()
            && let Some(command) = plan(&node)
        {
            tracing::info!(%command, "reconciling registry and slots");
            match node.propose_local(command).await {
                Ok(p) => {
                    tracing::debug!(log_index = p.log_index, response = ?p.response, "reconciled")
                }
                Err(e) => tracing::warn!(error = %e, "reconcile proposal failed"),
            }
        }
    }
}

/// What the leader should propose now, if anything.
fn plan(node: &Node) -> Option<Command> {
    let voters: BTreeSet<NodeId> = node
        .raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    let state = node.state.read();
    let at_ms = now_ms();
    let mut commands = Vec::new();
    for voter in &voters {
        if !state.nodes().contains_key(voter) {
            commands.push(Command::SetNodeState {
                node: *voter,
                state: NodeState::Active,
                at_ms,
            });
        }
    }
    for (id, record) in state.nodes() {
        if !voters.contains(id) && record.state != NodeState::Down {
            commands.push(Command::SetNodeState {
                node: *id,
                state: NodeState::Down,
                at_ms,
            });
        }
    }
    // Plan slots against the registry as it will be after the commands above.
    let active: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|id| {
            state
                .nodes()
                .get(id)
                .is_none_or(|record| record.state == NodeState::Active)
        })
        .collect();
    // Slots held by nodes outside `active` count as free in the plan.
    let assignments = plan_slots(state.slots(), &active);
    if !assignments.is_empty() {
        commands.push(Command::SetSlots(assignments));
    }
    match commands.len() {
        0 => None,
        1 => commands.pop(),
        _ => Some(Command::Batch(commands)),
    }
}
