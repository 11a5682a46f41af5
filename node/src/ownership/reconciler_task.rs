//! The leader's reconciler: every round (a heartbeat) the leader plans placement with
//! [`crate::ownership::planner`] — registry, failure takeover, drain, rebalance, slots — and
//! proposes the batch; about once a second it also proposes [`crate::housekeeping`] (cluster
//! id, acknowledged marks, expired tombstones), and each round a bounded batch of the
//! [`crate::resealer`]'s work after a key rotation. Every node runs it; only the leader
//! proposes. Every node also records the cluster id in its data directory once it has applied
//! it, and deletes retired cluster keys from its keyring file.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use crate::node::{Node, now_ms};
use crate::ownership::planner::{PlanInput, PlannerConfig, plan};

/// How often the leader proposes housekeeping.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);

/// Writes the cluster id into the data directory's identity once this node has applied it.
fn record_cluster_id(node: &Node) {
    let Some(cluster) = node.state.read().cluster_id() else {
        return;
    };
    let mut identity = node.identity.lock().unwrap_or_else(|e| e.into_inner());
    if identity.cluster_id() != Some(cluster)
        && let Err(e) = identity.record_cluster(&node.config.data_dir, cluster)
    {
        tracing::warn!(error = %e, "cannot record the cluster id in the data directory");
    }
}

async fn housekeeping(node: &Node) {
    use openraft::rt::WatchReceiver;
    let matched: std::collections::BTreeMap<_, _> = node
        .raft
        .metrics()
        .borrow_watched()
        .replication
        .iter()
        .flatten()
        .filter_map(|(id, log)| log.as_ref().map(|l| (*id, l.index)))
        .collect();
    let command = {
        let state = node.state.read();
        crate::housekeeping::plan(&crate::housekeeping::HousekeepingInput {
            state: &state,
            matched: &matched,
            wall_ms: now_ms(),
            fresh_cluster_id: evpc_raft_store::ClusterId(rand::random()),
        })
    };
    if let Some(command) = command {
        tracing::debug!(?command, ?matched, "housekeeping");
        match node.propose_local(command).await {
            Ok(p) => {
                tracing::debug!(log_index = p.log_index, response = ?p.response, "housekeeping committed")
            }
            Err(e) => tracing::debug!(error = %e, "housekeeping proposal failed"),
        }
    }
}

/// Exports, about once a second, how long the state's lock was held at most since the last
/// export (a long read hold is time `apply` waited) and how far `apply` lags behind the
/// committed index: the two figures that show a walk over every SA creeping onto a hot path.
fn export_state_metrics(node: &Node) {
    use openraft::rt::WatchReceiver;
    let (read_us, write_us) = node.state.take_longest_holds();
    metrics::gauge!("evpc_state_lock_longest_read_hold_seconds").set(read_us as f64 / 1e6);
    metrics::gauge!("evpc_state_lock_longest_write_hold_seconds").set(write_us as f64 / 1e6);
    let committed = node
        .raft
        .metrics()
        .borrow_watched()
        .local_committed
        .as_ref()
        .map_or(0, |l| l.index);
    let applied = node.state.read().applied_index();
    metrics::gauge!("evpc_apply_lag_entries").set(committed.saturating_sub(applied) as f64);
    metrics::gauge!("evpc_state_sas").set(node.state.read().sa_count() as f64);
    if read_us > 100_000 || write_us > 100_000 {
        tracing::warn!(
            read_ms = read_us / 1000,
            write_ms = write_us / 1000,
            "the state's lock was held for more than 100 ms: apply waited"
        );
    }
}

/// Runs until `shutdown` turns true.
pub async fn run(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let period = Duration::from_millis(node.config.timeouts.heartbeat_ms);
    let o = &node.config.ownership;
    let config = PlannerConfig {
        failover_ms: o.failover_ms,
        move_lease: o.move_lease,
        moves_per_round: ((o.moves_per_second * period.as_millis() as u64) / 1000).max(1) as usize,
        leader_serves: o.leader_serves,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_housekeeping = tokio::time::Instant::now();
    let mut last_metrics = tokio::time::Instant::now();
    let reseals_per_round =
        ((o.reseals_per_second * period.as_millis() as u64) / 1000).max(1) as usize;
    let mut resealer = crate::resealer::Resealer::default();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return Ok(()),
            _ = tick.tick() => {}
        }
        record_cluster_id(&node);
        if last_metrics.elapsed() >= HOUSEKEEPING_PERIOD {
            last_metrics = tokio::time::Instant::now();
            export_state_metrics(&node);
        }
        crate::resealer::drop_obsolete_keys(&node).await;
        if !node.is_leader() {
            // A later leader starts its own cursors; nothing in them must survive.
            resealer = crate::resealer::Resealer::default();
            continue;
        }
        crate::resealer::round(&node, &mut resealer, reseals_per_round).await;
        if last_housekeeping.elapsed() >= HOUSEKEEPING_PERIOD {
            last_housekeeping = tokio::time::Instant::now();
            housekeeping(&node).await;
        }
        let voters = node.voters();
        let rebalance = node.rebalance_requested.load(Ordering::Relaxed);
        let decided = {
            let state = node.state.read();
            let liveness = node.liveness.lock().unwrap_or_else(|e| e.into_inner());
            plan(
                &PlanInput {
                    state: &state,
                    voters: &voters,
                    liveness: &liveness,
                    now_ms: node.gate.now_ms(),
                    wall_ms: now_ms(),
                    rebalance,
                    leader: node.id,
                },
                &config,
            )
        };
        if rebalance && !decided.rebalance_pending {
            node.rebalance_requested.store(false, Ordering::Relaxed);
        }
        let Some(command) = decided.command else {
            continue;
        };
        if !decided.declared_down.is_empty() || decided.takeovers > 0 {
            tracing::warn!(
                down = ?decided.declared_down,
                takeovers = decided.takeovers,
                "taking over the SAs of silent nodes"
            );
        } else {
            tracing::info!(%command, planned_moves = decided.planned_moves, "reconciling placement");
        }
        match node.propose_local(command).await {
            Ok(p) => tracing::debug!(log_index = p.log_index, "placement committed"),
            Err(e) => tracing::warn!(error = %e, "placement proposal failed"),
        }
    }
}
