//! A ClusterIP test bed in network namespaces (needs root): gateway node processes and a client
//! on one L2 segment, every node receiving every packet sent to the cluster address — the
//! deployment model of the design brief. Used by the strongSwan cluster test and by
//! `evpc-chaos ike-bench`.
//!
//! ```text
//!                        ns lan: bridge br0 (no learning needed: see below)
//!        ┌──────────────┬──────────────┬──────────────┬───────────────┐
//!   ns client        ns node1        ns node2        ns node3        root ns
//!   c0 198.51.100.100 n0 .11         n0 .12          n0 .13          evr… .254 (admin API
//!   neigh .1 ─► 01:00:5e:00:00:01    lo 198.51.100.1/32 (cluster address) on every node,     access)
//!   (a multicast MAC: the bridge     n0 allmulticast; TUN evpc0 with the inner address
//!    floods it to every port)        evpc-node run (Raft + admin on .1x, IKE/ESP on .1)
//! ```
//!
//! The client's static neighbour entry maps the cluster address to a multicast MAC, so the
//! bridge floods every frame for it to all ports: each node receives it (the address is on its
//! loopback; Linux accepts unicast IP in link-layer multicast frames) and only the node that
//! owns the SA answers — a node's answers come from the cluster address with its own MAC. Nodes
//! never answer ARP for the cluster address (`arp_ignore = 1`), so nothing on the segment
//! learns one node's MAC for it. Failover needs no change on the segment at all.
//!
//! With [`LabDataplane::Xfrm`] the nodes run the kernel data plane (`backend = "xfrm"`, which
//! needs a kernel with ESP: see [`crate::vm`]): the inner address sits on a dummy device
//! `evpc0` instead of a TUN, the owner's kernel decrypts what arrives on the cluster socket, and
//! every other node's kernel drops it (no state for its SPI).
//!
//! With [`LabSpec::trusted`] the cluster also has a **trusted side**: a second segment joining
//! every node to a server host behind the cluster, the way a VPN gateway fronts a company
//! network. The server reaches the clients' inner addresses (the pool) through the cluster's
//! trusted-side address, whose MAC every node shares on that segment; the bridge does not learn
//! it, so it floods each frame to every node — the ClusterIP model on the inside too — and only
//! the owner's data plane has a child for the destination (the others drop it: no child).
//!
//! ```text
//!   ns server 10.20.0.100 ── br1 (learning off on node ports) ── t0 10.20.0.1x on every node
//!   route <pool> via 10.20.0.1 (MAC 02:ec:…:01, shared by every t0; 10.20.0.1 on each lo)
//!   nodes: ip_forward, <pool> routed into the TUN, so the owner seals it toward its client
//! ```
//!
//! With [`LabSpec::edge`] clients can be added by the hundred ([`Lab::add_client`]), each in a
//! namespace of its own behind an **edge router** on the cluster segment, as road warriors
//! reach a gateway over the Internet; everything the cluster sends them passes the router's
//! segment port `e0`, where one capture sees every ESP packet ([`Lab::edge_ns`]).
//!
//! ```text
//!   ns cK 100.64.a.b/16 ─┐
//!   ns c1 ───────────────┼─ brc 100.64.0.1 ─ ns edge (forwarding) ─ e0 198.51.100.2 ── br0
//!                        │                   neigh 198.51.100.1 ─► 01:00:5e:00:00:01
//!   nodes: route 100.64.0.0/16 via 198.51.100.2
//! ```
//!
//! Nodes can be added and removed while the lab runs ([`Lab::add_node`],
//! [`Lab::remove_member`]), paused ([`Lab::signal`]) and cut off the cluster segment
//! ([`Lab::partition`]).
//!
//! Everything lives in namespaces named `evpc-<pid>-…` (see `evpc_dataplane::netns`): dropping
//! the [`Lab`] kills the node processes and deletes the namespaces, which removes every veth,
//! the bridge and the TUN devices; namespaces left by a killed test process are removed by the
//! next one.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use evpc_api::AdminClient;
use evpc_dataplane::netns::{NetNs, is_root};
use tokio::process::Child;

use evpc_node::config::{
    DataplaneConfig, NodeConfig, OwnershipConfig, PeerConfig, RaftTuning, Timeouts, TunSettings,
};
use evpc_node::ike_gateway::IkeSettings;

