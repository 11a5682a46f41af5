//! IKE datagrams between the cluster sockets and the node's IKE engine.
//!
//! A backend owns the cluster address's UDP sockets, so it also carries IKE: it hands every IKE
//! datagram it receives to the node through a bounded channel, and sends the node's IKE messages
//! from the same sockets (so the peer sees the same address and port, which NAT traversal
//! needs).
//!
//! ```text
//!   UDP 500  ──────────────── IKE header ...  ───────────────┐
//!   UDP 4500 ── 0x00000000 (non-ESP marker) | IKE header ... ─┤   (RFC 3948 §2.2)
//!                                                            ▼
//!                                IkeDatagram { port, local, remote, message (no marker) }
//!                                                            │  tokio mpsc (bounded; full → drop,
//!                                                            ▼   counted: IKE retransmits)
//!                                                       node's IKE engine
//!                                                            │
//!                      driver.send_ike(port, remote, message) ◄┘  (marker added on 4500)
//! ```
//!
//! The fence gate does not apply to IKE: the node's IKE engine commits before it responds, so a
//! node cut off from the cluster cannot answer anything new anyway, and retransmitted
//! responses are the committed bytes. ESP is what the gate stops.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use evpc_esp::udp_encap::NON_ESP_MARKER;
use evpc_esp::{Datagram, classify};

use crate::metrics::InboundMetrics;

/// Which of the two IKE ports a datagram came in on or goes out from.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum IkePort {
    /// UDP 500: plain IKE (RFC 7296 §2).
    Ike,
    /// UDP 4500, shared with ESP-in-UDP: IKE behind the non-ESP marker (RFC 3948 §2.2,
    /// RFC 7296 §2.23).
    NatT,
}

/// One IKE message received on the cluster address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IkeDatagram {
    /// The port it arrived on; answer on the same one.
    pub port: IkePort,
    /// The local (cluster) address and port it was sent to.
    pub local: SocketAddr,
    /// The sender's address and port (after NAT).
    pub remote: SocketAddr,
    /// The IKE message, starting at the IKE header (the non-ESP marker already removed).
    pub message: Vec<u8>,
}

/// Where the node receives IKE datagrams.
pub type IkeReceiver = tokio::sync::mpsc::Receiver<IkeDatagram>;

/// The sending half kept by a backend's receive workers.
pub(crate) type IkeSender = tokio::sync::mpsc::Sender<IkeDatagram>;

/// Sends IKE messages from the cluster address: the backends that own the cluster sockets
/// implement it, so the node's IKE engine answers from the address and port the peer used.
pub trait IkeSocket: Send + Sync + 'static {
    /// Sends `message` to `remote` on `port` (behind the non-ESP marker on the NAT-T port).
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> std::io::Result<()>;
}

impl IkeSocket for crate::userspace::UserspaceDriver {
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> std::io::Result<()> {
        crate::userspace::UserspaceDriver::send_ike(self, port, remote, message)
    }
}

impl IkeSocket for crate::xfrm::XfrmDriver {
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> std::io::Result<()> {
        crate::xfrm::XfrmDriver::send_ike(self, port, remote, message)
    }
}

/// Default depth of the IKE queue: enough for a burst of IKE_SA_INITs while the engine is
/// busy; beyond it datagrams are dropped (and the peers retransmit).
pub const DEFAULT_IKE_QUEUE: usize = 4096;

/// The bytes to put in a UDP datagram carrying `message` on `port`: on the NAT-T port the
/// message goes behind the four-byte non-ESP marker (RFC 3948 §2.2).
pub fn frame(port: IkePort, message: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(message.len() + NON_ESP_MARKER.len());
    if port == IkePort::NatT {
        datagram.extend_from_slice(&NON_ESP_MARKER);
    }
    datagram.extend_from_slice(message);
    datagram
}

/// Reads `socket` (with a read timeout) until `shutdown`, handing IKE datagrams to `tx`: all
/// of them on [`IkePort::Ike`]; on [`IkePort::NatT`] those behind the non-ESP marker (the
/// marker removed), NAT-keepalives counted, anything else counted as malformed (the kernel
/// backend's encapsulation socket only sees what the kernel did not take as ESP).
pub(crate) fn read_loop(
    socket: &UdpSocket,
    port: IkePort,
    shutdown: &AtomicBool,
    tx: &IkeSender,
    backend: &'static str,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let metrics = InboundMetrics::new(backend);
    let mut buffer = vec![0u8; 65_536];
    let mut last_error: Option<std::time::Instant> = None;
    while !shutdown.load(Ordering::Acquire) {
        let (len, remote) = match socket.recv_from(&mut buffer) {
            Ok(got) => got,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                if last_error.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    last_error = Some(std::time::Instant::now());
                    tracing::warn!(%error, %local, "receiving IKE");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let message = match port {
            IkePort::Ike => &buffer[..len],
            IkePort::NatT => match classify(&buffer[..len]) {
                Ok(Datagram::Ike(message)) => message,
                Ok(Datagram::NatKeepalive) => {
                    metrics.keepalives.increment(1);
                    continue;
                }
                Ok(Datagram::Esp(_)) => {
                    metrics.unknown_spi.increment(1);
                    continue;
                }
                Err(_) => {
                    metrics.malformed.increment(1);
                    continue;
                }
            },
        };
        metrics.ike.increment(1);
        let datagram = IkeDatagram {
            port,
            local,
            remote,
            message: message.to_vec(),
        };
        if tx.try_send(datagram).is_err() {
            metrics.ike_dropped.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_goes_only_on_the_nat_t_port() {
        assert_eq!(frame(IkePort::Ike, b"hdr"), b"hdr");
        assert_eq!(frame(IkePort::NatT, b"hdr"), b"\0\0\0\0hdr");
        // what the receiving side makes of it again
        let framed = frame(IkePort::NatT, b"IKE message");
        assert_eq!(
            evpc_esp::classify(&framed),
            Ok(evpc_esp::Datagram::Ike(&b"IKE message"[..]))
        );
    }
}
