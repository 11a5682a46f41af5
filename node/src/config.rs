//! `node.toml`: one gateway node's configuration, validated with errors an operator can act on.
//!
//! ```toml
//! id = 1
//! raft_addr = "10.0.0.1:7101"      # cluster.v1 (Raft, proposal forwarding)
//! admin_addr = "10.0.0.1:7201"     # admin.v1 (evpcctl)
//! data_dir = "/var/lib/evpc"
//!
//! [[peers]]                        # the other initial members, for `evpcctl cluster init`
//! id = 2
//! raft_addr = "10.0.0.2:7101"
//! admin_addr = "10.0.0.2:7201"
//!
//! [timeouts]                       # all optional, milliseconds
//! heartbeat_ms = 50
//! election_min_ms = 200
//! election_max_ms = 400
//! rpc_ms = 1000
//!
//! [raft]                           # optional
//! snapshot_every = 100000          # log entries between snapshots
//!
//! [tls]                            # mutual TLS on both APIs (or insecure_plaintext = true)
//! ca_file = "/etc/evpc/pki/ca.pem"
//! cert_file = "/etc/evpc/pki/node-1.pem"
//! key_file = "/etc/evpc/pki/node-1.key"   # owner-only
//!
//! [limits]                         # optional; see `Limits`
//! max_snapshot_bytes = 4294967296
//! admin_requests_per_second = 200
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;

use std::path::{Path, PathBuf};

use evpc_raft_store::NodeId;
use serde::{Deserialize, Serialize};

/// A node's configuration file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: a positive integer, unique in the cluster and never reused.
    pub id: NodeId,
    /// Where to serve cluster.v1; also what the other members dial.
    pub raft_addr: SocketAddr,
    /// Where to serve admin.v1.
    pub admin_addr: SocketAddr,
    /// Where the log, the vote and snapshots live.
    pub data_dir: PathBuf,
    /// The other members to bootstrap the cluster with.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Raft and RPC timing.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Raft tuning.
    #[serde(default)]
    pub raft: RaftTuning,
    /// SA ownership: failure detection, fencing, leases, checkpoints, planned moves.
    #[serde(default)]
    pub ownership: OwnershipConfig,
    /// The data plane this node runs.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// The IKE responder on the cluster address (needs the userspace or xfrm data plane).
    #[serde(default)]
    pub ike: Option<crate::ike_gateway::IkeSettings>,
    /// Where to serve Prometheus metrics (`/metrics`), e.g. "127.0.0.1:9100".
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// File holding the cluster key (64 hex digits) that seals SA keys in the replicated log.
    /// Every node of a cluster needs the same key; without one, SAs carry no keys this node
    /// can open (enough for the probe data plane, not for ESP).
    #[serde(default)]
    pub cluster_key_file: Option<PathBuf>,
    /// Mutual TLS on cluster.v1 and admin.v1: the cluster CA, this node's certificate (from
    /// `evpc-node pki issue-node`) and its key (owner-only).
    #[serde(default)]
    pub tls: Option<crate::pki::TlsFiles>,
    /// Serve and dial both gRPC services in plaintext, authenticating nobody: anyone who
    /// reaches a port can then run the cluster. For a lab only; logged at every start.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Bounds on what the gRPC services accept.
    #[serde(default)]
    pub limits: Limits,
}

/// Bounds on the gRPC services: message sizes, time, concurrency, rates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// The largest snapshot this node accepts from a leader (bytes). It is received into a
    /// file in `data_dir`, never held in memory while it arrives.
    pub max_snapshot_bytes: u64,
    /// A snapshot transfer that moves no chunk for this long is abandoned, on both sides (ms):
    /// a large snapshot may take as long as it needs while it makes progress.
    pub snapshot_stall_ms: u64,
    /// The largest admin.v1 request or answer (bytes).
    pub admin_max_message_bytes: usize,
    /// An admin.v1 call still running after this long is cancelled (ms).
    pub admin_timeout_ms: u64,
    /// admin.v1 calls served at once on one connection.
    pub admin_concurrency_per_connection: usize,
    /// admin.v1 calls per second for one caller (certificate name), sustained.
    pub admin_requests_per_second: u32,
    /// admin.v1 calls one caller may make in a burst above the sustained rate.
    pub admin_burst: u32,
    /// HTTP/2 streams at once on one cluster.v1 connection.
    pub cluster_max_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_snapshot_bytes: 4 << 30,
            snapshot_stall_ms: 10_000,
            admin_max_message_bytes: 4 << 20,
            admin_timeout_ms: 30_000,
            admin_concurrency_per_connection: 16,
            admin_requests_per_second: 200,
            admin_burst: 400,
            cluster_max_streams: 256,
        }
    }
}

