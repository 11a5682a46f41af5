//! End to end with a real node (root): an `evpc-node` process with the userspace data plane in
//! one network namespace, a peer built from the `evpc-esp` crate in another, joined by a veth
//! pair. The SA reaches the node the way production ones do — committed to the replicated
//! state with its keys sealed under the cluster key — and the owner runtime starts it on the
//! data plane. UDP crosses the tunnel both ways; a replayed datagram is dropped and counted
//! (Prometheus metrics of the node).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use evpc_dataplane::ChildKeymat;
use evpc_dataplane::netns::{NetNs, root_or_skip, veth_pair};
use evpc_esp::{
    InboundConfig, InboundSa, Keymat, NextHeader, Opened, OutboundConfig, OutboundSa,
    SEAL_HEADROOM, Suite,
};
use evpc_node::sealing::{ClusterKey, Keyring};
use evpc_raft_store::{
    ChildSa, ChildSuite, Epoch, Identity, IkeSa, IkeSuite, MessageIds, Role, SaContext, SaId,
    SaTimes, SealedKeys, TrafficSelector,
};
use zeroize::Zeroizing;

const GW_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const PEER_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
const GW_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 1);
const PEER_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 5);
const IN_SPI: u32 = 0x0000_c0de;
const OUT_SPI: u32 = 0x0000_d0de;
const ADMIN: u16 = 7_991;
const METRICS: u16 = 7_992;
const SA: SaId = SaId(0x7777);

/// Kills the node process however the test ends.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ipv4_udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 20 + 8 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for chunk in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    // UDP checksum 0: none (allowed over IPv4, RFC 768).
    p[28..].copy_from_slice(payload);
    p
}

fn keymat(byte: u8) -> Vec<u8> {
    vec![byte; 16 + 4]
}

fn imported_sa(key: &ClusterKey) -> Vec<u8> {
    let epoch = Epoch::FIRST;
    let keys = ChildKeymat {
        inbound: Zeroizing::new(keymat(0x11)),
        outbound: Zeroizing::new(keymat(0x22)),
    };
    let selector = |addr: Ipv4Addr, last: Ipv4Addr| TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: 65535,
        start_addr: IpAddr::V4(addr),
        end_addr: IpAddr::V4(last),
    };
    let child = ChildSa {
        in_spi: IN_SPI,
        out_spi: OUT_SPI,
        suite: ChildSuite {
            encryption: 20,
            key_bits: 128,
            esn: true,
        },
        keys: SealedKeys::default(),
        ts_local: vec![selector(
            Ipv4Addr::new(198, 19, 7, 0),
            Ipv4Addr::new(198, 19, 7, 255),
        )],
        ts_remote: vec![selector(PEER_INNER, PEER_INNER)],
        out_start: 1,
        out_hwm: 1_000,
        in_checkpoint: 0,
        udp_encap: true,
        rekey_generation: 0,
        times: SaTimes::default(),
    };
    let mut child = child;
    child.keys = key.seal_child(SA, epoch, &child, &keys, [5; 12]);
    let sa = IkeSa {
        id: SA,
        spi_i: 0x1111,
        spi_r: SA.0,
        role: Role::Responder,
        local: SocketAddr::from((GW_OUTER, 4500)),
        peer: SocketAddr::from((PEER_OUTER, 4500)),
        local_id: Identity::fqdn("gw.example"),
        peer_id: Identity::fqdn("peer.example"),
        suite: IkeSuite {
            encryption: 20,
            key_bits: 128,
            prf: 5,
            integrity: None,
            dh_group: 31,
        },
        keys: SealedKeys::default(),
        msg: MessageIds::default(),
        last_response: None,
        pending_request: None,
        times: SaTimes::default(),
        last_peer_activity_ms: 0,
        rekey_generation: 0,
        virtual_ip: Some(IpAddr::V4(PEER_INNER)),
        slot: 0,
        owner: 0,
        epoch,
        children: BTreeMap::from([(IN_SPI, child)]),
    };
    key.seal_context(&SaContext::new(sa, true, None, 1), [9; 12])
}

