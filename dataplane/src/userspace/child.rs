//! The userspace backend's per-child state and the routing table the workers read.
//!
//! A [`Child`] holds both directions' SA state (each behind its own mutex, taken once per run of
//! consecutive packets of that child in a batch, and only ever by the one worker of that
//! direction), the lease granted by the node (`granted`, raised by `extend`), and atomic counters
//! that `counters`/`stop` read without stopping the workers.
//!
//! The [`Table`] is immutable: `start` and `stop` derive a new one and swap it in. Its maps are
//! persistent (they share structure), so that costs O(log n), not a copy of every child; a worker
//! takes one snapshot per batch:
//!
//! ```text
//!   start/stop ──with/without──► Arc<Table> ──swap──► RwLock<Arc<Table>> ◄──clone once per batch── workers
//!                          ├─ by_spi:  in_spi → child            (inbound: ESP SPI lookup)
//!                          ├─ by_host: single remote address → children (road warriors' virtual IPs)
//!                          └─ ranged:  children with range selectors, narrowest first (scan)
//! ```
//!
//! Outbound, among the children whose selectors contain a packet's flow, [`Table::route`] picks
//! the one whose matching remote selector is the most specific ([`Span`]: fewest addresses,
//! then fewest ports), and among equally specific ones the earliest started (a rekey's old
//! child keeps the traffic until it is stopped). Otherwise a child with `10.9.0.0/24` started
//! first would take the return traffic of another user's `10.9.0.7/32`.
//!
//! ```text
//!   flow.dst ──by_host──► host children ── one matches with a single-address selector? ──► it
//!                                                  │ no (nothing can be more specific)
//!                                                  ▼
//!            ranged, sorted by their narrowest selector: scan until the next child's narrowest
//!            selector is wider than the best match so far ──► best (span, start order)
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use evpc_esp::{
    InboundConfig, InboundSa, Keymat, NextHeader, OpenError, Opened, OutboundConfig, OutboundSa,
    SealError, Suite,
};
use evpc_raft_store::{ChildSuite, TrafficSelector};
use nix::sys::socket::SockaddrStorage;

use crate::selector::{Flow, Span, single_address, span};
use crate::{ChildCounters, ChildStart, DriverError};

/// ENCR_AES_GCM_16 (RFC 4106 §8.4; IKEv2 transform type 1, ID 20).
pub const ENCR_AES_GCM_16: u16 = 20;

/// The ESP suite a child's negotiated transform maps to, or why there is none.
pub fn esp_suite(suite: &ChildSuite) -> Result<Suite, String> {
    match (suite.encryption, suite.key_bits) {
        (ENCR_AES_GCM_16, 128) => Ok(Suite::AesGcm128),
        (ENCR_AES_GCM_16, 256) => Ok(Suite::AesGcm256),
        (ENCR_AES_GCM_16, bits) => Err(format!("AES-GCM-16 with {bits}-bit keys is not supported")),
        (other, _) => Err(format!(
            "encryption transform {other} ({suite}) is not supported; only ENCR_AES_GCM_16 (20)"
        )),
    }
}

/// Both directions' SAs for a child, as the ESP crate wants them.
pub(crate) fn build_sas(
    child: &ChildStart,
    window_size: u32,
) -> Result<(OutboundSa, InboundSa), DriverError> {
    let unsupported = |reason: String| DriverError::Unsupported {
        in_spi: child.in_spi,
        reason,
    };
    if !child.udp_encap {
        return Err(unsupported(
            "plain ESP (IP protocol 50, no NAT detected): the userspace backend only carries \
             ESP in UDP (RFC 3948) on the NAT-T port; use the kernel (xfrm) data plane"
                .into(),
        ));
    }
    let keys = child
        .keys
        .as_ref()
        .ok_or_else(|| unsupported("no keys: the userspace backend must encrypt".into()))?;
    let suite = esp_suite(&child.suite).map_err(unsupported)?;
    let out_keymat = Keymat::new(suite, &keys.outbound)
        .map_err(|e| unsupported(format!("outbound keys: {e}")))?;
    let in_keymat =
        Keymat::new(suite, &keys.inbound).map_err(|e| unsupported(format!("inbound keys: {e}")))?;
    let outbound = OutboundSa::new(OutboundConfig {
        spi: child.out_spi,
        keymat: out_keymat,
        esn: child.suite.esn,
        // sequence number 0 is never sent (RFC 4303 §3.3.3)
        first_seq: child.next_seq.max(1),
        limit: child.limit,
    })
    .map_err(|e| unsupported(format!("outbound SA: {e}")))?;
    let inbound = InboundSa::new(InboundConfig {
        spi: child.in_spi,
        keymat: in_keymat,
        esn: child.suite.esn,
        window_size,
        checkpoint: child.replay_floor,
    })
    .map_err(|e| unsupported(format!("inbound SA: {e}")))?;
    Ok((outbound, inbound))
}

