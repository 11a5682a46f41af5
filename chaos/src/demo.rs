//! `evpc-chaos demo`: what evpc is for, in about a minute (needs root).
//!
//! ```text
//!  build what is missing (run through cargo: evpc-node, evpc-client beside this binary)
//!  the lab: 3 nodes behind one cluster address, a server behind them, clients behind a router
//!  clients: 3 strongSwan road warriors (if charon is installed) and 6 evpc-client ones
//!  a call in every tunnel (voice both ways, 50 packets/s), TCP to some
//!  SIGKILL the node that owns live calls ─► they go on from another node
//!  planned transfer of live calls ─► handed over without a packet lost
//!  a table of what the clients saw, and the HTML report's path
//! ```
//!
//! Ctrl-C at any point stops everything and removes the lab's namespaces (the runner's drop
//! guards do; a killed run's leftovers are removed by the next run).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::tunnels::{self, Args as TunnelsArgs, FaultKind, Report};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// evpc clients (beside 3 strongSwan road warriors when charon is installed).
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Where the HTML report goes.
    #[arg(long, default_value = "evpc-demo.html")]
    report: PathBuf,
}

/// Builds evpc-node and evpc-client beside this binary when it runs through `cargo run` and
/// they are missing, so one command does everything on a fresh checkout.
fn ensure_siblings() -> anyhow::Result<()> {
    let here = std::env::current_exe()?;
    let dir = here.parent().context("executable has no directory")?;
    let missing = ["evpc-node", "evpc-client"]
        .into_iter()
        .any(|bin| !dir.join(bin).is_file());
    if !missing {
        return Ok(());
    }
    let Ok(cargo) = std::env::var("CARGO") else {
        anyhow::bail!(
            "evpc-node and evpc-client are not built next to {}: run the demo with \
             `cargo run --release -p evpc-chaos -- demo`, or build them first \
             (cargo build --release -p evpc-node -p evpc-client)",
            here.display()
        );
    };
    let release = dir.ends_with("release");
    eprintln!("demo: building evpc-node and evpc-client (once)…");
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "-p", "evpc-node", "-p", "evpc-client"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("running cargo")?;
    anyhow::ensure!(status.success(), "cargo build failed ({status})");
    Ok(())
}

/// Runs the demo; `Ok(false)` if a guarantee was violated.
pub async fn run(args: Args, node_bin: Option<&Path>) -> anyhow::Result<bool> {
    ensure_siblings()?;
    let node_bin = crate::cluster::node_binary(node_bin)?;
    let swan = evpc_testkit::swan::missing_prerequisite().is_none();
    let swan_clients = if swan { 3 } else { 0 };
    let clients = args.clients;
    eprintln!(
        "demo: 3 nodes behind one address, {swan_clients} strongSwan and {clients} evpc clients{}, \
         a call in every tunnel",
        if swan {
            ""
        } else {
            " (charon is not installed)"
        }
    );
    let campaign = TunnelsArgs {
        nodes: 3,
        swan_clients: Some(swan_clients),
        clients,
        bulk: 2,
        faults: vec![FaultKind::KillOwner, FaultKind::Transfer],
        rounds: 1,
        in_order: true,
        call_s: 0,
        report: args.report.clone(),
        ..TunnelsArgs::defaults()
    };
    let report = tokio::select! {
        report = tunnels::campaign(&campaign, node_bin) => report?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("demo: interrupted; the lab is being removed");
            return Ok(false);
        }
    };
    print_story(&report);
    Ok(report.checks_passed)
}

/// What the clients saw, in words.
fn print_story(report: &Report) {
    println!();
    println!(
        "{:<52} {:>8} {:>14} {:>8}",
        "what happened", "clients", "longest gap", "lost"
    );
    for fault in &report.faults {
        let what = match fault.kind {
            FaultKind::KillOwner => format!(
                "node {} SIGKILLed while it carried live calls",
                fault.node.unwrap_or_default()
            ),
            FaultKind::Transfer => "planned transfer of live calls to another node".into(),
            other => other.name().to_string(),
        };
        let figures = report.by_kind.get(fault.kind.name());
        println!(
            "{:<52} {:>8} {:>11.0} ms {:>8}",
            what,
            fault.affected.len(),
            figures.map_or(0.0, |f| f.udp_ms.max),
            figures.map_or(0, |f| f.packets_lost)
        );
    }
    let inv = &report.invariants;
    println!();
    println!(
        "on the wire: {} ESP packets, {} (SPI, sequence number) sent twice",
        inv.esp_packets,
        inv.nonce_reuse.len()
    );
    println!(
        "at the clients: {} re-authentications, {} failed DPDs, {} inner addresses changed, \
         {} packets dropped by anti-replay",
        inv.reauthenticated.len(),
        inv.failed_dpds.len(),
        inv.inner_address_changed.len(),
        inv.client_replay_drops
    );
    if let Some(html) = &report.html {
        println!("report with plots: {}", html.display());
    }
    for failure in &report.failures {
        println!("FAILED: {failure}");
    }
}
