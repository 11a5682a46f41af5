//! UDP encapsulation of ESP for NAT traversal (RFC 3948): telling apart the
//! three things that arrive on UDP port 4500.
//!
//! ```text
//! NAT-keepalive   | 0xFF |                                   (RFC 3948 §2.3)
//! IKE             | 0x00000000 (non-ESP marker) | IKE header ... (§2.2)
//! ESP             | SPI != 0 | Sequence Number | ...          (§2.1)
//! ```
//!
//! Sending needs no help: an ESP packet is the UDP payload as it is, and the
//! IKE side prefixes [`NON_ESP_MARKER`] itself.

use thiserror::Error;

/// UDP port for IKE and UDP-encapsulated ESP after NAT detection
/// (RFC 3948 §2, RFC 7296 §2.23).
pub const PORT: u16 = 4500;

/// Four zero bytes in front of IKE messages on port 4500, where an ESP
/// packet would have its SPI; SPI 0 is never used (RFC 3948 §2.2).
pub const NON_ESP_MARKER: [u8; 4] = [0; 4];

/// The one-byte payload of a NAT-keepalive (RFC 3948 §2.3).
pub const NAT_KEEPALIVE: [u8; 1] = [0xff];

/// Shortest ESP packet that the classifier will hand on: SPI and sequence
/// number. [`crate::InboundSa::open`] applies the full minimum.
const MIN_ESP_LEN: usize = 8;

/// What a UDP/4500 payload carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<T> {
    /// An ESP packet: the whole payload, for [`crate::InboundSa::open`].
    Esp(T),
    /// An IKE message with the non-ESP marker already stripped.
    Ike(T),
    /// A NAT-keepalive, to be dropped; it only refreshes NAT state.
    NatKeepalive,
}

/// A UDP/4500 payload that is none of the three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ClassifyError {
    /// Empty payload.
    #[error("empty UDP payload")]
    Empty,
    /// Too short for an ESP header, and not a keepalive or a non-ESP marker.
    #[error("{len}-byte UDP payload is neither a NAT-keepalive, IKE nor ESP")]
    Unrecognized {
        /// Payload length.
        len: usize,
    },
}

#[derive(Clone, Copy)]
enum Kind {
    Esp,
    Ike,
    NatKeepalive,
}

fn kind(payload: &[u8]) -> Result<Kind, ClassifyError> {
    match payload {
        [] => Err(ClassifyError::Empty),
        [0xff] => Ok(Kind::NatKeepalive),
        [0, 0, 0, 0, ..] => Ok(Kind::Ike),
        _ if payload.len() >= MIN_ESP_LEN => Ok(Kind::Esp),
        _ => Err(ClassifyError::Unrecognized { len: payload.len() }),
    }
}

/// Classifies a UDP/4500 payload, borrowing it.
pub fn classify(payload: &[u8]) -> Result<Datagram<&[u8]>, ClassifyError> {
    Ok(match kind(payload)? {
        Kind::Esp => Datagram::Esp(payload),
        Kind::Ike => Datagram::Ike(&payload[NON_ESP_MARKER.len()..]),
        Kind::NatKeepalive => Datagram::NatKeepalive,
    })
}

/// Classifies a UDP/4500 payload, borrowing it mutably so that ESP can be
/// opened in place.
pub fn classify_mut(payload: &mut [u8]) -> Result<Datagram<&mut [u8]>, ClassifyError> {
    Ok(match kind(payload)? {
        Kind::Esp => Datagram::Esp(payload),
        Kind::Ike => Datagram::Ike(&mut payload[NON_ESP_MARKER.len()..]),
        Kind::NatKeepalive => Datagram::NatKeepalive,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keepalive() {
        assert_eq!(classify(&NAT_KEEPALIVE), Ok(Datagram::NatKeepalive));
        assert_eq!(classify_mut(&mut [0xff]), Ok(Datagram::NatKeepalive));
    }

    #[test]
    fn ike_loses_its_marker() {
        let mut datagram = NON_ESP_MARKER.to_vec();
        datagram.extend_from_slice(b"IKE_SA_INIT...");
        assert_eq!(
            classify(&datagram),
            Ok(Datagram::Ike(&b"IKE_SA_INIT..."[..]))
        );
        // an empty IKE message is still IKE's business to reject
        assert_eq!(classify(&[0, 0, 0, 0]), Ok(Datagram::Ike(&[][..])));
    }

    #[test]
    fn esp_is_passed_whole() {
        let datagram = [0, 0, 1, 0, 0, 0, 0, 1, 0xaa];
        assert_eq!(classify(&datagram), Ok(Datagram::Esp(&datagram[..])));
        let mut copy = datagram;
        match classify_mut(&mut copy) {
            Ok(Datagram::Esp(esp)) => esp[8] = 0xbb,
            other => panic!("{other:?}"),
        }
        assert_eq!(copy[8], 0xbb);
    }

    #[test]
    fn short_or_empty_is_unrecognized() {
        assert_eq!(classify(&[]), Err(ClassifyError::Empty));
        assert_eq!(
            classify(&[0xfe]),
            Err(ClassifyError::Unrecognized { len: 1 })
        );
        assert_eq!(
            classify(&[0, 0, 0]),
            Err(ClassifyError::Unrecognized { len: 3 })
        );
        assert_eq!(
            classify(&[0xff, 0xff]),
            Err(ClassifyError::Unrecognized { len: 2 })
        );
        assert_eq!(
            classify(&[1, 2, 3, 4, 5, 6, 7]),
            Err(ClassifyError::Unrecognized { len: 7 })
        );
    }

    proptest! {
        #[test]
        fn every_payload_gets_exactly_one_answer(payload in proptest::collection::vec(any::<u8>(), 0..32)) {
            match classify(&payload) {
                Ok(Datagram::Esp(esp)) => {
                    prop_assert_eq!(esp, &payload[..]);
                    prop_assert_ne!(&payload[..4], &NON_ESP_MARKER[..]);
                }
                Ok(Datagram::Ike(ike)) => prop_assert_eq!(ike, &payload[4..]),
                Ok(Datagram::NatKeepalive) => prop_assert_eq!(&payload[..], &NAT_KEEPALIVE[..]),
                Err(_) => prop_assert!(payload.len() < MIN_ESP_LEN),
            }
        }
    }
}
