//! Identifiers shared by every replicated record.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A gateway node: its Raft node id. Node ids are chosen by the operator and never reused.
pub type NodeId = u64;

/// Cluster-wide identifier of an IKE SA: the IKE SPI that *this cluster* chose for it (the
/// responder SPI when a peer initiated, the initiator SPI when we did).
///
/// Using our own SPI as the key makes it unique by construction: the proposer draws it, and
/// `apply` refuses a duplicate (RFC 7296 §2.6 only asks each side to pick SPIs unique to itself).
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SaId(pub u64);

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaId({self})")
    }
}

/// Error returned when an SA id is not 1 to 16 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SA id {0:?}: expected 1 to 16 hexadecimal digits (an IKE SPI)")]
pub struct ParseSaIdError(pub String);

impl FromStr for SaId {
    type Err = ParseSaIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0x").unwrap_or(s);
        if digits.is_empty() || digits.len() > 16 {
            return Err(ParseSaIdError(s.to_owned()));
        }
        u64::from_str_radix(digits, 16)
            .map(SaId)
            .map_err(|_| ParseSaIdError(s.to_owned()))
    }
}

/// Ownership epoch of an IKE SA: a fencing token. It grows by one each time the SA changes
/// owner; every command that acts for the owner carries the epoch it believes current, and
/// `apply` refuses it when the SA has moved on.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch a freshly created SA starts in.
    pub const FIRST: Epoch = Epoch(1);

    /// The epoch after a change of owner, or `None` when the epoch space is used up (`apply`
    /// then refuses the move instead of wrapping around to an epoch a stale owner once had).
    #[must_use]
    pub fn checked_next(self) -> Option<Epoch> {
        self.0.checked_add(1).map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster key's id in the keyring ([`crate::KeyRegistry`]): every sealed blob names the key
/// it was sealed under in its header. Ids are never reused: a new key takes an id above every
/// id the cluster has used, so a retired id can never come back with other material. Id 0 is
/// reserved; a fresh cluster seals under [`KeyId::INITIAL`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub u32);

impl KeyId {
    /// The key a new cluster seals under (the id a key file's lone key line gets).
    pub const INITIAL: KeyId = KeyId(1);
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of one cluster: 128 random bits the first leader draws and commits
/// ([`crate::Command::SetClusterId`]). Every node records it in its data directory, so a data
/// directory of another cluster is recognised and refused, and SA contexts name the cluster
/// that exported them.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub [u8; 16]);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// Error returned when a cluster id is not 32 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster id {0:?}: expected 32 hexadecimal digits")]
pub struct ParseClusterIdError(pub String);

impl FromStr for ClusterId {
    type Err = ParseClusterIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s.trim()).map_err(|_| ParseClusterIdError(s.to_owned()))?;
        let id: [u8; 16] = bytes
            .try_into()
            .map_err(|_| ParseClusterIdError(s.to_owned()))?;
        Ok(ClusterId(id))
    }
}

/// A placement slot: new SAs hash to a slot, and the slot map says which node answers them.
pub type Slot = u16;

/// Number of placement slots. A power of two well above any cluster size, so slots spread
/// evenly (±1) over up to 7 voters plus learners, as strongSwan's HA segments do for 2 nodes.
pub const SLOT_COUNT: u16 = 1024;

/// The slot of a new IKE SA: a hash of the initiator's SPI, so every node computes the same
/// slot for the same IKE_SA_INIT without coordination.
///
/// The hash is SplitMix64's finaliser: cheap, and it spreads sequential or low-entropy SPIs.
pub fn slot_for_initiator_spi(spi_i: u64) -> Slot {
    let mut z = spi_i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % u64::from(SLOT_COUNT)) as Slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sa_id_round_trips_through_text() {
        let id = SaId(0x0123_4567_89ab_cdef);
        assert_eq!(id.to_string(), "0123456789abcdef");
        assert_eq!("0123456789abcdef".parse::<SaId>(), Ok(id));
        assert_eq!("0x1f".parse::<SaId>(), Ok(SaId(0x1f)));
        assert!("".parse::<SaId>().is_err());
        assert!("xyz".parse::<SaId>().is_err());
        assert!("0123456789abcdef0".parse::<SaId>().is_err());
    }

    #[test]
    fn cluster_ids_round_trip_through_text() {
        let id = ClusterId([0xab; 16]);
        assert_eq!(id.to_string().parse::<ClusterId>(), Ok(id));
        assert!("abcd".parse::<ClusterId>().is_err());
    }

    #[test]
    fn epochs_never_wrap() {
        assert_eq!(Epoch(1).checked_next(), Some(Epoch(2)));
        assert_eq!(Epoch(u64::MAX).checked_next(), None);
    }

    #[test]
    fn slots_spread_sequential_spis() {
        let mut counts = vec![0u32; usize::from(SLOT_COUNT)];
        for spi in 0..(u64::from(SLOT_COUNT) * 64) {
            counts[usize::from(slot_for_initiator_spi(spi))] += 1;
        }
        let max = *counts.iter().max().unwrap();
        let min = *counts.iter().min().unwrap();
        assert!(
            min > 20 && max < 120,
            "uneven slot spread: min {min}, max {max}"
        );
    }
}