/// SA ownership settings (milliseconds unless noted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipConfig {
    /// A voter silent this long is declared down and its SAs move to the survivors.
    pub failover_ms: u64,
    /// A node that hears no quorum (or not a live leader) this long stops its data plane.
    /// Must be below `failover_ms`, so a silent node has stopped before anyone takes over.
    pub fence_ms: u64,
    /// Smallest sequence-number lease.
    pub lease_min: u64,
    /// Largest sequence-number lease.
    pub lease_max: u64,
    /// A busy SA commits a lease about this often.
    pub lease_interval_ms: u64,
    /// Inbound replay checkpoint after this many packets...
    pub checkpoint_packets: u64,
    /// ...or this long.
    pub checkpoint_ms: u64,
    /// Where a taken-over child's replay window starts: "accept" (at the checkpoint; packets
    /// after it may be accepted once more) or "jump" (`replay_jump` above it; no replay, that
    /// many fresh packets dropped).
    pub replay_gap: String,
    /// Margin for `replay_gap = "jump"`.
    pub replay_jump: u64,
    /// Sequence numbers granted to the new owner with each move.
    pub move_lease: u64,
    /// Drain and rebalance move at most this many SAs per second.
    pub moves_per_second: u64,
    /// After a cluster key rotation, the leader reseals the blobs of at most this many SAs per
    /// second under the new key.
    pub reseals_per_second: u64,
    /// Whether the Raft leader owns SAs like the other nodes. Off by default: the leader hands
    /// its SAs to the others (at `moves_per_second`, by planned transfer) and takes none while
    /// another active node can, so a leader's death never holds SAs up behind an election.
    /// On: every node's capacity is used, and the leader's SAs fail over about twice as slowly.
    pub leader_serves: bool,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        OwnershipConfig {
            failover_ms: 300,
            fence_ms: 200,
            lease_min: 1024,
            lease_max: 1 << 24,
            lease_interval_ms: 1_000,
            checkpoint_packets: 4_096,
            checkpoint_ms: 1_000,
            replay_gap: "accept".into(),
            replay_jump: 1024,
            move_lease: 4_096,
            moves_per_second: 500,
            reseals_per_second: 200,
            leader_serves: false,
        }
    }
}

/// Which data plane runs, and its settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// "none" (control plane only), "probe" (test traffic to a collector), "userspace"
    /// (ESP-in-UDP <-> TUN in this process), or "xfrm" (the Linux kernel).
    pub backend: String,
    /// With `backend = "xfrm"` on a kernel without ESP: run the userspace data plane instead
    /// (otherwise the node refuses to start).
    pub fallback_to_userspace: bool,
    /// The cluster address peers connect to (userspace, xfrm).
    pub cluster_address: Option<std::net::IpAddr>,
    /// ESP-in-UDP and NAT-T IKE port; default 4500.
    pub natt_port: Option<u16>,
    /// Plain IKE port; default 500, 0 to not listen.
    pub ike_port: Option<u16>,
    /// Inbound anti-replay window in packets; default 1024.
    pub replay_window: Option<u32>,
    /// The TUN device of the inner traffic (userspace).
    pub tun: TunSettings,
    /// Probe settings.
    pub probe: ProbeConfig,
}

