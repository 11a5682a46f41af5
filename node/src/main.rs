//! `evpc-node`: run one gateway node, or a local cluster of them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// The Raft path allocates per entry and per RPC; mimalloc's thread caches keep that off the
// critical path better than glibc's malloc under many short-lived tasks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use evpc_node::config::NodeConfig;
use evpc_node::local::LocalCluster;

/// An evpc gateway node.
#[derive(Debug, Parser)]
#[command(name = "evpc-node", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node until SIGTERM or SIGINT.
    Run {
        /// The node's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a cluster of N nodes on loopback as child processes, until SIGINT or SIGTERM.
    Local {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Directory for the nodes' configs, data and logs (reused if it exists).
        #[arg(long, default_value = "evpc-local")]
        dir: PathBuf,
        /// Node i listens on BASE+i (Raft) and BASE+100+i (admin).
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
    },
}

fn main() -> std::process::ExitCode {
    evpc_node::init_tracing();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("evpc-node: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => {
                let config = NodeConfig::load(&config)?;
                evpc_node::server::run(config).await
            }
            Command::Local {
                nodes,
                dir,
                base_port,
            } => evpc_node::local::run(LocalCluster::new(nodes, dir, base_port)).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("evpc-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
