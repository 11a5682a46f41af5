//! The replicated records of IKE SAs and their child (ESP) SAs.
//!
//! These are everything a node needs to resume an SA it did not create: addresses, SPIs,
//! negotiated suite, sealed keys, message-ID state with the exact bytes to retransmit, timers,
//! and for each child the sequence-number lease and the replay checkpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, NodeId, SaId, Slot};

/// Which side of IKE_SA_INIT this cluster was (RFC 7296 §2.2: the original initiator keeps that
/// role for the life of the IKE SA, whatever later exchanges do).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The peer initiated: we are the original responder (end-users connecting to us).
    Responder,
    /// We initiated (site-to-site, or a test client).
    Initiator,
}

/// An IKE identity (RFC 7296 §3.5): the ID type number and its data.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    /// ID Type (RFC 7296 §3.5): 1 IPv4, 2 FQDN, 3 RFC 822 address, 5 IPv6, 9 DER DN, 11 key id.
    pub kind: u8,
    /// Identification data as sent on the wire.
    pub data: Vec<u8>,
}

impl Identity {
    /// ID_FQDN (RFC 7296 §3.5).
    pub const FQDN: u8 = 2;
    /// ID_RFC822_ADDR (RFC 7296 §3.5).
    pub const RFC822_ADDR: u8 = 3;
    /// ID_IPV4_ADDR (RFC 7296 §3.5).
    pub const IPV4_ADDR: u8 = 1;
    /// ID_IPV6_ADDR (RFC 7296 §3.5).
    pub const IPV6_ADDR: u8 = 5;
    /// ID_KEY_ID (RFC 7296 §3.5).
    pub const KEY_ID: u8 = 11;

    /// An FQDN identity such as `gw.example`.
    pub fn fqdn(name: &str) -> Identity {
        Identity {
            kind: Self::FQDN,
            data: name.as_bytes().to_vec(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.data.len()) {
            (Self::FQDN | Self::RFC822_ADDR, _) => {
                write!(f, "{}", String::from_utf8_lossy(&self.data))
            }
            (Self::IPV4_ADDR, 4) => {
                let o: [u8; 4] = self.data[..].try_into().map_err(|_| fmt::Error)?;
                write!(f, "{}", std::net::Ipv4Addr::from(o))
            }
            (Self::IPV6_ADDR, 16) => {
                let o: [u8; 16] = self.data[..].try_into().map_err(|_| fmt::Error)?;
                write!(f, "{}", std::net::Ipv6Addr::from(o))
            }
            (kind, _) => write!(f, "id-type-{kind}:{}", hex::encode(&self.data)),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// The negotiated IKE SA suite, as IANA transform IDs (RFC 7296 §3.3.2).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSuite {
    /// Transform type 1 (ENCR), e.g. 20 = ENCR_AES_GCM_16 (RFC 5282).
    pub encryption: u16,
    /// Key length attribute in bits (RFC 7296 §3.3.5), e.g. 128 or 256.
    pub key_bits: u16,
    /// Transform type 2 (PRF), e.g. 5 = PRF_HMAC_SHA2_256 (RFC 4868).
    pub prf: u16,
    /// Transform type 3 (INTEG); `None` with an AEAD cipher.
    pub integrity: Option<u16>,
    /// Transform type 4 (key exchange group), e.g. 19 (ECP-256) or 31 (Curve25519).
    pub dh_group: u16,
}

/// The negotiated child (ESP) SA suite.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSuite {
    /// Transform type 1 (ENCR), e.g. 20 = ENCR_AES_GCM_16 (RFC 4106).
    pub encryption: u16,
    /// Key length in bits.
    pub key_bits: u16,
    /// Extended sequence numbers (RFC 4303 §2.2.1; transform type 5, ESN = 1).
    pub esn: bool,
}

/// Key material sealed under the cluster key (AES-GCM) by the proposing node.
///
/// The replicated log and every replica's disk only ever hold this sealed form; it is opaque to
/// the store. `Debug` prints only its length so a stray log line never leaks it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKeys(pub Vec<u8>);

impl fmt::Debug for SealedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedKeys(<{} bytes, redacted>)", self.0.len())
    }
}

/// A traffic selector (RFC 7296 §3.13.1): a protocol, a port range and an address range.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSelector {
    /// IP protocol number, 0 for any.
    pub protocol: u8,
    /// First port of the range (0 for any).
    pub start_port: u16,
    /// Last port of the range (65535 for any).
    pub end_port: u16,
    /// First address of the range.
    pub start_addr: IpAddr,
    /// Last address of the range.
    pub end_addr: IpAddr,
}

