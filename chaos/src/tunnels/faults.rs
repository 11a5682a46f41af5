//! The faults a campaign injects into the lab, one at a time, and how each is healed.
//!
//! ```text
//!  before: who owns which client's SA (admin.v1 ListSas), who leads
//!  inject ─► (wait until every affected client's downstream voice flows again, ≤ 20 s)
//!        ─► heal (restart, SIGCONT, reconnect, reactivate) ─► wait until the cluster is whole
//!        ─► rebalance, so the next fault finds SAs on every node
//!        ─► (add-node only, unmeasured) drain and remove the added node: every fault starts
//!           from the campaign's N nodes
//! ```
//!
//! "Affected" clients are those whose SA the fault touches: owned by the node that dies,
//! pauses, is cut off or drained (every client for the leader's death: it owns none, and the
//! election is everyone's); moved by a transfer, an added node's rebalance or a removed
//! node's drain; every client for a whole-cluster restart. Their interruption is measured
//! afterwards from the traffic's books, in the fault's window.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use evpc_testkit::lab::Lab;
use nix::sys::signal::Signal;
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::Serialize;

use super::traffic::{Traffic, now_ms};

/// Every kind of fault a campaign knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a node that owns SAs (any: the leader too), restart it afterwards.
    KillOwner,
    /// SIGKILL the Raft leader, restart it afterwards.
    KillLeader,
    /// SIGSTOP a node owning SAs past the failover timeout, then SIGCONT.
    Pause,
    /// Cut a node owning SAs off the cluster segment both ways, then reconnect it.
    Partition,
    /// Planned transfer of a few SAs to other nodes.
    Transfer,
    /// Drain a node (every SA moves off, planned), then make it active again.
    Drain,
    /// Add a node online, then rebalance onto it (removed again, unmeasured, before the next
    /// fault).
    AddNode,
    /// Drain a node added for it (unmeasured), remove it from the cluster, stop it.
    RemoveNode,
    /// SIGKILL a node owning SAs and restart it at once, before the failover timeout.
    Bounce,
    /// SIGKILL every node, restart them all.
    ClusterRestart,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FaultKind {
    /// Every kind, in the order a round runs them before shuffling.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::KillOwner,
        FaultKind::KillLeader,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Transfer,
        FaultKind::Drain,
        FaultKind::AddNode,
        FaultKind::RemoveNode,
        FaultKind::Bounce,
        FaultKind::ClusterRestart,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillOwner => "kill-owner",
            FaultKind::KillLeader => "kill-leader",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Transfer => "transfer",
            FaultKind::Drain => "drain",
            FaultKind::AddNode => "add-node",
            FaultKind::RemoveNode => "remove-node",
            FaultKind::Bounce => "bounce",
            FaultKind::ClusterRestart => "cluster-restart",
        }
    }

    /// Whether the operator planned it: SAs move by handover, with nothing lost.
    pub fn planned(self) -> bool {
        matches!(
            self,
            FaultKind::Transfer | FaultKind::Drain | FaultKind::AddNode | FaultKind::RemoveNode
        )
    }
}

/// One fault as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct Injected {
    pub kind: FaultKind,
    /// The node it hit (none for a transfer or a whole-cluster restart).
    pub node: Option<u64>,
    /// Whether that node was the Raft leader when it was hit.
    pub was_leader: bool,
    /// When it began (wall-clock ms, the traffic's and the capture's clock).
    pub at_ms: f64,
    /// When its effect on the data plane was over: every affected client's downstream
    /// flowed again (or the wait gave up).
    pub recovered_ms: f64,
    /// When the heal was done and the cluster whole again.
    pub healed_ms: f64,
    /// Client indices whose SA it touched.
    pub affected: Vec<usize>,
    /// Affected clients whose downstream had not flowed again when the wait gave up.
    pub not_resumed: Vec<usize>,
}

/// What a fault needs to know about the clients: who they are in the cluster's records.
#[derive(Debug)]
pub struct Clients<'a> {
    /// Client index by IKE identity (`peer_id` in the cluster's records).
    pub by_identity: &'a BTreeMap<String, usize>,
}

/// The cluster's view before a fault: owner per client, the leader, the live nodes.
struct View {
    owner: BTreeMap<usize, u64>,
    sa_of: BTreeMap<usize, String>,
    leader: Option<u64>,
    alive: Vec<u64>,
}

async fn view(lab: &Lab, clients: &Clients<'_>) -> anyhow::Result<View> {
    let mut admin = lab.admin()?;
    let status = admin.follow_leader().await?;
    let mut owner = BTreeMap::new();
    let mut sa_of = BTreeMap::new();
    for sa in admin.all_sas(None).await? {
        if let Some(&c) = clients.by_identity.get(&sa.peer_id) {
            owner.insert(c, sa.owner);
            sa_of.insert(c, sa.id);
        }
    }
    Ok(View {
        owner,
        sa_of,
        leader: status.leader_id,
        alive: lab.alive_ids(),
    })
}

