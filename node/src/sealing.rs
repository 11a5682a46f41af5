//! The cluster keyring: SA key material in the replicated log and on every disk is sealed with
//! it (AES-256-GCM), so a copy of the log or of a data directory holds no usable keys.
//!
//! **Blobs.** Every sealed blob starts with a clear header naming the key it is under:
//!
//! ```text
//! format 0xC2 (1) | key id (4) | generation (4) | epoch (8) | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! It is sealed with a subkey of its own, `HKDF-SHA256(cluster key[id], info = label ‖ SA id ‖
//! generation ‖ inbound SPI)`, so the random-nonce budget of AES-GCM (2^32 messages per key) is
//! spent per SA and generation, never by the whole cluster on one key. The additional data is
//! the header followed by `label ‖ SA id ‖ inbound SPI`: a blob opens only as what it was sealed
//! for (child keys, IKE engine state, SA context), for its SA and child, and an edited header
//! (another key id, generation or epoch) does not open. The opener takes the SA id, SPI and
//! generation from the record, not from the blob, and refuses a blob whose generation is not the
//! record's or whose epoch is after the record's. The header layout is shared with the store
//! (`evpc_raft_store::SealedHeader`), which counts the blobs under each key without any key.
//!
//! Blobs of the earlier format (no header, one cluster-wide key) are not opened: there is no
//! production data in it.
//!
//! **The keyring file** (`cluster_key_file`) holds one key per line, `ID HEX` (64 hex digits);
//! `#` starts a comment. A file whose only line is 64 hex digits is key 1, as before. The node
//! refuses a key file that group or others may read, and rewrites it (new keys from a rotation,
//! retired keys removed) atomically: a temporary file (0600), fsynced, renamed over it, and the
//! directory fsynced, under an exclusive lock on `FILE.lock` because the nodes of a local cluster
//! share one file.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use evpc_dataplane::ChildKeymat;
use evpc_raft_store::{
    ChildSa, Epoch, Fingerprint, IkeSa, KeyId, SEALED_HEADER_LEN, SEALED_NONCE_LEN, SaId,
    SealedHeader, SealedKeys, State,
};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::ownership::runtime::KeyOpener;

/// One cluster key with its id. `Debug` shows only the id; the key is wiped on drop.
pub struct ClusterKey {
    id: KeyId,
    secret: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({}, <redacted>)", self.id)
    }
}

/// A key file that cannot be used, a keyring that cannot be changed, or a blob that does not
/// open.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file is unreadable, malformed or too widely readable.
    #[error("cluster key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The blob has no key header (an earlier format, or not sealed by evpc).
    #[error("the sealed blob carries no cluster key header (an old format, or not evpc's)")]
    NotSealed,
    /// The blob is under a key this node does not hold.
    #[error(
        "sealed under cluster key {key}, which this node's keyring does not hold (it holds \
         {held:?}): copy the keyring file from a node that has it"
    )]
    MissingKey {
        /// The key the blob names.
        key: KeyId,
        /// The keys this node holds.
        held: Vec<KeyId>,
    },
    /// This node's key under an id is not the one the cluster committed.
    #[error(
        "this node's cluster key {key} is not the cluster's (its fingerprint differs from the \
         committed one): its keyring file holds other material under that id"
    )]
    KeyMismatch {
        /// The key.
        key: KeyId,
    },
    /// The blob was sealed for another generation of the record.
    #[error("the blob is sealed for rekey generation {blob}, the record is at {record}")]
    Generation {
        /// The blob's generation.
        blob: u32,
        /// The record's.
        record: u32,
    },
    /// The blob claims an epoch after the record's.
    #[error("the blob is sealed in epoch {blob}, after the record's {record}")]
    Epoch {
        /// The blob's epoch.
        blob: Epoch,
        /// The record's.
        record: Epoch,
    },
    /// A key id is held with other material.
    #[error("cluster key {0} is already in the keyring with other material")]
    Conflict(KeyId),
    /// The blob does not authenticate.
    #[error(
        "sealed keys do not open with cluster key {0} (another SA or child, an edited blob, or \
         other key material under that id)"
    )]
    Open(KeyId),
}

