//! Security associations: the per-direction state that turns inner packets
//! into ESP packets ([`OutboundSa`]) and back ([`InboundSa`]).

use crate::error::{ConfigError, OpenError, SealError};
use crate::esn;
use crate::packet::{
    ICV_LEN, MIN_PACKET_LEN, NextHeader, Packet, Repr, SEAL_HEADROOM, Trailer, sealed_len,
};
use crate::replay::{Rejection, ReplayWindow};
use crate::suite::{Aad, Cipher, Keymat, Suite, iv_for};

/// SPIs below this are reserved (RFC 4303 §2.1): 0 for local use, 1-255 by IANA.
const FIRST_ASSIGNABLE_SPI: u32 = 256;

fn check_spi(spi: u32) -> Result<(), ConfigError> {
    if spi < FIRST_ASSIGNABLE_SPI {
        return Err(ConfigError::ReservedSpi { spi });
    }
    Ok(())
}

/// Largest sequence number a counter of this kind may carry: the counter
/// must never cycle (RFC 4303 §3.3.3), so this is where the SA ends.
const fn max_sequence(esn: bool) -> u64 {
    if esn { u64::MAX } else { u32::MAX as u64 }
}

/// What an [`OutboundSa`] needs to start.
#[derive(Debug)]
pub struct OutboundConfig {
    /// SPI the peer chose for this SA (at least 256).
    pub spi: u32,
    /// Key and salt for this direction.
    pub keymat: Keymat,
    /// Whether extended (64-bit) sequence numbers were negotiated.
    pub esn: bool,
    /// Sequence number of the first packet: 1 for a new SA, one more than
    /// the previous owner's committed limit after a failover.
    pub first_seq: u64,
    /// Highest sequence number this owner may use: the committed `out_hwm`.
    pub limit: u64,
}

/// The sending half of an SA.
///
/// Sequence numbers come from a lease: the SA seals packets numbered
/// `first_seq, first_seq + 1, ...` up to `limit` and then refuses with
/// [`SealError::LeaseExhausted`] until the owner, having committed a higher
/// high-water mark, calls [`OutboundSa::extend_limit`]. Since every owner
/// only ever uses numbers inside a lease it was granted, no number (and so
/// no IV) is used twice even across failovers.
#[derive(Debug)]
pub struct OutboundSa {
    spi: u32,
    esn: bool,
    cipher: Cipher,
    /// Last sequence number consumed; `first_seq - 1` before the first seal.
    highest_used: u64,
    limit: u64,
}

impl OutboundSa {
    /// Creates the SA; no packet is sealed yet.
    pub fn new(config: OutboundConfig) -> Result<OutboundSa, ConfigError> {
        check_spi(config.spi)?;
        if config.first_seq == 0 {
            return Err(ConfigError::ZeroFirstSequence);
        }
        if config.first_seq > max_sequence(config.esn) {
            return Err(ConfigError::SequenceBeyondCounter {
                seq: config.first_seq,
            });
        }
        Ok(OutboundSa {
            spi: config.spi,
            esn: config.esn,
            cipher: Cipher::new(&config.keymat)?,
            highest_used: config.first_seq - 1,
            limit: config.limit,
        })
    }

    /// Seals, in place, the `payload_len`-byte inner packet at
    /// `buffer[SEAL_HEADROOM..]` and returns the length of the ESP packet,
    /// which then occupies `buffer[..len]` ready to send.
    ///
    /// `buffer` must be at least [`sealed_len`]`(payload_len)` long, which is
    /// at most [`crate::MAX_SEAL_TAILROOM`] bytes past the payload. On error
    /// nothing is consumed, though the headroom and tailroom may have been
    /// scribbled on.
    pub fn seal_in_place(
        &mut self,
        buffer: &mut [u8],
        payload_len: usize,
        next_header: NextHeader,
    ) -> Result<usize, SealError> {
        let needed =
            sealed_len(payload_len).ok_or(SealError::PayloadTooLarge { len: payload_len })?;
        if buffer.len() < needed {
            return Err(SealError::BufferTooSmall {
                needed,
                available: buffer.len(),
            });
        }
        let seq = self.next_sequence()?;
        let buffer = &mut buffer[..needed];

        let trailer = Trailer::for_payload(payload_len, next_header);
        let trailer_at = SEAL_HEADROOM + payload_len;
        let ciphertext_end = trailer_at + trailer.len();
        trailer.emit(&mut buffer[trailer_at..ciphertext_end]);

        let iv = iv_for(seq);
        let aad = Aad::new(self.spi, seq, self.esn);
        let icv = self
            .cipher
            .seal(&iv, &aad, &mut buffer[SEAL_HEADROOM..ciphertext_end])
            .map_err(|_| SealError::PayloadTooLarge { len: payload_len })?;

        let repr = Repr {
            spi: self.spi,
            // Only the low half travels; with ESN the AAD carries the rest.
            sequence_number: seq as u32,
            iv,
            ciphertext_len: ciphertext_end - SEAL_HEADROOM,
        };
        let mut packet = Packet::new_unchecked(buffer);
        repr.emit(&mut packet);
        packet.set_icv(icv);

        self.highest_used = seq;
        Ok(needed)
    }

