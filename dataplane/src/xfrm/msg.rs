//! XFRM netlink messages for one child SA, built without touching the kernel (so they are
//! unit-tested as bytes without root).
//!
//! ```text
//!  child ──► sa_message(out)  NEWSA/UPDSA  dst = peer,  spi = out_spi, replay oseq = next_seq - 1,
//!                                          lifetime hard packets = limit - (next_seq - 1)
//!        ──► sa_message(in)   NEWSA        dst = local, spi = in_spi,  replay seq = replay_floor,
//!                                          bitmap all ones (≤ floor refused)
//!        ──► policy_message   NEWPOLICY    out: local TS → remote TS, in/fwd: remote → local,
//!                                          template ESP tunnel local ⇄ peer, reqid,
//!                                          priority = policy_priority (more specific: lower)
//!        ──► get_ae           GETAE        → NEWAE: replay state (oseq / seq) + lifetime current
//! ```
//!
//! Layouts follow `include/uapi/linux/xfrm.h`; ESP-in-UDP is `UDP_ENCAP_ESPINUDP` (RFC 3948),
//! the AEAD is `rfc4106(gcm(aes))` whose key is KEYMAT, key || 4-byte salt (RFC 4106 §8.1).

use std::net::IpAddr;

use evpc_raft_store::TrafficSelector;
use netlink_packet_xfrm::policy::{
    DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage,
};
use netlink_packet_xfrm::state::{
    AllocSpiMessage, DelGetMessage as StateDelGetMessage, ModifyMessage as StateModifyMessage,
};
use netlink_packet_xfrm::{
    Address, Alg, AlgAead, AsyncEventId, EncapTmpl, GetAsyncEventMessage, IPPROTO_ESP,
    LifetimeConfig, NewAsyncEventMessage, Replay, ReplayEsn, Selector, UDP_ENCAP_ESPINUDP,
    UserPolicyId, UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate, XFRM_AE_LVAL, XFRM_AE_RVAL,
    XFRM_ALG_AEAD_NAME_LEN, XFRM_ALG_NAME_LEN, XFRM_INF, XFRM_MODE_TUNNEL, XFRM_POLICY_ALLOW,
    XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_SHARE_ANY, XFRM_STATE_ESN, XfrmAttrs,
};

use crate::selector::prefix_selector;

/// The kernel's name of AES-GCM with a 16-byte ICV for ESP (RFC 4106).
pub const AEAD_RFC4106: &str = "rfc4106(gcm(aes))";
/// ICV length of AES-GCM-16, in bits.
pub const ICV_BITS: u32 = 128;
const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Which way an SA carries packets.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Ours, sealed with `out_spi`, to the peer.
    Out,
    /// The peer's, opened with `in_spi`.
    In,
}

/// Everything one SA message needs.
#[derive(Debug)]
pub struct SaParams<'k> {
    /// Which way.
    pub direction: Direction,
    /// Outer source (the peer for inbound).
    pub src: IpAddr,
    /// Outer destination (us for inbound).
    pub dst: IpAddr,
    /// The SPI.
    pub spi: u32,
    /// Ties the SA to its policies' templates.
    pub reqid: u32,
    /// KEYMAT (key || salt): 20 bytes for AES-128, 36 for AES-256 (the kernel tells the AES
    /// variant by the key length).
    pub keymat: &'k [u8],
    /// Extended sequence numbers.
    pub esn: bool,
    /// ESP-in-UDP ports (source, destination), or plain ESP.
    pub encap: Option<(u16, u16)>,
    /// Anti-replay window (inbound), in packets.
    pub replay_window: u32,
    /// Outbound: the last sequence number already used (`next_seq - 1`). Inbound: the replay
    /// floor (numbers at or below are refused).
    pub seq: u64,
    /// Outbound: how many packets the kernel may send under this SA from now on (the lease);
    /// `None` for no limit.
    pub packet_limit: Option<u64>,
}

