//! `evpc-chaos failover`: real node processes with the probe data plane, under faults, with
//! every sequence number every node used checked by a collector.
//!
//! ```text
//!  node 1 ┐  probe reports (spi, epoch, first..last)     ┌─ ledger: no (spi, seq) twice;
//!  node 2 ├──────────────── UDP ───────────────────────► │  per spi, every epoch above the last;
//!  node 3 ┘                                              └─ first report after each fault
//!     ▲  faults: SIGKILL owner / leader, SIGKILL + immediate restart (bounce), SIGKILL of every
//!     │  node (cluster restart), SIGSTOP, nftables partition (both ways or one way only),
//!     │  planned transfer, export --remove + import
//!     └─ runner: message-ID advances through the leader (an IKE engine's commits), checked at
//!        the end on every replica
//! ```
//!
//! With `--burst`, every SA's traffic bursts to 20 times its rate for 200 ms every 4 s, far
//! beyond what its leases were sized for, so leases are used up and renewed under pressure.
//!
//! Per fault the runner notes which SAs the victim owned and in which epoch, injects the fault,
//! and waits until a new owner reports each of them (`resume_ms` = fault to that first report);
//! then it heals (restart, SIGCONT, firewall rule removed), waits for the node to be active
//! again and rebalances, so the next fault finds SAs on every node.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use evpc_dataplane::probe::{UsedRange, decode};
use evpc_raft_store::{Command, Epoch, NodeId, Rejection, SaId, SaUpdate};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use serde::Serialize;
use tokio::sync::RwLock;

use crate::cluster::{LocalCluster, ProcessCluster};
use crate::stats::Percentiles;
use crate::workload;

/// Smallest lease and the grant that comes with a move, in this campaign.
const LEASE_MIN: u64 = 32;

/// A kind of fault.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// SIGKILL a node that owns SAs (not the leader), restart it later.
    KillOwner,
    /// SIGKILL the leader, restart it later.
    KillLeader,
    /// SIGSTOP a node that owns SAs for longer than the failover timeout, then SIGCONT.
    Pause,
    /// Cut a node that owns SAs off the cluster with an nftables rule, then heal.
    Partition,
    /// Move SAs to another node on purpose.
    Transfer,
    /// SIGKILL a node that owns SAs and restart it at once, before the failover timeout: it
    /// resumes its SAs itself, above every number it used before the crash.
    Bounce,
    /// SIGKILL every node, then restart them all.
    ClusterRestart,
    /// Cut one direction only: a node's packets to the others are dropped, or theirs to it.
    AsymPartition,
    /// Export SAs with `--remove` and import them again.
    ExportImport,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::KillOwner,
        Fault::KillLeader,
        Fault::Pause,
        Fault::Partition,
        Fault::Transfer,
        Fault::Bounce,
        Fault::ClusterRestart,
        Fault::AsymPartition,
        Fault::ExportImport,
    ];

    /// The name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillOwner => "kill-owner",
            Fault::KillLeader => "kill-leader",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::Transfer => "transfer",
            Fault::Bounce => "bounce",
            Fault::ClusterRestart => "cluster-restart",
            Fault::AsymPartition => "asym-partition",
            Fault::ExportImport => "export-import",
        }
    }

    /// Parses a name.
    pub fn parse(name: &str) -> anyhow::Result<Fault> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                anyhow::anyhow!(
                    "unknown fault {name:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }

    /// Whether it needs nftables (and so root).
    fn needs_firewall(self) -> bool {
        matches!(self, Fault::Partition | Fault::AsymPartition)
    }
}

/// Options of one run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Cluster size.
    pub nodes: u64,
    /// SAs.
    pub sas: u64,
    /// Packets per second over all SAs.
    pub pps: u64,
    /// Faults to inject, in order, each cycle.
    pub faults: Vec<Fault>,
    /// Cycles.
    pub cycles: u32,
    /// SAs moved per transfer fault (and exported per export-import fault).
    pub transfers_per_fault: usize,
    /// SAs burst far beyond their lease rate now and then.
    pub burst: bool,
    /// RNG seed.
    pub seed: u64,
    /// Print progress to stderr.
    pub progress: bool,
    /// Run the nodes without TLS.
    pub insecure_plaintext: bool,
}

