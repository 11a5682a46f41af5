//! Bounds on what one command may carry and on what the state may hold.
//!
//! `apply` refuses anything beyond them ([`crate::Rejection::TooLarge`]), whoever proposed it:
//! a buggy or hostile proposer can neither grow the state without limit nor write a record that
//! a snapshot could not hold. They are far above what IKEv2 produces, so no legitimate
//! exchange comes near them.

/// Child SAs under one IKE SA. A road warrior has one or two (two while one is rekeyed); a
/// site-to-site peer one per subnet pair.
pub const MAX_CHILDREN_PER_SA: usize = 128;

/// Traffic selectors on either side of one child SA (RFC 7296 §3.13 allows a list; peers send a
/// handful).
pub const MAX_SELECTORS_PER_CHILD: usize = 32;

/// Datagrams in one stored IKE message: an unfragmented message is one, RFC 7383 fragments of
/// a 64 KiB message at the 576-byte minimum MTU are at most ~120.
pub const MAX_DATAGRAMS_PER_MESSAGE: usize = 128;

/// Bytes of one stored IKE datagram: the UDP payload limit.
pub const MAX_DATAGRAM_BYTES: usize = 65_535;

/// Bytes of one sealed key blob (an IKE SA's sealed engine state carries its stored messages,
/// so it is allowed about as much as a stored message).
pub const MAX_SEALED_BYTES: usize = 256 * 1024;

/// Bytes of an identity's data (RFC 7296 §3.5; a DER distinguished name is the longest kind).
pub const MAX_IDENTITY_BYTES: usize = 2048;

/// Gateway nodes the registry may hold (node ids are never reused, so removed nodes stay).
pub const MAX_NODES: usize = 256;

/// Tombstones removed by one [`crate::Command::PruneTombstones`], so applying it stays short.
pub const MAX_PRUNED_PER_COMMAND: usize = 10_000;

/// The highest epoch an imported SA may bring. Epochs grow by one per change of owner, so no
/// real context comes near it; a higher one could only exhaust the epoch space.
pub const MAX_IMPORTED_EPOCH: u64 = 1 << 48;

/// The highest outbound sequence number of a child SA with extended sequence numbers:
/// RFC 4303 §3.3.3 forbids the 64-bit counter to cycle. One below `u64::MAX`, so that the first
/// number of a new owner's range (`out_hwm + 1`) is always representable, even for an exhausted
/// counter.
pub const MAX_SEQ_ESN: u64 = u64::MAX - 1;

/// The highest outbound sequence number without ESN: the 32-bit counter (RFC 4303 §3.3.3).
pub const MAX_SEQ_32: u64 = u32::MAX as u64;

/// The highest outbound sequence number of a child, by its suite.
pub fn max_seq(esn: bool) -> u64 {
    if esn { MAX_SEQ_ESN } else { MAX_SEQ_32 }
}

/// Cluster keys live at once (the active one and older ones not yet retired): each rotation
/// adds one, and a key is retired once its last blob is resealed.
pub const MAX_LIVE_KEYS: usize = 16;

/// Blobs one [`crate::Command::ResealKeys`] may replace, so applying it stays short.
pub const MAX_RESEALS_PER_COMMAND: usize = 1024;
