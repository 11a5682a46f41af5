//! SA ownership: who may process which SA, and how that changes when nodes fail, drain or
//! join. The parts are sans-IO so the deterministic cluster tests drive the very same code:
//!
//! - [`liveness`]: the contact table, the fence, failure detection;
//! - [`planner`]: the leader's placement decisions (takeover, drain, rebalance, slots);
//! - [`placement`]: the balanced slot map the planner asks for (pure functions);
//! - [`runtime`]: the owner side — start/stop children, leases, replay checkpoints, planned
//!   handovers;
//! - [`handover`]: what two live owners say to each other during a planned handover.
//!
//! Each runs in the daemon inside a thin async task beside it, which does the I/O:
//!
//! - [`pinger_task`]: pings the voters, feeds [`liveness`], renews the fence gate;
//! - [`reconciler_task`]: the leader proposes what [`planner`] plans, every heartbeat;
//! - [`owner_task`]: drives [`runtime`] against this node's data plane.

pub mod handover;
pub mod liveness;
pub mod owner_task;
pub mod pinger_task;
pub mod placement;
pub mod planner;
pub mod reconciler_task;
pub mod runtime;

#[cfg(test)]
pub(crate) mod test_support {
    use evpc_raft_store::{Command, IkeSa, NodeState, SaId, SlotAssignment, State, apply, fixture};

    /// A state in which `sa.owner` is an active node owning `sa.slot`, and `sa` is committed.
    pub fn state_with_sa(sa: &IkeSa) -> State {
        let mut state = State::default();
        let setup = [
            Command::SetNodeState {
                node: sa.owner,
                state: NodeState::Active,
                at_ms: 0,
            },
            Command::SetSlots(vec![SlotAssignment {
                slot: sa.slot,
                node: Some(sa.owner),
            }]),
            Command::CreateSa(Box::new(sa.clone())),
        ];
        for command in &setup {
            apply(&mut state, command).expect("a valid setup");
        }
        state
    }

    /// An SA with one child and no key material; slot and owner left for the caller.
    pub fn sa(id: u64, child_spi: u32) -> IkeSa {
        fixture::without_keys(fixture::ike_sa(SaId(id), id, 0, 0, child_spi))
    }
}
