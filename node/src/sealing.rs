//! The cluster key: SA key material in the replicated log and on every disk is sealed with it
//! (AES-256-GCM), so a copy of the log or of a data directory holds no usable keys.
//!
//! A sealed blob is `nonce (12 bytes) || ciphertext || tag`, with the SA id and inbound SPI as
//! additional data, so a blob cannot be moved to another SA unnoticed.

use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use evpc_dataplane::ChildKeymat;
use evpc_raft_store::{ChildSa, IkeSa, SaId, SealedKeys};
use zeroize::Zeroizing;

use crate::ownership::runtime::KeyOpener;

/// The cluster key. `Debug` shows nothing of it; it is wiped on drop.
pub struct ClusterKey {
    cipher: Aes256Gcm,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// A key file that cannot be used, or a blob that does not open.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file is unreadable or not 64 hex digits.
    #[error("cluster key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The blob is too short, was sealed under another key, or belongs to another SA.
    #[error("sealed keys do not open with the cluster key (other key, other SA, or corrupt)")]
    Open,
}

fn aad(sa: SaId, in_spi: u32) -> [u8; 12] {
    let mut aad = [0u8; 12];
    aad[..8].copy_from_slice(&sa.0.to_be_bytes());
    aad[8..].copy_from_slice(&in_spi.to_be_bytes());
    aad
}

impl ClusterKey {
    /// A key from 32 bytes.
    pub fn from_bytes(key: &[u8; 32]) -> ClusterKey {
        ClusterKey {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Reads a key file: 64 hex digits (whitespace around them is ignored).
    pub fn load(path: &Path) -> Result<ClusterKey, SealError> {
        let err = |reason: String| SealError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
        let bytes =
            Zeroizing::new(hex::decode(text.trim()).map_err(|_| err("not hexadecimal".into()))?);
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(bytes[..].try_into().map_err(|_| {
            err(format!(
                "{} bytes; expected 32 (64 hex digits)",
                bytes.len()
            ))
        })?);
        Ok(ClusterKey::from_bytes(&key))
    }

    /// Seals a child's keys for the replicated log; `nonce` must be fresh random bytes.
    pub fn seal_child(
        &self,
        sa: SaId,
        in_spi: u32,
        keys: &ChildKeymat,
        nonce: [u8; 12],
    ) -> SealedKeys {
        let plain =
            Zeroizing::new(postcard::to_stdvec(keys).expect("encoding to a Vec cannot fail"));
        let sealed = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(sa, in_spi),
                },
            )
            .expect("AES-GCM sealing of a small buffer cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        SealedKeys(blob)
    }

    /// Opens a child's sealed keys.
    pub fn open_child(
        &self,
        sa: SaId,
        in_spi: u32,
        sealed: &SealedKeys,
    ) -> Result<ChildKeymat, SealError> {
        if sealed.0.len() < 12 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, body) = sealed.0.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Open)?;
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: body,
                        aad: &aad(sa, in_spi),
                    },
                )
                .map_err(|_| SealError::Open)?,
        );
        postcard::from_bytes(&plain).map_err(|_| SealError::Open)
    }
}

impl ClusterKey {
    /// Seals any secret blob (e.g. an IKE engine snapshot) for the replicated log, bound to
    /// `aad` (which must say what the blob is and whose it is, so it cannot be replayed as
    /// anything else); `nonce` must be fresh random bytes.
    pub fn seal_blob(&self, aad: &[u8], plain: &[u8], nonce: [u8; 12]) -> SealedKeys {
        let sealed = self
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        SealedKeys(blob)
    }

    /// Opens a blob sealed by [`ClusterKey::seal_blob`] with the same `aad`; the plaintext is
    /// wiped when dropped.
    pub fn open_blob(
        &self,
        aad: &[u8],
        sealed: &SealedKeys,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.0.len() < 12 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, body) = sealed.0.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Open)?;
        self.cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: body, aad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }
}

/// First bytes of a sealed SA context file (`evpcctl sa export`).
const CONTEXT_MAGIC: &[u8; 8] = b"EVPCCTX2";
/// Additional data binding a sealed blob to being an SA context of this format.
const CONTEXT_AAD: &[u8] = b"evpc-sa-context/2";

/// An SA context file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Not an evpc SA context file at all.
    #[error("not an evpc SA context (exported by `evpcctl sa export`)")]
    NotAContext,
    /// The seal does not verify.
    #[error(
        "the SA context does not authenticate under this cluster's key: it was edited, \
         truncated, or exported by a cluster with another cluster key"
    )]
    NotAuthentic,
    /// It authenticates but its body is of another format or malformed.
    #[error(transparent)]
    Body(#[from] evpc_raft_store::SaContextError),
}

