//! The committed state of an IKE SA.
//!
//! [`IkeSaSnapshot`] is not a copy made for export: it *is* the state an
//! [`crate::IkeSa`] runs on, so nothing can be forgotten in it. Only soft
//! state lives outside: retransmission counters (restarted on restore), the
//! half-open handshake data (node-local by design, see the crate docs) and an
//! IKE_AUTH waiting for its inner address.
//!
//! Times are absolute wall-clock milliseconds since the UNIX epoch so that any
//! node can resume the timers. Secrets are [`Secret`]s: redacted in `Debug`,
//! zeroized on drop, and serialized as plain bytes — the node must seal the
//! serialized snapshot with its cluster key before it leaves the process.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::crypto::{DhPrivate, EspSuite, IkeKeys, IkeSuite, Secret};
use crate::wire::{Identity, TrafficSelector};

/// Bumped on any incompatible change of the types below.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Which end of an IKE SA we are. For a rekeyed IKE SA the party that started
/// the rekey becomes the initiator of the new one (RFC 7296 §2.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Initiator,
    Responder,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IkeSaSnapshot {
    pub format: u32,
    /// Our address and port as last used (port 4500 once NAT-T floated).
    pub local: SocketAddr,
    /// The peer's address and port, updated from authenticated requests
    /// when the peer is behind a NAT (§2.23).
    pub peer: SocketAddr,
    pub nat: NatState,
    pub local_id: Identity,
    pub peer_id: Identity,
    /// The IKE SA generation in use (SPIs, keys, message IDs).
    pub current: IkeGeneration,
    /// Generations replaced by an IKE rekey (or redundant after a collision)
    /// that still answer or wait for a DELETE.
    pub retiring: Vec<IkeGeneration>,
    pub children: Vec<ChildSa>,
    /// The inner address we gave the peer through CP (gateway side).
    pub peer_inner_address: Option<InnerAddress>,
    /// The inner address the peer gave us through CP (client side).
    pub local_inner_address: Option<InnerAddress>,
    /// Work that waits for the request window (size 1) to free up.
    pub queued: Vec<QueuedRequest>,
    pub established_at_ms: u64,
    pub last_peer_activity_ms: u64,
    /// Rekey time of the IKE SA, jitter applied.
    pub ike_rekey_at_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatState {
    pub local_behind_nat: bool,
    pub peer_behind_nat: bool,
}

impl NatState {
    /// ESP must be UDP-encapsulated (RFC 3948) and IKE must use port 4500.
    pub fn any(&self) -> bool {
        self.local_behind_nat || self.peer_behind_nat
    }
}

/// An inner (virtual) address handed out through the configuration payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InnerAddress {
    pub ipv4: Ipv4Addr,
    pub netmask: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl InnerAddress {
    pub fn new(ipv4: Ipv4Addr) -> Self {
        Self {
            ipv4,
            netmask: None,
            dns: Vec::new(),
        }
    }

    pub fn with_dns(mut self, dns: Ipv4Addr) -> Self {
        self.dns.push(dns);
        self
    }
}

/// One set of IKE SA SPIs and keys. An IKE rekey creates a new generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IkeGeneration {
    pub role: Role,
    pub spi_i: u64,
    pub spi_r: u64,
    pub suite: IkeSuite,
    pub keys: IkeKeys,
    /// Message ID of the next request we accept from the peer (window 1, §2.3).
    pub next_peer_request_id: u32,
    /// Message ID our next request will carry.
    pub next_request_id: u32,
    /// Our response to the peer's last request, resent verbatim on a retransmission.
    pub last_response: Option<StoredMessage>,
    /// SHA-256 of the request `last_response` answers: a retransmission is answered only if
    /// it is that request byte for byte (and from the peer's address), so a forged datagram
    /// with a known SPI and message ID gets nothing sent anywhere. `None` in snapshots from
    /// before this field: such an SA answers by message ID, as it did.
    #[serde(default)]
    pub last_request_sha256: Option<[u8; 32]>,
    /// Our outstanding request, resent verbatim until answered.
    pub pending: Option<PendingRequest>,
    pub created_at_ms: u64,
    /// For a retiring generation: forget it at this time even if no DELETE came.
    pub retire_at_ms: Option<u64>,
    /// Soft state, not serialized: a restored SA retransmits `pending` at once.
    #[serde(skip)]
    pub retransmit: crate::sa::Retransmit,
}