    /// Copies `payload` into `out` and seals it there; returns the length of
    /// the ESP packet at `out[..len]`. For callers that cannot leave headroom.
    pub fn seal(
        &mut self,
        payload: &[u8],
        next_header: NextHeader,
        out: &mut [u8],
    ) -> Result<usize, SealError> {
        let needed =
            sealed_len(payload.len()).ok_or(SealError::PayloadTooLarge { len: payload.len() })?;
        if out.len() < needed {
            return Err(SealError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        out[SEAL_HEADROOM..SEAL_HEADROOM + payload.len()].copy_from_slice(payload);
        self.seal_in_place(out, payload.len(), next_header)
    }

    /// The sequence number the next seal would use, after checking that it
    /// is allowed; consumes nothing.
    fn next_sequence(&self) -> Result<u64, SealError> {
        let bits = if self.esn { 64 } else { 32 };
        let next = self
            .highest_used
            .checked_add(1)
            .filter(|&next| next <= max_sequence(self.esn))
            .ok_or(SealError::CounterExhausted { bits })?;
        if next > self.limit {
            return Err(SealError::LeaseExhausted {
                next_seq: next,
                limit: self.limit,
            });
        }
        Ok(next)
    }

    /// Raises the limit to `new_limit` once the owner has committed it. A
    /// lower value is ignored: a committed high-water mark never moves back,
    /// so a stale grant arriving late must not shrink the lease. Returns the
    /// limit in force.
    pub fn extend_limit(&mut self, new_limit: u64) -> u64 {
        self.limit = self.limit.max(new_limit);
        self.limit
    }

    /// Highest sequence number used so far (`first_seq - 1` before the
    /// first seal): what the lease manager compares with the limit.
    pub fn highest_used(&self) -> u64 {
        self.highest_used
    }

    /// Highest sequence number the current lease allows.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Packets that can still be sealed before the lease, or the counter
    /// itself, runs out.
    pub fn remaining(&self) -> u64 {
        self.limit
            .min(max_sequence(self.esn))
            .saturating_sub(self.highest_used)
    }

    /// The SPI written into every packet.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Whether extended sequence numbers are in use.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// The cipher suite.
    pub fn suite(&self) -> Suite {
        self.cipher.suite()
    }
}

/// What an [`InboundSa`] needs to start.
#[derive(Debug)]
pub struct InboundConfig {
    /// SPI this node chose for the SA (at least 256).
    pub spi: u32,
    /// Key and salt for this direction.
    pub keymat: Keymat,
    /// Whether extended (64-bit) sequence numbers were negotiated.
    pub esn: bool,
    /// Anti-replay window in packets, 1 to [`crate::MAX_WINDOW_SIZE`];
    /// [`crate::DEFAULT_WINDOW_SIZE`] is the RFC 4303 default.
    pub window_size: u32,
    /// Every sequence number up to and including this one is refused as a
    /// replay: 0 for a new SA, the last checkpointed
    /// [`InboundSa::highest_authenticated`] when resuming after a failover.
    pub checkpoint: u64,
}

/// The receiving half of an SA.
#[derive(Debug)]
pub struct InboundSa {
    spi: u32,
    esn: bool,
    cipher: Cipher,
    window: ReplayWindow,
}

/// A packet that [`InboundSa::open`] accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'p> {
    /// An inner packet to deliver.
    Packet {
        /// Full (reconstructed) sequence number.
        seq: u64,
        /// Protocol of `payload`, e.g. [`NextHeader::IPV4`] in tunnel mode.
        next_header: NextHeader,
        /// The decrypted payload, in place at `packet[SEAL_HEADROOM..]`. It
        /// may end in TFC padding (RFC 4303 §2.7); an IP packet carries its
        /// own length, so the caller can write it out as it is.
        payload: &'p mut [u8],
    },
    /// An authentic dummy packet (Next Header 59, RFC 4303 §2.6): counted by
    /// the replay window, to be dropped.
    Dummy {
        /// Full (reconstructed) sequence number.
        seq: u64,
    },
}

impl InboundSa {
    /// Creates the SA.
    pub fn new(config: InboundConfig) -> Result<InboundSa, ConfigError> {
        check_spi(config.spi)?;
        if config.checkpoint > max_sequence(config.esn) {
            return Err(ConfigError::SequenceBeyondCounter {
                seq: config.checkpoint,
            });
        }
        Ok(InboundSa {
            spi: config.spi,
            esn: config.esn,
            cipher: Cipher::new(&config.keymat)?,
            window: ReplayWindow::new(config.window_size, config.checkpoint)?,
        })
    }