/// The userspace data plane's TUN device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunSettings {
    /// Interface name (at most 15 bytes).
    pub name: String,
    /// Inner MTU.
    pub mtu: u32,
    /// Addresses on the device, `addr/prefix`.
    pub addresses: Vec<String>,
    /// Routes into the device (e.g. the virtual-IP pool), `net/prefix`.
    pub routes: Vec<String>,
}

impl Default for TunSettings {
    fn default() -> Self {
        TunSettings {
            name: "evpc0".into(),
            mtu: 1412,
            addresses: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// Parses `addr/prefix`.
pub fn parse_prefix(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not addr/prefix"))?;
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{text:?}: {len:?} is not a prefix length"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("{text:?}: prefix length above {max}"));
    }
    Ok((addr, len))
}

/// The probe data plane: consumes sequence numbers like real traffic and reports every range
/// it used to a collector, so a separate process can check all nodes' numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Where to send the reports (UDP).
    pub collector: Option<SocketAddr>,
    /// Packets per second per child SA.
    pub pps_per_child: u64,
    /// During bursts (200 ms every 4 s, at a time of its own per child) a child sends this many
    /// times its rate: far beyond what its leases were sized for. 0 or 1: no bursts.
    pub burst_factor: u64,
    /// A tag carried in every report, so a collector counts only its own run's nodes.
    pub run: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            collector: None,
            pps_per_child: 20,
            burst_factor: 0,
            run: 0,
        }
    }
}

/// Another member's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: NodeId,
    /// Its cluster.v1 address.
    pub raft_addr: SocketAddr,
    /// Its admin.v1 address.
    pub admin_addr: SocketAddr,
}

/// Timing, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_max_ms: u64,
    /// Deadline of one node-to-node RPC.
    pub rpc_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            heartbeat_ms: 50,
            election_min_ms: 200,
            election_max_ms: 400,
            rpc_ms: 1000,
        }
    }
}

/// Raft tuning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    /// Log entries between snapshots (the log before a snapshot is purged).
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging follower catches up from
    /// the log instead of a full snapshot.
    pub keep_behind_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            snapshot_every: 100_000,
            keep_behind_snapshot: 5_000,
        }
    }
}

