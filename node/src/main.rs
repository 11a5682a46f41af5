//! `evpc-node`: run one gateway node, or issue the cluster's certificates. (`evpc-chaos local`
//! runs a whole cluster of them on loopback.)

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// The Raft path allocates per entry and per RPC; mimalloc's thread caches keep that off the
// critical path better than glibc's malloc under many short-lived tasks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use evpc_node::config::NodeConfig;

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
    /// The cluster's certificates: a CA, one certificate per node, one per operator.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) and a cluster key (cluster.key) in a new directory.
    Init {
        /// The PKI directory (created 0700).
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// A name for the cluster, put into the CA's subject.
        #[arg(long, default_value = "evpc")]
        name: String,
    },
    /// Issue node ID's certificate (node-ID.pem, node-ID.key).
    IssueNode {
        /// The node id.
        id: u64,
        /// The PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = evpc_node::pki::DEFAULT_LEAF_DAYS)]
        days: i64,
    },
    /// Issue an operator's certificate (client-NAME.pem, client-NAME.key) with a role.
    IssueClient {
        /// The operator's name, which the audit log shows.
        name: String,
        /// reader (status, lists), operator (moves SAs), admin (membership, keys).
        #[arg(long)]
        role: evpc_node::pki::Role,
        /// The PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = evpc_node::pki::DEFAULT_LEAF_DAYS)]
        days: i64,
    },
}

/// Runs a `pki` command and says what it wrote.
fn pki(command: PkiCommand) -> anyhow::Result<()> {
    use evpc_node::pki::PkiDir;
    let show = |files: evpc_node::pki::TlsFiles| {
        println!(
            "wrote {} and {} (owner-only); the CA is {}",
            files.cert_file.display(),
            files.key_file.display(),
            files.ca_file.display()
        );
    };
    match command {
        PkiCommand::Init { dir, name } => {
            let pki = PkiDir::new(dir);
            pki.init(&name)?;
            println!(
                "wrote {} and {} (owner-only, keep it off the nodes if you can) and the cluster \
                 key {} (owner-only, the same on every node)",
                pki.ca_cert().display(),
                pki.ca_key().display(),
                pki.cluster_key().display()
            );
        }
        PkiCommand::IssueNode { id, dir, days } => show(PkiDir::new(dir).issue_node(id, days)?),
        PkiCommand::IssueClient {
            name,
            role,
            dir,
            days,
        } => show(PkiDir::new(dir).issue_client(&name, role, days)?),
    }
    Ok(())
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
            Command::Pki(command) => pki(command),
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
