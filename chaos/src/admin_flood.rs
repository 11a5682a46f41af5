//! `evpc-chaos admin-flood`: can an operator's client that hammers admin.v1 delay Raft?
//!
//! ```text
//!  phase "idle":  writer ──Propose (empty batch, 200/s)──► leader      sampler ──Status──► leader
//!  phase "flood": the same, plus K clients ──Status --digest, flat out──► every node
//! ```
//!
//! Each phase reports the writer's commit latency, elections (term changes), leader changes,
//! nodes marked down, and the longest silence the leader's failure detector saw from a member
//! (its pings' round trips: what would fail a node over). The flood clients present their own
//! reader certificate, so the rate limit they meet is theirs, not the sampler's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evpc_api::AdminClient;
use evpc_node::pki::Role;
use evpc_raft_store::Command;
use evpc_testkit::local::{LocalCluster, ProcessCluster};
use serde::Serialize;

use crate::stats::Percentiles;
use crate::workload;

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// SAs in the state (what a digest hashes).
    #[arg(long, default_value_t = 5_000)]
    sas: u64,
    /// Concurrent flooding admin clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Commits per second the writer makes in both phases.
    #[arg(long, default_value_t = 200)]
    commits_per_sec: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One phase's figures.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// Commits the writer made.
    pub commits: usize,
    /// Their latency (ms).
    pub commit_ms: Percentiles,
    /// Commits that failed.
    pub commit_errors: u64,
    /// Raft term changes (elections) during the phase.
    pub term_changes: u64,
    /// Times the leader changed.
    pub leader_changes: u64,
    /// Samples in which a member was marked down.
    pub nodes_down_samples: u64,
    /// The longest silence of a member the leader's failure detector saw (ms).
    pub max_member_silence_ms: u64,
    /// Admin calls the flood made that were served.
    pub admin_served: u64,
    /// Flood calls refused by the rate limit.
    pub admin_rate_limited: u64,
    /// Flood calls that failed otherwise.
    pub admin_errors: u64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    command: &'static str,
    nodes: u64,
    sas: u64,
    clients: usize,
    seconds: u64,
    tls: bool,
    idle: Phase,
    flood: Phase,
    /// flood commit p99 / idle commit p99.
    commit_p99_ratio: f64,
    checks_passed: bool,
    failures: Vec<String>,
}

/// Runs both phases on a fresh cluster.
pub async fn run(
    args: Args,
    node_bin: std::path::PathBuf,
    dir: Option<std::path::PathBuf>,
    base_port: u16,
) -> anyhow::Result<bool> {
    let spec = LocalCluster::new(args.nodes, dir.unwrap_or_default(), base_port);
    let mut cluster = ProcessCluster::launch(spec, node_bin).await?;
    let result = measure(&args, &cluster).await;
    cluster.stop().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for (name, p) in [("idle", &report.idle), ("flood", &report.flood)] {
            println!(
                "{name:<6} commits p50 {:.2} ms p99 {:.2} ms; elections {}, leader changes {}, \
                 down samples {}, max member silence {} ms; admin served {} rate-limited {}",
                p.commit_ms.p50,
                p.commit_ms.p99,
                p.term_changes,
                p.leader_changes,
                p.nodes_down_samples,
                p.max_member_silence_ms,
                p.admin_served,
                p.admin_rate_limited
            );
        }
        for failure in &report.failures {
            println!("FAILED: {failure}");
        }
    }
    Ok(report.checks_passed)
}

async fn measure(args: &Args, cluster: &ProcessCluster) -> anyhow::Result<Report> {
    workload::create_sas(cluster, args.sas, 32, 1 << 20).await?;
    let pki = cluster.spec.pki();
    if !pki.client("flood").cert_file.exists() {
        pki.issue_client("flood", Role::Reader, 1)?;
    }
    let idle = phase(args, cluster, 0).await?;
    let flood = phase(args, cluster, args.clients).await?;
    let mut failures = Vec::new();
    if flood.term_changes > 0 || flood.leader_changes > 0 {
        failures.push(format!(
            "{} elections and {} leader changes under the admin flood",
            flood.term_changes, flood.leader_changes
        ));
    }
    if flood.nodes_down_samples > 0 {
        failures.push("a node was marked down under the admin flood".into());
    }
    if flood.commit_errors > 0 {
        failures.push(format!(
            "{} commits failed under the flood",
            flood.commit_errors
        ));
    }
    let ratio = flood.commit_ms.p99 / idle.commit_ms.p99.max(0.001);
    Ok(Report {
        command: "admin-flood",
        nodes: args.nodes,
        sas: args.sas,
        clients: args.clients,
        seconds: args.seconds,
        tls: !cluster.spec.insecure_plaintext,
        checks_passed: failures.is_empty(),
        commit_p99_ratio: ratio,
        idle,
        flood,
        failures,
    })
}

/// One phase of `args.seconds` with `flooders` flooding clients.
async fn phase(args: &Args, cluster: &ProcessCluster, flooders: usize) -> anyhow::Result<Phase> {
    let leader = cluster.leader(Duration::from_secs(10)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (served, limited, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let security = cluster.spec.security_as("flood")?;
    let endpoints = cluster.spec.admin_endpoints();
    let mut flood = Vec::new();
    for i in 0..flooders {
        let endpoint = endpoints[i % endpoints.len()].clone();
        let mut client = AdminClient::new(&[endpoint], Duration::from_secs(5), security.clone())?;
        let (stop, served, limited, errors) = (
            stop.clone(),
            served.clone(),
            limited.clone(),
            errors.clone(),
        );
        flood.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.status(true).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Some(tonic::Code::ResourceExhausted) => {
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    // The writer: empty batches through Raft at a steady rate.
    let writer = {
        let mut client = cluster.cluster_client(leader)?;
        let stop = stop.clone();
        let every = Duration::from_micros(1_000_000 / args.commits_per_sec.max(1));
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let start = Instant::now();
                match workload::propose(&mut client, &Command::Batch(Vec::new())).await {
                    Ok(_) => latencies.push(start.elapsed()),
                    Err(_) => failed += 1,
                }
            }
            (latencies, failed)
        })
    };

    // The sampler: what the leader sees, every 100 ms.
    let mut sampler = cluster.admin_of(leader)?;
    let first = sampler.status(false).await?;
    let (mut term, mut leader_now) = (first.term, first.leader_id);
    let (mut term_changes, mut leader_changes, mut down, mut silence) = (0, 0, 0, 0);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(status) = sampler.status(false).await else {
            continue;
        };
        if status.term != term {
            term_changes += status.term.saturating_sub(term);
            term = status.term;
        }
        if status.leader_id != leader_now {
            leader_changes += 1;
            leader_now = status.leader_id;
        }
        if status.members.iter().any(|m| m.gateway_state == "down") {
            down += 1;
        }
        silence = status
            .members
            .iter()
            .filter(|m| m.id != status.node_id)
            .filter_map(|m| m.silence_ms)
            .fold(silence, u64::max);
    }
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await?;
    }
    let (latencies, commit_errors) = writer.await?;
    Ok(Phase {
        commits: latencies.len(),
        commit_ms: Percentiles::of(&latencies),
        commit_errors,
        term_changes,
        leader_changes,
        nodes_down_samples: down,
        max_member_silence_ms: silence,
        admin_served: served.load(Ordering::Relaxed),
        admin_rate_limited: limited.load(Ordering::Relaxed),
        admin_errors: errors.load(Ordering::Relaxed),
    })
}
