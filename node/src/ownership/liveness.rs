//! Who this node can hear, and whether it may keep processing its SAs (the fence).
//!
//! Every node pings every voter each heartbeat and records when it last had a round trip with
//! each (its ping answered; dated when the ping left), together with what the peer said about
//! its own contact with the leader. Only round trips count: a node that can receive but not
//! send (or the reverse) is cut off, and must fence itself like one that hears nothing.
//! From that table come two decisions, both pure functions of (table, now):
//!
//! - **the fence** (every node, for itself): this node may process packets only while it hears
//!   a quorum of voters, and — when some peer it hears is in contact with a leader other than
//!   this node, and heard it clearly more recently than this node did — only while it hears
//!   that leader too. A node cut off from the cluster therefore stops within `fence_ms`, while
//!   when the leader dies (everyone loses it at once) and during the election that follows,
//!   healthy nodes that still hear each other keep their tunnels running;
//! - **failure detection** (the leader, for the others): a voter not heard from for
//!   `failover_ms` is declared down. With `fence_ms < failover_ms`, such a node has fenced
//!   itself before its SAs are handed to anyone else.
//!
//! Times are milliseconds on a monotonic clock the caller chooses (virtual in tests).

use std::collections::{BTreeMap, BTreeSet};

use evpc_raft_store::NodeId;

/// What a node tells its peers in each ping and ping answer.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    /// The leader it follows (or is), if any.
    pub leader: Option<NodeId>,
    /// How long ago it last heard that leader (0 when it is the leader); `None` if never.
    pub leader_contact_age_ms: Option<u64>,
    /// Its data plane is open (unfenced: in contact, and its owner runtime caught up): SAs
    /// moved to it start at once. A node that just started or joined is not, for a moment;
    /// the leader places nothing on it until it is.
    pub serving: bool,
    /// The last log index its owner runtime acted on: every child the state up to there stops
    /// or hands off is stopped or held.
    pub reconciled: u64,
}

#[derive(Copy, Clone, Debug)]
struct Contact {
    last_heard_ms: u64,
    view: PeerView,
}

/// Why the fence is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// Fewer than a majority of voters (this node included) heard within the fence timeout.
    NoQuorum {
        /// Voters heard (this node included).
        heard: usize,
        /// Voters needed.
        needed: usize,
    },
    /// A peer is in contact with leader `leader`, which this node has not heard from.
    LeaderUnreachable {
        /// The leader.
        leader: NodeId,
    },
    /// Back in contact, but the data plane does not yet reflect what the leader committed
    /// meanwhile (SAs may have moved while this node was cut off).
    CatchingUp {
        /// The applied index the data plane reflects.
        reflected: u64,
        /// The leader's commit index it must reach.
        committed: u64,
    },
}

/// The contact table of one node.
#[derive(Clone, Debug)]
pub struct Liveness {
    me: NodeId,
    started_ms: u64,
    contacts: BTreeMap<NodeId, Contact>,
}

