//! The Encrypted and Authenticated (SK) payload, RFC 7296 §3.14, with AES-GCM
//! as specified for IKEv2 by RFC 5282.
//!
//! Layout: IKE header | SK generic header | IV (8) | ciphertext | ICV (16).
//! The associated data is everything before the IV (RFC 5282 §5.1); the nonce
//! is the 4-octet salt from the end of SK_e followed by the IV (RFC 5282 §4).

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit};

use super::suite::EncrAlg;
use crate::wire::{
    self, Chain, EncryptedPart, GENERIC_HEADER_LEN, HEADER_LEN, Header, Payload, PayloadType,
    WireError,
};

/// Why an SK payload could not be opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SkError {
    /// Too short, bad padding or a failed ICV check; indistinguishable on
    /// purpose, and always dropped silently (RFC 7296 §2.21).
    #[error("SK payload failed the integrity check")]
    Integrity,
    #[error("decrypted payloads are malformed: {0}")]
    Inner(WireError),
}

fn gcm_seal(encr: EncrAlg, key: &[u8], nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
    let k = &key[..encr.key_len()];
    let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::from(*nonce);
    let tag = match encr {
        EncrAlg::AesGcm16 { key_bits: 128 } => Aes128Gcm::new_from_slice(k)
            .ok()
            .and_then(|c| c.encrypt_inout_detached(&nonce, aad, buf.into()).ok()),
        EncrAlg::AesGcm16 { .. } => Aes256Gcm::new_from_slice(k)
            .ok()
            .and_then(|c| c.encrypt_inout_detached(&nonce, aad, buf.into()).ok()),
    };
    let mut out = [0u8; 16];
    // Keys come from our own derivation with the right length, and IKE messages
    // are far below the GCM size limits, so encryption cannot fail.
    out.copy_from_slice(tag.expect("AES-GCM seal with a well-formed key").as_slice());
    out
}

fn gcm_open(
    encr: EncrAlg,
    key: &[u8],
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8],
) -> Result<(), SkError> {
    let k = &key[..encr.key_len()];
    let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U12>::from(*nonce);
    let tag = aes_gcm::Tag::try_from(tag).map_err(|_| SkError::Integrity)?;
    let ok = match encr {
        EncrAlg::AesGcm16 { key_bits: 128 } => Aes128Gcm::new_from_slice(k)
            .map_err(|_| SkError::Integrity)?
            .decrypt_inout_detached(&nonce, aad, buf.into(), &tag)
            .is_ok(),
        EncrAlg::AesGcm16 { .. } => Aes256Gcm::new_from_slice(k)
            .map_err(|_| SkError::Integrity)?
            .decrypt_inout_detached(&nonce, aad, buf.into(), &tag)
            .is_ok(),
    };
    if ok { Ok(()) } else { Err(SkError::Integrity) }
}

fn nonce(encr: EncrAlg, key: &[u8], iv: &[u8; 8]) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&key[encr.key_len()..encr.key_len() + 4]);
    n[4..].copy_from_slice(iv);
    n
}

/// Builds a complete protected message. `key` is SK_ei or SK_er (key | salt);
/// `iv` must never repeat under one key, so callers draw it from the RNG
/// rather than a counter that a fail-over could reset.
pub fn seal_message(
    header: Header,
    inner: &[Payload],
    encr: EncrAlg,
    key: &[u8],
    iv: [u8; 8],
) -> Vec<u8> {
    let mut plain = Vec::new();
    let first_inner = wire::emit_chain(inner, &mut plain);
    let out = seal_chain_bytes(header, first_inner, &plain, encr, key, iv);
    zeroize::Zeroize::zeroize(&mut plain);
    out
}

/// Seals an already encoded inner payload chain. Exposed so that tests and
/// fuzzers can put arbitrary (even malformed) payloads behind a valid ICV.
pub fn seal_chain_bytes(
    mut header: Header,
    first_inner: PayloadType,
    chain: &[u8],
    encr: EncrAlg,
    key: &[u8],
    iv: [u8; 8],
) -> Vec<u8> {
    // GCM needs no padding; the Pad Length octet is still mandatory (§3.14).
    let plain_len = chain.len() + 1;
    let sk_len = GENERIC_HEADER_LEN + encr.iv_len() + plain_len + encr.icv_len();
    header.next_payload = PayloadType::SK;
    header.length = (HEADER_LEN + sk_len) as u32;
    let mut out = Vec::with_capacity(header.length as usize);
    header.emit(&mut out);
    out.push(first_inner.0);
    out.push(0);
    out.extend_from_slice(&(sk_len as u16).to_be_bytes());
    let aad_len = out.len();
    out.extend_from_slice(&iv);
    let ct_start = out.len();
    out.extend_from_slice(chain);
    out.push(0);
    let n = nonce(encr, key, &iv);
    let (aad, rest) = out.split_at_mut(aad_len);
    let tag = gcm_seal(encr, key, &n, aad, &mut rest[ct_start - aad_len..]);
    out.extend_from_slice(&tag);
    out
}

/// Verifies and decrypts the SK payload of `buf`, returning the inner chain.
pub fn open_message(
    buf: &[u8],
    part: EncryptedPart,
    encr: EncrAlg,
    key: &[u8],
) -> Result<Chain, SkError> {
    let body_offset = part.body_offset();
    let body = buf.get(body_offset..).ok_or(SkError::Integrity)?;
    let iv_len = encr.iv_len();
    let icv_len = encr.icv_len();
    if body.len() < iv_len + 1 + icv_len {
        return Err(SkError::Integrity);
    }
    let mut iv = [0u8; 8];
    iv.copy_from_slice(&body[..iv_len]);
    let (ct, tag) = body[iv_len..].split_at(body.len() - iv_len - icv_len);
    let mut plain = ct.to_vec();
    let n = nonce(encr, key, &iv);
    gcm_open(encr, key, &n, &buf[..body_offset], &mut plain, tag)?;
    let pad_len = *plain.last().ok_or(SkError::Integrity)? as usize;
    if pad_len + 1 > plain.len() {
        return Err(SkError::Integrity);
    }
    let inner_len = plain.len() - pad_len - 1;
    let chain =
        wire::parse_chain(part.first_inner, &plain[..inner_len], 0, false).map_err(SkError::Inner);
    zeroize::Zeroize::zeroize(&mut plain);
    chain
}