/// Per-kind resume statistics.
#[derive(Debug, Serialize)]
pub struct KindReport {
    /// Faults injected.
    pub faults: u32,
    /// Fault to the new owner's first report, per affected SA.
    pub resume_ms: Percentiles,
    /// Affected SAs that did not resume within the wait.
    pub not_resumed: u64,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Cluster size.
    pub nodes: u64,
    /// SAs.
    pub sas: u64,
    /// Probe packets per second over all SAs.
    pub pps: u64,
    /// Faults by kind.
    pub faults: BTreeMap<String, u32>,
    /// Sequence numbers reported twice for the same SA (must be 0).
    pub seq_reuse: u64,
    /// Pairs of epochs of one SA whose ranges are not ordered (a later owner below an earlier
    /// one; must be 0).
    pub seq_regressions: u64,
    /// SAs whose committed message ID went backwards or lost an acknowledged advance (must be 0).
    pub msgid_regressions: u64,
    /// Message-ID advances acknowledged during the run.
    pub msgid_advances: u64,
    /// Resume after each kind of fault.
    pub resume_ms: BTreeMap<String, Percentiles>,
    /// Details per kind.
    pub by_kind: BTreeMap<String, KindReport>,
    /// Planned transfer: how much longer than its usual packet spacing an SA went without a
    /// packet across the handover (last packet of the old owner to the first of the new one,
    /// minus the interval between two packets of that SA).
    pub transfer_gap_ms: Percentiles,
    /// Reports from an owner whose SA had moved on more than the fence timeout earlier.
    pub late_reports: u64,
    /// The longest time an old owner kept reporting after the new owner started (ms).
    pub max_dual_owner_ms: f64,
    /// Lease commits per busy SA per second.
    pub lease_commits_per_busy_sa_per_sec: f64,
    /// Sequence numbers reported over the run.
    pub seqs_reported: u64,
    /// The first sequence numbers reported twice (at most 20), with both senders.
    pub repeats: Vec<Repeat>,
    /// Whether traffic burst beyond the leases.
    pub burst: bool,
    /// SAs exported with --remove and imported again.
    pub reimports: u64,
    /// Run time.
    pub seconds: f64,
}

/// What the collector learned about one child.
#[derive(Debug, Default)]
struct ChildLedger {
    /// Used intervals, merged per epoch: first -> (last, epoch).
    used: BTreeMap<u64, (u64, u64)>,
    /// Per epoch: (min seq, max seq, node, first arrival, last arrival).
    epochs: BTreeMap<u64, EpochSeen>,
}

#[derive(Copy, Clone, Debug)]
struct EpochSeen {
    min: u64,
    max: u64,
    node: NodeId,
    first_at: Instant,
    last_at: Instant,
}

#[derive(Debug, Default)]
struct Ledger {
    children: HashMap<u32, ChildLedger>,
    reuse: u64,
    reported: u64,
    late: u64,
    max_dual_ms: f64,
    /// Children whose resumption a fault waits for: from which epoch on, reported after when;
    /// the arrival of the first such report.
    watch: HashMap<u32, Watch>,
    /// The first repeats, for the report.
    repeats: Vec<Repeat>,
}

/// A sequence number reported twice: who sent it, and who had sent it before.
#[derive(Clone, Debug, Serialize)]
pub struct Repeat {
    /// The child's inbound SPI (hex).
    pub in_spi: String,
    /// The reporting node and the epoch it reported in.
    pub node: NodeId,
    /// Its epoch.
    pub epoch: u64,
    /// The range it reported.
    pub range: (u64, u64),
    /// The overlapping range reported before, its epoch and the node that first reported in it.
    pub used_before: (u64, u64),
    /// Its epoch.
    pub used_in_epoch: u64,
    /// That epoch's node.
    pub used_by: Option<NodeId>,
    /// When (the collector's clock).
    #[serde(skip)]
    pub at: Option<Instant>,
    /// Seconds into the run.
    pub at_s: f64,
}

#[derive(Copy, Clone, Debug)]
struct Watch {
    min_epoch: u64,
    since: Instant,
    first: Option<Instant>,
}