/// The cluster address every client talks to.
pub const CLUSTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The client namespace's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The root namespace's address on the segment (the test process reaches admin APIs from it).
pub const MGMT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
/// The link-layer address the client sends cluster-address frames to.
pub const CLUSTER_MAC: &str = "01:00:5e:00:00:01";

/// The cluster's address on the trusted side (the server's next hop to the pool).
pub const TRUSTED_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 1);
/// The trusted segment, which clients route into their tunnels.
pub const TRUSTED_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 20, 0, 0), 24);
/// The server behind the cluster.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 100);
/// The link-layer address every node's trusted-side interface shares (locally administered
/// unicast: a node forwards what arrives for it, which it would not for a multicast frame).
pub const TRUSTED_MAC: &str = "02:ec:00:00:00:01";
/// The edge router's address on the cluster segment.
pub const EDGE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The clients' segment behind the edge router, and the router's address on it.
pub const CLIENTS_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 16);
/// The edge router's address on the clients' segment.
pub const CLIENTS_GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
/// The most nodes a lab runs at once (Raft voters).
pub const MAX_NODES: u64 = 7;
/// The highest node id a lab hands out: ids are never reused, so nodes added and removed over
/// a campaign climb towards it (their addresses stay below the server's).
pub const MAX_NODE_ID: u64 = 80;

/// Client `index`'s address behind the edge router (0-based; up to 250 × 250 of them).
pub fn client_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 1 + (index / 250) as u8, 1 + (index % 250) as u8)
}

/// Node `id`'s own address on the trusted segment.
pub fn trusted_node_addr(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(10, 20, 0, 10 + id as u8)
}

/// Node `id`'s own address on the segment (Raft, admin).
pub fn node_addr(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + id as u8)
}

/// Node `id`'s admin API, as the test process reaches it.
fn admin_endpoint(id: u64) -> String {
    SocketAddr::new(IpAddr::V4(node_addr(id)), 7201).to_string()
}

/// Which data plane the lab's nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LabDataplane {
    /// ESP in the node process, inner traffic on a TUN device.
    #[default]
    Userspace,
    /// ESP in the kernel (XFRM), inner traffic on a dummy device; needs a kernel with ESP.
    Xfrm,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Number of gateway nodes (1 to 7).
    pub nodes: u64,
    /// Distinguishes namespaces of several labs of one process.
    pub tag: String,
    /// The `evpc-node` executable.
    pub node_bin: PathBuf,
    /// `[ike]` of every node.
    pub ike: IkeSettings,
    /// The TUN device's address on every node, with its prefix (the inner network peers reach).
    pub inner: (Ipv4Addr, u8),
    /// Ownership settings of every node.
    pub ownership: OwnershipConfig,
    /// Raft timing of every node.
    pub timeouts: Timeouts,
    /// `RUST_LOG` of the node processes.
    pub log_filter: String,
    /// Keep the lab's directory (configs, data, node logs) after the lab is dropped.
    pub keep_dir: bool,
    /// Where the lab's directory goes (default: the system's temporary directory). Its file
    /// system decides what a durable Raft append costs.
    pub base_dir: Option<PathBuf>,
    /// Run the nodes without TLS (what benchmarks compare TLS against).
    pub insecure_plaintext: bool,
    /// The nodes' data plane.
    pub dataplane: LabDataplane,
    /// Build the trusted side: a server behind the cluster (see the module docs).
    pub trusted: bool,
    /// Build the edge router that clients added with [`Lab::add_client`] sit behind.
    pub edge: bool,
}

impl LabSpec {
    /// `nodes` nodes with default settings and `ike`.
    pub fn new(nodes: u64, tag: &str, node_bin: PathBuf, ike: IkeSettings) -> LabSpec {
        LabSpec {
            nodes,
            tag: tag.into(),
            node_bin,
            ike,
            inner: (Ipv4Addr::new(10, 10, 0, 1), 24),
            ownership: OwnershipConfig::default(),
            timeouts: Timeouts::default(),
            log_filter: "info,openraft=warn,sled=warn,h2=warn,tower=warn".into(),
            keep_dir: false,
            base_dir: None,
            insecure_plaintext: false,
            dataplane: LabDataplane::Userspace,
            trusted: false,
            edge: false,
        }
    }
}

/// One client host behind the edge router.
#[derive(Debug)]
pub struct ClientHost {
    /// Its namespace (deleted when the lab drops).
    pub ns: NetNs,
    /// Its address on the clients' segment.
    pub addr: Ipv4Addr,
}

