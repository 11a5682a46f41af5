//! The change feed: which SAs each applied entry changed, so the node's services act on those
//! alone instead of walking every SA after every commit or on every tick.
//!
//! ```text
//!  StateMachineStore::apply(entry N) ─► apply(&mut State, &Command) ─► Response
//!        │                                   (under the state's write lock)
//!        └─► changes(&Command, &Response) ─► ChangeFeed: (N, SaChange)… bounded ring
//!                                                │
//!  gateway reconcile, owner runtime ◄── StateReader::changes_since(cursor) ─► Feed::Changes
//!                                                                           | Feed::Resync
//! ```
//!
//! What an entry changed is derived from the command and `apply`'s answer, both of which every
//! replica has: a refused command changed nothing, an accepted one changed exactly the SAs it
//! names (an owner move whose epoch was stale is left out; a batch is the union of its
//! accepted parts). The match over [`Command`] and [`SaUpdate`] is exhaustive on purpose: a new
//! command must say what it changes before it compiles.
//!
//! The feed is a ring of bounded length. A reader whose cursor fell behind its oldest entry, or
//! that predates an installed snapshot, is told to [`Feed::Resync`]: walk the state once (in
//! pages, see [`crate::State::sas_from`]) and carry on from the index it is given. Nothing is
//! ever lost: at worst a slow reader does the walk it would otherwise do every time.

use std::collections::VecDeque;

use crate::command::{Applied, Command, Response, SaUpdate};
use crate::ids::SaId;

/// What about an SA an entry changed, as bits ([`SaChange::kinds`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChangeKinds(u16);

impl ChangeKinds {
    /// The SA is new (created or imported).
    pub const CREATED: ChangeKinds = ChangeKinds(1);
    /// The SA is gone (deleted or exported).
    pub const REMOVED: ChangeKinds = ChangeKinds(1 << 1);
    /// Owner and epoch (an owner move; every child's range restarted above the old marks).
    pub const OWNER: ChangeKinds = ChangeKinds(1 << 2);
    /// Children added, rekeyed or deleted.
    pub const CHILDREN: ChangeKinds = ChangeKinds(1 << 3);
    /// A child's sequence-number lease (its outbound high-water mark) or inbound checkpoint.
    pub const LEASE: ChangeKinds = ChangeKinds(1 << 4);
    /// Sealed key material (the IKE SA's engine state, or a resealed blob).
    pub const KEYS: ChangeKinds = ChangeKinds(1 << 5);
    /// The peer's address (NAT rebinding, MOBIKE).
    pub const PEER: ChangeKinds = ChangeKinds(1 << 6);
    /// The IKE SA's SPIs (an IKE rekey in place: the record follows the new IKE SA).
    pub const IKE_SPIS: ChangeKinds = ChangeKinds(1 << 8);
    /// IKE bookkeeping only: message IDs, stored datagrams, times, the peer last seen.
    pub const EXCHANGE: ChangeKinds = ChangeKinds(1 << 7);
    /// With [`ChangeKinds::OWNER`]: a planned move, handed over by a live old owner
    /// (`OwnerMove::handover`).
    pub const HANDOVER: ChangeKinds = ChangeKinds(1 << 9);

    /// What a data plane runs depends on: which node owns the SA in which epoch, its children
    /// and their leases, the peer's address. Not sealed blobs (a resealed blob holds the same
    /// keys; the IKE SA's engine state is the gateway's) nor IKE bookkeeping.
    pub const DATA_PLANE: ChangeKinds = ChangeKinds(
        Self::CREATED.0
            | Self::REMOVED.0
            | Self::OWNER.0
            | Self::HANDOVER.0
            | Self::CHILDREN.0
            | Self::LEASE.0
            | Self::PEER.0,
    );
    /// What decides which node runs an SA's IKE task: its existence, owner and epoch.
    pub const PLACEMENT: ChangeKinds =
        ChangeKinds(Self::CREATED.0 | Self::REMOVED.0 | Self::OWNER.0);

    /// No change.
    pub const NONE: ChangeKinds = ChangeKinds(0);