fn family(addr: &IpAddr) -> u16 {
    if addr.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn name_bytes(name: &str) -> [u8; XFRM_ALG_AEAD_NAME_LEN] {
    let mut bytes = [0u8; XFRM_ALG_AEAD_NAME_LEN];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    bytes
}

/// Lifetime limits with nothing limited but, optionally, packets.
fn lifetime(packet_limit: Option<u64>) -> LifetimeConfig {
    let (soft, hard) = match packet_limit {
        // The soft limit at three quarters tells the kernel's key manager listeners; the hard
        // limit is the lease: the state expires instead of sending packet `hard + 1`.
        Some(hard) => (hard - hard / 4, hard),
        None => (XFRM_INF, XFRM_INF),
    };
    LifetimeConfig {
        soft_byte_limit: XFRM_INF,
        hard_byte_limit: XFRM_INF,
        soft_packet_limit: soft,
        hard_packet_limit: hard,
        soft_add_expires_seconds: 0,
        hard_add_expires_seconds: 0,
        soft_use_expires_seconds: 0,
        hard_use_expires_seconds: 0,
    }
}

/// NEWSA / UPDSA body for one direction of a child (RFC 4303 tunnel mode, RFC 4106 AEAD,
/// RFC 3948 encapsulation).
pub fn sa_message(p: &SaParams<'_>) -> StateModifyMessage {
    let mut info = UserSaInfo::default();
    info.source(&p.src);
    info.destination(&p.dst);
    info.id.spi = p.spi;
    info.id.proto = IPPROTO_ESP;
    info.family = family(&p.dst);
    info.selector.family = info.family;
    info.reqid = p.reqid;
    info.mode = XFRM_MODE_TUNNEL;
    info.lifetime_cfg = lifetime(match p.direction {
        Direction::Out => p.packet_limit,
        Direction::In => None,
    });
    let mut nlas = vec![XfrmAttrs::EncryptionAlgAead(AlgAead {
        alg_name: name_bytes(AEAD_RFC4106),
        alg_key_len: (p.keymat.len() * 8) as u32,
        alg_icv_len: ICV_BITS,
        alg_key: p.keymat.to_vec(),
    })];
    // Outbound SAs need a window too when ESN is on (older kernels refuse 0).
    let window = p.replay_window.clamp(32, 4096);
    let (oseq, seq) = match p.direction {
        Direction::Out => (p.seq, 0),
        Direction::In => (0, p.seq),
    };
    if p.esn {
        info.flags |= XFRM_STATE_ESN;
        let bmp_len = window.div_ceil(32);
        nlas.push(XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len,
            oseq: oseq as u32,
            seq: seq as u32,
            oseq_hi: (oseq >> 32) as u32,
            seq_hi: (seq >> 32) as u32,
            replay_window: window,
            // every number in the window at or below the floor counts as already seen
            bmp: vec![u32::MAX; bmp_len as usize],
        }));
    } else {
        info.replay_window = 32;
        nlas.push(XfrmAttrs::ReplayState(Replay {
            oseq: oseq as u32,
            seq: seq as u32,
            bitmap: u32::MAX,
        }));
    }
    if let Some((sport, dport)) = p.encap {
        nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
            encap_type: UDP_ENCAP_ESPINUDP,
            encap_sport: sport,
            encap_dport: dport,
            encap_oa: Address::default(),
        }));
    }
    StateModifyMessage {
        user_sa_info: info,
        nlas,
    }
}

/// NEWSA body of an ESP state with null encryption and no authentication: what
/// [`super::probe`] adds to learn whether the kernel has ESP at all, whatever its ciphers.
pub fn null_esp_message(src: IpAddr, dst: IpAddr, spi: u32) -> StateModifyMessage {
    let mut info = UserSaInfo::default();
    info.source(&src);
    info.destination(&dst);
    info.id.spi = spi;
    info.id.proto = IPPROTO_ESP;
    info.family = family(&dst);
    info.selector.family = info.family;
    info.mode = XFRM_MODE_TUNNEL;
    info.lifetime_cfg = lifetime(None);
    let mut name = [0u8; XFRM_ALG_NAME_LEN];
    name[..NULL_CIPHER.len()].copy_from_slice(NULL_CIPHER.as_bytes());
    StateModifyMessage {
        user_sa_info: info,
        nlas: vec![XfrmAttrs::EncryptionAlg(Alg {
            alg_name: name,
            alg_key_len: 0,
            alg_key: Vec::new(),
        })],
    }
}

/// The kernel's null cipher (RFC 2410), always built with XFRM.
pub const NULL_CIPHER: &str = "ecb(cipher_null)";

/// ALLOCSPI body: reserve an ESP SPI in `min..=max` for `src` → `dst` (a larval state).
pub fn alloc_spi_message(src: IpAddr, dst: IpAddr, min: u32, max: u32) -> AllocSpiMessage {
    let mut message = AllocSpiMessage::default();
    message.spi_info.info.source(&src);
    message.spi_info.info.destination(&dst);
    message.spi_info.protocol(IPPROTO_ESP);
    message.spi_info.spi_range(min, max);
    message
}

