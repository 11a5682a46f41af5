//! AES-GCM with a 16-byte ICV in ESP (RFC 4106): keying material, nonce and
//! AAD construction. Everything that touches key bytes lives here.

use core::fmt;

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, Aes256Gcm, KeyInit, Tag};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::ConfigError;
use crate::packet::{ICV_LEN, IV_LEN};

/// Length of the salt that ends the KEYMAT and starts every nonce (RFC 4106 §4, §8.1).
pub const SALT_LEN: usize = 4;

/// Longest KEYMAT: a 256-bit key and the salt.
const MAX_KEYMAT_LEN: usize = 32 + SALT_LEN;

/// AAD length without ESN: SPI and 32-bit sequence number (RFC 4106 §5).
const AAD_LEN: usize = 8;
/// AAD length with ESN: SPI, high and low halves of the 64-bit sequence number (RFC 4106 §5).
const AAD_LEN_ESN: usize = 12;

/// The cipher suite of an SA: AES-GCM with a 16-byte ICV, IKEv2 transform
/// `ENCR_AES_GCM_16` (id 20) with a 128- or 256-bit key attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// AES-128-GCM-16: 16-byte key.
    AesGcm128,
    /// AES-256-GCM-16: 32-byte key.
    AesGcm256,
}

impl Suite {
    /// Length of the AES key.
    pub const fn key_len(self) -> usize {
        match self {
            Suite::AesGcm128 => 16,
            Suite::AesGcm256 => 32,
        }
    }

    /// Length of the KEYMAT IKE must supply: key followed by salt (RFC 4106 §8.1).
    pub const fn keymat_len(self) -> usize {
        self.key_len() + SALT_LEN
    }
}

/// Keying material for one direction of one SA: the AES key followed by the
/// 4-byte salt, exactly as IKEv2 derives it (RFC 4106 §8.1).
///
/// The bytes are wiped when the value is dropped and never appear in `Debug`
/// output. There is deliberately no `Clone`: the key moves into one SA.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Keymat {
    #[zeroize(skip)]
    suite: Suite,
    // Boxed so that moving a Keymat (into a config, into an SA) moves a
    // pointer and leaves no unwiped copy of the key behind.
    bytes: Box<[u8; MAX_KEYMAT_LEN]>,
}

impl Keymat {
    /// Copies KEYMAT of exactly [`Suite::keymat_len`] bytes. The caller
    /// should wipe its own copy.
    pub fn new(suite: Suite, keymat: &[u8]) -> Result<Keymat, ConfigError> {
        if keymat.len() != suite.keymat_len() {
            return Err(ConfigError::KeymatLength {
                suite,
                expected: suite.keymat_len(),
                found: keymat.len(),
            });
        }
        let mut bytes = Box::new([0; MAX_KEYMAT_LEN]);
        bytes[..keymat.len()].copy_from_slice(keymat);
        Ok(Keymat { suite, bytes })
    }

    /// The suite this KEYMAT is for.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    fn key(&self) -> &[u8] {
        &self.bytes[..self.suite.key_len()]
    }

    fn salt(&self) -> [u8; SALT_LEN] {
        let mut salt = [0; SALT_LEN];
        let start = self.suite.key_len();
        salt.copy_from_slice(&self.bytes[start..start + SALT_LEN]);
        salt
    }
}

impl fmt::Debug for Keymat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keymat")
            .field("suite", &self.suite)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

/// The AEAD failed: on open the ICV did not verify, on seal the input was
/// longer than GCM allows. Carries nothing, by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CryptoError;

/// Expanded key schedule plus salt: what an SA keeps instead of the KEYMAT.
/// The aes-gcm `zeroize` feature wipes the round keys and GHASH key on drop.
pub(crate) struct Cipher {
    aead: Aead,
    salt: [u8; SALT_LEN],
}

enum Aead {
    // Boxed so that moving an SA (into a map, across threads) copies a
    // pointer rather than leaving stale, never-wiped copies of the round keys
    // behind in the memory it moved out of.
    Aes128(Box<Aes128Gcm>),
    Aes256(Box<Aes256Gcm>),
}

impl Cipher {
    pub(crate) fn new(keymat: &Keymat) -> Result<Cipher, ConfigError> {
        let length_error = |_| ConfigError::KeymatLength {
            suite: keymat.suite,
            expected: keymat.suite.keymat_len(),
            found: keymat.key().len() + SALT_LEN,
        };
        let aead = match keymat.suite {
            Suite::AesGcm128 => Aead::Aes128(Box::new(
                Aes128Gcm::new_from_slice(keymat.key()).map_err(length_error)?,
            )),
            Suite::AesGcm256 => Aead::Aes256(Box::new(
                Aes256Gcm::new_from_slice(keymat.key()).map_err(length_error)?,
            )),
        };
        Ok(Cipher {
            aead,
            salt: keymat.salt(),
        })
    }

