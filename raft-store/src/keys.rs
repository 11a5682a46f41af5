//! Which cluster keys the sealed blobs in the state are under: the header every sealed blob
//! starts with, and the [`KeyRegistry`] that `apply` keeps in step with the records.
//!
//! The store never sees key material. It only reads the clear header of each blob (format and
//! key id, plus the generation and epoch the blob is bound to), so that it can count the blobs
//! under each key incrementally, refuse blobs under a key that is not (or no longer) in use,
//! and let the leader's resealer find the SAs still on an old key without walking every SA.
//!
//! ```text
//! blob = format (1) | key id (4) | generation (4) | epoch (8) | nonce (12) | ciphertext | tag (16)
//! ```
//!
//! Everything before the nonce is also the start of the AEAD's additional data (see
//! `evpc_node::sealing`), so an edited header does not open.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::Rejection;
use crate::ids::{Epoch, KeyId, SaId};
use crate::limits;
use crate::sa::{IkeSa, SealedKeys};

/// The first byte of a sealed blob of this format. A blob that does not start with it (or is
/// too short to hold a header) carries no key id: the store keeps it as an opaque blob (test
/// fixtures, synthetic load-test SAs), counts it apart, and never asks for it to be resealed.
pub const SEALED_FORMAT: u8 = 0xC2;
/// Bytes of the clear header: format, key id, generation, epoch.
pub const SEALED_HEADER_LEN: usize = 1 + 4 + 4 + 8;
/// Bytes of the AES-GCM nonce after the header.
pub const SEALED_NONCE_LEN: usize = 12;
/// Bytes of the AES-GCM tag at the end.
pub const SEALED_TAG_LEN: usize = 16;

/// A key's fingerprint: a check value derived from the key (not the key), committed with its
/// activation so every node can tell whether the key it holds under an id is the cluster's.
pub type Fingerprint = [u8; 16];

/// The clear header of a sealed blob.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SealedHeader {
    /// The key it is sealed under.
    pub key: KeyId,
    /// The rekey generation it is bound to (the IKE SA's for its engine state, the child's for
    /// child keys).
    pub generation: u32,
    /// The ownership epoch the SA was in when the blob was sealed.
    pub epoch: Epoch,
}

impl SealedHeader {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; SEALED_HEADER_LEN] {
        let mut out = [0u8; SEALED_HEADER_LEN];
        out[0] = SEALED_FORMAT;
        out[1..5].copy_from_slice(&self.key.0.to_be_bytes());
        out[5..9].copy_from_slice(&self.generation.to_be_bytes());
        out[9..17].copy_from_slice(&self.epoch.0.to_be_bytes());
        out
    }
}

impl SealedKeys {
    /// The blob's header, if it is a keyed blob of this format (key id 0 is not a key).
    pub fn header(&self) -> Option<SealedHeader> {
        let b = &self.0;
        if b.len() < SEALED_HEADER_LEN + SEALED_NONCE_LEN + SEALED_TAG_LEN || b[0] != SEALED_FORMAT
        {
            return None;
        }
        let key = KeyId(u32::from_be_bytes(b[1..5].try_into().ok()?));
        if key.0 == 0 {
            return None;
        }
        Some(SealedHeader {
            key,
            generation: u32::from_be_bytes(b[5..9].try_into().ok()?),
            epoch: Epoch(u64::from_be_bytes(b[9..17].try_into().ok()?)),
        })
    }

    /// The key this blob is sealed under, if it names one.
    pub fn key_id(&self) -> Option<KeyId> {
        self.header().map(|h| h.key)
    }
}

/// The blobs of one SA record (its engine state, then each child's keys), empty ones left out.
fn blobs(sa: &IkeSa) -> impl Iterator<Item = &SealedKeys> {
    std::iter::once(&sa.keys)
        .chain(sa.children.values().map(|c| &c.keys))
        .filter(|b| !b.0.is_empty())
}

/// The cluster keys as the replicated state knows them, and which blobs are under each.
///
/// Invariant: `active` is live; ids in `live` and `retired` are nonzero and disjoint.
/// Invariant: `blobs[k]` is exactly the number of blobs of all SAs sealed under key `k` (no
/// zero entries), every such `k` is live, and `opaque` counts the nonempty blobs without a
/// key header.
/// Invariant: `users` holds exactly the pairs `(k, sa)` for which SA `sa` has a blob under `k`,
/// and `sas[k]` is the number of such pairs for `k` (no zero entries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRegistry {
    active: KeyId,
    live: BTreeMap<KeyId, Option<Fingerprint>>,
    retired: BTreeSet<KeyId>,
    blobs: BTreeMap<KeyId, u64>,
    users: imbl::OrdSet<(KeyId, SaId)>,
    sas: BTreeMap<KeyId, u64>,
    opaque: u64,
}

