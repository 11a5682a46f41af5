//! The algorithms we negotiate, mapped to and from transform IDs.

use serde::{Deserialize, Serialize};

use crate::wire::{Transform, TransformType, dh_id, encr_id, prf_id};

/// Encryption algorithm of the SK payload or of ESP.
///
/// Only AEAD ciphers exist today; a non-AEAD cipher (AES-CBC) would add a
/// variant here, an `IntegAlg` next to it in the suites, and the SK_a keys that
/// [`crate::crypto::keys`] already derives with zero length for AEADs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EncrAlg {
    /// AES-GCM with a 16-octet ICV, RFC 5282 (IKE) / RFC 4106 (ESP).
    AesGcm16 { key_bits: u16 },
}

impl EncrAlg {
    pub const AES128_GCM16: Self = Self::AesGcm16 { key_bits: 128 };
    pub const AES256_GCM16: Self = Self::AesGcm16 { key_bits: 256 };

    pub fn transform(self) -> Transform {
        match self {
            Self::AesGcm16 { key_bits } => {
                Transform::with_key_length(TransformType::ENCR, encr_id::AES_GCM_16, key_bits)
            }
        }
    }

    pub fn from_transform(t: &Transform) -> Option<Self> {
        match (t.id, t.key_length) {
            (encr_id::AES_GCM_16, Some(bits @ (128 | 256))) => {
                Some(Self::AesGcm16 { key_bits: bits })
            }
            _ => None,
        }
    }

    pub fn key_len(self) -> usize {
        match self {
            Self::AesGcm16 { key_bits } => key_bits as usize / 8,
        }
    }

    /// Octets of keying material taken per direction: key plus the 4-octet
    /// salt for GCM (RFC 5282 §7.1, RFC 4106 §8.1).
    pub fn keymat_len(self) -> usize {
        match self {
            Self::AesGcm16 { .. } => self.key_len() + 4,
        }
    }

    pub fn iv_len(self) -> usize {
        8
    }

    pub fn icv_len(self) -> usize {
        16
    }

    pub fn is_aead(self) -> bool {
        true
    }
}

/// Pseudo-random function, RFC 7296 §3.3.2 / RFC 4868.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrfAlg {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl PrfAlg {
    pub fn transform(self) -> Transform {
        let id = match self {
            Self::HmacSha256 => prf_id::HMAC_SHA2_256,
            Self::HmacSha384 => prf_id::HMAC_SHA2_384,
            Self::HmacSha512 => prf_id::HMAC_SHA2_512,
        };
        Transform::new(TransformType::PRF, id)
    }

    pub fn from_transform(t: &Transform) -> Option<Self> {
        if t.key_length.is_some() {
            return None;
        }
        match t.id {
            prf_id::HMAC_SHA2_256 => Some(Self::HmacSha256),
            prf_id::HMAC_SHA2_384 => Some(Self::HmacSha384),
            prf_id::HMAC_SHA2_512 => Some(Self::HmacSha512),
            _ => None,
        }
    }

    /// Output length, which is also the length of SK_d, SK_pi and SK_pr (§2.14).
    pub fn output_len(self) -> usize {
        match self {
            Self::HmacSha256 => 32,
            Self::HmacSha384 => 48,
            Self::HmacSha512 => 64,
        }
    }
}

/// Key exchange (Diffie-Hellman) group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DhGroup {
    /// 256-bit random ECP group, RFC 5903 (group 19).
    Ecp256,
    /// Curve25519, RFC 8031 (group 31).
    Curve25519,
    /// 2048-bit MODP group, RFC 3526 §3 (group 14).
    Modp2048,
}

impl DhGroup {
    pub fn id(self) -> u16 {
        match self {
            Self::Ecp256 => dh_id::ECP_256,
            Self::Curve25519 => dh_id::CURVE25519,
            Self::Modp2048 => dh_id::MODP_2048,
        }
    }

    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            dh_id::ECP_256 => Some(Self::Ecp256),
            dh_id::CURVE25519 => Some(Self::Curve25519),
            dh_id::MODP_2048 => Some(Self::Modp2048),
            _ => None,
        }
    }

    pub fn transform(self) -> Transform {
        Transform::new(TransformType::DH, self.id())
    }

    /// Length of the public value in a KE payload.
    pub fn public_len(self) -> usize {
        match self {
            Self::Ecp256 => 64,
            Self::Curve25519 => 32,
            Self::Modp2048 => 256,
        }
    }
}

/// What an IKE SA negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeSuite {
    pub encr: EncrAlg,
    pub prf: PrfAlg,
    pub dh: DhGroup,
}

/// What a child SA negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspSuite {
    pub encr: EncrAlg,
    pub esn: bool,
    /// PFS group of the CREATE_CHILD_SA exchange that made the SA, if any.
    pub dh: Option<DhGroup>,
}
