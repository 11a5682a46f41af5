//! `[ike]` in node.toml: who the gateway is, whom it accepts, what it offers, its timers — and
//! the engine policy ([`evpc_ike::Config`]) built from it.
//!
//! ```toml
//! [ike]
//! local_id = "gw.example"                  # IDr: FQDN, user@domain, or an IPv4 address
//! psk_file = "/etc/evpc/psk.toml"          # [[psk]] entries as below (kept out of node.toml)
//! pool = "10.10.0.0/24"                    # inner addresses (CP, RFC 7296 §2.19); with a pool,
//!                                          # a peer without its own remote_ts must take one
//! dns = ["10.10.0.1"]
//! local_ts = ["10.10.0.0/24"]              # what peers reach through the tunnel
//! remote_ts = ["0.0.0.0/0"]                # a peer's side without inner address and own
//!                                          # remote_ts; unused when pool is set
//! ike_proposals = ["aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-x25519-ecp256-modp2048"]
//! esp_proposals = ["aes128gcm16-aes256gcm16-x25519-ecp256-modp2048-noesn-esn"]
//! ike_rekey_s = 14400                      # 0: never
//! ike_lifetime_s = 15840                   # hard lifetime; 0: none
//! child_rekey_s = 3600
//! child_lifetime_s = 3960
//! dpd_s = 30                               # liveness check after this much IKE silence; 0: off
//!
//! # [[ike.psk]]                            # or inline (after the [ike] keys: TOML tables)
//! # peer = "client.example"                # a road warrior: gets an address from the pool
//! # secret = "..."
//! # [[ike.psk]]
//! # peer = "branch.example"                # a site-to-site peer: no inner address; its side
//! # secret = "..."                         # of a child SA is narrowed to these networks,
//! # remote_ts = ["10.20.0.0/16"]           # which must be outside the pool and no other
//! #                                        # peer's remote_ts
//! ```
//!
//! A proposal is strongSwan-style: algorithm names joined by `-`; every algorithm of every
//! proposal is acceptable, in the order written (most preferred first). Secrets never appear in
//! `Debug` output and are wiped from memory when dropped.
//!
//! Traffic selectors decide whose return traffic a child SA carries, so the validation makes
//! sure no two peers can be given the same addresses: with a pool, every peer either takes an
//! inner address (a /32 of its own; `require_inner_address` in the engine policy) or has its
//! own `remote_ts`, and those never overlap the pool or each other. Overlaps between SAs at
//! run time (e.g. a peer connected twice) are the business of the engine's child policy hook.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use evpc_ike::{
    Config, DhGroup, EncrAlg, EspPolicy, IkePolicy, Lifetimes, PrfAlg, PskEntry, RouterLimits,
    Secret, TrafficSelector, wire::Identity,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// A pre-shared key. `Debug` prints nothing of it; it is wiped on drop.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PskSecret(String);

impl PskSecret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> PskSecret {
        PskSecret(secret.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for PskSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for PskSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One peer's pre-shared key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PskSetting {
    /// The peer identity (IDi) this key authenticates.
    pub peer: String,
    /// The key.
    pub secret: PskSecret,
    /// A site-to-site peer: the IPv4 prefixes on its side of a child SA, to which its TSi is
    /// narrowed (RFC 7296 §2.9) when it takes no inner address. It then needs no address from
    /// the pool. None of them may overlap the pool or another peer's `remote_ts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ts: Option<Vec<String>>,
}

/// The file `psk_file` points at.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PskFile {
    #[serde(default)]
    psk: Vec<PskSetting>,
}

