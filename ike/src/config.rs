//! Local policy: who we are, whom we accept, which algorithms, which
//! selectors, which timers. Shared by every SA of a node through `Arc<Config>`
//! and deliberately not part of a snapshot (only what was negotiated is).

use std::sync::Arc;

use crate::crypto::{DhGroup, EncrAlg, PrfAlg, Secret};
use crate::policy::ChildPolicy;
use crate::snapshot::InnerAddress;
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
    /// The selectors this peer's side of a child SA may cover when it holds
    /// no inner address (a site-to-site peer and the networks behind it).
    /// `Some` replaces [`Config::remote_ts`] for this identity and exempts it
    /// from [`Config::require_inner_address`]; `Some(vec![])` allows nothing.
    pub remote_ts: Option<Vec<TrafficSelector>>,
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
    /// What the peer side may be when it holds no inner address and its
    /// [`PskEntry`] has no `remote_ts` of its own. Never used for such a peer
    /// while `require_inner_address` is set.
    pub remote_ts: Vec<TrafficSelector>,
    /// A peer without selectors of its own ([`PskEntry::remote_ts`]) must
    /// hold an inner address to get a child SA: without a CP request in
    /// IKE_AUTH its child is refused with FAILED_CP_REQUIRED (RFC 7296
    /// §3.10.1), and a CREATE_CHILD_SA of an IKE SA without an inner address
    /// with TS_UNACCEPTABLE (§2.9). Set it whenever addresses come from a
    /// pool: otherwise such a peer is narrowed to the shared `remote_ts` and
    /// can claim the addresses of other peers.
    pub require_inner_address: bool,
    /// The caller's admission check for narrowed child SAs (e.g. no overlap
    /// with another SA's selectors). `None` admits every child. See
    /// [`ChildPolicy`] for what an implementation may and must not do.
    pub child_policy: Option<Arc<dyn ChildPolicy>>,
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
            require_inner_address: false,
            child_policy: None,
            lifetimes: Lifetimes::default(),
            retransmit: RetransmitPolicy::default(),
            cookie_threshold: 1_000,
            nonce_len: 32,
        }
    }

    /// Adds a PSK for `peer`, which has no selectors of its own.
    pub fn with_psk(mut self, peer: Identity, psk: &[u8]) -> Self {
        self.psks.push(PskEntry {
            peer,
            psk: Secret::from_slice(psk),
            remote_ts: None,
        });
        self
    }

    /// Adds a PSK for a site-to-site `peer` whose side of a child SA may
    /// cover `remote_ts` (see [`PskEntry::remote_ts`]).
    pub fn with_site_psk(
        mut self,
        peer: Identity,
        psk: &[u8],
        remote_ts: Vec<TrafficSelector>,
    ) -> Self {
        self.psks.push(PskEntry {
            peer,
            psk: Secret::from_slice(psk),
            remote_ts: Some(remote_ts),
        });
        self
    }

    /// The entry of `peer`, if we have a PSK for it.
    pub fn psk_entry(&self, peer: &Identity) -> Option<&PskEntry> {
        self.psks.iter().find(|e| &e.peer == peer)
    }

    pub fn psk_for(&self, peer: &Identity) -> Option<&Secret> {
        self.psk_entry(peer).map(|e| &e.psk)
    }

    /// What the side of `peer` may cover in a child SA it proposes (the
    /// responder narrows TSi to it, RFC 7296 §2.9): its inner address if it
    /// holds one, else its own selectors, else the shared `remote_ts`.
    /// `None` when it must hold an inner address (`require_inner_address`).
    pub(crate) fn remote_allowed(
        &self,
        peer: &Identity,
        inner: Option<&InnerAddress>,
    ) -> Option<Vec<TrafficSelector>> {
        if let Some(a) = inner {
            return Some(vec![TrafficSelector::v4_host(a.ipv4)]);
        }
        match self.psk_entry(peer).and_then(|e| e.remote_ts.as_ref()) {
            Some(own) => Some(own.clone()),
            None if self.require_inner_address => None,
            None => Some(self.remote_ts.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The precedence of the peer's allowed selectors: inner address, then
    /// the identity's own selectors, then (only if no inner address is
    /// required) the shared `remote_ts`.
    #[test]
    fn remote_allowed_precedence() {
        let site = TrafficSelector::v4_prefix(Ipv4Addr::new(10, 20, 0, 0), 16);
        let road = Identity::fqdn("road.example");
        let branch = Identity::fqdn("branch.example");
        let mut c = Config::new(Identity::fqdn("gw.example"))
            .with_psk(road.clone(), b"k1")
            .with_site_psk(branch.clone(), b"k2", vec![site]);
        let vip = InnerAddress::new(Ipv4Addr::new(10, 10, 0, 7));
        let host = vec![TrafficSelector::v4_host(vip.ipv4)];
        assert_eq!(c.remote_allowed(&road, None), Some(c.remote_ts.clone()));
        assert_eq!(c.remote_allowed(&branch, None), Some(vec![site]));
        c.require_inner_address = true;
        assert_eq!(c.remote_allowed(&road, None), None);
        assert_eq!(c.remote_allowed(&branch, None), Some(vec![site]));
        assert_eq!(c.remote_allowed(&road, Some(&vip)), Some(host.clone()));
        assert_eq!(c.remote_allowed(&branch, Some(&vip)), Some(host));
        // An identity we have no key for never gets here, but is treated
        // like one without selectors of its own.
        assert_eq!(c.remote_allowed(&Identity::fqdn("x"), None), None);
    }
}
