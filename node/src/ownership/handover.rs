//! Planned handovers between two live owners, node to node.
//!
//! ```text
//!  both apply Move{sa → B, epoch e, handover}          (through the log, entry n)
//!   B: children started in standby (holding) ──────── board: standby (sa, e, n)
//!   A: HandOff: driver.hold(each child) — A sends nothing more for now — then A's pings say
//!      "reconciled ≥ n"
//!      cluster.v1 Handover{prepare}  ──► B: holds? then the deadline moves WAIT ahead: ready
//!      ready:  driver.take_over(child, none) — A sends what it held — then driver.hand_off
//!      else:   driver.hand_off (what A held is B's already, or nobody's)
//!      cluster.v1 Handover{complete, states}    ──► B's owner task: runtime.on_handover
//!   B: driver.take_over(child, state): refuses what A accepted, sends what A did not
//!   B, no state by the deadline: runtime.on_expired ─► take_over(child, none), but only once
//!      no other node can still be sending: each has acted on entry n (its pings say so) or
//!      is declared down in the state (the rule an unplanned takeover relies on)
//! ```
//!
//! Only one of A and B sends at any time: A sends again only after B said it holds, and B
//! holds at least [`HANDOVER_WAIT`] after saying so (the deadline moves with the answer, under
//! one lock). Nothing here decides who owns what — the log did — and nothing here can break the
//! counter rule: A never goes beyond its committed lease, B starts above it. A handover that
//! fails halfway (A dies or is cut off, a message is lost) costs at most what an unplanned move
//! costs: B goes on without A's state once A has stopped (or has been declared down).
//!
//! B never takes over on a bare timer while A may still send: on a loaded node A can apply the
//! move well after B, and until it does, A's children run. Two senders on one SA break the
//! client's anti-replay window (B's numbers are above A's, so A's later packets are dropped as
//! old) and deliver inner packets twice. Only [`HANDOVER_CAP`], far beyond any apply lag, ends
//! the wait regardless: a node that answers nobody's pings and yet is never declared down (an
//! asymmetric fault) cannot hold an SA's traffic forever.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use evpc_dataplane::HandoverState;
use evpc_raft_store::{Epoch, NodeId, NodeState, SaId, State};
use tokio::sync::{Notify, mpsc};

use crate::ownership::liveness::Liveness;

/// How long the old owner waits for the new one to hold the SA's packets. Meanwhile it holds
/// them itself, so a new owner that applies the move late (a loaded or just-restarted node)
/// costs a delay, not a loss; 100 ms lost packets on two busy cores (a planned move from a
/// node restarted with the whole cluster waited that long 25 times in one short campaign).
pub const PREPARE_WAIT: Duration = Duration::from_millis(300);
/// How long the new owner holds an SA's packets waiting for the old owner: from its start in
/// standby, and again from each answer that it holds (a handover between live nodes takes a
/// round trip or two).
pub const HANDOVER_WAIT: Duration = Duration::from_millis(200);
/// The longest a standby waits for the other nodes to have acted on the move, after which it
/// takes over regardless (logged): only a node that is neither heard nor declared down for
/// this long, which the failure detector rules out in all but asymmetric faults.
pub const HANDOVER_CAP: Duration = Duration::from_secs(3);
/// Completed handovers waiting for the owner task; beyond, later ones are dropped (their new
/// owners go on without the state after their wait).
const COMPLETED_QUEUE: usize = 1024;

/// The old owner's final state of an SA's children, as received.
#[derive(Debug)]
pub struct Completed {
    /// The SA.
    pub sa: SaId,
    /// The epoch it moved into.
    pub epoch: Epoch,
    /// Each child's state, by inbound SPI.
    pub states: Vec<(u32, HandoverState)>,
}

/// One SA held in standby.
#[derive(Copy, Clone, Debug)]
struct Standby {
    /// The wait for the old owner's state ends here (moved ahead by each prepare).
    deadline: Instant,
    /// Taken over regardless from here ([`HANDOVER_CAP`]).
    cap: Instant,
    /// The log index by which this node had applied the move.
    moved_at: u64,
}

/// This node's side of the handovers in flight: the SAs it holds in standby, and the states
/// old owners sent, for the owner task.
#[derive(Debug)]
pub struct HandoverBoard {
    /// SAs held in standby, by (SA, epoch).
    standby: Mutex<HashMap<(SaId, Epoch), Standby>>,
    changed: Notify,
    completed: mpsc::Sender<Completed>,
    receiver: Mutex<Option<mpsc::Receiver<Completed>>>,
}