/// `[ike]` in node.toml: the IKE responder on the cluster address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IkeSettings {
    /// Our identity (IDr), e.g. "gw.example": an FQDN, `user@domain`, or an IPv4 address.
    pub local_id: String,
    /// Pre-shared keys by peer identity, inline.
    pub psk: Vec<PskSetting>,
    /// A TOML file of `[[psk]]` entries (`peer`, `secret`, optional `remote_ts`), read at start.
    pub psk_file: Option<PathBuf>,
    /// The inner-address pool, an IPv4 prefix such as "10.10.0.0/24" (network and broadcast
    /// addresses, the DNS servers and this node's TUN addresses are never handed out). Without a
    /// pool, a peer asking for an address gets INTERNAL_ADDRESS_FAILURE. With a pool, a peer
    /// without its own `remote_ts` must take an address: a child SA without one is refused with
    /// FAILED_CP_REQUIRED (RFC 7296 §3.10.1).
    pub pool: Option<String>,
    /// DNS servers announced with an inner address (when the peer asks for them).
    pub dns: Vec<Ipv4Addr>,
    /// Our side of child SAs, IPv4 prefixes; a peer's TSr is narrowed to these.
    pub local_ts: Vec<String>,
    /// What a peer's side may be when it holds no inner address and has no `remote_ts` of its
    /// own. Unused when `pool` is set: such a peer must then take an inner address.
    pub remote_ts: Vec<String>,
    /// IKE SA proposals (strongSwan-style, e.g. "aes128gcm16-prfsha256-x25519").
    pub ike_proposals: Vec<String>,
    /// Child SA proposals (e.g. "aes128gcm16-x25519-noesn"); key-exchange groups are the PFS
    /// groups accepted in CREATE_CHILD_SA.
    pub esp_proposals: Vec<String>,
    /// Rekey the IKE SA after this many seconds (0: never).
    pub ike_rekey_s: u64,
    /// Delete the IKE SA if it was not rekeyed after this many seconds (0: no limit).
    pub ike_lifetime_s: u64,
    /// Rekey child SAs after this many seconds (0: never).
    pub child_rekey_s: u64,
    /// Delete a child SA not rekeyed after this many seconds (0: no limit).
    pub child_lifetime_s: u64,
    /// Send a liveness check (empty INFORMATIONAL) after this many seconds without an IKE
    /// message from the peer (0: never).
    pub dpd_s: u64,
    /// Half-open SAs on this node at which IKE_SA_INIT must carry a cookie (RFC 7296 §2.6).
    pub cookie_threshold: usize,
    /// Hard cap on half-open SAs on this node: beyond it every IKE_SA_INIT is dropped, cookie
    /// or not (see `evpc_ike::RouterLimits`). At least `cookie_threshold`.
    pub max_half_open: usize,
    /// Half-open SAs one source (an IPv4 address, an IPv6 /64) may hold on this node.
    pub max_half_open_per_source: usize,
    /// Seconds between changes of the cookie secret (a cookie stays valid 1–2 periods).
    pub cookie_rotation_s: u64,
}

impl Default for IkeSettings {
    fn default() -> Self {
        IkeSettings {
            local_id: String::new(),
            psk: Vec::new(),
            psk_file: None,
            pool: None,
            dns: Vec::new(),
            local_ts: vec!["0.0.0.0/0".into()],
            remote_ts: vec!["0.0.0.0/0".into()],
            ike_proposals: vec![
                "aes128gcm16-aes256gcm16-prfsha256-prfsha384-prfsha512-x25519-ecp256-modp2048"
                    .into(),
            ],
            esp_proposals: vec!["aes128gcm16-aes256gcm16-x25519-ecp256-modp2048-noesn-esn".into()],
            ike_rekey_s: 14_400,
            ike_lifetime_s: 15_840,
            child_rekey_s: 3_600,
            child_lifetime_s: 3_960,
            dpd_s: 30,
            cookie_threshold: 1_000,
            max_half_open: 10_000,
            max_half_open_per_source: 16,
            cookie_rotation_s: 60,
        }
    }
}

/// An IPv4 pool prefix.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PoolPrefix {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length (8 to 32).
    pub len: u8,
}

fn parse_v4_prefix(what: &str, text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "32"));
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{what}: {text:?} is not an IPv4 prefix like 10.10.0.0/24"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("{what}: {text:?} has a prefix length outside 0..=32"))?;
    Ok((addr, len))
}

/// `text` as a prefix without host bits (a typo there would silently widen or move a range).
fn exact_v4_prefix(what: &str, text: &str) -> Result<TrafficSelector, String> {
    let (addr, len) = parse_v4_prefix(what, text)?;
    let ts = TrafficSelector::v4_prefix(addr, len);
    if ts.start != IpAddr::V4(addr) {
        return Err(format!(
            "{what}: {text:?} has host bits set; did you mean {}/{len}?",
            ts.start
        ));
    }
    Ok(ts)
}

