//! The userspace backend's worker threads: one per direction, plus one for UDP 500.
//!
//! Each worker blocks in its system call (with a short timeout, to notice shutdown), takes a
//! batch, and only then locks its batch mutex, checks the fence, takes one table snapshot and
//! processes the whole batch:
//!
//! ```text
//!  inbound:  recvmmsg ─► lock ─► fence? ─► snapshot ─► per datagram (GRO segment):
//!            classify → SPI → open → TUN write ─► unlock ─► metrics
//!  outbound: TUN reads ─► lock ─► fence? ─► snapshot ─► per packet: flow → child → seal
//!            ─► sendmmsg (runs of equal sizes per peer as UDP GSO) ─► unlock ─► metrics
//!  ike:      recv_from(500) ─► channel
//! ```
//!
//! A child's SA mutex is taken once per run of consecutive packets of that child in a batch.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use evpc_esp::{Datagram, InboundSa, MAX_SEAL_TAILROOM, NextHeader, SEAL_HEADROOM, classify_mut};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Shared;
use super::child::{OpenedPacket, Outbound, Sealed, Table, ip_total_len};
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
        let mut run = InboundRun {
            shared,
            open: shared.is_open(),
            table: &table,
            tally: &mut tally,
            tun_errors: &mut tun_errors,
        };
        let mut current: Option<(u32, MutexGuard<'_, InboundSa>)> = None;
        for index in 0..count {
            if receiver.truncated[index] {
                run.tally.malformed += 1;
                continue;
            }
            let from = receiver.from[index];
            // one datagram, or several coalesced by UDP GRO
            for datagram in receiver.segments(index, buffers.get_mut(index)) {
                run.datagram(datagram, from, &mut current);
            }
        }
        drop(current);
        drop(batch);
        tally.flush_inbound(&metrics);
    }
}

/// One inbound batch: the snapshot and tallies its datagrams share.
struct InboundRun<'a> {
    shared: &'a Shared,
    open: bool,
    table: &'a Table,
    tally: &'a mut Tally,
    tun_errors: &'a mut ErrorLog,
}

impl<'a> InboundRun<'a> {
    /// Classifies one UDP/4500 payload and acts on it. `current` keeps the last child's SA
    /// locked across consecutive datagrams of that child.
    fn datagram(
        &mut self,
        datagram: &mut [u8],
        from: Option<std::net::SocketAddr>,
        current: &mut Option<(u32, MutexGuard<'a, InboundSa>)>,
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
                    OpenedPacket::Deliver(packet) => match (&shared.tun).write(packet) {
                        Ok(_) => {
                            self.tally.packets += 1;
                            self.tally.bytes += packet.len() as u64;
                        }
                        Err(error) => {
                            self.tun_errors.report(&error);
                            self.tally.io_errors += 1;
                        }
                    },
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

/// TUN → peer.
pub(super) fn outbound(shared: &Shared) {
    let metrics = OutboundMetrics::new("userspace");
    let mut tally = Tally::default();
    let mut buffers = Buffers::new(OUTBOUND_BUFFER);
    let mut lens = [0usize; BATCH];
    let mut outgoing: Vec<Outgoing> = Vec::with_capacity(BATCH);
    let mut tun_errors = ErrorLog::new("reading from TUN");
    let mut send_errors = ErrorLog::new("sending on the cluster socket");
    // UDP GSO until the kernel or the route refuses it
    let mut gso = shared.offload;
    while !shared.shutdown.load(Ordering::Acquire) {
        let mut count = 0;
        while count < BATCH {
            let buffer = buffers.get_mut(count);
            let room = buffer.len() - MAX_SEAL_TAILROOM;
            match (&shared.tun).read(&mut buffer[SEAL_HEADROOM..room]) {
                Ok(0) => break,
                Ok(len) => {
                    lens[count] = len;
                    count += 1;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tun_errors.report(&error);
                    tally.io_errors += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
        if count == 0 {
            wait_readable(shared);
            continue;
        }
        let batch = shared
            .outbound_batch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !shared.is_open() {
            tally.fenced_drops += count as u64;
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