    pub(crate) fn suite(&self) -> Suite {
        match self.aead {
            Aead::Aes128(_) => Suite::AesGcm128,
            Aead::Aes256(_) => Suite::AesGcm256,
        }
    }

    /// Encrypts `buffer` in place and returns the ICV.
    pub(crate) fn seal(
        &self,
        iv: &[u8; IV_LEN],
        aad: &Aad,
        buffer: &mut [u8],
    ) -> Result<[u8; ICV_LEN], CryptoError> {
        let nonce = self.nonce(iv);
        let tag = match &self.aead {
            Aead::Aes128(aead) => {
                aead.encrypt_inout_detached(&nonce.into(), aad.as_bytes(), buffer.into())
            }
            Aead::Aes256(aead) => {
                aead.encrypt_inout_detached(&nonce.into(), aad.as_bytes(), buffer.into())
            }
        }
        .map_err(|_| CryptoError)?;
        Ok(tag.into())
    }

    /// Verifies `icv` over `aad` and `buffer`, then decrypts `buffer` in
    /// place. On failure `buffer` is left as it was.
    pub(crate) fn open(
        &self,
        iv: &[u8; IV_LEN],
        aad: &Aad,
        buffer: &mut [u8],
        icv: &[u8; ICV_LEN],
    ) -> Result<(), CryptoError> {
        let nonce = self.nonce(iv);
        let tag = Tag::from(*icv);
        match &self.aead {
            Aead::Aes128(aead) => {
                aead.decrypt_inout_detached(&nonce.into(), aad.as_bytes(), buffer.into(), &tag)
            }
            Aead::Aes256(aead) => {
                aead.decrypt_inout_detached(&nonce.into(), aad.as_bytes(), buffer.into(), &tag)
            }
        }
        .map_err(|_| CryptoError)
    }

    /// Nonce = salt || explicit IV (RFC 4106 §4).
    fn nonce(&self, iv: &[u8; IV_LEN]) -> [u8; SALT_LEN + IV_LEN] {
        let mut nonce = [0; SALT_LEN + IV_LEN];
        nonce[..SALT_LEN].copy_from_slice(&self.salt);
        nonce[SALT_LEN..].copy_from_slice(iv);
        nonce
    }
}

impl Drop for Cipher {
    fn drop(&mut self) {
        self.salt.zeroize();
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cipher")
            .field("suite", &self.suite())
            .finish_non_exhaustive()
    }
}

/// The explicit IV for a packet: the full 64-bit sequence number. Sequence
/// numbers never repeat within an SA, so neither does the IV, which is all
/// RFC 4106 §3.1 asks; a counter is the construction it recommends.
pub(crate) fn iv_for(seq: u64) -> [u8; IV_LEN] {
    seq.to_be_bytes()
}

/// Additional authenticated data (RFC 4106 §5): SPI || seq without ESN,
/// SPI || seq high || seq low with ESN, so the ICV covers the high-order
/// bits that are never transmitted.
pub(crate) struct Aad {
    bytes: [u8; AAD_LEN_ESN],
    len: usize,
}

