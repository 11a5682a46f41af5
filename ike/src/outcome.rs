//! What a call into the engine asks the caller to do.
//!
//! # The commit contract
//!
//! Every call returns an [`Outcome`]. Datagrams that may leave at once are in
//! [`Outcome::send`]: retransmissions of bytes that were already committed,
//! stateless replies, and messages of a half-open SA (which is node-local).
//! Everything that results from a state change the cluster must not lose is
//! inside [`Outcome::commit`]: the [`StateChange`] to make durable and the
//! datagrams that may only be sent afterwards. The only way to reach those
//! datagrams is [`Commit::into_datagrams_after_durable`], so sending before
//! committing takes a deliberate act.
//!
//! If the commit fails, the caller must drop the `IkeSa` and, if the SA is
//! still wanted, restore it from the last committed snapshot: the engine has
//! already moved on to the uncommitted state.

use std::net::SocketAddr;

use crate::crypto::{EspSuite, Secret};
use crate::error::PeerError;
use crate::snapshot::{IkeSaSnapshot, InnerAddress};
use crate::wire::{Identity, TrafficSelector};

/// One UDP datagram carrying one IKE message.
///
/// When either port is 4500 the caller prepends the four-zero-octet non-ESP
/// marker (RFC 3948 §2.2) on send and strips it on receive; the engine only
/// sees IKE messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Datagram {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub payload: Vec<u8>,
}

impl Datagram {
    pub fn needs_non_esp_marker(&self) -> bool {
        self.local.port() == 4500 || self.remote.port() == 4500
    }
}

impl core::fmt::Debug for Datagram {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Datagram({} -> {}, {} bytes)",
            self.local,
            self.remote,
            self.payload.len()
        )
    }
}

/// A state change to make durable before the gated datagrams are sent.
#[derive(Debug)]
#[must_use = "the gated datagrams are only released after the commit is durable"]
pub struct Commit {
    pub change: StateChange,
    gated: Vec<Datagram>,
}

#[derive(Debug)]
pub enum StateChange {
    /// Store this snapshot, replacing the previous one of the same SA.
    Upsert(Box<IkeSaSnapshot>),
    /// The SA is gone; forget it. `local_spis` are all the SPIs it was known by.
    Remove { local_spis: Vec<u64> },
}

impl Commit {
    pub(crate) fn new(change: StateChange, gated: Vec<Datagram>) -> Self {
        Self { change, gated }
    }

    /// Call only once `change` is durable (committed to the replicated log).
    pub fn into_datagrams_after_durable(self) -> Vec<Datagram> {
        self.gated
    }

    /// The snapshot to store, if this is an upsert.
    pub fn snapshot(&self) -> Option<&IkeSaSnapshot> {
        match &self.change {
            StateChange::Upsert(s) => Some(s),
            StateChange::Remove { .. } => None,
        }
    }

    /// Number of datagrams waiting for the commit (for metrics and tests).
    pub fn gated_len(&self) -> usize {
        self.gated.len()
    }
}

/// Result of one call into the engine. See the module docs for the contract.
#[derive(Debug, Default)]
#[must_use]
pub struct Outcome {
    /// May be sent immediately.
    pub send: Vec<Datagram>,
    /// Commit first, then send what it releases.
    pub commit: Option<Commit>,
    pub events: Vec<Event>,
    /// When to call `handle_timeout` next (absolute ms), if ever.
    pub next_timeout: Option<u64>,
}

/// Things the caller should know or act on.
#[derive(Clone, Debug)]
pub enum Event {
    /// The IKE SA is authenticated and usable.
    IkeSaEstablished {
        local_spi: u64,
        peer_identity: Identity,
    },
    /// The responder needs an inner address before it can answer IKE_AUTH:
    /// allocate one and call `IkeSa::assign_inner_address`.
    InnerAddressNeeded {
        peer_identity: Identity,
        requested: Option<std::net::Ipv4Addr>,
    },
    /// The initiator received an inner address from the responder.
    InnerAddressAssigned(InnerAddress),
    /// The peer sent INITIAL_CONTACT: other SAs with this identity are stale.
    InitialContact { peer_identity: Identity },
    /// Install these ESP SAs in the data plane. For a rekey, the old pair
    /// stays until its `ChildSaDeleted`.
    ChildSaInstalled(Box<ChildSaInfo>),
    /// Remove this ESP SA pair from the data plane.
    ChildSaDeleted { inbound_spi: u32, outbound_spi: u32 },
    /// A child SA could not be created or rekeyed; the peer said why.
    ChildSaFailed {
        rekey_of: Option<u32>,
        error: PeerError,
    },
    /// The IKE SA was rekeyed: route `new_local_spi` to this SA too.
    IkeSaRekeyed {
        old_local_spi: u64,
        new_local_spi: u64,
    },
    /// A replaced generation is gone: stop routing this SPI to this SA.
    LocalSpiReleased { local_spi: u64 },
    /// Our liveness check was answered.
    PeerAlive,
    /// The SA is finished; drop the `IkeSa`.
    Closed { reason: CloseReason },
    /// A message was dropped or refused; for logging and metrics.
    PeerMisbehaved(PeerError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    DeletedByPeer,
    DeletedLocally,
    PeerUnreachable,
    HalfOpenTimeout,
    AuthenticationFailed,
    NegotiationFailed(PeerError),
}

/// Everything a data plane needs for one child SA (an ESP SA pair).
#[derive(Clone, Debug)]
pub struct ChildSaInfo {
    pub inbound_spi: u32,
    pub outbound_spi: u32,
    pub suite: EspSuite,
    /// AES-GCM key followed by the 4-octet salt (RFC 4106 §8.1).
    pub inbound_key: Secret,
    pub outbound_key: Secret,
    pub local_ts: Vec<TrafficSelector>,
    pub remote_ts: Vec<TrafficSelector>,
    /// Outer addresses; with `udp_encap` ESP goes in UDP (RFC 3948) on these ports.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub udp_encap: bool,
    /// Inbound SPI of the child this one replaces.
    pub rekey_of: Option<u32>,
    pub rekey_generation: u32,
    pub rekey_at_ms: Option<u64>,
    pub expire_at_ms: Option<u64>,
}
