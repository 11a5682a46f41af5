//! The probe data plane: a real [`SaDriver`] backend for tests and the chaos runner.
//!
//! For each running child it consumes outbound sequence numbers at a configured packet rate —
//! within the committed lease, never above it, and only while the fence gate is open — and
//! reports every range it used to a collector over UDP, so a separate process can check the
//! numbers of every node. It also plays the peer's side of inbound traffic (the peer's counter
//! keeps rising whoever owns the SA), which gives the runtime replay checkpoints to commit.
//!
//! Report datagram (all integers big-endian):
//!
//! ```text
//!  "EVPCPRB2" | node u64 | run u64 | sent_ms u64 (wall clock) | count u16 | count × record
//!  record = in_spi u32 | epoch u64 | first u64 | last u64        (28 bytes)
//! ```

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evpc_raft_store::NodeId;

use crate::{ChildCounters, ChildStart, DriverError, FenceGate, SaDriver};

/// Magic at the start of every report.
pub const MAGIC: &[u8; 8] = b"EVPCPRB2";
const HEADER: usize = 8 + 8 + 8 + 8 + 2;
const RECORD: usize = 4 + 8 + 8 + 8;
/// Records per datagram (keeps reports under 1200 bytes).
pub const RECORDS_PER_DATAGRAM: usize = 42;
/// How often the probe advances its children.
const TICK: Duration = Duration::from_millis(5);

/// The wall clock in milliseconds since the Unix epoch (the node's clock, as reports carry it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One used range of one child, as reported.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct UsedRange {
    /// The child's inbound SPI (its cluster-wide identity).
    pub in_spi: u32,
    /// The epoch it was used in.
    pub epoch: u64,
    /// First sequence number used.
    pub first: u64,
    /// Last sequence number used.
    pub last: u64,
}

/// A decoded report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The sending node.
    pub node: NodeId,
    /// The run it belongs to (`dataplane.probe.run`): a collector ignores reports of nodes of
    /// another run that happen to reach its port.
    pub run: u64,
    /// Its wall clock when it sent the report (ms).
    pub sent_ms: u64,
    /// The ranges.
    pub ranges: Vec<UsedRange>,
}

/// Encodes one report.
pub fn encode(node: NodeId, run: u64, sent_ms: u64, ranges: &[UsedRange]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + RECORD * ranges.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&node.to_be_bytes());
    out.extend_from_slice(&run.to_be_bytes());
    out.extend_from_slice(&sent_ms.to_be_bytes());
    out.extend_from_slice(&(ranges.len() as u16).to_be_bytes());
    for r in ranges {
        out.extend_from_slice(&r.in_spi.to_be_bytes());
        out.extend_from_slice(&r.epoch.to_be_bytes());
        out.extend_from_slice(&r.first.to_be_bytes());
        out.extend_from_slice(&r.last.to_be_bytes());
    }
    out
}

