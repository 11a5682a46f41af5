//! Inner-packet flows and traffic-selector matching (RFC 7296 §3.13.1, RFC 4301 §4.4.1).
//!
//! The userspace backend reads a bare IP packet from TUN, extracts its [`Flow`] (addresses,
//! protocol, ports) and picks the child SA whose selectors contain it: the packet's destination
//! must lie in one of the peer's selectors (`ts_remote`) and its source in one of ours
//! (`ts_local`). After decryption the same check runs the other way round, so a peer cannot
//! inject traffic outside what it negotiated (RFC 4301 §5.2, step 4).
//!
//! ```text
//!  IPv4/IPv6 header ──Flow::parse──► Flow { src, dst, protocol, src_port, dst_port }
//!                                        │
//!             outbound: matches(ts_local, src side) && matches(ts_remote, dst side)
//!             inbound:  matches(ts_remote, src side) && matches(ts_local, dst side)
//! ```
//!
//! When several children's selectors contain a flow, the most specific wins: the one whose
//! matching remote selector has the smallest [`Span`] (fewest addresses, then fewest ports), so
//! a road warrior's `/32` is never shadowed by a site's `/24` that was started earlier.
//!
//! Ports are only known for the first fragment of TCP, UDP, SCTP, DCCP and UDP-Lite; for ICMP
//! and ICMPv6 the port range carries Type (high byte) and Code (low byte), RFC 7296 §3.13.1.
//! A flow whose ports are unknown ("OPAQUE", RFC 4301 §4.4.1.1) only matches a selector that
//! allows every port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use evpc_raft_store::TrafficSelector;

/// IP protocol numbers that carry 16-bit source and destination ports at the start of their
/// header (IANA "Assigned Internet Protocol Numbers"): TCP, UDP, DCCP, SCTP, UDP-Lite.
const PORTED: [u8; 5] = [6, 17, 33, 132, 136];
/// ICMP (RFC 792) and ICMPv6 (RFC 4443): Type and Code in the port fields (RFC 7296 §3.13.1).
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// IPv6 extension headers that [`Flow::parse`] walks over to reach the upper layer
/// (RFC 8200 §4): Hop-by-Hop, Routing, Destination Options. Fragment (44) is handled apart.
const IPV6_SKIPPABLE: [u8; 3] = [0, 43, 60];
const IPV6_FRAGMENT: u8 = 44;

/// What a selector is matched against: one inner packet's addresses, protocol and ports.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol number.
    pub protocol: u8,
    /// Source port (ICMP: Type << 8 | Code); `None` when not known (a later fragment, or a
    /// protocol without ports).
    pub src_port: Option<u16>,
    /// Destination port (ICMP: Type << 8 | Code, like the source side); `None` when not known.
    pub dst_port: Option<u16>,
}

/// One end of a flow: what a single selector is compared with.
#[derive(Copy, Clone, Debug)]
struct End {
    addr: IpAddr,
    protocol: u8,
    port: Option<u16>,
}

impl Flow {
    /// Reads the flow of an IPv4 or IPv6 packet; `None` if the bytes are not one.
    pub fn parse(packet: &[u8]) -> Option<Flow> {
        match packet.first()? >> 4 {
            4 => Self::parse_v4(packet),
            6 => Self::parse_v6(packet),
            _ => None,
        }
    }

    fn parse_v4(packet: &[u8]) -> Option<Flow> {
        // RFC 791 §3.1
        let header_len = usize::from(packet.first()? & 0x0f) * 4;
        if header_len < 20 || packet.len() < header_len {
            return None;
        }
        let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
        let protocol = packet[9];
        let src = IpAddr::V4(Ipv4Addr::new(
            packet[12], packet[13], packet[14], packet[15],
        ));
        let dst = IpAddr::V4(Ipv4Addr::new(
            packet[16], packet[17], packet[18], packet[19],
        ));
        let (src_port, dst_port) = if fragment_offset == 0 {
            ports(protocol, &packet[header_len..])
        } else {
            (None, None)
        };
        Some(Flow {
            src,
            dst,
            protocol,
            src_port,
            dst_port,
        })
    }

