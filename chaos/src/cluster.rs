//! Where the runner finds the node binary; the cluster itself is `evpc_testkit::local::ProcessCluster`.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub use evpc_testkit::local::{LocalCluster, ProcessCluster};

/// Finds the `evpc-node` binary: `--node-bin`, else next to this executable.
pub fn node_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("evpc-node"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no evpc-node binary at {}; build it (cargo build --release -p evpc-node) or pass --node-bin",
        path.display()
    );
    Ok(path)
}