/// A child's counters, updated by the workers.
#[derive(Debug, Default)]
pub(crate) struct ChildStats {
    pub highest_out: AtomicU64,
    pub highest_in: AtomicU64,
    pub out_packets: AtomicU64,
    pub in_packets: AtomicU64,
    pub lease_waits: AtomicU64,
    pub replay_drops: AtomicU64,
    pub auth_failures: AtomicU64,
}

impl ChildStats {
    pub(crate) fn snapshot(&self) -> ChildCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        ChildCounters {
            highest_out: get(&self.highest_out),
            highest_in: get(&self.highest_in),
            out_packets: get(&self.out_packets),
            in_packets: get(&self.in_packets),
            lease_waits: get(&self.lease_waits),
            replay_drops: get(&self.replay_drops),
            auth_failures: get(&self.auth_failures),
        }
    }
}

/// How many sealed packets a child remembers by digest, for a planned handover (the successor
/// sends what it held after the last of them).
const RECENT_OUT: usize = 32;
/// How many packets each way a standby child holds; beyond, the oldest are dropped (a handover
/// takes a few milliseconds: at 10,000 packets a second that is a few dozen). The oldest, not
/// the newest: a standby can last while the old owner still sends (it applied the move late),
/// and what matters at the takeover is the tail — the packets after the old owner's last
/// sealed one, found by digest ([`already_sealed`]).
pub(crate) const HELD_MAX: usize = 1024;

/// The outbound SA with the digests of the last packets it sealed.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub sa: OutboundSa,
    recent: [u64; RECENT_OUT],
    /// Packets sealed so far (the ring's next slot is `sealed % RECENT_OUT`).
    sealed: u64,
}

impl Outbound {
    /// The digests of the last packets sealed, oldest first.
    pub(crate) fn recent(&self) -> Vec<u64> {
        let n = (self.sealed as usize).min(RECENT_OUT);
        (0..n)
            .map(|i| self.recent[((self.sealed as usize) - n + i) % RECENT_OUT])
            .collect()
    }
}

/// What a standby child holds until it takes over.
#[derive(Debug, Default)]
pub(crate) struct Held {
    /// ESP packets from the peer, as received.
    pub inbound: std::collections::VecDeque<Vec<u8>>,
    /// Inner packets for the peer, with their next header.
    pub outbound: std::collections::VecDeque<(Vec<u8>, NextHeader)>,
    /// Packets dropped from a full hold (the oldest, to make room).
    pub overflow: u64,
}

/// One running child SA.
#[derive(Debug)]
pub(crate) struct Child {
    pub in_spi: u32,
    pub peer: std::net::SocketAddr,
    pub peer_sockaddr: SockaddrStorage,
    pub ts_local: Vec<TrafficSelector>,
    pub ts_remote: Vec<TrafficSelector>,
    pub outbound: Mutex<Outbound>,
    pub inbound: Mutex<InboundSa>,
    /// Holding packets for a planned handover instead of processing them
    /// ([`crate::SaDriver::start_standby`]); read per packet, changed under `held`'s lock.
    pub standby: AtomicBool,
    pub held: Mutex<Held>,
    /// The highest limit the node has granted (`start`'s `limit`, then `extend`s).
    pub granted: AtomicU64,
    pub stats: ChildStats,
    /// Whether this child is on `activity`'s list (set by the workers, cleared when taken).
    pub active: AtomicBool,
    activity: Arc<Activity>,
}

/// The children that had traffic since the owner runtime last asked: a worker adds a child the
/// first time it touches it after the runtime took the list, so a packet costs one relaxed
/// load, and the runtime's tick costs O(active children), not O(children).
#[derive(Debug, Default)]
pub(crate) struct Activity {
    list: Mutex<Vec<u32>>,
}

