//! Liveness pings and the fence gate.
//!
//! Every heartbeat this node pings each voter (cluster.v1 `Ping`) and records in its contact
//! table ([`Liveness`]) the peers that *answered* — a round trip, dated when the ping left. A
//! ping received from a peer is not contact: in an asymmetric partition (one direction cut)
//! the cut-off node would still receive pings while the leader no longer hears it, keep its data
//! plane running, and run its SAs beside their new owner. With round trips only, a node that
//! cannot both send and receive loses contact, fences itself within `fence_ms`, and is declared
//! down after `failover_ms`. After each round it re-evaluates the fence and renews the
//! [`FenceGate`](evpc_dataplane::FenceGate) until the moment the quorum condition would fail;
//! if this process stalls (paused, starved), the gate closes by itself.
//!
//! [`Liveness`]: super::liveness::Liveness
//!
//! Coming back from a fence, contact alone is not enough: while fenced, the node's SAs may have
//! moved. It reopens only once its owner runtime has acted on a state at least as new as the
//! leader's read index taken after contact came back (the *barrier*, from cluster.v1
//! `ReadIndex`). The barrier is asked afresh each time and for each attempt, never taken from
//! what peers put in their pings, so no message can hold it above the real commit index for
//! longer than one attempt.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evpc_proto::cluster::v1::PingMessage;
use evpc_raft_store::NodeId;
use openraft::ServerState;
use openraft::rt::WatchReceiver;
use tokio::sync::watch;

use crate::node::Node;
use crate::ownership::liveness::{FenceReason, PeerView};

/// A barrier not reached within this long is asked for again.
const BARRIER_RETRY_MS: u64 = 2_000;

/// What this node tells its peers about its leader.
pub fn my_view(node: &Node) -> PeerView {
    let (leader, state) = {
        let metrics = node.raft.metrics();
        let m = metrics.borrow_watched();
        (m.current_leader, m.state)
    };
    let serving = node.fence_reason().is_none();
    let reconciled = reflected_index(node);
    if state == ServerState::Leader {
        return PeerView {
            leader: Some(node.id),
            leader_contact_age_ms: Some(0),
            serving,
            reconciled,
        };
    }
    let now = node.gate.now_ms();
    node.liveness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .view(leader, now, serving, reconciled)
}

/// The last log index this node's data plane reflects: what its owner runtime acted on (a node
/// without a data plane sends nothing, so everything it applied).
pub fn reflected_index(node: &Node) -> u64 {
    if node.config.dataplane.backend.is_empty() || node.config.dataplane.backend == "none" {
        node.state.read().applied_index()
    } else {
        node.reconciled_index.load(Ordering::Acquire)
    }
}

/// A ping message (or answer) carrying this node's view.
pub fn message(node: &Node) -> PingMessage {
    let view = my_view(node);
    PingMessage {
        from: node.id,
        leader: view.leader,
        leader_contact_age_ms: view.leader_contact_age_ms,
        serving: view.serving,
        reconciled: view.reconciled,
    }
}

/// Records a round trip: `peer` answered the ping this node sent at `asked_ms`.
fn round_trip(node: &Node, peer: NodeId, asked_ms: u64, answer: &PingMessage) {
    if answer.from != peer {
        tracing::warn!(
            peer,
            answered_as = answer.from,
            "a ping was answered by another node id; not counted as contact"
        );
        return;
    }
    node.liveness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .heard(
            peer,
            asked_ms,
            PeerView {
                leader: answer.leader,
                leader_contact_age_ms: answer.leader_contact_age_ms,
                serving: answer.serving,
                reconciled: answer.reconciled,
            },
        );
}

/// The barrier a node coming back from a fence waits for.
#[derive(Debug, Default)]
pub struct Barrier {
    /// The read index it must reflect, once known.
    target: Option<u64>,
    /// When (monotonic ms) the current request was sent.
    asked_ms: Option<u64>,
    /// Where the request's answer lands.
    answer: Arc<Mutex<Option<u64>>>,
}

impl Barrier {
    fn reset(&mut self) {
        self.target = None;
        self.asked_ms = None;
        // A late answer to an abandoned request must not count for the next attempt.
        self.answer = Arc::default();
    }