    /// Whether any of `other`'s bits are set here.
    pub fn intersects(self, other: ChangeKinds) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether nothing is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for ChangeKinds {
    type Output = ChangeKinds;
    fn bitor(self, rhs: ChangeKinds) -> ChangeKinds {
        ChangeKinds(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ChangeKinds {
    fn bitor_assign(&mut self, rhs: ChangeKinds) {
        self.0 |= rhs.0;
    }
}

/// One SA one entry changed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SaChange {
    /// The log index of the entry.
    pub index: u64,
    /// The SA.
    pub sa: SaId,
    /// What changed.
    pub kinds: ChangeKinds,
}

/// The SAs `command` changed, given `apply`'s answer to it, appended to `out` in order.
/// Returns whether it changed the slot map or the node registry.
pub fn changes(command: &Command, response: &Response, out: &mut Vec<(SaId, ChangeKinds)>) -> bool {
    let Ok(applied) = response else {
        return false;
    };
    match command {
        Command::CreateSa(sa) => out.push((sa.id, ChangeKinds::CREATED)),
        Command::ImportSa { sa, .. } => out.push((sa.id, ChangeKinds::CREATED)),
        Command::Update { sa, updates, .. } => {
            let kinds = updates
                .iter()
                .fold(ChangeKinds::NONE, |k, u| k | update_kinds(u));
            out.push((*sa, kinds));
        }
        Command::DeleteSa { sa, .. } => out.push((*sa, ChangeKinds::REMOVED)),
        Command::AssignOwners(moves) => {
            let results = match applied {
                Applied::Moves(results) => results.as_slice(),
                _ => &[],
            };
            for (m, result) in moves.iter().zip(results) {
                if result.is_ok() {
                    let planned = if m.handover {
                        ChangeKinds::HANDOVER
                    } else {
                        ChangeKinds::NONE
                    };
                    out.push((m.sa, ChangeKinds::OWNER | ChangeKinds::LEASE | planned));
                }
            }
        }
        Command::ResealKeys(reseals) => {
            if !matches!(applied, Applied::Resealed { replaced: 0, .. }) {
                for r in reseals {
                    out.push((r.sa, ChangeKinds::KEYS));
                }
            }
        }
        Command::SetSlots(_) | Command::SetNodeState { .. } => return true,
        Command::SetClusterId(_)
        | Command::RecordAcks(_)
        | Command::PruneTombstones { .. }
        | Command::ActivateKey { .. }
        | Command::RetireKey(_) => {}
        Command::Batch(commands) => {
            let results = match applied {
                Applied::Batch(results) => results.as_slice(),
                _ => &[],
            };
            let mut placement = false;
            for (c, r) in commands.iter().zip(results) {
                placement |= changes(c, r, out);
            }
            return placement;
        }
    }
    false
}

fn update_kinds(update: &SaUpdate) -> ChangeKinds {
    match update {
        SaUpdate::PeerRequestAnswered { .. }
        | SaUpdate::LocalRequestStarted(_)
        | SaUpdate::LocalRequestCompleted { .. }
        | SaUpdate::Times(_)
        | SaUpdate::PeerSeen { .. } => ChangeKinds::EXCHANGE,
        SaUpdate::ChildCreated(_)
        | SaUpdate::ChildRekeyed { .. }
        | SaUpdate::ChildDeleted { .. } => ChangeKinds::CHILDREN,
        SaUpdate::IkeRekeyedInPlace { .. } => ChangeKinds::IKE_SPIS | ChangeKinds::EXCHANGE,
        SaUpdate::Keys(_) => ChangeKinds::KEYS,
        SaUpdate::Peer(_) => ChangeKinds::PEER,
        SaUpdate::SeqLease { .. } | SaUpdate::ReplayCheckpoint { .. } => ChangeKinds::LEASE,
    }
}

/// How many SA changes the feed keeps. At 24 bytes each this is 6 MiB: minutes of history at
/// the highest commit rates measured, while every reader polls it within milliseconds.
pub const FEED_CAPACITY: usize = 1 << 18;

/// What a reader gets from the feed.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// Every change after the cursor, up to and including entry `upto`, is in the output.
    Changes {
        /// The reader's next cursor.
        upto: u64,
    },
    /// Changes after the cursor are no longer all known: walk the whole state, then carry on
    /// from `upto` (the state read afterwards holds at least everything up to it).
    Resync {
        /// The reader's next cursor.
        upto: u64,
    },
}

/// The bounded ring of recent changes, written by `apply`, read by the node's services.
#[derive(Debug)]
pub struct ChangeFeed {
    ring: VecDeque<SaChange>,
    capacity: usize,
    /// Entries at or below this index may have changes that are no longer in the ring (it
    /// overflowed, or a snapshot replaced the state).
    complete_after: u64,
    /// The last index the feed accounted for.
    last: u64,
    /// The last index that changed the slot map or the node registry.
    placement_at: u64,
}

impl ChangeFeed {
    /// A feed that is complete only after `index` (the state was loaded at `index`).
    pub fn new(index: u64, capacity: usize) -> ChangeFeed {
        ChangeFeed {
            ring: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            complete_after: index,
            last: index,
            placement_at: index,
        }
    }

    /// Records what entry `index` changed.
    pub fn push(&mut self, index: u64, changed: &[(SaId, ChangeKinds)], placement: bool) {
        for (sa, kinds) in changed {
            if self.ring.len() == self.capacity
                && let Some(dropped) = self.ring.pop_front()
            {
                // Everything at or below the dropped entry's index may be incomplete now.
                self.complete_after = self.complete_after.max(dropped.index);
            }
            self.ring.push_back(SaChange {
                index,
                sa: *sa,
                kinds: *kinds,
            });
        }
        if placement {
            self.placement_at = index;
        }
        self.last = self.last.max(index);
    }

    /// The state was replaced wholesale at `index` (a snapshot was installed).
    pub fn reset(&mut self, index: u64) {
        self.ring.clear();
        self.complete_after = index;
        self.last = index;
        self.placement_at = index;
    }

    /// The last index that changed the slot map or the node registry (or replaced the state).
    pub fn placement_changed_at(&self) -> u64 {
        self.placement_at
    }

    /// Appends to `out` every change after `cursor` whose kinds intersect `interest`, oldest
    /// first. O(changes after the cursor), never O(SAs).
    pub fn since(&self, cursor: u64, interest: ChangeKinds, out: &mut Vec<SaChange>) -> Feed {
        if cursor < self.complete_after {
            return Feed::Resync { upto: self.last };
        }
        // The ring is in index order: find the first entry after the cursor by bisection.
        let start = self.ring.partition_point(|c| c.index <= cursor);
        out.extend(
            self.ring
                .range(start..)
                .filter(|c| c.kinds.intersects(interest)),
        );
        Feed::Changes { upto: self.last }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(out: &[SaChange]) -> Vec<(u64, u64)> {
        out.iter().map(|c| (c.index, c.sa.0)).collect()
    }

    #[test]
    fn a_reader_gets_exactly_the_changes_after_its_cursor() {
        let mut feed = ChangeFeed::new(0, 16);
        feed.push(1, &[(SaId(10), ChangeKinds::CREATED)], false);
        feed.push(2, &[(SaId(11), ChangeKinds::EXCHANGE)], false);
        feed.push(3, &[(SaId(10), ChangeKinds::OWNER)], false);
        let mut out = Vec::new();
        assert_eq!(
            feed.since(1, ChangeKinds::DATA_PLANE, &mut out),
            Feed::Changes { upto: 3 }
        );
        assert_eq!(ids(&out), vec![(3, 10)], "entry 2 is IKE bookkeeping only");
        out.clear();
        feed.since(0, ChangeKinds::DATA_PLANE | ChangeKinds::EXCHANGE, &mut out);
        assert_eq!(ids(&out), vec![(1, 10), (2, 11), (3, 10)]);
    }

    #[test]
    fn an_overflowed_ring_sends_the_lagging_reader_to_resync() {
        let mut feed = ChangeFeed::new(0, 2);
        for i in 1..=3 {
            feed.push(i, &[(SaId(i), ChangeKinds::CREATED)], false);
        }
        let mut out = Vec::new();
        assert_eq!(
            feed.since(0, ChangeKinds::DATA_PLANE, &mut out),
            Feed::Resync { upto: 3 }
        );
        assert_eq!(
            feed.since(1, ChangeKinds::DATA_PLANE, &mut out),
            Feed::Changes { upto: 3 }
        );
        assert_eq!(ids(&out), vec![(2, 2), (3, 3)]);
    }

    #[test]
    fn a_snapshot_sends_every_older_reader_to_resync() {
        let mut feed = ChangeFeed::new(0, 16);
        feed.push(1, &[(SaId(1), ChangeKinds::CREATED)], false);
        feed.reset(50);
        let mut out = Vec::new();
        assert_eq!(
            feed.since(1, ChangeKinds::DATA_PLANE, &mut out),
            Feed::Resync { upto: 50 }
        );
        assert_eq!(
            feed.since(50, ChangeKinds::DATA_PLANE, &mut out),
            Feed::Changes { upto: 50 }
        );
        assert!(out.is_empty());
        assert_eq!(feed.placement_changed_at(), 50);
    }
}
