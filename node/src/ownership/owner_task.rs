//! Runs the owner runtime against this node's data plane: reacts to the applied state (start,
//! extend, stop), ticks leases and checkpoints, forwards fence changes to the backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evpc_dataplane::SaDriver;
use evpc_raft_store::{Applied, ChangeKinds, Command, Feed, Response, SaId, SaUpdate};
use tokio::sync::{mpsc, watch};

use crate::node::Node;
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

fn refused(response: &Response) -> bool {
    match response {
        Err(_) => true,
        Ok(Applied::Batch(results)) => results.iter().any(refused),
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
    loop {
        if state_changed {
            changed.clear();
            let feed = node
                .state
                .changes_since(cursor, ChangeKinds::DATA_PLANE, &mut changed);
            let (actions, seen) = {
                let state = node.state.read();
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
                    runtime.on_changes(&state, &ids, now, &opener)
                };
                // A full look saw the state as read; the changes only go as far as the feed.
                let seen = match feed {
                    _ if full => state.applied_index(),
                    Feed::Resync { upto } | Feed::Changes { upto } => upto,
                };
                (actions, seen)
            };
            cursor = match feed {
                Feed::Resync { upto } | Feed::Changes { upto } => upto,
            };
            execute(&node, &*driver, actions, &failed_tx);
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
                let actions = runtime.on_tick(
                    node.gate.now_ms(),
                    &|spi| driver.counters(spi),
                    known.then_some(active.as_slice()),
                );
                execute(&node, &*driver, actions, &failed_tx);
            }
            Some(()) = failed_rx.recv() => runtime.on_proposal_failed(),
        }
    }
    for (in_spi, _, _) in runtime.running().collect::<Vec<_>>() {
        driver.stop(in_spi);
    }
    Ok(())
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

fn execute(
    node: &Arc<Node>,
    driver: &dyn SaDriver,
    actions: Vec<Action>,
    failed: &mpsc::UnboundedSender<()>,
) {
    for action in actions {
        match action {
            Action::Start(child) => {
                let in_spi = child.in_spi;
                if let Err(e) = driver.start(*child) {
                    tracing::error!(in_spi = format_args!("{in_spi:08x}"), error = %e, "data plane refused a child SA");
                }
            }
            Action::Extend { in_spi, limit } => driver.extend(in_spi, limit),
            Action::Stop { in_spi } => {
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
                let (node, failed) = (node.clone(), failed.clone());
                let leases = count_leases(&command);
                tokio::spawn(async move {
                    match node.propose(command).await {
                        Ok(p) if !refused(&p.response) => {
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
