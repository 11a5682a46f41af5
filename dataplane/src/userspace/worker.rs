//! The userspace backend's worker threads: one per direction, plus one for UDP 500.
//!
//! Each worker blocks in its system call (with a short timeout, to notice shutdown), takes a
//! batch, and only then locks its batch mutex, checks the fence, takes one table snapshot and
//! processes the whole batch:
//!
//! ```text
//!  inbound:  recvmmsg ─► lock ─► fence? ─► snapshot ─► per datagram (GRO segment):
//!            classify → SPI → open (in place) → note where the inner packet is
//!            ─► coalesce: consecutive TCP segments of one flow → one GSO packet
//!            ─► TUN writes (vnet header + packet, or header + head + payloads: writev)
//!            ─► unlock ─► metrics
//!  outbound: TUN reads: vnet header + packet ─► TCP super-packet? cut into segments, one per
//!            buffer with SEAL_HEADROOM in front (a partial checksum? completed)
//!            ─► lock ─► fence? ─► snapshot ─► per packet (segment): flow → child → seal
//!            ─► sendmmsg (runs of equal sizes per peer as UDP GSO) ─► unlock ─► metrics
//!  ike:      recv_from(500) ─► channel
//! ```
//!
//! Without TUN offloads ([`super::UserspaceConfig::offload`] off, or refused by the kernel)
//! there is no header: one read per packet, and each opened packet is written at once.
//!
//! A segment of a super-packet is an inner packet like any other: it gets its own sequence
//! number, lease check, hold (standby) and fence check. A super-packet longer than what is left
//! of the batch is finished in the next batch. A child's SA mutex is taken once per run of
//! consecutive packets of that child in a batch.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use evpc_esp::{Datagram, InboundSa, MAX_SEAL_TAILROOM, NextHeader, SEAL_HEADROOM, classify_mut};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Shared;
use super::child::{OpenedPacket, Outbound, Sealed, Table, ip_total_len};
use super::offload::{self, MAX_MERGED_SEGMENTS, Merge, Run, Segmenter, VNET_HDR_LEN, VnetHeader};
use super::tun::Tun;
use super::udp::{self, BATCH, Buffers, Outgoing, Receiver, WAKE_INTERVAL};
use crate::ike::{IkeDatagram, IkePort};
use crate::metrics::{InboundMetrics, OutboundMetrics, Tally};
use crate::selector::Flow;

/// Largest IP packet (IPv4 total length / IPv6 jumbograms aside).
const MAX_IP_PACKET: usize = 65_535;
/// An inbound buffer holds any UDP payload.
const INBOUND_BUFFER: usize = MAX_IP_PACKET;
/// An outbound buffer holds the largest inner packet with room to seal it in place.
const OUTBOUND_BUFFER: usize = SEAL_HEADROOM + MAX_IP_PACKET + MAX_SEAL_TAILROOM;
/// The most inner packets one inbound batch sets aside for coalescing: a UDP GRO buffer holds
/// at most 64 datagrams (Linux `UDP_GRO_CNT_MAX`). Beyond, a packet is written at once (ahead
/// of those set aside: cannot happen with the kernel's limits, and would only reorder).
const MAX_DELIVERIES: usize = BATCH * 64;

// The virtio-net header is read into the ESP headroom, right in front of the packet.
const _: () = assert!(SEAL_HEADROOM >= VNET_HDR_LEN);

/// Logs a recurring I/O error at most once a second.
struct ErrorLog {
    last: Option<Instant>,
    what: &'static str,
}

impl ErrorLog {
    fn new(what: &'static str) -> ErrorLog {
        ErrorLog { last: None, what }
    }

    fn report(&mut self, error: &io::Error) {
        if self
            .last
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.last = Some(Instant::now());
            tracing::warn!(error = %error, "{}", self.what);
        }
    }
}

