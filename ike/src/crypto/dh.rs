//! Ephemeral key exchange for groups 19 (ECP-256, RFC 5903), 31
//! (Curve25519, RFC 8031) and 14 (2048-bit MODP, RFC 3526).
//!
//! The private value is kept as plain bytes in a [`Secret`] so that a pending
//! exchange (our CREATE_CHILD_SA request with a KE payload) can be committed
//! and finished by another node after a fail-over.

use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, U512, U2048};
use serde::{Deserialize, Serialize};

use super::secret::Secret;
use super::suite::DhGroup;
use crate::Random;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DhError {
    #[error("public value has the wrong length for {group:?}")]
    BadLength { group: DhGroup },
    #[error("public value is not a valid point")]
    InvalidPoint,
    #[error("shared secret is degenerate (low-order point)")]
    NonContributory,
    #[error("MODP public value outside 2..p-2")]
    OutOfRange,
}

/// The RFC 3526 §3 prime, 2^2048 - 2^1984 - 1 + 2^64 * ([2^1918 pi] + 124476).
const MODP_2048_P: &str = "ffffffffffffffffc90fdaa22168c234c4c6628b80dc1cd129024e088a67cc74020bbea63b139b22514a08798e3404ddef9519b3cd3a431b302b0a6df25f14374fe1356d6d51c245e485b576625e7ec6f44c42e9a637ed6b0bff5cb6f406b7edee386bfb5a899fa5ae9f24117c4b1fe649286651ece45b3dc2007cb8a163bf0598da48361c55d39a69163fa8fd24cf5f83655d23dca3ad961c62f356208552bb9ed529077096966d670c354e4abc9804f1746c08ca18217c32905e462e36ce3be39e772c180e86039b2783a2ec07a28fb5c55df06f4c52c9de2bcbf6955817183995497cea956ae515d2261898fa051015728e5a8aacaa68ffffffffffffffff";

/// Private exponents are 512 bits: twice the 112-bit strength of the group
/// with margin, at a quarter of the cost of a full-size exponent (RFC 3526 §8).
const MODP_EXPONENT_BYTES: usize = 64;

fn modp_params() -> FixedMontyParams<{ U2048::LIMBS }> {
    let p = U2048::from_be_hex(MODP_2048_P);
    FixedMontyParams::new_vartime(Odd::new(p).expect("RFC 3526 prime is odd"))
}

fn modp_pow(base: &U2048, exponent: &[u8]) -> Vec<u8> {
    let params = modp_params();
    let e = U512::from_be_slice(exponent);
    let r = FixedMontyForm::new(base, &params).pow(&e).retrieve();
    // Big-endian and zero-padded to the modulus length (§2.14 for g^ir too).
    r.to_be_bytes().as_ref().to_vec()
}

/// Our half of a key exchange.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DhPrivate {
    pub group: DhGroup,
    secret: Secret,
}

impl DhPrivate {
    pub fn generate(group: DhGroup, rng: &mut dyn Random) -> Self {
        if group == DhGroup::Modp2048 {
            let mut e = vec![0u8; MODP_EXPONENT_BYTES];
            rng.fill(&mut e);
            return Self {
                group,
                secret: Secret::new(e),
            };
        }
        let mut bytes = [0u8; 32];
        match group {
            DhGroup::Curve25519 | DhGroup::Modp2048 => rng.fill(&mut bytes),
            DhGroup::Ecp256 => loop {
                // Rejection sampling: retry the (2^-32-likely) out-of-range scalar.
                rng.fill(&mut bytes);
                if p256::SecretKey::from_slice(&bytes).is_ok() {
                    break;
                }
            },
        }
        let secret = Secret::from_slice(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        Self { group, secret }
    }

    /// Whether the private value is usable (it may come from a snapshot).
    pub fn is_valid(&self) -> bool {
        match self.group {
            DhGroup::Curve25519 => self.secret.len() == 32,
            DhGroup::Ecp256 => p256::SecretKey::from_slice(self.secret.expose()).is_ok(),
            DhGroup::Modp2048 => self.secret.len() == MODP_EXPONENT_BYTES,
        }
    }

    fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&self.secret.expose()[..32]);
        x25519_dalek::StaticSecret::from(bytes)
    }

    fn p256_secret(&self) -> p256::SecretKey {
        p256::SecretKey::from_slice(self.secret.expose())
            .unwrap_or_else(|_| unreachable!("checked at generation"))
    }

    /// The public value as carried in the KE payload: the u-coordinate for
    /// Curve25519, x | y for ECP groups (RFC 5903 §7, no point-format octet).
    pub fn public(&self) -> Vec<u8> {
        match self.group {
            DhGroup::Curve25519 => x25519_dalek::PublicKey::from(&self.x25519_secret())
                .as_bytes()
                .to_vec(),
            DhGroup::Ecp256 => {
                let sec1 = self.p256_secret().public_key().to_sec1_bytes();
                // Uncompressed SEC1: 0x04 | x | y.
                sec1[1..].to_vec()
            }
            DhGroup::Modp2048 => modp_pow(&U2048::from_u8(2), self.secret.expose()),
        }
    }

    /// g^ir: the shared secret (x-coordinate only for ECP, RFC 5903 §7).
    pub fn agree(&self, peer_public: &[u8]) -> Result<Secret, DhError> {
        if peer_public.len() != self.group.public_len() {
            return Err(DhError::BadLength { group: self.group });
        }
        match self.group {
            DhGroup::Curve25519 => {
                let mut p = [0u8; 32];
                p.copy_from_slice(peer_public);
                let shared = self
                    .x25519_secret()
                    .diffie_hellman(&x25519_dalek::PublicKey::from(p));
                if !shared.was_contributory() {
                    return Err(DhError::NonContributory);
                }
                Ok(Secret::from_slice(shared.as_bytes()))
            }
            DhGroup::Ecp256 => {
                let mut sec1 = Vec::with_capacity(65);
                sec1.push(0x04);
                sec1.extend_from_slice(peer_public);
                let pk =
                    p256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| DhError::InvalidPoint)?;
                let shared = self.p256_secret().diffie_hellman(&pk);
                Ok(Secret::from_slice(shared.raw_secret_bytes().as_slice()))
            }
            DhGroup::Modp2048 => {
                let y = U2048::from_be_slice(peer_public);
                let p = U2048::from_be_hex(MODP_2048_P);
                // Reject 0, 1 and p-1 (and anything not reduced): they pin the
                // shared secret to a value an attacker knows.
                if y <= U2048::ONE || y >= p.wrapping_sub(&U2048::ONE) {
                    return Err(DhError::OutOfRange);
                }
                Ok(Secret::new(modp_pow(&y, self.secret.expose())))
            }
        }
    }
}
