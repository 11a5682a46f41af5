//! What the cluster remembers of SAs and child SAs it deleted or exported, for as long as their
//! keys could still be alive.
//!
//! Deleting a record must not let it come back with lower counters: an older export of the
//! same SA, or a crafted command reusing a deleted child's SPI (and so, possibly, its keys),
//! would send sequence numbers again under keys that already used them — with AES-GCM a nonce
//! reuse (RFC 4106 §3.1). So each deletion leaves a tombstone:
//!
//! - per IKE SA: its epoch at deletion. An import of the same SA must bring at least that epoch
//!   (every import bumps the epoch), so a context older than what this cluster had — one that
//!   was already imported here once, or an earlier export — is refused;
//! - per child SA (inbound SPI): the IKE SA it belonged to and its final `out_hwm`. A new child
//!   may not take the SPI; an import of a later incarnation starts the child above it.
//!
//! A tombstone expires with the keys it protects: at the record's hard lifetime
//! (`expire_at_ms`), after which no peer accepts those keys and an import of such a context is
//! refused anyway. Records without a lifetime keep their tombstones forever. The leader removes
//! expired tombstones with [`crate::Command::PruneTombstones`], whose time it chooses; finding
//! the next expiry is O(log n), so nobody walks the tombstones per tick.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, SaId};
use crate::sa::{ChildSa, IkeSa};

/// Expiry of a tombstone whose record had no hard lifetime.
pub const NEVER: u64 = u64::MAX;

/// A deleted or exported IKE SA.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaTombstone {
    /// Its epoch when it was deleted: an import must not bring a lower one.
    pub epoch: Epoch,
    /// When its keys expire (wall-clock ms), or [`NEVER`].
    pub expires_ms: u64,
}

/// A deleted child SA, by inbound SPI.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpiTombstone {
    /// The IKE SA it belonged to.
    pub sa: SaId,
    /// Its last committed `out_hwm`: nothing under its keys may be sent at or below it again.
    pub out_hwm: u64,
    /// When its keys expire (wall-clock ms), or [`NEVER`].
    pub expires_ms: u64,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Buried {
    Sa(SaId),
    Spi(u32),
}

/// The tombstones of one state.
///
/// Invariant: `by_expiry` lists exactly the tombstones in `sas` and `spis`, with their expiry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstones {
    // Persistent maps, like the state's own: a snapshot's copy of them is O(1).
    sas: imbl::OrdMap<SaId, SaTombstone>,
    spis: imbl::OrdMap<u32, SpiTombstone>,
    by_expiry: imbl::OrdSet<(u64, Buried)>,
}

/// When keys with this lifetime expire: `expire_at_ms`, or never when there is none (0).
fn expiry(expire_at_ms: u64) -> u64 {
    if expire_at_ms == 0 {
        NEVER
    } else {
        expire_at_ms
    }
}

fn child_expiry(sa: &IkeSa, child: &ChildSa) -> u64 {
    if child.times.expire_at_ms != 0 {
        child.times.expire_at_ms
    } else {
        expiry(sa.times.expire_at_ms)
    }
}

impl Tombstones {
    /// The tombstone of IKE SA `id`, if it was deleted.
    pub fn sa(&self, id: SaId) -> Option<&SaTombstone> {
        self.sas.get(&id)
    }

    /// The tombstone of inbound SPI `spi`, if a child with it was deleted.
    pub fn spi(&self, spi: u32) -> Option<&SpiTombstone> {
        self.spis.get(&spi)
    }

    /// Number of tombstones (IKE SAs plus child SAs).
    pub fn len(&self) -> usize {
        self.sas.len() + self.spis.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The earliest expiry of any tombstone: O(log n), for the leader's pruning decision.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_expiry
            .get_min()
            .map(|(at, _)| *at)
            .filter(|at| *at != NEVER)
    }

