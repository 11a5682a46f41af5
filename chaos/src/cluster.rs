//! A cluster of real `evpc-node` processes that the runner can kill, pause and restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use evpc_api::AdminClient;
use evpc_node::local::{LocalCluster, LocalNode, spawn_node, stop_all};
use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use tonic::transport::Channel;

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

/// Running node processes, by id (1-based).
#[derive(Debug)]
pub struct ProcessCluster {
    /// Layout (ports, directories).
    pub spec: LocalCluster,
    nodes: Vec<LocalNode>,
    alive: Vec<bool>,
    exe: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl ProcessCluster {
    /// Starts `n` nodes under `dir` (a fresh temporary directory if `None`) and bootstraps them.
    pub async fn launch(
        n: u64,
        dir: Option<PathBuf>,
        base_port: u16,
        exe: PathBuf,
    ) -> anyhow::Result<ProcessCluster> {
        let (dir, temp) = match dir {
            Some(dir) => (dir, None),
            None => {
                let temp = tempfile::Builder::new().prefix("evpc-chaos-").tempdir()?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let spec = LocalCluster {
            nodes: n,
            dir,
            base_port,
        };
        let nodes = spec.spawn(&exe)?;
        let mut cluster = ProcessCluster {
            spec,
            alive: vec![true; nodes.len()],
            nodes,
            exe,
            _dir: temp,
        };
        if let Err(e) = cluster.spec.bootstrap(Duration::from_secs(30)).await {
            cluster.stop().await;
            return Err(e);
        }
        Ok(cluster)
    }

    /// Node ids.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().map(|n| n.config.id)
    }

    /// Ids of nodes whose process runs.
    pub fn alive_ids(&self) -> Vec<u64> {
        self.ids().filter(|id| self.is_alive(*id)).collect()
    }

    /// Whether node `id`'s process runs (as far as the runner knows).
    pub fn is_alive(&self, id: u64) -> bool {
        self.alive[(id - 1) as usize]
    }

    fn node(&self, id: u64) -> &LocalNode {
        &self.nodes[(id - 1) as usize]
    }

    /// An admin client for node `id` only (reads its own applied state).
    pub fn admin_of(&self, id: u64) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(
            &[self.node(id).config.admin_addr.to_string()],
            Duration::from_secs(5),
        )?)
    }

    /// A cluster.v1 client for node `id` (to propose to it directly).
    pub fn cluster_client(&self, id: u64) -> anyhow::Result<ClusterClient<Channel>> {
        let addr = self.node(id).config.raft_addr.to_string();
        let channel = evpc_node::peers::endpoint(&addr, Duration::from_secs(1))?
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(ClusterClient::new(channel).max_decoding_message_size(64 << 20))
    }

    /// The leader, as a live node reports it, once one is elected (waits up to `timeout`).
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for id in self.alive_ids() {
                let Ok(mut admin) = self.admin_of(id) else {
                    continue;
                };
                if let Ok(status) = admin.status(false).await
                    && let Some(leader) = status.leader_id
                    && self.is_alive(leader)
                {
                    return Ok(leader);
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no leader among live nodes {:?} within {timeout:?}",
                self.alive_ids()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs node `id` and reaps it.
    pub async fn sigkill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = &mut self.nodes[(id - 1) as usize];
        node.child.kill().await.context("SIGKILL")?;
        self.alive[(id - 1) as usize] = false;
        Ok(())
    }

    /// Starts node `id` again on its data directory.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let dir = self.spec.dir.join(format!("node{id}"));
        let node = &mut self.nodes[(id - 1) as usize];
        node.child = spawn_node(&self.exe, &dir.join("node.toml"), &node.log)?;
        self.alive[(id - 1) as usize] = true;
        Ok(())
    }

    /// Waits until every live node has applied the same index and reports the same leader.
    /// Returns that index.
    pub async fn converged(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.alive_ids() {
                if let Ok(mut admin) = self.admin_of(id)
                    && let Ok(status) = admin.status(false).await
                {
                    seen.push((status.last_applied_index, status.committed_index, status.leader_id));
                }
            }
            let alive = self.alive_ids().len();
            if seen.len() == alive
                && seen[0].2.is_some()
                && seen.iter().all(|s| s.0 == seen[0].0 && s.0 >= s.1 && s.2 == seen[0].2)
            {
                return Ok(seen[0].0);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "live nodes did not converge within {timeout:?}: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every live node with SIGTERM (SIGKILL after a grace period).
    pub async fn stop(&mut self) {
        stop_all(&mut self.nodes, Duration::from_secs(10)).await;
        self.alive.iter_mut().for_each(|a| *a = false);
    }
}
