//! Error types, one enum per operation so that a caller matches only what
//! that operation can actually produce.

use thiserror::Error;

use crate::suite::Suite;

/// Why bytes could not be read as an ESP packet header.
///
/// Returned by [`crate::Packet::new_checked`] and [`crate::Repr::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PacketError {
    /// Fewer bytes than the smallest well-formed packet.
    #[error("truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes required.
        min: usize,
    },
    /// SPI 0 is reserved for local use and never sent (RFC 4303 §2.1).
    #[error("SPI 0 is reserved (RFC 4303 §2.1)")]
    ZeroSpi,
}

/// Why decrypted bytes do not end in a valid ESP trailer
/// (Padding, Pad Length, Next Header; RFC 4303 §2.4-§2.6).
///
/// Returned by [`crate::Trailer::parse`]; [`crate::InboundSa::open`] reports the
/// same conditions through [`OpenError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TrailerError {
    /// Fewer than the two bytes of Pad Length and Next Header.
    #[error("truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes required.
        min: usize,
    },
    /// The Pad Length field points before the start of the plaintext.
    #[error("pad length {pad_len} exceeds the {available} bytes in front of the trailer")]
    PadLengthTooLong {
        /// Value of the Pad Length field.
        pad_len: u8,
        /// Plaintext bytes in front of the Pad Length field.
        available: usize,
    },
    /// A padding byte breaks the 1, 2, 3, ... sequence of RFC 4303 §2.4.
    #[error("padding byte {position} is {found:#04x}, expected {position:#04x} (RFC 4303 §2.4)")]
    BadPadding {
        /// 1-based position of the offending byte, which is also its expected value.
        position: u8,
        /// Value found there.
        found: u8,
    },
}

/// Why an SA or its key could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// KEYMAT must be the cipher key followed by the 4-byte salt (RFC 4106 §8.1).
    #[error("{suite:?} needs {expected} bytes of KEYMAT (key || 4-byte salt), got {found}")]
    KeymatLength {
        /// Suite the KEYMAT was meant for.
        suite: Suite,
        /// Required length.
        expected: usize,
        /// Supplied length.
        found: usize,
    },
    /// SPIs 0..=255 are reserved (RFC 4303 §2.1) and never negotiated by IKE.
    #[error("SPI {spi} is reserved (RFC 4303 §2.1)")]
    ReservedSpi {
        /// The rejected SPI.
        spi: u32,
    },
    /// The anti-replay window must hold between 1 and [`crate::MAX_WINDOW_SIZE`] packets.
    #[error("replay window size {size} is outside 1..={max}")]
    WindowSize {
        /// Requested size.
        size: u32,
        /// Largest supported size.
        max: u32,
    },
    /// Sequence numbers start at 1 (RFC 4303 §3.3.3).
    #[error("the first outbound sequence number must be at least 1")]
    ZeroFirstSequence,
    /// Without ESN the counter is 32 bits wide (RFC 4303 §2.2).
    #[error("sequence number {seq} does not fit a 32-bit counter (ESN is off)")]
    SequenceBeyondCounter {
        /// The rejected first sequence number or checkpoint.
        seq: u64,
    },
}

/// Why [`crate::OutboundSa`] refused to seal a packet. No sequence number is
/// consumed when sealing fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// The buffer cannot hold the sealed packet; see [`crate::sealed_len`].
    #[error("buffer too small: {needed} bytes needed, {available} available")]
    BufferTooSmall {
        /// Bytes the sealed packet needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// The next sequence number lies above the committed lease; the owner must
    /// call [`crate::OutboundSa::extend_limit`] before sealing more.
    #[error("sequence lease exhausted: next sequence number {next_seq} is above the limit {limit}")]
    LeaseExhausted {
        /// Sequence number the next packet would have used.
        next_seq: u64,
        /// Highest sequence number the lease allows.
        limit: u64,
    },
    /// The counter would cycle, which RFC 4303 §3.3.3 forbids: the SA must be rekeyed.
    #[error("sequence counter exhausted ({bits}-bit): rekey the SA (RFC 4303 §3.3.3)")]
    CounterExhausted {
        /// Width of the counter: 32 without ESN, 64 with.
        bits: u8,
    },
    /// The payload exceeds what AES-GCM may encrypt under one nonce.
    #[error("payload of {len} bytes is too large to seal")]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
    },
}

/// Why [`crate::InboundSa::open`] rejected a packet.
///
/// The variants up to and including [`OpenError::AuthenticationFailed`] are
/// raised before the ICV verifies: they say nothing about the peer and must
/// not change any state. The trailer errors after it are raised only for
/// authentic packets, which means the peer itself is misbehaving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Shorter than the smallest possible ESP packet.
    #[error("truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes required.
        min: usize,
    },
    /// The packet names another SA; the caller's SPI demultiplexing is wrong.
    #[error("SPI {found:#010x} does not match the SA's {expected:#010x}")]
    SpiMismatch {
        /// SPI of this SA.
        expected: u32,
        /// SPI in the packet.
        found: u32,
    },
    /// Sequence number 0 is never sent (RFC 4303 §3.3.3).
    #[error("sequence number 0 is never valid")]
    ZeroSequence,
    /// The sequence number was already received (RFC 4303 §3.4.3).
    #[error("replayed sequence number {seq}")]
    Replay {
        /// The (reconstructed) 64-bit sequence number.
        seq: u64,
    },
    /// The sequence number is older than the anti-replay window (RFC 4303 §3.4.3).
    #[error("sequence number {seq} is left of the replay window (highest {highest})")]
    OutsideWindow {
        /// The (reconstructed) sequence number; for ESN, the low 32 bits when
        /// no 64-bit value left of zero or right of 2^64-1 exists.
        seq: u64,
        /// Highest sequence number the window has accepted.
        highest: u64,
    },
    /// The ICV did not verify: forged, corrupted, wrong key, or (with ESN) the
    /// high-order sequence bits were inferred differently than the sender used.
    #[error("ICV verification failed")]
    AuthenticationFailed,
    /// Authentic packet whose Pad Length points before the plaintext.
    #[error("pad length {pad_len} exceeds the {available} bytes in front of the trailer")]
    PadLengthTooLong {
        /// Value of the Pad Length field.
        pad_len: u8,
        /// Plaintext bytes in front of the Pad Length field.
        available: usize,
    },
    /// Authentic packet whose padding is not 1, 2, 3, ... (RFC 4303 §2.4).
    #[error("padding byte {position} is {found:#04x}, expected {position:#04x} (RFC 4303 §2.4)")]
    BadPadding {
        /// 1-based position of the offending byte, which is also its expected value.
        position: u8,
        /// Value found there.
        found: u8,
    },
}

impl From<TrailerError> for OpenError {
    fn from(error: TrailerError) -> Self {
        match error {
            TrailerError::Truncated { len, min } => OpenError::Truncated { len, min },
            TrailerError::PadLengthTooLong { pad_len, available } => {
                OpenError::PadLengthTooLong { pad_len, available }
            }
            TrailerError::BadPadding { position, found } => {
                OpenError::BadPadding { position, found }
            }
        }
    }
}