/// DELSA / GETSA body: the SA with this destination, SPI and source.
pub fn sa_id_message(dst: IpAddr, spi: u32, src: IpAddr) -> StateDelGetMessage {
    let mut message = StateDelGetMessage::default();
    message.user_sa_id.destination(&dst);
    message.user_sa_id.spi = spi;
    message.user_sa_id.proto = IPPROTO_ESP;
    message
        .nlas
        .push(XfrmAttrs::SrcAddr(Address::from_ip(&src)));
    message
}

/// GETAE body: ask for the replay state and the current lifetime of an SA.
pub fn get_ae(dst: IpAddr, spi: u32, src: IpAddr, reqid: u32) -> GetAsyncEventMessage {
    GetAsyncEventMessage {
        id: AsyncEventId {
            sa_id: UserSaId {
                daddr: Address::from_ip(&dst),
                spi,
                family: family(&dst),
                proto: IPPROTO_ESP,
            },
            saddr: Address::from_ip(&src),
            flags: XFRM_AE_RVAL | XFRM_AE_LVAL,
            reqid,
        },
    }
}

/// What a NEWAE answer says about an SA.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct AeValues {
    /// Last outbound sequence number used.
    pub oseq: u64,
    /// Highest inbound sequence number accepted.
    pub seq: u64,
    /// Packets processed since the SA was installed.
    pub packets: u64,
}

/// Reads a NEWAE answer.
pub fn parse_ae(message: &NewAsyncEventMessage) -> AeValues {
    let mut values = AeValues::default();
    for nla in &message.nlas {
        match nla {
            XfrmAttrs::ReplayState(replay) => {
                values.oseq = u64::from(replay.oseq);
                values.seq = u64::from(replay.seq);
            }
            XfrmAttrs::ReplayStateEsn(esn) => {
                values.oseq = u64::from(esn.oseq_hi) << 32 | u64::from(esn.oseq);
                values.seq = u64::from(esn.seq_hi) << 32 | u64::from(esn.seq);
            }
            XfrmAttrs::LifetimeBytes(current) => values.packets = current.packets,
            _ => {}
        }
    }
    values
}

/// An XFRM selector: addresses as prefixes, one protocol, ports as value/mask.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sel {
    /// Source prefix.
    pub src: (IpAddr, u8),
    /// Destination prefix.
    pub dst: (IpAddr, u8),
    /// Protocol (0: any).
    pub proto: u8,
    /// Source port and mask (mask 0: any).
    pub sport: (u16, u16),
    /// Destination port and mask.
    pub dport: (u16, u16),
}

impl Sel {
    fn to_selector(self) -> Selector {
        let mut selector = Selector::default();
        selector.source_prefix(&self.src.0, self.src.1);
        selector.destination_prefix(&self.dst.0, self.dst.1);
        selector.proto = self.proto;
        (selector.sport, selector.sport_mask) = self.sport;
        (selector.dport, selector.dport_mask) = self.dport;
        selector
    }
}

/// The prefixes that exactly cover `start..=end` (both of one family), fewest first-to-last.
pub fn range_to_prefixes(start: IpAddr, end: IpAddr) -> Vec<(IpAddr, u8)> {
    match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => {
            blocks(u128::from(u32::from(s)), u128::from(u32::from(e)), 32)
                .into_iter()
                .map(|(v, len)| (IpAddr::V4((v as u32).into()), len))
                .collect()
        }
        (IpAddr::V6(s), IpAddr::V6(e)) => blocks(u128::from(s), u128::from(e), 128)
            .into_iter()
            .map(|(v, len)| (IpAddr::V6(v.into()), len))
            .collect(),
        _ => Vec::new(),
    }
}

/// Port range → (port, mask) pairs; `(0, 0)` alone for any port.
pub fn port_range_to_masks(start: u16, end: u16) -> Vec<(u16, u16)> {
    if start == 0 && end == u16::MAX {
        return vec![(0, 0)];
    }
    blocks(u128::from(start), u128::from(end), 16)
        .into_iter()
        .map(|(v, len)| {
            (
                v as u16,
                (u16::MAX).checked_shl(16 - u32::from(len)).unwrap_or(0),
            )
        })
        .collect()
}