/// What a blob is: part of its subkey and additional data, so it cannot pass for another.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// A child SA's ESP keys (`ChildSa::keys`).
    ChildKeys,
    /// An IKE SA's engine snapshot (`IkeSa::keys`).
    IkeState,
    /// An exported SA context (`evpcctl sa export`).
    SaContext,
}

impl BlobKind {
    fn label(self) -> &'static [u8] {
        match self {
            BlobKind::ChildKeys => b"evpc-child-keys/2",
            BlobKind::IkeState => b"evpc-ike-state/2",
            BlobKind::SaContext => b"evpc-sa-context/3",
        }
    }
}

/// What a blob is bound to: its kind, SA, child (inbound SPI, 0 for none) and generation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The kind of blob.
    pub kind: BlobKind,
    /// The SA.
    pub sa: SaId,
    /// The child's inbound SPI, 0 if it is not a child's.
    pub in_spi: u32,
    /// The rekey generation: the IKE SA's for its engine state, the child's for child keys.
    pub generation: u32,
}

impl Binding {
    /// A child's keys.
    pub fn child(sa: SaId, child: &ChildSa) -> Binding {
        Binding {
            kind: BlobKind::ChildKeys,
            sa,
            in_spi: child.in_spi,
            generation: child.rekey_generation,
        }
    }

    /// An IKE SA's engine state at `generation`.
    pub fn ike(sa: SaId, generation: u32) -> Binding {
        Binding {
            kind: BlobKind::IkeState,
            sa,
            in_spi: 0,
            generation,
        }
    }

    /// An exported SA context (bound to nothing but being one).
    pub fn context() -> Binding {
        Binding {
            kind: BlobKind::SaContext,
            sa: SaId(0),
            in_spi: 0,
            generation: 0,
        }
    }

    fn info(&self) -> Vec<u8> {
        let mut info = self.kind.label().to_vec();
        info.extend_from_slice(&self.sa.0.to_be_bytes());
        info.extend_from_slice(&self.generation.to_be_bytes());
        info.extend_from_slice(&self.in_spi.to_be_bytes());
        info
    }

    fn aad(&self, header: &[u8]) -> Vec<u8> {
        let mut aad = header.to_vec();
        aad.extend_from_slice(self.kind.label());
        aad.extend_from_slice(&self.sa.0.to_be_bytes());
        aad.extend_from_slice(&self.in_spi.to_be_bytes());
        aad
    }
}

impl ClusterKey {
    /// Key `id` from 32 bytes.
    pub fn from_bytes(id: KeyId, key: &[u8; 32]) -> ClusterKey {
        ClusterKey {
            id,
            secret: Zeroizing::new(*key),
        }
    }

    /// A fresh random key with id `id`.
    pub fn random(id: KeyId) -> ClusterKey {
        ClusterKey::from_bytes(id, &Zeroizing::new(rand::random::<[u8; 32]>()))
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key material, for handing it to another member (`InstallKey`).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// A check value derived from the key (not usable to seal or open anything): committed with
    /// the key's activation, and returned by each member that installs it.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut out = [0u8; 16];
        Hkdf::<Sha256>::new(None, &self.secret[..])
            .expand(b"evpc-key-fingerprint/1", &mut out)
            .expect("16 bytes is a valid HKDF-SHA256 output length");
        out
    }