impl Ledger {
    fn record(&mut self, node: NodeId, range: UsedRange, at: Instant, fence: Duration) {
        self.reported += range.last - range.first + 1;
        if let Some(watch) = self.watch.get_mut(&range.in_spi)
            && watch.first.is_none()
            && range.epoch >= watch.min_epoch
            && at >= watch.since
        {
            watch.first = Some(at);
        }
        let child = self.children.entry(range.in_spi).or_default();
        // Overlap with anything already used, whatever epoch.
        let mut overlap = 0;
        let mut against = None;
        if let Some((first, (last, epoch))) = child.used.range(..=range.first).next_back()
            && *last >= range.first
        {
            overlap += last.min(&range.last) - range.first + 1;
            against = Some((*first, *last, *epoch));
        }
        if range.first < range.last {
            for (first, (last, epoch)) in child.used.range(range.first + 1..=range.last) {
                overlap += last.min(&range.last) - first + 1;
                against.get_or_insert((*first, *last, *epoch));
            }
        }
        if let Some((first, last, epoch)) = against {
            let by = child.epochs.get(&epoch).map(|e| e.node);
            if self.repeats.len() < 20 {
                self.repeats.push(Repeat {
                    in_spi: format!("{:08x}", range.in_spi),
                    node,
                    epoch: range.epoch,
                    range: (range.first, range.last),
                    used_before: (first, last),
                    used_in_epoch: epoch,
                    used_by: by,
                    at: Some(at),
                    at_s: 0.0,
                });
            }
            tracing::error!(
                in_spi = format_args!("{:08x}", range.in_spi),
                node,
                epoch = range.epoch,
                range = format_args!("{}..={}", range.first, range.last),
                used_before = format_args!("{first}..={last}"),
                used_in_epoch = epoch,
                used_by = ?by,
                "sequence numbers reported twice"
            );
        }
        self.reuse += overlap;
        // Merge with the predecessor when contiguous and in the same epoch.
        let mut first = range.first;
        if let Some((&prev_first, &(prev_last, prev_epoch))) =
            child.used.range(..range.first).next_back()
            && prev_epoch == range.epoch
            && prev_last + 1 == range.first
        {
            child.used.remove(&prev_first);
            first = prev_first;
        }
        child.used.insert(first, (range.last, range.epoch));
        // A report from an epoch older than one that started more than the fence timeout ago.
        if let Some((_, newer)) = child.epochs.range(range.epoch + 1..).next() {
            let dual = at.saturating_duration_since(newer.first_at);
            self.max_dual_ms = self.max_dual_ms.max(dual.as_secs_f64() * 1e3);
            if dual > fence {
                self.late += 1;
            }
        }
        let seen = child.epochs.entry(range.epoch).or_insert(EpochSeen {
            min: range.first,
            max: range.last,
            node,
            first_at: at,
            last_at: at,
        });
        seen.min = seen.min.min(range.first);
        seen.max = seen.max.max(range.last);
        seen.last_at = at;
    }

    /// Pairs of epochs of one child whose ranges are not strictly ordered.
    fn regressions(&self) -> u64 {
        let mut bad = 0;
        for child in self.children.values() {
            let mut highest_before = 0u64;
            for seen in child.epochs.values() {
                if seen.min <= highest_before {
                    bad += 1;
                }
                highest_before = highest_before.max(seen.max);
            }
        }
        bad
    }

    /// When a report of an epoch above `epoch` first arrived after `since`.
    #[cfg(test)]
    fn resumed_at(&self, in_spi: u32, epoch: u64, since: Instant) -> Option<Instant> {
        let child = self.children.get(&in_spi)?;
        child
            .epochs
            .range(epoch + 1..)
            .map(|(_, s)| s.first_at)
            .filter(|at| *at >= since)
            .min()
    }
}

/// Receives probe reports until the socket closes.
async fn collect(
    socket: tokio::net::UdpSocket,
    ledger: Arc<Mutex<Ledger>>,
    fence: Duration,
    stop: Arc<AtomicBool>,
    run_tag: u64,
) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), socket.recv(&mut buf)).await
        else {
            continue;
        };
        let at = Instant::now();
        if let Some(report) = decode(&buf[..n]).filter(|r| r.run == run_tag) {
            let mut ledger = ledger.lock().expect("ledger lock");
            for range in report.ranges {
                ledger.record(report.node, range, at, fence);
            }
        }
    }
}

/// Message-ID advances through the leader, as the owner's IKE engine would commit them.
#[derive(Debug, Default)]
struct MsgIds {
    /// Per SA: (epoch known, next message ID acknowledged).
    acked: HashMap<SaId, (Epoch, u32)>,
    advances: u64,
}

async fn drive_msgids(
    cluster: Arc<RwLock<ProcessCluster>>,
    sas: Vec<SaId>,
    msgids: Arc<Mutex<MsgIds>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let Some(&sa) = sas.choose(&mut rng) else {
            return;
        };
        let (leader, admin) = {
            let c = cluster.read().await;
            let Ok(leader) = c.leader(Duration::from_millis(500)).await else {
                continue;
            };
            (c.cluster_client(leader), c.admin_of(leader))
        };
        let (Ok(mut client), Ok(mut admin)) = (leader, admin) else {
            continue;
        };
        let known = msgids.lock().expect("lock").acked.get(&sa).copied();
        let (epoch, msg_id) = match known {
            Some(k) => k,
            None => match admin.get_sa(&sa.to_string()).await {
                Ok(info) => (Epoch(info.epoch), info.next_peer_request),
                Err(_) => continue,
            },
        };
        let command = Command::Update {
            sa,
            epoch,
            updates: vec![SaUpdate::PeerRequestAnswered {
                msg_id,
                response: vec![vec![msg_id as u8; 120]],
            }],
        };
        match tokio::time::timeout(
            Duration::from_secs(2),
            workload::propose(&mut client, &command),
        )
        .await
        {
            Ok(Ok(Ok(_))) => {
                let mut m = msgids.lock().expect("lock");
                m.acked.insert(sa, (epoch, msg_id + 1));
                m.advances += 1;
            }
            // The SA moved (or an earlier attempt did land): learn its state again, from the
            // leader once it has applied everything.
            Ok(Ok(Err(Rejection::StaleEpoch { .. } | Rejection::MessageIdRegression { .. })))
            | Ok(Err(_))
            | Err(_) => {
                if let Ok(info) = admin.get_sa(&sa.to_string()).await {
                    let mut m = msgids.lock().expect("lock");
                    let entry = m
                        .acked
                        .entry(sa)
                        .or_insert((Epoch(info.epoch), info.next_peer_request));
                    // Never move the model backwards: what was acknowledged stays acknowledged.
                    if info.next_peer_request >= entry.1 {
                        *entry = (Epoch(info.epoch), info.next_peer_request);
                    } else {
                        entry.0 = Epoch(info.epoch);
                    }
                }
            }
            Ok(Ok(Err(other))) => tracing::warn!(%sa, %other, "message-ID advance refused"),
        }
    }
}