impl Activity {
    /// Moves the active children's SPIs to `out`.
    pub(crate) fn take(&self, out: &mut Vec<u32>) {
        out.append(&mut self.list.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

impl Child {
    pub(crate) fn new(
        start: &ChildStart,
        window_size: u32,
        activity: Arc<Activity>,
        standby: bool,
    ) -> Result<Child, DriverError> {
        let (outbound, inbound) = build_sas(start, window_size)?;
        Ok(Child {
            in_spi: start.in_spi,
            peer: start.peer,
            peer_sockaddr: SockaddrStorage::from(start.peer),
            ts_local: start.ts_local.clone(),
            ts_remote: start.ts_remote.clone(),
            outbound: Mutex::new(Outbound {
                sa: outbound,
                recent: [0; RECENT_OUT],
                sealed: 0,
            }),
            inbound: Mutex::new(inbound),
            standby: AtomicBool::new(standby),
            held: Mutex::new(Held::default()),
            granted: AtomicU64::new(start.limit),
            stats: ChildStats::default(),
            active: AtomicBool::new(false),
            activity,
        })
    }

    /// Puts this child on the activity list, once until it is taken.
    fn touched(&self) {
        if !self.active.load(Ordering::Relaxed) && !self.active.swap(true, Ordering::AcqRel) {
            self.activity
                .list
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.in_spi);
        }
    }

    /// Holds a copy of ESP packet `esp` from the peer if the child is in standby (and says
    /// so); `false`: process it.
    pub(crate) fn hold_from_peer(&self, esp: &[u8]) -> bool {
        self.hold(|held| bounded_push(&mut held.inbound, esp.to_vec()))
    }

    /// Holds a copy of inner packet `inner` for the peer if the child is in standby (and says
    /// so); `false`: seal it.
    pub(crate) fn hold_to_peer(&self, inner: &[u8], next_header: NextHeader) -> bool {
        self.hold(|held| bounded_push(&mut held.outbound, (inner.to_vec(), next_header)))
    }

    fn hold(&self, keep: impl FnOnce(&mut Held) -> bool) -> bool {
        if !self.standby.load(Ordering::Acquire) {
            return false;
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        // Read again under the lock: `take_over` clears it under the same lock, after draining.
        if !self.standby.load(Ordering::Acquire) {
            return false;
        }
        if !keep(&mut held) {
            held.overflow += 1;
        }
        true
    }

    /// Raises the granted limit; lower values are ignored.
    pub(crate) fn extend(&self, limit: u64) {
        self.granted.fetch_max(limit, Ordering::AcqRel);
    }

    /// Seals the inner packet at `buffer[SEAL_HEADROOM..][..len]` under the lease.
    pub(crate) fn seal(
        &self,
        out: &mut Outbound,
        buffer: &mut [u8],
        len: usize,
        next_header: NextHeader,
    ) -> Sealed {
        self.touched();
        let digest = buffer
            .get(evpc_esp::SEAL_HEADROOM..evpc_esp::SEAL_HEADROOM + len)
            .map(crate::packet_digest);
        let sa = &mut out.sa;
        let result = match sa.seal_in_place(buffer, len, next_header) {
            Err(SealError::LeaseExhausted { .. }) => {
                // The node may have extended the lease since the last packet.
                let granted = self.granted.load(Ordering::Acquire);
                if granted <= sa.limit() {
                    self.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
                    return Sealed::LeaseExhausted;
                }
                sa.extend_limit(granted);
                sa.seal_in_place(buffer, len, next_header)
            }
            other => other,
        };
        match result {
            Ok(sealed) => {
                self.stats
                    .highest_out
                    .store(sa.highest_used(), Ordering::Release);
                self.stats.out_packets.fetch_add(1, Ordering::Relaxed);
                if let Some(digest) = digest {
                    let slot = (out.sealed % RECENT_OUT as u64) as usize;
                    out.recent[slot] = digest;
                    out.sealed += 1;
                }
                Sealed::Packet(sealed)
            }
            Err(SealError::LeaseExhausted { .. } | SealError::CounterExhausted { .. }) => {
                // CounterExhausted: the SA must be rekeyed; nothing more may be sent under it.
                self.stats.lease_waits.fetch_add(1, Ordering::Relaxed);
                Sealed::LeaseExhausted
            }
            Err(_) => Sealed::Unsealable,
        }
    }

    /// Opens an ESP packet in place and checks the inner packet against the selectors.
    pub(crate) fn open<'p>(&self, sa: &mut InboundSa, esp: &'p mut [u8]) -> OpenedPacket<'p> {
        self.touched();
        match sa.open(esp) {
            Ok(Opened::Packet {
                next_header,
                payload,
                ..
            }) => {
                self.stats
                    .highest_in
                    .store(sa.highest_authenticated(), Ordering::Release);
                if next_header != NextHeader::IPV4 && next_header != NextHeader::IPV6 {
                    return OpenedPacket::Malformed;
                }
                let Some(flow) = Flow::parse(payload) else {
                    return OpenedPacket::Malformed;
                };
                if !flow.inbound_matches(&self.ts_local, &self.ts_remote) {
                    return OpenedPacket::OutsideSelectors;
                }
                // Drop TFC padding (RFC 4303 §2.7): an IP packet knows its own length.
                let len = ip_total_len(payload)
                    .unwrap_or(payload.len())
                    .min(payload.len());
                self.stats.in_packets.fetch_add(1, Ordering::Relaxed);
                OpenedPacket::Deliver(&payload[..len])
            }
            Ok(Opened::Dummy { .. }) => {
                self.stats
                    .highest_in
                    .store(sa.highest_authenticated(), Ordering::Release);
                OpenedPacket::Dummy
            }
            Err(OpenError::Replay { .. } | OpenError::OutsideWindow { .. }) => {
                self.stats.replay_drops.fetch_add(1, Ordering::Relaxed);
                OpenedPacket::Replay
            }
            Err(OpenError::AuthenticationFailed) => {
                self.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
                OpenedPacket::AuthFailed
            }
            Err(_) => OpenedPacket::Malformed,
        }
    }
}

/// How many of the `held` inner packets (oldest first) the previous owner already sealed: up
/// to and including the last held one whose digest is the newest of `recent` (its last sealed
/// packets, oldest first) that was held at all. None held: it sealed its last before this
/// node began holding, and everything held is new.
pub(crate) fn already_sealed(held: &[(Vec<u8>, NextHeader)], recent: &[u64]) -> usize {
    let digests: Vec<u64> = held.iter().map(|(p, _)| crate::packet_digest(p)).collect();
    recent
        .iter()
        .rev()
        .find_map(|d| digests.iter().rposition(|h| h == d))
        .map_or(0, |at| at + 1)
}

/// Appends `item` to a hold of at most [`HELD_MAX`]; `false` if the oldest made room for it.
fn bounded_push<T>(queue: &mut std::collections::VecDeque<T>, item: T) -> bool {
    let room = queue.len() < HELD_MAX;
    if !room {
        queue.pop_front();
    }
    queue.push_back(item);
    room
}

/// The IP total length of an IPv4 or IPv6 packet, if the header says.
pub(crate) fn ip_total_len(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 4 => Some(usize::from(u16::from_be_bytes([packet[2], packet[3]]))),
        6 if packet.len() >= 6 => {
            Some(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))
        }
        _ => None,
    }
}

