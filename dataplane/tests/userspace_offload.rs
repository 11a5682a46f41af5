//! End to end (root): TCP through two userspace data planes with TUN segmentation offloads, over
//! IPv4 and IPv6 inner addresses, several MB each way with the content checked byte for byte.
//! The sender's kernel hands its TUN device TCP super-packets, which the data plane cuts into
//! segments and seals one by one; the receiving data plane coalesces the opened segments into
//! GSO writes, so both halves of the offloads and the kernel's acceptance of what we write are
//! exercised. The same transfer runs once more with the offloads off.
//!
//! ```text
//!  ns a: TCP 198.19.1.1 / fd00:1::1                       ns b: TCP 198.19.2.1 / fd00:2::1
//!        TUN offa ⇄ UserspaceDriver ⇄ 198.18.0.1:4500 ═ veth ═ 198.18.0.2:4500 ⇄ UserspaceDriver ⇄ TUN offb
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evpc_dataplane::netns::{NetNs, root_or_skip, veth_pair};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::{
    ENCR_AES_GCM_16, TunConfig, TunOffloads, UserspaceConfig, UserspaceDriver,
};
use evpc_dataplane::{ChildKeymat, ChildStart, FenceGate, SaDriver};
use evpc_raft_store::{ChildSuite, Epoch, SaId};

const A_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const A_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const B_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
const A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
/// SPI of A → B packets (B's inbound).
const SPI_A_TO_B: u32 = 0x0000_2001;
/// SPI of B → A packets (A's inbound).
const SPI_B_TO_A: u32 = 0x0000_1001;
/// Bytes each way per transfer.
const TRANSFER: usize = 6 << 20;

#[test]
fn tcp_crosses_two_data_planes_with_tun_offloads_ipv4_and_ipv6() {
    if !root_or_skip("userspace_offload (two network namespaces, two TUN devices, TCP)") {
        return;
    }
    let (a, b) = (
        NetNs::create("offl-a").unwrap(),
        NetNs::create("offl-b").unwrap(),
    );
    veth_pair(
        &a,
        "a0",
        (IpAddr::V4(A_OUTER), 24),
        &b,
        "b0",
        (IpAddr::V4(B_OUTER), 24),
    )
    .unwrap();
    let (driver_a, driver_b) = tunnel(&a, &b, true);
    let (a_offloads, b_offloads) = (
        driver_a
            .tun_offloads()
            .expect("this kernel takes TUN offloads"),
        driver_b
            .tun_offloads()
            .expect("this kernel takes TUN offloads"),
    );
    assert_eq!(
        (a_offloads, b_offloads),
        (TunOffloads::default(), TunOffloads::default())
    );

    for server in [IpAddr::V4(B_V4), IpAddr::V6(B_V6)] {
        transfer(&a, &b, server, TRANSFER);
    }

    let (a_offloads, b_offloads) = (
        driver_a.tun_offloads().unwrap(),
        driver_b.tun_offloads().unwrap(),
    );
    eprintln!("offloads: a {a_offloads:?}, b {b_offloads:?}");
    for (side, offloads) in [("a", a_offloads), ("b", b_offloads)] {
        assert!(
            offloads.super_packets > 0 && offloads.segments > offloads.super_packets,
            "{side}'s kernel handed out TCP super-packets, cut into segments: {offloads:?}"
        );
        assert!(
            offloads.coalesced_writes > 0
                && offloads.coalesced_segments > offloads.coalesced_writes,
            "{side} wrote coalesced segments: {offloads:?}"
        );
    }
    for (driver, spi) in [(&driver_a, SPI_B_TO_A), (&driver_b, SPI_A_TO_B)] {
        let counters = driver.counters(spi).unwrap();
        assert_eq!(
            (
                counters.auth_failures,
                counters.replay_drops,
                counters.lease_waits
            ),
            (0, 0, 0),
            "{counters:?}"
        );
        assert!(counters.in_packets > (TRANSFER / 1500) as u64);
    }
    driver_a.shutdown();
    driver_b.shutdown();
    drop((driver_a, driver_b));

    // and the same without offloads: one packet per read and per write, no header
    let (driver_a, driver_b) = tunnel(&a, &b, false);
    assert_eq!(
        (driver_a.tun_offloads(), driver_b.tun_offloads()),
        (None, None)
    );
    transfer(&a, &b, IpAddr::V4(B_V4), TRANSFER / 4);
}