impl Default for KeyRegistry {
    /// A new cluster: key 1 (whose fingerprint was never committed) is active.
    fn default() -> Self {
        KeyRegistry {
            active: KeyId::INITIAL,
            live: BTreeMap::from([(KeyId::INITIAL, None)]),
            retired: BTreeSet::new(),
            blobs: BTreeMap::new(),
            users: imbl::OrdSet::new(),
            sas: BTreeMap::new(),
            opaque: 0,
        }
    }
}

impl KeyRegistry {
    /// The key new blobs are sealed under.
    pub fn active(&self) -> KeyId {
        self.active
    }

    /// The committed fingerprint of a live key (`None` for the initial key, whose fingerprint
    /// was never committed, and for ids that are not live).
    pub fn fingerprint(&self, key: KeyId) -> Option<Fingerprint> {
        self.live.get(&key).copied().flatten()
    }

    /// Keys blobs may be sealed under: the active one and older ones not yet retired.
    pub fn live(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.live.keys().copied()
    }

    /// Whether `key` is live.
    pub fn is_live(&self, key: KeyId) -> bool {
        self.live.contains_key(&key)
    }

    /// Keys retired after their last blob was resealed; their ids are never used again.
    pub fn retired(&self) -> &BTreeSet<KeyId> {
        &self.retired
    }

    /// The highest id the cluster has used (live or retired): a new key takes one above it.
    pub fn highest(&self) -> KeyId {
        let live = self.live.keys().next_back().copied();
        let retired = self.retired.iter().next_back().copied();
        live.max(retired).unwrap_or(KeyId::INITIAL)
    }

    /// How many blobs are sealed under `key`.
    pub fn blobs_under(&self, key: KeyId) -> u64 {
        self.blobs.get(&key).copied().unwrap_or(0)
    }

    /// Blobs per key (keys without blobs left out).
    pub fn blob_counts(&self) -> &BTreeMap<KeyId, u64> {
        &self.blobs
    }

    /// How many SAs have at least one blob under `key`.
    pub fn sas_with(&self, key: KeyId) -> u64 {
        self.sas.get(&key).copied().unwrap_or(0)
    }

    /// Nonempty blobs that carry no key header (they are never resealed).
    pub fn opaque_blobs(&self) -> u64 {
        self.opaque
    }

