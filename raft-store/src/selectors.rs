//! Which peer holds which inner addresses: the address ranges of every child's remote traffic
//! selectors (`ts_remote`), indexed so that one user can never be given another's.
//!
//! A child's remote selectors are the addresses its peer may use inside the tunnel, and the
//! data plane sends traffic for those addresses to that peer. If two peers' selectors overlapped,
//! one would receive (and could answer for) the other's traffic. So:
//!
//! Invariant: the ranges held by different peer identities never overlap.
//!
//! Ranges of the same identity may (a child and its rekeyed successor carry the same
//! selectors; a reconnecting client's new SA may overlap its stale one until that is deleted).
//! Only addresses are compared, not protocols or ports: a conservative reading that never lets
//! two users share an address.
//!
//! The index keeps the coverage as disjoint, maximal segments `[start, end]` with the identity
//! covering it and how many selectors do; finding a conflict is O(log n) plus the segments of
//! the asking identity itself, so it never walks other peers' records.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::sa::{Identity, TrafficSelector};

/// A point of the address space: IPv4 and IPv6 are separate lines.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
struct Point {
    v6: bool,
    addr: u128,
}

/// A selector's address range, checked: both ends of one family, start ≤ end.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct AddrRange {
    v6: bool,
    start: u128,
    end: u128,
}

