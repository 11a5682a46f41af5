//! # evpc-dataplane — what moves a child SA's packets once a node owns it
//!
//! Every backend implements [`SaDriver`]. The node's owner runtime decides which
//! child SAs this node drives, with which sequence-number range and replay floor, and reads the
//! backend's counters to commit leases and checkpoints:
//!
//! ```text
//!  applied state ──► OwnerRuntime ──start / extend / stop / fence──► SaDriver (probe, userspace, xfrm)
//!                         ▲                                                │
//!                         └──────────── counters (highest seq used, ───────┘
//!                                        highest authenticated inbound)
//! ```
//!
//! The contract a backend keeps:
//! - it never sends an outbound sequence number above the `limit` it was given (the committed
//!   `out_hwm`); `extend` only ever raises it;
//! - it starts outbound at `next_seq` and refuses inbound sequence numbers at or below
//!   `replay_floor`;
//! - after `stop` (or while fenced) it sends nothing for that child;
//! - counters are monotonic for the life of one `start`.

pub mod ike;
pub mod metrics;
pub mod netns;
pub mod probe;
pub mod selector;
pub mod userspace;
pub mod xfrm;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use evpc_raft_store::{ChildSuite, Epoch, SaId, TrafficSelector};
use zeroize::Zeroizing;

/// Both directions' ESP keying material of a child SA (RFC 4106 §8.1: key || 4-byte salt),
/// unsealed. Zeroized on drop; `Debug` shows no key bytes.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildKeymat {
    /// For packets the peer sends us (decrypt).
    pub inbound: Zeroizing<Vec<u8>>,
    /// For packets we send the peer (encrypt).
    pub outbound: Zeroizing<Vec<u8>>,
}

impl ChildKeymat {
    /// Wraps both directions' KEYMAT (each wiped when dropped).
    pub fn new(inbound: Vec<u8>, outbound: Vec<u8>) -> ChildKeymat {
        ChildKeymat {
            inbound: Zeroizing::new(inbound),
            outbound: Zeroizing::new(outbound),
        }
    }
}

impl fmt::Debug for ChildKeymat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChildKeymat(<{} + {} bytes, redacted>)",
            self.inbound.len(),
            self.outbound.len()
        )
    }
}

/// Everything a backend needs to run one child SA on this node.
#[derive(Clone, Debug)]
pub struct ChildStart {
    /// The IKE SA the child belongs to.
    pub ike: SaId,
    /// The ownership epoch this node drives it in.
    pub epoch: Epoch,
    /// SPI of packets the peer sends us.
    pub in_spi: u32,
    /// SPI of packets we send the peer.
    pub out_spi: u32,
    /// Negotiated suite (cipher, key size, ESN).
    pub suite: ChildSuite,
    /// Keys, unsealed. `None` when the SA carries none this node can open (synthetic SAs of
    /// load tests); backends that encrypt refuse such a child.
    pub keys: Option<ChildKeymat>,
    /// Our traffic selectors.
    pub ts_local: Vec<TrafficSelector>,
    /// The peer's traffic selectors.
    pub ts_remote: Vec<TrafficSelector>,
    /// Our outer address (the cluster address and port).
    pub local: SocketAddr,
    /// The peer's outer address and port (after NAT).
    pub peer: SocketAddr,
    /// ESP in UDP (RFC 3948) because NAT was detected; false: plain ESP, IP protocol 50.
    pub udp_encap: bool,
    /// First outbound sequence number this node may use.
    pub next_seq: u64,
    /// Highest outbound sequence number this node may use: the committed `out_hwm`.
    pub limit: u64,
    /// Inbound sequence numbers at or below this are refused as replays.
    pub replay_floor: u64,
}

/// A child's counters as its backend reports them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChildCounters {
    /// Highest outbound sequence number used (0: none yet).
    pub highest_out: u64,
    /// Highest inbound sequence number that authenticated (0: none yet).
    pub highest_in: u64,
    /// Packets sent.
    pub out_packets: u64,
    /// Packets received and delivered.
    pub in_packets: u64,
    /// Outbound packets held back or dropped because the lease was used up.
    pub lease_waits: u64,
    /// Inbound packets dropped as replays.
    pub replay_drops: u64,
    /// Inbound packets that failed authentication.
    pub auth_failures: u64,
}

/// Why a backend refused a child.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The child is already running.
    #[error("child SA {0:08x} is already running")]
    AlreadyRunning(u32),
    /// The backend cannot run this suite.
    #[error("child SA {in_spi:08x}: {reason}")]
    Unsupported {
        /// The child.
        in_spi: u32,
        /// Why.
        reason: String,
    },
    /// The backend failed (kernel, socket).
    #[error("data plane: {0}")]
    Io(String),
}

