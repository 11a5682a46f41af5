//! Shared test harness: two namespaces joined by a veth pair, the userspace backend in one
//! (`gw`), a peer built from the `evpc-esp` crate in the other (`peer`), and a metrics recorder.
//!
//! ```text
//!  ns gw                                                   ns peer
//!  app socket 198.19.1.1:7000                              UDP socket 198.18.0.2:4500
//!     │  ▲                                                    │ ▲  (seals and opens itself)
//!     ▼  │ route 198.19.2.0/24 dev evpc0                       │ │
//!  TUN evpc0 ⇄ UserspaceDriver ⇄ 198.18.0.1:4500 ═══ veth ═════╧═╛
//! ```

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use evpc_dataplane::ike::IkeReceiver;
use evpc_dataplane::netns::{NetNs, veth_pair};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::{ENCR_AES_GCM_16, TunConfig, UserspaceConfig, UserspaceDriver};
use evpc_dataplane::{ChildKeymat, ChildStart, FenceGate};
use evpc_esp::{
    InboundConfig, InboundSa, Keymat, NextHeader, Opened, OutboundConfig, OutboundSa, Suite,
};
use evpc_raft_store::{ChildSuite, Epoch, SaId};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use zeroize::Zeroizing;

pub const GW_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const PEER_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const GW_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const PEER_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 5);
pub const APP_PORT: u16 = 7000;
pub const PEER_APP_PORT: u16 = 7001;
/// SPI of packets the peer sends the gateway.
pub const IN_SPI: u32 = 0x0000_c001;
/// SPI of packets the gateway sends the peer.
pub const OUT_SPI: u32 = 0x0000_d001;

// ---------------------------------------------------------------- metrics

/// A recorder that keeps every counter as an atomic, to read back in assertions.
#[derive(Debug, Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<Key, Arc<AtomicU64>>>,
}