/// Peer → TUN.
pub(super) fn inbound(shared: &Shared) {
    let metrics = InboundMetrics::new("userspace");
    let mut tally = Tally::default();
    let mut receiver = Receiver::new();
    let mut buffers = Buffers::new(INBOUND_BUFFER);
    let mut recv_errors = ErrorLog::new("receiving on the cluster socket");
    let mut tun_errors = ErrorLog::new("writing to TUN");
    let coalesce = shared.tun.offload();
    let capacity = if coalesce { MAX_DELIVERIES } else { 0 };
    let mut deliveries: Vec<Delivery> = Vec::with_capacity(capacity);
    let mut runs: Vec<Run> = Vec::with_capacity(capacity);
    while !shared.shutdown.load(Ordering::Acquire) {
        let count = match receiver.recv(&shared.natt, &mut buffers) {
            Ok(0) => continue,
            Ok(count) => count,
            Err(error) => {
                recv_errors.report(&error);
                tally.io_errors += 1;
                tally.flush_inbound(&metrics);
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let batch = shared
            .inbound_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let table = shared.snapshot();
        deliveries.clear();
        let mut run = InboundRun {
            shared,
            open: shared.is_open(),
            table: &table,
            tally: &mut tally,
            tun_errors: &mut tun_errors,
            coalesce,
            deliveries: &mut deliveries,
        };
        let mut current: Option<(u32, MutexGuard<'_, InboundSa>)> = None;
        for index in 0..count {
            if receiver.truncated[index] {
                run.tally.malformed += 1;
                continue;
            }
            let from = receiver.from[index];
            let base = buffers.get(index).as_ptr().addr();
            // one datagram, or several coalesced by UDP GRO
            for datagram in receiver.segments(index, buffers.get_mut(index)) {
                run.datagram(datagram, from, &mut current, (index, base));
            }
        }
        drop(current);
        if coalesce {
            let mut writer = TunWriter {
                tun: &shared.tun,
                tally: &mut tally,
                errors: &mut tun_errors,
                counters: OffloadTally::default(),
            };
            writer.deliver(&mut buffers, &deliveries, &mut runs);
            writer.counters.add_to(shared);
        }
        drop(batch);
        tally.flush_inbound(&metrics);
    }
}

/// Where an opened inner packet waits for its write: `buffers.get(buffer)[start..][..len]`.
#[derive(Clone, Copy, Debug)]
struct Delivery {
    buffer: usize,
    start: usize,
    len: usize,
}

impl Delivery {
    fn bytes<'b>(&self, buffers: &'b Buffers) -> &'b [u8] {
        buffers
            .get(self.buffer)
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

/// One inbound batch: the snapshot and tallies its datagrams share.
struct InboundRun<'a> {
    shared: &'a Shared,
    open: bool,
    table: &'a Table,
    tally: &'a mut Tally,
    tun_errors: &'a mut ErrorLog,
    /// Set the opened packets aside in `deliveries`, to coalesce and write after the batch.
    coalesce: bool,
    deliveries: &'a mut Vec<Delivery>,
}

impl<'a> InboundRun<'a> {
    /// Classifies one UDP/4500 payload and acts on it. `current` keeps the last child's SA
    /// locked across consecutive datagrams of that child. `(index, base)`: the buffer the
    /// datagram is in, and that buffer's address.
    fn datagram(
        &mut self,
        datagram: &mut [u8],
        from: Option<std::net::SocketAddr>,
        current: &mut Option<(u32, MutexGuard<'a, InboundSa>)>,
        (index, base): (usize, usize),
    ) {
        let shared = self.shared;
        let table: &'a Table = self.table;
        match classify_mut(datagram) {
            Ok(Datagram::Esp(esp)) => {
                if !self.open {
                    self.tally.fenced_drops += 1;
                    return;
                }
                let spi = u32::from_be_bytes([esp[0], esp[1], esp[2], esp[3]]);
                let Some(child) = table.get(spi) else {
                    self.tally.unknown_spi += 1;
                    return;
                };
                // A planned handover's new owner holds what arrives until it takes over.
                if child.hold_from_peer(esp) {
                    return;
                }
                if current.as_ref().map(|(i, _)| *i) != Some(spi) {
                    drop(current.take());
                    let guard = child.inbound.lock().unwrap_or_else(PoisonError::into_inner);
                    *current = Some((spi, guard));
                }
                let Some((_, sa)) = current.as_mut() else {
                    return;
                };
                match child.open(sa, esp) {
                    OpenedPacket::Deliver(packet) => {
                        // opened in place: the packet stays in its buffer until the next batch
                        let start = packet.as_ptr().addr().wrapping_sub(base);
                        if self.coalesce
                            && self.deliveries.len() < MAX_DELIVERIES
                            && start
                                .checked_add(packet.len())
                                .is_some_and(|end| end <= INBOUND_BUFFER)
                        {
                            self.deliveries.push(Delivery {
                                buffer: index,
                                start,
                                len: packet.len(),
                            });
                            return;
                        }
                        write_packet(&shared.tun, packet, self.tally, self.tun_errors);
                    }
                    OpenedPacket::Dummy => {}
                    OpenedPacket::Replay => self.tally.replay_drops += 1,
                    OpenedPacket::AuthFailed => self.tally.auth_failures += 1,
                    OpenedPacket::OutsideSelectors => self.tally.policy_drops += 1,
                    OpenedPacket::Malformed => self.tally.malformed += 1,
                }
            }
            Ok(Datagram::Ike(message)) => {
                let Some(remote) = from else {
                    self.tally.malformed += 1;
                    return;
                };
                self.tally.ike += 1;
                let datagram = IkeDatagram {
                    port: IkePort::NatT,
                    local: shared.natt_local,
                    remote,
                    message: message.to_vec(),
                };
                if shared.ike_tx.try_send(datagram).is_err() {
                    self.tally.ike_dropped += 1;
                }
            }
            Ok(Datagram::NatKeepalive) => self.tally.keepalives += 1,
            Err(_) => self.tally.malformed += 1,
        }
    }
}

/// Writes one opened inner packet to the TUN device on its own, and counts it (or the error).
fn write_packet(tun: &Tun, packet: &[u8], tally: &mut Tally, errors: &mut ErrorLog) {
    match tun.write_packet(packet) {
        Ok(_) => {
            tally.packets += 1;
            tally.bytes += packet.len() as u64;
        }
        Err(error) => {
            errors.report(&error);
            tally.io_errors += 1;
        }
    }
}

/// Offload activity of one batch, added to the driver's counters once per batch.
#[derive(Debug, Default)]
struct OffloadTally {
    super_packets: u64,
    segments: u64,
    coalesced_writes: u64,
    coalesced_segments: u64,
}

impl OffloadTally {
    fn add_to(&mut self, shared: &Shared) {
        let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        };
        let c = &shared.offload_counters;
        add(&c.super_packets, self.super_packets);
        add(&c.segments, self.segments);
        add(&c.coalesced_writes, self.coalesced_writes);
        add(&c.coalesced_segments, self.coalesced_segments);
        *self = OffloadTally::default();
    }
}

/// Writes an inbound batch's opened packets to the TUN device, coalescing runs of TCP segments.
struct TunWriter<'a> {
    tun: &'a Tun,
    tally: &'a mut Tally,
    errors: &'a mut ErrorLog,
    counters: OffloadTally,
}

impl TunWriter<'_> {
    /// Plans the runs of `deliveries` and writes each: merged, or packet by packet.
    fn deliver(&mut self, buffers: &mut Buffers, deliveries: &[Delivery], runs: &mut Vec<Run>) {
        runs.clear();
        let view: &Buffers = buffers;
        offload::plan(deliveries.len(), |i| deliveries[i].bytes(view), runs);
        for run in runs.iter() {
            let Some(packets) = deliveries.get(run.start..run.end) else {
                continue;
            };
            let written = match run.merge {
                Some(merge) if merge.segments() > 1 => self.write_merged(buffers, packets, &merge),
                _ => false,
            };
            if !written {
                for delivery in packets {
                    self.write_one(delivery.bytes(buffers));
                }
            }
        }
    }

    fn write_one(&mut self, packet: &[u8]) {
        write_packet(self.tun, packet, self.tally, self.errors);
    }

    /// Writes `packets` as one GSO packet. `false` if the kernel refused it as invalid: the
    /// first packet is then as it was, for the caller to write them one by one.
    fn write_merged(&mut self, buffers: &mut Buffers, packets: &[Delivery], merge: &Merge) -> bool {
        let Some(&head) = packets.first() else {
            return false;
        };
        let header_len = merge.header_len();
        let mut saved = [0u8; 120];
        let Some(saved) = saved.get_mut(..header_len) else {
            return false;
        };
        let Some(head_bytes) = buffers
            .get_mut(head.buffer)
            .get_mut(head.start..head.start + head.len)
        else {
            return false;
        };
        saved.copy_from_slice(&head_bytes[..header_len]);
        let vnet = merge.finish(head_bytes).to_bytes();
        let mut pieces = [IoSlice::new(&[]); MAX_MERGED_SEGMENTS + 2];
        pieces[0] = IoSlice::new(&vnet);
        pieces[1] = IoSlice::new(head.bytes(buffers));
        let mut bytes = head.len as u64;
        for (piece, delivery) in pieces[2..].iter_mut().zip(&packets[1..]) {
            *piece = IoSlice::new(
                delivery
                    .bytes(buffers)
                    .get(header_len..)
                    .unwrap_or_default(),
            );
            bytes += delivery.len as u64;
        }
        match self.tun.write_vectored(&pieces[..packets.len() + 1]) {
            Ok(_) => {
                self.tally.packets += packets.len() as u64;
                self.tally.bytes += bytes;
                self.counters.coalesced_writes += 1;
                self.counters.coalesced_segments += packets.len() as u64;
                true
            }
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.errors.report(&io::Error::new(
                    error.kind(),
                    format!("a coalesced TCP packet was refused ({error}); writing its segments one by one"),
                ));
                let head_bytes =
                    &mut buffers.get_mut(head.buffer)[head.start..head.start + head.len];
                head_bytes[..header_len].copy_from_slice(saved);
                false
            }
            Err(error) => {
                self.errors.report(&error);
                self.tally.io_errors += packets.len() as u64;
                true
            }
        }
    }
}