impl ClusterKey {
    /// Seals an SA context for export: authenticated (an edited file does not open) and
    /// encrypted (identities and addresses do not travel in the clear). `nonce` must be fresh
    /// random bytes.
    pub fn seal_context(&self, context: &evpc_raft_store::SaContext, nonce: [u8; 12]) -> Vec<u8> {
        let body = Zeroizing::new(context.to_bytes());
        let mut out = CONTEXT_MAGIC.to_vec();
        out.extend_from_slice(&self.seal_blob(CONTEXT_AAD, &body, nonce).0);
        out
    }

    /// Opens a sealed SA context.
    pub fn open_context(&self, bytes: &[u8]) -> Result<evpc_raft_store::SaContext, ContextError> {
        let sealed = bytes
            .strip_prefix(CONTEXT_MAGIC)
            .ok_or(ContextError::NotAContext)?;
        let body = self
            .open_blob(CONTEXT_AAD, &SealedKeys(sealed.to_vec()))
            .map_err(|_| ContextError::NotAuthentic)?;
        Ok(evpc_raft_store::SaContext::from_bytes(&body)?)
    }
}

/// Opens child keys for the owner runtime (`None` without a cluster key or for SAs that carry
/// no keys, like the synthetic ones of load tests).
#[derive(Debug)]
pub struct Opener<'a>(pub Option<&'a ClusterKey>);

impl KeyOpener for Opener<'_> {
    fn open(&self, sa: &IkeSa, child: &ChildSa) -> Option<ChildKeymat> {
        let key = self.0?;
        if child.keys.0.is_empty() {
            return None;
        }
        match key.open_child(sa.id, child.in_spi, &child.keys) {
            Ok(keys) => Some(keys),
            Err(e) => {
                tracing::error!(sa = %sa.id, in_spi = format_args!("{:08x}", child.in_spi), error = %e, "cannot open child keys");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ChildKeymat {
        ChildKeymat {
            inbound: Zeroizing::new(vec![1; 20]),
            outbound: Zeroizing::new(vec![2; 20]),
        }
    }

    #[test]
    fn sealed_keys_open_only_for_their_sa_and_key() {
        let key = ClusterKey::from_bytes(&[7; 32]);
        let sealed = key.seal_child(SaId(9), 0x1234, &keys(), [3; 12]);
        assert!(!sealed.0.windows(20).any(|w| w == [1; 20] || w == [2; 20]));
        let opened = key.open_child(SaId(9), 0x1234, &sealed).unwrap();
        assert_eq!(*opened.inbound, vec![1; 20]);
        assert!(
            key.open_child(SaId(10), 0x1234, &sealed).is_err(),
            "other SA"
        );
        assert!(
            key.open_child(SaId(9), 0x1235, &sealed).is_err(),
            "other child"
        );
        assert!(
            ClusterKey::from_bytes(&[8; 32])
                .open_child(SaId(9), 0x1234, &sealed)
                .is_err()
        );
        assert!(
            key.open_child(SaId(9), 0x1234, &SealedKeys(vec![0; 5]))
                .is_err()
        );
        assert_eq!(format!("{key:?}"), "ClusterKey(<redacted>)");
    }

    #[test]
    fn sa_contexts_open_only_unedited_and_under_the_same_key() {
        let key = ClusterKey::from_bytes(&[7; 32]);
        let sa = evpc_raft_store::fixture::ike_sa(SaId(5), 9, 0, 1, 0x100);
        let context = evpc_raft_store::SaContext::new(sa.clone(), true, None, 42);
        let sealed = key.seal_context(&context, [1; 12]);
        assert_eq!(key.open_context(&sealed).unwrap(), context);
        // Identities do not travel in the clear.
        assert!(!sealed.windows(6).any(|w| w == b"client"));
        for at in [8, sealed.len() / 2, sealed.len() - 1] {
            let mut edited = sealed.clone();
            edited[at] ^= 1;
            assert!(matches!(
                key.open_context(&edited),
                Err(ContextError::NotAuthentic)
            ));
        }
        assert!(matches!(
            ClusterKey::from_bytes(&[8; 32]).open_context(&sealed),
            Err(ContextError::NotAuthentic)
        ));
        assert!(matches!(
            key.open_context(b"garbage"),
            Err(ContextError::NotAContext)
        ));
        // A copy opens, but is not importable.
        let copy = key.seal_context(
            &evpc_raft_store::SaContext::new(sa, false, None, 1),
            [2; 12],
        );
        assert!(key.open_context(&copy).unwrap().importable().is_err());
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        ClusterKey::load(&good).unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abcd").unwrap();
        assert!(
            ClusterKey::load(&short)
                .unwrap_err()
                .to_string()
                .contains("expected 32")
        );
        assert!(ClusterKey::load(&dir.path().join("missing")).is_err());
    }
}
