//! Builders for test SAs and a cluster with registered nodes and slots.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use evpc_raft_store::{
    ChildSa, ChildSuite, Command, IkeSa, NodeId, NodeState, SLOT_COUNT, SaId, SaTimes, SealedKeys,
    SlotAssignment, State, TrafficSelector, apply, fixture,
};

/// A state with `nodes` active nodes (ids 1..=nodes) and slots spread round-robin.
pub fn cluster(nodes: u64) -> State {
    let mut state = State::default();
    for node in 1..=nodes {
        let r = apply(
            &mut state,
            &Command::SetNodeState {
                node,
                state: NodeState::Active,
                at_ms: 1_000,
            },
        );
        assert!(r.is_ok(), "{r:?}");
    }
    let slots = (0..SLOT_COUNT)
        .map(|slot| SlotAssignment {
            slot,
            node: Some(1 + u64::from(slot) % nodes),
        })
        .collect();
    let r = apply(&mut state, &Command::SetSlots(slots));
    assert!(r.is_ok(), "{r:?}");
    state
}

/// A selector for one host.
pub fn host(addr: IpAddr) -> TrafficSelector {
    TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: 65535,
        start_addr: addr,
        end_addr: addr,
    }
}

/// A child whose remote selector is a host address of its own (10.200.x.y from the SPI), so
/// children of different peers never overlap; ours is anything.
pub fn child(in_spi: u32, esn: bool) -> ChildSa {
    let any = TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: 65535,
        start_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        end_addr: IpAddr::V4(Ipv4Addr::BROADCAST),
    };
    let [_, _, hi, lo] = in_spi.to_be_bytes();
    ChildSa {
        in_spi,
        out_spi: in_spi ^ 0xffff_0000,
        suite: ChildSuite {
            encryption: 20,
            key_bits: 128,
            esn,
        },
        keys: SealedKeys(vec![7; 60]),
        ts_local: vec![any],
        ts_remote: vec![host(IpAddr::V4(Ipv4Addr::new(10, 200, hi, lo)))],
        out_start: 1,
        out_hwm: 0,
        in_checkpoint: 0,
        udp_encap: true,
        rekey_generation: 0,
        times: SaTimes::default(),
    }
}

/// An SA whose owner is whoever owns `slot` in `state`, with `children` (no ESN).
pub fn sa(state: &State, id: u64, slot: u16, children: &[u32]) -> IkeSa {
    let owner: NodeId = state.slots().owner(slot).expect("slot assigned");
    let mut sa = fixture::ike_sa(SaId(id), id.rotate_left(17), slot, owner, 1);
    sa.children = children
        .iter()
        .map(|spi| (*spi, child(*spi, false)))
        .collect::<BTreeMap<_, _>>();
    sa
}