/// One peer's own selectors, as written (for messages) and parsed.
struct PeerSelectors<'a> {
    peer: &'a str,
    prefixes: Vec<(&'a str, TrafficSelector)>,
}

/// Per-identity `remote_ts` must stay clear of the pool and of each other: otherwise two peers
/// (or a peer and the pool's users) could be given the same addresses and one would receive
/// the other's return traffic.
fn check_peer_selectors(
    pool: Option<(&str, TrafficSelector)>,
    peers: &[PeerSelectors<'_>],
) -> Result<(), String> {
    for (i, a) in peers.iter().enumerate() {
        for (text, ts) in &a.prefixes {
            if let Some((pool_text, pool_ts)) = pool
                && ts.intersect(&pool_ts).is_some()
            {
                return Err(format!(
                    "ike.psk {:?}: remote_ts {text:?} overlaps ike.pool {pool_text:?}; a site's \
                     networks must lie outside the inner-address pool",
                    a.peer
                ));
            }
            for b in &peers[i + 1..] {
                if let Some((other, _)) = b.prefixes.iter().find(|(_, o)| ts.intersect(o).is_some())
                {
                    return Err(format!(
                        "ike.psk: remote_ts {text:?} of {:?} overlaps {other:?} of {:?}; two \
                         peers must never be given the same addresses",
                        a.peer, b.peer
                    ));
                }
            }
        }
    }
    Ok(())
}

fn selectors(what: &str, list: &[String]) -> Result<Vec<TrafficSelector>, String> {
    if list.is_empty() {
        return Err(format!("{what} must list at least one prefix"));
    }
    list.iter()
        .map(|p| parse_v4_prefix(what, p).map(|(a, l)| TrafficSelector::v4_prefix(a, l)))
        .collect()
}

/// What one proposal string names.
#[derive(Debug, Default)]
struct Algorithms {
    encr: Vec<EncrAlg>,
    prf: Vec<PrfAlg>,
    dh: Vec<DhGroup>,
    esn: Vec<bool>,
}

const SUPPORTED: &str = "aes128gcm16, aes256gcm16, prfsha256, prfsha384, prfsha512, x25519, ecp256, modp2048 (and esn, noesn for ESP)";

fn push<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

fn parse_proposals(what: &str, proposals: &[String]) -> Result<Algorithms, String> {
    if proposals.is_empty() {
        return Err(format!("{what} must list at least one proposal"));
    }
    let mut algs = Algorithms::default();
    for proposal in proposals {
        for token in proposal.split('-').map(str::trim) {
            match token.to_ascii_lowercase().as_str() {
                "aes128gcm16" | "aes128gcm128" | "aes128gcm" => {
                    push(&mut algs.encr, EncrAlg::AES128_GCM16)
                }
                "aes256gcm16" | "aes256gcm128" | "aes256gcm" => {
                    push(&mut algs.encr, EncrAlg::AES256_GCM16)
                }
                "prfsha256" => push(&mut algs.prf, PrfAlg::HmacSha256),
                "prfsha384" => push(&mut algs.prf, PrfAlg::HmacSha384),
                "prfsha512" => push(&mut algs.prf, PrfAlg::HmacSha512),
                "x25519" | "curve25519" => push(&mut algs.dh, DhGroup::Curve25519),
                "ecp256" => push(&mut algs.dh, DhGroup::Ecp256),
                "modp2048" => push(&mut algs.dh, DhGroup::Modp2048),
                "esn" => push(&mut algs.esn, true),
                "noesn" => push(&mut algs.esn, false),
                other => {
                    return Err(format!(
                        "{what}: unknown algorithm {other:?} in {proposal:?}; supported: {SUPPORTED}"
                    ));
                }
            }
        }
    }
    Ok(algs)
}

fn ms(seconds: u64) -> Option<u64> {
    (seconds > 0).then(|| seconds.saturating_mul(1000))
}

impl IkeSettings {
    /// Checks the settings (reading `psk_file`); the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        self.engine_config().map(|_| ())
    }

    /// The pool prefix, if one is configured.
    pub fn pool_prefix(&self) -> Result<Option<PoolPrefix>, String> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let (addr, len) = parse_v4_prefix("ike.pool", pool)?;
        if !(8..=32).contains(&len) {
            return Err(format!(
                "ike.pool {pool:?}: use a prefix between /8 and /32"
            ));
        }
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        let network = Ipv4Addr::from(u32::from(addr) & mask);
        if network != addr {
            return Err(format!(
                "ike.pool {pool:?}: host bits are set; did you mean {network}/{len}?"
            ));
        }
        Ok(Some(PoolPrefix { network, len }))
    }

    /// Every PSK, inline and from `psk_file`.
    fn all_psks(&self) -> Result<Vec<PskSetting>, String> {
        let mut all = self.psk.clone();
        if let Some(path) = &self.psk_file {
            let text =
                zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    format!("ike.psk_file {}: cannot read it: {e}", path.display())
                })?);
            let file: PskFile = toml::from_str(&text)
                .map_err(|e| format!("ike.psk_file {}: {e}", path.display()))?;
            all.extend(file.psk);
        }
        Ok(all)
    }

    /// The engine policy these settings describe.
    pub fn engine_config(&self) -> Result<Config, String> {
        if self.local_id.trim().is_empty() {
            return Err("ike.local_id must be set (our IKE identity, e.g. \"gw.example\")".into());
        }
        let mut config = Config::new(Identity::from_config(&self.local_id));
        let pool = self.pool_prefix()?;
        // With a pool, a peer without selectors of its own must take an inner address, or it
        // would be narrowed to the shared remote_ts (0.0.0.0/0 by default) and could claim
        // the addresses of every other peer.
        config.require_inner_address = pool.is_some();
        let psks = self.all_psks()?;
        if psks.is_empty() {
            return Err("ike: no pre-shared key; add [[ike.psk]] entries or ike.psk_file".into());
        }
        let mut peers = BTreeSet::new();
        let mut sites = Vec::new();
        for entry in &psks {
            if entry.peer.trim().is_empty() {
                return Err("ike.psk: an entry has an empty peer identity".into());
            }
            if entry.secret.expose().is_empty() {
                return Err(format!("ike.psk: the secret for {:?} is empty", entry.peer));
            }
            if !peers.insert(entry.peer.clone()) {
                return Err(format!("ike.psk: peer {:?} is listed twice", entry.peer));
            }
            let remote_ts = match &entry.remote_ts {
                None => None,
                Some(list) => {
                    let what = format!("ike.psk {:?} remote_ts", entry.peer);
                    if list.is_empty() {
                        return Err(format!(
                            "{what} must list at least one prefix (or be left out)"
                        ));
                    }
                    let prefixes = list
                        .iter()
                        .map(|p| exact_v4_prefix(&what, p).map(|ts| (p.as_str(), ts)))
                        .collect::<Result<Vec<_>, String>>()?;
                    let parsed = prefixes.iter().map(|(_, ts)| *ts).collect();
                    sites.push(PeerSelectors {
                        peer: &entry.peer,
                        prefixes,
                    });
                    Some(parsed)
                }
            };
            config.psks.push(PskEntry {
                peer: Identity::from_config(&entry.peer),
                psk: Secret::from_slice(entry.secret.expose().as_bytes()),
                remote_ts,
            });
        }
        let pool_ts = pool.map(|p| TrafficSelector::v4_prefix(p.network, p.len));
        check_peer_selectors(self.pool.as_deref().zip(pool_ts), &sites)?;
        let ike = parse_proposals("ike.ike_proposals", &self.ike_proposals)?;
        if ike.encr.is_empty() || ike.prf.is_empty() || ike.dh.is_empty() {
            return Err(format!(
                "ike.ike_proposals must name an encryption algorithm, a PRF and a key-exchange group, e.g. \"aes128gcm16-prfsha256-x25519\"; supported: {SUPPORTED}"
            ));
        }
        if !ike.esn.is_empty() {
            return Err("ike.ike_proposals: esn/noesn belong in ike.esp_proposals".into());
        }
        config.ike = IkePolicy {
            encr: ike.encr,
            prf: ike.prf,
            dh: ike.dh,
        };
        let esp = parse_proposals("ike.esp_proposals", &self.esp_proposals)?;
        if esp.encr.is_empty() {
            return Err(format!(
                "ike.esp_proposals must name an encryption algorithm, e.g. \"aes128gcm16\"; supported: {SUPPORTED}"
            ));
        }
        if !esp.prf.is_empty() {
            return Err("ike.esp_proposals: a PRF belongs in ike.ike_proposals".into());
        }
        config.esp = EspPolicy {
            encr: esp.encr,
            esn: if esp.esn.is_empty() {
                vec![false, true]
            } else {
                esp.esn
            },
            pfs: esp.dh,
        };
        config.local_ts = selectors("ike.local_ts", &self.local_ts)?;
        config.remote_ts = selectors("ike.remote_ts", &self.remote_ts)?;
        for (what, rekey, life) in [
            ("ike", self.ike_rekey_s, self.ike_lifetime_s),
            ("child", self.child_rekey_s, self.child_lifetime_s),
        ] {
            if rekey > 0 && life > 0 && life <= rekey {
                return Err(format!(
                    "ike.{what}_lifetime_s ({life}) must exceed {what}_rekey_s ({rekey}), or the SA expires before it is rekeyed"
                ));
            }
        }
        config.lifetimes = Lifetimes {
            ike_rekey_ms: ms(self.ike_rekey_s),
            ike_expire_ms: ms(self.ike_lifetime_s),
            child_rekey_ms: ms(self.child_rekey_s),
            child_expire_ms: ms(self.child_lifetime_s),
            dpd_interval_ms: ms(self.dpd_s),
            ..Lifetimes::default()
        };
        if self.cookie_threshold == 0 {
            return Err("ike.cookie_threshold must be positive".into());
        }
        config.cookie_threshold = self.cookie_threshold;
        self.router_limits()
            .validate(&config)
            .map_err(|e| format!("ike: {e} (max_half_open, max_half_open_per_source, cookie_rotation_s, cookie_threshold)"))?;
        if pool.is_none() && !self.dns.is_empty() {
            return Err(
                "ike.dns is set but ike.pool is not: DNS servers go out with an inner address"
                    .into(),
            );
        }
        // The admission hook (no child SA overlapping another SA's selectors) is installed by
        // the gateway, which holds the shared state it reads.
        config.child_policy = None;
        Ok(config)
    }

    /// The IKE_SA_INIT admission limits (checked by `engine_config`).
    pub fn router_limits(&self) -> RouterLimits {
        RouterLimits {
            max_half_open: self.max_half_open,
            max_half_open_per_source: self.max_half_open_per_source,
            cookie_rotation_ms: self.cookie_rotation_s.saturating_mul(1000),
            ..RouterLimits::default()
        }
    }

    /// Addresses of the pool that are never handed out besides network and broadcast: the DNS
    /// servers and `also` (this node's own inner addresses).
    pub fn excluded_addresses(&self, also: &[IpAddr]) -> BTreeSet<Ipv4Addr> {
        let mut out: BTreeSet<Ipv4Addr> = self.dns.iter().copied().collect();
        out.extend(also.iter().filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> IkeSettings {
        IkeSettings {
            local_id: "gw.example".into(),
            psk: vec![PskSetting {
                peer: "client.example".into(),
                secret: PskSecret::new("s3cret-psk-value"),
                remote_ts: None,
            }],
            pool: Some("10.10.0.0/24".into()),
            dns: vec![Ipv4Addr::new(10, 10, 0, 1)],
            local_ts: vec!["10.10.0.0/24".into()],
            ..IkeSettings::default()
        }
    }

    #[test]
    fn good_settings_make_an_engine_policy() {
        let config = good().engine_config().unwrap();
        assert_eq!(config.local_identity, Identity::fqdn("gw.example"));
        assert!(config.psk_for(&Identity::fqdn("client.example")).is_some());
        assert_eq!(config.ike.dh[0], DhGroup::Curve25519);
        assert_eq!(config.esp.esn, vec![false, true]);
        assert_eq!(config.lifetimes.dpd_interval_ms, Some(30_000));
        assert_eq!(
            config.local_ts,
            vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)]
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let text = format!("{:?}", good());
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn bad_settings_say_what_to_change() {
        let err = |s: IkeSettings| s.validate().unwrap_err();
        assert!(
            err(IkeSettings {
                local_id: String::new(),
                ..good()
            })
            .contains("local_id")
        );
        assert!(
            err(IkeSettings {
                psk: vec![],
                ..good()
            })
            .contains("no pre-shared key")
        );
        assert!(
            err(IkeSettings {
                pool: Some("10.10.0.1/24".into()),
                ..good()
            })
            .contains("did you mean 10.10.0.0/24")
        );
        assert!(
            err(IkeSettings {
                ike_proposals: vec!["aes128gcm16-sha1-x25519".into()],
                ..good()
            })
            .contains("unknown algorithm \"sha1\"")
        );
        assert!(
            err(IkeSettings {
                ike_proposals: vec!["aes128gcm16-x25519".into()],
                ..good()
            })
            .contains("a PRF")
        );
        assert!(
            err(IkeSettings {
                child_lifetime_s: 100,
                child_rekey_s: 100,
                ..good()
            })
            .contains("must exceed child_rekey_s")
        );
        assert!(
            err(IkeSettings {
                cookie_threshold: 20_000,
                ..good()
            })
            .contains("cookies would never be demanded")
        );
        assert!(
            err(IkeSettings {
                max_half_open_per_source: 0,
                ..good()
            })
            .contains("max_half_open_per_source must be positive")
        );
        let mut twice = good();
        twice.psk.push(twice.psk[0].clone());
        assert!(err(twice).contains("listed twice"));
        assert!(
            err(IkeSettings {
                psk_file: Some("/nonexistent/psk.toml".into()),
                ..good()
            })
            .contains("cannot read")
        );
    }

    #[test]
    fn psks_come_from_a_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk.toml");
        std::fs::write(
            &path,
            "[[psk]]\npeer = \"other@example\"\nsecret = \"another-secret\"\n",
        )
        .unwrap();
        let settings = IkeSettings {
            psk_file: Some(path),
            ..good()
        };
        let config = settings.engine_config().unwrap();
        assert!(config.psk_for(&Identity::email("other@example")).is_some());
        assert!(config.psk_for(&Identity::fqdn("client.example")).is_some());
    }

    fn site(peer: &str, remote_ts: &[&str]) -> PskSetting {
        PskSetting {
            peer: peer.into(),
            secret: PskSecret::new("a-site-secret"),
            remote_ts: Some(remote_ts.iter().map(|p| p.to_string()).collect()),
        }
    }

    fn with_sites(sites: Vec<PskSetting>) -> IkeSettings {
        let mut s = good();
        s.psk.extend(sites);
        s
    }

    #[test]
    fn a_pool_requires_inner_addresses_and_sites_get_their_own_selectors() {
        let config = with_sites(vec![site(
            "branch.example",
            &["10.20.0.0/16", "10.21.0.0/24"],
        )])
        .engine_config()
        .unwrap();
        assert!(config.require_inner_address);
        assert!(
            config.child_policy.is_none(),
            "the gateway installs the hook"
        );
        let entry = |id: &str| config.psk_entry(&Identity::fqdn(id)).unwrap();
        assert_eq!(entry("client.example").remote_ts, None);
        assert_eq!(
            entry("branch.example").remote_ts,
            Some(vec![
                TrafficSelector::v4_prefix(Ipv4Addr::new(10, 20, 0, 0), 16),
                TrafficSelector::v4_prefix(Ipv4Addr::new(10, 21, 0, 0), 24),
            ])
        );
        // Without a pool nobody can take an address, so nobody must.
        let no_pool = IkeSettings {
            pool: None,
            dns: vec![],
            ..good()
        };
        assert!(!no_pool.engine_config().unwrap().require_inner_address);
    }

    #[test]
    fn overlapping_selectors_are_refused() {
        let err = |sites| with_sites(sites).validate().unwrap_err();
        let e = err(vec![site("branch.example", &["10.10.0.128/25"])]);
        assert!(
            e.contains("\"branch.example\"")
                && e.contains("remote_ts \"10.10.0.128/25\" overlaps ike.pool \"10.10.0.0/24\""),
            "{e}"
        );
        let e = err(vec![site("branch.example", &["0.0.0.0/0"])]);
        assert!(e.contains("overlaps ike.pool"), "{e}");
        let e = err(vec![
            site("a.example", &["10.20.0.0/16"]),
            site("b.example", &["10.30.0.0/16", "10.20.5.0/24"]),
        ]);
        assert!(
            e.contains(
                "remote_ts \"10.20.0.0/16\" of \"a.example\" overlaps \"10.20.5.0/24\" of \"b.example\""
            ) && e.contains("never be given the same addresses"),
            "{e}"
        );
        // Adjacent networks do not overlap; one peer's own list may.
        assert!(
            with_sites(vec![
                site("a.example", &["10.20.0.0/16", "10.20.1.0/24"]),
                site("b.example", &["10.21.0.0/16"]),
            ])
            .validate()
            .is_ok()
        );
        let e = err(vec![site("a.example", &["10.20.0.1/16"])]);
        assert!(e.contains("did you mean 10.20.0.0/16"), "{e}");
        let e = err(vec![site("a.example", &[])]);
        assert!(e.contains("must list at least one prefix"), "{e}");
        let e = err(vec![site("a.example", &["10.20.0.0/33"])]);
        assert!(e.contains("ike.psk \"a.example\" remote_ts"), "{e}");
    }

    #[test]
    fn site_selectors_come_from_the_psk_file_too_and_are_checked_against_inline_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk.toml");
        std::fs::write(
            &path,
            "[[psk]]\npeer = \"branch@example\"\nsecret = \"s\"\nremote_ts = [\"10.20.0.0/16\"]\n",
        )
        .unwrap();
        let settings = IkeSettings {
            psk_file: Some(path),
            ..with_sites(vec![site("inline.example", &["10.20.128.0/17"])])
        };
        let e = settings.validate().unwrap_err();
        assert!(e.contains("\"inline.example\" overlaps"), "{e}");
        let settings = IkeSettings {
            psk: good().psk,
            ..settings
        };
        let config = settings.engine_config().unwrap();
        assert_eq!(
            config
                .psk_entry(&Identity::email("branch@example"))
                .unwrap()
                .remote_ts,
            Some(vec![TrafficSelector::v4_prefix(
                Ipv4Addr::new(10, 20, 0, 0),
                16
            )])
        );
    }

    #[test]
    fn identities_parse_like_strongswan() {
        assert_eq!(
            Identity::from_config("gw.example"),
            Identity::fqdn("gw.example")
        );
        assert_eq!(Identity::from_config("@gw"), Identity::fqdn("gw"));
        assert_eq!(Identity::from_config("a@b.c"), Identity::email("a@b.c"));
        assert_eq!(
            Identity::from_config("192.0.2.1"),
            Identity::ipv4(Ipv4Addr::new(192, 0, 2, 1))
        );
    }

    #[test]
    fn the_node_config_accepts_an_ike_section() {
        let text = r#"
            id = 1
            raft_addr = "127.0.0.1:7101"
            admin_addr = "127.0.0.1:7201"
            data_dir = "/tmp/evpc-1"
            cluster_key_file = "/etc/evpc/cluster.key"
            [tls]
            ca_file = "/etc/evpc/pki/ca.pem"
            cert_file = "/etc/evpc/pki/node-1.pem"
            key_file = "/etc/evpc/pki/node-1.key"
            [dataplane]
            backend = "userspace"
            cluster_address = "192.0.2.1"
            [ike]
            local_id = "gw.example"
            pool = "10.10.0.0/24"
            [[ike.psk]]
            peer = "client.example"
            secret = "s3cret"
            [[ike.psk]]
            peer = "branch.example"
            secret = "another"
            remote_ts = ["10.20.0.0/16"]
        "#;
        let config = crate::config::NodeConfig::parse(text).unwrap();
        let ike = config.ike.unwrap();
        assert_eq!(ike.pool.as_deref(), Some("10.10.0.0/24"));
        assert_eq!(ike.dpd_s, 30);
        assert_eq!(ike.psk[0].remote_ts, None);
        assert_eq!(ike.psk[1].remote_ts, Some(vec!["10.20.0.0/16".to_string()]));
        let clash = text.replace("10.20.0.0/16", "10.10.0.0/16");
        let err = crate::config::NodeConfig::parse(&clash)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps ike.pool"), "{err}");
        let bad = text.replace("pool = \"10.10.0.0/24\"", "pool = \"10.10.0.0/40\"");
        let err = crate::config::NodeConfig::parse(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ike.pool"), "{err}");
        let keyless = text.replace("cluster_key_file = \"/etc/evpc/cluster.key\"", "");
        let err = crate::config::NodeConfig::parse(&keyless)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cluster_key_file"), "{err}");
    }
}
