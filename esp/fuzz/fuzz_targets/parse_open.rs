//! Arbitrary bytes against everything that reads untrusted input: the packet
//! codec, the UDP/4500 classifier, the trailer parser and `InboundSa::open`
//! with a fixed key, on raw bytes and on authentic packets whose plaintext
//! the fuzzer chooses. Also a seal/open round trip of fuzzer payloads.
//!
//! Input: one flags byte (bit 0: ESN; bits 1..: next header for the round
//! trip), then the body.

#![no_main]

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, KeyInit};
use evpc_esp::{
    InboundConfig, InboundSa, Keymat, NextHeader, OpenError, Opened, OutboundConfig, OutboundSa,
    Packet, Repr, Suite, Trailer, classify, sealed_len,
};
use libfuzzer_sys::fuzz_target;

const SPI: u32 = 0x0000_1234;
const KEYMAT: [u8; 20] = [
    0x4c, 0x80, 0xcd, 0xef, 0xbb, 0x5d, 0x10, 0xda, 0x90, 0x6a, 0xc7, 0x3c, 0x36, 0x13, 0xa6, 0x34,
    0x2e, 0x44, 0x3b, 0x68,
];

fn inbound(esn: bool) -> InboundSa {
    InboundSa::new(InboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm128, &KEYMAT).unwrap(),
        esn,
        window_size: 64,
        checkpoint: 0,
    })
    .unwrap()
}

fn codec(body: &[u8]) {
    if let Ok(packet) = Packet::new_checked(body) {
        let _ = (
            packet.spi(),
            packet.sequence_number(),
            packet.iv(),
            packet.icv(),
        );
        if let Ok(repr) = Repr::parse(&packet) {
            assert_eq!(repr.buffer_len(), body.len());
        }
    }
    if let Ok(trailer) = Trailer::parse(body) {
        assert!(trailer.len() <= body.len());
    }
    let _ = classify(body);
}

/// Raw bytes, once as they are and once with the SPI forced to the SA's so
/// that the replay and ICV checks see them. Nothing may authenticate.
fn open_raw(esn: bool, body: &[u8]) {
    let mut rx = inbound(esn);
    let mut packet = body.to_vec();
    if let Ok(opened) = rx.open(&mut packet) {
        panic!("forged packet accepted: {opened:?}");
    }
    if packet.len() >= 4 {
        packet.copy_from_slice(body);
        packet[..4].copy_from_slice(&SPI.to_be_bytes());
        let result = rx.open(&mut packet);
        assert!(result.is_err(), "forged packet accepted: {result:?}");
        assert_eq!(rx.highest_authenticated(), 0, "a forgery moved the window");
    }
}

/// `body` = 4 bytes of sequence number, then the plaintext (payload and a
/// trailer, well-formed or not), encrypted here under the SA's key.
fn open_authentic(esn: bool, body: &[u8]) {
    let Some((seq, plaintext)) = body.split_first_chunk::<4>() else {
        return;
    };
    let low = u32::from_be_bytes(*seq);
    let iv = u64::from(low).to_be_bytes();
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&KEYMAT[16..]);
    nonce[4..].copy_from_slice(&iv);
    // a fresh SA has highest 0, so the high half it reconstructs is 0
    let mut aad = Vec::from(SPI.to_be_bytes());
    if esn {
        aad.extend_from_slice(&[0; 4]);
    }
    aad.extend_from_slice(&low.to_be_bytes());

    let cipher = Aes128Gcm::new_from_slice(&KEYMAT[..16]).unwrap();
    let mut ciphertext = plaintext.to_vec();
    let icv = cipher
        .encrypt_inout_detached(&nonce.into(), &aad, ciphertext.as_mut_slice().into())
        .unwrap();
    let mut packet = Vec::from(SPI.to_be_bytes());
    packet.extend_from_slice(&low.to_be_bytes());
    packet.extend_from_slice(&iv);
    packet.extend_from_slice(&ciphertext);
    packet.extend_from_slice(&icv);

    let mut rx = inbound(esn);
    match rx.open(&mut packet) {
        Ok(Opened::Packet {
            seq,
            payload,
            next_header,
        }) => {
            assert_eq!(seq, u64::from(low));
            let trailer = Trailer::parse(plaintext).unwrap();
            assert_eq!(next_header, trailer.next_header);
            assert_eq!(payload, &plaintext[..plaintext.len() - trailer.len()]);
        }
        Ok(Opened::Dummy { seq }) => {
            assert_eq!(seq, u64::from(low));
            assert_eq!(plaintext.last(), Some(&59));
        }
        Err(OpenError::AuthenticationFailed) => panic!("authentic packet refused"),
        Err(
            OpenError::ZeroSequence
            | OpenError::OutsideWindow { .. }
            | OpenError::Truncated { .. }
            | OpenError::BadPadding { .. }
            | OpenError::PadLengthTooLong { .. },
        ) => {}
        Err(other) => panic!("unexpected {other:?}"),
    }
}

fn round_trip(esn: bool, next_header: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(2048)];
    let mut tx = OutboundSa::new(OutboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm128, &KEYMAT).unwrap(),
        esn,
        first_seq: 1,
        limit: 1,
    })
    .unwrap();
    let mut packet = vec![0u8; sealed_len(payload.len()).unwrap()];
    let len = tx
        .seal(payload, NextHeader(next_header), &mut packet)
        .unwrap();
    assert_eq!(len, packet.len());
    let mut rx = inbound(esn);
    match rx.open(&mut packet) {
        Ok(Opened::Packet {
            seq: 1,
            payload: opened,
            next_header: got,
        }) => {
            assert_eq!(opened, payload);
            assert_eq!(got, NextHeader(next_header));
        }
        Ok(Opened::Dummy { seq: 1 }) => assert_eq!(next_header, 59),
        other => panic!("round trip failed: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else {
        return;
    };
    let esn = flags & 1 != 0;
    codec(body);
    open_raw(esn, body);
    open_authentic(esn, body);
    round_trip(esn, flags >> 1, body);
});