impl Liveness {
    /// A table for node `me`, started at `now_ms` (silence is counted from there for peers
    /// never heard from).
    pub fn new(me: NodeId, now_ms: u64) -> Liveness {
        Liveness {
            me,
            started_ms: now_ms,
            contacts: BTreeMap::new(),
        }
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Records a round trip with `peer`: it answered the ping this node sent at `now_ms`.
    pub fn heard(&mut self, peer: NodeId, now_ms: u64, view: PeerView) {
        if peer == self.me {
            return;
        }
        let contact = self.contacts.entry(peer).or_insert(Contact {
            last_heard_ms: now_ms,
            view,
        });
        contact.last_heard_ms = contact.last_heard_ms.max(now_ms);
        contact.view = view;
    }

    /// How long `peer` has been silent: since its last message, or since this table started if
    /// it was never heard. Zero for this node.
    pub fn silence_ms(&self, peer: NodeId, now_ms: u64) -> u64 {
        if peer == self.me {
            return 0;
        }
        let since = self
            .contacts
            .get(&peer)
            .map_or(self.started_ms, |c| c.last_heard_ms);
        now_ms.saturating_sub(since)
    }

    /// Whether `node` was heard within `window_ms`. A peer never heard is not heard: a node
    /// that just (re)started is fenced until it has heard a quorum.
    fn hears(&self, node: NodeId, now_ms: u64, window_ms: u64) -> bool {
        node == self.me
            || self
                .contacts
                .get(&node)
                .is_some_and(|c| now_ms.saturating_sub(c.last_heard_ms) < window_ms)
    }

    /// What this node tells its peers, given the leader it knows, whether it serves and the
    /// index its owner runtime has acted on.
    pub fn view(
        &self,
        leader: Option<NodeId>,
        now_ms: u64,
        serving: bool,
        reconciled: u64,
    ) -> PeerView {
        PeerView {
            leader,
            leader_contact_age_ms: leader.map(|l| self.silence_ms(l, now_ms)),
            serving,
            reconciled,
        }
    }

    /// The index `node`'s owner runtime had acted on at its last answer (0 if never heard).
    pub fn reconciled(&self, node: NodeId) -> u64 {
        self.contacts.get(&node).map_or(0, |c| c.view.reconciled)
    }

    /// Whether `node` said, in its last answer, that it serves (this node: `true`).
    pub fn serving(&self, node: NodeId) -> bool {
        node == self.me || self.contacts.get(&node).is_some_and(|c| c.view.serving)
    }

    /// Whether this node must stop processing packets now, and why.
    ///
    /// Invariant: a node that has heard nobody for `fence_ms` is fenced (it cannot hear a
    /// quorum), so a leader that declares it down after `failover_ms > fence_ms` of silence
    /// never hands its SAs to another owner while it still processes them.
    pub fn fence(
        &self,
        voters: &BTreeSet<NodeId>,
        now_ms: u64,
        fence_ms: u64,
    ) -> Option<FenceReason> {
        let hears = |node: NodeId| self.hears(node, now_ms, fence_ms);
        let needed = voters.len() / 2 + 1;
        let heard =
            voters.iter().filter(|v| hears(**v)).count() + usize::from(!voters.contains(&self.me));
        if heard < needed {
            return Some(FenceReason::NoQuorum { heard, needed });
        }
        for (peer, contact) in &self.contacts {
            if !hears(*peer) || !voters.contains(peer) {
                continue;
            }
            // The peer's contact with the leader, aged to now: it said `age` when it answered
            // the ping this node sent at `last_heard_ms`.
            let Some(leader) = contact.view.leader else {
                continue;
            };
            let Some(peer_age) = contact
                .view
                .leader_contact_age_ms
                .map(|age| age.saturating_add(now_ms.saturating_sub(contact.last_heard_ms)))
            else {
                continue;
            };
            // Cut off from a leader the others still hear: this node's silence with it is far
            // longer than the peer's. A leader that died falls silent for everyone at once (the
            // ages differ by the pings' phase, under a heartbeat): that is an election, not a
            // partition, and fencing through it would stop every tunnel of the cluster.
            if leader != self.me
                && peer_age < fence_ms
                && !hears(leader)
                && self.silence_ms(leader, now_ms) > peer_age.saturating_add(fence_ms / 2)
            {
                return Some(FenceReason::LeaderUnreachable { leader });
            }
        }
        None
    }

    /// Until when (on the same clock) the fence stays open if nothing more is heard: the moment
    /// the quorum condition would fail. `None` if it is closed now.
    pub fn open_until(&self, voters: &BTreeSet<NodeId>, now_ms: u64, fence_ms: u64) -> Option<u64> {
        if self.fence(voters, now_ms, fence_ms).is_some() {
            return None;
        }
        let needed = voters.len() / 2 + 1;
        // Deadlines of each voter's contact, this node's own never expiring.
        let mut deadlines: Vec<u64> = voters
            .iter()
            .map(|v| {
                if *v == self.me {
                    u64::MAX
                } else {
                    self.contacts
                        .get(v)
                        .map_or(0, |c| c.last_heard_ms + fence_ms)
                }
            })
            .collect();
        deadlines.sort_unstable_by(|a, b| b.cmp(a));
        // The quorum holds until the `needed`-th freshest contact expires.
        deadlines
            .get(needed.saturating_sub(1))
            .copied()
            .or(Some(u64::MAX))
    }

    /// Voters silent for longer than `failover_ms`: the leader declares them down.
    pub fn silent_voters(
        &self,
        voters: &BTreeSet<NodeId>,
        now_ms: u64,
        failover_ms: u64,
    ) -> BTreeSet<NodeId> {
        voters
            .iter()
            .copied()
            .filter(|v| *v != self.me && self.silence_ms(*v, now_ms) > failover_ms)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters() -> BTreeSet<NodeId> {
        BTreeSet::from([1, 2, 3])
    }

    fn view(leader: NodeId, age: u64) -> PeerView {
        PeerView {
            leader: Some(leader),
            leader_contact_age_ms: Some(age),
            serving: true,
            reconciled: 0,
        }
    }

    #[test]
    fn a_node_that_hears_nobody_fences_itself() {
        let mut l = Liveness::new(1, 0);
        l.heard(2, 100, view(2, 0));
        l.heard(3, 100, view(2, 10));
        assert_eq!(l.fence(&voters(), 150, 200), None);
        assert_eq!(l.open_until(&voters(), 150, 200), Some(300));
        // One peer still heard: 2 of 3 is a quorum.
        l.heard(2, 250, view(2, 0));
        assert_eq!(l.fence(&voters(), 350, 200), None);
        // Nobody for 200 ms: fenced.
        assert_eq!(
            l.fence(&voters(), 451, 200),
            Some(FenceReason::NoQuorum {
                heard: 1,
                needed: 2
            })
        );
        assert_eq!(l.open_until(&voters(), 451, 200), None);
    }

    #[test]
    fn a_node_that_just_started_is_fenced_until_it_hears_a_quorum() {
        let mut l = Liveness::new(1, 1_000);
        assert!(l.fence(&voters(), 1_000, 200).is_some());
        l.heard(3, 1_010, PeerView::default());
        assert_eq!(l.fence(&voters(), 1_020, 200), None);
    }

    #[test]
    fn during_an_election_nodes_that_hear_each_other_keep_running() {
        // Leader 3 died; 1 and 2 hear each other and no leader.
        let mut l = Liveness::new(1, 0);
        l.heard(2, 1_000, PeerView::default());
        assert_eq!(l.fence(&voters(), 1_050, 200), None);
    }

    #[test]
    fn a_node_cut_off_from_a_live_leader_fences_even_with_a_quorum() {
        // 1 hears 2, 2 is in contact with leader 3, 1 has not heard 3 for long.
        let mut l = Liveness::new(1, 0);
        l.heard(3, 100, view(3, 0));
        l.heard(2, 1_000, view(3, 20));
        assert_eq!(
            l.fence(&voters(), 1_010, 200),
            Some(FenceReason::LeaderUnreachable { leader: 3 })
        );
        // The peer's own contact with the leader is stale too: an election is on, keep going.
        l.heard(2, 1_000, view(3, 500));
        assert_eq!(l.fence(&voters(), 1_010, 200), None);
    }

    #[test]
    fn a_dead_leader_fences_nobody_while_a_live_one_out_of_reach_does() {
        // Leader 3 answered 1 at 1_000 and 2 at 1_040, then died. 2's answers to 1 keep
        // coming, saying how long ago it heard 3: the same silence, seen a little later.
        let mut l = Liveness::new(1, 0);
        l.heard(3, 1_000, view(3, 0));
        for t in (1_050..2_000).step_by(50) {
            l.heard(2, t, view(3, t - 1_040));
            assert_eq!(l.fence(&voters(), t + 20, 200), None, "at {}", t + 20);
        }
        // Leader 3 alive and answering 2 (age 10 at every answer), not 1 since 1_000.
        let mut cut = Liveness::new(1, 0);
        cut.heard(3, 1_000, view(3, 0));
        let fenced = (1_050..2_000)
            .step_by(10)
            .find(|t| {
                cut.heard(2, *t - *t % 50, view(3, 10));
                cut.fence(&voters(), *t, 200).is_some()
            })
            .expect("fenced");
        assert!(
            (1_200..1_300).contains(&fenced),
            "fenced at {fenced}: once the leader is out of reach for fence_ms"
        );
    }

    #[test]
    fn the_leader_declares_down_only_after_the_failover_timeout() {
        let mut l = Liveness::new(1, 0);
        l.heard(2, 1_000, view(1, 0));
        l.heard(3, 1_000, view(1, 0));
        assert!(l.silent_voters(&voters(), 1_300, 300).is_empty());
        l.heard(2, 1_250, view(1, 0));
        assert_eq!(l.silent_voters(&voters(), 1_301, 300), BTreeSet::from([3]));
        // Never heard: silent since the table started.
        let fresh = Liveness::new(1, 5_000);
        assert!(fresh.silent_voters(&voters(), 5_200, 300).is_empty());
        assert_eq!(fresh.silent_voters(&voters(), 5_301, 300).len(), 2);
    }

    #[test]
    fn fence_before_failover_for_any_silent_node() {
        // For any last-contact time, the silent node's own fence closes before the leader's
        // failure detector fires (fence 200 ms < failover 300 ms).
        for last in [0u64, 17, 250, 999] {
            let mut silent = Liveness::new(3, 0);
            silent.heard(1, last, view(1, 0));
            silent.heard(2, last, view(1, 5));
            let mut leader = Liveness::new(1, 0);
            leader.heard(2, 10_000, view(1, 0));
            leader.heard(3, last, view(1, 0));
            let declared_at = (last..)
                .find(|t| leader.silent_voters(&voters(), *t, 300).contains(&3))
                .unwrap();
            let fenced_at = (last..)
                .find(|t| silent.fence(&voters(), *t, 200).is_some())
                .unwrap();
            assert!(
                fenced_at < declared_at,
                "last {last}: fenced {fenced_at} declared {declared_at}"
            );
        }
    }
}
