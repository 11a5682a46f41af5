//! The ESP wire format (RFC 4303 §2) for AEAD transforms with an 8-byte
//! explicit IV and a 16-byte ICV, such as AES-GCM-16 (RFC 4106 §3, §6):
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
//! |               Security Parameters Index (SPI)                 |  ^ AAD
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  v
//! |                  Sequence Number (low 32 bits)                |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
//! |                     IV (8 bytes, explicit)                    |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
//! ~                 Payload Data (inner packet)                   ~  ^
//! +               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  | encrypted
//! |               |         Padding (0-255 bytes)                 |  |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  |
//! |                               |  Pad Length   | Next Header   |  v
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
//! |                      ICV (16 bytes)                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! [`Packet`] and [`Repr`] cover the cleartext framing; [`Trailer`] covers
//! the Padding / Pad Length / Next Header fields, which only exist once the
//! payload is decrypted. Neither touches keys.

use core::fmt;

use crate::error::{PacketError, TrailerError};

/// Length of the SPI and Sequence Number fields (RFC 4303 §2.1, §2.2).
pub const HEADER_LEN: usize = 8;
/// Length of the explicit IV of AES-GCM in ESP (RFC 4106 §3.1).
pub const IV_LEN: usize = 8;
/// Length of the full-size AES-GCM ICV, "AES-GCM-16" (RFC 4106 §6).
pub const ICV_LEN: usize = 16;
/// Pad Length plus Next Header (RFC 4303 §2.5, §2.6).
pub const TRAILER_LEN: usize = 2;
/// Bytes in front of the payload: SPI, Sequence Number and IV. A data plane
/// reads the inner packet into a buffer at this offset and seals in place.
pub const SEAL_HEADROOM: usize = HEADER_LEN + IV_LEN;
/// Most bytes sealing appends after the payload: up to 3 bytes of padding,
/// Pad Length, Next Header and the ICV.
pub const MAX_SEAL_TAILROOM: usize = (ALIGN - 1) + TRAILER_LEN + ICV_LEN;
/// The shortest packet that can carry anything: header, IV, an empty payload
/// with its two trailer bytes, and the ICV.
pub const MIN_PACKET_LEN: usize = HEADER_LEN + IV_LEN + TRAILER_LEN + ICV_LEN;

/// The encrypted part must end on a 4-byte boundary (RFC 4303 §2.4).
const ALIGN: usize = 4;

const SPI: core::ops::Range<usize> = 0..4;
const SEQUENCE_NUMBER: core::ops::Range<usize> = 4..8;
const IV: core::ops::Range<usize> = HEADER_LEN..HEADER_LEN + IV_LEN;

/// Number of padding bytes RFC 4303 §2.4 requires after `payload_len` bytes
/// so that the encrypted part (payload, padding, trailer) ends 4-byte aligned.
/// GCM is a stream mode, so alignment is the only reason to pad.
pub const fn padding_len(payload_len: usize) -> usize {
    // Reduce first so that no payload length can overflow the sum.
    (ALIGN - (payload_len % ALIGN + TRAILER_LEN) % ALIGN) % ALIGN
}

/// Length of the ESP packet that sealing `payload_len` bytes produces,
/// or `None` if that does not fit in `usize`.
pub const fn sealed_len(payload_len: usize) -> Option<usize> {
    match payload_len.checked_add(SEAL_HEADROOM + TRAILER_LEN + ICV_LEN) {
        Some(len) => len.checked_add(padding_len(payload_len)),
        None => None,
    }
}

/// The protocol of the payload, from the Next Header field (RFC 4303 §2.6),
/// using IANA's IP protocol numbers.
///
/// ESP carries any protocol, so every value is representable; the constants
/// name the ones a tunnel-mode gateway meets.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NextHeader(pub u8);

impl NextHeader {
    /// IPv4 inside the tunnel (IP-in-IP, protocol 4).
    pub const IPV4: NextHeader = NextHeader(4);
    /// IPv6 inside the tunnel (protocol 41).
    pub const IPV6: NextHeader = NextHeader(41);
    /// "No Next Header" (protocol 59): a dummy packet that the receiver
    /// authenticates and then discards (RFC 4303 §2.6).
    pub const NO_NEXT_HEADER: NextHeader = NextHeader(59);
}

impl fmt::Debug for NextHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NextHeader::IPV4 => f.write_str("Ipv4"),
            NextHeader::IPV6 => f.write_str("Ipv6"),
            NextHeader::NO_NEXT_HEADER => f.write_str("NoNextHeader"),
            NextHeader(other) => write!(f, "NextHeader({other})"),
        }
    }
}

impl From<u8> for NextHeader {
    fn from(value: u8) -> Self {
        NextHeader(value)
    }
}

