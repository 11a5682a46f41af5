//! # evpc-node — the gateway daemon
//!
//! One node of an evpc cluster: a Raft member (openraft, storage from `evpc-raft-store`) that
//! serves two gRPC services and keeps the replicated placement in order.
//!
//! ```text
//!            evpcctl / evpc-chaos
//!                   │ admin.v1
//!                   ▼
//!  ┌──────────── AdminService ─────────────┐
//!  │ reads: StateReader (applied state)    │
//!  │ writes: Node::propose ────────────────┼──► leader? client_write : forward (cluster.v1 Propose)
//!  └───────────────────────────────────────┘
//!  ClusterService (cluster.v1) ◄── other members: append, vote, snapshot, forwarded proposals
//!  NetworkFactory (cluster.v1) ──► other members; Peers replaces dead channels
//!  reconciler (leader only): node registry + balanced slot map follow the Raft membership
//! ```
//!
//! `evpc-node run --config node.toml` runs one node; `evpc-node pki ...` issues the cluster's
//! certificates. A whole cluster of node processes on loopback is the test kit's
//! (`evpc_testkit::local`, run by `evpc-chaos local --nodes N`), not the daemon's.

pub mod admin_guard;
pub mod admin_service;
pub mod backend;
pub mod cluster_service;
pub mod config;
pub mod data_dir;
pub mod housekeeping;
pub mod ike_gateway;
pub mod node;
pub mod ownership;
pub mod peers;
pub mod pki;
pub mod priority;
pub mod raft_network;
pub mod resealer;
pub mod rotation;
pub mod sealing;
pub mod server;
pub mod tls;
pub mod wire;

/// Installs the `tracing` subscriber: `RUST_LOG` filters (default `info`), `EVPC_LOG_FORMAT=json`
/// switches to one JSON object per line.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if std::env::var("EVPC_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