    /// Records a deleted child SA of `sa`.
    pub(crate) fn bury_child(&mut self, sa: &IkeSa, child: &ChildSa) {
        let stone = SpiTombstone {
            sa: sa.id,
            out_hwm: child.out_hwm,
            expires_ms: child_expiry(sa, child),
        };
        if let Some(old) = self.spis.insert(child.in_spi, stone) {
            // A SPI is only buried again after an import revived it: keep the higher marks.
            self.by_expiry
                .remove(&(old.expires_ms, Buried::Spi(child.in_spi)));
            let merged = SpiTombstone {
                sa: sa.id,
                out_hwm: old.out_hwm.max(stone.out_hwm),
                expires_ms: old.expires_ms.max(stone.expires_ms),
            };
            self.spis.insert(child.in_spi, merged);
        }
        let at = self.spis[&child.in_spi].expires_ms;
        self.by_expiry.insert((at, Buried::Spi(child.in_spi)));
    }

    /// Records a deleted IKE SA and all its children.
    pub(crate) fn bury_sa(&mut self, sa: &IkeSa) {
        for child in sa.children.values() {
            self.bury_child(sa, child);
        }
        let expires_ms = sa
            .children
            .values()
            .map(|c| child_expiry(sa, c))
            .fold(expiry(sa.times.expire_at_ms), u64::max);
        let mut stone = SaTombstone {
            epoch: sa.epoch,
            expires_ms,
        };
        if let Some(old) = self.sas.remove(&sa.id) {
            self.by_expiry.remove(&(old.expires_ms, Buried::Sa(sa.id)));
            stone.epoch = stone.epoch.max(old.epoch);
            stone.expires_ms = stone.expires_ms.max(old.expires_ms);
        }
        self.by_expiry.insert((stone.expires_ms, Buried::Sa(sa.id)));
        self.sas.insert(sa.id, stone);
    }

    /// Forgets the tombstones of `sa` and of the SPIs given: a later incarnation of it was
    /// imported and lives again.
    pub(crate) fn revive(&mut self, sa: SaId, spis: impl IntoIterator<Item = u32>) {
        if let Some(old) = self.sas.remove(&sa) {
            self.by_expiry.remove(&(old.expires_ms, Buried::Sa(sa)));
        }
        for spi in spis {
            if let Some(old) = self.spis.remove(&spi) {
                self.by_expiry.remove(&(old.expires_ms, Buried::Spi(spi)));
            }
        }
    }

    /// Removes at most `max` tombstones that expired before `now_ms`; returns how many.
    pub(crate) fn prune(&mut self, now_ms: u64, max: usize) -> usize {
        let mut pruned = 0;
        while pruned < max {
            let Some(&(at, buried)) = self.by_expiry.get_min() else {
                break;
            };
            if at >= now_ms || at == NEVER {
                break;
            }
            self.by_expiry.remove_min();
            match buried {
                Buried::Sa(id) => {
                    self.sas.remove(&id);
                }
                Buried::Spi(spi) => {
                    self.spis.remove(&spi);
                }
            }
            pruned += 1;
        }
        pruned
    }

    /// Every IKE SA tombstone, in id order.
    pub fn sas(&self) -> impl Iterator<Item = (SaId, &SaTombstone)> {
        self.sas.iter().map(|(id, t)| (*id, t))
    }

    /// Every child SA tombstone, in SPI order.
    pub fn spis(&self) -> impl Iterator<Item = (u32, &SpiTombstone)> {
        self.spis.iter().map(|(spi, t)| (*spi, t))
    }

    /// Checks that the expiry index lists exactly the tombstones.
    pub(crate) fn check(&self) -> Result<(), String> {
        let expected: BTreeSet<(u64, Buried)> = self
            .sas
            .iter()
            .map(|(id, t)| (t.expires_ms, Buried::Sa(*id)))
            .chain(
                self.spis
                    .iter()
                    .map(|(spi, t)| (t.expires_ms, Buried::Spi(*spi))),
            )
            .collect();
        if !expected.iter().eq(self.by_expiry.iter()) {
            return Err("tombstone expiry index out of sync".into());
        }
        Ok(())
    }
}