/// What sealing one packet came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// The ESP packet is at `buffer[..len]`.
    Packet(usize),
    /// The lease (or the counter) is used up: dropped, counted in `lease_waits`.
    LeaseExhausted,
    /// Too large for the buffer.
    Unsealable,
}

/// What opening one ESP packet came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenedPacket<'p> {
    /// Write this inner packet to TUN.
    Deliver(&'p [u8]),
    /// An authentic dummy packet (RFC 4303 §2.6): dropped.
    Dummy,
    /// Refused by the anti-replay window.
    Replay,
    /// The ICV did not verify.
    AuthFailed,
    /// Authentic, but its inner packet is outside the child's selectors.
    OutsideSelectors,
    /// Not an IP packet, or not ESP at all.
    Malformed,
}

/// A running child in the [`Table`], with its start order (ties in routing go to the earliest).
#[derive(Clone, Debug)]
struct Entry {
    order: u64,
    child: Arc<Child>,
}

/// An immutable snapshot of the running children: persistent maps, so the next table (one child
/// more or less) shares all but O(log n) of this one and is built in O(log n), not O(children).
#[derive(Clone, Debug, Default)]
pub(crate) struct Table {
    by_spi: imbl::HashMap<u32, Entry>,
    /// Children by each single remote address among their selectors, in start order.
    by_host: imbl::HashMap<IpAddr, Arc<[Entry]>>,
    /// Children with a range among their remote selectors, with the narrowest [`Span`] of
    /// their remote selectors, ordered by (span, start order). Rebuilt when such a child comes
    /// or goes: road warriors have single-address selectors, so this stays short.
    ranged: Arc<Vec<(Span, u64, Arc<Child>)>>,
    next_order: u64,
}

impl Table {
    /// A table of `children`, started in this order.
    #[cfg(test)]
    pub(crate) fn build(children: Vec<Arc<Child>>) -> Table {
        children
            .into_iter()
            .fold(Table::default(), |table, child| table.with(child))
    }

    /// Every running child's inbound SPI.
    pub(crate) fn spis(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_spi.keys().copied()
    }

    /// This table with `child` started after every child in it. O(log n).
    pub(crate) fn with(&self, child: Arc<Child>) -> Table {
        let mut next = self.clone();
        let entry = Entry {
            order: next.next_order,
            child: child.clone(),
        };
        next.next_order += 1;
        next.by_spi.insert(child.in_spi, entry.clone());
        let mut has_range = false;
        let mut hosts: Vec<IpAddr> = Vec::new();
        for ts in &child.ts_remote {
            match single_address(ts) {
                Some(addr) if !hosts.contains(&addr) => hosts.push(addr),
                Some(_) => {}
                None => has_range = true,
            }
        }
        for addr in hosts {
            let mut entries: Vec<Entry> = next
                .by_host
                .get(&addr)
                .map(|e| e.to_vec())
                .unwrap_or_default();
            entries.push(entry.clone());
            next.by_host.insert(addr, entries.into());
        }
        if has_range && let Some(narrowest) = child.ts_remote.iter().map(span).min() {
            let mut ranged = (*next.ranged).clone();
            ranged.push((narrowest, entry.order, child));
            ranged.sort_unstable_by_key(|(span, order, _)| (*span, *order));
            next.ranged = Arc::new(ranged);
        }
        next
    }