impl From<NextHeader> for u8 {
    fn from(value: NextHeader) -> Self {
        value.0
    }
}

/// A read/write view of an ESP packet in a buffer, in the manner of smoltcp.
///
/// [`Packet::new_checked`] is the entry point for untrusted bytes: after it
/// succeeds no accessor can panic. [`Packet::new_unchecked`] skips the check
/// for buffers the caller sized itself; its accessors panic on short buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking its length.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a buffer after checking that it is at least [`MIN_PACKET_LEN`] long.
    pub fn new_checked(buffer: T) -> Result<Self, PacketError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks that every field accessor will find its bytes.
    pub fn check_len(&self) -> Result<(), PacketError> {
        let len = self.buffer.as_ref().len();
        if len < MIN_PACKET_LEN {
            return Err(PacketError::Truncated {
                len,
                min: MIN_PACKET_LEN,
            });
        }
        Ok(())
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Security Parameters Index (RFC 4303 §2.1).
    pub fn spi(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[SPI])
    }

    /// Low 32 bits of the sequence number; with ESN the high 32 bits are not
    /// transmitted (RFC 4303 §2.2.1).
    pub fn sequence_number(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[SEQUENCE_NUMBER])
    }

    /// The explicit IV (RFC 4106 §3.1).
    pub fn iv(&self) -> [u8; IV_LEN] {
        let mut iv = [0; IV_LEN];
        iv.copy_from_slice(&self.buffer.as_ref()[IV]);
        iv
    }

    /// The encrypted payload, padding and trailer.
    pub fn ciphertext(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[SEAL_HEADROOM..data.len() - ICV_LEN]
    }

    /// The Integrity Check Value: the GCM authentication tag (RFC 4106 §6).
    pub fn icv(&self) -> [u8; ICV_LEN] {
        let data = self.buffer.as_ref();
        let mut icv = [0; ICV_LEN];
        icv.copy_from_slice(&data[data.len() - ICV_LEN..]);
        icv
    }

    /// Length of the whole packet.
    pub fn total_len(&self) -> usize {
        self.buffer.as_ref().len()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the SPI.
    pub fn set_spi(&mut self, spi: u32) {
        self.buffer.as_mut()[SPI].copy_from_slice(&spi.to_be_bytes());
    }

    /// Sets the transmitted (low 32) bits of the sequence number.
    pub fn set_sequence_number(&mut self, seq: u32) {
        self.buffer.as_mut()[SEQUENCE_NUMBER].copy_from_slice(&seq.to_be_bytes());
    }

    /// Sets the explicit IV.
    pub fn set_iv(&mut self, iv: [u8; IV_LEN]) {
        self.buffer.as_mut()[IV].copy_from_slice(&iv);
    }

    /// The encrypted part, for decryption or encryption in place.
    pub fn ciphertext_mut(&mut self) -> &mut [u8] {
        let data = self.buffer.as_mut();
        let end = data.len() - ICV_LEN;
        &mut data[SEAL_HEADROOM..end]
    }

    /// Sets the ICV.
    pub fn set_icv(&mut self, icv: [u8; ICV_LEN]) {
        let data = self.buffer.as_mut();
        let start = data.len() - ICV_LEN;
        data[start..].copy_from_slice(&icv);
    }
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Packet<T> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

/// The cleartext fields of an ESP packet, parsed; the encrypted part is
/// described only by its length since reading it needs the SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Repr {
    /// Security Parameters Index, never 0.
    pub spi: u32,
    /// Transmitted (low 32) bits of the sequence number.
    pub sequence_number: u32,
    /// Explicit IV.
    pub iv: [u8; IV_LEN],
    /// Length of the encrypted payload, padding and trailer.
    pub ciphertext_len: usize,
}

impl Repr {
    /// Parses the cleartext fields, rejecting what no SA can accept.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Repr, PacketError> {
        packet.check_len()?;
        let spi = packet.spi();
        if spi == 0 {
            return Err(PacketError::ZeroSpi);
        }
        Ok(Repr {
            spi,
            sequence_number: packet.sequence_number(),
            iv: packet.iv(),
            ciphertext_len: packet.ciphertext().len(),
        })
    }

    /// Length of the buffer this packet occupies.
    pub const fn buffer_len(&self) -> usize {
        SEAL_HEADROOM + self.ciphertext_len + ICV_LEN
    }

    /// Writes SPI, sequence number and IV. The encrypted part and the ICV are
    /// left for the cipher. `packet` must be exactly [`Repr::buffer_len`] long
    /// (smoltcp convention: emitting into a mis-sized buffer is a caller bug
    /// and panics).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        assert_eq!(
            packet.total_len(),
            self.buffer_len(),
            "ESP buffer length does not match its Repr"
        );
        packet.set_spi(self.spi);
        packet.set_sequence_number(self.sequence_number);
        packet.set_iv(self.iv);
    }
}