impl Aad {
    pub(crate) fn new(spi: u32, seq: u64, esn: bool) -> Aad {
        let mut bytes = [0; AAD_LEN_ESN];
        bytes[..4].copy_from_slice(&spi.to_be_bytes());
        if esn {
            bytes[4..].copy_from_slice(&seq.to_be_bytes());
            Aad {
                bytes,
                len: AAD_LEN_ESN,
            }
        } else {
            // Without ESN the counter never exceeds 32 bits; truncation is the wire format.
            bytes[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
            Aad {
                bytes,
                len: AAD_LEN,
            }
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn keymat_length_must_match_the_suite() {
        assert!(Keymat::new(Suite::AesGcm128, &[0; 20]).is_ok());
        assert!(Keymat::new(Suite::AesGcm256, &[0; 36]).is_ok());
        assert_eq!(
            Keymat::new(Suite::AesGcm128, &[0; 16]).unwrap_err(),
            ConfigError::KeymatLength {
                suite: Suite::AesGcm128,
                expected: 20,
                found: 16
            }
        );
        assert!(Keymat::new(Suite::AesGcm256, &[0; 20]).is_err());
        assert!(Keymat::new(Suite::AesGcm256, &[0; 37]).is_err());
    }

    #[test]
    fn debug_output_never_shows_key_bytes() {
        let keymat = Keymat::new(Suite::AesGcm128, &[0xab; 20]).unwrap();
        let shown = format!("{keymat:?}");
        assert!(shown.contains("redacted"), "{shown}");
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("ab, "),
            "{shown}"
        );
        let cipher = Cipher::new(&keymat).unwrap();
        let shown = format!("{cipher:?}");
        assert_eq!(shown, "Cipher { suite: AesGcm128, .. }");
    }

    #[test]
    fn zeroize_covers_key_and_salt() {
        let mut keymat = Keymat::new(Suite::AesGcm256, &[0x77; 36]).unwrap();
        keymat.zeroize();
        assert!(keymat.bytes.iter().all(|&byte| byte == 0));
        assert_eq!(keymat.suite(), Suite::AesGcm256);
    }

    #[test]
    fn keymat_splits_into_key_then_salt() {
        let bytes: Vec<u8> = (0..36).collect();
        let keymat = Keymat::new(Suite::AesGcm256, &bytes).unwrap();
        assert_eq!(keymat.key(), &bytes[..32]);
        assert_eq!(keymat.salt(), [32, 33, 34, 35]);
    }

    #[test]
    fn aad_layout_follows_rfc4106_section5() {
        let aad = Aad::new(0x0102_0304, 0x1111_2222_3333_4444, true);
        assert_eq!(aad.as_bytes(), unhex("010203041111222233334444"));
        let aad = Aad::new(0x0102_0304, 0x3333_4444, false);
        assert_eq!(aad.as_bytes(), unhex("0102030433334444"));
    }

    /// Known-answer tests from draft-mcgrew-gcm-test-01 ("Test Cases for the
    /// use of GCM and GMAC in IPsec ESP"): key, salt, SPI, sequence number,
    /// IV, plaintext (payload, padding, pad length, next header) and
    /// ciphertext || ICV. The 192-bit cases are omitted (no such suite here).
    /// They were cross-checked against the Python `cryptography` package.
    pub(crate) struct Vector {
        pub suite: Suite,
        pub keymat: &'static str,
        pub spi: u32,
        pub esn: bool,
        pub seq: u64,
        pub iv: &'static str,
        pub plaintext: &'static str,
        pub ciphertext_icv: &'static str,
    }

    pub(crate) const VECTORS: &[Vector] = &[
        // 32-bit sequence number
        Vector {
            suite: Suite::AesGcm128,
            keymat: "feffe9928665731c6d6a8f9467308308cafebabe",
            spi: 0x0000_a5f8,
            esn: false,
            seq: 0x0000_000a,
            iv: "facedbaddecaf888",
            plaintext: "4500003e698f000080114dccc0a80102c0a801010a980035002a2343b2d00100\
                        0001000000000000037369700963796265726369747902646b00000100010001",
            ciphertext_icv: "deb22cd9b07c72c16e3a65beeb8df304a5a5897d33ae530f1ba76d5d114d2a5c\
                             3de81827c10e9a4f51330d0eec416642cfbb85a5b47e48a4ec3b9ba95d918bd1\
                             83b70d3aa8bc6ee4c309e9d85a41ad4a",
        },
        Vector {
            suite: Suite::AesGcm256,
            keymat: "abbccddef00112233445566778899aababbccddef00112233445566778899aab11223344",
            spi: 0x4a2c_bfe3,
            esn: false,
            seq: 0x0000_0002,
            iv: "0102030405060708",
            plaintext: "4500003069a6400080062690c0a801029389155e0a9e008b2dc57ee000000000\
                        7002400020bf0000020405b40101040201020201",
            ciphertext_icv: "ff425c9b724599df7a3bcd510194e00d6a78107f1b0b1cbf06efae9d65a5d763\
                             748a637985771d347f0545659f14e99def842d8e\
                             b335f4eecfdbf831824b4c4915956c96",
        },
        // 0xffffffff: the last sequence number without ESN; empty payload
        Vector {
            suite: Suite::AesGcm128,
            keymat: "7d773d00c144c525ac619d18c84a3f47d9664267",
            spi: 0x3354_67ae,
            esn: false,
            seq: 0xffff_ffff,
            iv: "43457e9182443bc6",
            plaintext: "01020201",
            ciphertext_icv: "437f866bcb3f699fe9b0822bac961c4504bef270",
        },
        // 64-bit extended sequence numbers: 12-byte AAD
        Vector {
            suite: Suite::AesGcm128,
            keymat: "4c80cdefbb5d10da906ac73c3613a6342e443b68",
            spi: 0x0000_4321,
            esn: true,
            seq: 0x8765_4321_0000_0000,
            iv: "4956ed7e3b244cfe",
            plaintext: "45000048699a000080114db7c0a80102c0a801010a9bf15638d3010000010000\
                        00000000045f736970045f756470037369700963796265726369747902646b00\
                        0021000101020201",
            ciphertext_icv: "fecf537e729d5b07dc30df528dd22b768d1b98736696a6fd348509fa13ceac34\
                             cfa2436f14a3f3cf65925bf1f4a13c5d15b21e1884f5ff6247aeabb786b93bce\
                             61bc17d768fd9732459018148f6cbe722fd04796562dfdb4",
        },
        Vector {
            suite: Suite::AesGcm128,
            keymat: "3de09874b388e6491988d0c3607eae1f57690e43",
            spi: 0x42f6_7e3f,
            esn: true,
            seq: 0x1010_1010_1010_1010,
            iv: "4e280000a2fca1a3",
            plaintext: "4500003c99c300008001cb7c40679318010101010800085c0200430061626364\
                        65666768696a6b6c6d6e6f707172737475767761626364656667686901020201",
            ciphertext_icv: "fba2caa4853cf9f0f22cb10d86dd83b0fec75691cf1a04b00d1138ec9c357917\
                             65acbd8701ad79845bf9fe3fba487bc91755e6662b4c8d0d1f5e22739530320a\
                             e0d731cc978ecafaeae88f00e80d6e48",
        },
        Vector {
            suite: Suite::AesGcm256,
            keymat: "abbccddef00112233445566778899aababbccddef00112233445566778899aab73616c74",
            spi: 0x1740_5e67,
            esn: true,
            seq: 0x156f_3126_dd0d_b99b,
            iv: "616e640169766563",
            plaintext: "45080028732c00004006e9f90a0106120a01038f06b88023dd6bafbecb712602\
                        50101f646d540001",
            ciphertext_icv: "f2d69ecdbd5a0d5b8d5ef38bad4da58d1f278fde98ef67549d524a3018d9a57f\
                             f4d3a31ce673119e451626c2415771e3b7eebca614c89b35",
        },
        // the very last 64-bit sequence number
        Vector {
            suite: Suite::AesGcm256,
            keymat: "6c6567616c697a656d6172696a75616e61616e64646f69746265666f726569617475726e",
            spi: 0x796b_6963,
            esn: true,
            seq: 0xffff_ffff_ffff_ffff,
            iv: "333021696765746d",
            plaintext: "45000030da3a00008001df3bc0a80005c0a800010800c6cd0200070061626364\
                        65666768696a6b6c6d6e6f707172737401020201",
            ciphertext_icv: "f97ab2aa356d8edce17644ac8c78e25dd24dedbb29ebf1b64a274b39b49c3a86\
                             4cd3d78ca4ae68a32b42458fb57dbe821dcc63b9d0937ba2945f669368661a32\
                             9fb4c053",
        },
    ];

    fn iv_of(vector: &Vector) -> [u8; IV_LEN] {
        unhex(vector.iv).try_into().unwrap()
    }

    #[test]
    fn known_answers_seal() {
        for vector in VECTORS {
            let keymat = Keymat::new(vector.suite, &unhex(vector.keymat)).unwrap();
            let cipher = Cipher::new(&keymat).unwrap();
            let aad = Aad::new(vector.spi, vector.seq, vector.esn);
            let mut buffer = unhex(vector.plaintext);
            let icv = cipher.seal(&iv_of(vector), &aad, &mut buffer).unwrap();
            buffer.extend_from_slice(&icv);
            assert_eq!(
                hex::encode(buffer),
                vector.ciphertext_icv,
                "SPI {:#x}",
                vector.spi
            );
        }
    }

    #[test]
    fn known_answers_open_and_reject_any_flipped_bit_of_the_aad() {
        for vector in VECTORS {
            let keymat = Keymat::new(vector.suite, &unhex(vector.keymat)).unwrap();
            let cipher = Cipher::new(&keymat).unwrap();
            let sealed = unhex(vector.ciphertext_icv);
            let (ciphertext, icv) = sealed.split_at(sealed.len() - ICV_LEN);
            let icv: [u8; ICV_LEN] = icv.try_into().unwrap();

            let mut buffer = ciphertext.to_vec();
            let aad = Aad::new(vector.spi, vector.seq, vector.esn);
            cipher
                .open(&iv_of(vector), &aad, &mut buffer, &icv)
                .unwrap();
            assert_eq!(hex::encode(&buffer), vector.plaintext);

            let high_bits_matter = vector.esn;
            for bit in 0..64 {
                let seq = vector.seq ^ (1 << bit);
                let mut buffer = ciphertext.to_vec();
                let result = cipher.open(
                    &iv_of(vector),
                    &Aad::new(vector.spi, seq, vector.esn),
                    &mut buffer,
                    &icv,
                );
                if bit < 32 || high_bits_matter {
                    assert_eq!(
                        result,
                        Err(CryptoError),
                        "bit {bit} of seq not authenticated"
                    );
                    assert_eq!(buffer, ciphertext, "failed open must not touch the buffer");
                }
            }
        }
    }
}
