//! Runs the owner runtime against this node's data plane: reacts to the applied state (start,
//! extend, stop), ticks leases and checkpoints, forwards fence changes to the backend.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evpc_dataplane::{DriverError, SaDriver};
use evpc_proto::cluster::v1::HandoverRequest;
use evpc_raft_store::{
    Applied, ChangeKinds, Command, Epoch, Feed, NodeId, Response, SaId, SaUpdate,
};
use tokio::sync::{mpsc, watch};

use crate::node::Node;
use crate::ownership::handover::{PREPARE_WAIT, encode_states, nobody_else_sends};
use crate::ownership::runtime::{Action, OwnerConfig, OwnerRuntime, ReplayGapPolicy};
use crate::sealing::Opener;

/// How often leases and checkpoints are looked at.
const TICK: Duration = Duration::from_millis(20);
/// Applied-state changes closer together than this are handled together.
const DEBOUNCE: Duration = Duration::from_millis(2);

/// The owner runtime's settings from the node configuration.
pub fn owner_config(node: &Node) -> OwnerConfig {
    let o = &node.config.ownership;
    OwnerConfig {
        lease_min: o.lease_min,
        lease_max: o.lease_max,
        lease_interval_ms: o.lease_interval_ms,
        checkpoint_packets: o.checkpoint_packets,
        checkpoint_ms: o.checkpoint_ms,
        replay_gap: if o.replay_gap == "jump" {
            ReplayGapPolicy::Jump {
                margin: o.replay_jump,
            }
        } else {
            ReplayGapPolicy::Accept
        },
        retry_ms: 500,
    }
}

fn count_leases(command: &Command) -> u64 {
    match command {
        Command::Update { updates, .. } => updates
            .iter()
            .filter(|u| matches!(u, SaUpdate::SeqLease { .. }))
            .count() as u64,
        Command::Batch(commands) => commands.iter().map(count_leases).sum(),
        _ => 0,
    }
}

fn refused_response(response: &Response) -> bool {
    match response {
        Err(_) => true,
        Ok(Applied::Batch(results)) => results.iter().any(refused_response),
        Ok(_) => false,
    }
}

/// Drives `driver` for `node` until `shutdown`.
pub async fn run(
    node: Arc<Node>,
    driver: Arc<dyn SaDriver>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // The counter rule after a restart: a child's first number may only be picked from a state
    // that holds everything the cluster had committed when this process came back — never
    // from what the data directory alone recovered (its committed index may not have been on
    // disk, or the whole cluster may have crashed with leases this node used). So the first
    // scan waits for a read barrier from the leader, and for the state to reach it.
    let Some(barrier) = startup_barrier(&node, &mut shutdown).await else {
        return Ok(());
    };
    tracing::info!(
        barrier,
        "applied everything committed before this start; starting child SAs"
    );
    let mut runtime = OwnerRuntime::new(node.id, owner_config(&node));
    let mut applied = node.state.applied_index();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<()>();
    let mut fenced = None;
    let mut state_changed = true;
    // The change feed's cursor: the SAs changed up to here are reconciled. Entries that cannot
    // change the data plane (an IKE exchange's message-ID advance, say) are not even listed,
    // and the SAs that can are looked at one by one: the work per commit does not grow with
    // the number of SAs, nor does the time `apply` may wait for the state's read lock.
    let mut cursor = 0;
    let mut changed = Vec::new();
    // The first look is at the whole state: it decides which ranges this process saw granted.
    let mut looked = false;
    let mut active = Vec::new();
    let mut completed = node
        .handovers
        .take_receiver()
        .ok_or_else(|| anyhow::anyhow!("the owner task runs once per node"))?;
    let handing_off: HandingOff = Arc::default();
    let exec = Exec {
        node: &node,
        driver: &driver,
        failed: &failed_tx,
        handing_off: &handing_off,
    };
    loop {
        if state_changed {
            changed.clear();
            let (actions, seen, feed) = {
                let state = node.state.read();
                // Read under the state's lock, which `apply` holds while it pushes to the feed:
                // the changes and the state are the same cut. Read before the lock, a move applied
                // in between would show in the state (the SA is gone) but not yet as a handover in
                // the changes, and the child would be cut instead of handed off.
                let feed = node
                    .state
                    .changes_since(cursor, ChangeKinds::DATA_PLANE, &mut changed);
                let now = node.gate.now_ms();
                let opener = Opener(node.keyring.as_ref());
                let full = !looked || matches!(feed, Feed::Resync { .. });
                looked = true;
                let actions = if full {
                    runtime.on_state(&state, now, &opener)
                } else {
                    let mut ids: Vec<SaId> = changed.iter().map(|c| c.sa).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    let handed_over: BTreeSet<SaId> = changed
                        .iter()
                        .filter(|c| c.kinds.intersects(ChangeKinds::HANDOVER))
                        .map(|c| c.sa)
                        .collect();
                    runtime.on_changes(&state, &ids, &handed_over, now, &opener)
                };
                // A full look saw the state as read; the changes only go as far as the feed.
                let seen = match feed {
                    _ if full => state.applied_index(),
                    Feed::Resync { upto } | Feed::Changes { upto } => upto,
                };
                (actions, seen, feed)
            };
            cursor = match feed {
                Feed::Resync { upto } | Feed::Changes { upto } => upto,
            };
            exec.run(actions, seen);
            node.reconciled_index.store(seen, Ordering::Release);
            node.running_children
                .store(runtime.running_count() as u64, Ordering::Relaxed);
            state_changed = false;
        }
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            changed = applied.changed() => {
                if changed.is_err() {
                    break;
                }
                let index = *applied.borrow_and_update();
                if node.state.data_plane_changed_at() > cursor {
                    tokio::time::sleep(DEBOUNCE).await;
                    state_changed = true;
                } else {
                    // Nothing up to `index` changes what runs: the current view stands.
                    node.reconciled_index.store(index, Ordering::Release);
                }
            }
            _ = tick.tick() => {
                let now_fenced = node.fence_reason().is_some();
                if fenced != Some(now_fenced) {
                    driver.set_fenced(now_fenced);
                    fenced = Some(now_fenced);
                }
                active.clear();
                let known = driver.take_active(&mut active);
                let mut actions = runtime.on_tick(
                    node.gate.now_ms(),
                    &|spi| driver.counters(spi),
                    known.then_some(active.as_slice()),
                );
                for (sa, epoch) in node.handovers.expired(|moved_at| nobody_else_sends_here(&node, moved_at)) {
                    actions.extend(runtime.on_expired(sa, epoch));
                }
                exec.run(actions, cursor);
            }
            Some(()) = failed_rx.recv() => runtime.on_proposal_failed(),
            Some(done) = completed.recv() => {
                let actions = runtime.on_handover(done.sa, done.epoch, done.states);
                exec.run(actions, cursor);
            }
        }
    }
    for (in_spi, _, _) in runtime.running().collect::<Vec<_>>() {
        driver.stop(in_spi);
    }
    Ok(())
}