/// IKE message-ID state (RFC 7296 §2.2). With a window of one, each direction is one counter.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageIds {
    /// The message ID of the next request we expect from the peer.
    pub next_peer_request: u32,
    /// The message ID our next request will carry.
    pub next_local_request: u32,
}

/// An IKE message stored with its message ID: the exact datagrams (more than one when IKE
/// fragmentation, RFC 7383, splits it) so any node can send them again byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message ID of the exchange.
    pub msg_id: u32,
    /// The datagrams, each an IKE message as it goes on the wire (without the non-ESP marker).
    pub datagrams: Vec<Vec<u8>>,
}

/// Lifetimes of an SA as absolute wall-clock times in milliseconds since the Unix epoch, so
/// whichever node owns the SA next can pick up the timers where the last owner left them.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaTimes {
    /// When the SA was established.
    pub established_ms: u64,
    /// When the owner should start a rekey (soft lifetime).
    pub rekey_at_ms: u64,
    /// When the SA must be gone (hard lifetime).
    pub expire_at_ms: u64,
}

/// A child SA (ESP) negotiated under an IKE SA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSa {
    /// SPI the peer puts on packets to us; we chose it, so it is unique in the cluster.
    pub in_spi: u32,
    /// SPI we put on packets to the peer.
    pub out_spi: u32,
    /// Negotiated ESP suite, including ESN.
    pub suite: ChildSuite,
    /// Both directions' KEYMAT, sealed.
    pub keys: SealedKeys,
    /// Our side's traffic selectors.
    pub ts_local: Vec<TrafficSelector>,
    /// The peer's traffic selectors.
    pub ts_remote: Vec<TrafficSelector>,
    /// First outbound sequence number of the current owner's range: 1 for a new child; on a
    /// change of owner, one above the previous owner's last mark.
    pub out_start: u64,
    /// Outbound sequence-number lease: the owner never sends a sequence number above this.
    /// A new owner starts at `out_start`, above everything an earlier owner could have used.
    pub out_hwm: u64,
    /// Highest authenticated inbound sequence number the owner reported; a new owner's replay
    /// window refuses everything at or below it.
    pub in_checkpoint: u64,
    /// ESP travels in UDP (RFC 3948) because IKE detected a NAT between us and the peer
    /// (RFC 7296 §2.23) or the peer forced encapsulation; otherwise plain ESP, IP protocol 50.
    pub udp_encap: bool,
    /// How many times this child has been rekeyed (0 for the first SA of its lineage).
    pub rekey_generation: u32,
    /// Lifetimes.
    pub times: SaTimes,
}

/// An IKE SA and its children, with who owns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSa {
    /// Our own SPI: the key of this record.
    pub id: SaId,
    /// IKE SPI chosen by the original initiator.
    pub spi_i: u64,
    /// IKE SPI chosen by the original responder.
    pub spi_r: u64,
    /// Our role in the IKE_SA_INIT exchange.
    pub role: Role,
    /// The cluster address and port the peer talks to.
    pub local: SocketAddr,
    /// The peer's address and port (after NAT, as we see it).
    pub peer: SocketAddr,
    /// Our identity (IDr when we are the responder).
    pub local_id: Identity,
    /// The peer's authenticated identity.
    pub peer_id: Identity,
    /// Negotiated suite.
    pub suite: IkeSuite,
    /// SK_d, SK_ai/ar, SK_ei/er, SK_pi/pr, sealed.
    pub keys: SealedKeys,
    /// Message-ID state.
    pub msg: MessageIds,
    /// Our response to the peer's last request (`msg_id == msg.next_peer_request - 1`), to answer
    /// a retransmission of that request from whichever node owns the SA now.
    pub last_response: Option<StoredMessage>,
    /// A gateway-initiated request in flight (`msg_id == msg.next_local_request`): committed
    /// before it is sent, so a new owner retransmits exactly these bytes.
    pub pending_request: Option<StoredMessage>,
    /// Lifetimes and rekey time.
    pub times: SaTimes,
    /// The last time (ms) the owner heard anything authenticated from the peer.
    pub last_peer_activity_ms: u64,
    /// How many times this IKE SA's lineage has been rekeyed.
    pub rekey_generation: u32,
    /// The inner (virtual) address given to the peer, if any; reserved in the address pool.
    pub virtual_ip: Option<IpAddr>,
    /// The slot that placed this SA when it was created.
    pub slot: Slot,
    /// The node that processes this SA (and its children).
    pub owner: NodeId,
    /// Ownership epoch.
    pub epoch: Epoch,
    /// Child SAs by inbound SPI.
    pub children: BTreeMap<u32, ChildSa>,
}

