//! The gateway's child-admission policy: a child whose remote selectors (the addresses its peer
//! may use inside the tunnel) overlap another peer's is refused with TS_UNACCEPTABLE before the
//! engine answers, so one user can never be given another's traffic.
//!
//! It reads the replicated selector index (`State::selector_conflict`, O(log n) under a short
//! read lock). Overlaps with the same peer identity are allowed: a rekeyed child carries its
//! predecessor's selectors, and a reconnecting client's new SA may overlap its stale one until
//! that is deleted. Two nodes admitting overlapping children at the same moment are caught
//! when the second commit applies (`Rejection::SelectorOverlap`), before any answer leaves.

use evpc_ike::{ChildContext, ChildPolicy};
use evpc_raft_store::{State, StateReader};

use super::mapping::{identity, selector};

/// Refuses selectors that overlap another identity's, as the applied state has them.
#[derive(Debug)]
pub struct SelectorGuard {
    state: StateReader,
}

impl SelectorGuard {
    /// A guard reading `state`.
    pub fn new(state: StateReader) -> SelectorGuard {
        SelectorGuard { state }
    }
}

impl ChildPolicy for SelectorGuard {
    fn admit(&self, child: ChildContext<'_>) -> bool {
        admit(&self.state.read(), child)
    }

    /// Taken by a child anywhere in the cluster, or by a deleted child's tombstone: `apply`
    /// would refuse either. O(log n).
    fn child_spi_in_use(&self, spi: u32) -> bool {
        let state = self.state.read();
        state.child(spi).is_some() || state.tombstones().spi(spi).is_some()
    }
}

/// Whether `state` lets `child`'s peer hold its remote selectors.
fn admit(state: &State, child: ChildContext<'_>) -> bool {
    let peer = identity(child.peer_identity);
    let remote: Vec<_> = child.remote_ts.iter().map(selector).collect();
    match state.selector_conflict(&peer, &remote) {
        None => true,
        Some(holder) => {
            tracing::warn!(
                peer = %peer,
                holder = %holder,
                exchange = ?child.exchange,
                "child SA refused: its traffic selectors overlap another peer's"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn another_peers_addresses_are_refused_its_own_are_not() {
        let mut sa = crate::ownership::test_support::sa(7, 0x700);
        sa.owner = 1;
        let state = crate::ownership::test_support::state_with_sa(&sa);
        let held = sa.children[&0x700].ts_remote[0];
        let ts = evpc_ike::TrafficSelector {
            ip_protocol: 0,
            start_port: 0,
            end_port: 65535,
            start: held.start_addr,
            end: held.end_addr,
        };
        fn context<'a>(
            who: &'a evpc_ike::Identity,
            ts: &'a evpc_ike::TrafficSelector,
        ) -> ChildContext<'a> {
            ChildContext {
                exchange: evpc_ike::wire::ExchangeType::IKE_AUTH,
                local_ike_spi: 1,
                ike_spi_i: 2,
                ike_spi_r: 1,
                peer_identity: who,
                inner_address: None,
                remote_ts: std::slice::from_ref(ts),
                local_ts: &[],
                rekey_of: None,
            }
        }
        let other = evpc_ike::Identity::fqdn("intruder.example");
        assert!(!admit(&state, context(&other, &ts)));
        let owner = evpc_ike::Identity::fqdn("client-7.example");
        assert!(admit(&state, context(&owner, &ts)));
        let free = evpc_ike::TrafficSelector {
            start: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1)),
            end: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1)),
            ..ts
        };
        assert!(admit(
            &state,
            ChildContext {
                remote_ts: std::slice::from_ref(&free),
                ..context(&other, &ts)
            }
        ));
    }
}