/// Two drivers (TUN `offa` in `a`, `offb` in `b`) with mirrored children carrying both inner
/// networks, IPv4 and IPv6, with TUN offloads or not.
fn tunnel(a: &NetNs, b: &NetNs, offload: bool) -> (Arc<UserspaceDriver>, Arc<UserspaceDriver>) {
    let gate = Arc::new(FenceGate::always_open());
    let driver = |ns: &NetNs,
                  tun: &str,
                  outer: Ipv4Addr,
                  local: (Ipv4Addr, Ipv6Addr),
                  remote: (Ipv4Addr, Ipv6Addr)| {
        let config = UserspaceConfig {
            ike_port: None,
            offload,
            ..UserspaceConfig::new(
                IpAddr::V4(outer),
                TunConfig {
                    addresses: vec![(IpAddr::V4(local.0), 24), (IpAddr::V6(local.1), 64)],
                    routes: vec![(IpAddr::V4(remote.0), 24), (IpAddr::V6(remote.1), 64)],
                    ..TunConfig::named(tun)
                },
            )
        };
        let gate = Arc::clone(&gate);
        Arc::new(
            ns.run(move || UserspaceDriver::new(config, gate))
                .unwrap()
                .expect("userspace driver")
                .0,
        )
    };
    let driver_a = driver(a, "offa", A_OUTER, (A_V4, A_V6), (B_V4, B_V6));
    let driver_b = driver(b, "offb", B_OUTER, (B_V4, B_V6), (A_V4, A_V6));
    let a_to_b: Vec<u8> = (0..20).map(|i| i * 7 + 3).collect();
    let b_to_a: Vec<u8> = (0..20).map(|i| i * 11 + 1).collect();
    let child = |in_spi,
                 out_spi,
                 inbound: &[u8],
                 outbound: &[u8],
                 local: (Ipv4Addr, Ipv6Addr),
                 remote: (Ipv4Addr, Ipv6Addr),
                 me,
                 peer| ChildStart {
        ike: SaId(0x0ff1),
        epoch: Epoch::FIRST,
        in_spi,
        out_spi,
        suite: ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: 128,
            esn: true,
        },
        keys: Some(ChildKeymat::new(inbound.to_vec(), outbound.to_vec())),
        ts_local: vec![
            prefix_selector(IpAddr::V4(local.0), 24),
            prefix_selector(IpAddr::V6(local.1), 64),
        ],
        ts_remote: vec![
            prefix_selector(IpAddr::V4(remote.0), 24),
            prefix_selector(IpAddr::V6(remote.1), 64),
        ],
        local: SocketAddr::from((me, 4500)),
        peer: SocketAddr::from((peer, 4500)),
        udp_encap: true,
        next_seq: 1,
        limit: u64::MAX >> 1,
        replay_floor: 0,
    };
    driver_a
        .start(child(
            SPI_B_TO_A,
            SPI_A_TO_B,
            &b_to_a,
            &a_to_b,
            (A_V4, A_V6),
            (B_V4, B_V6),
            A_OUTER,
            B_OUTER,
        ))
        .unwrap();
    driver_b
        .start(child(
            SPI_A_TO_B,
            SPI_B_TO_A,
            &a_to_b,
            &b_to_a,
            (B_V4, B_V6),
            (A_V4, A_V6),
            B_OUTER,
            A_OUTER,
        ))
        .unwrap();
    (driver_a, driver_b)
}

/// Byte `at` of the stream `seed`: depends on the position, so that a lost, repeated or
/// reordered segment shows.
fn pattern(seed: u64, at: usize) -> u8 {
    let mut x = seed ^ (at as u64 / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    (x >> (8 * (at % 8))) as u8
}

/// Sends `len` bytes from a client in `a` (its TUN address of the same family) to a server on
/// `server` in `b`, which checks them and sends `len` other bytes back, which the client checks.
fn transfer(a: &NetNs, b: &NetNs, server: IpAddr, len: usize) {
    let listen = SocketAddr::new(server, 5001);
    let listener = b.run(move || TcpListener::bind(listen)).unwrap().unwrap();
    let started = Instant::now();
    let serving = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let received = read_all(&mut stream, len);
        let upstream_ok = received
            .iter()
            .enumerate()
            .all(|(i, &byte)| byte == pattern(1, i));
        let reply: Vec<u8> = (0..len).map(|i| pattern(2, i)).collect();
        stream.write_all(&reply).expect("server write");
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        (received.len(), upstream_ok)
    });
    let mut stream = a
        .run(move || {
            let mut last = None;
            for _ in 0..50 {
                match TcpStream::connect_timeout(&listen, Duration::from_secs(2)) {
                    Ok(stream) => return stream,
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("connecting to {listen} through the tunnel: {last:?}");
        })
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let data: Vec<u8> = (0..len).map(|i| pattern(1, i)).collect();
    stream.write_all(&data).expect("client write");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let back = read_all(&mut stream, len);
    let (received, upstream_ok) = serving.join().unwrap();
    assert_eq!(received, len, "{server}: everything arrived");
    assert!(upstream_ok, "{server}: what arrived is what was sent");
    assert_eq!(back.len(), len, "{server}: everything came back");
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, &byte)| byte == pattern(2, i)),
        "{server}: what came back is what was sent"
    );
    eprintln!(
        "{} MB each way to {server} in {:.2?}",
        len >> 20,
        started.elapsed()
    );
}

/// Reads until EOF (at most `len` + 1 bytes, to see an excess).
fn read_all(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 1);
    stream
        .take(len as u64 + 1)
        .read_to_end(&mut out)
        .expect("reading the stream");
    out
}