/// The decrypted Padding, Pad Length and Next Header fields
/// (RFC 4303 §2.4-§2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Trailer {
    /// Number of padding bytes in front of the Pad Length field.
    pub pad_len: u8,
    /// Protocol of the payload.
    pub next_header: NextHeader,
}

impl Trailer {
    /// The trailer a sender appends to `payload_len` bytes: just enough
    /// padding for 4-byte alignment.
    pub const fn for_payload(payload_len: usize, next_header: NextHeader) -> Trailer {
        // padding_len is at most 3, so the cast is lossless.
        Trailer {
            pad_len: padding_len(payload_len) as u8,
            next_header,
        }
    }

    /// Bytes the trailer occupies: padding, Pad Length and Next Header.
    pub const fn len(&self) -> usize {
        self.pad_len as usize + TRAILER_LEN
    }

    /// Never true: the trailer always has its two fixed bytes.
    pub const fn is_empty(&self) -> bool {
        false
    }

    /// Reads the trailer at the end of a decrypted `plaintext` and verifies
    /// that the padding is 1, 2, 3, ... as RFC 4303 §2.4 requires of the
    /// default padding that AES-GCM uses (RFC 4106 §3.2). The payload is
    /// `plaintext[..plaintext.len() - trailer.len()]`.
    ///
    /// Padding is checked in constant time with respect to its contents: by
    /// the time it is read the packet has been authenticated, so this is not
    /// a padding oracle, but nothing is gained by branching on secrets.
    pub fn parse(plaintext: &[u8]) -> Result<Trailer, TrailerError> {
        let len = plaintext.len();
        let Some(trailer_at) = len.checked_sub(TRAILER_LEN) else {
            return Err(TrailerError::Truncated {
                len,
                min: TRAILER_LEN,
            });
        };
        let pad_len = plaintext[trailer_at];
        let next_header = NextHeader(plaintext[trailer_at + 1]);
        let Some(padding_at) = trailer_at.checked_sub(usize::from(pad_len)) else {
            return Err(TrailerError::PadLengthTooLong {
                pad_len,
                available: trailer_at,
            });
        };
        let padding = &plaintext[padding_at..trailer_at];
        let mut mismatch = 0u8;
        for (expected, &found) in (1..=pad_len).zip(padding) {
            mismatch |= expected ^ found;
        }
        if mismatch != 0 {
            // Only now, with the packet already rejected, locate the culprit.
            let (position, found) = (1..=pad_len)
                .zip(padding.iter().copied())
                .find(|&(expected, found)| expected != found)
                .unwrap_or((0, 0));
            return Err(TrailerError::BadPadding { position, found });
        }
        Ok(Trailer {
            pad_len,
            next_header,
        })
    }