    /// The blob's own AES key: HKDF-SHA256 of this key with the binding as info.
    fn cipher(&self, binding: &Binding) -> Aes256Gcm {
        let mut subkey = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, &self.secret[..])
            .expand(&binding.info(), &mut subkey[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Aes256Gcm::new((&*subkey).into())
    }

    /// Seals `plain` for `binding`, in `epoch`; `nonce` must be fresh random bytes.
    pub fn seal(
        &self,
        binding: &Binding,
        epoch: Epoch,
        plain: &[u8],
        nonce: [u8; 12],
    ) -> SealedKeys {
        let header = SealedHeader {
            key: self.id,
            generation: binding.generation,
            epoch,
        }
        .to_bytes();
        let sealed = self
            .cipher(binding)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: &binding.aad(&header),
                },
            )
            .expect("AES-GCM sealing of an in-memory buffer cannot fail");
        let mut blob = Vec::with_capacity(SEALED_HEADER_LEN + SEALED_NONCE_LEN + sealed.len());
        blob.extend_from_slice(&header);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        SealedKeys(blob)
    }

    /// Seals a child's keys for the replicated log; `nonce` must be fresh random bytes.
    pub fn seal_child(
        &self,
        sa: SaId,
        epoch: Epoch,
        child: &ChildSa,
        keys: &ChildKeymat,
        nonce: [u8; 12],
    ) -> SealedKeys {
        let plain =
            Zeroizing::new(postcard::to_stdvec(keys).expect("encoding to a Vec cannot fail"));
        self.seal(&Binding::child(sa, child), epoch, &plain, nonce)
    }

    /// Opens a blob whose header names this key.
    fn open_unchecked(
        &self,
        binding: &Binding,
        sealed: &SealedKeys,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let (header, rest) = sealed.0.split_at(SEALED_HEADER_LEN);
        let (nonce, body) = rest.split_at(SEALED_NONCE_LEN);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Open(self.id))?;
        self.cipher(binding)
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: body,
                    aad: &binding.aad(header),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open(self.id))
    }
}

/// The keys this node holds, by id, and the file they live in.
pub struct Keyring {
    path: Option<PathBuf>,
    keys: RwLock<BTreeMap<KeyId, Arc<ClusterKey>>>,
    /// One change at a time; held across the file I/O, so `keys` is only write-locked for
    /// the swap and sealing never waits for an fsync.
    writer: std::sync::Mutex<()>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("ids", &self.ids())
            .finish()
    }
}

/// First bytes of a sealed SA context file (`evpcctl sa export`).
const CONTEXT_MAGIC: &[u8; 8] = b"EVPCCTX3";

/// An SA context file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Not an evpc SA context file at all.
    #[error("not an evpc SA context (exported by `evpcctl sa export`)")]
    NotAContext,
    /// The seal does not verify (or names a key this node does not hold).
    #[error(
        "the SA context does not authenticate under this cluster's keys: it was edited, \
         truncated, or exported by a cluster with other cluster keys ({0})"
    )]
    NotAuthentic(SealError),
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
        out.extend_from_slice(&self.seal(&Binding::context(), Epoch(0), &body, nonce).0);
        out
    }
}

fn key_file_error(path: &Path, reason: impl Into<String>) -> SealError {
    SealError::KeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Parses a keyring file: `ID HEX` lines, or a lone `HEX` line (key 1).
fn parse_keyring(text: &str) -> Result<BTreeMap<KeyId, ClusterKey>, String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    let mut keys = BTreeMap::new();
    for (n, line) in &lines {
        let (id, hex_key) = match line.split_once(char::is_whitespace) {
            Some((id, key)) => {
                let id: u32 = id
                    .parse()
                    .map_err(|_| format!("line {n}: key id {id:?} is not a number"))?;
                (id, key.trim())
            }
            None if lines.len() == 1 => (KeyId::INITIAL.0, *line),
            None => return Err(format!("line {n}: expected \"ID KEY\" (several keys)")),
        };
        if id == 0 {
            return Err(format!("line {n}: key id 0 is reserved"));
        }
        let bytes = Zeroizing::new(
            hex::decode(hex_key).map_err(|_| format!("line {n}: the key is not hexadecimal"))?,
        );
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(bytes[..].try_into().map_err(|_| {
            format!(
                "line {n}: {} bytes; expected 32 (64 hex digits)",
                bytes.len()
            )
        })?);
        if keys
            .insert(KeyId(id), ClusterKey::from_bytes(KeyId(id), &key))
            .is_some()
        {
            return Err(format!("line {n}: key id {id} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("no key in the file".into());
    }
    Ok(keys)
}

/// The file's text for `keys`.
fn render_keyring<'a>(keys: impl Iterator<Item = &'a ClusterKey>) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::from(
        "# evpc cluster keyring: one key per line, \"ID KEY\" (KEY: 64 hex digits).\n\
         # Written by evpc-node (rotate-key adds keys, retirement removes them); keep it 0600.\n",
    ));
    for key in keys {
        text.push_str(&format!("{} {}\n", key.id, hex::encode(&key.secret[..])));
    }
    text
}