/// A data-plane backend. Calls come from the owner runtime, one at a time per child.
pub trait SaDriver: Send + Sync + 'static {
    /// The backend's name, for logs and status.
    fn name(&self) -> &'static str;
    /// Starts driving a child SA.
    fn start(&self, child: ChildStart) -> Result<(), DriverError>;
    /// Raises a running child's outbound limit (a newly committed lease). Lower values are
    /// ignored.
    fn extend(&self, in_spi: u32, limit: u64);
    /// Stops a child at once and returns its final counters.
    fn stop(&self, in_spi: u32) -> Option<ChildCounters>;
    /// A running child's counters.
    fn counters(&self, in_spi: u32) -> Option<ChildCounters>;
    /// Appends the children that sent, received or waited for a lease since the last call, and
    /// returns `true`; `false` if this backend cannot tell (the caller then looks at every
    /// child). Lets the owner runtime look only at children with traffic on each tick, not at
    /// all of them.
    fn take_active(&self, _out: &mut Vec<u32>) -> bool {
        false
    }
    /// Stops (`true`) or resumes (`false`) all processing without forgetting any child: the
    /// node lost (or regained) contact with the cluster.
    fn set_fenced(&self, fenced: bool);

    /// Starts a child in **standby**, for the new owner of a planned handover: it holds what
    /// arrives for it (ESP from the peer, inner packets for the peer, a bounded number of each)
    /// and sends nothing until [`SaDriver::take_over`]. Meanwhile the old owner keeps the
    /// traffic flowing; once it has [`SaDriver::hand_off`]-ed, this one continues from the
    /// packets it held, without a gap and without sending anything twice. A backend that cannot
    /// hold packets starts the child at once (the default).
    fn start_standby(&self, child: ChildStart) -> Result<(), DriverError> {
        self.start(child)
    }

    /// Puts a running child on hold, as a standby child holds (the old owner of a planned
    /// handover, until the new owner confirms it holds too): nothing of it is sent or delivered
    /// until [`SaDriver::take_over`] (with no previous state: it sends what it held) or
    /// [`SaDriver::hand_off`] (what it held is dropped). Returns whether it could; a backend
    /// that cannot hold packets keeps it running (the default).
    fn hold(&self, _in_spi: u32) -> bool {
        false
    }

    /// Stops a child for a planned handover, as [`SaDriver::stop`] does (nothing of it is sent
    /// once this returns), and returns what its successor needs: the default knows only the
    /// counters.
    fn hand_off(&self, in_spi: u32) -> Option<HandoverState> {
        self.stop(in_spi).map(|c| HandoverState {
            highest_out: c.highest_out,
            ..HandoverState::default()
        })
    }

    /// Ends a standby child's wait: refuses the inbound sequence numbers the previous owner
    /// accepted, seals and sends what it held for the peer after the last packet the previous
    /// owner sealed, delivers what it held from the peer, and from then on runs normally.
    /// `previous` is `None` when the old owner's state never came (it died, or took too long):
    /// everything held goes out. Returns whether the child was waiting.
    fn take_over(&self, _in_spi: u32, _previous: Option<&HandoverState>) -> bool {
        false
    }
}

/// What the new owner of a child needs from the old one at a planned handover (sent between
/// the two nodes, not through the log: the committed ranges alone keep every sequence number
/// unique; this only saves packets from being lost or sent twice).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandoverState {
    /// The highest outbound sequence number the old owner used.
    pub highest_out: u64,
    /// The inbound sequence numbers it accepted inside its replay window (the new owner
    /// refuses them: the peer's packets are delivered once).
    pub inbound_accepted: Vec<u64>,
    /// Digests of the last inner packets it sealed, oldest first ([`packet_digest`]): the new
    /// owner sends only what it held after the last of them.
    pub recent_out: Vec<u64>,
}

/// A digest identifying an inner IP packet among the few around a handover: FNV-1a over its
/// first 64 bytes (the IP header with its identification and checksum, the transport header,
/// the start of the payload).
pub fn packet_digest(packet: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in packet.iter().take(64) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^ packet.len() as u64
}

/// Permission to process packets, renewed by the node's liveness tracker for as long as the node
/// is in contact with the cluster (see `evpc_node::ownership::liveness`).
///
/// A backend checks [`FenceGate::is_open`] before each batch of packets, so a node that lost the
/// cluster — or was paused and has just resumed — stops at once, before anything else runs,
/// rather than when the owner runtime gets around to telling it. The gate is a deadline on a
/// monotonic clock: it closes by itself unless renewed.
#[derive(Debug)]
pub struct FenceGate {
    origin: Instant,
    open_until_ms: AtomicU64,
}

impl Default for FenceGate {
    fn default() -> Self {
        FenceGate::new()
    }
}

impl FenceGate {
    /// A closed gate.
    pub fn new() -> FenceGate {
        FenceGate {
            origin: Instant::now(),
            open_until_ms: AtomicU64::new(0),
        }
    }

    /// A gate that is always open (tools and tests without a cluster).
    pub fn always_open() -> FenceGate {
        let gate = FenceGate::new();
        gate.renew_until(u64::MAX);
        gate
    }

    /// Milliseconds on the gate's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Keeps the gate open until `until_ms` on its clock.
    pub fn renew_until(&self, until_ms: u64) {
        self.open_until_ms.store(until_ms, Ordering::Release);
    }

    /// Closes the gate now.
    pub fn close(&self) {
        self.open_until_ms.store(0, Ordering::Release);
    }

    /// Whether packets may be processed now.
    pub fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_closes_by_itself_unless_renewed() {
        let gate = FenceGate::new();
        assert!(!gate.is_open());
        gate.renew_until(gate.now_ms() + 60_000);
        assert!(gate.is_open());
        gate.renew_until(gate.now_ms());
        assert!(!gate.is_open(), "a deadline in the past is closed");
        assert!(FenceGate::always_open().is_open());
        let open = FenceGate::always_open();
        open.close();
        assert!(!open.is_open());
    }

    #[test]
    fn keys_never_show_in_debug() {
        let keys = ChildKeymat {
            inbound: Zeroizing::new(vec![0xab; 20]),
            outbound: Zeroizing::new(vec![0xcd; 20]),
        };
        let text = format!("{keys:?}");
        assert!(!text.contains("ab") && !text.contains("171"), "{text}");
    }
}