fn point(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl AddrRange {
    /// The range of a selector; `None` if its ends are of different families or reversed, or
    /// its ports are reversed.
    pub(crate) fn of(ts: &TrafficSelector) -> Option<AddrRange> {
        let (v6, start) = point(ts.start_addr);
        let (end_v6, end) = point(ts.end_addr);
        (v6 == end_v6 && start <= end && ts.start_port <= ts.end_port).then_some(AddrRange {
            v6,
            start,
            end,
        })
    }

    /// Its first and last point.
    fn points(&self) -> (Point, Point) {
        let at = |addr| Point { v6: self.v6, addr };
        (at(self.start), at(self.end))
    }

    /// Whether this range lies inside `[addr, addr]`.
    pub(crate) fn is_host(&self, addr: IpAddr) -> bool {
        let (v6, a) = point(addr);
        self.v6 == v6 && self.start == a && self.end == a
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Segment {
    end: u128,
    holder: Identity,
    count: u32,
}

/// The coverage of all remote selectors in the state.
///
/// Invariant: segments are disjoint and maximal (two touching segments differ in holder or
/// count), every count is positive, and segments of different holders never overlap (they are
/// disjoint by construction, so this is: no range was admitted over another holder's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorIndex {
    segments: imbl::OrdMap<Point, Segment>,
}

impl SelectorIndex {
    /// Another identity holding part of `range`, if any.
    pub(crate) fn conflict(&self, range: &AddrRange, holder: &Identity) -> Option<&Identity> {
        let (from, to) = range.points();
        if let Some((start, seg)) = self.segments.range(..from).next_back()
            && start.v6 == range.v6
            && seg.end >= range.start
            && seg.holder != *holder
        {
            return Some(&seg.holder);
        }
        self.segments
            .range(from..=to)
            .map(|(_, seg)| &seg.holder)
            .find(|h| *h != holder)
    }

    /// Splits the segment containing `at` (if it starts below `at`) so that a segment starts at
    /// `at`.
    fn split_at(&mut self, v6: bool, at: u128) {
        let key = Point { v6, addr: at };
        let Some((&start, seg)) = self.segments.range(..key).next_back() else {
            return;
        };
        if start.v6 != v6 || seg.end < at {
            return;
        }
        let tail = Segment {
            end: seg.end,
            holder: seg.holder.clone(),
            count: seg.count,
        };
        if let Some(head) = self.segments.get_mut(&start) {
            head.end = at - 1;
        }
        self.segments.insert(key, tail);
    }

    /// Merges touching segments of equal holder and count between `from` and `to` (inclusive
    /// of the neighbours), keeping the representation canonical.
    fn normalize(&mut self, v6: bool, from: u128, to: u128) {
        let lo = Point {
            v6,
            addr: from.saturating_sub(1),
        };
        let hi = Point {
            v6,
            addr: to.saturating_add(1),
        };
        let start = self
            .segments
            .range(..=lo)
            .next_back()
            .map_or(lo, |(k, _)| *k)
            .max(Point { v6, addr: 0 });
        let keys: Vec<Point> = self
            .segments
            .range(start..=hi)
            .map(|(k, _)| *k)
            .filter(|k| k.v6 == v6)
            .collect();
        let mut current: Option<Point> = None;
        for key in keys {
            match current {
                Some(prev) => {
                    let (prev_end, same) = {
                        let a = &self.segments[&prev];
                        let b = &self.segments[&key];
                        (a.end, a.holder == b.holder && a.count == b.count)
                    };
                    if same && prev_end.checked_add(1) == Some(key.addr) {
                        if let Some(b) = self.segments.remove(&key)
                            && let Some(a) = self.segments.get_mut(&prev)
                        {
                            a.end = b.end;
                        }
                    } else {
                        current = Some(key);
                    }
                }
                None => current = Some(key),
            }
        }
    }

    /// Adds one selector range held by `holder`. The caller checked [`SelectorIndex::conflict`].
    pub(crate) fn add(&mut self, range: &AddrRange, holder: &Identity) {
        self.split_at(range.v6, range.start);
        if let Some(after) = range.end.checked_add(1) {
            self.split_at(range.v6, after);
        }
        // Walk [start, end]: bump covered segments, fill the gaps.
        let mut cursor = Some(range.start);
        while let Some(at) = cursor.filter(|at| *at <= range.end) {
            let key = Point {
                v6: range.v6,
                addr: at,
            };
            let next = self
                .segments
                .range(key..)
                .next()
                .filter(|(k, _)| k.v6 == range.v6 && k.addr <= range.end)
                .map(|(k, s)| (*k, s.end));
            match next {
                Some((k, end)) if k.addr == at => {
                    if let Some(seg) = self.segments.get_mut(&k) {
                        seg.count += 1;
                    }
                    cursor = end.checked_add(1);
                }
                Some((k, _)) => {
                    self.segments.insert(
                        key,
                        Segment {
                            end: k.addr - 1,
                            holder: holder.clone(),
                            count: 1,
                        },
                    );
                    cursor = Some(k.addr);
                }
                None => {
                    self.segments.insert(
                        key,
                        Segment {
                            end: range.end,
                            holder: holder.clone(),
                            count: 1,
                        },
                    );
                    cursor = None;
                }
            }
        }
        self.normalize(range.v6, range.start, range.end);
    }

    /// Removes one selector range that `add` put in.
    pub(crate) fn remove(&mut self, range: &AddrRange) {
        self.split_at(range.v6, range.start);
        if let Some(after) = range.end.checked_add(1) {
            self.split_at(range.v6, after);
        }
        let (from, to) = range.points();
        let keys: Vec<Point> = self.segments.range(from..=to).map(|(k, _)| *k).collect();
        for key in keys {
            let empty = match self.segments.get_mut(&key) {
                Some(seg) => {
                    seg.count = seg.count.saturating_sub(1);
                    seg.count == 0
                }
                None => false,
            };
            if empty {
                self.segments.remove(&key);
            }
        }
        self.normalize(range.v6, range.start, range.end);
    }

    /// Number of segments (for tests and sizing).
    pub fn segments(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ts(a: [u8; 4], b: [u8; 4]) -> AddrRange {
        AddrRange::of(&TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start_addr: IpAddr::V4(Ipv4Addr::from(a)),
            end_addr: IpAddr::V4(Ipv4Addr::from(b)),
        })
        .unwrap()
    }

    fn id(name: &str) -> Identity {
        Identity::fqdn(name)
    }

    #[test]
    fn different_holders_never_overlap_the_same_holder_may() {
        let mut index = SelectorIndex::default();
        let site = ts([10, 20, 0, 0], [10, 20, 255, 255]);
        assert!(index.conflict(&site, &id("a")).is_none());
        index.add(&site, &id("a"));
        // The same identity again (a rekey): fine.
        assert!(index.conflict(&site, &id("a")).is_none());
        index.add(&site, &id("a"));
        // Anyone else, anywhere inside or across its edges: refused.
        for probe in [
            ts([10, 20, 1, 7], [10, 20, 1, 7]),
            ts([10, 19, 255, 0], [10, 20, 0, 0]),
            ts([10, 20, 255, 255], [10, 21, 0, 0]),
            ts([10, 0, 0, 0], [10, 255, 255, 255]),
        ] {
            assert_eq!(
                index.conflict(&probe, &id("b")),
                Some(&id("a")),
                "{probe:?}"
            );
        }
        assert!(
            index
                .conflict(&ts([10, 21, 0, 0], [10, 21, 0, 0]), &id("b"))
                .is_none()
        );
        // Removing both copies frees the range.
        index.remove(&site);
        assert_eq!(
            index.conflict(&ts([10, 20, 1, 7], [10, 20, 1, 7]), &id("b")),
            Some(&id("a"))
        );
        index.remove(&site);
        assert_eq!(index.segments(), 0);
        assert!(index.conflict(&site, &id("b")).is_none());
    }

    #[test]
    fn the_representation_is_canonical_whatever_the_order() {
        let ranges = [
            ts([10, 0, 0, 0], [10, 0, 0, 255]),
            ts([10, 0, 0, 10], [10, 0, 0, 20]),
            ts([10, 0, 1, 0], [10, 0, 1, 255]),
            ts([10, 0, 0, 10], [10, 0, 0, 20]),
        ];
        let mut forward = SelectorIndex::default();
        for r in &ranges {
            forward.add(r, &id("a"));
        }
        let mut backward = SelectorIndex::default();
        for r in ranges.iter().rev() {
            backward.add(r, &id("a"));
        }
        assert_eq!(forward, backward);
        // Add and remove a range: back to the same representation.
        let extra = ts([10, 0, 0, 5], [10, 0, 1, 5]);
        let before = forward.clone();
        forward.add(&extra, &id("a"));
        forward.remove(&extra);
        assert_eq!(forward, before);
    }

    #[test]
    fn bad_selectors_have_no_range() {
        let mut bad = TrafficSelector {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
            end_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        };
        assert!(AddrRange::of(&bad).is_none());
        bad.end_addr = "::1".parse().unwrap();
        assert!(AddrRange::of(&bad).is_none());
    }
}