    /// This table without the child `in_spi`, and that child; `None` if it is not running.
    /// O(log n) plus the child's own selectors.
    pub(crate) fn without(&self, in_spi: u32) -> Option<(Table, Arc<Child>)> {
        let entry = self.by_spi.get(&in_spi)?.clone();
        let mut next = self.clone();
        next.by_spi.remove(&in_spi);
        let mut has_range = false;
        for ts in &entry.child.ts_remote {
            match single_address(ts) {
                Some(addr) => {
                    let rest: Vec<Entry> = next
                        .by_host
                        .get(&addr)
                        .into_iter()
                        .flat_map(|e| e.iter())
                        .filter(|e| e.child.in_spi != in_spi)
                        .cloned()
                        .collect();
                    if rest.is_empty() {
                        next.by_host.remove(&addr);
                    } else {
                        next.by_host.insert(addr, rest.into());
                    }
                }
                None => has_range = true,
            }
        }
        if has_range {
            let ranged: Vec<_> = next
                .ranged
                .iter()
                .filter(|(_, _, c)| c.in_spi != in_spi)
                .cloned()
                .collect();
            next.ranged = Arc::new(ranged);
        }
        Some((next, entry.child))
    }

    pub(crate) fn get(&self, in_spi: u32) -> Option<&Arc<Child>> {
        self.by_spi.get(&in_spi).map(|e| &e.child)
    }

    /// The start order of a running child (tests compare routing against it).
    #[cfg(test)]
    pub(crate) fn order_of_spi(&self, in_spi: u32) -> Option<u64> {
        self.by_spi.get(&in_spi).map(|e| e.order)
    }

    /// [`Table::route`]'s answer as the routed child's start order.
    #[cfg(test)]
    pub(crate) fn route_order(&self, flow: &Flow) -> Option<u64> {
        self.route(flow)
            .and_then(|child| self.order_of_spi(child.in_spi))
    }

    /// The child an outbound packet with this flow belongs to: of those whose selectors
    /// contain it, the one whose matching remote selector is the most specific, the earliest
    /// started among equals (see the module documentation).
    pub(crate) fn route(&self, flow: &Flow) -> Option<&Arc<Child>> {
        fn candidate<'t>(
            flow: &Flow,
            order: u64,
            child: &'t Arc<Child>,
        ) -> Option<((Span, u64), &'t Arc<Child>)> {
            flow.outbound_span(&child.ts_local, &child.ts_remote)
                .map(|span| ((span, order), child))
        }
        let mut best: Option<((Span, u64), &Arc<Child>)> = self
            .by_host
            .get(&flow.dst)
            .into_iter()
            .flat_map(|entries| entries.iter())
            .filter_map(|e| candidate(flow, e.order, &e.child))
            .min_by_key(|(key, _)| *key);
        // A match on a single-address selector is the narrowest possible, and every child that
        // has one for this address is in `by_host`: no range child can beat it.
        if best.is_some_and(|((span, _), _)| span.addresses == 0) {
            return best.map(|(_, child)| child);
        }
        for (narrowest, order, child) in self.ranged.iter() {
            // sorted by narrowest selector: no later child can match more specifically
            if best.is_some_and(|((span, _), _)| *narrowest > span) {
                break;
            }
            if let Some(found) = candidate(flow, *order, child)
                && best.is_none_or(|b| found.0 < b.0)
            {
                best = Some(found);
            }
        }
        best.map(|(_, child)| child)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use evpc_esp::{Keymat, SEAL_HEADROOM};
    use evpc_raft_store::{Epoch, SaId};
    use zeroize::Zeroizing;

    use super::*;
    use crate::ChildKeymat;
    use crate::selector::prefix_selector;

    pub(crate) fn sample_start(in_spi: u32, local: &str, remote: &str) -> ChildStart {
        let parse = |s: &str| {
            let (addr, len) = s.split_once('/').unwrap();
            prefix_selector(addr.parse().unwrap(), len.parse().unwrap())
        };
        ChildStart {
            ike: SaId(7),
            epoch: Epoch::FIRST,
            in_spi,
            out_spi: in_spi + 0x1000,
            suite: ChildSuite {
                encryption: ENCR_AES_GCM_16,
                key_bits: 128,
                esn: true,
            },
            keys: Some(ChildKeymat {
                inbound: Zeroizing::new(vec![1; 20]),
                outbound: Zeroizing::new(vec![2; 20]),
            }),
            ts_local: vec![parse(local)],
            ts_remote: vec![parse(remote)],
            local: "198.18.0.1:4500".parse().unwrap(),
            peer: "198.18.0.2:4500".parse().unwrap(),
            udp_encap: true,
            next_seq: 1,
            limit: 3,
            replay_floor: 0,
        }
    }