    fn parse_v6(packet: &[u8]) -> Option<Flow> {
        // RFC 8200 §3
        if packet.len() < 40 {
            return None;
        }
        let mut src = [0u8; 16];
        src.copy_from_slice(&packet[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&packet[24..40]);
        let mut next = packet[6];
        let mut at = 40;
        let mut first_fragment = true;
        // A bounded walk: a packet full of extension headers is not worth more.
        for _ in 0..8 {
            if IPV6_SKIPPABLE.contains(&next) {
                let header = packet.get(at..at + 2)?;
                next = header[0];
                at += (usize::from(header[1]) + 1) * 8;
            } else if next == IPV6_FRAGMENT {
                let header = packet.get(at..at + 8)?;
                next = header[0];
                first_fragment = u16::from_be_bytes([header[2], header[3]]) >> 3 == 0;
                at += 8;
            } else {
                break;
            }
        }
        let (src_port, dst_port) = match (first_fragment, packet.get(at..)) {
            (true, Some(rest)) => ports(next, rest),
            _ => (None, None),
        };
        Some(Flow {
            src: IpAddr::V6(Ipv6Addr::from(src)),
            dst: IpAddr::V6(Ipv6Addr::from(dst)),
            protocol: next,
            src_port,
            dst_port,
        })
    }

    /// Whether an outbound packet with this flow belongs to a child with these selectors.
    pub fn outbound_matches(
        &self,
        ts_local: &[TrafficSelector],
        ts_remote: &[TrafficSelector],
    ) -> bool {
        any_contains(ts_remote, self.dst_end()) && any_contains(ts_local, self.src_end())
    }

    /// How specific the most specific of `ts_remote` containing this outbound flow is, if the
    /// flow belongs to a child with these selectors at all (the same test as
    /// [`Flow::outbound_matches`]).
    pub fn outbound_span(
        &self,
        ts_local: &[TrafficSelector],
        ts_remote: &[TrafficSelector],
    ) -> Option<Span> {
        if !any_contains(ts_local, self.src_end()) {
            return None;
        }
        let dst = self.dst_end();
        ts_remote
            .iter()
            .filter(|ts| contains(ts, dst))
            .map(span)
            .min()
    }

    /// Whether a decrypted inbound packet with this flow is one the child's selectors allow.
    pub fn inbound_matches(
        &self,
        ts_local: &[TrafficSelector],
        ts_remote: &[TrafficSelector],
    ) -> bool {
        any_contains(ts_remote, self.src_end()) && any_contains(ts_local, self.dst_end())
    }

    fn src_end(&self) -> End {
        End {
            addr: self.src,
            protocol: self.protocol,
            port: self.src_port,
        }
    }

    fn dst_end(&self) -> End {
        End {
            addr: self.dst,
            protocol: self.protocol,
            port: self.dst_port,
        }
    }
}

/// Ports (or ICMP Type/Code) at the start of the upper-layer header.
fn ports(protocol: u8, upper: &[u8]) -> (Option<u16>, Option<u16>) {
    if PORTED.contains(&protocol) && upper.len() >= 4 {
        (
            Some(u16::from_be_bytes([upper[0], upper[1]])),
            Some(u16::from_be_bytes([upper[2], upper[3]])),
        )
    } else if (protocol == ICMP || protocol == ICMPV6) && upper.len() >= 2 {
        let type_code = u16::from_be_bytes([upper[0], upper[1]]);
        (Some(type_code), Some(type_code))
    } else {
        (None, None)
    }
}

fn any_contains(selectors: &[TrafficSelector], end: End) -> bool {
    selectors.iter().any(|ts| contains(ts, end))
}

/// Whether one selector contains one end of a flow.
fn contains(ts: &TrafficSelector, end: End) -> bool {
    if ts.protocol != 0 && ts.protocol != end.protocol {
        return false;
    }
    let any_port = ts.start_port == 0 && ts.end_port == u16::MAX;
    let port_ok = match end.port {
        _ if any_port => true,
        Some(port) => (ts.start_port..=ts.end_port).contains(&port),
        // OPAQUE: only ANY matches (RFC 4301 §4.4.1.1)
        None => false,
    };
    port_ok && address_in_range(end.addr, ts.start_addr, ts.end_addr)
}

/// Whether `addr` lies in `start..=end` (both of its family).
pub fn address_in_range(addr: IpAddr, start: IpAddr, end: IpAddr) -> bool {
    match (addr, start, end) {
        (IpAddr::V4(a), IpAddr::V4(s), IpAddr::V4(e)) => (s..=e).contains(&a),
        (IpAddr::V6(a), IpAddr::V6(s), IpAddr::V6(e)) => (s..=e).contains(&a),
        _ => false,
    }
}

/// How much of the address and port space a selector covers: the smaller, the more specific.
/// Ordered by addresses first, then ports, which is how outbound routing breaks overlaps
/// between children.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    /// Addresses covered, minus one (0: a single host; `u128::MAX`: all of IPv6, which does not
    /// fit as a count).
    pub addresses: u128,
    /// Ports covered, minus one (0: one port; 65535: any).
    pub ports: u16,
}

