//! Realistic SA records for tests, simulations and load generators: one shape of a road
//! warrior's SA, so every tool that needs an SA without running IKE builds the same one.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{
    ChildSa, ChildSuite, Epoch, Identity, IkeSa, IkeSuite, MessageIds, NodeId, Role, SaId, SaTimes,
    SealedKeys, Slot, TrafficSelector,
};

/// A responder IKE SA after IKE_AUTH (message IDs 0 and 1 used) with one child SA, shaped like
/// a road warrior's: AES-GCM-128 with ESN, a /32 inner selector, and placeholder sealed keys of
/// the real sizes (they open under no cluster key: [`without_keys`] empties them for code
/// that would try).
pub fn ike_sa(id: SaId, spi_i: u64, slot: Slot, owner: NodeId, child_spi: u32) -> IkeSa {
    let peer_octets = (id.0 as u32).to_be_bytes();
    let inner = Ipv4Addr::new(10, 64 + peer_octets[1] % 64, peer_octets[2], peer_octets[3]);
    let child = ChildSa {
        in_spi: child_spi,
        out_spi: child_spi.rotate_left(16) ^ 0x5a5a_5a5a,
        suite: ChildSuite {
            encryption: 20,
            key_bits: 128,
            esn: true,
        },
        keys: SealedKeys(vec![0x11; 2 * 20 + 28]),
        ts_local: vec![TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start_addr: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 0)),
            end_addr: IpAddr::V4(Ipv4Addr::new(10, 10, 0, 255)),
        }],
        ts_remote: vec![TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start_addr: IpAddr::V4(inner),
            end_addr: IpAddr::V4(inner),
        }],
        out_start: 1,
        out_hwm: 0,
        in_checkpoint: 0,
        udp_encap: true,
        rekey_generation: 0,
        times: SaTimes::default(),
    };
    IkeSa {
        id,
        spi_i,
        spi_r: id.0,
        role: Role::Responder,
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 4500),
        peer: SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 18, peer_octets[2], peer_octets[3])),
            4500,
        ),
        local_id: Identity::fqdn("gw.example"),
        peer_id: Identity::fqdn(&format!("client-{}.example", id.0)),
        suite: IkeSuite {
            encryption: 20,
            key_bits: 128,
            prf: 5,
            integrity: None,
            dh_group: 31,
        },
        keys: SealedKeys(vec![0x22; 7 * 32 + 28]),
        msg: MessageIds {
            next_peer_request: 2,
            next_local_request: 0,
        },
        last_response: None,
        pending_request: None,
        times: SaTimes::default(),
        last_peer_activity_ms: 0,
        rekey_generation: 0,
        virtual_ip: None,
        slot,
        owner,
        epoch: Epoch::FIRST,
        children: BTreeMap::from([(child_spi, child)]),
    }
}

/// `sa` with its IKE and child keys emptied: what carries no key material at all.
pub fn without_keys(mut sa: IkeSa) -> IkeSa {
    sa.keys = SealedKeys::default();
    for child in sa.children.values_mut() {
        child.keys = SealedKeys::default();
    }
    sa
}

/// `sa` holding inner address `addr`, its children's remote selectors narrowed to it (as the
/// IKE gateway narrows them).
pub fn with_inner_address(mut sa: IkeSa, addr: IpAddr) -> IkeSa {
    sa.virtual_ip = Some(addr);
    for child in sa.children.values_mut() {
        child.ts_remote = vec![TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start_addr: addr,
            end_addr: addr,
        }];
    }
    sa
}