/// [`nobody_else_sends`] on this node's state and contact table.
fn nobody_else_sends_here(node: &Node, moved_at: u64) -> bool {
    let state = node.state.read();
    let liveness = node.liveness.lock().unwrap_or_else(|e| e.into_inner());
    nobody_else_sends(&state, &liveness, node.id, moved_at)
}

/// Waits for a read barrier taken after this process started, then until the applied state
/// reaches it. `None` if asked to shut down first.
async fn startup_barrier(node: &Arc<Node>, shutdown: &mut watch::Receiver<bool>) -> Option<u64> {
    let barrier = loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return None,
            asked = node.read_barrier(Duration::from_secs(5)) => match asked {
                Ok(index) => break index,
                Err(e) => tracing::info!(error = %e, "waiting for a leader before starting child SAs"),
            },
        }
    };
    let mut applied = node.state.applied_index();
    tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => None,
        reached = applied.wait_for(|index| *index >= barrier) => reached.ok().map(|_| barrier),
    }
}

/// Children being handed off by a task of their own: a start of the same SPI meanwhile (the SA
/// came straight back) claims it first, so the task leaves it alone.
type HandingOff = Arc<Mutex<HashSet<u32>>>;

/// Runs the runtime's actions against the data plane.
struct Exec<'a> {
    node: &'a Arc<Node>,
    driver: &'a Arc<dyn SaDriver>,
    failed: &'a mpsc::UnboundedSender<()>,
    handing_off: &'a HandingOff,
}

