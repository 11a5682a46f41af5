//! `evpc-chaos store-bench`: the replicated SA store under a realistic update mix, with the
//! leader SIGKILLed halfway, then a check that nothing acknowledged was lost.
//!
//! 1. Launch N real node processes and create `--sas` SAs (each with one child SA).
//! 2. `--concurrency` workers, each owning a disjoint share of the SAs, commit updates through
//!    cluster.v1 `Propose` on the leader: message-ID advances carrying a ~200-byte response
//!    (50%), sequence leases with a replay checkpoint (35%), replay checkpoints (15%). Each
//!    worker keeps a model of what was acknowledged for its SAs.
//! 3. At `--kill-leader-at` of the operations, SIGKILL the leader; workers find the new one.
//!    An operation whose outcome is unknown (the leader died with it in flight) is not counted
//!    as acknowledged; the worker re-reads that SA from the cluster before touching it again.
//! 4. Restart the killed node, wait for every replica to apply the same index, and compare
//!    each replica's every SA with the model (`ops_lost`), and the state digests.
//! 5. SIGKILL every node, restart all on their data directories, and compare the digest again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use evpc_proto::admin::v1 as pb;
use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use evpc_raft_store::{Command, Epoch, SaId, SaUpdate};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;
use tonic::transport::Channel;

use crate::cluster::{LocalCluster, ProcessCluster};
use crate::stats::Percentiles;
use crate::workload;
use evpc_api::AdminClient;

/// The run fails if no update is acknowledged for this long (a stuck cluster, not a slow one).
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Options of one run.
#[derive(Clone, Debug)]
pub struct StoreBench {
    /// Cluster size.
    pub nodes: u64,
    /// SAs to create.
    pub sas: u64,
    /// Acknowledged updates to reach.
    pub ops: u64,
    /// Concurrent proposers.
    pub concurrency: usize,
    /// Fraction of `ops` after which the leader is SIGKILLed (none if outside (0, 1)).
    pub kill_leader_at: f64,
    /// Restart every node at the end and compare digests.
    pub restart_all: bool,
    /// RNG seed.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Run the nodes without TLS.
    pub insecure_plaintext: bool,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Cluster size.
    pub nodes: u64,
    /// SAs created.
    pub sas: u64,
    /// Concurrent proposers.
    pub concurrency: usize,
    /// Acknowledged updates.
    pub ops_acked: u64,
    /// Acknowledged updates missing (or different) on some live replica at the end.
    pub ops_lost: u64,
    /// Updates whose outcome was unknown (in flight at the kill); the SA was re-read.
    pub ops_unknown: u64,
    /// Updates the state machine refused — after the SA moved to a new owner (its epoch changed)
    /// when the leader was killed; the worker then re-reads the SA.
    pub ops_rejected: u64,
    /// Acknowledged updates per second over the whole run, failover included.
    pub commits_per_sec: f64,
    /// The same, excluding the failover window.
    pub commits_per_sec_steady: f64,
    /// Commit latency of acknowledged updates, excluding those overlapping the failover.
    pub latency_ms: Percentiles,
    /// SIGKILL of the leader to the first update acknowledged by the new one.
    pub leader_failover_ms: Option<f64>,
    /// The node that was killed.
    pub killed_leader: Option<u64>,
    /// Replicas compared at the end.
    pub replicas_checked: usize,
    /// Whether every replica's state digest is equal (at one applied index).
    pub digests_equal: bool,
    /// The common digest.
    pub digest: String,
    /// After SIGKILL of all nodes and a restart on their data dirs: every node recovered the
    /// applied index and state digest it had before.
    pub restart_digest_equal: Option<bool>,
    /// Time to create the SAs.
    pub create_secs: f64,
    /// Time of the update phase.
    pub workload_secs: f64,
}