    /// Verifies and decrypts an ESP packet in place (RFC 4303 §3.4).
    ///
    /// Order of checks: length, SPI, sequence number against the replay
    /// window, ICV, then the trailer. The window is marked only once the
    /// ICV verifies, so nothing unauthenticated changes the SA; a trailer
    /// error after that still consumes the sequence number, as the packet
    /// did come from the peer.
    pub fn open<'p>(&mut self, packet: &'p mut [u8]) -> Result<Opened<'p>, OpenError> {
        let len = packet.len();
        if len < MIN_PACKET_LEN {
            return Err(OpenError::Truncated {
                len,
                min: MIN_PACKET_LEN,
            });
        }
        let mut esp = Packet::new_unchecked(&mut *packet);
        let spi = esp.spi();
        if spi != self.spi {
            return Err(OpenError::SpiMismatch {
                expected: self.spi,
                found: spi,
            });
        }
        let seq = self.full_sequence(esp.sequence_number())?;
        self.window
            .check(seq)
            .map_err(|rejection| match rejection {
                Rejection::Zero => OpenError::ZeroSequence,
                Rejection::Replay => OpenError::Replay { seq },
                Rejection::OutsideWindow => OpenError::OutsideWindow {
                    seq,
                    highest: self.window.highest(),
                },
            })?;

        let iv = esp.iv();
        let icv = esp.icv();
        let aad = Aad::new(spi, seq, self.esn);
        self.cipher
            .open(&iv, &aad, esp.ciphertext_mut(), &icv)
            .map_err(|_| OpenError::AuthenticationFailed)?;
        self.window.mark(seq);