/// nftables rules that cut one node's address off every other node (TCP only: the probe's
/// reports to the collector still flow, so a partitioned node that kept sending would be seen).
struct Partition {
    table: String,
}

/// Which of a node's packets a partition drops.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Cut {
    /// Everything it sends and everything sent to it.
    Both,
    /// Only what it sends: it still receives the others' requests (and pings), they never get
    /// its answers.
    Outgoing,
    /// Only what is sent to it: the others receive its requests, it never gets their answers.
    Incoming,
}

impl Partition {
    fn cut(ip: std::net::Ipv4Addr, cut: Cut) -> anyhow::Result<Partition> {
        let table = format!("evpc_chaos_{}", std::process::id());
        let outgoing = format!("  ip saddr {ip} tcp flags != 0 drop\n");
        let incoming = format!("  ip daddr {ip} tcp flags != 0 drop\n");
        let rules = match cut {
            Cut::Both => format!("{outgoing}{incoming}"),
            Cut::Outgoing => outgoing,
            Cut::Incoming => incoming,
        };
        let script = format!(
            "table inet {table} {{\n chain out {{ type filter hook output priority 0; policy accept;\n{rules} }}\n}}\n"
        );
        let mut child = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running nft (partitions need nftables and root)")?;
        use std::io::Write;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let status = child.wait()?;
        anyhow::ensure!(
            status.success(),
            "nft refused the partition rules ({status})"
        );
        Ok(Partition { table })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
    }
}

struct Run {
    options: Options,
    cluster: Arc<RwLock<ProcessCluster>>,
    ledger: Arc<Mutex<Ledger>>,
    children: Vec<(SaId, u32)>,
    rng: rand::rngs::StdRng,
    resume: BTreeMap<Fault, Vec<Duration>>,
    not_resumed: BTreeMap<Fault, u64>,
    counts: BTreeMap<Fault, u32>,
    transfer_gaps: Vec<Duration>,
    packet_interval: Duration,
    reimports: u64,
}

/// Who owns what, as the leader has it: SA -> (owner, epoch).
async fn ownership(cluster: &ProcessCluster) -> anyhow::Result<HashMap<SaId, (NodeId, u64)>> {
    let leader = cluster.leader(Duration::from_secs(10)).await?;
    let sas = cluster.admin_of(leader)?.all_sas(None).await?;
    sas.iter()
        .map(|sa| Ok((sa.id.parse::<SaId>()?, (sa.owner, sa.epoch))))
        .collect()
}

impl Run {
    fn note(&self, text: &str) {
        if self.options.progress {
            eprintln!("[failover] {text}");
        }
    }