    fn udp_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let udp = [0x1f, 0x40, 0x1f, 0x41, 0, 12, 0, 0, b'd', b'a', b't', b'a'];
        crate::selector::tests_support::ipv4(src, dst, 17, 0, &udp)
    }

    #[test]
    fn plain_esp_children_are_refused() {
        let mut start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        start.udp_encap = false;
        assert!(matches!(
            Child::new(&start, 64, Arc::default(), false),
            Err(DriverError::Unsupported { in_spi: 0x1000, reason })
                if reason.contains("plain ESP") && reason.contains("ESP in UDP")
        ));
        start.udp_encap = true;
        assert!(Child::new(&start, 64, Arc::default(), false).is_ok());
    }

    #[test]
    fn children_without_keys_or_with_other_suites_are_refused() {
        let mut start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        start.keys = None;
        assert!(matches!(
            Child::new(&start, 64, Arc::default(), false),
            Err(DriverError::Unsupported { in_spi: 0x1000, reason }) if reason.contains("no keys")
        ));
        let mut start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        start.suite.encryption = 12;
        assert!(matches!(
            Child::new(&start, 64, Arc::default(), false),
            Err(DriverError::Unsupported { .. })
        ));
        start.suite = ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: 192,
            esn: false,
        };
        assert!(matches!(
            Child::new(&start, 64, Arc::default(), false),
            Err(DriverError::Unsupported { .. })
        ));
        let mut start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        start.suite.key_bits = 256; // 20-byte keymat is too short for AES-256
        let err = Child::new(&start, 64, Arc::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keys"), "{err}");
        start.keys = Some(ChildKeymat {
            inbound: Zeroizing::new(vec![1; 36]),
            outbound: Zeroizing::new(vec![2; 36]),
        });
        Child::new(&start, 64, Arc::default(), false).expect("AES-256 with 36-byte keymat");
    }

    #[test]
    fn sealing_stops_at_the_lease_and_resumes_after_extend() {
        let start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        let child = Child::new(&start, 64, Arc::default(), false).unwrap();
        let inner = udp_packet([10, 0, 0, 1], [10, 9, 0, 5]);
        let mut buffer = vec![0u8; 256];
        let mut seal_one = |child: &Child| {
            buffer[SEAL_HEADROOM..SEAL_HEADROOM + inner.len()].copy_from_slice(&inner);
            let mut sa = child.outbound.lock().unwrap();
            child.seal(&mut sa, &mut buffer, inner.len(), NextHeader::IPV4)
        };
        for seq in 1..=3 {
            assert!(matches!(seal_one(&child), Sealed::Packet(_)));
            assert_eq!(child.stats.snapshot().highest_out, seq);
        }
        assert_eq!(seal_one(&child), Sealed::LeaseExhausted);
        assert_eq!(seal_one(&child), Sealed::LeaseExhausted);
        child.extend(2); // lower: ignored
        assert_eq!(seal_one(&child), Sealed::LeaseExhausted);
        child.extend(4);
        assert!(matches!(seal_one(&child), Sealed::Packet(_)));
        assert_eq!(seal_one(&child), Sealed::LeaseExhausted);
        let counters = child.stats.snapshot();
        assert_eq!(
            (
                counters.highest_out,
                counters.out_packets,
                counters.lease_waits
            ),
            (4, 4, 4)
        );
    }

    #[test]
    fn open_checks_replay_icv_and_selectors() {
        let start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        let child = Child::new(&start, 64, Arc::default(), false).unwrap();
        // the peer: seals with our inbound keys under our in_spi
        let mut peer = OutboundSa::new(OutboundConfig {
            spi: 0x1000,
            keymat: Keymat::new(Suite::AesGcm128, &[1; 20]).unwrap(),
            esn: true,
            first_seq: 1,
            limit: 100,
        })
        .unwrap();
        let seal = |peer: &mut OutboundSa, inner: &[u8]| {
            let mut out = vec![0u8; 256];
            let len = peer.seal(inner, NextHeader::IPV4, &mut out).unwrap();
            out.truncate(len);
            out
        };
        let good = udp_packet([10, 9, 0, 5], [10, 0, 0, 1]);
        let packet = seal(&mut peer, &good);
        let mut sa = child.inbound.lock().unwrap();
        assert_eq!(
            child.open(&mut sa, &mut packet.clone()),
            OpenedPacket::Deliver(&good[..])
        );
        assert_eq!(
            child.open(&mut sa, &mut packet.clone()),
            OpenedPacket::Replay
        );
        let mut tampered = seal(&mut peer, &good);
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(child.open(&mut sa, &mut tampered), OpenedPacket::AuthFailed);
        let spoofed = udp_packet([10, 9, 0, 6], [10, 0, 0, 1]);
        assert_eq!(
            child.open(&mut sa, &mut seal(&mut peer, &spoofed)),
            OpenedPacket::OutsideSelectors
        );
        let counters = child.stats.snapshot();
        assert_eq!(
            (
                counters.in_packets,
                counters.replay_drops,
                counters.auth_failures,
                counters.highest_in
            ),
            (1, 1, 1, 3)
        );
        drop(sa);
        // a floor refuses what the previous owner saw
        let mut start = start.clone();
        start.replay_floor = 10;
        let resumed = Child::new(&start, 64, Arc::default(), false).unwrap();
        let mut sa = resumed.inbound.lock().unwrap();
        assert_eq!(
            resumed.open(&mut sa, &mut packet.clone()),
            OpenedPacket::Replay
        );
    }

    fn child(in_spi: u32, local: &str, remote: &str) -> Arc<Child> {
        Arc::new(
            Child::new(
                &sample_start(in_spi, local, remote),
                64,
                Arc::default(),
                false,
            )
            .unwrap(),
        )
    }

    fn flow_to(dst: [u8; 4]) -> Flow {
        Flow::parse(&udp_packet([10, 0, 0, 1], dst)).unwrap()
    }

    #[test]
    fn routing_prefers_the_most_specific_child_then_the_first_started() {
        let a = child(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        let b = child(0x2000, "10.0.0.0/24", "10.9.0.0/24");
        let c = child(0x3000, "10.0.0.0/24", "10.9.0.7/32");
        let table = Table::build(vec![a, b, c]);
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 5])), Some(0));
        assert_eq!(
            table.route_order(&flow_to([10, 9, 0, 7])),
            Some(2),
            "c's /32 beats b's /24 although b was started first"
        );
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 8])), Some(1));
        assert_eq!(table.route_order(&flow_to([10, 9, 1, 8])), None);
        let wrong_source = Flow::parse(&udp_packet([10, 0, 1, 1], [10, 9, 0, 5])).unwrap();
        assert_eq!(table.route_order(&wrong_source), None);
        assert_eq!(table.order_of_spi(0x3000), Some(2));
        assert!(table.get(0x4000).is_none());
        assert_eq!(
            table.get(0x2000).map(|c| c.peer_sockaddr),
            Some(SockaddrStorage::from(SocketAddr::from((
                Ipv4Addr::new(198, 18, 0, 2),
                4500
            ))))
        );
    }

    #[test]
    fn a_narrower_range_beats_a_wider_one_started_earlier() {
        let wide = child(0x1000, "10.0.0.0/24", "10.8.0.0/16");
        let narrow = child(0x2000, "10.0.0.0/24", "10.8.3.0/24");
        let table = Table::build(vec![wide, narrow]);
        assert_eq!(
            table.route_order(&flow_to([10, 8, 3, 1])),
            Some(1),
            "/24 beats /16"
        );
        assert_eq!(table.route_order(&flow_to([10, 8, 4, 1])), Some(0));
    }

    #[test]
    fn equally_specific_children_go_to_the_first_started() {
        // a rekey: the new child has the old one's selectors; the old keeps the traffic
        let old = child(0x1000, "10.0.0.0/24", "10.7.0.0/24");
        let new = child(0x2000, "10.0.0.0/24", "10.7.0.0/24");
        let host_old = child(0x3000, "10.0.0.0/24", "10.9.0.9/32");
        let host_new = child(0x4000, "10.0.0.0/24", "10.9.0.9/32");
        let table = Table::build(vec![old, new.clone(), host_old, host_new.clone()]);
        assert_eq!(table.route_order(&flow_to([10, 7, 0, 1])), Some(0));
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 9])), Some(2));
        // the old ones stopped: the new ones take over
        let table = Table::build(vec![new, host_new]);
        assert_eq!(table.route_order(&flow_to([10, 7, 0, 1])), Some(0));
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 9])), Some(1));
    }

    #[test]
    fn ports_break_ties_between_equal_address_ranges() {
        let any = child(0x1000, "10.0.0.0/24", "10.9.0.0/24");
        let mut start = sample_start(0x2000, "10.0.0.0/24", "10.9.0.0/24");
        // the test packets go to UDP port 8001
        start.ts_remote[0].protocol = 17;
        start.ts_remote[0].start_port = 8001;
        start.ts_remote[0].end_port = 8001;
        let one_port = Arc::new(Child::new(&start, 64, Arc::default(), false).unwrap());
        let table = Table::build(vec![any, one_port]);
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 3])), Some(1));
        let other_port = {
            let udp = [0x1f, 0x40, 0x00, 0x35, 0, 8, 0, 0];
            let packet =
                crate::selector::tests_support::ipv4([10, 0, 0, 1], [10, 9, 0, 3], 17, 0, &udp);
            Flow::parse(&packet).unwrap()
        };
        assert_eq!(table.route_order(&other_port), Some(0));
    }

    #[test]
    fn a_host_child_that_does_not_match_falls_through_to_the_ranges() {
        // the /32 child only carries traffic from 10.0.1.0/24; ours comes from 10.0.0.1
        let host = child(0x1000, "10.0.1.0/24", "10.9.0.7/32");
        let range = child(0x2000, "10.0.0.0/24", "10.9.0.0/24");
        let table = Table::build(vec![host, range]);
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 7])), Some(1));
        let from_other_lan = Flow::parse(&udp_packet([10, 0, 1, 1], [10, 9, 0, 7])).unwrap();
        assert_eq!(table.route_order(&from_other_lan), Some(0));
    }

    #[test]
    fn a_stopped_child_leaves_no_trace_and_the_rest_route_as_before() {
        let a = child(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        let b = child(0x2000, "10.0.0.0/24", "10.9.0.0/24");
        let c = child(0x3000, "10.0.0.0/24", "10.9.0.5/32");
        let before = Table::build(vec![a, b, c]);
        assert_eq!(before.route_order(&flow_to([10, 9, 0, 5])), Some(0));
        let (after, removed) = before.without(0x1000).unwrap();
        assert_eq!(removed.in_spi, 0x1000);
        assert!(after.get(0x1000).is_none() && before.get(0x1000).is_some());
        assert_eq!(
            after.route_order(&flow_to([10, 9, 0, 5])),
            Some(2),
            "the other /32 child, started later, takes its address"
        );
        let (after, _) = after.without(0x2000).unwrap();
        assert_eq!(after.route_order(&flow_to([10, 9, 0, 6])), None);
        assert!(after.without(0x2000).is_none());
        let (empty, _) = after.without(0x3000).unwrap();
        assert_eq!(empty.spis().count(), 0);
        assert!(empty.by_host.is_empty() && empty.ranged.is_empty());
    }

    #[test]
    fn routing_agrees_with_a_full_scan() {
        // children with one or two remote selectors, overlapping in every way, in an order
        // that is not their specificity
        let remotes: [&[&str]; 9] = [
            &["10.9.0.0/16"],
            &["10.9.0.0/24", "10.9.2.0/23"],
            &["10.9.0.7/32"],
            &["10.9.0.0/25"],
            &["10.9.0.7/32", "10.9.1.0/24"],
            &["10.9.0.0/24"],
            &["10.9.3.0/24", "10.9.0.128/25"],
            &["10.9.0.8/29"],
            &["10.9.0.12/32", "10.9.0.0/16"],
        ];
        let children: Vec<Arc<Child>> = remotes
            .iter()
            .enumerate()
            .map(|(i, selectors)| {
                let mut start = sample_start(0x1000 + i as u32, "10.0.0.0/24", selectors[0]);
                start.ts_remote = selectors
                    .iter()
                    .map(|s| {
                        let (addr, len) = s.split_once('/').unwrap();
                        prefix_selector(addr.parse().unwrap(), len.parse().unwrap())
                    })
                    .collect();
                Arc::new(Child::new(&start, 64, Arc::default(), false).unwrap())
            })
            .collect();
        let table = Table::build(children.clone());
        for third in 0..=4u8 {
            for fourth in 0..=255u8 {
                let flow = flow_to([10, 9, third, fourth]);
                let expected = children
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        flow.outbound_span(&c.ts_local, &c.ts_remote)
                            .map(|s| (s, i))
                    })
                    .min()
                    .map(|(_, i)| i as u64);
                assert_eq!(table.route_order(&flow), expected, "10.9.{third}.{fourth}");
            }
        }
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 7])), Some(2));
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 12])), Some(8));
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 9])), Some(7));
        assert_eq!(table.route_order(&flow_to([10, 9, 0, 200])), Some(6));
        assert_eq!(table.route_order(&flow_to([10, 9, 4, 1])), Some(0));
    }

    #[test]
    fn what_the_previous_owner_sealed_is_cut_at_its_newest_held_digest() {
        let p = |n: u8| (vec![0x45, 0, 0, 28, 0, n, 0, 0, 64, 17], NextHeader::IPV4);
        let held = vec![p(1), p(2), p(3), p(4)];
        let d = |n: u8| crate::packet_digest(&p(n).0);
        // it sealed 1 and 2 after this node began holding
        assert_eq!(already_sealed(&held, &[d(9), d(1), d(2)]), 2);
        // its newest is not held (sealed before the hold began): everything held is new
        assert_eq!(already_sealed(&held, &[d(8), d(9)]), 0);
        // an older one held, its newest not: cut at the newest that was held
        assert_eq!(already_sealed(&held, &[d(3), d(9)]), 3);
        assert_eq!(already_sealed(&held, &[]), 0);
        assert_eq!(already_sealed(&[], &[d(1)]), 0);
    }

    #[test]
    fn a_standby_child_holds_both_ways_up_to_its_bound() {
        let start = sample_start(0x1000, "10.0.0.0/24", "10.9.0.5/32");
        let child = Child::new(&start, 64, Arc::default(), true).unwrap();
        assert!(child.hold_from_peer(&[1, 2, 3]));
        for i in 0..HELD_MAX + 5 {
            assert!(child.hold_to_peer(&i.to_be_bytes(), NextHeader::IPV4));
        }
        let held = child.held.lock().unwrap();
        assert_eq!(
            (held.inbound.len(), held.outbound.len(), held.overflow),
            (1, HELD_MAX, 5)
        );
        // the oldest made room: the tail, after the old owner's last sealed packet, is kept
        assert_eq!(held.outbound.front().unwrap().0, 5usize.to_be_bytes());
        assert_eq!(
            held.outbound.back().unwrap().0,
            (HELD_MAX + 4).to_be_bytes()
        );
        drop(held);
        child.standby.store(false, Ordering::Release);
        assert!(!child.hold_from_peer(&[1]), "running: processed, not held");
    }
}
