//! What a snapshot of the replicated state costs at scale: encoding it (every node, every
//! `raft.snapshot_every` entries), decoding it and checking its invariants (a lagging follower
//! installing the leader's, a node loading its own at start).
//!
//! ```sh
//! cargo bench -p evpc-raft-store --bench snapshot
//! ```

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use evpc_raft_store::{
    Command, NodeState, SLOT_COUNT, SaId, SlotAssignment, State, apply, fixture,
};

/// A 3-node state with `n` road-warrior SAs (one child, an inner address each), as the IKE
/// gateway creates them.
fn state_with(n: u64) -> State {
    let mut state = State::default();
    for node in 1..=3 {
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
            node: Some(1 + u64::from(slot) % 3),
        })
        .collect();
    assert!(apply(&mut state, &Command::SetSlots(slots)).is_ok());
    for i in 1..=n {
        let slot = (i % u64::from(SLOT_COUNT)) as u16;
        let owner = 1 + u64::from(slot) % 3;
        let id = SaId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let [_, b, c, d] = (i as u32).to_be_bytes();
        let inner = IpAddr::V4(Ipv4Addr::new(10, 64 + b % 16, c, d));
        let sa = fixture::with_inner_address(
            fixture::ike_sa(id, i, slot, owner, 0x1000_0000 + i as u32),
            inner,
        );
        let r = apply(&mut state, &Command::CreateSa(Box::new(sa)));
        assert!(r.is_ok(), "{r:?}");
    }
    state
}

fn snapshot(c: &mut Criterion) {
    for n in [10_000, 100_000] {
        let state = state_with(n);
        let bytes = state.canonical_bytes();
        let mut group = c.benchmark_group(format!("snapshot_{n}_sas"));
        group.sample_size(10);
        group.bench_function("encode", |b| b.iter(|| black_box(&state).canonical_bytes()));
        group.bench_function("decode", |b| {
            b.iter(|| postcard::from_bytes::<State>(black_box(&bytes)).unwrap())
        });
        group.bench_function("check_invariants", |b| {
            b.iter(|| black_box(&state).check_invariants().unwrap())
        });
        group.finish();
        eprintln!("{n} SAs: {} bytes encoded", bytes.len());
    }
}

criterion_group!(benches, snapshot);
criterion_main!(benches);