impl IkeGeneration {
    pub fn local_spi(&self) -> u64 {
        match self.role {
            Role::Initiator => self.spi_i,
            Role::Responder => self.spi_r,
        }
    }

    pub fn peer_spi(&self) -> u64 {
        match self.role {
            Role::Initiator => self.spi_r,
            Role::Responder => self.spi_i,
        }
    }

    /// Key protecting what we send.
    pub fn send_key(&self) -> &Secret {
        match self.role {
            Role::Initiator => &self.keys.sk_ei,
            Role::Responder => &self.keys.sk_er,
        }
    }

    /// Key protecting what the peer sends.
    pub fn recv_key(&self) -> &Secret {
        match self.role {
            Role::Initiator => &self.keys.sk_er,
            Role::Responder => &self.keys.sk_ei,
        }
    }
}

/// A complete message as it went on the wire (one datagram per element; more
/// than one only once fragmentation exists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub message_id: u32,
    #[serde(with = "crate::bytes_serde::list")]
    pub datagrams: Vec<Vec<u8>>,
}

/// Our outstanding request and what we need to finish it when the answer comes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingRequest {
    pub message: StoredMessage,
    pub first_sent_at_ms: u64,
    pub exchange: PendingExchange,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PendingExchange {
    /// INFORMATIONAL: an empty one is a liveness check (DPD).
    Informational {
        delete_children: Vec<u32>,
        delete_ike: bool,
    },
    CreateChild(Box<ChildRequest>),
    RekeyIke(Box<IkeRekeyRequest>),
    /// The initiator's IKE_AUTH. Never committed: the SA is half-open until
    /// its answer arrives.
    Auth,
}

/// A CREATE_CHILD_SA we sent for a new or rekeyed child SA.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildRequest {
    /// Inbound SPI of the child being rekeyed, if this is a rekey.
    pub rekey_of: Option<u32>,
    pub inbound_spi: u32,
    #[serde(with = "crate::bytes_serde")]
    pub nonce: Vec<u8>,
    pub dh: Option<DhPrivate>,
    pub ts_i: Vec<TrafficSelector>,
    pub ts_r: Vec<TrafficSelector>,
    /// Set when the peer rekeyed the same child meanwhile (§2.8.1).
    pub collision: Option<Collision>,
}

/// A CREATE_CHILD_SA we sent to rekey the IKE SA.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IkeRekeyRequest {
    pub new_spi: u64,
    #[serde(with = "crate::bytes_serde")]
    pub nonce: Vec<u8>,
    pub dh: DhPrivate,
    pub collision: Option<Collision>,
}

/// The nonces of the peer's exchange that rekeyed the same SA as ours, and
/// what it created (a child's inbound SPI or an IKE generation's local SPI).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Collision {
    #[serde(with = "crate::bytes_serde")]
    pub peer_ni: Vec<u8>,
    #[serde(with = "crate::bytes_serde")]
    pub our_nr: Vec<u8>,
    pub created: u64,
}

/// A request waiting for the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueuedRequest {
    Dpd,
    DeleteChildren(Vec<u32>),
    DeleteIke,
    RekeyChild(u32),
    RekeyIke,
    CreateChild {
        ts_i: Vec<TrafficSelector>,
        ts_r: Vec<TrafficSelector>,
    },
}

/// A child SA (an ESP SA pair).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildSa {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
    pub suite: EspSuite,
    /// Key | salt protecting what we receive.
    pub inbound_key: Secret,
    /// Key | salt protecting what we send.
    pub outbound_key: Secret,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    /// 0 for a child made in IKE_AUTH or by a plain CREATE_CHILD_SA; +1 per rekey.
    pub rekey_generation: u32,
    /// Whether we initiated the exchange that created it.
    pub created_as_initiator: bool,
    pub created_at_ms: u64,
    pub rekey_at_ms: Option<u64>,
    pub expire_at_ms: Option<u64>,
    /// A replacement exists (we or the peer rekeyed it); it waits for its DELETE.
    pub replaced: bool,
}
