//! `evpc-chaos esp-bench`: userspace ESP throughput through TUN across two network namespaces.
//! (Being written: see the data-plane work in `evpc-dataplane`.)

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs the benchmark; `Ok(false)` if a check failed.
pub async fn run(_args: Args) -> anyhow::Result<bool> {
    anyhow::bail!("esp-bench is not built yet")
}
