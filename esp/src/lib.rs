//! # evpc-esp
//!
//! The IPsec ESP data path of evpc, sans-IO: RFC 4303 packets protected with
//! AES-GCM-16 (RFC 4106, 128- or 256-bit keys), optional extended sequence
//! numbers, an anti-replay window of up to 4096 packets, and the RFC 3948
//! classification of what arrives on UDP port 4500.
//!
//! The crate never opens a socket, reads a clock, spawns a task or draws a
//! random number. Keys come from IKE, sequence-number leases from the
//! cluster, and packets from the caller's buffers; sealing and opening work
//! in place and do not allocate.
//!
//! ## Data flow
//!
//! ```text
//!        node → peer                                   peer → node
//!
//!  TUN read into buf[SEAL_HEADROOM..]                UDP/4500 datagram
//!  ┌──────────┬──────────────┬──────────┐                  │
//!  │ headroom │ inner packet │ tailroom │          udp_encap::classify_mut
//!  │  16 B    │              │  ≤ 21 B  │          ├─ Ike(msg)      → IKE daemon
//!  └──────────┴──────────────┴──────────┘          ├─ NatKeepalive  → drop
//!               │                                  └─ Esp(packet)
//!     OutboundSa::seal_in_place                             │
//!               │                                  InboundSa::open (in place)
//!  ┌─────┬─────┬────┬──────────────────────┬─────┐  length, SPI, replay check,
//!  │ SPI │ seq │ IV │ inner|pad|len|nh(enc)│ ICV │  ICV, mark window, trailer
//!  └─────┴─────┴────┴──────────────────────┴─────┘          │
//!               │                                  ├─ Opened::Packet → TUN write
//!        UDP send to peer:4500                     └─ Opened::Dummy  → drop
//! ```
//!
//! ## Call order
//!
//! 1. IKE negotiates a child SA and derives KEYMAT for each direction:
//!    [`Keymat::new`] with the negotiated [`Suite`].
//! 2. Outbound: the lease manager commits a high-water mark `out_hwm`, then
//!    [`OutboundSa::new`] with `first_seq` (1, or the previous owner's
//!    committed limit + 1) and `limit = out_hwm`.
//! 3. Per inner packet: [`OutboundSa::seal_in_place`] (or
//!    [`OutboundSa::seal`] to copy). On [`SealError::LeaseExhausted`] the
//!    owner commits a higher mark and calls [`OutboundSa::extend_limit`];
//!    watching [`OutboundSa::remaining`] lets it do so before the lease runs
//!    dry. [`SealError::CounterExhausted`] means: rekey.
//! 4. Inbound: [`InboundSa::new`] with a `checkpoint` (0, or the persisted
//!    [`InboundSa::highest_authenticated`] of the previous owner).
//! 5. Per datagram on port 4500: [`classify_mut`], then for ESP
//!    [`InboundSa::open`], found by the packet's SPI ([`Packet::spi`]).
//!    Persist [`InboundSa::highest_authenticated`] from time to time.
//!
//! ## Example
//!
//! ```
//! use evpc_esp::{
//!     InboundConfig, InboundSa, Keymat, NextHeader, Opened, OutboundConfig, OutboundSa,
//!     SEAL_HEADROOM, Suite, MAX_SEAL_TAILROOM,
//! };
//!
//! let keymat = [7u8; 36]; // from IKE: 32-byte key || 4-byte salt
//! let mut tx = OutboundSa::new(OutboundConfig {
//!     spi: 0x1000,
//!     keymat: Keymat::new(Suite::AesGcm256, &keymat)?,
//!     esn: true,
//!     first_seq: 1,
//!     limit: 1000,
//! })?;
//! let mut rx = InboundSa::new(InboundConfig {
//!     spi: 0x1000,
//!     keymat: Keymat::new(Suite::AesGcm256, &keymat)?,
//!     esn: true,
//!     window_size: evpc_esp::DEFAULT_WINDOW_SIZE,
//!     checkpoint: 0,
//! })?;
//!
//! let inner = [0x45u8; 40]; // an IPv4 packet read from TUN
//! let mut buf = [0u8; 2048];
//! buf[SEAL_HEADROOM..SEAL_HEADROOM + inner.len()].copy_from_slice(&inner);
//! let len = tx.seal_in_place(&mut buf, inner.len(), NextHeader::IPV4)?;
//! assert!(len <= SEAL_HEADROOM + inner.len() + MAX_SEAL_TAILROOM);
//!
//! // ... buf[..len] crosses the network as a UDP/4500 payload ...
//!
//! match rx.open(&mut buf[..len])? {
//!     Opened::Packet { seq, next_header, payload } => {
//!         assert_eq!((seq, next_header, &payload[..]), (1, NextHeader::IPV4, &inner[..]));
//!     }
//!     Opened::Dummy { .. } => unreachable!(),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod esn;
pub mod packet;
pub mod replay;
mod sa;
mod suite;
pub mod udp_encap;

pub use error::{ConfigError, OpenError, PacketError, SealError, TrailerError};
pub use packet::{
    HEADER_LEN, ICV_LEN, IV_LEN, MAX_SEAL_TAILROOM, MIN_PACKET_LEN, NextHeader, Packet, Repr,
    SEAL_HEADROOM, Trailer, sealed_len,
};
pub use replay::{DEFAULT_WINDOW_SIZE, MAX_WINDOW_SIZE, ReplayWindow};
pub use sa::{InboundConfig, InboundSa, Opened, OutboundConfig, OutboundSa};
pub use suite::{Keymat, SALT_LEN, Suite};
pub use udp_encap::{ClassifyError, Datagram, classify, classify_mut};