impl Span {
    /// The span of a single-address, single-port selector: nothing is more specific.
    pub const HOST: Span = Span {
        addresses: 0,
        ports: 0,
    };
}

/// The [`Span`] of one selector. A malformed selector (start above end) counts as covering
/// one address or port: it contains no flow anyway.
pub fn span(ts: &TrafficSelector) -> Span {
    let addresses = match (ts.start_addr, ts.end_addr) {
        (IpAddr::V4(s), IpAddr::V4(e)) => u128::from(u32::from(e).saturating_sub(u32::from(s))),
        (IpAddr::V6(s), IpAddr::V6(e)) => u128::from(e).saturating_sub(u128::from(s)),
        // mixed families: contains nothing, so as wide as can be
        _ => u128::MAX,
    };
    Span {
        addresses,
        ports: ts.end_port.saturating_sub(ts.start_port),
    }
}

/// The single address a selector covers, if it covers exactly one (a road warrior's virtual
/// IP): the userspace backend indexes those in a hash map.
pub fn single_address(ts: &TrafficSelector) -> Option<IpAddr> {
    (ts.start_addr == ts.end_addr).then_some(ts.start_addr)
}

/// A selector covering a whole prefix with any protocol and port (`10.0.0.0/24`), for tests,
/// tools and configuration.
pub fn prefix_selector(addr: IpAddr, prefix_len: u8) -> TrafficSelector {
    let (start, end) = match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            (
                IpAddr::V4(Ipv4Addr::from(bits & mask)),
                IpAddr::V4(Ipv4Addr::from(bits | !mask)),
            )
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            (
                IpAddr::V6(Ipv6Addr::from(bits & mask)),
                IpAddr::V6(Ipv6Addr::from(bits | !mask)),
            )
        }
    };
    TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: u16::MAX,
        start_addr: start,
        end_addr: end,
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A minimal IPv4 header (20 bytes, no checksum) plus `upper`.
    pub(crate) fn ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        flags_frag: u16,
        upper: &[u8],
    ) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0];
        let total = (20 + upper.len()) as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[6..8].copy_from_slice(&flags_frag.to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(upper);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::ipv4;
    use super::*;

    fn v4(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    #[test]
    fn ipv4_udp_ports_and_fragments() {
        let udp = [0x1f, 0x40, 0x00, 0x35, 0, 8, 0, 0];
        let flow = Flow::parse(&ipv4([10, 0, 0, 1], [10, 0, 1, 9], 17, 0, &udp)).unwrap();
        assert_eq!(
            flow,
            Flow {
                src: v4("10.0.0.1"),
                dst: v4("10.0.1.9"),
                protocol: 17,
                src_port: Some(8000),
                dst_port: Some(53),
            }
        );
        // a later fragment carries no ports
        let later = Flow::parse(&ipv4([10, 0, 0, 1], [10, 0, 1, 9], 17, 0x00b9, &udp)).unwrap();
        assert_eq!((later.src_port, later.dst_port), (None, None));
        // ICMP echo request: type 8 code 0
        let icmp = Flow::parse(&ipv4([1, 1, 1, 1], [2, 2, 2, 2], 1, 0, &[8, 0, 0, 0])).unwrap();
        assert_eq!(icmp.dst_port, Some(0x0800));
    }

    #[test]
    fn garbage_is_not_a_flow() {
        assert_eq!(Flow::parse(&[]), None);
        assert_eq!(Flow::parse(&[0x45; 10]), None);
        assert_eq!(Flow::parse(&[0x41; 40]), None, "IHL below 5");
        assert_eq!(Flow::parse(&[0x60; 39]), None);
        assert_eq!(Flow::parse(&[0x10; 60]), None, "version 1");
    }

    #[test]
    fn ipv6_walks_extension_headers_and_fragments() {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
        p[6] = 0; // hop-by-hop
        p.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        p.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[44, 0, 0, 0, 0, 0, 0, 0]); // hop-by-hop (8 bytes) → fragment
        p.extend_from_slice(&[17, 0, 0, 0, 0, 0, 0, 1]); // fragment offset 0, → UDP
        p.extend_from_slice(&[0x13, 0x88, 0x11, 0x94, 0, 8, 0, 0]);
        let flow = Flow::parse(&p).unwrap();
        assert_eq!(flow.protocol, 17);
        assert_eq!((flow.src_port, flow.dst_port), (Some(5000), Some(4500)));
        assert_eq!(flow.dst, "2001:db8::7".parse::<IpAddr>().unwrap());
        // the same with a non-zero fragment offset
        p[40 + 8 + 3] = 0x10;
        let later = Flow::parse(&p).unwrap();
        assert_eq!((later.protocol, later.src_port), (17, None));
    }

    #[test]
    fn spans_order_by_addresses_then_ports() {
        let host = prefix_selector(v4("10.9.0.7"), 32);
        let lan = prefix_selector(v4("10.9.0.0"), 24);
        let site = prefix_selector(v4("10.9.0.0"), 16);
        assert_eq!(
            span(&host),
            Span {
                addresses: 0,
                ports: 65535
            }
        );
        assert_eq!(span(&lan).addresses, 255);
        assert!(span(&host) < span(&lan) && span(&lan) < span(&site));
        let dns = TrafficSelector {
            protocol: 17,
            start_port: 53,
            end_port: 53,
            ..lan
        };
        assert_eq!(
            span(&dns),
            Span {
                addresses: 255,
                ports: 0
            }
        );
        assert!(span(&dns) < span(&lan), "fewer ports, same addresses");
        assert!(span(&host) < span(&dns), "addresses decide before ports");
        let all_v6 = prefix_selector("::".parse().unwrap(), 0);
        assert_eq!(span(&all_v6).addresses, u128::MAX);
        assert_eq!(
            span(&TrafficSelector {
                start_port: 9,
                end_port: 8,
                ..host
            }),
            Span::HOST,
            "malformed ranges do not wrap"
        );

        let udp = [0x1f, 0x40, 0x00, 0x35, 0, 8, 0, 0];
        let out = Flow::parse(&ipv4([10, 0, 0, 1], [10, 9, 0, 7], 17, 0, &udp)).unwrap();
        let local = [prefix_selector(v4("10.0.0.0"), 24)];
        assert_eq!(
            out.outbound_span(&local, &[site, lan, dns]),
            Some(span(&dns)),
            "the most specific selector that contains the flow"
        );
        let tcp = Flow { protocol: 6, ..out };
        assert_eq!(tcp.outbound_span(&local, &[site, dns]), Some(span(&site)));
        assert_eq!(
            out.outbound_span(&[host], &[lan]),
            None,
            "source outside ts_local"
        );
        assert_eq!(
            out.outbound_span(&local, &[prefix_selector(v4("10.8.0.0"), 16)]),
            None
        );
    }

    #[test]
    fn selectors_match_address_protocol_and_ports() {
        let lan = prefix_selector(v4("10.0.0.77"), 24);
        assert_eq!(lan.start_addr, v4("10.0.0.0"));
        assert_eq!(lan.end_addr, v4("10.0.0.255"));
        let host = prefix_selector(v4("198.19.2.5"), 32);
        assert_eq!(single_address(&host), Some(v4("198.19.2.5")));
        assert_eq!(single_address(&lan), None);
        let dns_only = TrafficSelector {
            protocol: 17,
            start_port: 53,
            end_port: 53,
            ..host
        };
        let udp = [0x1f, 0x40, 0x00, 0x35, 0, 8, 0, 0];
        let out = Flow::parse(&ipv4([10, 0, 0, 1], [198, 19, 2, 5], 17, 0, &udp)).unwrap();
        assert!(out.outbound_matches(&[lan], &[host]));
        assert!(out.outbound_matches(&[lan], &[dns_only]));
        assert!(
            !out.outbound_matches(&[host], &[lan]),
            "source not in ts_local"
        );
        assert!(
            !out.inbound_matches(&[lan], &[host]),
            "inbound is the other way round"
        );
        let tcp = Flow { protocol: 6, ..out };
        assert!(!tcp.outbound_matches(&[lan], &[dns_only]));
        let opaque = Flow {
            dst_port: None,
            ..out
        };
        assert!(
            !opaque.outbound_matches(&[lan], &[dns_only]),
            "OPAQUE only matches ANY"
        );
        assert!(opaque.outbound_matches(&[lan], &[host]));
        let v6 = prefix_selector("2001:db8::".parse().unwrap(), 64);
        assert!(!out.outbound_matches(&[lan], &[v6]), "families never mix");
        assert_eq!(
            v6.end_addr,
            "2001:db8::ffff:ffff:ffff:ffff".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            prefix_selector(v4("1.2.3.4"), 0).end_addr,
            v4("255.255.255.255")
        );
    }
}
