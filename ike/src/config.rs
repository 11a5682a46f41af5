//! Local policy: who we are, whom we accept, which algorithms, which
//! selectors, which timers. Shared by every SA of a node through `Arc<Config>`
//! and deliberately not part of a snapshot (only what was negotiated is).

use crate::crypto::{DhGroup, EncrAlg, PrfAlg, Secret};
use crate::wire::{Identity, TrafficSelector};

/// Acceptable IKE SA algorithms, most preferred first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkePolicy {
    pub encr: Vec<EncrAlg>,
    pub prf: Vec<PrfAlg>,
    pub dh: Vec<DhGroup>,
}

/// Acceptable child SA algorithms, most preferred first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EspPolicy {
    pub encr: Vec<EncrAlg>,
    /// `false` = no ESN, `true` = ESN; we accept whatever the peer proposes
    /// among these (RFC 7296 §3.3.2 transform type 5).
    pub esn: Vec<bool>,
    /// Groups accepted for PFS in CREATE_CHILD_SA. When we initiate, the first
    /// is proposed; empty means we propose no PFS (and refuse a KE from the peer).
    pub pfs: Vec<DhGroup>,
}

/// Timers, in milliseconds. Rekey times get up to 10% random jitter subtracted
/// so that both ends rarely rekey at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub ike_rekey_ms: Option<u64>,
    /// Hard lifetime of an IKE SA generation: deleted if not rekeyed by then.
    pub ike_expire_ms: Option<u64>,
    pub child_rekey_ms: Option<u64>,
    /// Hard lifetime of a child SA, after which it is deleted if not rekeyed.
    pub child_expire_ms: Option<u64>,
    /// Send an empty INFORMATIONAL when the peer was silent this long.
    pub dpd_interval_ms: Option<u64>,
    /// A half-open SA (IKE_SA_INIT done, IKE_AUTH not) is dropped after this.
    pub half_open_timeout_ms: u64,
    /// A generation replaced by an IKE rekey is forgotten after this if the
    /// peer never deletes it.
    pub retired_ike_sa_timeout_ms: u64,
    /// Wait before retrying an exchange refused with TEMPORARY_FAILURE (§2.25).
    pub temporary_failure_retry_ms: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ike_rekey_ms: None,
            ike_expire_ms: None,
            child_rekey_ms: None,
            child_expire_ms: None,
            dpd_interval_ms: None,
            half_open_timeout_ms: 30_000,
            retired_ike_sa_timeout_ms: 60_000,
            temporary_failure_retry_ms: 10_000,
        }
    }
}

/// Retransmission of our requests (RFC 7296 §2.1: exponential back-off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetransmitPolicy {
    pub initial_timeout_ms: u64,
    pub max_timeout_ms: u64,
    /// After this many retransmissions without an answer the peer is dead.
    pub max_retransmits: u32,
}

impl Default for RetransmitPolicy {
    fn default() -> Self {
        Self {
            initial_timeout_ms: 1_000,
            max_timeout_ms: 16_000,
            max_retransmits: 6,
        }
    }
}

impl RetransmitPolicy {
    /// Delay before retransmission number `attempt` (0 = after the first send).
    pub fn timeout(&self, attempt: u32) -> u64 {
        let factor = 1u64 << attempt.min(20);
        self.initial_timeout_ms
            .saturating_mul(factor)
            .min(self.max_timeout_ms)
    }
}

/// One pre-shared key, bound to the peer identity it authenticates.
#[derive(Clone, Debug)]
pub struct PskEntry {
    pub peer: Identity,
    pub psk: Secret,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub local_identity: Identity,
    /// PSKs by peer identity. Authentication is a separate step in
    /// `exchange::auth`, so certificate or EAP methods can be added beside it.
    pub psks: Vec<PskEntry>,
    pub ike: IkePolicy,
    pub esp: EspPolicy,
    /// Our side of child SAs (the responder narrows the peer's TSr to these).
    pub local_ts: Vec<TrafficSelector>,
    /// What the peer side may be when it did not get an inner address.
    pub remote_ts: Vec<TrafficSelector>,
    pub lifetimes: Lifetimes,
    pub retransmit: RetransmitPolicy,
    /// Number of half-open SAs at which IKE_SA_INIT requires a cookie (§2.6).
    pub cookie_threshold: usize,
    /// Length of the nonces we send (§2.10: at least 16 and half the PRF key).
    pub nonce_len: usize,
}

impl Config {
    /// A gateway policy with the algorithms the product needs: AES-GCM-16
    /// 128/256, HMAC-SHA2-256/384/512, groups 31, 19 and 14 (in that order).
    pub fn new(local_identity: Identity) -> Self {
        Self {
            local_identity,
            psks: Vec::new(),
            ike: IkePolicy {
                encr: vec![EncrAlg::AES128_GCM16, EncrAlg::AES256_GCM16],
                prf: vec![PrfAlg::HmacSha256, PrfAlg::HmacSha384, PrfAlg::HmacSha512],
                dh: vec![DhGroup::Curve25519, DhGroup::Ecp256, DhGroup::Modp2048],
            },
            esp: EspPolicy {
                encr: vec![EncrAlg::AES128_GCM16, EncrAlg::AES256_GCM16],
                esn: vec![false, true],
                pfs: vec![DhGroup::Curve25519, DhGroup::Ecp256, DhGroup::Modp2048],
            },
            local_ts: vec![TrafficSelector::any_v4()],
            remote_ts: vec![TrafficSelector::any_v4()],
            lifetimes: Lifetimes::default(),
            retransmit: RetransmitPolicy::default(),
            cookie_threshold: 1_000,
            nonce_len: 32,
        }
    }

    pub fn with_psk(mut self, peer: Identity, psk: &[u8]) -> Self {
        self.psks.push(PskEntry {
            peer,
            psk: Secret::from_slice(psk),
        });
        self
    }

    pub fn psk_for(&self, peer: &Identity) -> Option<&Secret> {
        self.psks.iter().find(|e| &e.peer == peer).map(|e| &e.psk)
    }
}