/// The node's Prometheus text, fetched from inside its namespace.
fn scrape() -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", METRICS)).expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// Sum of a counter's samples in Prometheus text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_node_with_the_userspace_data_plane_carries_udp_both_ways_and_drops_replays() {
    if !root_or_skip("userspace_node (network namespaces, TUN, a node process)") {
        return;
    }
    let gw = NetNs::create("node-gw").expect("namespace");
    let peer = NetNs::create("node-peer").expect("namespace");
    veth_pair(
        &gw,
        "evpcgw0",
        (IpAddr::V4(GW_OUTER), 24),
        &peer,
        "evpcpeer0",
        (IpAddr::V4(PEER_OUTER), 24),
    )
    .expect("veth pair");

    let dir = tempfile::tempdir().unwrap();
    let pki = evpc_node::pki::PkiDir::new(dir.path().join("pki"));
    pki.ensure_local(&[1], evpc_testkit::local::LOCAL_OPERATOR)
        .unwrap();
    let key_file = pki.cluster_key();
    let key = Keyring::load(&key_file)
        .unwrap()
        .get(evpc_raft_store::KeyId(1))
        .unwrap();
    let tls = pki.node(1);
    let operator = pki.client(evpc_testkit::local::LOCAL_OPERATOR);
    let security = evpc_api::Security::Tls(
        evpc_api::ClientTls::load(&operator.ca_file, &operator.cert_file, &operator.key_file)
            .unwrap(),
    );
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"id = 1
raft_addr = "127.0.0.1:7990"
admin_addr = "127.0.0.1:{ADMIN}"
data_dir = "{data}"
cluster_key_file = "{key}"
metrics_addr = "127.0.0.1:{METRICS}"
[dataplane]
backend = "userspace"
cluster_address = "{GW_OUTER}"
[dataplane.tun]
name = "evpcnode0"
addresses = ["{GW_INNER}/24"]
routes = ["198.19.8.0/24"]
[tls]
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{tls_key}"
"#,
            data = dir.path().join("data").display(),
            key = key_file.display(),
            ca = tls.ca_file.display(),
            cert = tls.cert_file.display(),
            tls_key = tls.key_file.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let node = NodeProcess(
        Command::new("ip")
            .args(["netns", "exec", gw.name()])
            .arg(PathBuf::from(env!("CARGO_BIN_EXE_evpc-node")))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the node"),
    );
    let log_path = dir.path().join("node.log");
    let node_log = move || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Bootstrap a one-node cluster and commit the SA, from inside the node's namespace.
    let context = imported_sa(&key);
    let node_log_for_admin = node_log.clone();
    gw.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut admin = evpc_api::AdminClient::new(
                &[format!("127.0.0.1:{ADMIN}")],
                Duration::from_secs(2),
                security,
            )
            .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while admin.status(false).await.is_err() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node never answered:\n{}",
                    node_log_for_admin()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            admin.initialize(vec![]).await.unwrap();
            loop {
                let s = admin.status(false).await.unwrap();
                if s.members.first().is_some_and(|m| m.slots == 1024) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no slots:\n{}",
                    node_log_for_admin()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let imported = admin.import_sa(context, None).await.unwrap();
            assert_eq!(imported.owner, 1);
            loop {
                let s = admin.status(false).await.unwrap();
                if s.running_children == 1 && !s.fenced {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "child never started: {s:?}\n{}",
                    node_log_for_admin()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    })
    .unwrap();

    // The peer: seals with the gateway's inbound key, opens with its outbound key.
    let peer_socket = peer
        .run(|| UdpSocket::bind(SocketAddr::from((PEER_OUTER, 4500))).unwrap())
        .unwrap();
    peer_socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let gw_app = gw
        .run(|| UdpSocket::bind(SocketAddr::from((GW_INNER, 7000))).unwrap())
        .unwrap();
    gw_app
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut to_gw = OutboundSa::new(OutboundConfig {
        spi: IN_SPI,
        keymat: Keymat::new(Suite::AesGcm128, &keymat(0x11)).unwrap(),
        esn: true,
        first_seq: 1,
        limit: u64::MAX,
    })
    .unwrap();
    let mut from_gw = InboundSa::new(InboundConfig {
        spi: OUT_SPI,
        keymat: Keymat::new(Suite::AesGcm128, &keymat(0x22)).unwrap(),
        esn: true,
        window_size: 64,
        checkpoint: 0,
    })
    .unwrap();
    let gw_natt = SocketAddr::from((GW_OUTER, 4500));

    // Peer → tunnel → gateway's TUN → an application on the gateway side.
    let mut sent = Vec::new();
    for i in 0..10u32 {
        let inner = ipv4_udp(
            PEER_INNER,
            7001,
            GW_INNER,
            7000,
            format!("up {i}").as_bytes(),
        );
        let mut buf = vec![0u8; 2048];
        buf[SEAL_HEADROOM..SEAL_HEADROOM + inner.len()].copy_from_slice(&inner);
        let n = to_gw
            .seal_in_place(&mut buf, inner.len(), NextHeader::IPV4)
            .unwrap();
        peer_socket.send_to(&buf[..n], gw_natt).unwrap();
        sent.push(buf[..n].to_vec());
        let mut got = [0u8; 512];
        let (len, from) = gw_app
            .recv_from(&mut got)
            .unwrap_or_else(|e| panic!("datagram {i} never arrived ({e}):\n{}", node_log()));
        assert_eq!(&got[..len], format!("up {i}").as_bytes());
        assert_eq!(from, SocketAddr::from((PEER_INNER, 7001)));
    }

    // A replayed ESP datagram is dropped, not delivered twice.
    peer_socket.send_to(&sent[3], gw_natt).unwrap();
    gw_app
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = [0u8; 512];
    assert!(
        gw_app.recv_from(&mut got).is_err(),
        "a replay reached the application"
    );

    // Gateway application → TUN → sealed by the node → the peer opens it.
    for i in 0..10u32 {
        gw_app
            .send_to(
                format!("down {i}").as_bytes(),
                SocketAddr::from((PEER_INNER, 7001)),
            )
            .unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, from) = peer_socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no ESP from the gateway ({e}):\n{}", node_log()));
        assert_eq!(from, gw_natt);
        match from_gw.open(&mut buf[..n]).unwrap() {
            Opened::Packet { seq, payload, .. } => {
                // The context had committed up to 1000: the import starts above it.
                assert_eq!(
                    seq,
                    1_001 + u64::from(i),
                    "sequence numbers start above everything the context could have used"
                );
                assert_eq!(&payload[28..], format!("down {i}").as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    let metrics = gw.run(scrape).unwrap();
    assert!(
        counter(&metrics, "evpc_dataplane_replay_drops_total") >= 1,
        "{metrics}"
    );
    assert!(
        counter(&metrics, "evpc_dataplane_packets_total") >= 20,
        "{metrics}"
    );
    drop(node);
}
