//! End to end (root): the userspace backend never sends above the lease, resumes after
//! `extend`, and neither sends nor delivers while the fence gate is closed or the node fenced.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use evpc_dataplane::metrics::names;
use evpc_dataplane::netns::root_or_skip;
use evpc_dataplane::{FenceGate, SaDriver};
use evpc_esp::Suite;

#[test]
fn the_lease_bounds_what_is_sent_and_the_fence_stops_everything() {
    if !root_or_skip("userspace_lease_fence (two network namespaces, TUN)") {
        return;
    }
    let metrics = TestRecorder::install();
    let bed = Bed::new("lease");
    let gate = Arc::new(FenceGate::new());
    gate.renew_until(gate.now_ms() + 600_000);
    let (driver, _ike) = bed.driver(Arc::clone(&gate));
    // AES-128 without ESN this time; a lease of 5 sequence numbers
    driver
        .start(child_start(Suite::AesGcm128, false, 5))
        .unwrap();
    let mut peer = Peer::new(bed.peer_socket(), Suite::AesGcm128, false);
    let app = bed.gw_socket(SocketAddr::from((GW_INNER, APP_PORT)));
    let peer_app = SocketAddr::from((PEER_INNER, PEER_APP_PORT));

    let send_burst = |n: usize, tag: &str| {
        for i in 0..n {
            app.send_to(format!("{tag} {i}").as_bytes(), peer_app)
                .unwrap();
        }
    };
    let drain = |peer: &mut Peer| {
        let mut seqs = Vec::new();
        while let Some((seq, _)) = peer.recv_inner() {
            seqs.push(seq);
        }
        seqs
    };

    send_burst(10, "first");
    assert_eq!(
        drain(&mut peer),
        vec![1, 2, 3, 4, 5],
        "nothing above the limit of 5"
    );
    let counters = driver.counters(IN_SPI).unwrap();
    assert_eq!(
        (
            counters.highest_out,
            counters.out_packets,
            counters.lease_waits
        ),
        (5, 5, 5)
    );
    assert_eq!(metrics.counter(names::LEASE_WAITS, None), 5);

    driver.extend(IN_SPI, 3); // lower: ignored
    send_burst(2, "still exhausted");
    assert_eq!(drain(&mut peer), Vec::<u64>::new());
    driver.extend(IN_SPI, 12);
    send_burst(10, "second");
    assert_eq!(
        drain(&mut peer),
        (6..=12).collect::<Vec<_>>(),
        "up to the new limit, no gap"
    );
    let counters = driver.counters(IN_SPI).unwrap();
    assert_eq!((counters.highest_out, counters.lease_waits), (12, 10));

    // the gate closes (the node lost the cluster): nothing out, nothing in
    gate.close();
    send_burst(3, "fenced");
    for i in 0..3 {
        peer.send_inner(&ipv4_udp(
            PEER_INNER,
            PEER_APP_PORT,
            GW_INNER,
            APP_PORT,
            format!("fenced {i}").as_bytes(),
        ));
    }
    assert_eq!(drain(&mut peer), Vec::<u64>::new());
    assert_eq!(recv_app(&app), None);
    assert_eq!(
        metrics.counter(names::FENCED_DROPS, Some(("direction", "out"))),
        3
    );
    assert_eq!(
        metrics.counter(names::FENCED_DROPS, Some(("direction", "in"))),
        3
    );
    let counters = driver.counters(IN_SPI).unwrap();
    assert_eq!(
        (
            counters.highest_out,
            counters.in_packets,
            counters.highest_in
        ),
        (12, 0, 0)
    );

    // renewed: traffic flows again, nothing queued from the fenced period comes out
    gate.renew_until(gate.now_ms() + 600_000);
    driver.extend(IN_SPI, 100);
    app.send_to(b"renewed", peer_app).unwrap();
    assert_eq!(drain(&mut peer), vec![13]);
    peer.send_inner(&ipv4_udp(
        PEER_INNER,
        PEER_APP_PORT,
        GW_INNER,
        APP_PORT,
        b"renewed",
    ));
    assert_eq!(recv_app(&app).map(|(p, _)| p), Some(b"renewed".to_vec()));
    assert_eq!(recv_app(&app), None);

    // the node's own fence works the same, and set_fenced(false) lifts it
    driver.set_fenced(true);
    app.send_to(b"node fenced", peer_app).unwrap();
    peer.send_inner(&ipv4_udp(
        PEER_INNER,
        PEER_APP_PORT,
        GW_INNER,
        APP_PORT,
        b"node fenced",
    ));
    assert_eq!(drain(&mut peer), Vec::<u64>::new());
    assert_eq!(recv_app(&app), None);
    driver.set_fenced(false);
    app.send_to(b"unfenced", peer_app).unwrap();
    assert_eq!(drain(&mut peer), vec![14]);
    let last = driver.stop(IN_SPI).unwrap();
    assert_eq!(
        (last.highest_out, last.out_packets, last.in_packets),
        (14, 14, 1)
    );
}