impl TestRecorder {
    /// Installs the process-wide recorder once and returns it.
    pub fn install() -> &'static TestRecorder {
        static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
        RECORDER.get_or_init(|| {
            let recorder: &'static TestRecorder = Box::leak(Box::default());
            metrics::set_global_recorder(recorder).expect("no other recorder in this test binary");
            recorder
        })
    }

    /// Sum of a counter over all its label sets, optionally only those with `label = value`.
    pub fn counter(&self, name: &str, label: Option<(&str, &str)>) -> u64 {
        let counters = self.counters.lock().unwrap();
        counters
            .iter()
            .filter(|(key, _)| key.name() == name)
            .filter(|(key, _)| {
                label.is_none_or(|(k, v)| key.labels().any(|l| l.key() == k && l.value() == v))
            })
            .map(|(_, value)| value.load(Ordering::Relaxed))
            .sum()
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        let atomic = counters.entry(key.clone()).or_default();
        Counter::from_arc(Arc::clone(atomic))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

// ---------------------------------------------------------------- inner packets

/// An IPv4/UDP packet with a correct header checksum and no UDP checksum (allowed for IPv4,
/// RFC 768).
pub fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let checksum = ipv4_checksum(&p[..20]);
    p[10..12].copy_from_slice(&checksum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The addresses, ports and payload of an IPv4/UDP packet.
#[derive(Debug, PartialEq, Eq)]
pub struct UdpInner {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

pub fn parse_ipv4_udp(packet: &[u8]) -> UdpInner {
    assert_eq!(packet[0] >> 4, 4, "IPv4");
    assert_eq!(packet[9], 17, "UDP");
    let header = usize::from(packet[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let port = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
    UdpInner {
        src: SocketAddr::new(IpAddr::V4(addr(12)), port(header)),
        dst: SocketAddr::new(IpAddr::V4(addr(16)), port(header + 2)),
        payload: packet[header + 8..total].to_vec(),
    }
}

// ---------------------------------------------------------------- the test bed

/// Two namespaces and a veth cable: 198.18.0.1/24 (gw0) ↔ 198.18.0.2/24 (peer0).
pub struct Bed {
    pub gw: NetNs,
    pub peer: NetNs,
}

impl Bed {
    pub fn new(tag: &str) -> Bed {
        let gw = NetNs::create(&format!("{tag}-gw")).expect("creating the gateway namespace");
        let peer = NetNs::create(&format!("{tag}-peer")).expect("creating the peer namespace");
        veth_pair(
            &gw,
            "gw0",
            (IpAddr::V4(GW_OUTER), 24),
            &peer,
            "peer0",
            (IpAddr::V4(PEER_OUTER), 24),
        )
        .expect("veth pair");
        Bed { gw, peer }
    }

    /// The userspace backend inside the gateway namespace, TUN `evpc0` with 198.19.1.1/24 and
    /// a route to the peer's inner network 198.19.2.0/24.
    pub fn driver(&self, gate: Arc<FenceGate>) -> (Arc<UserspaceDriver>, IkeReceiver) {
        let config = UserspaceConfig {
            replay_window: 64,
            ..UserspaceConfig::new(
                IpAddr::V4(GW_OUTER),
                TunConfig {
                    addresses: vec![(IpAddr::V4(GW_INNER), 24)],
                    routes: vec![(IpAddr::V4(Ipv4Addr::new(198, 19, 2, 0)), 24)],
                    ..TunConfig::named("evpc0")
                },
            )
        };
        let (driver, ike) = self
            .gw
            .run(move || UserspaceDriver::new(config, gate))
            .expect("thread in the gateway namespace")
            .expect("userspace driver");
        (Arc::new(driver), ike)
    }

    /// A UDP socket bound in the gateway namespace (on the TUN's address).
    pub fn gw_socket(&self, addr: SocketAddr) -> UdpSocket {
        let socket = self
            .gw
            .run(move || UdpSocket::bind(addr))
            .unwrap()
            .expect("binding in the gateway namespace");
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        socket
    }

    /// The peer's outer socket, 198.18.0.2:4500.
    pub fn peer_socket(&self) -> UdpSocket {
        let socket = self
            .peer
            .run(|| UdpSocket::bind(SocketAddr::from((PEER_OUTER, 4500))))
            .unwrap()
            .expect("binding in the peer namespace");
        socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        socket
    }
}

/// Keys of the test child: (gateway inbound = peer outbound, gateway outbound = peer inbound).
pub fn keys(suite: Suite) -> (Vec<u8>, Vec<u8>) {
    let len = suite.keymat_len();
    let a = (0..len).map(|i| (i * 7 + 1) as u8).collect();
    let b = (0..len).map(|i| (i * 13 + 5) as u8).collect();
    (a, b)
}

/// The gateway's view of the test child.
pub fn child_start(suite: Suite, esn: bool, limit: u64) -> ChildStart {
    let (inbound, outbound) = keys(suite);
    ChildStart {
        ike: SaId(0x42),
        epoch: Epoch::FIRST,
        in_spi: IN_SPI,
        out_spi: OUT_SPI,
        suite: ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: if suite == Suite::AesGcm128 { 128 } else { 256 },
            esn,
        },
        keys: Some(ChildKeymat {
            inbound: Zeroizing::new(inbound),
            outbound: Zeroizing::new(outbound),
        }),
        ts_local: vec![prefix_selector(
            IpAddr::V4(Ipv4Addr::new(198, 19, 1, 0)),
            24,
        )],
        ts_remote: vec![prefix_selector(IpAddr::V4(PEER_INNER), 32)],
        local: SocketAddr::from((GW_OUTER, 4500)),
        peer: SocketAddr::from((PEER_OUTER, 4500)),
        udp_encap: true,
        next_seq: 1,
        limit,
        replay_floor: 0,
    }
}

/// The road warrior: seals and opens with the `evpc-esp` crate over a plain UDP socket.
pub struct Peer {
    pub socket: UdpSocket,
    pub tx: OutboundSa,
    pub rx: InboundSa,
    pub gw: SocketAddr,
}

impl Peer {
    pub fn new(socket: UdpSocket, suite: Suite, esn: bool) -> Peer {
        let (gw_inbound, gw_outbound) = keys(suite);
        Peer {
            socket,
            tx: OutboundSa::new(OutboundConfig {
                spi: IN_SPI,
                keymat: Keymat::new(suite, &gw_inbound).unwrap(),
                esn,
                first_seq: 1,
                limit: u64::MAX,
            })
            .unwrap(),
            rx: InboundSa::new(InboundConfig {
                spi: OUT_SPI,
                keymat: Keymat::new(suite, &gw_outbound).unwrap(),
                esn,
                window_size: 64,
                checkpoint: 0,
            })
            .unwrap(),
            gw: SocketAddr::from((GW_OUTER, 4500)),
        }
    }

    /// Seals `inner` and sends it to the gateway; returns the datagram (to replay it).
    pub fn send_inner(&mut self, inner: &[u8]) -> Vec<u8> {
        let mut datagram = vec![0u8; evpc_esp::sealed_len(inner.len()).unwrap()];
        let len = self
            .tx
            .seal(inner, NextHeader::IPV4, &mut datagram)
            .unwrap();
        datagram.truncate(len);
        self.socket.send_to(&datagram, self.gw).unwrap();
        datagram
    }

    /// Waits for the next ESP datagram from the gateway and opens it: (sequence number, inner
    /// packet). `None` on timeout.
    pub fn recv_inner(&mut self) -> Option<(u64, Vec<u8>)> {
        let mut buffer = vec![0u8; 65536];
        let (len, from) = match self.socket.recv_from(&mut buffer) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("peer recv: {e}"),
        };
        assert_eq!(from, self.gw, "ESP comes from the cluster socket");
        match self.rx.open(&mut buffer[..len]) {
            Ok(Opened::Packet {
                seq,
                next_header,
                payload,
            }) => {
                assert_eq!(next_header, NextHeader::IPV4);
                Some((seq, payload.to_vec()))
            }
            other => panic!("peer could not open a datagram from the gateway: {other:?}"),
        }
    }

    /// Receives a raw datagram (IKE tests).
    pub fn recv_raw(&self) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; 65536];
        match self.socket.recv_from(&mut buffer) {
            Ok((len, _)) => Some(buffer[..len].to_vec()),
            Err(_) => None,
        }
    }
}

/// Receives one datagram on an app socket, `None` on timeout.
pub fn recv_app(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buffer = vec![0u8; 65536];
    match socket.recv_from(&mut buffer) {
        Ok((len, from)) => Some((buffer[..len].to_vec(), from)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("app recv: {e}"),
    }
}