impl Exec<'_> {
    /// Runs `actions`, decided from the state up to log index `applied`.
    fn run(&self, actions: Vec<Action>, applied: u64) {
        let driver = &**self.driver;
        for action in actions {
            match action {
                Action::Start(child) => {
                    let in_spi = child.in_spi;
                    self.claim(in_spi);
                    refused(in_spi, driver.start(*child));
                }
                Action::StartStandby(child) => {
                    let (in_spi, sa, epoch) = (child.in_spi, child.ike, child.epoch);
                    self.claim(in_spi);
                    if refused(in_spi, driver.start_standby(*child)) {
                        continue;
                    }
                    self.node.handovers.set_standby(sa, epoch, Some(applied));
                }
                Action::TakeOver {
                    sa,
                    epoch,
                    in_spi,
                    previous,
                } => {
                    let with_state = previous.is_some();
                    if driver.take_over(in_spi, previous.as_deref()) {
                        tracing::info!(
                            %sa,
                            in_spi = format_args!("{in_spi:08x}"),
                            with_state,
                            "took the child SA over"
                        );
                    }
                    self.node.handovers.set_standby(sa, epoch, None);
                }
                Action::HandOff {
                    sa,
                    epoch,
                    to,
                    in_spis,
                } => {
                    self.handing_off
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(in_spis.iter().copied());
                    // Held here, before this node says (in its pings) that it acted on the
                    // move: from then on the new owner may take over without our state, and
                    // nothing of ours may leave meanwhile. A data plane that cannot hold (the
                    // kernel's) hands off at once instead: its new owner never waits either.
                    let mut held = true;
                    for in_spi in &in_spis {
                        held &= driver.hold(*in_spi);
                    }
                    self.node.handoffs_in_flight.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(hand_off(
                        self.node.clone(),
                        self.driver.clone(),
                        self.handing_off.clone(),
                        (sa, epoch, to, held),
                        in_spis,
                    ));
                }
                Action::Extend { in_spi, limit } => driver.extend(in_spi, limit),
                Action::Stop { in_spi } => {
                    self.claim(in_spi);
                    if let Some(c) = driver.stop(in_spi) {
                        tracing::info!(
                            in_spi = format_args!("{in_spi:08x}"),
                            highest_out = c.highest_out,
                            highest_in = c.highest_in,
                            "stopped child SA"
                        );
                    }
                }
                Action::Propose(command) => {
                    let (node, failed) = (self.node.clone(), self.failed.clone());
                    let leases = count_leases(&command);
                    tokio::spawn(async move {
                        match node.propose(command).await {
                            Ok(p) if !refused_response(&p.response) => {
                                node.lease_commits.fetch_add(leases, Ordering::Relaxed);
                            }
                            Ok(p) => {
                                tracing::debug!(response = ?p.response, "lease or checkpoint refused");
                                let _ = failed.send(());
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "lease or checkpoint not committed");
                                let _ = failed.send(());
                            }
                        }
                    });
                }
            }
        }
    }

    /// Takes child `in_spi` back from a hand-off still in flight (it is stopped here first:
    /// the runtime is about to start, stop or restart it).
    fn claim(&self, in_spi: u32) {
        let claimed = self
            .handing_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&in_spi);
        if claimed {
            self.driver.stop(in_spi);
        }
    }
}

/// Whether the data plane refused to start a child (logged).
fn refused(in_spi: u32, result: Result<(), DriverError>) -> bool {
    match result {
        Ok(()) => false,
        Err(e) => {
            tracing::error!(in_spi = format_args!("{in_spi:08x}"), error = %e, "data plane refused a child SA");
            true
        }
    }
}

/// Hands SA `sa`'s children, already `held` (or not, by a data plane that cannot hold), over
/// to `to` (see `ownership::handover`): once `to` holds them (or after [`PREPARE_WAIT`]), stops
/// each and sends their final state.
async fn hand_off(
    node: Arc<Node>,
    driver: Arc<dyn SaDriver>,
    handing_off: HandingOff,
    (sa, epoch, to, held): (SaId, Epoch, NodeId, bool),
    in_spis: Vec<u32>,
) {
    let _in_flight = InFlight(node.clone());
    let client = peer_client(&node, to);
    let request = |states: Option<Vec<u8>>| HandoverRequest {
        from: node.id,
        sa: sa.0,
        epoch: epoch.0,
        states,
    };
    let ready = match client.as_ref().filter(|_| held) {
        Some(client) => matches!(
            tokio::time::timeout(
                PREPARE_WAIT + Duration::from_millis(50),
                client.clone().handover(request(None)),
            )
            .await,
            Ok(Ok(reply)) if reply.get_ref().ready
        ),
        None => false,
    };
    let mut states = Vec::new();
    for in_spi in in_spis {
        // Still ours to hand off (not claimed back by a start of the same child meanwhile)?
        let ours = handing_off
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&in_spi);
        if !ours {
            continue;
        }
        // It holds: what we held goes out first (it is in its hold too, and skipped there as
        // sealed by us). It does not: what we held is its already, or nobody's.
        if ready {
            driver.take_over(in_spi, None);
        }
        if let Some(state) = driver.hand_off(in_spi) {
            states.push((in_spi, state));
        }
    }
    tracing::info!(
        %sa,
        to,
        ready,
        children = states.len(),
        "handed the SA over"
    );
    let Some(client) = client else { return };
    let sent = tokio::time::timeout(
        Duration::from_secs(1),
        client
            .clone()
            .handover(request(Some(encode_states(&states)))),
    )
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        tracing::warn!(%sa, to, "the handover state did not reach the new owner; it goes on without");
    }
}

/// Counts one hand-off in `Node::handoffs_in_flight` until dropped (whichever way the
/// hand-off ends).
struct InFlight(Arc<Node>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.handoffs_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cluster.v1 client for member `id`, if it is one.
fn peer_client(
    node: &Node,
    id: NodeId,
) -> Option<evpc_proto::cluster::v1::cluster_client::ClusterClient<tonic::transport::Channel>> {
    let addr = {
        use openraft::rt::WatchReceiver;
        let metrics = node.raft.metrics().borrow_watched().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .raft_addr
            .clone()
    };
    node.peers.client(id, &addr).ok()
}