/// Reads and parses a key file, refusing one that group or others may read.
fn read_key_file(path: &Path) -> Result<BTreeMap<KeyId, ClusterKey>, SealError> {
    evpc_api::tls::check_private_file(path)
        .map_err(|e| key_file_error(path, format!("{e}; it holds the keys of every SA")))?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| key_file_error(path, e.to_string()))?,
    );
    parse_keyring(&text).map_err(|reason| key_file_error(path, reason))
}

/// Writes `keys` to `path` atomically and durably: a 0600 temporary file, fsynced, renamed over
/// `path`, and the directory fsynced.
fn write_key_file<'a>(
    path: &Path,
    keys: impl Iterator<Item = &'a ClusterKey>,
) -> Result<(), SealError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| key_file_error(path, e.to_string());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let text = render_keyring(keys);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(err)?;
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&temp, path).map_err(err)?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

/// Creates a key file with one fresh random key (id 1), owner-only; for labs and tests.
pub fn create_key_file(path: &Path) -> Result<(), SealError> {
    write_key_file(path, std::iter::once(&ClusterKey::random(KeyId::INITIAL)))
}

impl Keyring {
    /// A keyring of `keys` held in memory only (no file to keep in step): for tests and tools.
    pub fn in_memory(keys: impl IntoIterator<Item = ClusterKey>) -> Keyring {
        Keyring {
            path: None,
            keys: RwLock::new(keys.into_iter().map(|k| (k.id, Arc::new(k))).collect()),
            writer: std::sync::Mutex::new(()),
        }
    }

