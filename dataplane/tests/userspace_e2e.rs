//! End to end (root): the userspace backend in one network namespace, a peer built from the
//! `evpc-esp` crate in another, UDP through the tunnel both ways, replays and forgeries dropped
//! and counted, ESP for unknown SPIs ignored, IKE handed to the node and sent for it, and `stop`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use evpc_dataplane::ike::IkePort;
use evpc_dataplane::metrics::names;
use evpc_dataplane::netns::root_or_skip;
use evpc_dataplane::{FenceGate, SaDriver};
use evpc_esp::Suite;

#[test]
fn udp_crosses_the_tunnel_both_ways_and_replays_are_dropped() {
    if !root_or_skip("userspace_e2e (two network namespaces, TUN)") {
        return;
    }
    let metrics = TestRecorder::install();
    let bed = Bed::new("e2e");
    let (driver, mut ike_rx) = bed.driver(Arc::new(FenceGate::always_open()));
    driver
        .start(child_start(Suite::AesGcm256, true, 1_000))
        .unwrap();
    assert!(matches!(
        driver.start(child_start(Suite::AesGcm256, true, 1_000)),
        Err(evpc_dataplane::DriverError::AlreadyRunning(IN_SPI))
    ));
    let mut peer = Peer::new(bed.peer_socket(), Suite::AesGcm256, true);
    let app = bed.gw_socket(SocketAddr::from((GW_INNER, APP_PORT)));
    let peer_app = SocketAddr::from((PEER_INNER, PEER_APP_PORT));

    // gateway app → TUN → ESP → peer
    for i in 1..=20u64 {
        app.send_to(format!("to-peer {i}").as_bytes(), peer_app)
            .unwrap();
        let (seq, inner) = peer
            .recv_inner()
            .expect("the peer receives the gateway's packet");
        assert_eq!(seq, i, "sequence numbers start at next_seq and count up");
        let udp = parse_ipv4_udp(&inner);
        assert_eq!(udp.src, SocketAddr::from((GW_INNER, APP_PORT)));
        assert_eq!(udp.dst, peer_app);
        assert_eq!(udp.payload, format!("to-peer {i}").as_bytes());
    }

    // peer → ESP → gateway → TUN → app
    let mut sent = Vec::new();
    for i in 1..=20u64 {
        let inner = ipv4_udp(
            PEER_INNER,
            PEER_APP_PORT,
            GW_INNER,
            APP_PORT,
            format!("to-gw {i}").as_bytes(),
        );
        sent.push(peer.send_inner(&inner));
        let (payload, from) = recv_app(&app).expect("the app receives the peer's packet");
        assert_eq!(payload, format!("to-gw {i}").as_bytes());
        assert_eq!(from, peer_app);
    }
    let counters = driver.counters(IN_SPI).unwrap();
    assert_eq!((counters.out_packets, counters.highest_out), (20, 20));
    assert_eq!((counters.in_packets, counters.highest_in), (20, 20));

    // a replayed datagram is dropped and counted, per child and in the metric
    peer.socket.send_to(&sent[4], peer.gw).unwrap();
    assert_eq!(recv_app(&app), None, "a replay must not be delivered");
    let counters = driver.counters(IN_SPI).unwrap();
    assert_eq!((counters.replay_drops, counters.in_packets), (1, 20));
    assert_eq!(metrics.counter(names::REPLAY_DROPS, None), 1);

    // a forged one fails the ICV and does not advance the window
    let inner = ipv4_udp(PEER_INNER, PEER_APP_PORT, GW_INNER, APP_PORT, b"forged");
    let mut forged = peer.send_inner(&inner); // seq 21, delivered
    assert_eq!(recv_app(&app).map(|(p, _)| p), Some(b"forged".to_vec()));
    forged[4..8].copy_from_slice(&22u32.to_be_bytes()); // claims seq 22 under seq 21's ICV
    peer.socket.send_to(&forged, peer.gw).unwrap();
    assert_eq!(recv_app(&app), None);
    assert_eq!(driver.counters(IN_SPI).unwrap().auth_failures, 1);
    assert_eq!(metrics.counter(names::AUTH_FAILURES, None), 1);

    // ESP for an SPI this node does not drive, and a NAT-keepalive: ignored, counted
    let mut foreign = sent[0].clone();
    foreign[..4].copy_from_slice(&0x00ab_cdefu32.to_be_bytes());
    peer.socket.send_to(&foreign, peer.gw).unwrap();
    peer.socket.send_to(&[0xff], peer.gw).unwrap();

    // IKE on 4500 behind the non-ESP marker reaches the node without it, and the answer goes
    // out with it
    peer.socket
        .send_to(b"\0\0\0\0IKE_SA_INIT request", peer.gw)
        .unwrap();
    let ike = recv_ike(&mut ike_rx);
    assert_eq!(ike.port, IkePort::NatT);
    assert_eq!(ike.message, b"IKE_SA_INIT request");
    assert_eq!(ike.remote, peer.socket.local_addr().unwrap());
    assert_eq!(ike.local, driver.natt_addr());
    driver
        .send_ike(IkePort::NatT, ike.remote, b"IKE_SA_INIT response")
        .unwrap();
    assert_eq!(peer.recv_raw().unwrap(), b"\0\0\0\0IKE_SA_INIT response");
    // and on 500, as it is
    let ike500 = bed
        .peer
        .run(|| std::net::UdpSocket::bind(SocketAddr::from((PEER_OUTER, 500))))
        .unwrap()
        .unwrap();
    ike500
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    ike500
        .send_to(b"plain IKE", SocketAddr::from((GW_OUTER, 500)))
        .unwrap();
    let ike = recv_ike(&mut ike_rx);
    assert_eq!(
        (ike.port, &ike.message[..]),
        (IkePort::Ike, &b"plain IKE"[..])
    );
    driver
        .send_ike(IkePort::Ike, ike.remote, b"plain reply")
        .unwrap();
    let mut buffer = [0u8; 64];
    let (len, from) = ike500.recv_from(&mut buffer).unwrap();
    assert_eq!(
        (&buffer[..len], from),
        (&b"plain reply"[..], SocketAddr::from((GW_OUTER, 500)))
    );

    // the unknown-SPI datagram and the keepalive were processed before the IKE datagram behind
    // them (one worker, in order)
    assert_eq!(metrics.counter(names::UNKNOWN_SPI, None), 1);
    assert_eq!(metrics.counter(names::KEEPALIVES, None), 1);
    assert_eq!(
        metrics.counter(names::PACKETS, Some(("direction", "in"))),
        21
    );
    assert_eq!(
        metrics.counter(names::PACKETS, Some(("direction", "out"))),
        20
    );
    assert!(metrics.counter(names::BYTES, Some(("direction", "out"))) >= 20 * 28);

    // stop: final counters, and from then on the SPI is unknown here
    let last = driver.stop(IN_SPI).expect("the child was running");
    assert_eq!(
        (last.highest_out, last.highest_in, last.in_packets),
        (20, 21, 21)
    );
    assert_eq!(driver.counters(IN_SPI), None);
    assert_eq!(driver.stop(IN_SPI), None);
    let inner = ipv4_udp(PEER_INNER, PEER_APP_PORT, GW_INNER, APP_PORT, b"after stop");
    peer.send_inner(&inner);
    app.send_to(b"after stop", peer_app).unwrap();
    assert_eq!(recv_app(&app), None);
    assert_eq!(
        peer.recv_inner(),
        None,
        "nothing is sent for a stopped child"
    );
    assert_eq!(metrics.counter(names::UNKNOWN_SPI, None), 2);
    assert!(metrics.counter(names::NO_CHILD, None) >= 1);

    // a child without keys is refused
    let mut keyless = child_start(Suite::AesGcm128, false, 10);
    keyless.keys = None;
    assert!(matches!(
        driver.start(keyless),
        Err(evpc_dataplane::DriverError::Unsupported { .. })
    ));
    // an IPv6 peer on an IPv4 cluster socket too
    let mut v6 = child_start(Suite::AesGcm128, false, 10);
    v6.peer = SocketAddr::new(IpAddr::V6("2001:db8::1".parse().unwrap()), 4500);
    assert!(driver.start(v6).is_err());
    assert_eq!(driver.running(), Vec::<u32>::new());
}

fn recv_ike(rx: &mut evpc_dataplane::ike::IkeReceiver) -> evpc_dataplane::ike::IkeDatagram {
    for _ in 0..150 {
        if let Ok(datagram) = rx.try_recv() {
            return datagram;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no IKE datagram reached the node's channel");
}