/// A running lab. Dropping it kills the nodes and removes the namespaces.
#[derive(Debug)]
pub struct Lab {
    /// What was built.
    pub spec: LabSpec,
    procs: Vec<Option<Child>>,
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    client: NetNs,
    nodes: Vec<NetNs>,
    lan: NetNs,
    server: Option<NetNs>,
    edge: Option<NetNs>,
    clients: Vec<ClientHost>,
    dir: Option<tempfile::TempDir>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes a sysctl inside `ns` (its /proc/sys/net is the namespace's own).
fn sysctl(ns: &NetNs, key: &'static str, value: &'static str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(move || std::fs::write(&path, value))?
        .with_context(|| format!("sysctl {key}={value} in {}", ns.name()))
}

impl Lab {
    /// Builds the segment, starts the nodes and bootstraps the cluster.
    pub async fn start(spec: LabSpec) -> anyhow::Result<Lab> {
        anyhow::ensure!(
            is_root(),
            "the ClusterIP lab needs root (namespaces, veth, TUN)"
        );
        anyhow::ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "1 to {MAX_NODES} nodes"
        );
        let mut builder = tempfile::Builder::new();
        builder.prefix("evpc-lab-");
        let dir = match &spec.base_dir {
            Some(base) => builder.tempdir_in(base)?,
            None => builder.tempdir()?,
        };
        let lan = NetNs::create(&format!("{}-lan", spec.tag))?;
        let client = NetNs::create(&format!("{}-client", spec.tag))?;
        let mut nodes = Vec::new();
        for id in 1..=spec.nodes {
            nodes.push(NetNs::create(&format!("{}-n{id}", spec.tag))?);
        }
        let server = match spec.trusted {
            true => Some(NetNs::create(&format!("{}-srv", spec.tag))?),
            false => None,
        };
        let edge = match spec.edge {
            true => Some(NetNs::create(&format!("{}-edge", spec.tag))?),
            false => None,
        };
        let mut lab = Lab {
            spec,
            procs: Vec::new(),
            configs: Vec::new(),
            logs: Vec::new(),
            client,
            nodes,
            lan,
            server,
            edge,
            clients: Vec::new(),
            dir: Some(dir),
        };
        lab.wire()?;
        lab.spawn_nodes()?;
        lab.bootstrap(Duration::from_secs(60)).await?;
        Ok(lab)
    }

    fn wire(&self) -> anyhow::Result<()> {
        let lan = &self.lan;
        lan.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        let plug = |port: &str, peer: &str, ns: &str| -> anyhow::Result<()> {
            lan.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", peer, "netns", ns,
            ])?;
            lan.ip(&["link", "set", port, "master", "br0", "up"])?;
            Ok(())
        };
        // The client.
        plug("pc", "c0", self.client.name())?;
        let c = &self.client;
        c.ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "c0"])?;
        c.ip(&["link", "set", "c0", "up"])?;
        c.ip(&[
            "neigh",
            "replace",
            &CLUSTER.to_string(),
            "lladdr",
            CLUSTER_MAC,
            "dev",
            "c0",
            "nud",
            "permanent",
        ])?;
        if let Some(server) = &self.server {
            self.wire_server(server)?;
        }
        if let Some(edge) = &self.edge {
            self.wire_edge(edge)?;
        }
        // The nodes.
        for (i, ns) in self.nodes.iter().enumerate() {
            self.wire_node(i as u64 + 1, ns)?;
        }
        // The root namespace's door to the admin APIs.
        static LABS: AtomicU32 = AtomicU32::new(0);
        let root_if = format!(
            "evr{}{}",
            std::process::id() % 100_000,
            LABS.fetch_add(1, Ordering::Relaxed) % 100
        );
        ip(&[
            "link",
            "add",
            &root_if,
            "type",
            "veth",
            "peer",
            "name",
            "pr",
            "netns",
            lan.name(),
        ])?;
        lan.ip(&["link", "set", "pr", "master", "br0", "up"])?;
        ip(&["addr", "add", &format!("{MGMT}/24"), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        std::thread::sleep(Duration::from_millis(50));
        Ok(())
    }

    /// Plugs node `id`'s namespace into the segment(s) and sets it up as a cluster member.
    fn wire_node(&self, id: u64, ns: &NetNs) -> anyhow::Result<()> {
        let lan = &self.lan;
        let plug = |port: &str, peer: &str, ns: &str, bridge: &str| -> anyhow::Result<()> {
            lan.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", peer, "netns", ns,
            ])?;
            lan.ip(&["link", "set", port, "master", bridge, "up"])?;
            Ok(())
        };
        plug(&format!("p{id}"), "n0", ns.name(), "br0")?;
        ns.ip(&["addr", "add", &format!("{}/24", node_addr(id)), "dev", "n0"])?;
        ns.ip(&["link", "set", "n0", "up", "allmulticast", "on"])?;
        ns.ip(&["addr", "add", &format!("{CLUSTER}/32"), "dev", "lo"])?;
        sysctl(ns, "net.ipv4.conf.all.arp_ignore", "1")?;
        sysctl(ns, "net.ipv4.conf.all.arp_announce", "2")?;
        if self.spec.dataplane == LabDataplane::Xfrm {
            // The kernel decrypts into the stack: the inner address lives on a dummy
            // device, whose prefix routes replies to the pool into the XFRM policies.
            let (inner, len) = self.spec.inner;
            ns.ip(&["link", "add", "evpc0", "type", "dummy"])?;
            ns.ip(&["addr", "add", &format!("{inner}/{len}"), "dev", "evpc0"])?;
            ns.ip(&["link", "set", "evpc0", "up"])?;
            // decrypted packets arrive on n0 from pool addresses routed via evpc0
            for key in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
                "net.ipv4.conf.n0.rp_filter",
            ] {
                sysctl(ns, key, "0")?;
            }
        }

        if self.spec.edge {
            let (net, len) = CLIENTS_NET;
            ns.ip(&[
                "route",
                "add",
                &format!("{net}/{len}"),
                "via",
                &EDGE.to_string(),
                "dev",
                "n0",
            ])?;
        }
        if self.spec.trusted {
            plug(&format!("t{id}"), "t0", ns.name(), "br1")?;
            // Never learned, so frames for the shared MAC go to every node.
            lan.ip(&[
                "link",
                "set",
                &format!("t{id}"),
                "type",
                "bridge_slave",
                "learning",
                "off",
            ])?;
            ns.ip(&["link", "set", "t0", "address", TRUSTED_MAC])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", trusted_node_addr(id)),
                "dev",
                "t0",
            ])?;
            ns.ip(&["link", "set", "t0", "up"])?;
            ns.ip(&["addr", "add", &format!("{TRUSTED_CLUSTER}/32"), "dev", "lo"])?;
            sysctl(ns, "net.ipv4.ip_forward", "1")?;
            // Decrypted packets leave by t0 from pool addresses that route into the TUN.
            for key in [
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
                "net.ipv4.conf.t0.rp_filter",
                "net.ipv4.conf.all.send_redirects",
            ] {
                sysctl(ns, key, "0")?;
            }
        }
        // Resolve the hosts this node answers now: a burst of answers to an address still
        // being resolved overflows the kernel's small per-neighbour queue, and the first
        // requests would be lost (a gateway's next hop is resolved long before).
        let mut neighbours = vec![CLIENT];
        if self.spec.edge {
            neighbours.push(EDGE);
        }
        if self.spec.trusted {
            neighbours.push(SERVER);
        }
        ns.run(move || {
            let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            for to in neighbours {
                socket.send_to(b"arp", (to, 9))?;
            }
            std::io::Result::Ok(())
        })??;
        Ok(())
    }

    /// The server behind the cluster, on the trusted segment `br1`.
    fn wire_server(&self, server: &NetNs) -> anyhow::Result<()> {
        let lan = &self.lan;
        lan.ip(&[
            "link",
            "add",
            "br1",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lan.ip(&["link", "set", "br1", "up"])?;
        lan.ip(&[
            "link",
            "add",
            "ts",
            "type",
            "veth",
            "peer",
            "name",
            "s0",
            "netns",
            server.name(),
        ])?;
        lan.ip(&["link", "set", "ts", "master", "br1", "up"])?;
        let (_, len) = TRUSTED_NET;
        server.ip(&["addr", "add", &format!("{SERVER}/{len}"), "dev", "s0"])?;
        server.ip(&["link", "set", "s0", "up"])?;
        server.ip(&[
            "neigh",
            "replace",
            &TRUSTED_CLUSTER.to_string(),
            "lladdr",
            TRUSTED_MAC,
            "dev",
            "s0",
            "nud",
            "permanent",
        ])?;
        let pool = self
            .spec
            .ike
            .pool
            .as_deref()
            .context("a trusted side needs [ike] pool: the server routes it to the cluster")?;
        server.ip(&[
            "route",
            "add",
            pool,
            "via",
            &TRUSTED_CLUSTER.to_string(),
            "dev",
            "s0",
        ])?;
        Ok(())
    }

    /// The edge router: on the cluster segment as [`EDGE`], and the gateway of the clients'
    /// segment `brc`.
    fn wire_edge(&self, edge: &NetNs) -> anyhow::Result<()> {
        let lan = &self.lan;
        lan.ip(&[
            "link",
            "add",
            "pe",
            "type",
            "veth",
            "peer",
            "name",
            "e0",
            "netns",
            edge.name(),
        ])?;
        lan.ip(&["link", "set", "pe", "master", "br0", "up"])?;
        edge.ip(&["addr", "add", &format!("{EDGE}/24"), "dev", "e0"])?;
        edge.ip(&["link", "set", "e0", "up"])?;
        edge.ip(&[
            "neigh",
            "replace",
            &CLUSTER.to_string(),
            "lladdr",
            CLUSTER_MAC,
            "dev",
            "e0",
            "nud",
            "permanent",
        ])?;
        edge.ip(&[
            "link",
            "add",
            "brc",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        let (_, len) = CLIENTS_NET;
        edge.ip(&[
            "addr",
            "add",
            &format!("{CLIENTS_GATEWAY}/{len}"),
            "dev",
            "brc",
        ])?;
        edge.ip(&["link", "set", "brc", "up"])?;
        // (The neighbour table's limits are the host's: 1,024 entries by default, room for as
        // many clients behind this router.)
        sysctl(edge, "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// The configuration of node `id`.
    pub fn node_config(&self, id: u64) -> NodeConfig {
        let addr = |id: u64, port: u16| SocketAddr::new(IpAddr::V4(node_addr(id)), port);
        let (inner, len) = self.spec.inner;
        NodeConfig {
            id,
            raft_addr: addr(id, 7101),
            admin_addr: addr(id, 7201),
            data_dir: self.dir().join(format!("node{id}")).join("data"),
            peers: (1..=self.spec.nodes)
                .filter(|p| *p != id)
                .map(|p| PeerConfig {
                    id: p,
                    raft_addr: addr(p, 7101),
                    admin_addr: addr(p, 7201),
                })
                .collect(),
            timeouts: self.spec.timeouts.clone(),
            raft: RaftTuning::default(),
            ownership: self.spec.ownership.clone(),
            dataplane: DataplaneConfig {
                backend: match self.spec.dataplane {
                    LabDataplane::Userspace => "userspace",
                    LabDataplane::Xfrm => "xfrm",
                }
                .into(),
                cluster_address: Some(IpAddr::V4(CLUSTER)),
                tun: TunSettings {
                    name: "evpc0".into(),
                    addresses: vec![format!("{inner}/{len}")],
                    // The server's packets to the clients' inner addresses go into the tunnel.
                    routes: match (self.spec.trusted, &self.spec.ike.pool) {
                        (true, Some(pool)) => vec![pool.clone()],
                        _ => Vec::new(),
                    },
                    ..TunSettings::default()
                },
                ..DataplaneConfig::default()
            },
            ike: Some(self.spec.ike.clone()),
            metrics_addr: None,
            cluster_key_file: Some(self.pki().cluster_key()),
            tls: (!self.spec.insecure_plaintext).then(|| self.pki().node(id)),
            insecure_plaintext: self.spec.insecure_plaintext,
            limits: Default::default(),
        }
    }

    /// The lab cluster's PKI (CA, node and operator certificates, cluster key).
    pub fn pki(&self) -> evpc_node::pki::PkiDir {
        evpc_node::pki::PkiDir::new(self.dir().join("pki"))
    }

    /// How the lab's operator reaches the nodes.
    fn security(&self) -> anyhow::Result<evpc_api::Security> {
        if self.spec.insecure_plaintext {
            return Ok(evpc_api::Security::Plaintext);
        }
        let files = self.pki().client(crate::local::LOCAL_OPERATOR);
        Ok(evpc_api::Security::Tls(evpc_api::ClientTls::load(
            &files.ca_file,
            &files.cert_file,
            &files.key_file,
        )?))
    }

    fn spawn_nodes(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = (1..=self.spec.nodes).collect();
        self.pki()
            .ensure_local(&ids, crate::local::LOCAL_OPERATOR)?;
        for id in 1..=self.spec.nodes {
            let config = self.node_config(id);
            let node_dir = self.dir().join(format!("node{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let path = node_dir.join("node.toml");
            std::fs::write(&path, toml::to_string(&config)?)?;
            self.configs.push(path);
            self.logs.push(node_dir.join("node.log"));
            self.procs.push(None);
            self.start_node(id)?;
        }
        Ok(())
    }

    fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let i = (id - 1) as usize;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.logs[i])?;
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", self.nodes[i].name()])
            .arg(&self.spec.node_bin)
            .arg("run")
            .arg("--config")
            .arg(&self.configs[i])
            .env("RUST_LOG", &self.spec.log_filter)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.spec.node_bin.display()))?;
        self.procs[i] = Some(child);
        Ok(())
    }

    /// Initializes the cluster through node 1, then waits for a leader, every node a voter and
    /// every placement slot owned, as every node sees it.
    async fn bootstrap(&self, timeout: Duration) -> anyhow::Result<()> {
        let endpoints: Vec<String> = (1..=self.spec.nodes).map(admin_endpoint).collect();
        crate::local::bootstrap_cluster(&endpoints, self.spec.nodes, timeout, &self.security()?)
            .await
            .with_context(|| {
                format!(
                    "the lab cluster did not come up; node 1 log:\n{}",
                    self.log(1)
                )
            })?;
        Ok(())
    }

    /// Node ids whose process runs.
    pub fn alive_ids(&self) -> Vec<u64> {
        (1..=self.spec.nodes)
            .filter(|id| self.procs[(*id - 1) as usize].is_some())
            .collect()
    }

    /// An admin client for node `id` only (reads its own applied state).
    pub fn admin_of(&self, id: u64) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(
            &[admin_endpoint(id)],
            Duration::from_secs(5),
            self.security()?,
        )?)
    }

    /// An admin client over the live nodes (follows the leader).
    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        let endpoints: Vec<String> = self.alive_ids().into_iter().map(admin_endpoint).collect();
        Ok(AdminClient::new(
            &endpoints,
            Duration::from_secs(5),
            self.security()?,
        )?)
    }

    /// SIGKILLs node `id` (`ip netns exec` execs the node, so this is its own pid).
    pub async fn sigkill(&mut self, id: u64) -> anyhow::Result<()> {
        let i = (id - 1) as usize;
        if let Some(mut child) = self.procs[i].take() {
            child.kill().await.context("SIGKILL")?;
        }
        Ok(())
    }

    /// Starts node `id` again on its data directory.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.start_node(id)
    }

    /// Sends `signal` to node `id`'s process (SIGSTOP and SIGCONT pause and resume it).
    pub fn signal(&self, id: u64, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid(id)
            .with_context(|| format!("node {id} is not running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .with_context(|| format!("{signal} to node {id}"))
    }

    /// Cuts node `id` off the cluster segment both ways (`cut`), or heals it: its Raft, pings
    /// and IKE/ESP traffic stop, its trusted side stays (nftables in its namespace).
    pub fn partition(&self, id: u64, cut: bool) -> anyhow::Result<()> {
        let ns = self.node_ns(id);
        let script = if cut {
            "table inet evpc_partition {\n\
               chain input {\n type filter hook input priority -300;\n iifname \"n0\" drop\n }\n\
               chain output {\n type filter hook output priority -300;\n oifname \"n0\" drop\n }\n\
             }\n"
        } else {
            "delete table inet evpc_partition\n"
        };
        let name = ns.name().to_owned();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("piped")
                    .write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .context("running nft (nftables) in the node's namespace")?;
        anyhow::ensure!(
            out.status.success(),
            "nft in node {id}'s namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Adds a node: a namespace plugged into the segment(s), its certificate and config, its
    /// process, then an admin `AddMember` through the leader (learner, then voter once caught
    /// up). Returns its id.
    pub async fn add_node(&mut self) -> anyhow::Result<u64> {
        let id = self.nodes.len() as u64 + 1;
        anyhow::ensure!(
            (self.alive_ids().len() as u64) < MAX_NODES && id <= MAX_NODE_ID,
            "a lab runs at most {MAX_NODES} nodes at once, with ids up to {MAX_NODE_ID}"
        );
        let ns = NetNs::create(&format!("{}-n{id}", self.spec.tag))?;
        self.wire_node(id, &ns)?;
        self.nodes.push(ns);
        self.spec.nodes = id;
        self.pki()
            .ensure_local(&[id], crate::local::LOCAL_OPERATOR)?;
        let config = self.node_config(id);
        let node_dir = self.dir().join(format!("node{id}"));
        std::fs::create_dir_all(&node_dir)?;
        let path = node_dir.join("node.toml");
        std::fs::write(&path, toml::to_string(&config)?)?;
        self.configs.push(path);
        self.logs.push(node_dir.join("node.log"));
        self.procs.push(None);
        self.start_node(id)?;
        let address = evpc_proto::admin::v1::NodeAddress {
            id,
            raft_addr: config.raft_addr.to_string(),
            admin_addr: config.admin_addr.to_string(),
        };
        let mut admin = self.admin()?;
        admin.follow_leader().await?;
        admin
            .add_member(address, false)
            .await
            .with_context(|| format!("adding node {id}; its log:\n{}", self.log(id)))?;
        Ok(id)
    }

    /// Removes node `id` from the Raft membership through the leader (the planner then moves
    /// whatever it still owns); its process keeps running until [`Lab::sigkill`].
    pub async fn remove_member(&mut self, id: u64) -> anyhow::Result<()> {
        let mut admin = self.admin()?;
        admin.follow_leader().await?;
        admin.remove_member(id).await?;
        Ok(())
    }

    /// Adds a client host behind the edge router; returns its index for
    /// [`Lab::client_host`].
    pub fn add_client(&mut self) -> anyhow::Result<usize> {
        let edge = self
            .edge
            .as_ref()
            .context("clients behind the edge need LabSpec::edge")?;
        let index = self.clients.len();
        let addr = client_addr(index);
        let ns = NetNs::create(&format!("{}-c{index}", self.spec.tag))?;
        let port = format!("c{index}");
        edge.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            ns.name(),
        ])?;
        edge.ip(&["link", "set", &port, "master", "brc", "up"])?;
        let (_, len) = CLIENTS_NET;
        ns.ip(&["addr", "add", &format!("{addr}/{len}"), "dev", "c0"])?;
        ns.ip(&["link", "set", "c0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &CLIENTS_GATEWAY.to_string(),
        ])?;
        self.clients.push(ClientHost { ns, addr });
        Ok(index)
    }

    /// Client host `index` (from [`Lab::add_client`]).
    pub fn client_host(&self, index: usize) -> &ClientHost {
        &self.clients[index]
    }

    /// The edge router's namespace (its cluster-segment port is `e0`: capture there).
    pub fn edge_ns(&self) -> Option<&NetNs> {
        self.edge.as_ref()
    }

    /// The server's namespace on the trusted side.
    pub fn server_ns(&self) -> Option<&NetNs> {
        self.server.as_ref()
    }

    /// The namespace of node `id`.
    pub fn node_ns(&self, id: u64) -> &NetNs {
        &self.nodes[(id - 1) as usize]
    }

    /// The client namespace.
    pub fn client_ns(&self) -> &NetNs {
        &self.client
    }

    /// A new namespace plugged into the segment with `addr`/24, for a host of its own (a
    /// baseline responder, a second client); deleted when the returned handle drops.
    pub fn attach(&self, tag: &str, addr: Ipv4Addr) -> anyhow::Result<NetNs> {
        let ns = NetNs::create(&format!("{}-{tag}", self.spec.tag))?;
        let port = format!("px{}", addr.octets()[3]);
        self.lan.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "e0",
            "netns",
            ns.name(),
        ])?;
        self.lan
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "e0"])?;
        ns.ip(&["link", "set", "e0", "up"])?;
        Ok(ns)
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.procs[(id - 1) as usize].as_ref().and_then(Child::id)
    }

    /// The lab's directory (configs, data, logs; removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }

    /// Node `id`'s log so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(&self.logs[(id - 1) as usize]).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.procs.iter_mut().filter_map(Option::take).collect();
        for child in &mut children {
            let _ = child.start_kill();
        }
        // Reap them before their namespaces go (a process keeps a deleted namespace alive).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.spec.keep_dir
            && let Some(dir) = self.dir.take()
        {
            eprintln!("lab directory kept: {}", dir.keep().display());
        }
    }
}