    /// Waits until every child in `affected` is reported again after `since` in an epoch at
    /// least `min_epoch(old epoch)`; the resume time is counted from `fault`.
    async fn wait_resumed(
        &mut self,
        kind: Fault,
        affected: &[(u32, u64)],
        fault: Instant,
        since: Instant,
        later_epoch: bool,
        timeout: Duration,
    ) {
        {
            let mut ledger = self.ledger.lock().expect("lock");
            for (spi, epoch) in affected {
                ledger.watch.insert(
                    *spi,
                    Watch {
                        min_epoch: epoch + u64::from(later_epoch),
                        since,
                        first: None,
                    },
                );
            }
        }
        let deadline = since + timeout;
        let mut pending: Vec<u32> = affected.iter().map(|(spi, _)| *spi).collect();
        while !pending.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let mut ledger = self.ledger.lock().expect("lock");
            pending.retain(|spi| match ledger.watch.get(spi).and_then(|w| w.first) {
                Some(at) => {
                    self.resume.entry(kind).or_default().push(at - fault);
                    ledger.watch.remove(spi);
                    false
                }
                None => true,
            });
        }
        if !pending.is_empty() {
            let mut ledger = self.ledger.lock().expect("lock");
            for spi in &pending {
                ledger.watch.remove(spi);
            }
            *self.not_resumed.entry(kind).or_default() += pending.len() as u64;
            tracing::warn!(
                kind = kind.name(),
                pending = pending.len(),
                "SAs did not resume in time"
            );
        }
    }

    /// Children owned by `node`, with their epochs.
    fn affected(&self, owners: &HashMap<SaId, (NodeId, u64)>, node: NodeId) -> Vec<(u32, u64)> {
        self.children
            .iter()
            .filter_map(|(sa, spi)| {
                owners
                    .get(sa)
                    .filter(|(o, _)| *o == node)
                    .map(|(_, e)| (*spi, *e))
            })
            .collect()
    }

    /// Waits until every node is up, active and caught up, every SA is reported again, and
    /// ownership is even; rebalances to get there.
    async fn heal(&mut self) -> anyhow::Result<()> {
        let c = self.cluster.read().await;
        c.converged(Duration::from_secs(60)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = c.admin()?.follow_leader().await?;
            let active = status
                .members
                .iter()
                .filter(|m| m.gateway_state == "active")
                .count() as u64;
            // The leader hands its SAs to the others (`ownership.leader_serves` is off): even
            // means even over the rest, and nothing left on the leader.
            let owned: Vec<u64> = status
                .members
                .iter()
                .filter(|m| Some(m.id) != status.leader_id)
                .map(|m| m.owned_sas)
                .collect();
            let leader_owns = status
                .members
                .iter()
                .filter(|m| Some(m.id) == status.leader_id)
                .map(|m| m.owned_sas)
                .sum::<u64>();
            let spread = owned.iter().max().unwrap_or(&0) - owned.iter().min().unwrap_or(&0);
            if active == self.options.nodes && spread <= 1 && leader_owns == 0 {
                break;
            }
            if active == self.options.nodes {
                c.admin()?.rebalance().await?;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "cluster did not heal: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    async fn inject(&mut self, kind: Fault) -> anyhow::Result<()> {
        let late_before = self.ledger.lock().expect("lock").late;
        let result = self.inject_inner(kind).await;
        let late = self.ledger.lock().expect("lock").late - late_before;
        if late > 0 {
            tracing::warn!(
                kind = kind.name(),
                late,
                "reports from an owner whose SA had moved on"
            );
        }
        result
    }

    /// The Raft leader now (waiting up to 10 s for one).
    async fn leader(&self) -> anyhow::Result<NodeId> {
        self.cluster
            .read()
            .await
            .leader(Duration::from_secs(10))
            .await
    }

    async fn inject_inner(&mut self, kind: Fault) -> anyhow::Result<()> {
        *self.counts.entry(kind).or_default() += 1;
        let owners = ownership(&*self.cluster.read().await).await?;
        let leader = self.leader().await?;
        let ids: Vec<NodeId> = self.cluster.read().await.ids().collect();
        let wait = Duration::from_secs(5);
        match kind {
            Fault::KillOwner
            | Fault::KillLeader
            | Fault::Pause
            | Fault::Partition
            | Fault::AsymPartition
            | Fault::Bounce => {
                // Every other fault hits a node that owns SAs: a follower, since the leader
                // hands its SAs to the others (`leader_serves` off).
                let victim = match kind {
                    Fault::KillLeader => leader,
                    _ => **ids
                        .iter()
                        .filter(|n| **n != leader)
                        .collect::<Vec<_>>()
                        .choose(&mut self.rng)
                        .context("no follower")?,
                };
                // The leader owns no SAs (it hands them to the others: `leader_serves` off), so
                // what its death costs is measured on every SA: each must be reported again,
                // in any epoch, across the election.
                let affected = match kind {
                    Fault::KillLeader => self
                        .children
                        .iter()
                        .filter_map(|(sa, spi)| owners.get(sa).map(|(_, e)| (*spi, *e)))
                        .collect(),
                    _ => self.affected(&owners, victim),
                };
                self.note(&format!(
                    "{}: node {victim} ({} SAs)",
                    kind.name(),
                    affected.len()
                ));
                tracing::info!(
                    kind = kind.name(),
                    victim,
                    leader,
                    sas = affected.len(),
                    "fault"
                );
                let since = Instant::now();
                match kind {
                    Fault::KillOwner | Fault::KillLeader => {
                        self.cluster.write().await.sigkill(victim).await?;
                        let moved = kind == Fault::KillOwner;
                        self.wait_resumed(kind, &affected, since, since, moved, wait)
                            .await;
                        self.cluster.write().await.restart(victim)?;
                    }
                    Fault::Bounce => {
                        // Back at once: before the failover timeout, so (usually) nobody takes
                        // its SAs over and it resumes them itself, in the same epoch.
                        self.cluster.write().await.sigkill(victim).await?;
                        self.cluster.write().await.restart(victim)?;
                        let restarted = Instant::now();
                        self.wait_resumed(kind, &affected, since, restarted, false, wait)
                            .await;
                    }
                    Fault::Pause => {
                        self.cluster
                            .read()
                            .await
                            .signal(victim, nix::sys::signal::Signal::SIGSTOP)?;
                        self.wait_resumed(kind, &affected, since, since, true, wait)
                            .await;
                        // Stay paused past the failover timeout either way, then resume: the
                        // node must find itself fenced and its SAs gone.
                        tokio::time::sleep(
                            Duration::from_millis(400).saturating_sub(since.elapsed()),
                        )
                        .await;
                        self.cluster
                            .read()
                            .await
                            .signal(victim, nix::sys::signal::Signal::SIGCONT)?;
                    }
                    Fault::Partition | Fault::AsymPartition => {
                        let cut = match kind {
                            Fault::Partition => Cut::Both,
                            _ if rand::Rng::random_bool(&mut self.rng, 0.5) => Cut::Outgoing,
                            _ => Cut::Incoming,
                        };
                        let ip = self.cluster.read().await.spec.host(victim);
                        let partition = Partition::cut(ip, cut)?;
                        self.wait_resumed(kind, &affected, since, since, true, wait)
                            .await;
                        tokio::time::sleep(
                            Duration::from_millis(400).saturating_sub(since.elapsed()),
                        )
                        .await;
                        drop(partition);
                    }
                    _ => unreachable!("the faults above"),
                }
            }
            Fault::ClusterRestart => {
                let affected: Vec<(u32, u64)> = self
                    .children
                    .iter()
                    .filter_map(|(sa, spi)| owners.get(sa).map(|(_, e)| (*spi, *e)))
                    .collect();
                self.note(&format!("cluster-restart ({} SAs)", affected.len()));
                tracing::info!(sas = affected.len(), "fault: every node SIGKILLed");
                let since = Instant::now();
                {
                    let mut c = self.cluster.write().await;
                    for id in ids.iter() {
                        c.sigkill(*id).await?;
                    }
                    for id in ids.iter() {
                        c.restart(*id)?;
                    }
                }
                let restarted = Instant::now();
                self.wait_resumed(
                    kind,
                    &affected,
                    since,
                    restarted,
                    false,
                    Duration::from_secs(30),
                )
                .await;
            }
            Fault::ExportImport => {
                let mut admin = self.cluster.read().await.admin()?;
                for _ in 0..self.options.transfers_per_fault {
                    let (sa, spi) = *self.children.choose(&mut self.rng).context("no SAs")?;
                    let Some(&(_, epoch)) = owners.get(&sa) else {
                        continue;
                    };
                    let since = Instant::now();
                    // The operator's transfer across domains, here and back: export with
                    // removal, then import; the child must resume above every number used.
                    let exported = admin
                        .export_sa(&sa.to_string(), true)
                        .await
                        .with_context(|| format!("exporting SA {sa}"))?;
                    admin
                        .import_sa(exported.context, None)
                        .await
                        .with_context(|| format!("importing SA {sa} back"))?;
                    self.reimports += 1;
                    self.wait_resumed(kind, &[(spi, epoch)], since, since, true, wait)
                        .await;
                }
            }
            Fault::Transfer => {
                let mut admin = self.cluster.read().await.admin()?;
                for _ in 0..self.options.transfers_per_fault {
                    let (sa, spi) = *self.children.choose(&mut self.rng).context("no SAs")?;
                    // Owners as they are now: the leader's reconciler may have moved this SA
                    // since the fault began (a node that came back gets SAs again).
                    let now = admin.get_sa(&sa.to_string()).await?;
                    let (from, epoch) = (now.owner, now.epoch);
                    // The leader takes no SAs (`ownership.leader_serves` is off): a transfer to
                    // it is refused, so the target is another follower.
                    let leader = self.leader().await?;
                    let to = *ids
                        .iter()
                        .filter(|n| **n != from && **n != leader)
                        .collect::<Vec<_>>()
                        .choose(&mut self.rng)
                        .context("one node")?;
                    let since = Instant::now();
                    match admin.transfer_sa(&sa.to_string(), *to).await {
                        Ok(_) => {}
                        // It moved again meanwhile, to where this transfer was taking it.
                        Err(e) if e.to_string().contains("already owned by") => continue,
                        Err(e) => return Err(e.into()),
                    }
                    self.wait_resumed(kind, &[(spi, epoch)], since, since, true, wait)
                        .await;
                    let ledger = self.ledger.lock().expect("lock");
                    // The interruption: how much longer than the usual spacing of its packets the
                    // SA went without one across the handover.
                    if let Some(child) = ledger.children.get(&spi)
                        && let (Some(old), Some(new)) = (
                            child.epochs.get(&epoch),
                            child.epochs.range(epoch + 1..).next(),
                        )
                    {
                        let gap = new.1.first_at.saturating_duration_since(old.last_at);
                        self.transfer_gaps
                            .push(gap.saturating_sub(self.packet_interval));
                    }
                }
            }
        }
        self.heal().await
    }
}

/// Runs the campaign.
pub async fn run(
    options: Options,
    node_bin: std::path::PathBuf,
    dir: Option<std::path::PathBuf>,
    base_port: u16,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.sas > 0 && options.nodes >= 3,
        "--sas must be positive and --nodes at least 3"
    );
    let needs_root = options.faults.iter().any(|f| f.needs_firewall());
    anyhow::ensure!(
        !needs_root || nix::unistd::Uid::effective().is_root(),
        "the partition faults need root (nftables)"
    );
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let collector = socket.local_addr()?;
    let mut spec = LocalCluster::new(options.nodes, dir.unwrap_or_default(), base_port);
    spec.address_per_node = true;
    spec.insecure_plaintext = options.insecure_plaintext;
    spec.dataplane.backend = "probe".into();
    spec.dataplane.probe.collector = Some(collector);
    spec.dataplane.probe.pps_per_child = (options.pps / options.sas).max(1);
    if options.burst {
        spec.dataplane.probe.burst_factor = 20;
    }
    // Only this run's nodes count: a node left over from another run could reach this port.
    let run_tag: u64 = rand::random();
    spec.dataplane.probe.run = run_tag;
    // Small leases, so the lease path runs all through the campaign (a busy SA commits about
    // once a second) instead of every SA living on the grants that come with moves.
    spec.ownership.lease_min = LEASE_MIN;
    spec.ownership.move_lease = LEASE_MIN;
    let fence = Duration::from_millis(spec.ownership.fence_ms);
    let cluster = ProcessCluster::launch(spec, node_bin).await?;
    let cluster = Arc::new(RwLock::new(cluster));
    let result = run_on(options, cluster.clone(), socket, fence, run_tag).await;
    cluster.write().await.stop().await;
    result
}