/// Reads the TUN device into a batch of outbound buffers, cutting TCP super-packets into
/// segments.
struct TunReader {
    offload: bool,
    /// The super-packet being cut (`scratch[..super_len]`) and where the cutting is.
    scratch: Vec<u8>,
    super_len: usize,
    pending: Option<Segmenter>,
    counters: OffloadTally,
}

impl TunReader {
    fn new(offload: bool) -> TunReader {
        TunReader {
            offload,
            scratch: vec![0; if offload { MAX_IP_PACKET } else { 0 }],
            super_len: 0,
            pending: None,
            counters: OffloadTally::default(),
        }
    }

    /// Drops what is left of a super-packet (the fence closed); returns how many segments.
    fn discard(&mut self) -> usize {
        self.pending.take().map_or(0, |s| s.remaining())
    }

    /// Fills `buffers` (the packet at `SEAL_HEADROOM`, its length in `lens`) with the rest of
    /// the current super-packet, then with what the device has, up to [`BATCH`] packets.
    fn fill(
        &mut self,
        tun: &Tun,
        buffers: &mut Buffers,
        lens: &mut [usize; BATCH],
        tally: &mut Tally,
        errors: &mut ErrorLog,
    ) -> usize {
        let mut count = 0;
        while count < BATCH {
            let buffer = buffers.get_mut(count);
            let room = buffer.len() - MAX_SEAL_TAILROOM;
            if let Some(segmenter) = self.pending.as_mut() {
                let packet = self.scratch.get(..self.super_len).unwrap_or_default();
                match segmenter.next_into(packet, &mut buffer[SEAL_HEADROOM..room]) {
                    Some(len) => {
                        lens[count] = len;
                        count += 1;
                        self.counters.segments += 1;
                        continue;
                    }
                    None => self.pending = None,
                }
            }
            let start = if self.offload {
                SEAL_HEADROOM - VNET_HDR_LEN
            } else {
                SEAL_HEADROOM
            };
            match tun.read(&mut buffer[start..room]) {
                Ok(0) => break,
                Ok(len) if !self.offload => {
                    lens[count] = len;
                    count += 1;
                }
                Ok(read) => {
                    let Some(header) = VnetHeader::parse(&buffer[start..start + read]) else {
                        tally.malformed += 1;
                        continue;
                    };
                    let len = read - VNET_HDR_LEN;
                    let packet = &mut buffer[SEAL_HEADROOM..SEAL_HEADROOM + len];
                    if header.is_gso() {
                        let Some(scratch) = self.scratch.get_mut(..len) else {
                            tally.malformed += 1;
                            continue;
                        };
                        scratch.copy_from_slice(packet);
                        match Segmenter::new(&header, scratch) {
                            Ok(segmenter) => {
                                self.pending = Some(segmenter);
                                self.super_len = len;
                                self.counters.super_packets += 1;
                            }
                            Err(_) => tally.malformed += 1,
                        }
                    } else if offload::complete_checksum(&header, packet) {
                        lens[count] = len;
                        count += 1;
                    } else {
                        tally.malformed += 1;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    errors.report(&error);
                    tally.io_errors += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        count
    }
}

/// TUN → peer.
pub(super) fn outbound(shared: &Shared) {
    let metrics = OutboundMetrics::new("userspace");
    let mut tally = Tally::default();
    let mut buffers = Buffers::new(OUTBOUND_BUFFER);
    let mut lens = [0usize; BATCH];
    let mut outgoing: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let mut reader = TunReader::new(shared.tun.offload());
    let mut tun_errors = ErrorLog::new("reading from TUN");
    let mut send_errors = ErrorLog::new("sending on the cluster socket");
    // UDP GSO until the kernel or the route refuses it
    let mut gso = shared.offload;
    while !shared.shutdown.load(Ordering::Acquire) {
        let count = reader.fill(
            &shared.tun,
            &mut buffers,
            &mut lens,
            &mut tally,
            &mut tun_errors,
        );
        reader.counters.add_to(shared);
        if count == 0 {
            wait_readable(shared);
            continue;
        }
        let batch = shared
            .outbound_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !shared.is_open() {
            tally.fenced_drops += (count + reader.discard()) as u64;
            drop(batch);
            tally.flush_outbound(&metrics);
            continue;
        }
        let table = shared.snapshot();
        outgoing.clear();
        let mut current: Option<(u32, MutexGuard<'_, Outbound>)> = None;
        for (index, &len) in lens[..count].iter().enumerate() {
            let buffer = buffers.get_mut(index);
            let inner = &buffer[SEAL_HEADROOM..SEAL_HEADROOM + len];
            let (Some(flow), Some(total)) = (Flow::parse(inner), ip_total_len(inner)) else {
                tally.malformed += 1;
                continue;
            };
            if total > len {
                // truncated read: never seal part of a packet
                tally.malformed += 1;
                continue;
            }
            let next_header = match flow.src {
                std::net::IpAddr::V4(_) => NextHeader::IPV4,
                std::net::IpAddr::V6(_) => NextHeader::IPV6,
            };
            let Some(child) = table.route(&flow) else {
                tally.no_child += 1;
                continue;
            };
            if child.hold_to_peer(&buffer[SEAL_HEADROOM..SEAL_HEADROOM + len], next_header) {
                continue;
            }
            let child_index = child.in_spi;
            if current.as_ref().map(|(i, _)| *i) != Some(child_index) {
                drop(current.take());
                let guard = child
                    .outbound
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                current = Some((child_index, guard));
            }
            let Some((_, sa)) = current.as_mut() else {
                continue;
            };
            match child.seal(sa, buffer, len, next_header) {
                Sealed::Packet(sealed) => {
                    tally.bytes += len as u64;
                    outgoing.push(Outgoing {
                        buffer: index,
                        len: sealed,
                        to: child.peer_sockaddr,
                    });
                }
                Sealed::LeaseExhausted => tally.lease_waits += 1,
                Sealed::Unsealable => tally.malformed += 1,
            }
        }
        drop(current);
        let (sent, failed) = udp::send_batch_gso(&shared.natt, &buffers, &outgoing, &mut gso);
        drop(batch);
        if failed > 0 {
            send_errors.report(&io::Error::other(format!(
                "{failed} of {} datagrams not sent",
                outgoing.len()
            )));
        }
        tally.packets += sent as u64;
        tally.io_errors += failed as u64;
        tally.flush_outbound(&metrics);
    }
}

/// Waits until TUN is readable, or the wake interval passes.
fn wait_readable(shared: &Shared) {
    let mut fds = [PollFd::new(shared.tun.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(WAKE_INTERVAL).unwrap_or(PollTimeout::MAX);
    // EINTR or an error: the caller just tries again.
    let _ = poll(&mut fds, timeout);
}

/// UDP 500 → the node's IKE channel.
pub(super) fn ike(shared: &Shared) {
    if let Some((socket, _)) = &shared.ike {
        crate::ike::read_loop(
            socket,
            IkePort::Ike,
            &shared.shutdown,
            &shared.ike_tx,
            "userspace",
        );
    }
}