/// strongSwan-style name of an encryption transform (RFC 7296 §3.3.2 numbering).
fn encryption_name(id: u16, key_bits: u16) -> String {
    match id {
        12 => format!("aes{key_bits}"),
        18 => format!("aes{key_bits}gcm8"),
        19 => format!("aes{key_bits}gcm12"),
        20 => format!("aes{key_bits}gcm16"),
        28 => "chacha20poly1305".into(),
        other => format!("encr{other}-{key_bits}"),
    }
}

impl fmt::Display for IkeSuite {
    /// Proposal-style text, e.g. `aes128gcm16-prfsha256-x25519`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", encryption_name(self.encryption, self.key_bits))?;
        match self.integrity {
            None => {}
            Some(2) => write!(f, "-sha1")?,
            Some(12) => write!(f, "-sha256")?,
            Some(13) => write!(f, "-sha384")?,
            Some(14) => write!(f, "-sha512")?,
            Some(other) => write!(f, "-integ{other}")?,
        }
        match self.prf {
            2 => write!(f, "-prfsha1")?,
            5 => write!(f, "-prfsha256")?,
            6 => write!(f, "-prfsha384")?,
            7 => write!(f, "-prfsha512")?,
            other => write!(f, "-prf{other}")?,
        }
        match self.dh_group {
            14 => write!(f, "-modp2048"),
            19 => write!(f, "-ecp256"),
            20 => write!(f, "-ecp384"),
            31 => write!(f, "-x25519"),
            other => write!(f, "-dh{other}"),
        }
    }
}

impl fmt::Display for ChildSuite {
    /// e.g. `aes128gcm16` or `aes256gcm16-esn`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", encryption_name(self.encryption, self.key_bits))?;
        if self.esn {
            write!(f, "-esn")?;
        }
        Ok(())
    }
}

/// An SA context as exported from one cluster and imported into another (the paper's transfer
/// across administrative domains), or back into the same one.
///
/// This is the body; on the wire the node seals it under the cluster key (so an edited context
/// does not open, and its identities and addresses are not readable in transit) — see
/// `evpc_node::sealing`. Keys inside stay sealed too: both clusters must share the cluster key.
///
/// Only a context exported with `remove` may be imported: its source deleted the SA in the
/// same log entry that read it, so nothing under its keys is sent there any more. A copy
/// (`remove: false`) describes an SA that may still be running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaContext {
    /// Format tag, [`SaContext::FORMAT`].
    pub format: String,
    /// Whether the exporting cluster removed the SA in the same entry (only then importable).
    pub removed: bool,
    /// The exporting cluster, if it had an id.
    pub origin: Option<crate::ids::ClusterId>,
    /// The log index of the export in the exporting cluster.
    pub exported_at_index: u64,
    /// The SA as the exporting cluster last committed it.
    pub sa: IkeSa,
}

/// An SA context that cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaContextError {
    /// Not a postcard-encoded context.
    #[error("not an evpc SA context: {0}")]
    Malformed(String),
    /// Another format version.
    #[error("SA context format {found:?} is not supported (expected {expected:?})")]
    Format {
        /// What the context says.
        found: String,
        /// What this build reads.
        expected: &'static str,
    },
    /// A copy: the source may still be sending under these keys.
    #[error(
        "this context is a copy (exported without --remove): the SA may still be running where \
         it came from, and importing it would send sequence numbers under the same keys twice; \
         export it again with --remove"
    )]
    Copy,
}

impl SaContext {
    /// The format this build writes and reads.
    pub const FORMAT: &'static str = "evpc-sa-context/2";

    /// Wraps an SA for export.
    pub fn new(
        sa: IkeSa,
        removed: bool,
        origin: Option<crate::ids::ClusterId>,
        exported_at_index: u64,
    ) -> SaContext {
        SaContext {
            format: Self::FORMAT.into(),
            removed,
            origin,
            exported_at_index,
            sa,
        }
    }

    /// Encodes the body.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// Decodes a body (after it was authenticated); refuses other formats.
    pub fn from_bytes(bytes: &[u8]) -> Result<SaContext, SaContextError> {
        let context: SaContext =
            postcard::from_bytes(bytes).map_err(|e| SaContextError::Malformed(e.to_string()))?;
        if context.format != Self::FORMAT {
            return Err(SaContextError::Format {
                found: context.format,
                expected: Self::FORMAT,
            });
        }
        Ok(context)
    }

    /// The SA, if this context may be imported.
    pub fn importable(self) -> Result<IkeSa, SaContextError> {
        if self.removed {
            Ok(self.sa)
        } else {
            Err(SaContextError::Copy)
        }
    }
}
