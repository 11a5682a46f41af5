//! `Router::route` never allocates: a flood of datagrams it drops (at the
//! cap, over a source's budget, unroutable) or hands on costs table lookups
//! only. Counted with a global allocator, per thread, so the other tests of
//! this binary running in parallel do not disturb the count.

// The counting allocator must implement `GlobalAlloc`, an unsafe trait; it
// only counts and forwards to `System`.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::{Rng, START_MS, client_config, connect_options, gateway_config, gw_addr};
use evpc_ike::{
    Dispatch, DropReason, Endpoint, IkeSa, Router, RouterLimits, Screened, Secret, wire,
};

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the thread-local counter is const-initialized and
// has no destructor, so touching it never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through `alloc`/`realloc` above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

fn request(addr: SocketAddr, rng: &mut Rng) -> Vec<u8> {
    let (_, o) = IkeSa::connect(
        Arc::new(client_config(0)),
        addr,
        gw_addr(),
        connect_options(),
        START_MS,
        rng,
    );
    o.send[0].payload.clone()
}

#[test]
fn route_does_not_allocate() {
    let mut rng = Rng(1);
    let limits = RouterLimits {
        max_half_open: 3,
        max_half_open_per_source: 2,
        ..RouterLimits::default()
    };
    let mut config = gateway_config(1);
    config.cookie_threshold = 3;
    let endpoint = Endpoint::new(Arc::new(config), Secret::from_slice(&[3; 32]));
    let mut r: Router<u32> = Router::new(endpoint, limits, START_MS).unwrap();
    let busy = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 500));
    let other = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 2), 500));
    let third = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 3), 500));
    let mut admitted = Vec::new();
    for (h, from) in [(0, busy), (1, SocketAddr::new(busy.ip(), 501)), (2, other)] {
        let req = request(from, &mut rng);
        let Screened::Admit(p) = r.screen(&mut rng, gw_addr(), from, &req) else {
            panic!("admitted below the threshold");
        };
        r.insert_half_open(h, p.key(), [p.local_spi()], START_MS)
            .unwrap();
        admitted.push((from, req, p.local_spi()));
    }
    let fresh = request(third, &mut rng);
    let over_budget = request(SocketAddr::new(busy.ip(), 502), &mut rng);
    let (from0, req0, spi0) = admitted[0].clone();
    let to_sa = wire::emit_plain_message(
        wire::Header {
            spi_i: 9,
            spi_r: spi0,
            next_payload: wire::PayloadType::NONE,
            major_version: 2,
            minor_version: 0,
            exchange: wire::ExchangeType::IKE_AUTH,
            initiator: true,
            response: false,
            message_id: 1,
            length: 0,
        },
        &[],
    );
    let mut unknown = to_sa.clone();
    unknown[8] ^= 0xff;
    let garbage = vec![0xa5u8; 300];
    let cases: [(SocketAddr, &[u8], Dispatch<u32>); 6] = [
        (third, &fresh, Dispatch::Drop(DropReason::HalfOpenCap)),
        (from0, &req0, Dispatch::Sa(0)),
        (from0, &to_sa, Dispatch::Sa(0)),
        (
            from0,
            &unknown,
            Dispatch::Unknown {
                local_spi: spi0 ^ (0xff << 56),
            },
        ),
        (
            from0,
            &garbage[..20],
            Dispatch::Drop(DropReason::Unroutable),
        ),
        (
            from0,
            &garbage,
            Dispatch::Unknown {
                local_spi: 0xa5a5_a5a5_a5a5_a5a5,
            },
        ),
    ];
    let before = allocations();
    for _ in 0..1_000 {
        for (from, d, want) in &cases {
            assert_eq!(r.route(*from, d), *want);
        }
    }
    assert_eq!(allocations() - before, 0, "route allocated");

    // Below the cap, a source over its budget is dropped without allocating too.
    r.remove(2);
    let from = SocketAddr::new(busy.ip(), 502);
    let before = allocations();
    for _ in 0..1_000 {
        assert_eq!(
            r.route(from, &over_budget),
            Dispatch::Drop(DropReason::SourceBudget)
        );
    }
    assert_eq!(allocations() - before, 0, "route allocated");
    // The counter counts: the check above is not vacuous.
    let before = allocations();
    let v = std::hint::black_box(vec![1u8; 64]);
    assert!(allocations() > before && v.len() == 64);
}