/// Decodes a report from untrusted bytes; `None` if it is not one.
pub fn decode(bytes: &[u8]) -> Option<Report> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let u64_at = |b: &[u8], i: usize| {
        b.get(i..i + 8)
            .map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
    };
    let node = u64_at(rest, 0)?;
    let run = u64_at(rest, 8)?;
    let sent_ms = u64_at(rest, 16)?;
    let count = usize::from(u16::from_be_bytes(rest.get(24..26)?.try_into().ok()?));
    let body = rest.get(26..)?;
    if body.len() != count * RECORD {
        return None;
    }
    let ranges = body
        .chunks_exact(RECORD)
        .map(|r| {
            Some(UsedRange {
                in_spi: u32::from_be_bytes(r[..4].try_into().ok()?),
                epoch: u64_at(r, 4)?,
                first: u64_at(r, 12)?,
                last: u64_at(r, 20)?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    if ranges.iter().any(|r| r.first > r.last) {
        return None;
    }
    Some(Report {
        node,
        run,
        sent_ms,
        ranges,
    })
}

#[derive(Debug)]
struct ProbeChild {
    epoch: u64,
    next: u64,
    limit: u64,
    peer_seq: u64,
    /// The traffic follows one schedule on every node (packet `k` is due at wall-clock
    /// `k / pps`), as real traffic does not care who owns the SA: an owner sends the packets
    /// due from when it starts. This is the next one.
    next_packet: u64,
    counters: ChildCounters,
}

/// One child's traffic: a steady rate, with bursts.
///
/// Every child follows the same schedule on every node (packet `k` is due at a wall-clock time
/// that depends only on `k` and the child), as real traffic does not care who owns the SA.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Traffic {
    /// Packets per second outside bursts.
    pub pps: u64,
    /// During a burst, the rate is this many times `pps` (1: no bursts).
    pub burst_factor: u64,
}

/// Bursts last this long...
const BURST_MS: u64 = 200;
/// ...once in this many milliseconds, at an offset of the child's own.
const BURST_PERIOD_MS: u64 = 4_000;

impl Traffic {
    /// Milliseconds of burst before wall-clock `now_ms` for the child `in_spi`.
    fn burst_ms_before(in_spi: u32, now_ms: u64) -> u64 {
        let offset = u64::from(in_spi).wrapping_mul(997) % BURST_PERIOD_MS;
        let Some(t) = now_ms.checked_sub(offset) else {
            return 0;
        };
        (t / BURST_PERIOD_MS) * BURST_MS + (t % BURST_PERIOD_MS).min(BURST_MS)
    }

    /// Index of the last packet of child `in_spi` due by wall-clock `now_ms`.
    fn packets_due(&self, in_spi: u32, now_ms: u64) -> u64 {
        let steady = u128::from(now_ms) * u128::from(self.pps);
        let extra = if self.burst_factor > 1 {
            u128::from(Self::burst_ms_before(in_spi, now_ms))
                * u128::from(self.pps)
                * u128::from(self.burst_factor - 1)
        } else {
            0
        };
        ((steady + extra) / 1000) as u64
    }
}

#[derive(Debug, Default)]
struct Children {
    by_spi: BTreeMap<u32, ProbeChild>,
}

/// The probe backend.
#[derive(Debug, Clone)]
pub struct ProbeDriver {
    children: Arc<Mutex<Children>>,
    traffic: Traffic,
}

impl ProbeDriver {
    /// Starts the probe: its task advances children every few milliseconds and reports to
    /// `collector`, until the driver and its clones are dropped.
    pub fn start(
        node: NodeId,
        run: u64,
        collector: SocketAddr,
        traffic: Traffic,
        gate: Arc<FenceGate>,
    ) -> std::io::Result<ProbeDriver> {
        let socket = UdpSocket::bind(if collector.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        socket.connect(collector)?;
        let children: Arc<Mutex<Children>> = Arc::default();
        let weak = Arc::downgrade(&children);
        std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(RECORDS_PER_DATAGRAM);
                while let Some(children) = weak.upgrade() {
                    std::thread::sleep(TICK);
                    let sent_ms = now_ms();
                    let mut guard = children.lock().unwrap_or_else(|e| e.into_inner());
                    // Checked before anything is used: a node resuming from a pause finds the
                    // gate closed and sends nothing until it hears the cluster again. Packets
                    // due while fenced are lost, as they would be.
                    if !gate.is_open() {
                        for (spi, child) in guard.by_spi.iter_mut() {
                            let due = traffic.packets_due(*spi, sent_ms);
                            child.next_packet = child.next_packet.max(due);
                        }
                        continue;
                    }
                    for (spi, child) in guard.by_spi.iter_mut() {
                        let due = traffic.packets_due(*spi, sent_ms);
                        let wanted = due.saturating_sub(child.next_packet);
                        child.next_packet = child.next_packet.max(due);
                        let room = (child.limit + 1).saturating_sub(child.next);
                        let sent = wanted.min(room);
                        child.counters.lease_waits += wanted - sent;
                        // The peer sends at the same rate, whoever owns the SA.
                        child.peer_seq += wanted;
                        child.counters.in_packets += wanted;
                        child.counters.highest_in = child.peer_seq;
                        if sent == 0 {
                            continue;
                        }
                        batch.push(UsedRange {
                            in_spi: *spi,
                            epoch: child.epoch,
                            first: child.next,
                            last: child.next + sent - 1,
                        });
                        child.next += sent;
                        child.counters.highest_out = child.next - 1;
                        child.counters.out_packets += sent;
                        if batch.len() == RECORDS_PER_DATAGRAM {
                            let _ = socket.send(&encode(node, run, sent_ms, &batch));
                            batch.clear();
                        }
                    }
                    drop(guard);
                    if !batch.is_empty() {
                        let _ = socket.send(&encode(node, run, sent_ms, &batch));
                        batch.clear();
                    }
                }
            })?;
        Ok(ProbeDriver { children, traffic })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Children> {
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SaDriver for ProbeDriver {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn start(&self, child: ChildStart) -> Result<(), DriverError> {
        // `child.udp_encap` does not matter: the probe sends synthetic packets of its own
        let mut children = self.lock();
        if children.by_spi.contains_key(&child.in_spi) {
            return Err(DriverError::AlreadyRunning(child.in_spi));
        }
        children.by_spi.insert(
            child.in_spi,
            ProbeChild {
                epoch: child.epoch.0,
                next: child.next_seq.max(1),
                limit: child.limit,
                peer_seq: child.replay_floor,
                next_packet: self.traffic.packets_due(child.in_spi, now_ms()),
                counters: ChildCounters {
                    highest_out: child.next_seq.saturating_sub(1),
                    highest_in: child.replay_floor,
                    ..ChildCounters::default()
                },
            },
        );
        Ok(())
    }

    fn extend(&self, in_spi: u32, limit: u64) {
        if let Some(child) = self.lock().by_spi.get_mut(&in_spi) {
            child.limit = child.limit.max(limit);
        }
    }

    fn stop(&self, in_spi: u32) -> Option<ChildCounters> {
        self.lock().by_spi.remove(&in_spi).map(|c| c.counters)
    }

    fn counters(&self, in_spi: u32) -> Option<ChildCounters> {
        self.lock().by_spi.get(&in_spi).map(|c| c.counters)
    }

    fn set_fenced(&self, _fenced: bool) {
        // The probe checks the gate itself before every tick.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_garbage_is_refused() {
        let ranges = [
            UsedRange {
                in_spi: 7,
                epoch: 2,
                first: 10,
                last: 19,
            },
            UsedRange {
                in_spi: 8,
                epoch: 1,
                first: 1,
                last: 1,
            },
        ];
        let bytes = encode(3, 5, 99, &ranges);
        assert_eq!(
            decode(&bytes),
            Some(Report {
                node: 3,
                run: 5,
                sent_ms: 99,
                ranges: ranges.to_vec()
            })
        );
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut backwards = bytes.clone();
        backwards[HEADER + 12..HEADER + 20].copy_from_slice(&100u64.to_be_bytes());
        assert_eq!(decode(&backwards), None);
    }

    #[test]
    fn bursts_follow_one_schedule_per_child() {
        let steady = Traffic {
            pps: 100,
            burst_factor: 1,
        };
        let bursty = Traffic {
            pps: 100,
            burst_factor: 21,
        };
        // Over one whole period a bursty child sends its 200 ms at 21 times the rate.
        let start = 1_000_000 * BURST_PERIOD_MS;
        let end = start + BURST_PERIOD_MS;
        assert_eq!(
            steady.packets_due(7, end) - steady.packets_due(7, start),
            400
        );
        assert_eq!(
            bursty.packets_due(7, end) - bursty.packets_due(7, start),
            400 + 20 * 20
        );
        // Never backwards, and children burst at different times.
        let mut last = 0;
        for t in (start..end).step_by(5) {
            let due = bursty.packets_due(7, t);
            assert!(due >= last);
            last = due;
        }
        assert_ne!(
            Traffic::burst_ms_before(7, start + 100),
            Traffic::burst_ms_before(8, start + 100)
        );
    }

    #[test]
    fn the_probe_never_uses_numbers_above_its_lease_or_while_fenced() {
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        collector
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let gate = Arc::new(FenceGate::new());
        let traffic = Traffic {
            pps: 2_000,
            burst_factor: 1,
        };
        let probe =
            ProbeDriver::start(1, 0, collector.local_addr().unwrap(), traffic, gate.clone())
                .unwrap();
        let start = |spi, next, limit| ChildStart {
            ike: evpc_raft_store::SaId(1),
            epoch: evpc_raft_store::Epoch(3),
            in_spi: spi,
            out_spi: spi + 1,
            suite: evpc_raft_store::ChildSuite {
                encryption: 20,
                key_bits: 128,
                esn: true,
            },
            keys: None,
            ts_local: vec![],
            ts_remote: vec![],
            local: "127.0.0.1:4500".parse().unwrap(),
            peer: "127.0.0.1:4500".parse().unwrap(),
            udp_encap: true,
            next_seq: next,
            limit,
            replay_floor: 0,
        };
        probe.start(start(100, 51, 80)).unwrap();
        assert!(probe.start(start(100, 1, 2)).is_err());
        // Closed gate: nothing moves.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(probe.counters(100).unwrap().out_packets, 0);
        gate.renew_until(u64::MAX);
        std::thread::sleep(Duration::from_millis(100));
        let c = probe.counters(100).unwrap();
        assert_eq!(c.highest_out, 80, "uses its whole lease and stops: {c:?}");
        assert!(c.lease_waits > 0);
        let mut used = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = collector.recv(&mut buf) {
            used.extend(decode(&buf[..n]).unwrap().ranges);
            if used.last().is_some_and(|r| r.last == 80) {
                break;
            }
        }
        assert_eq!(used.first().unwrap().first, 51);
        assert!(used.windows(2).all(|w| w[1].first == w[0].last + 1));
        probe.extend(100, 90);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(probe.counters(100).unwrap().highest_out, 90);
        assert_eq!(probe.stop(100).unwrap().highest_out, 90);
        assert!(probe.counters(100).is_none());
    }
}
