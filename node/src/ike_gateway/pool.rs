//! The replicated inner-address pool.
//!
//! Which addresses are taken is part of the replicated state (`State::addresses`, kept by
//! `apply` from each SA's `virtual_ip`). A node picks an address that is free there and not
//! being handed out by another of its own SAs right now (a local reservation), and the commit
//! that creates the SA (`Command::CreateSa` with `virtual_ip`) takes it atomically: if another
//! node took it meanwhile, `apply` refuses the SA with `AddressInUse`, and the gateway answers
//! the same IKE_AUTH again with another address (see `actor`). Picks start at a random place in
//! the pool, so nodes rarely race for the same address.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use evpc_raft_store::State;
use rand::Rng;

use super::settings::PoolPrefix;

/// Random addresses tried before a pick scans the pool in order.
const RANDOM_PROBES: u32 = 32;

/// The pool of one node (its reservations are node-local; what is taken is replicated).
#[derive(Debug)]
pub struct Pool {
    first: u32,
    size: u32,
    excluded: BTreeSet<Ipv4Addr>,
    reserved: Mutex<HashSet<Ipv4Addr>>,
}

impl Pool {
    /// The usable addresses of `prefix`, without `excluded`: for prefixes up to /30 the network
    /// and broadcast addresses are not used either.
    pub fn new(prefix: PoolPrefix, excluded: BTreeSet<Ipv4Addr>) -> Pool {
        let base = u32::from(prefix.network);
        let total: u64 = 1u64 << (32 - u32::from(prefix.len));
        let (first, size) = if prefix.len <= 30 {
            (base + 1, (total - 2) as u32)
        } else {
            (base, total as u32)
        };
        Pool {
            first,
            size,
            excluded,
            reserved: Mutex::new(HashSet::new()),
        }
    }

    fn contains(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        a >= self.first && a - self.first < self.size && !self.excluded.contains(&addr)
    }

    /// Reserves a free address: `requested` if it is in the pool and free, otherwise one from a
    /// random place on. `None` when the pool is exhausted.
    pub fn pick(&self, state: &State, requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let free = |a: Ipv4Addr, reserved: &HashSet<Ipv4Addr>| {
            self.contains(a)
                && !reserved.contains(&a)
                && state.address_holder(IpAddr::V4(a)).is_none()
        };
        if let Some(want) = requested.filter(|a| !a.is_unspecified())
            && free(want, &reserved)
        {
            reserved.insert(want);
            return Some(want);
        }
        if self.size == 0 {
            return None;
        }
        // Random probes first: in a pool at most half full each finds a free address with
        // probability ≥ 1/2, so a pick costs O(1) whatever the number of SAs. Only a nearly full
        // pool falls through to the scan.
        let mut rng = rand::rng();
        for _ in 0..RANDOM_PROBES {
            let a = Ipv4Addr::from(self.first + rng.random_range(0..self.size));
            if free(a, &reserved) {
                reserved.insert(a);
                return Some(a);
            }
        }
        let start = rng.random_range(0..self.size);
        for i in 0..self.size {
            let a = Ipv4Addr::from(self.first + (start + i) % self.size);
            if free(a, &reserved) {
                reserved.insert(a);
                return Some(a);
            }
        }
        None
    }

    /// Ends a reservation (the SA was committed with it, or refused).
    pub fn release(&self, addr: Ipv4Addr) {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::SaId;

    fn pool(len: u8, excluded: &[Ipv4Addr]) -> Pool {
        Pool::new(
            PoolPrefix {
                network: Ipv4Addr::new(10, 10, 0, 0),
                len,
            },
            excluded.iter().copied().collect(),
        )
    }

    #[test]
    fn picks_are_unique_skip_excluded_and_run_out() {
        let gw = Ipv4Addr::new(10, 10, 0, 1);
        let p = pool(29, &[gw]);
        let state = State::default();
        let mut got = BTreeSet::new();
        while let Some(a) = p.pick(&state, None) {
            assert!(got.insert(a), "{a} twice");
        }
        // /29: .1 to .6 usable, .1 excluded.
        assert_eq!(got.len(), 5);
        assert!(!got.contains(&gw));
        assert!(!got.contains(&Ipv4Addr::new(10, 10, 0, 0)));
        assert!(!got.contains(&Ipv4Addr::new(10, 10, 0, 7)));
        p.release(Ipv4Addr::new(10, 10, 0, 3));
        assert_eq!(p.pick(&state, None), Some(Ipv4Addr::new(10, 10, 0, 3)));
    }

    #[test]
    fn addresses_taken_in_the_cluster_are_not_picked() {
        let mut sa = evpc_raft_store::fixture::with_inner_address(
            crate::ownership::test_support::sa(9, 0x2000),
            IpAddr::V4(Ipv4Addr::new(10, 10, 0, 2)),
        );
        sa.owner = 1;
        let state = crate::ownership::test_support::state_with_sa(&sa);
        assert_eq!(
            state.address_holder(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 2))),
            Some(SaId(9))
        );
        let p = pool(30, &[]);
        // /30: .1 and .2 usable; .2 is taken.
        assert_eq!(
            p.pick(&state, Some(Ipv4Addr::new(10, 10, 0, 2))),
            Some(Ipv4Addr::new(10, 10, 0, 1))
        );
        assert_eq!(p.pick(&state, None), None);
    }
}