impl View {
    fn clients_of(&self, node: u64) -> Vec<usize> {
        self.owner
            .iter()
            .filter(|(_, o)| **o == node)
            .map(|(c, _)| *c)
            .collect()
    }

    /// A live node that owns at least one client's SA.
    fn an_owner(&self, rng: &mut impl Rng) -> Option<u64> {
        let owners: Vec<u64> = self
            .alive
            .iter()
            .copied()
            .filter(|n| self.owner.values().any(|o| o == n))
            .collect();
        owners.choose(rng).copied()
    }
}

/// Waits until every client in `clients` received downstream voice after `since` and has no
/// gap open (a packet in the last 100 ms), or until `limit`; returns those that did not.
async fn wait_flowing(
    traffic: &Traffic,
    clients: &[usize],
    since: f64,
    limit: Duration,
) -> Vec<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let now = now_ms();
        let waiting: Vec<usize> = clients
            .iter()
            .copied()
            .filter(|c| {
                let s = traffic.down(*c);
                !s.last_ms.is_some_and(|l| l > since && now - l < 100.0)
            })
            .collect();
        if waiting.is_empty() || Instant::now() > deadline {
            return waiting;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every live node is a voter, active, unfenced and has applied what the leader
/// committed, then asks for a rebalance and waits until it is done (or `limit`).
pub async fn wait_whole(lab: &Lab, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let alive = lab.alive_ids();
    loop {
        let ready = async {
            let mut admin = lab.admin()?;
            let leader = admin.follow_leader().await?;
            let members_ok = alive.iter().all(|id| {
                leader
                    .members
                    .iter()
                    .any(|m| m.id == *id && m.voter && m.gateway_state == "active")
            });
            if !members_ok {
                return anyhow::Ok(false);
            }
            for id in &alive {
                let status = lab.admin_of(*id)?.status(false).await?;
                if status.fenced || status.last_applied_index + 50 < leader.committed_index {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        .await;
        if matches!(ready, Ok(true)) {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the cluster was not whole again within {limit:?}: {ready:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admin = lab.admin()?;
    admin.follow_leader().await?;
    admin.rebalance().await.context("rebalance")?;
    // The leader works the rebalance off at its configured rate; wait until the load is even
    // over the nodes that serve (the leader hands its SAs to the others: leader_serves off).
    loop {
        let status = admin.follow_leader().await?;
        let serving = |m: &&evpc_proto::admin::v1::Member| {
            alive.contains(&m.id) && Some(m.id) != status.leader_id
        };
        let owned: Vec<u64> = status
            .members
            .iter()
            .filter(serving)
            .map(|m| m.owned_sas)
            .collect();
        let leader_owns: u64 = status
            .members
            .iter()
            .filter(|m| Some(m.id) == status.leader_id)
            .map(|m| m.owned_sas)
            .sum();
        let (min, max) = (
            owned.iter().copied().min().unwrap_or(0),
            owned.iter().copied().max().unwrap_or(0),
        );
        if (max <= min + 1 + max / 20 && leader_owns == 0) || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long an affected client may take to flow again before the wait gives up (and the
/// client is reported as not resumed).
const RESUME_LIMIT: Duration = Duration::from_secs(20);
/// How long a paused or cut-off node stays so: well past the failover timeout (300 ms).
const OUTAGE: Duration = Duration::from_millis(1_500);
/// SAs moved by one `transfer` fault.
const TRANSFERS: usize = 4;

/// Injects one fault of `kind`, waits for its effect to pass, heals it and waits until the
/// cluster is whole and balanced again.
pub async fn inject(
    lab: &mut Lab,
    kind: FaultKind,
    clients: &Clients<'_>,
    traffic: &Traffic,
    rng: &mut impl Rng,
) -> anyhow::Result<Injected> {
    let before = view(lab, clients).await?;
    let leader = before.leader;
    let mut node = None;
    let mut affected = Vec::new();
    let at_ms;
    match kind {
        FaultKind::KillOwner | FaultKind::Bounce => {
            let n = before.an_owner(rng).context("no node owns a client's SA")?;
            node = Some(n);
            affected = before.clients_of(n);
            at_ms = now_ms();
            lab.sigkill(n).await?;
            if kind == FaultKind::Bounce {
                lab.restart(n)?;
            }
        }
        FaultKind::KillLeader => {
            let n = leader.context("no leader")?;
            node = Some(n);
            // The leader owns no SA (`leader_serves` off): what its death costs is measured on
            // every client, across the election.
            affected = before.owner.keys().copied().collect();
            at_ms = now_ms();
            lab.sigkill(n).await?;
        }
        FaultKind::Pause | FaultKind::Partition => {
            let n = before.an_owner(rng).context("no node owns a client's SA")?;
            node = Some(n);
            affected = before.clients_of(n);
            at_ms = now_ms();
            if kind == FaultKind::Pause {
                lab.signal(n, Signal::SIGSTOP)?;
            } else {
                lab.partition(n, true)?;
            }
            tokio::time::sleep(OUTAGE).await;
            if kind == FaultKind::Pause {
                lab.signal(n, Signal::SIGCONT)?;
            } else {
                lab.partition(n, false)?;
            }
        }
        FaultKind::Transfer => {
            let mut candidates: Vec<usize> = before.owner.keys().copied().collect();
            candidates.shuffle(rng);
            let mut admin = lab.admin()?;
            admin.follow_leader().await?;
            at_ms = now_ms();
            for c in candidates.into_iter().take(TRANSFERS) {
                let from = before.owner[&c];
                // (never to the leader: it takes no SAs)
                let Some(&to) = before
                    .alive
                    .iter()
                    .copied()
                    .filter(|n| *n != from && Some(*n) != leader)
                    .collect::<Vec<_>>()
                    .choose(rng)
                else {
                    continue;
                };
                admin
                    .transfer_sa(&before.sa_of[&c], to)
                    .await
                    .with_context(|| format!("transferring client {c}'s SA to node {to}"))?;
                affected.push(c);
            }
        }
        FaultKind::Drain => {
            let n = before
                .alive
                .iter()
                .copied()
                .filter(|n| Some(*n) != leader && !before.clients_of(*n).is_empty())
                .collect::<Vec<_>>()
                .choose(rng)
                .copied()
                .context("no node to drain")?;
            node = Some(n);
            affected = before.clients_of(n);
            at_ms = drain(lab, n).await?;
            let mut admin = lab.admin()?;
            admin.follow_leader().await?;
            admin.activate_node(n).await?;
        }
        FaultKind::AddNode => {
            at_ms = now_ms();
            let n = lab.add_node().await?;
            node = Some(n);
            wait_whole(lab, Duration::from_secs(60)).await?;
            let after = view(lab, clients).await?;
            affected = after.clients_of(n);
        }
        FaultKind::RemoveNode => {
            // A node added for it (unmeasured), so that the campaign's own nodes stay: an
            // add-node fault removes the node it added before the next fault.
            let n = lab.add_node().await?;
            wait_whole(lab, Duration::from_secs(60)).await?;
            let before = view(lab, clients).await?;
            node = Some(n);
            affected = before.clients_of(n);
            at_ms = drain(lab, n).await?;
            lab.remove_member(n).await?;
            lab.sigkill(n).await?;
        }
        FaultKind::ClusterRestart => {
            affected = before.owner.keys().copied().collect();
            at_ms = now_ms();
            for n in &before.alive {
                lab.sigkill(*n).await?;
            }
            for n in &before.alive {
                lab.restart(*n)?;
            }
        }
    }
    let not_resumed = wait_flowing(traffic, &affected, at_ms, RESUME_LIMIT).await;
    let recovered_ms = now_ms();
    // Heal what is still broken.
    if matches!(kind, FaultKind::KillOwner | FaultKind::KillLeader)
        && let Some(n) = node
    {
        lab.restart(n)?;
    }
    wait_whole(lab, Duration::from_secs(90)).await?;
    let healed_ms = now_ms();
    // Back to the cluster the campaign started with, outside the measured window: every fault
    // then starts from the same N nodes whatever the order (on two cores, a fourth node left
    // running slows everything after it).
    if kind == FaultKind::AddNode
        && let Some(n) = node
    {
        drain(lab, n).await?;
        lab.remove_member(n).await?;
        lab.sigkill(n).await?;
        wait_whole(lab, Duration::from_secs(90)).await?;
    }
    Ok(Injected {
        kind,
        node,
        was_leader: node.is_some() && node == leader,
        at_ms,
        recovered_ms,
        healed_ms,
        affected,
        not_resumed,
    })
}

/// Drains node `n` through the leader and waits until it owns no SA; returns when the drain
/// began (wall-clock ms).
async fn drain(lab: &Lab, n: u64) -> anyhow::Result<f64> {
    let mut admin = lab.admin()?;
    admin.follow_leader().await?;
    let at_ms = now_ms();
    admin.drain_node(n).await?;
    wait_owns_nothing(lab, n).await?;
    Ok(at_ms)
}

/// Waits until node `n` owns no SA and drives no child, its hand-offs included (a drain done:
/// only then may it go without costing its last SAs their handover).
async fn wait_owns_nothing(lab: &Lab, n: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admin = lab.admin()?;
    loop {
        let status = admin.follow_leader().await?;
        let owned = status
            .members
            .iter()
            .find(|m| m.id == n)
            .map_or(0, |m| m.owned_sas);
        if owned == 0 && lab.admin_of(n)?.status(false).await?.running_children == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {n} still owns {owned} SAs 60 s into its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