    /// Writes the trailer into `out`, which must be exactly [`Trailer::len`]
    /// bytes long (a mis-sized buffer is a caller bug and panics).
    pub fn emit(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.len(), "trailer buffer length mismatch");
        let (padding, fields) = out.split_at_mut(usize::from(self.pad_len));
        for (byte, value) in padding.iter_mut().zip(1..=self.pad_len) {
            *byte = value;
        }
        fields[0] = self.pad_len;
        fields[1] = self.next_header.0;
    }
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(bytes);
    u32::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_packet() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        bytes.extend_from_slice(&0x9abc_def0u32.to_be_bytes());
        bytes.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&[0xaa; 6]);
        bytes.extend_from_slice(&[0xcc; ICV_LEN]);
        bytes
    }

    #[test]
    fn accessors_read_each_field() {
        let bytes = sample_packet();
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.spi(), 0x1234_5678);
        assert_eq!(packet.sequence_number(), 0x9abc_def0);
        assert_eq!(packet.iv(), [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(packet.ciphertext(), &[0xaa; 6]);
        assert_eq!(packet.icv(), [0xcc; ICV_LEN]);
    }

    #[test]
    fn repr_round_trips_through_emit() {
        let bytes = sample_packet();
        let repr = Repr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(repr.buffer_len(), bytes.len());

        let mut out = vec![0u8; repr.buffer_len()];
        let mut packet = Packet::new_unchecked(&mut out[..]);
        repr.emit(&mut packet);
        packet.ciphertext_mut().copy_from_slice(&[0xaa; 6]);
        packet.set_icv([0xcc; ICV_LEN]);
        assert_eq!(out, bytes);
    }

    #[test]
    fn every_length_below_the_minimum_is_truncated() {
        let bytes = sample_packet();
        for len in 0..MIN_PACKET_LEN {
            assert_eq!(
                Packet::new_checked(&bytes[..len]),
                Err(PacketError::Truncated {
                    len,
                    min: MIN_PACKET_LEN
                })
            );
        }
        assert!(Packet::new_checked(&bytes[..MIN_PACKET_LEN]).is_ok());
    }

    #[test]
    fn zero_spi_is_rejected() {
        let mut bytes = sample_packet();
        bytes[..4].fill(0);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet), Err(PacketError::ZeroSpi));
    }

    #[test]
    fn padding_aligns_the_encrypted_part_to_four_bytes() {
        for payload_len in 0..64 {
            let pad = padding_len(payload_len);
            assert!(pad < ALIGN);
            assert_eq!((payload_len + pad + TRAILER_LEN) % ALIGN, 0);
            assert_eq!(
                sealed_len(payload_len),
                Some(SEAL_HEADROOM + payload_len + pad + TRAILER_LEN + ICV_LEN)
            );
        }
        assert_eq!(sealed_len(usize::MAX), None);
        assert_eq!(sealed_len(usize::MAX - SEAL_HEADROOM - ICV_LEN - 2), None);
    }

    #[test]
    fn trailer_round_trips() {
        for pad_len in 0..=255u8 {
            let trailer = Trailer {
                pad_len,
                next_header: NextHeader::IPV6,
            };
            let mut plaintext = vec![0xee; 5 + trailer.len()];
            trailer.emit(&mut plaintext[5..]);
            assert_eq!(Trailer::parse(&plaintext), Ok(trailer));
        }
    }

    #[test]
    fn trailer_padding_must_count_up_from_one() {
        // payload "ab", padding 1 2 3 with the 2 replaced, pad length 3, next header 4
        let plaintext = [0xab, 1, 9, 3, 3, 4];
        assert_eq!(
            Trailer::parse(&plaintext),
            Err(TrailerError::BadPadding {
                position: 2,
                found: 9
            })
        );
        // zero-filled padding, which some stacks send, is not the RFC default
        let plaintext = [0xab, 0, 0, 2, 4];
        assert_eq!(
            Trailer::parse(&plaintext),
            Err(TrailerError::BadPadding {
                position: 1,
                found: 0
            })
        );
    }

    #[test]
    fn trailer_rejects_short_and_overlong() {
        assert_eq!(
            Trailer::parse(&[]),
            Err(TrailerError::Truncated { len: 0, min: 2 })
        );
        assert_eq!(
            Trailer::parse(&[4]),
            Err(TrailerError::Truncated { len: 1, min: 2 })
        );
        assert_eq!(
            Trailer::parse(&[1, 2, 3, 4]),
            Err(TrailerError::PadLengthTooLong {
                pad_len: 3,
                available: 2
            })
        );
        // the whole plaintext is padding: empty payload
        let trailer = Trailer::parse(&[1, 2, 2, 59]).unwrap();
        assert_eq!(trailer.len(), 4);
        assert_eq!(trailer.next_header, NextHeader::NO_NEXT_HEADER);
    }

    #[test]
    fn next_header_debug_names_the_tunnel_protocols() {
        assert_eq!(format!("{:?}", NextHeader::from(4)), "Ipv4");
        assert_eq!(format!("{:?}", NextHeader::from(41)), "Ipv6");
        assert_eq!(format!("{:?}", NextHeader::from(59)), "NoNextHeader");
        assert_eq!(format!("{:?}", NextHeader::from(17)), "NextHeader(17)");
        assert_eq!(u8::from(NextHeader::IPV6), 41);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_codec(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(packet) = Packet::new_checked(&bytes[..]) {
                let _ = (packet.spi(), packet.sequence_number(), packet.iv(), packet.icv());
                prop_assert_eq!(
                    packet.ciphertext().len() + SEAL_HEADROOM + ICV_LEN,
                    bytes.len()
                );
                if let Ok(repr) = Repr::parse(&packet) {
                    prop_assert_eq!(repr.buffer_len(), bytes.len());
                }
            }
            if let Ok(trailer) = Trailer::parse(&bytes) {
                prop_assert!(trailer.len() <= bytes.len());
            }
        }

        #[test]
        fn emitted_trailers_parse_back(
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            next_header in any::<u8>(),
        ) {
            let trailer = Trailer::for_payload(payload.len(), NextHeader(next_header));
            let mut plaintext = payload.clone();
            plaintext.resize(payload.len() + trailer.len(), 0);
            trailer.emit(&mut plaintext[payload.len()..]);
            prop_assert_eq!(plaintext.len() % ALIGN, 0);
            let parsed = Trailer::parse(&plaintext).unwrap();
            prop_assert_eq!(parsed, trailer);
            prop_assert_eq!(&plaintext[..plaintext.len() - parsed.len()], &payload[..]);
        }
    }
}