async fn run_on(
    options: Options,
    cluster: Arc<RwLock<ProcessCluster>>,
    socket: tokio::net::UdpSocket,
    fence: Duration,
    run_tag: u64,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(collect(
        socket,
        ledger.clone(),
        fence,
        stop.clone(),
        run_tag,
    ));
    let children = workload::create_sas(&*cluster.read().await, options.sas, 32, 0).await?;
    // Every SA reported once before the first fault.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.lock().expect("lock").children.len() < children.len() {
        anyhow::ensure!(Instant::now() < deadline, "not every SA started reporting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leases = Arc::new(Mutex::new(LeaseTally::default()));
    let leases_started = Instant::now();
    tokio::spawn(tally_leases(cluster.clone(), leases.clone(), stop.clone()));
    let msgids = Arc::new(Mutex::new(MsgIds::default()));
    let driver = tokio::spawn(drive_msgids(
        cluster.clone(),
        children.iter().map(|(sa, _)| *sa).collect(),
        msgids.clone(),
        stop.clone(),
        options.seed,
    ));
    let mut run = Run {
        rng: rand::rngs::StdRng::seed_from_u64(options.seed),
        options: options.clone(),
        cluster: cluster.clone(),
        ledger: ledger.clone(),
        children,
        resume: BTreeMap::new(),
        not_resumed: BTreeMap::new(),
        counts: BTreeMap::new(),
        transfer_gaps: Vec::new(),
        packet_interval: Duration::from_secs_f64(options.sas as f64 / options.pps as f64),
        reimports: 0,
    };
    for cycle in 0..options.cycles {
        for kind in options.faults.clone() {
            run.note(&format!("cycle {}/{}", cycle + 1, options.cycles));
            run.inject(kind)
                .await
                .with_context(|| format!("fault {}", kind.name()))?;
        }
    }
    let lease_secs = leases_started.elapsed().as_secs_f64();
    let leases_committed = leases.lock().expect("lock").total;
    stop.store(true, Ordering::Relaxed);
    let _ = driver.await;

    // Message IDs on every replica: never below what was acknowledged.
    let c = cluster.read().await;
    c.converged(Duration::from_secs(60)).await?;
    let (acked, msgid_advances) = {
        let m = msgids.lock().expect("lock");
        (m.acked.clone(), m.advances)
    };
    let mut msgid_regressions = 0;
    for id in c.alive_ids() {
        let sas = c.admin_of(id)?.all_sas(None).await?;
        let by_id: HashMap<String, u32> = sas
            .iter()
            .map(|s| (s.id.clone(), s.next_peer_request))
            .collect();
        for (sa, (_, next)) in &acked {
            if by_id.get(&sa.to_string()).is_none_or(|v| v < next) {
                msgid_regressions += 1;
            }
        }
    }
    let ledger = ledger.lock().expect("lock");
    let lease_commits_per_busy_sa_per_sec =
        leases_committed as f64 / (run.children.len() as f64 * lease_secs);
    let mut resume_ms = BTreeMap::new();
    let mut by_kind = BTreeMap::new();
    for (kind, count) in &run.counts {
        if *kind == Fault::Transfer {
            continue;
        }
        let p = Percentiles::of(run.resume.get(kind).map_or(&[][..], |v| &v[..]));
        resume_ms.insert(kind.name().to_owned(), p);
        by_kind.insert(
            kind.name().to_owned(),
            KindReport {
                faults: *count,
                resume_ms: p,
                not_resumed: run.not_resumed.get(kind).copied().unwrap_or(0),
            },
        );
    }
    Ok(Report {
        nodes: options.nodes,
        sas: options.sas,
        pps: options.pps,
        faults: run
            .counts
            .iter()
            .map(|(k, v)| (k.name().to_owned(), *v))
            .collect(),
        seq_reuse: ledger.reuse,
        seq_regressions: ledger.regressions(),
        msgid_regressions,
        msgid_advances,
        resume_ms,
        by_kind,
        transfer_gap_ms: Percentiles::of(&run.transfer_gaps),
        late_reports: ledger.late,
        max_dual_owner_ms: (ledger.max_dual_ms * 1000.0).round() / 1000.0,
        lease_commits_per_busy_sa_per_sec,
        seqs_reported: ledger.reported,
        repeats: ledger
            .repeats
            .iter()
            .map(|r| Repeat {
                at_s: r.at.map_or(0.0, |at| {
                    at.saturating_duration_since(started).as_secs_f64()
                }),
                ..r.clone()
            })
            .collect(),
        burst: options.burst,
        reimports: run.reimports,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Lease commits over the run. Each node counts its own since it started, so the tally follows
/// every node's counter and starts afresh when a restarted node's counter begins again.
#[derive(Debug, Default)]
struct LeaseTally {
    last: HashMap<NodeId, u64>,
    total: u64,
}

async fn tally_leases(
    cluster: Arc<RwLock<ProcessCluster>>,
    tally: Arc<Mutex<LeaseTally>>,
    stop: Arc<AtomicBool>,
) {
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let admins: Vec<(NodeId, anyhow::Result<evpc_api::AdminClient>)> = {
            let c = cluster.read().await;
            c.alive_ids()
                .into_iter()
                .map(|id| (id, c.admin_of(id)))
                .collect()
        };
        for (id, admin) in admins {
            let Ok(mut admin) = admin else { continue };
            let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_millis(300), admin.status(false)).await
            else {
                continue;
            };
            let mut t = tally.lock().expect("lock");
            let last = t.last.insert(id, status.lease_commits);
            // The first sample is the baseline; a lower value is a restarted node counting anew.
            let added = match last {
                _ if first => 0,
                Some(prev) if status.lease_commits >= prev => status.lease_commits - prev,
                _ => status.lease_commits,
            };
            t.total += added;
        }
        first = false;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(in_spi: u32, epoch: u64, first: u64, last: u64) -> UsedRange {
        UsedRange {
            in_spi,
            epoch,
            first,
            last,
        }
    }

    #[test]
    fn the_ledger_counts_reuse_and_regressions() {
        let now = Instant::now();
        let fence = Duration::from_millis(200);
        let mut l = Ledger::default();
        l.record(1, range(1, 1, 1, 10), now, fence);
        l.record(1, range(2, 1, 5, 5), now, fence);
        l.record(1, range(1, 1, 11, 20), now, fence);
        assert_eq!(
            l.children[&1].used.len(),
            1,
            "contiguous ranges of one epoch merge"
        );
        l.record(1, range(1, 2, 21, 30), now, fence);
        assert_eq!((l.reuse, l.regressions()), (0, 0));
        // A later owner below an earlier one's numbers: both reuse and a regression.
        l.record(1, range(1, 3, 25, 26), now, fence);
        assert_eq!((l.reuse, l.regressions()), (2, 1));
        // An old owner reporting long after the new one started.
        l.record(
            1,
            range(1, 1, 100, 100),
            now + Duration::from_secs(1),
            fence,
        );
        assert_eq!(l.late, 1);
        assert_eq!(l.resumed_at(1, 1, now), Some(now));
        assert_eq!(l.resumed_at(2, 1, now), None);
    }
}