impl Default for HandoverBoard {
    fn default() -> Self {
        let (completed, receiver) = mpsc::channel(COMPLETED_QUEUE);
        HandoverBoard {
            standby: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            completed,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl HandoverBoard {
    /// This node holds `sa`'s children in standby for `epoch`, having applied the move by log
    /// index `moved_at` (`None`: no longer, they took over).
    pub fn set_standby(&self, sa: SaId, epoch: Epoch, moved_at: Option<u64>) {
        let mut standby = self.standby.lock().unwrap_or_else(|e| e.into_inner());
        match moved_at {
            Some(moved_at) => {
                let now = Instant::now();
                standby.insert(
                    (sa, epoch),
                    Standby {
                        deadline: now + HANDOVER_WAIT,
                        cap: now + HANDOVER_CAP,
                        moved_at,
                    },
                );
            }
            None => {
                standby.remove(&(sa, epoch));
            }
        }
        drop(standby);
        self.changed.notify_waiters();
    }

    /// The old owner asks whether `sa` is held in standby for `epoch`: waits up to `wait` for
    /// it to be, and if it is, moves its deadline [`HANDOVER_WAIT`] ahead (so it still holds
    /// when the old owner's held packets and state come) and says so.
    pub async fn prepare(&self, sa: SaId, epoch: Epoch, wait: Duration) -> bool {
        let holding = || {
            let mut standby = self.standby.lock().unwrap_or_else(|e| e.into_inner());
            match standby.get_mut(&(sa, epoch)) {
                Some(s) => {
                    s.deadline = s.deadline.max(Instant::now() + HANDOVER_WAIT);
                    true
                }
                None => false,
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if holding() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return holding();
            }
        }
    }

    /// The standby SAs whose wait ended, taken off the board (under the same lock as
    /// [`HandoverBoard::prepare`]: once taken, a prepare is answered "not holding"). A wait
    /// ends when its deadline passed and `nobody_sends(moved_at)` says no other node can still
    /// be sending on the move's SAs, or at [`HANDOVER_CAP`]. `nobody_sends` is asked only about
    /// standbys past their deadline (none, unless a handover went wrong).
    pub fn expired(&self, mut nobody_sends: impl FnMut(u64) -> bool) -> Vec<(SaId, Epoch)> {
        let now = Instant::now();
        let mut standby = self.standby.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<(SaId, Epoch)> = standby
            .iter()
            .filter(|(key, s)| {
                if s.deadline > now {
                    return false;
                }
                if nobody_sends(s.moved_at) {
                    return true;
                }
                if s.cap <= now {
                    tracing::warn!(
                        sa = %key.0,
                        moved_at = s.moved_at,
                        "a node neither acted on the planned move nor was declared down within \
                         the cap: taking the SA over regardless"
                    );
                    return true;
                }
                false
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &gone {
            standby.remove(key);
        }
        gone
    }

    /// An old owner's final state arrived; `false` if the queue is full (dropped).
    pub fn complete(&self, completed: Completed) -> bool {
        self.completed.try_send(completed).is_ok()
    }

    /// The completed handovers, for the owner task (once).
    pub fn take_receiver(&self) -> Option<mpsc::Receiver<Completed>> {
        self.receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// Whether no node but `me` can still be sending on the SAs a planned move at log index
/// `moved_at` took from it: each other node in `state`'s registry has acted on that entry (its
/// last ping answer in `liveness` said so) or is declared down (fenced before that: the rule an
/// unplanned takeover relies on; the planner also declares down every node that is no longer
/// a voter). Work: the number of nodes.
pub fn nobody_else_sends(state: &State, liveness: &Liveness, me: NodeId, moved_at: u64) -> bool {
    state
        .nodes()
        .iter()
        .filter(|(id, record)| **id != me && record.state != NodeState::Down)
        .all(|(id, _)| liveness.reconciled(*id) >= moved_at)
}

/// Groups children's states by SA for the wire: postcard of `(in_spi, state)` pairs.
pub fn encode_states(states: &[(u32, HandoverState)]) -> Vec<u8> {
    postcard::to_stdvec(states).unwrap_or_default()
}

/// The inverse of [`encode_states`]; `None` for bytes that are not such a list.
pub fn decode_states(bytes: &[u8]) -> Option<Vec<(u32, HandoverState)>> {
    postcard::from_bytes(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_prepare_waits_for_the_standby_or_gives_up() {
        let board = std::sync::Arc::new(HandoverBoard::default());
        let (sa, epoch) = (SaId(7), Epoch(3));
        assert!(!board.prepare(sa, epoch, Duration::from_millis(20)).await);
        let b = board.clone();
        let waiter =
            tokio::spawn(async move { b.prepare(sa, epoch, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        board.set_standby(sa, epoch, Some(40));
        assert!(waiter.await.unwrap());
        assert!(
            !board.prepare(sa, Epoch(4), Duration::from_millis(5)).await,
            "another epoch"
        );
        assert!(board.expired(|_| true).is_empty(), "not yet");
        std::thread::sleep(HANDOVER_WAIT / 2);
        assert!(
            board.prepare(sa, epoch, Duration::ZERO).await,
            "the deadline moves ahead"
        );
        std::thread::sleep(HANDOVER_WAIT / 2 + Duration::from_millis(20));
        assert!(
            board.expired(|_| true).is_empty(),
            "moved by the last prepare"
        );
        std::thread::sleep(HANDOVER_WAIT / 2);
        let mut asked = Vec::new();
        assert!(
            board
                .expired(|moved_at| {
                    asked.push(moved_at);
                    false
                })
                .is_empty(),
            "past the deadline, but the old owner may still send"
        );
        assert_eq!(asked, vec![40], "asked about the move's index");
        assert_eq!(board.expired(|at| at <= 40), vec![(sa, epoch)]);
        assert!(
            !board.prepare(sa, epoch, Duration::ZERO).await,
            "expired: not holding any more"
        );
    }

    #[test]
    fn states_round_trip_and_garbage_is_refused() {
        let states = vec![(
            0xc001,
            HandoverState {
                highest_out: 9,
                inbound_accepted: vec![4, 5],
                recent_out: vec![1, 2, 3],
            },
        )];
        assert_eq!(decode_states(&encode_states(&states)), Some(states));
        assert_eq!(decode_states(&[0xff; 7]), None);
    }
}
