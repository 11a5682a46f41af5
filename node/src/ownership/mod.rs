//! SA ownership: who may process which SA, and how that changes when nodes fail, drain or
//! join. The parts are sans-IO so the deterministic cluster tests drive the very same code:
//!
//! - [`liveness`]: the contact table, the fence, failure detection;
//! - [`planner`]: the leader's placement decisions (takeover, drain, rebalance, slots);
//! - [`runtime`]: the owner side — start/stop children, leases, replay checkpoints.

pub mod liveness;
pub mod planner;
pub mod runtime;

#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use evpc_raft_store::{
        ChildSa, ChildSuite, Command, Epoch, Identity, IkeSa, IkeSuite, MessageIds, NodeState,
        Role, SaId, SaTimes, SealedKeys, SlotAssignment, State, apply,
    };

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

    /// An SA with one child; slot and owner left for the caller.
    pub fn sa(id: u64, child_spi: u32) -> IkeSa {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4500);
        IkeSa {
            id: SaId(id),
            spi_i: id,
            spi_r: id,
            role: Role::Responder,
            local: addr,
            peer: addr,
            local_id: Identity::fqdn("gw"),
            peer_id: Identity::fqdn("peer"),
            suite: IkeSuite {
                encryption: 20,
                key_bits: 128,
                prf: 5,
                integrity: None,
                dh_group: 31,
            },
            keys: SealedKeys::default(),
            msg: MessageIds::default(),
            last_response: None,
            pending_request: None,
            times: SaTimes::default(),
            last_peer_activity_ms: 0,
            rekey_generation: 0,
            virtual_ip: None,
            slot: 0,
            owner: 0,
            epoch: Epoch::FIRST,
            children: BTreeMap::from([(
                child_spi,
                ChildSa {
                    in_spi: child_spi,
                    out_spi: !child_spi,
                    suite: ChildSuite {
                        encryption: 20,
                        key_bits: 128,
                        esn: true,
                    },
                    keys: SealedKeys::default(),
                    ts_local: vec![],
                    ts_remote: vec![],
                    out_start: 1,
                    out_hwm: 0,
                    in_checkpoint: 0,
                    rekey_generation: 0,
                    times: SaTimes::default(),
                },
            )]),
        }
    }
}