    /// Asks the leader for a read index in the background (again, if the last attempt is old).
    fn ask(&mut self, node: &Arc<Node>, now_ms: u64) {
        if self
            .asked_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < BARRIER_RETRY_MS)
        {
            return;
        }
        self.target = None;
        self.answer = Arc::default();
        self.asked_ms = Some(now_ms);
        let (node, slot) = (node.clone(), self.answer.clone());
        let patience = Duration::from_millis(BARRIER_RETRY_MS);
        tokio::spawn(async move {
            match node.read_barrier(patience).await {
                Ok(index) => {
                    tracing::debug!(index, "fence barrier known");
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(index);
                }
                Err(e) => tracing::debug!(error = %e, "no read barrier yet"),
            }
        });
    }
}

/// Re-evaluates the fence: renews or closes the gate, records and logs transitions.
pub fn evaluate_fence(node: &Arc<Node>, barrier: &mut Barrier) {
    let voters = node.voters();
    let now = node.gate.now_ms();
    let fence_ms = node.config.ownership.fence_ms;
    let (mut reason, until) = {
        let liveness = node.liveness.lock().unwrap_or_else(|e| e.into_inner());
        (
            liveness.fence(&voters, now, fence_ms),
            liveness.open_until(&voters, now, fence_ms),
        )
    };
    if !node.in_service() {
        reason = Some(FenceReason::NoQuorum {
            heard: 0,
            needed: voters.len() / 2 + 1,
        });
    }
    // A gate that ran out (this process was paused or starved past its deadline) counts as a
    // fence too, even if the contact table looks fresh again by now.
    let was_fenced = node
        .fence
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
        || !node.gate.is_open();
    if reason.is_some() {
        barrier.reset();
    } else if was_fenced {
        // Back in contact: hold until the data plane reflects what the cluster had committed
        // when contact came back.
        if let Some(answer) = barrier
            .answer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            barrier.target = Some(answer);
        }
        let reflected = reflected_index(node);
        match barrier.target {
            Some(target) if reflected >= target => barrier.reset(),
            target => {
                // Not known yet, or not reached: (re)ask when the attempt is old.
                if target.is_none()
                    || barrier
                        .asked_ms
                        .is_some_and(|at| now.saturating_sub(at) >= BARRIER_RETRY_MS)
                {
                    barrier.ask(node, now);
                }
                reason = Some(FenceReason::CatchingUp {
                    reflected,
                    committed: target.unwrap_or(0),
                });
            }
        }
    }
    match (until, &reason) {
        (Some(until), None) => node.gate.renew_until(until),
        _ => node.gate.close(),
    }
    let mut current = node.fence.lock().unwrap_or_else(|e| e.into_inner());
    if *current != reason {
        match &reason {
            Some(FenceReason::CatchingUp {
                reflected,
                committed,
            }) => {
                tracing::debug!(reflected, committed, "catching up before unfencing")
            }
            Some(r) => {
                tracing::warn!(reason = ?r, "data plane fenced: out of contact with the cluster")
            }
            None => tracing::info!("data plane unfenced: in contact with the cluster"),
        }
        *current = reason;
    }
}

async fn ping(node: Arc<Node>, peer: NodeId, addr: String, timeout: Duration) {
    let Ok(mut client) = node.peers.client(peer, &addr) else {
        return;
    };
    let asked_ms = node.gate.now_ms();
    let request = message(&node);
    match tokio::time::timeout(timeout, client.ping(request)).await {
        Ok(Ok(reply)) => round_trip(&node, peer, asked_ms, &reply.into_inner()),
        Ok(Err(status)) => {
            if crate::peers::is_transport_error(&status) {
                node.peers.reset(peer);
            }
        }
        Err(_) => {}
    }
}

/// Pings every voter each heartbeat and keeps the fence up to date, until `shutdown`.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let period = Duration::from_millis(node.config.timeouts.heartbeat_ms);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut barrier = Barrier::default();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return Ok(()),
            _ = tick.tick() => {}
        }
        if node.in_service() {
            let targets: Vec<(NodeId, String)> = {
                let metrics = node.raft.metrics();
                let m = metrics.borrow_watched();
                let membership = m.membership_config.membership();
                membership
                    .voter_ids()
                    .filter(|v| *v != node.id)
                    .filter_map(|v| membership.get_node(&v).map(|n| (v, n.raft_addr.clone())))
                    .collect()
            };
            for (peer, addr) in targets {
                tokio::spawn(ping(node.clone(), peer, addr, period * 2));
            }
        }
        evaluate_fence(&node, &mut barrier);
    }
}
