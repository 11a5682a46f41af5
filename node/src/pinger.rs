//! Liveness pings and the fence gate.
//!
//! Every heartbeat this node pings each voter (cluster.v1 `Ping`) and records answers — and the
//! pings it receives — in its contact table ([`Liveness`]). After each round it re-evaluates the
//! fence and renews the [`FenceGate`](evpc_dataplane::FenceGate) until the moment the quorum
//! condition would fail; if this process stalls (paused, starved), the gate closes by itself.
//!
//! Coming back from a fence, contact alone is not enough: while fenced, the node's SAs may have
//! moved. It reopens only once its owner runtime has acted on a state at least as new as the
//! leader's commit index when contact came back (the *barrier*), so it never resumes an SA that
//! another node took over meanwhile.

use std::sync::Arc;
use std::time::Duration;

use evpc_proto::cluster::v1::PingMessage;
use evpc_raft_store::NodeId;
use openraft::ServerState;
use openraft::rt::WatchReceiver;
use tokio::sync::watch;

use crate::node::Node;
use crate::ownership::liveness::PeerView;

/// What this node tells its peers about its leader.
pub fn my_view(node: &Node) -> PeerView {
    let (leader, state) = {
        let metrics = node.raft.metrics();
        let m = metrics.borrow_watched();
        (m.current_leader, m.state)
    };
    if state == ServerState::Leader {
        return PeerView {
            leader: Some(node.id),
            leader_contact_age_ms: Some(0),
        };
    }
    let now = node.gate.now_ms();
    node.liveness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .view(leader, now)
}

/// A ping message carrying this node's view.
pub fn message(node: &Node) -> PingMessage {
    let view = my_view(node);
    let committed_index = node
        .raft
        .metrics()
        .borrow_watched()
        .local_committed
        .map_or(0, |l| l.index);
    PingMessage {
        from: node.id,
        leader: view.leader,
        leader_contact_age_ms: view.leader_contact_age_ms,
        committed_index,
    }
}

/// Records a ping or a ping answer from a peer.
pub fn heard(node: &Node, message: &PingMessage) {
    let now = node.gate.now_ms();
    if message.leader == Some(message.from) {
        node.leader_committed
            .fetch_max(message.committed_index, std::sync::atomic::Ordering::AcqRel);
    }
    node.liveness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .heard(
            message.from,
            now,
            PeerView {
                leader: message.leader,
                leader_contact_age_ms: message.leader_contact_age_ms,
            },
        );
}

/// Re-evaluates the fence: renews or closes the gate, records and logs transitions.
pub fn evaluate_fence(node: &Node, barrier: &mut Option<u64>) {
    use crate::ownership::liveness::FenceReason;
    use std::sync::atomic::Ordering;
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
    // A gate that ran out (this process was paused or starved past its deadline) counts as a
    // fence too, even if the contact table looks fresh again by now.
    let was_fenced = node
        .fence
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
        || !node.gate.is_open();
    if reason.is_some() {
        *barrier = None;
    } else if was_fenced {
        // Back in contact: hold until the data plane reflects what the leader has committed.
        // The target only rises while catching up: a node that was leader before the fence
        // may have been deposed, and learns the new leader's (higher) index from its pings.
        let leader_committed = node.leader_committed.load(Ordering::Acquire);
        let is_leader = node.is_leader();
        let own = if is_leader {
            node.raft
                .metrics()
                .borrow_watched()
                .local_committed
                .map_or(0, |l| l.index)
        } else {
            0
        };
        let target = barrier.unwrap_or(0).max(leader_committed).max(own);
        *barrier = Some(target);
        let reflected = if node.config.dataplane.backend.is_empty()
            || node.config.dataplane.backend == "none"
        {
            node.state.read().applied_index()
        } else {
            node.reconciled_index.load(Ordering::Acquire)
        };
        let known_leader = is_leader || leader_committed > 0;
        if !known_leader || reflected < target {
            reason = Some(FenceReason::CatchingUp {
                reflected,
                committed: target,
            });
        } else {
            *barrier = None;
        }
    }
    match (until, &reason) {
        (Some(until), None) => node.gate.renew_until(until),
        _ => node.gate.close(),
    }
    let mut current = node.fence.lock().unwrap_or_else(|e| e.into_inner());
    if *current != reason {
        match &reason {
            Some(FenceReason::CatchingUp { .. }) => {}
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
    let request = message(&node);
    match tokio::time::timeout(timeout, client.ping(request)).await {
        Ok(Ok(reply)) => heard(&node, &reply.into_inner()),
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
    let mut barrier = None;
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return Ok(()),
            _ = tick.tick() => {}
        }
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
        evaluate_fence(&node, &mut barrier);
    }
}
