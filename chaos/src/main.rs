//! `evpc-chaos`: benchmarks and fault campaigns against real evpc node processes, and `local`, a
//! cluster of them on loopback to try evpc out.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

// The Raft path allocates per entry and per RPC; mimalloc's thread caches keep that off the
// critical path better than glibc's malloc under many short-lived tasks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin_flood;
mod cluster;
mod demo;
mod esp_bench;
mod failover;
mod ike_bench;
mod ike_flood;
#[allow(dead_code)] // the tunnels runner's report; used once the runner writes it
mod report;
mod stats;
mod store_bench;
mod tunnels;
mod workload;

/// Benchmarks and fault campaigns against a real evpc cluster.
#[derive(Debug, Parser)]
#[command(name = "evpc-chaos", version)]
struct Cli {
    /// The evpc-node binary (default: next to this one).
    #[arg(long, global = true)]
    node_bin: Option<PathBuf>,
    /// Directory for the nodes' data (default: a temporary directory, removed at the end; for
    /// `local`: evpc-local, reused if it exists).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// Node i listens on BASE+i (Raft) and BASE+100+i (admin) (default: 7400; for `local`: 7100).
    #[arg(long, global = true, value_name = "BASE_PORT")]
    base_port: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

/// `--base-port` of the benchmarks and campaigns.
const BASE_PORT: u16 = 7400;
/// `--base-port` of `local`.
const LOCAL_BASE_PORT: u16 = 7100;
/// `--dir` of `local`.
const LOCAL_DIR: &str = "evpc-local";

#[derive(Debug, Subcommand)]
enum Command {
    /// What evpc is for, in about a minute: a cluster, clients with live calls, a node
    /// SIGKILLed under them and a planned transfer; what the clients saw (needs root).
    Demo(demo::Args),
    /// Run a cluster of N nodes on loopback as child processes, until SIGINT or SIGTERM.
    Local {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Run the nodes without TLS, authenticating nobody (a lab only; logged).
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Userspace ESP throughput: TUN → ESP → UDP → ESP → TUN across two network namespaces
    /// (needs root).
    EspBench(esp_bench::Args),
    /// IKE SA setups per second against a real cluster, and the latency commit-before-respond
    /// adds to an exchange (3 nodes vs 1 node vs the bare engine), in network namespaces
    /// (needs root).
    IkeBench(ike_bench::Args),
    /// Real tunnels under fire: strongSwan and evpc clients through one cluster address, voice
    /// and TCP in every tunnel, every kind of fault; checked on the wire and at the clients,
    /// interruptions measured there, a JSON and an HTML report (needs root).
    Tunnels(tunnels::Args),
    /// Whether a client hammering admin.v1 (`status --digest`) delays Raft: commit latency,
    /// elections and failure-detector silences with and without the flood.
    AdminFlood(admin_flood::Args),
    /// Real nodes with the probe data plane under faults; checks every sequence number and
    /// message ID, measures how fast SAs resume.
    Failover {
        /// Cluster size.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// SAs (one child SA each).
        #[arg(long, default_value_t = 1000)]
        sas: u64,
        /// Probe packets per second over all SAs.
        #[arg(long, default_value_t = 20_000)]
        pps: u64,
        /// Faults to inject each cycle, comma-separated: kill-owner, kill-leader, pause,
        /// partition (needs root), transfer, bounce (SIGKILL and restart at once),
        /// cluster-restart (SIGKILL every node), asym-partition (one direction cut; needs root),
        /// export-import (export --remove, then import).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "kill-owner,kill-leader,pause,partition,transfer"
        )]
        faults: Vec<String>,
        /// Cycles through the fault list.
        #[arg(long, default_value_t = 20)]
        cycles: u32,
        /// SAs moved per transfer fault (and exported per export-import fault).
        #[arg(long, default_value_t = 5)]
        transfers: usize,
        /// Every SA bursts to 20 times its rate for 200 ms every 4 s, beyond its leases.
        #[arg(long)]
        burst: bool,
        /// Run the nodes without TLS (insecure_plaintext), to see what TLS costs.
        #[arg(long)]
        insecure_plaintext: bool,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The replicated SA store under load, with a leader kill; checks nothing acknowledged is lost.
    StoreBench {
        /// Cluster size.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// SAs to create.
        #[arg(long, default_value_t = 10_000)]
        sas: u64,
        /// Acknowledged updates to reach.
        #[arg(long, default_value_t = 200_000)]
        ops: u64,
        /// Concurrent proposers.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// SIGKILL the leader after this fraction of the updates (0 or 1: never).
        #[arg(long, default_value_t = 0.5)]
        kill_leader_at: f64,
        /// Skip the final SIGKILL-everything-and-restart digest check.
        #[arg(long)]
        no_restart_check: bool,
        /// Run the nodes without TLS (insecure_plaintext), to see what TLS costs.
        #[arg(long)]
        insecure_plaintext: bool,
        /// Run the benchmark ROUNDS times with TLS and ROUNDS times without, alternating, and
        /// report the median commit rates and latencies of each and their ratio.
        #[arg(long, value_name = "ROUNDS")]
        compare_plaintext: Option<u32>,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    evpc_node::init_tracing();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("evpc-chaos: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("evpc-chaos: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command; `Ok(false)` when a guarantee was violated (exit status 2).
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let command = match cli.command {
        Command::EspBench(args) => return esp_bench::run(args).await,
        Command::Demo(args) => return demo::run(args, cli.node_bin.as_deref()).await,
        command => command,
    };
    let node_bin = cluster::node_binary(cli.node_bin.as_deref())?;
    let base_port = cli.base_port.unwrap_or(BASE_PORT);
    match command {
        Command::EspBench(_) | Command::Demo(_) => unreachable!("handled above"),
        Command::Local {
            nodes,
            insecure_plaintext,
        } => {
            let dir = cli.dir.unwrap_or_else(|| PathBuf::from(LOCAL_DIR));
            let mut spec =
                cluster::LocalCluster::new(nodes, dir, cli.base_port.unwrap_or(LOCAL_BASE_PORT));
            spec.insecure_plaintext = insecure_plaintext;
            evpc_testkit::local::run(spec, node_bin).await?;
            Ok(true)
        }
        Command::IkeBench(args) => ike_bench::run(args, node_bin).await,
        Command::Tunnels(args) => tunnels::run(args, node_bin).await,
        Command::AdminFlood(args) => admin_flood::run(args, node_bin, cli.dir, base_port).await,
        Command::Failover {
            nodes,
            sas,
            pps,
            faults,
            cycles,
            transfers,
            burst,
            insecure_plaintext,
            seed,
            json,
        } => {
            let faults = faults
                .iter()
                .map(|f| failover::Fault::parse(f))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let options = failover::Options {
                nodes,
                sas,
                pps,
                faults,
                cycles,
                transfers_per_fault: transfers,
                burst,
                seed,
                progress: !json || std::io::stderr().is_terminal(),
                insecure_plaintext,
            };
            let report = failover::run(options, node_bin, cli.dir, base_port).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} faults over {:.0} s; sequence numbers reused {}, out of order {}; message-ID regressions {} (of {} advances)",
                    report.faults.values().sum::<u32>(),
                    report.seconds,
                    report.seq_reuse,
                    report.seq_regressions,
                    report.msgid_regressions,
                    report.msgid_advances
                );
                for (kind, p) in &report.resume_ms {
                    println!(
                        "  {kind:<12} resume p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms",
                        p.p50, p.p99, p.max
                    );
                }
                println!(
                    "  transfer     gap    p50 {:>7.1} ms  p99 {:>7.1} ms; lease commits per busy SA per second {:.2}",
                    report.transfer_gap_ms.p50,
                    report.transfer_gap_ms.p99,
                    report.lease_commits_per_busy_sa_per_sec
                );
            }
            Ok(report.seq_reuse == 0
                && report.seq_regressions == 0
                && report.msgid_regressions == 0)
        }
        Command::StoreBench {
            nodes,
            sas,
            ops,
            concurrency,
            kill_leader_at,
            no_restart_check,
            insecure_plaintext,
            compare_plaintext,
            seed,
            json,
        } => {
            let options = store_bench::StoreBench {
                nodes,
                sas,
                ops,
                concurrency,
                kill_leader_at,
                restart_all: !no_restart_check,
                seed,
                progress: !json && std::io::stderr().is_terminal(),
                insecure_plaintext,
            };
            if let Some(rounds) = compare_plaintext {
                let comparison =
                    store_bench::compare_plaintext(options, rounds, node_bin, base_port).await?;
                println!("{}", serde_json::to_string_pretty(&comparison)?);
                return Ok(comparison.all_passed);
            }
            let report = store_bench::run(options, node_bin, cli.dir, base_port).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} updates acknowledged at {:.0}/s ({:.0}/s steady), latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
                    report.ops_acked,
                    report.commits_per_sec,
                    report.commits_per_sec_steady,
                    report.latency_ms.p50,
                    report.latency_ms.p99,
                    report.latency_ms.max
                );
                if let Some(ms) = report.leader_failover_ms {
                    println!(
                        "leader {} killed: first commit on the new leader after {ms:.0} ms",
                        report.killed_leader.unwrap_or(0)
                    );
                }
                println!(
                    "lost {} (unknown outcome {}, refused {}); {} replicas, digests equal: {}; after full restart: {}",
                    report.ops_lost,
                    report.ops_unknown,
                    report.ops_rejected,
                    report.replicas_checked,
                    report.digests_equal,
                    report
                        .restart_digest_equal
                        .map_or_else(|| "not checked".into(), |e| format!("digest equal: {e}"))
                );
            }
            Ok(report.ops_lost == 0
                && report.digests_equal
                && report.restart_digest_equal != Some(false))
        }
    }
}