    /// Reads a keyring file (see the module docs for its format).
    pub fn load(path: &Path) -> Result<Keyring, SealError> {
        let keys = read_key_file(path)?;
        Ok(Keyring {
            path: Some(path.to_owned()),
            keys: RwLock::new(keys.into_iter().map(|(id, k)| (id, Arc::new(k))).collect()),
            writer: std::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<KeyId, Arc<ClusterKey>>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The ids this node holds.
    pub fn ids(&self) -> Vec<KeyId> {
        self.read().keys().copied().collect()
    }

    /// The highest id this node holds (also one installed but never activated).
    pub fn highest(&self) -> Option<KeyId> {
        self.read().keys().next_back().copied()
    }

    /// Key `id`, or why this node cannot use it.
    pub fn get(&self, id: KeyId) -> Result<Arc<ClusterKey>, SealError> {
        self.read()
            .get(&id)
            .cloned()
            .ok_or_else(|| SealError::MissingKey {
                key: id,
                held: self.ids(),
            })
    }

    /// The key new blobs are sealed under in `state`: its active key, checked against the
    /// committed fingerprint.
    pub fn sealer(&self, state: &State) -> Result<Arc<ClusterKey>, SealError> {
        let keys = state.keys();
        self.sealer_for(keys.active(), keys.fingerprint(keys.active()))
    }

    /// Key `active`, checked against its committed fingerprint (if one was committed).
    pub fn sealer_for(
        &self,
        active: KeyId,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Arc<ClusterKey>, SealError> {
        let key = self.get(active)?;
        match fingerprint {
            Some(committed) if committed != key.fingerprint() => {
                Err(SealError::KeyMismatch { key: active })
            }
            _ => Ok(key),
        }
    }

    /// Opens a blob bound to `binding` of a record in epoch `record_epoch`, with whichever key
    /// its header names.
    pub fn open(
        &self,
        binding: &Binding,
        record_epoch: Epoch,
        sealed: &SealedKeys,
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let header = sealed.header().ok_or(SealError::NotSealed)?;
        if header.generation != binding.generation {
            return Err(SealError::Generation {
                blob: header.generation,
                record: binding.generation,
            });
        }
        if header.epoch > record_epoch {
            return Err(SealError::Epoch {
                blob: header.epoch,
                record: record_epoch,
            });
        }
        self.get(header.key)?.open_unchecked(binding, sealed)
    }

    /// Opens a child's sealed keys.
    pub fn open_child(&self, sa: &IkeSa, child: &ChildSa) -> Result<ChildKeymat, SealError> {
        let plain = self.open(&Binding::child(sa.id, child), sa.epoch, &child.keys)?;
        let key = child.keys.key_id().unwrap_or(KeyId(0));
        postcard::from_bytes(&plain).map_err(|_| SealError::Open(key))
    }

    /// Opens a sealed SA context.
    pub fn open_context(&self, bytes: &[u8]) -> Result<evpc_raft_store::SaContext, ContextError> {
        let sealed = bytes
            .strip_prefix(CONTEXT_MAGIC)
            .ok_or(ContextError::NotAContext)?;
        let body = self
            .open(&Binding::context(), Epoch(0), &SealedKeys(sealed.to_vec()))
            .map_err(ContextError::NotAuthentic)?;
        Ok(evpc_raft_store::SaContext::from_bytes(&body)?)
    }

    /// Changes the keyring file (under its lock, re-read first so that keys another node wrote
    /// to a shared file are kept) and then the keys in memory. Blocking file I/O.
    fn update(
        &self,
        change: impl Fn(&mut BTreeMap<KeyId, Arc<ClusterKey>>) -> Result<bool, SealError>,
    ) -> Result<(), SealError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed_memory = self.read().clone();
        if !change(&mut changed_memory)? {
            return Ok(());
        }
        if let Some(path) = &self.path {
            let lock_path = PathBuf::from(format!("{}.lock", path.display()));
            let lock = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&lock_path)
                    .map_err(|e| key_file_error(&lock_path, e.to_string()))?
            };
            lock.lock()
                .map_err(|e| key_file_error(&lock_path, e.to_string()))?;
            let mut on_disk: BTreeMap<KeyId, Arc<ClusterKey>> = match read_key_file(path) {
                Ok(keys) => keys.into_iter().map(|(id, k)| (id, Arc::new(k))).collect(),
                Err(e) if path.exists() => return Err(e),
                Err(_) => BTreeMap::new(),
            };
            change(&mut on_disk)?;
            write_key_file(path, on_disk.values().map(|k| &**k))?;
            // The lock is released when `lock` is dropped, after the rename is durable.
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = changed_memory;
        Ok(())
    }

    /// Adds `key`, durably (in the file before in memory, so a node that acknowledged a key
    /// still holds it after a crash). The same key again is a no-op; other material under an id
    /// already held is refused.
    pub fn install(&self, key: ClusterKey) -> Result<(), SealError> {
        let key = Arc::new(key);
        self.update(|keys| match keys.get(&key.id) {
            Some(held) if held.secret == key.secret => Ok(false),
            Some(_) => Err(SealError::Conflict(key.id)),
            None => {
                keys.insert(key.id, key.clone());
                Ok(true)
            }
        })
    }

    /// Removes keys (retired ones), from the file and from memory.
    pub fn remove(&self, ids: &[KeyId]) -> Result<(), SealError> {
        self.update(|keys| {
            let before = keys.len();
            keys.retain(|id, _| !ids.contains(id));
            Ok(keys.len() != before)
        })
    }

    /// Ids this node holds that the cluster will never need again: retired ones, and ones
    /// below the active key that were installed by a rotation that never activated them.
    pub fn obsolete(&self, state: &State) -> Vec<KeyId> {
        let keys = state.keys();
        self.ids()
            .into_iter()
            .filter(|id| keys.retired().contains(id) || (*id < keys.active() && !keys.is_live(*id)))
            .collect()
    }
}

/// Opens child keys for the owner runtime (`None` without a keyring or for SAs that carry no
/// keys, like the synthetic ones of load tests).
#[derive(Debug)]
pub struct Opener<'a>(pub Option<&'a Keyring>);

impl KeyOpener for Opener<'_> {
    fn open(&self, sa: &IkeSa, child: &ChildSa) -> Option<ChildKeymat> {
        let keyring = self.0?;
        if child.keys.0.is_empty() {
            return None;
        }
        match keyring.open_child(sa, child) {
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
    use evpc_raft_store::SEALED_TAG_LEN;

    fn keys() -> ChildKeymat {
        ChildKeymat {
            inbound: Zeroizing::new(vec![1; 20]),
            outbound: Zeroizing::new(vec![2; 20]),
        }
    }

    fn record() -> IkeSa {
        let mut sa = evpc_raft_store::fixture::ike_sa(SaId(9), 9, 0, 1, 0x1234);
        sa.epoch = Epoch(3);
        sa.rekey_generation = 2;
        sa
    }

    fn child(sa: &IkeSa) -> ChildSa {
        sa.children.values().next().unwrap().clone()
    }

    #[test]
    fn sealed_keys_open_only_for_their_sa_child_generation_and_key() {
        let key = ClusterKey::from_bytes(KeyId(1), &[7; 32]);
        let ring = Keyring::in_memory([ClusterKey::from_bytes(KeyId(1), &[7; 32])]);
        let mut sa = record();
        let c = child(&sa);
        let sealed = key.seal_child(sa.id, sa.epoch, &c, &keys(), [3; 12]);
        assert_eq!(sealed.key_id(), Some(KeyId(1)));
        assert!(!sealed.0.windows(20).any(|w| w == [1; 20] || w == [2; 20]));
        sa.children.get_mut(&c.in_spi).unwrap().keys = sealed.clone();
        let c = child(&sa);
        let opened = ring.open_child(&sa, &c).unwrap();
        assert_eq!(*opened.inbound, vec![1; 20]);

        let mut other_sa = sa.clone();
        other_sa.id = SaId(10);
        assert!(matches!(
            ring.open_child(&other_sa, &c),
            Err(SealError::Open(KeyId(1)))
        ));
        let mut other_child = c.clone();
        other_child.in_spi ^= 1;
        assert!(ring.open_child(&sa, &other_child).is_err(), "other child");
        let mut rekeyed = c.clone();
        rekeyed.rekey_generation += 1;
        assert!(matches!(
            ring.open_child(&sa, &rekeyed),
            Err(SealError::Generation { blob: 0, record: 1 })
        ));
        let mut earlier = sa.clone();
        earlier.epoch = Epoch(2);
        assert!(matches!(
            ring.open_child(&earlier, &c),
            Err(SealError::Epoch { .. })
        ));
        // A later epoch (the SA moved since) still opens.
        let mut later = sa.clone();
        later.epoch = Epoch(9);
        assert!(ring.open_child(&later, &c).is_ok());
        // Other material under the same id, another id, no header.
        let other_material = Keyring::in_memory([ClusterKey::from_bytes(KeyId(1), &[8; 32])]);
        assert!(matches!(
            other_material.open_child(&sa, &c),
            Err(SealError::Open(_))
        ));
        let without = Keyring::in_memory([ClusterKey::from_bytes(KeyId(2), &[7; 32])]);
        let err = without.open_child(&sa, &c).unwrap_err();
        assert!(matches!(err, SealError::MissingKey { key: KeyId(1), .. }));
        assert!(err.to_string().contains("does not hold"), "{err}");
        let mut headerless = c.clone();
        headerless.keys = SealedKeys(vec![0; 60]);
        assert!(matches!(
            ring.open_child(&sa, &headerless),
            Err(SealError::NotSealed)
        ));
        assert_eq!(format!("{key:?}"), "ClusterKey(1, <redacted>)");
    }

    #[test]
    fn an_edited_header_does_not_open() {
        let ring = Keyring::in_memory([
            ClusterKey::from_bytes(KeyId(1), &[7; 32]),
            ClusterKey::from_bytes(KeyId(2), &[7; 32]),
        ]);
        let key = ring.get(KeyId(1)).unwrap();
        let binding = Binding::ike(SaId(5), 4);
        let sealed = key.seal(&binding, Epoch(6), b"engine state", [1; 12]);
        assert_eq!(
            &*ring.open(&binding, Epoch(6), &sealed).unwrap(),
            b"engine state"
        );
        // Each header field, and the nonce and body, edited in turn: the key id points at the
        // same material (so only the additional data can catch it), the generation and epoch
        // are moved in both directions.
        for at in 1..sealed.0.len() {
            let mut edited = sealed.clone();
            edited.0[at] ^= 1;
            let h = edited.header();
            let binding = Binding {
                generation: h.map_or(4, |h| h.generation),
                ..binding
            };
            assert!(
                ring.open(&binding, Epoch(u64::MAX), &edited).is_err(),
                "byte {at} edited"
            );
        }
        // Another kind of blob for the same SA does not open either.
        assert!(
            ring.open(
                &Binding {
                    kind: BlobKind::ChildKeys,
                    ..binding
                },
                Epoch(6),
                &sealed
            )
            .is_err()
        );
    }

    #[test]
    fn each_sa_and_generation_has_its_own_subkey() {
        let key = ClusterKey::from_bytes(KeyId(1), &[7; 32]);
        // The same nonce and plaintext under two bindings give unrelated ciphertexts: the
        // bindings do not share a key (so they do not share a nonce budget).
        let a = key.seal(&Binding::ike(SaId(1), 0), Epoch(1), &[0; 32], [0; 12]);
        let b = key.seal(&Binding::ike(SaId(1), 1), Epoch(1), &[0; 32], [0; 12]);
        let c = key.seal(&Binding::ike(SaId(2), 0), Epoch(1), &[0; 32], [0; 12]);
        let body = |s: &SealedKeys| s.0[SEALED_HEADER_LEN + SEALED_NONCE_LEN..].to_vec();
        assert_ne!(body(&a)[..32], body(&b)[..32]);
        assert_ne!(body(&a)[..32], body(&c)[..32]);
        assert_eq!(
            body(&a).len(),
            32 + SEALED_TAG_LEN,
            "ciphertext and tag follow the nonce"
        );
        assert_ne!(
            key.fingerprint(),
            ClusterKey::from_bytes(KeyId(1), &[8; 32]).fingerprint()
        );
    }

    #[test]
    fn sa_contexts_open_only_unedited_and_under_a_held_key() {
        let ring = Keyring::in_memory([ClusterKey::from_bytes(KeyId(3), &[7; 32])]);
        let key = ring.get(KeyId(3)).unwrap();
        let sa = evpc_raft_store::fixture::ike_sa(SaId(5), 9, 0, 1, 0x100);
        let context = evpc_raft_store::SaContext::new(sa.clone(), true, None, 42);
        let sealed = key.seal_context(&context, [1; 12]);
        assert_eq!(ring.open_context(&sealed).unwrap(), context);
        // Identities do not travel in the clear.
        assert!(!sealed.windows(6).any(|w| w == b"client"));
        for at in [8, 9, sealed.len() / 2, sealed.len() - 1] {
            let mut edited = sealed.clone();
            edited[at] ^= 1;
            assert!(matches!(
                ring.open_context(&edited),
                Err(ContextError::NotAuthentic(_))
            ));
        }
        let other = Keyring::in_memory([ClusterKey::from_bytes(KeyId(3), &[8; 32])]);
        assert!(matches!(
            other.open_context(&sealed),
            Err(ContextError::NotAuthentic(_))
        ));
        assert!(matches!(
            ring.open_context(b"garbage"),
            Err(ContextError::NotAContext)
        ));
        let copy = key.seal_context(
            &evpc_raft_store::SaContext::new(sa, false, None, 1),
            [2; 12],
        );
        assert!(ring.open_context(&copy).unwrap().importable().is_err());
    }

    fn write_mode(path: &Path, text: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let lone = dir.path().join("lone");
        write_mode(&lone, &format!("{}\n", "ab".repeat(32)), 0o600);
        assert_eq!(Keyring::load(&lone).unwrap().ids(), vec![KeyId(1)]);
        let ring = dir.path().join("ring");
        write_mode(
            &ring,
            &format!(
                "# two keys\n1 {}\n\n7 {}  # the new one\n",
                "ab".repeat(32),
                "cd".repeat(32)
            ),
            0o400,
        );
        assert_eq!(
            Keyring::load(&ring).unwrap().ids(),
            vec![KeyId(1), KeyId(7)]
        );
        for (text, expected) in [
            ("abcd".to_owned(), "expected 32"),
            (format!("0 {}", "ab".repeat(32)), "reserved"),
            (
                format!("2 {}\n2 {}", "ab".repeat(32), "cd".repeat(32)),
                "twice",
            ),
            (
                format!("{}\n{}", "ab".repeat(32), "cd".repeat(32)),
                "ID KEY",
            ),
            ("# nothing\n".to_owned(), "no key"),
            (format!("x {}", "ab".repeat(32)), "not a number"),
        ] {
            let bad = dir.path().join("bad");
            write_mode(&bad, &text, 0o600);
            let err = Keyring::load(&bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        assert!(Keyring::load(&dir.path().join("missing")).is_err());
        // A key file others may read is refused, with what to do about it.
        let open = dir.path().join("open");
        write_mode(&open, &"ab".repeat(32), 0o644);
        let err = Keyring::load(&open).unwrap_err().to_string();
        assert!(
            err.contains("readable by group or others") && err.contains("0644"),
            "{err}"
        );
        write_mode(&open, &"ab".repeat(32), 0o640);
        assert!(Keyring::load(&open).is_err());
    }

    #[test]
    fn installed_and_removed_keys_are_written_through_and_shared_files_merge() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        create_key_file(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Two nodes sharing one file (a local cluster).
        let a = Keyring::load(&path).unwrap();
        let b = Keyring::load(&path).unwrap();
        a.install(ClusterKey::from_bytes(KeyId(2), &[2; 32]))
            .unwrap();
        b.install(ClusterKey::from_bytes(KeyId(2), &[2; 32]))
            .unwrap();
        assert!(matches!(
            b.install(ClusterKey::from_bytes(KeyId(2), &[3; 32])),
            Err(SealError::Conflict(KeyId(2)))
        ));
        assert_eq!(b.ids(), vec![KeyId(1), KeyId(2)]);
        let reread = Keyring::load(&path).unwrap();
        assert_eq!(reread.ids(), vec![KeyId(1), KeyId(2)]);
        assert_eq!(
            reread.get(KeyId(2)).unwrap().fingerprint(),
            ClusterKey::from_bytes(KeyId(2), &[2; 32]).fingerprint()
        );
        a.remove(&[KeyId(1)]).unwrap();
        assert_eq!(a.ids(), vec![KeyId(2)]);
        assert_eq!(Keyring::load(&path).unwrap().ids(), vec![KeyId(2)]);
        // b removes too (the file no longer has it): memory follows, nothing breaks.
        b.remove(&[KeyId(1)]).unwrap();
        assert_eq!(b.ids(), vec![KeyId(2)]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn the_sealer_is_the_states_active_key_with_its_fingerprint() {
        let ring = Keyring::in_memory([
            ClusterKey::from_bytes(KeyId(1), &[1; 32]),
            ClusterKey::from_bytes(KeyId(2), &[2; 32]),
        ]);
        let mut state = State::default();
        assert_eq!(ring.sealer(&state).unwrap().id(), KeyId(1));
        evpc_raft_store::apply(
            &mut state,
            &evpc_raft_store::Command::ActivateKey {
                key: KeyId(2),
                fingerprint: ClusterKey::from_bytes(KeyId(2), &[9; 32]).fingerprint(),
            },
        )
        .unwrap();
        assert!(matches!(
            ring.sealer(&state),
            Err(SealError::KeyMismatch { key: KeyId(2) })
        ));
    }
}