    /// SAs with at least one blob under `key`, in id order from `from`: O(log n) to start.
    pub fn sas_under(&self, key: KeyId, from: SaId) -> impl Iterator<Item = SaId> + '_ {
        self.users
            .range((key, from)..=(key, SaId(u64::MAX)))
            .map(|(_, sa)| *sa)
    }

    /// Refuses a record with a blob under a key that is not live (retired, never activated, or
    /// id 0 written as a header).
    ///
    /// Invariant: every keyed blob in the state is under a live key, so every node that holds
    /// the live keys can open every blob.
    pub(crate) fn check_record(&self, sa: &IkeSa) -> Result<(), Rejection> {
        for blob in blobs(sa) {
            if let Some(key) = blob.key_id()
                && !self.live.contains_key(&key)
            {
                return Err(self.not_live(key));
            }
        }
        Ok(())
    }

    fn not_live(&self, key: KeyId) -> Rejection {
        if self.retired.contains(&key) {
            Rejection::KeyRetired(key)
        } else {
            Rejection::UnknownKey(key)
        }
    }

    /// Counts `sa`'s blobs (the caller checked them with [`KeyRegistry::check_record`]).
    pub(crate) fn add(&mut self, sa: &IkeSa) {
        for blob in blobs(sa) {
            match blob.key_id() {
                Some(key) => {
                    *self.blobs.entry(key).or_default() += 1;
                    if self.users.insert((key, sa.id)).is_none() {
                        *self.sas.entry(key).or_default() += 1;
                    }
                }
                None => self.opaque += 1,
            }
        }
    }

    /// Uncounts `sa`'s blobs (it was counted with [`KeyRegistry::add`]).
    pub(crate) fn remove(&mut self, sa: &IkeSa) {
        for blob in blobs(sa) {
            match blob.key_id() {
                Some(key) => {
                    if let Some(n) = self.blobs.get_mut(&key) {
                        *n -= 1;
                        if *n == 0 {
                            self.blobs.remove(&key);
                        }
                    }
                    if self.users.remove(&(key, sa.id)).is_some()
                        && let Some(n) = self.sas.get_mut(&key)
                    {
                        *n -= 1;
                        if *n == 0 {
                            self.sas.remove(&key);
                        }
                    }
                }
                None => self.opaque -= 1,
            }
        }
    }

    /// Makes `key` the active key.
    ///
    /// Invariant: ids only grow — a new key's id is above every id used before, so a retired
    /// id never comes back — and at most [`limits::MAX_LIVE_KEYS`] keys are live. Activating the
    /// active key again with the same fingerprint is a no-op (a retried proposal).
    pub(crate) fn activate(
        &mut self,
        key: KeyId,
        fingerprint: Fingerprint,
    ) -> Result<(), Rejection> {
        if key == self.active && self.fingerprint(key) == Some(fingerprint) {
            return Ok(());
        }
        let highest = self.highest();
        if key.0 == 0 || key <= highest {
            return Err(Rejection::KeyIdNotNew { key, highest });
        }
        if self.live.len() >= limits::MAX_LIVE_KEYS {
            return Err(Rejection::TooLarge {
                what: "live cluster keys (retire old ones first)".into(),
                limit: limits::MAX_LIVE_KEYS as u64,
            });
        }
        self.live.insert(key, Some(fingerprint));
        self.active = key;
        Ok(())
    }

    /// Retires `key`: no blob may be under it any more, and its id is never used again.
    ///
    /// Invariant: the active key is never retired, nor a key that still has blobs (they would
    /// not open anywhere once the nodes drop the key). Retiring a retired key is a no-op.
    pub(crate) fn retire(&mut self, key: KeyId) -> Result<(), Rejection> {
        if self.retired.contains(&key) {
            return Ok(());
        }
        if !self.live.contains_key(&key) {
            return Err(Rejection::UnknownKey(key));
        }
        if key == self.active {
            return Err(Rejection::KeyIsActive(key));
        }
        let blobs = self.blobs_under(key);
        if blobs > 0 {
            return Err(Rejection::KeyInUse { key, blobs });
        }
        self.live.remove(&key);
        self.retired.insert(key);
        Ok(())
    }

    /// Checks the invariants above against `rebuilt`, a registry with the same keys whose
    /// counts were recomputed from the records.
    pub(crate) fn check(&self, rebuilt: &KeyRegistry) -> Result<(), String> {
        if !self.live.contains_key(&self.active) {
            return Err(format!("active key {} is not live", self.active));
        }
        if self.live.contains_key(&KeyId(0)) || self.retired.contains(&KeyId(0)) {
            return Err("key id 0 is registered".into());
        }
        if let Some(k) = self.live.keys().find(|k| self.retired.contains(k)) {
            return Err(format!("key {k} is both live and retired"));
        }
        if self.live.len() > limits::MAX_LIVE_KEYS {
            return Err("too many live keys".into());
        }
        if rebuilt.blobs != self.blobs || rebuilt.opaque != self.opaque {
            return Err(format!(
                "blob counts out of sync: {:?} (+{} opaque) recounted as {:?} (+{})",
                self.blobs, self.opaque, rebuilt.blobs, rebuilt.opaque
            ));
        }
        if rebuilt.users != self.users || rebuilt.sas != self.sas {
            return Err("key users index out of sync".into());
        }
        if let Some(k) = self.blobs.keys().find(|k| !self.live.contains_key(k)) {
            return Err(format!("blobs under key {k}, which is not live"));
        }
        Ok(())
    }

    /// The same keys with no blobs counted: what [`crate::State::check_invariants`] recounts.
    pub(crate) fn without_counts(&self) -> KeyRegistry {
        KeyRegistry {
            active: self.active,
            live: self.live.clone(),
            retired: self.retired.clone(),
            blobs: BTreeMap::new(),
            users: imbl::OrdSet::new(),
            sas: BTreeMap::new(),
            opaque: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_only_in_this_format_with_a_key() {
        let header = SealedHeader {
            key: KeyId(7),
            generation: 3,
            epoch: Epoch(9),
        };
        let mut blob = header.to_bytes().to_vec();
        blob.extend_from_slice(&[0; SEALED_NONCE_LEN + SEALED_TAG_LEN]);
        assert_eq!(SealedKeys(blob.clone()).header(), Some(header));
        assert_eq!(SealedKeys(blob[..blob.len() - 1].to_vec()).header(), None);
        let mut zero = blob.clone();
        zero[1..5].copy_from_slice(&[0; 4]);
        assert_eq!(SealedKeys(zero).key_id(), None);
        let mut other = blob;
        other[0] = 2;
        assert_eq!(SealedKeys(other).key_id(), None);
        assert_eq!(SealedKeys(vec![]).key_id(), None);
    }
}