/// CIDR decomposition of `start..=end` in a `bits`-wide space: (first value, prefix length).
fn blocks(start: u128, end: u128, bits: u8) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    if start > end {
        return out;
    }
    let bits = u32::from(bits);
    let mut current = start;
    loop {
        // the largest aligned block of 2^k values at `current` that ends at or before `end`
        let mut k = if current == 0 {
            bits
        } else {
            current.trailing_zeros().min(bits)
        };
        loop {
            let fits = if k == 128 {
                end == u128::MAX
            } else {
                current
                    .checked_add((1u128 << k) - 1)
                    .is_some_and(|last| last <= end)
            };
            if fits {
                break;
            }
            k -= 1; // a single value (k = 0) always fits, as current <= end
        }
        out.push((current, (bits - k) as u8));
        if k == 128 {
            break;
        }
        match current.checked_add(1u128 << k) {
            Some(next) if next <= end => current = next,
            _ => break,
        }
    }
    out
}

/// The XFRM selectors of `from` → `to` traffic: every combination of the prefixes and port
/// masks covering the traffic selectors' ranges (RFC 7296 §3.13.1 ranges vs. the kernel's
/// prefixes and masks).
pub fn selectors(from: &[TrafficSelector], to: &[TrafficSelector]) -> Vec<Sel> {
    let mut out = Vec::new();
    for f in from {
        for t in to {
            if f.start_addr.is_ipv4() != t.start_addr.is_ipv4() {
                continue;
            }
            let proto = match (f.protocol, t.protocol) {
                (0, p) | (p, 0) => p,
                (a, b) if a == b => a,
                _ => continue,
            };
            for src in range_to_prefixes(f.start_addr, f.end_addr) {
                for dst in range_to_prefixes(t.start_addr, t.end_addr) {
                    for sport in port_range_to_masks(f.start_port, f.end_port) {
                        for dport in port_range_to_masks(t.start_port, t.end_port) {
                            out.push(Sel {
                                src,
                                dst,
                                proto,
                                sport,
                                dport,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Policy directions for a selector: `Out` for local → remote; `In` and `Fwd` for remote →
/// local (`Fwd`: traffic forwarded to the protected network behind this gateway).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PolicyDir {
    /// XFRM_POLICY_OUT.
    Out,
    /// XFRM_POLICY_IN.
    In,
    /// XFRM_POLICY_FWD.
    Fwd,
}

impl PolicyDir {
    /// The kernel's `XFRM_POLICY_*` code.
    pub fn code(self) -> u8 {
        match self {
            PolicyDir::Out => XFRM_POLICY_OUT,
            PolicyDir::In => XFRM_POLICY_IN,
            PolicyDir::Fwd => XFRM_POLICY_FWD,
        }
    }

    /// The direction of a kernel code; `None` for socket policies and unknown codes.
    pub fn from_code(code: u8) -> Option<PolicyDir> {
        match code {
            XFRM_POLICY_OUT => Some(PolicyDir::Out),
            XFRM_POLICY_IN => Some(PolicyDir::In),
            XFRM_POLICY_FWD => Some(PolicyDir::Fwd),
            _ => None,
        }
    }
}

/// Priority steps per remote address bit a selector leaves free: more than the 0 to 16 free
/// port bits add, so a narrower address prefix always wins over a narrower port mask.
pub const PRIORITY_PER_ADDRESS_BIT: u32 = 17;

/// The priority of the policy for `sel` in direction `dir`: `base` plus how unspecific its
/// remote side is (the destination of `Out`, the source of `In` and `Fwd`):
/// `base + 17 × (address bits not fixed by the remote prefix) + (port bits not fixed by the
/// remote port mask)`. The kernel uses the matching policy with the lowest priority value
/// (`xfrm_policy_lookup_bytype`, equal priorities: the older one), so a `/32` is chosen over a
/// `/24` whatever order they were installed in: the same choice as the userspace backend's
/// routing ([`crate::selector::Span`]). Ranges over `base` by 0 to 2192 (IPv6 `::/0`, any port).
pub fn policy_priority(base: u32, sel: &Sel, dir: PolicyDir) -> u32 {
    let ((addr, prefix_len), (_, port_mask)) = match dir {
        PolicyDir::Out => (sel.dst, sel.dport),
        PolicyDir::In | PolicyDir::Fwd => (sel.src, sel.sport),
    };
    let bits: u32 = if addr.is_ipv4() { 32 } else { 128 };
    let free_address_bits = bits.saturating_sub(u32::from(prefix_len));
    let free_port_bits = port_mask.count_zeros();
    base.saturating_add(free_address_bits * PRIORITY_PER_ADDRESS_BIT + free_port_bits)
}

/// NEWPOLICY body: `sel` in direction `dir` must go through ESP in tunnel mode between
/// `tunnel_src` and `tunnel_dst` with `reqid`.
pub fn policy_message(
    sel: Sel,
    dir: PolicyDir,
    tunnel_src: IpAddr,
    tunnel_dst: IpAddr,
    reqid: u32,
    priority: u32,
) -> PolicyModifyMessage {
    let mut template = UserTemplate::default();
    template.source(&tunnel_src);
    template.destination(&tunnel_dst);
    template.id.proto = IPPROTO_ESP;
    template.mode = XFRM_MODE_TUNNEL;
    template.reqid = reqid;
    template.share = XFRM_SHARE_ANY;
    let info = UserPolicyInfo {
        selector: sel.to_selector(),
        lifetime_cfg: lifetime(None),
        priority,
        direction: dir.code(),
        action: XFRM_POLICY_ALLOW,
        share: XFRM_SHARE_ANY,
        ..UserPolicyInfo::default()
    };
    PolicyModifyMessage {
        user_policy_info: info,
        nlas: vec![XfrmAttrs::Template(vec![template])],
    }
}

/// DELPOLICY / GETPOLICY body.
pub fn policy_id_message(sel: Sel, dir: PolicyDir) -> PolicyDelGetMessage {
    PolicyDelGetMessage {
        user_policy_id: UserPolicyId {
            selector: sel.to_selector(),
            index: 0,
            direction: dir.code(),
        },
        nlas: Vec::new(),
    }
}

/// A selector covering a whole prefix, for tests and tools.
pub fn prefix_sel(src: (IpAddr, u8), dst: (IpAddr, u8)) -> Vec<Sel> {
    selectors(
        &[prefix_selector(src.0, src.1)],
        &[prefix_selector(dst.0, dst.1)],
    )
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        Emitable, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_xfrm::XfrmMessage;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn emit(message: XfrmMessage) -> Vec<u8> {
        let mut nl = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        nl.header.flags = NLM_F_REQUEST;
        nl.finalize();
        let mut bytes = vec![0u8; nl.buffer_len()];
        nl.emit(&mut bytes);
        bytes
    }

    /// The attributes after the fixed part: (type, payload).
    fn attributes(bytes: &[u8], fixed: usize) -> Vec<(u16, Vec<u8>)> {
        let mut at = 16 + fixed;
        let mut out = Vec::new();
        while at + 4 <= bytes.len() {
            let len = usize::from(u16::from_ne_bytes([bytes[at], bytes[at + 1]]));
            let kind = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]);
            out.push((kind, bytes[at + 4..at + len].to_vec()));
            at += len.div_ceil(4) * 4;
        }
        out
    }

    fn params(direction: Direction, esn: bool) -> SaParams<'static> {
        SaParams {
            direction,
            src: ip("198.18.0.1"),
            dst: ip("198.18.0.2"),
            spi: 0xc0ffee01,
            reqid: 77,
            keymat: &[0xaa; 20],
            esn,
            encap: Some((4500, 4501)),
            replay_window: 64,
            seq: (5u64 << 32) | 41,
            packet_limit: Some(1000),
        }
    }

    #[test]
    fn an_outbound_esn_sa_carries_its_oseq_lease_aead_and_encapsulation() {
        let bytes = emit(XfrmMessage::AddSa(sa_message(&params(
            Direction::Out,
            true,
        ))));
        // nlmsghdr: length, type NEWSA (0x10), flags REQUEST
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x10);
        // xfrm_usersa_info: id.daddr at 56.., id.spi (network order) at 72, proto at 76
        let info = &bytes[16..16 + 224];
        assert_eq!(&info[56..60], &[198, 18, 0, 2]);
        assert_eq!(&info[72..76], &0xc0ffee01u32.to_be_bytes());
        assert_eq!(info[76], 50, "IPPROTO_ESP");
        // lifetime_cfg at 96: soft/hard bytes infinite, packets 750 / 1000
        let u64_at = |off: usize| u64::from_ne_bytes(info[off..off + 8].try_into().unwrap());
        assert_eq!((u64_at(96), u64_at(104)), (u64::MAX, u64::MAX));
        assert_eq!((u64_at(112), u64_at(120)), (750, 1000));
        // reqid at 208, family at 212, mode at 214, replay_window 215, flags at 216
        assert_eq!(u32::from_ne_bytes(info[208..212].try_into().unwrap()), 77);
        assert_eq!(
            u16::from_ne_bytes([info[212], info[213]]),
            libc::AF_INET as u16
        );
        assert_eq!(
            (info[214], info[216]),
            (1, 128),
            "tunnel mode, XFRM_STATE_ESN"
        );
        let attrs = attributes(&bytes, 224);
        let kinds: Vec<u16> = attrs.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            vec![18, 23, 4],
            "XFRMA_ALG_AEAD, XFRMA_REPLAY_ESN_VAL, XFRMA_ENCAP"
        );
        let aead = &attrs[0].1;
        assert_eq!(&aead[..17], b"rfc4106(gcm(aes))");
        assert_eq!(
            u32::from_ne_bytes(aead[64..68].try_into().unwrap()),
            160,
            "key + salt bits"
        );
        assert_eq!(
            u32::from_ne_bytes(aead[68..72].try_into().unwrap()),
            128,
            "ICV bits"
        );
        assert_eq!(&aead[72..], &[0xaa; 20]);
        let replay = &attrs[1].1;
        let u32_at = |b: &[u8], off: usize| u32::from_ne_bytes(b[off..off + 4].try_into().unwrap());
        // bmp_len, oseq, seq, oseq_hi, seq_hi, replay_window, bmp
        assert_eq!(
            (0..6).map(|i| u32_at(replay, i * 4)).collect::<Vec<_>>(),
            vec![2, 41, 0, 5, 0, 64]
        );
        assert_eq!(
            replay.len(),
            24 + 8,
            "the bitmap is there, bmp_len words long"
        );
        let encap = &attrs[2].1;
        assert_eq!(
            u16::from_ne_bytes([encap[0], encap[1]]),
            2,
            "UDP_ENCAP_ESPINUDP"
        );
        assert_eq!(
            &encap[2..6],
            &[0x11, 0x94, 0x11, 0x95],
            "ports 4500 → 4501, network order"
        );
    }

    #[test]
    fn an_inbound_sa_refuses_everything_up_to_the_floor() {
        let mut p = params(Direction::In, false);
        p.seq = 1234;
        let bytes = emit(XfrmMessage::AddSa(sa_message(&p)));
        let info = &bytes[16..16 + 224];
        let u64_at = |off: usize| u64::from_ne_bytes(info[off..off + 8].try_into().unwrap());
        assert_eq!(u64_at(120), u64::MAX, "no packet limit inbound");
        assert_eq!((info[215], info[216]), (32, 0), "replay_window 32, no ESN");
        let attrs = attributes(&bytes, 224);
        assert_eq!(attrs[1].0, 10, "XFRMA_REPLAY_VAL");
        let replay = &attrs[1].1;
        let u32_at = |off: usize| u32::from_ne_bytes(replay[off..off + 4].try_into().unwrap());
        assert_eq!(
            (u32_at(0), u32_at(4), u32_at(8)),
            (0, 1234, u32::MAX),
            "oseq, seq, bitmap"
        );
    }

    #[test]
    fn policies_carry_selector_and_tunnel_template() {
        let sel = prefix_sel((ip("10.1.0.0"), 24), (ip("10.2.0.7"), 32))[0];
        let bytes = emit(XfrmMessage::AddPolicy(policy_message(
            sel,
            PolicyDir::Out,
            ip("198.18.0.1"),
            ip("198.18.0.2"),
            77,
            1000,
        )));
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x13, "NEWPOLICY");
        let info = &bytes[16..16 + 168];
        // selector: daddr, saddr, dport, dport_mask, sport, sport_mask, family, prefixlen_d/s
        assert_eq!(&info[0..4], &[10, 2, 0, 7]);
        assert_eq!(&info[16..20], &[10, 1, 0, 0]);
        assert_eq!((info[42], info[43]), (32, 24));
        // priority at 152, index 156, dir 160, action 161
        assert_eq!(u32::from_ne_bytes(info[152..156].try_into().unwrap()), 1000);
        assert_eq!((info[160], info[161]), (1, 0), "out, allow");
        let attrs = attributes(&bytes, 168);
        assert_eq!(attrs[0].0, 5, "XFRMA_TMPL");
        let tmpl = &attrs[0].1;
        assert_eq!(tmpl.len(), 64);
        assert_eq!(&tmpl[0..4], &[198, 18, 0, 2], "tunnel destination");
        assert_eq!(tmpl[20], 50, "ESP");
        assert_eq!(&tmpl[28..32], &[198, 18, 0, 1], "tunnel source");
        assert_eq!(
            u32::from_ne_bytes(tmpl[44..48].try_into().unwrap()),
            77,
            "reqid"
        );
        assert_eq!(tmpl[48], 1, "tunnel mode");
    }

    #[test]
    fn more_specific_remote_selectors_get_lower_priorities() {
        let local = (ip("10.0.0.0"), 24);
        let out = |remote: (IpAddr, u8)| prefix_sel(local, remote)[0];
        let host = out((ip("10.9.0.7"), 32));
        let lan = out((ip("10.9.0.0"), 24));
        let site = out((ip("10.9.0.0"), 16));
        let p = |sel: &Sel, dir| policy_priority(1000, sel, dir);
        assert_eq!(p(&host, PolicyDir::Out), 1000 + 16, "a host, any port");
        assert_eq!(p(&lan, PolicyDir::Out), 1000 + 8 * 17 + 16);
        assert!(p(&host, PolicyDir::Out) < p(&lan, PolicyDir::Out));
        assert!(p(&lan, PolicyDir::Out) < p(&site, PolicyDir::Out));
        // inbound and forward: the remote side is the source
        let back = |remote: (IpAddr, u8)| prefix_sel(remote, local)[0];
        for dir in [PolicyDir::In, PolicyDir::Fwd] {
            assert_eq!(p(&back((ip("10.9.0.7"), 32)), dir), 1016);
            assert!(p(&back((ip("10.9.0.7"), 32)), dir) < p(&back((ip("10.9.0.0"), 24)), dir));
        }
        // the local side does not count
        let wide_local = prefix_sel((ip("0.0.0.0"), 0), (ip("10.9.0.7"), 32))[0];
        assert_eq!(p(&wide_local, PolicyDir::Out), p(&host, PolicyDir::Out));
        // one port beats any port on the same prefix, but never a narrower prefix
        let mut dns = prefix_selector(ip("10.9.0.0"), 24);
        (dns.protocol, dns.start_port, dns.end_port) = (17, 53, 53);
        let dns = selectors(&[prefix_selector(local.0, local.1)], &[dns])[0];
        assert_eq!(p(&dns, PolicyDir::Out), 1000 + 8 * 17);
        assert!(p(&dns, PolicyDir::Out) < p(&lan, PolicyDir::Out));
        let host_25 = out((ip("10.9.0.0"), 25));
        assert!(p(&host_25, PolicyDir::Out) < p(&dns, PolicyDir::Out));
        let all_v6 = prefix_sel((ip("2001:db8::"), 64), (ip("::"), 0))[0];
        assert_eq!(p(&all_v6, PolicyDir::Out), 1000 + 128 * 17 + 16);
        assert_eq!(
            policy_priority(u32::MAX - 1, &site, PolicyDir::Out),
            u32::MAX
        );
        for dir in [PolicyDir::Out, PolicyDir::In, PolicyDir::Fwd] {
            assert_eq!(PolicyDir::from_code(dir.code()), Some(dir));
        }
        assert_eq!(PolicyDir::from_code(3), None, "socket policies");
    }

    #[test]
    fn get_ae_asks_for_replay_and_lifetime_values() {
        let bytes = emit(XfrmMessage::GetAsyncEvent(get_ae(
            ip("198.18.0.2"),
            0x1234,
            ip("198.18.0.1"),
            9,
        )));
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x1f, "GETAE");
        let id = &bytes[16..];
        assert_eq!(id.len(), 48);
        assert_eq!(&id[16..20], &0x1234u32.to_be_bytes());
        assert_eq!(id[22], 50);
        assert_eq!(
            u32::from_ne_bytes(id[40..44].try_into().unwrap()),
            XFRM_AE_RVAL | XFRM_AE_LVAL
        );
        assert_eq!(u32::from_ne_bytes(id[44..48].try_into().unwrap()), 9);
        let answer = NewAsyncEventMessage {
            id: AsyncEventId::default(),
            nlas: vec![
                XfrmAttrs::ReplayStateEsn(ReplayEsn {
                    bmp_len: 1,
                    oseq: 7,
                    seq: 3,
                    oseq_hi: 1,
                    seq_hi: 2,
                    replay_window: 32,
                    bmp: vec![0],
                }),
                XfrmAttrs::LifetimeBytes(netlink_packet_xfrm::Lifetime {
                    bytes: 1,
                    packets: 99,
                    add_time: 0,
                    use_time: 0,
                }),
            ],
        };
        assert_eq!(
            parse_ae(&answer),
            AeValues {
                oseq: (1 << 32) | 7,
                seq: (2 << 32) | 3,
                packets: 99
            }
        );
    }

    #[test]
    fn the_probe_and_allocspi_messages() {
        let bytes = emit(XfrmMessage::AddSa(null_esp_message(
            ip("127.0.0.1"),
            ip("127.0.0.2"),
            0xfff00001,
        )));
        let attrs = attributes(&bytes, 224);
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, 2, "XFRMA_ALG_CRYPT");
        assert_eq!(&attrs[0].1[..16], b"ecb(cipher_null)");
        assert_eq!(attrs[0].1.len(), 68, "name + key length, no key");
        let bytes = emit(XfrmMessage::AllocSpi(alloc_spi_message(
            ip("198.18.0.2"),
            ip("198.18.0.1"),
            0x100,
            0xffff,
        )));
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x16, "ALLOCSPI");
        // xfrm_userspi_info: usersa_info (224), min, max
        let body = &bytes[16..];
        assert_eq!(&body[56..60], &[198, 18, 0, 1], "destination");
        assert_eq!(body[76], 50);
        assert_eq!(
            u32::from_ne_bytes(body[224..228].try_into().unwrap()),
            0x100
        );
        assert_eq!(
            u32::from_ne_bytes(body[228..232].try_into().unwrap()),
            0xffff
        );
    }

    #[test]
    fn ranges_become_exact_prefix_covers() {
        assert_eq!(
            range_to_prefixes(ip("10.0.0.0"), ip("10.0.0.255")),
            vec![(ip("10.0.0.0"), 24)]
        );
        assert_eq!(
            range_to_prefixes(ip("10.0.0.1"), ip("10.0.0.6")),
            vec![
                (ip("10.0.0.1"), 32),
                (ip("10.0.0.2"), 31),
                (ip("10.0.0.4"), 31),
                (ip("10.0.0.6"), 32)
            ]
        );
        assert_eq!(
            range_to_prefixes(ip("0.0.0.0"), ip("255.255.255.255")),
            vec![(ip("0.0.0.0"), 0)]
        );
        assert_eq!(
            range_to_prefixes(ip("::"), ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
            vec![(ip("::"), 0)]
        );
        assert_eq!(
            range_to_prefixes(ip("10.0.0.9"), ip("10.0.0.9")),
            vec![(ip("10.0.0.9"), 32)]
        );
        assert_eq!(range_to_prefixes(ip("10.0.0.9"), ip("10.0.0.8")), vec![]);
        assert_eq!(range_to_prefixes(ip("10.0.0.9"), ip("::1")), vec![]);
        assert_eq!(port_range_to_masks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_to_masks(53, 53), vec![(53, 0xffff)]);
        assert_eq!(port_range_to_masks(1024, 2047), vec![(1024, 0xfc00)]);
        let covered: u32 = port_range_to_masks(3, 1000)
            .iter()
            .map(|(_, mask)| 1u32 << mask.count_zeros())
            .sum();
        assert_eq!(covered, 998);
    }

    #[test]
    fn selector_products_skip_mixed_families_and_protocols() {
        let mut udp = prefix_selector(ip("10.0.0.0"), 24);
        udp.protocol = 17;
        let mut tcp = prefix_selector(ip("10.9.0.0"), 16);
        tcp.protocol = 6;
        let v6 = prefix_selector(ip("2001:db8::"), 32);
        let any = prefix_selector(ip("10.9.0.0"), 16);
        assert_eq!(selectors(&[udp], &[tcp, v6]), vec![]);
        let sels = selectors(&[udp], &[any, v6]);
        assert_eq!(sels.len(), 1);
        assert_eq!(sels[0].proto, 17);
        assert_eq!(
            (sels[0].src, sels[0].dst),
            ((ip("10.0.0.0"), 24), (ip("10.9.0.0"), 16))
        );
    }
}
