//! Traffic Selector payloads, RFC 7296 §3.13, and the set arithmetic needed for
//! narrowing (§2.9).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::WireError;
use super::reader::Reader;
use super::types::{PayloadType, TsType};

/// One traffic selector: an address range, a port range and an IP protocol
/// (0 = any). Both addresses are of the same family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrafficSelector {
    pub ip_protocol: u8,
    pub start_port: u16,
    pub end_port: u16,
    pub start: IpAddr,
    pub end: IpAddr,
}

impl TrafficSelector {
    /// Every IPv4 address, every protocol and port.
    pub fn any_v4() -> Self {
        Self::v4_range(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
    }

    pub fn v4_range(start: Ipv4Addr, end: Ipv4Addr) -> Self {
        Self {
            ip_protocol: 0,
            start_port: 0,
            end_port: 0xffff,
            start: IpAddr::V4(start),
            end: IpAddr::V4(end),
        }
    }

    /// An IPv4 prefix such as `10.10.0.0/24`.
    pub fn v4_prefix(net: Ipv4Addr, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len.min(32) as u32)
        };
        let start = u32::from(net) & mask;
        Self::v4_range(Ipv4Addr::from(start), Ipv4Addr::from(start | !mask))
    }

    pub fn v4_host(addr: Ipv4Addr) -> Self {
        Self::v4_range(addr, addr)
    }

    fn ts_type(&self) -> TsType {
        match self.start {
            IpAddr::V4(_) => TsType::IPV4_ADDR_RANGE,
            IpAddr::V6(_) => TsType::IPV6_ADDR_RANGE,
        }
    }

    /// The intersection of two selectors, if it is not empty (§2.9 narrowing).
    pub fn intersect(&self, other: &Self) -> Option<Self> {
        let proto = match (self.ip_protocol, other.ip_protocol) {
            (0, p) | (p, 0) => p,
            (a, b) if a == b => a,
            _ => return None,
        };
        let start_port = self.start_port.max(other.start_port);
        let end_port = self.end_port.min(other.end_port);
        if start_port > end_port {
            return None;
        }
        let (start, end) = match (self.start, self.end, other.start, other.end) {
            (IpAddr::V4(a0), IpAddr::V4(a1), IpAddr::V4(b0), IpAddr::V4(b1)) => {
                let s = u32::from(a0).max(u32::from(b0));
                let e = u32::from(a1).min(u32::from(b1));
                if s > e {
                    return None;
                }
                (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(e)))
            }
            (IpAddr::V6(a0), IpAddr::V6(a1), IpAddr::V6(b0), IpAddr::V6(b1)) => {
                let s = u128::from(a0).max(u128::from(b0));
                let e = u128::from(a1).min(u128::from(b1));
                if s > e {
                    return None;
                }
                (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(e)))
            }
            _ => return None,
        };
        Some(Self {
            ip_protocol: proto,
            start_port,
            end_port,
            start,
            end,
        })
    }

    /// True if `self` lies entirely within `other`.
    pub fn is_subset_of(&self, other: &Self) -> bool {
        self.intersect(other).as_ref() == Some(self)
    }
}

/// Narrows `proposed` to what `allowed` permits: every non-empty pairwise
/// intersection, in the proposer's order, without duplicates.
pub fn narrow(proposed: &[TrafficSelector], allowed: &[TrafficSelector]) -> Vec<TrafficSelector> {
    let mut out = Vec::new();
    for p in proposed {
        for a in allowed {
            if let Some(ts) = p.intersect(a)
                && !out.contains(&ts)
            {
                out.push(ts);
            }
        }
    }
    out
}

fn malformed(reason: &'static str) -> WireError {
    WireError::Malformed {
        payload: PayloadType::TSI,
        reason,
    }
}

/// Parses the body of a TSi/TSr payload. Selector types we do not know are
/// skipped: they carry their own length, and §3.13.1 lets us ignore them.
pub fn parse_ts_body(body: &[u8]) -> Result<Vec<TrafficSelector>, WireError> {
    let mut r = Reader::new(body);
    let count = r.u8()?;
    r.take(3)?;
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let ty = TsType(r.u8()?);
        let ip_protocol = r.u8()?;
        let len = r.u16()? as usize;
        if len < 8 {
            return Err(malformed("selector length"));
        }
        let mut s = Reader::new(r.take(len - 4)?);
        match ty {
            TsType::IPV4_ADDR_RANGE | TsType::IPV6_ADDR_RANGE => {
                let start_port = s.u16()?;
                let end_port = s.u16()?;
                let (start, end) = if ty == TsType::IPV4_ADDR_RANGE {
                    let a: [u8; 4] = s.take(4)?.try_into().map_err(|_| malformed("v4"))?;
                    let b: [u8; 4] = s.take(4)?.try_into().map_err(|_| malformed("v4"))?;
                    (IpAddr::from(a), IpAddr::from(b))
                } else {
                    let a: [u8; 16] = s.take(16)?.try_into().map_err(|_| malformed("v6"))?;
                    let b: [u8; 16] = s.take(16)?.try_into().map_err(|_| malformed("v6"))?;
                    (IpAddr::from(a), IpAddr::from(b))
                };
                if !s.is_empty() {
                    return Err(malformed("selector length"));
                }
                out.push(TrafficSelector {
                    ip_protocol,
                    start_port,
                    end_port,
                    start,
                    end,
                });
            }
            _ => {}
        }
    }
    if !r.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(out)
}

pub fn emit_ts_body(selectors: &[TrafficSelector], out: &mut Vec<u8>) {
    out.push(selectors.len() as u8);
    out.extend_from_slice(&[0, 0, 0]);
    for ts in selectors {
        let start = octets(ts.start);
        // A range cannot span families; a mixed selector (only constructible
        // by hand) degrades to its start address rather than a corrupt payload.
        let end = match (ts.start, ts.end) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => octets(ts.end),
            _ => start.clone(),
        };
        out.push(ts.ts_type().0);
        out.push(ts.ip_protocol);
        out.extend_from_slice(&((8 + 2 * start.len()) as u16).to_be_bytes());
        out.extend_from_slice(&ts.start_port.to_be_bytes());
        out.extend_from_slice(&ts.end_port.to_be_bytes());
        out.extend_from_slice(&start);
        out.extend_from_slice(&end);
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}