        let plaintext = &mut packet[SEAL_HEADROOM..len - ICV_LEN];
        let trailer = Trailer::parse(plaintext)?;
        if trailer.next_header == NextHeader::NO_NEXT_HEADER {
            return Ok(Opened::Dummy { seq });
        }
        let payload_len = plaintext.len() - trailer.len();
        Ok(Opened::Packet {
            seq,
            next_header: trailer.next_header,
            payload: &mut plaintext[..payload_len],
        })
    }

    /// The 64-bit sequence number for the transmitted low half.
    fn full_sequence(&self, low: u32) -> Result<u64, OpenError> {
        if !self.esn {
            return Ok(u64::from(low));
        }
        esn::reconstruct(self.window.highest(), self.window.size(), low).ok_or(
            OpenError::OutsideWindow {
                seq: u64::from(low),
                highest: self.window.highest(),
            },
        )
    }

    /// Highest authenticated sequence number, or the checkpoint the SA
    /// started from if none has arrived since. Persisting this is what lets
    /// a new owner resume with [`InboundConfig::checkpoint`].
    pub fn highest_authenticated(&self) -> u64 {
        self.window.highest()
    }

    /// The sequence numbers this SA accepted inside its replay window, ascending
    /// ([`crate::ReplayWindow::marked`]): what a receiver taking the SA over must refuse.
    pub fn accepted_in_window(&self) -> Vec<u64> {
        self.window.marked()
    }

    /// Refuses from now on every sequence number another receiver of this SA accepted
    /// ([`InboundSa::accepted_in_window`]), raising the window to the highest of them.
    pub fn absorb_accepted(&mut self, seqs: &[u64]) {
        self.window.absorb(seqs);
    }

    /// The SPI packets for this SA carry.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Whether extended sequence numbers are in use.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// The cipher suite.
    pub fn suite(&self) -> Suite {
        self.cipher.suite()
    }

    /// Size of the anti-replay window in packets.
    pub fn window_size(&self) -> u32 {
        self.window.size()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::packet::{IV_LEN, MAX_SEAL_TAILROOM};
    use crate::suite::tests::VECTORS;

    const SPI: u32 = 0x0a0b_0c0d;
    const B: u64 = 1 << 32;

    fn keymat(suite: Suite) -> Keymat {
        let bytes: Vec<u8> = (0..suite.keymat_len() as u8)
            .map(|i| i.wrapping_mul(37))
            .collect();
        Keymat::new(suite, &bytes).unwrap()
    }

    fn outbound(suite: Suite, esn: bool, first_seq: u64, limit: u64) -> OutboundSa {
        OutboundSa::new(OutboundConfig {
            spi: SPI,
            keymat: keymat(suite),
            esn,
            first_seq,
            limit,
        })
        .unwrap()
    }

    fn inbound(suite: Suite, esn: bool, window_size: u32, checkpoint: u64) -> InboundSa {
        InboundSa::new(InboundConfig {
            spi: SPI,
            keymat: keymat(suite),
            esn,
            window_size,
            checkpoint,
        })
        .unwrap()
    }

    /// Seals `payload` and returns the ESP packet.
    fn seal(sa: &mut OutboundSa, payload: &[u8], next_header: NextHeader) -> Vec<u8> {
        let mut out = vec![0u8; sealed_len(payload.len()).unwrap()];
        let len = sa.seal(payload, next_header, &mut out).unwrap();
        out.truncate(len);
        out
    }

    fn sample_payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn round_trip_every_suite_and_esn_mode_and_many_sizes() {
        for suite in [Suite::AesGcm128, Suite::AesGcm256] {
            for esn in [false, true] {
                let mut tx = outbound(suite, esn, 1, u64::MAX);
                let mut rx = inbound(suite, esn, 64, 0);
                for (n, len) in (0..70).chain([511, 512, 1399, 1400, 9000]).enumerate() {
                    let payload = sample_payload(len);
                    let mut packet = seal(&mut tx, &payload, NextHeader::IPV6);
                    assert_eq!(packet.len() % 4, 0, "total length stays 4-byte aligned");
                    let opened = rx.open(&mut packet).unwrap();
                    let seq = n as u64 + 1;
                    assert_eq!(
                        opened,
                        Opened::Packet {
                            seq,
                            next_header: NextHeader::IPV6,
                            payload: &mut payload.clone()[..],
                        }
                    );
                    assert_eq!(rx.highest_authenticated(), seq);
                }
            }
        }
    }

    #[test]
    fn seal_in_place_leaves_a_well_formed_packet_at_the_start() {
        let mut tx = outbound(Suite::AesGcm256, true, 3 * B + 5, u64::MAX);
        let payload = sample_payload(61);
        let mut buffer = vec![0xee; SEAL_HEADROOM + payload.len() + MAX_SEAL_TAILROOM + 10];
        buffer[SEAL_HEADROOM..SEAL_HEADROOM + payload.len()].copy_from_slice(&payload);
        let len = tx
            .seal_in_place(&mut buffer, payload.len(), NextHeader::IPV4)
            .unwrap();
        assert_eq!(Some(len), sealed_len(payload.len()));
        assert!(len <= SEAL_HEADROOM + payload.len() + MAX_SEAL_TAILROOM);
        let packet = Packet::new_checked(&buffer[..len]).unwrap();
        let repr = Repr::parse(&packet).unwrap();
        assert_eq!(repr.spi, SPI);
        assert_eq!(repr.sequence_number, 5, "only the low half is sent");
        assert_eq!(
            repr.iv,
            (3 * B + 5).to_be_bytes(),
            "IV is the 64-bit sequence number"
        );
        assert_eq!(repr.ciphertext_len, 61 + 1 + 2);
        assert_ne!(&buffer[SEAL_HEADROOM..SEAL_HEADROOM + 61], &payload[..]);
        assert!(
            buffer[len..].iter().all(|&b| b == 0xee),
            "nothing written past the packet"
        );
        assert_eq!(tx.highest_used(), 3 * B + 5);
    }

    #[test]
    fn seal_refuses_small_buffers_without_consuming_a_number() {
        let mut tx = outbound(Suite::AesGcm128, false, 1, 100);
        let needed = sealed_len(40).unwrap();
        let mut buffer = vec![0; needed - 1];
        assert_eq!(
            tx.seal_in_place(&mut buffer, 40, NextHeader::IPV4),
            Err(SealError::BufferTooSmall {
                needed,
                available: needed - 1
            })
        );
        assert_eq!(
            tx.seal(&[0; 40], NextHeader::IPV4, &mut buffer),
            Err(SealError::BufferTooSmall {
                needed,
                available: needed - 1
            })
        );
        assert_eq!(
            tx.seal_in_place(&mut buffer, usize::MAX, NextHeader::IPV4),
            Err(SealError::PayloadTooLarge { len: usize::MAX })
        );
        assert_eq!(tx.highest_used(), 0);
    }

    #[test]
    fn the_lease_limit_is_never_exceeded() {
        let mut tx = outbound(Suite::AesGcm128, true, 11, 13);
        assert_eq!(tx.highest_used(), 10);
        assert_eq!(tx.remaining(), 3);
        let mut buffer = vec![0; 128];
        for seq in 11..=13 {
            tx.seal_in_place(&mut buffer, 8, NextHeader::IPV4).unwrap();
            assert_eq!(tx.highest_used(), seq);
        }
        assert_eq!(tx.remaining(), 0);
        for _ in 0..3 {
            assert_eq!(
                tx.seal_in_place(&mut buffer, 8, NextHeader::IPV4),
                Err(SealError::LeaseExhausted {
                    next_seq: 14,
                    limit: 13
                })
            );
        }
        // a stale, lower grant does not shrink the lease
        assert_eq!(tx.extend_limit(12), 13);
        assert_eq!(tx.limit(), 13);
        assert_eq!(tx.extend_limit(20), 20);
        assert_eq!(tx.remaining(), 7);
        tx.seal_in_place(&mut buffer, 8, NextHeader::IPV4).unwrap();
        assert_eq!(tx.highest_used(), 14);
    }

    #[test]
    fn a_lease_below_the_first_number_allows_nothing() {
        let mut tx = outbound(Suite::AesGcm128, false, 50, 10);
        assert_eq!(tx.remaining(), 0);
        let mut buffer = vec![0; 64];
        assert_eq!(
            tx.seal_in_place(&mut buffer, 0, NextHeader::IPV4),
            Err(SealError::LeaseExhausted {
                next_seq: 50,
                limit: 10
            })
        );
    }

    #[test]
    fn the_32_bit_counter_never_cycles() {
        let mut tx = outbound(Suite::AesGcm128, false, u64::from(u32::MAX) - 1, u64::MAX);
        assert_eq!(tx.remaining(), 2);
        let mut buffer = vec![0; 64];
        tx.seal_in_place(&mut buffer, 4, NextHeader::IPV4).unwrap();
        tx.seal_in_place(&mut buffer, 4, NextHeader::IPV4).unwrap();
        assert_eq!(tx.highest_used(), u64::from(u32::MAX));
        assert_eq!(
            tx.seal_in_place(&mut buffer, 4, NextHeader::IPV4),
            Err(SealError::CounterExhausted { bits: 32 })
        );
        // extending the lease does not help: only a rekey does
        tx.extend_limit(u64::MAX);
        assert_eq!(
            tx.seal_in_place(&mut buffer, 4, NextHeader::IPV4),
            Err(SealError::CounterExhausted { bits: 32 })
        );
    }

    #[test]
    fn the_64_bit_counter_never_cycles() {
        let mut tx = outbound(Suite::AesGcm256, true, u64::MAX, u64::MAX);
        let mut buffer = vec![0; 64];
        let len = tx.seal_in_place(&mut buffer, 4, NextHeader::IPV4).unwrap();
        assert_eq!(tx.highest_used(), u64::MAX);
        assert_eq!(tx.remaining(), 0);
        assert_eq!(
            tx.seal_in_place(&mut buffer[..len], 4, NextHeader::IPV4),
            Err(SealError::CounterExhausted { bits: 64 })
        );
    }

    #[test]
    fn configuration_is_validated() {
        let config = |spi, esn, first_seq| OutboundConfig {
            spi,
            keymat: keymat(Suite::AesGcm128),
            esn,
            first_seq,
            limit: u64::MAX,
        };
        assert_eq!(
            OutboundSa::new(config(0, false, 1)).unwrap_err(),
            ConfigError::ReservedSpi { spi: 0 }
        );
        assert_eq!(
            OutboundSa::new(config(255, false, 1)).unwrap_err(),
            ConfigError::ReservedSpi { spi: 255 }
        );
        assert!(OutboundSa::new(config(256, false, 1)).is_ok());
        assert_eq!(
            OutboundSa::new(config(SPI, false, 0)).unwrap_err(),
            ConfigError::ZeroFirstSequence
        );
        assert_eq!(
            OutboundSa::new(config(SPI, false, B)).unwrap_err(),
            ConfigError::SequenceBeyondCounter { seq: B }
        );
        assert!(OutboundSa::new(config(SPI, true, B)).is_ok());

        let inbound_config = |esn, window_size, checkpoint| InboundConfig {
            spi: SPI,
            keymat: keymat(Suite::AesGcm256),
            esn,
            window_size,
            checkpoint,
        };
        assert_eq!(
            InboundSa::new(inbound_config(false, 64, B)).unwrap_err(),
            ConfigError::SequenceBeyondCounter { seq: B }
        );
        assert!(InboundSa::new(inbound_config(true, 64, B)).is_ok());
        assert_eq!(
            InboundSa::new(inbound_config(true, 4097, 0)).unwrap_err(),
            ConfigError::WindowSize {
                size: 4097,
                max: 4096
            }
        );
        let sa = InboundSa::new(inbound_config(true, 4096, 0)).unwrap();
        assert_eq!(sa.window_size(), 4096);
        assert_eq!(sa.suite(), Suite::AesGcm256);
        assert!(sa.esn());
        assert_eq!(sa.spi(), SPI);
    }

    #[test]
    fn sa_debug_output_shows_no_key_material() {
        let tx = outbound(Suite::AesGcm128, true, 1, 10);
        let shown = format!("{tx:?}");
        assert!(shown.contains("Cipher { suite: AesGcm128, .. }"), "{shown}");
        assert!(!shown.contains("salt"), "{shown}");
    }

    #[test]
    fn known_answer_packets_open() {
        for vector in VECTORS {
            let mut packet = Vec::new();
            packet.extend_from_slice(&vector.spi.to_be_bytes());
            packet.extend_from_slice(&(vector.seq as u32).to_be_bytes());
            packet.extend_from_slice(&hex::decode(vector.iv).unwrap());
            packet.extend_from_slice(&hex::decode(vector.ciphertext_icv).unwrap());
            let plaintext = hex::decode(vector.plaintext).unwrap();
            let trailer = Trailer::parse(&plaintext).unwrap();

            let mut rx = InboundSa::new(InboundConfig {
                spi: vector.spi,
                keymat: Keymat::new(vector.suite, &hex::decode(vector.keymat).unwrap()).unwrap(),
                esn: vector.esn,
                window_size: 64,
                // just below the vector, so ESN reconstruction lands on its high half
                checkpoint: vector.seq - 1,
            })
            .unwrap();
            let opened = rx.open(&mut packet).unwrap();
            let expected_payload = &plaintext[..plaintext.len() - trailer.len()];
            match opened {
                Opened::Packet {
                    seq,
                    next_header,
                    payload,
                } => {
                    assert_eq!(seq, vector.seq);
                    assert_eq!(next_header, trailer.next_header);
                    assert_eq!(payload, expected_payload);
                }
                Opened::Dummy { .. } => panic!("vector {:#x} is not a dummy", vector.spi),
            }
            assert_eq!(rx.highest_authenticated(), vector.seq);
        }
    }

    #[test]
    fn replays_are_refused_and_forgeries_change_nothing() {
        let mut tx = outbound(Suite::AesGcm128, false, 1, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, false, 32, 0);
        let original = seal(&mut tx, &sample_payload(100), NextHeader::IPV4);

        // flip every bit after the header: the ICV catches each one
        for byte in 8..original.len() {
            for bit in 0..8 {
                let mut forged = original.clone();
                forged[byte] ^= 1 << bit;
                assert_eq!(rx.open(&mut forged), Err(OpenError::AuthenticationFailed));
            }
        }
        // the sequence number is authenticated too
        let mut forged = original.clone();
        forged[7] ^= 2;
        assert_eq!(rx.open(&mut forged), Err(OpenError::AuthenticationFailed));
        assert_eq!(
            rx.highest_authenticated(),
            0,
            "forgeries must not move the window"
        );

        let mut packet = original.clone();
        assert!(rx.open(&mut packet).is_ok());
        let mut packet = original.clone();
        assert_eq!(rx.open(&mut packet), Err(OpenError::Replay { seq: 1 }));
    }

    #[test]
    fn cleartext_checks_come_before_the_icv() {
        let mut tx = outbound(Suite::AesGcm128, false, 1, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, false, 32, 0);
        let packet = seal(&mut tx, &sample_payload(20), NextHeader::IPV4);

        for len in 0..MIN_PACKET_LEN {
            let mut short = packet[..len].to_vec();
            assert_eq!(
                rx.open(&mut short),
                Err(OpenError::Truncated {
                    len,
                    min: MIN_PACKET_LEN
                })
            );
        }
        let mut other_spi = packet.clone();
        other_spi[3] ^= 1;
        assert_eq!(
            rx.open(&mut other_spi),
            Err(OpenError::SpiMismatch {
                expected: SPI,
                found: SPI ^ 1
            })
        );
        let mut zero = packet.clone();
        zero[4..8].fill(0);
        assert_eq!(rx.open(&mut zero), Err(OpenError::ZeroSequence));
    }

    #[test]
    fn old_packets_fall_out_of_the_window() {
        let mut tx = outbound(Suite::AesGcm256, false, 1, u64::MAX);
        let mut rx = inbound(Suite::AesGcm256, false, 32, 0);
        let first = seal(&mut tx, b"first", NextHeader::IPV4);
        let mut last = Vec::new();
        for _ in 0..40 {
            last = seal(&mut tx, b"later", NextHeader::IPV4);
        }
        assert!(rx.open(&mut last).is_ok());
        assert_eq!(
            rx.open(&mut first.clone()),
            Err(OpenError::OutsideWindow {
                seq: 1,
                highest: 41
            })
        );
    }

    #[test]
    fn dummy_packets_are_authenticated_counted_and_not_delivered() {
        let mut tx = outbound(Suite::AesGcm128, true, 1, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, true, 64, 0);
        let dummy = seal(&mut tx, &[0x5a; 30], NextHeader::NO_NEXT_HEADER);
        assert_eq!(rx.open(&mut dummy.clone()), Ok(Opened::Dummy { seq: 1 }));
        assert_eq!(
            rx.open(&mut dummy.clone()),
            Err(OpenError::Replay { seq: 1 })
        );
        let empty_dummy = seal(&mut tx, &[], NextHeader::NO_NEXT_HEADER);
        assert_eq!(
            rx.open(&mut empty_dummy.clone()),
            Ok(Opened::Dummy { seq: 2 })
        );
    }

    #[test]
    fn tfc_padding_reaches_the_caller_with_the_inner_packet() {
        // a 28-byte IPv4 packet (its header says so) followed by TFC padding
        let mut inner = vec![0x45, 0, 0, 28];
        inner.resize(28, 0x11);
        let mut padded = inner.clone();
        padded.resize(200, 0);
        let mut tx = outbound(Suite::AesGcm128, false, 1, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, false, 64, 0);
        let mut packet = seal(&mut tx, &padded, NextHeader::IPV4);
        let Ok(Opened::Packet { payload, .. }) = rx.open(&mut packet) else {
            panic!("padded packet refused");
        };
        assert_eq!(payload.len(), 200);
        let ip_len = usize::from(u16::from_be_bytes([payload[2], payload[3]]));
        assert_eq!(&payload[..ip_len], &inner[..]);
    }

    /// Builds an authentic packet whose plaintext (payload and trailer) is
    /// whatever the test says, bypassing the padding a real sender writes.
    fn seal_raw_plaintext(suite: Suite, seq: u32, plaintext: &[u8]) -> Vec<u8> {
        let cipher = Cipher::new(&keymat(suite)).unwrap();
        let iv = iv_for(u64::from(seq));
        let mut body = plaintext.to_vec();
        let icv = cipher
            .seal(&iv, &Aad::new(SPI, u64::from(seq), false), &mut body)
            .unwrap();
        let mut packet = Vec::new();
        packet.extend_from_slice(&SPI.to_be_bytes());
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(&iv[..IV_LEN]);
        packet.extend_from_slice(&body);
        packet.extend_from_slice(&icv);
        packet
    }

    #[test]
    fn authentic_packets_with_bad_trailers_are_refused_but_consumed() {
        let mut rx = inbound(Suite::AesGcm128, false, 64, 0);

        let mut bad_padding = seal_raw_plaintext(Suite::AesGcm128, 1, &[0xaa, 0xbb, 1, 7, 3, 3, 4]);
        assert_eq!(
            rx.open(&mut bad_padding.clone()),
            Err(OpenError::BadPadding {
                position: 2,
                found: 7
            })
        );
        assert_eq!(rx.highest_authenticated(), 1);
        assert_eq!(rx.open(&mut bad_padding), Err(OpenError::Replay { seq: 1 }));

        let mut too_long = seal_raw_plaintext(Suite::AesGcm128, 2, &[1, 2, 9, 4]);
        assert_eq!(
            rx.open(&mut too_long),
            Err(OpenError::PadLengthTooLong {
                pad_len: 9,
                available: 2
            })
        );

        // unaligned but correctly padded plaintext is accepted: alignment is
        // the sender's duty, and the ICV already vouches for the bytes
        let mut unaligned = seal_raw_plaintext(Suite::AesGcm128, 3, &[0xaa, 1, 1, 4]);
        assert_eq!(
            rx.open(&mut unaligned),
            Ok(Opened::Packet {
                seq: 3,
                next_header: NextHeader::IPV4,
                payload: &mut [0xaa][..],
            })
        );
    }

    #[test]
    fn keys_of_the_other_suite_or_direction_do_not_open() {
        let mut tx = outbound(Suite::AesGcm128, false, 1, u64::MAX);
        let mut packet = seal(&mut tx, b"hello", NextHeader::IPV4);
        let mut other_key = InboundSa::new(InboundConfig {
            spi: SPI,
            keymat: Keymat::new(Suite::AesGcm128, &[9; 20]).unwrap(),
            esn: false,
            window_size: 64,
            checkpoint: 0,
        })
        .unwrap();
        assert_eq!(
            other_key.open(&mut packet),
            Err(OpenError::AuthenticationFailed)
        );
    }

    #[test]
    fn a_resumed_inbound_sa_refuses_what_the_checkpoint_covers() {
        let mut tx = outbound(Suite::AesGcm256, true, 1, u64::MAX);
        let packets: Vec<_> = (1..=10)
            .map(|_| seal(&mut tx, b"data", NextHeader::IPV4))
            .collect();
        // the old owner checkpointed 7 before failing over
        let mut rx = inbound(Suite::AesGcm256, true, 64, 7);
        for (seq, packet) in (1u64..).zip(&packets) {
            let mut copy = packet.clone();
            let result = rx.open(&mut copy);
            if seq <= 7 {
                assert_eq!(result, Err(OpenError::Replay { seq }));
            } else {
                assert!(result.is_ok(), "seq {seq}: {result:?}");
            }
        }
        assert_eq!(rx.highest_authenticated(), 10);
    }

    #[test]
    fn esn_receiver_follows_the_sender_across_the_32_bit_boundary() {
        let mut tx = outbound(Suite::AesGcm128, true, B - 3, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, true, 64, B - 4);
        let mut packets = Vec::new();
        for _ in 0..6 {
            packets.push(seal(&mut tx, b"x", NextHeader::IPV4));
        }
        // deliver out of order across the boundary: B+1, B-3, B, B-1, B+2, B-2
        for (index, seq) in [
            (4, B + 1),
            (0, B - 3),
            (3, B),
            (2, B - 1),
            (5, B + 2),
            (1, B - 2),
        ] {
            match rx.open(&mut packets[index].clone()) {
                Ok(Opened::Packet { seq: got, .. }) => assert_eq!(got, seq),
                other => panic!("seq {seq:#x}: {other:?}"),
            }
        }
        assert_eq!(rx.highest_authenticated(), B + 2);
    }

    #[test]
    fn a_wrong_high_half_fails_the_icv() {
        // sender is a whole 2^32 block ahead of where the receiver thinks
        let mut tx = outbound(Suite::AesGcm128, true, 2 * B + 100, u64::MAX);
        let mut rx = inbound(Suite::AesGcm128, true, 64, B + 50);
        let mut packet = seal(&mut tx, b"x", NextHeader::IPV4);
        assert_eq!(rx.open(&mut packet), Err(OpenError::AuthenticationFailed));
        assert_eq!(rx.highest_authenticated(), B + 50);
    }

    /// The receiver's view, as a model: the set of accepted numbers.
    struct Model {
        window: u64,
        checkpoint: u64,
        highest: u64,
        accepted: BTreeSet<u64>,
    }

    #[derive(Debug, PartialEq)]
    enum Verdict {
        Accept,
        Replay,
        TooOld,
    }

    impl Model {
        fn verdict(&self, seq: u64) -> Verdict {
            if seq <= self.highest && self.highest - seq >= self.window {
                Verdict::TooOld
            } else if seq <= self.checkpoint || self.accepted.contains(&seq) {
                Verdict::Replay
            } else {
                Verdict::Accept
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Ahead(u64),
        Behind(u64),
        Jump(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => (1u64..6).prop_map(Step::Ahead),
            4 => (0u64..4200).prop_map(Step::Behind),
            1 => (3000u64..1_000_000).prop_map(Step::Jump),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Real packets, sealed at sequence numbers that jump, reorder and
        /// repeat around 2^32, against the set model. With ESN the receiver
        /// must reconstruct every number in or right of its window exactly;
        /// numbers left of it it may mistake for the next block, which the
        /// ICV then refutes. Without ESN the same walk stops at 2^32 - 1.
        #[test]
        fn inbound_sa_matches_the_model_across_the_wrap(
            esn in any::<bool>(),
            window_size in proptest::sample::select(vec![32u32, 64, 1024, 4096]),
            checkpoint in B - 3000..B - 1,
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let max = max_sequence(esn);
            let mut rx = inbound(Suite::AesGcm128, esn, window_size, checkpoint);
            let mut model = Model {
                window: u64::from(window_size),
                checkpoint,
                highest: checkpoint,
                accepted: BTreeSet::new(),
            };
            for step in steps {
                let seq = match step {
                    Step::Ahead(delta) | Step::Jump(delta) => model.highest + delta,
                    Step::Behind(delta) => model.highest - delta,
                }
                .min(max);
                let mut tx = outbound(Suite::AesGcm128, esn, seq, seq);
                let mut packet = seal(&mut tx, &seq.to_be_bytes(), NextHeader::IPV4);
                let result = rx.open(&mut packet);
                match model.verdict(seq) {
                    Verdict::Accept => {
                        let mut payload = seq.to_be_bytes();
                        prop_assert_eq!(
                            result,
                            Ok(Opened::Packet { seq, next_header: NextHeader::IPV4, payload: &mut payload[..] })
                        );
                        model.accepted.insert(seq);
                        model.highest = model.highest.max(seq);
                    }
                    Verdict::Replay => prop_assert_eq!(result, Err(OpenError::Replay { seq })),
                    Verdict::TooOld => prop_assert!(
                        matches!(result, Err(OpenError::OutsideWindow { .. } | OpenError::AuthenticationFailed)),
                        "seq {} highest {}: {:?}", seq, model.highest, result
                    ),
                }
                prop_assert_eq!(rx.highest_authenticated(), model.highest);
            }
        }
    }
}
