//! End to end (root): a child started in standby holds what arrives for it and sends nothing;
//! taking over it refuses the inbound numbers the previous owner accepted, then delivers and
//! sends what it held, in order; handing a child off returns what a successor needs, with the
//! digests of exactly the inner packets it sealed.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use evpc_dataplane::netns::root_or_skip;
use evpc_dataplane::{FenceGate, HandoverState, SaDriver, packet_digest};
use evpc_esp::Suite;

#[test]
fn a_standby_child_holds_then_takes_over_where_the_previous_owner_stopped() {
    if !root_or_skip("userspace_handover (two network namespaces, TUN)") {
        return;
    }
    let bed = Bed::new("handover");
    let gate = Arc::new(FenceGate::new());
    gate.renew_until(gate.now_ms() + 600_000);
    let (driver, _ike) = bed.driver(Arc::clone(&gate));
    driver
        .start_standby(child_start(Suite::AesGcm128, false, 1_000))
        .unwrap();
    let mut peer = Peer::new(bed.peer_socket(), Suite::AesGcm128, false);
    let app = bed.gw_socket(SocketAddr::from((GW_INNER, APP_PORT)));
    let peer_app = SocketAddr::from((PEER_INNER, PEER_APP_PORT));

    // Held, both ways: the peer's ESP 1..=5, the application's 3 packets.
    for i in 1..=5 {
        peer.send_inner(&ipv4_udp(
            PEER_INNER,
            PEER_APP_PORT,
            GW_INNER,
            APP_PORT,
            format!("up {i}").as_bytes(),
        ));
    }
    for i in 1..=3 {
        app.send_to(format!("down {i}").as_bytes(), peer_app)
            .unwrap();
    }
    assert_eq!(recv_app(&app), None, "nothing delivered in standby");
    assert_eq!(peer.recv_inner(), None, "nothing sent in standby");
    assert_eq!(driver.counters(IN_SPI).unwrap().in_packets, 0);

    // The previous owner accepted 1..=3 from the peer, and sealed nothing we held.
    let previous = HandoverState {
        highest_out: 0,
        inbound_accepted: vec![1, 2, 3],
        recent_out: vec![0x1234],
    };
    assert!(driver.take_over(IN_SPI, Some(&previous)));
    assert!(
        !driver.take_over(IN_SPI, Some(&previous)),
        "only a waiting child takes over"
    );
    let delivered: Vec<Vec<u8>> = std::iter::from_fn(|| recv_app(&app).map(|(p, _)| p)).collect();
    assert_eq!(delivered, vec![b"up 4".to_vec(), b"up 5".to_vec()]);
    let mut sent = Vec::new();
    while let Some((seq, inner)) = peer.recv_inner() {
        sent.push((seq, parse_ipv4_udp(&inner).payload, inner));
    }
    let payloads: Vec<(u64, Vec<u8>)> = sent.iter().map(|(s, p, _)| (*s, p.clone())).collect();
    assert_eq!(
        payloads,
        vec![
            (1, b"down 1".to_vec()),
            (2, b"down 2".to_vec()),
            (3, b"down 3".to_vec())
        ],
        "everything held, in order, from the first number"
    );

    // Running normally now; then handed off: its state names what it accepted and sealed.
    app.send_to(b"down 4", peer_app).unwrap();
    let (seq, inner) = peer.recv_inner().expect("sent after the take-over");
    assert_eq!(seq, 4);
    let state = driver.hand_off(IN_SPI).expect("running");
    assert_eq!(state.highest_out, 4);
    assert_eq!(state.inbound_accepted, vec![1, 2, 3, 4, 5]);
    let mut expected: Vec<u64> = sent.iter().map(|(_, _, p)| packet_digest(p)).collect();
    expected.push(packet_digest(&inner));
    assert_eq!(
        state.recent_out, expected,
        "digests of exactly what it sealed"
    );
    assert!(driver.counters(IN_SPI).is_none(), "handed off: stopped");
    app.send_to(b"after", peer_app).unwrap();
    assert_eq!(peer.recv_inner(), None, "nothing sent once handed off");

    // The old owner's side: a running child put on hold sends nothing until released, then
    // what it held, in order.
    let mut running = child_start(Suite::AesGcm128, false, 1_000);
    running.next_seq = 100;
    driver.start(running).unwrap();
    assert!(driver.hold(IN_SPI));
    for i in 1..=2 {
        app.send_to(format!("held {i}").as_bytes(), peer_app)
            .unwrap();
    }
    assert_eq!(peer.recv_inner(), None, "on hold: nothing sent");
    assert!(driver.take_over(IN_SPI, None));
    let released: Vec<(u64, Vec<u8>)> = std::iter::from_fn(|| peer.recv_inner())
        .map(|(seq, inner)| (seq, parse_ipv4_udp(&inner).payload))
        .collect();
    assert_eq!(
        released,
        vec![(100, b"held 1".to_vec()), (101, b"held 2".to_vec())]
    );
    let state = driver.hand_off(IN_SPI).unwrap();
    assert_eq!((state.highest_out, state.recent_out.len()), (101, 2));
}
