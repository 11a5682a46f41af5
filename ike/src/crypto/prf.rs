//! prf and prf+ (RFC 7296 §2.13) over HMAC-SHA2 (RFC 4868).

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Sha256, Sha384, Sha512};

use super::secret::Secret;
use super::suite::PrfAlg;

fn hmac<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <M as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `prf(key, parts[0] | parts[1] | ...)`.
pub fn prf(alg: PrfAlg, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    match alg {
        PrfAlg::HmacSha256 => hmac::<Hmac<Sha256>>(key, parts),
        PrfAlg::HmacSha384 => hmac::<Hmac<Sha384>>(key, parts),
        PrfAlg::HmacSha512 => hmac::<Hmac<Sha512>>(key, parts),
    }
}

/// prf+(K, S) = T1 | T2 | ..., T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n),
/// truncated to `len`. At most 255 blocks can be produced (§2.13).
pub fn prf_plus(alg: PrfAlg, key: &[u8], seed: &[u8], len: usize) -> Secret {
    let mut out = Vec::with_capacity(len + alg.output_len());
    let mut t: Vec<u8> = Vec::new();
    let mut counter: u8 = 1;
    while out.len() < len {
        let block = prf(alg, key, &[&t, seed, &[counter]]);
        out.extend_from_slice(&block);
        t = block;
        counter = counter
            .checked_add(1)
            .expect("prf+ asked for more than 255 blocks");
    }
    zeroize::Zeroize::zeroize(&mut out[len..]);
    out.truncate(len);
    zeroize::Zeroize::zeroize(&mut t);
    Secret::new(out)
}