/// A configuration that cannot run, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or has a wrong field.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl NodeConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { message, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: PathBuf::new(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id must be a positive integer (0 is reserved)".into());
        }
        if self.raft_addr == self.admin_addr {
            return Err(format!(
                "raft_addr and admin_addr are both {}; they need different ports",
                self.raft_addr
            ));
        }
        match (&self.tls, self.insecure_plaintext) {
            (None, false) => {
                return Err(
                    "no [tls] section: cluster.v1 and admin.v1 need mutual TLS. Create \
                            a CA and this node's certificate with `evpc-node pki init --dir D` and \
                            `evpc-node pki issue-node ID --dir D`, then set [tls] ca_file, \
                            cert_file and key_file; or, for a lab only, insecure_plaintext = true"
                        .into(),
                );
            }
            (Some(_), true) => {
                return Err("both [tls] and insecure_plaintext = true: choose one".into());
            }
            _ => {}
        }
        let l = &self.limits;
        if l.max_snapshot_bytes == 0
            || l.snapshot_stall_ms == 0
            || l.admin_max_message_bytes == 0
            || l.admin_timeout_ms == 0
            || l.admin_concurrency_per_connection == 0
            || l.admin_requests_per_second == 0
            || l.admin_burst == 0
            || l.cluster_max_streams == 0
        {
            return Err("every [limits] value must be positive".into());
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must not be empty".into());
        }
        let mut ids = BTreeSet::from([self.id]);
        for peer in &self.peers {
            if !ids.insert(peer.id) {
                return Err(if peer.id == self.id {
                    format!("peers lists this node's own id {}", self.id)
                } else {
                    format!("peers lists node id {} twice", peer.id)
                });
            }
            if peer.id == 0 {
                return Err("a peer has id 0; ids are positive integers".into());
            }
        }
        let t = &self.timeouts;
        if t.heartbeat_ms == 0 || t.rpc_ms == 0 {
            return Err("timeouts.heartbeat_ms and timeouts.rpc_ms must be positive".into());
        }
        if t.election_min_ms <= t.heartbeat_ms * 2 {
            return Err(format!(
                "timeouts.election_min_ms ({}) must exceed twice heartbeat_ms ({}), or followers \
                 will call elections while the leader is healthy",
                t.election_min_ms, t.heartbeat_ms
            ));
        }
        if t.election_max_ms <= t.election_min_ms {
            return Err(format!(
                "timeouts.election_max_ms ({}) must be greater than election_min_ms ({})",
                t.election_max_ms, t.election_min_ms
            ));
        }
        if self.raft.snapshot_every == 0 {
            return Err("raft.snapshot_every must be positive".into());
        }
        let o = &self.ownership;
        if o.fence_ms >= o.failover_ms {
            return Err(format!(
                "ownership.fence_ms ({}) must be below failover_ms ({}): a silent node must have \
                 stopped before its SAs are handed over",
                o.fence_ms, o.failover_ms
            ));
        }
        if o.fence_ms < 2 * t.heartbeat_ms {
            return Err(format!(
                "ownership.fence_ms ({}) must be at least twice timeouts.heartbeat_ms ({}), or \
                 healthy nodes fence between two pings",
                o.fence_ms, t.heartbeat_ms
            ));
        }
        if o.lease_min == 0 || o.lease_min > o.lease_max {
            return Err("ownership.lease_min must be positive and at most lease_max".into());
        }
        if o.moves_per_second == 0 || o.lease_interval_ms == 0 || o.reseals_per_second == 0 {
            return Err(
                "ownership.moves_per_second, reseals_per_second and lease_interval_ms must be positive"
                    .into(),
            );
        }
        if !matches!(o.replay_gap.as_str(), "accept" | "jump") {
            return Err(format!(
                "ownership.replay_gap is {:?}; expected \"accept\" or \"jump\"",
                o.replay_gap
            ));
        }
        let d = &self.dataplane;
        if let Some(ike) = &self.ike {
            ike.validate()?;
            if !matches!(d.backend.as_str(), "userspace" | "xfrm") {
                return Err("[ike] needs dataplane.backend = \"userspace\" or \"xfrm\" (they own the cluster sockets)".into());
            }
            if self.cluster_key_file.is_none() {
                return Err("[ike] needs cluster_key_file: IKE state is sealed with the cluster key before it is committed".into());
            }
        }
        match d.backend.as_str() {
            "" | "none" => {}
            "probe" if d.probe.collector.is_none() => {
                return Err("dataplane.backend = \"probe\" needs dataplane.probe.collector".into());
            }
            "probe" => {}
            "userspace" | "xfrm" if d.cluster_address.is_none() => {
                return Err(format!(
                    "dataplane.backend = {:?} needs dataplane.cluster_address (the address peers connect to)",
                    d.backend
                ));
            }
            "userspace" | "xfrm" => {}
            other => {
                return Err(format!(
                    "dataplane.backend {other:?} is not known; expected \"none\", \"probe\", \"userspace\" or \"xfrm\""
                ));
            }
        }
        for prefix in d.tun.addresses.iter().chain(&d.tun.routes) {
            parse_prefix(prefix).map_err(|e| format!("dataplane.tun: {e}"))?;
        }
        if d.tun.name.is_empty() || d.tun.name.len() > 15 {
            return Err("dataplane.tun.name must be 1 to 15 bytes".into());
        }
        if let Some(w) = d.replay_window
            && !(32..=4096).contains(&w)
        {
            return Err(format!("dataplane.replay_window {w} is outside 32..=4096"));
        }
        Ok(())
    }

    /// The openraft configuration this node runs with.
    pub fn raft_config(&self) -> anyhow::Result<openraft::Config> {
        let config = openraft::Config {
            cluster_name: "evpc".into(),
            heartbeat_interval: self.timeouts.heartbeat_ms,
            election_timeout_min: self.timeouts.election_min_ms,
            election_timeout_max: self.timeouts.election_max_ms,
            install_snapshot_timeout: self.timeouts.rpc_ms.max(5_000),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.raft.snapshot_every),
            max_in_snapshot_log_to_keep: self.raft.keep_behind_snapshot,
            max_payload_entries: 1024,
            enable_pre_vote: Some(true),
            // A member that was down (or restarting) is retried every heartbeat, not with
            // openraft's doubling up to a second: a node bounced before the failover timeout
            // resumes its SAs only once the leader replicates to it again.
            backoff: format!("{hb}ms {hb}ms {hb}ms", hb = self.timeouts.heartbeat_ms),
            // A restarted leader must win an election again. openraft's default lets it resume
            // leadership from its stored vote, which its documentation warns is inconsistent
            // when the committed index is not flushed (ours is not): the chaos campaign caught a
            // leader restarted by a whole-cluster SIGKILL committing and applying leases that
            // the next leader did not have, and the next owner sending those sequence numbers
            // again.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        id = 1
        raft_addr = "127.0.0.1:7101"
        admin_addr = "127.0.0.1:7201"
        data_dir = "/tmp/evpc-1"
        insecure_plaintext = true
        [[peers]]
        id = 2
        raft_addr = "127.0.0.1:7102"
        admin_addr = "127.0.0.1:7202"
    "#;

    fn invalid(text: &str) -> String {
        NodeConfig::parse(text)
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let config = NodeConfig::parse(GOOD).unwrap();
        assert_eq!(config.id, 1);
        assert_eq!(config.ownership, OwnershipConfig::default());
        assert_eq!(config.peers.len(), 1);
        assert_eq!(config.timeouts, Timeouts::default());
        config.raft_config().unwrap();
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        assert!(invalid(&GOOD.replace("id = 1", "id = 0")).contains("positive"));
        assert!(invalid(&GOOD.replace("7201", "7101")).contains("different ports"));
        assert!(invalid(&GOOD.replace("id = 2", "id = 1")).contains("own id"));
        assert!(invalid(&GOOD.replace("127.0.0.1:7102", "nowhere")).contains("raft_addr"));
        assert!(invalid(&format!("{GOOD}\nbogus = 3")).contains("bogus"));
        assert!(
            invalid(&format!("{GOOD}\n[timeouts]\nelection_min_ms = 60"))
                .contains("twice heartbeat_ms")
        );
        assert!(invalid("id = 1").contains("missing field"));
        let plaintext = "insecure_plaintext = true\n";
        assert!(invalid(&GOOD.replace(plaintext, "")).contains("no [tls] section"));
        let tls = "\n[tls]\nca_file = \"ca.pem\"\ncert_file = \"n.pem\"\nkey_file = \"n.key\"";
        assert!(invalid(&format!("{GOOD}{tls}")).contains("choose one"));
        let secure = NodeConfig::parse(&format!("{}{tls}", GOOD.replace(plaintext, ""))).unwrap();
        assert_eq!(secure.tls.unwrap().key_file, PathBuf::from("n.key"));
        assert!(
            invalid(&format!("{GOOD}\n[limits]\nadmin_burst = 0")).contains("must be positive")
        );
        assert!(
            invalid(&format!("{GOOD}\n[ownership]\nfence_ms = 400")).contains("below failover_ms")
        );
        assert!(
            invalid(&format!("{GOOD}\n[ownership]\nreplay_gap = \"maybe\"")).contains("replay_gap")
        );
        assert!(
            invalid(&format!("{GOOD}\n[dataplane]\nbackend = \"probe\"")).contains("collector")
        );
        assert!(invalid(&format!("{GOOD}\n[dataplane]\nbackend = \"warp\"")).contains("not known"));
        assert!(
            invalid(&format!("{GOOD}\n[dataplane]\nbackend = \"userspace\""))
                .contains("cluster_address")
        );
        assert!(
            invalid(&format!(
                "{GOOD}\n[dataplane.tun]\nroutes = [\"10.0.0.0/40\"]"
            ))
            .contains("prefix length")
        );
    }
}