/// What one worker knows about an SA: the acknowledged values.
#[derive(Clone, Debug)]
struct SaModel {
    id: SaId,
    child: u32,
    /// The SA's ownership epoch as last seen: updates go out in it. (The leader moves SAs off
    /// a killed node, so epochs change during the run.)
    epoch: Epoch,
    next_peer_request: u32,
    response_sha256: String,
    out_hwm: u64,
    in_checkpoint: u64,
    /// An update's outcome is unknown: re-read before the next one.
    stale: bool,
    /// Acknowledged updates, by kind and resulting value, for counting losses.
    acked: Vec<(Field, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    MessageId,
    OutHwm,
    Checkpoint,
}

#[derive(Default)]
struct Shared {
    acked: AtomicU64,
    unknown: AtomicU64,
    rejected: AtomicU64,
    done: AtomicBool,
    /// Start time and latency of every acknowledged update.
    samples: Mutex<Vec<(Instant, Duration)>>,
    kill_at: Mutex<Option<Instant>>,
    first_ack_after_kill: Mutex<Option<Instant>>,
}

/// Which node the workers send to, kept by one task: workers report a leader that failed them
/// and wait for the tracker to publish the next one, instead of all polling the cluster.
#[derive(Clone)]
struct LeaderTracker {
    leader: tokio::sync::watch::Receiver<u64>,
    suspect: tokio::sync::mpsc::UnboundedSender<u64>,
}

impl LeaderTracker {
    fn start(cluster: Arc<RwLock<ProcessCluster>>, admins: Vec<AdminClient>, first: u64) -> Self {
        let (publish, leader) = tokio::sync::watch::channel(first);
        let (suspect, mut suspects) = tokio::sync::mpsc::unbounded_channel::<u64>();
        tokio::spawn(async move {
            while let Some(failed) = suspects.recv().await {
                if *publish.borrow() != failed {
                    continue; // already moved on
                }
                let deadline = Instant::now() + Duration::from_secs(30);
                'search: while Instant::now() < deadline {
                    let alive = cluster.read().await.alive_ids();
                    for id in &alive {
                        let mut admin = admins[(*id - 1) as usize].clone();
                        if let Ok(status) = admin.status(false).await
                            && let Some(leader) = status.leader_id
                            && alive.contains(&leader)
                            && (leader != failed || status.role == "leader" && leader == *id)
                        {
                            publish.send_replace(leader);
                            break 'search;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        LeaderTracker { leader, suspect }
    }

    fn current(&self) -> u64 {
        *self.leader.borrow()
    }

    /// Reports that `failed` did not serve a request and waits (bounded) for a new leader.
    async fn replace(&mut self, failed: u64) {
        let _ = self.suspect.send(failed);
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            self.leader.wait_for(|l| *l != failed),
        )
        .await;
    }
}

fn model_from(info: &pb::SaInfo, stale_model: &SaModel) -> SaModel {
    let child = info.children.first();
    SaModel {
        id: stale_model.id,
        child: stale_model.child,
        epoch: Epoch(info.epoch),
        next_peer_request: info.next_peer_request,
        response_sha256: info.last_response_sha256.clone(),
        out_hwm: child.map_or(0, |c| c.out_hwm),
        in_checkpoint: child.map_or(0, |c| c.in_checkpoint),
        stale: false,
        acked: stale_model.acked.clone(),
    }
}

async fn worker(
    options: StoreBench,
    index: usize,
    mut models: Vec<SaModel>,
    clients: Vec<ClusterClient<Channel>>,
    admins: Vec<AdminClient>,
    mut leader: LeaderTracker,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<SaModel>> {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(options.seed ^ (index as u64).wrapping_mul(0x9e37));
    while !shared.done.load(Ordering::Relaxed) {
        let k = rng.random_range(0..models.len());
        let model = &mut models[k];
        let leader_id = leader.current();
        let mut client = clients[(leader_id - 1) as usize].clone();
        if model.stale {
            // The leader has every committed update once it has applied its commit index (a
            // new leader may still be applying what the old one committed).
            let mut admin = admins[(leader_id - 1) as usize].clone();
            match admin.status(false).await {
                Ok(s) if s.role == "leader" && s.last_applied_index >= s.committed_index => {}
                Ok(s) if s.role == "leader" => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                _ => {
                    leader.replace(leader_id).await;
                    continue;
                }
            }
            match admin.get_sa(&model.id.to_string()).await {
                Ok(info) => *model = model_from(&info, model),
                Err(_) => {
                    leader.replace(leader_id).await;
                    continue;
                }
            }
        }

        let roll = rng.random_range(0..100);
        let (update, field, value, response_sha) = if roll < 50 {
            let mut response = vec![0u8; 200];
            rng.fill(&mut response[..]);
            let sha = hex::encode(Sha256::digest(&response));
            let msg_id = model.next_peer_request;
            (
                vec![
                    SaUpdate::PeerRequestAnswered {
                        msg_id,
                        response: vec![response],
                    },
                    SaUpdate::PeerSeen { at_ms: 0 },
                ],
                Field::MessageId,
                u64::from(msg_id) + 1,
                Some(sha),
            )
        } else if roll < 85 {
            let out_hwm = model.out_hwm + rng.random_range(1_000..5_000);
            let checkpoint = model.in_checkpoint + rng.random_range(0..500);
            (
                vec![SaUpdate::SeqLease {
                    in_spi: model.child,
                    out_hwm,
                    in_checkpoint: Some(checkpoint),
                }],
                Field::OutHwm,
                out_hwm,
                None,
            )
        } else {
            let in_seq = model.in_checkpoint + rng.random_range(1..500);
            (
                vec![SaUpdate::ReplayCheckpoint {
                    in_spi: model.child,
                    in_seq,
                }],
                Field::Checkpoint,
                in_seq,
                None,
            )
        };
        let command = Command::Update {
            sa: model.id,
            epoch: model.epoch,
            updates: update.clone(),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_secs(3),
            workload::propose(&mut client, &command),
        )
        .await;
        match result {
            Ok(Ok(Ok(_))) => {
                let latency = started.elapsed();
                if latency > Duration::from_millis(100) {
                    tracing::debug!(sa = %model.id, ms = latency.as_millis() as u64, "slow commit");
                }
                match field {
                    Field::MessageId => {
                        model.next_peer_request = value as u32;
                        model.response_sha256 = response_sha.unwrap_or_default();
                    }
                    Field::OutHwm => {
                        model.out_hwm = value;
                        if let Some(SaUpdate::SeqLease {
                            in_checkpoint: Some(c),
                            ..
                        }) = update.first()
                        {
                            model.in_checkpoint = *c;
                            model.acked.push((Field::Checkpoint, *c));
                        }
                    }
                    Field::Checkpoint => model.in_checkpoint = value,
                }
                model.acked.push((field, value));
                shared.acked.fetch_add(1, Ordering::Relaxed);
                shared
                    .samples
                    .lock()
                    .expect("samples lock")
                    .push((started, latency));
                // The first update *sent* after the kill and acknowledged marks the new leader's
                // first commit (one sent before could still be answered by the old leader).
                if shared
                    .kill_at
                    .lock()
                    .expect("kill lock")
                    .is_some_and(|kill| started > kill)
                {
                    let mut first = shared.first_ack_after_kill.lock().expect("lock");
                    if first.is_none() {
                        *first = Some(Instant::now());
                    }
                }
            }
            Ok(Ok(Err(rejection))) => {
                tracing::warn!(sa = %model.id, %rejection, "update refused; re-reading the SA");
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                model.stale = true;
            }
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                // Not the leader: nothing was appended, so the update can simply be retried.
                leader.replace(leader_id).await;
            }
            Ok(Err(_)) | Err(_) => {
                shared.unknown.fetch_add(1, Ordering::Relaxed);
                model.stale = true;
                leader.replace(leader_id).await;
            }
        }
    }
    Ok(models)
}

/// Creates the SAs and starts a model for each.
async fn create_sas(
    cluster: &ProcessCluster,
    options: &StoreBench,
) -> anyhow::Result<Vec<SaModel>> {
    let created = workload::create_sas(cluster, options.sas, options.concurrency, 0).await?;
    Ok(created
        .into_iter()
        .map(|(id, child)| SaModel {
            id,
            child,
            epoch: Epoch::FIRST,
            next_peer_request: 2,
            response_sha256: String::new(),
            out_hwm: 0,
            in_checkpoint: 0,
            stale: false,
            acked: Vec::new(),
        })
        .collect())
}

/// Counts acknowledged updates that a replica's SA does not reflect.
fn lost_on(model: &SaModel, info: Option<&pb::SaInfo>) -> u64 {
    let Some(info) = info else {
        return model.acked.len() as u64 + 1;
    };
    let child = info.children.first();
    let (msg, hwm, ckpt) = (
        u64::from(info.next_peer_request),
        child.map_or(0, |c| c.out_hwm),
        child.map_or(0, |c| c.in_checkpoint),
    );
    let mut lost = model
        .acked
        .iter()
        .filter(|(field, value)| match field {
            Field::MessageId => *value > msg,
            Field::OutHwm => *value > hwm,
            Field::Checkpoint => *value > ckpt,
        })
        .count() as u64;
    // Beyond "not behind": the exact acknowledged values, response bytes included. A change of
    // owner since the model last looked grants the new owner a lease, so `out_hwm` may then be
    // higher than the last acknowledged lease, never lower.
    let moved = info.epoch != model.epoch.0;
    let exact = u64::from(model.next_peer_request) == msg
        && (model.out_hwm == hwm || moved && hwm > model.out_hwm)
        && model.in_checkpoint == ckpt
        && model.response_sha256 == info.last_response_sha256;
    // A model left stale (its last update's outcome unknown, never re-read) knows only what
    // was acknowledged, not the exact values.
    if lost == 0 && !exact && !model.stale {
        lost = 1;
    }
    lost
}

/// Compares every live replica with the models; returns (ops lost, replicas checked).
async fn verify(cluster: &ProcessCluster, models: &[SaModel]) -> anyhow::Result<(u64, usize)> {
    let mut lost = 0;
    let ids = cluster.alive_ids();
    for id in &ids {
        let sas = cluster.admin_of(*id)?.all_sas(None).await?;
        let by_id: std::collections::HashMap<&str, &pb::SaInfo> =
            sas.iter().map(|s| (s.id.as_str(), s)).collect();
        let mut examples = 0;
        let replica_lost: u64 = models
            .iter()
            .map(|m| {
                let info = by_id.get(m.id.to_string().as_str()).copied();
                let lost = lost_on(m, info);
                if lost > 0 && examples < 3 {
                    examples += 1;
                    tracing::error!(
                        node = id,
                        sa = %m.id,
                        model = ?(m.epoch, m.next_peer_request, m.out_hwm, m.in_checkpoint, &m.response_sha256, m.stale),
                        replica = ?info.map(|i| (i.epoch, i.next_peer_request, i.children.first().map(|c| (c.out_hwm, c.in_checkpoint)), &i.last_response_sha256)),
                        "an acknowledged update is missing"
                    );
                }
                lost
            })
            .sum();
        if replica_lost > 0 {
            tracing::error!(
                node = id,
                replica_lost,
                "replica is missing acknowledged updates"
            );
        }
        lost += replica_lost;
    }
    Ok((lost, ids.len()))
}

/// Runs the benchmark.
pub async fn run(
    options: StoreBench,
    node_bin: std::path::PathBuf,
    dir: Option<std::path::PathBuf>,
    base_port: u16,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.sas > 0 && options.ops > 0,
        "--sas and --ops must be positive"
    );
    anyhow::ensure!(options.concurrency > 0, "--concurrency must be positive");
    let mut spec = LocalCluster::new(options.nodes, dir.unwrap_or_default(), base_port);
    spec.insecure_plaintext = options.insecure_plaintext;
    // Its proposers re-read SAs through admin.v1 after every refusal, by the thousand per
    // second: this measures the store, not an operator, so the admin rate limit is lifted.
    spec.limits.admin_requests_per_second = 1_000_000;
    spec.limits.admin_burst = 1_000_000;
    let cluster = ProcessCluster::launch(spec, node_bin).await?;
    let cluster = Arc::new(RwLock::new(cluster));
    let result = run_on(&options, cluster.clone()).await;
    cluster.write().await.stop().await;
    result
}

async fn run_on(
    options: &StoreBench,
    cluster: Arc<RwLock<ProcessCluster>>,
) -> anyhow::Result<Report> {
    let create_started = Instant::now();
    let models = create_sas(&*cluster.read().await, options)
        .await
        .context("creating SAs")?;
    let create_secs = create_started.elapsed().as_secs_f64();

    let (leader_id, clients, admins) = {
        let c = cluster.read().await;
        let leader = c.leader(Duration::from_secs(10)).await?;
        let clients = c
            .ids()
            .map(|id| c.cluster_client(id))
            .collect::<Result<Vec<_>, _>>()?;
        let admins = c
            .ids()
            .map(|id| c.admin_of(id))
            .collect::<Result<Vec<_>, _>>()?;
        (leader, clients, admins)
    };
    let leader = LeaderTracker::start(cluster.clone(), admins.clone(), leader_id);
    let shared = Arc::new(Shared::default());

    // Share the SAs out: worker k owns SA j when j % concurrency == k.
    let mut shares: Vec<Vec<SaModel>> = vec![Vec::new(); options.concurrency];
    for (j, model) in models.into_iter().enumerate() {
        shares[j % options.concurrency].push(model);
    }
    let workload_started = Instant::now();
    let mut workers = Vec::new();
    for (k, share) in shares.into_iter().enumerate() {
        if share.is_empty() {
            continue;
        }
        workers.push(tokio::spawn(worker(
            options.clone(),
            k,
            share,
            clients.clone(),
            admins.clone(),
            leader.clone(),
            shared.clone(),
        )));
    }

    let bar = options.progress.then(|| {
        let bar = indicatif::ProgressBar::new(options.ops);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} updates ({per_sec}) {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let kill_threshold = (options.kill_leader_at > 0.0 && options.kill_leader_at < 1.0)
        .then_some((options.ops as f64 * options.kill_leader_at) as u64);
    let mut killed = None;
    let mut progress = (0, Instant::now());
    loop {
        let acked = shared.acked.load(Ordering::Relaxed);
        if let Some(bar) = &bar {
            bar.set_position(acked);
        }
        if acked >= options.ops {
            break;
        }
        if acked > progress.0 {
            progress = (acked, Instant::now());
        } else if progress.1.elapsed() > STALL_LIMIT {
            shared.done.store(true, Ordering::Relaxed);
            anyhow::bail!(
                "no update acknowledged for {STALL_LIMIT:?} ({acked} of {} acknowledged, {} refused, \
                 {} unknown); the node logs are in the cluster directory (--dir keeps them)",
                options.ops,
                shared.rejected.load(Ordering::Relaxed),
                shared.unknown.load(Ordering::Relaxed),
            );
        }
        if killed.is_none() && kill_threshold.is_some_and(|t| acked >= t) {
            let victim = leader.current();
            *shared.kill_at.lock().expect("lock") = Some(Instant::now());
            cluster.write().await.sigkill(victim).await?;
            tracing::info!(node = victim, acked, "SIGKILLed the leader");
            if let Some(bar) = &bar {
                bar.set_message(format!("killed leader {victim}"));
            }
            killed = Some(victim);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.done.store(true, Ordering::Relaxed);
    let mut models = Vec::new();
    for w in workers {
        models.extend(w.await??);
    }
    let workload_secs = workload_started.elapsed().as_secs_f64();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let kill_at = *shared.kill_at.lock().expect("lock");
    let recovered = *shared.first_ack_after_kill.lock().expect("lock");
    let leader_failover_ms = kill_at
        .zip(recovered)
        .map(|(k, r)| r.duration_since(k).as_secs_f64() * 1e3);
    let samples = std::mem::take(&mut *shared.samples.lock().expect("lock"));
    let overlaps_failover = |(start, latency): &(Instant, Duration)| match (kill_at, recovered) {
        (Some(k), Some(r)) => *start <= r && *start + *latency >= k,
        (Some(k), None) => *start + *latency >= k,
        _ => false,
    };
    let steady: Vec<Duration> = samples
        .iter()
        .filter(|s| !overlaps_failover(s))
        .map(|(_, l)| *l)
        .collect();
    let failover_secs = kill_at
        .zip(recovered)
        .map_or(0.0, |(k, r)| r.duration_since(k).as_secs_f64());
    let ops_acked = shared.acked.load(Ordering::Relaxed);

    // Bring the killed node back, let everyone catch up, then compare replicas with the model.
    {
        let mut c = cluster.write().await;
        if let Some(victim) = killed {
            c.restart(victim)?;
        }
    }
    let c = cluster.read().await;
    c.converged(Duration::from_secs(120)).await?;
    let (ops_lost, replicas_checked) = verify(&c, &models).await?;
    let digests = c.digests().await?;
    let digests_equal = digests.iter().all(|(_, _, d)| *d == digests[0].2);
    let digest = digests[0].2.clone();
    drop(c);

    let restart_digest_equal = if options.restart_all {
        // A node recovers up to the committed index it persisted. Followers learn the final
        // commit index from heartbeats, which are not flushed on their own; sled's background
        // flush (every 500 ms) makes it durable. So wait until nothing has been committed for
        // well over a flush period — the leader's housekeeping (acknowledged marks) commits one
        // more entry after the workload — and take the state right before the SIGKILL as the
        // one to recover. Without the pause a node would come back at an earlier index (nothing
        // lost: the entries are in its log and the leader re-commits them), and the digests
        // would be compared at different indexes.
        let (applied_before_restart, digest) = cluster
            .read()
            .await
            .quiet(Duration::from_millis(1_500), Duration::from_secs(30))
            .await?;
        let mut c = cluster.write().await;
        for id in c.alive_ids() {
            c.sigkill(id).await?;
        }
        for id in c.ids().collect::<Vec<_>>() {
            c.restart(id)?;
        }
        drop(c);
        // Compare what each node recovered from disk, not its state now: the restarted cluster
        // may legitimately commit again at once (a node slow to come back is marked down).
        let c = cluster.read().await;
        c.leader(Duration::from_secs(30)).await?;
        let mut all_equal = true;
        for (id, index, recovered) in c.recovered().await? {
            let equal = index == applied_before_restart && recovered == digest;
            if !equal {
                tracing::error!(
                    node = id,
                    recovered_index = index,
                    index_before = applied_before_restart,
                    "a node did not recover the state it had before SIGKILL"
                );
            }
            all_equal &= equal;
        }
        Some(all_equal)
    } else {
        None
    };

    Ok(Report {
        nodes: options.nodes,
        sas: options.sas,
        concurrency: options.concurrency,
        ops_acked,
        ops_lost,
        ops_unknown: shared.unknown.load(Ordering::Relaxed),
        ops_rejected: shared.rejected.load(Ordering::Relaxed),
        commits_per_sec: ops_acked as f64 / workload_secs,
        commits_per_sec_steady: steady.len() as f64 / (workload_secs - failover_secs).max(1e-9),
        latency_ms: Percentiles::of(&steady),
        leader_failover_ms,
        killed_leader: killed,
        replicas_checked,
        digests_equal,
        digest,
        restart_digest_equal,
        create_secs,
        workload_secs,
    })
}

/// What TLS costs: the same benchmark with and without it, alternating.
#[derive(Debug, Serialize)]
pub struct PlaintextComparison {
    /// Rounds of each.
    pub rounds: u32,
    /// Median acknowledged updates per second (whole run), with TLS.
    pub tls_commits_per_sec: f64,
    /// The same, in plaintext.
    pub plaintext_commits_per_sec: f64,
    /// tls / plaintext.
    pub commits_ratio: f64,
    /// Median of the rounds' latency p50 and p99 (ms), with TLS.
    pub tls_latency_ms: (f64, f64),
    /// The same, in plaintext.
    pub plaintext_latency_ms: (f64, f64),
    /// Every round lost nothing and its digests matched.
    pub all_passed: bool,
    /// Every round's report, in the order run.
    pub runs: Vec<(bool, Report)>,
}

/// Runs `options` `rounds` times with TLS and `rounds` times without, alternating (so drift
/// in the machine's load hits both alike), each on a fresh cluster.
pub async fn compare_plaintext(
    options: StoreBench,
    rounds: u32,
    node_bin: std::path::PathBuf,
    base_port: u16,
) -> anyhow::Result<PlaintextComparison> {
    anyhow::ensure!(rounds > 0, "--compare-plaintext needs at least one round");
    let mut runs = Vec::new();
    for round in 0..rounds * 2 {
        let plaintext = round % 2 == 1;
        let options = StoreBench {
            insecure_plaintext: plaintext,
            progress: false,
            ..options.clone()
        };
        let report = run(options, node_bin.clone(), None, base_port).await?;
        runs.push((plaintext, report));
    }
    let median = |plaintext: bool, pick: &dyn Fn(&Report) -> f64| {
        let mut values: Vec<f64> = runs
            .iter()
            .filter(|(p, _)| *p == plaintext)
            .map(|(_, r)| pick(r))
            .collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let tls = median(false, &|r| r.commits_per_sec);
    let plain = median(true, &|r| r.commits_per_sec);
    Ok(PlaintextComparison {
        rounds,
        tls_commits_per_sec: tls,
        plaintext_commits_per_sec: plain,
        commits_ratio: tls / plain,
        tls_latency_ms: (
            median(false, &|r| r.latency_ms.p50),
            median(false, &|r| r.latency_ms.p99),
        ),
        plaintext_latency_ms: (
            median(true, &|r| r.latency_ms.p50),
            median(true, &|r| r.latency_ms.p99),
        ),
        all_passed: runs.iter().all(|(_, r)| {
            r.ops_lost == 0 && r.digests_equal && r.restart_digest_equal != Some(false)
        }),
        runs,
    })
}
